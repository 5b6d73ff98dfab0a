"""Ground-truth benchmark targets with exact densities, scores and normalizing constants."""

from pathsmc.targets.gaussian_mixture import (
    DiffusedGaussianMixture,
    GaussianMixture,
    GridTarget,
    Tilt,
    default_2d,
    geometric_product,
    mixture_product,
)

__all__ = [
    "DiffusedGaussianMixture",
    "GaussianMixture",
    "GridTarget",
    "Tilt",
    "default_2d",
    "geometric_product",
    "mixture_product",
]
