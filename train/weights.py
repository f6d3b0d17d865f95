"""Weight schemes: the behaviours of a batch -> one loss weight per impression.

A scheme reads like the duplication table it stands for: a positive (an impression whose
`label` behaviour is > 0) counts as the sum (or max) of its terms — click 1, finish 3, long
watch 5 — and a negative counts `negative_weight`. Weights are computed per batch from the raw
behaviour columns, so trying another scheme never rewrites data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from train.errors import UpweightError

Transform = Literal["indicator", "threshold", "linear", "log1p"]
TRANSFORMS: tuple[str, ...] = ("indicator", "threshold", "linear", "log1p")


class SchemeError(UpweightError):
    """A weight scheme that cannot be used with this data; raised before anything is written."""


@dataclass(frozen=True)
class Term:
    """One behaviour's contribution to a positive's weight: `coef * transform(value)`."""

    behaviour: str
    coef: float = 1.0
    transform: Transform = "indicator"
    threshold: float | None = None
    """For `threshold`: the value counts when value >= threshold (e.g. 30 seconds watched)."""
    cap: float | None = None
    """Upper bound applied to the transformed value, so one 3-hour session cannot dominate."""

    def __post_init__(self) -> None:
        where = f"weight term for behaviour {self.behaviour!r}"
        if self.transform not in TRANSFORMS:
            raise SchemeError(f"{where}: transform {self.transform!r} is not one of {TRANSFORMS}")
        if not _finite(self.coef) or self.coef < 0:
            raise SchemeError(
                f"{where}: coef must be a finite number >= 0, got {self.coef!r} "
                "(a negative or non-finite coefficient gives negative or NaN weights)"
            )
        if self.transform == "threshold" and (
            self.threshold is None or not _finite(self.threshold)
        ):
            raise SchemeError(f"{where}: transform 'threshold' needs a finite `threshold` value")
        if self.transform != "threshold" and self.threshold is not None:
            raise SchemeError(
                f"{where}: `threshold` is only used by transform 'threshold', "
                f"not {self.transform!r}"
            )
        if self.cap is not None and (not _finite(self.cap) or self.cap < 0):
            raise SchemeError(f"{where}: cap must be a finite number >= 0, got {self.cap!r}")

    def describe(self) -> str:
        if self.transform == "threshold":
            body = f"[{self.behaviour} >= {self.threshold:g}]"
        elif self.transform == "indicator":
            body = f"[{self.behaviour} > 0]"
        elif self.transform == "linear":
            body = self.behaviour
        else:
            body = f"log1p({self.behaviour})"
        if self.cap is not None:
            body = f"min({body}, {self.cap:g})"
        return f"{self.coef:g}*{body}"

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        if self.transform == "indicator":
            out = (value > 0).to(value.dtype)
        elif self.transform == "threshold":
            out = (value >= self.threshold).to(value.dtype)
        elif self.transform == "linear":
            out = value
        else:
            out = torch.log1p(value)
        if self.cap is not None:
            out = out.clamp(max=self.cap)
        return self.coef * out


@dataclass(frozen=True)
class WeightScheme:
    """Loss weight per impression from its behaviours."""

    label: str = "click"
    """The behaviour that defines a positive (value > 0)."""
    terms: tuple[Term, ...] = ()
    """Contributions to a positive's weight; no terms means every positive weighs 1."""
    combine: Literal["sum", "max"] = "sum"
    """`sum`: the duplication reading (click+finish+long watch = 1+3+5); `max`: the strongest."""
    negative_weight: float = 1.0
    normalize: Literal["none", "mean"] = "none"
    """`mean`: divide by the mean training weight so weights average 1 (see README)."""
    name: str = "custom"
    knobs: Mapping[str, float] = field(default_factory=dict)
    """Named coefficients a YAML exposes for sweeps (`weights.finish=1,3,5`); already
    interpolated into `terms`, kept only to label runs."""

    def __post_init__(self) -> None:
        if self.combine not in ("sum", "max"):
            raise SchemeError(f"weights.combine must be 'sum' or 'max', got {self.combine!r}")
        if self.normalize not in ("none", "mean"):
            raise SchemeError(f"weights.normalize must be 'none' or 'mean', got {self.normalize!r}")
        if not _finite(self.negative_weight) or self.negative_weight < 0:
            raise SchemeError(
                f"weights.negative_weight must be a finite number >= 0, got {self.negative_weight!r}"
            )

    @property
    def behaviours(self) -> tuple[str, ...]:
        """Every behaviour the scheme reads, label first."""
        names = [self.label] + [t.behaviour for t in self.terms]
        return tuple(dict.fromkeys(names))

    def describe(self) -> str:
        positive = " + " if self.combine == "sum" else ", "
        body = positive.join(t.describe() for t in self.terms) or "1"
        if self.combine == "max" and self.terms:
            body = f"max({body})"
        return f"{self.name}: {self.label}>0 -> {body}; else {self.negative_weight:g}"

    def check_behaviours(self, available: Sequence[str]) -> None:
        """Fail fast, naming the term, when the scheme reads a behaviour the data lacks."""
        known = set(available)
        if self.label not in known:
            raise SchemeError(
                f"weights.label {self.label!r} is not a behaviour of the data; "
                f"data.behaviours has {sorted(known)}"
            )
        for i, term in enumerate(self.terms):
            if term.behaviour not in known:
                raise SchemeError(
                    f"weights.terms[{i}] ({term.describe()}) reads behaviour {term.behaviour!r}, "
                    f"which the data does not have; data.behaviours has {sorted(known)}"
                )

    def weights(self, behaviours: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """Weight per row of a [rows, behaviours] matrix whose columns are `names`.

        Unnormalised: `normalize: mean` is applied by the caller with the training mean, which
        a single batch cannot know.
        """
        column = {name: i for i, name in enumerate(names)}
        positive = behaviours[:, column[self.label]] > 0
        if not self.terms:
            pos_weight = torch.ones_like(behaviours[:, 0])
        else:
            parts = [t(behaviours[:, column[t.behaviour]]) for t in self.terms]
            stacked = torch.stack(parts, dim=1)
            pos_weight = stacked.sum(1) if self.combine == "sum" else stacked.amax(1)
        return torch.where(positive, pos_weight, self.negative_weight)

    def check_values(self, behaviours: torch.Tensor, names: Sequence[str], where: str) -> None:
        """Fail, naming the term and behaviour, if the data makes any weight negative or
        non-finite (e.g. `linear` on a column holding inf)."""
        column = {name: i for i, name in enumerate(names)}
        positive = behaviours[:, column[self.label]] > 0
        for i, term in enumerate(self.terms):
            part = term(behaviours[:, column[term.behaviour]])[positive]
            bad = ~torch.isfinite(part) | (part < 0)
            if bad.any():
                example = behaviours[:, column[term.behaviour]][positive][bad][0].item()
                raise SchemeError(
                    f"weights.terms[{i}] ({term.describe()}) gives {int(bad.sum())} negative or "
                    f"non-finite weights on {where}, behaviour {term.behaviour!r} "
                    f"(e.g. value {example!r}); weights must be finite and >= 0"
                )


def build_scheme(
    label: str = "click",
    terms: Sequence[Mapping[str, Any] | Term] = (),
    combine: str = "sum",
    negative_weight: float = 1.0,
    normalize: str = "none",
    name: str = "custom",
    **knobs: float,
) -> WeightScheme:
    """Hydra seam for `conf/weights/*.yaml`.

    Extra top-level keys are the scheme's named coefficients (`finish: 3`), referenced by the
    terms as `${weights.finish}`, so that a sweep reads `weights.finish=1,3,5,10`.
    """
    for key, value in knobs.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SchemeError(
                f"weights.{key} is not a term field and not a number ({value!r}); "
                "top-level scheme keys other than label/terms/combine/negative_weight/normalize/"
                "name must be numeric coefficients referenced by the terms"
            )
    if not isinstance(label, str) or not label:
        raise SchemeError(f"weights.label={label!r}: expected a behaviour name (a string)")
    if not isinstance(name, str):
        raise SchemeError(f"weights.name={name!r}: expected a string")
    if not _finite(negative_weight) or negative_weight < 0:
        raise SchemeError(
            f"weights.negative_weight must be a finite number >= 0, got {negative_weight!r}"
        )
    if isinstance(terms, str | bytes | Mapping) or not isinstance(terms, Sequence):
        raise SchemeError(
            f"weights.terms={terms!r}: expected a list of terms, e.g. "
            "[{behaviour: like, coef: 4}]"
        )
    parsed = []
    for i, term in enumerate(terms):
        if isinstance(term, Term):
            parsed.append(term)
            continue
        if not isinstance(term, Mapping):
            raise SchemeError(
                f"weights.terms[{i}]={term!r}: expected a mapping with keys behaviour "
                "(required), coef, transform, threshold, cap"
            )
        unknown = set(term) - {"behaviour", "coef", "transform", "threshold", "cap"}
        if unknown or "behaviour" not in term:
            raise SchemeError(
                f"weights.terms[{i}] = {dict(term)!r}: expected keys behaviour (required), coef, "
                f"transform, threshold, cap; unknown {sorted(unknown)}"
            )
        parsed.append(Term(**{k: _plain(v) for k, v in term.items()}))
    return WeightScheme(
        label=label,
        terms=tuple(parsed),
        combine=combine,  # type: ignore[arg-type]
        negative_weight=float(negative_weight),
        normalize=normalize,  # type: ignore[arg-type]
        name=name,
        knobs={k: float(v) for k, v in knobs.items()},
    )


def _plain(value: Any) -> Any:
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_head_weights(config: Any, heads: Sequence[str]) -> None:
    """`model.head_weights`: null or {head: scheme}, every key a head of the model and every
    scheme a name (of `conf/weights/`) or a mapping in the same grammar."""
    if config is None:
        return
    if not isinstance(config, Mapping):
        raise SchemeError(
            f"model.head_weights={config!r}: expected a mapping head -> weight scheme, "
            "e.g. {click: seed}"
        )
    for head, scheme in config.items():
        if head not in heads:
            raise SchemeError(f"model.head_weights.{head}: not a head of this model {list(heads)}")
        if not isinstance(scheme, str | Mapping):
            raise SchemeError(
                f"model.head_weights.{head}={scheme!r}: expected the name of a weight scheme "
                "(conf/weights/<name>.yaml) or a scheme mapping {label: ..., terms: [...]}"
            )


def head_schemes(config: Mapping[str, Any] | None) -> dict[str, WeightScheme]:
    """`model.head_weights` -> {head: scheme}. A name is composed as `weights=<name>` would be
    (the package's `conf/weights/` and any `--config-dir`), a mapping built as that YAML is."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate  # the seam of per-head schemes

    schemes = {}
    for head, scheme in (config or {}).items():
        where = f"model.head_weights.{head}"
        config = _compose_weights(scheme, where) if isinstance(scheme, str) else scheme
        try:
            if isinstance(scheme, str):
                schemes[head] = instantiate(config)
            else:
                schemes[head] = build_scheme(**{k: v for k, v in config.items() if k != "_target_"})
        except (SchemeError, TypeError, InstantiationException) as err:
            cause = err.__cause__ if isinstance(err, InstantiationException) else err
            raise SchemeError(f"{where}: {cause or err}") from err
    return schemes


def gain_scheme(name: str | None) -> WeightScheme | None:
    """`metrics.ndcg_gain` -> the scheme whose weights are NDCG's gains, composed as
    `weights=<name>` would be; None keeps the default gain (the label > 0)."""
    if name is None:
        return None
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate  # the seam of the gain scheme

    where = "metrics.ndcg_gain"
    config = _compose_weights(name, where)
    try:
        return instantiate(config)
    except (SchemeError, TypeError, InstantiationException) as err:
        cause = err.__cause__ if isinstance(err, InstantiationException) else err
        raise SchemeError(f"{where}={name!r}: {cause or err}") from err


def _compose_weights(name: str, where: str) -> Any:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    overrides = [f"weights={name}"]
    try:
        if GlobalHydra.instance().is_initialized():  # inside `python -m train`
            return compose(config_name="train", overrides=overrides).weights
        with initialize_config_dir(str(Path(__file__).parent / "conf"), version_base="1.3"):
            return compose(config_name="train", overrides=overrides).weights
    except MissingConfigException as err:
        raise SchemeError(
            f"{where}={name!r}: no weight scheme of that name (expected a file "
            f"conf/weights/{name}.yaml, as `weights={name}` would read)"
        ) from err
