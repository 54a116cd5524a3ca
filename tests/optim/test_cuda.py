"""The same optimizers on a CUDA device (skipped where none is present): results agree with
the CPU float64 path, state stays on the device and checkpoints load across devices."""

import copy

import pytest
import torch

from soaplab import SOAP, Shampoo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def run(make, device, dtype, steps=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Square and 4-D shapes whose first gradient gives full-rank factors: their eigenbases are
    # unique up to sign (which SOAP is blind to), so cuSOLVER and LAPACK must agree.
    shapes = [(8, 8), (8, 8), (8,), (4, 3, 3, 3)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype))
          for s in shapes]
    opt = make(ps)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device, dtype)
        opt.step()
    return ps, opt


def step_together(a, ps, b, qs, steps=4):
    """Feed both optimizers the same gradients; their parameters must stay bitwise equal."""
    for _ in range(steps):
        for p, q in zip(ps, qs, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs, strict=True))


OPTIMIZERS = {
    "soap": lambda ps: SOAP(ps, lr=0.01, precondition_frequency=3),
    "soap_factorized": lambda ps: SOAP(ps, lr=0.01, precondition_frequency=3, factorized=True),
    "shampoo": lambda ps: Shampoo(ps, lr=0.01, precondition_frequency=3),
}


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_cuda_float64_matches_cpu_float64(make):
    cpu, _ = run(make, "cpu", torch.float64)
    gpu, opt = run(make, "cuda", torch.float64)
    for p, q in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(q.cpu(), p, atol=1e-8, rtol=1e-8)
    assert all(v.device.type == "cuda" for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v))


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_cuda_bf16_params_train_with_fp32_state(make):
    ps, opt = run(make, "cuda", torch.bfloat16)
    assert all(torch.isfinite(p).all() and p.dtype == torch.bfloat16 for p in ps)
    assert all(v.dtype == torch.float32 for s in opt.state.values() for k, v in s.items()
               if k.startswith(("factor", "basis")))


def test_checkpoint_moves_between_cpu_and_cuda_bitwise():
    ps, opt = run(OPTIMIZERS["soap"], "cuda", torch.float32, steps=4)
    saved = copy.deepcopy(opt.state_dict())
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    resumed = OPTIMIZERS["soap"](qs)
    resumed.load_state_dict({**saved, "state": {k: {n: v.cpu() if torch.is_tensor(v) else v
                                                     for n, v in s.items()}
                                                 for k, s in saved["state"].items()}})
    assert all(v.is_cuda for s in resumed.state.values() for v in s.values()
               if torch.is_tensor(v))
    step_together(opt, ps, resumed, qs)


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_cuda_copy_steps_bitwise_and_overflow_is_refused(make):
    ps, opt = run(make, "cuda", torch.float32, steps=4)
    twin = copy.deepcopy(opt)
    qs = twin.param_groups[0]["params"]
    step_together(opt, ps, twin, qs)
    for p in ps:
        p.grad = torch.randn_like(p) * 1e20
    with pytest.raises(ValueError, match="would overflow"):
        opt.step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_cuda_nonfinite_gradient_is_refused_before_any_state_changes(bad):
    ps, opt = run(OPTIMIZERS["soap"], "cuda", torch.float32, steps=2)
    before = copy.deepcopy(opt.state_dict())
    for p in ps:
        p.grad = torch.randn_like(p)
    ps[1].grad[3, 5] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        opt.step()
    after = opt.state_dict()["state"]
    assert all(torch.equal(v, after[k][n]) for k, s in before["state"].items()
               for n, v in s.items() if torch.is_tensor(v))


def test_one_optimizer_over_cpu_and_cuda_parameters_steps_both_alike():
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(8, 8, generator=gen)
    on_cpu, on_gpu = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.cuda())
    opt = SOAP([on_cpu, on_gpu], lr=0.01, precondition_frequency=3)
    for _ in range(7):
        grad = torch.randn(8, 8, generator=gen)
        on_cpu.grad, on_gpu.grad = grad.clone(), grad.cuda()
        opt.step()
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-5, rtol=1e-5)
    assert not torch.equal(on_cpu, start)
