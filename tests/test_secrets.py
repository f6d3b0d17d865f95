"""Credentials never leave the process: a real `python -m train` run reads its data from a real S3
server (moto on loopback) with a planted secret in `data.storage_options` and another in the
environment (AWS_SECRET_ACCESS_KEY); no file of the run folder (config, stats, metrics, logs,
checkpoints: every byte, binary too) nor its stdout/stderr may contain either."""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import S3Server
from tests.test_bad_inputs import TRAIN, table


@pytest.mark.e2e
@pytest.mark.s3
def test_planted_secrets_appear_in_no_output(tmp_path, s3_server: S3Server, zygote):
    import pyarrow.parquet as pq

    bucket = s3_server.bucket("secrets")
    fs = s3_server.filesystem()
    for split, seed in (("train", 0), ("val", 1), ("test", 2)):
        with fs.open(f"{bucket}/{split}.parquet".removeprefix("s3://"), "wb") as handle:
            pq.write_table(table(2000, seed), handle)

    # moto accepts any key: the planted ones are what the client signs with.
    option_secret = f"OPT-SECRET-{uuid.uuid4().hex}"
    option_key = f"OPTKEYID{uuid.uuid4().hex[:12].upper()}"
    env_secret = f"ENV-SECRET-{uuid.uuid4().hex}"
    env_key = f"ENVKEYID{uuid.uuid4().hex[:12].upper()}"
    planted = [option_secret, option_key, env_secret, env_key]
    run = tmp_path / "run"
    options = (
        f"{{key: {option_key}, secret: {option_secret}, "
        f"client_kwargs: {{endpoint_url: '{s3_server.endpoint_url}'}}}}"
    )
    env = {
        "AWS_ACCESS_KEY_ID": env_key,
        "AWS_SECRET_ACCESS_KEY": env_secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
    }
    # A process of its own (forked from the session zygote, with this environment): its stdout
    # and stderr are searched too.
    done = zygote.run(
        *TRAIN,
        f"data.train={bucket}/train.parquet",
        f"data.val={bucket}/val.parquet",
        f"data.test={bucket}/test.parquet",
        f"data.storage_options={options}",
        "trainer.log_every_n_steps=1",
        f"paths.output_dir={run}",
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    written = [p for p in run.rglob("*") if p.is_file()]
    names = {str(p.relative_to(run)) for p in written}
    # The run really wrote what a run writes, so the grep below looks at real outputs.
    assert {"config.yaml", "stats.json", "metrics.json", "checkpoints/last.ckpt"} <= names
    assert any(n.endswith("metrics.csv") for n in names)
    assert "***" in (run / "config.yaml").read_text(), "storage_options not redacted"
    for path in written:
        data = path.read_bytes()
        for secret in planted:
            for form in (secret.encode(), secret.encode("utf-16-le")):
                assert form not in data, f"{secret[:10]}... found in {path.relative_to(run)}"
    for stream, text in (("stdout", done.stdout), ("stderr", done.stderr)):
        for secret in planted:
            assert secret not in text, f"{secret[:10]}... printed on {stream}"
