"""The ELBO (blog eq. 5) / mode-seeking KL ``KL(q_θ ‖ p*) = log Z − E_q[log w]`` through
reparameterized paths: ``log w`` comes from :func:`pathsmc.learn.reparameterized_log_weights`
(paths built from fixed noise with the differentiable ``em_step``), so the gradient flows
through the sampled states (pathwise / adjoint gradient)."""

from __future__ import annotations

import torch

__all__ = ["elbo_loss"]


def elbo_loss(log_w: torch.Tensor) -> torch.Tensor:
    """``−mean(log w)``, the negative ELBO (``≥ −log Z``; equality iff ``q_θ = p*``).
    ``log_w`` ``(..., N)`` must carry the graph of the reparameterized paths."""
    return -log_w.mean()
