"""No host synchronisation in a steady-state training step (issue 13).

The job is run through its own config with `tests.nosync.HostSyncGuard`, which records every op
that would make a GPU wait for the host (`.item()`, `.tolist()`, `if tensor:`, data-dependent
output sizes such as `nonzero` or sparse `coalesce`) from the 4th step on, leaving out only the
steps whose values Lightning's logger reads (every `trainer.log_every_n_steps`, where the
non-finite guard reads its flags too). Both objectives (one weighted logit, one head per
behaviour, with GradNorm balancing), both non-finite modes and both precisions (float32, bf16
mixed: a GPU's default), with the progress bar on and a cosine schedule.

On a GPU the same claim is checked by `torch.cuda.set_sync_debug_mode("error")` (bench/gpu.py
`--sync-check`); on the CPU nothing stalls, so the ops themselves are looked for.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TINY, train_in_process
from tests.nosync import HostSyncGuard
from train import host
from train.nonfinite import NonFiniteGuard
from train.optim import SparseDenseAdam


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("model", "nonfinite", "precision"),
    # bf16-mixed is a GPU's default (and a bf16 CPU's): its autocast casts are checked too.
    [
        ("dnn", "stop", "32-true"),
        ("dnn", "skip", "bf16-mixed"),
        ("multihead", "stop", "bf16-mixed"),
        ("mmoe", "skip", "32-true"),
    ],
)
def test_training_steps_never_read_back_to_the_host(
    tmp_path, model, nonfinite, precision, monkeypatch
):
    # The CPU takes the paths a free read allows (distinct rows, facts of bad batches only);
    # the device paths are the ones checked here.
    monkeypatch.setattr(host, "READS_FREE_ON", frozenset())
    # mmoe with every multi-task option: GradNorm's norms and weights stay on the device too.
    multitask = [
        "model.condition={finish: click}",
        "model.head_weights={click: seed}",
        "model.balance=gradnorm",
    ]
    train_in_process(
        *TINY,
        f"model={model}",
        *(multitask if model == "mmoe" else []),
        f"nonfinite={nonfinite}",
        f"trainer.precision={precision}",
        "weights=seed",
        "scheduler=cosine",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=true",
        "trainer.log_every_n_steps=5",
        "trainer.limit_train_batches=12",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "+callbacks.no_host_sync._target_=tests.nosync.HostSyncGuard",
        "+callbacks.no_host_sync.fail=true",
        output_dir=tmp_path / "run",
    )


def test_the_guard_sees_a_read_in_a_step():
    # The test above can fail: a step that reads a loss back is caught, with where it was read.
    found: list = []
    from tests.nosync import NoHostSync

    with NoHostSync(0, found):
        loss = torch.ones(3).sum()
        if loss > 0:
            loss.tolist()
        torch.tensor([0, 2]).nonzero()
        torch.ones(2, 3)[:, [0, 2]]  # a list index: host data copied to the device
    assert [what for _, what, _ in found] == [
        "aten._local_scalar_dense",
        "aten.lift_fresh",
        "aten.nonzero",
        "aten.lift_fresh",
    ]
    assert "test_no_sync.py" in found[0][2]
    guard = HostSyncGuard()
    assert guard.report().startswith("0 host syncs")


@pytest.mark.parametrize("reads_free", [True, False], ids=["cpu-path", "device-path"])
def test_skipped_step_moves_nothing_on_the_device(reads_free, monkeypatch):
    # found_inf = 1 leaves every parameter, moment and step count as it was; 0 trains. On the
    # CPU the step is skipped outright; on a device, by arithmetic scaled by 0.
    if not reads_free:
        monkeypatch.setattr(host, "READS_FREE_ON", frozenset())
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 4, sparse=True), torch.nn.Linear(4, 1))
    optimizer = SparseDenseAdam(model, lr=0.1)
    guard = NonFiniteGuard("skip", [n for n, _ in model.named_parameters()])
    optimizer.found_inf = guard.found_inf

    def step(poison: bool) -> None:
        optimizer.zero_grad()
        out = model(torch.tensor([1, 2, 2, 5])).sum()
        (out * (float("nan") if poison else 1.0)).backward()
        guard.gradients([p.grad for p in model.parameters()], step=0)
        optimizer.step()

    step(poison=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [{k: v.clone() for k, v in s.items()} for s in optimizer.state.values()]
    step(poison=True)
    assert int(guard.skipped) == 1
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for state, saved in zip(optimizer.state.values(), moments, strict=True):
        for key, value in state.items():
            assert torch.equal(value, saved[key]), key
    step(poison=False)
    assert not torch.equal(model.state_dict()["0.weight"], before["0.weight"])
    assert int(guard.skipped) == 1 and int(guard.first_step) == 0


def test_the_bad_gradient_is_named_when_some_parameters_have_none():
    # Parameters without a gradient (unused, frozen) keep their place in the flags.
    guard = NonFiniteGuard("stop", ["a", "b", "c"])
    sparse = torch.sparse_coo_tensor([[0, 2]], torch.tensor([[1.0], [float("inf")]]), (4, 1))
    skip = guard.gradients([None, sparse, torch.ones(3)], step=7)
    assert bool(skip) and guard.first_grads.tolist() == [False, True, False]
    with pytest.raises(SystemExit, match=r"non-finite gradient at global step 7 in b\."):
        guard.check()


def test_a_bad_batch_is_described_alike_on_the_cpu_and_the_device_paths(monkeypatch):
    # The CPU records a batch's facts only once it knows the batch is bad; a device records
    # them every step and keeps the first bad one's: the same message either way, and a good
    # batch before it leaves nothing behind.
    logits = torch.tensor([[0.5], [float("inf")], [-1.0]])
    label, weight = torch.tensor([[1.0], [0.0], [1.0]]), torch.tensor([[2.0], [1.0], [3.0]])
    dense = torch.tensor([[1.0, float("nan")], [float("inf"), 0.0], [1.0, 2.0]])
    messages = []
    for free in (frozenset({"cpu"}), frozenset()):
        monkeypatch.setattr(host, "READS_FREE_ON", free)
        guard = NonFiniteGuard("stop", ["w"])
        guard.loss(torch.tensor(False), 3, logits[[0, 2]], label[:2], weight[:2], dense[:2])
        guard.check()  # a good batch: nothing recorded
        guard.loss(torch.tensor(True), 4, logits, label, weight, dense)
        with pytest.raises(SystemExit) as stop:
            guard.check()
        messages.append(str(stop.value))
    assert messages[0] == messages[1]
    assert "global step 4; batch: 3 rows, weight sum 6 min 1 max 3" in messages[0], messages[0]
    assert "non-finite logits 1/3, infinite dense 1/6 (NaN = missing: 1)" in messages[0]
