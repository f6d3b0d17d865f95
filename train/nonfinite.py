"""The non-finite guard, kept on the device so that a training step never waits on the host.

A step whose loss or gradients are not finite must not be applied. Deciding that in Python
(`if loss.isfinite():`) reads a value back from the GPU once per step, which stalls it. The guard
instead computes a flag on the device, and the optimizer skips the step there (`found_inf`, as
`torch.amp.GradScaler` skips fp16 overflows). The host learns of it only when Lightning's logger
reads the step's values anyway: every `trainer.log_every_n_steps` steps and at each epoch's end.

- `nonfinite=skip`: every such step is skipped; `train/skipped_batches` counts them.
- `nonfinite=stop`: the step is skipped as well, and at the next read the job stops, naming the
  first bad step and its batch (statistics recorded on the device when it happened). Steps
  between the bad one and the read train as usual, so a stop is decided at most
  `log_every_n_steps` steps late and nothing saved holds a non-finite value.

An optimizer that cannot skip on the device (anything but `train.optim.SparseDenseAdam`) gets
the host decision instead: one read per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from train.host import reads_free

MODES = ("stop", "skip")
FACTS = (
    "rows",
    "weight_sum",
    "weight_min",
    "weight_max",
    "nonfinite_weights",
    "label_rate",
    "nonfinite_logits",
    "logits",
    "infinite_dense",
    "missing_dense",
    "dense",
)
"""What the error message says of the first bad batch, in this order."""
FLAGS = (
    "loss_bad",
    "skipped",
    "first_step",
    "first_kind",
    "first_facts",
    "first_grads",
)
"""The guard's tensors besides `found_inf` (which moves in place)."""


def not_finite(values: Tensor) -> Tensor:
    """Where a float tensor is NaN or ±inf: x·0 is 0 for every finite x and NaN otherwise. Two
    ops where `~torch.isfinite` dispatches five, which counts on a step's few small tensors."""
    return values.mul(0).ne(0)


class NonFiniteError(SystemExit):
    """A non-finite loss or gradient with `nonfinite=stop`: every rank decides alike (on the
    loss's all-reduced sums; gradients are already all-reduced), so all of them exit, like
    `sys.exit` (message, exit code 1, no traceback); the checkpoints saved so far are kept."""


class NonFiniteGuard:
    """The flags of one run. Per step: `loss(...)` in `training_step`, `gradients(...)` before the
    optimizer step (it returns whether to skip it), `check(...)` when the host may read."""

    def __init__(self, mode: str, parameter_names: Sequence[str]) -> None:
        if mode not in MODES:
            raise ValueError(f"nonfinite must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.names = list(parameter_names)
        self.device: torch.device | None = None
        self.loss_bad = torch.zeros((), dtype=torch.bool)
        self.found_inf = torch.zeros(())
        """1.0 when this step must not be applied; the optimizer holds this very tensor."""
        self.skipped = torch.zeros((), dtype=torch.int64)
        self.first_step = torch.full((), -1, dtype=torch.int64)
        self.first_kind = torch.zeros((), dtype=torch.int64)  # 1 the loss, 2 a gradient
        self.first_facts = torch.zeros(len(FACTS), dtype=torch.float64)
        self.first_grads = torch.zeros(len(self.names), dtype=torch.bool)

    def to(self, device: torch.device) -> None:
        """Moves the flags (in place, so an optimizer keeps holding `found_inf`)."""
        if self.device == device:
            return
        for name in FLAGS:
            setattr(self, name, getattr(self, name).to(device))
        self.found_inf.data = self.found_inf.data.to(device)
        self.device = device

    def loss(
        self,
        bad: Tensor,
        step: int,
        logits: Tensor,
        label: Tensor,
        weight: Tensor,
        dense: Tensor,
    ) -> None:
        """Records a bad loss (`bad`: a 0-d bool, alike on every rank) with its batch's facts."""
        self.to(bad.device)
        if reads_free(bad.device) and not bool(bad):
            return  # the facts are kept for a bad batch only: here that is known now
        self.loss_bad = self.loss_bad | bad  # any micro-batch of an accumulated step
        finite = torch.isfinite(weight)
        facts = torch.stack(
            [
                _constant(len(weight), bad.device),
                weight.sum().double(),
                torch.where(finite, weight, torch.inf).min().double(),
                torch.where(finite, weight, -torch.inf).max().double(),
                (~finite).sum().double(),
                label.float().mean().double(),
                (~torch.isfinite(logits)).sum().double(),
                _constant(logits.numel(), bad.device),
                torch.isinf(dense).sum().double(),
                torch.isnan(dense).sum().double(),
                _constant(dense.numel(), bad.device),
            ]
        )
        self._first(bad, step, 1, facts)

    def gradients(self, grads: Sequence[Tensor | None], step: int) -> Tensor:
        """Whether this step must be skipped (a 0-d bool): a bad loss or any non-finite gradient
        (`grads` in the order of `parameter_names`; sparse ones by their values)."""
        values = [g._values() if g is not None and g.is_sparse else g for g in grads]
        first = next((v for v in values if v is not None), None)
        if first is not None:
            self.to(first.device)
        # g's least and greatest values are finite exactly when all of g is (min and max
        # propagate NaN; -inf is the least, inf the greatest): one pass that writes nothing and,
        # unlike a norm or a sum, cannot overflow. Nothing to check: no gradient, or an empty one.
        present = [v is not None and v.numel() > 0 for v in values]
        zero = None if all(present) else self.found_inf.new_zeros(())
        ends = [
            torch.aminmax(v) if p else (zero, zero) for v, p in zip(values, present, strict=True)
        ]
        bad = not_finite(torch.stack([end for pair in ends for end in pair]).view(-1, 2))
        if reads_free(bad.device) and not self.loss_bad and not bad.any():
            self.found_inf.zero_()  # a good step, known now: nothing else to record
            return self.loss_bad
        bad_grads = bad.any(1)
        skip = self.loss_bad | bad_grads.any()
        fresh = skip & (self.first_step < 0)
        self.first_grads = torch.where(fresh & ~self.loss_bad, bad_grads, self.first_grads)
        self._first(skip, step, 2)
        self.found_inf.copy_(skip)
        self.skipped += skip
        self.loss_bad = torch.zeros_like(self.loss_bad)
        return skip

    def _first(self, bad: Tensor, step: int, kind: int, facts: Tensor | None = None) -> None:
        """Keeps the first bad step's number, kind (and the batch's facts, for a bad loss)."""
        fresh = bad & (self.first_step < 0)
        self.first_step = torch.where(fresh, step, self.first_step)
        self.first_kind = torch.where(fresh, kind, self.first_kind)
        if facts is not None:
            self.first_facts = torch.where(fresh, facts, self.first_facts)

    def check(self, rank: int | None = None) -> None:
        """With `nonfinite=stop`, raises `NonFiniteError` if a step was bad (one host read)."""
        if self.mode != "stop" or self.device is None:
            return
        step = int(self.first_step)
        if step < 0:
            return
        where = f" (rank {rank})" if rank is not None else ""
        if int(self.first_kind) == 1:
            facts = dict(zip(FACTS, self.first_facts.tolist(), strict=True))
            raise NonFiniteError(
                f"error: non-finite training loss at global step {step}{where}; batch: "
                f"{int(facts['rows'])} rows, weight sum {facts['weight_sum']:.6g} "
                f"min {_finite_or_nan(facts['weight_min']):.6g} "
                f"max {_finite_or_nan(facts['weight_max']):.6g} "
                f"({int(facts['nonfinite_weights'])} non-finite), "
                f"label rate {facts['label_rate']:.4g}, "
                f"non-finite logits {int(facts['nonfinite_logits'])}/{int(facts['logits'])}, "
                f"infinite dense {int(facts['infinite_dense'])}/{int(facts['dense'])} "
                f"(NaN = missing: {int(facts['missing_dense'])}). The step was not applied. "
                "Lower optimizer.lr, check the data's dense and behaviour columns, or set "
                "nonfinite=skip to skip such batches"
            )
        bad = [n for n, b in zip(self.names, self.first_grads.tolist(), strict=True) if b]
        raise NonFiniteError(
            f"error: non-finite gradient at global step {step}{where} in "
            f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. The step was not applied. "
            "Lower optimizer.lr or set trainer.gradient_clip_val, or set nonfinite=skip to skip "
            "such steps"
        )


def _constant(value: int, device: torch.device) -> Tensor:
    # A fill on the device, not a copy from the host (which would wait for the device).
    return torch.full((), float(value), dtype=torch.float64, device=device)


def _finite_or_nan(value: float) -> float:
    return value if abs(value) != float("inf") else float("nan")
