"""Diffusion paths for the objectives: twisted SMC that records whole paths (detached, for
off-policy losses and the replay buffer), the per-step log-ratios ``log p_ref − log q_θ`` of
the guided Euler–Maruyama proposal recomputed with gradients, and reparameterized paths for the
ELBO.

The reference kernel is the model's reverse Euler–Maruyama kernel
``p_ref(x'|x) = N(x'; x + b(x, t) h, g² h)`` and the proposal adds the guidance
``g² ∇V_θ(x, t)`` to the drift (blog eq. 12, 14). Both log-densities come from the ops
(``em_step`` / ``kernel_logpdf``): by default the fused :mod:`pathsmc.ops`, whose backward
formulas (:mod:`pathsmc._autograd`) give the same gradients as autograd through
``ops=pathsmc.reference``. The soft value of the continuous-time process makes the residuals
zero only up to the discretization (see docs/learn.md for the measured order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import pathsmc.ops as fused_ops
import pathsmc.reference as reference_ops
from pathsmc.diffusion import DiffusionModel, time_grid
from pathsmc.smc import smc

__all__ = ["DiffusionPaths", "diffusion_log_ratios", "reparameterized_log_weights",
           "sample_diffusion_paths"]


def _default_ops(ops):
    return fused_ops if ops is None else ops


def _log_prior(x: torch.Tensor, std: float) -> torch.Tensor:
    return reference_ops.gaussian_logpdf(x, torch.zeros_like(x), std)


def _initial_log_ratio(model: DiffusionModel, x: torch.Tensor, t0: float) -> torch.Tensor:
    std = float(model.schedule.prior_std)
    if not model.has_log_prob:
        return torch.zeros(x.shape[:-1], dtype=torch.float64, device=x.device)
    return model.log_prob(x, t0).double() - _log_prior(x, std)


def _value(value, x, t):
    out = value(x, t)
    return out if isinstance(out, tuple) else (out, None)


@dataclass
class DiffusionPaths:
    """Recorded paths (detached).

    Attributes:
        x: ``(B, N, K+1, D)`` states at ``times`` (``x[:, :, 0]`` at t = 1).
        times: the K+1 decreasing times.
        log_weights: final SMC log-weights ``(B, N)`` (the paths' weights for the target).
        log_z: SMC estimate ``(B,)``.
    """

    x: torch.Tensor
    times: list[float]
    log_weights: torch.Tensor
    log_z: torch.Tensor


class _RecordingTwistedSMC:
    """The twisted Feynman–Kac model of ``steer(mode="twisted")`` that also carries the path
    history as a state (so resampling keeps whole genealogies)."""

    def __init__(self, model, value, reward, times, guidance, dim, dtype, device, ops):
        self.model, self.value, self.reward = model, value, reward
        self.times, self.num_steps = times, len(times) - 1
        self.guidance, self.dim, self.dtype, self.device, self.ops = (
            guidance, dim, dtype, torch.device(device), ops)

    def _eval(self, x, t):
        with torch.no_grad():
            score = self.model.score(x, t).to(x.dtype)
        v, g = _value(self.value, x, t)
        if g is None:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(self.value(xg, t).sum(), xg)
        return score.detach(), v.detach().double(), g.detach().to(x.dtype)

    def init(self, batch, particles, generator):
        std = float(self.model.schedule.prior_std)
        x = std * torch.randn(batch, particles, self.dim, generator=generator,
                              device=self.device, dtype=self.dtype)
        score, v, g = self._eval(x, self.times[0])
        hist = torch.zeros(batch, particles, self.num_steps + 1, self.dim, dtype=self.dtype,
                           device=self.device)
        hist[:, :, 0] = x
        with torch.no_grad():
            logw = _initial_log_ratio(self.model, x, self.times[0]) + v
        return [x, hist, score, v, g], logw

    def step(self, k, states, logw, generator):
        x, hist, score, v, g = states
        t, t_new = self.times[k], self.times[k + 1]
        em = self.model.schedule.reverse_em(t, t - t_new)
        drift_q = em.drift(x, score + self.guidance * g).to(x.dtype)
        ref = em.drift(x, score).to(x.dtype)
        x_new, logw = self.ops.em_step(x, drift_q, logw, dt=em.dt, sigma=em.sigma,
                                       ref_drifts=[ref], ref_coefs=[1.0], generator=generator)
        if k + 1 == self.num_steps:
            v_new = self.reward(x_new).double().detach()
            score_new, g_new = score, g
        else:
            score_new, v_new, g_new = self._eval(x_new, t_new)
        logw = logw + (v_new - v)
        hist = hist.clone()
        hist[:, :, k + 1] = x_new
        return [x_new, hist, score_new, v_new, g_new], logw


def sample_diffusion_paths(
    model: DiffusionModel,
    value: Callable[[torch.Tensor, float], Any],
    reward: Callable[[torch.Tensor], torch.Tensor],
    *,
    particles: int,
    batch: int = 1,
    steps: int = 20,
    guidance: float = 1.0,
    threshold: float = 0.5,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    ops: Any = None,
) -> DiffusionPaths:
    """Twisted SMC along the model's reverse chain (as ``steer(mode="twisted")``: potential
    ``V_{t−h}(x') − V_t(x)``, guidance ``guidance · g² ∇V``, terminal potential ``r``) that
    returns the whole paths of the final particles with their weights, detached.
    ``threshold=0``: no resampling (independent paths from the proposal)."""
    if model.dim is None:
        raise ValueError("model: build the DiffusionModel with dim=... (the event size)")
    times = time_grid(steps)
    fk = _RecordingTwistedSMC(model, value, reward, times, float(guidance), int(model.dim),
                              dtype, device, _default_ops(ops))
    res = smc(fk, particles, batch, threshold=threshold, generator=generator, progress=False,
              ops=fk.ops)
    return DiffusionPaths(res.states[1].detach(), times, res.logw.detach(),
                          res.log_z.detach())


def diffusion_log_ratios(
    model: DiffusionModel,
    net,
    x: torch.Tensor,
    times: list[float],
    reward: Callable[[torch.Tensor], torch.Tensor],
    *,
    guidance: float = 1.0,
    ops: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values (B, N, K+1), log_ratios (B, N, K))`` along recorded paths ``x``
    ``(B, N, K+1, D)``, differentiable in ``net`` (a :class:`~pathsmc.learn.ValueNetwork`):
    ``values[..., k] = V_θ(x_k, t_k)`` for k < K and ``r(x_K)`` at the end;
    ``log_ratios[..., k] = log p_ref(x_{k+1}|x_k) − log q_θ(x_{k+1}|x_k)`` with ``q_θ`` the
    proposal guided by ``guidance · g² ∇V_θ`` (the guidance's graph is kept)."""
    ops = _default_ops(ops)
    k_steps = len(times) - 1
    if x.dim() != 4 or x.shape[2] != k_steps + 1:
        raise ValueError(f"x: expected paths (B, N, {k_steps + 1}, D), got {tuple(x.shape)}")
    x = x.detach()
    t_mid = torch.tensor(times[:-1], dtype=torch.float64, device=x.device)
    v, g = net.value_and_grad(x[:, :, :-1], t_mid, create_graph=True)
    values = torch.cat([v, reward(x[:, :, -1]).double()[..., None]], -1)
    zeros = torch.zeros(x.shape[:2], dtype=torch.float64, device=x.device)
    out = []
    for k in range(k_steps):
        t, t_new = times[k], times[k + 1]
        em = model.schedule.reverse_em(t, t - t_new)
        xk, xn = x[:, :, k], x[:, :, k + 1]
        with torch.no_grad():
            score = model.score(xk, t).to(x.dtype)
        ref = em.drift(xk, score)
        drift_q = em.drift(xk, score + guidance * g[:, :, k])
        lr = ops.kernel_logpdf(xn, xk, ref, dt=em.dt, sigma=em.sigma, logw=zeros)
        lr = ops.kernel_logpdf(xn, xk, drift_q, dt=em.dt, sigma=em.sigma, logw=lr, coef=-1.0)
        out.append(lr)
    return values, torch.stack(out, -1)


def reparameterized_log_weights(
    model: DiffusionModel,
    net,
    reward: Callable[[torch.Tensor], torch.Tensor],
    *,
    particles: int,
    batch: int = 1,
    steps: int = 20,
    guidance: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    ops: Any = None,
) -> torch.Tensor:
    """Log importance weights ``log w = log p_1/prior + Σ_k log p_ref/q_θ + r(x_K)`` ``(B, N)``
    of paths drawn from the guided proposal with fixed noise (reparameterized), carrying the
    graph through every state (``em_step`` with explicit noise; the model's score must be
    differentiable in x). ``mean(log w)`` is the ELBO (blog eq. 5)."""
    ops = _default_ops(ops)
    dim = int(model.dim)
    times = time_grid(steps)
    std = float(model.schedule.prior_std)
    x = std * torch.randn(batch, particles, dim, generator=generator, dtype=dtype)
    logw = _initial_log_ratio(model, x, times[0]).detach()
    for k in range(steps):
        t, t_new = times[k], times[k + 1]
        em = model.schedule.reverse_em(t, t - t_new)
        score = model.score(x, t).to(dtype)
        _, g = net.value_and_grad(x, t, create_graph=True)
        noise = torch.randn(x.shape, generator=generator, dtype=dtype)
        x, logw = ops.em_step(x, em.drift(x, score + guidance * g), logw, dt=em.dt,
                              sigma=em.sigma, ref_drifts=[em.drift(x, score)], ref_coefs=[1.0],
                              noise=noise)
    return logw + reward(x).double()
