"""em_step and kernel_logpdf against pathsmc.reference, and the in-kernel noise."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    FLOATS,
    assert_close,
    gen,
    mc_bound,
    requires_cuda,
    tol,
    weight_tol,
)

import pathsmc
from pathsmc import reference as ref

# Input shapes of x: (N, D), N = 1, D = 1 with B > 1, (B, N, *event), a plain (B, N, D),
# D = 300 (more than one 256-element chunk of in-kernel work).
SHAPES = [(5, 3), (1, 1, 4), (3, 7, 1), (2, 6, 2, 3), (4, 16, 5), (2, 3, 300)]
COEFS = {0: [], 1: [0.8], 2: [0.6, -0.3]}
FWD = [(0.0, 0.0), (0.35, -0.5)]
DT, SIGMA = 0.05, 1.3


def _logw_shape(shape):
    return tuple(shape[:2]) if len(shape) >= 3 else (shape[0],)


def _event_size(shape):
    return math.prod(shape[2:]) if len(shape) >= 3 else shape[1]


def _step_inputs(shape, sdtype, wdtype, k, device, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rn(*s, dtype=sdtype):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(device)

    x = rn(*shape)
    drift = rn(*shape)
    refs = [drift + 0.5 * rn(*shape) for _ in range(k)]
    noise = rn(*shape)
    logw = rn(*_logw_shape(shape), dtype=wdtype)
    return x, drift, refs, noise, logw


@pytest.mark.parametrize("fwd", FWD, ids=["nofwd", "fwd"])
@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("wdtype", FLOATS, ids=["w32", "w64"])
@pytest.mark.parametrize("sdtype", FLOATS, ids=["x32", "x64"])
def test_em_step_matches_reference(device, sdtype, wdtype, shape, k, fwd):
    x, drift, refs, noise, logw = _step_inputs(shape, sdtype, wdtype, k, device)
    kw = dict(dt=DT, sigma=SIGMA, ref_drifts=refs, ref_coefs=COEFS[k], fwd_coef=fwd[0],
              fwd_linear=fwd[1], noise=noise)
    x_new, lw_new = pathsmc.em_step(x, drift, logw, **kw)
    x_ref, lw_ref = ref.em_step(x, drift, logw, **kw)
    assert_close(x_new, x_ref, **tol(sdtype))
    assert_close(lw_new, lw_ref, **weight_tol(sdtype, wdtype, _event_size(shape)))
    assert x_new.device == x.device and lw_new.device == x.device


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("sdtype", FLOATS, ids=["x32", "x64"])
def test_em_step_without_logw(device, sdtype, shape):
    x, drift, _, noise, _ = _step_inputs(shape, sdtype, torch.float64, 0, device, seed=1)
    x_new, lw_new = pathsmc.em_step(x, drift, None, dt=DT, sigma=SIGMA, noise=noise)
    x_ref, _ = ref.em_step(x, drift, None, dt=DT, sigma=SIGMA, noise=noise)
    assert lw_new is None
    assert_close(x_new, x_ref, **tol(sdtype))
    # x' = x + drift·dt + σ√dt·ε, written out independently of the reference
    expect = x.double() + drift.double() * DT + SIGMA * math.sqrt(DT) * noise.double()
    assert_close(x_new.double(), expect, **tol(sdtype))


def test_em_step_formula_by_hand(device):
    """One particle, D = 2, K = 1, fwd kernel: the step weight written out by hand."""
    x = torch.tensor([[0.3, -1.2]], dtype=torch.float64, device=device)
    a = torch.tensor([[0.5, 0.25]], dtype=torch.float64, device=device)
    b = torch.tensor([[-0.4, 1.0]], dtype=torch.float64, device=device)
    eps = torch.tensor([[0.7, -0.2]], dtype=torch.float64, device=device)
    logw = torch.tensor([0.125], dtype=torch.float64, device=device)
    h, sig, c, cf, lam = 0.1, 0.9, 0.75, 0.4, -0.6
    x_new, lw_new = pathsmc.em_step(x, a, logw, dt=h, sigma=sig, ref_drifts=[b], ref_coefs=[c],
                                    fwd_coef=cf, fwd_linear=lam, noise=eps)
    s = sig * math.sqrt(h)
    xs, as_, bs, es = x[0].tolist(), a[0].tolist(), b[0].tolist(), eps[0].tolist()
    xn = [xi + ai * h + s * ei for xi, ai, ei in zip(xs, as_, es, strict=True)]

    def logn(y, m):
        return sum(-0.5 * ((yi - mi) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)
                   for yi, mi in zip(y, m, strict=True))

    delta = (c * logn(xn, [xi + bi * h for xi, bi in zip(xs, bs, strict=True)])
             + cf * logn(xs, [y + lam * y * h for y in xn])
             - logn(xn, [xi + ai * h for xi, ai in zip(xs, as_, strict=True)]))
    assert x_new[0].tolist() == pytest.approx(xn, rel=1e-12, abs=1e-12)
    assert lw_new.item() == pytest.approx(0.125 + delta, rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("wdtype", FLOATS, ids=["w32", "w64"])
@pytest.mark.parametrize("sdtype", FLOATS, ids=["x32", "x64"])
def test_em_step_noncontiguous(device, sdtype, wdtype):
    g = torch.Generator().manual_seed(2)
    b, n, d = 3, 9, 4

    def rn(*s, dtype=sdtype):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(device)

    x = rn(b, d, n).transpose(1, 2)  # (B, N, D), strided
    drift = rn(b, n, 2 * d)[..., ::2]  # sliced
    refs = [rn(n, b, d).transpose(0, 1)]
    noise = rn(b, n + 2, d)[:, 1:-1]
    logw = rn(n, b, dtype=wdtype).t()
    for t in (x, drift, refs[0], noise, logw):
        assert not t.is_contiguous()
    kw = dict(dt=DT, sigma=SIGMA, ref_drifts=refs, ref_coefs=[0.9], fwd_coef=0.2,
              fwd_linear=0.3, noise=noise)
    x_new, lw_new = pathsmc.em_step(x, drift, logw, **kw)
    x_ref, lw_ref = ref.em_step(x, drift, logw, **kw)
    assert_close(x_new, x_ref, **tol(sdtype))
    assert_close(lw_new, lw_ref, **weight_tol(sdtype, wdtype, d))
    # inputs are left untouched and the same values given contiguously agree
    x2, lw2 = pathsmc.em_step(x.contiguous(), drift.contiguous(), logw.contiguous(),
                              **{**kw, "ref_drifts": [refs[0].contiguous()],
                                 "noise": noise.contiguous()})
    assert torch.equal(x2, x_new) and torch.equal(lw2, lw_new)

    # (B, N, *event) with a non-contiguous event
    xe = rn(b, n, 3, 2).transpose(2, 3)
    de = rn(b, n, 2, 3)
    ne = rn(b, n, 3, 2).transpose(2, 3)
    lwe = rn(b, n, dtype=wdtype)
    xo, lwo = pathsmc.em_step(xe, de, lwe, dt=DT, sigma=SIGMA, noise=ne)
    xr, lwr = ref.em_step(xe, de, lwe, dt=DT, sigma=SIGMA, noise=ne)
    assert xo.shape == xe.shape
    assert_close(xo, xr, **tol(sdtype))
    assert_close(lwo, lwr, **weight_tol(sdtype, wdtype, 6))


@pytest.mark.parametrize("linear", [0.0, -0.7])
@pytest.mark.parametrize("with_drift", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("wdtype", FLOATS, ids=["w32", "w64"])
@pytest.mark.parametrize("sdtype", FLOATS, ids=["x32", "x64"])
def test_kernel_logpdf_matches_reference(device, sdtype, wdtype, shape, with_drift, linear):
    y, base, refs, _, logw = _step_inputs(shape, sdtype, wdtype, 1, device, seed=3)
    drift = refs[0] if with_drift else None
    kw = dict(dt=DT, sigma=SIGMA, logw=logw, coef=0.65, linear=linear)
    out = pathsmc.kernel_logpdf(y, base, drift, **kw)
    expect = ref.kernel_logpdf(y, base, drift, **kw)
    assert_close(out, expect, **weight_tol(sdtype, wdtype, _event_size(shape)))


def test_kernel_logpdf_noncontiguous(device):
    g = torch.Generator().manual_seed(4)
    b, n, d = 2, 5, 3
    y = torch.randn(b, d, n, generator=g, dtype=torch.float64).to(device).transpose(1, 2)
    base = torch.randn(b, n, 2 * d, generator=g, dtype=torch.float64).to(device)[..., 1::2]
    drift = torch.randn(n, b, d, generator=g, dtype=torch.float64).to(device).transpose(0, 1)
    logw = torch.randn(n, b, generator=g, dtype=torch.float64).to(device).t()
    kw = dict(dt=0.2, sigma=0.8, logw=logw, coef=1.5, linear=0.4)
    out = pathsmc.kernel_logpdf(y, base, drift, **kw)
    assert_close(out, ref.kernel_logpdf(y, base, drift, **kw), **tol(torch.float64))


def test_kernel_logpdf_matches_em_step_terms(device):
    """em_step's weight = logw + Σ c_k log N(ref) − log N(proposal), via kernel_logpdf."""
    x, drift, refs, noise, logw = _step_inputs((2, 5, 3), torch.float64, torch.float64, 2,
                                               device, seed=5)
    x_new, lw_new = pathsmc.em_step(x, drift, logw, dt=DT, sigma=SIGMA, ref_drifts=refs,
                                    ref_coefs=COEFS[2], noise=noise)
    lw = pathsmc.kernel_logpdf(x_new, x, drift, dt=DT, sigma=SIGMA, logw=logw, coef=-1.0)
    for r, c in zip(refs, COEFS[2], strict=True):
        lw = pathsmc.kernel_logpdf(x_new, x, r, dt=DT, sigma=SIGMA, logw=lw, coef=c)
    assert_close(lw_new, lw, rtol=1e-10, atol=1e-9)


# ---- in-kernel randomness ----

def _implied_noise(x, drift, x_new, dt, sigma):
    return (x_new.double() - x.double() - drift.double() * dt) / (sigma * math.sqrt(dt))


@pytest.mark.parametrize("sdtype", FLOATS, ids=["x32", "x64"])
def test_em_step_noise_moments(device, sdtype):
    # D = 300 > one 256-element noise chunk; ~77k normals
    b, n, d = 4, 64, 300
    g = torch.Generator().manual_seed(6)
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64).to(sdtype).to(device)
    drift = torch.randn(b, n, d, generator=g, dtype=torch.float64).to(sdtype).to(device)
    dt, sigma = 0.04, 1.5
    x_new, _ = pathsmc.em_step(x, drift, dt=dt, sigma=sigma, generator=gen(device, 123))
    z = _implied_noise(x, drift, x_new, dt, sigma).cpu()
    m = z.numel()
    assert torch.isfinite(z).all()
    assert abs(z.mean().item()) < mc_bound(m)
    assert abs(z.var().item() - 1.0) < mc_bound(m, var=2.0)
    assert abs((z**4).mean().item() - 3.0) < mc_bound(m, var=96.0)  # E z^4 = 3, Var z^4 = 96
    p1 = 0.6826894921370859  # P(|z| < 1)
    assert abs((z.abs() < 1).double().mean().item() - p1) < mc_bound(m, var=p1 * (1 - p1))
    # no correlation between neighbours along D (Box–Muller pairs, chunk edges), N and B
    for dim in range(3):
        a = z.narrow(dim, 0, z.shape[dim] - 1).reshape(-1)
        c = z.narrow(dim, 1, z.shape[dim] - 1).reshape(-1)
        corr = torch.corrcoef(torch.stack([a, c]))[0, 1].item()
        assert abs(corr) < mc_bound(a.numel()), (dim, corr)


def test_em_step_internal_noise_matches_weight(device):
    """The weight is computed with the same noise that moved x (reference given that noise)."""
    x, drift, refs, _, logw = _step_inputs((3, 40, 7), torch.float64, torch.float64, 2, device,
                                           seed=7)
    kw = dict(dt=DT, sigma=SIGMA, ref_drifts=refs, ref_coefs=COEFS[2], fwd_coef=0.3,
              fwd_linear=0.2)
    x_new, lw_new = pathsmc.em_step(x, drift, logw, **kw, generator=gen(device, 9))
    eps = _implied_noise(x, drift, x_new, DT, SIGMA).to(device)
    x_ref, lw_ref = ref.em_step(x, drift, logw, **kw, noise=eps)
    assert_close(x_new, x_ref, rtol=1e-12, atol=1e-12)
    assert_close(lw_new, lw_ref, rtol=1e-9, atol=1e-8)


def _noisy_step(device, generator, shape=(2, 50, 6), dtype=torch.float64):
    x = torch.zeros(shape, dtype=dtype, device=device)
    logw = torch.zeros(shape[:2], dtype=torch.float64, device=device)
    return pathsmc.em_step(x, x, logw, dt=1.0, sigma=1.0, ref_drifts=[x + 0.5],
                           ref_coefs=[1.0], generator=generator)


@pytest.mark.parametrize("dtype", FLOATS, ids=["x32", "x64"])
def test_em_step_seed_reproducible(device, dtype):
    a, la = _noisy_step(device, gen(device, 2024), dtype=dtype)
    b, lb = _noisy_step(device, gen(device, 2024), dtype=dtype)
    assert torch.equal(a, b) and torch.equal(la, lb)
    c, _ = _noisy_step(device, gen(device, 2025), dtype=dtype)
    assert (a != c).double().mean().item() > 0.99


def test_em_step_successive_calls_differ(device):
    g = gen(device, 11)
    a, la = _noisy_step(device, g)
    b, lb = _noisy_step(device, g)
    assert (a != b).double().mean().item() > 0.99
    assert (la != lb).double().mean().item() > 0.99
    corr = torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1].item()
    assert abs(corr) < mc_bound(a.numel())
    # replaying the generator from the same seed repeats the sequence of draws
    g2 = gen(device, 11)
    a2, _ = _noisy_step(device, g2)
    b2, _ = _noisy_step(device, g2)
    assert torch.equal(a, a2) and torch.equal(b, b2)


def test_em_step_default_generator(device):
    torch.manual_seed(77)
    a, _ = _noisy_step(device, None)
    b, _ = _noisy_step(device, None)
    torch.manual_seed(77)
    a2, _ = _noisy_step(device, None)
    assert torch.equal(a, a2)
    assert (a != b).double().mean().item() > 0.99


@pytest.mark.usefixtures("restore_threads")
@pytest.mark.parametrize("dtype", FLOATS, ids=["x32", "x64"])
def test_em_step_thread_count_independent(dtype):
    shape = (4, 2048, 16)  # 131k elements: several parallel chunks
    g = torch.Generator().manual_seed(12)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    drift = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    refs = [drift + 0.1]
    logw = torch.randn(shape[:2], generator=g, dtype=torch.float64)
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        outs.append(pathsmc.em_step(x, drift, logw, dt=DT, sigma=SIGMA, ref_drifts=refs,
                                    ref_coefs=[0.5], generator=gen("cpu", 5)))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])


@requires_cuda
def test_em_step_noise_is_device_specific_but_explicit_noise_agrees():
    # A CPU torch.Generator (mt19937) has no Philox offset, so the CPU kernel keys its Philox
    # stream with a 64-bit draw from it, while CUDA uses the generator's (seed, offset): the
    # same seed gives equally distributed but different noise on the two devices (ops module
    # docstring). Identical results across devices come from passing the noise explicitly.
    outs = [_noisy_step(dev, gen(dev, 31))[0].cpu() for dev in ("cpu", "cuda")]
    assert not torch.equal(outs[0], outs[1])
    noise = torch.randn(2, 50, 6, dtype=torch.float64, generator=gen("cpu", 31))
    x = torch.zeros(2, 50, 6, dtype=torch.float64)
    both = [pathsmc.em_step(x.to(dev), x.to(dev), dt=1.0, sigma=1.0, noise=noise.to(dev))[0]
            for dev in ("cpu", "cuda")]
    assert_close(both[1].cpu(), both[0])


def test_em_step_keeps_inputs(device):
    x, drift, refs, noise, logw = _step_inputs((2, 4, 3), torch.float32, torch.float64, 1,
                                               device, seed=8)
    saved = [t.clone() for t in (x, drift, refs[0], noise, logw)]
    pathsmc.em_step(x, drift, logw, dt=DT, sigma=SIGMA, ref_drifts=refs, ref_coefs=[1.0],
                    noise=noise)
    for t, s in zip((x, drift, refs[0], noise, logw), saved, strict=True):
        assert torch.equal(t, s)
