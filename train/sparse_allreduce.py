"""DDP's gradient reduction with collectives every backend has, so that multi-GPU runs on NCCL.

Why: the default model's embedding table (`nn.Embedding(sparse=True)`) has sparse gradients,
and DDP all-reduces a sparse gradient with the process group's sparse all-reduce, which only
gloo implements: NCCL raises "NCCL does not support all_reduce with sparse tensors" at the first
backward. Dense gradients are no answer: they would all-reduce whole tables every step.

How: a DDP communication hook, `reduce_gradients`, which `train.callbacks.SparseAllReduce`
registers on whatever DDP model the strategy built, so `hardware.devices=N`, `hardware=gpus`,
Slurm and torchrun all take it, on gloo (CPU, CI) and NCCL alike:
- a sparse gradient (DDP gives each one a bucket of its own, whose `buffer()` is the gradient):
  `sparse_all_reduce` exchanges each rank's row count, all-gathers every rank's coalesced rows
  (indices and values, padded to the largest count), and sums them. It moves about what gloo's
  sparse all-reduce moves (every rank's rows to every rank; gloo sends them unpadded) and sums
  in the same order, so a run follows the same trajectory to the bit on the CPU;
- a dense bucket: DDP's own all-reduce, scaled as DDP scales it without a hook.
Lightning's own `DDPStrategy(ddp_comm_hook=...)` registers hooks on CUDA only, hence the callback.
This module is plain torch (no Lightning), so DDP code of any kind can use it.

No `from __future__ import annotations` here: DDP compares the hook's annotations with the real
types (`dist.GradBucket`), not with strings.
"""

import torch
import torch.distributed as dist
from torch import nn


def sparse_all_reduce(grad: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The mean over the ranks of `group` of each rank's sparse COO `grad` (the same shape on
    every rank, any number of rows on each), coalesced, with dense all-gathers only. Every rank
    of `group` must call it (a collective)."""
    world = group.size()
    # Divided before the sum, as DDP divides a sparse gradient before gloo's sparse all-reduce.
    local = (grad / world).coalesce()
    indices, values = local.indices(), local.values()  # [sparse dims, n], [n, *dense dims]
    rows = values.shape[0]
    count = torch.tensor([rows], device=values.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    # The one read back to the host: it sizes the buffers (coalesce() on a GPU reads one too).
    sizes = torch.cat(counts).tolist()
    longest = max(sizes)
    if longest == 0:  # no rank has a row (every rank sees the same sizes: all return here)
        return local
    # Padding keeps every rank's buffer the same size, which all-gather needs; it is cut off
    # before the sum (padded zeros at row 0 would make a row the batches never touched appear
    # in the gradient, and the lazy optimizer would update its moments).
    send_indices = indices.new_zeros(indices.shape[0], longest)
    send_indices[:, :rows] = indices
    send_values = values.new_zeros(longest, *values.shape[1:])
    send_values[:rows] = values
    all_indices = [torch.empty_like(send_indices) for _ in range(world)]
    all_values = [torch.empty_like(send_values) for _ in range(world)]
    works = [
        dist.all_gather(all_indices, send_indices, group=group, async_op=True),
        dist.all_gather(all_values, send_values, group=group, async_op=True),
    ]
    for work in works:
        work.wait()
    parts = [
        # Each part is a rank's coalesced gradient as it was: nothing to check.
        torch.sparse_coo_tensor(
            i[:, :n], v[:n], grad.shape, check_invariants=False, is_coalesced=True
        )
        for i, v, n in zip(all_indices, all_values, sizes, strict=True)
    ]
    # Summed rank by rank, the order gloo's sparse all-reduce sums in (on the CPU the sum of
    # coalesced tensors stays coalesced; on a GPU the last coalesce() sums the duplicates).
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total.coalesce()


def reduce_gradients(
    process_group: dist.ProcessGroup, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """A DDP communication hook (`register_comm_hook(process_group, reduce_gradients)`): the mean
    over ranks of every gradient, sparse ones with `sparse_all_reduce`, dense buckets with one
    all-reduce. The module's loss is scaled by the world size (`RankingModule.training_step`),
    so the mean is the gradient of the global batch's loss."""
    buffer = bucket.buffer()
    if buffer.is_sparse:
        # Synchronous: the embedding table is the first layer, so its gradient is the last
        # bucket of the backward pass, and there is nothing left to overlap with.
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(sparse_all_reduce(buffer, process_group))
        return done
    # DDP without a hook multiplies by 1 / world (not a division): the same bits as without one.
    buffer.mul_(1.0 / process_group.size())
    work = dist.all_reduce(buffer, group=process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def has_sparse_gradients(module: nn.Module) -> bool:
    """Whether DDP expects a sparse gradient in `module` (the test DDP itself makes)."""
    return any(isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.sparse for m in module.modules())
