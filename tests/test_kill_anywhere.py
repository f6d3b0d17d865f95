"""Kill anywhere, resume exactly: one run killed with SIGKILL again and again, at points spread
over the whole run (mid-epoch, right before and right after an epoch's validation and
checkpoints, in the middle of a checkpoint write, during the final test), each time restarted
with `resume=auto`, ends with the uninterrupted run's step count, `metrics.json` and
`metrics.csv` (every row once: none lost to a kill, none written twice).

The kills come from the job itself (`tests.killer.KillAt`, a real SIGKILL at a chosen step), so
they land where they mean to whatever the machine's speed. The run exercises everything a
resume must restore: dropout (RNG), a cosine schedule, a weighted scheme, early stopping,
step checkpoints that fall on an epoch's last step.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY, assert_same_logs, log_rows, session_processes, train_in_process
from tests.zygote import Zygote

RUN = [
    *TINY,
    "trainer.max_epochs=5",
    "callbacks.last.every_n_train_steps=5",  # 20 steps an epoch: some fall on its last step
    "model.dropout=0.1",
    "scheduler=cosine",
    "scheduler.warmup_steps=10",
    "weights=engagement",
    "trainer.log_every_n_steps=3",
    "callbacks.early_stopping.patience=1",
    "callbacks.early_stopping.min_delta=0.01",
]
TWO_RANKS = ["hardware.devices=2", "data.batch_size=512"]  # the same global batches


def kill(where: str, step: int = 0, node: bool = False) -> list[str]:
    """Overrides that SIGKILL the job at `where`, `step`; `node`: every process of it at once
    (rank 0 kills its process group), as a lost node does."""
    overrides = [
        "+callbacks.kill._target_=tests.killer.KillAt",
        f"+callbacks.kill.where={where}",
        f"+callbacks.kill.step={step}",
    ]
    return overrides + (["+callbacks.kill.rank=0", "+callbacks.kill.group=true"] if node else [])


@pytest.fixture(autouse=True)
def one_thread():
    # As in the job's subprocesses (tests.helpers.ENV): results then agree to the last bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def final_step(run: Path) -> int:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)[
        "global_step"
    ]


def assert_same_outcome(run: Path, reference: Path) -> None:
    assert final_step(run) == final_step(reference)
    got = json.loads((run / "metrics.json").read_text())
    expected = json.loads((reference / "metrics.json").read_text())
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    assert_same_logs(run, reference)
    validations = [r["step"] for r in log_rows(reference) if "val/click/auc" in r]
    assert len(validations) == len(set(validations))  # each validation once


def session_gone(session: int, timeout: float = 60) -> None:
    """Wait until no process of `session` is left (the ranks, their DataLoader workers)."""
    deadline = time.monotonic() + timeout
    while True:
        left = list(session_processes(session))
        if not left:
            return
        if time.monotonic() > deadline:
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"processes {left} of the killed job were still running")
        time.sleep(0.1)


def run_killed(zygote: Zygote, *overrides: str, cwd: Path) -> str:
    """The job, run until it kills itself: SIGKILL, and nothing of it left running. Forked from
    the session zygote (no ~10 s of imports each time) in a session of its own, which a node
    kill (`group=true`) ends whole; Lightning starts the other ranks as fresh processes."""
    done = zygote.run(*overrides, cwd=cwd, merge_stderr=True, new_session=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stdout[-4000:]
    assert "killer: SIGKILL" in done.stdout, done.stdout[-4000:]
    session_gone(done.pid)
    return done.stdout


def chain(
    zygote: Zygote, run: Path, tmp_path: Path, kills: list[list[str]], extra: list[str]
) -> list[str]:
    """Kill the run at each point in turn, each attempt resuming the one before."""
    outputs = []
    for number, point in enumerate(kills):
        resume = ["resume=auto"] if number else []
        overrides = [*RUN, *extra, *point, *resume, f"paths.output_dir={run}"]
        outputs.append(run_killed(zygote, *overrides, cwd=tmp_path))
        assert not (run / "metrics.json").exists()
    return outputs


@pytest.mark.e2e
def test_one_process_killed_anywhere_resumes_exactly(tmp_path, zygote):
    reference = tmp_path / "reference"
    train_in_process(*RUN, output_dir=reference)
    run = tmp_path / "run"
    outputs = chain(
        zygote,
        run,
        tmp_path,
        [
            kill("train_batch_end", 13),  # mid-epoch, 3 steps after last.ckpt
            kill("validation_end", 20),  # validated, the epoch's checkpoints not yet written
            kill("train_batch_start", 20),  # right after the epoch's checkpoints
            kill("checkpoint_write", 40),  # half of a checkpoint on disk
            kill("test"),  # training done, the final test under way
        ],
        [],
    )
    # Each restart continued from the newest whole checkpoint, never from scratch.
    for out in outputs[1:]:
        assert "resume=auto: continuing from" in out
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == []
    train_in_process(*RUN, "resume=auto", output_dir=run)
    assert_same_outcome(run, reference)


@pytest.mark.e2e
@pytest.mark.ddp
def test_two_processes_killed_anywhere_resume_exactly(tmp_path, zygote):
    reference = tmp_path / "reference"
    zygote.run(*RUN, *TWO_RANKS, f"paths.output_dir={reference}", cwd=tmp_path, check=True)
    run = tmp_path / "run"
    chain(
        zygote,
        run,
        tmp_path,
        [
            kill("train_batch_end", 13, node=True),
            kill("checkpoint_write", 40, node=True),
            kill("validation_end", 60, node=True),
            kill("test", node=True),
        ],
        TWO_RANKS,
    )
    zygote.run(*RUN, *TWO_RANKS, "resume=auto", f"paths.output_dir={run}", cwd=tmp_path, check=True)
    assert_same_outcome(run, reference)


@pytest.mark.e2e
def test_tensorboard_history_survives_a_kill(tmp_path, zygote):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tensorboard = [
        *RUN,
        "logger=tensorboard",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
    ]
    train_in_process(*tensorboard, output_dir=tmp_path / "reference")
    run = tmp_path / "run"
    run_killed(
        zygote, *tensorboard, *kill("train_batch_end", 27), f"paths.output_dir={run}", cwd=tmp_path
    )
    train_in_process(*tensorboard, "resume=auto", output_dir=run)

    def history(folder: Path) -> dict[str, list[tuple[int, float]]]:
        events = EventAccumulator(str(folder / "tensorboard")).Reload()
        return {
            tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]
        }

    got, expected = history(run), history(tmp_path / "reference")
    assert got.keys() == expected.keys()
    for tag, points in expected.items():
        # Steps 26 and 27 were logged by the killed run after its last checkpoint (step 25),
        # and again by the resumed run: TensorBoard shows them once, with the resumed values.
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], abs=1e-6), tag
