"""Statistical-collapse diagnostics of an SMC run, and the warning category they raise.

A run can finish without an error and still be meaningless: every weight on one particle,
log Ẑ = −inf or NaN, particles killed by non-finite model or reward output. The drivers
(:func:`pathsmc.smc.smc` and so :func:`pathsmc.diffusion.steer`,
:func:`pathsmc.samplers.annealed_smc`) read these diagnostics once at the end of the run,
store them on the result and raise one :class:`CollapseWarning` listing them.

What is checked, per row (rows are usually different problems — prompts, conditions — so
only a run told that its rows are replicates compares them):

- the minimum ESS over the run, and the final ESS, below :data:`COLLAPSE_ESS` particles
  (``min(3, N / 2)``): the estimate then rests on one or two ancestors, and the run-to-run
  spread of log Ẑ is typically of order one nat or more (no per-row error bar can be
  trusted);
- a non-finite log Ẑ (−inf: every particle died; NaN: a NaN weight);
- particles that died (a non-finite log-weight, or non-finite particles) on the way, with
  their count per row.

and, when the rows are replicates of one problem (the same target in every row; ``steer``
decides this for unconditional ``"temper"`` / ``"product"`` runs, ``pathsmc sample`` when no
model has a per-row condition, and ``smc(..., replicates=True)`` says so by hand):

- the spread of log Ẑ across the rows above :data:`SPREAD_LIMIT` nats (its standard
  deviation, over at least :data:`SPREAD_MIN_ROWS` finite rows). Ẑ is unbiased for Z, but
  when log Ẑ spreads by more than about a nat the average of Ẑ over the rows is dominated by
  the few largest, and the typical log Ẑ sits below log Z by sd²/2 (for a log-normal Ẑ) or
  more: neither a row's log Ẑ nor their mean is a meaningful estimate yet.

:func:`replicate_spread` gives the mean, the spread and the standard error over the rows.
"""

from __future__ import annotations

import math
import warnings

import torch

__all__ = ["COLLAPSE_ESS", "SPREAD_LIMIT", "SPREAD_MIN_ROWS", "CollapseWarning",
           "collapse_messages", "replicate_spread", "spread_message", "warn_collapse"]

COLLAPSE_ESS = 3.0  # "a few particles"; capped at N / 2 for tiny populations
SPREAD_LIMIT = 1.0  # nats: sd of log Ẑ over replicate rows beyond which Ẑ is not meaningful
SPREAD_MIN_ROWS = 4  # fewer finite rows give no usable estimate of the spread


class CollapseWarning(UserWarning):
    """An SMC run finished but its weights collapsed (see :mod:`pathsmc.diagnostics`)."""


def ess_floor(n: int) -> float:
    """The ESS below which a row counts as collapsed: ``min(3, N / 2)``."""
    return min(COLLAPSE_ESS, 0.5 * n)


def _rows(mask: torch.Tensor, limit: int = 6) -> str:
    rows = torch.nonzero(mask).flatten().tolist()
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f", … ({len(rows)} rows)" if len(rows) > limit else "")


def collapse_messages(log_z: torch.Tensor, min_ess: torch.Tensor, final_ess: torch.Tensor,
                      dead_particles: torch.Tensor | None, n: int,
                      replicates: bool = False) -> list[str]:
    """The collapse diagnostics of a finished run as short messages (empty: none).

    Args: CPU tensors per row ``(B,)``: ``log_z``, the minimum and the final ESS, the number
    of particles that died (or None); ``n`` the number of particles per row; ``replicates``:
    the rows are replicates of one problem, so the spread of log Ẑ across them is checked too
    (:func:`spread_message`).
    """
    out: list[str] = []
    floor = ess_floor(n)
    lz = log_z.double()
    bad = ~torch.isfinite(lz)
    if bool(bad.any()):
        out.append(f"log Ẑ is not finite in rows {_rows(bad)} (every particle died, or a NaN "
                   "weight)")
    low = (min_ess.double() < floor) & ~bad
    if bool(low.any()):
        out.append(f"ESS fell below {floor:g} of {n} particles in rows {_rows(low)} "
                   f"(lowest {float(min_ess.double().min()):.2f}; final ESS "
                   f"{float(final_ess.double()[low].min()):.2f}): the weights collapsed onto "
                   "a few particles, log Ẑ and the weighted particles are unreliable (more "
                   "particles, a better proposal, or resampling more often)")
    if dead_particles is not None and bool((dead_particles > 0).any()):
        dead = dead_particles > 0
        counts = ", ".join(f"row {r}: {int(dead_particles[r])}"
                           for r in torch.nonzero(dead).flatten().tolist()[:6])
        out.append(f"particles died from non-finite model, reward or weight output "
                   f"({counts}{', …' if int(dead.sum()) > 6 else ''}); check the user "
                   "functions for NaN / inf")
    if replicates:
        spread = spread_message(log_z)
        if spread is not None:
            out.append(spread)
    return out


def spread_message(log_z: torch.Tensor, limit: float = SPREAD_LIMIT) -> str | None:
    """For replicate rows: a message when the standard deviation of the finite log Ẑ across
    the rows exceeds ``limit`` nats (None when it does not, or with fewer than
    :data:`SPREAD_MIN_ROWS` finite rows)."""
    s = replicate_spread(log_z)
    if s["rows"] < SPREAD_MIN_ROWS or not s["sd"] > limit:
        return None
    return (f"log Ẑ spreads by {s['sd']:.2f} nats (sd) across {int(s['rows'])} replicate rows "
            f"(mean {s['mean']:.3f}): above {limit:g} nat the average of Ẑ is dominated by a "
            f"few rows and log Ẑ typically sits below log Z by sd²/2 = {0.5 * s['sd'] ** 2:.2f} "
            "nats or more, so the estimate is not meaningful yet (more "
            "particles, a better proposal, or resampling every step)")


def warn_collapse(where: str, messages: list[str], stacklevel: int = 3) -> None:
    """One :class:`CollapseWarning` listing ``messages`` (nothing when empty)."""
    if messages:
        warnings.warn(f"{where}: " + "; ".join(messages), CollapseWarning, stacklevel=stacklevel)


def replicate_spread(log_z: torch.Tensor) -> dict[str, float]:
    """For rows that are replicates of one problem: the mean of log Ẑ, its standard deviation
    across rows and the standard error of the mean. A spread above about 1 nat means the
    estimate of Z (a mean of exp(log Ẑ)) is dominated by rare rows and not yet meaningful:
    use more particles."""
    lz = log_z.double().flatten().cpu()
    fin = lz[torch.isfinite(lz)]
    if fin.numel() < 2:
        return {"mean": float(fin.mean()) if fin.numel() else math.nan, "sd": math.nan,
                "se": math.nan, "rows": float(fin.numel())}
    sd = float(fin.std())
    return {"mean": float(fin.mean()), "sd": sd, "se": sd / math.sqrt(fin.numel()),
            "rows": float(fin.numel())}
