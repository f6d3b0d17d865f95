"""What the tests share: the tiny-run overrides, the one way to run a job in a subprocess and
the one way to run it in-process, and checkpoints to score.

- `TINY`: the overrides of a small, fast run (a test adds only what it is about);
- `run_job(...)`: `python -m train` (or another entry point) in a subprocess, for tests that
  check the exit code, stderr, signals or several processes;
- `train_in_process(...)`: the same job composed and run in this process (no ~8 s of imports),
  for tests that only read what the run wrote;
- `trained_run`: one tiny trained run, shared by every module that asks;
- `write_checkpoint`: a checkpoint of a freshly initialised network in the job's layout.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch

import train
from train.layout import ARTIFACT_FORMAT

ROOT = Path(__file__).resolve().parents[1]
CONF = Path(train.__file__).resolve().parent / "conf"
"""The configs that ship in the package."""

TINY_DATA = [
    "data.simulator.n_train=20000",
    "data.simulator.n_val=2000",
    "data.simulator.n_test=2000",
    "data.simulator.n_users=500",
    "data.simulator.n_videos=1000",
    "data.simulator.n_authors=100",
    # Hashed, with small buckets: the tests score string and int ids of one column alike (a
    # vocabulary refuses ids of another type), and checkpoints stay small. One list holding
    # one mapping: the default is a list, which a mapping cannot replace.
    "data.categorical=[{user_id: 1000, video_id: 2000, author_id: 200, category: 100, hour: 24, "
    "device: 10}]",
]
"""The simulated feed of a tiny run (for tests that choose the hardware themselves)."""
TINY_RUN = [
    "hardware=cpu",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "model.hidden=[32,16]",
    "xauc_pairs=1000",
]
"""What every tiny run sets whatever its data (`data=files` runs add their own columns)."""
TINY = [*TINY_RUN, *TINY_DATA, "data.batch_size=1024"]
"""A small run: 20 steps of batch 1024 per epoch on 2 CPU cores in a few seconds."""
TINY_TRAINED = [
    *TINY,
    "trainer.max_epochs=1",
    # A scheduler and a weighted scheme put a LambdaLR state and scheme terms in the checkpoint.
    "scheduler=cosine",
    "weights=engagement",
]
# One thread per process: tests run several at once on 2 cores, where OpenMP's spinning
# threads make each step several times slower.
ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def job_env(cwd: Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a test job runs in (`start_job`, `run_job`, `tests.zygote`): this one's,
    one OpenMP thread, the checkout importable, run folders under `cwd/outputs`, then `env`."""
    return {**os.environ, **ENV, "UPWEIGHT_RUNS": str(Path(cwd) / "outputs"), **(env or {})}


def assert_succeeded(done: subprocess.CompletedProcess) -> None:
    """`check=True` of the job runners: exit code 0, else the output's end."""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def start_job(
    *overrides: str,
    cwd: Path,
    module: str = "train",
    env: Mapping[str, str] | None = None,
    merge_stderr: bool = False,
    new_session: bool = False,
) -> subprocess.Popen:
    """`python -m <module> <overrides>` started in `cwd` with stdout and stderr piped (stderr
    merged into stdout with `merge_stderr`): for tests that act while it runs (kill it, cut its
    storage). Run folders that a test does not place itself land in `cwd/outputs`.
    `new_session`: in a session of its own (id: its pid), to find every process it started."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *overrides],
        cwd=cwd,
        env=job_env(cwd, env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )


def run_job(
    *overrides: str,
    cwd: Path,
    module: str = "train",
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
    check: bool = False,
) -> subprocess.CompletedProcess:
    """`start_job` run to its end, output captured. `check=True` asserts exit code 0, showing
    the output's end otherwise."""
    process = start_job(*overrides, cwd=cwd, module=module, env=env)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check:
        assert_succeeded(done)
    return done


def compose(*overrides: str, config_name: str = "train") -> Any:
    """The job's config as `python -m train <overrides>` composes it (without Hydra's own
    node: give `paths.output_dir`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from train import resolvers

    resolvers.register()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides))


def train_in_process(*overrides: str, output_dir: Path) -> float:
    """Run the job in this process on the composed config; returns its test metric. Raises
    SystemExit where the job exits (`error: ...`)."""
    from train.__main__ import train as train_job

    return train_job(compose(*overrides, f"paths.output_dir={output_dir}"))


def log_rows(run: Path) -> list[dict[str, float]]:
    """The rows of a run's `logs/metrics.csv`, each with its non-empty columns."""
    import csv

    with (Path(run) / "logs" / "metrics.csv").open() as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


def assert_same_logs(run: Path, reference: Path, tolerance: float = 1e-6) -> None:
    """The run logged what the reference logged: the same rows (step, columns, values) in the
    same order, so no row was lost to a kill or written twice by a resume."""
    import pytest

    logged, wanted = log_rows(run), log_rows(reference)
    assert [(r["step"], sorted(r)) for r in logged] == [(r["step"], sorted(r)) for r in wanted]
    for got, row in zip(logged, wanted, strict=True):
        assert got == pytest.approx(row, abs=tolerance)


def session_processes(sid: int) -> dict[int, str]:
    """The live (not zombie) processes of session `sid`: pid -> command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue  # ended while we looked
        if int(stat[3]) == sid and stat[0] not in ("Z", "X"):
            found[int(entry)] = command
    return found


_RUNS: dict[str, Path] = {}


def trained_run(tmp_path_factory: Any) -> Path:
    """The run folder of one tiny trained run (trained on first use, in this process)."""
    if "tiny" not in _RUNS:
        folder = tmp_path_factory.mktemp("trained")
        train_in_process(*TINY_TRAINED, output_dir=folder / "run")
        _RUNS["tiny"] = folder / "run"
    return _RUNS["tiny"]


SPEC: dict[str, Any] = {
    "categorical": {"user_id": 50, "video_id": 80, "device": 10},
    "dense": ["video_len_s", "user_activity"],
    "behaviours": {"click": "click"},
    "group_key": "user_id",
}


def write_checkpoint(
    path: Path,
    target: str = "train.model.DNN",
    spec: Mapping[str, Any] | None = None,
    seed: int = 0,
    legacy: bool = False,
    **model: Any,
) -> Path:
    """A checkpoint in the layout `python -m train` writes (state_dict with `model.*` and the
    dense statistics, `upweight` with plain types), of a randomly initialised network. `spec` is
    in its checkpoint form (`FeatureSpec.state()`: vocabularies as their `state()`).
    `legacy=True`: the layout of format-1 files written before `train.preprocess` (statistics
    under `dense_mean`/`dense_std`, the fill rule beside the spec instead of in it)."""
    from train.checkpoint import build_network
    from train.data.features import FeatureSpec

    spec = dict(spec or SPEC)
    config = {"_target_": target, "_partial_": True, "hidden": [16, 8], "embedding_dim": 4}
    config |= model
    torch.manual_seed(seed)
    network = build_network(config, FeatureSpec.from_state(spec), "test", ["tests."])
    dense = len(spec["dense"])
    mean = torch.linspace(10.0, 20.0, dense)
    std = torch.linspace(2.0, 5.0, dense)
    state = {f"model.{k}": v for k, v in network.state_dict().items()}
    if legacy:
        state |= {"dense_mean": mean, "dense_std": std}
        fill = {"dense_fill": spec.pop("dense_fill", "mean")}
    else:
        state |= {"preprocess.mean": mean, "preprocess.std": std}
        spec.setdefault("dense_fill", "mean")
        fill = {}
    torch.save(
        {
            "epoch": 0,
            "state_dict": state,
            "upweight": {
                **fill,
                "format": ARTIFACT_FORMAT,
                "model": config,
                "spec": spec,
                "stats": {
                    "rows": 100,
                    "dense_mean": mean.tolist(),
                    "dense_std": std.tolist(),
                    "continuous": [],
                    "positive_rate": {"click": 0.1},
                    "behaviour_mean": {"click": 0.1},
                },
                "scheme": {"describe": "click_only", "name": "click_only", "label": "click"},
            },
        },
        path,
    )
    return path


def scalars(table):
    """`table` without its list columns (Arrow writes no list to CSV): for CSV files of the
    simulator's rows."""
    return table.drop_columns([f.name for f in table.schema if str(f.type).startswith("list")])


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """`mlflow server` on a free loopback port (sqlite store and artifacts in `folder`); its URL.
    Stopped, with its workers, on exit."""
    from tests.conftest import free_port

    found = Path(sys.executable).with_name("mlflow")
    port = free_port()
    log = (folder / "server.log").open("w")
    process = subprocess.Popen(
        [
            str(found) if found.exists() else shutil.which("mlflow") or "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{folder}/mlflow.db",
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--workers",
            "1",
        ],
        # No job runner: its workers cost seconds of CPU and nothing here uses them.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its uvicorn worker is stopped with it (process group)
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # cold imports: ~20 s on an idle machine
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not answer: {(folder / 'server.log').read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.3)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)
        log.close()


def quiet_trainer(**settings: Any) -> L.Trainer:
    """A Trainer for a test's fit: no logger, checkpoints, progress bar or model summary, unless
    `settings` says otherwise."""
    quiet = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return L.Trainer(**(quiet | settings))
