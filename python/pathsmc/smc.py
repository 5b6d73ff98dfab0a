"""The generic Feynman–Kac SMC driver.

A model says how to start and how to move; the driver does the rest with the fused ops:
adaptive resampling of every state tensor (``adaptive_resample``), ESS and resampling history,
log Ẑ and the dead-row report. The loop never reads a device value: the histories are device
tensors read once at the end.

A model is any object with

- ``num_steps: int``
- ``init(batch, particles, generator) -> (states, logw)``: ``states`` a list of tensors
  ``(B, N, ...)`` (``states[0]`` is what :class:`SMCResult` calls the particles; the others
  are carried along — token sequences, caches, the model's last outputs), ``logw`` ``(B, N)``
  float64, the initial log-weight (target over proposal, potentials included);
- ``step(k, states, logw, generator) -> (states, logw)``: move from step ``k`` to ``k + 1``
  (the proposal) and add the log-weight increment (path-RND weight and potential).

Log-weights carry the evidence (docs/design.md): resampling resets a row's weights to its log Ẑ, so
``log Ẑ = logsumexp(logw) − log N`` after the last step, with no separate accumulator.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from pathsmc import ops as fused_ops
from pathsmc.diagnostics import collapse_messages, replicate_spread, warn_collapse
from pathsmc.progress import progress_bar

__all__ = ["CapturedSMC", "FeynmanKacModel", "SMCResult", "check_run_args", "dead_rows",
           "run_loop", "smc", "weights_from_log_norm"]


class FeynmanKacModel(Protocol):
    """What :func:`smc` needs from a model (see the module docstring)."""

    num_steps: int

    def init(
        self, batch: int, particles: int, generator: torch.Generator | None
    ) -> tuple[list[torch.Tensor], torch.Tensor]: ...

    def step(
        self,
        k: int,
        states: list[torch.Tensor],
        logw: torch.Tensor,
        generator: torch.Generator | None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]: ...


@dataclass
class SMCResult:
    """What an SMC run returns. Histories have one entry per step, after its weighting and
    before its resampling (the last step is never resampled).

    Attributes:
        states: final state tensors ``(B, N, ...)``; ``states[0]`` are the particles.
        logw: final log-weights ``(B, N)``.
        log_z: log Ẑ per row ``(B,)`` (−inf for a row whose particles all died).
        ess: ESS history ``(steps, B)``.
        resampled: resampling history ``(steps, B)`` bool.
        dead_rows: ``{row: first step at which all its particles were dead}``.
        dead_particles: per row ``(B,)`` int64, how many particles died during the run (their
            log-weight or the particles ``states[0]`` became non-finite: NaN / inf model or
            reward output, or a −inf potential); None when the driver does not count them.
        warnings: the collapse diagnostics of the run (:mod:`pathsmc.diagnostics`), also
            raised as one :class:`pathsmc.diagnostics.CollapseWarning` and listed by
            :meth:`summary`; empty when the run looks sound.
    """

    states: list[torch.Tensor]
    logw: torch.Tensor
    log_z: torch.Tensor
    ess: torch.Tensor
    resampled: torch.Tensor
    dead_rows: dict[int, int] = field(default_factory=dict)
    dead_particles: torch.Tensor | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def particles(self) -> torch.Tensor:
        return self.states[0]

    @property
    def weights(self) -> torch.Tensor:
        """Normalized weights ``(B, N)`` of the final particles."""
        return fused_ops.normalize(self.logw)[0].exp()

    @property
    def final_ess(self) -> torch.Tensor:
        return self.ess[-1]

    @property
    def min_ess(self) -> torch.Tensor:
        """The lowest ESS of each row over the run ``(B,)``."""
        return self.ess.min(0).values

    @property
    def num_resampled(self) -> torch.Tensor:
        """How many times each row resampled ``(B,)``."""
        return self.resampled.sum(0)

    def replicate_spread(self) -> dict[str, float]:
        """Mean, standard deviation and standard error of the finite log Ẑ across the rows,
        and their number — meaningful when the rows are replicates of one problem
        (:func:`pathsmc.diagnostics.replicate_spread`)."""
        return replicate_spread(self.log_z)

    def summary(self) -> str:
        """A short report: log Ẑ, final and minimum ESS, resampling count, dead rows."""
        n = self.logw.shape[-1]
        lz = self.log_z.double()
        live = torch.isfinite(lz)
        lines = [
            f"SMC: {self.logw.shape[0]} rows × {n} particles, {self.ess.shape[0]} steps",
            f"  log Ẑ: mean {lz[live].mean().item():.4f}, sd "
            f"{lz[live].std().item() if int(live.sum()) > 1 else math.nan:.4f} over "
            f"{int(live.sum())} live rows" if bool(live.any()) else "  log Ẑ: every row died",
            f"  ESS: final mean {self.final_ess.double().mean().item():.1f}/{n}, "
            f"min {self.ess.double().min().item():.1f}",
            f"  resampled: {self.num_resampled.double().mean().item():.1f} times per row",
        ]
        if self.dead_rows:
            shown = ", ".join(f"row {r} at step {s}" for r, s in list(self.dead_rows.items())[:8])
            lines.append(f"  DEAD ROWS ({len(self.dead_rows)}): {shown}")
        if self.dead_particles is not None and bool((self.dead_particles > 0).any()):
            lines.append(f"  dead particles: {int(self.dead_particles.sum())} in "
                         f"{int((self.dead_particles > 0).sum())} rows")
        for w in self.warnings:
            lines.append(f"  WARNING: {w}")
        return "\n".join(lines)


def _progress(total: int, enabled: bool | None, desc: str):
    # kept for callers outside the package; the drivers use pathsmc.progress.progress_bar
    return progress_bar(total, enabled, desc)


def smc(
    model: FeynmanKacModel,
    particles: int,
    batch: int = 1,
    *,
    threshold: float = 0.5,
    scheme: str = "systematic",
    generator: torch.Generator | None = None,
    progress: bool | None = None,
    desc: str = "smc",
    ops=None,
    cuda_graph: bool = False,
    replicates: bool = False,
) -> SMCResult:
    """Run the Feynman–Kac model with adaptive resampling.

    Args:
        model: see :class:`FeynmanKacModel`.
        particles: N per row.
        batch: B independent rows (problems, prompts, repeats), each with its own log Ẑ.
        threshold: resample a row when its ESS < threshold·N (>= 1: every step; 0: never).
        scheme: ``systematic`` (default), ``stratified``, ``multinomial`` or ``residual``.
        generator: seeds the model's and the resampling's randomness.
        progress: a tqdm bar on stderr (default: when stderr is a terminal).
        desc: the bar's label.
        ops: the module providing ``normalize`` and ``adaptive_resample`` (default
            :mod:`pathsmc.ops`; :mod:`pathsmc.reference` runs the loop in pure PyTorch).
        cuda_graph: capture the whole run (init and every step) in one CUDA graph and replay
            it once (:class:`CapturedSMC`). A single captured run is not faster than an eager
            one (the capture runs the model twice); it checks that the model can be captured.
            For throughput keep a :class:`CapturedSMC` and call its ``run()`` repeatedly. CUDA
            only; no progress bar.
        replicates: the rows are replicates of one problem (the same target in each): also
            warn when log Ẑ spreads across them by more than
            :data:`pathsmc.diagnostics.SPREAD_LIMIT` nats (the estimate is then meaningless).

    Returns:
        :class:`SMCResult`. Collapse (a row's ESS below a few particles, a non-finite log Ẑ,
        particles killed by non-finite output; with ``replicates``, log Ẑ spreading widely
        across the rows) is reported in ``result.warnings``,
        ``result.dead_particles`` and one :class:`pathsmc.diagnostics.CollapseWarning`.
    """
    if cuda_graph:
        return CapturedSMC(model, particles, batch, threshold=threshold, scheme=scheme,
                           generator=generator, ops=ops, replicates=replicates).run()
    ops = fused_ops if ops is None else ops
    steps = check_run_args(model, particles, batch, threshold)
    with progress_bar(steps, progress, desc) as bar:
        out = run_loop(model, particles, batch, steps, threshold, scheme, generator, ops,
                       bar.update)
    result = _result(*out, replicates=replicates)
    warn_collapse(desc, result.warnings)
    return result


def check_run_args(model: FeynmanKacModel, particles: int, batch: int,
                   threshold: float = 0.0) -> int:
    """Check the arguments of an SMC run (errors name the argument); returns the number of
    steps. Shared by :func:`smc`, :class:`CapturedSMC` and :func:`pathsmc.distributed.smc`."""
    if particles < 1 or batch < 1:
        raise ValueError(f"particles and batch must be >= 1, got {particles} and {batch}")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not (
            threshold >= 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold: expected a finite number >= 0 (the ESS fraction below "
                         f"which a row resamples; 0: never, 1: every step), got {threshold!r}")
    steps = int(model.num_steps)
    if steps < 1:
        raise ValueError(f"model.num_steps: expected >= 1, got {steps}")
    return steps


def run_loop(model: FeynmanKacModel, particles: int, batch: int, steps: int, threshold: float,
             scheme: str, generator: torch.Generator | None, ops, tick=None):
    """The SMC loop: device work only, nothing read back (so it can be captured in a graph).
    Shared by :func:`smc`, :class:`CapturedSMC` and :func:`pathsmc.distributed.smc` (whose
    ``ops`` make the population steps global); ``tick(1)`` is called after every step.
    Runs the model's first ``steps`` steps; returns ``(states, logw, ess, resampled, dead)``
    with ``dead`` the number of particles per row that died (see :func:`_dead_now`)."""
    states, logw = model.init(batch, particles, generator)
    states = list(states)
    _check_step_output(states, logw, batch, particles, "init")
    device = logw.device
    ess_hist = torch.empty(steps, batch, dtype=torch.float64, device=device)
    res_hist = torch.zeros(steps, batch, dtype=torch.bool, device=device)
    was_dead = _dead_now(states, logw)
    dead_count = was_dead.sum(-1)
    last = int(model.num_steps)
    for k in range(steps):
        states, logw = model.step(k, states, logw, generator)
        states = list(states)
        if k == 0:
            _check_step_output(states, logw, batch, particles, "step")
        dead = _dead_now(states, logw)
        dead_count = dead_count + (dead & ~was_dead).sum(-1)  # deaths of this step only
        ess_hist[k] = ops.normalize(logw)[2]
        if k + 1 < last and threshold > 0:
            states, logw, _, res_hist[k] = ops.adaptive_resample(
                states, logw, threshold=threshold, scheme=scheme, generator=generator)
            dead = torch.where(res_hist[k].unsqueeze(-1), _dead_now(states, logw), dead)
        was_dead = dead
        if tick is not None:
            tick(1)
    return states, logw, ess_hist, res_hist, dead_count


def _dead_now(states: list[torch.Tensor], logw: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` bool: particles with a non-finite log-weight or non-finite coordinates
    (device work only)."""
    x = states[0]
    dead = ~torch.isfinite(logw)
    if x.is_floating_point():
        dead = dead | ~torch.isfinite(x).reshape(x.shape[0], x.shape[1], -1).all(-1)
    return dead


def _result(states: list[torch.Tensor], logw: torch.Tensor, ess_hist: torch.Tensor,
            res_hist: torch.Tensor, dead: torch.Tensor | None = None, *,
            replicates: bool = False) -> SMCResult:
    """The result with its diagnostics: one host read of the (B,)-sized summaries."""
    n = logw.shape[-1]
    log_z = torch.logsumexp(torch.nan_to_num(logw.double(), nan=-math.inf), -1) - math.log(n)
    rows_dead = dead_rows(ess_hist)
    x = states[0]
    if x.is_floating_point():  # non-finite particles (a weightless run keeps logw = 0)
        bad_x = (~torch.isfinite(x)).reshape(x.shape[0], x.shape[1], -1).any(-1).all(-1)
        log_z = torch.where(bad_x, torch.nan, log_z)
    lz, min_ess, fin_ess = (t.cpu() for t in (log_z, ess_hist.min(0).values, ess_hist[-1]))
    dead_cpu = None if dead is None else dead.cpu()
    msgs = collapse_messages(lz, min_ess, fin_ess, dead_cpu, n, replicates=replicates)
    return SMCResult(states, logw, log_z, ess_hist, res_hist, rows_dead, dead_cpu, msgs)


class CapturedSMC:
    """A whole SMC run — ``model.init`` and every step with its resampling — captured once in
    a CUDA graph; :meth:`run` replays it. Each replay is a fresh, independent run (at replay
    the graph reads the generator's current seed and Philox offset, and advances the offset)
    at the cost of the kernels alone: no Python and no per-kernel launches, which is what
    limits small populations. A one-off capture costs about two eager runs (a warm-up run,
    then the recording), so it pays off from the second or third replay.

    The warm-up is a complete eager run on a side stream, so everything the model creates
    lazily (cuBLAS workspaces, caches of per-time constants, compiled functions) exists
    before the recording starts, for every step. Then one run is recorded without executing.

    Requirements on the model (as for any CUDA graph):

    - its tensors on one CUDA device (the generator's, else the current one);
    - no host reads of device values (``.item()``, ``bool(tensor)``, ``.cpu()``, a Python
      ``if`` on a tensor) and no host-to-device copies (``torch.tensor(..., device="cuda")``)
      in ``init`` / ``step``;
    - the same shapes every run, and no Python-side randomness or counters: the recorded
      kernels and their arguments are replayed as they were;
    - every tensor the model read while being recorded (weights, cached constants) kept alive
      and unchanged while this object is used.

    ``generator`` must be a CUDA generator (or None: the device's default one). The graph keeps
    its memory pool (about one eager run's peak) until this object is deleted.

    Args: as :func:`smc`.
    """

    def __init__(self, model: FeynmanKacModel, particles: int, batch: int = 1, *,
                 threshold: float = 0.5, scheme: str = "systematic",
                 generator: torch.Generator | None = None, ops=None,
                 replicates: bool = False) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("cuda_graph: CUDA graphs need a GPU (none is available)")
        if generator is not None and generator.device.type != "cuda":
            raise ValueError(f"generator: a captured run needs a CUDA generator, got one on "
                             f"{generator.device}")
        self.steps = check_run_args(model, particles, batch, threshold)
        self.replicates = bool(replicates)
        self.device = (generator.device if generator is not None
                       else torch.device("cuda", torch.cuda.current_device()))
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        args = (model, particles, batch, self.steps, threshold, scheme, generator,
                fused_ops if ops is None else ops)
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                _, logw, _, _, _ = run_loop(*args)  # the warm-up: one complete eager run
            torch.cuda.current_stream().wait_stream(side)
            if logw.device != self.device:
                raise ValueError(f"cuda_graph: the model's tensors are on {logw.device}, not "
                                 f"on {self.device} (the generator's or the current device)")
            self.graph = torch.cuda.CUDAGraph()
            if generator is not None:
                self.graph.register_generator_state(generator)
            try:
                with torch.cuda.graph(self.graph):
                    self._out = run_loop(*args)
            except RuntimeError as err:
                raise RuntimeError(
                    "cuda_graph: capturing the SMC run failed; the usual cause is a host sync "
                    "in model.init / model.step (.item(), bool(tensor), .cpu(), a Python if on "
                    "a device value, a host-to-device copy). Original error: " + str(err)
                ) from err

    def run(self) -> SMCResult:
        """Replay the captured run; returns its result (copies, safe across replays)."""
        self.graph.replay()
        states, logw, ess, res, dead = self._out
        return _result([s.clone() for s in states], logw.clone(), ess.clone(), res.clone(),
                       dead.clone(), replicates=self.replicates)


def _check_step_output(states: Sequence[torch.Tensor], logw: torch.Tensor, b: int, n: int,
                       where: str) -> None:
    """Once per run (shapes only; no data is read)."""
    if not states:
        raise ValueError(f"model.{where}: returned no state tensors")
    if tuple(logw.shape) != (b, n):
        raise ValueError(f"model.{where}: logw has shape {tuple(logw.shape)}, expected ({b}, {n})")
    for i, s in enumerate(states):
        if tuple(s.shape[:2]) != (b, n):
            raise ValueError(f"model.{where}: states[{i}] has shape {tuple(s.shape)}, expected "
                             f"({b}, {n}, ...)")


def weights_from_log_norm(logw: torch.Tensor, log_norm: torch.Tensor) -> torch.Tensor:
    """``exp(logw − log_norm)`` per row in float64: weights normalized by a row normalizer
    computed elsewhere (over every rank's particles in a distributed run). NaN weights and
    all-dead rows (``log_norm = −inf``) give 0."""
    lw = torch.nan_to_num(logw.double(), nan=-math.inf)
    norm = log_norm.double().unsqueeze(-1)
    return torch.where(torch.isneginf(norm), 0.0, (lw - norm).exp())


def dead_rows(ess_hist: torch.Tensor) -> dict[int, int]:
    """``{row: first step with ESS 0}`` from an ESS history ``(steps, B)``, read once at the
    end of a run (the drivers' ``dead_rows`` field)."""
    dead = (ess_hist == 0).cpu()
    rows = torch.nonzero(dead.any(0)).flatten().tolist()
    return {r: int(torch.nonzero(dead[:, r])[0, 0]) for r in rows}


# the private names other modules used before these helpers were public
_check_run_args, _run, _dead_rows = check_run_args, run_loop, dead_rows
