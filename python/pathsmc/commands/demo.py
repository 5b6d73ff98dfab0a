"""The main job (``pathsmc demo``): steer a 2-D Gaussian-mixture diffusion model with every
steering mode of :func:`pathsmc.diffusion.steer`, and the reward-tilted mixture with the exact
soft-value twist, each against exact answers.

The "pretrained model" is the exact score of :func:`pathsmc.targets.default_2d` diffused under
the VP schedule, so every target has an exact normalizer: closed form for the linear tilt
``p(x) exp(θ·x)`` and for products of mixtures, grid quadrature for ``p^β`` and for classifier-free
guidance. :func:`steering_cases` lists the cases of the table (reward tilting with the FK
difference / max / sum potentials and with gradient guidance, tempering, products, twisted
guidance, uncorrected guidance); :func:`run_steering_case` runs one of them with the fused ops or
with :mod:`pathsmc.reference` swapped in for every op of the loop (the same code otherwise), and
:func:`plot_mode` draws the particles over the exact target density.

The second part is :func:`run_tilted_smc`, a hand-written loop of the same ops:

- intermediate targets ``γ_t(x) = p_t(x) exp(r_t(x))`` with the exact diffused density ``p_t``
  and a twist with ``r_0(x) = θ·x``: by default the exact soft value
  ``V_t(x) = log E[exp(θ·X_0) | X_t = x]`` (closed form for a mixture; then γ_t is Z times the
  diffused tilted mixture and the weights only correct the discretization), or
  ``θ·E[X_0 | X_t = x]`` (the reward at Tweedie's denoised mean, what a learned model offers);
- particles start from the prior N(0, I) with log-weight ``log γ_1(x) − log N(x; 0, I)``;
- each step t → t' = t − h proposes with the reverse-SDE drift plus the guidance ``β(t) ∇r_t``
  (:func:`pathsmc.ops.em_step`, which adds ``log N_fwd(x | x') − log N_prop(x' | x)`` with the
  forward kernel ``N(x; x' − ½β(t') x' h, β(t) h)``), then adds
  ``log γ_{t'}(x') − log γ_t(x)`` and resamples adaptively (:func:`pathsmc.ops.adaptive_resample`,
  which resets weights to log Ẑ so that ``log Ẑ = logsumexp(logw) − log N`` at the end).

Both run with :mod:`pathsmc.ops` and with :mod:`pathsmc.reference` swapped in, and both are
timed. Batch rows are independent runs (the ``B`` dimension of the ops), so the spread of
log Ẑ and its standard error come from the runs themselves.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from pathsmc.diffusion import DiffusionModel, VPSchedule, steer, time_grid
from pathsmc.targets import GaussianMixture, default_2d, geometric_product, mixture_product

__all__ = [
    "DEFAULT_THETA",
    "STEER_MODES",
    "CaseRun",
    "CaseStats",
    "ExactTarget",
    "TiltedSMCResult",
    "SteerCase",
    "case_stats",
    "format_steering_table",
    "plot_mode",
    "plot_result",
    "run_demo",
    "run_steering_case",
    "run_steering_table",
    "run_tilted_smc",
    "steering_cases",
]

DEFAULT_THETA: tuple[float, float] = (1.0, -0.5)
"""The demo's reward ``θ·x``: moves the mass to the two right-hand components."""

_LOG_2PI = math.log(2.0 * math.pi)

_TWISTS = {
    "value": "exact soft value log E[exp(θ·X_0) | X_t = x] (closed form for the mixture)",
    "tweedie": "θ·E[X_0 | X_t = x] (reward at Tweedie's denoised mean)",
}


@dataclass
class TiltedSMCResult:
    """Output of :func:`run_tilted_smc` (one row per independent run)."""

    log_z: torch.Tensor
    """``(runs,)`` float64: log Ẑ of each run."""
    ess: torch.Tensor
    """``(runs,)``: ESS of the final weights."""
    particles: torch.Tensor
    """``(runs, N, D)``: final particles."""
    logw: torch.Tensor
    """``(runs, N)`` float64: final log-weights."""
    num_resamples: torch.Tensor
    """``(runs,)`` int64: how many steps resampled."""
    min_ess: torch.Tensor
    """``(runs,)``: the smallest ESS seen over the steps (before resampling)."""
    loop_seconds: float
    """Wall time of the whole loop (model evaluations included)."""
    ops_seconds: float
    """Wall time inside the ``em_step`` / ``adaptive_resample`` / ``normalize`` calls."""
    extra: dict[str, Any] = field(default_factory=dict)

    def posterior_mean(self) -> torch.Tensor:
        """Self-normalized weighted mean of the particles, ``(runs, D)``."""
        w = torch.softmax(self.logw, dim=-1)
        return (w.unsqueeze(-1) * self.particles.double()).sum(1)


class _Timer:
    def __init__(self, device: torch.device) -> None:
        self.total = 0.0
        self._cuda = device.type == "cuda"

    def __enter__(self) -> _Timer:
        if self._cuda:
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._cuda:
            torch.cuda.synchronize()
        self.total += time.perf_counter() - self._t0


def _log_normal_std(x: torch.Tensor, std: float) -> torch.Tensor:
    z = x.double() / std
    d = x.shape[-1]
    return -0.5 * (z * z).sum(-1) - d * (math.log(std) + 0.5 * _LOG_2PI)


def run_tilted_smc(
    mixture: GaussianMixture,
    theta: torch.Tensor | tuple[float, ...],
    schedule: VPSchedule | None = None,
    *,
    particles: int = 2048,
    steps: int = 200,
    runs: int = 16,
    ops: ModuleType | Any | None = None,
    twist: str = "value",
    guidance: bool = True,
    threshold: float = 0.5,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    desc: str | None = None,
) -> TiltedSMCResult:
    """SMC from the prior to ``p(x) exp(θ·x) / Z`` along the reverse diffusion of ``mixture``.

    Args:
        mixture: the data distribution p (its exact diffused score is the model).
        theta: reward direction θ, ``(D,)``.
        schedule: noise schedule with ``marginal``, ``reverse_em`` and ``prior_std``
            (default :class:`~pathsmc.diffusion.VPSchedule`).
        particles: N per run.
        steps: number of Euler–Maruyama steps from t = 1 to t = 0.
        runs: independent runs, batched as the B rows of the ops.
        ops: the module providing ``em_step``, ``adaptive_resample`` and ``normalize``
            (default :mod:`pathsmc.ops`; pass :mod:`pathsmc.reference` for the pure-PyTorch
            loop).
        twist: the intermediate potential r_t: ``"value"`` for the exact soft value
            ``log E[exp(θ·X_0) | X_t = x]`` (then ``p_t exp(r_t)`` is Z times the diffused
            tilted mixture and only the discretization is left to weight) or ``"tweedie"`` for
            ``θ·E[X_0 | X_t = x]`` (the reward at the denoised mean, what one has for a
            learned model).
        guidance: add ``∇r_t`` (the gradient of the twist) to the score in the proposal.
        threshold: resample a row when its ESS < threshold·N.
        seed: seed of the generator that draws the prior, the step noise and the resampling.
        device: where the particles live.
        dtype: state dtype (log-weights and the model are float64).
        progress: show a tqdm bar.
        desc: label of the bar.

    Returns:
        :class:`TiltedSMCResult` with log Ẑ, final ESS, particles and weights per run, and timings.
    """
    if twist not in ("tweedie", "value"):
        raise ValueError(f"twist: expected 'tweedie' or 'value', got {twist!r}")
    if ops is None:
        import pathsmc.ops as ops
    schedule = schedule or VPSchedule()
    device = torch.device(device)
    mixture = mixture.to(device=device)
    theta = torch.as_tensor(theta, dtype=torch.float64).to(device)
    d = mixture.dim
    gen = torch.Generator(device=device).manual_seed(int(seed))
    ts = time_grid(steps)

    def stats(x: torch.Tensor, t: float):
        """(log p_t + r_t, score, guidance ∇r_t or None) at x, all float64."""
        dg = mixture.diffused(schedule, t)
        want_grad = guidance and t > 0.0
        if twist == "value":
            lp, score, r, gr = dg.log_prob_score_value(x, theta, grad=want_grad)
        else:
            lp, score, r, gr = dg.log_prob_score_reward(x, theta, grad=want_grad)
        if t == 0.0:
            r = x.double() @ theta  # the reward itself (= either twist at t = 0 up to rounding)
        return lp + r, score, gr

    from tqdm.auto import tqdm

    op_timer = _Timer(device)
    loop_timer = _Timer(device)
    b, n = runs, particles
    with loop_timer:
        x = schedule.prior_std * torch.randn(b, n, d, generator=gen, device=device,
                                             dtype=torch.float64)
        x = x.to(dtype)
        log_gamma, score, gr = stats(x, ts[0])
        logw = log_gamma - _log_normal_std(x, schedule.prior_std)
        n_res = torch.zeros(b, dtype=torch.int64, device=device)
        min_ess = torch.full((b,), float(n), dtype=torch.float64, device=device)
        bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False, file=sys.stderr)
        for i in range(steps):
            t, t_new = ts[i], ts[i + 1]
            em = schedule.reverse_em(t, t - t_new)
            guided = score if gr is None else score + gr
            drift = em.drift(x.double(), guided).to(dtype)
            with op_timer:
                x_new, logw = ops.em_step(x, drift, logw, dt=em.dt, sigma=em.sigma,
                                          fwd_coef=1.0, fwd_linear=em.fwd_linear,
                                          generator=gen)
            log_gamma_new, score, gr = stats(x_new, t_new)
            logw = logw + (log_gamma_new - log_gamma)
            x, log_gamma = x_new, log_gamma_new
            if i + 1 < steps:  # the last weights are kept (log Ẑ and ESS read from them)
                with op_timer:
                    _, _, ess = ops.normalize(logw)
                    states = [x, log_gamma, score] + ([] if gr is None else [gr])
                    states, logw, _, resampled = ops.adaptive_resample(
                        states, logw, threshold=threshold, generator=gen)
                x, log_gamma, score = states[0], states[1], states[2]
                gr = states[3] if gr is not None else None
                n_res += resampled.to(torch.int64)
                min_ess = torch.minimum(min_ess, ess.double())
            bar.update(1)
        bar.close()
        with op_timer:
            _, log_z, ess = ops.normalize(logw)
        min_ess = torch.minimum(min_ess, ess.double())
    return TiltedSMCResult(
        log_z=log_z.double().cpu(), ess=ess.double().cpu(), particles=x.cpu(),
        logw=logw.double().cpu(), num_resamples=n_res.cpu(), min_ess=min_ess.cpu(),
        loop_seconds=loop_timer.total, ops_seconds=op_timer.total,
    )


def plot_result(
    mixture: GaussianMixture,
    tilted: GaussianMixture,
    result: TiltedSMCResult,
    path: Path,
    *,
    theta: torch.Tensor,
    exact_log_z: float,
    seed: int = 0,
) -> Path:
    """Write a PNG: the prior mixture with exact samples, and the SMC particles of the first
    run (resampled by their weights) over the exact tilted density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import pathsmc.ops as ops

    lim = 7.5
    g = torch.linspace(-lim, lim, 300, dtype=torch.float64)
    gx, gy = torch.meshgrid(g, g, indexing="xy")
    grid = torch.stack([gx, gy], -1)
    gen = torch.Generator().manual_seed(seed)
    prior_samples = mixture.sample(result.particles.shape[1], gen)
    anc = ops.resample(result.logw[0], "systematic", generator=gen)
    pts = result.particles[0][anc].double()

    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2), constrained_layout=True)
    panels = [
        (axes[0], mixture, prior_samples, "C0", "model p(x): exact samples"),
        (axes[1], tilted, pts, "C3", "p(x)·exp(θ·x)/Z: SMC particles (run 1)"),
    ]
    for ax, mix, xy, color, title in panels:
        dens = mix.log_prob(grid).exp()
        ax.contourf(gx.numpy(), gy.numpy(), dens.numpy(), levels=14, cmap="Greys")
        ax.scatter(xy[:, 0].numpy(), xy[:, 1].numpy(), s=3, alpha=0.35, color=color,
                   linewidths=0)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=10)
    th = theta.double().cpu()
    axes[1].annotate("", xy=(th[0] * 2.0, th[1] * 2.0), xytext=(0.0, 0.0),
                     arrowprops={"arrowstyle": "->", "color": "C1", "lw": 2})
    axes[1].text(th[0] * 2.0, th[1] * 2.0 - 0.6, "θ", color="C1", fontsize=12)
    sd = float(result.log_z.std()) if result.log_z.numel() > 1 else float("nan")
    fig.suptitle(f"pathsmc demo: log Ẑ = {float(result.log_z.mean()):.4f} ± {sd:.4f} "
                 f"(exact log Z = {exact_log_z:.4f})", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Every steering mode of pathsmc.diffusion.steer against exact answers
# ---------------------------------------------------------------------------------------------

STEER_MODES: tuple[str, ...] = ("reward", "temper", "product", "twisted", "uncorrected")
"""The modes of :func:`pathsmc.diffusion.steer`, in the order of the demo's table."""

TEMPER_BETA = 0.5
"""The demo's tempering exponent: ``p^β`` with β = 0.5 (a flatter mixture)."""

CFG_CLASS: tuple[int, ...] = (3, 4)
"""Components of :func:`~pathsmc.targets.default_2d` that make the demo's "class" ``p_c`` for
classifier-free guidance (the two on the right)."""

CFG_WEIGHT = 2.0
"""The guidance weight w of the CFG row: target ``p_c^w p^{1−w}`` (β = (w, 1 − w))."""

EXPERT = GaussianMixture(torch.ones(1), torch.tensor([[2.0, -1.0]]), torch.tensor([[4.0, 4.0]]))
"""A broad Gaussian "expert" q: the product row samples ``p(x) q(x) / Z``."""

_GRID_BOX = ([-9.0, -9.0], [9.0, 9.0])


@dataclass
class ExactTarget:
    """The exact answers of one case (all on the CPU, float64)."""

    label: str
    """The target, in words (figure titles)."""
    log_z: float
    """Its exact log-normalizer (what log Ẑ estimates)."""
    mean: torch.Tensor
    """Its mean ``(D,)``."""
    log_prob: Callable[[torch.Tensor], torch.Tensor]
    """Its normalized log-density at ``(..., D)`` points (for the figures)."""


@dataclass
class SteerCase:
    """One row of the demo's table: a call of :func:`pathsmc.diffusion.steer`."""

    mode: str
    """The :func:`~pathsmc.diffusion.steer` mode."""
    variant: str
    """What distinguishes the row (potential, guidance, target), in a few words."""
    weighting: str
    """``"path"`` (path-RND weights), ``"density"`` (exact intermediate densities) or
    ``"none"`` (uncorrected: no weights, no resampling)."""
    target: ExactTarget
    """The exact answers (for ``"uncorrected"``: the target its guidance aims at)."""
    model: Any
    """A :class:`~pathsmc.diffusion.DiffusionModel` or a list of them (``"product"``)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """The other keyword arguments of :func:`~pathsmc.diffusion.steer`."""

    @property
    def weighted(self) -> bool:
        """Whether the run carries weights (and log Ẑ)."""
        return self.mode != "uncorrected"


@dataclass
class CaseStats:
    """The numbers of one row: log Ẑ over the independent rows of the run and its spread,
    final ESS, resampling count, posterior-mean error, dead rows."""

    log_z: float
    sd: float
    se: float
    z: float
    ess: float
    resampled: float
    mean_error: float
    dead_rows: int


@dataclass
class CaseRun:
    """A case run with the fused ops and with the pure-PyTorch reference."""

    case: SteerCase
    fused: Any
    """:class:`pathsmc.smc.SMCResult` of the fused run."""
    reference: Any
    """:class:`pathsmc.smc.SMCResult` of the pure-PyTorch run."""
    fused_seconds: float
    reference_seconds: float

    @property
    def stats(self) -> CaseStats:
        """:func:`case_stats` of the fused run."""
        return case_stats(self.case, self.fused)


def steering_cases(
    mixture: GaussianMixture | None = None,
    theta: torch.Tensor | Sequence[float] = DEFAULT_THETA,
    *,
    steps: int = 100,
    device: torch.device | str = "cpu",
    modes: Sequence[str] | None = None,
) -> list[SteerCase]:
    """The demo's cases, one or more per steering mode, each with its exact answer.

    Args:
        mixture: the data distribution p of the model (default :func:`default_2d`; the CFG
            row needs at least five components, products and powers a 2-D mixture).
        theta: the linear reward ``θ·x`` of the reward, twisted and uncorrected rows.
        steps: the run's Euler–Maruyama steps (the max / sum potentials act every steps/4).
        device: where the models evaluate.
        modes: the modes to include (default: all of :data:`STEER_MODES`).

    The models are exact: :meth:`DiffusionModel.from_mixture` gives the diffused score of the
    mixture at every t (and its log-density, which the ``"density"`` rows use).
    """
    modes = list(STEER_MODES if modes is None else modes)
    for m in modes:
        if m not in STEER_MODES:
            raise ValueError(f"modes: expected names from {STEER_MODES}, got {m!r}")
    mixture = default_2d() if mixture is None else mixture
    cpu_mix = mixture.to(device="cpu")
    schedule = VPSchedule()
    dev = torch.device(device)
    mix = mixture.to(device=dev)
    th = torch.as_tensor(theta, dtype=torch.float64).to(dev)
    th_cpu = th.cpu()
    model = DiffusionModel.from_mixture(mix, schedule)

    def reward(x: torch.Tensor) -> torch.Tensor:
        return x.double() @ th

    def soft_value(x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact soft value V_t(x) = log E[exp(θ·X_0) | X_t = x] and ∇V_t."""
        _, _, v, g = mix.diffused(schedule, t).log_prob_score_value(x, th, grad=True)
        return v, g

    def of_mixture(label: str, tilt) -> ExactTarget:
        return ExactTarget(label, float(tilt.log_z), tilt.mixture.mean(), tilt.mixture.log_prob)

    def of_grid(label: str, grid) -> ExactTarget:
        return ExactTarget(label, float(grid.log_z), grid.mean(), grid.log_prob)

    tilted = of_mixture("p(x)·exp(θ·x)/Z", cpu_mix.linear_tilt(th_cpu))
    every = max(1, steps // 4)
    cases: list[SteerCase] = []
    if "reward" in modes:
        cases += [
            SteerCase("reward", "FK difference, r(E[X₀|x])", "path", tilted, model,
                      {"reward": reward}),
            SteerCase("reward", "difference + ∇r guidance", "path", tilted, model,
                      {"reward": reward, "guidance": 1.0}),
            SteerCase("reward", f"FK max, every {every}", "path", tilted, model,
                      {"reward": reward, "potential": "max", "potential_every": every}),
            SteerCase("reward", f"FK sum, every {every}", "path", tilted, model,
                      {"reward": reward, "potential": "sum", "potential_every": every}),
        ]
    if "temper" in modes:
        power = cpu_mix.power(TEMPER_BETA, points=401)
        cases.append(SteerCase("temper", f"p^{TEMPER_BETA:g}, annealed score", "path",
                               of_grid(f"p(x)^{TEMPER_BETA:g}/Z", power), model,
                               {"beta": TEMPER_BETA}))
    if "product" in modes:
        expert = EXPERT.to(device=dev)
        cases.append(SteerCase(
            "product", "experts p·q", "path",
            of_mixture("p(x)·q(x)/Z", mixture_product([cpu_mix, EXPERT])),
            [model, DiffusionModel.from_mixture(expert, schedule)], {"beta": [1.0, 1.0]}))
        idx = torch.tensor(CFG_CLASS)
        p_c = GaussianMixture(cpu_mix.weights[idx], cpu_mix.means[idx], cpu_mix.covs[idx])
        w = CFG_WEIGHT
        cfg = geometric_product([p_c, cpu_mix], [w, 1.0 - w], points=401, bounds=_GRID_BOX)
        cases.append(SteerCase(
            "product", f"CFG w={w:g}: p_c^w p^(1-w)", "path",
            of_grid(f"p_c^{w:g} p^{1 - w:g}/Z", cfg),
            [DiffusionModel.from_mixture(p_c.to(device=dev), schedule), model],
            {"beta": [w, 1.0 - w]}))
    if "twisted" in modes:
        for weighting in ("path", "density"):
            cases.append(SteerCase("twisted", "exact soft value V_t", weighting, tilted, model,
                                   {"value": soft_value, "weighting": weighting}))
    if "uncorrected" in modes:
        cases += [
            SteerCase("uncorrected", "∇r(E[X₀|x]) guidance", "none", tilted, model,
                      {"reward": reward, "guidance": 1.0}),
            SteerCase("uncorrected", "exact ∇V_t guidance (SOC)", "none", tilted, model,
                      {"value": soft_value, "guidance": 1.0}),
        ]
    return cases


def run_steering_case(
    case: SteerCase,
    *,
    particles: int,
    steps: int,
    runs: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    ops: ModuleType | Any | None = None,
    progress: bool = False,
) -> tuple[Any, float]:
    """Run one case (``runs`` independent rows) and time it.

    ``ops`` is the module of every op of the loop — :mod:`pathsmc.ops` (default) or
    :mod:`pathsmc.reference` for the same loop in pure PyTorch. Returns the
    :class:`pathsmc.smc.SMCResult` and the wall time in seconds.
    """
    if ops is None:
        import pathsmc.ops as ops
    timer = _Timer(torch.device(device))
    with timer:
        res = steer(case.model, case.mode, particles=particles, batch=runs, steps=steps,
                    seed=seed, device=device, ops=ops, progress=progress, **case.kwargs)
    return res, timer.total


def case_stats(case: SteerCase, res: Any) -> CaseStats:
    """log Ẑ (mean over rows), its spread and standard error, z = (log Ẑ − log Z) / SE, mean
    final ESS and resampling count, and the distance between the weighted particle mean
    (averaged over rows) and the exact mean."""
    lz = res.log_z.double().cpu()
    w = res.weights.double().cpu().unsqueeze(-1)
    pm = (w * res.particles.double().cpu()).sum(1).mean(0)
    mean_error = float(torch.linalg.vector_norm(pm - case.target.mean.double()))
    ess = float(res.final_ess.double().mean())
    nres = float(res.num_resampled.double().mean())
    if not case.weighted:
        nan = math.nan
        return CaseStats(nan, nan, nan, nan, ess, nres, mean_error, len(res.dead_rows))
    live = lz[torch.isfinite(lz)]
    mean = float(live.mean()) if live.numel() else -math.inf
    sd = float(live.std()) if live.numel() > 1 else math.nan
    se = sd / math.sqrt(live.numel()) if live.numel() > 1 else math.nan
    z = (mean - case.target.log_z) / se if se > 0 else math.nan
    return CaseStats(mean, sd, se, z, ess, nres, mean_error, len(res.dead_rows))


def run_steering_table(
    *,
    particles: int = 1024,
    steps: int = 100,
    runs: int = 16,
    seed: int = 0,
    device: torch.device | str = "cpu",
    modes: Sequence[str] | None = None,
    progress: bool = False,
) -> list[CaseRun]:
    """Every case of :func:`steering_cases`, with the fused ops and with the reference."""
    import pathsmc.ops as ops
    import pathsmc.reference as reference

    cases = steering_cases(steps=steps, device=device, modes=modes)
    for case in cases:  # warm-up: first-call dispatch, autograd, allocator
        for mod in (ops, reference):
            run_steering_case(case, particles=16, steps=2, runs=2, seed=seed, device=device,
                              ops=mod)
    out = []
    for case in cases:
        fused, t_fused = run_steering_case(case, particles=particles, steps=steps, runs=runs,
                                           seed=seed, device=device, ops=ops,
                                           progress=progress)
        ref, t_ref = run_steering_case(case, particles=particles, steps=steps, runs=runs,
                                       seed=seed, device=device, ops=reference,
                                       progress=progress)
        out.append(CaseRun(case, fused, ref, t_fused, t_ref))
    return out


def _num(v: float, width: int, fmt: str) -> str:
    """``v`` right-aligned in ``width`` with the format spec ``fmt`` (e.g. ``".4f"``, ``"+.2f"``);
    an em dash when it is not finite."""
    return f"{'—':>{width}}" if not math.isfinite(v) else f"{format(v, fmt):>{width}}"


def format_steering_table(rows: Sequence[CaseRun]) -> list[str]:
    """The table's lines (header, one line per case)."""
    lines = [
        f"{'mode':<12}{'variant':<28}{'weights':<8}{'log Ẑ':>8} {'sd':>6} {'SE':>6} {'z':>6} "
        f"{'exact':>8} {'ESS':>5} {'#res':>4} {'|Δmean|':>7} {'fused s':>7} {'torch s':>7} "
        f"{'z torch':>7}",
    ]
    for r in rows:
        c, s = r.case, r.stats
        exact = c.target.log_z if c.weighted else math.nan
        z_ref = case_stats(c, r.reference).z
        flag = f"  DEAD ROWS: {s.dead_rows}" if s.dead_rows else ""
        lines.append(
            f"{c.mode:<12}{c.variant:<28}{c.weighting:<8}{_num(s.log_z, 8, '.4f')} "
            f"{_num(s.sd, 6, '.4f')} {_num(s.se, 6, '.4f')} {_num(s.z, 6, '+.2f')} "
            f"{_num(exact, 8, '.4f')} {s.ess:>5.0f} {s.resampled:>4.1f} {s.mean_error:>7.3f} "
            f"{r.fused_seconds:>7.2f} {r.reference_seconds:>7.2f} {_num(z_ref, 7, '+.2f')}{flag}")
    return lines


def plot_mode(mode: str, rows: Sequence[CaseRun], path: Path, *, seed: int = 0) -> Path:
    """Write a PNG with one panel per case of ``mode``: the exact target density (grey) and
    the particles of the first row of the fused run, resampled by their weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import pathsmc.ops as ops

    lim = 7.5
    g = torch.linspace(-lim, lim, 200, dtype=torch.float64)
    gx, gy = torch.meshgrid(g, g, indexing="xy")
    grid = torch.stack([gx, gy], -1)
    gen = torch.Generator().manual_seed(seed)
    fig, axes = plt.subplots(1, len(rows), figsize=(4.6 * len(rows), 4.9), squeeze=False,
                             constrained_layout=True)
    for ax, r in zip(axes[0], rows, strict=True):
        c, s = r.case, r.stats
        dens = c.target.log_prob(grid).exp()
        ax.contourf(gx.numpy(), gy.numpy(), dens.numpy(), levels=14, cmap="Greys")
        logw = r.fused.logw[0].double().cpu()
        anc = ops.resample(logw, "systematic", generator=gen)
        pts = r.fused.particles[0].double().cpu()[anc]
        ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=3, alpha=0.35, color="C3",
                   linewidths=0)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        if c.weighted:
            est = f"log Ẑ = {s.log_z:.3f} ± {s.sd:.3f} (exact {c.target.log_z:.3f})"
        else:
            est = f"no weights; |Δmean| = {s.mean_error:.3f}"
        ax.set_title(f"{mode}: {c.variant} [{c.weighting}]\nexact target {c.target.label}"
                     f"\n{est}", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _fmt_row(name: str, res: TiltedSMCResult, log_z: float, n: int) -> str:
    lz = res.log_z
    runs = lz.numel()
    sd = float(lz.std()) if runs > 1 else math.nan
    se = sd / math.sqrt(runs)
    z = (float(lz.mean()) - log_z) / se if se > 0 else math.nan
    return (f"{name:<18} {float(lz.mean()):>8.4f} {sd:>7.4f} {se:>7.4f} {z:>+6.2f}  "
            f"{float(res.ess.mean()):>5.0f}/{n:<5d} {float(res.min_ess.min()):>5.0f} "
            f"{float(res.num_resamples.double().mean()):>5.1f}  "
            f"{res.loop_seconds:>7.3f} {res.ops_seconds:>7.3f}")


def run_demo(
    *,
    particles: int = 1024,
    steps: int = 100,
    runs: int = 16,
    seed: int = 0,
    device: str = "cpu",
    out: str | Path = "out",
    plot: bool = True,
    progress: bool = True,
    twist: str = "value",
    modes: Sequence[str] | None = None,
    threads: int | None = None,
) -> int:
    """``pathsmc demo``: every steering mode against its exact answer (fused ops and pure
    PyTorch), then the reward-tilted run of :func:`run_tilted_smc`; prints the tables and
    writes one PNG per mode plus ``demo.png``. Returns a process exit code (1 when a run has a
    non-finite log Ẑ or dead rows).

    ``threads`` sets torch's intra-op threads for the run (restored afterwards); results do
    not depend on it.
    """
    import pathsmc.ops as ops
    import pathsmc.reference as reference

    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _run_demo(particles=particles, steps=steps, runs=runs, seed=seed, device=device,
                         out=Path(out), plot=plot, progress=progress and sys.stderr.isatty(),
                         twist=twist, modes=modes, ops=ops, reference=reference)
    finally:
        torch.set_num_threads(saved_threads)


def _run_demo(*, particles: int, steps: int, runs: int, seed: int, device: str, out: Path,
              plot: bool, progress: bool, twist: str, modes: Sequence[str] | None,
              ops: ModuleType, reference: ModuleType) -> int:
    t_start = time.perf_counter()
    mixture = default_2d()
    theta = torch.tensor(DEFAULT_THETA, dtype=torch.float64)
    tilt = mixture.linear_tilt(theta)
    exact_log_z = float(tilt.log_z)
    exact_mean = tilt.mixture.mean()
    written: list[Path] = []

    print(f"pathsmc demo: a 2-D Gaussian mixture (K={mixture.num_components}) as a VP diffusion "
          f"model with its exact score, steered to targets with exact answers;")
    print(f"{runs} independent runs (batched rows) × {particles} particles, {steps} steps, "
          f"device {device}, seed {seed}, {torch.get_num_threads()} thread(s)")

    # ---- 1. every steering mode ----
    rows = run_steering_table(particles=particles, steps=steps, runs=runs, seed=seed,
                              device=device, modes=modes, progress=progress)
    print()
    print("1. pathsmc.diffusion.steer, every mode (reward θ·x with θ = "
          f"{DEFAULT_THETA}; resampling at ESS < N/2):")
    for line in format_steering_table(rows):
        print("  " + line)
    fused_t = sum(r.fused_seconds for r in rows)
    ref_t = sum(r.reference_seconds for r in rows)
    print(f"  log Ẑ: mean over runs; sd: spread over runs; SE = sd/√runs; z = (log Ẑ − exact)/SE; "
          f"ESS: final, mean over runs (of N = {particles}); #res: resampling steps per run;")
    print("  |Δmean|: weighted particle mean (averaged over runs) minus the exact target mean; "
          "fused s / torch s: wall time of the whole loop")
    print("  with pathsmc.ops vs the same loop with every op from pathsmc.reference (pure "
          f"PyTorch): {fused_t:.2f} s vs {ref_t:.2f} s in all "
          f"({ref_t / max(fused_t, 1e-12):.2f}x; most of it is the model);")
    print("  z torch: z of the pure-PyTorch run (other random streams: it should agree "
          "statistically, not exactly).")
    print("  weights 'path': path-RND step weights, exact as h → 0 (an O(h) bias remains; it "
          "shows where sd is tiny, as with the exact twist);")
    print("  'density': the exact intermediate densities p_t (unbiased for any steps); max/sum: "
          "heuristic potentials, same target,")
    print("  heavier-tailed weights (low final ESS); uncorrected: the guided proposal without "
          "weights — biased unless the guidance is exact.")

    # ---- 2. the reward-tilted run with the exact soft-value twist (hand-written loop) ----
    print()
    print(f"2. hand-written loop of the ops (pathsmc.commands.demo.run_tilted_smc): "
          f"p(x)·exp(θ·x)/Z, "
          f"twist r_t: {_TWISTS[twist]},")
    print("   with guidance β(t)∇r_t; resampling at ESS < N/2")
    for mod in (ops, reference):  # warm-up, so that the timings compare the loops
        run_tilted_smc(mixture, theta, particles=64, steps=2, runs=runs, ops=mod, seed=seed,
                       device=device, twist=twist)
    results = {}
    for name, mod in (("pathsmc.ops", ops), ("pathsmc.reference", reference)):
        results[name] = run_tilted_smc(mixture, theta, particles=particles, steps=steps,
                                       runs=runs, ops=mod, seed=seed, device=device,
                                       twist=twist, progress=progress, desc=name)
    print(f"  {'':<18} {'log Ẑ':>8} {'sd':>7} {'SE':>7} {'z':>6}  {'final ESS':>11} "
          f"{'min':>5} {'#res':>5}  {'loop s':>7} {'ops s':>7}")
    for name, res in results.items():
        print("  " + _fmt_row(name, res, exact_log_z, particles))
    print(f"  {'exact log Z':<18} {exact_log_z:>8.4f}")
    fused, ref = results["pathsmc.ops"], results["pathsmc.reference"]
    pm = fused.posterior_mean()
    pm_mean = pm.mean(0)
    pm_se = pm.std(0) / math.sqrt(runs) if runs > 1 else torch.full_like(pm_mean, math.nan)
    print(f"  posterior mean (ops): ({pm_mean[0]:.4f}, {pm_mean[1]:.4f}) ± "
          f"({pm_se[0]:.4f}, {pm_se[1]:.4f}) SE; exact ({exact_mean[0]:.4f}, "
          f"{exact_mean[1]:.4f})")
    print("  min: smallest ESS of any step; ops s: time inside the op calls.")
    print(f"  time: loop {fused.loop_seconds:.3f} s with the fused ops vs {ref.loop_seconds:.3f} "
          f"s with the reference ({ref.loop_seconds / max(fused.loop_seconds, 1e-12):.2f}x); "
          f"inside the op calls {fused.ops_seconds:.3f} s vs {ref.ops_seconds:.3f} s "
          f"({ref.ops_seconds / max(fused.ops_seconds, 1e-12):.2f}x; the rest is the model).")

    if plot:
        for mode in STEER_MODES:
            mode_rows = [r for r in rows if r.case.mode == mode]
            if mode_rows:
                written.append(plot_mode(mode, mode_rows, out / f"demo-{mode}.png", seed=seed))
        written.append(plot_result(mixture, tilt.mixture, fused, out / "demo.png", theta=theta,
                                   exact_log_z=exact_log_z, seed=seed))
        print()
        print("wrote " + ", ".join(str(p) for p in written))
    print(f"total wall time {time.perf_counter() - t_start:.1f} s")
    ok = all(bool(torch.isfinite(r.log_z).all()) for r in results.values())
    ok = ok and all(not r.fused.dead_rows and (not r.case.weighted or
                                               bool(torch.isfinite(r.fused.log_z).all()))
                    for r in rows)
    return 0 if ok else 1
