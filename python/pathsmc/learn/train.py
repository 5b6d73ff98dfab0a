"""Small training loops for twists: diffusion value networks (path consistency, sub-trajectory
or log-variance, on paths from twisted SMC with the current twist kept in a replay buffer) and
token twists (contrastive twist learning or path consistency)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from pathsmc.learn.contrastive import contrastive_twist_loss
from pathsmc.learn.diffusion_paths import diffusion_log_ratios, sample_diffusion_paths
from pathsmc.learn.log_variance import log_variance_loss, path_log_weights
from pathsmc.learn.path_consistency import path_consistency_loss
from pathsmc.learn.replay import ReplayBuffer
from pathsmc.learn.token_paths import sample_token_paths, token_log_ratios

__all__ = ["train_diffusion_twist", "train_token_twist"]

DIFFUSION_OBJECTIVES = ("path_consistency", "log_variance")
TOKEN_OBJECTIVES = ("ctl", "path_consistency")


def train_diffusion_twist(
    model,
    net,
    reward: Callable[[torch.Tensor], torch.Tensor],
    *,
    objective: str = "path_consistency",
    span: int | None = 1,
    steps: int = 20,
    iterations: int = 200,
    particles: int = 128,
    batch_paths: int = 256,
    refresh: int = 10,
    lr: float = 1e-2,
    guidance: float = 1.0,
    threshold: float = 0.5,
    buffer: ReplayBuffer | None = None,
    generator: torch.Generator | None = None,
    ops: Any = None,
) -> list[float]:
    """Train ``net`` (a :class:`~pathsmc.learn.ValueNetwork`) with Adam; returns the losses.

    Every ``refresh`` iterations, ``particles`` paths of twisted SMC with the current twist
    (on-policy, detached) go into the replay buffer; each iteration draws ``batch_paths``
    paths from it (off-policy) and takes one step on ``objective``: ``"path_consistency"``
    (windows of ``span`` steps; ``None``: whole paths, V_θ at t = 1 playing log Z) or
    ``"log_variance"``. ``ops``: the module whose ``kernel_logpdf`` scores the stored paths
    with gradients (default: the fused :mod:`pathsmc.ops`; ``pathsmc.reference`` gives the
    same gradients through plain autograd).
    """
    if objective not in DIFFUSION_OBJECTIVES:
        raise ValueError(f"objective: expected one of {DIFFUSION_OBJECTIVES}, got {objective!r}")
    buffer = ReplayBuffer(20 * particles) if buffer is None else buffer
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    # cosine decay: the late, small steps average out the Monte Carlo noise of the paths
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, int(iterations))
    times = None
    losses = []
    for it in range(int(iterations)):
        if it % int(refresh) == 0:
            paths = sample_diffusion_paths(model, net.twist(), reward, particles=particles,
                                           steps=steps, guidance=guidance,
                                           threshold=threshold, generator=generator)
            times = paths.times
            buffer.add(x=paths.x)
        x = buffer.sample(batch_paths, generator)["x"]
        values, ratios = diffusion_log_ratios(model, net, x, times, reward, guidance=guidance,
                                              ops=ops)
        if objective == "path_consistency":
            loss = path_consistency_loss(values, ratios, span)
        else:
            loss = log_variance_loss(path_log_weights(ratios, values[..., -1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


def train_token_twist(
    model,
    twist: torch.nn.Module,
    *,
    objective: str = "ctl",
    span: int | None = 1,
    iterations: int = 100,
    particles: int = 256,
    lr: float = 0.1,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Train a token twist (e.g. :class:`~pathsmc.learn.TokenValue`) with Adam; returns the
    losses.

    ``"ctl"``: positives are the final particles of twisted SMC with the current twist (their
    prefixes, weighted by the detached final weights), negatives are independent draws from
    the twisted proposal (weights ``p/q`` per prefix). ``"path_consistency"``: the residuals
    of ``span``-step windows on the SMC particles, with the twist's learned log Z.
    """
    if objective not in TOKEN_OBJECTIVES:
        raise ValueError(f"objective: expected one of {TOKEN_OBJECTIVES}, got {objective!r}")
    opt = torch.optim.Adam(twist.parameters(), lr=lr)
    t = model.length
    losses = []
    for _ in range(int(iterations)):
        pos = sample_token_paths(model, twist, particles, generator=generator)
        if objective == "ctl":
            neg = sample_token_paths(model, twist, particles, threshold=0.0,
                                     generator=generator)
            with torch.no_grad():
                base = token_log_ratios(model, twist, neg.tokens).cumsum(-1)[..., :t - 1]
            loss = contrastive_twist_loss(
                twist.values(model, pos.tokens)[..., 1:t], pos.log_weights,
                twist.values(model, neg.tokens)[..., 1:t], base)
        else:
            loss = path_consistency_loss(twist.values(model, pos.tokens),
                                         token_log_ratios(model, twist, pos.tokens), span)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses
