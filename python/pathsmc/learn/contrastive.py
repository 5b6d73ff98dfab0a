"""Contrastive twist learning (Zhao, Brekelmans, Makhzani & Grosse 2024): the mass-covering
KL of blog eq. 20, ``Σ_t KL(π_t ‖ π_t^θ)`` with ``π_t^θ ∝ p_ref(x_{1:t}) exp V_t^θ(x_t)``.

Its gradient is ``Σ_t (−E_{π_t}[∇V_t^θ] + E_{π_t^θ}[∇V_t^θ])``: a positive term on samples of
the target (SMC samples with detached weights; the target's prefixes / time-t states are
distributed as π_t) and a negative term on samples of the twisted marginals (drawn from the
proposal and importance-weighted by ``p_ref/q · exp V_t^θ``). The loss below has exactly that
gradient and equals ``Σ_t KL(π_t ‖ π_t^θ)`` up to a θ-free constant (in expectation)."""

from __future__ import annotations

import math

import torch

__all__ = ["contrastive_twist_loss"]


def contrastive_twist_loss(pos_values: torch.Tensor, pos_log_weights: torch.Tensor,
                           neg_values: torch.Tensor, neg_log_base: torch.Tensor
                           ) -> torch.Tensor:
    """``Σ_t [−Σ_i w̄_i V_t^θ(x_i⁺) + log mean_j exp(b_{t,j} + V_t^θ(x_j⁻))]``, averaged over
    the leading (batch) dims.

    Args:
        pos_values: ``(..., N⁺, T)`` twists ``V_t^θ`` at the positive samples' time-t points
            (with gradients).
        pos_log_weights: ``(..., N⁺)`` their log-weights for the target (detached;
            normalized here).
        neg_values: ``(..., N⁻, T)`` twists at the negative samples (with gradients).
        neg_log_base: ``(..., N⁻, T)`` ``log p_ref(x_{1:t}) − log q(x_{1:t})`` of the negative
            samples (detached): the weight of ``π_t^θ`` relative to the proposal without the
            twist.
    """
    if pos_values.shape[:-1] != pos_log_weights.shape:
        raise ValueError(f"pos_log_weights: expected shape {tuple(pos_values.shape[:-1])}, got "
                         f"{tuple(pos_log_weights.shape)}")
    if neg_values.shape != neg_log_base.shape or neg_values.shape[-1] != pos_values.shape[-1]:
        raise ValueError(f"neg_values, neg_log_base: expected equal shapes (..., N⁻, "
                         f"{pos_values.shape[-1]}), got {tuple(neg_values.shape)} and "
                         f"{tuple(neg_log_base.shape)}")
    w = torch.softmax(pos_log_weights.detach().to(pos_values.dtype), -1)
    pos = (w[..., None] * pos_values).sum(-2)  # (..., T)
    n = neg_values.shape[-2]
    neg = torch.logsumexp(neg_log_base.detach().to(neg_values.dtype) + neg_values, -2) \
        - math.log(n)
    return (neg - pos).sum(-1).mean()
