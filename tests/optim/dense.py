"""Independent dense constructions (explicit Kronecker products) used as oracles in float64."""

from __future__ import annotations

from functools import reduce

import torch


def kron(mats: list[torch.Tensor]) -> torch.Tensor:
    return reduce(torch.kron, [m.contiguous() for m in mats])


def unfold(x: torch.Tensor, axis: int) -> torch.Tensor:
    """The mode-``axis`` unfolding: a (d_axis, rest) matrix."""
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def rotation(shape: tuple[int, ...], bases: dict[int, torch.Tensor]) -> torch.Tensor:
    """K = ⊗_k Q_k (identity on axes without a basis); vec_rowmajor(X ×_k Q_kᵀ) = Kᵀ vec(X)."""
    return kron([bases.get(k, torch.eye(d, dtype=torch.float64)) for k, d in enumerate(shape)])


def permute_axis(x: torch.Tensor, order: torch.Tensor, axis: int) -> torch.Tensor:
    return x.index_select(axis, order)


def soap_step(p: torch.Tensor, g: torch.Tensor, state: dict, *, lr: float, betas: tuple,
              eps: float, wd: float, freq: int, shampoo_beta: float) -> tuple[torch.Tensor, dict]:
    """One reference-semantics SOAP step (after the first), on flattened vectors."""
    b1, b2 = betas
    shape = tuple(g.shape)
    axes = sorted(k for k in state if isinstance(k, int))
    bases = {k: state[k]["basis"] for k in axes}
    K = rotation(shape, bases)
    g_rot = K.T @ g.reshape(-1)
    t = state["step"] + 1
    m = b1 * state["m"] + (1 - b1) * g_rot
    v = b2 * state["v"] + (1 - b2) * g_rot**2
    step_size = lr * (1 - b2**t) ** 0.5 / (1 - b1**t)
    p_new = p - step_size * (K @ (m / (v.sqrt() + eps))).reshape(shape)
    p_new = p_new - lr * wd * p_new
    new = {"step": t, "m": m, "v": v}
    for k in axes:
        U = unfold(g, k)
        new[k] = {"factor": shampoo_beta * state[k]["factor"] + (1 - shampoo_beta) * U @ U.T,
                  "basis": bases[k]}
    if t % freq == 0:
        v_tensor = v.reshape(shape)
        for k in axes:
            L, Q = new[k]["factor"], bases[k]
            order = torch.argsort(torch.diag(Q.T @ L @ Q), descending=True)
            new[k]["basis"] = torch.linalg.qr(L @ Q[:, order]).Q
            v_tensor = permute_axis(v_tensor, order, k)
        new["v"] = v_tensor.reshape(-1)
        K_new = rotation(shape, {k: new[k]["basis"] for k in axes})
        new["m"] = K_new.T @ (K @ m)
    return p_new, new
