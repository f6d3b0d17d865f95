"""Weight-scheme maths, and the loss it feeds: weighting = duplicating rows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from train.model import DNN
from train.objective import weighted_bce
from train.weights import SchemeError, Term, WeightScheme, build_scheme

NAMES = ["click", "finish", "watch_time"]


def seed_scheme(**changes) -> WeightScheme:
    terms = [
        {"behaviour": "click", "coef": 1, "transform": "indicator"},
        {"behaviour": "finish", "coef": 3, "transform": "indicator"},
        {"behaviour": "watch_time", "coef": 5, "transform": "threshold", "threshold": 30},
    ]
    return build_scheme(label="click", terms=terms, **changes)


def rows(*values: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_seed_table_sum_and_max():
    data = rows((0, 0, 0), (1, 0, 5), (1, 1, 10), (1, 1, 45), (1, 0, 30))
    assert seed_scheme().weights(data, NAMES).tolist() == [1, 1, 4, 9, 6]
    assert seed_scheme(combine="max").weights(data, NAMES).tolist() == [1, 1, 3, 5, 5]
    assert seed_scheme(negative_weight=0.5).weights(data, NAMES)[0].item() == 0.5


def test_transforms_and_caps():
    values = torch.tensor([0.0, 0.5, 2.0, 100.0])
    assert Term("w", 1, "indicator")(values).tolist() == [0, 1, 1, 1]
    assert Term("w", 2, "threshold", threshold=2)(values).tolist() == [0, 0, 2, 2]
    assert Term("w", 1, "linear", cap=10)(values).tolist() == [0, 0.5, 2, 10]
    torch.testing.assert_close(Term("w", 1, "log1p")(values), torch.log1p(values), rtol=0, atol=0)


def test_no_terms_is_click_only():
    data = rows((0, 1, 50), (1, 1, 50), (1, 0, 0))
    assert build_scheme(label="click").weights(data, NAMES).tolist() == [1, 1, 1]


def test_label_is_any_behaviour():
    # a finish-labelled model: only finished plays are positives
    scheme = build_scheme(
        label="finish", terms=[{"behaviour": "watch_time", "transform": "linear"}]
    )
    data = rows((1, 0, 12), (1, 1, 40), (0, 0, 0))
    assert scheme.weights(data, NAMES).tolist() == [1, 40, 1]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 1),
            st.integers(0, 1),
            st.floats(0, 1e4, allow_nan=False, allow_infinity=False, width=32),
        ),
        min_size=1,
        max_size=50,
    ),
    st.floats(0, 20, allow_nan=False),
    st.floats(0, 20, allow_nan=False),
    st.floats(0, 5, allow_nan=False),
    st.sampled_from(["sum", "max"]),
)
def test_property_matches_row_by_row(values, finish, watch, negative, combine):
    scheme = build_scheme(
        label="click",
        terms=[
            {"behaviour": "click", "coef": 1.0},
            {"behaviour": "finish", "coef": finish},
            {"behaviour": "watch_time", "coef": watch, "transform": "log1p", "cap": 6.0},
        ],
        combine=combine,
        negative_weight=negative,
    )
    data = rows(*values)
    got = scheme.weights(data, NAMES)
    for (click, fin, seconds), w in zip(values, got.tolist(), strict=True):
        seconds = float(torch.tensor(seconds, dtype=torch.float32))
        parts = [1.0 * (click > 0), finish * (fin > 0), watch * min(math.log1p(seconds), 6.0)]
        expected = (sum(parts) if combine == "sum" else max(parts)) if click > 0 else negative
        assert w == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert w >= 0 and math.isfinite(w)


@pytest.mark.parametrize(
    ("terms", "kwargs", "message"),
    [
        ([{"behaviour": "click", "coef": -1}], {}, "coef must be a finite number >= 0"),
        ([{"behaviour": "click", "coef": float("nan")}], {}, "'click'"),
        ([{"behaviour": "click", "coef": float("inf")}], {}, "coef must be"),
        ([{"behaviour": "finish", "transform": "square"}], {}, "transform 'square'"),
        ([{"behaviour": "watch_time", "transform": "threshold"}], {}, "needs a finite `threshold`"),
        ([{"behaviour": "finish", "threshold": 3}], {}, "only used by transform 'threshold'"),
        ([{"behaviour": "finish", "cap": -2}], {}, "cap must be"),
        ([{"behavior": "finish"}], {}, "expected keys behaviour"),
        ([], {"combine": "avg"}, "combine"),
        ([], {"negative_weight": -1.0}, "negative_weight"),
        ([], {"normalize": "median"}, "normalize"),
        ([], {"finish": "three"}, "weights.finish is not a term field and not a number"),
    ],
)
def test_invalid_schemes_are_named(terms, kwargs, message):
    with pytest.raises(SchemeError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build_scheme(label="click", terms=terms, **kwargs)


def test_unknown_behaviour_names_term_and_behaviour():
    scheme = build_scheme(label="click", terms=[{"behaviour": "click"}, {"behaviour": "share"}])
    with pytest.raises(SchemeError, match=r"weights.terms\[1\].*'share'.*data.behaviours has"):
        scheme.check_behaviours(NAMES)
    with pytest.raises(SchemeError, match=r"weights\.label 'purchase'"):
        build_scheme(label="purchase").check_behaviours(NAMES)


def test_data_that_makes_weights_non_finite_is_named():
    scheme = build_scheme(label="click", terms=[{"behaviour": "watch_time", "transform": "linear"}])
    data = rows((1, 0, 10), (1, 0, float("inf")))
    with pytest.raises(SchemeError, match=r"terms\[0\].*'watch_time'.*inf"):
        scheme.check_values(data, NAMES, "train split")
    scheme.check_values(rows((1, 0, 10), (0, 0, float("inf"))), NAMES, "negatives do not count")


def test_knobs_are_kept_for_labels():
    scheme = build_scheme(label="click", terms=[{"behaviour": "finish", "coef": 5}], finish=5)
    assert scheme.knobs == {"finish": 5.0}
    assert "5*[finish > 0]" in scheme.describe()


def test_weighted_gradients_equal_repeated_rows():
    """Integer weights == each row repeated w times: the same gradient, to float precision."""
    torch.manual_seed(0)
    model = DNN([50, 20], num_dense=3, hidden=(16, 8), dropout=0.0, sparse_embeddings=False)
    n = 64
    categorical = torch.stack([torch.randint(0, 50, (n,)), torch.randint(0, 20, (n,))], 1)
    dense = torch.randn(n, 3)
    behaviours = torch.stack(
        [torch.randint(0, 2, (n,)).float(), torch.randint(0, 2, (n,)).float(), torch.rand(n) * 60],
        1,
    )
    weight = seed_scheme().weights(behaviours, NAMES)
    assert set(weight.unique().tolist()) > {1.0}
    label = behaviours[:, 0]

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    weighted = grads(weighted_bce(model(categorical, dense), label, weight, weight.sum()))
    repeat = weight.long()
    repeated = grads(
        F.binary_cross_entropy_with_logits(
            model(categorical.repeat_interleave(repeat, 0), dense.repeat_interleave(repeat, 0)),
            label.repeat_interleave(repeat),
        )
    )
    for a, b in zip(weighted, repeated, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
