"""mala_accept and replica_swap: exact against the reference, plus statistical checks."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FLOATS, gen, mc_bound

import pathsmc
from pathsmc import reference as ref

NAN, INF = math.nan, math.inf


def _mala_inputs(shape, sdtype, wdtype, device, seed=0):
    """Random MALA inputs whose log-acceptance is spread around 0 (mixed accept/reject)."""
    g = torch.Generator().manual_seed(seed)

    def rn(*s, dtype=sdtype, scale=1.0):
        return (scale * torch.randn(*s, generator=g, dtype=torch.float64)).to(dtype).to(device)

    lshape = tuple(shape[:2]) if len(shape) >= 3 else (shape[0],)
    x = rn(*shape)
    x_prop = x + rn(*shape, scale=0.4)
    grad, grad_prop = rn(*shape, scale=0.3), rn(*shape, scale=0.3)
    logp = rn(*lshape, dtype=wdtype)
    logp_prop = logp + rn(*lshape, dtype=wdtype, scale=1.0)
    u = torch.rand(lshape, generator=g, dtype=torch.float64).to(device)
    return x, x_prop, logp, logp_prop, grad, grad_prop, u


def _check_mala(args, step, u):
    out = pathsmc.mala_accept(*args, step, uniforms=u)
    expect = ref.mala_accept(*args, step, uniforms=u)
    names = ("x_out", "logp_out", "grad_out", "accepted")
    for name, o, e in zip(names, out, expect, strict=True):
        assert o.dtype == e.dtype and o.shape == e.shape, name
        assert torch.equal(o.nan_to_num(0.25), e.nan_to_num(0.25)), name
    return out


@pytest.mark.parametrize("shape", [(40, 3), (1, 1, 1), (3, 30, 1), (2, 25, 2, 3)], ids=str)
@pytest.mark.parametrize("wdtype", FLOATS, ids=["w32", "w64"])
@pytest.mark.parametrize("sdtype", FLOATS, ids=["x32", "x64"])
def test_mala_accept_matches_reference(device, sdtype, wdtype, shape):
    x, x_prop, logp, logp_prop, grad, grad_prop, u = _mala_inputs(shape, sdtype, wdtype,
                                                                  device)
    args = (x, x_prop, logp, logp_prop, grad, grad_prop)
    acc = _check_mala(args, 0.3, u)[3]
    if acc.numel() > 20:
        assert acc.any() and not acc.all()  # the comparison is not trivial
    b = 1 if len(shape) == 2 else shape[0]
    steps = torch.linspace(0.1, 0.6, b, dtype=torch.float64, device=device)
    _check_mala(args, steps, u)
    _check_mala(args, steps.float(), u)


def test_mala_accept_semantics_by_hand(device):
    """x_out/logp_out/grad_out take the proposal exactly where accepted, else the current."""
    x, x_prop, logp, logp_prop, grad, grad_prop, u = _mala_inputs((3, 50, 2), torch.float64,
                                                                  torch.float64, device, 1)
    step = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64, device=device)
    xo, lpo, go, acc = pathsmc.mala_accept(x, x_prop, logp, logp_prop, grad, grad_prop, step,
                                           uniforms=u)
    h = step[:, None]
    fwd = ((x_prop - x - h[..., None] * grad) ** 2).sum(-1) / (4 * h)
    bwd = ((x - x_prop - h[..., None] * grad_prop) ** 2).sum(-1) / (4 * h)
    log_alpha = logp_prop - logp + fwd - bwd
    margin = (torch.log(u) - log_alpha).abs() > 1e-9
    assert torch.equal(acc[margin], (torch.log(u) < log_alpha)[margin])
    a3 = acc[..., None]
    assert torch.equal(xo, torch.where(a3, x_prop, x))
    assert torch.equal(go, torch.where(a3, grad_prop, grad))
    assert torch.equal(lpo, torch.where(acc, logp_prop, logp))


def test_mala_accept_nan_rejects(device):
    x, x_prop, logp, logp_prop, grad, grad_prop, u = _mala_inputs((2, 8, 3), torch.float64,
                                                                  torch.float64, device, 2)
    logp_prop = logp_prop + 50.0  # would always accept
    logp_prop[0, :3] = NAN
    out = pathsmc.mala_accept(x, x_prop, logp, logp_prop, grad, grad_prop, 0.1, uniforms=u)
    assert not out[3][0, :3].any()
    assert out[3][0, 3:].all() and out[3][1].all()
    assert torch.equal(out[1][0, :3], logp[0, :3])
    out = pathsmc.mala_accept(x, x_prop, logp, logp_prop, grad, grad_prop, 0.1,
                              generator=gen(device, 1))
    assert not out[3][0, :3].any()


def test_mala_accept_rate_internal_rng(device):
    """With log α = log 0.3 everywhere, the in-kernel uniforms accept 30% of the time."""
    b, n, d = 4, 5000, 2
    x = torch.zeros(b, n, d, dtype=torch.float64, device=device)
    logp = torch.zeros(b, n, dtype=torch.float64, device=device)
    g = gen(device, 3)
    acc = pathsmc.mala_accept(x, x, logp, logp + math.log(0.3), x, x, 0.5, generator=g)[3]
    acc2 = pathsmc.mala_accept(x, x, logp, logp + math.log(0.3), x, x, 0.5, generator=g)[3]
    rate = acc.double().mean().item()
    assert abs(rate - 0.3) < mc_bound(b * n, var=0.21)
    assert not torch.equal(acc, acc2)
    # reproducible under a seed
    again = pathsmc.mala_accept(x, x, logp, logp + math.log(0.3), x, x, 0.5,
                                generator=gen(device, 3))[3]
    assert torch.equal(acc, again)


@pytest.mark.usefixtures("restore_threads")
def test_mala_accept_thread_count_independent():
    x, x_prop, logp, logp_prop, grad, grad_prop, _ = _mala_inputs((8, 8192, 2), torch.float32,
                                                                  torch.float64, "cpu", 4)
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        outs.append(pathsmc.mala_accept(x, x_prop, logp, logp_prop, grad, grad_prop, 0.3,
                                        generator=gen("cpu", 9)))
    for a, c in zip(*outs, strict=True):
        assert torch.equal(a, c)


def test_mala_leaves_standard_normal_invariant(device):
    """MALA on N(0, 1) started from N(0, 1): the law after many steps is still N(0, 1).

    Two rows with different step sizes (per-row tensor step). The chains must also move
    (acceptance well above 0, start and end decorrelated), or invariance would be trivial.
    Unadjusted Langevin at step 0.5 would have variance 4/3, an uncorrected or wrongly
    corrected MH step a biased variance as well; the bounds are 5 standard errors.
    """
    b, n, steps = 2, 4000, 250
    g = torch.Generator(device=device).manual_seed(21)
    step = torch.tensor([0.5, 0.15], dtype=torch.float64, device=device)
    x = torch.randn(b, n, 1, generator=g, dtype=torch.float64, device=device)
    x0 = x.clone()
    logp, grad = -0.5 * x[..., 0] ** 2, -x
    accepted = torch.zeros(b, dtype=torch.float64, device=device)
    h = step[:, None, None]
    for _ in range(steps):
        noise = torch.randn(x.shape, generator=g, dtype=torch.float64, device=device)
        xp = x + h * grad + (2 * h).sqrt() * noise
        lpp, gp = -0.5 * xp[..., 0] ** 2, -xp
        x, logp, grad, acc = pathsmc.mala_accept(x, xp, logp, lpp, grad, gp, step, generator=g)
        accepted += acc.double().mean(-1)
    rate = accepted / steps
    assert (rate > 0.7).all(), rate
    for r in range(b):
        z = x[r, :, 0].cpu()
        assert abs(z.mean().item()) < mc_bound(n)
        assert abs(z.var().item() - 1.0) < mc_bound(n, var=2.0)
        assert abs((z**4).mean().item() - 3.0) < mc_bound(n, var=96.0)
        corr = torch.corrcoef(torch.stack([x0[r, :, 0].cpu(), z]))[0, 1].item()
        assert abs(corr) < 0.1
    assert torch.equal(logp, -0.5 * x[..., 0] ** 2)  # logp/grad follow the state
    assert torch.equal(grad, -x)


# ---- replica_swap ----

def _swap_states(k, c, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(k, c, 4, generator=g).to(device),
        torch.arange(k * c, device=device).reshape(k, c),
        (torch.rand(k, c, 2, generator=g) < 0.5).to(device),
        torch.randn(c, k, 3, generator=g, dtype=torch.float64).to(device).transpose(0, 1),
    ]


def _check_perm(states, out, accepted, perm, parity):
    k, c = perm.shape
    levels = torch.arange(k - 1, device=perm.device)
    attempted = (levels % 2 == parity)[:, None].expand(k - 1, c)
    assert not accepted[~attempted].any()
    ident = torch.arange(k, device=perm.device)[:, None].expand(k, c)
    expect = ident.clone()
    for lv in range(k - 1):
        expect[lv] = torch.where(accepted[lv], lv + 1, expect[lv])
        expect[lv + 1] = torch.where(accepted[lv], lv, expect[lv + 1])
    assert torch.equal(perm, expect)
    assert torch.equal(perm.sort(0).values, ident)  # a permutation of every column
    cols = torch.arange(c, device=perm.device)[None]
    for s, so in zip(states, out, strict=True):
        assert so.dtype == s.dtype and so.shape == s.shape
        assert torch.equal(so, s[perm, cols])


@pytest.mark.parametrize("k", [2, 5])
@pytest.mark.parametrize("parity", [0, 1])
@pytest.mark.parametrize("ldtype", FLOATS, ids=["r32", "r64"])
def test_replica_swap_matches_reference(device, ldtype, parity, k):
    c = 64
    g = torch.Generator().manual_seed(10 * k + parity)
    states = _swap_states(k, c, device, seed=k)
    log_ratio = (torch.randn(k - 1, c, generator=g, dtype=torch.float64) - 0.5).to(ldtype)
    log_ratio[:, :3] = NAN
    log_ratio[:, 3:5] = INF
    log_ratio[:, 5:7] = -INF
    log_ratio = log_ratio.to(device)
    u = torch.rand(k - 1, c, generator=g, dtype=torch.float64).to(device)
    saved = [s.clone() for s in states]
    out, accepted, perm = pathsmc.replica_swap(states, log_ratio, parity, uniforms=u)
    e_out, e_acc, e_perm = ref.replica_swap(states, log_ratio, parity, uniforms=u)
    assert accepted.dtype == torch.bool and accepted.shape == (k - 1, c)
    assert perm.dtype == torch.int64 and perm.shape == (k, c)
    assert torch.equal(accepted, e_acc)
    assert torch.equal(perm, e_perm)
    for so, es in zip(out, e_out, strict=True):
        assert torch.equal(so, es)
    for s, sv in zip(states, saved, strict=True):
        assert torch.equal(s, sv)
    _check_perm(states, out, accepted, perm, parity)
    attempted = torch.arange(k - 1, device=device) % 2 == parity
    assert not accepted[:, :3].any()  # NaN never swaps
    assert torch.equal(accepted[:, 3:5], attempted[:, None].expand(-1, 2))  # +inf always
    assert not accepted[:, 5:7].any()
    if attempted.any():
        assert accepted.any() and not accepted[attempted].all()
    else:  # K = 2, parity 1: nothing to attempt
        assert torch.equal(perm, torch.arange(k, device=device)[:, None].expand(k, c))


@pytest.mark.parametrize("parity", [0, 1])
def test_replica_swap_internal_rng(device, parity):
    k, c = 5, 4000
    states = _swap_states(k, c, device, seed=1)
    log_ratio = torch.full((k - 1, c), math.log(0.3), dtype=torch.float64, device=device)
    log_ratio[:, :100] = NAN
    g = gen(device, 40 + parity)
    out, accepted, perm = pathsmc.replica_swap(states, log_ratio, parity, generator=g)
    _check_perm(states, out, accepted, perm, parity)
    assert not accepted[:, :100].any()
    lv = parity  # first attempted level
    rate = accepted[lv, 100:].double().mean().item()
    assert abs(rate - 0.3) < mc_bound(c - 100, var=0.21)
    out2, accepted2, _ = pathsmc.replica_swap(states, log_ratio, parity, generator=g)
    assert not torch.equal(accepted, accepted2)
    again = pathsmc.replica_swap(states, log_ratio, parity, generator=gen(device, 40 + parity))
    assert torch.equal(again[1], accepted) and torch.equal(again[2], perm)


def test_replica_swap_all_nan_never_swaps(device):
    k, c = 5, 16
    states = _swap_states(k, c, device, seed=2)
    log_ratio = torch.full((k - 1, c), NAN, device=device)
    for parity in (0, 1):
        out, accepted, perm = pathsmc.replica_swap(states, log_ratio, parity,
                                                   generator=gen(device, parity))
        assert not accepted.any()
        assert torch.equal(perm, torch.arange(k, device=device)[:, None].expand(k, c))
        for s, so in zip(states, out, strict=True):
            assert torch.equal(s, so)


@pytest.mark.usefixtures("restore_threads")
def test_replica_swap_thread_count_independent():
    k, c = 6, 50000
    states = _swap_states(k, c, "cpu", seed=3)
    log_ratio = torch.zeros(k - 1, c) - 0.7
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        outs.append(pathsmc.replica_swap(states, log_ratio, 1, generator=gen("cpu", 2)))
    assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][2], outs[1][2])
    for a, b in zip(outs[0][0], outs[1][0], strict=True):
        assert torch.equal(a, b)


def test_replica_swap_zero_uniform(device):
    """-inf/NaN log ratios give identity, even with u = 0 (log u = -inf)."""
    k, c = 3, 4
    states = _swap_states(k, c, device, seed=5)
    log_ratio = torch.tensor([[-INF, NAN, 0.0, 1.0]] * (k - 1), dtype=torch.float64,
                             device=device)
    u = torch.zeros(k - 1, c, dtype=torch.float64, device=device)
    _, accepted, perm = pathsmc.replica_swap(states, log_ratio, 0, uniforms=u)
    assert accepted[0].tolist() == [False, False, True, True]
    e = ref.replica_swap(states, log_ratio, 0, uniforms=u)
    assert torch.equal(accepted, e[1]) and torch.equal(perm, e[2])
