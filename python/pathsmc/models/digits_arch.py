"""Architectures of the digits models: the denoiser, its DDPM scheduler, the reward classifier.

The configurations here are the ones the shipped weights were trained with
(``tools/train_digits.py``); :mod:`pathsmc.models.digits` loads them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

NUM_CLASSES = 10
NULL_CLASS = 10
"""class label of the unconditional model (classifier-free guidance's null class)."""
IMAGE_SIZE = 8

UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "num_class_embeds": NUM_CLASSES + 1,
}

SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "variance_type": "fixed_small",
}


def build_unet(config: dict[str, Any] | None = None):
    """A randomly initialised ``UNet2DModel`` with the digits configuration."""
    from diffusers import UNet2DModel

    return UNet2DModel(**(config or UNET_CONFIG))


def build_scheduler(config: dict[str, Any] | None = None):
    """The digits model's ``DDPMScheduler``."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**(config or SCHEDULER_CONFIG))


class DigitCNN(nn.Module):
    """Small CNN on 1×8×8 images in [-1, 1]; ``forward`` returns log p(k | x), shape (B, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2),
            nn.SiLU(),
        )
        self.head = nn.Linear(32 * 4 * 4, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x.reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE))
        return torch.log_softmax(self.head(h.flatten(1)), dim=-1)


class LinearJudge(nn.Module):
    """Multinomial logistic regression on the 64 pixels (in [-1, 1]); returns log p(k | x).

    It is the judge: a model of a different kind from the reward CNN, trained separately
    (scikit-learn), so that steering cannot exploit both at once.
    """

    def __init__(self, coef: torch.Tensor, intercept: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("coef", coef.float())
        self.register_buffer("intercept", intercept.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x.reshape(x.shape[0], -1).float() @ self.coef.T + self.intercept
        return torch.log_softmax(logits, dim=-1)
