"""Annealed SMC (pathsmc.samplers) against exact answers on the Boltzmann targets.

Monte Carlo errors come from the B independent rows of one run: log Ẑ is checked through the
unbiased mean of Ẑ over rows (``log mean_b Ẑ_b``, whose standard error is the relative standard
error of that mean), mode weights and moments through the row means of self-normalized
estimates. The checks return a list of failures so that the same checks can be shown to fail
when a sign or a coefficient of the incremental weight or of the MALA acceptance is perturbed
(injected by wrapping ``incremental_log_weight`` / ``ops.mala_accept``; the library has no test
switches).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import perturbed_mala_accept

import pathsmc.samplers as samplers
from pathsmc import ops
from pathsmc.samplers import annealed_smc, next_temperature
from pathsmc.targets.boltzmann import (
    DiagonalGaussian,
    Funnel,
    GaussianMixture40,
    ManyWell,
    double_well_log_z,
)

F64 = torch.float64
K = 4.0  # standard errors allowed


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def log_mean_z(log_z: torch.Tensor) -> tuple[float, float]:
    """``log mean_b Ẑ_b`` over rows and its standard error (delta method)."""
    b = log_z.numel()
    m = torch.logsumexp(log_z.double(), 0) - math.log(b)
    r = torch.exp(log_z.double() - m)
    return float(m), float(r.std() / math.sqrt(b))


def row_mean_z(per_row: torch.Tensor, exact: float) -> float:
    """How many standard errors (over rows) the mean of per-row estimates is from ``exact``."""
    se = per_row.std() / math.sqrt(per_row.numel())
    return float((per_row.mean() - exact) / se)


def check_log_z(res, exact: float, k: float = K) -> list[str]:
    est, se = log_mean_z(res.log_z)
    if abs(est - exact) > k * se:
        return [f"log Z: {est:.4f} vs exact {exact:.4f} (se {se:.4f})"]
    return []


def check_many_well(res, target: ManyWell, k: float = K) -> list[str]:
    """log Z, right-well probability of every double-well coordinate, the probability that two
    coordinates share a well, and E[v²] = 1 of the Gaussian coordinates."""
    fails = check_log_z(res, target.log_z, k)
    w = res.weights
    signs = target.well_signs(res.particles).double()  # (B, N, m)
    p = target.p_right
    p_right = (w.unsqueeze(-1) * signs).sum(1).mean(1)  # (B,)
    z = row_mean_z(p_right, p)
    if abs(z) > k:
        fails.append(f"P(right well): {p_right.mean():.4f} vs exact {p:.4f} ({z:.1f} se)")
    same = (signs[..., 0] == signs[..., 1]).double()
    p_same = (w * same).sum(1)
    z = row_mean_z(p_same, p * p + (1 - p) ** 2)
    if abs(z) > k:
        fails.append(f"P(same well): {p_same.mean():.4f} vs {p * p + (1 - p) ** 2:.4f} "
                     f"({z:.1f} se)")
    v2 = (w * (res.particles[..., 1::2] ** 2).mean(-1)).sum(1)
    z = row_mean_z(v2, 1.0)
    if abs(z) > k:
        fails.append(f"E[v²]: {v2.mean():.4f} vs 1 ({z:.1f} se)")
    return fails


def check_schedule(res, b: int) -> list[str]:
    fails = []
    betas = res.betas
    if not bool((betas[0] == 0).all()) or not bool((betas[-1] == 1).all()):
        fails.append("schedule does not run from 0 to 1")
    if not bool((betas.diff(dim=0) >= 0).all()):
        fails.append("schedule not monotone")
    if bool(res.forced.any()):
        fails.append("rows forced to β = 1")
    if res.ess.shape != (betas.shape[0] - 1, b) or res.accept.shape != res.ess.shape:
        fails.append("history shapes")
    if not bool(((res.accept > 0.2) & (res.accept < 0.95)).all()):
        fails.append(f"MALA acceptance out of range: {res.accept.min():.2f}–{res.accept.max():.2f}")
    return fails


MW = ManyWell(8)


def run_many_well(n: int = 1024, b: int = 16, seed: int = 0, **kw):
    kw.setdefault("target_ess", 0.8)
    return annealed_smc(MW, n, b, generator=gen(seed), **kw)


@pytest.fixture(scope="module")
def many_well_cess():
    return run_many_well()


# ---- the targets ----


def test_double_well_normalizer_matches_literature():
    # FAB / Stochastic Normalizing Flows: Z of exp(-(x⁴ - 6x² - x/2)) ≈ 11784.50927.
    log_z1, p_right = double_well_log_z()
    assert abs(log_z1 - math.log(11784.50927)) < 1e-8
    assert abs(double_well_log_z(points=20_001)[0] - log_z1) < 1e-10
    assert 0.84 < p_right < 0.85
    assert abs(ManyWell(32).log_z - 16 * (log_z1 + 0.5 * math.log(2 * math.pi))) < 1e-9


@pytest.mark.parametrize("target", [ManyWell(6), Funnel(5), GaussianMixture40(log_z=1.5),
                                    DiagonalGaussian(3, torch.tensor([1.0, 0, -1]),
                                                     torch.tensor([0.5, 1, 2]), log_z=0.7)],
                         ids=["many_well", "funnel", "gmm40", "gaussian"])
def test_target_gradients_and_normalizers(target):
    x = (3.0 * torch.randn(4, 5, target.dim, generator=gen(1), dtype=F64)).requires_grad_()
    lp, g = target.log_prob_and_grad(x)
    assert lp.shape == (4, 5) and g.shape == x.shape
    (auto,) = torch.autograd.grad(lp.sum(), x)
    torch.testing.assert_close(g, auto, rtol=1e-10, atol=1e-10)
    # Exact samples have the right shape and finite log-density (values: tests below).
    s = target.sample((2000,), gen(2))
    assert s.shape == (2000, target.dim) and torch.isfinite(target.log_prob(s)).all()


def test_gmm40_normalizer_on_grid():
    t = GaussianMixture40(log_z=2.5)
    g = torch.linspace(-60, 60, 481, dtype=F64)  # step 0.25: the sum is exact for s = 1.3
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    lp = t.log_prob(torch.stack([xx, yy], -1))
    log_int = torch.logsumexp(lp.flatten(), 0) + 2 * math.log(float(g[1] - g[0]))
    assert abs(float(log_int) - 2.5) < 1e-9
    assert float(t.means.abs().max()) <= 40.0 and t.means.shape == (40, 2)


def test_many_well_exact_samples():
    t = ManyWell(4)
    s = t.sample(40_000, gen(3))
    frac = t.well_signs(s).double().mean()
    assert abs(float(frac) - t.p_right) < 5 * math.sqrt(t.p_right * (1 - t.p_right) / 80_000)
    assert abs(float(s[:, 1::2].var()) - 1.0) < 0.03


# ---- adaptive tempering ----


@pytest.mark.parametrize("criterion", ["cess", "ess"])
def test_next_temperature_hits_the_target_fraction(criterion):
    b, n = 3, 500
    g = gen(4)
    lt = 5.0 * torch.randn(b, n, generator=g, dtype=F64)
    lr = torch.zeros(b, n, dtype=F64)
    logw = torch.randn(b, n, generator=g, dtype=F64)
    beta = torch.tensor([0.0, 0.3, 0.999999], dtype=F64)
    new = next_temperature(beta, lt, lr, logw, target_ess=0.7, criterion=criterion)
    delta = new - beta
    lwn = ops.normalize(logw)[0] if criterion == "cess" else None
    frac = samplers._log_criterion(delta, lt, lr, lwn).exp()
    assert bool((new > beta).all()) and bool((new <= 1).all())
    assert float(new[2]) == 1.0  # the last step fits: jump to exactly 1
    torch.testing.assert_close(frac[:2], torch.full((2,), 0.7, dtype=F64), rtol=1e-4, atol=0)
    # A row at β = 1 stays there.
    assert float(next_temperature(torch.ones(1, dtype=F64), lt[:1], lr[:1], logw[:1])[0]) == 1.0


def test_cess_equals_ess_for_uniform_weights():
    g = gen(5)
    lt = 3.0 * torch.randn(2, 300, generator=g, dtype=F64)
    lr = torch.zeros_like(lt)
    delta = torch.tensor([0.1, 0.5], dtype=F64)
    uniform = torch.full_like(lt, -math.log(300))
    torch.testing.assert_close(samplers._log_criterion(delta, lt, lr, uniform),
                               samplers._log_criterion(delta, lt, lr, None))


# ---- log Z and samples against exact answers ----


def test_many_well_cess(many_well_cess):
    res = many_well_cess
    assert check_schedule(res, 16) == []
    assert check_many_well(res, MW) == []
    # On CPU the finish check runs every step: the run stops when its slowest row finishes.
    assert int(res.num_steps.max()) == res.betas.shape[0] - 1
    assert res.target_evals == 1 + 4 * (res.betas.shape[0] - 1)


def test_many_well_ess_criterion_reaches_one():
    # The BlackJAX / `particles` algorithm: ESS of the incremental weights, resample every step.
    res = run_many_well(n=512, b=16, seed=1, criterion="ess", resample_threshold=1.0)
    assert check_schedule(res, 16) == []
    assert bool(res.resampled.all())
    assert check_log_z(res, MW.log_z) == []


def test_funnel():
    # Neal's funnel, in a version MALA with one step size per row can explore (σ = 1, D = 5);
    # at D = 10, σ = 3 the neck and the mouth are missed and log Ẑ is ~0.6 low.
    t = Funnel(5, sigma=1.0)
    ref = DiagonalGaussian(5, 0.0, torch.tensor([1.0, 1.28, 1.28, 1.28, 1.28]))
    res = annealed_smc(t, 512, 16, reference=ref, target_ess=0.9, mcmc_steps=8,
                       generator=gen(6))
    assert check_schedule(res, 16) == []
    assert check_log_z(res, t.log_z) == []
    v = res.particles[..., 0]
    vm = (res.weights * v).sum(1)
    assert abs(row_mean_z(vm, 0.0)) < K


def test_gmm40():
    t = GaussianMixture40(log_z=2.5)
    ref = DiagonalGaussian(2, 0.0, 25.0)
    res = annealed_smc(t, 1024, 16, reference=ref, target_ess=0.8, generator=gen(7))
    assert check_schedule(res, 16) == []
    assert check_log_z(res, t.log_z) == []
    # Every mode carries about 1/40 of the mass (pooled over rows).
    comp = t.nearest_component(res.particles)
    mass = torch.zeros(16, 40, dtype=F64).scatter_add_(1, comp, res.weights)
    pooled = mass.mean(0)
    assert float((pooled - 1 / 40).abs().sum()) / 2 < 0.1  # total variation to uniform


def test_fixed_schedule_and_float32():
    sched = torch.linspace(0, 1, 9, dtype=F64) ** 2
    res = annealed_smc(MW, 512, 8, schedule=sched, dtype=torch.float32, generator=gen(8))
    assert res.particles.dtype == torch.float32 and res.logw.dtype == F64
    torch.testing.assert_close(res.betas, sched.unsqueeze(1).expand(-1, 8))
    assert check_log_z(res, MW.log_z) == []


def test_max_steps_forces_the_last_step():
    with pytest.warns(RuntimeWarning, match="max_steps"):
        res = annealed_smc(MW, 128, 2, max_steps=2, target_ess=0.95, generator=gen(9))
    assert bool(res.forced.all()) and bool((res.betas[-1] == 1).all())
    assert res.betas.shape == (3, 2) and bool(torch.isfinite(res.log_z).all())


def test_runs_on_device(device):
    res = annealed_smc(ManyWell(4), 256, 4, device=device, target_ess=0.7,
                       generator=torch.Generator(device=device).manual_seed(0))
    assert res.particles.device.type == device
    assert check_schedule(res, 4) == []
    assert "annealed SMC" in res.summary()


# ---- the checks fail when the algorithm is perturbed ----




def _perturbed_weight(kind: str):
    orig = samplers.incremental_log_weight
    if kind == "sign":
        return lambda delta, lt, lr: delta.unsqueeze(-1) * (lt + lr)
    return lambda delta, lt, lr: 1.1 * orig(delta, lt, lr)


@pytest.mark.parametrize("kind", ["weight:sign", "weight:coef", "mala:hastings_sign",
                                  "mala:density_coef"])
def test_checks_fail_when_perturbed(kind, monkeypatch):
    where, what = kind.split(":")
    if where == "weight":
        monkeypatch.setattr(samplers, "incremental_log_weight", _perturbed_weight(what))
    else:
        monkeypatch.setattr(ops, "mala_accept", perturbed_mala_accept(what))
    res = run_many_well(n=512, b=16, seed=10)
    assert check_many_well(res, MW) != []


def test_unperturbed_small_run_passes():
    # The same configuration as the perturbed runs passes the same checks.
    assert check_many_well(run_many_well(n=512, b=16, seed=10), MW) == []


def test_geometric_mix_ends_are_exact():
    from pathsmc.samplers import geometric_mix

    beta = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    ref = torch.tensor([[-1.0], [-1.0], [-1.0]], dtype=torch.float64)
    tgt = torch.tensor([[-math.inf], [-3.0], [-math.inf]], dtype=torch.float64)
    out = geometric_mix(beta, ref, tgt)
    assert out[0, 0] == -1.0 and out[1, 0] == -2.0 and out[2, 0] == -math.inf
    assert not torch.isnan(out).any()


def test_replicate_rows_warn_on_a_wide_log_z_spread():
    """16 replicate rows of the 40-mode mixture with 8 particles: log Ẑ spreads by more than a
    nat; with ``replicates=True`` the result says so (and only then)."""
    import warnings

    from pathsmc.diagnostics import CollapseWarning
    from pathsmc.targets import GaussianMixture40

    target = GaussianMixture40(dim=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CollapseWarning)
        wide = annealed_smc(target, 8, 16, generator=gen(0), replicates=True, mcmc_steps=2)
        plain = annealed_smc(target, 8, 16, generator=gen(0), mcmc_steps=2)
        sound = annealed_smc(target, 256, 16, generator=gen(0), replicates=True, mcmc_steps=2)
    assert float(wide.log_z.std()) > 1.0
    assert any("replicate rows" in w for w in wide.warnings)
    assert not any("replicate rows" in w for w in plain.warnings)
    assert float(sound.log_z.std()) < 0.5 and sound.warnings == []
