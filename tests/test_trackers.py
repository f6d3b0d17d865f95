"""Experiment trackers: a real `mlflow server` on loopback (sqlite store, artifacts in a temporary
folder) tracking a tiny run with planted credentials; W&B in offline mode (no network) beside an
MLflow server that is not there; a sweep report logged as a run of its own. One server and two
training runs for the whole module, every assert reads their results. Marked e2e: a server
process and two real runs (~40 s on 2 cores), beyond the fast default set."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import helpers
from tests.conftest import free_port
from tests.helpers import TINY, compose, log_rows, train_in_process
from train.trackers import mlflow_key

RUN = [*TINY, "trainer.max_epochs=1"]
CONFIG_SECRET = f"CFG-SECRET-{uuid.uuid4().hex}"
ENV_SECRET = f"ENV-SECRET-{uuid.uuid4().hex}"
RUN_FILES = {"metrics.json", "config.yaml", "stats.json"}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    pytest.importorskip("mlflow")
    with helpers.mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@dataclass(frozen=True)
class Tracked:
    folder: Path
    client: Any
    run: Any
    artifacts: dict[str, bytes]


def download_all(client: Any, run_id: str, target: Path) -> dict[str, bytes]:
    local = Path(client.download_artifacts(run_id, "", str(target)))
    return {str(p.relative_to(local)): p.read_bytes() for p in local.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tracked(mlflow_server: str, tmp_path_factory) -> Tracked:
    """A tiny run with `logger=[csv,mlflow]`, a credential in its config (a storage option read
    from the environment) and one in MLflow's own environment variables."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("tracked") / "run"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        env.setenv("MLFLOW_TRACKING_USERNAME", "someone")
        env.setenv("MLFLOW_TRACKING_PASSWORD", ENV_SECRET)
        env.setenv("MLFLOW_EXPERIMENT_NAME", "tracked")
        env.setenv("UPWEIGHT_TEST_SECRET", CONFIG_SECRET)
        train_in_process(
            *RUN,
            "logger=[csv,mlflow]",
            "logger.mlflow.log_checkpoint=true",
            "data.storage_options={key: KEYID, secret: ${oc.env:UPWEIGHT_TEST_SECRET}}",
            output_dir=folder,
        )
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("tracked")
    (run,) = client.search_runs([experiment.experiment_id])
    artifacts = download_all(client, run.info.run_id, folder.parent / "downloaded")
    return Tracked(folder, client, run, artifacts)


@pytest.mark.e2e
def test_params_are_the_config_redacted(tracked: Tracked):
    params = tracked.run.data.params
    assert params["weights/name"] == "click_only"
    assert params["trainer/max_epochs"] == "1"
    assert params["logger/mlflow/experiment_name"] == "tracked"
    assert params["data/storage_options/secret"] == "***"  # as config.yaml has it
    assert tracked.run.info.run_name == "run"  # the run folder's name
    assert tracked.run.info.status == "FINISHED"


@pytest.mark.e2e
def test_final_metrics_are_metrics_json(tracked: Tracked):
    final = json.loads((tracked.folder / "metrics.json").read_text())
    logged = tracked.run.data.metrics
    assert {k.split("/")[0] for k in final} == {"val", "test"}
    for key, value in final.items():
        assert logged[mlflow_key(key)] == pytest.approx(value, rel=1e-6, nan_ok=True), key
    # logged as training went too: the epoch, the evaluation of best.ckpt, the final value
    history = tracked.client.get_metric_history(tracked.run.info.run_id, "val/click/auc")
    assert len(history) == 3 and history[-1].step == max(h.step for h in history)


@pytest.mark.e2e
def test_run_files_and_best_checkpoint_are_artifacts(tracked: Tracked):
    assert set(tracked.artifacts) == {*RUN_FILES, "checkpoints/best.ckpt"}
    for name in RUN_FILES:
        assert tracked.artifacts[name] == (tracked.folder / name).read_bytes()
    best = tracked.folder / "checkpoints" / "best.ckpt"
    assert tracked.artifacts["checkpoints/best.ckpt"] == best.read_bytes()


@pytest.mark.e2e
def test_no_credential_reaches_the_tracker(tracked: Tracked):
    texts = [
        *tracked.run.data.params.values(),
        *tracked.run.data.params,
        *tracked.run.data.tags.values(),
    ]
    for secret in (CONFIG_SECRET, ENV_SECRET):
        assert not [t for t in texts if secret in t]
        assert not [n for n, data in tracked.artifacts.items() if secret.encode() in data]


@pytest.mark.e2e
def test_csv_log_is_kept_beside_the_tracker(tracked: Tracked):
    rows = log_rows(tracked.folder)
    assert len([r for r in rows if "val/click/auc" in r]) == 2  # the epoch, best.ckpt's evaluation


# ------------------------------------------------------------- W&B offline, MLflow unreachable


@pytest.fixture(scope="module")
def offline(tmp_path_factory) -> tuple[Path, str, float]:
    """A tiny run with `logger=[csv,mlflow,wandb]`: W&B offline, MLflow pointed at a closed
    port. Its folder, what it printed on stderr, and how long it took."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    folder = tmp_path_factory.mktemp("offline") / "run"
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as env, contextlib.redirect_stderr(stderr):
        env.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        env.delenv("WANDB_API_KEY", raising=False)
        start = time.monotonic()
        train_in_process(*RUN, "logger=[csv,mlflow,wandb]", output_dir=folder)
        took = time.monotonic() - start
    return folder, stderr.getvalue(), took


def wandb_summary(path: Path) -> dict[str, Any]:
    """The summary of an offline W&B run, read from its `.wandb` file: a LevelDB-style log
    (32 KiB blocks, a 7-byte header per chunk) of `Record` protobufs after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    summary: dict[str, Any] = {}
    pending = b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "summary":
                for item in record.summary.update:
                    key = item.key or "/".join(item.nested_key)
                    summary[key] = json.loads(item.value_json)
    return summary


@pytest.mark.e2e
def test_unreachable_mlflow_is_dropped_with_one_warning(offline):
    folder, stderr, took = offline
    warnings = [line for line in stderr.splitlines() if "MLflow at http://127.0.0.1:" in line]
    assert len(warnings) == 1, stderr[-3000:]
    assert warnings[0].startswith("warning: ") and "local logs only" in warnings[0]
    # mlflow's own retries would hold the job for minutes; the tiny run takes ~15 s
    assert took < 90
    assert json.loads((folder / "metrics.json").read_text())
    assert len([r for r in log_rows(folder) if "val/click/auc" in r]) == 2
    assert not (folder / "mlruns").exists()


@pytest.mark.e2e
def test_wandb_offline_run_lives_in_the_run_folder(offline):
    folder, stderr, _ = offline
    (run,) = (folder / "wandb").glob("offline-run-*")
    saved = run / "files" / "upweight"
    for name in RUN_FILES:
        assert (saved / name).read_bytes() == (folder / name).read_bytes()
    (log,) = run.glob("*.wandb")
    summary = wandb_summary(log)
    final = json.loads((folder / "metrics.json").read_text())
    for key, value in final.items():
        # A tracker's failure is a warning on stderr, not an error: shown if a value is missing.
        assert key in summary, f"{key} is not in the W&B summary; stderr: {stderr[-3000:]}"
        assert summary[key] == pytest.approx(value, rel=1e-6, nan_ok=True), key
    assert summary["val/click/auc"] == pytest.approx(final["val/click/auc"])


# ------------------------------------------------------------------------------------ report


@pytest.mark.e2e
def test_report_is_logged_as_a_run(mlflow_server: str, tmp_path: Path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from tests.test_report import make_run, metrics, weights
    from train.report import main

    sweep = tmp_path / "sweep"
    make_run(sweep / "0_click_only", weights("click_only"), metrics(0.70, 0.60, 0.60, 0.55))
    make_run(sweep / "1_seed", weights("seed", click=1, finish=3), metrics(0.72, 0.65, 0.62, 0.57))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "reports")
    main([str(sweep), "--tracker", "mlflow", "--tracker-run", "sweep-report"])
    assert "logged to MLflow at" in capsys.readouterr().out

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("reports").experiment_id])
    assert run.info.run_name == "sweep-report" and run.info.status == "FINISHED"
    files = download_all(client, run.info.run_id, tmp_path / "downloaded")
    assert set(files) == {"report.md", "report.csv", "pareto.png"}
    for name, data in files.items():
        assert data == (sweep / name).read_bytes()


def test_report_to_an_unreachable_server_fails_clearly(tmp_path: Path, monkeypatch):
    from tests.test_report import make_run, metrics, weights
    from train.report import main

    make_run(tmp_path / "sweep" / "0", weights("click_only"), metrics(0.7, 0.6, 0.6, 0.55))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(SystemExit, match=r"^error: MLflow at http://127\.0\.0\.1:\d+ is unreach"):
        main([str(tmp_path / "sweep"), "--tracker", "mlflow"])
    assert (tmp_path / "sweep" / "report.md").exists()  # written before, and kept


# ------------------------------------------------------------------------------------ config


def test_loggers_combine_and_csv_stays_the_default(tmp_path: Path):
    assert list(compose(f"paths.output_dir={tmp_path}").logger) == ["csv"]
    both = compose("logger=[csv,tensorboard]", f"paths.output_dir={tmp_path}")
    assert list(both.logger) == ["csv", "tensorboard"]
    assert list(compose("logger=tensorboard").logger) == ["tensorboard"]


def test_mlflow_without_a_server_is_a_config_error(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit, match=r"^error: logger\.mlflow: MLFLOW_TRACKING_URI is not"):
        train_in_process(*TINY, "logger=[csv,mlflow]", output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_resume_with_other_trackers_keeps_the_csv_log(tmp_path: Path):
    """Positions are matched over the resumable logs: a checkpoint saved with
    `logger=[mlflow,csv]` (the tracker's position is None) resumes a `logger=csv` run, and the
    CSV log is cut back to its position instead of restarted."""
    from types import SimpleNamespace

    from train.logs import POSITION_KEY, CSVLogger, LogPosition

    csv = CSVLogger(save_dir=str(tmp_path), name="logs", version="")
    for step in range(3):
        csv.log_metrics({"train/loss": float(step)}, step=step)
    csv.save()
    checkpoint = {POSITION_KEY: {"loggers": [None, {"rows": 2}], "pending": None}}
    trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"), is_global_zero=True, loggers=[csv])
    LogPosition().on_load_checkpoint(trainer, None, checkpoint)  # type: ignore[arg-type]
    assert [r["step"] for r in log_rows(tmp_path)] == [0, 1]
