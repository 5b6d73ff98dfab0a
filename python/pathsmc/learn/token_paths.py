"""Token paths: samples from the token twisted-SMC driver (detached) and the per-step
log-ratios ``log p(x_{k+1}|x_k) − log q_θ(x_{k+1}|x_{1:k})`` of the twisted proposal
``q_θ ∝ p · exp Ṽ_{k+1}`` (with gradients), for :class:`~pathsmc.targets.MarkovSequence`.

With the proposal tied to the twist, the one-step residual of path consistency is the soft
Bellman residual ``V_k(x_{1:k}) − log Σ_w p(w|x_k) exp Ṽ_{k+1}(x_{1:k}, w)``: it does not
depend on the sampled token, and it is zero at the DP soft values (to rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pathsmc.learn._drivers import TwistedSequenceSMC
from pathsmc.smc import smc

__all__ = ["TokenPaths", "sample_token_paths", "token_log_ratios"]


@dataclass
class TokenPaths:
    """Sequences ``(B, N, T)`` int64 and their final log-weights ``(B, N)`` (detached)."""

    tokens: torch.Tensor
    log_weights: torch.Tensor
    log_z: torch.Tensor


def sample_token_paths(model, twist, particles: int, *, threshold: float = 0.5,
                       proposal: str = "twisted",
                       generator: torch.Generator | None = None) -> TokenPaths:
    """Run the token twisted-SMC driver with ``twist`` (a ``SequenceTwist``, e.g.
    :class:`~pathsmc.learn.TokenValue`, evaluated without gradients). ``threshold=0`` gives
    sequential importance sampling (independent draws from the proposal)."""
    def frozen(k, tokens, reward):
        with torch.no_grad():
            return twist(k, tokens, reward).detach()

    fk = TwistedSequenceSMC(model, twist=frozen, proposal=proposal)
    res = smc(fk, particles, model.batch, threshold=threshold, generator=generator,
              progress=False)
    return TokenPaths(res.particles, res.logw.detach(), res.log_z.detach())


def token_log_ratios(model, twist, tokens: torch.Tensor) -> torch.Tensor:
    """``log p(x_{k+1}|x_k) − log q_θ(x_{k+1}|x_{1:k})`` for the twisted proposal of ``twist``
    (``Ṽ_T = r`` at the last step), ``(B, N, T)``, differentiable in the twist."""
    fk = TwistedSequenceSMC(model, twist=twist, proposal="twisted")
    acc = torch.zeros(tokens.shape[:2], dtype=torch.float64, device=tokens.device)
    out = []
    for k in range(model.length):
        log_p = fk.next_log_probs(k, tokens)  # (B, N, V)
        reward = acc[..., None] + model.rewards[:, k, None, :]
        v = reward if k == model.length - 1 else twist(k, tokens, reward)
        w = tokens[..., k, None]
        out.append(torch.logsumexp(log_p + v, -1) - v.gather(-1, w)[..., 0])
        acc = reward.gather(-1, w)[..., 0]
    return torch.stack(out, -1)
