"""The LightningModule: preprocess dense inputs, score, the objective's weighted loss, and
per-behaviour metrics over every rank's rows."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import lightning as L
import torch
from torch import nn

from train.balance import balance_for
from train.calibration import OddsCorrection
from train.data.batch import Batch
from train.data.features import FeatureSpec
from train.data.module import ImpressionDataModule
from train.data.stats import TrainStats
from train.data.vocabulary import Vocabulary
from train.errors import ConfigError, UpweightError
from train.heads import PerHeadBCE, loss_denominators, with_conditionals
from train.layout import ARTIFACT_KEY, CALIBRATION_KEY
from train.metrics import BehaviourMetrics
from train.model import MultiTaskNetwork, check_fusion, network_logits
from train.nonfinite import NonFiniteGuard, not_finite
from train.objective import Evaluation, Objective, WeightedBCE, loss_sums
from train.outputs import artifact
from train.preprocess import LEGACY_STATE_KEYS, DensePreprocess
from train.weights import SchemeError, WeightScheme

# Epoch metrics are computed over every rank's rows by BehaviourMetrics itself; Lightning's
# advice to sync_dist them would average values that are already global.
warnings.filterwarnings("ignore", message=r".*self\.log\('(val|test)/.*sync_dist=True")


class VocabularyMismatch(UpweightError):
    """A checkpoint resumed on training data whose ids are not the ones it was trained on."""


OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], Any]
SPLITS = ("val", "test")
DEFAULT_EVALUATION = Evaluation()


def objective_for(
    model: nn.Module,
    scheme: WeightScheme,
    spec: FeatureSpec,
    stats: TrainStats,
    evaluation: Evaluation,
    head_schemes: Mapping[str, WeightScheme] | None = None,
) -> Objective:
    """A network that names heads trains every head on its own loss (or its own scheme's);
    any other, one logit on the scheme's weighted loss."""
    heads = getattr(model, "heads", None)
    if heads:
        fusion = check_fusion(getattr(model, "fusion", None), heads)
        return PerHeadBCE(heads, fusion, scheme, spec, stats, evaluation, head_schemes)
    if head_schemes:
        raise ConfigError(
            "model.head_weights: per-head weight schemes need a model with heads "
            "(model=multihead, mmoe or ple); this one has one logit"
        )
    return WeightedBCE(scheme, spec, stats)


class RankingModule(L.LightningModule):
    """One network, one objective: raw features -> `DensePreprocess` -> model -> logits
    [rows, outputs]; the loss is Σ over outputs of the global weighted mean (see
    `train.objective`), the metrics are computed over every rank's rows per split."""

    def __init__(
        self,
        model: nn.Module,
        scheme: WeightScheme,
        spec: FeatureSpec,
        stats: TrainStats,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        evaluation: Evaluation = DEFAULT_EVALUATION,
        nonfinite: str = "stop",
        model_config: Mapping[str, Any] | None = None,
        head_schemes: Mapping[str, WeightScheme] | None = None,
        balance: str | Mapping[str, Any] | None = None,
    ) -> None:
        """`model_config` (the `model` config that built `model`) goes into every checkpoint,
        so scoring and warm starts can rebuild the network. `head_schemes` and `balance`: a
        multi-task model's per-head weight schemes and loss balancing (`model.head_weights`,
        `model.balance`)."""
        super().__init__()
        self.model = model
        self.scheme = scheme
        self.preprocess = DensePreprocess(stats.dense_mean, stats.dense_std, spec.dense_fill)
        self.objective = objective_for(model, scheme, spec, stats, evaluation, head_schemes)
        heads = getattr(model, "heads", None)
        if balance is not None and not heads:
            raise ConfigError("model.balance: loss balancing needs a model with heads")
        self.balance = balance_for(balance, heads or ["score"])
        if self.balance.needs_shared and not isinstance(model, MultiTaskNetwork):
            raise ConfigError(
                f"model.balance=gradnorm: {type(model).__name__} does not expose its shared "
                "representation (a train.model.MultiTaskNetwork does)"
            )
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.evaluation = evaluation
        self.nonfinite = nonfinite
        self.artifact = artifact(model_config or {}, spec, stats, scheme)
        gain = evaluation.ndcg_gain
        if gain is not None:
            try:
                gain.check_behaviours(spec.behaviour_names)
            except SchemeError as err:
                raise SchemeError(f"metrics.ndcg_gain ({gain.name}): {err}") from err
        self.metrics = nn.ModuleDict(
            {
                split: BehaviourMetrics(
                    spec.behaviour_names,
                    stats.continuous,
                    scheme.label,
                    spec.oracle_names,
                    evaluation.xauc_pairs,
                    evaluation.seed,
                    evaluation.ndcg_k,
                    gain,
                )
                for split in SPLITS
            }
        )
        self.test_results: dict[str, float] = {}
        self.correction: OddsCorrection | None = None
        """The label's odds correction fitted on the last validation (see train.calibration)."""
        self.guard = NonFiniteGuard(nonfinite, [name for name, _ in self.named_parameters()])
        self._trained: list[nn.Parameter] | None = None

    @property
    def skipped_batches(self) -> int:
        return int(self.guard.skipped)  # a host read: checkpoints and tests only

    def forward(
        self, categorical: torch.Tensor, dense: torch.Tensor, sequences: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Raw features in, logits out: the preprocessing travels with the model."""
        return network_logits(self.model, categorical, self.preprocess(dense), sequences)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        # Nothing here reads a value back to the host: a GPU runs ahead of Python all step.
        shared = None
        if batch.label is None:
            label, weight = self.objective.targets(batch.behaviours)
        else:  # made by the loader with this objective's `targets` (`setup`)
            label, weight = batch.label, batch.weight
        heads = label.shape[1]
        if isinstance(self.model, MultiTaskNetwork):
            # From the shared representation: loss balancing measures gradient norms there, and
            # conditional heads fit their own logits too.
            dense = self.preprocess(batch.dense)
            shared = self.model.shared(batch.categorical, dense, batch.sequences)
            logits = self.model.training_logits(shared)
            label, weight = with_conditionals(label, weight, self.model.chain)
        else:
            logits = self(batch.categorical, batch.dense, batch.sequences)
        rows = len(batch.behaviours)
        summed = loss_sums(logits.reshape(rows, -1), label, weight)
        # Global Σw (and Σwℓ for the log) over all ranks, per output: the mean of per-rank
        # weighted means is not the weighted mean of the global batch.
        total = self.trainer.strategy.reduce(
            torch.cat([summed.detach(), weight.sum(0)]), reduce_op="sum"
        )
        # A sum is finite only if every term is: every rank sees a non-finite value of any rank
        # here, so all of them skip (or stop at) the same step.
        bad = not_finite(total).any()
        self.guard.loss(bad, self.global_step, logits, label, weight, batch.dense)
        outputs = len(summed)
        denominator = loss_denominators(total[outputs:], getattr(self.model, "chain", ()))
        denominator = denominator.clamp_min(torch.finfo(torch.float32).tiny)
        world = self.trainer.world_size
        losses = summed / denominator
        if world > 1:
            # DDP averages gradients over ranks: scaled by world, they are those of Σwℓ / W.
            losses = losses * world
        global_losses = total[:outputs] / denominator
        # The heads' own losses: sliced only when conditional heads follow them (a slice is
        # one more op each way on every step).
        own = (
            (losses, global_losses) if outputs == heads else (losses[:heads], global_losses[:heads])
        )
        loss = self.balance.combine(*own, shared, self._sum_over_ranks, world)
        if outputs > heads:
            # Conditional heads' own losses (p(child | parent) on the parent's positives) are not
            # balanced: they fit a part of their head's product, not a behaviour of their own.
            loss = loss + losses[heads:].sum()
        # Only on the steps the logger writes (`self.log` is Python work on every call), and not
        # on the progress bar: Lightning turns its values into Python numbers after every step.
        if self._logging_step():
            self.log("train/loss", global_losses[:heads].sum())
            if outputs > 1:  # each head's loss and its weight in the balance
                weights = self.balance.effective().detach()
                for j, head in enumerate(self.balance.heads):
                    self.log(f"train/{head}/loss", global_losses[j])
                    self.log(f"train/{head}/head_weight", weights[j])
                for j, (child, parent) in enumerate(getattr(self.model, "chain", ())):
                    names = self.balance.heads[child], self.balance.heads[parent]
                    self.log("train/{}/given_{}/loss".format(*names), global_losses[heads + j])
        return loss

    def _sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(values, reduce_op="sum")

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.balance.after_step()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Gradients are all-reduced by now (identical on every rank): no extra collective.
        # The parameters in the guard's names' order, listed at a fit's first step and kept:
        # walking every submodule (the metrics' too) costs more than the check itself.
        if self._trained is None:
            self._trained = list(self.parameters())
        skip = self.guard.gradients([p.grad for p in self._trained], self.global_step)
        if self.nonfinite == "skip" and self._logging_step():
            self.log("train/skipped_batches", self.guard.skipped.float())
        if getattr(optimizer, "skips_on_device", False):
            optimizer.found_inf = self.guard.found_inf  # type: ignore[attr-defined]
            return
        # An optimizer that cannot skip on the device: the host decides, one read a step.
        if bool(skip):
            if self.nonfinite == "stop":
                self.guard.check(self._rank())
            for param in self.parameters():  # no gradient: the optimizer leaves them as is
                param.grad = None

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        if self._logging_step():  # the logger reads the device now anyway
            self.guard.check(self._rank())

    def _logging_step(self) -> bool:
        """Whether Lightning's logger writes this training step (every `log_every_n_steps`, and
        when stopping): its own rule, which holds from the batch's start to its end."""
        return self._trainer is not None and self.trainer._logger_connector.should_update_logs

    def on_train_epoch_end(self) -> None:
        self.guard.check(self._rank())

    def _rank(self) -> int | None:
        return self.global_rank if self._trainer and self.trainer.world_size > 1 else None

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._update("val", batch)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._update("test", batch)

    def _update(self, split: str, batch: Batch) -> None:
        probs = torch.sigmoid(self(batch.categorical, batch.dense, batch.sequences).float())
        self.objective.update(split, probs, batch)
        self.metrics[split].update(
            self.objective.score(probs),
            batch.behaviours,
            batch.group,
            batch.oracle,
            batch.oracle_positive,
            self.objective.label_probs(probs),
        )

    def _finish(self, split: str) -> dict[str, float]:
        metrics = self.metrics[split]
        # Test is corrected by the odds correction fitted on validation (p_calibrated's).
        metrics.correction = self.correction if split == "test" else None
        # compute() gathers every rank's predictions: all ranks must call it (a collective).
        results = metrics.compute()
        metrics.reset()
        if split == "val" and not self.trainer.sanity_checking:
            fitted = metrics.fitted
            self.correction = fitted and replace(fitted, step=self.trainer.global_step)
        save_to = self.evaluation.predictions if split == "test" else None
        results |= self.objective.finish(split, save_to if self.trainer.is_global_zero else None)
        return {f"{split}/{k}": v for k, v in results.items()}

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self._finish("val"))

    def on_test_epoch_end(self) -> None:
        self.test_results = self._finish("test")
        self.log_dict(self.test_results)

    def configure_optimizers(self) -> Any:
        # The balance's learned weights (if any) step with the network's dense parameters.
        optimizer = self.optimizer_factory(nn.ModuleList([self.model, self.balance]))
        if self.scheduler_factory is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def setup(self, stage: str) -> None:
        # The data module's training batches come with this objective's labels and weights,
        # made a gather (32k rows) at a time instead of a dozen small ops every step.
        if stage == "fit" and isinstance(self.trainer.datamodule, ImpressionDataModule):
            self.trainer.datamodule.targets = self.objective.targets

    def teardown(self, stage: str) -> None:
        if stage == "fit" and isinstance(self.trainer.datamodule, ImpressionDataModule):
            self.trainer.datamodule.targets = None  # another fit brings its own objective's

    def on_fit_start(self) -> None:
        self._trained = None  # listed again at this fit's first step, as the strategy set it up

    def on_train_start(self) -> None:
        # Lightning #20550: `estimated_stepping_batches` (configure_optimizers) sets the training
        # loader up before the checkpoint is restored, and the loader's saved position is then
        # never loaded; load it now and restart the iterator from it.
        loop = self.trainer.fit_loop
        if loop.restarting and loop._combined_loader_states_to_load:
            loop._load_combined_loader_states()
            iter(loop._data_fetcher)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A stop already due is taken before the checkpoint is written (saving reads the device
        # anyway), so no checkpoint holds the steps after a bad one that a resume would keep.
        self.guard.check(self._rank())
        # Plain types only, so checkpoints load with torch.load(weights_only=True).
        checkpoint[ARTIFACT_KEY] = self.artifact
        # Only for the weights it was fitted on: a checkpoint saved between validations (a
        # periodic last.ckpt) would otherwise carry the previous weights' correction.
        if self.correction and self.correction.step == self.trainer.global_step:
            checkpoint[ARTIFACT_KEY] = self.artifact | {CALIBRATION_KEY: self.correction.to_state()}
        checkpoint["skipped_batches"] = self.skipped_batches

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Resuming rebuilds the vocabularies from data.train: other training ids would give the
        # saved embedding rows to other ids, silently.
        saved = ((checkpoint.get(ARTIFACT_KEY) or {}).get("spec") or {}).get("vocabularies") or {}
        ours = self.artifact["spec"].get("vocabularies") or {}
        for table in sorted(saved.keys() & ours.keys()):
            if Vocabulary.from_state(saved[table]) != Vocabulary.from_state(ours[table]):
                raise VocabularyMismatch(
                    f"the checkpoint's vocabulary of table {table!r} differs from the one this "
                    "run built from data.train: resume with the training data the checkpoint "
                    "was trained on (its embedding rows belong to those ids)"
                )
        self.guard.skipped.fill_(int(checkpoint.get("skipped_batches", 0)))
        state = checkpoint.get("state_dict") or {}
        for old, new in LEGACY_STATE_KEYS.items():
            if old in state and new not in state:
                state[new] = state.pop(old)
