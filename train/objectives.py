"""What a run returns to a sweeper: `objectives`, the validation metrics an Optuna search of the
weights optimises (README, "Searching weights with Optuna"), checked against the metrics the run
logs, and the directions that go with them.

The names a run logs follow from the data spec and the metric kinds (`train.metrics`,
`train.heads`): every behaviour `auc`, a binary one `gauc`, a continuous one `xauc`; the label
`logloss`, `calibration`, `odds_factor` and `calibration_corrected`; NDCG@k under the label of its
gain (`train.metrics.ndcg_key`); the same as `oracle_<metric>` for a behaviour with an oracle
column (not the odds correction's); and a multi-task model's `head_auc`, `head_xauc` (continuous) or `head_logloss` and
`head_calibration` (binary) per head. Which behaviours are continuous is known once the training
split is measured, so the names are checked twice: before any data is read against the names a
behaviour of either kind could log, after `data.prepare` (before training or writing) exactly.

An objective is a metric of the model with a direction (`train.pareto.default_direction`): not
an oracle's (the same in every trial) and not a calibration (best at 1, neither highest nor
lowest), and never a test metric:
a search that chooses weights by the test split leaves no unbiased estimate of the choice.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from train.errors import ConfigError
from train.pareto import default_direction

SPLIT = "val"
OPTUNA_DIRECTIONS = {"max": "maximize", "min": "minimize"}
EXAMPLE = "[val/click/auc,val/finish/auc]"


def logged(
    behaviours: Sequence[str],
    label: str,
    oracle: Collection[str] = (),
    heads: Collection[str] = (),
    continuous: Collection[str] | None = None,
    ndcg: str | None = None,
) -> list[str]:
    """The `val/<behaviour>/<metric>` names a run logs; `continuous=None` (not measured yet):
    those a behaviour of either kind could log. `ndcg`: the run's `<label>/ndcg...@k` key."""
    names = []
    for b in behaviours:
        kinds = {True, False} if continuous is None else {b in continuous}
        own = ["auc", *(["gauc"] if False in kinds else []), *(["xauc"] if True in kinds else [])]
        if b == label:
            own += ["logloss", "calibration"]
        if ndcg and ndcg.split("/")[0] == b:
            own.append(ndcg.split("/")[1])
        metrics = own + ([f"oracle_{m}" for m in own] if b in oracle else [])
        if b == label:
            metrics += ["odds_factor", "calibration_corrected"]
        if b in heads:
            metrics.append("head_auc")
            if True in kinds:
                metrics.append("head_xauc")
            if False in kinds:
                metrics += ["head_logloss", "head_calibration"]
        names += [f"{SPLIT}/{b}/{m}" for m in metrics]
    return names


def check(objectives: Any, logs: Sequence[str] | None) -> list[str]:
    """The objectives as a list of names (empty for null), or ConfigError naming the first that
    is not a metric of the model this run logs on validation, with a direction (`logs`: the
    names the run logs; None: unknown, the form alone is checked)."""
    if objectives is None:
        return []
    if isinstance(objectives, str | bytes) or not isinstance(objectives, Sequence):
        raise ConfigError(
            f"objectives={objectives!r}: expected a list of validation metric names, e.g. "
            f"objectives={EXAMPLE} (null: the job returns the test value of monitor)"
        )
    if not objectives:
        raise ConfigError(
            f"objectives=[]: expected at least one validation metric name, e.g. "
            f"objectives={EXAMPLE} (or null)"
        )
    choices = [n for n in logs or () if direction_of(n)]
    for i, name in enumerate(objectives):
        where = f"objectives[{i}]"
        if not isinstance(name, str):
            raise ConfigError(f"{where}={name!r}: expected a metric name such as val/click/auc")
        split, _, rest = name.partition("/")
        if split == "test":
            raise ConfigError(
                f"{where}: {name!r} is a test metric; objectives must come from validation "
                f"metrics (val/...), never test: a search that chooses by the test split leaves "
                f"no unbiased estimate of its choice (use 'val/{rest}')"
            )
        if name in list(objectives)[:i]:
            raise ConfigError(f"{where}: {name!r} is named twice; expected distinct metrics")
        if logs is None:
            continue
        if name in logs and not direction_of(name):
            why = (
                "the oracle's, the same in every trial"
                if metric(name).startswith("oracle_")
                else "best at 1, neither highest nor lowest (logloss scores the probabilities)"
                if "calibration" in metric(name)
                else "the fitted odds correction, not a quality of the model"
            )
            raise ConfigError(
                f"{where}: {name!r} is {why}; expected a metric of the model with a direction, "
                f"one of {', '.join(choices)}"
            )
        if name not in logs:
            raise ConfigError(
                f"{where}: {name!r} is not a metric this run logs; expected one of "
                f"{', '.join(choices)}"
            )
    return [str(n) for n in objectives]


def metric(name: str) -> str:
    """The metric of `<split>/<behaviour>/<metric>` without its `head_` prefix."""
    return name.rsplit("/", 1)[-1].removeprefix("head_")


def direction_of(name: str) -> str | None:
    """maximize / minimize for a metric of the model, None for one without a direction (an
    oracle's, a calibration)."""
    if metric(name).startswith("oracle_"):
        return None
    try:
        return OPTUNA_DIRECTIONS[default_direction(name)]
    except ValueError:
        return None


def directions(objectives: Any) -> list[str]:
    """maximize / minimize per objective, for the sweeper (`hydra/sweeper=pareto`); a value the
    job will refuse gets `maximize`, so that the sweep starts and its first trial says why."""
    if (
        isinstance(objectives, str | bytes)
        or not isinstance(objectives, Sequence)
        or not objectives
    ):
        return ["maximize"]
    return [direction_of(str(n)) or "maximize" for n in objectives]


def check_directions(objectives: Any, given: Sequence[str] | None) -> None:
    """Under an Optuna search (`given`: its `hydra.sweeper.direction`, None otherwise): one
    direction per objective, each the metric's own. Optuna minimises by default, and a search
    that minimises an AUC or maximises a logloss runs to the end choosing the worst weights."""
    if given is None:
        return
    if objectives is None:
        raise ConfigError(
            f"objectives=null under an Optuna search: expected the validation metrics it "
            f"optimises, e.g. objectives={EXAMPLE}; without them the job returns the test value "
            "of monitor and the search would choose by the test split"
        )
    names = [str(n) for n in objectives]
    if len(given) != len(names):
        raise ConfigError(
            f"hydra.sweeper.direction={list(given)} with objectives={names}: expected one "
            f"direction per objective, e.g. hydra.sweeper.direction={directions(names)} "
            "(hydra/sweeper=pareto sets them from the objectives)"
        )
    for i, (name, direction) in enumerate(zip(names, given, strict=True)):
        want = direction_of(name)
        if want is not None and direction != want:
            raise ConfigError(
                f"hydra.sweeper.direction[{i}]={direction} with objectives[{i}]={name}: "
                f"expected {want} (a {'higher' if want == 'maximize' else 'lower'} "
                f"{metric(name)} is better)"
            )


def sweeper_directions() -> list[str] | None:
    """The directions of the Optuna search this job is a trial of (`hydra.sweeper.direction`),
    or None when it is not one (a single run, a grid sweep)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    sweeper = hydra.sweeper
    if hydra.mode != RunMode.MULTIRUN or "direction" not in sweeper:
        return None
    given = sweeper.direction
    given = list(given) if isinstance(given, Sequence) and not isinstance(given, str) else [given]
    return [getattr(d, "name", str(d)) for d in given]


def values(objectives: Sequence[str], metrics: Mapping[str, float]) -> float | tuple[float, ...]:
    """What the job returns to the sweeper: the objectives' values (one: a float)."""
    missing = [n for n in objectives if n not in metrics]
    if missing:
        raise RuntimeError(f"objectives {missing} were checked but not logged: {sorted(metrics)}")
    found = tuple(float(metrics[n]) for n in objectives)
    return found[0] if len(found) == 1 else found
