"""Loaders of the shipped digits models and the data they were trained on.

The weights live next to this file in ``weights/`` and were produced by
``tools/train_digits.py``; nothing is downloaded. Images are 1×8×8 in [-1, 1]
(scikit-learn's ``load_digits`` values 0..16 mapped linearly).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pathsmc.models.digits_arch import (
    NULL_CLASS,
    NUM_CLASSES,
    DigitCNN,
    LinearJudge,
    build_scheduler,
    build_unet,
)

__all__ = [
    "NULL_CLASS",
    "NUM_CLASSES",
    "WEIGHTS_DIR",
    "digits_data",
    "load_digits_model",
    "load_judge_classifier",
    "load_noisy_classifier",
    "load_reward_classifier",
    "training_info",
]

WEIGHTS_DIR = Path(__file__).with_name("weights")
UNET_FILE = "digits_unet.safetensors"
UNET_CONFIG_FILE = "digits_unet.json"
REWARD_FILE = "digits_reward_cnn.safetensors"
JUDGE_FILE = "digits_judge_logreg.safetensors"
NOISY_FILE = "digits_noisy_classifier.safetensors"
INFO_FILE = "digits_training.json"
NOISY_ARCH = {"hidden": 256, "layers": 3, "frequencies": 6}
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def digits_data(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (images (n, 1, 8, 8) float32 in [-1, 1], labels (n,) int64).

    Args:
        split: ``"all"``, ``"train"`` or ``"test"`` (a fixed, stratified 80/20 split; the
            classifiers' reported accuracies are on ``"test"``).
    """
    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    y = torch.tensor(data.target, dtype=torch.int64)
    if split == "all":
        return x, y
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(),
        test_size=TEST_FRACTION,
        random_state=SPLIT_SEED,
        stratify=y.numpy(),
    )
    idx = torch.as_tensor(idx_train if split == "train" else idx_test)
    return x[idx], y[idx]


def _load(name: str, directory: Path = WEIGHTS_DIR) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(directory) / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run tools/train_digits.py to produce it")
    return load_file(str(path))


def load_digits_model(device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """The trained class-conditional digits denoiser and its scheduler.

    Returns:
        ``(unet, scheduler)``: a ``diffusers.UNet2DModel`` (eval mode, ε-prediction,
        ``class_labels`` 0..9 for digits and :data:`NULL_CLASS` for the unconditional model)
        and a fresh ``diffusers.DDPMScheduler`` with the training configuration.
    """
    config = json.loads((WEIGHTS_DIR / UNET_CONFIG_FILE).read_text())
    unet = build_unet(config["unet"])
    unet.load_state_dict(_load(UNET_FILE))
    unet.eval().requires_grad_(False).to(device)
    return unet, build_scheduler(config["scheduler"])


def load_reward_classifier(device: str | torch.device = "cpu") -> DigitCNN:
    """The reward: a small CNN, differentiable, returning log p₁(k | x) of shape (B, 10)."""
    model = DigitCNN()
    model.load_state_dict(_load(REWARD_FILE))
    return model.eval().requires_grad_(False).to(device)


def load_judge_classifier(device: str | torch.device = "cpu") -> LinearJudge:
    """The judge: logistic regression on pixels (trained by scikit-learn), log p₂(k | x)."""
    w = _load(JUDGE_FILE)
    return LinearJudge(w["coef"], w["intercept"]).eval().requires_grad_(False).to(device)


def load_noisy_classifier(device: str | torch.device = "cpu") -> Any:
    """The learned twist for the class rewards: a :class:`~pathsmc.learn.NoisyClassifier`,
    ``log q_θ(k | x_t, t) ≈ log E[p₁(k | X₀) | x_t]`` under the unconditional chain (the soft
    value of ``r_k = log p₁(k | x)``); ``net.twist(classes)`` is a ``value`` for
    ``steer(mode="twisted")``. Fit on 50-step chain paths; ``t`` is continuous, so it serves
    other step counts too."""
    from pathsmc.learn.noisy_classifier import NoisyClassifier

    net = NoisyClassifier(64, NUM_CLASSES, **NOISY_ARCH)
    net.load_state_dict(_load(NOISY_FILE))
    return net.eval().requires_grad_(False).to(device)


def training_info() -> dict[str, Any]:
    """What ``tools/train_digits.py`` recorded: steps, time, final loss, held-out accuracies."""
    return json.loads((WEIGHTS_DIR / INFO_FILE).read_text())
