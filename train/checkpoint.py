"""Loading a trained checkpoint for scoring, from any fsspec URL, without running code from it.

`torch.load(weights_only=True)` unpickles only tensors and plain containers, so a crafted file
cannot execute anything while it loads. The network is then rebuilt from the checkpoint's own
description (`checkpoint["upweight"]`, written by `train.outputs.artifact`): the model config
names a class, which must be an `nn.Module` from a trusted package, never an arbitrary callable.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from fsspec.core import url_to_fs
from torch import nn

from train.calibration import OddsCorrection
from train.data.features import FeatureSpec
from train.errors import UpweightError
from train.layout import ARTIFACT_FORMAT, ARTIFACT_KEY, CALIBRATION_KEY, SHARDS_KEY
from train.model import network_config, network_logits
from train.preprocess import LEGACY_STATE_KEYS, DensePreprocess
from train.secrets import safe_url, scrub

TRUSTED_MODULES = ("train.",)
"""Model classes are imported from these packages only; `trusted_models` adds others."""


class CheckpointError(UpweightError):
    """A checkpoint that cannot be used; the message names the file and what was expected."""


def read(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint dict at `url`, loaded with `weights_only=True` onto the CPU."""
    try:
        return _read(url, storage_options)
    except CheckpointError as err:
        # Messages name the URL and storage errors: never with the credentials in them.
        raise CheckpointError(scrub(str(err), storage_options)) from err.__cause__


def _read(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    shown = safe_url(url)
    try:
        fs, path = url_to_fs(url, **dict(storage_options or {}))
        with fs.open(path, "rb") as handle:
            checkpoint = torch.load(handle, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"ckpt={shown}: no such file") from err
    except IsADirectoryError as err:
        raise CheckpointError(f"ckpt={shown}: is a folder; expected a .ckpt file") from err
    except PermissionError as err:
        raise CheckpointError(f"ckpt={shown}: access denied ({err})") from err
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CheckpointError(_corrupt(url, err)) from err
        raise CheckpointError(
            f"ckpt={shown}: refused to load: it holds Python objects that only unpickling (running "
            f"code from the file) could rebuild ({_unsupported(err)}); upweight checkpoints hold "
            "only tensors and plain values"
        ) from err
    except Exception as err:  # torch reports a damaged archive in many ways
        raise CheckpointError(_corrupt(url, err)) from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"ckpt={shown}: holds a {type(checkpoint).__name__}; expected a checkpoint dict "
            "written by `python -m train`"
        )
    return checkpoint


@dataclass
class Checkpoint:
    """What scoring needs from a checkpoint."""

    source: str
    spec: FeatureSpec
    scorer: Scorer
    artifact: dict[str, Any]
    """`checkpoint["upweight"]`: model config, feature spec, training stats, weight scheme."""


def contents(
    url: str, storage_options: Mapping[str, Any] | None = None, where: str | None = None
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(checkpoint, its description `checkpoint["upweight"]`, state_dict) of a checkpoint that
    `python -m train` wrote in a format this version reads. `where` names it in errors."""
    where = where or f"ckpt={safe_url(url)}"
    checkpoint = read(url, storage_options)
    artifact = checkpoint.get(ARTIFACT_KEY)
    if not isinstance(artifact, dict):
        raise CheckpointError(
            f"{where}: not an upweight checkpoint: no {ARTIFACT_KEY!r} entry (it has "
            f"{sorted(map(str, checkpoint))}); expected a checkpoint written by `python -m train`"
        )
    if artifact.get("format") != ARTIFACT_FORMAT:
        raise CheckpointError(
            f"{where}: upweight checkpoint format {artifact.get('format')!r}; this version reads "
            f"format {ARTIFACT_FORMAT} (written by `python -m train` of a matching version)"
        )
    if SHARDS_KEY in artifact:
        raise CheckpointError(
            f"{where}: a sharded run's checkpoint (sharding=torchrec): its tables are in the "
            "shards beside it; write an ordinary run with `python -m train.consolidate RUN OUT` "
            "and use OUT's checkpoints"
        )
    for key in ("model", "spec", "stats"):
        if not isinstance(artifact.get(key), dict):
            raise CheckpointError(f"{where}: upweight.{key} is missing or not a mapping")
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: no 'state_dict' entry; expected a Lightning checkpoint")
    return checkpoint, artifact, state


def feature_spec(artifact: Mapping[str, Any], where: str) -> FeatureSpec:
    """The data contract a checkpoint was trained with. Format 1 files written before the
    fill rule joined the spec keep it beside it (`upweight.dense_fill`)."""
    fields = dict(artifact["spec"])
    fields.setdefault("dense_fill", artifact.get("dense_fill", "mean"))
    try:
        return FeatureSpec.from_state(fields)
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{where}: upweight.spec is not a valid feature spec: {err}") from err


def load(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    trusted_models: Sequence[str] = (),
) -> Checkpoint:
    """Read `url` and rebuild its scorer (on the CPU, in eval mode)."""
    where = f"ckpt={safe_url(url)}"
    _, artifact, state = contents(url, storage_options, where)
    spec = feature_spec(artifact, where)
    network = build_network(artifact["model"], spec, where, trusted_models)
    load_weights(network, state, where)
    mean, std = dense_stats(state, artifact, len(spec.dense), where)
    correction = odds_correction(artifact, where)
    scorer = Scorer(network, spec, DensePreprocess(mean, std, spec.dense_fill), correction)
    return Checkpoint(source=url, spec=spec, scorer=scorer.eval(), artifact=artifact)


def odds_correction(artifact: Mapping[str, Any], where: str) -> OddsCorrection | None:
    """The label's odds correction saved with the checkpoint's weights (None: none was, e.g. a
    periodic checkpoint saved between validations)."""
    state = artifact.get(CALIBRATION_KEY)
    if state is None:
        return None
    try:
        return OddsCorrection.from_state(state)
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{where}: upweight.{CALIBRATION_KEY} is not valid: {err}") from err


def build_network(
    config: Mapping[str, Any],
    spec: FeatureSpec,
    where: str,
    trusted_models: Sequence[str] = (),
) -> nn.Module:
    """`instantiate(model_config)(cardinalities, num_dense, ...)`, as `python -m train` does,
    but only for an `nn.Module` class from a trusted package: the config comes from the file."""
    target = config.get("_target_")
    if not isinstance(target, str) or "." not in target:
        raise CheckpointError(f"{where}: upweight.model._target_ is {target!r}; expected a class")
    trusted = (*TRUSTED_MODULES, *trusted_models)
    if not any(
        target == t or target.startswith(t if t.endswith(".") else f"{t}.") for t in trusted
    ):
        raise CheckpointError(
            f"{where}: refused model class {target!r}: not in a trusted package {list(trusted)} "
            "(add its package to trusted_models= if you wrote it)"
        )
    module_name, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise CheckpointError(
            f"{where}: model class {target!r} cannot be imported ({err})"
        ) from err
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CheckpointError(f"{where}: refused model {target!r}: not an nn.Module class")
    kwargs = {k: v for k, v in network_config(config).items() if not k.startswith("_")}
    try:
        return cls(spec.cardinalities, len(spec.dense), **spec.network_options, **kwargs)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: cannot build {target} from upweight.model: {err}") from err


def load_weights(network: nn.Module, state: Mapping[str, Any], where: str) -> None:
    """Copy the checkpoint's `model.*` tensors into `network`, naming any mismatch."""
    weights = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    expected = network.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: the weights do not fit the network its config builds: "
            f"missing {['model.' + k for k in missing]}, unexpected "
            f"{['model.' + k for k in unexpected]}"
        )
    for key, tensor in weights.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(
                f"{where}: model.{key} is a {type(tensor).__name__}, not a tensor"
            )
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{where}: parameter model.{key} has shape {list(tensor.shape)} in the checkpoint "
                f"but {list(expected[key].shape)} in the network built from its config "
                "(a checkpoint of another model shape?)"
            )
    network.load_state_dict(weights)


def dense_stats(
    state: Mapping[str, Any], artifact: Mapping[str, Any], num_dense: int, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense mean and std the model was trained with (the state_dict's, else the stats')."""
    stats = artifact["stats"]
    found = []
    # The statistics' names are the old state keys: the state's tensors win, the stats back them.
    for name, key in LEGACY_STATE_KEYS.items():
        value = state.get(key, state.get(name))
        value = torch.as_tensor(stats.get(name) if value is None else value, dtype=torch.float32)
        if value.shape != (num_dense,):
            raise CheckpointError(
                f"{where}: {name} has shape {list(value.shape)}; expected [{num_dense}] "
                "(one per dense feature of the spec)"
            )
        found.append(value)
    if not bool((found[1] > 0).all()):
        raise CheckpointError(f"{where}: dense_std has values <= 0: {found[1].tolist()}")
    return found[0], found[1]


class Scorer(nn.Module):
    """(ids as table rows, raw dense[, list columns]) -> probabilities [rows, outputs]; what
    predict and export run.

    Dense inputs go through the same `DensePreprocess` as in training. A network returns one
    logit per row, or [rows, heads] logits for a multi-head model; then its `heads` attribute
    names the heads (`p_<head>` columns) and its optional `score(logits)` gives the ranking
    score (default: the first head's probability). With an odds `correction` the last column is
    `p_calibrated`, the label's probability with sample weighting's inflation divided out.
    """

    def __init__(
        self,
        network: nn.Module,
        spec: FeatureSpec,
        preprocess: DensePreprocess,
        correction: OddsCorrection | None = None,
    ) -> None:
        super().__init__()
        self.network = network
        self.preprocess = preprocess
        self.correction = correction
        self.list_width = spec.list_width
        """Columns of the `sequences` input (0: the network takes none)."""
        self.outputs = self._output_names(len(spec.categorical))
        # The label's logit column (multi-head: its head's), which the correction shifts.
        heads = list(getattr(network, "heads", None) or [])
        self.label_column = heads.index(correction.label) if correction and heads else 0
        if correction:
            self.outputs.append("p_calibrated")

    def logits(
        self, categorical: torch.Tensor, dense: torch.Tensor, sequences: torch.Tensor | None = None
    ) -> torch.Tensor:
        return network_logits(self.network, categorical, self.preprocess(dense), sequences)

    def forward(
        self, categorical: torch.Tensor, dense: torch.Tensor, sequences: torch.Tensor | None = None
    ) -> torch.Tensor:
        logits = self.logits(categorical, dense, sequences).float()
        if logits.dim() == 1:
            logits = logits.unsqueeze(1)
            columns = [torch.sigmoid(logits)]
        else:
            probs = torch.sigmoid(logits)
            score_fn = getattr(self.network, "score", None)
            score = score_fn(logits) if callable(score_fn) else probs[:, 0]
            columns = [score.unsqueeze(1), probs]
        if self.correction:
            label = logits[:, self.label_column : self.label_column + 1]
            columns.append(self.correction.apply_to_logits(label))
        return torch.cat(columns, dim=1)

    def _output_names(self, num_categorical: int) -> list[str]:
        # One probe batch (bucket 0 exists in every feature) tells one logit from several.
        was_training = self.network.training
        self.network.eval()
        with torch.no_grad():
            out = self.logits(
                torch.zeros(2, num_categorical, dtype=torch.long),
                torch.zeros(2, len(self.preprocess.mean)),
                torch.zeros(2, self.list_width, dtype=torch.long) if self.list_width else None,
            )
        self.network.train(was_training)
        if out.dim() == 1:
            return ["score"]
        heads = list(getattr(self.network, "heads", None) or range(out.shape[1]))
        return ["score", *(f"p_{h}" for h in heads)]


def _corrupt(url: str, err: BaseException) -> str:
    return (
        f"ckpt={safe_url(url)}: not a complete torch checkpoint (truncated, or not written by "
        f"torch.save): {type(err).__name__}: {_first_line(err)}"
    )


def _unsupported(err: BaseException) -> str:
    for line in str(err).splitlines():
        if "unsupported" in line.lower():
            return line.strip()
    return "an object outside torch's weights_only allowlist"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
