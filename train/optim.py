"""Adam for recommendation models: lazy (sparse) Adam on embedding tables, AdamW elsewhere.

Embedding tables are ~97% of a CTR model's parameters, but a batch touches a few thousand of
their rows. Dense Adam updates every row every step; `SparseAdam` updates only the touched rows
(TensorFlow's LazyAdam, the usual choice in recsys), which is what makes the step cost
independent of the bucket counts. torch.optim.SparseAdam has LazyAdam's semantics but, on CPU,
adds its sparse updates into the dense state by rewriting whole tables (three full-table passes
a step); the sparse step here gathers, updates and scatters the touched rows only, with the same
arithmetic and the same state (`step`, `exp_avg`, `exp_avg_sq`), so checkpoints are alike.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from train.errors import ConfigError
from train.host import reads_free


class SparseDenseAdam(torch.optim.Optimizer):
    """One optimizer (as Lightning and LR schedulers expect) over three parameter groups:
    weights that decay (AdamW), biases/norms/dense embeddings that don't, and parameters with
    sparse gradients (SparseAdam). Schedulers scale the `lr` of every group alike.

    No step reads a value back to the host where that stalls (a GPU; see `train.host`): the
    dense groups take the fused AdamW kernel, the sparse rows are summed with fixed-size ops
    (`row_gradients`), and the step counts and bias corrections stay on the device. `found_inf`
    (a 0-d float tensor, as `torch.amp.GradScaler` sets it on torch's optimizers) skips a step
    on the device when it holds 1: no parameter, moment or step count moves (`RankingModule`'s
    non-finite guard). On the CPU, where reads are free, the rows are made distinct, a skipped
    step is skipped outright and the bias corrections are Python numbers."""

    skips_on_device = True
    """`found_inf` is honoured without a host read (the module's guard looks for this)."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-5,
        embedding_lr: float | None = None,
    ) -> None:
        sparse, decay, no_decay = [], [], []
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if not param.requires_grad:
                    continue
                if isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.sparse:
                    sparse.append(param)
                elif isinstance(module, nn.Linear) and name == "weight":
                    decay.append(param)
                else:
                    no_decay.append(param)
        betas = (float(betas[0]), float(betas[1]))
        groups = [
            {"params": decay, "weight_decay": weight_decay, "kind": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "kind": "no_decay"},
            {
                "params": sparse,
                "kind": "sparse",
                "lr": lr if embedding_lr is None else embedding_lr,
            },
        ]
        groups = [g for g in groups if g["params"]]
        dense_groups = [g for g in groups if g["kind"] != "sparse"]
        sparse_groups = [g for g in groups if g["kind"] == "sparse"]
        # The inner optimizers fill in their defaults on these very dicts; the outer one then
        # holds the same dicts, so an LR scheduler acting on it acts on them.
        for group in sparse_groups:
            group.setdefault("betas", betas)
            group.setdefault("eps", eps)
        # Fused: one kernel for every dense parameter (CPU and CUDA), and the only AdamW that
        # takes `found_inf` (the others raise on it).
        self._dense = (
            torch.optim.AdamW(dense_groups, lr=lr, betas=betas, eps=eps, fused=True)
            if dense_groups
            else None
        )
        super().__init__(groups, defaults={"lr": lr})
        self.found_inf: torch.Tensor | None = None
        self._share_state()

    def _share_state(self) -> None:
        if self._dense is not None:
            self._dense.param_groups = [g for g in self.param_groups if g["kind"] != "sparse"]
            self._dense.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share_state()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = self.found_inf
        if found_inf is not None and reads_free(found_inf.device):
            if bool(found_inf):
                return loss  # a skipped step moves nothing
            found_inf = None  # a good step: no masking on the device
        if self._dense is not None:
            self._dense.found_inf = found_inf  # read by AdamW.step, as GradScaler sets it
            self._dense.step()
        for group in self.param_groups:
            if group["kind"] == "sparse":
                self._lazy_adam(group, found_inf)
        return loss

    def _lazy_adam(self, group: dict, found_inf: torch.Tensor | None) -> None:
        """Adam on the rows present in each sparse gradient (SparseAdam's update, row-wise).

        The rows come as `row_gradients` gives them: every occurrence of a row carries that
        row's summed gradient, so each occurrence computes the same new values and the
        `index_copy_`s write identical values wherever a row repeats."""
        beta1, beta2 = group["betas"]
        lr, eps = float(group["lr"]), group["eps"]
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.sparse_dim() != 1:
                raise ValueError("sparse gradients must be row-sparse (nn.Embedding's)")
            host = reads_free(param.device)
            rows, values = row_gradients(param.grad)
            if values.numel() == 0:  # a size known on the host: no read
                continue
            state = self.state[param]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                state["exp_avg"] = torch.zeros_like(param)
                state["exp_avg_sq"] = torch.zeros_like(param)
            elif not torch.is_tensor(state["step"]):  # checkpoints before the step moved
                state["step"] = torch.tensor(float(state["step"]), device=param.device)
            keep = 1.0
            if found_inf is not None:
                # A skipped step moves nothing: its gradient is zeroed (it may be NaN, and
                # 0 * NaN is NaN) and every change below is scaled by 0.
                keep = 1.0 - found_inf
                values = values.masked_fill(found_inf.bool(), 0.0)
            step = state["step"].add_(keep)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            # old + (1 - b) * (new - old), as SparseAdam computes it, in one op: lerp's own
            # formula for weights below 1/2 (the usual b > 1/2; otherwise equal up to rounding).
            m = exp_avg.index_select(0, rows).lerp_(values, (1 - beta1) * keep)
            v = exp_avg_sq.index_select(0, rows).lerp_(values.square(), (1 - beta2) * keep)
            exp_avg.index_copy_(0, rows, m)
            exp_avg_sq.index_copy_(0, rows, v)
            denominator = v.sqrt_().add_(eps)
            old = param.index_select(0, rows)
            # The bias corrections in float64, as SparseAdam computes them in Python (1 - 0.999 in
            # float32 is off by 6e-5); on the device clamped: a skipped first step has step 0 (its
            # factor is multiplied by 0).
            if host:
                t = float(step)
                step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                new = old.addcdiv_(m, denominator, value=-step_size)
            else:
                t = step.double()
                bias2 = (1 - torch.pow(beta2, t)).clamp_min(1e-300).sqrt()
                step_size = (lr * keep) * bias2 / (1 - torch.pow(beta1, t)).clamp_min(1e-300)
                new = old.sub_(m.div_(denominator).mul_(step_size))
            param.index_copy_(0, rows, new)


def row_gradients(
    grad: torch.Tensor, distinct: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, values) of a row-sparse gradient, each row's values summed over its duplicates.

    A coalesced gradient (DDP's reduction makes one) has each row once. An uncoalesced one
    (the embedding's own backward: one entry per looked-up id) keeps its length: entries are
    sorted by row and each carries the sum of its row's entries. `coalesce()` would give each
    row once, but its length is the number of distinct rows, which a GPU has to read back
    before the next op; this costs a few more rows per step and no read. `distinct` (default:
    where a read stalls nothing, `train.host`) gives each row once instead."""
    if grad.is_coalesced():
        return grad.indices()[0], grad.values()
    if distinct is None:
        distinct = reads_free(grad.device)
    ids = grad._indices()[0]
    if distinct:
        # A behaviour sequence brings batch x length entries, mostly repeats of popular rows,
        # and every repeat would otherwise go through the whole Adam update: 4x the rows of a
        # 30-long history's distinct ones on the simulator (bench/sequences.py).
        # Sorted stably, each row's entries form one bag, which embedding_bag sums in their
        # original order, as index_add_ would (the same float sums, tests/test_optim.py), faster
        # on the CPU, where index_add_ of rows goes element by element through scatter_add_;
        # 32-bit ids sort faster than 64-bit ones.
        narrow = ids.to(torch.int32) if len(grad) <= torch.iinfo(torch.int32).max else ids
        rows, order = narrow.sort(stable=True)
        rows, counts = torch.unique_consecutive(rows, return_counts=True)
        values = grad._values()
        flat = values.reshape(len(values), -1)
        sums = F.embedding_bag(order, flat, counts.cumsum(0).sub_(counts), mode="sum")
        return rows.to(ids.dtype), sums.view(len(rows), *values.shape[1:])
    rows, order = ids.sort()
    values = grad._values().index_select(0, order)
    starts = torch.ones_like(rows, dtype=torch.bool)
    torch.ne(rows[1:], rows[:-1], out=starts[1:])
    segment = starts.cumsum(0).sub_(1)
    sums = torch.zeros_like(values).index_add_(0, segment, values)
    return rows, sums.index_select(0, segment)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 100, floor: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to `floor` x the base LR over the run."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adam(
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    embedding_lr: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Callable[[nn.Module], SparseDenseAdam]:
    """`optimizer=adam`: the values checked now (before anything is written), the optimizer
    built when the module asks for it."""
    _check("optimizer.lr", lr, positive=True)
    _check("optimizer.weight_decay", weight_decay)
    if embedding_lr is not None:
        _check("optimizer.embedding_lr", embedding_lr)
    if (
        isinstance(betas, str)
        or not isinstance(betas, Sequence)
        or len(betas) != 2
        or not all(_finite(b) and 0 <= b < 1 for b in betas)
    ):
        shown = list(betas) if isinstance(betas, Sequence) and not isinstance(betas, str) else betas
        raise ConfigError(f"optimizer.betas={shown!r}: expected two numbers in [0, 1)")
    _check("optimizer.eps", eps, positive=True)
    betas = (float(betas[0]), float(betas[1]))
    return functools.partial(
        SparseDenseAdam,
        lr=lr,
        weight_decay=weight_decay,
        embedding_lr=embedding_lr,
        betas=betas,
        eps=eps,
    )


def cosine(
    warmup_steps: int = 100, floor: float = 0.1
) -> Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LambdaLR]:
    """`scheduler=cosine`, checked now, built once the run's step count is known."""
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ConfigError(f"scheduler.warmup_steps={warmup_steps!r}: expected an integer >= 0")
    if not (_finite(floor) and 0 <= floor <= 1):
        raise ConfigError(f"scheduler.floor={floor!r}: expected a number in [0, 1]")
    return functools.partial(warmup_cosine, warmup_steps=warmup_steps, floor=floor)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check(key: str, value: object, positive: bool = False) -> None:
    if not _finite(value) or value < 0 or (positive and value == 0):  # type: ignore[operator]
        expected = "a finite number > 0" if positive else "a finite number >= 0"
        raise ConfigError(f"{key}={value!r}: expected {expected}")
