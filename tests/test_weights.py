"""normalize: row-wise log normalized weights, log mean weight (log Ẑ increment) and ESS."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FLOATS, assert_close, tol

import pathsmc
from pathsmc import reference as ref

INF = math.inf
NAN = math.nan


def _logw(shape, dtype, device, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).to(device)


def _check_against_reference(logw):
    out = pathsmc.normalize(logw)
    expect = ref.normalize(logw)
    assert len(out) == 3
    for o, e in zip(out, expect, strict=True):
        assert_close(o, e, **tol(logw.dtype))
    return out


@pytest.mark.parametrize("shape", [(1,), (7,), (1, 1), (3, 1), (4, 33), (2, 1000)], ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=["w32", "w64"])
def test_normalize_matches_reference(device, dtype, shape):
    logw = _logw(shape, dtype, device, seed=len(shape) * 100 + shape[-1])
    lwn, log_mean, ess = _check_against_reference(logw)
    assert lwn.shape == logw.shape and log_mean.shape == logw.shape[:-1]
    assert ess.shape == logw.shape[:-1]
    # independent checks: Σ exp = 1, log mean = logsumexp − log N, 1 <= ESS <= N
    n = shape[-1]
    lw64 = logw.double()
    assert_close(lwn.double().exp().sum(-1), torch.ones_like(log_mean, dtype=torch.float64),
                 **tol(dtype))
    assert_close(log_mean.double(), torch.logsumexp(lw64, -1) - math.log(n), **tol(dtype))
    w = torch.softmax(lw64, -1)
    assert_close(ess.double(), 1.0 / (w * w).sum(-1), **tol(dtype))
    assert (ess >= 1 - 1e-5).all() and (ess <= n * (1 + 1e-5)).all()


@pytest.mark.parametrize("dtype", FLOATS, ids=["w32", "w64"])
def test_normalize_extreme_offsets(device, dtype):
    """Large common offsets do not overflow: only differences matter."""
    # quantized to 2^-8 so that base ± 1e4 is exact in float32 too
    base = torch.round(_logw((3, 50), torch.float64, device, seed=1) * 256) / 256
    offs = torch.tensor([[-1e4], [0.0], [1e4]], dtype=torch.float64, device=device)
    lwn, log_mean, ess = pathsmc.normalize((base + offs).to(dtype))
    lwn0, log_mean0, ess0 = pathsmc.normalize(base.to(dtype))
    assert torch.isfinite(lwn).all() and torch.isfinite(ess).all()
    t = tol(dtype)
    assert_close(lwn, lwn0.expand(3, 50), **t)
    assert_close(ess, ess0.expand(3), **t)
    assert_close((log_mean - log_mean0).double(), offs[:, 0], **t)


def test_normalize_uniform_and_degenerate(device):
    logw = torch.tensor([[0.5] * 8, [0.0] + [-INF] * 7], dtype=torch.float64, device=device)
    lwn, log_mean, ess = pathsmc.normalize(logw)
    assert ess.tolist() == pytest.approx([8.0, 1.0], rel=1e-12)
    assert log_mean.tolist() == pytest.approx([0.5, -math.log(8)], rel=1e-12)
    assert lwn[0].tolist() == pytest.approx([-math.log(8)] * 8, rel=1e-12)
    assert lwn[1, 0].item() == 0.0 and torch.isneginf(lwn[1, 1:]).all()


@pytest.mark.parametrize("dtype", FLOATS, ids=["w32", "w64"])
def test_normalize_dead_particles(device, dtype):
    logw = _logw((4, 12), torch.float64, device, seed=2)
    logw[0, [1, 5, 6]] = NAN  # dead particles
    logw[1, [0, 11]] = -INF  # zero weights
    logw[2, 3] = NAN
    logw[2, 4] = -INF
    logw = logw.to(dtype)
    lwn, log_mean, ess = _check_against_reference(logw)
    dead = torch.isnan(logw) | torch.isneginf(logw)
    assert not torch.isnan(lwn).any() and not torch.isnan(log_mean).any()
    assert not torch.isnan(ess).any()
    assert torch.isneginf(lwn[dead]).all()
    # the dead ones simply do not count: same as dropping them (N still counts them)
    live0 = logw[0][~dead[0]]
    lwn_live, lm_live, ess_live = pathsmc.normalize(live0)
    assert_close(lwn[0][~dead[0]], lwn_live, **tol(dtype))
    assert_close(ess[0], ess_live, **tol(dtype))
    n, n_live = logw.shape[1], live0.numel()
    expect_lm = (lm_live.double() + math.log(n_live) - math.log(n)).to(dtype)
    assert_close(log_mean[0], expect_lm, **tol(dtype))


@pytest.mark.parametrize("fill", [NAN, -INF], ids=["nan", "neginf"])
@pytest.mark.parametrize("dtype", FLOATS, ids=["w32", "w64"])
def test_normalize_all_dead_row(device, dtype, fill):
    logw = _logw((3, 6), torch.float64, device, seed=3)
    logw[1] = fill
    logw[2, ::2] = NAN
    logw = logw.to(dtype)
    lwn, log_mean, ess = _check_against_reference(logw)
    for t in (lwn, log_mean, ess):
        assert not torch.isnan(t).any(), t
    assert ess[1].item() == 0.0
    assert torch.isneginf(log_mean[1]).item()
    assert torch.isneginf(lwn[1]).all()
    assert torch.isfinite(log_mean[[0, 2]]).all() and (ess[[0, 2]] >= 1 - 1e-6).all()
    # a single all-dead population, (N,) input
    lwn1, lm1, ess1 = pathsmc.normalize(torch.full((5,), fill, dtype=dtype, device=device))
    assert ess1.item() == 0.0 and torch.isneginf(lm1).item() and torch.isneginf(lwn1).all()


def test_normalize_noncontiguous(device):
    logw = _logw((40, 3), torch.float64, device, seed=4).t()
    assert not logw.is_contiguous()
    _check_against_reference(logw)
    _check_against_reference(_logw((3, 80), torch.float32, device, seed=5)[:, ::2])


def test_normalize_keeps_input(device):
    logw = _logw((2, 9), torch.float64, device, seed=6)
    logw[0, 2] = NAN
    saved = logw.clone()
    pathsmc.normalize(logw)
    assert torch.equal(logw.nan_to_num(7.0), saved.nan_to_num(7.0))
