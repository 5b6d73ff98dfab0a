"""Gaussian-mixture target and noise schedules: exact diffused densities, scores, tilts."""

from __future__ import annotations

import math

import pytest
import torch

from pathsmc.diffusion import ReverseEM, VESchedule, VPSchedule, time_grid
from pathsmc.targets import DiffusedGaussianMixture, GaussianMixture, default_2d

F64 = torch.float64
SCHEDULES = [VPSchedule(), VESchedule(sigma_min=0.02, sigma_max=8.0)]
TIMES = [0.0, 1e-3, 0.1, 0.5, 1.0]


def random_mixture(k: int, d: int, seed: int, diagonal: bool = False) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(k, generator=g, dtype=F64) + 0.1
    means = 3.0 * torch.randn(k, d, generator=g, dtype=F64)
    if diagonal:
        covs = 0.2 + torch.rand(k, d, generator=g, dtype=F64)
    else:
        a = torch.randn(k, d, d, generator=g, dtype=F64) / math.sqrt(d)
        covs = a @ a.transpose(-1, -2) + 0.2 * torch.eye(d, dtype=F64)
    return GaussianMixture(weights, means, covs)


MIXTURES = {
    "default_2d": default_2d(),
    "full_3d": random_mixture(4, 3, seed=1),
    "diag_3d": random_mixture(3, 3, seed=2, diagonal=True),
    "1d": random_mixture(3, 1, seed=3),
}


def grid_2d(lim: float, n: int) -> tuple[torch.Tensor, float]:
    g = torch.linspace(-lim, lim, n, dtype=F64)
    gx, gy = torch.meshgrid(g, g, indexing="ij")
    return torch.stack([gx, gy], -1), float(g[1] - g[0]) ** 2


def grid_log_integral(log_f: torch.Tensor, cell: float) -> float:
    return float(torch.logsumexp(log_f.reshape(-1), 0)) + math.log(cell)


# ---- schedules ----


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["vp", "ve"])
def test_schedule_marginal_matches_sde(schedule) -> None:
    """m' = λ m and v' = 2λ v + g² (the moments of dX = λ X dt + g dW), m(0) = 1, v(0) = 0."""
    assert schedule.marginal(0.0) == (1.0, 0.0)
    h = 1e-6
    for t in (0.05, 0.3, 0.7, 0.95):
        m, v = schedule.marginal(t)
        (mp, vp), (mm, vm) = schedule.marginal(t + h), schedule.marginal(t - h)
        lam, g2 = schedule.drift_linear(t), schedule.g2(t)
        assert (mp - mm) / (2 * h) == pytest.approx(lam * m, rel=1e-6, abs=1e-9)
        assert (vp - vm) / (2 * h) == pytest.approx(2 * lam * v + g2, rel=1e-6)


def test_vp_schedule_values() -> None:
    s = VPSchedule()
    assert s.beta(0.0) == pytest.approx(0.1) and s.beta(1.0) == pytest.approx(20.0)
    assert s.integral_beta(1.0) == pytest.approx(0.1 + 0.5 * 19.9)
    for t in (0.0, 0.3, 1.0):
        m, v = s.marginal(t)
        assert m * m + v == pytest.approx(1.0)
        assert s.alpha_bar(t) == pytest.approx(m * m)
    x = torch.randn(4, 2, dtype=F64)
    torch.testing.assert_close(s.f(x, 0.4), -0.5 * s.beta(0.4) * x)
    # tensors in, tensors out, same values as floats
    tt = torch.tensor([0.0, 0.25, 1.0], dtype=F64)
    m_t, v_t = s.marginal(tt)
    assert isinstance(m_t, torch.Tensor) and m_t.shape == tt.shape
    assert float(v_t[1]) == pytest.approx(s.variance(0.25))


def test_ve_schedule_values() -> None:
    s = VESchedule(sigma_min=0.01, sigma_max=10.0)
    assert s.sigma(0.0) == pytest.approx(0.01) and s.sigma(1.0) == pytest.approx(10.0)
    assert s.variance(1.0) == pytest.approx(100.0 - 1e-4)
    assert s.prior_std == 10.0
    assert s.drift_linear(0.3) == 0.0
    with pytest.raises(ValueError, match="sigma_min"):
        VESchedule(sigma_min=2.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="beta_min"):
        VPSchedule(beta_min=0.0)


def test_reverse_em_coefficients() -> None:
    vp, ve = VPSchedule(), VESchedule()
    em = vp.reverse_em(0.6, 0.01)
    assert isinstance(em, ReverseEM)
    assert em.g2 == pytest.approx(vp.beta(0.6)) and em.sigma == pytest.approx(vp.beta(0.6) ** 0.5)
    assert em.linear == pytest.approx(0.5 * vp.beta(0.6))
    assert em.fwd_linear == pytest.approx(-0.5 * vp.beta(0.59))
    x, s = torch.randn(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    torch.testing.assert_close(em.drift(x, s), -vp.f(x, 0.6) + vp.g2(0.6) * s)
    em = ve.reverse_em(0.6, 0.01)
    assert em.linear == 0.0 and em.fwd_linear == 0.0
    assert em.g2 == pytest.approx(ve.g2(0.6))
    ts = time_grid(4)
    assert ts == [1.0, 0.75, 0.5, 0.25, 0.0]


# ---- densities, scores, diffusion ----


@pytest.mark.parametrize("name", list(MIXTURES))
def test_log_prob_matches_direct_sum(name: str) -> None:
    mix = MIXTURES[name]
    x = 2.0 * torch.randn(5, 7, mix.dim, dtype=F64)
    direct = torch.zeros(5, 7, dtype=F64)
    for k in range(mix.num_components):
        mvn = torch.distributions.MultivariateNormal(mix.means[k], mix.covs[k])
        direct = direct + mix.weights[k] * mvn.log_prob(x).exp()
    torch.testing.assert_close(mix.log_prob(x), direct.log())
    torch.testing.assert_close(mix.responsibilities(x).sum(-1), torch.ones(5, 7, dtype=F64))


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["vp", "ve"])
@pytest.mark.parametrize("name", list(MIXTURES))
def test_diffused_score_is_grad_of_log_prob(name: str, schedule) -> None:
    mix = MIXTURES[name]
    x = (2.0 * torch.randn(6, 5, mix.dim, dtype=F64)).requires_grad_()
    for t in TIMES:
        dg = mix.diffused(schedule, t)
        lp = dg.log_prob(x)
        (grad,) = torch.autograd.grad(lp.sum(), x)
        torch.testing.assert_close(dg.score(x), grad, rtol=1e-9, atol=1e-10)
        lp2, s2 = dg.log_prob_and_score(x)
        torch.testing.assert_close(lp2, lp.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["vp", "ve"])
@pytest.mark.parametrize("name", list(MIXTURES))
def test_diffused_at_zero_is_the_mixture(name: str, schedule) -> None:
    mix = MIXTURES[name]
    x = 2.0 * torch.randn(50, mix.dim, dtype=F64)
    dg = mix.diffused(schedule, 0.0)
    torch.testing.assert_close(dg.log_prob(x), mix.log_prob(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dg.score(x), mix.score(x), rtol=1e-12, atol=1e-12)
    # and equals the Gaussian convolution at t > 0: components N(m μ, m² Σ + v I)
    t = torch.tensor(0.4, dtype=F64)  # a 0-dim tensor works as well as a float
    dg = mix.diffused(schedule, t)
    m, v = schedule.marginal(0.4)
    ref = torch.zeros(50, dtype=F64)
    for k in range(mix.num_components):
        cov = m * m * mix.covs[k] + v * torch.eye(mix.dim, dtype=F64)
        mvn = torch.distributions.MultivariateNormal(m * mix.means[k], cov)
        ref = ref + mix.weights[k] * mvn.log_prob(x).exp()
    torch.testing.assert_close(dg.log_prob(x), ref.log())


def test_diffused_vp_at_one_is_close_to_the_prior() -> None:
    mix = default_2d()
    dg = mix.diffused(VPSchedule(), 1.0)
    x = torch.randn(200, 2, dtype=F64)
    prior = -0.5 * (x * x).sum(-1) - math.log(2 * math.pi)
    assert float((dg.log_prob(x) - prior).abs().max()) < 0.05


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["vp", "ve"])
@pytest.mark.parametrize("name", ["default_2d", "full_3d"])
def test_posterior_mean_is_tweedie_and_gradients(name: str, schedule) -> None:
    """E[X_0|X_t] = (x + v s)/m; ∇θ·E[X_0|X_t] and the soft value's gradient match autograd;
    p_t exp(V_t) = Z · (tilted mixture diffused to t)."""
    mix = MIXTURES[name]
    theta = torch.linspace(0.5, -0.7, mix.dim, dtype=F64)
    tilt = mix.linear_tilt(theta)
    x = (2.0 * torch.randn(40, mix.dim, dtype=F64)).requires_grad_()
    for t in [0.05, 0.4, 1.0]:
        dg = mix.diffused(schedule, t)
        assert isinstance(dg, DiffusedGaussianMixture)
        tweedie = (x + dg.v * dg.score(x)) / dg.m
        torch.testing.assert_close(dg.posterior_mean(x), tweedie.detach(), rtol=1e-7, atol=1e-8)
        r = dg.posterior_mean(x) @ theta
        (g_auto,) = torch.autograd.grad(r.sum(), x)
        torch.testing.assert_close(dg.posterior_mean_grad(x, theta), g_auto)
        lp, s, r2, g2 = dg.log_prob_score_reward(x, theta, grad=True)
        torch.testing.assert_close(r2, r.detach())
        torch.testing.assert_close(g2, g_auto)
        lp, s, value, gv = dg.log_prob_score_value(x, theta, grad=True)
        exact = tilt.mixture.diffused(schedule, t).log_prob(x) + tilt.log_z - lp
        torch.testing.assert_close(value, exact.detach())
        (gv_auto,) = torch.autograd.grad(value.sum(), x)
        torch.testing.assert_close(gv, gv_auto)
    # at t = 0 the posterior is a point mass: E[X_0|X_0 = x] = x and V_0 = θ·x
    dg = mix.diffused(schedule, 0.0)
    xd = x.detach()
    torch.testing.assert_close(dg.posterior_mean(xd), xd)
    torch.testing.assert_close(dg.log_prob_score_value(xd, theta)[2], xd @ theta)


# ---- tilts: closed form vs quadrature ----


def test_linear_tilt_log_z_vs_quadrature_2d() -> None:
    mix = default_2d()
    theta = torch.tensor([1.0, -0.5], dtype=F64)
    tilt = mix.linear_tilt(theta)
    pts, cell = grid_2d(14.0, 601)
    log_f = mix.log_prob(pts) + pts @ theta
    assert float(tilt.log_z) == pytest.approx(grid_log_integral(log_f, cell), abs=1e-6)
    # the tilted mixture is p·exp(θ·x)/Z pointwise
    torch.testing.assert_close(tilt.mixture.log_prob(pts), log_f - tilt.log_z)
    assert float(tilt.mixture.weights.sum()) == pytest.approx(1.0)


def test_linear_tilt_log_z_vs_quadrature_1d() -> None:
    mix = MIXTURES["1d"]
    theta = torch.tensor([0.8], dtype=F64)
    tilt = mix.linear_tilt(theta)
    x = torch.linspace(-40.0, 40.0, 20001, dtype=F64).unsqueeze(-1)
    log_f = mix.log_prob(x) + (x @ theta)
    quad = grid_log_integral(log_f, float(x[1, 0] - x[0, 0]))
    assert float(tilt.log_z) == pytest.approx(quad, abs=1e-8)
    # tilted mean against quadrature
    w = torch.softmax(log_f, 0)
    assert float(tilt.mixture.mean()[0]) == pytest.approx(float((w * x[:, 0]).sum()), abs=1e-6)


def test_quadratic_tilt_vs_quadrature() -> None:
    mix = default_2d()
    a = torch.tensor([[0.3, 0.1], [0.1, -0.2]], dtype=F64)  # indefinite; Σ⁻¹ + A stays SPD
    b = torch.tensor([0.5, 1.0], dtype=F64)
    tilt = mix.quadratic_tilt(a, b)
    pts, cell = grid_2d(14.0, 601)
    log_f = mix.log_prob(pts) - 0.5 * ((pts @ a) * pts).sum(-1) + pts @ b
    assert float(tilt.log_z) == pytest.approx(grid_log_integral(log_f, cell), abs=1e-6)
    torch.testing.assert_close(tilt.mixture.log_prob(pts), log_f - tilt.log_z)
    # A = 0 reduces to the linear tilt; a diagonal A given as a vector
    lin = mix.linear_tilt(b)
    q0 = mix.quadratic_tilt(torch.zeros(2, dtype=F64), b)
    torch.testing.assert_close(q0.log_z, lin.log_z)
    torch.testing.assert_close(q0.mixture.means, lin.mixture.means)
    with pytest.raises(ValueError, match="positive definite"):
        mix.quadratic_tilt(torch.tensor([-10.0, 0.0], dtype=F64), b)


def test_quadratic_tilt_1d_vs_quadrature() -> None:
    mix = MIXTURES["1d"]
    tilt = mix.quadratic_tilt(torch.tensor([[0.4]], dtype=F64), torch.tensor([-0.3], dtype=F64))
    x = torch.linspace(-40.0, 40.0, 20001, dtype=F64).unsqueeze(-1)
    log_f = mix.log_prob(x) - 0.2 * x[:, 0] ** 2 - 0.3 * x[:, 0]
    quad = grid_log_integral(log_f, float(x[1, 0] - x[0, 0]))
    assert float(tilt.log_z) == pytest.approx(quad, abs=1e-8)


# ---- sampler ----


@pytest.mark.parametrize("name", ["default_2d", "full_3d", "diag_3d"])
def test_sampler_moments(name: str) -> None:
    mix = MIXTURES[name]
    n = 200_000
    x, comp = mix.sample(n, torch.Generator().manual_seed(7), return_components=True)
    assert x.shape == (n, mix.dim) and x.dtype == F64
    cov = mix.covariance()
    se = (torch.diagonal(cov) / n).sqrt()
    assert bool(((x.mean(0) - mix.mean()).abs() < 5 * se).all())
    emp_cov = torch.cov(x.T)
    # SE of a covariance entry: sqrt((Σ_ii Σ_jj + Σ_ij²)/n) for a Gaussian; mixtures have
    # heavier fourth moments, so allow 8 of them
    se_cov = ((torch.diagonal(cov)[:, None] * torch.diagonal(cov)[None, :] + cov ** 2) / n).sqrt()
    assert bool(((emp_cov - cov).abs() < 8 * se_cov).all())
    freq = torch.bincount(comp, minlength=mix.num_components).double() / n
    w = mix.weights
    assert bool(((freq - w).abs() < 5 * (w * (1 - w) / n).sqrt()).all())
    # within a component, the draws are N(μ_k, Σ_k)
    xk = x[comp == 0]
    assert bool(((xk.mean(0) - mix.means[0]).abs()
                 < 5 * (torch.diagonal(mix.covs[0]) / len(xk)).sqrt()).all())


def test_sampler_is_reproducible() -> None:
    mix = default_2d()
    a = mix.sample(100, torch.Generator().manual_seed(3))
    b = mix.sample(100, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# ---- construction and errors ----


def test_diagonal_equals_full() -> None:
    var = torch.tensor([[0.5, 2.0], [1.0, 0.3]], dtype=F64)
    means = torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=F64)
    w = torch.tensor([2.0, 1.0], dtype=F64)  # unnormalized
    a = GaussianMixture(w, means, var)
    b = GaussianMixture(w / 3, means, torch.diag_embed(var))
    x = torch.randn(30, 2, dtype=F64)
    torch.testing.assert_close(a.log_prob(x), b.log_prob(x))
    torch.testing.assert_close(a.weights, torch.tensor([2 / 3, 1 / 3], dtype=F64))


def test_float32_input_and_batch_shapes() -> None:
    mix = default_2d()
    x = torch.randn(3, 4, 5, 2)
    lp, s = mix.log_prob_and_score(x)
    assert lp.shape == (3, 4, 5) and s.shape == (3, 4, 5, 2)
    assert lp.dtype == F64  # promoted to the parameter dtype
    torch.testing.assert_close(lp, mix.log_prob(x.double()))
    assert mix.component_log_prob(x).shape == (3, 4, 5, 6)


def test_bad_inputs() -> None:
    means = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.ones(3), means, torch.ones(2, 2))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.tensor([1.0, -1.0]), means, torch.ones(2, 2))
    with pytest.raises(ValueError, match="covs"):
        GaussianMixture(torch.ones(2), means, torch.ones(2, 3))
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(torch.ones(2), means, torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
    mix = default_2d()
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., 2\)"):
        mix.log_prob(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="theta"):
        mix.linear_tilt(torch.zeros(3))
