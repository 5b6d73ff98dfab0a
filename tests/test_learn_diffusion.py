"""pathsmc.learn on a diffusion model with exact answers: the 2-D Gaussian mixture with a
linear reward, whose soft value V_t(x) = log E[exp(θ·X_0) | X_t = x] is closed form.

What is zero and what is not: the one-step path-consistency residual of the Euler–Maruyama
chain (guided proposal, path RND) at the exact continuous-time soft value is O(h) — its RMS
halves when h halves, once h resolves the curved region near t = 0 (from 50 steps on) — and
the whole-path residual (a sum of K such terms) is O(√h); both are zero only in the limit.
Exactness to rounding is checked on the token model. The learning test trains a small twist
in seconds; the longer runs are bench/learn.py. Tolerances: Monte Carlo standard errors of the
fixed-seed samples (4σ), the spreads measured over seeds quoted where used. The default ops
are the fused ones (with their backward)."""

from __future__ import annotations

import math

import pytest
import torch

import pathsmc.ops
import pathsmc.reference
from pathsmc.diffusion import DiffusionModel, VPSchedule, steer
from pathsmc.learn import (
    ReplayBuffer,
    ValueNetwork,
    consistency_residuals,
    diffusion_log_ratios,
    elbo_loss,
    log_variance_loss,
    path_consistency_loss,
    path_log_weights,
    reparameterized_log_weights,
    sample_diffusion_paths,
    train_diffusion_twist,
)
from pathsmc.targets import default_2d

F64 = torch.float64
VP = VPSchedule()
MIX = default_2d()
THETA = torch.tensor([1.0, -0.5], dtype=F64)
MODEL = DiffusionModel.from_mixture(MIX, VP)
LOG_Z = float(MIX.linear_tilt(THETA).log_z)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def reward(x: torch.Tensor) -> torch.Tensor:
    return x.double() @ THETA


def exact(x: torch.Tensor, t: float):
    _, _, v, g = MIX.diffused(VP, t).log_prob_score_value(x, THETA, grad=True)
    return v, g


class ScaledExact(torch.nn.Module):
    """V_α = α · V_exact (+ β |x|² / 2): a one-parameter family through the soft value, with
    the ValueNetwork interface (value_and_grad with the graph to α)."""

    def __init__(self, alpha: float = 1.0, curvature: float = 0.0) -> None:
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.tensor(alpha, dtype=F64))
        self.curvature = curvature

    def value_and_grad(self, x, t, create_graph: bool = False):
        if isinstance(t, torch.Tensor):  # one time per path point: x (B, N, K, D)
            vg = [exact(x[:, :, i], float(t[i])) for i in range(x.shape[2])]
            v, g = torch.stack([a for a, _ in vg], 2), torch.stack([b for _, b in vg], 2)
        else:
            v, g = exact(x, t)
        v = self.alpha * v + 0.5 * self.curvature * (x.double() ** 2).sum(-1)
        return v, self.alpha * g + self.curvature * x


def residual_rms(steps: int, twist: ScaledExact, span=1, particles: int = 256) -> float:
    paths = sample_diffusion_paths(MODEL, exact, reward, particles=particles, steps=steps,
                                   threshold=0.0, generator=torch.Generator().manual_seed(0))
    values, ratios = diffusion_log_ratios(MODEL, twist, paths.x, paths.times, reward)
    return float(consistency_residuals(values, ratios, span).detach().pow(2).mean().sqrt())


def test_one_step_residual_is_order_h() -> None:
    """RMS over paths and steps of the one-step residual at the exact V_t: O(h).

    Order measured from 50 to 200 steps, ``log2(rms_50 / rms_200) / 2``: over 12 seeds of 128
    paths 1.05 ± 0.036 (the sum over t is heavy-tailed: rare large residuals near t = 0 where
    V_t is most curved; at 25 steps that region is not yet resolved and 25 → 50 shrinks the
    RMS by 2.3 ± 0.2, up to 2.7). With 256 paths, (0.85, 1.25) is more than 5 standard
    deviations either way."""
    rms = {k: residual_rms(k, ScaledExact()) for k in (50, 200)}
    order = math.log2(rms[50] / rms[200]) / 2
    assert 0.85 < order < 1.25, (rms, order)
    assert rms[200] < 0.02
    # a perturbed value has an O(1) residual that does not go away with h
    bad = residual_rms(200, ScaledExact(1.0, curvature=0.3))
    assert bad > 10 * rms[200], (bad, rms)


def test_whole_path_residual_and_log_variance() -> None:
    """The whole-path residual ``V_1(x_0) − log w`` at the exact V_t is O(√h) per path with
    mean ≈ 0, and the log-variance ``Var(log w)`` is O(h) (0.13, 0.049, 0.025 at 50, 100, 200
    steps); at V = V_exact / 2 the log-variance stays O(1) (0.30–0.49 at every h) and the
    residual has mean ≈ −1.9. Bounds: 4 Monte Carlo standard errors of the 256 paths."""
    n = 256
    paths = sample_diffusion_paths(MODEL, exact, reward, particles=n, steps=100,
                                   threshold=0.0, generator=torch.Generator().manual_seed(1))
    out = {}
    for name, twist in (("exact", ScaledExact()), ("half", ScaledExact(0.5))):
        values, ratios = diffusion_log_ratios(MODEL, twist, paths.x, paths.times, reward)
        res = consistency_residuals(values, ratios).detach()[..., 0]  # V_1(x_0) − log w
        lw = path_log_weights(ratios, values[..., -1]).detach()
        lv = float(log_variance_loss(lw))
        sq = (lw - lw.mean()).square()
        out[name] = (res, lv, float(sq.std()) / n ** 0.5)
    res, lv, lv_se = out["exact"]
    res_se = float(res.std()) / n ** 0.5
    assert float(res.pow(2).mean().sqrt()) < 0.35  # O(√h) at 100 steps: 0.21–0.23
    assert float(res.mean().abs()) < 4 * res_se
    assert lv < 0.1
    half_res, half_lv, half_se = out["half"]
    assert half_lv - lv > 4 * (lv_se + half_se), (half_lv, lv, half_se, lv_se)
    assert float(half_res.mean()) < -10 * float(half_res.std()) / n ** 0.5


def _elbo_and_grad(alpha: float, n: int, steps: int = 50, seed: int = 2):
    """``(mean log w, its standard error, d mean/dα by backward, per-path d log w/dα)``.

    The per-path derivatives come from central differences with the same noise (the paths are
    reparameterized, so log w_i(α) is a smooth function of α for each path)."""
    def log_w(a, grad=False):
        twist = ScaledExact(a)
        with torch.set_grad_enabled(grad):
            lw = reparameterized_log_weights(MODEL, twist, reward, particles=n, steps=steps,
                                             generator=torch.Generator().manual_seed(seed))
        return twist, lw

    twist, lw = log_w(alpha, grad=True)
    loss = elbo_loss(lw)
    loss.backward()
    eps = 1e-6  # truncation error ~6e-8 here (some paths have a large third derivative)
    per_path = (log_w(alpha + eps)[1] - log_w(alpha - eps)[1]) / (2 * eps)
    lw = lw.detach()
    return (float(lw.mean()), float(lw.std()) / n ** 0.5, -float(twist.alpha.grad),
            per_path.reshape(-1))


def test_elbo_through_reparameterized_paths() -> None:
    """ELBO ≤ log Z, within O(h) of it at the soft value and lower elsewhere. The gradient
    that flows back through the sampled states (em_step's backward) equals the derivative of
    the same-noise ELBO estimate; it is zero within Monte Carlo error at α = 1 and positive
    (towards α = 1) at α = 0.5. At the optimum the pathwise gradient is not zero per path (the
    score term of log q has mean zero, not variance zero): its standard error with 256 paths
    is ≈ 0.4, so only Monte Carlo bounds are meaningful (4 standard errors)."""
    out = {a: _elbo_and_grad(a, 1024) for a in (1.0, 0.5)}
    for _, _, grad, per_path in out.values():
        assert abs(grad - float(per_path.mean())) < 1e-6 * (1 + abs(grad))
    elbo, se, grad, per_path = out[1.0]
    assert elbo < LOG_Z + 4 * se and LOG_Z - elbo < 0.1
    assert abs(grad) < 4 * float(per_path.std()) / per_path.numel() ** 0.5
    elbo_half, se_half, grad_half, per_half = out[0.5]
    assert elbo_half < elbo - 0.3
    assert grad_half > 4 * float(per_half.std()) / per_half.numel() ** 0.5  # ELBO rises to α=1


def _small_net() -> ValueNetwork:
    torch.manual_seed(4)
    net = ValueNetwork(2, hidden=8)
    with torch.no_grad():  # a non-zero last layer, so that every parameter gets a gradient
        net.mlp[-1].weight.normal_(0.0, 0.3)
    return net


def _param_grads(net: ValueNetwork, loss: torch.Tensor) -> list[torch.Tensor]:
    """Gradients in every parameter (zero for one the loss does not use: the ELBO sees only
    ∇V, not the last bias)."""
    grads = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g
            for p, g in zip(net.parameters(), grads, strict=True)]


def test_fused_ops_give_the_same_log_ratios_and_gradients() -> None:
    """The default ops (fused, with their backward) against autograd through the reference:
    the log-ratios, the gradients of path consistency and of the ELBO (through em_step)."""
    paths = sample_diffusion_paths(MODEL, exact, reward, particles=16, steps=10,
                                   generator=torch.Generator().manual_seed(3))
    a = diffusion_log_ratios(MODEL, ScaledExact(), paths.x, paths.times, reward,
                             ops=pathsmc.reference)[1]
    b = diffusion_log_ratios(MODEL, ScaledExact(), paths.x, paths.times, reward)
    torch.testing.assert_close(a.detach(), b[1].detach(), rtol=1e-9, atol=1e-9)
    net = _small_net()
    grads = {}
    for name, ops in (("reference", pathsmc.reference), ("fused", pathsmc.ops)):
        values, ratios = diffusion_log_ratios(MODEL, net, paths.x, paths.times, reward, ops=ops)
        pc = _param_grads(net, path_consistency_loss(values, ratios, span=2))
        lw = reparameterized_log_weights(MODEL, net, reward, particles=8, steps=5, ops=ops,
                                         generator=torch.Generator().manual_seed(5))
        grads[name] = pc + _param_grads(net, elbo_loss(lw))
    nonzero = 0
    for g_ref, g_fused in zip(grads["reference"], grads["fused"], strict=True):
        nonzero += int(float(g_ref.abs().max()) > 0)
        torch.testing.assert_close(g_fused, g_ref, rtol=1e-9, atol=1e-12)
    assert nonzero == 2 * len(list(net.parameters())) - 1


def test_replay_buffer() -> None:
    buf = ReplayBuffer(capacity=5)
    buf.add(x=torch.arange(6.0).view(1, 3, 2))
    buf.add(x=torch.arange(6.0, 12.0).view(1, 3, 2))
    assert len(buf) == 5
    out = buf.sample(7, torch.Generator().manual_seed(0))["x"]
    assert out.shape == (1, 7, 2) and float(out.min()) >= 2.0  # the oldest path is gone
    with pytest.raises(ValueError, match="names"):
        buf.add(y=torch.zeros(1, 1, 2))


def value_mse(net: ValueNetwork) -> float:
    """MSE of V_θ − V over t and x, x from the tilted diffused marginals."""
    tilt = MIX.linear_tilt(THETA).mixture
    errs = []
    for t in (0.05, 0.2, 0.4, 0.6, 0.8, 0.95):
        x = tilt.diffused(VP, t).sample(512, torch.Generator().manual_seed(1))[None]
        with torch.no_grad():
            errs.append(float((net(x, t) - exact(x, t)[0]).pow(2).mean()))
    return sum(errs) / len(errs)


# The short training of the test (about 6–10 s on a 2-core CPU): whole-path consistency on
# 10-step paths, 400 Adam steps, ValueNetwork(2, 32). Its twist, at N = 64 and 100 steps over
# 64 SMC rows, has a log Ẑ spread 5.1x, 5.3x, 5.5x smaller than FK steering with the Tweedie
# twist (evaluation seeds 2, 3, 4; the exact V gives 12x): the test asserts 4x. The issue's
# 5x with margin comes from the longer training of bench/learn.py (1500 steps on 20-step
# paths, ValueNetwork(2, 64): 9.0x and 9.5x; docs/learn.md, "Measured").
TRAIN_STEPS, TRAIN_ITERATIONS, SPREAD_FACTOR = 10, 400, 4.0


@pytest.mark.slow
def test_learned_twist_beats_tweedie_fk() -> None:
    torch.manual_seed(0)
    net = ValueNetwork(2, hidden=32, layers=2)
    mse0 = value_mse(net)
    train_diffusion_twist(MODEL, net, reward, objective="path_consistency", span=None,
                          steps=TRAIN_STEPS, iterations=TRAIN_ITERATIONS, particles=128,
                          batch_paths=128, lr=1e-2, generator=torch.Generator().manual_seed(0))
    mse = value_mse(net)
    assert mse < 0.1 * mse0, (mse, mse0)
    rows = 64
    kw = {"particles": 64, "batch": rows, "steps": 100, "seed": 2, "dtype": F64}
    learned = steer(MODEL, "twisted", value=net.twist(), reward=reward, **kw).log_z
    best = steer(MODEL, "twisted", value=exact, reward=reward, **kw).log_z
    tweedie = steer(MODEL, "reward", reward=reward, **kw).log_z
    # the same chain's log Z: the learned twist agrees with the exact one (both carry the
    # chain's O(h) bias, ≈ +0.02 against the continuous-time log Z at 100 steps)
    se = ((learned.var() + best.var()) / rows).sqrt()
    assert float((learned.mean() - best.mean()).abs()) < 4 * float(se)
    assert abs(float(best.mean()) - LOG_Z) < 0.05
    spread = float(learned.std())
    assert spread * SPREAD_FACTOR < float(tweedie.std()), (spread, float(tweedie.std()))
    assert float(best.std()) < spread  # the learned twist is not better than the exact one
