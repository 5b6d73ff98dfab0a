"""Ground-truth benchmark targets with exact densities, scores and normalizing constants."""

from pathsmc.targets.gaussian_mixture import (
    DiffusedGaussianMixture,
    GaussianMixture,
    Tilt,
    default_2d,
)

__all__ = ["DiffusedGaussianMixture", "GaussianMixture", "Tilt", "default_2d"]
