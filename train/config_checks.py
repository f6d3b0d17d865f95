"""The domain of every job-level config key, checked on the composed (plain) config before
anything is read or written: `error: <key>=<value>: expected <domain>`.

The seams check their own arguments where they are built (the weight scheme, the data module,
the model, the optimizer and scheduler factories raise `ConfigError`/`SchemeError`/`DataError`
naming their keys); this module covers what no constructor of ours owns: the job's own keys,
the Lightning trainer and callbacks, the output folder, keys that name no argument of their
`_target_`, and the checks that need two groups at once (the monitor and the behaviours, the
model and the categorical features). It also runs the seams' own checks of the weight scheme,
model, optimizer and scheduler here (their targets, located by name as Hydra does: a network
class's `check_config(config)`, the factories themselves), so that a bad `model.hidden` or
`optimizer.lr` stops the job before the data is read rather than after.

The rule helpers (`integer`, `number`, `one_of`, ..., `require`) are shared with the seams, so
every message has one shape. Longer than 450 lines: the domain table of every job-level key and
the cross-group checks are read together, here, as the one list of what a config may hold.
"""

from __future__ import annotations

import inspect
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fsspec.core import url_to_fs

from train import objectives
from train.errors import ConfigError, UpweightError
from train.layout import METRICS, NDCG_METRIC
from train.pareto import default_direction

Rule = tuple[Callable[[Any], bool], str]
"""(test, what was expected): the domain of one key."""


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float (bool is no number here, NaN and inf are not finite)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_list(value: Any) -> bool:
    """A list (or tuple, or OmegaConf ListConfig), not a string."""
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def integer(low: int | None = None, high: int | None = None) -> Rule:
    if low is None:
        text = "an integer"
    elif high is None:
        text = f"an integer >= {low}"
    else:
        text = f"an integer in [{low}, {high}]"
    return (
        lambda v: is_int(v) and (low is None or v >= low) and (high is None or v <= high),
        text,
    )


def number(
    low: float, high: float | None = None, low_open: bool = False, high_open: bool = False
) -> Rule:
    def rule(v: Any) -> bool:
        if not is_number(v):
            return False
        above = v > low if low_open else v >= low
        below = high is None or (v < high if high_open else v <= high)
        return above and below

    if high is None:
        text = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        text = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return rule, text


def one_of(*options: Any) -> Rule:
    # Typed: `false` is not 0, "32" is not 32 (YAML tells them apart, so do the rules).
    return (
        lambda v: any(type(v) is type(o) and v == o for o in options),
        "one of " + ", ".join(dict.fromkeys(str(o) for o in options)),
    )


def optional(inner: Rule) -> Rule:
    return (lambda v: v is None or inner[0](v)), f"null or {inner[1]}"


def either(*rules: Rule) -> Rule:
    return (lambda v: any(r(v) for r, _ in rules)), " or ".join(t for _, t in rules)


def text() -> Rule:
    return (lambda v: isinstance(v, str) and bool(v.strip())), "a non-empty string"


def boolean() -> Rule:
    return (lambda v: isinstance(v, bool)), "true or false"


def ints(low: int = 1) -> Rule:
    """A list of integers >= low (possibly empty), e.g. layer sizes."""
    return (
        lambda v: is_list(v) and all(is_int(x) and x >= low for x in v),
        f"a list of integers >= {low}",
    )


def require(key: str, value: Any, rule: Rule, error: type[UpweightError] = ConfigError) -> None:
    """Raise `error("<key>=<value>: expected <domain>")` unless `value` is in the domain."""
    test, expected = rule
    if not test(value):
        raise error(f"{key}={show(value)}: expected {expected}")


def show(value: Any) -> str:
    """A value as the user would recognise it in a message (strings quoted, long ones cut)."""
    shown = repr(value)
    return shown if len(shown) <= 200 else shown[:197] + "..."


# A fraction of the batches, or a number of them (Lightning's limit_* and val_check_interval).
BATCHES = either(number(0.0, 1.0), integer(0))
PRECISIONS = (
    "64-true", "64", 64, "32-true", "32", 32, "16-mixed", "16-true", "16", 16,
    "bf16-mixed", "bf16-true", "bf16",
)  # fmt: skip
DEVICE_LIST = (
    lambda v: (
        (is_list(v) and bool(v) and all(is_int(d) and d >= 0 for d in v))
        or (isinstance(v, str) and re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*,?\s*", v) is not None)
    ),
    'a list of device indices (e.g. [0, 1] or "0,1")',
)
DEVICES = either(integer(1), (lambda v: v in (-1, "-1", "auto"), "-1 or auto (every device)"))
DEVICES = either(DEVICES, DEVICE_LIST)
HARDWARE: dict[str, Rule] = {
    "accelerator": one_of("cpu", "gpu", "cuda", "mps", "auto"),
    "devices": DEVICES,
    "num_nodes": integer(1),
    "strategy": text(),
    "precision": one_of(*PRECISIONS),
}
RESUME = one_of("auto", "false", "no", "never", False)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""torch.compile's modes (`compile=tower`, train.compile)."""
RULES: dict[str, Rule] = {
    # The hardware group first: the trainer keys interpolate it, and the user typed these.
    **{f"hardware.{k}": rule for k, rule in HARDWARE.items()},
    "seed": integer(0, 2**32 - 1),
    "monitor": (
        lambda v: isinstance(v, str) and re.fullmatch(r"val/[^/]+/[^/]+", v) is not None,
        "a validation metric `val/<behaviour>/<metric>` (e.g. val/click/auc)",
    ),
    "monitor_mode": one_of("min", "max"),
    "ckpt_path": optional(text()),
    "resume": (lambda v: v is None or RESUME[0](v), "auto or false"),
    "init_from": optional(text()),
    "init_probe_steps": integer(1),
    "init_schedule.lr": number(0.0, low_open=True),
    "init_schedule.warmup_steps": integer(0),
    "init_schedule.floor": number(0.0, 1.0),
    "nonfinite": one_of("stop", "skip"),
    "xauc_pairs": integer(1),
    "metrics.ndcg_k": integer(1),
    "metrics.ndcg_gain": optional(text()),
    "paths.output_dir": text(),
    # 0 trains nothing: the run evaluates the model it starts with (e.g. an init_from).
    "trainer.max_epochs": either(integer(0), (lambda v: v == -1, "-1 (no limit)")),
    "trainer.max_steps": either(integer(1), (lambda v: v == -1, "-1 (no limit)")),
    "trainer.min_epochs": optional(integer(0)),
    "trainer.limit_train_batches": optional(BATCHES),
    "trainer.limit_val_batches": optional(BATCHES),
    "trainer.limit_test_batches": optional(BATCHES),
    "trainer.val_check_interval": optional(either(number(0.0, 1.0, low_open=True), integer(1))),
    "trainer.check_val_every_n_epoch": optional(integer(1)),
    "trainer.num_sanity_val_steps": either(integer(0), (lambda v: v == -1, "-1 (all)")),
    "trainer.accumulate_grad_batches": integer(1),
    "trainer.gradient_clip_val": optional(number(0.0)),
    "trainer.log_every_n_steps": integer(1),
    "trainer.enable_progress_bar": boolean(),
    "trainer.fast_dev_run": either(boolean(), integer(0)),
    "trainer.benchmark": optional(boolean()),
    "trainer.detect_anomaly": boolean(),
    "trainer.deterministic": optional(either(boolean(), one_of("warn"))),
    "trainer.enable_model_summary": boolean(),
    "trainer.use_distributed_sampler": boolean(),
    "trainer.default_root_dir": text(),
    **{f"trainer.{k}": rule for k, rule in HARDWARE.items()},
    "callbacks.checkpoint.save_top_k": integer(-1),
    "callbacks.checkpoint.save_last": optional(either(boolean(), one_of("link"))),
    "callbacks.checkpoint.filename": optional(text()),
    "callbacks.early_stopping.patience": integer(0),
    "callbacks.early_stopping.min_delta": number(0.0),
    "callbacks.last.every_n_train_steps": optional(integer(0)),
    "callbacks.requeue.check_every_n_steps": integer(1),
    "callbacks.rank_watchdog.timeout_s": number(0.0, low_open=True),
    "callbacks.rank_watchdog.interval_s": number(0.0, low_open=True),
    "callbacks.compile.mode": one_of(*COMPILE_MODES),
    "callbacks.compile.dynamic": optional(boolean()),
}
METRIC_NAMES = (
    *METRICS,
    *(f"oracle_{m}" for m in METRICS),
    *(f"head_{m}" for m in ("auc", "xauc", "logloss", "calibration")),
)
"""The last part of a `val/<behaviour>/<metric>` name (train.metrics, train.heads)."""
OWN_MODELS = (
    *(f"train.model.{name}" for name in ("DNN", "DCN", "DeepFM", "MultiHead")),
    *(f"train.multitask.{name}" for name in ("MMoE", "PLE")),
)
"""Networks that embed the categorical features (need at least one), checked here early."""
TRAINING_KEYS = ("head_weights", "balance")
"""`model` config keys that configure how a multi-task network trains (per-head weight schemes,
loss balancing: `train.heads`, `train.balance`), not the network: never passed to its class."""
EARLY = ("weights", "optimizer", "scheduler")
"""Groups whose `train.` factory checks its values without building anything: run now (the
weight scheme's label then fails as itself, not as a `monitor` naming it)."""


def lookup(config: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    """(found, value) of a dotted key; a missing or null section is "not found"."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check(config: Mapping[str, Any], directions: Sequence[str] | None = None) -> None:
    """Raise ConfigError for the first key outside its domain (see RULES), a key that names no
    argument of its `_target_`, a contradiction between keys, or an output folder that cannot
    be created; and the seams' own errors (SchemeError, ConfigError) for a bad weight scheme,
    model, optimizer or scheduler value. `directions`: those of the Optuna search this job is a
    trial of (`objectives.sweeper_directions()`), checked against `objectives`."""
    for key, rule in RULES.items():
        found, value = lookup(config, key)
        if found:
            require(key, value, rule)
    check_targets(config)
    if config.get("init_from") and config.get("ckpt_path"):
        raise ConfigError(
            f"init_from={config['init_from']} and ckpt_path={config['ckpt_path']} are both set: "
            "ckpt_path resumes a run (weights, optimizer, loop), init_from starts a new one "
            "from weights only; pick one"
        )
    trainer = config.get("trainer") or {}
    min_epochs, max_epochs = trainer.get("min_epochs"), trainer.get("max_epochs")
    if is_int(min_epochs) and is_int(max_epochs) and max_epochs != -1 and min_epochs > max_epochs:
        raise ConfigError(
            f"trainer.min_epochs={min_epochs} is above trainer.max_epochs={max_epochs}: "
            "expected min_epochs <= max_epochs"
        )
    check_seams(config)
    check_ndcg_gain(config)
    check_monitor(config)
    check_objectives(config, directions)
    found, output_dir = lookup(config, "paths.output_dir")
    if found:
        check_output_dir(str(output_dir))


def check_ndcg_gain(config: Mapping[str, Any]) -> None:
    """`metrics.ndcg_gain` names a weight scheme (composed as `weights=<name>` is) whose
    behaviours the data declares."""
    from train.weights import SchemeError, gain_scheme

    found, name = lookup(config, "metrics.ndcg_gain")
    if not found or name is None:
        return
    scheme = gain_scheme(name)
    found, behaviours = lookup(config, "data.behaviours")
    if scheme is not None and found and isinstance(behaviours, Mapping) and behaviours:
        try:
            scheme.check_behaviours([str(b) for b in behaviours])
        except SchemeError as err:
            raise SchemeError(f"metrics.ndcg_gain={name!r}: {err}") from err


def check_monitor(config: Mapping[str, Any]) -> None:
    """`monitor` names a metric of a behaviour of the data, watched in its direction."""
    monitor, mode = config.get("monitor"), config.get("monitor_mode")
    if not isinstance(monitor, str):
        return
    _, behaviour, metric = monitor.split("/")
    ndcg = NDCG_METRIC.fullmatch(metric.removeprefix("oracle_"))
    if metric not in METRIC_NAMES and not ndcg:
        raise ConfigError(
            f"monitor={monitor}: expected a metric name among {list(METRIC_NAMES)} "
            f"or ndcg@<k> after val/{behaviour}/"
        )
    found, k = lookup(config, "metrics.ndcg_k")
    if ndcg and found and is_int(k) and not metric.endswith(f"@{k}"):
        raise ConfigError(
            f"monitor={monitor} with metrics.ndcg_k={k}: expected a name ending in @{k} "
            "(the run logs NDCG at that k only)"
        )
    found, behaviours = lookup(config, "data.behaviours")
    if found and isinstance(behaviours, Mapping) and behaviours and behaviour not in behaviours:
        raise ConfigError(
            f"monitor={monitor}: expected a behaviour of data.behaviours "
            f"{[str(b) for b in behaviours]} after val/"
        )
    try:
        better: str | None = default_direction(metric)
    except ValueError:  # calibration: its direction is a choice
        better = None
    if better is not None and mode in ("min", "max") and mode != better:
        raise ConfigError(
            f"monitor_mode={mode} with monitor={monitor}: expected monitor_mode={better} "
            f"(a {'higher' if better == 'max' else 'lower'} {metric} is better); the best "
            "checkpoint and the early stop would pick the worst model"
        )


def check_objectives(config: Mapping[str, Any], directions: Sequence[str] | None = None) -> None:
    """`objectives` name validation metrics a behaviour of the data logs, whatever its kind
    (the exact names, which depend on the kinds, are checked after the data is measured), one
    per direction of the search."""
    value = config.get("objectives")
    behaviours = _names(lookup(config, "data.behaviours")[1])
    label = str(lookup(config, "weights.label")[1])
    names = objectives.logged(
        behaviours,
        label,
        oracle=_names(lookup(config, "data.oracle")[1]),
        heads=_names(lookup(config, "model.heads")[1]),
        ndcg=ndcg_key(config, label) if value else None,
    )
    objectives.check(value, names if behaviours else None)
    objectives.check_directions(value, directions)


def ndcg_key(config: Mapping[str, Any], label: str) -> str | None:
    """The `<behaviour>/<metric>` name the run will log NDCG under (None: unknown yet)."""
    from train.metrics import ndcg_key
    from train.weights import gain_scheme

    found, k = lookup(config, "metrics.ndcg_k")
    if not (found and is_int(k) and k >= 1):
        return None
    return ndcg_key(label, k, gain_scheme(lookup(config, "metrics.ndcg_gain")[1]))


def _names(value: Any) -> list[str]:
    """The names of a mapping's keys or a list's items; none for anything else."""
    if isinstance(value, Mapping) or is_list(value):
        return [str(v) for v in value]
    return []


def check_seams(config: Mapping[str, Any]) -> None:
    """The model, optimizer and scheduler checks of our own targets, run before the data is
    read; and the one check that needs the model and the data: an embedding network needs a
    categorical feature."""
    model = config.get("model")
    if isinstance(model, Mapping) and model.get("_target_") in OWN_MODELS:
        found, categorical = lookup(config, "data.categorical")
        if found and isinstance(categorical, Mapping) and not categorical:
            dense = lookup(config, "data.dense")[1]
            if not dense:
                raise ConfigError(
                    "data.categorical={} and data.dense=[]: expected at least one feature "
                    "column (ids in data.categorical, numbers in data.dense)"
                )
            raise ConfigError(
                "data.categorical={}: expected at least one categorical feature column "
                f"(column -> hash buckets): {model['_target_']} embeds hashed ids, dense "
                f"features alone ({show(dense)}) are not enough"
            )
        if found and isinstance(categorical, Mapping):
            check_embedding_memory(categorical, model.get("embedding_dim", 16))
    if isinstance(model, Mapping) and isinstance(model.get("_target_"), str):
        # A network class may check its config without being built (train.model's do).
        check_config = getattr(_locate(model["_target_"]), "check_config", None)
        if callable(check_config):
            check_config(model)
    for group in EARLY:
        section = config.get(group)
        if isinstance(section, Mapping) and str(section.get("_target_", "")).startswith("train."):
            factory = _locate(section["_target_"])
            if factory is not None:
                factory(**_arguments(section))


def check_embedding_memory(categorical: Mapping[str, Any], dim: Any) -> None:
    """The embedding tables (one float32 row per hash bucket) must fit this machine's memory:
    a bucket count with a few zeros too many fails here, not in an allocator's traceback."""
    buckets = sum(v for v in categorical.values() if is_int(v) and v > 0)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return
    if not is_int(dim) or memory <= 0:
        return
    size = buckets * dim * 4
    if size > memory:
        raise ConfigError(
            f"data.categorical: {buckets} hash buckets x model.embedding_dim={dim} x 4 bytes "
            f"= {size / 2**30:.1f} GiB of embeddings; expected fewer buckets or a smaller "
            f"embedding_dim (this machine has {memory / 2**30:.1f} GiB of memory)"
        )


def check_targets(config: Mapping[str, Any], where: str = "") -> None:
    """Every section with a `_target_`: the target imports, and each of its keys is an
    argument of it (`+model.foo=1` would otherwise fail with a TypeError after the data pass)."""
    if not isinstance(config, Mapping):
        return
    target = config.get("_target_")
    if isinstance(target, str):
        found = _locate(target)
        if found is None:
            raise ConfigError(
                f"{where}_target_={target!r}: expected an importable class or function"
            )
        allowed = _parameters(found)
        if allowed is not None:
            # The model section's training keys are the module's (`train.model.network_config`).
            free = TRAINING_KEYS if where == "model." else ()
            unknown = [k for k in _arguments(config) if k not in allowed and k not in free]
            if unknown:
                key = unknown[0]
                if config.get("_partial_"):  # the job passes the arguments without defaults
                    allowed = _parameters(found, with_default=True) or allowed
                raise ConfigError(
                    f"{where}{key}={show(config[key])}: not an argument of {target}; expected "
                    f"one of {sorted(allowed)}"
                )
    for key, value in config.items():
        if isinstance(value, Mapping):
            check_targets(value, f"{where}{key}.")


def _arguments(section: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if not (k.startswith("_") and k.endswith("_"))}


def _locate(target: str) -> Any:
    from hydra.utils import get_object

    try:
        return get_object(target)
    except Exception:
        return None


def _parameters(target: Any, with_default: bool = False) -> set[str] | None:
    """The keyword arguments `target` takes (`with_default`: those a config may leave out);
    None when it takes any (**kwargs) or is opaque."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    names = set()
    for p in signature.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        keyword = p.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        )
        if keyword and not (with_default and p.default is inspect.Parameter.empty):
            names.add(p.name)
    return names


def check_output_dir(url: str) -> None:
    """A local output folder must be a folder that exists or can be made, and writable; for
    object stores the first write tells (nothing to create ahead)."""
    try:
        fs, path = url_to_fs(url)
    except Exception as err:  # an unknown protocol, a filesystem package not installed
        raise ConfigError(
            f"paths.output_dir={url}: expected a local folder or a URL of an installed "
            f"filesystem ({type(err).__name__}: {err})"
        ) from err
    if "file" not in fs.protocol and "local" not in fs.protocol:
        return
    path = os.path.abspath(path)
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(
            f"paths.output_dir={url}: expected a folder that exists or can be created; "
            f"{probe} is a file"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"paths.output_dir={url}: expected a folder this user can write; {probe} is not "
            "writable"
        )


def column_list(key: str, value: Any, error: type[UpweightError] = ConfigError) -> list[str]:
    """A list of distinct column names (ints allowed: numbered columns such as Ali-CCP's)."""
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise error(f"{key}={show(value)}: expected a list of column names, e.g. [price, age]")
    names = [column_name(f"{key}[{i}]", v, error) for i, v in enumerate(value)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise error(f"{key}={show(list(value))}: expected distinct column names; {twice} twice")
    return names


def column_name(key: str, value: Any, error: type[UpweightError] = ConfigError) -> str:
    """A column name: a non-empty string (an int is taken as its digits, as YAML reads `101`)."""
    if is_int(value):
        return str(value)
    if not isinstance(value, str) or not value:
        raise error(f"{key}={show(value)}: expected a column name (a non-empty string)")
    return value
