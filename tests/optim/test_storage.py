"""SOAP's state storage options (storage.py): exact round trips, orthonormal bases at refresh,
the same maths on the decoded state, and soap_lowmem against soap."""

import io

import pytest
import torch

from soaplab import SOAP, Shampoo
from soaplab.optim import storage
from soaplab.optim.matrix_functions import bjorck

from .dense import soap_step
from .problems import IllConditionedRegression, KroneckerLeastSquares, step_both
from .test_soap import feed, snapshot

OPTIONS = [(kind, value) for kind, values in storage.OPTIONS.items() for value in values
           if value != "full"]
LOWMEM = dict(factor_storage="packed_bf16", basis_storage="bf16", momentum_storage="bf16")


def symmetric(d: int, batch: int = 2) -> torch.Tensor:
    X = torch.randn(batch, d, 3 * d)
    return X @ X.mT


def orthogonal(d: int, batch: int = 2) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(batch, d, d)).Q


@pytest.mark.parametrize("name", sorted({v for values in storage.OPTIONS.values()
                                         for v in values}))
@pytest.mark.parametrize("d", [1, 65, 128])
def test_codec_decodes_to_nearly_the_input_and_re_encodes_exactly(name, d):
    codec = storage._CODECS[name]
    x = symmetric(d) if name.startswith("packed") else orthogonal(d)
    stored = codec.encode(x)
    assert {k: (tuple(v.shape[1:]), v.dtype) for k, v in stored.items()} == \
        codec.layout((d, d), torch.float32)
    y = codec.decode(stored, torch.float32)
    assert y.shape == x.shape and y.dtype == torch.float32
    # bf16 keeps 8 significant bits; int8 a step of 1/254 of each 64-entry block's largest.
    tol = {"bf16": 2**-8, "packed_bf16": 2**-8, "int8": 1 / 254}.get(name, 0.0)
    if name == "int8":
        assert (y - x).abs().amax() <= tol * x.abs().amax() * 1.0001
    else:
        torch.testing.assert_close(y, x, rtol=tol, atol=0)
    again = codec.encode(y)
    assert all(torch.equal(again[k], stored[k]) for k in stored)


@pytest.mark.parametrize("name", ["bf16", "int8"])
@pytest.mark.parametrize("d", [65, 256])
def test_bjorck_makes_a_stored_basis_orthogonal_to_fp32_precision(name, d):
    Q = orthogonal(d)
    codec = storage._CODECS[name]
    lossy = codec.decode(codec.encode(Q), torch.float32)
    eye = torch.eye(d)
    before = (lossy.mT @ lossy - eye).abs().amax()
    fixed = bjorck(lossy)
    after = (fixed.mT @ fixed - eye).abs().amax()
    householder = torch.linalg.qr(lossy).Q
    floor = (householder.mT @ householder - eye).abs().amax()  # fp32's own orthogonality
    assert before > 100 * floor  # the stored basis really is off
    assert after <= 2 * floor, (before, after, floor)
    # The nearest orthogonal matrix: each column stays where it was, sign included.
    assert (fixed - Q).abs().amax() <= 2 * (lossy - Q).abs().amax()


def trained(params, steps: int, grads, **kw) -> SOAP:
    opt = SOAP(params, precondition_frequency=3, **kw)
    for gs in grads[:steps]:
        feed(params, gs)
        opt.step()
    return opt


@pytest.mark.parametrize("kind,value", OPTIONS + [("all", "lowmem")])
def test_state_dict_round_trip_is_bitwise_in_the_stored_precision(kind, value):
    kw = LOWMEM if kind == "all" else {kind: value}
    ps = [torch.nn.Parameter(torch.randn(s)) for s in ((70, 5), (5,), (3, 4, 2))]
    grads = [[torch.randn_like(p) for p in ps] for _ in range(14)]
    opt = trained(ps, 7, grads, **kw)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    resumed = SOAP(qs, precondition_frequency=3)  # the storage comes with the param groups
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for p, q in zip(ps, qs, strict=True):
        assert opt.state[p].keys() == resumed.state[q].keys()
        for key, value in opt.state[p].items():
            if torch.is_tensor(value):
                assert value.dtype == resumed.state[q][key].dtype, key
                assert torch.equal(value, resumed.state[q][key]), key
    step_both(opt, ps, resumed, qs, grads[7:])
    assert all(torch.equal(p, q) for p, q in zip(ps, qs, strict=True))


def test_storage_really_is_what_it_says():
    ps = [torch.nn.Parameter(torch.randn(70, 6)) for _ in range(2)]
    grads = [[torch.randn(70, 6)] for _ in range(4)]
    opt = trained(ps[:1], 4, grads, factor_storage="packed_bf16", basis_storage="int8",
                  momentum_storage="bf16")
    s = opt.state[ps[0]]
    assert s["factor_0"].dtype == torch.bfloat16 and s["factor_0"].shape == (70 * 71 // 2,)
    assert s["basis_0"].dtype == torch.int8 and s["basis_0"].shape == (70, 70)
    assert s["basis_0_scale"].dtype == torch.float32 and s["basis_0_scale"].shape == (70, 2)
    assert s["exp_avg"].dtype == torch.bfloat16
    assert s["exp_avg_sq"].dtype == torch.float32
    # factors 1/4 (a half-size triangle in half the bytes), bases 1/4 + 1/16, m 1/2, v 1
    assert opt.state_bytes() < 0.4 * trained(ps[1:], 4, grads).state_bytes()


def test_checkpoint_loads_into_parameters_of_another_dtype():
    """Saved from fp32 parameters, loaded onto fp64 ones: entries kept in the working dtype
    become fp64, the stored bf16/int8 entries keep their storage, and the maths then runs in
    fp64 on the decoded values."""
    ps = [torch.nn.Parameter(torch.randn(8, 5))]
    grads = [[torch.randn(8, 5)] for _ in range(10)]
    opt = trained(ps, 5, grads, factor_storage="bf16", basis_storage="int8",
                  momentum_storage="bf16")
    qs = [torch.nn.Parameter(ps[0].detach().double())]
    resumed = SOAP(qs, precondition_frequency=3)
    resumed.load_state_dict(opt.state_dict())
    s, t = opt.state[ps[0]], resumed.state[qs[0]]
    assert t["exp_avg_sq"].dtype == torch.float64
    for key in ("factor_0", "basis_0", "basis_0_scale", "exp_avg"):
        assert t[key].dtype == s[key].dtype and torch.equal(t[key], s[key]), key
    for gs in grads[5:]:  # through the refresh at t = 6: fp64 maths, the same storage
        feed(ps, gs)
        feed(qs, [g.double() for g in gs])
        opt.step()
        resumed.step()
    assert qs[0].dtype == torch.float64
    torch.testing.assert_close(qs[0].float(), ps[0].detach(), rtol=0, atol=1e-4)


def test_checkpoint_of_other_storage_is_refused_with_a_clear_error():
    ps = [torch.nn.Parameter(torch.randn(8, 5))]
    opt = trained(ps, 2, [[torch.randn(8, 5)] for _ in range(2)], factor_storage="packed")
    saved = opt.state_dict()
    saved["param_groups"][0]["factor_storage"] = "full"
    with pytest.raises(ValueError, match="factor_0.*stores it as"):
        SOAP([torch.nn.Parameter(torch.randn(8, 5))]).load_state_dict(saved)
    opt = trained(ps, 2, [[torch.randn(8, 5)] for _ in range(2)], basis_storage="int8")
    saved = opt.state_dict()
    del saved["state"][0]["basis_1_scale"]
    with pytest.raises(ValueError, match="lacks 'basis_1_scale'"):
        SOAP([torch.nn.Parameter(torch.randn(8, 5))]).load_state_dict(saved)


@pytest.mark.parametrize("option", ["factor_storage", "basis_storage", "momentum_storage"])
def test_unknown_storage_is_a_one_line_error(option):
    with pytest.raises(ValueError, match=f"{option} must be one of"):
        SOAP([torch.nn.Parameter(torch.randn(3, 3))], **{option: "fp8"})


def test_nonfinite_gradient_still_raises_before_touching_stored_state():
    ps = [torch.nn.Parameter(torch.randn(8, 5))]
    opt = trained(ps, 4, [[torch.randn(8, 5)] for _ in range(4)], **LOWMEM)
    before = {k: v.clone() for k, v in opt.state[ps[0]].items() if torch.is_tensor(v)}
    ps[0].grad = torch.full((8, 5), float("nan"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        opt.step()
    assert all(torch.equal(v, opt.state[ps[0]][k]) for k, v in before.items())


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("kind,value", OPTIONS)
def test_ordinary_step_is_the_dense_computation_on_the_decoded_state(kind, value):
    """Between refreshes each option changes nothing but the rounding of what is stored: one
    step equals the float64 dense oracle run on the decoded state, and the new state is the
    oracle's, encoded."""
    shape = (6, 4)
    hp = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, wd=0.05, freq=100, shampoo_beta=0.9)
    (p,) = [torch.nn.Parameter(torch.randn(shape))]
    opt = SOAP([p], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05,
               precondition_frequency=100, shampoo_beta=0.9, **{kind: value})
    group = opt.param_groups[0]

    def decoded() -> dict:
        s = opt.state[p]
        out = dict(s)
        for key in ("exp_avg", "factor_0", "factor_1", "basis_0", "basis_1"):
            codec = storage.codec(group, key)
            stored = {sfx: s[key + sfx].unsqueeze(0) for sfx in codec.suffixes}
            out[key] = codec.decode(stored, torch.float64)[0]
        return snapshot(out, shape)

    p.grad = torch.randn(shape)
    opt.step()
    for _ in range(4):
        g = torch.randn(shape)
        expected_p, expected = soap_step(p.detach(), g, decoded(), **hp)
        p.grad = g
        opt.step()
        torch.testing.assert_close(p.detach(), expected_p, atol=1e-12, rtol=1e-10)
        codec = storage.codec(group, "factor_")
        for k in (0, 1):
            want = codec.decode(codec.encode(expected[k]["factor"][None]), torch.float64)[0]
            torch.testing.assert_close(decoded()[k]["factor"], want, atol=1e-12, rtol=1e-10)


def test_soap_lowmem_tracks_soap_on_kronecker_least_squares():
    """float64 problem (maths in fp64, the stored entries rounded), 300 steps through 30
    refreshes; eval loss every 50 steps. Stated tolerance: within 5% of soap's while the loss
    is above 1% of where it started, within a factor 2.5 below that. Measured: gaps under 3%
    at steps 50-150, then 1.11x, 1.67x and 2.14x at steps 200, 250 and 300 (losses 4e-3 down
    to 1e-4 of the start): there, noise-free and with exact maths, the int8 bases' rounding
    (about 1/254 of a block's largest entry) sets the pace (benchmarks/storage_loss.py: bf16
    bases 1.26-1.39x there, packed bf16 factors 1.52-1.68x)."""
    problem = KroneckerLeastSquares()
    soap = problem.run("soap", 300, lr=0.03, weight_decay=0)
    lowmem = problem.run("soap_lowmem", 300, lr=0.03, weight_decay=0)
    for a, b in zip(lowmem[49::50], soap[49::50], strict=True):
        tolerance = 0.05 if b > 0.01 * soap[0] else 1.5
        assert abs(a - b) <= tolerance * b, (lowmem[49::50], soap[49::50])
    assert lowmem[-1] < 1e-3 * lowmem[0]


def test_soap_lowmem_matches_soap_on_the_ill_conditioned_regression():
    """Issue 22's target: the preset's held-out loss within 10% of soap's on its fp32
    ill-conditioned problem. The benchmark (benchmarks/storage_loss.py) takes the best of lr
    0.03, 0.1 and 0.3; 0.1 is the best for both, so this runs only that (measured: 2.58e-6 for
    both, at a noise floor of 1e-6). The problem tells storage options apart: bf16 factors
    lose the factors' small eigen-directions and end about 2x higher at their best lr (5.3e-6
    at 0.3), 5x at 0.1 (1.35e-5)."""
    problem = IllConditionedRegression()
    soap = problem.run("soap", 0.1)
    assert soap < 5e-6, soap  # within a few times the noise floor: the problem is solved
    assert problem.run("soap_lowmem", 0.1) <= 1.1 * soap
    assert problem.run("soap_lowmem_bf16_factors", 0.1) > 2 * soap


@pytest.mark.parametrize("cls", [SOAP, Shampoo])
def test_packed_factors_lose_nothing(cls):
    """The packed triangle is the factor itself: 12 steps (4 refreshes) track full storage to
    the rounding of the Gram's two triangles (fp32)."""
    ps = [torch.nn.Parameter(torch.randn(s)) for s in ((12, 7), (7,))]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    a = cls(ps, precondition_frequency=3)
    b = cls(qs, precondition_frequency=3, factor_storage="packed")
    step_both(a, ps, b, qs, [[torch.randn_like(p) for p in ps] for _ in range(12)])
    for p, q in zip(ps, qs, strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0)


def test_shampoo_round_trips_its_stored_factors_and_momentum():
    ps = [torch.nn.Parameter(torch.randn(12, 7))]
    kw = dict(precondition_frequency=3, factor_storage="packed_bf16", momentum_storage="bf16")
    opt = Shampoo(ps, **kw)
    grads = [[torch.randn(12, 7)] for _ in range(10)]
    for gs in grads[:5]:
        feed(ps, gs)
        opt.step()
    assert opt.state[ps[0]]["factor_0"].dtype == torch.bfloat16
    assert opt.state[ps[0]]["exp_avg"].dtype == torch.bfloat16
    qs = [torch.nn.Parameter(ps[0].detach().clone())]
    resumed = Shampoo(qs)
    resumed.load_state_dict(opt.state_dict())
    step_both(opt, ps, resumed, qs, grads[5:])
    assert torch.equal(ps[0], qs[0])


def test_fp64_retry_and_failed_refresh_work_on_stored_state(eigh_fails_in_float32,
                                                            break_refresh):
    """eigh of a decoded (bf16) factor that fails in fp32 is retried in fp64; a refresh that
    fails keeps the stored int8 basis and its scales bitwise."""
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = SOAP([p], precondition_frequency=1, refresh="eigh", factor_storage="bf16",
               basis_storage="int8", momentum_storage="bf16")
    p.grad = torch.randn(5, 3)
    opt.step()
    assert eigh_fails_in_float32 == [torch.float32, torch.float64] * 2
    assert opt.matrix_failures == 0
    kept = {k: opt.state[p][k].clone() for k in ("basis_0", "basis_0_scale")}
    break_refresh("soaplab.optim.soap.eigh_step")
    p.grad = torch.randn(5, 3)
    with pytest.warns(RuntimeWarning, match="basis refresh of axis 0 failed"):
        opt.step()
    assert all(torch.equal(opt.state[p][k], v) for k, v in kept.items())
    assert opt.matrix_failures == 2 and bool(torch.isfinite(p).all())
