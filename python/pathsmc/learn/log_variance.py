"""The log-variance divergence between path measures (Nüsken & Richter 2021; Richter & Berner
2024): the variance, over paths from any (detached) sampling distribution, of the log
importance weight ``log w = Σ_k log p_ref/q_θ + r``. No log Z is learned: the variance
removes the constant. Zero exactly when ``q_θ`` is the optimal (target) path measure."""

from __future__ import annotations

import torch

__all__ = ["log_variance_loss", "path_log_weights"]


def path_log_weights(log_ratios: torch.Tensor, terminal: torch.Tensor,
                     initial: torch.Tensor | None = None) -> torch.Tensor:
    """``log w = initial + Σ_k log_ratios[..., k] + terminal`` per path (blog eq. 18),
    ``log_ratios`` ``(..., K)``, ``terminal`` and ``initial`` ``(...)``."""
    lw = log_ratios.sum(-1) + terminal
    return lw if initial is None else lw + initial


def log_variance_loss(log_w: torch.Tensor, log_weights: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Variance of ``log_w`` over the paths (last dim), averaged over the leading dims.

    ``log_weights`` (detached) reweights the paths (e.g. off-policy SMC weights); the mean
    subtracted is the weighted mean (a detached-free estimate of log Z)."""
    if log_weights is None:
        w = torch.full_like(log_w, 1.0 / log_w.shape[-1])
    else:
        w = torch.softmax(log_weights.detach().to(log_w.dtype), -1)
    mean = (w * log_w).sum(-1, keepdim=True)
    return (w * (log_w - mean).square()).sum(-1).mean()
