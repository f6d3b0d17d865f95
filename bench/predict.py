"""Batch prediction throughput: `train.predict` from local Parquet vs the raw forward pass.

    python bench/predict.py [--rows 1000000] [--threads 2] [--batch 65536] [--rounds 5]

Both score the same simulated rows (6 hashed categorical features incl. a string one, 4 dense
with missing values, the default DNN: embedding 16, MLP 256-128-64) with the same network on
the CPU. `predict` does everything a job does: reads the Parquet file, hashes ids, standardises
dense features, runs the network and writes Parquet (2 id columns + score). The raw pass runs
the same scorer over the same rows already featurised into in-memory tensors, batch by batch.
Both run in 5 back-to-back pairs; medians are printed, rows/s and, last, `ratio <predict/raw>`
(the median of the per-pair ratios, which the load of a shared machine disturbs least).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from train.checkpoint import build_network, load
from train.data.features import FeatureSpec, model_inputs
from train.data.synthetic import FeedSimulator
from train.layout import ARTIFACT_FORMAT
from train.predict import predict

SPEC = {
    "categorical": {
        "user_id": 50_000,
        "video_id": 100_000,
        "author_id": 10_000,
        "category": 100,
        "hour": 24,
        "device": 10,
    },
    "dense": ["video_len_s", "user_activity", "video_age_days", "author_followers_log"],
    "behaviours": {"click": "click"},
    "group_key": "user_id",
}
MODEL = {"_target_": "train.model.DNN", "_partial_": True, "embedding_dim": 16}
MODEL |= {"hidden": [256, 128, 64], "dropout": 0.0, "activation": "relu"}


def write_checkpoint(path: Path, dense_mean: list[float], dense_std: list[float]) -> None:
    """A checkpoint in the layout `python -m train` writes, of a freshly initialised DNN."""
    network = build_network(MODEL, FeatureSpec(**SPEC), "bench")
    state = {f"model.{k}": v for k, v in network.state_dict().items()}
    state |= {
        "preprocess.mean": torch.tensor(dense_mean),
        "preprocess.std": torch.tensor(dense_std),
    }
    stats = {"rows": 0, "dense_mean": dense_mean, "dense_std": dense_std, "continuous": []}
    spec = {**SPEC, "dense_fill": "mean"}
    upweight = {
        "format": ARTIFACT_FORMAT,
        "model": MODEL,
        "spec": spec,
        "stats": stats,
        "scheme": {},
    }
    torch.save({"state_dict": state, "upweight": upweight}, path)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--batch", type=int, default=65_536)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    table = FeedSimulator(n_train=1, n_val=1, n_test=args.rows).table("test")
    dense = table.select(SPEC["dense"]).to_pandas()
    with tempfile.TemporaryDirectory() as folder:
        data, ckpt = Path(folder) / "data.parquet", Path(folder) / "model.ckpt"
        pq.write_table(table, data)
        write_checkpoint(ckpt, dense.mean().tolist(), dense.std().tolist())

        def job() -> None:
            out = Path(folder) / "scores.parquet"
            predict(str(ckpt), str(data), str(out), keep=["user_id", "video_id"],
                    batch_size=args.batch, device="cpu", overwrite=True)  # fmt: skip

        checkpoint = load(str(ckpt))
        scorer = checkpoint.scorer.eval()
        categorical, dense_in, _ = model_inputs(table, checkpoint.spec, "bench")

        def raw() -> None:
            with torch.inference_mode():
                for start in range(0, args.rows, args.batch):
                    stop = start + args.batch
                    scorer(categorical[start:stop], dense_in[start:stop]).numpy()

        # Paired rounds (order alternating), medians kept: on a shared machine the load moves
        # between rounds, and a pair run back to back sees about the same load.
        rounds: list[tuple[float, float]] = []
        for i in range(args.rounds):
            if i % 2 == 0:
                job_s = timed(job)
                raw_pass_s = timed(raw)
            else:
                raw_pass_s = timed(raw)
                job_s = timed(job)
            rounds.append((job_s, raw_pass_s))
        assert pq.read_metadata(Path(folder) / "scores.parquet").num_rows == args.rows
        predict_s = statistics.median(r[0] for r in rounds)
        raw_s = statistics.median(r[1] for r in rounds)
        ratio = statistics.median(r[1] / r[0] for r in rounds)

    print(f"rows {args.rows}, batch {args.batch}, torch threads {torch.get_num_threads()}")
    print(f"predict (Parquet -> hash -> forward -> Parquet): {args.rows / predict_s:,.0f} rows/s")
    print(f"raw forward (in-memory tensors):                 {args.rows / raw_s:,.0f} rows/s")
    print(f"ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
