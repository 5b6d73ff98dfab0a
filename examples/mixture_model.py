"""An example model module for ``pathsmc sample``: a "pretrained" diffusion model as a plain
callable, the way a user's own module would expose one.

The model is the exact score of the demo's 2-D Gaussian mixture
(:func:`pathsmc.targets.default_2d`) diffused under the VP schedule — what a perfectly trained
score network would return — so the targets of the example configs have exact answers
(:func:`exact_log_z`). A real module would load a network here instead, e.g.::

    def score(x, t):                 # x: (B, N, D) on the job's device, t: a float
        return net(x, torch.full(x.shape[:1], t, device=x.device))

    def load(checkpoint):            # a factory: model.path = "my_module:load",
        net = torch.load(checkpoint) #            model.args = { checkpoint = "net.pt" }
        return lambda x, t: net(x, t)

Used by ``examples/steer_reward.toml`` (reward tilting) and ``examples/steer_temper.json``
(tempering p^0.5).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from pathsmc.diffusion import VPSchedule
from pathsmc.targets import GaussianMixture, default_2d

MIXTURE = default_2d()
"""The data distribution p (six Gaussians on a hexagon of radius 4)."""

SCHEDULE = VPSchedule(beta_min=0.1, beta_max=20.0)
"""The schedule the "model was trained with": the config's ``[schedule]`` must match it."""

_ON_DEVICE: dict[str, GaussianMixture] = {}


def _mixture(device: torch.device) -> GaussianMixture:
    key = str(device)
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = MIXTURE.to(device=device)
    return _ON_DEVICE[key]


def score(x: torch.Tensor, t: float) -> torch.Tensor:
    """∇_x log p_t(x) of the diffused mixture at the states ``x`` ``(B, N, 2)`` and time t."""
    return _mixture(x.device).diffused(SCHEDULE, t).score(x).to(x.dtype)


def eps(x: torch.Tensor, t: float) -> torch.Tensor:
    """The same model as an ε-prediction, ``−√v(t) · score`` (``prediction = "eps"``)."""
    _, v = SCHEDULE.marginal(t)
    return -math.sqrt(v) * score(x, t)


def log_prob(x: torch.Tensor, t: float) -> torch.Tensor:
    """The exact ``log p_t(x)`` ``(B, N)`` (``model.log_prob``, for ``weighting = "density"``)."""
    return _mixture(x.device).diffused(SCHEDULE, t).log_prob(x)


def linear_reward(theta: Sequence[float] = (1.0, -0.5)) -> Callable[[torch.Tensor], torch.Tensor]:
    """A factory (``steer.reward_args = { theta = [...] }``): the reward ``r(x) = θ·x``."""
    th = torch.tensor(list(theta), dtype=torch.float64)

    def reward(x: torch.Tensor) -> torch.Tensor:
        return x.double() @ th.to(x.device)

    return reward


def soft_value(theta: Sequence[float] = (1.0, -0.5)):
    """A factory for mode ``"twisted"``: the exact soft value
    ``V_t(x) = log E[exp(θ·X_0) | X_t = x]`` and its gradient, ``value(x, t) -> (V, ∇V)``."""
    th = torch.tensor(list(theta), dtype=torch.float64)

    def value(x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        dg = _mixture(x.device).diffused(SCHEDULE, t)
        _, _, v, g = dg.log_prob_score_value(x, th.to(x.device), grad=True)
        return v, g

    return value


def exact_log_z(theta: Sequence[float] = (1.0, -0.5)) -> float:
    """log Z of the reward-tilted target ``p(x) exp(θ·x) / Z`` (closed form)."""
    return float(MIXTURE.linear_tilt(torch.tensor(list(theta), dtype=torch.float64)).log_z)


def exact_log_z_power(beta: float = 0.5) -> float:
    """log Z of the tempered target ``p(x)^β / Z`` (quadrature on a grid)."""
    return float(MIXTURE.power(beta, points=401).log_z)


if __name__ == "__main__":
    print(f"exact log Z: tilt θ = (1, -0.5): {exact_log_z():.6f}; "
          f"p^0.5: {exact_log_z_power():.6f}")
