"""`slurm/train.sbatch` and `slurm/sweep.sbatch` on a real one-node Slurm cluster (munged,
slurmctld, slurmd; started here, see tests/slurm_cluster.py).

- 2 tasks: DDP over gloo to the end, metrics.json in the run folder named after the job id;
- the same job sent SIGUSR1 mid-epoch, or as an epoch's validation ends: it saves
  hpc_ckpt_1.ckpt at the next step boundary, requeues itself, restarts, continues from there and
  ends with the steps, weights, metrics and log rows of the uninterrupted job;
- a job array sweeps a scheme and a coefficient (a SWEEP_FILE line each), one folder each.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import free_port
from tests.helpers import ENV, ROOT, TINY, assert_same_logs
from tests.slurm_cluster import SlurmCluster, Unavailable
from tests.test_resume import assert_same_run, loader_position

pytestmark = pytest.mark.slurm
# hardware=slurm comes from the scripts: the counts from the job, not from the command line.
SMALL = [a for a in TINY if not a.startswith("hardware=")]
ARGS = [
    *SMALL,
    "data.batch_size=256",  # per task: global batches of 512, ~39 steps an epoch
    "trainer.max_epochs=2",
    "callbacks.last.every_n_train_steps=3",  # the first one shows that training is under way
    "callbacks.requeue.check_every_n_steps=1",
]


@pytest.fixture(scope="module")
def cluster() -> SlurmCluster:
    # Not under pytest's 0700 tmp folders: munged wants every folder above its socket open.
    folder = Path(tempfile.mkdtemp(prefix="upweight-slurm-"))
    folder.chmod(0o755)
    try:
        started = SlurmCluster(folder).start()
    except Unavailable as err:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"no Slurm cluster: {err}")
    yield started
    started.stop()
    shutil.rmtree(folder, ignore_errors=True)


def submit(cluster: SlurmCluster, folder: Path, *args: str, **env: str) -> str:
    return cluster.sbatch(
        "--cpus-per-task=1",
        f"--output={folder}/slurm-%j.out",
        *args,
        env={**ENV, "UPWEIGHT_RUNS": str(folder / "runs"), **env},
        cwd=folder,
    )


def log(folder: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(folder.glob("slurm-*.out")))


def completed(cluster: SlurmCluster, job: str, folder: Path, timeout: float = 600) -> dict:
    info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout)
    assert info["JobState"] == "COMPLETED", f"{info}\n{log(folder)[-5000:]}\n{cluster.logs()}"
    return info


def final(run: Path) -> tuple[dict[str, Any], dict[str, float]]:
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    return checkpoint, json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted")
    job = submit(
        cluster,
        folder,
        "--ntasks-per-node=2",
        str(ROOT / "slurm" / "train.sbatch"),
        *ARGS,
        MASTER_PORT=str(free_port()),
    )
    completed(cluster, job, folder)
    return folder / "runs" / job


def test_two_tasks_train_with_ddp_to_the_end(uninterrupted: Path):
    text = log(uninterrupted.parent.parent)
    assert "MEMBER: 1/2" in text and "MEMBER: 2/2" in text, text[-3000:]
    checkpoint, metrics = final(uninterrupted)
    assert 0.5 < metrics["test/click/auc"] <= 1.0
    rows = json.loads((uninterrupted / "stats.json").read_text())["rows"]
    assert checkpoint["global_step"] == 2 * -(-rows // 512)


@pytest.mark.parametrize(
    "when",
    [
        "mid_epoch",  # scancel -s USR1 once training is under way
        "after_validation",  # each rank signalled as the first epoch's validation ends
    ],
)
def test_usr1_saves_requeues_and_resumes_exactly(cluster, uninterrupted, tmp_path, when):
    steps = 40  # 20000 rows in global batches of 512
    signal_at = []
    if when == "after_validation":
        signal_at = [
            "+callbacks.kill._target_=tests.killer.KillAt",
            "+callbacks.kill.where=validation_end",
            f"+callbacks.kill.step={steps}",
            "+callbacks.kill.signal=SIGUSR1",
        ]
    job = submit(
        cluster,
        tmp_path,
        "--ntasks-per-node=2",
        str(ROOT / "slurm" / "train.sbatch"),
        *ARGS,
        *signal_at,
        MASTER_PORT=str(free_port()),
    )
    run = tmp_path / "runs" / job
    if when == "mid_epoch":
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "last.ckpt").exists():
            assert time.monotonic() < deadline, log(tmp_path)[-3000:]
            assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), log(tmp_path)[-3000:]
            time.sleep(0.2)
        signalled = cluster.command("scancel", "-s", "USR1", job)
        assert signalled.returncode == 0, signalled.stderr
    cluster.start_requeued(job)  # pending again; not held ~120 s
    info = completed(cluster, job, tmp_path)
    assert info["Restarts"] == "1"

    text = log(tmp_path)
    assert "preempted at step" in text and f"requeued job {job}" in text, text[-3000:]
    assert f"resume=auto: continuing from {run}/checkpoints/hpc_ckpt_1.ckpt" in text
    saved = torch.load(run / "checkpoints" / "hpc_ckpt_1.ckpt", weights_only=True)
    assert steps == -(-json.loads((run / "stats.json").read_text())["rows"] // 512)
    epoch, done = loader_position(saved)
    assert 0 < done < steps, "interrupted mid-epoch"
    assert saved["global_step"] == epoch * steps + done
    if when == "after_validation":  # saved at the step after the validation, not before it
        assert saved["global_step"] == steps + 1
    resumed, resumed_metrics = final(run)
    expected, expected_metrics = final(uninterrupted)
    assert_same_run(resumed, expected, resumed_metrics, expected_metrics)
    assert_same_logs(run, uninterrupted)


def test_job_array_sweeps_schemes_and_coefficients(cluster, tmp_path):
    grid = tmp_path / "grid.txt"
    grid.write_text("# one run a line\nweights=click_only\n\nweights=seed weights.finish=10\n")
    job = submit(
        cluster,
        tmp_path,
        "--array=0-1",
        str(ROOT / "slurm" / "sweep.sbatch"),
        *SMALL,
        "trainer.max_epochs=1",
        SWEEP_FILE=str(grid),
    )
    for task in ("0", "1"):
        completed(cluster, f"{job}_{task}", tmp_path)
    sweep = tmp_path / "runs" / f"sweep_{job}"
    assert sorted(p.name for p in sweep.iterdir()) == ["0_click_only", "1_seed"]
    for folder in sweep.iterdir():
        assert (folder / "metrics.json").exists(), log(tmp_path)[-3000:]
    seed = (sweep / "1_seed" / "config.yaml").read_text()
    assert "name: seed" in seed and "finish: 10" in seed, seed
    assert "name: click_only" in (sweep / "0_click_only" / "config.yaml").read_text()


@pytest.mark.skipif(
    importlib.util.find_spec("torchrec") is None, reason="the optional torchrec engine is absent"
)
def test_a_sharded_job_requeues_with_its_shards(cluster, tmp_path):
    # sharding=torchrec under srun: the tables sharded over the 2 tasks, SIGUSR1 mid-epoch saves
    # hpc_ckpt_1.ckpt with every rank's shards, and the requeued job resumes from them.
    job = submit(
        cluster,
        tmp_path,
        "--ntasks-per-node=2",
        str(ROOT / "slurm" / "train.sbatch"),
        *[a for a in ARGS if not a.startswith("trainer.max_epochs")],
        "trainer.max_epochs=1",
        "sharding=torchrec",
        "+callbacks.kill._target_=tests.killer.KillAt",
        "+callbacks.kill.where=train_batch_end",
        "+callbacks.kill.step=10",
        "+callbacks.kill.signal=SIGUSR1",
        MASTER_PORT=str(free_port()),
    )
    run = tmp_path / "runs" / job
    deadline = time.monotonic() + 300
    while "preempted at step" not in log(tmp_path):
        assert time.monotonic() < deadline, log(tmp_path)[-3000:]
        time.sleep(0.2)
    cluster.start_requeued(job)  # pending again; not held ~120 s
    info = completed(cluster, job, tmp_path)
    assert info["Restarts"] == "1"
    text = log(tmp_path)
    assert f"resume=auto: continuing from {run}/checkpoints/hpc_ckpt_1.ckpt" in text, text[-3000:]
    saved = torch.load(run / "checkpoints" / "hpc_ckpt_1.ckpt", weights_only=True)
    assert 10 <= saved["global_step"] < 40  # mid-epoch
    shards = run / "checkpoints" / saved["upweight"]["shards"]["folder"]
    assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    plan = json.loads((run / "sharding_plan.json").read_text())["shards"]
    assert {s["rank"] for s in plan} == {0, 1}
    _, metrics = final(run)
    assert 0.5 < metrics["test/click/auc"] <= 1.0
