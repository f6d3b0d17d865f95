"""Checkpoints that survive the ways jobs end, and runs that continue exactly where they stopped.

Fast: atomic writes (a failed or killed save never replaces the previous checkpoint) and the
choice `resume=auto` makes, on a local disk and on a real S3 server (moto on loopback).
Slow (e2e): `python -m train` killed with SIGKILL mid-epoch while writing to S3, then restarted
with `resume=auto`, ends with the steps, weights and metrics of an uninterrupted run; killed
while a large checkpoint is being written, the previous one still loads and the run goes on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import helpers
from tests.conftest import S3Server
from tests.helpers import TINY, assert_same_logs
from train import checkpoint_io
from train.checkpoint_io import ResumeError, atomic_save, select_checkpoint

STEPS_PER_EPOCH = 20  # TINY: 20000 rows / batch 1024


def training_checkpoint(step: int = 0, **extra: Any) -> dict[str, Any]:
    """What a Lightning training checkpoint holds at least (for the selection tests)."""
    return {
        "global_step": step,
        "state_dict": {"w": torch.full((4,), float(step))},
        "loops": {"fit_loop": {}},
        "optimizer_states": [{}],
        **extra,
    }


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


# --------------------------------------------------------------------------- atomic writes


def test_atomic_save_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "deep" / "last.ckpt"
    atomic_save(training_checkpoint(1), str(target))
    atomic_save(training_checkpoint(2), str(target))
    assert torch.load(target, weights_only=True)["global_step"] == 2
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_save(training_checkpoint(1), str(target))
    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save(training_checkpoint(2, bad=Unpicklable(), big=torch.zeros(10**6)), str(target))
    assert torch.load(target, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_killed_writers_leftover_is_ignored_then_cleaned(tmp_path):
    good = tmp_path / "last.ckpt"
    atomic_save(training_checkpoint(1), str(good))
    leftover = tmp_path / ".last.ckpt.k1ll3d.tmp"  # what a writer killed mid-save leaves
    leftover.write_bytes(good.read_bytes()[:100])
    assert select_checkpoint("auto", None, [str(tmp_path)]) == str(good)
    atomic_save(training_checkpoint(2), str(good))
    assert not leftover.exists()


# --------------------------------------------------------------------------- choosing


def test_resume_auto_takes_the_newest_loadable_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    for name, step in [("best.ckpt", 20), ("last.ckpt", 30), ("hpc_ckpt_1.ckpt", 35)]:
        atomic_save(training_checkpoint(step), str(folder / name))
        time.sleep(0.02)
    chosen = select_checkpoint("auto", None, [str(tmp_path), str(folder)])
    assert chosen == str(folder / "hpc_ckpt_1.ckpt")

    # A newer last.ckpt wins; a torn newer one (a writer that did not write atomically) and a
    # weights-only one are skipped.
    atomic_save(training_checkpoint(40), str(folder / "last.ckpt"))
    assert select_checkpoint("auto", None, [str(folder)]) == str(folder / "last.ckpt")
    (folder / "hpc_ckpt_2.ckpt").write_bytes((folder / "last.ckpt").read_bytes()[:-200])
    torch.save({"state_dict": {}}, folder / "weights.ckpt")
    assert select_checkpoint("auto", None, [str(folder)]) == str(folder / "last.ckpt")


def test_equal_times_prefer_hpc_then_last(tmp_path):
    for name in ("best.ckpt", "last.ckpt", "hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt"):
        atomic_save(training_checkpoint(), str(tmp_path / name))
        os.utime(tmp_path / name, (1_000_000, 1_000_000))
    order = [Path(c.url).name for c in checkpoint_io.find_checkpoints([str(tmp_path)])]
    assert order == ["hpc_ckpt_2.ckpt", "hpc_ckpt_1.ckpt", "last.ckpt", "best.ckpt"]


def test_resume_choices_and_errors(tmp_path):
    assert select_checkpoint("auto", None, [str(tmp_path / "absent")]) is None
    assert select_checkpoint("auto", None, [str(tmp_path)]) is None
    assert select_checkpoint(False, None, [str(tmp_path)]) is None
    given = tmp_path / "given.ckpt"
    atomic_save(training_checkpoint(3), str(given))
    assert select_checkpoint("auto", str(given), [str(tmp_path)]) == str(given)  # it wins
    with pytest.raises(ResumeError, match=r"ckpt_path=.*absent\.ckpt: does not load"):
        select_checkpoint(False, str(tmp_path / "absent.ckpt"), [])
    given.unlink()
    with pytest.raises(ResumeError, match="expected `auto`"):
        select_checkpoint("latest", None, [str(tmp_path)])
    (tmp_path / "last.ckpt").write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(ResumeError, match=r"last\.ckpt: does not load") as err:
        select_checkpoint("auto", None, [str(tmp_path)])
    assert "resume=false" in str(err.value)


@pytest.mark.s3
def test_atomic_save_and_resume_auto_on_s3(s3_env: S3Server):
    fs = s3_env.filesystem()
    run = f"{s3_env.bucket('ckpt')}/runs/x"
    atomic_save(training_checkpoint(7), f"{run}/checkpoints/last.ckpt")
    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save(training_checkpoint(8, bad=Unpicklable()), f"{run}/checkpoints/last.ckpt")
    # A torn object (as a non-atomic writer would leave) is skipped.
    fs.pipe_file(f"{run}/checkpoints/hpc_ckpt_1.ckpt".removeprefix("s3://"), b"PK\x03\x04")
    chosen = select_checkpoint("auto", None, [run, f"{run}/checkpoints"])
    assert chosen == f"{run}/checkpoints/last.ckpt"
    with fs.open(chosen.removeprefix("s3://"), "rb") as handle:
        assert torch.load(handle, weights_only=True)["global_step"] == 7


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- end to end


def start_job(*overrides: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The run under test, stderr merged into stdout (the order of both tells what happened)."""
    return helpers.start_job(*overrides, cwd=cwd, env=env, merge_stderr=True)


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-4000:]
    return out


def kill_when(process: subprocess.Popen, ready, timeout: float = 300, poll: float = 0.05) -> None:
    """SIGKILL `process` as soon as `ready()` is true (a checkpoint is there, a save is on)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            pytest.fail(
                f"the run ended before it could be killed:\n{process.stdout.read()[-3000:]}"
            )
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the run never reached the point where it is to be killed")
        time.sleep(poll)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL


def assert_same_run(a: dict[str, Any], b: dict[str, Any], metrics_a: dict, metrics_b: dict):
    assert a["global_step"] == b["global_step"]
    assert a["epoch"] == b["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=1e-5, atol=1e-6)
    assert metrics_a.keys() == metrics_b.keys()
    for key in metrics_a:
        assert metrics_a[key] == pytest.approx(metrics_b[key], abs=1e-6), key


def loader_position(checkpoint: dict[str, Any]) -> tuple[int, int]:
    """(epoch, batches done in it) as the training data loader saved them."""
    (state,) = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    return state["epoch"], state["batches_done"]


@pytest.mark.e2e
@pytest.mark.s3
def test_kill9_mid_epoch_then_resume_auto_on_s3_is_exact(tmp_path, s3_env: S3Server, zygote):
    # ~155 steps an epoch (batch 128), a last.ckpt every 10: killed 3 steps after the first one.
    common = [
        *TINY,
        "data.batch_size=128",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=5",
        "callbacks.last.every_n_train_steps=10",
    ]
    reference = start_job(*common, f"paths.output_dir={tmp_path}/reference", cwd=tmp_path)
    run = f"{s3_env.bucket('runs')}/run"
    fs = s3_env.filesystem()
    last = f"{run}/checkpoints/last.ckpt".removeprefix("s3://")

    killed = zygote.run(
        *common,
        "+callbacks.kill._target_=tests.killer.KillAt",
        "+callbacks.kill.step=13",
        f"paths.output_dir={run}",
        cwd=tmp_path,
        env=s3_env.env,
        merge_stderr=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert not fs.exists(f"{run}/metrics.json".removeprefix("s3://"))
    chosen = select_checkpoint("auto", None, [run, f"{run}/checkpoints"])
    assert chosen == f"s3://{last}"
    with fs.open(last, "rb") as handle:
        interrupted = torch.load(handle, weights_only=True)
    # Mid-epoch, and the data position is the number of batches the optimizer consumed.
    assert loader_position(interrupted) == (0, 10)
    assert interrupted["global_step"] == 10

    resumed = zygote.run(
        *common, f"paths.output_dir={run}", "resume=auto", cwd=tmp_path, env=s3_env.env, check=True
    )
    assert f"resume=auto: continuing from {run}/checkpoints/" in resumed.stdout + resumed.stderr
    finish(reference)

    with fs.open(last, "rb") as handle:
        after = torch.load(handle, weights_only=True)
    expected = torch.load(tmp_path / "reference/checkpoints/last.ckpt", weights_only=True)
    steps = -(-json.loads(fs.cat_file(f"{run}/stats.json".removeprefix("s3://")))["rows"] // 128)
    assert expected["global_step"] == 2 * steps
    metrics = json.loads(fs.cat_file(f"{run}/metrics.json".removeprefix("s3://")))
    assert_same_run(
        after, expected, metrics, json.loads((tmp_path / "reference/metrics.json").read_text())
    )
    # The log on S3 holds the rows written before the kill and after it, each once.
    (tmp_path / "copy" / "logs").mkdir(parents=True)
    fs.get(f"{run}/logs/metrics.csv".removeprefix("s3://"), str(tmp_path / "copy/logs/metrics.csv"))
    assert_same_logs(tmp_path / "copy", tmp_path / "reference")


@pytest.mark.e2e
def test_kill9_while_saving_keeps_the_previous_checkpoint(tmp_path, zygote):
    # A 600k x 32 embedding table: ~230 MB checkpoints (weights + two Adam moments), whose
    # writing takes long enough to be caught in the middle.
    big = [
        *TINY,
        "data.categorical=[{user_id:600000},video_id,author_id,category,hour,device]",
        "model.embedding_dim=32",
        "trainer.max_epochs=1",
    ]
    folder = tmp_path / "run" / "checkpoints"
    process = start_job(
        *big,
        "callbacks.last.every_n_train_steps=2",
        f"paths.output_dir={tmp_path}/run",
        cwd=tmp_path,
    )

    def writing() -> bool:
        names = os.listdir(folder) if folder.exists() else []
        return "last.ckpt" in names and any(n.startswith(".last.ckpt.") for n in names)

    kill_when(process, writing, poll=0.002)
    leftovers = [p for p in folder.iterdir() if p.name.startswith(".last.ckpt.")]
    assert leftovers, "the kill landed after the save completed"
    previous = torch.load(folder / "last.ckpt", weights_only=True)  # the previous one, whole
    assert previous["global_step"] % 2 == 0 and previous["global_step"] > 0
    assert leftovers[0].stat().st_size < (folder / "last.ckpt").stat().st_size
    assert select_checkpoint("auto", None, [str(folder)]) == str(folder / "last.ckpt")

    # ckpt_path as a URL continues the same run from it, to the step count of a whole epoch.
    resumed = zygote.run(
        *big,
        "callbacks.last.every_n_train_steps=1000",
        f"ckpt_path=file://{folder}/last.ckpt",
        f"paths.output_dir={tmp_path}/run",
        cwd=tmp_path,
        check=True,
    )
    restored = f"Restored all states from the checkpoint at file://{folder}/last.ckpt"
    assert restored in resumed.stdout + resumed.stderr
    final = torch.load(folder / "last.ckpt", weights_only=True, mmap=True)
    assert final["global_step"] == STEPS_PER_EPOCH
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "leftover cleaned up"
