"""`sharding=torchrec`: tables sharded over real gloo processes train exactly as one unsharded
process, each rank holds only its shards, a kill mid-epoch resumes exactly, a consolidated run
scores like the run, and bad inputs end with `error:` before anything is written.

Skipped without the optional engine (README, "Sharded embedding tables"); `.ci/run` installs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from hydra.utils import instantiate
from sklearn.metrics import roc_auc_score

from tests.helpers import TINY, assert_same_logs, run_job, train_in_process
from train.sharded_embeddings import INIT_CHUNK, initial_rows
from train.sharding import ShardingError, TorchRec

needs_torchrec = pytest.mark.skipif(
    importlib.util.find_spec("torchrec") is None, reason="the optional torchrec engine is absent"
)
COMMON = [
    *TINY,
    "sharding=torchrec",
    # Elementwise Adagrad: its state is the same math however a row's columns are split.
    "sharding.optimizer=adagrad",
    "sharding.lr=0.05",
    "weights=seed",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
    "data.simulator.n_val=3001",  # odd: ranks hold different row counts
    "data.simulator.n_test=3001",
]
MIXED = "sharding.plan={user_id: row_wise, video_id: column_wise}"
LABELS = ["click", "finish", "like", "watch_s", "p_click", "p_finish", "p_like", "e_watch_s"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, s3_server) -> dict[str, Path]:
    """One process at batch 1024 (every table whole on its only rank), its run folder and
    shards on S3 (a moto server on loopback), consolidated from there to `one`; two processes at
    512 with whole tables; two with a row-wise and a column-wise table, killed mid-epoch and
    resumed."""
    from train.consolidate import consolidate

    root = tmp_path_factory.mktemp("sharded")
    environment = dict(os.environ)
    try:
        os.environ.update(s3_server.env)
        url = s3_server.bucket("sharded") + "/one"
        train_in_process(*COMMON, "data.batch_size=1024", output_dir=url)
        consolidate(url, str(root / "one"))
    finally:  # Lightning left its rendezvous port here, which the jobs below would inherit
        os.environ.clear()
        os.environ.update(environment)
    two = [*COMMON, "hardware.devices=2", "data.batch_size=512"]
    table = run_job(*two, f"paths.output_dir={root}/table", cwd=root)
    assert table.returncode == 0, table.stderr[-3000:]
    killed = [
        *two,
        MIXED,
        f"paths.output_dir={root}/mixed",
        "callbacks.last.every_n_train_steps=3",
    ]
    first = run_job(
        *killed,
        "+callbacks.kill._target_=tests.killer.KillAt",
        "+callbacks.kill.where=train_batch_end",
        "+callbacks.kill.step=26",  # epoch 2 of 20 steps; last.ckpt is at step 24
        cwd=root,
    )
    assert first.returncode != 0 and "killer: SIGKILL" in first.stderr, first.stderr[-3000:]
    assert not (root / "mixed" / "metrics.json").exists()
    resumed = run_job(*killed, "resume=auto", cwd=root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"one": root / "one", "table": root / "table", "mixed": root / "mixed"}


def consolidated_state(run: Path, out: Path | None = None) -> dict[str, torch.Tensor]:
    """The run's last.ckpt weights, consolidated into `out` first (None: `run` is consolidated)."""
    if out is not None:
        from train.consolidate import consolidate

        consolidate(str(run), str(out))
        run = out
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@needs_torchrec
@pytest.mark.ddp
def test_sharded_processes_train_as_one_unsharded_process(runs, tmp_path):
    one = json.loads((runs["one"] / "metrics.json").read_text())
    reference = consolidated_state(runs["one"])  # written on S3, consolidated from there
    for name in ("table", "mixed"):
        metrics = json.loads((runs[name] / "metrics.json").read_text())
        assert metrics.keys() == one.keys()
        for key in one:
            assert metrics[key] == pytest.approx(one[key], abs=1e-5), (name, key)
        state = consolidated_state(runs[name], tmp_path / name)
        assert state.keys() == reference.keys()
        assert "model.embeddings.table.weight" in state  # the unsharded network's layout
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, atol=1e-5, rtol=0, msg=key)
    # The kill and the resume lost or repeated no step: the same log as the run never killed.
    assert_same_logs(runs["mixed"], runs["table"], tolerance=1e-5)


@needs_torchrec
@pytest.mark.ddp
def test_each_rank_holds_only_its_shards(runs):
    def plan(run: str) -> list[dict]:
        return json.loads((runs[run] / "sharding_plan.json").read_text())["shards"]

    spec = yaml.safe_load((runs["table"] / "config.yaml").read_text())["data"]["categorical"][0]
    whole = plan("table")
    for table, rows in spec.items():
        shards = [s for s in whole if s["table"] == table]
        assert len(shards) == 1 and (shards[0]["rows"], shards[0]["columns"]) == (rows, 16)
    assert {s["rank"] for s in whole} == {0, 1}  # balanced by bytes: both ranks hold tables
    per_rank = [sum(s["bytes"] for s in whole if s["rank"] == r) for r in (0, 1)]
    assert max(per_rank) < 0.8 * sum(per_rank)
    mixed = plan("mixed")
    users = sorted((s["rank"], s["row"], s["rows"]) for s in mixed if s["table"] == "user_id")
    assert users == [(0, 0, 500), (1, 500, 500)]
    videos = sorted(
        (s["rank"], s["column"], s["columns"]) for s in mixed if s["table"] == "video_id"
    )
    assert videos == [(0, 0, 8), (1, 8, 8)]
    # The shard files hold what the plan says: each rank wrote its own part.
    folder = next((runs["mixed"] / "checkpoints" / "last.ckpt.shards").iterdir())
    assert sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


@needs_torchrec
@pytest.mark.ddp
def test_a_consolidated_run_scores_like_the_run(runs, tmp_path):
    from train.predict import predict

    out = tmp_path / "plain"
    consolidated_state(runs["table"], out)
    config = yaml.safe_load((runs["table"] / "config.yaml").read_text())
    table = instantiate(config["data"]["simulator"]).table("test")
    data = tmp_path / "test.parquet"
    pq.write_table(table.drop_columns([c for c in LABELS if c in table.column_names]), data)
    predict(str(out / "checkpoints" / "best.ckpt"), str(data), str(tmp_path / "scores.parquet"))
    scores = pq.read_table(tmp_path / "scores.parquet").column("score").to_numpy()
    metrics = json.loads((runs["table"] / "metrics.json").read_text())
    click = table.column("click").to_numpy() > 0
    assert roc_auc_score(click, scores.astype(np.float64)) == pytest.approx(
        metrics["test/click/auc"], abs=1e-6
    )
    # The sharded checkpoint itself is refused by name, with the way out.
    with pytest.raises(Exception, match=r"train\.consolidate"):
        predict(
            str(runs["table"] / "checkpoints" / "best.ckpt"), str(data), str(tmp_path / "x.parquet")
        )


def test_initial_tables_do_not_depend_on_the_plan():
    whole = initial_rows(3, 1, 0, INIT_CHUNK + 100, 8)
    assert torch.equal(initial_rows(3, 1, INIT_CHUNK - 5, 50, 8), whole[INIT_CHUNK - 5 :][:50])
    assert not torch.equal(initial_rows(4, 1, 0, 10, 8), whole[:10])
    assert whole.std().item() == pytest.approx(0.01, rel=0.05)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sharding.plan={nope: row_wise}"], "sharding.plan.nope: no such embedding table"),
        (["sharding.plan={user_id: diagonal}"], "sharding.plan.user_id='diagonal'"),
        (
            ["sharding.default=auto", "sharding.plan={user_id: row_wise}"],
            "sharding.plan.user_id=row_wise: TorchRec's planner offers no row-wise",
        ),
        (["sharding.optimizer=adam"], "sharding.optimizer=adam: fbgemm's CPU build"),
        (["nonfinite=skip"], "nonfinite=skip"),
        (["model=deepfm"], "first-order table"),
        (["init_from=/no/such/run"], "a warm start into a sharded run is not supported"),
    ],
)
@needs_torchrec
def test_bad_sharding_inputs_end_with_an_error_and_write_nothing(overrides, message, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        train_in_process(*TINY, "sharding=torchrec", *overrides, output_dir=out)
    assert str(exit_.value.code).startswith("error: ") and message in str(exit_.value.code)
    assert not out.exists()


def test_without_the_engine_the_error_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchrec", None)  # as if never installed: import fails
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        train_in_process(*TINY, "sharding=torchrec", output_dir=out)
    assert "pip install --no-deps torchrec==1.8.0" in str(exit_.value.code)
    assert not out.exists()
    with pytest.raises(ShardingError, match=r"sharding\.lr"):
        TorchRec(lr=0)


@needs_torchrec
def test_the_planner_keeps_every_table_sharded_and_fused(tmp_path):
    import torch.distributed as dist

    from train.sharded_embeddings import TorchRecEmbeddings

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        embeddings = TorchRecEmbeddings({"a": 1000, "b": 10, "c": 5}, 16, seed=0)
        engine = TorchRec(default="auto", plan={"a": "column_wise"})
        sizes = {t: (rows, 16) for t, rows in embeddings.tables.items()}
        plan = engine.module_plan(embeddings.collection, sizes, torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    assert sorted(plan) == ["a", "b", "c"]
    assert plan["a"].sharding_type == "column_wise"  # the config's constraint
    # never replicated (data_parallel): the job's DDP does not reduce the tables
    assert all(p.sharding_type in ("table_wise", "column_wise") for p in plan.values())
    assert all(p.compute_kernel == "fused" for p in plan.values())
