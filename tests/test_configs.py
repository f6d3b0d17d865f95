"""Every option of every config group composes and instantiates (torchtune-style)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from torch.cuda import is_available as cuda_available

from tests.helpers import CONF, TINY_DATA
from train import resolvers
from train.model import network_config
from train.weights import WeightScheme

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_with(overrides: list[str], tmp_path: Path):
    resolvers.register()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path)
            del cfg.hydra
        return cfg


def files_overrides(tmp_path: Path) -> list[str]:
    """data=files pointed at small simulated Parquet shards, columns named on the command line."""
    from train.data.synthetic import FeedSimulator

    paths = FeedSimulator(n_train=2000, n_val=500, n_test=500, n_users=50, n_videos=100).write(
        str(tmp_path / "feed"), shards=2
    )
    return [
        f"data.train={tmp_path}/feed/train",
        f"data.val={paths['val'][0]}",
        f"data.test={tmp_path}/feed/test/*.parquet",
        "data.categorical={user_id: 1000, video_id: 1000, device: 10}",
        "data.dense=[video_len_s]",
        "data.behaviours={click: click, finish: finish, watch_time: watch_s}",
        "data.group_key=user_id",
    ]


def test_groups_are_the_axes_of_variation():
    assert set(GROUPS) >= {
        "data",
        "model",
        "weights",
        "optimizer",
        "scheduler",
        "hardware",
        "logger",
    }


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g in GROUPS for o in options(g)], ids=lambda x: str(x)
)
def test_option_composes_and_instantiates(group, option, tmp_path, monkeypatch):
    text = (CONF / group / f"{option}.yaml").read_text()
    assert text.startswith("#"), f"train/conf/{group}/{option}.yaml must open with a comment"
    overrides = [f"{group}={option}"]
    if group != "data" or option == "synthetic":
        overrides += TINY_DATA
    if group == "data" and option == "files":
        overrides += files_overrides(tmp_path)
    elif group == "data" and option != "synthetic":
        cfg = compose_with(overrides, tmp_path)
        assert cfg.data._target_
        pytest.skip("public data configs are trained on their samples in tests/test_public_data.py")
    cfg = compose_with(overrides, tmp_path)
    if group == "hardware" and cfg.hardware.accelerator == "gpu" and not cuda_available():
        # Resolving would fail here: hardware=free_gpu leases a real GPU.
        pytest.skip("no GPU on this machine: composing only")
    OmegaConf.resolve(cfg)
    if group == "weights":
        assert isinstance(instantiate(cfg.weights), WeightScheme)
    elif group == "model":  # as the job builds it: without the heads' training keys
        net = instantiate(network_config(OmegaConf.to_container(cfg.model)))([10, 20], 3)
        assert sum(p.numel() for p in net.parameters()) > 0
    elif group == "optimizer":
        net = instantiate(network_config(OmegaConf.to_container(cfg.model)))([10, 20], 3)
        assert instantiate(cfg.optimizer)(net).param_groups
    elif group == "scheduler":
        import torch

        if cfg.scheduler:
            opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
            instantiate(cfg.scheduler)(opt, 100).step()
    elif group == "logger":  # a mapping of named loggers: `logger=[csv,mlflow]` selects several
        from lightning.pytorch.loggers import Logger

        # a tracker's server is read from the environment and reached only when the job starts
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
        assert list(cfg.logger) == [option]
        assert isinstance(instantiate(cfg.logger[option]), Logger)
    elif group == "hardware":
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert trainer.num_devices >= 1
    elif group == "data":
        data = instantiate(cfg.data)
        stats = data.prepare(instantiate(cfg.weights))
        assert stats.rows == (cfg.data.simulator.n_train if option == "synthetic" else 2000)
        assert "watch_time" in stats.continuous
    # the callbacks always instantiate with the composed monitor
    assert all(instantiate(c) is not None for c in cfg.callbacks.values())


def test_trainer_arguments_override_without_plus(tmp_path):
    cfg = compose_with(["trainer.max_epochs=3", "trainer.limit_train_batches=5"], tmp_path)
    assert cfg.trainer.max_epochs == 3 and cfg.trainer.limit_train_batches == 5


def test_scheme_knob_override_reaches_the_term(tmp_path):
    cfg = compose_with(["weights=seed", "weights.finish=10"], tmp_path)
    scheme = instantiate(cfg.weights)
    assert [t.coef for t in scheme.terms] == [1.0, 10.0, 5.0]
    assert scheme.knobs["finish"] == 10.0


def test_monitor_follows_the_label(tmp_path):
    cfg = compose_with(["weights=seed", "weights.label=finish"], tmp_path)
    assert cfg.callbacks.checkpoint.monitor == "val/finish/auc"


def test_a_config_folder_of_your_own_adds_schemes(tmp_path):
    """`--config-dir DIR` / `hydra.searchpath`: a user's own schemes beside the shipped ones."""
    (tmp_path / "mine" / "weights").mkdir(parents=True)
    (tmp_path / "mine" / "weights" / "my_mix.yaml").write_text(
        "# my_mix: select with weights=my_mix\n"
        "_target_: train.weights.build_scheme\nname: my_mix\nlabel: click\n"
        "terms: [{behaviour: like, coef: 4}]\n"
    )
    overrides = [f"hydra.searchpath=[file://{tmp_path / 'mine'}]", "weights=my_mix"]
    scheme = instantiate(compose_with(overrides, tmp_path).weights)
    assert scheme.name == "my_mix" and [t.coef for t in scheme.terms] == [4.0]
    # the shipped groups are still there
    assert compose_with([*overrides, "model=multihead"], tmp_path).model.heads
