"""Where one training step goes: the job's step cut into its parts, in ms per step.

    python bench/profile.py [--rows 500000] [--threads 2] [--steps 100] [--model dnn|multihead]
                            [--device cpu|cuda] [--precision 32-true|bf16-mixed]

The workload of bench/throughput.py (simulated rows, 8 hashed categorical features, 4 dense,
embedding 16, MLP 256-128-64, batch 4096, the `seed` scheme). First the job itself: a fresh
RankingModule through lightning.Trainer, the wall time between consecutive batch starts. Then
the same step by hand with the job's own objects (the data module's TrainBatches, the module's
embeddings, tower, objective and `configure_optimizers()`), each part timed on its own:
data, embedding forward, embedding backward, MLP forward+backward (dense preprocessing and the
concatenation included), loss/weights (loss_sums, the module's reductions and the loss's
backward; the objective's targets are made by the loader, in the data part, as in a fit), the
gradient hook (`on_before_optimizer_step`: the finiteness check), the optimizer's embedding
(lazy Adam) and dense (AdamW) parts. Framework overhead is the job's step minus the sum of the
parts. The precision is the one `hardware=auto` takes on the device (`train.host.precision_for`)
unless `--precision` says; at bf16-mixed the forward parts run under bf16 autocast, as
Lightning runs `training_step`. Means over `--steps` steps after 20 warm-up steps, the 2%
slowest and fastest left out.
Prints the table, the job's step time and rows/s and, last, `ratio <job step / sum of parts>`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import statistics
import sys
import sysconfig
import time
from pathlib import Path

if __name__ != "__main__":
    # This file's name is the standard library's `profile`, which cProfile (imported by
    # torch._dynamo, so by lightning) imports: any script run from bench/ finds this file first.
    # Imported as a module, it hands out the standard library's `profile` instead.
    _spec = importlib.util.spec_from_file_location(
        __name__, Path(sysconfig.get_paths()["stdlib"]) / "profile.py"
    )
    _stdlib = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _stdlib
    _spec.loader.exec_module(_stdlib)
else:
    import lightning as L
    import torch
    from throughput import BATCH, BEHAVIOURS, data_module, job_module, job_trainer, scheme

    from train.host import precision_for
    from train.model import MultiHead
    from train.module import RankingModule
    from train.nonfinite import not_finite
    from train.objective import loss_sums
    from train.optim import SparseDenseAdam

WARMUP = 20
TRIM = 0.02


def build_module(data, model: str) -> RankingModule:
    if model == "dnn":
        return job_module(data)
    heads = MultiHead(data.spec.cardinalities, len(data.spec.dense), heads=list(BEHAVIOURS))
    return RankingModule(heads, scheme(), data.spec, data.stats, optimizer=SparseDenseAdam)


def job_steps(data, args, sync) -> list[float]:
    """The job's steps: wall time between consecutive batch starts, i.e. whole steps (fetching
    the batch, training_step, backward, hooks, optimizer, logging), as the job pays them."""
    marks: list[float] = []

    class StepClock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            sync()
            marks.append(time.perf_counter())

    trainer = job_trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        max_steps=WARMUP + args.steps + 1,  # +1: the last timed step ends at the next start
        max_epochs=-1,
        num_sanity_val_steps=0,
        precision=args.precision,
        callbacks=[StepClock()],
    )
    trainer.fit(build_module(data, args.model), datamodule=data)
    return [b - a for a, b in itertools.pairwise(marks[WARMUP:])]


def tower(model, embedded: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """The model's forward after the embedding lookup (DNN: mlp; MultiHead: trunk + towers)."""
    x = torch.cat([embedded, dense], dim=1)
    if hasattr(model, "mlp"):
        return model.mlp(x).squeeze(1)
    x = model.trunk(x)
    return torch.cat([t(x) for t in model.towers], dim=1)


def module_loss(module: RankingModule, logits: torch.Tensor, batch):
    """RankingModule.training_step after the forward pass, on one process (the strategy's
    reduce is the identity; `self.log` is left to the framework share)."""
    rows = len(batch)
    label, weight = batch.label, batch.weight  # made by the loader, as in a fit
    summed = loss_sums(logits.reshape(rows, -1), label, weight)
    total = torch.cat([summed.detach(), weight.sum(0)])
    if not_finite(total).any():  # the module's check; the guard reads it (free on the CPU)
        raise RuntimeError("non-finite loss in the profile")
    outputs = len(summed)
    denominator = total[outputs:].clamp_min(torch.finfo(torch.float32).tiny)
    loss = (summed / denominator).sum()
    (total[:outputs] / denominator).sum()  # the logged value
    return loss


def optimizer_parts(optimizer):
    """[(part, step function)] as SparseDenseAdam.step() runs them, or the whole step() when its
    internals are not the ones this file knows (the optimizer is being rewritten)."""
    dense, lazy = getattr(optimizer, "_dense", False), getattr(optimizer, "_lazy_adam", None)
    groups = [g for g in optimizer.param_groups if g.get("kind") == "sparse"]
    if dense is False or not callable(lazy) or not groups:
        return [("optimizer (whole step(): internals unknown)", optimizer.step)], False

    def embeddings() -> None:
        with torch.no_grad():
            for group in groups:
                lazy(group, None)

    return [
        ("optimizer, embeddings (lazy Adam)", embeddings),
        ("optimizer, dense (AdamW)", dense.step if dense is not None else lambda: None),
    ], True


def part_steps(data, args, sync) -> dict[str, list[float]]:
    module = build_module(data, args.model).to(args.device)
    data.targets = module.objective.targets  # what RankingModule.setup does in a fit
    model, loader = module.model, data.train_dataloader()
    optimizer = module.configure_optimizers()
    optimizer_steps, split = optimizer_parts(optimizer)
    hook = getattr(module, "on_before_optimizer_step", None)
    times: dict[str, list[float]] = {}
    step: dict[str, float] = {}

    @contextlib.contextmanager
    def part(name: str):
        sync()
        start = time.perf_counter()
        yield
        sync()
        step[name] = step.get(name, 0.0) + time.perf_counter() - start

    def forward():  # what Lightning's precision plugin wraps training_step in
        mixed = args.precision == "bf16-mixed"
        return torch.autocast(args.device, dtype=torch.bfloat16, enabled=mixed)

    batches = iter(loader)
    for _ in range(WARMUP + args.steps):
        step.clear()
        with part("data (TrainBatches)"):
            batch = next(batches, None)
            if batch is None:  # a new epoch (the job's loop starts one just as often)
                batches = iter(loader)
                batch = next(batches)
        optimizer.zero_grad(set_to_none=True)
        # Detached leaves between the parts, so each backward runs only its own part's graph.
        with part("embedding forward"), forward():
            emb = model.embeddings(batch.categorical).flatten(1)
        emb_leaf = emb.detach().requires_grad_()
        with part("MLP forward+backward"), forward():
            logits = tower(model, emb_leaf, module.preprocess(batch.dense))
        logits_leaf = logits.detach().requires_grad_()
        with part("loss/weights"):
            with forward():
                loss = module_loss(module, logits_leaf, batch)
            loss.backward()
        with part("MLP forward+backward"):
            logits.backward(logits_leaf.grad)
        with part("embedding backward"):
            emb.backward(emb_leaf.grad)
        if hook is not None:
            with part("gradient hook (finite check)"):
                hook(optimizer)
        for name, optimizer_step in optimizer_steps:
            with part(name):
                optimizer_step()
        for name, seconds in step.items():
            times.setdefault(name, []).append(seconds)
    if not split:
        print("note: SparseDenseAdam has no _dense/_lazy_adam: optimizer.step() timed whole")
    return {k: v[WARMUP:] for k, v in times.items()}


ORDER = [
    "data (TrainBatches)",
    "embedding forward",
    "embedding backward",
    "MLP forward+backward",
    "loss/weights",
    "gradient hook (finite check)",
]


def trimmed_mean(seconds: list[float]) -> float:
    """The mean without the slowest and fastest TRIM of the steps: robust to a stray stall,
    but it keeps the steps that pay for work done once every few batches (the loader gathers
    the rows of several batches at once), which a median would leave out."""
    cut = int(len(seconds) * TRIM)
    return statistics.fmean(sorted(seconds)[cut : len(seconds) - cut])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--model", choices=["dnn", "multihead"], default="dnn")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default=None)
    args = parser.parse_args()
    args.precision = args.precision or precision_for(args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch.cuda.is_available() is False here")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if args.device == "cuda" else lambda: None

    start = time.perf_counter()
    data = data_module(args.rows, scale=1)
    if args.device == "cuda":  # resident on the GPU, as bench/gpu.py trains
        data.tables["train"] = data.tables["train"].to("cuda")
    print(f"data: {args.rows:,} rows featurised in {time.perf_counter() - start:.1f} s")
    print(
        f"{args.model}, batch {BATCH}, {args.device}, {args.precision}, "
        f"{torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; means of {args.steps} steps after {WARMUP}, "
        f"the {TRIM:.0%} slowest and fastest left out"
    )
    # The job before and after the parts, pooled: a shared machine's load drifts.
    job = job_steps(data, args, sync)
    parts = part_steps(data, args, sync)
    job += job_steps(data, args, sync)

    job_ms = trimmed_mean(job) * 1e3
    means = {k: trimmed_mean(v) * 1e3 for k, v in parts.items()}
    names = [n for n in ORDER if n in means] + [n for n in means if n not in ORDER]
    parts_ms = sum(means.values())
    width = max(len(n) for n in [*names, "framework overhead (job - parts)"]) + 2
    print(f"{'part':<{width}}{'ms/step':>9}{'share':>8}")
    for name in names:
        print(f"{name:<{width}}{means[name]:>9.2f}{means[name] / job_ms:>8.1%}")
    overhead = job_ms - parts_ms
    print(f"{'framework overhead (job - parts)':<{width}}{overhead:>9.2f}{overhead / job_ms:>8.1%}")
    print(f"{'job step (lightning.Trainer)':<{width}}{job_ms:>9.2f}{1:>8.1%}")
    print(f"job: {BATCH / job_ms * 1e3:,.0f} rows/s")
    print(f"ratio {job_ms / parts_ms:.2f}")


if __name__ == "__main__":
    main()
