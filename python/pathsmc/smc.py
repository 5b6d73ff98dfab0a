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

Log-weights carry the evidence (DESIGN.md): resampling resets a row's weights to its log Ẑ, so
``log Ẑ = logsumexp(logw) − log N`` after the last step, with no separate accumulator.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from pathsmc import ops as fused_ops

__all__ = ["FeynmanKacModel", "SMCResult", "smc"]


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
    """

    states: list[torch.Tensor]
    logw: torch.Tensor
    log_z: torch.Tensor
    ess: torch.Tensor
    resampled: torch.Tensor
    dead_rows: dict[int, int] = field(default_factory=dict)

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
    def num_resampled(self) -> torch.Tensor:
        """How many times each row resampled ``(B,)``."""
        return self.resampled.sum(0)

    def summary(self) -> str:
        """A short report: log Ẑ, final and minimum ESS, resampling count, dead rows."""
        n = self.logw.shape[-1]
        lz = self.log_z.double()
        live = torch.isfinite(lz)
        lines = [
            f"SMC: {self.logw.shape[0]} rows × {n} particles, {self.ess.shape[0]} steps",
            f"  log Ẑ: mean {lz[live].mean().item():.4f}, sd {lz[live].std().item():.4f} over "
            f"{int(live.sum())} live rows" if bool(live.any()) else "  log Ẑ: every row died",
            f"  ESS: final mean {self.final_ess.double().mean().item():.1f}/{n}, "
            f"min {self.ess.double().min().item():.1f}",
            f"  resampled: {self.num_resampled.double().mean().item():.1f} times per row",
        ]
        if self.dead_rows:
            shown = ", ".join(f"row {r} at step {s}" for r, s in list(self.dead_rows.items())[:8])
            lines.append(f"  DEAD ROWS ({len(self.dead_rows)}): {shown}")
        return "\n".join(lines)


def _progress(total: int, enabled: bool | None, desc: str):
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, file=sys.stderr)


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
    """
    ops = fused_ops if ops is None else ops
    if particles < 1 or batch < 1:
        raise ValueError(f"particles and batch must be >= 1, got {particles} and {batch}")
    steps = int(model.num_steps)
    if steps < 1:
        raise ValueError(f"model.num_steps: expected >= 1, got {steps}")
    states, logw = model.init(batch, particles, generator)
    states = list(states)
    _check_step_output(states, logw, batch, particles, "init")
    device = logw.device
    ess_hist = torch.empty(steps, batch, dtype=torch.float64, device=device)
    res_hist = torch.zeros(steps, batch, dtype=torch.bool, device=device)
    with _progress(steps, progress, desc) as bar:
        for k in range(steps):
            states, logw = model.step(k, states, logw, generator)
            states = list(states)
            if k == 0:
                _check_step_output(states, logw, batch, particles, "step")
            ess_hist[k] = ops.normalize(logw)[2]
            if k + 1 < steps and threshold > 0:
                states, logw, _, res_hist[k] = ops.adaptive_resample(
                    states, logw, threshold=threshold, scheme=scheme, generator=generator
                )
            bar.update(1)
    log_z = torch.logsumexp(torch.nan_to_num(logw.double(), nan=-math.inf), -1) - math.log(
        particles
    )
    return SMCResult(states, logw, log_z, ess_hist, res_hist, _dead_rows(ess_hist))


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


def _dead_rows(ess_hist: torch.Tensor) -> dict[int, int]:
    """{row: first step with ESS 0}, read once at the end of the run."""
    dead = (ess_hist == 0).cpu()
    rows = torch.nonzero(dead.any(0)).flatten().tolist()
    return {r: int(torch.nonzero(dead[:, r])[0, 0]) for r in rows}
