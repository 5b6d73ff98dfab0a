"""The schedule side of parallel tempering: communication barrier Λ, schedule adaptation,
round-trip theory, and the per-round statistics that feed them.

Used by :mod:`pathsmc.tempering` (PT over inverse temperatures β) and :mod:`pathsmc.crepe`
(replica exchange over diffusion times); everything here is plain math on the rejection
rates of adjacent pairs — no sampler, no ops.

- :class:`MonotoneCubic`: the Fritsch–Carlson monotone interpolation of the cumulative
  barrier ``Λ(β_k) = Σ_{j<k} r_j``;
- :func:`optimal_schedule`: the schedule that equalizes the rejection rates, placing
  ``β'_k = Λ^{−1}(k·Λ/(K−1))`` (Syed et al. 2021, §5.1);
- :func:`round_trip_rate` and :func:`levels_for_barrier`: DEO round trips per scan on an
  equalized schedule (Syed et al. 2021, Thm. 1) and the number of levels for a barrier;
- :class:`RoundStats`: one PT round's diagnostics (swap acceptance, Λ̂ with its standard
  error, round trips and tempered restarts, stepping-stone log Ẑ, MALA acceptance).

Sources: S. Syed, A. Bouchard-Côté, G. Deligiannidis, A. Doucet, "Non-reversible parallel
tempering: a scalable highly parallel MCMC scheme", JRSS B 84 (2022) 321–350; F. N. Fritsch and
R. E. Carlson, "Monotone piecewise cubic interpolation", SIAM J. Numer. Anal. 17 (1980).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "MonotoneCubic",
    "RoundStats",
    "levels_for_barrier",
    "optimal_schedule",
    "round_trip_rate",
]

_MIN_REJECTION = 1e-6  # floor on the rejection rates so the cumulative barrier is increasing


class MonotoneCubic:
    """Monotone piecewise-cubic Hermite interpolation (Fritsch & Carlson 1980; the slopes of
    SciPy's ``PchipInterpolator``) of data ``(x_i, y_i)``, x strictly increasing.

    Used for the cumulative barrier Λ(β): nondecreasing data give a nondecreasing interpolant,
    so it can be inverted; its derivative estimates the local barrier λ(β).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.ndim != 1 or x.shape != y.shape or x.size < 2:
            raise ValueError("MonotoneCubic: expected 1-D x and y of the same length >= 2")
        h = np.diff(x)
        if not np.all(h > 0):
            raise ValueError("MonotoneCubic: x must be strictly increasing")
        delta = np.diff(y) / h
        d = np.zeros_like(y)
        if x.size == 2:
            d[:] = delta[0]
        else:
            w1 = 2.0 * h[1:] + h[:-1]
            w2 = h[1:] + 2.0 * h[:-1]
            same = delta[:-1] * delta[1:] > 0
            with np.errstate(divide="ignore", invalid="ignore"):
                hm = (w1 + w2) / (w1 / delta[:-1] + w2 / delta[1:])
            d[1:-1] = np.where(same, hm, 0.0)
            d[0] = self._end_slope(h[0], h[1], delta[0], delta[1])
            d[-1] = self._end_slope(h[-1], h[-2], delta[-1], delta[-2])
        self.x, self.y, self.d, self.h = x, y, d, h

    @staticmethod
    def _end_slope(h0: float, h1: float, m0: float, m1: float) -> float:
        d = ((2.0 * h0 + h1) * m0 - h0 * m1) / (h0 + h1)
        if np.sign(d) != np.sign(m0):
            return 0.0
        if np.sign(m0) != np.sign(m1) and abs(d) > abs(3.0 * m0):
            return 3.0 * m0
        return float(d)

    def _locate(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = np.clip(np.asarray(t, dtype=np.float64), self.x[0], self.x[-1])
        i = np.clip(np.searchsorted(self.x, t, side="right") - 1, 0, self.x.size - 2)
        s = (t - self.x[i]) / self.h[i]
        return i, s

    def __call__(self, t: np.ndarray) -> np.ndarray:
        """Values at ``t`` (clamped to the data range)."""
        i, s = self._locate(t)
        h = self.h[i]
        h00 = (1 + 2 * s) * (1 - s) ** 2
        h10 = s * (1 - s) ** 2
        h01 = s * s * (3 - 2 * s)
        h11 = s * s * (s - 1)
        return (h00 * self.y[i] + h10 * h * self.d[i] + h01 * self.y[i + 1]
                + h11 * h * self.d[i + 1])

    def derivative(self, t: np.ndarray) -> np.ndarray:
        """First derivative at ``t`` (clamped to the data range)."""
        i, s = self._locate(t)
        h = self.h[i]
        dy = self.y[i + 1] - self.y[i]
        return (6 * s * (1 - s) * dy / h + (1 - 4 * s + 3 * s * s) * self.d[i]
                + (3 * s * s - 2 * s) * self.d[i + 1])


def optimal_schedule(betas: np.ndarray | torch.Tensor, rejection: np.ndarray | torch.Tensor,
                     num_levels: int | None = None,
                     grid: int = 20_001) -> tuple[np.ndarray, np.ndarray]:
    """The schedule that equalizes swap rejection rates (Syed et al. 2021, §5.1).

    Builds the cumulative barrier ``Λ(β_k) = Σ_{j<k} r_j`` from the rejection rates of the
    current schedule (floored at 1e-6 so Λ increases strictly), interpolates it with
    :class:`MonotoneCubic` and places the new β's at equal quantiles of Λ:
    ``β'_k = Λ^{−1}(k·Λ(1)/(K'−1))``, inverting on a fine grid.

    Args:
        betas: current schedule ``(K,)``, 0 = β_0 < ... < β_{K−1} = 1.
        rejection: ``(K−1,)`` rejection rates of the adjacent pairs.
        num_levels: K' of the new schedule (default K).
        grid: points of the inversion grid.

    Returns ``(new_betas (K',), cumulative barrier at the old betas (K,))``, float64 numpy.
    """
    b = np.asarray(betas, dtype=np.float64).reshape(-1)
    r = np.asarray(rejection, dtype=np.float64).reshape(-1)
    if r.size != b.size - 1:
        raise ValueError(f"rejection: expected {b.size - 1} rates for {b.size} levels, "
                         f"got {r.size}")
    r = np.clip(np.nan_to_num(r, nan=1.0), _MIN_REJECTION, 1.0)
    cum = np.concatenate([[0.0], np.cumsum(r)])
    k = b.size if num_levels is None else int(num_levels)
    if k < 2:
        raise ValueError(f"num_levels: expected >= 2, got {k}")
    fine = np.linspace(0.0, 1.0, grid)
    lam = MonotoneCubic(b, cum)(fine)
    goals = np.linspace(0.0, cum[-1], k)
    new = np.interp(goals, lam, fine)
    new[0], new[-1] = 0.0, 1.0
    # Λ increases strictly (floored rates), so ties can only come from rounding: break them.
    for i in range(1, k - 1):
        if new[i] <= new[i - 1]:
            new[i] = np.nextafter(new[i - 1], 2.0)
    return new, cum


def round_trip_rate(barrier: float, num_levels: int) -> float:
    """DEO round trips per scan of one chain column with ``num_levels`` levels on an equalized
    schedule, under efficient local exploration (Syed et al. 2021, Thm. 1): the K − 1 pairs
    each reject ``r = Λ/(K − 1)``, so ``τ_K = 1/(2 + 2Λ/(1 − Λ/(K − 1)))``; 0 when
    ``K − 1 <= Λ`` (a pair would reject every swap). Increases to ``1/(2 + 2Λ)`` as K → ∞."""
    pairs = int(num_levels) - 1
    if pairs < 1 or pairs <= barrier:
        return 0.0
    return 1.0 / (2.0 + 2.0 * barrier / (1.0 - barrier / pairs))


def levels_for_barrier(barrier: float, *, efficiency: float | None = None,
                       max_levels: int = 256) -> int:
    """The number of levels K for a path whose global communication barrier is Λ.

    ``efficiency=None`` (default): the K that maximizes round trips per level-scan,
    ``τ_K / K`` (:func:`round_trip_rate`) — the right choice when a scan costs K times one
    level's work (one device, levels batched). It tends to ``K ≈ 2Λ + 1`` for large Λ, the
    "about 2Λ chains" rule of Syed et al. (2021, §5.3) and Pigeons.
    ``efficiency=e`` in (0, 1): the smallest K whose round-trip rate reaches ``e`` times the
    K → ∞ limit ``1/(2 + 2Λ)`` — for when extra levels cost no wall time (idle hardware).
    Always at least 2 and at most ``max_levels`` (which is returned when even that is too few).
    """
    lam = float(barrier)
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"barrier: expected a finite Λ >= 0, got {barrier}")
    if efficiency is not None and not 0.0 < efficiency < 1.0:
        raise ValueError(f"efficiency: expected a fraction in (0, 1), got {efficiency}")
    if max_levels < 2:
        raise ValueError(f"max_levels: expected >= 2, got {max_levels}")
    limit = 1.0 / (2.0 + 2.0 * lam)
    best, best_score = int(max_levels), 0.0  # (max_levels when no K can swap at all)
    for k in range(2, int(max_levels) + 1):
        tau = round_trip_rate(lam, k)
        if efficiency is not None:
            if tau >= efficiency * limit:
                return k
            best = k
        elif tau / k > best_score:
            best, best_score = k, tau / k
        elif tau > 0:  # τ_K/K is unimodal once positive: past the maximum
            break
    return best


@dataclass
class RoundStats:
    """One round's diagnostics, on the CPU (float64 unless stated).

    Shapes: B problems, K levels, C chains (columns), S scans in the round.

    Attributes:
        round: round index r (the round ran ``scans = 2^r`` scans unless set otherwise).
        scans: S.
        betas: the schedule used ``(B, K)``.
        step_size: MALA step sizes at the round's end ``(B, K)`` (level 0 unused when it is
            redrawn from the reference).
        adapted: whether step sizes adapted during the round.
        swap_accept: Rao–Blackwellized swap acceptance ``E[min(1, e^{r_k})]`` per pair
            ``(B, K−1)``, averaged over every scan and chain (all pairs, attempted or not);
            ``swap_accept_se`` its batch-means standard error over the C columns.
        swap_accept_empirical: fraction of attempted swaps accepted ``(B, K−1)`` (NaN for a
            pair never attempted).
        barrier: Λ̂ = Σ_k (1 − swap_accept) ``(B,)``.
        barrier_se: its batch-means standard error over the C columns ``(B,)``.
        cumulative_barrier: ``Λ̂(β_k)`` ``(B, K)``.
        round_trips: round trips per chain column ``(B, C)`` int64.
        restarts: tempered restarts per chain column ``(B, C)`` int64.
        log_z: forward stepping-stone log Ẑ ``(B,)``; ``log_z_se`` its standard error.
        log_z_backward: backward stepping-stone estimate ``(B,)``; ``log_z_backward_se``.
        mala_accept: MALA acceptance per level ``(B, K)`` (NaN at a level redrawn i.i.d.).
        energy: mean ``−log γ`` over the chains per scan ``(S, B, K)``.
        samples: every scan's states ``(S, K, B, C, D)`` when recorded, else None.
        seconds: wall time of the round (the device is synchronized at its end).
    """

    round: int
    scans: int
    betas: torch.Tensor
    step_size: torch.Tensor
    adapted: bool
    swap_accept: torch.Tensor
    swap_accept_se: torch.Tensor
    swap_accept_empirical: torch.Tensor
    barrier: torch.Tensor
    barrier_se: torch.Tensor
    cumulative_barrier: torch.Tensor
    round_trips: torch.Tensor
    restarts: torch.Tensor
    log_z: torch.Tensor
    log_z_se: torch.Tensor
    log_z_backward: torch.Tensor
    log_z_backward_se: torch.Tensor
    mala_accept: torch.Tensor
    energy: torch.Tensor
    samples: torch.Tensor | None
    seconds: float

    @property
    def rejection(self) -> torch.Tensor:
        """Rao–Blackwellized swap rejection rates ``(B, K−1)``."""
        return 1.0 - self.swap_accept

    @property
    def round_trip_rate(self) -> torch.Tensor:
        """Observed round trips per chain column per scan ``(B,)``."""
        return self.round_trips.double().mean(-1) / self.scans

    @property
    def predicted_round_trip_rate(self) -> torch.Tensor:
        """DEO round-trip rate under efficient local exploration,
        ``1 / (2 + 2 Σ_k r_k/(1 − r_k))`` (Syed et al. 2021, Thm. 1) ``(B,)``: an upper
        guide for the observed rate; ``1/(2 + 2Λ)`` as the schedule is refined."""
        r = self.rejection.clamp(max=1.0 - 1e-12)
        return 1.0 / (2.0 + 2.0 * (r / (1.0 - r)).sum(-1))

    def local_barrier(self, problem: int = 0,
                      betas: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(β, λ̂(β))``: the derivative of the monotone interpolation of the cumulative
        barrier (on 201 points by default)."""
        b = self.betas[problem].numpy()
        f = MonotoneCubic(b, self.cumulative_barrier[problem].numpy())
        grid = np.linspace(0.0, 1.0, 201) if betas is None else np.asarray(betas)
        return grid, f.derivative(grid)

    def level_samples(self, level: int, problem: int = 0) -> torch.Tensor:
        """Recorded states of one level ``(S, C, D)``."""
        if self.samples is None:
            raise ValueError("samples were not recorded (run the round with record=True)")
        return self.samples[:, level, problem]

    def line(self) -> str:
        """One line of the per-round report (means over problems)."""
        rt = self.round_trips.double().sum(-1).mean().item()
        rs = self.restarts.double().sum(-1).mean().item()
        acc = self.swap_accept
        ma = self.mala_accept[:, 1:] if self.mala_accept[:, 0].isnan().all() else self.mala_accept
        return (f"{self.round:>5d} {self.scans:>7d} {self.betas.shape[1]:>4d} "
                f"{self.barrier.mean().item():>7.3f} "
                f"{self.barrier_se.mean().item():>6.3f} {self.log_z.mean().item():>10.4f} "
                f"{self.log_z_se.mean().item():>8.4f} {acc.min().item():>6.3f} "
                f"{acc.mean().item():>6.3f} {rt:>8.0f} {rs:>8.0f} "
                f"{ma.min().item():>6.3f} {ma.max().item():>6.3f} {self.seconds:>7.2f}")

    @staticmethod
    def header() -> str:
        return (f"{'round':>5} {'scans':>7} {'K':>4} {'Λ':>7} {'±':>6} {'log Z':>10} {'±':>8} "
                f"{'swap':>6} {'acc':>6} {'trips':>8} {'restart':>8} {'mala':>6} "
                f"{'acc':>6} {'sec':>7}\n"
                f"{'':>5} {'':>7} {'':>4} {'':>7} {'':>6} {'':>10} {'':>8} {'min':>6} {'mean':>6} "
                f"{'':>8} {'':>8} {'min':>6} {'max':>6} {'':>7}")
