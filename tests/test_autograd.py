"""Autograd of the fused ops (``pathsmc._autograd``).

- ``gradcheck`` (float64, small shapes) of every differentiable op through the wrappers of
  :mod:`pathsmc.ops` and through the raw ``torch.ops.pathsmc`` (in-kernel noise recovered);
- gradients equal to autograd through :mod:`pathsmc.reference` with the same noise /
  uniforms, in float32 and float64;
- ``torch.library.opcheck`` with inputs that require grad (``test_autograd_registration`` and
  the AOT-autograd check of the backward);
- errors: per-row ``dt`` / ``sigma`` tensors that require grad.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import pathsmc.ops as P
import pathsmc.reference as R

pytestmark = pytest.mark.usefixtures("one_thread")

F32, F64 = torch.float32, torch.float64
OPS = torch.ops.pathsmc
B, N, D = 2, 3, 2


def _rn(*shape, seed: int, dtype=F64, grad: bool = True, scale: float = 1.0,
        device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = (scale * torch.randn(*shape, generator=g, dtype=F64)).to(dtype).to(device)
    return t.requires_grad_(grad)


def _ru(*shape, seed: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---- em_step ------------------------------------------------------------------------------

# (reference coefficients, fwd_coef, fwd_linear)
EM_CASES = {
    "plain": ([], 0.0, 0.0),
    "two_refs": ([0.6, 1.1], 0.0, 0.0),
    "ref_and_fwd": ([1.0], 0.7, -0.4),
    "fwd_only": ([], 1.0, 0.3),
}
ROW_DT = torch.tensor([0.1, 0.25], dtype=F64)
ROW_SIGMA = torch.tensor([1.3, 0.7], dtype=F64)


def _em_inputs(n_refs: int, dtype=F64, grad: bool = True, device: str = "cpu"):
    kw = {"grad": grad, "device": device}
    x = _rn(B, N, D, seed=1, dtype=dtype, **kw)
    drift = _rn(B, N, D, seed=2, dtype=dtype, **kw)
    logw = _rn(B, N, seed=3, **kw)
    noise = _rn(B, N, D, seed=4, dtype=dtype, **kw)
    refs = [_rn(B, N, D, seed=10 + i, dtype=dtype, **kw) for i in range(n_refs)]
    return x, drift, logw, noise, refs


def _em(ops, case: str, per_row: bool, device: str = "cpu"):
    """``f(x, drift, logw, noise, *refs) -> (x', logw')`` of ``ops.em_step`` for ``case``."""
    coefs, fc, lam = EM_CASES[case]
    dt, sigma = (ROW_DT.to(device), ROW_SIGMA.to(device)) if per_row else (0.1, 1.3)

    def f(x, drift, logw, noise, *refs):
        return ops.em_step(x, drift, logw, dt=dt, sigma=sigma, ref_drifts=list(refs),
                           ref_coefs=coefs, fwd_coef=fc, fwd_linear=lam, noise=noise)

    return f


@pytest.mark.parametrize("per_row", [False, True], ids=["scalar_dt", "per_row_dt"])
@pytest.mark.parametrize("case", list(EM_CASES))
def test_em_step_gradcheck(case: str, per_row: bool) -> None:
    x, drift, logw, noise, refs = _em_inputs(len(EM_CASES[case][0]))
    assert gradcheck(_em(P, case, per_row), (x, drift, logw, noise, *refs))


def test_em_step_gradgradcheck() -> None:
    """The backward is itself differentiable (losses that differentiate a gradient)."""
    x, drift, logw, noise, refs = _em_inputs(1)
    assert gradgradcheck(_em(P, "ref_and_fwd", False), (x, drift, logw, noise, *refs))


@pytest.mark.parametrize("per_row", [False, True], ids=["scalar_dt", "per_row_dt"])
def test_em_step_without_logw_gradcheck(per_row: bool) -> None:
    x, drift, _, noise, _ = _em_inputs(0)
    dt, sigma = (ROW_DT, ROW_SIGMA) if per_row else (0.1, 1.3)
    assert gradcheck(lambda x, a, e: P.em_step(x, a, dt=dt, sigma=sigma, noise=e)[0],
                     (x, drift, noise))


@pytest.mark.parametrize("case", ["two_refs", "ref_and_fwd"])
def test_em_step_in_kernel_noise_gradcheck(case: str) -> None:
    """Noise drawn from a generator: the wrapper draws it explicitly when a graph is recorded;
    the raw op recovers it from x' in the backward. Both are checked (the generator is
    reseeded so that the function is deterministic)."""
    coefs, fc, lam = EM_CASES[case]
    x, drift, logw, _, refs = _em_inputs(len(coefs))

    def wrapped(x, drift, logw, *refs):
        return P.em_step(x, drift, logw, dt=0.1, sigma=1.3, ref_drifts=list(refs),
                         ref_coefs=coefs, fwd_coef=fc, fwd_linear=lam,
                         generator=torch.Generator().manual_seed(7))

    def raw(x, drift, logw, *refs):
        return OPS.em_step(x, drift, logw, 0.1, 1.3, list(refs), coefs, fc, lam, None,
                           torch.Generator().manual_seed(7))

    assert gradcheck(wrapped, (x, drift, logw, *refs))
    assert gradcheck(raw, (x, drift, logw, *refs))


def test_recording_does_not_change_the_noise() -> None:
    """With a graph the wrapper draws ε itself; the same seed gives the same step."""
    x, drift, logw, _, refs = _em_inputs(1, dtype=F32, grad=False)
    kw = {"dt": 0.1, "sigma": 1.3, "ref_drifts": refs, "ref_coefs": [1.0]}
    a = P.em_step(x, drift, logw, generator=torch.Generator().manual_seed(3), **kw)
    b = P.em_step(x.requires_grad_(), drift, logw, generator=torch.Generator().manual_seed(3),
                  **kw)
    assert b[0].requires_grad and b[1].requires_grad
    torch.testing.assert_close(b[0].detach(), a[0], rtol=0, atol=0)
    torch.testing.assert_close(b[1].detach(), a[1], rtol=0, atol=0)


# (rtol, atol) of gradients against autograd through the reference: in float32 the
# reference rounds x' − mean in float32 before its float64 sum, the kernel does not.
GRAD_TOL = {F64: (1e-10, 1e-10), F32: (2e-5, 2e-5)}


def _grads(out, inputs, seed: int):
    """Gradients of ``Σ c·out`` for fixed random cotangents ``c`` (one per output)."""
    outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])
            if o is not None and o.requires_grad]
    loss = sum((o * _rn(*o.shape, seed=seed + i, dtype=o.dtype, grad=False)).sum()
               for i, o in enumerate(outs))
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def _assert_same_grads(fused, ref, dtype) -> None:
    rtol, atol = GRAD_TOL[dtype]
    for i, (a, r) in enumerate(zip(fused, ref, strict=True)):
        if r is None:
            assert a is None or not a.any(), f"input {i}: the reference has no gradient"
            continue
        assert a is not None, f"input {i}: no gradient from the fused op"
        assert a.dtype == r.dtype, f"input {i}: gradient dtype {a.dtype} != {r.dtype}"
        torch.testing.assert_close(a, r, rtol=rtol, atol=atol, msg=lambda m, i=i: f"input {i}: {m}")


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("per_row", [False, True], ids=["scalar_dt", "per_row_dt"])
@pytest.mark.parametrize("case", list(EM_CASES))
def test_em_step_grads_equal_reference(case: str, per_row: bool, dtype) -> None:
    x, drift, logw, noise, refs = _em_inputs(len(EM_CASES[case][0]), dtype=dtype)
    inputs = (x, drift, logw, noise, *refs)
    fused = _grads(_em(P, case, per_row)(*inputs), inputs, seed=20)
    ref = _grads(_em(R, case, per_row)(*inputs), inputs, seed=20)
    _assert_same_grads(fused, ref, dtype)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("per_row", [False, True], ids=["scalar_dt", "per_row_dt"])
def test_em_step_grads_on_device(device: str, per_row: bool, dtype) -> None:
    """The same comparison on every device (CUDA when available), two refs and the forward
    kernel; and gradients with in-kernel noise equal those with that noise passed in."""
    case = "ref_and_fwd"
    x, drift, logw, noise, refs = _em_inputs(1, dtype=dtype, device=device)
    inputs = (x, drift, logw, noise, *refs)
    fused = _grads(_em(P, case, per_row, device)(*inputs), inputs, seed=20)
    ref = _grads(_em(R, case, per_row, device)(*inputs), inputs, seed=20)
    _assert_same_grads(fused, ref, dtype)
    coefs, fc, lam = EM_CASES[case]
    gen = torch.Generator(device=device)
    kw = {"dt": 0.1, "sigma": 1.3, "ref_drifts": refs, "ref_coefs": coefs, "fwd_coef": fc,
          "fwd_linear": lam}
    out = P.em_step(x, drift, logw, generator=gen.manual_seed(9), **kw)
    drawn = ((out[0] - x - drift * 0.1) / (1.3 * math.sqrt(0.1))).detach()
    again = P.em_step(x, drift, logw, noise=drawn, **kw)
    inputs = (x, drift, logw, *refs)
    _assert_same_grads(_grads(out, inputs, seed=21), _grads(again, inputs, seed=21), dtype)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_em_step_grads_float32_logw(dtype) -> None:
    """States in ``dtype`` with float32 log-weights: each gradient in its input's dtype."""
    x, drift, _, noise, refs = _em_inputs(1, dtype=dtype)
    logw = _rn(B, N, seed=3, dtype=F32)
    inputs = (x, drift, logw, noise, *refs)
    fused = _grads(_em(P, "ref_and_fwd", False)(*inputs), inputs, seed=30)
    ref = _grads(_em(R, "ref_and_fwd", False)(*inputs), inputs, seed=30)
    _assert_same_grads(fused, ref, F32)


def test_em_step_event_shapes_and_unbatched() -> None:
    """(N, D) and (B, N, *event) inputs get gradients in their own shapes."""
    for shape, lshape in (((N, D), (N,)), ((B, N, 2, 3), (B, N))):
        x = _rn(*shape, seed=1)
        a = _rn(*shape, seed=2)
        e = _rn(*shape, seed=3, grad=False)
        lw = _rn(*lshape, seed=4)
        inputs = (x, a, lw)
        kw = {"dt": 0.1, "sigma": 0.9, "ref_drifts": [a.detach()], "ref_coefs": [1.0],
              "noise": e}
        fused = _grads(P.em_step(x, a, lw, **kw), inputs, seed=40)
        ref = _grads(R.em_step(x, a, lw, **kw), inputs, seed=40)
        assert fused[0].shape == x.shape
        _assert_same_grads(fused, ref, F64)


@pytest.mark.parametrize("name", ["dt", "sigma"])
def test_per_row_step_that_requires_grad_is_an_error(name: str) -> None:
    x, drift, logw, noise, _ = _em_inputs(0)
    rows = {"dt": ROW_DT.clone(), "sigma": ROW_SIGMA.clone()}
    rows[name].requires_grad_(True)
    with pytest.raises(ValueError, match=f"{name}: a per-row tensor is not differentiable"):
        P.em_step(x, drift, logw, noise=noise, **rows)
    with torch.no_grad():  # no graph: fine
        P.em_step(x, drift, logw, noise=noise, **rows)
    # the raw op refuses it at the forward, naming its argument
    raw = f"row_{name}"
    with pytest.raises(ValueError, match=f"{raw}: a per-row step tensor .* not differentiable"):
        OPS.em_step(x, drift, logw, 1.0, 1.0, [], [], 0.0, 0.0, noise, None,
                    rows["dt"], rows["sigma"])


# ---- kernel_logpdf ------------------------------------------------------------------------

KL_CASES = {"drift": (True, 0.6, 0.4), "no_drift": (False, -1.0, 0.3), "plain": (True, 1.0, 0.0)}


def _kl(ops, case: str):
    has_drift, coef, lin = KL_CASES[case]

    def f(y, base, logw, *drift):
        return ops.kernel_logpdf(y, base, drift[0] if has_drift else None, dt=0.1, sigma=1.3,
                                 logw=logw, coef=coef, linear=lin)

    return f


def _kl_inputs(case: str, dtype=F64, device: str = "cpu"):
    y = _rn(B, N, D, seed=5, dtype=dtype, device=device)
    base = _rn(B, N, D, seed=6, dtype=dtype, device=device)
    logw = _rn(B, N, seed=7, device=device)
    drift = [_rn(B, N, D, seed=8, dtype=dtype, device=device)] if KL_CASES[case][0] else []
    return (y, base, logw, *drift)


@pytest.mark.parametrize("case", list(KL_CASES))
def test_kernel_logpdf_gradcheck(case: str) -> None:
    assert gradcheck(_kl(P, case), _kl_inputs(case))
    assert gradgradcheck(_kl(P, case), _kl_inputs(case))


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(KL_CASES))
def test_kernel_logpdf_grads_equal_reference(device: str, case: str, dtype) -> None:
    inputs = _kl_inputs(case, dtype, device)
    fused = _grads(_kl(P, case)(*inputs), inputs, seed=50)
    ref = _grads(_kl(R, case)(*inputs), inputs, seed=50)
    _assert_same_grads(fused, ref, dtype)


# ---- normalize ----------------------------------------------------------------------------

def _with_dead(live: torch.Tensor) -> torch.Tensor:
    """(3, 4) log-weights: row 0 live, row 1 with a -inf and a NaN (dead) particle."""
    dead = torch.tensor([-math.inf, math.nan], dtype=live.dtype)
    return torch.cat([live[:6], dead, live[6:]]).view(3, 4)


def test_normalize_gradcheck() -> None:
    live = _rn(10, seed=9)

    def f(live):
        lwn, lm, ess = P.normalize(_with_dead(live))
        return lwn[torch.isfinite(lwn)], lm, ess

    assert gradcheck(f, (live,))
    assert gradgradcheck(f, (live,))


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_normalize_grads_equal_reference(dtype) -> None:
    live = _rn(10, seed=9, dtype=dtype)
    lw = _with_dead(live)
    cot = [_rn(3, 4, seed=60, dtype=dtype, grad=False), _rn(3, seed=61, dtype=dtype, grad=False),
           _rn(3, seed=62, dtype=dtype, grad=False)]
    cot[0] = torch.where(torch.isfinite(lw), cot[0], 0.0)  # dead entries stay -inf

    def grad(ops):
        out = ops.normalize(lw)
        return torch.autograd.grad(sum((o * c).sum() for o, c in zip(out, cot, strict=True)),
                                   live)[0]

    _assert_same_grads([grad(P)], [grad(R)], dtype)


def test_normalize_dead_particles_get_zero_gradient() -> None:
    lw = _with_dead(_rn(10, seed=9, grad=False)).requires_grad_(True)
    lwn, lm, ess = P.normalize(lw)
    (g,) = torch.autograd.grad(lm.sum() + ess.sum() + lwn[torch.isfinite(lwn)].sum(), lw)
    assert torch.equal(g[1, 2:], torch.zeros(2, dtype=F64))
    assert bool(torch.isfinite(g).all()) and bool(g[1, :2].ne(0).all())


# ---- adaptive_resample --------------------------------------------------------------------

def _ar_logw(grad: bool = True) -> torch.Tensor:
    """Row 0: ESS ≈ 1 (resampled at threshold 0.5); row 1: flat (kept); row 2: one dead
    particle and low ESS (resampled)."""
    lw = torch.tensor([[4.0, 0.1, -0.3, 0.2], [0.1, -0.1, 0.05, 0.0],
                       [-math.inf, 3.0, 0.2, -2.0]], dtype=F64)
    return lw.requires_grad_(grad)


SCHEMES = ["systematic", "stratified", "multinomial", "residual"]


def _ar(ops, scheme: str):
    u = _ru(3, 4, seed=12) if scheme != "systematic" else _ru(3, seed=12)

    def f(states, logw, ints):
        out, lw, anc, mask = ops.adaptive_resample([states, ints], logw, 0.5, scheme, u)
        return out[0], lw, anc, mask

    return f


@pytest.mark.parametrize("scheme", SCHEMES)
def test_adaptive_resample_gradcheck(scheme: str) -> None:
    states = _rn(3, 4, 2, seed=13)
    ints = torch.arange(12).view(3, 4)
    f = _ar(P, scheme)
    _, _, anc, mask = f(states, _ar_logw(), ints)
    assert mask.tolist() == [True, False, True]
    assert not torch.equal(anc[0], torch.arange(4))  # a real gather

    def g(states, logw):
        out, lw, _, _ = f(states, logw, ints)
        return out, lw[torch.isfinite(lw)]

    assert gradcheck(g, (states, _ar_logw()))


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_adaptive_resample_grads_equal_reference(scheme: str, dtype) -> None:
    states = _rn(3, 4, 2, seed=13, dtype=dtype)
    logw = _ar_logw(grad=False).to(dtype).requires_grad_(True)
    ints = torch.arange(12).view(3, 4)
    cot_s = _rn(3, 4, 2, seed=70, dtype=dtype, grad=False)
    cot_w = torch.where(torch.isfinite(logw), _rn(3, 4, seed=71, dtype=dtype, grad=False), 0.0)

    def grads(ops):
        out, lw, anc, _ = _ar(ops, scheme)(states, logw, ints)
        loss = (out * cot_s).sum() + torch.where(torch.isfinite(lw), lw * cot_w, 0.0).sum()
        return anc, torch.autograd.grad(loss, (states, logw))

    anc_f, fused = grads(P)
    anc_r, ref = grads(R)
    assert torch.equal(anc_f, anc_r)
    _assert_same_grads(fused, ref, dtype)


# ---- mala_accept --------------------------------------------------------------------------

def _mala_inputs(dtype=F64):
    x = _rn(B, N, D, seed=14, dtype=dtype)
    xp = (x.detach() + 0.3 * _rn(B, N, D, seed=15, dtype=dtype, grad=False)).requires_grad_()
    lp, lpp = _rn(B, N, seed=16, dtype=dtype), _rn(B, N, seed=17, dtype=dtype)
    gr, grp = _rn(B, N, D, seed=18, dtype=dtype), _rn(B, N, D, seed=19, dtype=dtype)
    return x, xp, lp, lpp, gr, grp


MALA_STEP = torch.tensor([0.2, 0.4], dtype=F64)
MALA_U = _ru(B, N, seed=21)


def _mala(ops):
    def f(*inputs):
        return ops.mala_accept(*inputs, MALA_STEP, MALA_U)

    return f


def test_mala_accept_gradcheck() -> None:
    inputs = _mala_inputs()
    acc = _mala(P)(*inputs)[3]
    assert 0 < int(acc.sum()) < acc.numel()  # both branches are exercised
    assert gradcheck(lambda *t: _mala(P)(*t)[:3], inputs)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_mala_accept_grads_equal_reference(dtype) -> None:
    inputs = _mala_inputs(dtype)
    fused_out = _mala(P)(*inputs)
    ref_out = _mala(R)(*inputs)
    assert torch.equal(fused_out[3], ref_out[3])
    _assert_same_grads(_grads(fused_out[:3], inputs, seed=80),
                       _grads(ref_out[:3], inputs, seed=80), dtype)


# ---- replica_swap -------------------------------------------------------------------------

@pytest.mark.parametrize("parity", [0, 1])
def test_replica_swap_gradcheck_and_reference(parity: int) -> None:
    k, c = 4, 3
    states = _rn(k, c, 2, seed=22)
    ints = torch.arange(k * c).view(k, c)
    log_ratio = _rn(k - 1, c, seed=23, scale=2.0)
    u = _ru(k - 1, c, seed=24)

    def f(ops, states, log_ratio):
        out, acc, perm = ops.replica_swap([states, ints], log_ratio, parity, u)
        return out[0], acc, perm

    _, acc, _ = f(P, states, log_ratio)
    assert bool(acc.any())
    # log_ratio gets a zero gradient (the swap decision is piecewise constant)
    assert gradcheck(lambda s, lr: f(P, s, lr)[0], (states, log_ratio))
    fused = _grads(f(P, states, log_ratio)[0], (states, log_ratio), seed=90)
    ref = _grads(f(R, states, log_ratio)[0], (states, log_ratio), seed=90)
    _assert_same_grads(fused, ref, F64)


# ---- opcheck with inputs that require grad ------------------------------------------------

def _opcheck_cases():
    x, drift, logw, noise, refs = _em_inputs(2, dtype=F32)
    x64, d64, lw64, n64, r64 = _em_inputs(1)
    y, base, lwk, drk = _kl_inputs("drift", F32)
    states = _rn(3, 4, 2, seed=13, dtype=F32)
    ints = torch.arange(12).view(3, 4)
    swap = _rn(4, 3, 2, seed=22)
    return {
        "em_step": (OPS.em_step.default, (x, drift, logw, 0.1, 1.2, refs, [0.7, 1.0], 0.3,
                                          -0.2, noise, None)),
        "em_step_per_row": (OPS.em_step.default, (x64, d64, lw64, 1.0, 1.0, r64, [0.5], 0.1,
                                                  -0.5, n64, None, ROW_DT, ROW_SIGMA)),
        "em_step_nologw": (OPS.em_step.default, (x64, d64, None, 0.1, 1.2, [], [], 0.0, 0.0,
                                                 n64, None)),
        "kernel_logpdf": (OPS.kernel_logpdf.default, (y, base, drk, 0.1, 1.2, lwk, 0.6, 0.4)),
        "kernel_logpdf_nodrift": (OPS.kernel_logpdf.default,
                                  (y.double(), base.double(), None, 0.1, 1.2, lwk, -1.0, 0.0)),
        "normalize": (OPS.normalize.default, (_rn(3, 5, seed=25),)),
        "adaptive_resample": (OPS.adaptive_resample.default,
                              ([states, ints], _ar_logw(), 0.5, "systematic", _ru(3, seed=12),
                               None)),
        "adaptive_resample_multinomial": (
            OPS.adaptive_resample.default,
            ([states.double()], _ar_logw().float(), 0.5, "multinomial", _ru(3, 4, seed=12),
             None)),
        "mala_accept": (OPS.mala_accept.default,
                        (*_mala_inputs(F32), MALA_STEP, MALA_U, None)),
        "replica_swap": (OPS.replica_swap.default,
                         ([swap, torch.arange(12).view(4, 3)], _rn(3, 3, seed=23), 1,
                          _ru(3, 3, seed=24), None)),
        "resample": (OPS.resample.default, (_ar_logw(), "systematic", 4, _ru(3, seed=12),
                                            None)),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck_with_grad(case: str) -> None:
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_inplace_adaptive_resample_refuses_grad() -> None:
    """The in-place op cannot pass a gradient: it raises instead (raw op and wrapper)."""
    x = torch.randn(2, 4, 3, requires_grad=True)
    lw = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"states\[0\] requires grad"):
        OPS.adaptive_resample_([x], lw, 1.0, "systematic", None, None)
    with pytest.raises(RuntimeError, match="logw requires grad"):
        OPS.adaptive_resample_([x.detach().clone()], lw.clone().requires_grad_(), 1.0,
                               "systematic", None, None)
    with pytest.raises(ValueError, match=r"states\[0\].*requires grad"):
        P.adaptive_resample_([x], lw)
    with torch.no_grad():  # no graph is recorded: allowed
        _, anc, res = OPS.adaptive_resample_([x], lw, 1.0, "systematic", None, None)
    assert res.all() and anc.shape == (2, 4)
