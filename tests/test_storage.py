"""Object storage through real servers on loopback: train and evaluate from s3:// (moto) and gs://
(fake-gcs-server) shards end to end, read https:// and memory:// URLs, and name storage errors
(missing bucket, bad credentials, unreachable endpoint) without leaking credentials."""

from __future__ import annotations

import json
import os
from pathlib import Path
from subprocess import CompletedProcess

import fsspec
import pyarrow.parquet as pq
import pytest

from tests.conftest import GCSServer, S3Server, free_port
from tests.helpers import TINY_RUN, run_job
from train.data.features import DataError
from train.data.module import ImpressionDataModule
from train.data.synthetic import FeedSimulator
from train.secrets import safe_url, scrub
from train.weights import build_scheme

SIM = FeedSimulator(n_train=2400, n_val=600, n_test=500, n_users=60, n_videos=120, n_authors=20)
ROLES = {
    "categorical": {"user_id": 100, "video_id": 200, "device": 8},
    "dense": ["video_len_s", "video_age_days"],
    "behaviours": {"click": "click", "watch_time": "watch_s"},
    "group_key": "user_id",
}
CLI_ROLES = [
    "data.categorical={user_id: 100, video_id: 200, device: 8}",
    "data.dense=[video_len_s, video_age_days]",
    "data.behaviours={click: click, watch_time: watch_s}",
    "data.group_key=user_id",
]
# A tiny run on data=files: the roles above name the columns, no simulator sizes.
FILES_TINY = [
    *TINY_RUN,
    "trainer.max_epochs=1",
    "trainer.num_sanity_val_steps=0",
    "data.batch_size=512",
]


def upload_feed(fs, root: str, shards: int = 3) -> None:
    """The simulator's splits as Parquet shards (small row groups) under `root`."""
    for split in ("train", "val", "test"):
        table = SIM.table(split)
        step = -(-table.num_rows // shards)
        for i in range(shards):
            with fs.open(f"{root}/{split}/part-{i}.parquet", "wb") as f:
                pq.write_table(table.slice(i * step, step), f, row_group_size=200)


def run_isolated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *overrides: str
) -> CompletedProcess:
    """`python -m train` (`run_job`) with no AWS_*/FSSPEC_* variables but those in `env`."""
    for key in list(os.environ):
        if key.startswith(("AWS_", "FSSPEC_")):
            monkeypatch.delenv(key)
    return run_job(
        *overrides,
        f"paths.output_dir={tmp_path}/run",
        cwd=tmp_path,
        env=env,
        timeout=300,
    )


def run_outputs(tmp_path: Path, done: CompletedProcess) -> str:
    """Everything the run printed or wrote, as text (to look for leaked credentials)."""
    texts = [done.stdout, done.stderr]
    texts += [
        p.read_text(errors="replace")
        for p in (tmp_path / "run").rglob("*")
        if p.suffix in (".yaml", ".json", ".csv", ".log")
    ]
    return "\n".join(texts)


def data(urls: dict[str, str], **kwargs) -> ImpressionDataModule:
    return ImpressionDataModule(**urls, **ROLES, **({"num_workers": 0} | kwargs))


def splits(root: str) -> dict[str, str]:
    return {"train": f"{root}/train", "val": f"{root}/val/", "test": f"{root}/test/*.parquet"}


# --------------------------------------------------------------------------- end to end


@pytest.mark.s3
@pytest.mark.e2e
def test_train_and_evaluate_from_s3_with_options_and_no_leak(
    tmp_path, monkeypatch, s3_server: S3Server
):
    # A subprocess: every line it prints is searched for the credentials.
    bucket = s3_server.bucket("feed")
    upload_feed(s3_server.filesystem(), bucket.removeprefix("s3://"))
    options = (
        f"data.storage_options={{key: {s3_server.key}, secret: {s3_server.secret}, "
        f"client_kwargs: {{endpoint_url: '{s3_server.endpoint_url}'}}}}"
    )
    done = run_isolated(
        tmp_path,
        monkeypatch,
        {},  # no AWS_* variables: everything comes from data.storage_options
        "data=files",
        f"data.train={bucket}/train",
        f"data.val={bucket}/val",
        f"data.test={bucket}/test/*.parquet",
        *CLI_ROLES,
        options,
        "data.mode=stream",
        "data.num_workers=2",
        *FILES_TINY,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"val/click/auc", "test/click/auc", "test/watch_time/xauc"} <= metrics.keys()
    assert json.loads((tmp_path / "run" / "stats.json").read_text())["rows"] == 2400
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert s3_server.endpoint_url in config, "the endpoint is not a secret"
    everything = run_outputs(tmp_path, done)
    assert s3_server.secret not in everything and s3_server.key not in everything


@pytest.mark.s3
@pytest.mark.e2e
def test_train_and_evaluate_from_gcs_with_environment_credentials(
    tmp_path, monkeypatch, gcs_server: GCSServer
):
    # A subprocess: gcsfs and fsspec read STORAGE_EMULATOR_HOST and FSSPEC_GCS_TOKEN when
    # imported, as in a user's job; this process imported them long ago.
    bucket = gcs_server.bucket("feed")
    upload_feed(gcs_server.filesystem(), bucket.removeprefix("gs://"))
    done = run_isolated(
        tmp_path,
        monkeypatch,
        gcs_server.env,  # STORAGE_EMULATOR_HOST + anonymous token, as a user's env would be
        "data=files",
        f"data.train={bucket}/train",
        f"data.val={bucket}/val",
        f"data.test={bucket}/test",
        *CLI_ROLES,
        "data.mode=memory",
        *FILES_TINY,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"val/click/auc", "test/click/auc"} <= metrics.keys()


# --------------------------------------------------------------------------- in process


@pytest.mark.s3
def test_s3_credentials_from_the_environment(s3_env: S3Server):
    bucket = s3_env.bucket("env")
    upload_feed(s3_env.filesystem(), bucket.removeprefix("s3://"), shards=2)
    stats = {}
    for mode in ("memory", "stream"):
        module = data(splits(bucket), mode=mode)
        stats[mode] = module.prepare(build_scheme(label="click"))
        assert len(list(module.val_dataloader())) == 1
    assert stats["memory"] == stats["stream"] and stats["memory"].rows == 2400


@pytest.mark.s3
def test_gcs_with_storage_options_in_stream_workers(gcs_server: GCSServer):
    bucket = gcs_server.bucket("opts")
    upload_feed(gcs_server.filesystem(), bucket.removeprefix("gs://"), shards=2)
    module = ImpressionDataModule(
        **splits(bucket), **ROLES, mode="stream", num_workers=2,
        storage_options=gcs_server.storage_options,
    )  # fmt: skip
    module.prepare(build_scheme(label="click"))
    assert sum(len(b) for b in module.train_dataloader()) == 2400


@pytest.mark.s3
def test_https_urls_are_read_only_sources(tmp_path, s3_server: S3Server):
    bucket = s3_server.bucket("web")
    fs = s3_server.filesystem()
    upload_feed(fs, bucket.removeprefix("s3://"), shards=1)
    urls = {s: s3_server.http_url(f"{bucket}/{s}/part-0.parquet") for s in ("train", "val", "test")}
    for mode in ("memory", "stream"):
        module = data(urls, mode=mode)
        assert module.prepare(build_scheme(label="click")).rows == 2400
        assert sum(len(b) for b in module.test_dataloader()) == 500
    missing = s3_server.http_url(f"{bucket}/val/missing.parquet")
    with pytest.raises(DataError, match=r"missing\.parquet\?…: no such file \(HTTP\)") as err:
        data(urls | {"val": missing}).prepare()
    assert "Signature" not in str(err.value), "presigned signatures stay out of messages"


def test_memory_urls(tmp_path):
    fs = fsspec.filesystem("memory")
    upload_feed(fs, "/upweight-test", shards=2)
    for mode in ("memory", "stream"):
        # memory:// lives in this process only, so it streams without worker processes
        module = data(splits("memory://upweight-test"), mode=mode, **{"num_workers": 2})
        assert module.prepare().rows == 2400
        assert sum(len(b) for b in module.train_dataloader()) == 2400


@pytest.mark.s3
def test_missing_bucket_is_named(s3_server: S3Server, gcs_server: GCSServer):
    with pytest.raises(
        DataError,
        match=r"s3://no-such-bucket-x1/train: the bucket 'no-such-bucket-x1' does not exist",
    ):
        data(splits("s3://no-such-bucket-x1"), storage_options=s3_server.storage_options).prepare()
    with pytest.raises(
        DataError,
        match=r"gs://no-such-bucket-x2/train: the bucket 'no-such-bucket-x2' does not exist",
    ):
        data(splits("gs://no-such-bucket-x2"), storage_options=gcs_server.storage_options).prepare()


@pytest.mark.s3
def test_bad_credentials_are_named_without_the_secret(s3_auth_server: S3Server):
    options = s3_auth_server.storage_options
    with pytest.raises(
        DataError, match=r"s3://some-bucket/train: access denied: check the credentials"
    ) as err:
        data(splits("s3://some-bucket"), storage_options=options).prepare()
    assert s3_auth_server.secret not in str(err.value)


@pytest.mark.s3
def test_unreachable_endpoint_is_named():
    options = {
        "key": "k",
        "secret": "unreachable-secret-value",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}"},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    }
    with pytest.raises(
        DataError, match=r"s3://bucket/train: cannot list it \(EndpointConnectionError"
    ) as err:
        data(splits("s3://bucket"), storage_options=options).prepare()
    assert "unreachable-secret-value" not in str(err.value)


def test_credentials_in_urls_and_messages_are_hidden():
    assert (
        safe_url("https://user:pa55@host/x.parquet?X-Amz-Signature=abc")
        == "https://host/x.parquet?…"
    )
    assert safe_url("/data/train.parquet") == "/data/train.parquet"
    assert scrub("token hunter2-secret failed", {"secret": "hunter2-secret"}) == "token *** failed"
    assert (
        scrub("endpoint http://e failed", {"client_kwargs": {"endpoint_url": "http://e"}})
        == "endpoint http://e failed"
    )
