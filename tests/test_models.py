"""The cross networks (`model=dcn`, `model=deepfm`): shapes and finite logits with and without
list columns, DeepFM's terms against brute-force sums, sparse and dense gradients under the
project's optimizer, their config checks, the checkpoint/export/warm-start plumbing, and (e2e)
that each one learns on the simulated feed."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import SPEC, TINY, compose, log_rows, train_in_process, write_checkpoint
from train import config_checks
from train.checkpoint import load
from train.compile import tower_parts
from train.data.batch import SequenceInput
from train.errors import ConfigError
from train.export import build
from train.model import DCN, DeepFM, check_config, fm_interaction
from train.optim import SparseDenseAdam
from train.warmstart import _output_layer

CARDINALITIES = [7, 11, 5]
LIST_TABLE = 9
"""Rows of the table of the list column that has its own (after the categorical ones)."""
NUM_DENSE = 3
ROWS = 6
FEED = [o for o in TINY if not o.startswith("data.categorical.")]
"""A tiny run on the simulated feed, whose ids take exact vocabularies (no bucket counts)."""
VARIANTS = {
    "dcn": (DCN, {}),
    "dcn-stacked-lowrank": (DCN, {"cross_layers": 2, "cross_rank": 3, "structure": "stacked"}),
    "deepfm": (DeepFM, {}),
}


def network(name: str, pooling: str | None = None, seed: int = 0) -> torch.nn.Module:
    """A tiny network of `name`; with `pooling`, two list columns: one over column 1's table,
    one over a table of its own."""
    cls, options = VARIANTS[name]
    cardinalities, sequences = CARDINALITIES, ()
    if pooling is not None:
        cardinalities = [*CARDINALITIES, LIST_TABLE]
        candidate = 1 if pooling == "attention" else None  # elements attend to column 1
        sequences = (
            SequenceInput(table=1, max_len=4, pooling=pooling, candidate=candidate),
            SequenceInput(table=3, max_len=2, pooling=pooling, candidate=candidate, own_table=True),
        )
    torch.manual_seed(seed)
    return cls(
        cardinalities, NUM_DENSE, embedding_dim=4, hidden=[8], sequences=sequences, **options
    )


def inputs(with_lists: bool = False, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    categorical = torch.stack([torch.randint(0, c, (ROWS,), generator=g) for c in CARDINALITIES], 1)
    dense = torch.randn(ROWS, NUM_DENSE, generator=g)
    if not with_lists:
        return categorical, dense
    sequences = torch.cat(
        [
            torch.randint(0, CARDINALITIES[1], (ROWS, 4), generator=g),
            torch.randint(0, LIST_TABLE, (ROWS, 2), generator=g),
        ],
        dim=1,
    )
    sequences[0] = 0  # a row whose lists are empty
    return categorical, dense, sequences


@pytest.mark.parametrize("pooling", [None, "mean", "sum", "attention"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_one_finite_logit_per_row(name, pooling):
    net = network(name, pooling)
    logits = net(*inputs(with_lists=pooling is not None))
    assert logits.shape == (ROWS,)
    assert torch.isfinite(logits).all()


def brute_force_pairs(fields: torch.Tensor) -> torch.Tensor:
    return sum(
        (fields[:, i] * fields[:, j]).sum(-1)
        for i, j in itertools.combinations(range(fields.shape[1]), 2)
    )


def test_fm_interaction_is_the_sum_over_pairs():
    fields = torch.randn(5, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(fm_interaction(fields), brute_force_pairs(fields))


@pytest.mark.parametrize("pooling", [None, "mean", "attention"])
def test_deepfm_logit_is_first_order_plus_pairs_plus_deep(pooling):
    """Every field in the pairs (ids, pooled lists, each dense feature as x_j·v_j); a list
    column's first-order scalar pooled with the weights of its vector."""
    net = network("deepfm", pooling).double()
    with torch.no_grad():  # non-zero first-order weights (they start at 0)
        net.embeddings.first_order.weight.normal_()
    categorical, dense, *rest = inputs(with_lists=pooling is not None)
    dense = dense.double()
    sequences = rest[0] if rest else None
    fields = net.embeddings(categorical, sequences)
    offsets = net.embeddings.offsets
    scalar = net.embeddings.first_order.weight[:, 0]
    first = scalar[categorical + offsets[: len(CARDINALITIES)]].sum(1)
    if pooling == "mean":
        for spec, (a, b) in zip(net.embeddings.sequences, net.embeddings.slices, strict=True):
            local = sequences[:, a:b]
            present = (local > 0).double()
            values = scalar[local + offsets[spec.table]] * present
            first = first + values.sum(1) / present.sum(1).clamp(min=1)
    every = torch.cat([fields, dense.unsqueeze(-1) * net.dense_fields], dim=1)
    assert every.shape[1] == net.embeddings.num_fields + NUM_DENSE
    deep = net.mlp(torch.cat([fields.flatten(1), dense], dim=1)).squeeze(1)
    linear = net.linear(dense).squeeze(1)
    logits = net(categorical, dense, sequences)
    if pooling == "attention":  # the pooled scalars are checked by the mean case
        _, scalars = net.embeddings.lookup(categorical, sequences)
        first = scalars.sum(1)
        assert torch.all(scalars[0, len(CARDINALITIES) :] == 0)  # empty lists add nothing
    torch.testing.assert_close(logits, first + linear + brute_force_pairs(every) + deep)


@pytest.mark.parametrize("pooling", [None, "attention"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_gradients_reach_the_sparse_tables_and_every_dense_parameter(name, pooling):
    net = network(name, pooling)
    optimizer = SparseDenseAdam(net)
    sparse = {id(p) for g in optimizer.param_groups if g["kind"] == "sparse" for p in g["params"]}
    tables = [net.embeddings.table.weight]
    if name == "deepfm":
        tables.append(net.embeddings.first_order.weight)
    assert sparse == {id(t) for t in tables}  # DeepFM's first-order table is lazy-Adam'd too
    before = {k: v.clone() for k, v in net.state_dict().items()}
    categorical = inputs(with_lists=pooling is not None)[0]
    net(*inputs(with_lists=pooling is not None)).square().sum().backward()
    for param_name, param in net.named_parameters():
        assert param.grad is not None, param_name
        assert param.grad.is_sparse == any(param is t for t in tables), param_name
    optimizer.step()
    after = net.state_dict()
    for key in before:
        if key.endswith(("table.weight", "first_order.weight")):
            # only the rows the batch looked up move
            rows = set((categorical + net.embeddings.offsets[:3]).flatten().tolist())
            changed = (after[key] != before[key]).any(1).nonzero().flatten().tolist()
            assert changed and (pooling is not None or set(changed) <= rows), key
        else:
            assert not torch.equal(after[key], before[key]), key


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"_target_": "train.model.DCN", "cross_layers": 0}, r"model.cross_layers=0: expected"),
        ({"_target_": "train.model.DCN", "cross_rank": 0}, r"model.cross_rank=0: expected null"),
        ({"_target_": "train.model.DCN", "structure": "x"}, r"model.structure='x': expected one"),
        ({"_target_": "train.model.DCN", "hidden": [0]}, r"model.hidden=\[0\]"),
        ({"_target_": "train.model.DeepFM", "embedding_dim": 0}, r"model.embedding_dim=0"),
        ({"_target_": "train.model.DeepFM", "dropout": 1.0}, r"model.dropout=1.0"),
    ],
)
def test_bad_options_are_named_without_building(config, message):
    with pytest.raises(ConfigError, match=message):
        check_config(config)
    cls = DCN if config["_target_"].endswith("DCN") else DeepFM
    options = {k: v for k, v in config.items() if k != "_target_"}
    with pytest.raises(ConfigError, match=message):
        cls(CARDINALITIES, NUM_DENSE, **options)


@pytest.mark.parametrize(
    ("model", "override"), [("dcn", "cross_layers=0"), ("deepfm", "hidden=[0]")]
)
def test_the_job_stops_on_a_bad_option_before_the_data(model, override, tmp_path):
    cfg = compose(f"model={model}", f"model.{override}", f"paths.output_dir={tmp_path}")
    with pytest.raises(ConfigError, match=re.escape(f"model.{override}")):
        config_checks.check(OmegaConf.to_container(cfg, resolve=True))


def test_defaults_come_from_each_class():
    check_config({"_target_": "train.model.DCN"})
    check_config({"_target_": "train.model.DeepFM"})
    with pytest.raises(ConfigError, match=r"model\.cross_rank=2\.5"):
        check_config({"_target_": "train.model.DCN", "cross_rank": 2.5})


@pytest.mark.parametrize("name", list(VARIANTS))
def test_dense_features_are_optional_and_the_tower_is_every_dense_part(name):
    cls, options = VARIANTS[name]
    net = cls(CARDINALITIES, 0, embedding_dim=4, hidden=[8], **options)
    logits = net(inputs()[0], torch.zeros(ROWS, 0))
    assert logits.shape == (ROWS,) and torch.isfinite(logits).all()
    # compile=tower compiles these; the tables (both of DeepFM's) and the FM sum stay eager
    expected = [net.mlp] if cls is DeepFM else [net.cross, net.mlp, net.output]
    assert tower_parts(net) == expected


@pytest.mark.parametrize("name", ["dcn", "deepfm"])
def test_checkpoint_scores_warm_starts_and_exports(name, tmp_path: Path):
    target = {"dcn": "train.model.DCN", "deepfm": "train.model.DeepFM"}[name]
    checkpoint = load(str(write_checkpoint(tmp_path / "m.ckpt", target=target)))
    net = checkpoint.scorer.network
    assert isinstance(net, DCN if name == "dcn" else DeepFM)
    # warm start shifts the bias of the last single-output Linear: one that moves the logit
    output = _output_layer(net)
    assert output is (net.output if name == "dcn" else net.mlp[-1])
    categorical = torch.randint(0, 10, (4, len(SPEC["categorical"])))
    dense = torch.randn(4, len(SPEC["dense"]))
    with torch.no_grad():
        before = net(categorical, dense)
        output.bias += 0.5
        torch.testing.assert_close(net(categorical, dense), before + 0.5)
        output.bias -= 0.5
    assert build(checkpoint).max_difference <= 1e-5  # torch.export of the scorer, reloaded


@pytest.mark.e2e
@pytest.mark.parametrize("model", ["dcn", "deepfm"])
def test_learns_on_the_simulated_feed(model, tmp_path: Path):
    run = tmp_path / "run"
    train_in_process(
        *FEED,
        f"model={model}",
        "trainer.max_epochs=3",
        "callbacks.early_stopping=null",
        output_dir=run,
    )
    # one row per epoch, then the closing validation of the best checkpoint
    aucs = [row["val/click/auc"] for row in log_rows(run) if "val/click/auc" in row]
    assert len(aucs) == 4 and all(math.isfinite(a) for a in aucs), aucs
    assert aucs[2] > aucs[0], aucs
