"""Loss balancing between the heads of a multi-task model (`model.balance`): how the heads'
losses L_h (each the global weighted mean of `train.objective`) add up to the one loss the
optimizer steps on.

- `fixed` (the default, every head 1): Σ_h c_h·L_h with `weights: {head: c}`;
- `uncertainty` (Kendall et al. 2018): Σ_h exp(−s_h)·L_h + s_h/2 with a learned s_h = log σ_h²
  per head; a noisier head (larger irreducible loss) learns a smaller weight exp(−s_h);
- `gradnorm` (Chen et al. 2018): learned weights w_h (Σ w_h = heads) moved so that each head's
  gradient norm at the shared representation, w_h·‖∇L_h‖, tracks the mean norm times its
  relative inverse training rate (L_h / L_h(0) over the heads' mean, to the power `alpha`):
  heads that learn slower get more weight. The norms are measured at the shared representation
  rather than at the last shared layer's weights (the cheaper variant): a backward through the
  towers only, and with DDP one all-reduce of one number per head, since each rank's rows give
  their own part of the gradient.

Every method keeps the global weighted mean of each head under DDP: the module passes each
rank's part of L_h scaled by the world size (DDP averages gradients over ranks), and the balance
terms of a learned weight depend on global values only, so every rank computes the same ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from train.errors import ConfigError

METHODS = ("fixed", "uncertainty", "gradnorm")


class Balance(nn.Module):
    """The base: Σ_h effective()_h·L_h. `needs_shared`: `combine` wants the shared
    representation."""

    needs_shared = False

    def __init__(self, heads: Sequence[str]) -> None:
        super().__init__()
        self.heads = list(heads)

    def combine(
        self,
        losses: Tensor,
        global_losses: Tensor,
        shared: Tensor | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
        world: int = 1,
    ) -> Tensor:
        """The loss to step on from this rank's part of every head's loss (× world, as
        `RankingModule.training_step` has it), the heads' global losses (detached), and for
        `needs_shared` the shared representation and a sum over ranks."""
        return (self.effective() * losses).sum()

    def effective(self) -> Tensor:
        """Each head's weight in the loss now [heads] (logged per step)."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after every optimizer step (`gradnorm` renormalises its weights)."""


class Fixed(Balance):
    """Σ_h c_h·L_h with constant `weights` (heads left out weigh 1)."""

    def __init__(self, heads: Sequence[str], weights: Mapping[str, float] | None = None) -> None:
        super().__init__(heads)
        values = [float((weights or {}).get(h, 1.0)) for h in self.heads]
        self.register_buffer("weights", torch.tensor(values), persistent=False)

    def effective(self) -> Tensor:
        return self.weights


class Uncertainty(Balance):
    """Kendall et al.'s homoscedastic uncertainty: Σ_h exp(−s_h)·L_h + s_h/2."""

    def __init__(self, heads: Sequence[str]) -> None:
        super().__init__(heads)
        self.log_variance = nn.Parameter(torch.zeros(len(self.heads)))

    def combine(
        self,
        losses: Tensor,
        global_losses: Tensor,
        shared: Tensor | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
        world: int = 1,
    ) -> Tensor:
        # Every rank adds the whole regulariser: DDP averages its gradient back to one copy.
        return super().combine(losses, global_losses) + 0.5 * self.log_variance.sum()

    def effective(self) -> Tensor:
        return torch.exp(-self.log_variance)


class GradNorm(Balance):
    """Chen et al.'s GradNorm on the shared representation (see the module's docstring)."""

    needs_shared = True

    def __init__(self, heads: Sequence[str], alpha: float = 1.5) -> None:
        super().__init__(heads)
        self.alpha = alpha
        self.weights = nn.Parameter(torch.ones(len(self.heads)))
        # L_h(0): the global losses of the first step (set on the device, no host read).
        self.register_buffer("initial", torch.zeros(len(self.heads)))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def combine(
        self,
        losses: Tensor,
        global_losses: Tensor,
        shared: Tensor | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
        world: int = 1,
    ) -> Tensor:
        assert shared is not None and reduce is not None
        # This rank's rows' part of ∇_shared L_h (losses carry × world); the global norm² is
        # the sum over ranks of the parts' norms² (each row belongs to one rank).
        # One vectorised backward for every head (is_grads_batched), not one pass per head.
        eye = torch.eye(len(losses), device=losses.device, dtype=losses.dtype)
        grads = torch.autograd.grad(
            losses, shared, grad_outputs=eye, is_grads_batched=True, retain_graph=True
        )[0]
        squares = (grads.float() / world).square().flatten(1).sum(1)
        norms = reduce(squares).sqrt()
        with torch.no_grad():
            self.initial.copy_(torch.where(self.started, self.initial, global_losses))
            self.started.fill_(True)
        rate = global_losses / self.initial.clamp_min(torch.finfo(torch.float32).tiny)
        target = (self.weights * norms).mean() * (rate / rate.mean()) ** self.alpha
        # The model learns from the weighted losses; the weights only from the norms' gap.
        gap = (self.weights * norms - target.detach()).abs().sum()
        return (self.weights.detach() * losses).sum() + gap

    def effective(self) -> Tensor:
        return self.weights.detach()

    @torch.no_grad()
    def after_step(self) -> None:
        # Σ w_h = heads keeps the loss's scale (and the learning rate's meaning) fixed.
        self.weights.clamp_(min=1e-3)
        self.weights.mul_(len(self.heads) / self.weights.sum())


def check_balance(config: Any, heads: Sequence[str]) -> None:
    """`model.balance`: null, a method name, or {method: ..., weights: {head: c}} for fixed,
    {method: gradnorm, alpha: a}; every key and head named in the error."""
    balance_for(config, heads)


def balance_for(config: str | Mapping[str, Any] | None, heads: Sequence[str]) -> Balance:
    """The `Balance` of `model.balance` for these heads."""
    if config is None:
        return Fixed(heads)
    options = {"method": config} if isinstance(config, str) else config
    if not isinstance(options, Mapping):
        raise ConfigError(
            f"model.balance={config!r}: expected one of {list(METHODS)} or a mapping such as "
            "{method: fixed, weights: {click: 1, finish: 0.5}}"
        )
    options = dict(options)
    method = options.pop("method", "fixed")
    if method not in METHODS:
        raise ConfigError(f"model.balance.method={method!r}: expected one of {list(METHODS)}")
    allowed = {"fixed": {"weights"}, "uncertainty": set(), "gradnorm": {"alpha"}}[method]
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(
            f"model.balance.{unknown[0]}: not an option of method {method!r} "
            f"(its options: {sorted(allowed) or 'none'})"
        )
    if method == "uncertainty":
        return Uncertainty(heads)
    if method == "gradnorm":
        alpha = options.get("alpha", 1.5)
        if not _number(alpha) or alpha < 0:
            raise ConfigError(f"model.balance.alpha={alpha!r}: expected a number >= 0")
        return GradNorm(heads, float(alpha))
    weights = options.get("weights") or {}
    if not isinstance(weights, Mapping):
        raise ConfigError(
            f"model.balance.weights={weights!r}: expected a mapping head -> loss weight"
        )
    for head, value in weights.items():
        if head not in heads:
            raise ConfigError(
                f"model.balance.weights.{head}: not a head of this model {list(heads)}"
            )
        if not _number(value) or value < 0:
            raise ConfigError(
                f"model.balance.weights.{head}={value!r}: expected a finite number >= 0"
            )
    return Fixed(heads, weights)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
