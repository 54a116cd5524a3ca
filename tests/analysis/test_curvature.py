"""torch.func curvature against per-example loops and dense Jacobians, in float64."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from soaplab.analysis import curvature as cv
from soaplab.analysis.study import mlp

D = torch.float64


@pytest.fixture
def problem():
    model = mlp(5, 4, 3, "tanh").double()
    x, y = torch.randn(7, 5, dtype=D), torch.randint(0, 3, (7,))
    return model, x, y


def loop_gradients(model: nn.Module, name: str, x, y) -> torch.Tensor:
    W = dict(model.named_parameters())[name]
    return torch.stack([torch.autograd.grad(F.cross_entropy(model(xi[None]), yi[None]), W)[0]
                        for xi, yi in zip(x, y, strict=True)])


@pytest.mark.parametrize("name", ["0.weight", "2.weight", "4.weight"])
def test_per_example_gradients_equal_a_loop(problem, name):
    model, x, y = problem
    torch.testing.assert_close(cv.per_example_gradients(model, name, x, y),
                               loop_gradients(model, name, x, y))
    grads, probs = cv.class_gradients(model, name, x)
    torch.testing.assert_close(cv.real_label_gradients(grads, y), loop_gradients(model, name, x, y))
    torch.testing.assert_close(probs, model(x).softmax(-1))


@pytest.mark.parametrize("name", ["0.weight", "4.weight"])
def test_gauss_newton_equals_dense_jacobian_form(problem, name):
    model, x, _ = problem
    W = dict(model.named_parameters())[name]
    expected = torch.zeros(W.numel(), W.numel(), dtype=D)
    for xi in x:
        def logits(w, xi=xi):
            return torch.func.functional_call(model, {name: w}, (xi[None],))[0]

        J = torch.autograd.functional.jacobian(logits, W.detach()).reshape(3, -1)
        p = logits(W).softmax(-1).detach()
        expected += J.T @ (torch.diag(p) - torch.outer(p, p)) @ J / len(x)
    torch.testing.assert_close(cv.gauss_newton(*cv.class_gradients(model, name, x)), expected)


def test_layer_hessian_matches_autograd_and_differs_from_ggn_for_tanh(problem):
    model, x, y = problem
    W = dict(model.named_parameters())["0.weight"]

    def loss(w):
        return F.cross_entropy(torch.func.functional_call(model, {"0.weight": w}, (x,)), y)

    expected = torch.autograd.functional.hessian(loss, W.detach()).reshape(W.numel(), -1)
    H = cv.layer_hessian(model, "0.weight", x, y)
    torch.testing.assert_close(H, expected)
    ggn = cv.gauss_newton(*cv.class_gradients(model, "0.weight", x))
    assert (H - ggn).norm() > 1e-3 * ggn.norm()  # tanh curvature adds a residual term


def test_layer_hessian_equals_ggn_when_the_output_is_piecewise_linear_in_the_layer():
    model = mlp(5, 4, 3, "relu").double()
    x, y = torch.randn(9, 5, dtype=D), torch.randint(0, 3, (9,))
    for name in ("0.weight", "2.weight"):
        ggn = cv.gauss_newton(*cv.class_gradients(model, name, x))
        torch.testing.assert_close(cv.layer_hessian(model, name, x, y), ggn)


def test_covariance_matches_numpy(problem):
    model, x, y = problem
    G = cv.per_example_gradients(model, "2.weight", x, y)
    expected = np.cov(G.reshape(len(G), -1).numpy().T, bias=True)
    np.testing.assert_allclose(cv.covariance(G).numpy(), expected, atol=1e-14)


def test_sampled_labels_average_to_the_gauss_newton(problem):
    model, x, _ = problem
    grads, probs = cv.class_gradients(model, "4.weight", x)
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([cv.sampled_label_gradients(grads, probs, gen) for _ in range(4000)])
    ggn = cv.gauss_newton(grads, probs)
    assert (cv.second_moment(draws) - ggn).norm() < 0.05 * ggn.norm()


def test_batch_gradients_are_means_of_disjoint_batches():
    G = torch.randn(10, 2, 3, dtype=D)
    batches = cv.batch_gradients(G, 5, 3, torch.Generator().manual_seed(0))
    assert batches.shape == (6, 2, 3)
    torch.testing.assert_close(batches.reshape(3, 2, 2, 3).mean(1),
                               G.mean(0).expand(3, 2, 3))  # each partition covers all examples
    with pytest.raises(ValueError, match="batch_size"):
        cv.batch_gradients(G, 11, 1, torch.Generator())


def test_unknown_layer_names_the_choices(problem):
    model, x, y = problem
    with pytest.raises(ValueError, match="0.weight"):
        cv.per_example_gradients(model, "0.bias", x, y)
