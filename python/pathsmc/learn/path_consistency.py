"""Path consistency (blog eq. 21) = trajectory balance, and its sub-trajectory (c-step) form.

A path ``x_0 → x_1 → … → x_K`` carries

- ``values[..., k] = V_θ(x_k)`` for ``k = 0..K``: the twist at every point, with
  ``values[..., 0]`` the start value (``V_0``, or a learned ``log Z``) and ``values[..., K]``
  the terminal log-potential ``log p(y | x_K)`` (the reward ``r``, not learned);
- ``log_ratios[..., k] = log p_ref(x_{k+1} | x_k) − log q_θ(x_{k+1} | x_k)``.

The residual of the window ``[i, j]`` is

    δ_ij = V_θ(x_i) − Σ_{k=i}^{j−1} log_ratios[k] − V_θ(x_j)

(eq. 21 for ``i = 0, j = K``: ``V_0 − log p(y|x_K) + log q/p_ref``). At the soft value and the
optimal proposal ``q* = p_ref exp(V_{k+1} − V_k)`` (eq. 9) every residual is zero on every
path, whatever distribution the paths come from (off-policy).
"""

from __future__ import annotations

import torch

__all__ = ["consistency_residuals", "path_consistency_loss"]


def _check(values: torch.Tensor, log_ratios: torch.Tensor) -> int:
    if values.shape[:-1] != log_ratios.shape[:-1] or values.shape[-1] != log_ratios.shape[-1] + 1:
        raise ValueError(f"values, log_ratios: expected shapes (..., K+1) and (..., K), got "
                         f"{tuple(values.shape)} and {tuple(log_ratios.shape)}")
    return log_ratios.shape[-1]


def consistency_residuals(values: torch.Tensor, log_ratios: torch.Tensor,
                          span: int | None = None) -> torch.Tensor:
    """The residuals ``δ_{i, i+c}`` of every window of ``c = span`` steps (``None``: the whole
    path, ``c = K``), shape ``(..., K − c + 1)``."""
    k = _check(values, log_ratios)
    c = k if span is None else int(span)
    if not 1 <= c <= k:
        raise ValueError(f"span: expected 1 <= span <= {k} (the number of steps), got {span}")
    zero = torch.zeros_like(log_ratios[..., :1])
    cum = torch.cat([zero, log_ratios.cumsum(-1)], -1)  # Σ_{k<j} log_ratios
    sums = cum[..., c:] - cum[..., :-c]
    return values[..., :-c] - sums - values[..., c:]


def path_consistency_loss(values: torch.Tensor, log_ratios: torch.Tensor,
                          span: int | None = None,
                          log_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared residual over paths and windows (trajectory balance for ``span=None``
    with ``values[..., 0]`` a learned log Z; sub-trajectory balance for ``span = c``).

    Args:
        values: ``(..., K+1)`` twists along the paths (see the module docstring).
        log_ratios: ``(..., K)`` ``log p_ref − log q_θ`` per step.
        span: window length c, or None for the whole path.
        log_weights: optional ``(...)`` log-weights of the paths (e.g. SMC weights, detached
            here), normalized over the last path dimension; default: equal weights.
    """
    sq = consistency_residuals(values, log_ratios, span).square().mean(-1)
    if log_weights is None:
        return sq.mean()
    w = torch.softmax(log_weights.detach().to(sq.dtype), -1)
    return (w * sq).sum(-1).mean()
