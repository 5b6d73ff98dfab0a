"""Noise schedules for diffusion models: variance-preserving (VP) and variance-exploding (VE).

Time runs from t = 1 (noise) to t = 0 (data) during generation. The forward
(noising) SDE is ``dX = f(X, t) dt + g(t) dW`` with a drift linear in x, ``f(x, t) = λ(t) x``,
and its marginals are Gaussian convolutions of the data,

    X_t = m(t) X_0 + sqrt(v(t)) ε,        ε ~ N(0, I),

so a Gaussian-mixture data distribution stays a Gaussian mixture at every t
(:meth:`pathsmc.targets.GaussianMixture.diffused`).

One reverse-time Euler–Maruyama step from t to t − h (h > 0) with a score s(x, t) is

    x' = x + (−f(x, t) + g(t)² s(x, t)) h + g(t) √h ε,

the proposal of :func:`pathsmc.ops.em_step` with ``drift = −f + g² s`` and ``sigma = g(t)``;
its path-RND weight uses the forward kernel ``N(x; x' + f(x', t − h) h, g(t)² h)``, i.e.
``fwd_linear = λ(t − h)``. :meth:`VPSchedule.reverse_em` / :meth:`VESchedule.reverse_em`
return these numbers as a :class:`ReverseEM`.

All methods take ``t`` as a Python float (and return floats) or as a tensor (and return tensors
of the same shape).

``Schedule`` is the union type of the two schedules; :mod:`pathsmc.diffusion` re-exports
everything here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["ReverseEM", "Schedule", "VESchedule", "VPSchedule", "time_grid"]

Time = float | torch.Tensor


def _exp(t: Time) -> Time:
    return torch.exp(t) if isinstance(t, torch.Tensor) else math.exp(t)


def _expm1(t: Time) -> Time:
    return torch.expm1(t) if isinstance(t, torch.Tensor) else math.expm1(t)


def _sqrt(t: Time) -> Time:
    return torch.sqrt(t) if isinstance(t, torch.Tensor) else math.sqrt(t)


@dataclass(frozen=True)
class ReverseEM:
    """The numbers of one reverse-time Euler–Maruyama step t → t − h.

    The reverse drift is ``linear · x + g2 · score`` (:meth:`drift`); pass
    ``sigma``, ``dt`` and ``fwd_linear`` to :func:`pathsmc.ops.em_step` (with ``fwd_coef``
    for the forward kernel of the step weight).
    """

    t: float
    dt: float
    sigma: float
    """g(t): the step's noise is ``sigma · sqrt(dt) · ε``."""
    g2: float
    """g(t)²: the coefficient of the score in the reverse drift."""
    linear: float
    """−λ(t): the reverse drift's term linear in x, ``−f(x, t) = linear · x``."""
    fwd_linear: float
    """λ(t − h): the forward drift ``f(y, t − h) = fwd_linear · y`` of the backward kernel."""

    def drift(self, x: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Reverse-SDE drift ``−f(x, t) + g(t)² score`` (add guidance to ``score``)."""
        return self.linear * x + self.g2 * score


@dataclass(frozen=True)
class VPSchedule:
    """Variance-preserving schedule with linear β(t) = β_min + t (β_max − β_min), t ∈ [0, 1].

    Forward SDE ``dX = −½ β(t) X dt + sqrt(β(t)) dW``; marginal mean coefficient
    ``m(t) = exp(−½ ∫₀ᵗ β)`` and variance ``v(t) = 1 − m(t)²`` (``alpha_bar = m²``).
    The prior at t = 1 is approximately N(0, I).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0

    def __post_init__(self) -> None:
        if not (0.0 < self.beta_min <= self.beta_max):
            raise ValueError(f"VPSchedule: need 0 < beta_min <= beta_max, got "
                             f"beta_min={self.beta_min}, beta_max={self.beta_max}")

    @property
    def prior_std(self) -> float:
        """Standard deviation of the N(0, prior_std² I) prior at t = 1."""
        return 1.0

    def beta(self, t: Time) -> Time:
        """β(t)."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integral_beta(self, t: Time) -> Time:
        """∫₀ᵗ β(s) ds."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def alpha_bar(self, t: Time) -> Time:
        """ᾱ(t) = exp(−∫₀ᵗ β) = m(t)²."""
        return _exp(-self.integral_beta(t))

    def mean_coef(self, t: Time) -> Time:
        """m(t) = exp(−½ ∫₀ᵗ β): E[X_t | X_0] = m(t) X_0."""
        return _exp(-0.5 * self.integral_beta(t))

    def variance(self, t: Time) -> Time:
        """v(t) = 1 − m(t)²: Cov[X_t | X_0] = v(t) I."""
        return -_expm1(-self.integral_beta(t))

    def marginal(self, t: Time) -> tuple[Time, Time]:
        """(m(t), v(t)) with X_t = m(t) X_0 + sqrt(v(t)) ε."""
        return self.mean_coef(t), self.variance(t)

    def drift_linear(self, t: Time) -> Time:
        """λ(t) = −½ β(t), the forward drift being f(x, t) = λ(t) x."""
        return -0.5 * self.beta(t)

    def f(self, x: torch.Tensor, t: Time) -> torch.Tensor:
        """Forward drift f(x, t) = −½ β(t) x."""
        return self.drift_linear(t) * x

    def g2(self, t: Time) -> Time:
        """g(t)² = β(t)."""
        return self.beta(t)

    def reverse_em(self, t: float, dt: float) -> ReverseEM:
        """Coefficients of the reverse EM step t → t − dt (see :class:`ReverseEM`)."""
        t, dt = float(t), float(dt)
        g2 = float(self.g2(t))
        return ReverseEM(t=t, dt=dt, sigma=math.sqrt(g2), g2=g2,
                         linear=-float(self.drift_linear(t)),
                         fwd_linear=float(self.drift_linear(t - dt)))


@dataclass(frozen=True)
class VESchedule:
    """Variance-exploding schedule σ(t) = σ_min (σ_max / σ_min)^t, t ∈ [0, 1].

    Forward SDE ``dX = g(t) dW`` with ``g(t)² = d σ(t)²/dt = 2 σ(t)² log(σ_max/σ_min)``,
    no drift. Started from the data at t = 0 its marginal is ``X_t = X_0 + sqrt(v(t)) ε``
    with ``v(t) = σ(t)² − σ_min²`` (exactly consistent with the SDE, so v(0) = 0). The prior at
    t = 1 is approximately N(0, σ_max² I).
    """

    sigma_min: float = 0.01
    sigma_max: float = 10.0

    def __post_init__(self) -> None:
        if not (0.0 < self.sigma_min < self.sigma_max):
            raise ValueError(f"VESchedule: need 0 < sigma_min < sigma_max, got "
                             f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}")

    @property
    def prior_std(self) -> float:
        """Standard deviation of the N(0, prior_std² I) prior at t = 1."""
        return self.sigma_max

    @property
    def _log_ratio(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t: Time) -> Time:
        """σ(t) = σ_min (σ_max / σ_min)^t."""
        return self.sigma_min * _exp(t * self._log_ratio)

    def mean_coef(self, t: Time) -> Time:
        """m(t) = 1."""
        return torch.ones_like(t) if isinstance(t, torch.Tensor) else 1.0

    def variance(self, t: Time) -> Time:
        """v(t) = σ(t)² − σ_min² = σ_min² (exp(2 t log(σ_max/σ_min)) − 1)."""
        return self.sigma_min ** 2 * _expm1(2.0 * t * self._log_ratio)

    def marginal(self, t: Time) -> tuple[Time, Time]:
        """(m(t), v(t)) with X_t = m(t) X_0 + sqrt(v(t)) ε."""
        return self.mean_coef(t), self.variance(t)

    def drift_linear(self, t: Time) -> Time:
        """λ(t) = 0 (no forward drift)."""
        return torch.zeros_like(t) if isinstance(t, torch.Tensor) else 0.0

    def f(self, x: torch.Tensor, t: Time) -> torch.Tensor:
        """Forward drift f(x, t) = 0."""
        return torch.zeros_like(x)

    def g2(self, t: Time) -> Time:
        """g(t)² = d σ(t)² / dt = 2 σ(t)² log(σ_max / σ_min)."""
        s = self.sigma(t)
        return 2.0 * s * s * self._log_ratio

    def reverse_em(self, t: float, dt: float) -> ReverseEM:
        """Coefficients of the reverse EM step t → t − dt (see :class:`ReverseEM`)."""
        t, dt = float(t), float(dt)
        g2 = float(self.g2(t))
        return ReverseEM(t=t, dt=dt, sigma=_sqrt(g2), g2=g2, linear=0.0, fwd_linear=0.0)


def time_grid(steps: int, t_start: float = 1.0, t_end: float = 0.0) -> list[float]:
    """``steps + 1`` uniformly spaced times from ``t_start`` down to ``t_end`` (as floats)."""
    if steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps}")
    return [t_start + (t_end - t_start) * i / steps for i in range(steps + 1)]


Schedule = VPSchedule | VESchedule
