"""Small optimization problems shared by the optimizer tests."""

from __future__ import annotations

import math

import torch


def rotated_covariance(d: int, condition: float, gen: torch.Generator) -> torch.Tensor:
    """A random rotation of diag(condition^(-i/(d-1))): eigenvalues from 1 down to 1/condition."""
    Q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64)).Q
    scales = condition ** (-torch.arange(d, dtype=torch.float64) / (d - 1))
    return (Q * scales) @ Q.T


class KroneckerLeastSquares:
    """min_W E‖M^{1/2}(W - W*) x‖² with x ~ N(0, Σ): its Hessian is Σ ⊗ M, ill-conditioned
    and rotated, the case SOAP's eigenbasis is built for."""

    def __init__(self, n_in: int = 64, n_out: int = 32, batch: int = 256, seed: int = 0,
                 input_condition: float = 1e4, output_condition: float = 1e3) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x_factor = torch.linalg.cholesky(rotated_covariance(n_in, input_condition, gen))
        self.y_mix = torch.linalg.cholesky(rotated_covariance(n_out, output_condition, gen))
        self.target = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
        self.batch, self.n_in, self.n_out, self.seed = batch, n_in, n_out, seed
        self.eval_x = self.sample(torch.Generator().manual_seed(seed + 1), 4096)

    def sample(self, gen: torch.Generator, n: int) -> torch.Tensor:
        return (torch.randn(n, self.n_in, generator=gen, dtype=torch.float64) @ self.x_factor.T)

    def loss(self, W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        err = (x @ (W - self.target).T) @ self.y_mix
        return err.square().sum(1).mean()

    def run(self, name: str, steps: int, **kw) -> list[float]:
        """Train from zero with a fixed batch sequence; return the eval loss after each step."""
        import soaplab

        W = torch.nn.Parameter(torch.zeros(self.n_out, self.n_in, dtype=torch.float64))
        opt = soaplab.optimizer(name, [W], **kw)
        gen = torch.Generator().manual_seed(self.seed + 2)
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            self.loss(W, self.sample(gen, self.batch)).backward()
            opt.step()
            with torch.no_grad():
                losses.append(self.loss(W, self.eval_x).item())
        return losses


class IllConditionedRegression:
    """Issue 22's test of low-memory state: a ``Linear(n_in, n_out, bias=False)`` from zero
    learns y = B W* a + noise from a = A x, x ~ N(0, I), with A = U_in diag(logspace(0, -2))
    and B = U_out diag(logspace(0, -1.5)) (U random orthogonal: condition 1e4 of the input
    gram, 1e3 of the output's), W* ~ N(0, 1) and noise std 1e-3 (an MSE floor of 1e-6). fp32,
    fresh batches, lr warmed up over 20 steps then cosine to 0, betas (0.95, 0.95), no weight
    decay, precondition_frequency 10; the loss is the MSE on held-out samples. Its factors'
    small eigen-directions decide the last digits, where bf16 factors drop them."""

    def __init__(self, n_in: int = 64, n_out: int = 32, batch: int = 256, steps: int = 300,
                 seed: int = 0, held_out: int = 8192) -> None:
        gen = torch.Generator().manual_seed(seed)
        u_in = torch.linalg.qr(torch.randn(n_in, n_in, generator=gen)).Q
        u_out = torch.linalg.qr(torch.randn(n_out, n_out, generator=gen)).Q
        self.A = u_in * torch.logspace(0, -2, n_in)
        B = u_out * torch.logspace(0, -1.5, n_out)
        self.target = B @ torch.randn(n_out, n_in, generator=gen)  # B W*: y = target a + noise
        self.n_in, self.batch, self.steps, self.seed = n_in, batch, steps, seed
        self.held_out = self.sample(torch.Generator().manual_seed(seed + 1), held_out)

    def sample(self, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.randn(n, self.n_in, generator=gen) @ self.A.T
        y = a @ self.target.T
        return a, y + 1e-3 * torch.randn(y.shape, generator=gen)

    def lr_factor(self, t: int) -> float:
        return min(1.0, (t + 1) / 20) * 0.5 * (1 + math.cos(math.pi * t / self.steps))

    def run(self, name: str, lr: float, **kw) -> float:
        """Train with a fixed batch sequence; return the held-out MSE at the end."""
        import soaplab

        model = torch.nn.Linear(self.n_in, self.target.shape[0], bias=False)
        torch.nn.init.zeros_(model.weight)
        opt = soaplab.optimizer(name, model, lr=lr, betas=(0.95, 0.95), weight_decay=0,
                                precondition_frequency=10, **kw)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        gen = torch.Generator().manual_seed(self.seed + 2)
        for _ in range(self.steps):
            a, y = self.sample(gen, self.batch)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(a), y).backward()
            opt.step()
            schedule.step()
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(self.held_out[0]), self.held_out[1]).item()


class TwoBlobs:
    """pytorch_optimizer's test problem: two Gaussian blobs in 2-D, centred at ±(2, 2) with
    standard deviation 2, told apart by a 2-2-1 ReLU network under the logistic loss."""

    def __init__(self, n: int = 100, seed: int = 42) -> None:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 2, generator=gen) * 2
        x[: n // 2] -= 2
        x[n // 2:] += 2
        self.x = x
        self.y = torch.cat([torch.zeros(n // 2, 1), torch.ones(n - n // 2, 1)])
        self.seed = seed

    def run(self, name: str, steps: int, **kw) -> list[float]:
        """Train a fresh network; return the training loss before each step and at the end."""
        import soaplab

        torch.manual_seed(self.seed)
        model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
        opt = soaplab.optimizer(name, model.parameters(), **kw)
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(self.x), self.y)
            loss.backward()
            losses.append(loss.item())
            opt.step()
        with torch.no_grad():
            losses.append(torch.nn.functional.binary_cross_entropy_with_logits(
                model(self.x), self.y).item())
        return losses


def step_both(a: torch.optim.Optimizer, ps: list[torch.Tensor], b: torch.optim.Optimizer,
              qs: list[torch.Tensor], steps: list[list[torch.Tensor]]) -> None:
    """Step two optimizers side by side on the same gradients (copies of each)."""
    for step in steps:
        for p, q, g in zip(ps, qs, step, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
