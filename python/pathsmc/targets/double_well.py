"""A 1-D double well with exact tempered quantities by quadrature (the PT test target).

:class:`DoubleWell1D` is ``γ(x) = exp(−(a x + b x² + c x⁴))`` on R (D = 1), the 1-D factor of
:class:`pathsmc.targets.boltzmann.ManyWell`; with the default ``(a, b, c) = (−0.5, −6, 1)`` the
wells sit near ±1.7, separated by a barrier of ≈ 9 nats, and the linear term tilts the mass
to the right well. Its ``log_z`` is exact (trapezoid rule on a fine grid,
:func:`pathsmc.targets.boltzmann.double_well_log_z`).

:class:`TemperedPath1D` is the geometric annealing path of parallel tempering and annealed SMC,
``π_β ∝ ref^{1−β} · γ^β`` with a normalized Gaussian reference ``N(m, s²)``, evaluated on a
grid: for every β it gives the exact normalizer ``log Z_β`` (so ``log Z_1 = log Z`` of the
target, ``log Z_0 = 0``), expectations (mean, second moment, probability of the right well and
their variances), and the quantities of non-reversible PT (Syed et al. 2021):

- the local communication barrier ``λ(β) = ½ E|ℓ(X) − ℓ(X′)|`` with ``X, X′`` i.i.d. ``π_β``
  and ``ℓ = log γ − log ref``;
- the global barrier ``Λ = ∫₀¹ λ(β) dβ`` (Gauss–Legendre in β);
- the exact rejection rate of a swap between β and β′,
  ``r(β, β′) = 1 − E[min(1, exp((β′ − β)(ℓ(X) − ℓ(X′))))]`` with ``X ~ π_β``, ``X′ ~ π_β′``
  independent; ``Σ_k r(β_k, β_{k+1}) → Λ`` as the schedule is refined.

All sums over pairs are done in O(n log n) by sorting ℓ on the grid (no n² matrices).

Source: S. Syed, A. Bouchard-Côté, G. Deligiannidis, A. Doucet, "Non-reversible parallel
tempering: a scalable highly parallel MCMC scheme", JRSS B 84 (2022) 321–350, §3–4.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from pathsmc.targets.boltzmann import BoltzmannTarget, double_well_log_z

__all__ = ["DoubleWell1D", "TemperedPath1D"]

_LOG_2PI = math.log(2.0 * math.pi)


class DoubleWell1D(BoltzmannTarget):
    """``γ(x) = exp(−(a x + b x² + c x⁴))`` on R, D = 1, with exact ``log_z`` and ``p_right``.

    Args:
        a, b, c: the polynomial (``c > 0``); default the many-well factor ``(−0.5, −6, 1)``.

    ``log_prob_and_grad`` takes ``x`` of shape ``(..., 1)`` in any float dtype.
    """

    def __init__(self, a: float = -0.5, b: float = -6.0, c: float = 1.0) -> None:
        self.dim = 1
        self.a, self.b, self.c = float(a), float(b), float(c)
        self.log_z, self.p_right = double_well_log_z(self.a, self.b, self.c)

    def log_prob_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(x)
        t = x[..., 0]
        t2 = t * t
        lp = -(self.a * t + self.b * t2 + self.c * t2 * t2)
        g = -(self.a + 2.0 * self.b * t + 4.0 * self.c * t2 * t)
        return lp, g.unsqueeze(-1)

    def log_prob_grid(self, t: torch.Tensor) -> torch.Tensor:
        """``log γ`` on a 1-D grid ``t`` (float64)."""
        t2 = t * t
        return -(self.a * t + self.b * t2 + self.c * t2 * t2)

    def support(self) -> tuple[float, float]:
        """An interval holding all of the mass of γ^β for β ∈ (0, 1] (to ~e^−200)."""
        half = (2.0 * max(1.0, (abs(self.a) / self.c) ** (1 / 3), (abs(self.b) / self.c) ** 0.5)
                + (200.0 / self.c) ** 0.25)
        return -half, half

    def path(self, ref_mean: float = 0.0, ref_scale: float = 1.0,
             points: int = 20_001) -> TemperedPath1D:
        """The tempered path from ``N(ref_mean, ref_scale²)`` to this double well."""
        lo, hi = self.support()
        half = max(-lo, hi, abs(ref_mean) + 14.0 * ref_scale)
        points += 1 - points % 2  # odd: the symmetric grid holds t = 0 (see moments)
        return TemperedPath1D(self.log_prob_grid, ref_mean, ref_scale, -half, half, points)


class TemperedPath1D:
    """Exact quantities of ``π_β ∝ N(x; m, s²)^{1−β} · γ(x)^β`` on a uniform grid.

    Args:
        log_target: ``t ↦ log γ(t)`` for a float64 grid ``t`` (unnormalized).
        ref_mean, ref_scale: the normalized Gaussian reference ``N(m, s²)``.
        lo, hi: the grid's range; it must hold the mass of every ``π_β``.
        points: grid points (trapezoid rule; the integrands are smooth and decay fast, so the
            error is far below Monte Carlo error with the default 20 001).
    """

    def __init__(self, log_target: Callable[[torch.Tensor], torch.Tensor], ref_mean: float,
                 ref_scale: float, lo: float, hi: float, points: int = 20_001) -> None:
        t = torch.linspace(lo, hi, points, dtype=torch.float64)
        h = float(t[1] - t[0])
        self.t = torch.where(t.abs() < 1e-9 * h, torch.zeros_like(t), t)  # exact 0 if on grid
        logw = torch.full_like(self.t, math.log(h))
        logw[0] = logw[-1] = math.log(0.5 * h)
        self._log_quad = logw  # log trapezoid weights
        z = (self.t - ref_mean) / ref_scale
        self.log_ref = -0.5 * z * z - math.log(ref_scale) - 0.5 * _LOG_2PI
        self.log_target = log_target(self.t).to(torch.float64)
        self.ell = self.log_target - self.log_ref

    # ---- densities and expectations ----

    def log_z(self, beta: float) -> float:
        """``log ∫ ref^{1−β} γ^β`` (0 at β = 0; log Z of the target at β = 1)."""
        return float(torch.logsumexp(self._log_quad + self.log_ref + beta * self.ell, 0))

    def probs(self, beta: float) -> torch.Tensor:
        """Normalized quadrature masses of ``π_β`` on the grid (sum to 1)."""
        lp = self._log_quad + self.log_ref + beta * self.ell
        return torch.softmax(lp, 0)

    def expect(self, f: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor,
               beta: float) -> float:
        """``E_{π_β}[f(X)]`` for ``f`` a function of the grid or its values on the grid."""
        v = f(self.t) if callable(f) else f
        return float((self.probs(beta) * v).sum())

    def variance(self, f: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor,
                 beta: float) -> float:
        """``Var_{π_β}[f(X)]``."""
        v = f(self.t) if callable(f) else f
        m = self.expect(v, beta)
        return self.expect((v - m) ** 2, beta)

    def moments(self, beta: float) -> dict[str, float]:
        """``mean``, ``m2`` (E X²), ``p_right`` (P(X > 0)) of ``π_β``, each with its variance
        (``var_mean``, ``var_m2``, ``var_p_right``: one sample's variance of the statistic).

        The indicator of ``X > 0`` jumps at 0: it gets the value ½ there, which keeps the
        trapezoid rule's error O(h²) when t = 0 is a grid point (as on the grids of
        :meth:`DoubleWell1D.path`; otherwise the error is O(h·π_β(0)))."""
        t = self.t
        right = (t > 0).double() + 0.5 * (t == 0).double()
        out = {}
        for name, v in (("mean", t), ("m2", t * t), ("p_right", right)):
            out[name] = self.expect(v, beta)
            out["var_" + name] = self.variance(v, beta)
        return out

    # ---- communication barriers (Syed et al. 2021) ----

    def local_barrier(self, beta: float) -> float:
        """``λ(β) = ½ E|ℓ(X) − ℓ(X′)|``, X, X′ i.i.d. ``π_β`` (sorted-grid formula)."""
        p = self.probs(beta)
        u, order = torch.sort(self.ell)
        p = p[order]
        f_before = torch.cumsum(p, 0) - p  # Σ_{j<i} p_j
        s_before = torch.cumsum(p * u, 0) - p * u  # Σ_{j<i} p_j u_j
        mean_abs = 2.0 * (p * (u * f_before - s_before)).sum()
        return 0.5 * float(mean_abs)

    def global_barrier(self, nodes: int = 96) -> float:
        """``Λ = ∫₀¹ λ(β) dβ`` by Gauss–Legendre quadrature in β."""
        x, w = np.polynomial.legendre.leggauss(nodes)
        betas = 0.5 * (x + 1.0)
        return float(0.5 * sum(wi * self.local_barrier(float(b)) for b, wi in zip(betas, w,
                                                                                  strict=True)))

    def cumulative_barrier(self, betas: torch.Tensor | list[float],
                           nodes: int = 8) -> torch.Tensor:
        """``Λ(β) = ∫₀^β λ`` at each β, float64: Gauss–Legendre with ``nodes`` points on every
        interval between consecutive β's (on a grid of 101 β's, 8 nodes give ~1e-8)."""
        x, w = np.polynomial.legendre.leggauss(nodes)
        bs = [float(b) for b in torch.as_tensor(betas, dtype=torch.float64).reshape(-1)]
        out, acc, prev = [], 0.0, 0.0
        for b in sorted(bs):
            mid, half = 0.5 * (b + prev), 0.5 * (b - prev)
            acc += half * sum(wi * self.local_barrier(mid + half * xi)
                              for xi, wi in zip(x, w, strict=True)) if b > prev else 0.0
            out.append(acc)
            prev = b
        by_value = dict(zip(sorted(bs), out, strict=True))
        return torch.tensor([by_value[b] for b in bs], dtype=torch.float64)

    def swap_rejection(self, beta0: float, beta1: float) -> float:
        """Exact ``r(β₀, β₁) = 1 − E[min(1, exp((β₁ − β₀)(ℓ(X₀) − ℓ(X₁))))]``,
        ``X₀ ~ π_β₀``, ``X₁ ~ π_β₁`` independent (the swap acceptance of PT)."""
        d = beta1 - beta0
        p0, p1 = self.probs(beta0), self.probs(beta1)
        v, order = torch.sort(self.ell)
        q = p1[order]
        # min(1, e^{d(u − v)}): 1 where d(u − v) >= 0, else e^{d u} e^{−d v}.
        if d < 0:  # reduce to d >= 0 by symmetry: swap the roles of the two levels
            return self.swap_rejection(beta1, beta0)
        u = self.ell
        k = torch.searchsorted(v, u, right=True)  # v[:k] <= u
        q_below = torch.cat([torch.zeros(1, dtype=q.dtype), torch.cumsum(q, 0)])[k]
        logq = torch.log(q) - d * v
        # reverse cumulative logsumexp: tail[j] = log Σ_{i>=j} q_i e^{−d v_i}
        tail = torch.flip(torch.logcumsumexp(torch.flip(logq, [0]), 0), [0])
        tail = torch.cat([tail, torch.tensor([-math.inf], dtype=q.dtype)])[k]
        above = torch.exp(d * u + tail)
        acc = (p0 * (q_below + above)).sum()
        return float(1.0 - acc)

    def pair_rejections(self, betas: torch.Tensor | list[float]) -> torch.Tensor:
        """Exact swap rejection rates of the adjacent pairs of a schedule ``(K,)`` → ``(K−1,)``."""
        b = [float(v) for v in torch.as_tensor(betas, dtype=torch.float64).reshape(-1)]
        return torch.tensor([self.swap_rejection(b[i], b[i + 1]) for i in range(len(b) - 1)],
                            dtype=torch.float64)
