"""``pathsmc samplers``: the Boltzmann samplers against exact (or reference) log Z, in one table.

Every target of :mod:`pathsmc.targets` with a known normalizer — many-well (quadrature),
Neal's funnel and the 40-mode mixture (closed form), DW-4 (reference value from long runs,
``bench/reference_values.py``) — is run with adaptive annealed SMC (CESS, MALA moves), its
waste-free variant, and (for the smaller ones) non-reversible parallel tempering. Each row
reports log Ẑ with its Monte Carlo standard error, the exact value, z = error / SE, the target
evaluations per row and the wall time. The SE comes from the B independent rows of one call
(annealed SMC: ``log mean_b Ẑ_b`` and its delta-method SE) or from the C independent chain
columns (PT's stepping stone).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pathsmc.samplers import annealed_smc
from pathsmc.targets import DiagonalGaussian, DoubleWell4, Funnel, GaussianMixture40, ManyWell
from pathsmc.tempering import parallel_tempering

__all__ = ["HEADER", "SamplerRow", "format_sampler_table", "run_sampler_table"]


@dataclass
class SamplerRow:
    """One line of the table."""

    target: str
    method: str
    log_z: float
    se: float
    exact: float
    exact_se: float  # 0 for exact values; the reference's SE for DW-4
    evals: float  # target evaluations per row (PT: per replica, times the levels)
    seconds: float

    @property
    def z(self) -> float:
        """Error in standard errors (the reference's SE included)."""
        return (self.log_z - self.exact) / math.hypot(self.se, self.exact_se)


def _log_mean_z(log_z: torch.Tensor) -> tuple[float, float]:
    """``log mean_b Ẑ_b`` and its delta-method standard error over the rows."""
    lz = log_z.double().cpu()
    b = lz.numel()
    m = torch.logsumexp(lz, 0) - math.log(b)
    return float(m), float(torch.exp(lz - m).std() / math.sqrt(b))


def _targets(device: str) -> list[tuple[str, object, DiagonalGaussian, bool]]:
    """(name, target, reference, run PT) — references wide enough to cover each target."""
    return [
        ("many-well d=32", ManyWell(32), DiagonalGaussian(32, device=device), False),
        ("many-well d=8", ManyWell(8), DiagonalGaussian(8, device=device), True),
        ("funnel d=10", Funnel(), DiagonalGaussian(10, 0.0, 3.0, device=device), False),
        ("40-mode mixture", GaussianMixture40(device=device),
         DiagonalGaussian(2, 0.0, 25.0, device=device), True),
        ("DW-4 (reference)", DoubleWell4(), DiagonalGaussian(8, 0.0, 2.0, device=device), True),
    ]


def run_sampler_table(*, particles: int = 1024, rows: int = 8, seed: int = 0,
                      device: str = "cpu", pt: bool = True,
                      log: Callable[[str], None] | None = None) -> list[SamplerRow]:
    """Run every sampler on every target (see the module docstring); ``log`` gets each line
    as it is done."""
    out: list[SamplerRow] = []

    def gen(k: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed * 1000 + k)

    for i, (name, target, ref, with_pt) in enumerate(_targets(device)):
        exact = float(target.log_z)
        exact_se = float(getattr(target, "log_z_se", 0.0))
        for j, (method, kw) in enumerate((("annealed SMC (CESS, MALA×4)", {}),
                                          ("waste-free SMC", {"waste_free": True}))):
            t0 = time.perf_counter()
            res = annealed_smc(target, particles, rows, reference=ref, generator=gen(10 * i + j),
                               progress=False, **kw)
            lz, se = _log_mean_z(res.log_z)
            out.append(SamplerRow(name, method, lz, se, exact, exact_se,
                                  particles * res.target_evals, time.perf_counter() - t0))
            if log:
                log(_line(out[-1]))
        if pt and with_pt:
            t0 = time.perf_counter()
            r = parallel_tempering(target, ref, rounds=10, num_levels=8, num_chains=64,
                                   adapt_levels=True, level_efficiency=0.9, device=device,
                                   generator=gen(10 * i + 9))
            k = r.betas.shape[1]
            out.append(SamplerRow(name, f"PT (DEO, K={k} from Λ={float(r.barrier[0]):.1f})",
                                  float(r.log_z[0]), float(r.last.log_z_se[0]), exact, exact_se,
                                  64 * r.target_evals * k, time.perf_counter() - t0))
            if log:
                log(_line(out[-1]))
    return out


HEADER = (f"{'target':<18} {'method':<30} {'log Ẑ':>10} {'± se':>8} {'exact':>10} {'z':>6} "
          f"{'evals/row':>10} {'time s':>7}")
"""The table's header line (printed before the rows when they are streamed)."""
_HEADER = HEADER


def _line(r: SamplerRow) -> str:
    exact = f"{r.exact:.4f}" + ("*" if r.exact_se else "")
    return (f"{r.target:<18} {r.method:<30} {r.log_z:>10.4f} {r.se:>8.4f} {exact:>10} "
            f"{r.z:>6.2f} {r.evals:>10.3g} {r.seconds:>7.2f}")


def format_sampler_table(rows: Sequence[SamplerRow]) -> list[str]:
    """The table as lines (header, rows, footnote)."""
    return [HEADER, *(_line(r) for r in rows),
            "  z = (log Ẑ − exact) / se: |z| of several means a bias the SE does not cover "
            "(too few particles for the target: log Ẑ is biased low by O(1/N), and the funnel's "
            "neck is hard for MALA); * reference value from long runs (its SE is included in z); "
            "evals/row: target evaluations (value + gradient) per row of particles, PT: per "
            "chain column over all levels and rounds."]
