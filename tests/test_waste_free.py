"""Waste-free annealed SMC (``annealed_smc(waste_free=True)``, Dau & Chopin 2022) against exact
answers, with the checks and the fault injection of tests/test_samplers.py: log Ẑ through
``log mean_b Ẑ_b`` over B independent rows, mode weights and moments through row means, and
the same checks shown to fail when the incremental weight, the MALA acceptance or the
resampling of the M ancestors is perturbed.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HostRead, perturbed_mala_accept
from test_samplers import (
    F64,
    MW,
    K,
    _perturbed_weight,
    check_log_z,
    check_many_well,
    check_schedule,
    gen,
    row_mean_z,
)

import pathsmc.samplers as samplers
from pathsmc import ops
from pathsmc.samplers import annealed_smc
from pathsmc.targets.boltzmann import DiagonalGaussian, GaussianMixture40


def run_wf(n: int = 1024, b: int = 16, seed: int = 0, target=MW, **kw):
    kw.setdefault("target_ess", 0.8)
    return annealed_smc(target, n, b, waste_free=True, generator=gen(seed), **kw)


@pytest.fixture(scope="module")
def many_well_wf():
    return run_wf()


# ---- log Z and samples against exact answers ----


def test_many_well(many_well_wf):
    res = many_well_wf
    assert check_schedule(res, 16) == []
    assert check_many_well(res, MW) == []
    t = res.betas.shape[0] - 1
    assert bool(res.resampled.all()) and res.resampled.shape == (t, 16)
    # Default P = 16 for N = 1024 (M = 64): N + T·M·(P − 1) evaluations per row.
    assert res.target_evals == 1 + t * 15 / 16
    # Uniform weights after the last step, carrying log Ẑ.
    torch.testing.assert_close(res.logw, res.log_z.unsqueeze(-1).expand(-1, 1024))


def test_gmm40_mode_weights():
    t = GaussianMixture40(log_z=2.5)
    res = run_wf(target=t, seed=7, reference=DiagonalGaussian(2, 0.0, 25.0))
    assert check_schedule(res, 16) == []
    assert check_log_z(res, t.log_z) == []
    comp = t.nearest_component(res.particles)
    mass = torch.zeros(16, 40, dtype=F64).scatter_add_(1, comp, res.weights)
    assert float((mass.mean(0) - 1 / 40).abs().sum()) / 2 < 0.1  # total variation to uniform


def test_gaussian_log_z_and_moments():
    mean, scale = torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0.5, 1.0, 2.0])
    t = DiagonalGaussian(3, mean, scale, log_z=0.7)
    res = run_wf(n=512, target=t, seed=3, chain_length=8)
    assert check_log_z(res, 0.7) == []
    w = res.weights.unsqueeze(-1)
    m = (w * res.particles).sum(1)  # (B, D)
    var = (w * (res.particles - mean) ** 2).sum(1)
    for i in range(3):
        assert abs(row_mean_z(m[:, i], float(mean[i]))) < K
        assert abs(row_mean_z(var[:, i], float(scale[i]) ** 2)) < K


def test_fixed_schedule_and_float32():
    sched = torch.linspace(0, 1, 9, dtype=F64) ** 2
    res = run_wf(n=512, b=16, seed=8, schedule=sched, dtype=torch.float32, chain_length=16)
    assert res.particles.dtype == torch.float32 and res.logw.dtype == F64
    torch.testing.assert_close(res.betas, sched.unsqueeze(1).expand(-1, 16))
    assert check_log_z(res, MW.log_z) == []


def test_finished_rows_keep_their_log_z():
    # Row 0 reaches β = 1 at step 2 and then keeps resampling (uniform weights) and moving
    # while row 1 finishes: its log Ẑ stays that of a run that stops at step 2 (the draws of
    # row 0 do not depend on row 1's schedule).
    r0 = torch.tensor([0.0, 0.5, 1.0, 1.0, 1.0], dtype=F64)
    r1 = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=F64)
    kw = dict(waste_free=True, chain_length=4, generator=gen(9))
    idle = annealed_smc(MW, 64, 2, schedule=torch.stack([r0, r1], 1), **kw)
    kw["generator"] = gen(9)
    short = annealed_smc(MW, 64, 2, schedule=torch.stack([r0[:3], r0[:3]], 1), **kw)
    assert idle.betas.shape[0] == 5 and short.betas.shape[0] == 3
    torch.testing.assert_close(idle.log_z[0], short.log_z[0], rtol=0, atol=1e-12)
    assert not torch.equal(idle.particles[0], short.particles[0])


def test_chain_layout():
    # (B, M, P, D) -> (B, N, D). The target is the reference, so the M ancestors are spread
    # over the N exact draws; with a tiny fixed step consecutive states of a chain are a few
    # √(2hD) apart, while the next chain starts from another, unrelated draw.
    p, h, d = 8, 1e-6, 4
    res = annealed_smc(DiagonalGaussian(d), 256, 2, waste_free=True, chain_length=p,
                       step_size=h, adapt_rate=0.0, schedule=torch.tensor([0.0, 1.0]),
                       generator=gen(11))
    x = res.particles.reshape(2, 256 // p, p, d)
    within = (x[:, :, 1:] - x[:, :, :-1]).norm(dim=-1)
    across = (x[:, 1:, 0] - x[:, :-1, -1]).norm(dim=-1)
    assert float(within.max()) < 10 * math.sqrt(2 * h * d)
    assert float(across.min()) > 0.1 and res.target_evals == 1 + (p - 1) / p


def test_default_chain_length():
    p = samplers._chain_length
    assert p(1024, None, True) == 16 and p(512, None, True) == 8 and p(2**16, None, True) == 64
    assert p(1000, None, True) == 10 and p(100, None, True) == 2 and p(1024, None, False) == 1
    assert p(1024, 32, True) == 32


@pytest.mark.parametrize("n, kw, match", [
    (64, dict(chain_length=3), "chain_length: expected a divisor"),
    (64, dict(chain_length=1), "chain_length: expected a divisor"),
    (64, dict(chain_length=8, mcmc_steps=4), "mcmc_steps: waste-free"),
    (64, dict(waste_free=False, chain_length=8), "chain_length: only used with waste_free"),
    (61, {}, "chain_length: particles = 61"),  # a prime N has no default P
])
def test_argument_errors(n, kw, match):
    with pytest.raises(ValueError, match=match):
        annealed_smc(MW, n, 2, **{"waste_free": True, **kw})


def test_consistent_mcmc_steps_is_accepted():
    res = annealed_smc(MW, 64, 2, waste_free=True, chain_length=4, mcmc_steps=3,
                       target_ess=0.5, generator=gen(12))
    assert res.target_evals == 1 + (res.betas.shape[0] - 1) * 3 / 4


def test_runs_on_device(device):
    res = annealed_smc(MW, 256, 4, waste_free=True, device=device, target_ess=0.7,
                       generator=torch.Generator(device=device).manual_seed(0))
    assert res.particles.device.type == device and bool(res.resampled.all())
    assert check_schedule(res, 4) == []
    assert "annealed SMC" in res.summary()


def test_loop_does_not_read_the_device(guarded_annealed_loop):
    # As tests/test_no_sync.py: between the "all rows finished?" checks the loop is
    # device-only (resampling M ancestors, gathers, chains and their stacking included).
    res = annealed_smc(MW, 128, 3, waste_free=True, chain_length=4, max_steps=10,
                       check_every=10, target_ess=0.3, generator=gen(13))
    assert res.log_z.shape == (3,)
    with pytest.raises(HostRead):
        annealed_smc(MW, 128, waste_free=True, chain_length=4, max_steps=10, check_every=2)


# ---- the checks fail when the algorithm is perturbed ----


def _flat_resample(logw, scheme="systematic", num_samples=None, uniforms=None,
                   generator=None, _orig=ops.resample):
    """The M ancestors drawn ignoring the weights."""
    return _orig(torch.zeros_like(logw), scheme, num_samples, uniforms, generator)


@pytest.mark.parametrize("kind", ["weight:sign", "weight:coef", "mala:hastings_sign",
                                  "mala:density_coef", "resample:flat"])
def test_checks_fail_when_perturbed(kind, monkeypatch):
    where, what = kind.split(":")
    if where == "weight":
        monkeypatch.setattr(samplers, "incremental_log_weight", _perturbed_weight(what))
    elif where == "mala":
        monkeypatch.setattr(ops, "mala_accept", perturbed_mala_accept(what))
    else:
        monkeypatch.setattr(ops, "resample", _flat_resample)
    assert check_many_well(run_wf(seed=10), MW) != []


def test_unperturbed_run_passes():
    # The same configuration as the perturbed runs passes the same checks.
    assert check_many_well(run_wf(seed=10), MW) == []
