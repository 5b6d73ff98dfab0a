"""torch.library.opcheck for every op, and an SMC step under torch.compile(fullgraph=True)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SCHEMES, assert_close

import pathsmc

ops = torch.ops.pathsmc


def _rn(*shape, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def _ru(*shape, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=torch.float64).to(device)


def _opcheck_cases(device):
    b, n, d = 2, 6, 3
    x = _rn(b, n, d, dtype=torch.float32, device=device, seed=1)
    drift = _rn(b, n, d, dtype=torch.float32, device=device, seed=2)
    ref = _rn(b, n, d, dtype=torch.float32, device=device, seed=3)
    noise = _rn(b, n, d, dtype=torch.float32, device=device, seed=4)
    logw = _rn(b, n, device=device, seed=5)
    logw_dead = logw.clone()
    logw_dead[0, 1] = -math.inf
    x64 = x.double()
    cases = {
        "em_step": (ops.em_step, (x, drift, logw, 0.1, 1.2, [ref], [0.7], 0.3, -0.2, noise,
                                  None)),
        "em_step_f32w": (ops.em_step, (x64, drift.double(), logw.float(), 0.1, 1.2, [], [], 0.0,
                                       0.0, noise.double(), None)),
        "em_step_nologw": (ops.em_step, (x, drift, None, 0.1, 1.2, [], [], 0.0, 0.0, noise,
                                         None)),
        "kernel_logpdf": (ops.kernel_logpdf, (x, ref, drift, 0.1, 1.2, logw, 0.6, 0.4)),
        "kernel_logpdf_nodrift": (ops.kernel_logpdf, (x64, ref.double(), None, 0.1, 1.2,
                                                      logw.float(), -1.0, 0.0)),
        "normalize": (ops.normalize, (logw_dead,)),
        "normalize_f32": (ops.normalize, (logw.float(),)),
        "mala_accept": (ops.mala_accept, (x, x + 0.1 * noise, logw, logw + 0.3, drift, ref,
                                          torch.tensor([0.2, 0.4], dtype=torch.float64,
                                                       device=device),
                                          _ru(b, n, device=device, seed=6), None)),
    }
    states = [x, torch.arange(b * n, device=device).reshape(b, n)]
    for scheme in SCHEMES:
        shape_m = (b,) if scheme == "systematic" else (b, 9)
        shape_n = (b,) if scheme == "systematic" else (b, n)
        cases[f"resample_{scheme}"] = (
            ops.resample, (logw_dead, scheme, 9, _ru(*shape_m, device=device, seed=7), None))
        cases[f"adaptive_resample_{scheme}"] = (
            ops.adaptive_resample,
            (states, logw_dead, 0.9, scheme, _ru(*shape_n, device=device, seed=8), None))
        cases[f"adaptive_resample__{scheme}"] = (
            ops.adaptive_resample_,
            ([s.clone() for s in states], logw_dead, 0.9, scheme,
             _ru(*shape_n, device=device, seed=8), None))
    k, c = 4, 3
    swap_states = [_rn(k, c, 2, dtype=torch.float32, device=device, seed=9),
                   torch.arange(k * c, device=device).reshape(k, c)]
    log_ratio = _rn(k - 1, c, device=device, seed=10)
    for parity in (0, 1):
        cases[f"replica_swap_{parity}"] = (
            ops.replica_swap,
            (swap_states, log_ratio, parity, _ru(k - 1, c, device=device, seed=11), None))
    return cases


_CASE_NAMES = list(_opcheck_cases("cpu"))


def test_every_op_has_an_opcheck_case():
    names = {"em_step", "kernel_logpdf", "normalize", "resample", "adaptive_resample",
             "adaptive_resample_", "mala_accept", "replica_swap"}
    covered = {op._qualified_op_name.split("::")[-1] for op, _ in _opcheck_cases("cpu").values()}
    assert covered == names


@pytest.mark.parametrize("case", _CASE_NAMES)
def test_opcheck(device, case):
    op, args = _opcheck_cases(device)[case]
    torch.library.opcheck(op, args)


# ---- a small SMC step under torch.compile ----

DT, SIGMA = 0.1, 1.0


def _potential(x):
    return -0.5 * ((x - 1.0) ** 2).sum(-1)


def _smc_step(x, logw, noise, uniforms):
    x_new, lw = pathsmc.em_step(x, -x, logw, dt=DT, sigma=SIGMA, ref_drifts=[-0.5 * x],
                                ref_coefs=[1.0], noise=noise)
    lw = lw + _potential(x_new) - _potential(x)
    states, lw, anc, resampled = pathsmc.adaptive_resample([x_new, x], lw, 0.5, "systematic",
                                                           uniforms=uniforms)
    return states[0], states[1], lw, anc, resampled


def _smc_inputs(device, seed):
    b, n, d = 4, 64, 2
    x = _rn(b, n, d, device=device, seed=seed)
    scale = torch.tensor([0.05, 3.0, 0.5, 2.0], dtype=torch.float64, device=device)[:, None]
    logw = scale * _rn(b, n, device=device, seed=seed + 1)
    noise = _rn(b, n, d, device=device, seed=seed + 2)
    u = _ru(b, device=device, seed=seed + 3)
    return x, logw, noise, u


def test_smc_step_compiles_fullgraph(device):
    torch._dynamo.reset()
    compiled = torch.compile(_smc_step, fullgraph=True)
    for seed in (0, 10):  # twice: the second call reuses the graph with new values
        args = _smc_inputs(device, seed)
        eager = _smc_step(*args)
        got = compiled(*args)
        assert_close(got[0], eager[0], rtol=1e-12, atol=1e-12)
        assert torch.equal(got[1], eager[1])
        assert_close(got[2], eager[2], rtol=1e-9, atol=1e-9)
        assert torch.equal(got[3], eager[3])
        assert torch.equal(got[4], eager[4])
        assert eager[4].any() and not eager[4].all()  # mixed rows
