"""Diffusion steering (:func:`pathsmc.diffusion.steer`) against exact answers.

The "pretrained models" are Gaussian mixtures with their exact diffused scores (VP schedule,
one VE case), so every target has an exact normalizer: closed form for linear tilts and
products of mixtures, grid quadrature for powers p^β and classifier-free guidance. Each case
runs B independent rows (rows may be different problems: per-row rewards or class labels) at a
fixed seed and checks, with standard errors estimated from the rows,

- log Ẑ within ``K_SE`` standard errors of log Z,
- Ẑ unbiased: the mean over rows of Ẑ / Z within ``K_SE`` standard errors of 1,
- the weighted posterior mean and variance within ``K_SE`` standard errors of the exact ones,
- where one exact sampler serves all rows, a sliced Wasserstein distance to exact samples.

Discretization: the path-RND weights (``weighting="path"``) are exact only in continuous
time; those cases use enough steps for the bias to sit well below the Monte Carlo error (or,
for the near-zero-variance exact twist, an absolute tolerance). ``weighting="density"`` uses
the exact intermediate densities and is unbiased at any step count (few steps).

The ``test_wrong_*`` tests rerun cases with the weight formula perturbed from the outside — an
``ops`` module whose ``em_step`` rewrites its coefficients, or a monkeypatched
:func:`pathsmc.diffusion.fk_potential` — and require the same checks to fail.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from conftest import faulty_ops

import pathsmc.diffusion as diffusion
from pathsmc.diffusion import DiffusionModel, VESchedule, VPSchedule, convert_prediction, steer
from pathsmc.smc import SMCResult
from pathsmc.targets import GaussianMixture, default_2d, geometric_product, mixture_product

F64 = torch.float64
K_SE = 4.5
VP = VPSchedule()
VE = VESchedule(sigma_min=0.01, sigma_max=10.0)

MIX1 = GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-2.0], [1.5]]),
                       torch.tensor([[0.3], [0.5]]))
EXPERT1 = GaussianMixture(torch.tensor([1.0]), torch.tensor([[0.5]]), torch.tensor([[4.0]]))
MIX2 = default_2d()
THETA1 = torch.tensor([0.8], dtype=F64)
THETA2 = torch.tensor([1.0, -0.5], dtype=F64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small problems: one intra-op thread (results do not depend on it; on a loaded
    two-core machine, two spinning threads per op made the file several times slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def model(mix: GaussianMixture, prediction: str = "score", schedule=VP) -> DiffusionModel:
    return DiffusionModel.from_mixture(mix, schedule, prediction)


def linear_reward(theta: torch.Tensor):
    return lambda x: x.double() @ theta


def exact_value(mix: GaussianMixture, theta: torch.Tensor, schedule=VP):
    """The exact soft value V_t(x) = log E[exp(θ·X_0) | X_t = x] and its gradient."""

    def value(x: torch.Tensor, t: float):
        _, _, v, g = mix.diffused(schedule, t).log_prob_score_value(x, theta, grad=True)
        return v, g

    return value


def tweedie_value(mix: GaussianMixture, theta: torch.Tensor):
    """An approximate twist: θ · E[X_0 | X_t = x] (gradient by autograd)."""
    return lambda x, t: mix.diffused(VP, t).posterior_mean(x) @ theta


class ClassConditional:
    """A class-conditional mixture model: label c ≥ 0 is component c, label −1 the mixture."""

    def __init__(self, mix: GaussianMixture) -> None:
        self.mix = mix

    def __call__(self, x: torch.Tensor, t: float, labels: torch.Tensor) -> torch.Tensor:
        dg = self.mix.diffused(VP, t)
        mean = dg.means[labels.clamp(min=0)]  # (B, D)
        prec = torch.linalg.inv(dg.covs[labels.clamp(min=0)])  # (B, D, D)
        comp = -torch.matmul(x.double() - mean.unsqueeze(1), prec)
        return torch.where(labels.view(-1, 1, 1) >= 0, comp, dg.score(x))

    def component(self, c: int) -> GaussianMixture:
        return GaussianMixture(torch.ones(1), self.mix.means[c:c + 1], self.mix.covs[c:c + 1])


# ---- the checks ----


class Exact(NamedTuple):
    """Exact answers: log Z ``(B,)`` or scalar, mean and variance ``(B, D)`` or ``(D,)`` (rows
    may carry different problems), and an exact sampler when all rows share the target."""

    log_z: torch.Tensor | float
    mean: torch.Tensor
    var: torch.Tensor
    sample: Callable[[int, torch.Generator], torch.Tensor] | None = None


def of_mixture(tilt) -> Exact:
    mix = tilt.mixture
    return Exact(tilt.log_z, mix.mean(), torch.diagonal(mix.covariance()), mix.sample)


def of_grid(g) -> Exact:
    return Exact(g.log_z, g.mean(), torch.diagonal(g.covariance()), g.sample)


def zscores(res: SMCResult, exact: Exact) -> dict[str, float]:
    """Deviations from the exact answers in standard errors over rows (pooled over rows)."""
    b = res.log_z.shape[0]
    d = res.log_z.double().cpu() - torch.as_tensor(exact.log_z, dtype=F64).expand(b)
    ratio = d.exp()
    w = res.weights.double().cpu().unsqueeze(-1)
    x = res.particles.double().cpu()
    pm = (w * x).sum(1)
    pv = (w * x * x).sum(1) - pm * pm
    dm = pm - exact.mean.expand(b, -1)
    dv = pv - exact.var.expand(b, -1)
    se = math.sqrt(b)
    return {
        "log_z": float(d.mean() / (d.std() / se + 1e-3)),
        "z_ratio": float((ratio.mean() - 1.0) / (ratio.std() / se + 1e-3)),
        "mean": float((dm.mean(0) / (dm.std(0) / se + 1e-3)).abs().max()),
        "var": float((dv.mean(0) / (dv.std(0) / se + 1e-3)).abs().max()),
        "dlog_z": float(d.mean()),
        "sd": float(d.std()),
    }


def passes(z: dict[str, float]) -> bool:
    return (abs(z["log_z"]) < K_SE and abs(z["z_ratio"]) < K_SE and z["mean"] < K_SE
            and z["var"] < K_SE)


def sliced_wasserstein(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor,
                       gen: torch.Generator, projections: int = 32) -> float:
    """Sliced W1 between the weighted sample ``(x (M, D), w (M,))`` and the sample ``y``."""
    theta = torch.randn(projections, x.shape[1], dtype=F64, generator=gen)
    theta = theta / theta.norm(dim=1, keepdim=True)
    q = (torch.arange(1000, dtype=F64) + 0.5) / 1000
    px, py = x @ theta.T, y @ theta.T
    out = []
    for j in range(projections):
        order = px[:, j].argsort()
        cdf = torch.cumsum(w[order], 0)
        idx = torch.searchsorted(cdf / cdf[-1], q).clamp(max=len(order) - 1)
        out.append((px[order, j][idx] - torch.quantile(py[:, j], q)).abs().mean())
    return float(torch.stack(out).mean())


def distance_to_exact(res: SMCResult, exact: Exact, seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    b, n = res.logw.shape
    x = res.particles.double().cpu().reshape(b * n, -1)
    w = (res.weights.double().cpu() / b).reshape(-1)
    return sliced_wasserstein(x, w, exact.sample(20_000, gen), gen)


def assert_exact(res: SMCResult, exact: Exact) -> dict[str, float]:
    assert bool(torch.isfinite(res.log_z).all()), res.log_z
    assert not res.dead_rows
    z = zscores(res, exact)
    assert passes(z), z
    return z


# ---- the cases ----

RUNS = 16


@functools.cache
def grid_answer(key: str) -> Exact:
    """Quadrature answers, computed once."""
    if key == "temper1":
        return of_grid(MIX1.power(0.5))
    if key == "temper2":
        return of_grid(MIX2.power(0.5, points=401))
    if key.startswith("cfg"):
        c = int(key[3:])
        return of_grid(geometric_product([ClassConditional(MIX1).component(c), MIX1],
                                         [1.5, -0.5]))
    raise KeyError(key)


def per_row(answers: list[Exact], rows: list[int]) -> Exact:
    return Exact(torch.tensor([float(answers[r].log_z) for r in rows], dtype=F64),
                 torch.stack([answers[r].mean for r in rows]),
                 torch.stack([answers[r].var for r in rows]))


def case(name: str, ops_module=None, seed: int = 1) -> tuple[SMCResult, Exact]:
    """Run one named case; returns the result and the exact answers."""
    kw = {"batch": RUNS, "seed": seed, "dtype": F64, "ops": ops_module}
    if name.startswith("reward"):
        _, pot, weighting = name.split("-")
        guided = pot == "guided"
        res = steer(model(MIX1), "reward", reward=linear_reward(THETA1),
                    potential="difference" if guided else pot,
                    potential_every={"max": 5, "sum": 10}.get(pot, 1),
                    guidance=1.0 if guided else 0.0, weighting=weighting,
                    particles=256 if weighting == "path" else 512,
                    steps=100 if weighting == "path" else 25, **kw)
        return res, of_mixture(MIX1.linear_tilt(THETA1))
    if name == "rows-2d":  # three conditions (reward directions), eight rows each
        thetas = torch.tensor([[1.0, -0.5], [-0.5, 0.0], [0.0, 0.7]], dtype=F64)
        rows = [i for i in range(3) for _ in range(RUNS // 2)]
        per_row_theta = thetas[rows]
        kw["batch"] = len(rows)
        res = steer(model(MIX2), "reward",
                    reward=lambda x: (x.double() * per_row_theta[:, None]).sum(-1),
                    particles=256, steps=40, weighting="density", **kw)
        return res, per_row([of_mixture(MIX2.linear_tilt(th)) for th in thetas], rows)
    if name.startswith("temper"):
        _, d, weighting = name.split("-")
        mix, schedule = (MIX2, VP) if d == "2" else (MIX1, VE if d == "ve" else VP)
        res = steer(model(mix, schedule=schedule), "temper", beta=0.5, weighting=weighting,
                    particles=512, steps=100 if weighting == "path" else 25, **kw)
        return res, grid_answer("temper2" if d == "2" else "temper1")
    if name.startswith("product"):
        _, weighting = name.split("-")
        res = steer([model(MIX1), model(EXPERT1)], "product", beta=[1.0, 1.0],
                    weighting=weighting, particles=2048, steps=50, **kw)
        return res, of_mixture(mixture_product([MIX1, EXPERT1]))
    if name == "cfg":  # per-row class labels, guidance weight w = 1.5
        labels = torch.tensor([0, 1]).repeat(RUNS // 2)
        cond = DiffusionModel(ClassConditional(MIX1), VP, condition=labels, dim=1)
        uncond = cond.with_condition(torch.full_like(labels, -1))
        res = steer([cond, uncond], "product", beta=[1.5, -0.5], particles=256, steps=100, **kw)
        return res, per_row([grid_answer(f"cfg{c}") for c in (0, 1)], labels.tolist())
    if name.startswith("twisted"):
        _, twist, weighting = name.split("-")
        value = exact_value(MIX1, THETA1) if twist == "exact" else tweedie_value(MIX1, THETA1)
        res = steer(model(MIX1), "twisted", value=value, weighting=weighting, particles=256,
                    steps=100 if weighting == "path" else 25, **kw)
        return res, of_mixture(MIX1.linear_tilt(THETA1))
    raise KeyError(name)


CASES = [
    "reward-difference-density",
    "reward-guided-density",
    "reward-guided-path",
    "reward-max-density",
    "reward-sum-density",
    "reward-difference-path",
    "rows-2d",
    "temper-1-path",
    "temper-1-density",
    "temper-2-density",
    "temper-ve-density",
    "product-path",
    "cfg",
    "twisted-tweedie-path",
    "twisted-exact-density",
]


@functools.cache
def cached_case(name: str):
    return case(name)


@pytest.mark.parametrize("name", CASES)
def test_steer_matches_exact(name: str) -> None:
    res, exact = cached_case(name)
    b = res.log_z.shape[0]
    assert res.particles.shape[:2] == (b, res.logw.shape[1]) and res.log_z.shape == (b,)
    assert bool(((res.ess >= 1) & (res.ess <= res.logw.shape[1] + 1e-6)).all())
    assert_exact(res, exact)
    if exact.sample is not None:  # the weighted particles against exact samples
        assert distance_to_exact(res, exact) < 0.2


@pytest.mark.parametrize("schedule,tol", [(VP, 0.02), (VE, 0.06)], ids=["vp", "ve"])
def test_exact_twist_is_sharp(monkeypatch, schedule, tol: float) -> None:
    """With the exact soft value V_t and guidance g²∇V_t (the optimal proposal) every
    particle carries nearly the same weight; with the path RND what is left is the
    discretization of the model chain (an absolute tolerance at 100 steps)."""
    tilt = MIX1.linear_tilt(THETA1)
    if schedule is VP:
        res, _ = cached_case("twisted-exact-density")
        assert float((res.log_z - tilt.log_z).abs().max()) < 0.05
        assert float(res.ess[-1].min()) > 0.8 * res.logw.shape[1]
    path = steer(model(MIX1, schedule=schedule), "twisted",
                 value=exact_value(MIX1, THETA1, schedule), particles=256, batch=4, steps=100,
                 seed=3, dtype=F64)
    assert float((path.log_z - tilt.log_z).abs().max()) < tol
    assert float(path.ess[-1].min()) > 0.9 * 256
    # the same run with V_{t−h}(x') in place of V_{t−h}(x') − V_t(x) is far off
    monkeypatch.setattr(diffusion, "fk_potential", _no_difference(diffusion.fk_potential))
    bad = steer(model(MIX1, schedule=schedule), "twisted",
                value=exact_value(MIX1, THETA1, schedule), particles=256, batch=4, steps=100,
                seed=3, dtype=F64)
    assert float((bad.log_z - tilt.log_z).abs().min()) > 10 * tol


def test_on_device(device: str) -> None:
    """The particles, the model and the weights on ``device`` (CUDA when available)."""
    mix = MIX1.to(device=device)
    theta = THETA1.to(device)
    res = steer(DiffusionModel.from_mixture(mix, VP), "reward", reward=linear_reward(theta),
                guidance=1.0, particles=512, batch=RUNS, steps=25, weighting="density",
                seed=2, device=device, dtype=F64)
    assert res.particles.device.type == torch.device(device).type
    assert_exact(res, of_mixture(MIX1.linear_tilt(THETA1)))


# ---- the same checks fail with a wrong weight ----




def _first_coef_one(coefs):
    return [1.0] + list(coefs[1:])


EM_FAULTS = [
    ("temper-1-path", {"fwd_coef": lambda c: 0.0}),  # c_f = 1 − β dropped
    ("temper-1-path", {"ref_coefs": lambda c: [1.0]}),  # c = (β) replaced by 1
    ("temper-1-path", {"fwd_linear": lambda lam: -lam}),  # forward drift sign
    ("temper-1-density", {"fwd_coef": lambda c: 0.0}),  # forward kernel dropped
    ("product-path", {"fwd_coef": lambda c: 0.0}),  # c_f = 1 − Σβ = −1 dropped
    ("product-path", {"ref_coefs": lambda c: list(c[:1]) + [0.0]}),  # one model dropped
    ("cfg", {"ref_coefs": lambda c: [c[0], 0.0]}),  # the unconditional model dropped
    ("reward-guided-path", {"ref_coefs": lambda c: [0.0]}),  # guidance left uncorrected
    ("reward-guided-density", {"fwd_linear": lambda lam: -lam}),
    ("twisted-tweedie-path", {"ref_coefs": lambda c: [0.0]}),
]


@pytest.mark.parametrize("name,fault", EM_FAULTS,
                         ids=[f"{n}:{next(iter(f))}" for n, f in EM_FAULTS])
def test_wrong_step_weight_is_detected(name: str, fault) -> None:
    res, exact = case(name, faulty_ops(**fault))
    z = zscores(res, exact)
    assert not passes(z), z


def _no_difference(original):
    """r_t instead of r_t − r_{t+h} (the potential does not telescope)."""

    def fk_potential(kind, r_new, carry, final):
        inc, carry2 = original(kind, r_new, carry, final)
        return (inc if carry is None else r_new), carry2

    return fk_potential


def _no_final_correction(original):
    """max / sum potentials without the last ``r(x_0) − Σ earlier`` factor."""

    def fk_potential(kind, r_new, carry, final):
        if final:
            return torch.zeros_like(r_new), carry
        return original(kind, r_new, carry, final)

    return fk_potential


def _flipped(original):
    """The potential's sign flipped."""

    def fk_potential(kind, r_new, carry, final):
        inc, carry2 = original(kind, r_new, carry, final)
        return -inc, carry2

    return fk_potential


POTENTIAL_FAULTS = [
    ("reward-difference-density", _no_difference),
    ("reward-max-density", _no_final_correction),
    ("reward-sum-density", _no_final_correction),
    ("twisted-tweedie-path", _flipped),
    ("twisted-exact-density", _no_difference),
]


@pytest.mark.parametrize("name,fault", POTENTIAL_FAULTS,
                         ids=[f"{n}:{f.__name__}" for n, f in POTENTIAL_FAULTS])
def test_wrong_potential_is_detected(monkeypatch, name: str, fault) -> None:
    monkeypatch.setattr(diffusion, "fk_potential", fault(diffusion.fk_potential))
    res, exact = case(name)
    z = zscores(res, exact)
    assert not passes(z), z


# ---- uncorrected guidance: the baseline ----


def test_uncorrected_is_the_unweighted_proposal() -> None:
    """The annealed-score proposal alone (no weights) does not sample p^β (β = 0.5: far too
    wide); the weighted run of the same proposal (``temper-1-density``) is exact."""
    exact = grid_answer("temper1")
    res = steer(model(MIX1), "uncorrected", beta=0.5, particles=512, batch=RUNS, steps=25,
                seed=1, dtype=F64)
    assert bool((res.log_z == 0).all()) and bool((res.ess == 512).all())
    assert not bool(res.resampled.any())
    z = zscores(res, exact)
    assert z["var"] > 10 * K_SE, z
    assert distance_to_exact(res, exact) > 0.5
    # with a reward: guided by ∇r(x̂_0), still unweighted
    g = steer(model(MIX1), "uncorrected", reward=linear_reward(THETA1), particles=64, batch=2,
              steps=10, seed=1, dtype=F64)
    assert bool((g.log_z == 0).all())


def test_tweedie_twist_equals_guided_reward() -> None:
    """The twist θ·x̂_0(x) with guidance is the guided reward tilt with the difference
    potential: the two code paths (value with autograd, reward through the denoiser) agree."""
    a, _ = cached_case("twisted-tweedie-path")
    b, _ = cached_case("reward-guided-path")
    torch.testing.assert_close(a.log_z, b.log_z, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a.particles, b.particles, rtol=1e-9, atol=1e-9)


# ---- the model wrapper ----


@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_predictions_are_interchangeable(prediction: str) -> None:
    """ε- and x0-parameterized models steer exactly like the score model."""
    kw = {"particles": 64, "batch": 2, "steps": 10, "seed": 4, "dtype": F64,
          "reward": linear_reward(THETA2), "guidance": 1.0}
    a = steer(model(MIX2), "reward", **kw)
    b = steer(model(MIX2, prediction), "reward", **kw)
    torch.testing.assert_close(b.particles, a.particles, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b.log_z, a.log_z, rtol=1e-9, atol=1e-9)


def test_model_wrapper_conversions() -> None:
    m = model(MIX2)
    x = 1.5 * torch.randn(2, 5, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    for t in (0.05, 0.4, 0.9):
        dg = MIX2.diffused(VP, t)
        s = m.score(x, t)
        torch.testing.assert_close(s, dg.score(x))
        torch.testing.assert_close(m.denoise(x, t), dg.posterior_mean(x))
        mm, v = VP.marginal(t)
        torch.testing.assert_close(m.eps(x, t), -math.sqrt(v) * s)
        for src in ("score", "eps", "x0"):
            pred = convert_prediction(s, x, t, VP, "score", src)
            for dst in ("score", "eps", "x0"):
                back = convert_prediction(pred, x, t, VP, src, dst)
                torch.testing.assert_close(back, convert_prediction(s, x, t, VP, "score", dst))
    torch.testing.assert_close(m.denoise(x, 0.0), x)
    with pytest.raises(ValueError, match="variance"):
        convert_prediction(x, x, 0.0, VP, "eps", "score")
    torch.testing.assert_close(m.log_prob(x, 0.3), MIX2.diffused(VP, 0.3).log_prob(x))


def test_bad_arguments() -> None:
    m = model(MIX1)
    with pytest.raises(ValueError, match="mode"):
        steer(m, "nope", particles=4)
    with pytest.raises(ValueError, match="reward"):
        steer(m, "reward", particles=4)
    with pytest.raises(ValueError, match="beta"):
        steer(m, "temper", particles=4)
    with pytest.raises(ValueError, match="beta"):
        steer([m, m], "product", beta=[1.0], particles=4)
    with pytest.raises(ValueError, match="value"):
        steer(m, "twisted", particles=4)
    with pytest.raises(ValueError, match="potential"):
        steer(m, "reward", reward=linear_reward(THETA1), potential="min", particles=4)
    with pytest.raises(ValueError, match="log_prob"):
        steer(DiffusionModel(m.fn, VP, dim=1), "temper", beta=0.5, weighting="density",
              particles=4)
    with pytest.raises(ValueError, match="dim"):
        steer(DiffusionModel(m.fn, VP), "temper", beta=0.5, particles=4)
    with pytest.raises(ValueError, match="times"):
        steer(m, "temper", beta=0.5, times=[1.0, 0.5, 0.6, 0.0], particles=4)
    with pytest.raises(ValueError, match="prediction"):
        DiffusionModel(m.fn, VP, "velocity")


# ---- ground truth helpers ----


def test_mixture_product_closed_form_vs_quadrature() -> None:
    prod = MIX1.product(EXPERT1)
    grid = geometric_product([MIX1, EXPERT1], [1.0, 1.0])
    assert float(prod.log_z) == pytest.approx(float(grid.log_z), abs=1e-9)
    torch.testing.assert_close(prod.mixture.mean(), grid.mean())
    x = torch.linspace(-3, 3, 7, dtype=F64).unsqueeze(-1)
    torch.testing.assert_close(prod.mixture.log_prob(x),
                               MIX1.log_prob(x) + EXPERT1.log_prob(x) - prod.log_z)
    other = GaussianMixture(torch.tensor([1.0, 2.0]), torch.tensor([[3.0, 2.0], [-3.0, 0.0]]),
                            torch.tensor([[2.0, 2.0], [1.0, 1.0]]))
    p2 = mixture_product([MIX2, other])
    g2 = geometric_product([MIX2, other], [1.0, 1.0], points=501)
    assert p2.mixture.num_components == 12
    assert float(p2.log_z) == pytest.approx(float(g2.log_z), abs=1e-8)
    torch.testing.assert_close(p2.mixture.covariance(), g2.covariance(), rtol=1e-6, atol=1e-6)


def test_power_quadrature_and_grid_sampler() -> None:
    x = torch.linspace(-40.0, 40.0, 160001, dtype=F64).unsqueeze(-1)
    direct = float(torch.logsumexp(0.5 * MIX1.log_prob(x), 0)) + math.log(80.0 / 160000)
    g = MIX1.power(0.5)
    assert float(g.log_z) == pytest.approx(direct, abs=1e-8)
    assert float(MIX1.power(1.0).log_z) == pytest.approx(0.0, abs=1e-10)
    g2 = MIX2.power(1.0, points=401)
    assert float(g2.log_z) == pytest.approx(0.0, abs=1e-8)
    torch.testing.assert_close(g2.mean(), MIX2.mean())
    torch.testing.assert_close(g2.covariance(), MIX2.covariance(), rtol=1e-6, atol=1e-6)
    n = 100_000
    s = g.sample(n, torch.Generator().manual_seed(0))
    var = g.covariance()[0, 0]
    assert abs(float(s.mean()) - float(g.mean()[0])) < 5 * math.sqrt(float(var) / n)
    with pytest.raises(ValueError, match="boundary"):
        MIX1.power(0.5, bounds=([-1.0], [1.0]))


def test_steering_model_is_what_steer_runs():
    from pathsmc.diffusion import steering_model
    from pathsmc.smc import smc

    kw = dict(reward=linear_reward(THETA1), steps=12)
    a = steer(model(MIX1), "reward", particles=64, batch=3, threshold=0.7, seed=4, **kw)
    fk = steering_model(model(MIX1), "reward", **kw)
    b = smc(fk, 64, 3, threshold=0.7, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.particles, b.particles) and torch.equal(a.log_z, b.log_z)
    with pytest.raises(ValueError, match="reward"):
        steering_model(model(MIX1), "reward")


def test_exponents_accept_any_real_number():
    import numpy as np

    from pathsmc.diffusion import model_exponents

    for beta in (np.array([1, 1]), torch.tensor([0.5, 0.5]), [np.float32(0.5)] * 2, (1, 2.5)):
        assert len(model_exponents(beta, 2)) == 2
    assert model_exponents(np.float64(0.3), 1) == [0.3]
    assert model_exponents(None, 3) == [1.0, 1.0, 1.0]
    for bad, match in ((True, "numbers"), ("x", "numbers"), ([1.0], "2 exponents"),
                       ([1.0, math.inf], "finite")):
        with pytest.raises(ValueError, match=match):
            model_exponents(bad, 2)
    # a product of one model (= tempering) is allowed, with a NumPy exponent
    res = steer([model(MIX1)], "product", beta=np.array([0.5]), particles=32, steps=4, seed=0)
    assert bool(torch.isfinite(res.log_z).all())
