"""Annealed SMC for unnormalized densities, vectorized over B independent problems.

Path: the geometric bridge ``π_β ∝ ref^{1−β} · γ^β`` from a normalized Gaussian reference
(β = 0) to the unnormalized target γ (β = 1). One step of a row goes β → β':

1. **Adaptive tempering.** δ = β' − β is chosen per row so that a criterion hits a fraction
   ``target_ess`` of N, by a fixed number of vectorized bisection iterations on the device
   (no host sync):

   - ``"cess"`` (default): the conditional ESS of Zhou, Johansen & Aston (2016),
     ``CESS/N = (Σ_i W_i w_i)² / Σ_i W_i w_i²`` with ``W`` the current normalized weights and
     ``w_i = exp(δ·(log γ − log ref)(x_i))`` the incremental weights. It measures the
     degeneracy added by the step alone and is the consistent criterion when resampling is
     adaptive (weights not uniform before the step).
   - ``"ess"``: the ESS of the incremental weights alone, ``(Σ w_i)² / (N Σ w_i²)``, as in
     BlackJAX's and ``particles``' adaptive tempering, which resample every step (the two
     criteria coincide when the current weights are uniform: use ``threshold=1``
     to get that algorithm exactly).

   Both are non-increasing in δ (with ``u = log γ − log ref``, their log-derivative is
   ``2(E_δ[u] − E_{2δ}[u]) ≤ 0``, E_s under weights ∝ W·e^{s u}), so bisection is valid; it
   runs on log δ over ``[10⁻¹²·(1 − β), 1 − β]`` (uniform relative resolution), and a row whose
   criterion still holds at ``δ = 1 − β`` jumps to β = 1. Choosing β (and the MALA step) from
   the particles makes Ẑ slightly biased, O(1/N); pass a fixed ``schedule`` and
   ``adapt_rate=0`` for the exactly unbiased estimator.
2. **Reweighting** by the incremental weight ``(β' − β)(log γ(x) − log ref(x))``
   (:func:`incremental_log_weight`), accumulated in float64.
3. **Resampling** with :func:`pathsmc.ops.adaptive_resample` (rows with ESS < threshold·N;
   ``threshold >= 1`` resamples every step). Resampled rows reset their weights to
   their running log Ẑ, so ``log Ẑ = logsumexp(logw) − log N`` at the end (docs/design.md).
   (The waste-free variant, below, replaces steps 3 and 4.)
4. **MALA moves** targeting π_β', ``mcmc_steps`` per temperature: the proposal
   ``x' = x + h∇log π_β'(x) + √(2h)·ε`` goes through :func:`pathsmc.ops.em_step` and the
   Metropolis–Hastings correction through :func:`pathsmc.ops.mala_accept`, both with the
   per-row step ``h``: ``em_step(x, drift=∇, dt=h, sigma=√2)`` draws the noise in-kernel.
   After every move each
   row adapts ``log h += adapt_rate · (acceptance − target_accept)`` on the device
   (``target_accept`` = 0.574, the optimal MALA rate of Roberts & Rosenthal 1998).

Termination: a row that reaches β = 1 idles (δ = 0: its weights and log Ẑ no longer change;
its particles keep taking MALA moves at β = 1, which leave the target invariant). Whether every
row has finished is read from the device only every ``check_every`` steps (one sync each; 8 by
default on GPUs, every step on CPU where it is free), so at most ``check_every − 1`` idle steps
are spent after the last row finishes. At step ``max_steps`` every unfinished row jumps to
β = 1 (still a valid, if noisier, estimate; those rows are flagged in
:attr:`AnnealedSMCResult.forced` and a warning is raised).

**Waste-free variant** (``waste_free=True``; Dau & Chopin, "Waste-free sequential Monte Carlo",
JRSS-B 2022). With N = M·P particles (P = ``chain_length``), steps 3–4 become: resample only M
ancestors from the N weighted particles (:func:`pathsmc.ops.resample` with ``num_samples=M``,
every step), run each through a MALA chain of P − 1 moves targeting π_β', and keep *every*
state of every chain (the ancestor and its P − 1 successors) as the new population, laid out
``(B, M, P, …) → (B, N, …)``, equally weighted: each row's log-weights are reset to its running
log Ẑ, so with uniform weights before every step the CESS equals the ESS. A step costs
M·(P − 1) = N·(P − 1)/P target evaluations, about one MALA sweep of the population, where the
standard variant spends N·``mcmc_steps``. Dau & Chopin report the performance insensitive to P
over a wide range as long as M is not too small; the default P is the largest divisor of N that
is at most ``min(64, N // 64)``, else its smallest divisor above 1 (M ≥ 64 for N ≥ 128 with
such a divisor, P = 2 below; P ≤ 64 also bounds the P − 1 sequential moves per step, each over
only B·M particles, which matters on GPUs). The
tempering criterion counts the N correlated chain states as N particles (as ``particles``
does), and the step size adapts after every move of the chains as in the standard variant
(its dependence on the population is an O(1/M) bias of the same kind as above).

Particles: ``states = [x, log γ(x), log ref(x), ∇log γ(x)]`` travel together through
resampling; ∇log ref is recomputed (the reference is a cheap Gaussian). One target evaluation
(value and gradient) per particle per MALA move, plus one at the start
(:attr:`AnnealedSMCResult.target_evals`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from pathsmc import ops
from pathsmc import ops as _fused_ops
from pathsmc._deprecation import renamed_argument
from pathsmc.diagnostics import collapse_messages, warn_collapse
from pathsmc.progress import progress_bar
from pathsmc.smc import dead_rows, weights_from_log_norm
from pathsmc.targets.boltzmann import DiagonalGaussian

__all__ = [
    "AnnealedSMCResult",
    "adapt_log_step",
    "annealed_smc",
    "geometric_mix",
    "incremental_log_weight",
    "mala_step",
    "next_temperature",
]

_SQRT2 = math.sqrt(2.0)
_CRITERIA = ("cess", "ess")


def incremental_log_weight(
    delta: torch.Tensor, log_target: torch.Tensor, log_ref: torch.Tensor
) -> torch.Tensor:
    """``(β' − β)·(log γ(x) − log ref(x))`` per particle: ``delta`` ``(B,)``, the log-densities
    ``(B, N)``; returns ``(B, N)`` (the log of π_β'/π_β up to the normalizers)."""
    return delta.unsqueeze(-1) * (log_target - log_ref)


def _log_criterion(
    delta: torch.Tensor,
    log_target: torch.Tensor,
    log_ref: torch.Tensor,
    log_w_norm: torch.Tensor | None,
) -> torch.Tensor:
    """log(CESS/N) (``log_w_norm`` given) or log(ESS/N) of the incremental weights, ``(B,)``."""
    a = torch.nan_to_num(incremental_log_weight(delta, log_target, log_ref), nan=-math.inf)
    if log_w_norm is None:
        n = a.shape[-1]
        return 2.0 * torch.logsumexp(a, -1) - torch.logsumexp(2.0 * a, -1) - math.log(n)
    return 2.0 * torch.logsumexp(log_w_norm + a, -1) - torch.logsumexp(log_w_norm + 2.0 * a, -1)


def next_temperature(
    beta: torch.Tensor,
    log_target: torch.Tensor,
    log_ref: torch.Tensor,
    logw: torch.Tensor | None = None,
    *,
    target_ess: float = 0.9,
    criterion: str = "cess",
    iterations: int = 24,
    min_fraction: float = 1e-12,
) -> torch.Tensor:
    """The next inverse temperature per row, by vectorized bisection (no host sync).

    Args:
        beta: current β ``(B,)`` float64 in [0, 1].
        log_target, log_ref: ``log γ`` and ``log ref`` at the particles ``(B, N)`` float64.
        logw: current log-weights ``(B, N)`` (needed for ``"cess"``).
        target_ess: the fraction of N the criterion should keep (0 < target_ess < 1).
        criterion: ``"cess"`` or ``"ess"`` (see the module docstring).
        iterations: bisection iterations, on log δ: the relative resolution of δ is
            ``exp(log(1/min_fraction)·2^−iterations)`` − 1 (2e-6 with the defaults).
        min_fraction: the smallest step, as a fraction of ``1 − β`` (keeps a row moving when
            even that step breaks the criterion).

    Returns β' ``(B,)``: 1 where the criterion still holds at β' = 1, otherwise β + δ with δ
    the largest bracket point found that keeps it (at least ``min_fraction·(1 − β)``, so
    β' > β whenever β < 1); exactly 1 for rows already at 1.
    """
    if criterion not in _CRITERIA:
        raise ValueError(f"criterion: expected one of {_CRITERIA}, got {criterion!r}")
    if not 0.0 < target_ess < 1.0:
        raise ValueError(f"target_ess: expected a fraction in (0, 1), got {target_ess}")
    lwn = None
    if criterion == "cess":
        if logw is None:
            raise ValueError("logw: the conditional ESS needs the current log-weights")
        lwn = torch.nan_to_num(ops.normalize(logw)[0].double(), nan=-math.inf)
    log_goal = math.log(target_ess)
    hi0 = (1.0 - beta).clamp_min(0.0)
    full = _log_criterion(hi0, log_target, log_ref, lwn) >= log_goal
    # Geometric bisection on δ ∈ [hi0·min_fraction, hi0]: uniform relative resolution.
    lo, hi = hi0 * min_fraction, hi0
    for _ in range(int(iterations)):
        mid = torch.sqrt(lo * hi)
        good = _log_criterion(mid, log_target, log_ref, lwn) >= log_goal
        lo = torch.where(good, mid, lo)
        hi = torch.where(good, hi, mid)
    delta = torch.where(full, hi0, lo)
    return torch.where(delta >= hi0, torch.ones_like(beta), beta + delta)


@dataclass
class AnnealedSMCResult:
    """What :func:`annealed_smc` returns. Histories have one entry per step taken (T steps,
    the same for every row; a finished row repeats β = 1).

    Attributes:
        particles: final particles ``(B, N, D)``.
        logw: final log-weights ``(B, N)`` float64 (weighted particles of the target).
        log_z: log Ẑ per row ``(B,)`` (−inf for a row whose particles all died).
        betas: β per row ``(T + 1, B)``, starting at 0.
        ess: ESS after each step's reweighting, before its resampling, ``(T, B)``.
        resampled: ``(T, B)`` bool (True every step in waste-free mode).
        accept: mean MALA acceptance rate over the step's moves ``(T, B)``.
        step_size: MALA step size h per row after the step's adaptation ``(T, B)``.
        num_steps: steps each row took to reach β = 1 ``(B,)`` int64.
        forced: rows that were made to jump to β = 1 at ``max_steps`` ``(B,)`` bool.
        target_evals: target (value + gradient) evaluations per particle of the population:
            the run made ``B·N·target_evals`` in all. Standard: ``1 + T·mcmc_steps``;
            waste-free: N at the start plus M·(P − 1) per step, ``1 + T·(P − 1)/P``. Compare
            the variants at equal ``N·target_evals``.
        dead_rows: ``{row: first step at which all its particles were dead}``.
        population: the global N of a distributed run (:func:`pathsmc.distributed.annealed_smc`;
            ``particles`` and ``logw`` are then this rank's), else None.
        warnings: the collapse diagnostics (:mod:`pathsmc.diagnostics`: ESS below a few
            particles, non-finite log Ẑ), also raised as one
            :class:`pathsmc.diagnostics.CollapseWarning`; empty when the run looks sound.
    """

    particles: torch.Tensor
    logw: torch.Tensor
    log_z: torch.Tensor
    betas: torch.Tensor
    ess: torch.Tensor
    resampled: torch.Tensor
    accept: torch.Tensor
    step_size: torch.Tensor
    num_steps: torch.Tensor
    forced: torch.Tensor
    target_evals: float
    dead_rows: dict[int, int] = field(default_factory=dict)
    population: int | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def weights(self) -> torch.Tensor:
        """Normalized weights ``(B, N)`` of the final particles (over all ranks' particles
        when :attr:`population`, the global N of a distributed run, is set)."""
        if self.population is None:
            return ops.normalize(self.logw)[0].exp()
        return weights_from_log_norm(self.logw, self.log_z + math.log(self.population))

    def schedule(self, row: int = 0) -> torch.Tensor:
        """The β schedule of one row, from 0 up to its first β = 1, on the CPU."""
        b = self.betas[:, row].cpu()
        return b[: int(self.num_steps[row]) + 1]

    def summary(self) -> str:
        """A short report: log Ẑ, steps, ESS, acceptance, forced and dead rows."""
        lz = self.log_z.double()
        live = torch.isfinite(lz)
        n = self.logw.shape[-1]
        ns = self.num_steps.double()
        lines = [
            f"annealed SMC: {self.logw.shape[0]} rows × {n} particles, {self.ess.shape[0]} "
            f"steps ({ns.min().item():.0f}–{ns.max().item():.0f} to β = 1), "
            f"{self.target_evals:g} target evaluations per particle",
            f"  log Ẑ: mean {lz[live].mean().item():.4f}, sd {lz[live].std().item():.4f} over "
            f"{int(live.sum())} live rows" if bool(live.any()) else "  log Ẑ: every row died",
            f"  ESS: min {self.ess.double().min().item():.1f}/{n}; resampled "
            f"{self.resampled.sum(0).double().mean().item():.1f} times per row",
            f"  MALA acceptance: mean {self.accept.double().mean().item():.3f}; final step size "
            f"{self.step_size[-1].double().mean().item():.3g}",
        ]
        if bool(self.forced.any()):
            lines.append(f"  FORCED to β = 1 at max_steps: {int(self.forced.sum())} rows")
        if self.dead_rows:
            shown = ", ".join(f"row {r} at step {s}" for r, s in list(self.dead_rows.items())[:8])
            lines.append(f"  DEAD ROWS ({len(self.dead_rows)}): {shown}")
        for w in self.warnings:
            lines.append(f"  WARNING: {w}")
        return "\n".join(lines)


def log_prob_and_grad(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log density float64 (...), gradient (..., D) in x's dtype)`` of an object with
    ``log_prob_and_grad`` or a plain callable returning that pair (the target convention of
    the samplers and of parallel tempering)."""
    f = fn.log_prob_and_grad if hasattr(fn, "log_prob_and_grad") else fn
    lp, g = f(x)
    return lp.to(torch.float64), g.to(x.dtype)


_eval = log_prob_and_grad  # the name used inside this module


def geometric_mix(beta: torch.Tensor, ref: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """``(1 − β)·ref + β·tgt`` (log-densities or gradients of the geometric path), β broadcast
    over the trailing dims. The ends are exact: β = 0 gives ``ref`` even where ``tgt`` is −inf
    (``lerp`` would give NaN there), β = 1 gives ``tgt``."""
    b = beta.to(tgt.dtype).reshape(*beta.shape, *([1] * (tgt.dim() - beta.dim())))
    ref = ref.to(tgt.dtype)
    return torch.where(b == 0, ref, torch.where(b == 1, tgt, torch.lerp(ref, tgt, b)))


def annealed_smc(
    target,
    particles: int,
    batch: int = 1,
    *,
    reference: DiagonalGaussian | None = None,
    criterion: str = "cess",
    target_ess: float = 0.9,
    bisection_iterations: int = 24,
    threshold: float | None = None,
    scheme: str = "systematic",
    mcmc_steps: int | None = None,
    waste_free: bool = False,
    chain_length: int | None = None,
    step_size: float | torch.Tensor | None = None,
    target_accept: float = 0.574,
    adapt_rate: float = 1.0,
    max_steps: int = 1000,
    check_every: int | None = None,
    schedule: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
    desc: str = "annealed smc",
    ops=None,
    resample_threshold: float | None = None,
    replicates: bool = False,
) -> AnnealedSMCResult:
    """Adaptive annealed SMC from ``reference`` to ``target``; log Ẑ per row.

    Args:
        target: any object with ``dim`` and ``log_prob_and_grad(x) -> (log γ (B, N),
            ∇log γ (B, N, D))`` for ``x`` ``(B, N, D)`` (the :mod:`pathsmc.targets.boltzmann`
            targets; a target may differ per row by broadcasting over B).
        particles: N per row.
        batch: B independent rows, each with its own schedule, step size and log Ẑ.
        reference: a normalized :class:`DiagonalGaussian` (default ``N(0, I)``); its mean and
            scale may broadcast per row as ``(B, 1, D)``.
        criterion: ``"cess"`` (default) or ``"ess"``, see the module docstring.
        target_ess: fraction of N the criterion keeps at each step (default 0.9; lower values
            take fewer, larger steps and give noisier log Ẑ per target evaluation).
        bisection_iterations: fixed number of bisection iterations per step.
        threshold: resample a row when its ESS < threshold·N (>= 1: every step; default 0.5).
        scheme: resampling scheme of :func:`pathsmc.ops.adaptive_resample` (waste-free:
            of :func:`pathsmc.ops.resample` drawing the M ancestors).
        mcmc_steps: MALA moves per temperature (default 4; 0: plain annealed importance
            sampling). Waste-free runs make ``chain_length − 1`` moves: leave it unset (or
            equal to that).
        waste_free: the waste-free variant of Dau & Chopin (2022), see the module docstring:
            each step resamples M = N / P ancestors and keeps every state of their MALA chains
            of length P (``threshold`` is then not used: resampling is every step).
        chain_length: P, a divisor of N, at least 2 (waste-free only; default: the largest
            divisor of N that is at most ``min(64, N // 64)``).
        step_size: initial MALA step h, a float or ``(B,)`` (default
            ``0.5 · mean(ref variance) · D^(−1/3)``).
        target_accept: acceptance rate the step-size adaptation aims at.
        adapt_rate: gain of the adaptation of log h (0: fixed step).
        max_steps: at this step every unfinished row jumps to β = 1.
        check_every: read "have all rows finished?" from the device every this many steps
            (default: 1 on CPU, where reading costs nothing, 8 elsewhere).
        schedule: a fixed schedule instead of adaptive tempering: β values ``(T + 1,)`` or
            ``(T + 1, B)``, non-decreasing from 0 to 1 (then ``max_steps = T``). With a fixed
            schedule and ``adapt_rate = 0`` the estimate Ẑ is exactly unbiased.
        dtype: particle dtype (float32 or float64; default float64, the rule for analytic
            targets in docs/design.md, "Conventions"); weights are always float64.
        device: where to run (default: the reference's device).
        generator: seeds the reference draws, the MALA noise and uniforms and the resampling.
        progress: a tqdm bar on stderr (default: when stderr is a terminal).
        desc: the bar's label.
        ops: the population ops: ``normalize``, ``adaptive_resample`` and ``resample``
            (default :mod:`pathsmc.ops`); an object that also has ``next_temperature`` and
            ``log_z`` replaces those steps too, as
            :class:`pathsmc.distributed.DistributedOps` does to run the population across
            ranks (:func:`pathsmc.distributed.annealed_smc`). The MALA moves always use the
            fused ops on the local particles.
        resample_threshold: deprecated name of ``threshold``.
        replicates: the rows are replicates of one target: also warn when log Ẑ spreads
            across them by more than :data:`pathsmc.diagnostics.SPREAD_LIMIT` nats.
    """
    threshold = renamed_argument("annealed_smc", "threshold", threshold,
                                 "resample_threshold", resample_threshold, 0.5)
    ops = _fused_ops if ops is None else ops
    choose_beta = getattr(ops, "next_temperature", next_temperature)
    population_log_z = getattr(ops, "log_z", _log_z)
    if particles < 1 or batch < 1:
        raise ValueError(f"particles and batch must be >= 1, got {particles} and {batch}")
    if criterion not in _CRITERIA:
        raise ValueError(f"criterion: expected one of {_CRITERIA}, got {criterion!r}")
    if not 0.0 < target_ess < 1.0:
        raise ValueError(f"target_ess: expected a fraction in (0, 1), got {target_ess}")
    b, n = int(batch), int(particles)
    p = _chain_length(n, chain_length, waste_free)
    moves = p - 1 if waste_free else (4 if mcmc_steps is None else int(mcmc_steps))
    if waste_free and mcmc_steps is not None and mcmc_steps != moves:
        raise ValueError(f"mcmc_steps: waste-free SMC makes chain_length − 1 = {moves} moves "
                         f"per step, got mcmc_steps = {mcmc_steps} (leave it unset)")
    if max_steps < 1 or (check_every is not None and check_every < 1) or moves < 0:
        raise ValueError("max_steps and check_every must be >= 1 and mcmc_steps >= 0")
    dim = int(target.dim)
    if reference is None:
        reference = DiagonalGaussian(dim, device=device)
    elif reference.dim != dim:
        raise ValueError(f"reference: dim {reference.dim} does not match the target's {dim}")
    if reference.log_z != 0.0:
        raise ValueError("reference: must be normalized (log_z = 0)")
    device = reference.mean.device if device is None else torch.device(device)
    f64 = torch.float64
    if check_every is None:
        check_every = 1 if device.type == "cpu" else 8
    if schedule is not None:
        schedule = torch.as_tensor(schedule, dtype=f64, device=device)
        if schedule.dim() == 1:
            schedule = schedule.unsqueeze(1).expand(-1, b)
        if schedule.dim() != 2 or schedule.shape[1] != b or schedule.shape[0] < 2:
            raise ValueError(f"schedule: expected shape (T + 1,) or (T + 1, {b}) with T >= 1, "
                             f"got {tuple(schedule.shape)}")
        sc = schedule.cpu()
        if not (bool((sc[0] == 0).all()) and bool((sc[-1] == 1).all())
                and bool((sc.diff(dim=0) >= 0).all())):
            raise ValueError("schedule: expected non-decreasing β from 0 to 1 in every row")
        max_steps = schedule.shape[0] - 1

    # ---- initial particles: exact draws from the reference, weights 0 (ref is normalized) ----
    x = reference.sample((b, n), generator=generator).to(device=device, dtype=dtype)
    lt, gt = _eval(target, x)
    lr, _ = _eval(reference, x)
    logw = torch.zeros(b, n, dtype=f64, device=device)
    beta = torch.zeros(b, dtype=f64, device=device)
    if step_size is None:
        var = torch.broadcast_to(reference.variance, (dim,)) if reference.variance.dim() < 2 \
            else reference.variance
        step_size = 0.5 * var.double().mean() * dim ** (-1.0 / 3.0)
    log_h = torch.log(torch.as_tensor(step_size, dtype=f64, device=device)).expand(b).clone()

    betas = torch.zeros(max_steps + 1, b, dtype=f64, device=device)
    ess_h = torch.zeros(max_steps, b, dtype=f64, device=device)
    res_h = torch.zeros(max_steps, b, dtype=torch.bool, device=device)
    acc_h = torch.zeros(max_steps, b, dtype=f64, device=device)
    step_h = torch.zeros(max_steps, b, dtype=f64, device=device)
    forced = torch.zeros(b, dtype=torch.bool, device=device)
    steps = 0
    with progress_bar(max_steps, progress, desc) as bar:
        for k in range(max_steps):
            # 1. next temperature per row (device-side bisection).
            if schedule is not None:
                new_beta = schedule[k + 1]
            else:
                new_beta = choose_beta(beta, lt, lr, logw, target_ess=target_ess,
                                       criterion=criterion, iterations=bisection_iterations)
            if k == max_steps - 1:
                forced = new_beta < 1.0
                new_beta = torch.ones_like(beta)
            delta = new_beta - beta
            # 2. reweight (finished rows: δ = 0, no change even where log γ = −inf).
            inc = incremental_log_weight(delta, lt, lr)
            logw = logw + torch.where(delta.unsqueeze(-1) > 0, inc, torch.zeros_like(inc))
            ess_h[k] = ops.normalize(logw)[2]
            # 3. resample (adaptive, no host sync; waste-free: M = N / P ancestors, every step).
            if waste_free:
                anc = ops.resample(logw, scheme, num_samples=n // p, generator=generator)
                x, lt, lr, gt = (_take(s, anc) for s in (x, lt, lr, gt))
                logw = population_log_z(logw).unsqueeze(-1).expand(b, n).contiguous()
                res_h[k] = True
            else:
                (x, lt, lr, gt), logw, _, res_h[k] = ops.adaptive_resample(
                    [x, lt, lr, gt], logw, threshold=threshold, scheme=scheme,
                    generator=generator)
            beta = new_beta
            betas[k + 1] = beta
            # 4. MALA moves at the new temperature (waste-free: every state of the M chains
            # becomes a particle, (B, M, P, ...) -> (B, N, ...)).
            if moves:
                x, lt, lr, gt, log_h, acc_h[k] = _mala_moves(
                    target, reference, x, lt, lr, gt, beta, log_h, moves,
                    target_accept, adapt_rate, generator, keep_path=waste_free)
            step_h[k] = log_h.exp()
            steps = k + 1
            bar.update(1)
            if steps % check_every == 0 and steps < max_steps:
                bmin = float(beta.min())  # the one host sync, every check_every steps
                bar.set_postfix(beta_min=f"{bmin:.4g}")
                if bmin >= 1.0:
                    break

    betas, ess_h, res_h = betas[: steps + 1], ess_h[:steps], res_h[:steps]
    acc_h, step_h = acc_h[:steps], step_h[:steps]
    reached = betas >= 1.0
    num_steps = torch.where(reached.any(0), reached.double().argmax(0), steps)
    log_z = population_log_z(logw)
    forced_cpu = forced.cpu()
    if bool(forced_cpu.any()):
        warnings.warn(f"annealed_smc: {int(forced_cpu.sum())} of {b} rows had not reached "
                      f"β = 1 after max_steps = {max_steps} and jumped there in one step; "
                      "their log Ẑ is valid but noisy (raise max_steps)", RuntimeWarning,
                      stacklevel=2)
    evals = 1 + steps * moves / p  # B·M·moves evaluations per step, M = N / p
    msgs = []
    if steps > 0:  # one host read of (B,)-sized summaries, after the loop
        msgs = collapse_messages(log_z.cpu(), ess_h.min(0).values.cpu(), ess_h[-1].cpu(), None,
                                 logw.shape[-1], replicates=replicates)
        warn_collapse("annealed_smc", msgs)
    return AnnealedSMCResult(x, logw, log_z, betas, ess_h, res_h, acc_h, step_h, num_steps,
                             forced, evals, dead_rows(ess_h), warnings=msgs)


def _chain_length(n: int, chain_length: int | None, waste_free: bool) -> int:
    """P for waste-free runs (validated or the default), 1 for the standard variant."""
    if not waste_free:
        if chain_length is not None:
            raise ValueError("chain_length: only used with waste_free=True")
        return 1
    if chain_length is None:
        # The largest divisor up to the cap (M = N/P >= 64 ancestors), else the smallest one.
        cap = min(64, max(2, n // 64))
        chain_length = next((q for q in range(cap, 1, -1) if n % q == 0), None) or next(
            (q for q in range(2, n) if n % q == 0), None)
        if chain_length is None:
            raise ValueError(f"chain_length: particles = {n} has no divisor P with "
                             "2 <= P < N for the default; pass chain_length or another N")
    p = int(chain_length)
    if p < 2 or n % p:
        raise ValueError(f"chain_length: expected a divisor P >= 2 of particles = {n}, "
                         f"got {chain_length}")
    return p


def _log_z(logw: torch.Tensor) -> torch.Tensor:
    """The running ``log Ẑ = logsumexp(logw) − log N`` per row (NaN weights are dead)."""
    return torch.logsumexp(torch.nan_to_num(logw, nan=-math.inf), -1) - math.log(logw.shape[-1])


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[b, idx[b, i], ...]``: a ``(B, N, ...)`` state gathered by ``(B, M)`` indices."""
    return torch.take_along_dim(t, idx.reshape(*idx.shape, *([1] * (t.dim() - 2))), dim=1)


def mala_step(target, reference, x, lt, lr, gt, gr, beta, h, generator=None, *, ops=ops):
    """One MALA move of every chain targeting its level ``π_β ∝ ref^{1−β}·γ^β``.

    The proposal ``x' = x + h∇log π_β(x) + √(2h)·ε`` is :func:`pathsmc.ops.em_step` with the
    per-row step (``dt=h, sigma=√2``, noise drawn in-kernel) and the Metropolis–Hastings
    correction :func:`pathsmc.ops.mala_accept`; the cached ``log γ, log ref`` and their
    gradients follow the accepted states. Shared by :func:`annealed_smc` and
    :class:`pathsmc.tempering.ParallelTempering`.

    Args:
        target, reference: objects with ``log_prob_and_grad`` (or callables returning it).
        x: states ``(*rows, C, D)``: any leading row dims (problems; levels × problems), C
            chains per row.
        lt, lr: ``log γ(x)``, ``log ref(x)`` ``(*rows, C)`` float64; gt, gr: their gradients.
        beta, h: inverse temperature and step size per row, ``rows``-shaped; ``h`` float64
            holding values representable in x's dtype (the same h in both ops).
        ops: the module providing ``em_step`` and ``mala_accept`` (pathsmc.reference: pure
            PyTorch).

    Returns ``(x, lt, lr, gt, gr, accepted (*rows, C) bool)``.
    """
    rows = beta.dim()

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *t.shape[rows:])

    logp, grad = geometric_mix(beta, lr, lt), geometric_mix(beta, gr, gt)
    hf = h.reshape(-1)
    x_prop, _ = ops.em_step(flat(x), flat(grad), dt=hf, sigma=_SQRT2, generator=generator)
    x_prop = x_prop.view(x.shape)
    lt_p, gt_p = _eval(target, x_prop)
    lr_p, gr_p = _eval(reference, x_prop)
    x_new, _, _, acc = ops.mala_accept(
        flat(x), flat(x_prop), flat(logp), flat(geometric_mix(beta, lr_p, lt_p)), flat(grad),
        flat(geometric_mix(beta, gr_p, gt_p)), hf, generator=generator)
    acc = acc.view(lt.shape)
    a = acc.unsqueeze(-1)
    return (x_new.view(x.shape), torch.where(acc, lt_p, lt), torch.where(acc, lr_p, lr),
            torch.where(a, gt_p, gt), torch.where(a, gr_p, gr), acc)


def adapt_log_step(log_h: torch.Tensor, rate: torch.Tensor, target_accept: float,
                   adapt_rate: float) -> torch.Tensor:
    """``log h += adapt_rate·(acceptance − target_accept)`` per row, clamped to a sane range
    (on the device, no host read)."""
    return (log_h + adapt_rate * (rate - target_accept)).clamp(-30.0, 10.0)


def _mala_moves(target, reference, x, lt, lr, gt, beta, log_h, moves, target_accept,
                adapt_rate, generator, keep_path=False):
    """``moves`` MALA steps targeting π_β per row; adapts log h per row after each. With
    ``keep_path`` the states returned are every state of the chains, ``(B, M·(moves + 1), ...)``
    in the layout (chain, position along the chain)."""
    b = x.shape[0]
    _, gr = _eval(reference, x)
    acc_sum = torch.zeros(b, dtype=torch.float64, device=x.device)
    path = [(x, lt, lr, gt)] if keep_path else None
    for _ in range(moves):
        h = log_h.exp().to(x.dtype).double()  # the same h (x's precision) in both ops
        x, lt, lr, gt, gr, acc = mala_step(target, reference, x, lt, lr, gt, gr, beta, h,
                                           generator)
        if keep_path:
            path.append((x, lt, lr, gt))
        rate = acc.double().mean(-1)
        acc_sum = acc_sum + rate
        if adapt_rate:
            log_h = adapt_log_step(log_h, rate, target_accept, adapt_rate)
    if keep_path:
        x, lt, lr, gt = (torch.stack(s, 2).flatten(1, 2) for s in zip(*path, strict=True))
    return x, lt, lr, gt, log_h, acc_sum / moves
