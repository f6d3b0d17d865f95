"""Warm start: `init_from=CKPT_URL` or `init_from=RUN_FOLDER` starts a new run from an earlier
model's weights.

Re-weighting is the loop users run most (try another scheme, compare), and from scratch every
scheme pays for a full training to convergence. A model trained under one scheme has learned ids
and a trunk that the next scheme can start from, for a shorter budget. Which model of the earlier
run transfers best depends on the data: on the simulated feed of the README's earlier figures
the model after the first epoch did, on smaller and noisier feeds (and a user's feed) the
converged one did; no fixed rule held (bench/warmstart.py, README "Warm-started re-weighting"). So `init_from=RUN_FOLDER` decides per run: each checkpoint
the folder kept (`WARM_START_CANDIDATES`: first_epoch, best, last) starts a copy of this run's
module, which trains `init_probe_steps` steps on this run's data and scheme and is scored on the
validation split by `monitor`; the run continues from the best (`start`, `probe`, `pick`).

A warm start gets its own schedule by default (`init_schedule`: LR, a short warm-up, a cosine
decay over the budget, the final weights kept), so that the user sets only `trainer.max_steps`;
a fresh Adam's first steps are as large as the LR whatever the gradient, and knock a trained
model off without the warm-up.

Only the model is taken over: the network's weights and the dense standardisation it was
trained with (part of the function the weights compute). The optimizer, the LR schedule, the
loop counters and the callbacks start fresh; that is what separates `init_from` (a new run)
from `ckpt_path` (resuming the same run).

One adjustment is made: sample weights scale the odds a model learns (the optimum of a
weighted BCE has odds × mean positive weight / negative weight, the YouTube relation), so a
new scheme's optimum sits, on average, log(m_new / m_old) higher in logit space. A
single-logit network (one ending in a Linear with one output) gets that shift added to its
output bias, with m = mean positive weight / negative weight of each scheme on its training
data (from the statistics both runs keep). Ranking is unchanged by it; without it the first
steps of a short budget go into moving that one bias while the rest of the network chases the
miscalibration. Schemes with the same label only; none for multi-head models (unweighted).

Re-weighting changes what the monitored metric rewards (a scheme that trades clicks for
finishes lowers val/click/auc from the first step), so early stopping on it would stop a warm
start at once: `init_schedule` trains a fixed budget and keeps the final weights
(`callbacks.early_stopping=null callbacks.checkpoint.monitor=null`).

The checkpoint must describe the same network as this run: the same categorical features in
the same order with the same bucket counts, the same dense features, the same model class and
the same model settings except those in `FREE_KEYS`, which change training or scoring but not
what the weights mean. Every difference is named, e.g.
`data.categorical.user_id: checkpoint has 50000 buckets, this run 100000`, and the run stops
before it trains or writes anything.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from fsspec.core import url_to_fs
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from train.checkpoint import CheckpointError, contents, dense_stats, read
from train.config_checks import TRAINING_KEYS
from train.data.features import FeatureSpec
from train.data.vocabulary import VOCAB, Vocabulary
from train.errors import UpweightError
from train.layout import CHECKPOINTS_DIR, WARM_START_CANDIDATES, join

FREE_KEYS = frozenset({"_partial_", "dropout", "sparse_embeddings", "fusion", *TRAINING_KEYS})
"""Model settings a warm start may change: dropout, the gradient layout, the fusion of a
multi-head model's scores, and how its heads train (per-head weights, loss balancing)."""


class WarmStartError(UpweightError):
    """A checkpoint this run cannot start from; the message names every difference."""


def differences(
    artifact: Mapping[str, Any], spec: FeatureSpec, model_config: Mapping[str, Any]
) -> list[str]:
    """What the checkpoint's description (`checkpoint["upweight"]`) and this run disagree on,
    one readable line per difference; empty when the weights fit."""
    found: list[str] = []
    saved_spec = artifact.get("spec") or {}
    theirs = {str(k): v for k, v in _tables(saved_spec).items()}
    ours = spec.tables
    their_vocab = saved_spec.get("vocabularies") or {}

    def key(name: str) -> str:
        return f"data.sequences.{name}" if name in spec.sequences else f"data.categorical.{name}"

    for name in ours.keys() | theirs.keys():
        if name not in theirs:
            found.append(f"{key(name)}: this run has it, the checkpoint does not")
        elif name not in ours:
            found.append(
                f"data.categorical.{name}: the checkpoint has it ({_rows(theirs[name])}), "
                "this run does not"
            )
        elif theirs[name] != ours[name]:
            both_hashed = VOCAB not in (theirs[name], ours[name])
            this_run = ours[name] if both_hashed else _rows(ours[name])
            found.append(f"{key(name)}: checkpoint has {_rows(theirs[name])}, this run {this_run}")
        elif ours[name] == VOCAB and name in their_vocab and name in spec.vocabularies:
            mine, saved = spec.vocabularies[name], Vocabulary.from_state(their_vocab[name])
            if mine != saved:
                found.append(
                    f"{key(name)}: the checkpoint's vocabulary ({len(saved.values)} ids) is not "
                    f"this run's ({len(mine.values)} ids): its embedding rows belong to other "
                    "ids (warm starts need the same training ids, e.g. the same data.train)"
                )
    found.sort()
    if not found and list(theirs) != list(ours):
        found.append(
            f"data.categorical: checkpoint has the features in the order {list(theirs)}, this "
            f"run {list(ours)} (embedding rows are laid out in that order)"
        )
    their_lists = {
        str(c): {k: v for k, v in dict(s).items() if k in ("table", "max_len", "pooling")}
        for c, s in (saved_spec.get("sequences") or {}).items()
    }
    our_lists = {
        c: {"table": s.table, "max_len": s.max_len, "pooling": s.pooling}
        for c, s in spec.sequences.items()
    }
    if their_lists != our_lists:
        found.append(f"data.sequences: checkpoint has {their_lists}, this run {our_lists}")
    their_dense, our_dense = list(saved_spec.get("dense") or []), list(spec.dense)
    if their_dense != our_dense:
        found.append(f"data.dense: checkpoint has {their_dense}, this run {our_dense}")

    saved_model = artifact.get("model") or {}
    their_target, our_target = saved_model.get("_target_"), model_config.get("_target_")
    if their_target != our_target:
        found.append(f"model._target_: checkpoint is {their_target}, this run {our_target}")
        return found  # the settings of another class say nothing more
    for key in sorted((saved_model.keys() | model_config.keys()) - FREE_KEYS):
        a, b = _plain(saved_model.get(key)), _plain(model_config.get(key))
        if a != b:
            found.append(f"model.{key}: checkpoint has {a!r}, this run {b!r}")
    return found


def _tables(saved_spec: Mapping[str, Any]) -> dict[str, Any]:
    """A saved spec's embedding tables in order (`FeatureSpec.tables` of the checkpoint)."""
    tables = dict(saved_spec.get("categorical") or {})
    for column, seq in (saved_spec.get("sequences") or {}).items():
        if dict(seq).get("table") is None:
            tables[column] = dict(seq).get("buckets") or VOCAB
    return tables


def _rows(encoding: Any) -> str:
    return "a vocabulary" if encoding == VOCAB else f"{encoding} buckets"


def shape_differences(network: nn.Module, weights: Mapping[str, Any]) -> list[str]:
    """Parameters missing, unexpected or of another shape (a backstop for models whose settings
    do not show every shape, e.g. a custom class)."""
    expected = network.state_dict()
    found = [f"model.{k}: missing from the checkpoint" for k in expected if k not in weights]
    found += [
        f"model.{k}: in the checkpoint, not in this model" for k in weights if k not in expected
    ]
    for key, tensor in weights.items():
        if key not in expected:
            continue
        if not isinstance(tensor, torch.Tensor):
            found.append(f"model.{key}: checkpoint holds a {type(tensor).__name__}, not a tensor")
        elif tensor.shape != expected[key].shape:
            found.append(
                f"model.{key}: checkpoint has shape {list(tensor.shape)}, "
                f"this run {list(expected[key].shape)}"
            )
    return found


def init_from(
    module: nn.Module,
    url: str,
    spec: FeatureSpec,
    model_config: Mapping[str, Any],
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Load the checkpoint at `url` into `module.model` (and its dense preprocessing) after
    checking it fits; returns a one-line summary. Raises WarmStartError."""
    where = f"init_from={url}"
    try:
        checkpoint, artifact, state = contents(url, storage_options, where)
    except CheckpointError as err:
        raise WarmStartError(str(err).replace("ckpt=", "init_from=", 1)) from err
    weights = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    found = differences(artifact, spec, model_config) or shape_differences(module.model, weights)
    if found:
        raise WarmStartError(
            f"{where}: the checkpoint does not fit this run's model: " + "; ".join(found)
        )
    module.model.load_state_dict(weights)
    shift = logit_shift(artifact, getattr(module, "artifact", {}) or {})
    output = _output_layer(module.model)
    shifted = ""
    if shift and output is not None and output.bias is not None:
        with torch.no_grad():
            output.bias += shift
        shifted = f"; output bias {shift:+.3f} for the new scheme's weighted odds"
    # The weights were trained on inputs standardised with these statistics: keep them (they
    # equal this run's on the same data, and stay right when the new data drifted).
    try:
        mean, std = dense_stats(state, artifact, len(spec.dense), where)
    except CheckpointError as err:
        raise WarmStartError(str(err)) from err
    module.preprocess.mean.copy_(mean)
    module.preprocess.std.copy_(std)
    scheme = (artifact.get("scheme") or {}).get("describe", "?")
    return (
        f"warm start from {url} (step {checkpoint.get('global_step', '?')}, trained with "
        f"{scheme}): model weights loaded{shifted}; optimizer and schedule fresh"
    )


def positive_weight_ratio(artifact: Mapping[str, Any]) -> float | None:
    """Mean weight of a positive over the weight of a negative under the run's scheme on its
    training data, from what a checkpoint keeps (scheme, stats); None when it is unknown."""
    scheme, stats = artifact.get("scheme") or {}, artifact.get("stats") or {}
    label, negative = scheme.get("label"), scheme.get("negative_weight", 1.0)
    rate = (stats.get("positive_rate") or {}).get(label)
    mean = stats.get("weight_mean")
    if not (isinstance(rate, float | int) and isinstance(mean, float | int) and negative):
        return None
    if not 0 < rate < 1:
        return None
    positive = (mean - (1 - rate) * negative) / rate  # weight_mean = r·m_pos + (1 - r)·w_neg
    return positive / negative if positive > 0 else None


def logit_shift(old: Mapping[str, Any], new: Mapping[str, Any]) -> float:
    """log(m_new / m_old) (see the module docstring); 0 when the labels differ, a ratio is
    unknown, or the model is multi-head."""
    if (old.get("model") or {}).get("heads") or (new.get("model") or {}).get("heads"):
        return 0.0
    if (old.get("scheme") or {}).get("label") != (new.get("scheme") or {}).get("label"):
        return 0.0
    a, b = positive_weight_ratio(old), positive_weight_ratio(new)
    return math.log(b / a) if a and b else 0.0


def _output_layer(network: nn.Module) -> nn.Linear | None:
    """The last Linear with one output: the logit of a single-logit network."""
    linears = [m for m in network.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears and linears[-1].out_features == 1 else None


def _plain(value: Any) -> Any:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------
# `init_from=RUN_FOLDER`: which of the run's checkpoints to continue from, and the schedule
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One candidate checkpoint and what its short probe scored."""

    url: str
    step: int
    """The source run's global_step when the checkpoint was written."""
    score: float
    """`monitor` on the validation split after `init_probe_steps` steps from it."""


def start(cfg: DictConfig, module: L.LightningModule, data: Any, spec: FeatureSpec) -> str:
    """The warm start of `python -m train` (`init_from` set): apply `init_schedule` to the
    module and `cfg` (before the callbacks and trainer are built from it), pick the checkpoint
    (a run folder: the best of its candidates after a probe each), load it. Prints what it did
    (the probe table, the summary) on global rank 0 and returns it. Raises WarmStartError."""
    schedule = apply_schedule(cfg, module)
    model_config = OmegaConf.to_container(cfg.model, resolve=True)
    urls = candidates(cfg.init_from)
    chosen, table = urls[0], ""
    if len(urls) > 1:
        probes = probe(cfg, module, data, spec, urls)
        chosen = pick(probes, cfg.monitor_mode)
        table = describe(probes, chosen, cfg.monitor, cfg.init_probe_steps) + "\n"
    summary = table + init_from(module, chosen, spec, model_config) + schedule  # type: ignore[arg-type]
    rank_zero_only(print)(summary)
    return summary


def candidates(url: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The checkpoints `init_from=url` names: `url` itself unless it is a folder; for a run
    folder (or its checkpoints folder), those of `WARM_START_CANDIDATES` it kept, in that
    order. A folder without any is an error naming it and what was expected."""
    fs, path = url_to_fs(url, **(storage_options or {}))
    if not fs.isdir(path):
        return [url]  # a checkpoint file, or a missing one that `contents` names
    for folder in (join(url, CHECKPOINTS_DIR), url):
        found = [join(folder, name) for name in WARM_START_CANDIDATES]
        found = [u for u in found if fs.isfile(url_to_fs(u, **(storage_options or {}))[1])]
        if found:
            return found
    names = ", ".join(WARM_START_CANDIDATES)
    raise WarmStartError(
        f"init_from={url}: a folder without checkpoints: expected a checkpoint file or a run "
        f"folder whose {CHECKPOINTS_DIR}/ holds one of {names} (what `python -m train` keeps)"
    )


def probe(
    cfg: DictConfig, module: L.LightningModule, data: Any, spec: FeatureSpec, urls: list[str]
) -> list[Probe]:
    """Each candidate's score: a copy of `module` (this run's network, scheme and schedule)
    warm-started from it, trained `init_probe_steps` steps on this run's data and validated by
    `monitor`. Nothing is written; the validation metrics are global (every rank gathers every
    rank's rows), so every rank scores alike. Candidates saved at the same step (best and last
    of a run that ended on its best epoch) are probed once."""
    model_config = OmegaConf.to_container(cfg.model, resolve=True)
    probes: list[Probe] = []
    seen: set[int] = set()
    for url in urls:
        step = int(read(url).get("global_step", -1))
        if step in seen:
            continue
        seen.add(step)
        copied = copy.deepcopy(module)
        init_from(copied, url, spec, model_config)  # type: ignore[arg-type]
        trainer = probe_trainer(cfg)
        L.seed_everything(cfg.seed, workers=True, verbose=False)  # every probe sees one stream
        trainer.fit(copied, datamodule=data)
        trainer.validate(copied, datamodule=data, verbose=False)
        score = float(trainer.callback_metrics[cfg.monitor])
        probes.append(Probe(url, step, score))
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the run as without the probes
    return probes


def probe_trainer(cfg: DictConfig) -> L.Trainer:
    """This run's trainer (hardware, precision, strategy) for `init_probe_steps` steps, with
    the callbacks that change how it trains (sparse all-reduce, compile, the rank watchdog) and
    none that writes: no checkpoints, no logger."""
    callbacks = [
        c
        for c in (instantiate(c) for c in cfg.callbacks.values() if c)
        if not hasattr(c, "dirpath") and not isinstance(c, EarlyStopping)
    ]
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=cfg.init_probe_steps,
        max_epochs=-1,
        min_epochs=None,
        num_sanity_val_steps=0,
        val_check_interval=None,
        check_val_every_n_epoch=1,
    )


def pick(probes: Sequence[Probe], mode: str) -> str:
    """The candidate with the best score (`monitor_mode`); the first of equals."""
    sign = 1.0 if mode == "max" else -1.0
    best = max(probes, key=lambda p: sign * (p.score if math.isfinite(p.score) else -math.inf))
    return best.url


def describe(probes: Sequence[Probe], chosen: str, monitor: str, steps: int) -> str:
    """The probe table printed before the run."""
    lines = [f"warm-start candidates, {monitor} after {steps} probe steps each:"]
    for p in probes:
        mark = "  <- continued from" if p.url == chosen else ""
        lines.append(f"  {p.url}  (step {p.step})  {p.score:.4f}{mark}")
    return "\n".join(lines)


def apply_schedule(cfg: DictConfig, module: L.LightningModule) -> str:
    """`init_schedule` (unless null): its LR in place of optimizer.lr, warm-up and cosine decay
    over the budget in place of `scheduler`, no early stopping, best.ckpt the final weights,
    and the budget in steps when trainer.max_steps is set. Edits `cfg` (the config.yaml the
    run writes shows what ran) and the module's optimizer and scheduler. Returns a summary."""
    schedule = cfg.get("init_schedule")
    if not schedule:
        return ""
    if "lr" not in (cfg.optimizer or {}):
        raise WarmStartError(
            f"init_schedule.lr: optimizer {cfg.optimizer.get('_target_')} takes no lr; set "
            "init_schedule=null and the optimizer's own settings"
        )
    cfg.optimizer.lr = schedule.lr
    cfg.scheduler = {
        "_target_": "train.optim.cosine",
        "warmup_steps": schedule.warmup_steps,
        "floor": schedule.floor,
    }
    module.optimizer_factory = instantiate(cfg.optimizer)
    module.scheduler_factory = instantiate(cfg.scheduler)
    if cfg.callbacks.get("early_stopping"):
        cfg.callbacks.early_stopping = None
    if cfg.callbacks.get("checkpoint"):
        cfg.callbacks.checkpoint.monitor = None  # best.ckpt: the final weights
    if cfg.trainer.max_steps != -1:
        cfg.trainer.max_epochs = -1  # the budget is max_steps
    return (
        f"; init_schedule: lr {schedule.lr}, {schedule.warmup_steps} warm-up steps, cosine to "
        f"{schedule.floor} x lr, final weights kept"
    )
