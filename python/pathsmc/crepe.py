"""CREPE: replica exchange across the time levels of a diffusion model.

Sampling a steered target of pretrained diffusion models — tempered ``p_0^β``, a product of
models ``Π_j p_{j,0}^{β_j}`` (classifier-free guidance included), reward-tilted
``p_0 · exp(r)``, or a product times a tilt — with parallel tempering whose "temperatures" are
diffusion times. The models give only scores (no densities); the swap acceptance is a ratio of
path Radon–Nikodym derivatives (RND) computed with :func:`pathsmc.ops.em_step` along short
Euler–Maruyama (EM) paths between adjacent levels, and the swaps go through
:func:`pathsmc.ops.replica_swap`.

**Levels.** K levels at diffusion times ``0 = t_0 < t_1 < ... < t_{K−1} = 1``; level k of
each of the C chains × B problems holds a state ``x_k``, ``(K, B, C, D)`` in all. With the
models' forward (noising) SDE ``dX = f(X, t) dt + g(t) dW``, ``f(x, t) = λ(t) x``, and their
marginals ``p_{j,t}``, level k targets

    π_k(x) = γ_k(x) / Z_k,        γ_k(x) = Π_j p_{j,t_k}(x)^{β_j} · exp(r_{t_k}(x)),

with ``r_t(x) = r(x̂_0(x, t))`` at Tweedie's denoised mean of the first model for t > 0 and
``r_0 = r`` (no reward: r ≡ 0). The chain targets ``Π_k π_k(x_k)``; level 0 is the target
``π_0 ∝ Π_j p_{j,0}^{β_j} e^r``. Neither γ_k nor Z_k is known.

**Swap of levels (k, k+1)** (the pairs with k ≡ parity (mod 2), DEO: the parity alternates
every round). On the sub-grid ``s_0 = t_k < s_1 < ... < s_M = t_{k+1}`` (M equal steps
``h_n = s_{n+1} − s_n`` of at most ``max_step``) two EM paths are drawn:

- *noise up* the lower state, ``z_0 = x_k``, with the forward kernel
  ``F_n(z_{n+1} | z_n) = N(z_{n+1}; z_n + λ(s_n) z_n h_n, g(s_{n+1})² h_n)``;
- *denoise* the upper state, ``w_M = x_{k+1}``, with the annealed reverse kernel
  ``G_n(w_n | w_{n+1}) = N(w_n; w_{n+1} + a(w_{n+1}) h_n, g(s_{n+1})² h_n)``,
  ``a = −f + g² Σ_j β_j s_j`` (``s_j`` the scores at ``s_{n+1}``);

and the pair moves to ``(x_k, x_{k+1}) ← (w_0, z_M)``: each replica changes level and is
carried to its new time along its path. On the space extended by the two paths, with density
``π_k(x_k) π_{k+1}(x_{k+1}) F(z | x_k) G(w | x_{k+1})``, this move is an involution (the new
state's noising path is w read upwards, its denoising path is z read downwards: a permutation
of coordinates, Jacobian 1), so Metropolis–Hastings accepts it with probability min(1, A),

    A = π_k(w_0) π_{k+1}(z_M) F(w | w_0) G(z | z_M)
        / [π_k(z_0) π_{k+1}(w_M) F(z | z_0) G(w | w_M)]  =  R(w) / R(z),

    R(p) = γ_k(p_0) F(p | p_0) / [γ_{k+1}(p_M) G(p | p_M)]       (Z_k, Z_{k+1} cancel).

R(p) is the RND between two path measures on ``[t_k, t_{k+1}]``: the "target" process started
from γ_k at ``t_k`` and run forward with F, over the "proposal" process started from γ_{k+1} at
``t_{k+1}`` and run backward with G. The marginal ratio in it is replaced by a path functional
(the slides' forward–backward RND and Nelson's relation): model j's forward SDE started from
``p_{j,t_k}`` and its reverse SDE (drift ``b_j = −f + g² s_j``, kernel ``G_{j,n}``) started
from ``p_{j,t_{k+1}}`` are the same path measure, so

    p_{j,t_k}(p_0) / p_{j,t_{k+1}}(p_M) = Π_n G_{j,n}(p_n | p_{n+1}) / F_n(p_{n+1} | p_n)

(exact as h → 0). Taking the β_j-weighted product,

    log R(p) = Σ_n Δ_n(p) + r_{t_k}(p_0) − r_{t_{k+1}}(p_M),
    Δ_n(p)   = Σ_j β_j log G_{j,n}(p_n | p_{n+1}) + (1 − Σ_j β_j) log F_n(p_{n+1} | p_n)
               − log G_n(p_n | p_{n+1}),

and ``Δ_n`` is exactly :func:`pathsmc.ops.em_step`'s step weight for the reverse step
``p_{n+1} → p_n`` (docs/design.md: ``c = β``, ``c_f = 1 − Σβ``, ``λ = λ(s_n)``, reference drifts
``b_j``, proposal drift ``a``) — the tempering/product weight of :func:`pathsmc.diffusion.steer`.
The denoising path is drawn by ``em_step`` itself, which accumulates ``Δ(w) = Σ_n Δ_n(w)``;
for the noising path ``em_step`` is called on each reverse step ``z_{n+1} → z_n`` with the
noise that reproduces ``z_n``, which evaluates ``Δ(z)`` with the same code. The acceptance is

    log A = Δ(w) − Δ(z) + [r_{t_k}(w_0) − r_{t_k}(x_k)] + [r_{t_{k+1}}(z_M) − r_{t_{k+1}}(x_{k+1})]

(:func:`path_swap_log_ratio`). Checks: with one model, β = 1 and no reward, G = G_1 and F's
coefficient is 0, so Δ ≡ 0 and every swap is accepted — the noised state of level k *is* a draw
from level k+1 and the denoised one from level k (exactly so in continuous time); the same
holds for a product of two copies of one model with β = (½, ½).

**Discretization.** Nelson's relation holds for the SDEs, not for their EM kernels: the error
``E(p) = log p_{t_k}(p_0) − log p_{t_{k+1}}(p_M) − Σ_n log G_{1,n}/F_n`` has standard deviation
O(√h) along a path and opposite means on noising and denoising paths (the two
Kullback–Leibler divergences between the discretized forward and backward path measures,
O(h)), so with a finite step the chain's level 0 is biased by O(h), like the SMC driver's
``weighting="path"``. Measured on ``p^{1/2}`` of a 1-D two-component mixture (VP schedule):
E[X²] too large by 0.7–0.9 % at h = 0.01 (``steer`` with 100 steps: 1.0 %), by 0.3–0.8 % at
h = 0.005. The bias grows with the target's sharpness; measured with 10 levels, 1024 chains
× 300 rounds (E[X²] against quadrature, ± its batch-means standard error):

- ``p²`` of the same mixture: E[X²] too large by 2.5–2.9 % (± 0.3–0.6 %, two seeds) at
  h = 0.01, by 1.8–2.2 % at h = 0.005 and by 0.3 ± 0.3 % at h = 0.0025; the mean within 2 %.
  The same run with ``weighting="density"`` at h = 0.01: 0.5 ± 0.3 %.
- the product of that mixture with a second one (``β = (1, 1)``): E[X²] too large by
  2.4 ± 0.5 % at h = 0.01 and 1.9 ± 0.5 % at h = 0.005; the mean within 1 %.

So for sharpening targets (Σβ > 1) lower ``max_step`` (the bias shrinks with h, at these
steps somewhat more slowly than in proportion), or use ``weighting="density"`` when the
models have exact densities: it replaces the marginal ratios by the models' exact
``log_prob`` — ``log R(p) = Σ_n [log F_n − log G_n] + log γ_k(p_0) − log γ_{k+1}(p_M)``, the
``em_step`` weight with ``c = ()``, ``c_f = 1`` — and is exact at any step size (for models
whose densities are known, e.g. test targets).

**Top level.** ``π_{K−1} ∝ Π_j p_{j,1}^{β_j} e^{r_1}`` with ``p_{j,1}`` ≈ the prior
``N(0, σ² I)`` (σ = ``schedule.prior_std``), i.e. ≈ ``N(0, σ²/Σβ · I) · e^{r_1}``. Every round
it is redrawn by an independence Metropolis–Hastings step with proposal ``N(0, σ²/Σβ · I)``:
log ratio ``ℓ(x') − ℓ(x)``, ``ℓ = Σ_j β_j (log p_{j,1} − log prior) + r_1``, where
``log p_{j,1}`` is the model's exact ``log_prob`` when every model has one (``exact_top``) and
the prior otherwise (then ℓ = r_1, and without a reward every redraw is accepted: a fresh
prior draw). Fresh draws enter at the top and travel down through the swaps; a draw that
reaches level 0 is a *restart* (the analogue of PT's tempered restart), and one that then
returns to the top completes a *round trip*.

**Local moves.** None: a diffusion model gives scores, not densities, so there is no exact
within-level Metropolis kernel, and none is needed — unlike PT's swaps, which permute the
states, every accepted CREPE swap replaces both states by new ones (each carried along its own
path), so the levels mix through the swaps and the top redraw alone.

**One round**: redraw the top level, one DEO (or SEO) swap step over the pairs of the round's
parity, record level 0. Everything in a round is device work (no host sync); the statistics
are device accumulators read once at the end of :meth:`CREPE.run` (and between burn-in phases
when the level times are adapted). Level times can be adapted during burn-in to equalize the
swap rejection rates, with the schedule optimizer of parallel tempering
(:func:`pathsmc.tempering_schedule.optimal_schedule`, Syed et al. 2021) applied to times instead
of β.

**Cost.** The noising path needs no model (F is linear); its weight needs the scores at
``z_1 … z_M``, the denoising path at ``w_M … w_1``, at the same times: both go in one model
call per sub-step over ``2·B·C`` states (one call over B·C when Δ ≡ 0 and only the denoising
path is evaluated), plus the reward's denoiser at the endpoints. **A user's model must
therefore accept x of shape (B, 2C, D)** as well as (B, C, D): the two paths are stacked
along the chain axis (dim 1), so a per-problem ``condition`` ``(B, ...)`` must be broadcast
over dim 1 whatever its size, never reshaped to C. ``log_prob`` and ``reward`` see
``(B, C, D)``. A round attempts every other pair, so a round costs about half of the whole
time grid: ``≈ 1/(2·max_step)`` calls, i.e. ``≈ C/max_step`` model evaluations per problem.
:class:`CREPEResult` counts calls and evaluations (states × calls per problem), the number to
compare with the SMC driver's ``steps × particles``.

Example (tempering a scores-only mixture model, β = 1/2)::

    >>> import torch
    >>> from pathsmc.crepe import crepe
    >>> from pathsmc.diffusion import DiffusionModel, VPSchedule
    >>> from pathsmc.targets import GaussianMixture
    >>> mix = GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-2.0], [1.5]]),
    ...                       torch.tensor([[0.3], [0.5]]))
    >>> exact = DiffusionModel.from_mixture(mix, VPSchedule())
    >>> model = DiffusionModel(exact.fn, VPSchedule(), dim=1)   # scores only
    >>> res = crepe(model, beta=0.5, num_levels=10, max_step=0.01, particles=512,
    ...             burn_in=80, adapt_times=1, rounds=160, seed=1, dtype=torch.float64)
    >>> res.samples.shape          # (rounds, B, C, D): level-0 states of the recorded rounds
    torch.Size([160, 1, 512, 1])
    >>> mean, se = res.estimate()  # batch means over the chains
    >>> print(res.summary())  # doctest: +SKIP

On one thread of a shared 2-core CPU this took 6.5–7.7 s (12 705 model calls, 13 M state
evaluations): mean 0.231 ± 0.013 and variance 3.83 ± 0.02 against the exact 0.2375 and
3.750 (the excess variance is the h = 0.01 discretization above);
``steer(model, "temper", beta=0.5, steps=100)`` with 16 runs × 8 098 particles (the same
evaluations, 2.9 s on that machine) gives 0.229 ± 0.007 and 3.79 ± 0.015
(``tests/test_crepe.py::test_compare_with_smc`` prints both). On this easy, low-dimensional
target importance sampling is the cheaper of the two; CREPE's draws at level 0 are unweighted
and it keeps improving with more rounds at a fixed memory.

Sources: the CREPE method and the path-measure view (forward–backward RND, Nelson's relation,
steering with path RNDs, replica exchange across diffusion levels) as presented in the lecture
slides of J. He ("Introduction to diffusion models and probabilistic inference
with path measures", 2025); S. Syed et al., "Non-reversible parallel tempering", JRSS B 84
(2022) (DEO swaps, schedule adaptation).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pathsmc._deprecation import renamed_argument
from pathsmc.diffusion import DiffusionModel, ReverseEM, model_exponents
from pathsmc.progress import progress_bar
from pathsmc.tempering_schedule import optimal_schedule

__all__ = ["CREPE", "CREPEResult", "crepe", "default_times", "path_swap_log_ratio"]

_SWAPS = ("deo", "seo")
_WEIGHTINGS = ("path", "density")
_LOG_2PI = math.log(2.0 * math.pi)


def path_swap_log_ratio(
    delta_down: torch.Tensor,
    delta_up: torch.Tensor,
    potential_lower: torch.Tensor | None = None,
    potential_upper: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log acceptance ratio of a CREPE swap of levels (k, k+1) (see the module docstring).

    Args:
        delta_down: ``Δ(w)``, the summed :func:`pathsmc.ops.em_step` weights of the denoising
            path from ``x_{k+1}`` down to ``t_k``.
        delta_up: ``Δ(z)``, the same weights evaluated on the noising path from ``x_k`` up to
            ``t_{k+1}``.
        potential_lower: ``φ_{t_k}(w_0) − φ_{t_k}(x_k)``, the change of the lower level's
            potential (the reward r_t; with ``weighting="density"`` also ``Σ_j β_j log p_{j,t}``).
        potential_upper: ``φ_{t_{k+1}}(z_M) − φ_{t_{k+1}}(x_{k+1})``.

    Returns ``log A = Δ(w) − Δ(z)`` plus the potential changes, the log of ``R(w) / R(z)``.
    """
    out = delta_down - delta_up
    if potential_lower is not None:
        out = out + potential_lower
    if potential_upper is not None:
        out = out + potential_upper
    return out


def _log_normal(x: torch.Tensor, std: float) -> torch.Tensor:
    """``log N(x; 0, std² I)`` summed over the last dim (float64)."""
    z = x.double() / std
    return -0.5 * (z * z).sum(-1) - x.shape[-1] * (math.log(std) + 0.5 * _LOG_2PI)


def _se(per_column: torch.Tensor) -> torch.Tensor:
    """Standard error of the mean over the last dim (independent chains); NaN for one."""
    c = per_column.shape[-1]
    if c < 2:
        return torch.full(per_column.shape[:-1], math.nan, dtype=torch.float64)
    return per_column.double().std(-1) / math.sqrt(c)


def default_times(num_levels: int, schedule: Any) -> list[float]:
    """K level times from 0 to 1, equally spaced in the schedule's log noise-to-signal
    ratio ``log(v(t)/m(t)²)`` between ``t_1`` and 1, with ``t_0 = 0``.

    ``t_1`` is where ``v/m² = 10⁻³`` (noise std about 3 % of the data scale; below it the
    marginals barely change). Uniform spacing in t wastes levels where nothing happens: for
    the default VP schedule the marginals hardly change beyond t ≈ 0.7.
    """
    k = int(num_levels)
    if k < 2:
        raise ValueError(f"num_levels: expected K >= 2, got {num_levels}")
    if k == 2:
        return [0.0, 1.0]
    grid = np.linspace(0.0, 1.0, 20_001)[1:]
    m = np.asarray([float(schedule.mean_coef(float(t))) for t in grid])
    v = np.asarray([float(schedule.variance(float(t))) for t in grid])
    lnsr = np.log(v / (m * m))
    lo = max(lnsr[0], math.log(1e-3))
    goals = np.linspace(lo, lnsr[-1], k - 1)
    ts = np.interp(goals, lnsr, grid)  # lnsr increases with t
    ts[-1] = 1.0
    out = [0.0] + [float(t) for t in ts]
    for i in range(1, k - 1):  # strictly increasing
        out[i] = max(out[i], np.nextafter(out[i - 1], 2.0))
    return out


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class CREPEResult:
    """What :func:`crepe` / :meth:`CREPE.run` return (statistics over the rounds after
    burn-in; CPU tensors, float64 unless stated).

    Shapes: S recorded rounds, B problems, K levels, C chains, D dimensions.

    Attributes:
        samples: level-0 states after every recorded round ``(S, B, C, D)`` — draws from the
            target, autocorrelated along S, independent across the C chains.
        states: final states of every level ``(K, B, C, D)``.
        times: the level times of the recorded rounds ``(K,)`` (a list of floats).
        substeps: EM steps of the path between each pair of adjacent levels ``(K−1,)``.
        swap_accept: Rao–Blackwellized swap acceptance ``E[min(1, A)]`` per pair
            ``(B, K−1)`` over the attempted swaps; ``swap_accept_se`` its batch-means standard
            error over the chains.
        swap_accept_empirical: fraction of attempted swaps accepted ``(B, K−1)``.
        barrier: ``Σ_k (1 − swap_accept)`` ``(B,)``.
        top_accept: acceptance of the top level's redraw ``(B,)`` (1 without ``exact_top`` and
            reward).
        restarts: fresh top-level draws that reached level 0, per chain ``(B, C)`` int64.
        round_trips: draws that then returned to the top, per chain ``(B, C)`` int64.
        rounds: recorded rounds S; burn_in: rounds before them.
        model_calls: calls of the models (a call evaluates the B·C states of one level, or
            the 2·B·C states of both paths of a pair), burn-in and initialization included;
            ``log_prob_calls`` likewise for ``log_prob``.
        model_evals: model evaluations per problem: states evaluated per call and problem,
            summed over the calls (compare with SMC's ``steps × particles``).
        schedules: the level times of each burn-in phase and of the recorded rounds.
        seconds: wall time of the run (the device is read at the end).
        all_samples: every level's states per recorded round ``(S, K, B, C, D)`` when
            ``record_all``, else None.
    """

    samples: torch.Tensor
    states: torch.Tensor
    times: list[float]
    substeps: list[int]
    swap_accept: torch.Tensor
    swap_accept_se: torch.Tensor
    swap_accept_empirical: torch.Tensor
    barrier: torch.Tensor
    top_accept: torch.Tensor
    restarts: torch.Tensor
    round_trips: torch.Tensor
    rounds: int
    burn_in: int
    model_calls: int
    log_prob_calls: int
    model_evals: int
    schedules: list[list[float]] = field(default_factory=list)
    seconds: float = 0.0
    all_samples: torch.Tensor | None = None

    @property
    def rejection(self) -> torch.Tensor:
        """Swap rejection rates ``(B, K−1)``."""
        return 1.0 - self.swap_accept

    def estimate(self, fn: Callable[[torch.Tensor], torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean of ``fn`` at level 0 and its batch-means standard error.

        ``fn`` maps states ``(..., D)`` to ``(..., E)`` (default: the identity). Each chain's
        average over the recorded rounds is one batch; the C chains are independent, so the
        spread of the batches gives the error whatever the autocorrelation within a chain.
        Returns ``(mean (B, E), se (B, E))``.
        """
        v = self.samples.double() if fn is None else fn(self.samples.double())
        per_chain = v.mean(0)  # (B, C, E)
        return per_chain.mean(1), _se(per_chain.transpose(1, 2))

    def summary(self) -> str:
        """A compact text report."""
        k = len(self.times)
        b, c = self.restarts.shape
        lines = [
            f"CREPE: {b} problem(s) × {k} levels × {c} chains, {self.burn_in} burn-in + "
            f"{self.rounds} recorded rounds, {self.model_calls} model calls "
            f"({self.model_evals} state evaluations per problem), {self.seconds:.2f} s",
            "  times     " + " ".join(f"{t:6.3f}" for t in self.times),
            "  swap acc     " + " ".join(f"{a:6.3f}" for a in self.swap_accept.mean(0).tolist()),
            f"  barrier Λ = {self.barrier.mean().item():.3f}, top-level acceptance "
            f"{self.top_accept.mean().item():.3f}, restarts per chain per round "
            f"{self.restarts.double().mean().item() / max(self.rounds, 1):.4f}, round trips "
            f"{self.round_trips.double().mean().item() / max(self.rounds, 1):.4f}",
        ]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the sampler


class CREPE:
    """Replica exchange over diffusion time levels (see the module docstring).

    Args:
        model: a :class:`pathsmc.diffusion.DiffusionModel` or a sequence of them (a product);
            all share the first one's schedule. Only scores are needed (``weighting="path"``);
            ``log_prob`` is used for the top level when every model has it (``exact_top``)
            and for ``weighting="density"``. The model's ``fn(x, t[, condition])`` is called
            with x of shape ``(B, C, D)`` and — the noising and denoising paths of a swap in
            one call — ``(B, 2C, D)``: it must accept any size of dim 1 (broadcast a
            per-problem condition ``(B, ...)`` over it). ``log_prob`` and ``reward`` get
            ``(B, C, D)``.
        beta: the exponent(s) β_j: a float (one model: tempering ``p^β``) or one per model
            (product / classifier-free guidance); default 1 each. Σ_j β_j must be positive.
        reward: optional ``reward(x) -> (B, C)`` log-potential r of the tilt ``exp(r)``; the
            intermediate levels use ``r(x̂_0(x, t))`` with the first model's denoiser.
        weighting: ``"path"`` (default): the marginal ratios of the swap acceptance come from
            the path RND (scores only); ``"density"``: from the models' exact ``log_prob``
            (then the acceptance is exact for any step size; for test targets).
        num_levels: K >= 2 (ignored when ``level_times`` is given).
        level_times: diffusion times of the levels ``(K,)``, strictly increasing from 0 (data)
            to 1 (noise) — the opposite direction of :func:`pathsmc.diffusion.steer`'s time
            grid, hence the distinct name (default :func:`default_times`).
        max_step: the largest EM step (in t) of the paths; the path between ``t_k`` and
            ``t_{k+1}`` takes ``max(substeps, ⌈(t_{k+1} − t_k)/max_step⌉)`` equal steps.
        substeps: the fewest EM steps of a path between adjacent levels.
        particles: C independent CREPE systems per problem (default 64).
        batch: B problems (per-problem conditions go in the models' ``condition`` and in
            ``reward``, which see states ``(B, C, D)``; default 1).
        times, num_chains, num_problems: deprecated names of ``level_times``, ``particles``
            and ``batch``.
        dim: D (default: the first model's ``dim``).
        swap: ``"deo"`` (deterministic even/odd, non-reversible; default) or ``"seo"``
            (random parity).
        exact_top: correct the top-level redraw with the models' ``log_prob`` at t = 1
            (default: when every model has one).
        init: initial states ``(K, B, C, D)``; default: one annealed reverse EM pass from the
            top prior through every level time (no weights).
        dtype: state dtype (default float32, what networks run in; float64 for exact test
            models — the rule of docs/design.md, "Conventions"); log-ratios are float64.
        device: where the states live.
        generator: seeds every draw (paths, top redraws, swap uniforms; SEO parities too).
        ops: the module with ``em_step`` and ``replica_swap`` (default :mod:`pathsmc.ops`;
            :mod:`pathsmc.reference` for pure PyTorch).
    """

    def __init__(
        self,
        model: DiffusionModel | Sequence[DiffusionModel],
        *,
        beta: float | Sequence[float] | None = None,
        reward: Callable[[torch.Tensor], torch.Tensor] | None = None,
        weighting: str = "path",
        num_levels: int = 8,
        level_times: Sequence[float] | None = None,
        max_step: float = 0.01,
        substeps: int = 1,
        particles: int | None = None,
        batch: int | None = None,
        dim: int | None = None,
        swap: str = "deo",
        exact_top: bool | None = None,
        init: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        ops: Any = None,
        times: Sequence[float] | None = None,
        num_chains: int | None = None,
        num_problems: int | None = None,
    ) -> None:
        level_times = renamed_argument("CREPE", "level_times", level_times, "times", times, None)
        num_chains = renamed_argument("CREPE", "particles", particles, "num_chains", num_chains,
                                      64)
        num_problems = renamed_argument("CREPE", "batch", batch, "num_problems", num_problems, 1)
        models = [model] if isinstance(model, DiffusionModel) else list(model)
        if not models or not all(isinstance(m, DiffusionModel) for m in models):
            raise TypeError("model: expected a DiffusionModel or a non-empty sequence of them "
                            "(for a DiffusersModel use pathsmc.crepe.crepe or "
                            "pathsmc.integrations.diffusers_crepe.ChainCREPE)")
        self.models = models
        self.schedule = models[0].schedule
        if any(m.schedule != self.schedule for m in models[1:]):
            raise ValueError("model: every model must use the same schedule")
        betas = model_exponents(beta, len(models))
        if not sum(betas) > 0:
            raise ValueError(f"beta: expected exponents with a positive sum, got {betas}")
        self.betas = betas
        self.beta_sum = sum(betas)
        self.reward = reward
        if weighting not in _WEIGHTINGS:
            raise ValueError(f"weighting: expected one of {_WEIGHTINGS}, got {weighting!r}")
        has_lp = all(m.has_log_prob for m in models)
        if weighting == "density" and not has_lp:
            raise ValueError("weighting 'density': every model needs an exact log_prob")
        self.weighting = weighting
        self.density = weighting == "density"
        # Δ ≡ 0 (path weights, one model, β = 1): the noising path needs no model evaluations
        self.delta_zero = not self.density and len(models) == 1 and betas[0] == 1.0
        # the level potential φ_t: Σ_j β_j log p_{j,t} ("density") plus the reward r_t
        self.has_phi = self.density or reward is not None
        if swap not in _SWAPS:
            raise ValueError(f"swap: expected one of {_SWAPS}, got {swap!r}")
        self.swap = swap
        if int(substeps) < 1 or int(num_chains) < 1 or int(num_problems) < 1:
            raise ValueError("substeps, particles and batch must be >= 1")
        if not 0.0 < float(max_step) <= 1.0:
            raise ValueError(f"max_step: expected 0 < max_step <= 1, got {max_step}")
        self.min_substeps, self.max_step = int(substeps), float(max_step)
        self.C, self.B = int(num_chains), int(num_problems)
        if dim is None:
            dim = models[0].dim
        if dim is None or int(dim) < 1:
            raise ValueError("dim: give the event size D (or build the model with dim=...)")
        self.D = int(dim)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype: expected float32 or float64, got {dtype}")
        self.dtype, self.device = dtype, torch.device(device)
        self.generator = generator
        if ops is None:
            import pathsmc.ops as ops
        self.ops = ops
        if exact_top is None:
            exact_top = has_lp
        elif exact_top and not has_lp:
            raise ValueError("exact_top: every model needs log_prob")
        self.exact_top = bool(exact_top) or self.density
        self.prior_std = float(self.schedule.prior_std)
        self.top_std = self.prior_std / math.sqrt(self.beta_sum)
        seed = generator.initial_seed() if generator is not None else torch.initial_seed()
        self._host_rng = random.Random(seed ^ 0xC4E9E)
        self.model_calls = 0
        self.model_evals = 0
        self.log_prob_calls = 0
        self.round_count = 0
        self.set_times(default_times(num_levels, self.schedule) if level_times is None
                       else level_times)
        k = self.K
        self._check_user_functions()
        if init is None:
            self._init_states()
        else:
            x = init.to(device=self.device, dtype=dtype)
            if tuple(x.shape) != (k, self.B, self.C, self.D):
                raise ValueError(f"init: expected shape ({k}, {self.B}, {self.C}, {self.D}), "
                                 f"got {tuple(init.shape)}")
            self.x = x.clone()
        self.phi = self._level_potentials()
        # replica phase: 0 unknown, 1 fresh from the top, 2 reached level 0 since then
        self.phase = torch.zeros(k, self.B * self.C, dtype=torch.int8, device=self.device)

    # ---- setup ----

    @property
    def K(self) -> int:
        return len(self.times)

    @property
    def substeps(self) -> list[int]:
        """EM steps of the path between each pair of adjacent levels ``(K−1,)``."""
        return [len(s) - 1 for s in self._sub]

    def set_times(self, times: Sequence[float]) -> None:
        """Set the level times (K may change only before the states exist) and the EM
        sub-grids of the paths between them. The states stay as they are."""
        ts = [float(t) for t in times]
        if (len(ts) < 2 or ts[0] != 0.0 or ts[-1] != 1.0
                or any(b <= a for a, b in zip(ts, ts[1:], strict=False))):
            raise ValueError("times: expected a strictly increasing grid from 0.0 to 1.0")
        if hasattr(self, "x") and len(ts) != self.x.shape[0]:
            raise ValueError(f"times: the sampler has {self.x.shape[0]} levels, got {len(ts)}")
        self.times = ts
        self._sub = []
        for a, b in zip(ts, ts[1:], strict=False):
            m = max(self.min_substeps, math.ceil((b - a) / self.max_step - 1e-9))
            self._sub.append([a + (b - a) * n / m for n in range(m)] + [b])
        if hasattr(self, "phi"):
            self.phi = self._level_potentials()

    def _init_states(self) -> None:
        """One annealed reverse EM pass from the top prior through every level time."""
        x = self.top_std * torch.randn(self.B, self.C, self.D, dtype=self.dtype,
                                       device=self.device, generator=self.generator)
        levels = [x]
        for j in range(self.K - 2, -1, -1):
            sub = self._sub[j]
            for n in range(len(sub) - 1, 0, -1):
                em = self.schedule.reverse_em(sub[n], sub[n] - sub[n - 1])
                x, _ = self._reverse_step(x, self._scores(x, sub[n]), em, None)
            levels.append(x)
        self.x = torch.stack(levels[::-1]).contiguous()  # (K, B, C, D)

    def _check_user_functions(self) -> None:
        """Call every user function once, up front, at a prior draw and check its output: the
        models with ``(B, C, D)`` and with the stacked pair of paths ``(B, 2C, D)`` (scores
        like x), ``log_prob`` and ``reward`` ``(B, C)``; errors name the function."""
        from pathsmc.user_checks import check_user_output, first_call, function_name

        g = torch.Generator(device=self.device).manual_seed(0)  # leaves the run's streams alone
        x = self.prior_std * torch.randn(self.B, self.C, self.D, dtype=self.dtype,
                                         device=self.device, generator=g)
        t = self.times[-1]
        with torch.no_grad():
            for i, m in enumerate(self.models):
                what = f"model[{i}]" if len(self.models) > 1 else "model"
                name = f"{what} `{function_name(m.fn)}`"
                for y in (x, torch.cat([x, x], 1)):
                    check_user_output(first_call(name, m.score, y, t), name, y.shape,
                                      y.device, "like x (CREPE stacks the two paths of a "
                                      "swap along dim 1)" if y.shape[1] != self.C else "like x")
                if self.density or self.exact_top:
                    name = f"{what}.log_prob `{function_name(m._log_prob)}`"
                    check_user_output(first_call(name, m.log_prob, x, t), name,
                                      (self.B, self.C), x.device)
            if self.reward is not None:
                name = f"reward `{function_name(self.reward)}`"
                check_user_output(first_call(name, self.reward, x), name, (self.B, self.C),
                                  x.device)

    # ---- model evaluations ----

    def _scores(self, x: torch.Tensor, t: float, denoised: bool = False
                ) -> tuple[list[torch.Tensor], torch.Tensor | None] | list[torch.Tensor]:
        """The models' scores at ``(x, t)`` (and the first model's denoised mean from the
        same call when ``denoised``)."""
        self.model_calls += len(self.models)
        self.model_evals += len(self.models) * x.shape[1]
        with torch.no_grad():
            if not denoised:
                return [m.score(x, t).to(x.dtype) for m in self.models]
            s0, x0 = self.models[0].score_and_denoised(x, t)
            scores = [s0] + [m.score(x, t) for m in self.models[1:]]
            return [s.to(x.dtype) for s in scores], x0

    def _potential(self, x: torch.Tensor, t: float, x0: torch.Tensor | None = None
                   ) -> torch.Tensor | None:
        """The level potential ``φ_t(x)`` ``(B, C)`` float64, or None when there is none:
        ``Σ_j β_j log p_{j,t}(x)`` with ``weighting="density"``, plus ``r_t(x)`` (``r(x)`` at
        t = 0, ``r(x̂_0(x, t))`` otherwise; ``x0`` is the denoised mean when known)."""
        if not self.has_phi:
            return None
        out = torch.zeros(x.shape[:-1], dtype=torch.float64, device=x.device)
        with torch.no_grad():
            if self.density:
                for b, m in zip(self.betas, self.models, strict=True):
                    out = out + b * m.log_prob(x, t).double()
                self.log_prob_calls += len(self.models)
            if self.reward is not None:
                if t == 0.0:
                    x0 = x
                elif x0 is None:
                    self.model_calls += 1
                    self.model_evals += x.shape[1]
                    x0 = self.models[0].denoise(x, t)
                out = out + self.reward(x0).double()
        return out

    def _level_potentials(self) -> torch.Tensor | None:
        if not self.has_phi:
            return None
        return torch.stack([self._potential(self.x[k], t) for k, t in enumerate(self.times)])

    def _top_ell(self, x: torch.Tensor, phi: torch.Tensor | None) -> torch.Tensor:
        """``ℓ(x) = log γ_{K−1}(x) − log ρ(x)`` up to a constant, ρ = N(0, σ²/Σβ · I) the
        top proposal: ``Σ_j β_j (log p_{j,1}(x) − log prior(x)) + r_1(x)``, the first term
        only with ``exact_top`` (``(B, C)`` float64)."""
        out = torch.zeros(x.shape[:-1], dtype=torch.float64, device=x.device)
        if phi is not None:
            out = out + phi
        if self.exact_top:
            out = out - self.beta_sum * _log_normal(x, self.prior_std)
            if not self.density:  # φ holds only the reward: add the densities
                with torch.no_grad():
                    for b, m in zip(self.betas, self.models, strict=True):
                        out = out + b * m.log_prob(x, 1.0).double()
                self.log_prob_calls += len(self.models)
        return out

    # ---- paths ----

    def _reverse_step(self, x: torch.Tensor, scores: list[torch.Tensor], em: ReverseEM,
                      logw: torch.Tensor | None, noise: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One annealed reverse EM step ``t → t − h`` and (with ``logw``) its weight:
        Δ_n (``"path"``) or ``log F_n − log G_n`` (``"density"``)."""
        drift = em.drift(x, sum(b * s for b, s in zip(self.betas, scores, strict=True)))
        if logw is None or self.delta_zero:
            x_new, _ = self.ops.em_step(x, drift, None, dt=em.dt, sigma=em.sigma, noise=noise,
                                        generator=self.generator)
            return x_new, logw
        if self.density:
            return self.ops.em_step(x, drift, logw, dt=em.dt, sigma=em.sigma, fwd_coef=1.0,
                                    fwd_linear=em.fwd_linear, noise=noise,
                                    generator=self.generator)
        refs = [em.drift(x, s) for s in scores]
        return self.ops.em_step(x, drift, logw, dt=em.dt, sigma=em.sigma, ref_drifts=refs,
                                ref_coefs=self.betas, fwd_coef=1.0 - self.beta_sum,
                                fwd_linear=em.fwd_linear, noise=noise, generator=self.generator)

    def _pair_paths(self, k: int, x_lo: torch.Tensor, x_hi: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                               torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The two paths of a swap of levels (k, k+1).

        Noise ``x_lo`` up to ``t_{k+1}`` with the forward kernel F (no model needed), then walk
        the sub-grid down: at each ``s_n`` one model call on the pair ``(w_n, z_n)``
        (concatenated along the chains) and one :func:`pathsmc.ops.em_step` that draws the
        denoising step ``w_n → w_{n−1}`` and, for the noising path, evaluates the reverse step
        ``z_n → z_{n−1}`` with the noise that reproduces ``z_{n−1}``; both add their step
        weight. Returns ``(w_0, Δ(w), φ_{t_k}(w_0), z_M, Δ(z), φ_{t_{k+1}}(z_M))`` (the φ's
        None without a level potential).
        """
        sub = self._sub[k]
        m, c = len(sub) - 1, x_lo.shape[1]
        zs = [x_lo]
        for n in range(m):
            em = self.schedule.reverse_em(sub[n + 1], sub[n + 1] - sub[n])
            z, _ = self.ops.em_step(zs[-1], em.fwd_linear * zs[-1], None, dt=em.dt,
                                    sigma=em.sigma, generator=self.generator)
            zs.append(z)
        shape = x_hi.shape[:-1]
        if self.delta_zero:  # Δ ≡ 0: denoise only
            w, x0_z = x_hi, None
            for n in range(m, 0, -1):
                em = self.schedule.reverse_em(sub[n], sub[n] - sub[n - 1])
                w, _ = self._reverse_step(w, self._scores(w, sub[n]), em, None)
            zero = torch.zeros(shape, dtype=torch.float64, device=w.device)
            dw = dz = zero
        else:
            y = x_hi
            delta = torch.zeros(shape[0], 2 * c, dtype=torch.float64, device=x_hi.device)
            x0_z = None
            for n in range(m, 0, -1):
                t = sub[n]
                em = self.schedule.reverse_em(t, t - sub[n - 1])
                y = torch.cat([y[:, :c], zs[n]], 1)  # (w_n, z_n)
                if n == m and self.reward is not None:
                    scores, x0 = self._scores(y, t, denoised=True)
                    x0_z = x0[:, c:]
                else:
                    scores = self._scores(y, t)
                drift = em.drift(y, sum(b * s for b, s in zip(self.betas, scores,
                                                              strict=True)))
                eps_z = (zs[n - 1] - zs[n] - drift[:, c:] * em.dt) / (
                    em.sigma * math.sqrt(em.dt))
                eps_w = torch.randn(y[:, :c].shape, dtype=y.dtype, device=y.device,
                                    generator=self.generator)
                y, delta = self._reverse_step(y, scores, em, delta,
                                              noise=torch.cat([eps_w, eps_z], 1))
            w = y[:, :c]
            dw, dz = delta[:, :c], delta[:, c:]
        z = zs[-1]
        return (w, dw, self._potential(w, sub[0]), z, dz, self._potential(z, sub[-1], x0_z))

    # ---- one round ----

    def _redraw_top(self, acc: dict[str, torch.Tensor]) -> None:
        """Independence MH at the top level with proposal ρ = N(0, σ²/Σβ · I)."""
        k, bc = self.K - 1, self.B * self.C
        x_new = self.top_std * torch.randn(self.B, self.C, self.D, dtype=self.dtype,
                                           device=self.device, generator=self.generator)
        phi_new = self._potential(x_new, 1.0)
        if self.exact_top or self.has_phi:
            phi_old = None if self.phi is None else self.phi[k]
            log_a = self._top_ell(x_new, phi_new) - self._top_ell(self.x[k], phi_old)
            u = torch.rand(log_a.shape, dtype=torch.float64, device=self.device,
                           generator=self.generator)
            accept = torch.log(u) < log_a  # NaN: reject
        else:  # ℓ is constant: every redraw is an exact draw
            accept = torch.ones(self.B, self.C, dtype=torch.bool, device=self.device)
        self.x[k] = torch.where(accept.unsqueeze(-1), x_new, self.x[k])
        if self.phi is not None:
            self.phi[k] = torch.where(accept, phi_new, self.phi[k])
        a = accept.reshape(bc)
        top = self.phase[k]
        acc["trips"] += a & (top == 2)
        self.phase[k] = torch.where(a, torch.ones_like(top), top)
        acc["top"] += a

    def _parity(self) -> int:
        if self.swap == "deo":
            return self.round_count % 2
        return self._host_rng.getrandbits(1)

    def _swap_step(self, acc: dict, attempts: np.ndarray) -> None:
        """Paths for every pair of this round's parity, then one ``replica_swap``."""
        k, b, c, d = self.K, self.B, self.C, self.D
        bc = b * c
        parity = self._parity()
        attempts[parity::2] += 1
        # moved[k]: the state level k receives if its pair swaps (noised up from k−1 or
        # denoised from k+1), stored at the partner's index: replica_swap exchanges them.
        moved = torch.zeros_like(self.x)
        log_ratio = torch.zeros(k - 1, b, c, dtype=torch.float64, device=self.device)
        phi_moved = None if self.phi is None else torch.zeros_like(self.phi)
        for lo in range(parity, k - 1, 2):
            w, dw, phi_w, z, dz, phi_z = self._pair_paths(lo, self.x[lo], self.x[lo + 1])
            moved[lo], moved[lo + 1] = z, w
            if self.phi is None:
                log_ratio[lo] = path_swap_log_ratio(dw, dz)
            else:
                log_ratio[lo] = path_swap_log_ratio(dw, dz, phi_w - self.phi[lo],
                                               phi_z - self.phi[lo + 1])
                phi_moved[lo], phi_moved[lo + 1] = phi_z, phi_w
        lr = log_ratio.view(k - 1, bc)
        states = [moved.view(k, bc, d), self.phase]
        if phi_moved is not None:
            states.append(phi_moved.view(k, bc))
        out, accepted, perm = self.ops.replica_swap(states, lr, parity,
                                                    generator=self.generator)
        swapped = perm != torch.arange(k, device=self.device).unsqueeze(-1)  # (K, BC)
        self.x = torch.where(swapped.view(k, b, c, 1), out[0].view(k, b, c, d), self.x)
        self.phase = out[1]
        if phi_moved is not None:
            self.phi = torch.where(swapped.view(k, b, c), out[2].view(k, b, c), self.phi)
        p0 = self.phase[0]
        acc["restarts"] += p0 == 1
        self.phase[0] = torch.where(p0 == 1, torch.full_like(p0, 2), p0)
        rb = torch.nan_to_num(lr.clamp(max=0.0).exp(), nan=0.0)
        acc["swap_rb"][parity::2] += rb[parity::2]
        acc["swap_acc"] += accepted

    def _new_accumulators(self) -> dict:
        k, bc, dev = self.K, self.B * self.C, self.device
        return {
            "swap_rb": torch.zeros(k - 1, bc, dtype=torch.float64, device=dev),
            "swap_acc": torch.zeros(k - 1, bc, dtype=torch.int64, device=dev),
            "top": torch.zeros(bc, dtype=torch.int64, device=dev),
            "restarts": torch.zeros(bc, dtype=torch.int64, device=dev),
            "trips": torch.zeros(bc, dtype=torch.int64, device=dev),
            "attempts": np.zeros(k - 1, dtype=np.int64),
        }

    def round(self, acc: dict) -> None:
        """One round: redraw the top level, one swap step (device work only)."""
        self._redraw_top(acc)
        self._swap_step(acc, acc["attempts"])
        self.round_count += 1

    # ---- runs ----

    def _rb_rejection(self, acc: dict) -> np.ndarray:
        """Mean swap rejection per pair over the problems and chains ``(K−1,)`` (reads the
        device)."""
        att = np.maximum(acc["attempts"], 1).astype(np.float64)
        rb = acc["swap_rb"].mean(-1).cpu().numpy() / att
        return 1.0 - rb

    def run(self, rounds: int, *, burn_in: int = 0, adapt_times: int = 0,
            record_all: bool = False, progress: bool | None = None) -> CREPEResult:
        """Run ``burn_in`` rounds, then ``rounds`` recorded rounds (a tqdm bar on stderr over
        all of them with ``progress``; default: when stderr is a terminal).

        With ``adapt_times = n > 0`` the burn-in is split into n + 1 equal phases and after
        each of the first n the level times move to equalize the phase's swap rejection rates
        (:func:`pathsmc.tempering_schedule.optimal_schedule` applied to times; the states stay where
        they are and the rest of the burn-in absorbs the change). The recorded rounds run with
        fixed times; nothing is read from the device until they are done.
        """
        rounds, burn_in, adapt_times = int(rounds), int(burn_in), int(adapt_times)
        if rounds < 1 or burn_in < 0 or adapt_times < 0:
            raise ValueError("rounds must be >= 1, burn_in and adapt_times >= 0")
        if adapt_times and burn_in < adapt_times + 1:
            raise ValueError("adapt_times: needs burn_in >= adapt_times + 1 rounds")
        t0 = time.perf_counter()
        schedules: list[list[float]] = []
        phases = adapt_times + 1 if burn_in else 0
        with progress_bar(burn_in + rounds, progress, "crepe") as bar:
            for p in range(phases):
                n = burn_in * (p + 1) // phases - burn_in * p // phases
                acc = self._new_accumulators()
                schedules.append(list(self.times))
                for _ in range(n):
                    self.round(acc)
                    bar.update(1)
                if p < adapt_times:
                    new, _ = optimal_schedule(np.asarray(self.times), self._rb_rejection(acc))
                    self.set_times(new.tolist())
            acc = self._new_accumulators()
            schedules.append(list(self.times))
            samples, every = [], []
            for _ in range(rounds):
                self.round(acc)
                samples.append(self.x[0].clone())
                if record_all:
                    every.append(self.x.clone())
                bar.update(1)
        return self._result(acc, rounds, burn_in, samples, every, schedules,
                            time.perf_counter() - t0)

    def _result(self, acc, rounds, burn_in, samples, every, schedules, seconds) -> CREPEResult:
        k, b, c = self.K, self.B, self.C
        host = {n: t.cpu() for n, t in acc.items() if isinstance(t, torch.Tensor)}
        att = torch.as_tensor(acc["attempts"], dtype=torch.float64).view(k - 1, 1, 1)
        rb = host["swap_rb"].view(k - 1, b, c) / att.clamp_min(1)  # per chain
        rb = torch.where(att > 0, rb, torch.nan)
        swap_accept = rb.mean(-1).T.contiguous()
        att2 = att.view(k - 1, 1)
        emp = host["swap_acc"].view(k - 1, b, c).sum(-1).double() / (att2.clamp_min(1) * c)
        emp = torch.where(att2 > 0, emp, torch.nan)
        return CREPEResult(
            samples=torch.stack(samples).cpu(),
            states=self.x.cpu(),
            times=list(self.times),
            substeps=self.substeps,
            swap_accept=swap_accept,
            swap_accept_se=_se(rb).T.contiguous(),
            swap_accept_empirical=emp.T.contiguous(),
            barrier=(1.0 - swap_accept).sum(-1),
            top_accept=host["top"].view(b, c).double().mean(-1) / rounds,
            restarts=host["restarts"].view(b, c),
            round_trips=host["trips"].view(b, c),
            rounds=rounds, burn_in=burn_in,
            model_calls=self.model_calls, log_prob_calls=self.log_prob_calls,
            model_evals=self.model_evals, schedules=schedules, seconds=seconds,
            all_samples=torch.stack(every).cpu() if every else None,
        )


def crepe(
    model: DiffusionModel | Sequence[DiffusionModel],
    *,
    rounds: int,
    burn_in: int = 0,
    adapt_times: int = 0,
    record_all: bool = False,
    seed: int | None = None,
    progress: bool | None = None,
    **kwargs: Any,
) -> CREPEResult:
    """Run CREPE: build a :class:`CREPE` sampler and :meth:`~CREPE.run` it.

    ``kwargs`` go to :class:`CREPE` (``beta``, ``reward``, ``weighting``, ``num_levels``,
    ``level_times``, ``max_step``, ``substeps``, ``particles``, ``batch``, ``swap``,
    ``exact_top``, ``init``, ``dtype``, ``device``, ``generator``, ``ops``); ``seed`` creates
    ``generator`` on ``device`` when that is not given; ``rounds``, ``burn_in``,
    ``adapt_times``, ``record_all`` and ``progress`` go to :meth:`CREPE.run`. Returns the
    :class:`CREPEResult` of the recorded rounds.

    A :class:`~pathsmc.integrations.diffusers.DiffusersModel` (or a sequence of them) runs
    :class:`~pathsmc.integrations.diffusers_crepe.ChainCREPE` instead: the levels sit on the
    steps of the scheduler's chain (``steps``, ``num_levels`` or ``level_steps``) and the
    paths use its exact Gaussian kernels.
    """
    first = model if not isinstance(model, (list, tuple)) or not model else model[0]
    if getattr(first, "is_discrete_chain", False):  # diffusers: levels on the chain's steps
        from pathsmc.integrations.diffusers_crepe import chain_crepe

        return chain_crepe(model, rounds=rounds, burn_in=burn_in, adapt_times=adapt_times,
                           record_all=record_all, seed=seed, progress=progress, **kwargs)
    if kwargs.get("generator") is None and seed is not None:
        device = torch.device(kwargs.get("device", "cpu"))
        kwargs["generator"] = torch.Generator(device=device).manual_seed(int(seed))
    sampler = CREPE(model, **kwargs)
    return sampler.run(rounds, burn_in=burn_in, adapt_times=adapt_times, record_all=record_all,
                       progress=progress)
