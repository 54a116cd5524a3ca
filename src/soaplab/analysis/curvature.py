"""Curvature and gradient second moments of one weight matrix of a classifier, via torch.func.

Every matrix here is (mn)×(mn) over row-major ``vec(W)`` of the chosen m×n weight, with the rest
of the model frozen. For softmax cross-entropy the per-example gradient for class c is
``g_{x,c} = J_xᵀ (p_x − e_c)``, so

* the Gauss-Newton matrix ``E_x[J_xᵀ (diag p_x − p_x p_xᵀ) J_x] = E_x Σ_c p_c(x) g_{x,c} g_{x,c}ᵀ``
  is the Fisher with labels sampled from the model, computed here exactly (all classes);
* the empirical Fisher is ``E_{x,y}[g_{x,y} g_{x,y}ᵀ]`` with the real labels;
* the gradient covariance is the same, centred on the mean gradient.

One vmap over examples × classes (:func:`class_gradients`) yields all of them, and the
real-label gradient of example x is simply its row at class y.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, vmap


def _layer_loss(model: nn.Module, name: str):
    """loss(W, x, y) for one example, with every parameter but ``name`` taken from ``model``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(W: Tensor, x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(model, {**params, name: W}, (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    return loss


def _weight(model: nn.Module, name: str) -> Tensor:
    W = dict(model.named_parameters()).get(name)
    if W is None or W.ndim != 2:
        matrices = [k for k, v in model.named_parameters() if v.ndim == 2]
        raise ValueError(f"no 2-D parameter named {name!r}; choose one of {matrices}")
    return W.detach()


def per_example_gradients(model: nn.Module, name: str, x: Tensor, y: Tensor) -> Tensor:
    """Gradients of each example's loss with respect to weight ``name``: shape (N, m, n)."""
    W = _weight(model, name)
    return vmap(grad(_layer_loss(model, name)), in_dims=(None, 0, 0))(W, x, y)


def class_gradients(model: nn.Module, name: str, x: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients for every (example, class) pair, (N, k, m, n), and the probabilities (N, k)."""
    W = _weight(model, name)
    with torch.no_grad():
        probs = model(x).softmax(-1)
    classes = torch.arange(probs.shape[1], device=x.device)
    per_class = vmap(grad(_layer_loss(model, name)), in_dims=(None, None, 0))
    grads = vmap(per_class, in_dims=(None, 0, None))(W, x, classes)
    return grads, probs


def second_moment(grads: Tensor, weights: Tensor | None = None) -> Tensor:
    """Σ_k w_k vec(G_k) vec(G_k)ᵀ for grads (K, m, n); uniform weights 1/K by default."""
    flat = grads.reshape(grads.shape[0], -1)
    if weights is None:
        return flat.T @ flat / flat.shape[0]
    return (flat * weights.reshape(-1, 1)).T @ flat


def gauss_newton(grads: Tensor, probs: Tensor) -> Tensor:
    """GGN = E_x Σ_c p_c(x) g_{x,c} g_{x,c}ᵀ from :func:`class_gradients`' output."""
    return second_moment(grads.flatten(0, 1), probs.flatten() / probs.shape[0])


def real_label_gradients(grads: Tensor, y: Tensor) -> Tensor:
    """Pick each example's gradient at its true class from (N, k, m, n) class gradients."""
    return grads[torch.arange(len(y), device=y.device), y]


def sampled_label_gradients(grads: Tensor, probs: Tensor, generator: torch.Generator) -> Tensor:
    """Each example's gradient at one label drawn from the model's own p(·|x)."""
    labels = torch.multinomial(probs.to(torch.float64), 1, generator=generator).squeeze(1)
    return real_label_gradients(grads, labels.to(grads.device))


def covariance(grads: Tensor) -> Tensor:
    """Centred covariance of per-example gradients (N, m, n)."""
    return second_moment(grads - grads.mean(0, keepdim=True))


def batch_gradients(grads: Tensor, batch_size: int, repeats: int,
                    generator: torch.Generator) -> Tensor:
    """Mini-batch mean gradients (K, m, n) from per-example ones: ``repeats`` random partitions
    of the examples into batches of ``batch_size`` (what Shampoo's statistics actually see)."""
    N = grads.shape[0]
    if not 1 <= batch_size <= N:
        raise ValueError(f"batch_size={batch_size} must lie in [1, {N}] (the probe set size)")
    usable = N // batch_size * batch_size
    batches = []
    for _ in range(repeats):
        order = torch.randperm(N, generator=generator)[:usable].to(grads.device)
        batches.append(grads[order].reshape(-1, batch_size, *grads.shape[1:]).mean(1))
    return torch.cat(batches)


def layer_hessian(model: nn.Module, name: str, x: Tensor, y: Tensor) -> Tensor:
    """Exact Hessian of the mean loss with respect to weight ``name``: shape (mn, mn)."""
    W = _weight(model, name)
    loss = _layer_loss(model, name)

    def mean_loss(W: Tensor) -> Tensor:
        return vmap(loss, in_dims=(None, 0, 0))(W, x, y).mean()

    return hessian(mean_loss)(W).reshape(W.numel(), W.numel())
