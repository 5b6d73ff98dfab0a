"""A denoiser with a known answer: the exact ε-prediction of N(0, I) data.

``ExactGaussianEps(scheduler)`` is called like a diffusers UNet (``net(x, t).sample``) and
returns E[ε | x_t] = √(1 − ᾱ_t) x_t. With DDPM's ``fixed_large`` variance its chain is the exact
time reversal of the noising process (samples are N(0, ᾱ₀ I)), and Tweedie's x̂₀ is the true
posterior mean, so steering on it has closed-form or exact answers (tests, bench/class_sum.py).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

__all__ = ["ExactGaussianEps"]


class ExactGaussianEps(torch.nn.Module):
    """E[ε | x_t] = √(1 − ᾱ_t) x_t for N(0, I) data, with ᾱ from ``scheduler.alphas_cumprod``."""

    def __init__(self, scheduler: Any) -> None:
        super().__init__()
        self.register_buffer("ac", scheduler.alphas_cumprod.clone())

    def forward(self, sample: torch.Tensor, timestep: Any, **kw: Any) -> SimpleNamespace:
        ab = self.ac[int(timestep)].to(sample.dtype)
        return SimpleNamespace(sample=torch.sqrt(1 - ab) * sample)
