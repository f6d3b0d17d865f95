"""Calibration before and after the odds correction (p_calibrated), per weight scheme and
simulator setting: `python bench/calibration.py [--settings default small noisy dense] [--schemes
seed watch_time]`.

Each run trains with its scheme, fits the correction on val and reports test calibration (mean
predicted probability / observed click rate) before and after, the fitted odds factor, the click
AUC of the score (the correction cannot change it) and the oracle's calibration: the true
probabilities' mean over the observed rate, which shows how far the test split's realized clicks
stray from their expectation (no correction can do better than that). The target: after within
1 ± 0.05. With --out, a run whose metrics.json exists there is read, not trained again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.05
SETTINGS: dict[str, list[str]] = {
    # The job's embedded default feed (500k training rows).
    "default": [],
    # A fifth of the rows, ids scaled with them.
    "small": [
        "data.simulator.n_train=100000",
        "data.simulator.n_val=25000",
        "data.simulator.n_test=25000",
        "data.simulator.n_users=1000",
        "data.simulator.n_videos=2500",
        "data.simulator.n_authors=250",
    ],
    # Few rows per id and user x topic tastes the features do not show.
    "noisy": [
        "data.simulator.n_train=60000",
        "data.simulator.n_val=15000",
        "data.simulator.n_test=15000",
        "data.simulator.n_users=1200",
        "data.simulator.n_videos=3000",
        "data.simulator.n_authors=300",
        "data.simulator.interest_scale=0.8",
    ],
    # Many impressions per id, more clickbait.
    "dense": [
        "data.simulator.n_train=200000",
        "data.simulator.n_val=50000",
        "data.simulator.n_test=50000",
        "data.simulator.n_users=500",
        "data.simulator.n_videos=1250",
        "data.simulator.n_authors=125",
        "data.simulator.clickbait_share=0.3",
    ],
}


def run(out: Path, overrides: list[str]) -> dict[str, float]:
    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    done = subprocess.run(
        [sys.executable, "-m", "train", *overrides, f"paths.output_dir={out}"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        sys.exit(f"run {out.name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=sorted(SETTINGS), choices=sorted(SETTINGS))
    parser.add_argument("--schemes", nargs="+", default=["seed", "watch_time"])
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="bench-calibration-"))
    print(
        f"{'setting':8} {'scheme':11} {'odds factor':>11} {'before':>7} {'after':>7} "
        f"{'val after':>9} {'oracle':>6} {'click AUC':>9}  within 1±{TARGET}   "
        f"(test split; runs in {root})"
    )
    misses = 0
    for setting in args.settings:
        for scheme in args.schemes:
            start = time.perf_counter()
            m = run(
                root / f"{setting}_{scheme}",
                [f"weights={scheme}", "trainer.enable_progress_bar=false", *SETTINGS[setting]],
            )
            label = "click"
            after = m[f"test/{label}/calibration_corrected"]
            ok = abs(after - 1) <= TARGET
            misses += not ok
            print(
                f"{setting:8} {scheme:11} {m[f'val/{label}/odds_factor']:11.3f} "
                f"{m[f'test/{label}/calibration']:7.3f} {after:7.3f} "
                f"{m[f'val/{label}/calibration_corrected']:9.3f} "
                f"{m.get(f'test/{label}/oracle_calibration', float('nan')):6.3f} "
                f"{m[f'test/{label}/auc']:9.4f}  "
                f"{'yes' if ok else 'NO'}  ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    print(f"{misses} miss(es) of the 1 ± {TARGET} target")


if __name__ == "__main__":
    main()
