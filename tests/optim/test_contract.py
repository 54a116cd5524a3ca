"""The torch.optim contract for every soaplab optimizer: validation, shapes, state, schedulers."""

import copy
import warnings

import pytest
import torch

import soaplab
from soaplab import SOAP, Shampoo
from soaplab.optim.kl_shampoo import KLShampoo

from .problems import step_both

OPTIMIZERS = {
    "soap": lambda ps, **kw: SOAP(ps, precondition_frequency=2, **kw),
    "soap_factorized_one_sided": lambda ps, **kw: SOAP(ps, precondition_frequency=2,
                                                       factorized=True, one_sided=True, **kw),
    "shampoo": lambda ps, **kw: Shampoo(ps, precondition_frequency=2, **kw),
    "kl_shampoo": lambda ps, **kw: KLShampoo(ps, precondition_frequency=2, **kw),
}
make = pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())


@pytest.mark.parametrize(("cls", "kwargs", "match"), [
    (SOAP, {"lr": -1.0}, "lr must be a number >= 0"),
    (SOAP, {"eps": -1e-8}, "eps must be"),
    (SOAP, {"betas": (1.0, 0.9)}, r"betas\[0\] must be in \[0, 1\)"),
    (SOAP, {"betas": (0.9, -0.1)}, r"betas\[1\]"),
    (SOAP, {"betas": 0.9}, "betas must be a pair"),
    (SOAP, {"shampoo_beta": 1.5}, "shampoo_beta"),
    (SOAP, {"weight_decay": -0.1}, "weight_decay"),
    (SOAP, {"precondition_frequency": 0}, "precondition_frequency must be an integer >= 1"),
    (SOAP, {"max_precond_dim": -1}, "max_precond_dim"),
    (SOAP, {"data_format": "nhwc"}, "data_format must be one of"),
    (SOAP, {"refresh": "svd"}, "refresh"),
    (SOAP, {"nonfinite": "ignore"}, "nonfinite"),
    (SOAP, {"matrix_dtype": torch.float16}, "matrix_dtype"),
    (Shampoo, {"eps": 0.0}, "eps must be a number > 0"),
    (Shampoo, {"grafting": "lion"}, "grafting must be one of"),
    (Shampoo, {"exponent": -0.25}, "exponent"),
    (Shampoo, {"start_preconditioning_step": 0}, "start_preconditioning_step"),
])
def test_bad_arguments_raise_with_the_argument_named(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)


@make
def test_complex_parameter_is_rejected_at_construction(make):
    with pytest.raises(ValueError, match="complex parameters .* shape \\(2,\\)"):
        make([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])


@make
def test_sparse_gradient_raises_runtime_error(make):
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = make(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients .*SparseAdam"):
        opt.step()


@make
def test_nonfinite_gradient_raises_before_touching_state(make):
    model = torch.nn.Linear(4, 3)
    opt = make(list(model.named_parameters()))
    for _ in range(3):
        model(torch.randn(8, 4)).square().sum().backward()
        opt.step()
    state = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    model.bias.grad[1] = float("nan")
    with pytest.raises(ValueError, match="'bias' with shape \\(3,\\) contains NaN"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    after = opt.state_dict()["state"]
    for key, entry in state["state"].items():
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after[key][name]))


@make
def test_nonfinite_skip_mode_skips_and_counts(make):
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = make([p], nonfinite="skip")
    p.grad = torch.full((4, 3), float("inf"))
    before = p.detach().clone()
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step()
    assert torch.equal(p, before) and opt.skipped_steps == 1 and not opt.state[p]


def test_failed_refresh_keeps_previous_basis_warns_and_counts(break_refresh):
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = SOAP([p], precondition_frequency=1)
    p.grad = torch.randn(5, 3)
    opt.step()
    basis = opt.state[p]["basis_0"].clone()
    break_refresh("soaplab.optim.soap.power_qr_step")
    p.grad = torch.randn(5, 3)
    with pytest.warns(RuntimeWarning, match="basis refresh of axis 0 failed"):
        opt.step()
    assert torch.equal(opt.state[p]["basis_0"], basis)
    assert opt.matrix_failures == 2 and torch.isfinite(p).all()


@make
def test_all_shapes_step_and_stay_finite(make):
    shapes = [(), (7,), (0, 3), (5, 4), (4, 3, 3, 3), (2, 3, 4)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    frozen = torch.nn.Parameter(torch.randn(3))  # never gets a gradient
    opt = make(params + [frozen])
    for _ in range(5):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert frozen not in opt.state or not opt.state[frozen]


@pytest.mark.parametrize("kwargs", [{"merge_dims": True}, {"merge_dims": True,
                                                            "max_precond_dim": 20},
                                    {"precondition_1d": True}])
def test_conv_and_vector_options(kwargs):
    conv = torch.nn.Conv2d(3, 8, 3)
    opt = SOAP(conv.parameters(), **kwargs)
    for _ in range(4):
        conv(torch.randn(2, 3, 6, 6)).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(torch.isfinite(p).all() for p in conv.parameters())


@make
def test_param_groups_behave_as_separate_optimizers(make):
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))
    a2, b2 = (torch.nn.Parameter(x.detach().clone()) for x in (a, b))
    together = make([{"params": [a], "lr": 0.01}, {"params": [b], "lr": 0.1}])
    apart = [make([a2], lr=0.01), make([b2], lr=0.1)]
    for _ in range(4):
        ga, gb = torch.randn(4, 3), torch.randn(3)
        a.grad, b.grad, a2.grad, b2.grad = ga, gb, ga.clone(), gb.clone()
        together.step()
        for o in apart:
            o.step()
    assert torch.equal(a, a2) and torch.equal(b, b2)


@make
def test_add_param_group_and_closure(make):
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(2, 2))
    opt = make([a])
    opt.add_param_group({"params": [b], "lr": 0.0})

    def closure():
        opt.zero_grad()
        loss = a.square().sum() + b.square().sum()
        loss.backward()
        return loss

    b_start = b.detach().clone()
    losses = [opt.step(closure).item() for _ in range(6)]
    assert losses[-1] < losses[0] and torch.equal(b, b_start)


@make
def test_lr_scheduler_changes_the_step_it_reads_each_step(make):
    p = torch.nn.Parameter(torch.randn(4, 3))
    q = torch.nn.Parameter(p.detach().clone())
    opt, fixed = make([p], lr=0.1), make([q], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 3 else 1.0)
    for _ in range(3):
        g = torch.randn(4, 3)
        p.grad, q.grad = g, g.clone()
        opt.step()
        fixed.step()
        sched.step()
    frozen = p.detach().clone()
    p.grad, q.grad = torch.randn(4, 3), torch.randn(4, 3)
    opt.step()
    fixed.step()
    assert torch.equal(p, frozen) and not torch.equal(q, frozen)


@make
def test_grad_scaler_unscales_and_skips_inf_steps(make):
    model = torch.nn.Linear(4, 2)
    opt = make(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(model(torch.randn(8, 4)).square().mean()).backward()
        scaler.step(opt)
        scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@make
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_is_bitwise_and_keeps_fp32_matrices(make, dtype):
    def build():
        torch.manual_seed(3)
        return [torch.nn.Parameter(torch.randn(6, 4).to(dtype)),
                torch.nn.Parameter(torch.randn(5).to(dtype))]

    grads = [[torch.randn(6, 4).to(dtype), torch.randn(5).to(dtype)] for _ in range(9)]
    ps = build()
    opt = make(ps)
    for gs in grads[:4]:
        for p, g in zip(ps, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    resumed = make(qs)
    resumed.load_state_dict(saved)
    matrices = [v for k, v in resumed.state[qs[0]].items() if k.startswith(("factor", "basis"))]
    assert matrices and all(m.dtype == torch.float32 for m in matrices)
    step_both(opt, ps, resumed, qs, grads[4:])
    assert all(torch.equal(p, q) for p, q in zip(ps, qs, strict=True))


def test_load_state_dict_rejects_mismatched_parameter_count():
    a = torch.nn.Parameter(torch.randn(3, 3))
    opt = SOAP([a])
    a.grad = torch.randn(3, 3)
    opt.step()
    other = SOAP([torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.randn(2))])
    with pytest.raises(ValueError):
        other.load_state_dict(opt.state_dict())


def test_registry_builds_every_name_and_rejects_unknown_ones():
    for name in soaplab.OPTIMIZERS:
        p = torch.nn.Parameter(torch.randn(4, 3))
        params = [{"params": [p], "role": "hidden"}] if soaplab.registry.entry(name).takes_model \
            else [p]
        opt = soaplab.optimizer(name.replace("_", "-"), params, lr=1e-3)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(3):
                p.grad = torch.randn(4, 3)
                opt.step()
        assert torch.isfinite(p).all()
    with pytest.raises(ValueError, match="unknown optimizer 'sgdx'; known optimizers: adafactor"):
        soaplab.optimizer("sgdx", [torch.nn.Parameter(torch.zeros(1))])
