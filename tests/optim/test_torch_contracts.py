"""torch.optim's contracts beyond the basics (issue 12): copies, portable checkpoints, overflow,
torch's keyword arguments, misuse that used to pass silently, the factored first update, and
the one-way layering of the optimizer package. Each section is one numbered point."""

import ast
import copy
import io
import math
import pickle
from pathlib import Path

import pytest
import torch

import soaplab
from soaplab import SOAP, Shampoo

from .problems import TwoBlobs, step_both

VARIANTS = {
    "soap": lambda ps, **kw: SOAP(ps, precondition_frequency=2, **kw),
    "soap_factorized": lambda ps, **kw: SOAP(ps, precondition_frequency=2, factorized=True,
                                             **kw),
    "soap_one_sided_factorized": lambda ps, **kw: SOAP(ps, precondition_frequency=2,
                                                       factorized=True, one_sided=True, **kw),
    "soap_adaptive": lambda ps, **kw: SOAP(ps, precondition_frequency=2,
                                           refresh_tolerance=0.2, **kw),
    # a budget that affords some refreshes only: its banked credit must travel with the state
    "soap_budget": lambda ps, **kw: SOAP(ps, precondition_frequency=1, refresh_budget=0.2,
                                         **kw),
    "shampoo": lambda ps, **kw: Shampoo(ps, precondition_frequency=2, **kw),
}
each = pytest.mark.parametrize("make", VARIANTS.values(), ids=VARIANTS.keys())
SHAPES = [(6, 4), (5,), (3, 2, 2)]


def params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def grads(n, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen).to(dtype) for s in SHAPES] for _ in range(n)]


def run(opt, ps, gs, scale=1.0):
    for step in gs:
        for p, g in zip(ps, step, strict=True):
            p.grad = g.to(p.dtype) * scale
        opt.step()


def state_equal(a, b, pa, pb):
    """Every state entry of parameter lists ``pa`` (in ``a``) and ``pb`` (in ``b``) equal."""
    for p, q in zip(pa, pb, strict=True):
        sa, sb = a.state[p], b.state[q]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key


# -- 1. copies ----------------------------------------------------------------------------------
def _pickled(opt):
    return pickle.loads(pickle.dumps(opt))


def _torch_saved(opt):
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)  # a whole object needs the full unpickler


@each
@pytest.mark.parametrize("copier", [copy.deepcopy, _pickled, _torch_saved],
                         ids=["deepcopy", "pickle", "torch.save"])
def test_copy_keeps_settings_and_steps_bitwise_like_the_original(make, copier):
    ps = params()
    opt = make(ps, nonfinite="skip", matrix_dtype=torch.float64)
    run(opt, ps, grads(3))
    ps[0].grad = torch.full_like(ps[0], float("nan"))
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step()
    twin = copier(opt)
    qs = twin.param_groups[0]["params"]
    assert (twin.nonfinite, twin.matrix_dtype, twin.skipped_steps, twin.split) == \
        ("skip", torch.float64, 1, None)
    public = {k for k in vars(opt) if not k.startswith("_")}  # torch's own check of copies
    assert public == {k for k in vars(twin) if not k.startswith("_")}
    later = grads(5, seed=2)  # crosses two refreshes (precondition_frequency=2)
    run(opt, ps, later)
    run(twin, qs, later)
    assert all(torch.equal(p, q) for p, q in zip(ps, qs, strict=True))
    state_equal(opt, twin, ps, qs)


def test_copy_of_a_split_optimizer_refuses_clearly():
    opt = SOAP(params())
    opt._split = object()  # stands in for a DDP/FSDP2 split: its process group cannot pickle
    with pytest.raises(TypeError, match="split SOAP .* cannot be copied or pickled.*"
                                        "full_state_dict"):
        copy.deepcopy(opt)


# -- 2. portable checkpoints --------------------------------------------------------------------
@each
@pytest.mark.parametrize(("source", "target", "matrix_dtype"), [
    (torch.float32, torch.float64, None), (torch.float64, torch.float32, None),
    (torch.float32, torch.float32, torch.float64), (torch.float32, torch.bfloat16, None)])
def test_checkpoint_loads_onto_other_dtypes_in_the_receivers_policy(make, source, target,
                                                                    matrix_dtype):
    ps = params(source)
    opt = make(ps)
    run(opt, ps, grads(3))
    saved = copy.deepcopy(opt.state_dict())
    qs = [torch.nn.Parameter(p.detach().to(target)) for p in ps]
    other = make(qs, matrix_dtype=matrix_dtype)
    other.load_state_dict(saved)
    want = matrix_dtype or (torch.float64 if target == torch.float64 else torch.float32)
    for i, q in enumerate(qs):
        for key, value in other.state[q].items():
            if torch.is_tensor(value):
                assert value.dtype == want, key  # fp32 matrices of a bf16 parameter stay fp32
                assert torch.equal(value, saved["state"][i][key].to(want)), key
    later = grads(4, seed=2)
    run(opt, ps, later)
    run(other, qs, later)
    tolerance = 0.05 if target == torch.bfloat16 else 1e-4
    for p, q in zip(ps, qs, strict=True):
        torch.testing.assert_close(q.double(), p.double(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("saved_kwargs", [{"merge_dims": True, "max_precond_dim": 12},
                                          {"one_sided": True}, {"factorized": True}])
def test_factor_plan_follows_the_loaded_param_groups(saved_kwargs):
    ps = [torch.nn.Parameter(torch.randn(4, 3, 2, 2)), torch.nn.Parameter(torch.randn(6, 5))]
    opt = SOAP(ps, precondition_frequency=2, **saved_kwargs)
    gs = [[torch.randn(4, 3, 2, 2), torch.randn(6, 5)] for _ in range(7)]
    for step in gs[:3]:
        for p, g in zip(ps, step, strict=True):
            p.grad = g.clone()
        opt.step()
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    plain = SOAP(qs)  # built with the defaults
    plain.load_state_dict(opt.state_dict())
    assert all(plain.param_groups[0][k] == v for k, v in saved_kwargs.items())
    step_both(opt, ps, plain, qs, gs[3:])
    assert all(torch.equal(p, q) for p, q in zip(ps, qs, strict=True))


@each
def test_checkpoint_of_an_older_soaplab_gets_the_default_group_keys(make):
    ps = params()
    opt = make(ps)
    run(opt, ps, grads(3))
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        for key in ("maximize", "batched", "refresh", "factorized", "start_preconditioning_step"):
            group.pop(key, None)
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    resumed = make(qs)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0].keys() == opt.param_groups[0].keys()
    later = grads(5, seed=2)
    run(opt, ps, later)
    run(resumed, qs, later)
    assert all(torch.equal(p, q) for p, q in zip(ps, qs, strict=True))


@each
@pytest.mark.parametrize("step", [torch.tensor(3.0), torch.tensor(3), 3.0],
                         ids=["float tensor", "int tensor", "float"])
def test_step_stored_as_a_tensor_is_accepted(make, step):
    ps = params()
    opt = make(ps)
    run(opt, ps, grads(4))  # SOAP's first call only builds statistics: step 3 for SOAP
    saved = copy.deepcopy(opt.state_dict())
    for entry in saved["state"].values():
        entry["step"] = step + entry["step"] - 3
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    resumed = make(qs)
    resumed.load_state_dict(saved)
    assert all(type(resumed.state[q]["step"]) is int for q in qs)
    later = grads(3, seed=2)
    run(opt, ps, later)
    run(resumed, qs, later)
    assert all(torch.equal(p, q) for p, q in zip(ps, qs, strict=True))


@pytest.mark.parametrize("step", [torch.tensor(2.5), 2.5, -2, "3", True])  # -1: allocated
def test_invalid_step_is_still_corrupt(step):
    ps = params()
    opt = SOAP(ps)
    run(opt, ps, grads(2))
    saved = opt.state_dict()
    saved["state"][0]["step"] = step
    with pytest.raises(ValueError, match="no valid 'step'"):
        SOAP(params()).load_state_dict(saved)


@each
def test_load_hooks_see_and_change_the_state_as_in_torch(make):
    ps = params()
    opt = make(ps)
    run(opt, ps, grads(3))
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    resumed = make(qs)
    seen = []

    def pre(optimizer, state_dict):
        assert optimizer is resumed and len(state_dict["state"]) == len(ps)
        state_dict["state"][0]["exp_avg"] = torch.zeros_like(state_dict["state"][0]["exp_avg"])
        new = dict(state_dict)
        new["param_groups"] = [{**g, "lr": 0.5} for g in state_dict["param_groups"]]
        return new  # a returned dict replaces the one given

    def post(optimizer):
        seen.append({k: v.clone() for k, v in optimizer.state[qs[0]].items()
                     if torch.is_tensor(v)})

    resumed.register_load_state_dict_pre_hook(pre)
    resumed.register_load_state_dict_post_hook(post)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch's shares state entries
    assert resumed.param_groups[0]["lr"] == 0.5
    assert not resumed.state[qs[0]]["exp_avg"].any() and opt.state[ps[0]]["exp_avg"].any()
    factor = next(k for k in seen[0] if k.startswith("factor"))
    assert len(seen) == 1 and torch.equal(seen[0][factor], opt.state[ps[0]][factor])


def test_failed_load_changes_nothing():
    ps = params()
    opt = SOAP(ps)
    run(opt, ps, grads(3))
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][1]["exp_avg"][0] = float("inf")
    saved["param_groups"][0]["lr"] = 0.5
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="contains NaN or Inf: the checkpoint is corrupt"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == before["param_groups"][0]["lr"]
    for key, entry in before["state"].items():
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(value),
                               torch.as_tensor(opt.state_dict()["state"][key][name]))


# -- 3. overflow --------------------------------------------------------------------------------
@each
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_overflowing_gradient_is_refused_before_any_state_changes(make, nonfinite):
    ps = params()
    opt = make(ps, nonfinite=nonfinite)
    run(opt, ps, grads(3))
    before = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in ps]
    if nonfinite == "raise":
        with pytest.raises(ValueError, match=r"parameter #0 of group 0 with shape \(6, 4\) "
                                             r"has entries up to .* would overflow"):
            run(opt, ps, grads(1, seed=5), scale=1e20)
    else:
        with pytest.warns(RuntimeWarning, match="overflowing gradient, step skipped"):
            run(opt, ps, grads(1, seed=5), scale=1e20)
        assert opt.skipped_steps == 1
    assert all(torch.equal(p, w) for p, w in zip(ps, weights, strict=True))
    after = opt.state_dict()
    for key, entry in before["state"].items():
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["state"][key][name]))
    make(params()).load_state_dict(after)  # the checkpoint is still valid


@each
@pytest.mark.parametrize(("dtype", "scale", "tolerance"), [(torch.float64, 2.0**66, 1e-8),
                                                           (torch.float32, 2.0**20, 1e-6)])
def test_scaled_gradients_move_the_weights_like_unscaled_ones(make, dtype, scale, tolerance):
    """Adam-like scale invariance (here ×7e19 in fp64, ×1e6 in fp32). Powers of two scale
    every product exactly: other scales (or LAPACK's own rescaling of large fp32 matrices)
    round differently, which picks other, equally valid, eigenvectors for the null space of a
    rank-deficient factor, and SOAP then differs by the basis, not by the scale. Shampoo's
    ε·I is not scale-free: hence the 1e-8."""
    ps, qs = params(dtype), params(dtype)
    a, b = make(ps, eps=1e-30), make(qs, eps=1e-30)
    gs = grads(6, dtype)
    run(a, ps, gs)
    run(b, qs, gs, scale=scale)
    assert all(torch.isfinite(v).all() for s in b.state.values() for v in s.values()
               if torch.is_tensor(v))
    for p, q in zip(ps, qs, strict=True):
        torch.testing.assert_close(q, p, atol=tolerance, rtol=tolerance)


# -- 4. torch's keyword arguments ---------------------------------------------------------------
@each
def test_maximize_equals_minimizing_the_negated_gradient(make):
    ps, qs = params(), params()
    up, down = make(ps, maximize=True, weight_decay=0.1), make(qs, weight_decay=0.1)
    gs = grads(5)
    run(up, ps, gs)
    run(down, qs, [[-g for g in step] for step in gs])
    assert all(torch.equal(p, q) for p, q in zip(ps, qs, strict=True))


def test_maximize_without_preconditioning_is_adamw_maximize():
    ps = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in SHAPES]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = SOAP(ps, lr=0.01, betas=(0.9, 0.99), eps=0, weight_decay=0.1, max_precond_dim=0,
               maximize=True)
    ref = torch.optim.AdamW(qs, lr=0.01, betas=(0.9, 0.99), eps=0, weight_decay=0.1,
                            maximize=True)
    gs = grads(6, torch.float64)
    run(opt, ps, gs[:1])  # SOAP's first call only builds statistics
    step_both(opt, ps, ref, qs, gs[1:])
    # SOAP decays after the update, AdamW before it: the same to first order in lr·wd.
    for p, q in zip(ps, qs, strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=0)
        assert (p - q).abs().max() < (p - ps[0].new_tensor(0)).abs().max()


@each
def test_tensor_lr_equals_the_same_float_lr(make):
    lr = torch.tensor(0.01)
    ps, qs = params(), params()
    a, b = make(ps, lr=lr), make(qs, lr=lr.item())
    gs = grads(5)
    run(a, ps, gs)
    run(b, qs, gs)
    assert all(torch.equal(p, q) for p, q in zip(ps, qs, strict=True))


@pytest.mark.parametrize("lr", [torch.tensor(-0.1), torch.tensor([0.1, 0.2]),
                                torch.tensor(0.1, requires_grad=True)])
def test_bad_tensor_lr_raises(lr):
    with pytest.raises(ValueError, match="lr"):
        SOAP(params(), lr=lr)


@pytest.mark.parametrize(("kwargs", "batched"), [({}, True), ({"foreach": None}, True),
                                                 ({"foreach": False}, False),
                                                 ({"foreach": True}, True),
                                                 ({"batched": False}, False),
                                                 ({"foreach": False, "batched": False}, False)])
def test_foreach_is_torchs_name_for_batched(kwargs, batched):
    for cls in (SOAP, Shampoo):
        assert cls(params(), **kwargs).param_groups[0]["batched"] is batched
    with pytest.raises(ValueError, match="foreach=True and batched=False disagree"):
        SOAP(params(), foreach=True, batched=False)


@pytest.mark.parametrize(("flag", "why"), [("differentiable", "outside autograd"),
                                           ("fused", "no fused kernel"),
                                           ("capturable", "CUDA graph")])
def test_unsupported_torch_flags_raise_saying_why_and_their_off_values_pass(flag, why):
    for cls in (SOAP, Shampoo):
        with pytest.raises(ValueError, match=f"{cls.__name__} does not support {flag}=True: "
                                             f".*{why}"):
            cls(params(), **{flag: True})
        cls(params(), **{flag: False})
        if flag == "fused":
            cls(params(), fused=None)


# -- 5. silent misuse ---------------------------------------------------------------------------
@each
def test_the_same_tensor_twice_in_a_group_raises(make):
    p = torch.nn.Parameter(torch.randn(3, 2))
    with pytest.raises(ValueError, match="lists the same tensor twice"):
        make([p, p])
    opt = make([torch.nn.Parameter(torch.randn(2))])
    with pytest.raises(ValueError, match="lists the same tensor twice"):
        opt.add_param_group({"params": [("w", p), ("v", p)]})
    assert len(opt.param_groups) == 1


@each
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_non_floating_parameter_raises(make, dtype):
    with pytest.raises(ValueError, match=f"does not support {dtype} parameters "
                                         r"\(parameter #1 of group 0 .*floating-point"):
        make([torch.nn.Parameter(torch.randn(2)), torch.zeros(2, 2, dtype=dtype)])
    opt = make([torch.nn.Parameter(torch.randn(2))])
    with pytest.raises(ValueError, match="group 1"):
        opt.add_param_group({"params": [torch.zeros(3, dtype=dtype)]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("group_edit", [{"precondition_frequency": 1},
                                        {"precondition_frequency": 1,
                                         "start_preconditioning_step": 1}])
def test_shampoo_reads_its_schedule_from_the_param_group_each_step(group_edit):
    ps, qs = params(), params()
    edited = Shampoo(ps, precondition_frequency=10)
    edited.param_groups[0].update(group_edit)
    built = Shampoo(qs, **group_edit)
    gs = grads(3)
    run(edited, ps, gs)
    run(built, qs, gs)
    assert not torch.equal(edited.state[ps[0]]["root_0"], torch.eye(6))
    assert all(torch.equal(p, q) for p, q in zip(ps, qs, strict=True))


# -- 6. the factored first update ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["soap_factorized", "soap_one_sided_factorized"])
def test_factored_update_rms_is_clipped_to_lr(name):
    """Adafactor's clipping (threshold 1): RMS(Δw) <= lr, so max |Δw| <= lr·√numel = 2·lr on a
    2×2 layer (it reached 11.8·lr before)."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(200):
        w = torch.nn.Parameter(torch.zeros(2, 2))
        opt = soaplab.optimizer(name, [w], lr=1.0, weight_decay=0)
        for _ in range(2):  # the first call builds statistics, the second moves
            w.grad = torch.randn(2, 2, generator=gen) * torch.rand(2, 2, generator=gen) ** 4
            opt.step()
        assert w.square().mean().sqrt() <= 1 + 1e-6
        worst = max(worst, w.abs().max().item())
    assert 1.0 < worst <= 2 + 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2, 42])
@pytest.mark.parametrize("name", ["soap", "soap_factorized", "soap_one_sided_factorized"])
def test_two_blobs_converge_at_lr_one(name, seed):
    """pytorch_optimizer's check at lr 1.0: the loss halves and never doubles on the way
    (the unclipped soap_factorized more than doubled it on each of these seeds)."""
    losses = TwoBlobs(seed=seed).run(name, 200, lr=1.0)
    assert max(losses) <= 2 * losses[0] and losses[-1] < losses[0] / 2


# -- 7. one-way layers --------------------------------------------------------------------------
OPTIM = Path(soaplab.optim.__file__).parent
SHELLS = {"soaplab", "soaplab.optim", "soaplab.optim.base", "soaplab.optim.soap",
          "soaplab.optim.shampoo", "soaplab.registry"}
LOWER = ["interface.py", "state.py", "kronecker.py", "matrix_functions.py", "second_moment.py",
         "grafting.py", *(f"distributed/{f.name}" for f in (OPTIM / "distributed").glob("*.py"))]


def _imports(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("path", LOWER)
def test_layers_below_the_shell_never_import_it_nor_touch_its_private_parts(path):
    tree = ast.parse((OPTIM / path).read_text())
    assert not _imports(tree) & SHELLS, f"{path} imports the optimizer shell"
    private = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} & \
        {"_split", "_plan_kwargs", "_name", "_step_bucket", "_buckets"}
    assert not private, f"{path} reaches into the optimizer: {private}"


def test_the_shell_satisfies_the_interface_the_layers_below_see():
    from soaplab.optim.interface import Shell

    for member in ("plan_kwargs", "describe", "split"):
        assert hasattr(Shell, member)
        for opt in (SOAP(params()), Shampoo(params())):
            assert hasattr(opt, member)
    assert math.isfinite(len(LOWER)) and len(LOWER) > 8
