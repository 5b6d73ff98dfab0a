"""CREPE (:mod:`pathsmc.crepe`) against exact answers on diffused 1-D Gaussian mixtures.

The "pretrained models" are Gaussian mixtures with exact diffused scores (VP schedule); the
targets — a tempered mixture ``p^β`` and a product of two mixtures — have exact moments and
CDFs by quadrature (:class:`pathsmc.targets.GridTarget`) and exact samples.

Monte Carlo errors are batch means over the C chains: each chain is an independent CREPE
system, so the per-chain averages over the recorded rounds are i.i.d. whatever the
autocorrelation along a chain, and their spread gives the standard error of the mean, the
variance (delta method) and the mode weight ``P(X > 0)``. The distribution check is the
Wasserstein-1 distance between the CDF of level-0 states (snapshots ``LAG`` rounds apart, all
chains) and the exact CDF, against the 99th percentile of the same distance for exact samples of
the same size (times 1.3 for the little correlation left between snapshots).

Discretization: with ``weighting="path"`` the swap acceptance is the path RND of
Euler–Maruyama paths, exact only as the step h → 0 (the same holds for the SMC driver with
``weighting="path"``). At h = 0.01 the measured biases on the ``temper-path`` target (β = 0.5)
were +0.03 ± 0.008 on E[X²] (0.8 %), −0.004 on the mean and −0.002 on P(X > 0) (CREPE, 1024
chains × 600 rounds), and +0.037 ± 0.012 on E[X²] for ``steer(..., "temper")`` with 100
steps; so the path case allows ``PATH_ALLOWANCE`` on top of the Monte Carlo error. With
``weighting="density"`` (exact log-densities in the acceptance) the chain is exact at any step
size: those cases allow nothing.

The ``test_*_perturbed`` tests rerun cases with a sign or a coefficient of the acceptance ratio
changed from the outside — a monkeypatched :func:`pathsmc.crepe.path_swap_log_ratio` or an ``ops``
module whose ``em_step`` rewrites its coefficients (the library has no test switches) — and
require the same checks to fail.
"""

from __future__ import annotations

import functools
import math
import time
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch
from conftest import requires_cuda

import pathsmc.crepe as crepe_mod
import pathsmc.ops as ops
from pathsmc.crepe import CREPE, crepe, default_times
from pathsmc.diffusion import DiffusionModel, VPSchedule, steer
from pathsmc.reference import gaussian_logpdf
from pathsmc.targets import GaussianMixture, GridTarget, geometric_product

F64 = torch.float64
K_SE = 4.5
VP = VPSchedule()
MIX1 = GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-2.0], [1.5]]),
                       torch.tensor([[0.3], [0.5]]))
EXPERT2 = GaussianMixture(torch.tensor([0.5, 0.5]), torch.tensor([[-1.0], [2.0]]),
                          torch.tensor([[1.0], [1.0]]))
LAG = 40  # rounds between the snapshots of the distribution check
PATH_ALLOWANCE = {"mean": 0.02, "var": 0.06, "p_pos": 0.006}
NO_ALLOWANCE = {"mean": 0.0, "var": 0.0, "p_pos": 0.0}


pytestmark = pytest.mark.usefixtures("one_thread")  # small problems (conftest)


def model(mix: GaussianMixture, scores_only: bool = False) -> DiffusionModel:
    """The exact model of ``mix``; ``scores_only`` hides its ``log_prob`` (a real model)."""
    m = DiffusionModel.from_mixture(mix, VP)
    return DiffusionModel(m.fn, VP, dim=1) if scores_only else m


# ---- exact answers and checks ----


class Exact(NamedTuple):
    mean: float
    var: float
    p_pos: float
    grid: GridTarget


@functools.cache
def exact(key: str) -> Exact:
    if key == "temper-0.5":
        g = MIX1.power(0.5)
    elif key == "temper-2":
        g = MIX1.power(2.0)
    elif key == "product":
        g = geometric_product([MIX1, EXPERT2], [1.0, 1.0])
    else:
        raise KeyError(key)
    mean = float(g.mean()[0])
    return Exact(mean, float(g.covariance()[0, 0]),
                 float(g.expectation(lambda x: (x[:, 0] > 0).double())), g)


def w1_to_exact(x: torch.Tensor, g: GridTarget) -> float:
    """Wasserstein-1 distance between the empirical CDF of ``x`` (1-D) and the exact CDF."""
    pts = g.points[:, 0]
    cdf = torch.cumsum(g.probs, 0)
    xs = x.double().reshape(-1).sort().values
    emp = torch.searchsorted(xs, pts + 0.5 * g.cell[0]).double() / xs.numel()
    return float((emp - cdf).abs().sum() * g.cell[0])


@functools.cache
def w1_threshold(key: str, n: int) -> float:
    """1.3 × the 99th percentile of the W1 distance of ``n`` exact samples (100 draws)."""
    g = exact(key).grid
    gen = torch.Generator().manual_seed(123)
    d = torch.tensor([w1_to_exact(g.sample(n, gen), g) for _ in range(100)])
    return 1.3 * float(torch.quantile(d, 0.99))


def estimates(res) -> dict[str, tuple[float, float]]:
    """Mean, variance and P(X > 0) at level 0 with batch-means standard errors (problem 0)."""
    x = res.samples[:, 0, :, 0].double()  # (S, C)
    m1, m2, pp = x.mean(0), (x * x).mean(0), (x > 0).double().mean(0)  # per chain
    c = x.shape[1]
    mean = float(m1.mean())
    var = float(m2.mean()) - mean * mean
    v_lin = m2 - 2.0 * mean * m1  # delta method: d(m2 − m1²) = dm2 − 2 m1 dm1
    return {
        "mean": (mean, float(m1.std()) / math.sqrt(c)),
        "var": (var, float(v_lin.std()) / math.sqrt(c)),
        "p_pos": (float(pp.mean()), float(pp.std()) / math.sqrt(c)),
    }


def snapshots(res) -> torch.Tensor:
    """Level-0 states of every chain at the last round and every ``LAG`` rounds before."""
    s = res.samples.shape[0]
    return res.samples[torch.arange(s - 1, -1, -LAG)][:, 0, :, 0]


def failures(res, key: str, allowance: dict[str, float]) -> list[str]:
    """Every check that fails (empty when the run matches the exact target)."""
    ex, bad = exact(key), []
    for name, (v, se) in estimates(res).items():
        want = getattr(ex, name)
        if not abs(v - want) <= K_SE * se + allowance[name]:
            bad.append(f"{name}: {v:.4f} ± {se:.4f}, exact {want:.4f}")
    snap = snapshots(res)
    w1, limit = w1_to_exact(snap, ex.grid), w1_threshold(key, snap.numel())
    if not w1 < limit:
        bad.append(f"W1 {w1:.4f} >= {limit:.4f} ({snap.numel()} states)")
    acc = res.swap_accept
    if not bool(((acc > 0) & (acc < 1)).all()):
        bad.append(f"swap acceptance outside (0, 1): {acc.tolist()}")
    return bad


# ---- the cases ----

CASES = {
    # tempering p^0.5 of a scores-only model, path-RND acceptance (the CREPE of the paper)
    "temper-path": ("temper-0.5", PATH_ALLOWANCE, lambda: dict(
        model=model(MIX1, scores_only=True), beta=0.5, weighting="path", max_step=0.01,
        num_levels=10, particles=512, burn_in=80, adapt_times=1, rounds=160, seed=1, dtype=F64)),
    # sharpening p^2 with the exact densities in the acceptance: exact at a coarse step
    "temper-density": ("temper-2", NO_ALLOWANCE, lambda: dict(
        model=model(MIX1), beta=2.0, weighting="density", max_step=0.05, num_levels=8,
        particles=512, burn_in=100, adapt_times=1, rounds=200, seed=2, dtype=F64)),
    # a product of two mixture models, exact densities in the acceptance
    "product-density": ("product", NO_ALLOWANCE, lambda: dict(
        model=[model(MIX1), model(EXPERT2)], beta=[1.0, 1.0], weighting="density",
        max_step=0.05, num_levels=8, particles=512, burn_in=100, adapt_times=1, rounds=200,
        seed=3, dtype=F64)),
}


def run_case(name: str, ops_module=None):
    key, allowance, kwargs = CASES[name]
    kw = kwargs()
    mdl = kw.pop("model")
    t0 = time.perf_counter()
    res = crepe(mdl, ops=ops_module, **kw)
    res.seconds = time.perf_counter() - t0
    return res, key, allowance


@functools.cache
def cached_case(name: str):
    return run_case(name)


@pytest.mark.parametrize("name", list(CASES))
def test_level0_matches_exact_target(name: str) -> None:
    res, key, allowance = cached_case(name)
    c = res.restarts.shape[1]
    assert res.samples.shape == (res.rounds, 1, c, 1)
    assert res.states.shape == (len(res.times), 1, c, 1)
    assert res.swap_accept.shape == (1, len(res.times) - 1)
    assert bool((res.restarts > 0).all()), "every chain saw fresh prior draws reach level 0"
    assert res.model_evals > 0 and res.model_calls > 0
    assert failures(res, key, allowance) == []


# ---- the same checks fail when the acceptance ratio is perturbed ----


def faulty_ops(**override) -> SimpleNamespace:
    """An ``ops`` module whose ``em_step`` rewrites some keyword arguments."""

    def em_step(*args, **kwargs):
        if kwargs.get("logw", args[2] if len(args) > 2 else None) is not None:
            for key, fn in override.items():
                kwargs[key] = fn(kwargs.get(key))
        return ops.em_step(*args, **kwargs)

    return SimpleNamespace(em_step=em_step, replica_swap=ops.replica_swap)


def _ratio(kind: str):
    orig = crepe_mod.path_swap_log_ratio
    if kind == "noising_sign":  # Δ(w) + Δ(z)
        return lambda dw, dz, lo=None, up=None: orig(dw, -dz, lo, up)
    if kind == "noising_dropped":  # Δ(w) only
        return lambda dw, dz, lo=None, up=None: orig(dw, torch.zeros_like(dz), lo, up)
    if kind == "potential_sign":  # φ_{k+1}(x_{k+1}) − φ_{k+1}(z_M)
        return lambda dw, dz, lo=None, up=None: orig(dw, dz, lo, None if up is None else -up)
    raise KeyError(kind)


EM_FAULTS = [
    ("temper-path", {"fwd_coef": lambda c: -c}),  # c_f = 1 − β with the wrong sign
    ("temper-path", {"ref_coefs": lambda c: [1.0] * len(c)}),  # c = (β) replaced by 1
    ("temper-density", {"fwd_coef": lambda c: -c}),  # the forward kernel inverted
    ("product-density", {"fwd_linear": lambda lam: -lam}),  # forward drift sign
]


@pytest.mark.parametrize("name,fault", EM_FAULTS,
                         ids=[f"{n}:{next(iter(f))}" for n, f in EM_FAULTS])
def test_em_step_coefficients_perturbed(name: str, fault) -> None:
    res, key, allowance = run_case(name, faulty_ops(**fault))
    assert failures(res, key, allowance) != []


RATIO_FAULTS = [
    ("temper-path", "noising_sign"),
    ("temper-density", "noising_dropped"),
    ("temper-density", "potential_sign"),
]


@pytest.mark.parametrize("name,kind", RATIO_FAULTS, ids=[f"{n}:{k}" for n, k in RATIO_FAULTS])
def test_swap_log_ratio_perturbed(monkeypatch, name: str, kind: str) -> None:
    monkeypatch.setattr(crepe_mod, "path_swap_log_ratio", _ratio(kind))
    res, key, allowance = run_case(name)
    assert failures(res, key, allowance) != []


# ---- the acceptance is the path RND ----


def test_acceptance_is_the_path_rnd() -> None:
    """One swap step recomputed by hand from the recorded paths: the log-ratio handed to
    ``replica_swap`` is Σ_n Δ_n(w) − Σ_n Δ_n(z), Δ_n = β log G_1 + (1 − β) log F − log G."""
    beta, c = 0.5, 6
    m = model(MIX1, scores_only=True)
    calls, swaps = [], []

    def em_step(x, drift, logw=None, **kw):
        out = ops.em_step(x, drift, logw, **kw)
        calls.append((x.clone(), out[0].clone(), kw))
        return out

    def replica_swap(states, log_ratio, parity, uniforms=None, generator=None):
        swaps.append((log_ratio.clone(), parity))
        return ops.replica_swap(states, log_ratio, parity, uniforms, generator)

    sampler = CREPE(m, beta=beta, level_times=[0.0, 0.2, 1.0], max_step=0.05, particles=c,
                    generator=torch.Generator().manual_seed(0), dtype=F64,
                    ops=SimpleNamespace(em_step=em_step, replica_swap=replica_swap))
    x_before = sampler.x.clone()
    calls.clear()
    sampler._swap_step(sampler._new_accumulators(), sampler._new_accumulators()["attempts"])
    log_ratio, parity = swaps[0]
    assert parity == 0 and log_ratio.shape == (2, c)
    sub = sampler._sub[0]
    mm = len(sub) - 1
    # the noising path: the first mm calls draw it with the forward kernel
    z = [x_before[0]] + [out for _, out, _ in calls[:mm]]
    # the denoising path: the batched calls, chains [:c] of each output
    w = [None] * (mm + 1)
    w[mm] = x_before[1]
    for i, (_, out, _) in enumerate(calls[mm:2 * mm]):
        w[mm - 1 - i] = out[:, :c]
        torch.testing.assert_close(out[:, c:], z[mm - 1 - i])  # z reproduced exactly

    def delta(p):
        tot = torch.zeros(1, c, dtype=F64)
        for n in range(mm):
            t, s = sub[n + 1], sub[n]
            em = VP.reverse_em(t, t - s)
            sd = em.sigma * math.sqrt(em.dt)
            score = m.score(p[n + 1], t)
            log_g1 = gaussian_logpdf(p[n], p[n + 1] + em.drift(p[n + 1], score) * em.dt, sd)
            log_g = gaussian_logpdf(p[n], p[n + 1] + em.drift(p[n + 1], beta * score) * em.dt,
                                    sd)
            log_f = gaussian_logpdf(p[n + 1], p[n] + VP.drift_linear(s) * p[n] * em.dt, sd)
            tot = tot + beta * log_g1 + (1 - beta) * log_f - log_g
        return tot

    want = delta(w) - delta(z)
    torch.testing.assert_close(log_ratio[0:1], want, rtol=1e-9, atol=1e-9)


def test_exact_reversal_accepts_every_swap() -> None:
    """A product of two copies of one model with β = (0.5, 0.5) is p itself: the annealed
    kernel is the model's, c = (0.5, 0.5), c_f = 0, so Δ ≡ 0 and every swap is accepted; so
    is every swap of one model at β = 1 (where the noising path needs no evaluations)."""
    m = model(MIX1, scores_only=True)
    two = crepe([m, m], beta=[0.5, 0.5], rounds=6, num_levels=5, max_step=0.05, particles=16,
                seed=0)
    one = crepe(m, rounds=6, num_levels=5, max_step=0.05, particles=16, seed=0)
    torch.testing.assert_close(two.swap_accept, torch.ones_like(two.swap_accept))
    assert bool((one.swap_accept == 1).all()) and bool((one.swap_accept_empirical == 1).all())
    # at β = 1 the noising path is free: a quarter of the two-model product's evaluations
    # in the swaps (one model instead of two, one path instead of two), half in the init
    assert one.model_evals < two.model_evals / 2


# ---- against the SMC driver ----


def test_compare_with_smc(capsys) -> None:
    """CREPE against ``steer(..., mode="temper")`` on the same target (p^0.5), the same
    Euler–Maruyama step (h = 0.01) and about the same number of model evaluations. Both pass
    the same moment checks; the numbers are printed (``pytest -s``)."""
    res, key, allowance = cached_case("temper-path")
    ex = exact(key)
    rows, steps = 16, 100
    n = max(64, round(res.model_evals / (rows * steps)))
    t0 = time.perf_counter()
    smc = steer(model(MIX1, scores_only=True), "temper", beta=0.5, particles=n, batch=rows,
                steps=steps, seed=5, dtype=F64)
    smc_seconds = time.perf_counter() - t0
    w = smc.weights.double()
    x = smc.particles.double()[..., 0]
    m1 = (w * x).sum(1)
    var = (w * x * x).sum(1) - m1 * m1
    pp = (w * (x > 0)).sum(1)
    smc_est = {k: (float(v.mean()), float(v.std()) / math.sqrt(rows))
               for k, v in (("mean", m1), ("var", var), ("p_pos", pp))}
    crepe_est = estimates(res)
    smc_evals = rows * n * steps
    lines = [f"\nCREPE vs SMC, p^0.5 of a 1-D mixture, h = 0.01 "
             f"(CREPE {len(res.times)} levels × {res.restarts.shape[1]} chains × "
             f"{res.burn_in}+{res.rounds} rounds: {res.model_evals} evaluations, "
             f"{res.seconds:.1f} s; SMC {rows} runs × {n} particles × {steps} steps: "
             f"{smc_evals} evaluations, {smc_seconds:.1f} s)"]
    for k in ("mean", "var", "p_pos"):
        want = getattr(ex, k)
        (cv, cs), (sv, ss) = crepe_est[k], smc_est[k]
        lines.append(f"  {k:6s} exact {want:.4f}   CREPE {cv:.4f} ± {cs:.4f} "
                     f"(err {cv - want:+.4f})   SMC {sv:.4f} ± {ss:.4f} (err {sv - want:+.4f})")
    ess = smc.ess[-1].double().mean().item()
    lines.append(f"  SMC final ESS {ess:.0f} / {n}; CREPE swap acceptance "
                 f"{res.swap_accept.min().item():.3f}–{res.swap_accept.max().item():.3f}, "
                 f"restarts per chain per round "
                 f"{res.restarts.double().mean().item() / res.rounds:.3f}")
    with capsys.disabled():
        print("\n".join(lines))
    assert 0.5 * res.model_evals <= smc_evals <= 1.5 * res.model_evals
    for k in ("mean", "var", "p_pos"):
        (sv, ss), want = smc_est[k], getattr(ex, k)
        assert abs(sv - want) <= K_SE * ss + allowance[k], (k, sv, ss, want)


# ---- interface ----


def test_reward_tilt_seo_and_batch() -> None:
    """A reward tilt (linear, exact answer in closed form) with exact densities, SEO swaps and
    two problems in one batch; the summary and the estimates."""
    theta = torch.tensor([-0.8], dtype=F64)
    tilt = MIX1.linear_tilt(theta).mixture
    res = crepe(model(MIX1), reward=lambda x: x.double() @ theta, weighting="density",
                max_step=0.05, num_levels=6, particles=256, batch=2, swap="seo",
                burn_in=60, rounds=150, seed=4, dtype=F64)
    mean, se = res.estimate()
    assert mean.shape == (2, 1) and se.shape == (2, 1)
    assert bool(((mean[:, 0] - float(tilt.mean()[0])).abs() < K_SE * se[:, 0]).all())
    m2, se2 = res.estimate(lambda x: x * x)
    want = float(tilt.covariance()[0, 0] + tilt.mean()[0] ** 2)
    assert bool(((m2[:, 0] - want).abs() < K_SE * se2[:, 0]).all())
    assert 0.5 < res.top_accept.min().item() <= 1.0
    text = res.summary()
    assert "CREPE: 2 problem(s) × 6 levels × 256 chains" in text and "swap acc" in text
    assert res.log_prob_calls > 0


def test_default_times_and_adaptation() -> None:
    ts = default_times(8, VP)
    assert ts[0] == 0.0 and ts[-1] == 1.0 and all(b > a for a, b in zip(ts, ts[1:], strict=False))
    assert default_times(2, VP) == [0.0, 1.0]
    res, _, _ = cached_case("temper-density")
    assert len(res.schedules) == 3 and res.schedules[-1] == res.times
    assert res.schedules[0] != res.times  # the burn-in moved the levels
    assert sum(res.substeps) >= 20 and all(s >= 1 for s in res.substeps)


def test_user_functions_see_the_documented_shapes() -> None:
    """The CREPE docstring's contract: the model is called on (B, C, D) and on the two swap
    paths stacked along the chain axis, (B, 2C, D); log_prob and reward on (B, C, D)."""
    seen: dict[str, set] = {"fn": set(), "log_prob": set(), "reward": set()}
    exact_model = model(MIX1)

    def fn(x, t, cond):
        seen["fn"].add(tuple(x.shape))
        return exact_model.fn(x, t)

    def log_prob(x, t, cond):
        seen["log_prob"].add(tuple(x.shape))
        return exact_model.log_prob(x, t)

    def reward(x):
        seen["reward"].add(tuple(x.shape))
        return 0.1 * x.double()[..., 0]

    m = DiffusionModel(fn, VP, condition=torch.arange(3), log_prob=log_prob, dim=1)
    crepe([m, m], beta=[1.0, 0.5], reward=reward, num_levels=4, max_step=0.1, particles=8,
          batch=3, burn_in=2, rounds=3, seed=1)
    assert seen == {"fn": {(3, 8, 1), (3, 16, 1)}, "log_prob": {(3, 8, 1)},
                    "reward": {(3, 8, 1)}}


def test_default_dtype_is_what_networks_run_in() -> None:
    """The dtype rule (docs/design.md): CREPE, like steer, defaults to float32 states, so a
    float32 network runs without a dtype argument."""
    torch.manual_seed(0)
    net = torch.nn.Linear(1, 1)  # float32 weights: float64 input would raise in the matmul
    m = DiffusionModel(lambda x, t: net(x) - x, VP, dim=1)
    with torch.no_grad():
        res = crepe(m, num_levels=3, max_step=0.1, particles=4, burn_in=1, rounds=2, seed=0)
    assert res.samples.dtype == torch.float32
    assert steer(m, "temper", beta=1.0, particles=4, steps=3, seed=0).particles.dtype == (
        torch.float32)


def test_argument_errors() -> None:
    m = model(MIX1, scores_only=True)
    with pytest.raises(ValueError, match="times"):
        CREPE(m, times=[0.0, 0.5, 0.4, 1.0])
    with pytest.raises(ValueError, match="times"):
        CREPE(m, times=[0.1, 1.0])
    with pytest.raises(ValueError, match="beta"):
        CREPE(m, beta=[1.0, 2.0])
    with pytest.raises(ValueError, match="beta"):
        CREPE([m, m], beta=[1.0, -1.0])
    with pytest.raises(ValueError, match="log_prob"):
        CREPE(m, weighting="density")
    with pytest.raises(ValueError, match="weighting"):
        CREPE(m, weighting="exact")
    with pytest.raises(ValueError, match="swap"):
        CREPE(m, swap="odd")
    with pytest.raises(ValueError, match="exact_top"):
        CREPE(m, exact_top=True)
    with pytest.raises(ValueError, match="init"):
        CREPE(m, num_levels=4, init=torch.zeros(3, 1, 64, 1, dtype=F64))
    with pytest.raises(ValueError, match="adapt_times"):
        CREPE(m, num_levels=4, particles=4).run(2, burn_in=1, adapt_times=1)


@requires_cuda
def test_cuda_rounds_do_not_sync() -> None:
    dev = "cuda"
    m = DiffusionModel.from_mixture(MIX1.to(device=dev), VP)
    sampler = CREPE(m, beta=2.0, num_levels=6, max_step=0.05, particles=256, device=dev,
                    generator=torch.Generator(device=dev).manual_seed(0))
    acc = sampler._new_accumulators()
    for _ in range(4):  # warm-up: the model caches its diffused mixtures per time
        sampler.round(acc)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call inside a round raises
    try:
        for _ in range(8):
            sampler.round(acc)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    res = sampler.run(200, burn_in=50)
    assert res.samples.device.type == "cpu" and bool(torch.isfinite(res.samples).all())


def _fixed_size_model(x, t):
    return -x[:, :8]  # assumes C = 8: breaks on the stacked pair of paths (B, 2C, D)


@pytest.mark.parametrize("case", ["fixed_c", "numpy_reward", "reward_shape", "nan_model"])
def test_user_functions_are_checked_up_front(case) -> None:
    from pathsmc.diffusion import DiffusionModel, VPSchedule

    def fn(x, t):
        return -x

    reward = None
    if case == "fixed_c":
        fn, match = _fixed_size_model, r"model `.*_fixed_size_model` returned shape .*stacks"
    elif case == "numpy_reward":
        reward, match = (lambda x: x.sum(-1).numpy()), r"reward `.*` returned a numpy"
    elif case == "reward_shape":
        reward, match = (lambda x: x.sum(-1, keepdim=True)), r"reward `.*` returned shape"
    else:
        def fn(x, t):
            return torch.full_like(x, float("nan"))
        match = r"model `.*` returned .*non-finite"
    model = DiffusionModel(fn, VPSchedule(), prediction="score", dim=1)
    with pytest.raises((TypeError, ValueError), match=match):
        crepe(model, reward=reward, particles=8, num_levels=3, rounds=1, seed=0)
