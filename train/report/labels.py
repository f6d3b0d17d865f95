"""Row labels: a run's scheme name plus what the run changed, so a sweep's rows read as
`seed finish=10` rather than as folder names.

What counts as "changed" comes from the shipped `train/conf/weights/<name>.yaml` (found through
the package, so it works from an installed wheel); for a scheme that is not shipped, the knobs
that vary between its runs. Runs that still look alike are told apart by the config keys that
differ (`[seed=1]`), or numbered when their configs are identical (a rerun).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from train.layout import Run

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
"""train/conf: the configs the job ships (top-level `conf` links to it in a checkout)."""
# Keys of a weights config that are not named coefficients (see train.weights.build_scheme).
STANDARD_KEYS = frozenset(
    {"_target_", "name", "label", "terms", "combine", "negative_weight", "normalize"}
)
# Standard keys worth naming in a label when a run changed them from the scheme's YAML.
LABELLED_STANDARD_KEYS = ("label", "combine", "negative_weight", "normalize")


def knobs(weights: Mapping[str, Any]) -> dict[str, float]:
    """The named coefficients of a weights config: top-level numbers other than the standard
    keys (what `weights.finish=10` overrides)."""
    return {
        str(k): v
        for k, v in weights.items()
        if k not in STANDARD_KEYS and isinstance(v, int | float) and not isinstance(v, bool)
    }


def scheme_defaults(name: str, conf_dir: Path = CONF_DIR) -> dict[str, Any] | None:
    """The shipped `conf/weights/<name>.yaml` as written (knobs are plain numbers there), or
    None for a scheme that is not shipped."""
    path = conf_dir / "weights" / f"{name}.yaml"
    if not path.is_file():
        return None
    loaded = yaml.safe_load(path.read_text())
    return loaded if isinstance(loaded, dict) else None


def fmt(value: Any) -> str:
    """A config value as a label shows it (floats without trailing zeros)."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def label_runs(runs: Sequence[Run], conf_dir: Path = CONF_DIR) -> list[str]:
    """`weights.name` plus the run's non-default knobs, e.g. `seed finish=10`.

    Defaults come from the shipped `conf/weights/<name>.yaml`; for a scheme that is not shipped,
    the knobs that vary between the runs of that name are named instead. Runs that still share a
    label get the config keys that tell them apart (e.g. `[seed=1]`), so no two rows look alike.
    """
    labels: list[str] = []
    by_name: dict[str, list[int]] = defaultdict(list)
    for i, run in enumerate(runs):
        by_name[run.scheme_name].append(i)
    for run in runs:
        w = run.weights
        defaults = scheme_defaults(run.scheme_name, conf_dir)
        if defaults is not None:
            keys = [k for k in knobs(w) if k not in defaults or defaults[k] != w[k]]
            keys += [k for k in LABELLED_STANDARD_KEYS if k in defaults and defaults[k] != w.get(k)]
            changed = " ".join(f"{k}={fmt(w[k])}" for k in keys if k in w)
        else:
            peers = [runs[j].weights for j in by_name[run.scheme_name]]
            candidates = list(knobs(w)) + [k for k in LABELLED_STANDARD_KEYS if k in w]
            keys = [k for k in candidates if any(p.get(k) != w.get(k) for p in peers)]
            changed = " ".join(f"{k}={fmt(w[k])}" for k in keys)
        labels.append(f"{run.scheme_name} {changed}".strip())
    return _disambiguate(labels, runs)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (`data.simulator.seed`), list items by index."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out |= flatten(v, f"{prefix}{k}.")
        return out
    if isinstance(value, list):
        out = {}
        for i, v in enumerate(value):
            out |= flatten(v, f"{prefix}{i}.")
        return out
    return {prefix.rstrip("."): value}


def differing_keys(flats: Sequence[Mapping[str, Any]]) -> list[str]:
    """The keys every flattened config has whose values are not all equal, sorted. Only keys
    every run has: a key some lack is drift between versions of the job (a new trainer
    default), not something the user varied."""
    shared = set.intersection(*(set(f) for f in flats))
    return sorted(k for k in shared if len({repr(f[k]) for f in flats}) > 1)


def _run_config(run: Run) -> dict[str, Any]:
    """The flattened config with the run's own folder replaced, so paths that embed it (logger,
    checkpoint folder) do not count as a difference."""
    flat = flatten(run.config)
    own = (run.config.get("paths") or {}).get("output_dir")
    if not own:
        return flat
    return {k: v.replace(own, "<run>") if isinstance(v, str) else v for k, v in flat.items()}


def _disambiguate(labels: list[str], runs: Sequence[Run]) -> list[str]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        groups[label].append(i)
    out = list(labels)
    for label, members in groups.items():
        if len(members) < 2:
            continue
        flats = [_run_config(runs[i]) for i in members]
        keys = differing_keys(flats)
        for n, (i, flat) in enumerate(zip(members, flats, strict=True), start=1):
            shown = ", ".join(f"{k}={fmt(flat[k])}" for k in keys[:3])
            shown += ", ..." if len(keys) > 3 else ""
            out[i] = f"{label} [{shown}]" if shown else f"{label} #{n}"
    # Identical configs under different folders (a rerun): number what is still equal.
    seen: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    for label in out:
        counts[label] += 1
    for i, label in enumerate(out):
        if counts[label] > 1:
            seen[label] += 1
            out[i] = f"{label} #{seen[label]}"
    return out


def sort_key(run: Run, label: str) -> tuple:
    """Grids read in order of their knob values (finish=1,3,5,10), not as strings."""
    return (run.scheme_name, sorted((k, float(v)) for k, v in knobs(run.weights).items()), label)
