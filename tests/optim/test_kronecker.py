"""Factor plans, statistics and projections against dense Kronecker products (float64)."""

import pytest
import torch

from soaplab.optim import kronecker as kr

from .dense import kron, rotation, unfold


@pytest.mark.parametrize(("shape", "merged"), [
    ((1024, 1024, 3, 3), (1024, 9216)),
    ((128, 64, 3, 3), (8192, 9)),
    ((64, 3, 7, 7), (9408,)),
    ((20000, 3, 3), (20000, 9)),
    ((5,), (5,)),
])
def test_merge_shape_follows_reference_rule(shape, merged):
    assert kr.merge_shape(shape, 10000) == merged


@pytest.mark.parametrize(("shape", "kwargs", "plan_shape", "axes"), [
    ((7,), {}, (7,), ()),
    ((7,), {"precondition_1d": True}, (7,), (0,)),
    ((7,), {"precondition_1d": True, "max_precond_dim": 5}, (7,), ()),
    ((), {}, (1,), ()),
    ((0, 4), {}, (0, 4), ()),
    ((50, 8), {"max_precond_dim": 20}, (50, 8), (1,)),
    ((8, 4, 3, 3), {}, (8, 4, 3, 3), (0, 1, 2, 3)),
    ((8, 4, 3, 3), {"merge_dims": True, "max_precond_dim": 40}, (32, 9), (0, 1)),
    ((64, 3, 7, 7), {"merge_dims": True}, (9408,), (0,)),
    ((30, 10), {"one_sided": True}, (30, 10), (1,)),
    ((8, 1), {}, (8, 1), (0,)),
])
def test_plan_factors(shape, kwargs, plan_shape, axes):
    plan = kr.plan_factors(shape, **{"max_precond_dim": 10000, **kwargs})
    assert plan.shape == plan_shape
    assert plan.axes == axes


def test_channels_last_permutes_tensorflow_layout_before_merging():
    plan = kr.plan_factors((8, 3, 3, 4), max_precond_dim=40, merge_dims=True,
                           data_format="channels_last")
    assert plan.channels_last and plan.shape == (32, 9)
    w = torch.randn(8, 3, 3, 4)
    viewed = kr.to_plan_shape(w, plan)
    torch.testing.assert_close(viewed, w.permute(0, 3, 1, 2).reshape(32, 9))
    torch.testing.assert_close(kr.from_plan_shape(viewed, plan, w.shape), w)


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 2), (3, 2, 4, 2)])
def test_gram_is_the_mode_unfolding_product(shape):
    X = torch.randn(2, *shape, dtype=torch.float64)
    for axis in range(len(shape)):
        expected = torch.stack([unfold(x, axis) @ unfold(x, axis).T for x in X])
        torch.testing.assert_close(kr.gram(X, axis), expected)


def test_update_factors_is_an_ema_of_grams():
    X = torch.randn(1, 4, 3, dtype=torch.float64)
    L, R = torch.rand(1, 4, 4, dtype=torch.float64), torch.rand(1, 3, 3, dtype=torch.float64)
    factors = {0: L.clone(), 1: R.clone()}
    kr.update_factors(factors, X, 0.9)
    torch.testing.assert_close(factors[0][0], 0.9 * L[0] + 0.1 * X[0] @ X[0].T)
    torch.testing.assert_close(factors[1][0], 0.9 * R[0] + 0.1 * X[0].T @ X[0])


@pytest.mark.parametrize(("shape", "axes"), [((5, 3), (0, 1)), ((4, 3, 2), (0, 2)),
                                             ((3, 2, 4, 2), (0, 1, 2, 3)), ((6,), (0,))])
def test_project_equals_kronecker_rotation(shape, axes):
    X = torch.randn(2, *shape, dtype=torch.float64)
    bases = {k: torch.linalg.qr(torch.randn(2, shape[k], shape[k], dtype=torch.float64)).Q
             for k in axes}
    rotated = kr.project(X, bases)
    for b in range(2):
        K = rotation(shape, {k: Q[b] for k, Q in bases.items()})
        torch.testing.assert_close(rotated[b].reshape(-1), K.T @ X[b].reshape(-1))
    torch.testing.assert_close(kr.project_back(rotated, bases), X)


def test_permute_axis_per_batch_item():
    X = torch.arange(2 * 3 * 2, dtype=torch.float64).reshape(2, 3, 2)
    order = torch.tensor([[2, 0, 1], [1, 2, 0]])
    out = kr.permute_axis(X, order, 0)
    for b in range(2):
        torch.testing.assert_close(out[b], X[b][order[b]])


def test_kron_helper_is_row_major_vec_identity():
    A, B, X = (torch.randn(3, 3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64),
               torch.randn(3, 2, dtype=torch.float64))
    torch.testing.assert_close((A @ X @ B.T).reshape(-1), kron([A, B]) @ X.reshape(-1))
