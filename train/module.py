"""The LightningModule: standardise dense inputs, score, weighted BCE, per-behaviour metrics."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from train import fusion
from train.data.batch import Batch
from train.metrics import BehaviourMetrics
from train.weights import WeightScheme

# Epoch metrics are computed over every rank's rows by BehaviourMetrics itself; Lightning's
# advice to sync_dist them would average values that are already global.
warnings.filterwarnings("ignore", message=r".*self\.log\('(val|test)/.*sync_dist=True")

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], Any]
NONFINITE = ("stop", "skip")


class NonFiniteError(SystemExit):
    """A non-finite loss or gradient with `nonfinite=stop`: every rank decides alike (the flag
    rides the loss all-reduce; gradients are already all-reduced), so all of them exit, like
    `sys.exit` (message, exit code 1, no traceback); the checkpoints saved so far are kept."""


def weighted_bce(
    logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor, weight_total: torch.Tensor
) -> torch.Tensor:
    """Σ wᵢℓᵢ / W: with W the weight sum of the global batch this is the loss of the same batch
    with every row repeated wᵢ times (the duplication reading of sample weighting)."""
    losses = F.binary_cross_entropy_with_logits(logits.float(), label, reduction="none")
    return (weight * losses).sum() / weight_total.clamp_min(torch.finfo(torch.float32).tiny)


class RankingModule(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        scheme: WeightScheme,
        behaviours: Sequence[str],
        continuous: Sequence[str],
        dense_mean: Sequence[float],
        dense_std: Sequence[float],
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        weight_scale: float = 1.0,
        oracle: Sequence[str] = (),
        dense_fill: str = "mean",
        xauc_pairs: int = 1_000_000,
        seed: int = 0,
        artifact: Mapping[str, Any] | None = None,
        positive_mean: Mapping[str, float] | None = None,
        predictions: str | None = None,
        nonfinite: str = "stop",
    ) -> None:
        super().__init__()
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.skipped_batches = 0
        if dense_fill not in ("mean", "zero"):
            raise ValueError(f"data.dense_fill must be 'mean' or 'zero', got {dense_fill!r}")
        self.model = model
        self.scheme = scheme
        self.behaviours = list(behaviours)
        self.label_column = self.behaviours.index(scheme.label)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.weight_scale = weight_scale
        self.dense_fill = dense_fill
        self.register_buffer("dense_mean", torch.tensor(list(dense_mean), dtype=torch.float32))
        self.register_buffer("dense_std", torch.tensor(list(dense_std), dtype=torch.float32))
        self.artifact = dict(artifact or {})

        def metrics() -> BehaviourMetrics:
            return BehaviourMetrics(
                self.behaviours, continuous, scheme.label, oracle, xauc_pairs, seed
            )

        self.val_metrics = metrics()
        self.test_metrics = metrics()
        self.test_results: dict[str, float] = {}
        # A multi-head model (`model.heads`): every head on its own loss, the fused score for the
        # metrics; `predictions` (a URL) receives every head's test probabilities.
        self.heads: list[str] = list(getattr(model, "heads", None) or [])
        self.predictions = predictions
        if self.heads:
            unknown = [h for h in self.heads if h not in self.behaviours]
            if unknown or scheme.label not in self.heads:
                raise ValueError(
                    f"model.heads {self.heads}: every head must be a behaviour of the data "
                    f"{self.behaviours} and the label {scheme.label!r} must have one"
                )
            if scheme.terms or scheme.negative_weight != 1:
                warnings.warn(
                    f"model=multihead trains every head unweighted; weights={scheme.name} only "
                    f"picks the label ({scheme.label}), its weights are not used",
                    stacklevel=2,
                )
            self.head_columns = [self.behaviours.index(h) for h in self.heads]
            scales = fusion.head_scales(self.heads, continuous, positive_mean or {})
            self.register_buffer("head_scale", scales, persistent=False)

            def outputs() -> fusion.HeadOutputs:
                return fusion.HeadOutputs(
                    self.heads, self.behaviours, continuous, scheme.label, oracle, xauc_pairs, seed
                )

            self.val_heads = outputs()
            self.test_heads = outputs()

    def forward(self, categorical: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Raw features in, logits out: the standardisation travels with the model."""
        if self.dense_fill == "mean":
            dense = torch.where(torch.isnan(dense), self.dense_mean, dense)
        else:
            dense = torch.nan_to_num(dense, nan=0.0)
        return self.model(categorical, (dense - self.dense_mean) / self.dense_std)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        logits = self(batch.categorical, batch.dense)
        if self.heads:
            return self._heads_step(batch, logits)
        weight = self.scheme.weights(batch.behaviours, self.behaviours) * self.weight_scale
        label = (batch.behaviours[:, self.label_column] > 0).float()
        losses = F.binary_cross_entropy_with_logits(logits.float(), label, reduction="none")
        summed = (weight * losses).sum().detach()
        bad = (~torch.isfinite(summed) | ~torch.isfinite(weight.sum())).float()
        local = torch.stack([summed, weight.sum(), bad])
        # Global Σw (and Σwℓ for the log) over all ranks: the mean of per-rank weighted means is
        # not the weighted mean of the global batch. The non-finite flag rides along, so every
        # rank stops or skips the same batch.
        total = self.trainer.strategy.reduce(local.clone(), reduce_op="sum")
        if total[2] > 0:
            return self._nonfinite("loss", batch, logits, weight, label)
        world = self.trainer.world_size
        # DDP averages gradients over ranks, so scale by world to get the gradient of Σwℓ / W.
        loss = weighted_bce(logits, label, weight, total[1]) * world
        self.log("train/loss", total[0] / total[1].clamp_min(1e-30), prog_bar=True)
        return loss

    def _heads_step(self, batch: Batch, logits: torch.Tensor) -> torch.Tensor | None:
        # Σ over heads of each head's own mean loss (global over ranks, as above); no sample
        # weights, except the weighted logistic head of a continuous behaviour (train.fusion).
        values = batch.behaviours[:, self.head_columns]
        weight = fusion.head_weights(values, self.head_scale)
        losses = F.binary_cross_entropy_with_logits(
            logits.float(), (values > 0).float(), reduction="none"
        )
        n = len(self.heads)
        summed = (weight * losses).sum(0).detach()
        bad = (~torch.isfinite(summed).all() | ~torch.isfinite(weight.sum())).float()
        local = torch.cat([summed, weight.sum(0), bad.unsqueeze(0)])
        total = self.trainer.strategy.reduce(local.clone(), reduce_op="sum")
        if total[-1] > 0:
            return self._nonfinite("loss", batch, logits, weight, (values > 0).float())
        denominator = total[n : 2 * n].clamp_min(torch.finfo(torch.float32).tiny)
        loss = ((weight * losses).sum(0) / denominator).sum() * self.trainer.world_size
        self.log("train/loss", (total[:n] / denominator).sum(), prog_bar=True)
        return loss

    def _nonfinite(
        self,
        what: str,
        batch: Batch,
        logits: torch.Tensor,
        weight: torch.Tensor,
        label: torch.Tensor,
    ) -> None:
        """Stop with the batch's statistics, or (`nonfinite=skip`) skip it: returning None from
        training_step makes Lightning skip backward and the optimizer step, on every rank."""
        if self.nonfinite == "skip":
            self.skipped_batches += 1
            self.log("train/skipped_batches", float(self.skipped_batches))
            return None
        dense = batch.dense
        finite_w = weight[torch.isfinite(weight)]
        rank = f" (rank {self.global_rank})" if self.trainer.world_size > 1 else ""
        raise NonFiniteError(
            f"error: non-finite training {what} at global step {self.global_step}{rank}; batch: "
            f"{len(label)} rows, weight sum {weight.sum().item():.6g} "
            f"min {finite_w.min().item() if len(finite_w) else float('nan'):.6g} "
            f"max {finite_w.max().item() if len(finite_w) else float('nan'):.6g} "
            f"({int((~torch.isfinite(weight)).sum())} non-finite), "
            f"label rate {label.float().mean().item():.4g}, "
            f"non-finite logits {int((~torch.isfinite(logits)).sum())}/{logits.numel()}, "
            f"infinite dense {int(torch.isinf(dense).sum())}/{dense.numel()} "
            f"(NaN = missing: {int(torch.isnan(dense).sum())}). Lower optimizer.lr, check the "
            "data's dense and behaviour columns, or set nonfinite=skip to skip such batches"
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Gradients are all-reduced by now (identical on every rank): no extra collective.
        names, counts = [], []
        for name, param in self.named_parameters():
            if param.grad is not None:
                if param.grad.is_sparse:
                    # Coalesced in place, once: the lazy Adam step then finds it done (the sort is a
                    # tenth of a CPU step).
                    param.grad = param.grad.coalesce()
                grad = param.grad.values() if param.grad.is_sparse else param.grad
                names.append(name)
                counts.append((~torch.isfinite(grad)).sum())
        if not counts:
            return
        counts = torch.stack(counts).tolist()  # one device sync for all parameters
        bad = [f"{n} ({c} non-finite)" for n, c in zip(names, counts, strict=True) if c]
        if not bad:
            return
        if self.nonfinite == "skip":  # no gradient: the optimizers leave every parameter as is
            for param in self.parameters():
                param.grad = None
            self.skipped_batches += 1
            self.log("train/skipped_batches", float(self.skipped_batches))
            return
        raise NonFiniteError(
            f"error: non-finite gradient at global step {self.global_step} in "
            f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. Lower optimizer.lr or set "
            "trainer.gradient_clip_val, or set nonfinite=skip to skip such steps"
        )

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._update(self.val_metrics, batch)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._update(self.test_metrics, batch)

    def _update(self, metrics: BehaviourMetrics, batch: Batch) -> None:
        probs = torch.sigmoid(self(batch.categorical, batch.dense).float())
        if self.heads:
            heads = self.val_heads if metrics is self.val_metrics else self.test_heads
            heads.update(probs, batch.behaviours, batch.group, batch.oracle, batch.oracle_positive)
            # The metrics rank by the fused score, computed as the report's α sweep does.
            probs = fusion.fused_score(probs, self.model.alpha)
        metrics.update(probs, batch.behaviours, batch.group, batch.oracle, batch.oracle_positive)

    def on_validation_epoch_end(self) -> None:
        # compute() gathers every rank's predictions: all ranks must call it (a collective).
        results = self.val_metrics.compute()
        self.val_metrics.reset()
        if self.heads:
            results |= self.val_heads.metrics(self.val_heads.compute())
            self.val_heads.reset()
        self.log_dict({f"val/{k}": v for k, v in results.items()})

    def on_test_epoch_end(self) -> None:
        results = self.test_metrics.compute()
        self.test_metrics.reset()
        if self.heads:
            gathered = self.test_heads.compute()
            self.test_heads.reset()
            results |= self.test_heads.metrics(gathered)
            if self.predictions and self.trainer.is_global_zero:
                table = self.test_heads.table(gathered, self.model.fusion)
                fusion.write_table(self.predictions, table)
        self.test_results = {f"test/{k}": v for k, v in results.items()}
        self.log_dict(self.test_results)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.model)
        if self.scheduler_factory is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        checkpoint["upweight"] = self.artifact
