"""Twists / value networks: ``V_θ(x, t)`` for diffusion models and ``V_θ(prefix)`` for token
models.

:class:`ValueNetwork` gives both the potential and the guidance ``∇V`` —
``net.twist()`` is a ``value(x, t) -> (V, ∇V)`` callable for ``steer(mode="twisted")``.
:class:`TokenValue` is a :class:`~pathsmc.twisted_sequence.SequenceTwist` (callable by the
token twisted-SMC driver) with a learned to-go table and a learned ``log Z``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["TokenValue", "ValueNetwork"]


class ValueNetwork(nn.Module):
    """``V_θ(x, t) = base(x, t) + MLP([x, t])`` with ``x`` ``(B, N, D)``; returns ``(B, N)``.

    Args:
        dim: the event size D.
        hidden: width of the hidden layers.
        layers: number of hidden layers (SiLU).
        base: an optional known part (e.g. the reward at Tweedie's denoised mean, or the
            reward itself), ``base(x, t) -> (B, N)``; the MLP learns the rest.
        dtype: parameter dtype (float64 keeps the exactness checks at rounding level).
    """

    def __init__(self, dim: int, hidden: int = 64, layers: int = 2, *,
                 base: Callable[[torch.Tensor, float | torch.Tensor], torch.Tensor] | None = None,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        if int(dim) < 1 or int(hidden) < 1 or int(layers) < 1:
            raise ValueError(f"dim, hidden, layers: expected positive integers, got {dim}, "
                             f"{hidden}, {layers}")
        mods: list[nn.Module] = []
        width = int(dim) + 1
        for _ in range(int(layers)):
            mods += [nn.Linear(width, hidden, dtype=dtype), nn.SiLU()]
            width = hidden
        last = nn.Linear(width, 1, dtype=dtype)
        nn.init.zeros_(last.weight)  # start at V = base (or 0)
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(*mods, last)
        self.dim = int(dim)
        self.base = base

    def forward(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """``V_θ(x, t)`` ``(B, N)`` (float64); ``t`` a float or a tensor broadcastable to
        ``(B, N)``."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: expected (..., {self.dim}), got {tuple(x.shape)}")
        dtype = self.mlp[0].weight.dtype
        tt = torch.as_tensor(t, dtype=dtype, device=x.device).expand(x.shape[:-1])
        out = self.mlp(torch.cat([x.to(dtype), tt[..., None]], -1))[..., 0].double()
        if self.base is not None:
            out = out + self.base(x, t).double()
        return out

    def value_and_grad(self, x: torch.Tensor, t: float | torch.Tensor, *,
                       create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(V, ∇_x V)``; ``create_graph=True`` keeps the graph of ∇V (for losses whose
        proposal drift is guided by ∇V_θ)."""
        with torch.enable_grad():
            xg = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
            v = self(xg, t)
            (g,) = torch.autograd.grad(v.sum(), xg, create_graph=create_graph)
        return v, g.to(x.dtype)

    def twist(self) -> Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]:
        """``value(x, t) -> (V, ∇V)`` (detached) for ``steer(mode="twisted", value=...)``."""

        def value(x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
            v, g = self.value_and_grad(x, t)
            return v.detach(), g.detach()

        return value


class TokenValue(nn.Module):
    """A learned twist for a :class:`~pathsmc.targets.MarkovSequence`:
    ``V_θ_t(x_{1:t}) = Σ_{s≤t} R_s(x_s) + table[t−1, x_t]`` for ``0 < t < T``, ``V_T = r``,
    and a learned ``log_z`` for ``V_0``. The table ``(B, T, V)`` is the to-go part (the exact
    soft values are such a table: the DP's :meth:`~MarkovSequence.to_go`), so the family
    contains the optimum.

    Callable as a ``SequenceTwist``: ``(k, tokens, reward) -> Ṽ_{k+1}(x_{1:k}, ·)``.
    For language models replace the table by a network on the prefix with the same call.
    """

    def __init__(self, batch: int, length: int, vocab: int, *,
                 init: torch.Tensor | None = None) -> None:
        super().__init__()
        table = torch.zeros(batch, length, vocab, dtype=torch.float64)
        if init is not None:
            if tuple(init.shape) != (batch, length, vocab):
                raise ValueError(f"init: expected shape {(batch, length, vocab)}, got "
                                 f"{tuple(init.shape)}")
            table = init.detach().double().clone()
        self.table = nn.Parameter(table)
        self.log_z = nn.Parameter(torch.zeros(batch, dtype=torch.float64))

    def forward(self, k: int, tokens: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
        """``Ṽ_{k+1}(x_{1:k}, w)`` for every next token w, ``(B, N, V)``."""
        return reward + self.table[:, k, None, :]

    def values(self, model, tokens: torch.Tensor) -> torch.Tensor:
        """``V_θ_t(x_{1:t})`` along complete sequences, ``(B, N, T+1)``:
        ``[..., 0] = log_z``, ``[..., T] = r`` (the reward, not learned)."""
        b, n, length = tokens.shape
        acc = model.token_rewards(tokens).cumsum(-1)  # (B, N, T)
        tab = self.table[:, None].expand(b, n, -1, -1).gather(-1, tokens[..., None])[..., 0]
        mid = acc[..., :-1] + tab[..., :-1]
        return torch.cat([self.log_z[:, None, None].expand(b, n, 1), mid, acc[..., -1:]], -1)
