"""Resume exactness: a small run, resumed from every checkpoint it writes, against the run itself.

    python bench/resume.py [--variant NAME ...]

For each variant, one tiny run (20,000 simulated rows, 20 steps an epoch, 4 epochs, dropout, a
cosine schedule, the `engagement` scheme, early stopping) snapshots its run folder after every
checkpoint write: each snapshot is what a job killed right then leaves behind. Each snapshot is
then restored and continued with `resume=auto` (in this process, one thread), and compared
with the uninterrupted run: final step, every key of `metrics.json` (to 1e-6) and every row of
`logs/metrics.csv`. Prints one line per snapshot and, last, `exact <N>/<M>` over all variants.

Variants: `steps` (a step checkpoint every 7 steps), `steps_on_epoch_end` (every 5: some fall on
an epoch's last step), `mid_epoch_validation` (validation twice an epoch), `early_stop` (stops
before max_epochs).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from hydra import compose, initialize_config_dir

import train
from train import checkpoint_io, resolvers
from train.__main__ import train as train_job

RUN = [
    "hardware=cpu",
    "trainer.enable_progress_bar=false",
    "model.hidden=[32,16]",
    "model.dropout=0.1",
    "xauc_pairs=1000",
    "data.simulator.n_train=20000",
    "data.simulator.n_val=2000",
    "data.simulator.n_test=2000",
    "data.simulator.n_users=500",
    "data.simulator.n_videos=1000",
    "data.simulator.n_authors=100",
    "data.categorical.user_id=1000",
    "data.categorical.video_id=2000",
    "data.categorical.author_id=200",
    "data.batch_size=1024",
    "trainer.max_epochs=4",
    "scheduler=cosine",
    "scheduler.warmup_steps=10",
    "weights=engagement",
    "trainer.log_every_n_steps=3",
    "callbacks.early_stopping.patience=1",
    "callbacks.early_stopping.min_delta=0.003",
]
VARIANTS = {
    "steps": ["callbacks.last.every_n_train_steps=7"],
    "steps_on_epoch_end": ["callbacks.last.every_n_train_steps=5"],
    "mid_epoch_validation": [
        "callbacks.last.every_n_train_steps=5",
        "trainer.val_check_interval=0.5",
    ],
    "early_stop": [
        "callbacks.last.every_n_train_steps=7",
        "trainer.max_epochs=8",
        "callbacks.early_stopping.min_delta=0.01",
    ],
}


def run(overrides: list[str], folder: Path) -> None:
    with initialize_config_dir(str(Path(train.__file__).parent / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={folder}"])
    train_job(cfg)


def outcome(folder: Path) -> tuple[int, dict[str, float], list[dict[str, Any]]]:
    step = torch.load(folder / "checkpoints/last.ckpt", weights_only=True, mmap=True)
    with (folder / "logs/metrics.csv").open() as handle:
        rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(handle)]
    return step["global_step"], json.loads((folder / "metrics.json").read_text()), rows


def difference(got: tuple, expected: tuple) -> str | None:
    (step, metrics, rows), (step_ref, metrics_ref, rows_ref) = got, expected
    if step != step_ref:
        return f"step {step} vs {step_ref}"
    worst = max(abs(metrics[k] - metrics_ref[k]) for k in metrics_ref)
    if worst > 1e-6:
        return f"metrics differ by up to {worst:.2e}"
    if len(rows) != len(rows_ref):
        return f"{len(rows)} log rows vs {len(rows_ref)}"
    for i, (row, row_ref) in enumerate(zip(rows, rows_ref, strict=True)):
        if row.keys() != row_ref.keys() or any(abs(row[k] - row_ref[k]) > 1e-6 for k in row):
            return f"log row {i} differs"
    return None


def variant(name: str, base: Path) -> tuple[int, int]:
    overrides = [*RUN, *VARIANTS[name]]
    folder, snapshots = base / name / "run", base / name / "snapshots"
    snapshots.mkdir(parents=True)
    save, count = checkpoint_io.atomic_save, [0]

    def save_and_snapshot(obj: Any, url: str) -> None:
        save(obj, url)
        count[0] += 1
        step = obj.get("global_step")
        shutil.copytree(folder, snapshots / f"{count[0]:03d}_step{step}_{Path(url).name}")

    checkpoint_io.atomic_save = save_and_snapshot
    try:
        run(overrides, folder)
    finally:
        checkpoint_io.atomic_save = save
    expected = outcome(folder)
    exact = 0
    for snapshot in sorted(snapshots.iterdir()):
        shutil.rmtree(folder)
        shutil.copytree(snapshot, folder)
        run([*overrides, "resume=auto"], folder)
        problem = difference(outcome(folder), expected)
        exact += problem is None
        print(f"{name:22s} {snapshot.name:32s} {problem or 'exact'}", flush=True)
    return exact, count[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    resolvers.register()
    exact = total = 0
    with tempfile.TemporaryDirectory() as base:
        for name in args.variant:
            done, written = variant(name, Path(base))
            exact, total = exact + done, total + written
    print(f"exact {exact}/{total}")


if __name__ == "__main__":
    main()
