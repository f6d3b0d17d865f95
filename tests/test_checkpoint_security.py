"""Checkpoints and exported artifacts load without running code from the file: crafted ones
that would (a pickled `__reduce__` payload, a model config naming a function, a program graph
calling one) are refused, and their payload never runs; real checkpoints load with
`torch.load(weights_only=True)`."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from tests.helpers import trained_run, write_checkpoint
from train import serve
from train.checkpoint import CheckpointError, load
from train.export import export


class Payload:
    """Unpickling this runs a shell command (creates the marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ExecPayload(Payload):
    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def crafted(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    marker = tmp_path / f"{kind}.marker"
    path = tmp_path / f"{kind}.ckpt"
    good = torch.load(write_checkpoint(tmp_path / "good.ckpt"), weights_only=True)
    if kind == "state_dict":  # the payload hidden among the tensors of a real checkpoint
        good["state_dict"]["model.extra"] = Payload(marker)
        torch.save(good, path)
    elif kind == "upweight":
        good["upweight"]["model"] = ExecPayload(marker)
        torch.save(good, path)
    elif kind == "legacy":  # a plain pickle stream, not torch's zip format
        path.write_bytes(pickle.dumps({"state_dict": {}, "x": Payload(marker)}, protocol=2))
    return path, marker


@pytest.mark.parametrize("kind", ["state_dict", "upweight", "legacy"])
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, kind):
    path, marker = crafted(tmp_path, kind)
    with pytest.raises(CheckpointError, match=r"refused to load: it holds Python objects"):
        load(str(path))
    assert not marker.exists()


def test_the_crafted_payload_is_real(tmp_path):
    # Guard against a test that cannot fail: an unrestricted load does run the payload.
    path, marker = crafted(tmp_path, "state_dict")
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_command_line_refuses_it_too(tmp_path, zygote):
    path, marker = crafted(tmp_path, "state_dict")
    done = zygote.run(
        f"ckpt={path}", f"out={tmp_path}/artifact", cwd=tmp_path, module="train.export", timeout=300
    )
    assert done.returncode == 1
    assert "refused to load" in done.stderr and "posix.system" in done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists() and not (tmp_path / "artifact").exists()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("os.system", "not in a trusted package"),
        ("subprocess.Popen", "not in a trusted package"),
        ("builtins.exec", "not in a trusted package"),
        ("train.predict.os.system", "cannot be imported"),
        ("train.checkpoint.importlib", "not an nn.Module class"),
        ("train.model.ACTIVATIONS", "not an nn.Module class"),
    ],
)
def test_a_model_config_naming_a_function_is_refused(tmp_path, target, message):
    # The network is rebuilt from the checkpoint's own config: a `_target_` with `_args_` that
    # Hydra's instantiate would call must not be called.
    marker = tmp_path / "marker"
    path = write_checkpoint(tmp_path / "tiny.ckpt")
    saved = torch.load(path, weights_only=True)
    saved["upweight"]["model"] = {
        "_target_": target,
        "_partial_": False,
        "_args_": [f"touch {marker}"],
        "shell": True,
    }
    torch.save(saved, path)
    with pytest.raises(CheckpointError, match=message):
        load(str(path))
    assert not marker.exists()


@pytest.mark.e2e
def test_real_checkpoints_load_with_weights_only(tmp_path_factory):
    # What Lightning adds (loops, callback states, optimizer and LambdaLR scheduler states)
    # is all on torch's weights_only allowlist.
    run = trained_run(tmp_path_factory)
    for name in ("best.ckpt", "last.ckpt"):
        saved = torch.load(run / "checkpoints" / name, weights_only=True)
        assert {"state_dict", "loops", "callbacks", "optimizer_states", "upweight"} <= set(saved)
        assert saved["lr_schedulers"], "the run used scheduler=cosine"
        assert load(str(run / "checkpoints" / name)).scorer.outputs == ["score", "p_calibrated"]


# -- exported artifacts -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("artifact")
    export(str(write_checkpoint(folder / "tiny.ckpt")), str(folder / "artifact"))
    return folder / "artifact"


def rewrite(source: Path, target: Path, edit) -> None:
    """Copy the .pt2 zip, passing each member through `edit(name, bytes) -> bytes`."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, edit(name, src.read(name)))


def pickled(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_the_exported_program_loads(artifact):
    # The control for the crafted programs below: the untouched one loads and scores.
    row = {"user_id": 1, "video_id": "x", "device": None, "video_len_s": 3.0, "user_activity": 0}
    assert serve.Model.load(artifact).score_rows([row, row])["score"].shape == (2,)


def test_a_program_with_pickled_inputs_is_refused(artifact, tmp_path):
    # torch.export.load retries a failed weights_only load of sample inputs with full pickle.
    marker = tmp_path / "marker"
    bad = tmp_path / "artifact"
    bad.mkdir()
    (bad / "feature_spec.json").write_bytes((artifact / "feature_spec.json").read_bytes())

    def edit(name: str, data: bytes) -> bytes:
        return pickled((Payload(marker),)) if name.endswith("sample_inputs/model.pt") else data

    rewrite(artifact / "model.pt2", bad / "model.pt2", edit)
    with pytest.raises(serve.ArtifactError, match="refused to load"):
        serve.Model.load(bad)
    assert not marker.exists()


def test_a_program_with_pickled_weights_is_refused(artifact, tmp_path):
    marker = tmp_path / "marker"
    program = tmp_path / "model.pt2"

    def edit(name: str, data: bytes) -> bytes:
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            self_path = first["path_name"]
            edit.target = self_path  # type: ignore[attr-defined]
            return json.dumps(config).encode()
        return data

    rewrite(artifact / "model.pt2", tmp_path / "step.pt2", edit)
    weight = f"data/weights/{edit.target}"  # type: ignore[attr-defined]
    rewrite(
        tmp_path / "step.pt2",
        program,
        lambda name, data: pickled(Payload(marker)) if name.endswith(weight) else data,
    )
    with pytest.raises(serve.ArtifactError, match="refused to load"):
        serve.load_program(program)
    assert not marker.exists()


def test_a_program_calling_a_python_function_is_refused(artifact, tmp_path):
    # A graph node calling os.system (reachable as `torch.os.system`) instead of a torch op.
    marker = tmp_path / "marker"
    program = tmp_path / "model.pt2"

    def edit(name: str, data: bytes) -> bytes:
        if not name.endswith("models/model.json"):
            return data
        exported = json.loads(data)
        node = next(
            n
            for n in exported["graph_module"]["graph"]["nodes"]
            if n["target"].endswith("sigmoid.default")
        )
        node["target"] = "torch.os.system"
        node["inputs"] = [{"name": "command", "arg": {"as_string": f"touch {marker}"}, "kind": 1}]
        return json.dumps(exported).encode()

    rewrite(artifact / "model.pt2", program, edit)
    with pytest.raises(serve.ArtifactError, match=r"torch\.export program|refused"):
        module = serve.load_program(program)
        module(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2))
    assert not marker.exists()


def test_only_torch_operators_pass_the_graph_check():
    assert serve._allowed(torch.ops.aten.sigmoid.default)
    assert not serve._allowed(torch.ops.aten.from_file.default)  # opens a file by name
    assert not serve._allowed(os.system)
    assert not serve._allowed(torch.save)
