"""Benchmark targets with exact densities and scores and exact (or documented reference) log Z.

- :mod:`~pathsmc.targets.gaussian_mixture`: mixtures with exact diffused scores at every t,
  closed-form tilts, products and powers (grid answers);
- :mod:`~pathsmc.targets.boltzmann`: many-well, funnel, 40-mode mixture (exact log Z);
- :mod:`~pathsmc.targets.double_well`: a 1-D double well and its tempered path (quadrature);
- :mod:`~pathsmc.targets.particle_systems`: DW-4 and LJ-13 (Köhler et al. 2020) with an exact
  Gaussian centre of mass; log Z and observables are documented reference estimates from long
  annealed-SMC runs (bench/reference_values.py), not exact;
- :mod:`~pathsmc.targets.sequence`: a Markov token model with exact soft values (DP).
"""

from pathsmc.targets.boltzmann import (
    BoltzmannTarget,
    DiagonalGaussian,
    Funnel,
    GaussianMixture40,
    ManyWell,
)
from pathsmc.targets.double_well import DoubleWell1D, TemperedPath1D
from pathsmc.targets.gaussian_mixture import (
    DiffusedGaussianMixture,
    GaussianMixture,
    GridTarget,
    Tilt,
    default_2d,
    geometric_product,
    mixture_product,
)
from pathsmc.targets.particle_systems import DoubleWell4, LennardJones13, ParticleSystem
from pathsmc.targets.sequence import MarkovSequence

__all__ = [
    "BoltzmannTarget",
    "DiagonalGaussian",
    "DiffusedGaussianMixture",
    "DoubleWell1D",
    "DoubleWell4",
    "Funnel",
    "GaussianMixture",
    "GaussianMixture40",
    "GridTarget",
    "LennardJones13",
    "ManyWell",
    "MarkovSequence",
    "ParticleSystem",
    "TemperedPath1D",
    "Tilt",
    "default_2d",
    "geometric_product",
    "mixture_product",
]


def __getattr__(name: str):
    """``TwistedSequenceSMC`` and ``twisted_smc`` moved to :mod:`pathsmc.twisted_sequence` (a
    driver); importing them from here still works, lazily, so ``import pathsmc.targets``
    loads no driver."""
    if name in ("TwistedSequenceSMC", "twisted_smc"):
        import warnings

        from pathsmc import twisted_sequence

        warnings.warn(f"pathsmc.targets.{name} moved to pathsmc.twisted_sequence.{name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(twisted_sequence, name)
    raise AttributeError(f"module 'pathsmc.targets' has no attribute {name!r}")
