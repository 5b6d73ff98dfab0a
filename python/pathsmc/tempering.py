"""Parallel tempering (replica exchange) with non-reversible swaps and adaptive schedules.

K levels × C chains × B problems, batched on one device. Level k of problem b targets the
geometric path

    π_β(x) ∝ ref(x)^{1−β} · γ(x)^β,        β = β_{b,k},  0 = β_{b,0} < ... < β_{b,K−1} = 1,

from a tractable reference (β = 0) to the unnormalized target γ (β = 1). Every problem has its
own schedule and MALA step sizes; the C chains of a problem are C independent PT systems
(columns), each with K replicas, which is what the batch-means error bars below rely on.

**Layout.** All per-replica tensors are ``(K, B, C, ...)``: states ``x`` ``(K, B, C, D)``,
log-densities ``(K, B, C)``. The same memory is viewed two ways, without copies:

- ``(K·B, C, D)`` for the local moves: one row per (level, problem), so
  :func:`pathsmc.ops.mala_accept` takes one step size per row, i.e. per level and problem;
- ``(K, B·C, D)`` for the swaps: :func:`pathsmc.ops.replica_swap` exchanges adjacent levels
  of each of the B·C columns.

**One scan** (Syed et al. 2021, Algorithm 1):

1. *Local exploration*, ``local_steps`` MALA moves at every level: the proposal
   ``x' = x + h∇log π_β(x) + √(2h)·ε`` through :func:`pathsmc.ops.em_step` with the per-row
   step ``h`` (``em_step(x, drift=∇, dt=h, sigma=√2)``, noise drawn in-kernel), the
   Metropolis–Hastings correction
   through :func:`pathsmc.ops.mala_accept` with the per-row step tensor. When the reference can
   be sampled (it has ``sample``, e.g. :class:`pathsmc.targets.boltzmann.DiagonalGaussian`) and
   ``reference_iid`` is on, level 0 is instead redrawn exactly from the reference (an
   independent draw leaves π_0 invariant and makes every visit of a replica to the reference
   a full restart).
2. *Communication*: the pairs (k, k+1) with k ≡ parity (mod 2) propose to exchange their
   states, accepted with probability ``min(1, exp(r_k))``,
   ``r_k = (β_{k+1} − β_k)·(ℓ(x_k) − ℓ(x_{k+1}))``, ``ℓ = log γ − log ref``
   (:func:`swap_log_ratio`). DEO (deterministic even/odd, the default) alternates the parity
   every scan, which makes the index process of each replica non-reversible (it keeps moving
   in one direction until a swap is rejected); SEO draws the parity at random every scan
   (reversible). The states, their cached log-densities and gradients, and each replica's
   round-trip phase travel together through ``replica_swap``.

**Rounds.** Round r runs 2^r scans (r = 0, 1, ...: rounds double in length). Between rounds
the schedule is adapted (Syed et al. 2021, §5.1): the round's swap rejection rates r̂_k
(Rao–Blackwellized: the mean of ``1 − min(1, e^{r_k})`` over every pair, scan and chain)
give the cumulative barrier ``Λ(β_k) = Σ_{j<k} r̂_j``; a monotone cubic (Fritsch–Carlson)
interpolation of it is inverted at equal quantiles, ``β'_k = Λ^{−1}(k·Λ/(K−1))``, so the new
schedule equalizes the rejection rates. MALA step sizes adapt during every round but the last
(``log h += adapt_rate·(acceptance − target_accept)`` per level, on the device) and are carried
to the new schedule by interpolation in β. The last round runs with schedule and step sizes
frozen: its samples and estimates come from one fixed, π-invariant Markov chain. The schedule
math (:class:`MonotoneCubic`, :func:`optimal_schedule`, :func:`round_trip_rate`,
:func:`levels_for_barrier`) and the per-round statistics (:class:`RoundStats`) live in
:mod:`pathsmc.tempering_schedule` and are re-exported here.

**Diagnostics** per round (:class:`RoundStats`), accumulated in device tensors and read once
at the round's end (no host sync inside a round):

- swap acceptance per pair, Rao–Blackwellized and empirical (attempted pairs only);
- the global communication barrier ``Λ̂ = Σ_k r̂_k`` with a batch-means standard error over
  the C independent columns, the cumulative barrier at the β's, the local barrier
  ``λ(β) = dΛ/dβ``; a round-trip-rate bound ``1/(2 + 2Λ)`` per column (Syed et al. Thm. 3);
- round trips and tempered restarts per chain column: every replica carries a phase
  (0: not yet at the reference, 1: left the reference, 2: then reached the target); a
  *tempered restart* is a replica in phase 1 reaching the target (a fresh draw from the
  reference carried to β = 1), a *round trip* one in phase 2 returning to the reference;
- stepping-stone log Z, forward
  ``log Ẑ = log Z_ref + Σ_k log mean_i exp((β_{k+1} − β_k)·ℓ(x_k^i))`` and backward
  ``log Z_ref − Σ_k log mean_i exp(−(β_{k+1} − β_k)·ℓ(x_{k+1}^i))`` over every scan and chain,
  with a delta-method standard error from the C columns;
- MALA acceptance per level, mean ``−log γ`` per level per scan (energy trace), and optionally
  every scan's states (``record``).

A compact report per round can be printed, and :meth:`PTResult.plot` writes a PNG of the
barrier λ(β) and the schedule (matplotlib, Agg backend).

Sources: S. Syed, A. Bouchard-Côté, G. Deligiannidis, A. Doucet, "Non-reversible parallel
tempering: a scalable highly parallel MCMC scheme", JRSS B 84 (2022) 321–350; N. Surjanovic
et al., "Pigeons.jl: distributed sampling from intractable distributions" (2023) — the same
DEO swaps, round doubling, schedule adaptation and diagnostics; F. N. Fritsch and
R. E. Carlson, "Monotone piecewise cubic interpolation", SIAM J. Numer. Anal. 17 (1980).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from pathsmc import ops
from pathsmc._deprecation import renamed_argument
from pathsmc.progress import progress_bar
from pathsmc.samplers import adapt_log_step, mala_step
from pathsmc.samplers import log_prob_and_grad as _eval
from pathsmc.tempering_schedule import (  # re-exported: the schedule side of PT
    MonotoneCubic,
    RoundStats,
    levels_for_barrier,
    optimal_schedule,
    round_trip_rate,
)

__all__ = [
    "MonotoneCubic",
    "PTResult",
    "ParallelTempering",
    "PerProblemTarget",
    "RoundStats",
    "levels_for_barrier",
    "optimal_schedule",
    "parallel_tempering",
    "round_trip_rate",
    "swap_log_ratio",
]

_SWAPS = ("deo", "seo")

LogDensity = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``x (..., D) ↦ (log density (...), gradient (..., D))``: what the PT callables compute."""


# ---------------------------------------------------------------------------------------------
# pieces


def swap_log_ratio(betas: torch.Tensor, ell: torch.Tensor) -> torch.Tensor:
    """Log acceptance ratio of exchanging the states of levels k and k+1.

    ``r_k = (β_{k+1} − β_k)·(ℓ(x_k) − ℓ(x_{k+1}))`` with ``ℓ = log γ − log ref``: the log of
    ``π_k(x_{k+1}) π_{k+1}(x_k) / (π_k(x_k) π_{k+1}(x_{k+1}))`` for the geometric path (the
    normalizers cancel).

    Args:
        betas: ``(K, B)`` inverse temperatures per level and problem.
        ell: ``(K, B, C)`` ℓ at the current states of every level.

    Returns ``(K−1, B, C)``.
    """
    d = (betas[1:] - betas[:-1]).to(ell.dtype)
    return d.unsqueeze(-1) * (ell[:-1] - ell[1:])


class PerProblemTarget:
    """Stack B different targets (or references) into one batched callable.

    The PT callables receive states ``(..., B, C, D)`` (problem index at dimension −3); this
    evaluates ``targets[b]`` on ``x[..., b, :, :]`` and stacks. Targets with parameters that
    broadcast over B as ``(B, 1, D)`` need no wrapper.
    """

    def __init__(self, targets: list) -> None:
        if not targets:
            raise ValueError("targets: expected at least one target")
        self.targets = list(targets)
        self.dim = getattr(self.targets[0], "dim", None)

    def log_prob_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() < 3 or x.shape[-3] != len(self.targets):
            raise ValueError(f"x: expected shape (..., {len(self.targets)}, C, D), "
                             f"got {tuple(x.shape)}")
        outs = [_eval(t, x[..., b, :, :]) for b, t in enumerate(self.targets)]
        return torch.stack([o[0] for o in outs], -2), torch.stack([o[1] for o in outs], -3)


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class PTResult:
    """What :func:`parallel_tempering` returns.

    Attributes:
        rounds: one :class:`RoundStats` per round.
        states: final states ``(K, B, C, D)``.
        betas: the schedule of the last round ``(B, K)`` (CPU float64).
        step_size: step sizes of the last round ``(B, K)``.
        ref_log_z: log normalizer of the reference (0 for a normalized reference).
        target_evals: target (value + gradient) evaluations per replica.
        schedules: the schedule each round ran with, ``(B, K)`` per round.
    """

    rounds: list[RoundStats]
    states: torch.Tensor
    betas: torch.Tensor
    step_size: torch.Tensor
    ref_log_z: float
    target_evals: int
    schedules: list[torch.Tensor] = field(default_factory=list)

    @property
    def last(self) -> RoundStats:
        return self.rounds[-1]

    @property
    def log_z(self) -> torch.Tensor:
        """Forward stepping-stone log Ẑ of the last round ``(B,)``."""
        return self.last.log_z

    @property
    def barrier(self) -> torch.Tensor:
        """Λ̂ of the last round ``(B,)``."""
        return self.last.barrier

    def summary(self) -> str:
        """The per-round report as a string."""
        b, k = self.betas.shape
        c = self.states.shape[2]
        head = (f"parallel tempering: {b} problem(s) × {k} levels × {c} chains, "
                f"{sum(r.scans for r in self.rounds)} scans, {self.target_evals} target "
                f"evaluations per replica")
        lines = [head, RoundStats.header()] + [r.line() for r in self.rounds]
        lam = self.last.barrier.mean().item()
        lines.append(f"  last round: Λ = {lam:.3f}, round trips per column per scan "
                     f"{self.last.round_trip_rate.mean().item():.4f} (DEO under efficient "
                     f"local exploration: {self.last.predicted_round_trip_rate.mean().item():.4f}"
                     f"; 1/(2+2Λ) = {1.0 / (2.0 + 2.0 * lam):.4f})")
        return "\n".join(lines)

    def plot(self, path: str, problem: int = 0) -> str:
        """Write a PNG of the local barrier λ(β) and the schedule of the last round.

        Left: λ̂(β) (derivative of the interpolated cumulative barrier) and the per-pair
        estimates r̂_k/(β_{k+1} − β_k); right: Λ̂(β) with the schedule's β_k marked.
        Returns ``path``. Needs matplotlib (Agg backend, no display).
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        st = self.last
        betas = st.betas[problem].numpy()
        cum = st.cumulative_barrier[problem].numpy()
        grid, lam = st.local_barrier(problem)
        rej = st.rejection[problem].numpy()
        mids = 0.5 * (betas[1:] + betas[:-1])
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        ax1.plot(grid, lam, label="λ̂(β) (interpolated)")
        ax1.plot(mids, rej / np.diff(betas), "o", ms=4, label="r̂_k / Δβ_k")
        ax1.set_xlabel("β")
        ax1.set_ylabel("local barrier λ(β)")
        ax1.set_yscale("log")
        ax1.legend()
        f = MonotoneCubic(betas, cum)
        ax2.plot(grid, f(grid), label=f"Λ̂(β), Λ = {cum[-1]:.3f}")
        ax2.plot(betas, cum, "o", ms=4, label="schedule β_k")
        for bk in betas:
            ax2.axvline(bk, color="0.85", lw=0.6, zorder=0)
        ax2.set_xlabel("β")
        ax2.set_ylabel("cumulative barrier Λ(β)")
        ax2.legend()
        fig.suptitle(f"round {st.round}: {len(betas)} levels, problem {problem}")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


# ---------------------------------------------------------------------------------------------
# the sampler


class ParallelTempering:
    """A batch of PT systems: K levels × C chains × B problems (see the module docstring).

    Args:
        target: unnormalized target γ: an object with ``log_prob_and_grad(x)`` (and ``dim``)
            or a callable ``x ↦ (log γ(x), ∇log γ(x))``; ``x`` is ``(..., B, C, D)`` with the
            problem index at dimension −3 (per-problem parameters broadcast as ``(B, 1, D)``;
            see :class:`PerProblemTarget`), returning ``(...)`` and ``(..., D)``.
        reference: the reference, same interface; default ``N(0, I)``
            (:class:`pathsmc.targets.boltzmann.DiagonalGaussian`). If it has
            ``sample(shape, generator)`` returning ``(*shape, D)`` for ``shape = (B, C)``,
            level 0 can be redrawn exactly (``reference_iid``).
        num_levels: K >= 2 (ignored when ``betas`` is given).
        particles: C, independent PT systems (columns of K replicas) per problem.
        batch: B independent problems (rows).
        num_chains, num_problems: deprecated names of ``particles`` and ``batch``.
        dim: D (default: ``target.dim`` or ``reference.dim``).
        betas: initial schedule ``(K,)`` or ``(B, K)``, strictly increasing from 0 to 1
            (default: equally spaced).
        step_size: initial MALA step h, a float, ``(K,)`` or ``(B, K)`` (default
            ``0.5·D^(−1/3)`` times the mean reference variance when known, else 0.1).
        local_steps: MALA moves per level per scan.
        swap: ``"deo"`` (default) or ``"seo"``.
        reference_iid: redraw level 0 from the reference every scan (default: when the
            reference has ``sample``).
        ref_log_z: log normalizer of the reference (default 0: normalized).
        target_accept: MALA acceptance the step adaptation aims at (0.574).
        adapt_rate: gain of the step-size adaptation of log h.
        init: initial states ``(K, B, C, D)``, ``(B, C, D)`` or ``(C, D)`` (broadcast to every
            level); default: draws from the reference (standard normals without ``sample``).
        dtype: state dtype (float32 or float64; default float64, the rule for analytic
            targets in docs/design.md, "Conventions"); log-densities are float64.
        device: where to run (default: the reference's device, else CPU).
        generator: seeds every device draw (MALA noise and uniforms, swap uniforms, reference
            draws); the host RNG of SEO parities is seeded from it too.
    """

    def __init__(
        self,
        target,
        reference=None,
        *,
        num_levels: int = 16,
        particles: int | None = None,
        batch: int | None = None,
        dim: int | None = None,
        betas: torch.Tensor | np.ndarray | list[float] | None = None,
        step_size: float | torch.Tensor | None = None,
        local_steps: int = 1,
        swap: str = "deo",
        reference_iid: bool | None = None,
        ref_log_z: float = 0.0,
        target_accept: float = 0.574,
        adapt_rate: float = 0.5,
        init: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        num_chains: int | None = None,
        num_problems: int | None = None,
    ) -> None:
        num_chains = renamed_argument("ParallelTempering", "particles", particles,
                                      "num_chains", num_chains, 32)
        num_problems = renamed_argument("ParallelTempering", "batch", batch,
                                        "num_problems", num_problems, 1)
        if dim is None:
            dim = getattr(target, "dim", None) or getattr(reference, "dim", None)
            if dim is None and init is not None:
                dim = init.shape[-1]
        if dim is None:
            raise ValueError("dim: cannot infer D (give dim=, init= or a target with .dim)")
        self.dim = int(dim)
        if reference is None:
            from pathsmc.targets.boltzmann import DiagonalGaussian

            reference = DiagonalGaussian(self.dim, device=device)
        if device is None:
            mean = getattr(reference, "mean", None)
            device = mean.device if isinstance(mean, torch.Tensor) else torch.device("cpu")
        self.device = torch.device(device)
        self.target, self.reference = target, reference
        if swap not in _SWAPS:
            raise ValueError(f"swap: expected one of {_SWAPS}, got {swap!r}")
        if local_steps < 1 or num_chains < 1 or num_problems < 1:
            raise ValueError("local_steps, particles and batch must be >= 1")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype: expected float32 or float64, got {dtype}")
        self.swap, self.local_steps = swap, int(local_steps)
        self.target_accept, self.adapt_rate = float(target_accept), float(adapt_rate)
        self.ref_log_z = float(ref_log_z)
        self.B, self.C, self.dtype = int(num_problems), int(num_chains), dtype
        self.generator = generator
        seed = generator.initial_seed() if generator is not None else torch.initial_seed()
        self._host_rng = random.Random(seed ^ 0x5EED)
        self.scan_count = 0
        self.round_count = 0
        self.target_evals = 0
        can_sample = _can_sample(reference, self.B, self.C, generator)
        if reference_iid is None:
            reference_iid = can_sample
        elif reference_iid and not can_sample:
            raise ValueError("reference_iid: the reference has no sample(shape, generator)")
        self.reference_iid = bool(reference_iid)

        # schedule (B, K) on the host (float64) and on the device as (K, B)
        if betas is None:
            if num_levels < 2:
                raise ValueError(f"num_levels: expected K >= 2, got {num_levels}")
            betas = np.linspace(0.0, 1.0, int(num_levels))
        self.set_schedule(betas)
        k = self.K
        if step_size is None:
            var = getattr(reference, "variance", None)
            base = (0.5 * float(torch.as_tensor(var).double().mean()) * self.dim ** (-1 / 3)
                    if var is not None else 0.1)
            step_size = base
        h = torch.as_tensor(step_size, dtype=torch.float64).cpu()
        if h.dim() > 2 or (h.dim() >= 1 and h.shape[-1] != k) or (h.dim() == 2
                                                                 and h.shape[0] != self.B):
            raise ValueError(f"step_size: expected a float, ({k},) or ({self.B}, {k}), got "
                             f"shape {tuple(h.shape)}")
        h = h.expand(self.B, k)
        if not bool((h > 0).all()):
            raise ValueError("step_size: expected positive step sizes")
        self._log_h = torch.log(h).T.contiguous().to(self.device)  # (K, B)

        # initial states
        if init is None:
            if can_sample:
                x0 = self._ref_sample((k,))
            else:
                x0 = torch.randn(k, self.B, self.C, self.dim, dtype=dtype, device=self.device,
                                 generator=generator)
        else:
            x0 = init.to(device=self.device, dtype=dtype)
            x0 = torch.broadcast_to(x0, (k, self.B, self.C, self.dim))
        self.x = x0.contiguous()
        self.lt, self.gt = _eval(self.target, self.x)
        self.lr, self.gr = _eval(reference, self.x)
        self.phase = torch.zeros(k, self.B * self.C, dtype=torch.int8, device=self.device)

    # ---- setup helpers ----

    @property
    def K(self) -> int:
        return self.betas_host.shape[1]

    @property
    def step_size(self) -> torch.Tensor:
        """Current MALA step sizes ``(B, K)`` (reads the device)."""
        return self._log_h.exp().T.cpu()

    def set_schedule(self, betas) -> None:
        """Replace the schedule (``(K,)`` or ``(B, K)``; K may change only before the states
        exist)."""
        b = torch.as_tensor(np.asarray(betas, dtype=np.float64)).reshape(-1, np.shape(betas)[-1])
        b = b.expand(self.B, b.shape[-1]).clone()
        if b.shape[-1] < 2:
            raise ValueError("betas: expected at least 2 levels")
        if not (bool((b[:, 0] == 0).all()) and bool((b[:, -1] == 1).all())
                and bool((b.diff(dim=-1) > 0).all())):
            raise ValueError("betas: expected a strictly increasing schedule from 0 to 1")
        if hasattr(self, "x") and b.shape[-1] != self.x.shape[0]:  # see adapt_schedule
            raise ValueError(f"betas: the sampler has {self.x.shape[0]} levels, got "
                             f"{b.shape[-1]}")
        self.betas_host = b
        self._betas = b.T.contiguous().to(self.device)  # (K, B) float64

    def _ref_sample(self, lead: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(lead)
        s = self.reference.sample((n, self.B, self.C), generator=self.generator)
        return s.to(device=self.device, dtype=self.dtype).reshape(*lead, self.B, self.C,
                                                                  self.dim)

    # ---- one scan ----

    def _local_moves(self, acc_sum: torch.Tensor, adapt: bool) -> None:
        """``local_steps`` MALA moves at every level (from level 1 when level 0 is i.i.d.)."""
        lo = 1 if self.reference_iid else 0
        x, lt, lr, gt, gr = (t[lo:] for t in (self.x, self.lt, self.lr, self.gt, self.gr))
        beta = self._betas[lo:]  # (K − lo, B): one row per level and problem
        for _ in range(self.local_steps):
            log_h = self._log_h[lo:]
            h = log_h.exp().to(self.dtype).double()  # the same h (x's precision) in both ops
            x, lt, lr, gt, gr, acc = mala_step(self.target, self.reference, x, lt, lr, gt, gr,
                                               beta, h, self.generator, ops=ops)
            rate = acc.sum(-1, dtype=torch.float64)  # (K − lo, B)
            acc_sum[lo:] += rate
            if adapt and self.adapt_rate:
                self._log_h[lo:] = adapt_log_step(log_h, rate / self.C, self.target_accept,
                                                  self.adapt_rate)
        self.target_evals += self.local_steps
        if lo:
            x0 = self._ref_sample((1,))
            lt0, gt0 = _eval(self.target, x0)
            lr0, gr0 = _eval(self.reference, x0)
            x, lt, lr = torch.cat([x0, x]), torch.cat([lt0, lt]), torch.cat([lr0, lr])
            gt, gr = torch.cat([gt0, gt]), torch.cat([gr0, gr])
        self.x, self.lt, self.lr, self.gt, self.gr = x, lt, lr, gt, gr

    def _parity(self) -> int:
        if self.swap == "deo":
            return self.scan_count % 2
        return self._host_rng.getrandbits(1)

    def _communicate(self, acc: dict[str, torch.Tensor], attempts: np.ndarray) -> None:
        """One swap step; updates phases, round trips and the swap / stepping-stone sums."""
        k, b, c, d = self.K, self.B, self.C, self.dim
        bc = b * c
        ell = self.lt - self.lr  # (K, B, C)
        log_ratio = swap_log_ratio(self._betas, ell).reshape(k - 1, bc)
        parity = self._parity()
        attempts[parity::2] += 1
        states = [self.x.view(k, bc, d), self.lt.view(k, bc), self.lr.view(k, bc),
                  self.gt.view(k, bc, d), self.gr.view(k, bc, d), self.phase]
        (x, lt, lr, gt, gr, phase), accepted, _ = ops.replica_swap(
            states, log_ratio, parity, generator=self.generator)
        self.x, self.lt, self.lr = x.view(k, b, c, d), lt.view(k, b, c), lr.view(k, b, c)
        self.gt, self.gr = gt.view(k, b, c, d), gr.view(k, b, c, d)
        # Round trips / restarts: phase 0 → 1 at the reference, 1 → 2 at the target.
        p0, pt = phase[0], phase[-1]
        acc["trips"] += p0 == 2
        acc["restarts"] += pt == 1
        phase[0] = 1
        phase[-1] = torch.where(pt == 1, torch.full_like(pt, 2), pt)
        self.phase = phase
        acc["swap_rb"] += torch.nan_to_num(log_ratio.clamp(max=0.0).exp(), nan=0.0)
        acc["swap_acc"] += accepted
        # Stepping stone on the post-swap states (each level still holds a π_k sample).
        ell = (self.lt - self.lr).reshape(k, bc)
        dbeta = (self._betas[1:] - self._betas[:-1]).repeat_interleave(c, dim=1)  # (K-1, BC)
        acc["ss_fwd"] = torch.logaddexp(acc["ss_fwd"], dbeta * ell[:-1])
        acc["ss_bwd"] = torch.logaddexp(acc["ss_bwd"], -dbeta * ell[1:])
        self.scan_count += 1

    # ---- rounds ----

    def run_round(self, scans: int | None = None, *, adapt_step: bool = True,
                  record: bool = False, tick: Callable[[int], object] | None = None
                  ) -> RoundStats:
        """Run one round of ``scans`` scans (default ``2^round``) with the current schedule.

        Nothing is read from the device until the round ends (``tick(1)``, e.g. a progress
        bar's ``update``, is called after every scan). Returns its :class:`RoundStats` (the
        schedule is not changed here: see :meth:`adapt_schedule`).
        """
        scans = 2 ** self.round_count if scans is None else int(scans)
        if scans < 1:
            raise ValueError(f"scans: expected >= 1, got {scans}")
        acc = self._new_accumulators()
        energy, samples = [], []
        t0 = time.perf_counter()
        for _ in range(scans):
            self._scan(acc, adapt_step)
            energy.append(-self.lt.mean(-1))
            if record:
                samples.append(self.x.clone())
            if tick is not None:
                tick(1)
        stats = self._round_stats(acc, scans, adapt_step, energy, samples)
        stats.seconds = time.perf_counter() - t0
        self.round_count += 1
        return stats

    def _new_accumulators(self) -> dict:
        """Zeroed per-round sums: device tensors, plus the host-known swap attempt counts."""
        k, b, c = self.K, self.B, self.C
        dev, f64 = self.device, torch.float64
        return {
            "swap_rb": torch.zeros(k - 1, b * c, dtype=f64, device=dev),
            "swap_acc": torch.zeros(k - 1, b * c, dtype=torch.int64, device=dev),
            "ss_fwd": torch.full((k - 1, b * c), -math.inf, dtype=f64, device=dev),
            "ss_bwd": torch.full((k - 1, b * c), -math.inf, dtype=f64, device=dev),
            "trips": torch.zeros(b * c, dtype=torch.int64, device=dev),
            "restarts": torch.zeros(b * c, dtype=torch.int64, device=dev),
            "mala": torch.zeros(k, b, dtype=f64, device=dev),
            "attempts": np.zeros(k - 1, dtype=np.int64),
        }

    def _scan(self, acc: dict, adapt_step: bool) -> None:
        """One scan: local moves, then one swap step (device work only, no host sync)."""
        self._local_moves(acc["mala"], adapt_step)
        self._communicate(acc, acc["attempts"])

    def _round_stats(self, acc, scans, adapted, energy, samples) -> RoundStats:
        k, b, c = self.K, self.B, self.C
        attempts = acc["attempts"]
        # the round's one synchronization:
        host = {n: t.cpu() for n, t in acc.items() if isinstance(t, torch.Tensor)}
        mala = host["mala"]
        rb = (host["swap_rb"] / scans).reshape(k - 1, b, c)  # per column
        swap_accept = rb.mean(-1).T.contiguous()  # (B, K-1)
        swap_accept_se = _se(rb).T.contiguous()
        col_barrier = (1.0 - rb).sum(0)  # (B, C)
        barrier = col_barrier.mean(-1)
        barrier_se = _se(col_barrier)
        emp = host["swap_acc"].reshape(k - 1, b, c).sum(-1).double()
        att = torch.as_tensor(attempts, dtype=torch.float64).unsqueeze(-1) * c
        emp = torch.where(att > 0, emp / att.clamp_min(1), torch.nan).T.contiguous()
        cum = torch.cat([torch.zeros(b, 1, dtype=torch.float64),
                         torch.cumsum(1.0 - swap_accept, -1)], -1)
        log_z, log_z_se = _stepping_stone(host["ss_fwd"].reshape(k - 1, b, c), scans)
        lzb, lzb_se = _stepping_stone(host["ss_bwd"].reshape(k - 1, b, c), scans)
        mala_acc = (mala / (scans * self.local_steps * c)).T.contiguous()
        if self.reference_iid:
            mala_acc[:, 0] = math.nan
        return RoundStats(
            round=self.round_count, scans=scans, betas=self.betas_host.clone(),
            step_size=self.step_size, adapted=adapted, swap_accept=swap_accept,
            swap_accept_se=swap_accept_se, swap_accept_empirical=emp, barrier=barrier,
            barrier_se=barrier_se,
            cumulative_barrier=cum, round_trips=host["trips"].reshape(b, c),
            restarts=host["restarts"].reshape(b, c), log_z=self.ref_log_z + log_z,
            log_z_se=log_z_se, log_z_backward=self.ref_log_z - lzb, log_z_backward_se=lzb_se,
            mala_accept=mala_acc, energy=torch.stack(energy).transpose(1, 2).cpu(),
            samples=torch.stack(samples).cpu() if samples else None, seconds=0.0)

    def adapt_schedule(self, stats: RoundStats, num_levels: int | None = None) -> torch.Tensor:
        """Move to the schedule that equalizes the round's rejection rates (per problem) and
        carry the step sizes over by linear interpolation of log h in β. Returns the new
        schedule ``(B, K')``.

        ``num_levels`` K' (default: keep K) changes the number of levels: new level k' takes
        the states of the old level nearest to it in cumulative barrier (its equal-barrier
        quantile), so the chains start near their new targets; the round-trip phases restart
        (a copied replica must not count one trip twice). Use it between adaptive rounds only.
        """
        old = self.betas_host.numpy()
        log_h = self._log_h.T.cpu().numpy()
        k_new = self.K if num_levels is None else int(num_levels)
        new = np.empty((self.B, k_new))
        new_h = np.empty_like(new)
        source = np.empty((k_new, self.B), dtype=np.int64)
        for i in range(self.B):
            new[i], cum = optimal_schedule(old[i], stats.rejection[i].numpy(), k_new)
            new_h[i] = np.interp(new[i], old[i], log_h[i])
            goals = np.linspace(0.0, cum[-1], k_new)
            source[:, i] = np.abs(cum[None, :] - goals[:, None]).argmin(-1)
        if k_new != self.K:
            self._remap_levels(torch.as_tensor(source, device=self.device))
        self.set_schedule(new)
        self._log_h = torch.as_tensor(new_h.T.copy(), device=self.device)
        return self.betas_host.clone()

    def _remap_levels(self, source: torch.Tensor) -> None:
        """New level k of problem b gets the replicas of old level ``source[k, b]``."""
        cols = torch.arange(self.B, device=self.device)
        self.x, self.lt, self.lr, self.gt, self.gr = (
            t[source, cols].contiguous() for t in (self.x, self.lt, self.lr, self.gt, self.gr))
        self.phase = torch.zeros(source.shape[0], self.B * self.C, dtype=torch.int8,
                                 device=self.device)

    def run(self, rounds: int, *, adapt_schedule: bool = True, adapt_step: bool = True,
            adapt_levels: bool = False, level_efficiency: float | None = None,
            max_levels: int = 256, record: bool = False, report: bool = False,
            plot: str | None = None, progress: bool | None = None) -> PTResult:
        """``rounds`` rounds of 1, 2, 4, ... scans; adapt between rounds; the last round runs
        frozen (and is recorded when ``record``). ``report`` prints a line per round;
        ``plot`` writes the barrier/schedule PNG of the last round to that path; ``progress``
        shows a tqdm bar over the scans on stderr (default: when stderr is a terminal).

        ``adapt_levels`` also chooses the number of levels K from each round's barrier
        estimate Λ̂ (the largest over problems), by :func:`levels_for_barrier` with
        ``level_efficiency`` and ``max_levels``. K changes only when the choice differs from
        the current K by more than 10 % (Λ̂ of short early rounds is noisy), and never after
        the second-to-last round, so the final (frozen) round starts from chains that had an
        adaptive round at their levels. With few levels Λ̂ is biased low (each pair's
        rejection is at most 1, so Λ̂ <= K − 1): K can grow about twofold per round, and
        a run from a small K needs a few rounds to settle. It needs ``adapt_schedule``.
        """
        if rounds < 1:
            raise ValueError(f"rounds: expected >= 1, got {rounds}")
        if adapt_levels and not adapt_schedule:
            raise ValueError("adapt_levels: needs adapt_schedule=True")
        if level_efficiency is not None:
            if not adapt_levels:
                raise ValueError("level_efficiency: only used with adapt_levels=True")
            levels_for_barrier(0.0, efficiency=level_efficiency)  # validates it
        if max_levels < 2:
            raise ValueError(f"max_levels: expected >= 2, got {max_levels}")
        out, schedules = [], []
        if report:
            print(RoundStats.header())
        total = sum(2 ** (self.round_count + r) for r in range(rounds))
        bar = progress_bar(total, progress, "parallel tempering")
        for r in range(rounds):
            final = r == rounds - 1
            schedules.append(self.betas_host.clone())
            st = self.run_round(adapt_step=adapt_step and not final, record=record and final,
                                tick=bar.update)
            out.append(st)
            if report:
                print(st.line(), flush=True)
            if adapt_schedule and not final:
                k_new = None
                if adapt_levels and r < rounds - 2:
                    k_new = levels_for_barrier(float(st.barrier.max()),
                                               efficiency=level_efficiency,
                                               max_levels=max_levels)
                    if abs(k_new - self.K) <= 0.1 * self.K:
                        k_new = None
                self.adapt_schedule(st, k_new)
        bar.close()
        res = PTResult(out, self.x, out[-1].betas, out[-1].step_size, self.ref_log_z,
                       self.target_evals, schedules)
        if report:
            print(res.summary().splitlines()[-1])
        if plot is not None:
            res.plot(plot)
        return res


def _can_sample(reference, b: int, c: int, generator) -> bool:
    """Whether ``reference.sample((n, B, C), generator)`` works (one trial draw, n = 1)."""
    if not hasattr(reference, "sample"):
        return False
    try:
        reference.sample((1, b, c), generator=generator)
    except NotImplementedError:
        return False
    return True


def _se(per_column: torch.Tensor) -> torch.Tensor:
    """Standard error of the mean over the last dim (columns); NaN with one column."""
    c = per_column.shape[-1]
    if c < 2:
        return torch.full(per_column.shape[:-1], math.nan, dtype=torch.float64)
    return per_column.double().std(-1) / math.sqrt(c)


def _stepping_stone(log_sums: torch.Tensor, scans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stepping-stone estimate from per-column log-sums ``(K−1, B, C)`` of ``±Δβ·ℓ``.

    ``Σ_k log mean_{scans, columns} exp(·)`` and its delta-method standard error: with
    ``w_{kc}`` the column means normalized by the pair's overall mean, the error is
    ``≈ mean_c Σ_k (w_{kc} − 1)``, so se = std_c(Σ_k w_kc)/√C (pairs of one column are
    correlated; columns are independent).
    """
    c = log_sums.shape[-1]
    col = log_sums - math.log(scans)  # log mean per column
    pair = torch.logsumexp(col, -1) - math.log(c)  # (K-1, B)
    total = pair.sum(0)
    w = torch.exp(col - pair.unsqueeze(-1)).sum(0)  # (B, C)
    return total, _se(w)


def parallel_tempering(
    target,
    reference=None,
    *,
    rounds: int = 10,
    adapt_schedule: bool = True,
    adapt_step: bool = True,
    adapt_levels: bool = False,
    level_efficiency: float | None = None,
    max_levels: int = 256,
    record: bool = False,
    report: bool = False,
    plot: str | None = None,
    progress: bool | None = None,
    **kwargs,
) -> PTResult:
    """Run non-reversible PT with schedule adaptation: ``rounds`` rounds of 1, 2, 4, ... scans.

    ``kwargs`` go to :class:`ParallelTempering` (``num_levels``, ``particles``,
    ``batch``, ``betas``, ``step_size``, ``local_steps``, ``swap``, ``reference_iid``,
    ``ref_log_z``, ``init``, ``dtype``, ``device``, ``generator``, ...). See :meth:`run` for
    the rest. Returns a :class:`PTResult` (the last round's estimates: ``log_z``, ``barrier``).
    """
    pt = ParallelTempering(target, reference, **kwargs)
    return pt.run(rounds, adapt_schedule=adapt_schedule, adapt_step=adapt_step,
                  adapt_levels=adapt_levels, level_efficiency=level_efficiency,
                  max_levels=max_levels, record=record, report=report, plot=plot,
                  progress=progress)
