"""resample and adaptive_resample: exact against the reference, and statistically unbiased."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SCHEMES, assert_close, gen, tol

import pathsmc
from pathsmc import reference as ref

NAN, INF = math.nan, math.inf
U_MAX = 1.0 - 2.0**-53  # largest double below 1


def _uniforms(scheme, b, m, g, device, squeeze=False, dtype=torch.float64):
    shape = (b,) if scheme == "systematic" else (b, m)
    u = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    return u[0] if squeeze else u


def _logw(b, n, device, seed, dtype=torch.float64, scale=2.0, dead=True):
    g = torch.Generator().manual_seed(seed)
    lw = scale * torch.randn(b, n, generator=g, dtype=torch.float64)
    if dead and b > 1 and n > 2:  # row 1: a few dead (NaN) and zero-weight (-inf) particles
        lw[1, 0] = NAN
        lw[1, n // 2] = -INF
        lw[1, -1] = NAN
    return lw.to(dtype).to(device)


def offspring(anc: torch.Tensor, n: int) -> torch.Tensor:
    """(B, M) ancestors -> (B, N) offspring counts."""
    counts = torch.zeros(anc.shape[0], n, dtype=torch.int64, device=anc.device)
    return counts.scatter_add_(1, anc, torch.ones_like(anc))


# ---- exact agreement with the reference (explicit uniforms) ----

@pytest.mark.parametrize("b,n,m", [(1, 1, 1), (1, 1, 5), (3, 7, 7), (3, 7, 4), (2, 50, 123),
                                   (4, 300, 300)], ids=str)
@pytest.mark.parametrize("wdtype", [torch.float32, torch.float64], ids=["w32", "w64"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_resample_matches_reference(device, scheme, wdtype, b, n, m):
    logw = _logw(b, n, device, seed=n * 7 + m, dtype=wdtype)
    u = _uniforms(scheme, b, m, torch.Generator().manual_seed(m), device)
    num = None if m == n else m
    anc = pathsmc.resample(logw, scheme, num, uniforms=u)
    expect = ref.resample(logw, scheme, num, uniforms=u)
    assert anc.dtype == torch.int64 and anc.shape == (b, m) and anc.device == logw.device
    assert torch.equal(anc, expect), (anc, expect)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_resample_large_population_matches_reference(device, scheme):
    """N = 2^17: the float64 prefix sums agree with torch.cumsum + searchsorted exactly."""
    b, n = 2, 1 << 17
    logw = _logw(b, n, device, seed=12, scale=3.0)
    logw[1, ::7] = NAN
    g = torch.Generator().manual_seed(13)
    for m in (n, n // 3 + 1):
        u = _uniforms(scheme, b, m, g, device)
        anc = pathsmc.resample(logw, scheme, m, uniforms=u)
        assert torch.equal(anc, ref.resample(logw, scheme, m, uniforms=u)), m


@pytest.mark.parametrize("m", [20, 9, 45])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_resample_1d_input(device, scheme, m):
    logw = _logw(1, 20, device, seed=m)[0]
    u = _uniforms(scheme, 1, m, torch.Generator().manual_seed(1), device, squeeze=True)
    anc = pathsmc.resample(logw, scheme, m, uniforms=u)
    assert anc.shape == (m,)
    assert torch.equal(anc, ref.resample(logw, scheme, m, uniforms=u))
    # same as the (1, N) call
    u2 = u.unsqueeze(0)
    assert torch.equal(anc, pathsmc.resample(logw.unsqueeze(0), scheme, m, uniforms=u2)[0])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_resample_edge_uniforms(device, scheme):
    """u = 0 and u just below 1 with dead particles at both ends of the row."""
    n = 9
    logw = _logw(2, n, device, seed=3, dead=False)
    logw[:, :2] = NAN
    logw[0, -2:] = -INF
    logw[1, -1] = NAN
    for value in (0.0, U_MAX):
        for m in (n, 4, 17):
            shape = (2,) if scheme == "systematic" else (2, m)
            u = torch.full(shape, value, dtype=torch.float64, device=device)
            anc = pathsmc.resample(logw, scheme, m, uniforms=u)
            assert torch.equal(anc, ref.resample(logw, scheme, m, uniforms=u)), (value, m)
            assert torch.isfinite(logw.gather(1, anc)).all()


def test_resample_float32_uniforms(device):
    logw = _logw(3, 11, device, seed=4)
    for scheme in SCHEMES:
        u = _uniforms(scheme, 3, 11, torch.Generator().manual_seed(2), device,
                      dtype=torch.float32)
        anc = pathsmc.resample(logw, scheme, uniforms=u)
        assert torch.equal(anc, ref.resample(logw, scheme, uniforms=u)), scheme


def test_resample_noncontiguous(device):
    logw = _logw(30, 4, device, seed=5, dead=False).t()  # (4, 30), strided
    for scheme in SCHEMES:
        u = _uniforms(scheme, 4, 30, torch.Generator().manual_seed(3), device)
        if u.dim() == 2:
            u = u.t().contiguous().t()
        anc = pathsmc.resample(logw, scheme, uniforms=u)
        assert torch.equal(anc, ref.resample(logw, scheme, uniforms=u)), scheme


# ---- properties with the in-kernel RNG ----

@pytest.mark.parametrize("m", [50, 37, 101])
def test_systematic_counts_within_floor_ceil(device, m):
    b, n = 200, 50
    logw = _logw(b, n, device, seed=m, dead=False)
    w = torch.softmax(logw.double(), -1)
    lo = torch.floor(m * w - 1e-9).long()
    hi = torch.ceil(m * w + 1e-9).long()
    for anc in (pathsmc.resample(logw, "systematic", m, generator=gen(device, m)),
                pathsmc.resample(logw, "systematic", m,
                                 uniforms=torch.rand(b, dtype=torch.float64, device=device))):
        c = offspring(anc, n)
        assert (c >= lo).all() and (c <= hi).all()
        assert (c.sum(-1) == m).all()
    # residual keeps at least floor(M w_i) copies of each particle
    c = offspring(pathsmc.resample(logw, "residual", m, generator=gen(device, 1)), n)
    assert (c >= lo).all() and (c.sum(-1) == m).all()


# Target weights with fractional M·w_i (M = N = 8), plus a dead particle.
_MW = [0.3, 2.6, 0.5, 1.4, 0.7, 1.25, 0.45, 0.8]
_Z_MAX = 5.0


def _target_logw(device):
    lw = torch.tensor([math.log(v) for v in _MW] + [NAN], dtype=torch.float64, device=device)
    return lw  # N = 9, the last one dead


def unbiasedness_z(counts: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """z-scores of the mean offspring counts over R independent rows vs ``expected`` (N,).

    The per-particle variance is the sample variance, floored at 1e-3 so that a deterministic
    but wrong count (zero variance) still gives a huge z.
    """
    c = counts.double()
    r = c.shape[0]
    var = c.var(0).clamp_min(1e-3)
    return (c.mean(0) - expected) / (var / r).sqrt()


def assert_unbiased(counts: torch.Tensor, expected: torch.Tensor) -> None:
    z = unbiasedness_z(counts, expected)
    assert z.abs().max().item() < _Z_MAX, z


def _counts_repeated(sample, logw, m, reps=4, rows=1000):
    """Offspring counts from ``reps`` calls, each resampling ``rows`` copies of ``logw``."""
    lw = logw.unsqueeze(0).expand(rows, -1).contiguous()
    return torch.cat([offspring(sample(lw, m), lw.shape[1]) for _ in range(reps)]).cpu()


@pytest.mark.parametrize("m", [8, 12, 5])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_resample_unbiased(device, scheme, m):
    logw = _target_logw(device)
    g = gen(device, 1000 + m)
    counts = _counts_repeated(lambda lw, mm: pathsmc.resample(lw, scheme, mm, generator=g),
                              logw, m)
    w = torch.softmax(torch.nan_to_num(logw.cpu(), nan=-INF), -1)
    assert (counts[:, -1] == 0).all()  # the dead particle
    assert (counts.sum(-1) == m).all()
    assert_unbiased(counts, m * w)


def test_unbiasedness_checker_detects_bias():
    """The z-test above passes unbiased samplers and fails biased ones at the same size."""
    logw = _target_logw("cpu")
    w = torch.softmax(torch.nan_to_num(logw, nan=-INF), -1)
    g = torch.Generator().manual_seed(5)

    def unbiased(scheme):
        return lambda lw, m: ref.resample(lw, scheme, m, generator=g)

    def systematic_u0(lw, m):  # always the same grid: positions i / M
        return ref.resample(lw, "systematic", m, uniforms=torch.zeros(lw.shape[0]).double())

    def floor_then_heaviest(lw, m):  # floor(M w_i) copies, the rest to the heaviest particle
        ww = torch.softmax(torch.nan_to_num(lw, nan=-INF), -1)
        counts = torch.floor(m * ww).long()
        counts[:, ww[0].argmax()] += m - counts.sum(-1)
        idx = torch.arange(lw.shape[1]).repeat(lw.shape[0])
        return torch.repeat_interleave(idx, counts.reshape(-1)).reshape(lw.shape[0], m)

    def tempered_multinomial(lw, m):  # multinomial on w^1.15: a mild bias
        return ref.resample(1.15 * lw, "multinomial", m, generator=g)

    def shifted_stratified(lw, m):  # stratified positions (i + 0.9 u) / M: biased to the left
        u = 0.9 * torch.rand(lw.shape[0], m, generator=g, dtype=torch.float64)
        return ref.resample(lw, "stratified", m, uniforms=u)

    for m in (8, 12, 5):
        for scheme in SCHEMES[:3]:  # (the reference's residual is a slow per-row loop)
            assert_unbiased(_counts_repeated(unbiased(scheme), logw, m), m * w)
        for biased in (systematic_u0, floor_then_heaviest, tempered_multinomial,
                       shifted_stratified):
            counts = _counts_repeated(biased, logw, m)
            assert (counts.sum(-1) == m).all()
            z = unbiasedness_z(counts, m * w)
            assert z.abs().max().item() > _Z_MAX, (biased.__name__, m, z)
            with pytest.raises(AssertionError):
                assert_unbiased(counts, m * w)


@pytest.mark.parametrize("m", [30, 17, 64])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_dead_particles_never_chosen(device, scheme, m):
    b, n = 50, 30
    g = torch.Generator().manual_seed(m)
    logw = 3 * torch.randn(b, n, generator=g, dtype=torch.float64)
    logw[torch.rand(b, n, generator=g) < 0.3] = NAN
    logw[torch.rand(b, n, generator=g) < 0.2] = -INF
    logw[0] = NAN
    logw[0, 0] = 0.0  # only the first alive
    logw[1] = -INF
    logw[1, -1] = 5.0  # only the last alive
    logw[2] = NAN
    logw[2, 7] = -1e4  # only one alive, tiny but nonzero weight
    logw = logw.to(device)
    for kw in ({"generator": gen(device, 3)},
               {"uniforms": _uniforms(scheme, b, m, g, device)}):
        anc = pathsmc.resample(logw, scheme, m, **kw)
        assert ((anc >= 0) & (anc < n)).all()
        assert torch.isfinite(logw.gather(1, anc)).all()
        assert (anc[0] == 0).all() and (anc[1] == n - 1).all() and (anc[2] == 7).all()


@pytest.mark.parametrize("m", [6, 4, 13])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_all_dead_row_gives_arange(device, scheme, m):
    n = 6
    logw = _logw(4, n, device, seed=9, dead=False)
    logw[0] = NAN
    logw[2] = -INF
    logw[3, ::2] = NAN
    logw[3, 1::2] = -INF
    ident = torch.arange(m, device=device) % n
    for kw in ({"generator": gen(device, 4)},
               {"uniforms": _uniforms(scheme, 4, m, torch.Generator().manual_seed(0), device)}):
        anc = pathsmc.resample(logw, scheme, m, **kw)
        for r in (0, 2, 3):
            assert torch.equal(anc[r], ident), (r, anc[r])
        assert torch.isfinite(logw[1].gather(0, anc[1])).all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_resample_seed_reproducible_and_fresh(device, scheme):
    logw = _logw(16, 40, device, seed=10)
    a = pathsmc.resample(logw, scheme, generator=gen(device, 8))
    b = pathsmc.resample(logw, scheme, generator=gen(device, 8))
    assert torch.equal(a, b)
    g = gen(device, 8)
    c1 = pathsmc.resample(logw, scheme, generator=g)
    c2 = pathsmc.resample(logw, scheme, generator=g)
    assert torch.equal(c1, a)
    assert not torch.equal(c1, c2)


@pytest.mark.usefixtures("restore_threads")
@pytest.mark.parametrize("scheme", SCHEMES)
def test_resample_thread_count_independent(scheme):
    logw = _logw(64, 4096, "cpu", seed=11)
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        outs.append(pathsmc.resample(logw, scheme, generator=gen("cpu", 6)))
    assert torch.equal(outs[0], outs[1])


# ---- adaptive_resample ----

def _adaptive_inputs(device, wdtype, seed=0):
    """6 rows: near-uniform, degenerate, all dead, partly dead + degenerate, uniform, mixed."""
    b, n = 6, 10
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.1, 4.0, 1.0, 3.0, 0.0, 1.2], dtype=torch.float64)
    logw = scales[:, None] * torch.randn(b, n, generator=g, dtype=torch.float64) - 3.0
    logw[2] = NAN
    logw[3, [0, 4]] = NAN
    logw[3, 7] = -INF
    logw = logw.to(wdtype).to(device)
    states = [
        torch.randn(b, n, 3, generator=g).to(device),
        torch.randint(-1000, 1000, (b, n), generator=g).to(device),
        (torch.rand(b, n, 2, 2, generator=g) < 0.5).to(device),
        torch.randn(n, b, generator=g, dtype=torch.float64).to(device).t(),  # strided
    ]
    return states, logw


def _check_adaptive(states, logw, threshold, scheme, u, out):
    states_out, logw_out, anc, resampled = out
    e_states, e_logw, e_anc, e_res = ref.adaptive_resample(states, logw, threshold, scheme, u)
    assert resampled.dtype == torch.bool and torch.equal(resampled, e_res)
    assert anc.dtype == torch.int64 and torch.equal(anc, e_anc)
    assert len(states_out) == len(states)
    for s, so, es in zip(states, states_out, e_states, strict=True):
        assert so.dtype == s.dtype and so.shape == s.shape
        assert torch.equal(so, es)
    assert_close(logw_out, e_logw, **tol(logw.dtype))


@pytest.mark.parametrize("threshold", [0.5, 0.0, 1.0, 2.5])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.float64], ids=["w32", "w64"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_adaptive_resample_matches_reference(device, scheme, wdtype, threshold):
    states, logw = _adaptive_inputs(device, wdtype)
    b, n = logw.shape
    u = _uniforms(scheme, b, n, torch.Generator().manual_seed(1), device)
    saved = [s.clone() for s in states]
    out = pathsmc.adaptive_resample(states, logw, threshold, scheme, uniforms=u)
    _check_adaptive(states, logw, threshold, scheme, u, out)
    for s, sv in zip(states, saved, strict=True):
        assert torch.equal(s, sv)  # inputs untouched
    states_out, logw_out, anc, resampled = out

    # independent checks of the contract
    lw64 = torch.nan_to_num(logw.double(), nan=-INF)
    _, _, ess = ref.normalize(logw)
    live = torch.isfinite(torch.logsumexp(lw64, -1))
    expect_mask = live & ((ess.double() < threshold * n) | (threshold >= 1.0))
    assert torch.equal(resampled, expect_mask)
    if threshold == 0.5:
        assert resampled.any() and not resampled[live].all()  # mixed rows
    if threshold >= 1.0:
        assert torch.equal(resampled, live)  # even the exactly uniform row 4
    if threshold == 0.0:
        assert not resampled.any()
    ident = torch.arange(n, device=device)
    rows = torch.arange(b, device=device)[:, None]
    for r in range(b):
        if resampled[r]:
            lz = torch.logsumexp(lw64[r], 0) - math.log(n)
            assert_close(logw_out[r], lz.to(wdtype).expand(n), **tol(wdtype))
            assert torch.isfinite(logw[r].gather(0, anc[r])).all()
        else:
            assert torch.equal(anc[r], ident)
            assert torch.equal(logw_out[r].nan_to_num(1.5), logw[r].nan_to_num(1.5))
    for s, so in zip(states, states_out, strict=True):
        assert torch.equal(so, s[rows, anc])
    # the dead row passes through untouched, NaN weights and all
    assert not resampled[2]
    assert torch.isnan(logw_out[2]).all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_adaptive_resample_1d(device, scheme):
    n = 12
    g = torch.Generator().manual_seed(2)
    logw = (5 * torch.randn(n, generator=g, dtype=torch.float64)).to(device)
    states = [torch.randn(n, 2, generator=g).to(device), torch.arange(n, device=device)]
    u = _uniforms(scheme, 1, n, g, device, squeeze=True)
    out = pathsmc.adaptive_resample(states, logw, 0.9, scheme, uniforms=u)
    states_out, logw_out, anc, resampled = out
    assert anc.shape == (n,) and resampled.shape == () and logw_out.shape == (n,)
    assert resampled.item()
    assert torch.equal(states_out[1], anc)
    e = ref.adaptive_resample(states, logw, 0.9, scheme, u)
    assert torch.equal(anc, e[2])
    assert torch.equal(states_out[0], e[0][0])
    assert_close(logw_out, e[1])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_adaptive_resample_internal_rng(device, scheme):
    states, logw = _adaptive_inputs(device, torch.float64, seed=3)
    out1 = pathsmc.adaptive_resample(states, logw, 0.5, scheme, generator=gen(device, 12))
    out2 = pathsmc.adaptive_resample(states, logw, 0.5, scheme, generator=gen(device, 12))
    states_out, logw_out, anc, resampled = out1
    assert torch.equal(anc, out2[2])
    b, n = logw.shape
    rows = torch.arange(b, device=device)[:, None]
    for s, so in zip(states, states_out, strict=True):
        assert torch.equal(so, s[rows, anc])
    _, log_mean, ess = ref.normalize(logw)
    assert torch.equal(resampled, torch.isfinite(log_mean) & (ess < 0.5 * n))
    ident = torch.arange(n, device=device).expand(b, n)
    assert torch.equal(anc[~resampled], ident[~resampled])
    assert torch.isfinite(logw.gather(1, anc)[resampled]).all()
    assert_close(logw_out[resampled], log_mean[resampled, None].expand(-1, n))


@pytest.mark.usefixtures("restore_threads")
def test_adaptive_resample_thread_count_independent():
    g = torch.Generator().manual_seed(4)
    b, n = 16, 4096
    logw = 3 * torch.randn(b, n, generator=g, dtype=torch.float64)
    states = [torch.randn(b, n, 2, generator=g), torch.randint(0, 9, (b, n), generator=g)]
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        outs.append(pathsmc.adaptive_resample(states, logw, 0.5, "multinomial",
                                              generator=gen("cpu", 7)))
    for a, c in zip(outs[0][0], outs[1][0], strict=True):
        assert torch.equal(a, c)
    for i in (1, 2, 3):
        assert torch.equal(outs[0][i], outs[1][i])


# ---- adaptive_resample_ (in place) ----

@pytest.mark.parametrize("threshold", [0.5, 1.0])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_adaptive_resample_inplace_equals_out_of_place(device, scheme, threshold):
    """Same decision, ancestors and weights as adaptive_resample; the states end up equal to
    its outputs, written into the callers' own storage."""
    states, logw = _adaptive_inputs(device, torch.float64, seed=4)
    states = [s.contiguous() for s in states]
    b, n = logw.shape
    u = _uniforms(scheme, b, n, torch.Generator().manual_seed(5), device)
    want = pathsmc.adaptive_resample(states, logw, threshold, scheme, uniforms=u)
    ptrs = [s.data_ptr() for s in states]
    got = pathsmc.adaptive_resample_(states, logw, threshold, scheme, uniforms=u)
    assert torch.equal(got[1], want[2]) and torch.equal(got[2], want[3])
    assert_close(got[0], want[1])
    assert [s.data_ptr() for s in states] == ptrs
    for s, w in zip(states, want[0], strict=True):
        assert torch.equal(s, w)
    assert want[3].any()  # the case resamples something
    # and the reference twin does the same
    again, lw = _adaptive_inputs(device, torch.float64, seed=4)
    again = [s.contiguous() for s in again]
    e = ref.adaptive_resample_(again, lw, threshold, scheme, u)
    assert torch.equal(e[1], got[1])
    for s, w in zip(again, states, strict=True):
        assert torch.equal(s, w)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_adaptive_resample_inplace_internal_rng_and_1d(device, scheme):
    states, logw = _adaptive_inputs(device, torch.float64, seed=6)
    states = [s.contiguous() for s in states]
    want = pathsmc.adaptive_resample(states, logw, 0.5, scheme, generator=gen(device, 3))
    pathsmc.adaptive_resample_(states, logw, 0.5, scheme, generator=gen(device, 3))
    for s, w in zip(states, want[0], strict=True):
        assert torch.equal(s, w)
    n = 9
    lw1 = (4 * torch.randn(n, generator=torch.Generator().manual_seed(7),
                           dtype=torch.float64)).to(device)
    x = torch.arange(n, device=device)
    lw_out, anc, res = pathsmc.adaptive_resample_([x], lw1, 1.0, scheme, generator=gen(device, 1))
    assert anc.shape == (n,) and res.shape == () and res.item()
    assert torch.equal(x, anc)


def test_adaptive_resample_inplace_views_of_a_cache(device):
    """Cache-like states: (B·N, heads, len, dim) tensors viewed as (B, N, ...), many at once."""
    b, n = 3, 16
    g = torch.Generator().manual_seed(8)
    cache = [torch.randn(b * n, 2, 5, 4, generator=g).to(device) for _ in range(6)]
    logw = (3 * torch.randn(b, n, generator=g, dtype=torch.float64)).to(device)
    logw[1] = 0.0  # a uniform row is kept (threshold 0.5)
    copies = [c.clone() for c in cache]
    u = torch.rand(b, generator=g, dtype=torch.float64).to(device)
    _, anc, res = pathsmc.adaptive_resample_([c.view(b, n, 2, 5, 4) for c in cache], logw,
                                             0.5, "systematic", uniforms=u)
    assert res.tolist() == [True, False, True]
    rows = torch.arange(b, device=device)[:, None]
    for c, c0 in zip(cache, copies, strict=True):
        assert torch.equal(c.view(b, n, -1), c0.view(b, n, -1)[rows, anc])


def test_adaptive_resample_inplace_errors():
    x = torch.randn(2, 4, 3)
    lw = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"states\[0\].*contiguous"):
        pathsmc.adaptive_resample_([x.transpose(0, 1).contiguous().transpose(0, 1)], lw)
    with pytest.raises(ValueError, match=r"states\[1\].*requires grad"):
        pathsmc.adaptive_resample_([x, x.clone().requires_grad_()], lw)
    with pytest.raises(ValueError, match=r"states\[0\].*\(2, 4, \.\.\.\)"):
        pathsmc.adaptive_resample_([torch.randn(2, 3)], lw)
    with pytest.raises(ValueError, match="scheme"):
        pathsmc.adaptive_resample_([x], lw, scheme="nope")
