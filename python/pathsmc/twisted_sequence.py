"""Twisted SMC over the token sequences of a :class:`~pathsmc.targets.sequence.MarkovSequence`.

A driver (it imports :mod:`pathsmc.smc`), kept out of :mod:`pathsmc.targets`, whose modules are
plain math. The model, its exact soft values and the eq. 19 weight are described in
:mod:`pathsmc.targets.sequence`; the same twist/weight concepts drive the causal-LM version in
:mod:`pathsmc.integrations.transformers`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from pathsmc.smc import SMCResult, smc
from pathsmc.targets.sequence import PAD, MarkovSequence, sample_categorical

__all__ = [
    "SequenceTwist",
    "TwistSpec",
    "TwistedSequenceSMC",
    "sample_categorical",
    "twisted_smc",
]


class SequenceTwist(Protocol):
    """An approximate soft value for :class:`TwistedSequenceSMC`.

    Called at step ``k`` (``k`` tokens generated, ``0 <= k < T − 1``) with the tokens
    ``(B, N, T)`` (positions ``>= k`` are :data:`PAD`) and ``reward`` ``(B, N, V)``, the exact
    reward so far of each one-token extension ``Σ_{s≤k+1} R_s``; returns
    ``Ṽ_{k+1}(x_{1:k}, w)`` for every next token w, ``(B, N, V)`` float64 (the exact twist is
    ``reward + h_{k+1}(w)``). Not called at the last step, where ``Ṽ_T = r``.
    """

    def __call__(self, k: int, tokens: torch.Tensor, reward: torch.Tensor) -> torch.Tensor: ...


TwistSpec = str | torch.Tensor | Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None


class TwistedSequenceSMC:
    """Twisted SMC over the token sequences of a :class:`MarkovSequence`, as a
    :class:`pathsmc.smc.FeynmanKacModel` (``num_steps = T``, one token per step).

    Args:
        model: the sequence model (its B is the SMC batch).
        twist: ``"exact"`` (the DP soft values), ``"reward"`` (reward so far),
            ``"none"``/None (0 before the last token), a to-go table ``(B, T, V)`` (twist
            ``Σ_{s≤t} R_s + table[:, t−1, x_t]``; its last slice is ignored) or a
            :class:`SequenceTwist`.
        proposal: ``"twisted"`` (``∝ P(·|x_k) exp Ṽ_{k+1}``, the optimal one-step policy for
            the exact twist; at the last step ``∝ P exp r``) or ``"prior"`` (``P(·|x_k)``).

    States: ``[tokens (B, N, T) int64 (PAD where not generated), Ṽ_k (B, N) float64,
    reward so far (B, N) float64]``. The weight increment is :meth:`log_weight_increment`.
    """

    def __init__(self, model: MarkovSequence, twist: TwistSpec = "exact",
                 proposal: str = "twisted"):
        if proposal not in ("twisted", "prior"):
            raise ValueError(f"proposal: expected 'twisted' or 'prior', got {proposal!r}")
        self.model, self.proposal = model, proposal
        self.num_steps = model.length
        self._table: torch.Tensor | None = None
        self._twist: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        shape = (model.batch, model.length, model.vocab)
        if isinstance(twist, torch.Tensor):
            if tuple(twist.shape) != shape:
                raise ValueError(f"twist: expected a to-go table of shape {shape}, "
                                 f"got {tuple(twist.shape)}")
            self._table = twist.to(model.device, torch.float64)
        elif twist == "exact":
            self._table = model.to_go()
        elif twist == "reward":
            self._table = torch.zeros(shape, dtype=torch.float64, device=model.device)
        elif twist is None or twist == "none":
            self._twist = None
        elif callable(twist):
            self._twist = twist
        else:
            raise ValueError(f"twist: expected 'exact', 'reward', 'none', a (B, T, V) tensor or "
                             f"a callable, got {twist!r}")

    def init(self, batch: int, particles: int, generator: torch.Generator | None
             ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Empty sequences, ``Ṽ_0 = 0``, log-weights 0."""
        m = self.model
        if batch != m.batch:
            raise ValueError(f"batch: the sequence model has {m.batch} rows, got {batch}")
        tokens = torch.full((batch, particles, m.length), PAD, dtype=torch.int64,
                            device=m.device)
        zeros = torch.zeros(batch, particles, dtype=torch.float64, device=m.device)
        return [tokens, zeros, zeros.clone()], zeros.clone()

    def next_log_probs(self, k: int, tokens: torch.Tensor) -> torch.Tensor:
        """``log P(x_{k+1} = w | x_k)`` for every w, ``(B, N, V)``."""
        m = self.model
        b, n = tokens.shape[:2]
        if k == 0:
            return m.log_init[:, None].expand(b, n, m.vocab)
        prev = tokens[..., k - 1, None].expand(b, n, m.vocab)
        return m.log_trans.gather(1, prev)

    def twist_values(self, k: int, tokens: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
        """``Ṽ_{k+1}(x_{1:k}, w)`` for every w, ``(B, N, V)``; ``= reward = r`` at the last
        step."""
        if k == self.num_steps - 1:
            return reward
        if self._table is not None:
            return reward + self._table[:, k, None, :]
        if self._twist is not None:
            return self._twist(k, tokens, reward)
        return torch.zeros_like(reward)

    def log_weight_increment(self, v_prev: torch.Tensor, v_new: torch.Tensor,
                             log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """Blog eq. 19: ``Ṽ_{k+1}(x_{1:k+1}) − Ṽ_k(x_{1:k}) + log p(x_{k+1}|x_k) −
        log q(x_{k+1}|x_{1:k})``, all ``(B, N)``."""
        return v_new - v_prev + (log_p - log_q)

    def step(self, k: int, states: list[torch.Tensor], logw: torch.Tensor,
             generator: torch.Generator | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Draw token ``x_{k+1}`` and add the eq. 19 increment (no host synchronization)."""
        tokens, v_prev, acc = states
        m = self.model
        log_p = self.next_log_probs(k, tokens)  # (B, N, V)
        reward = acc[..., None] + m.rewards[:, k, None, :]  # (B, N, V)
        v_cand = self.twist_values(k, tokens, reward)
        logits = log_p + v_cand if self.proposal == "twisted" else log_p
        w = sample_categorical(logits, generator)[..., None]  # (B, N, 1)
        log_q = torch.log_softmax(logits, -1).gather(-1, w)[..., 0]
        pick = (log_p.gather(-1, w)[..., 0], v_cand.gather(-1, w)[..., 0],
                reward.gather(-1, w)[..., 0])
        tokens = tokens.clone()
        tokens[..., k] = w[..., 0]
        logw = logw + self.log_weight_increment(v_prev, pick[1], pick[0], log_q)
        return [tokens, pick[1], pick[2]], logw


def twisted_smc(
    model: MarkovSequence,
    particles: int,
    *,
    twist: TwistSpec = "exact",
    proposal: str = "twisted",
    threshold: float = 0.5,
    scheme: str = "systematic",
    generator: torch.Generator | None = None,
    progress: bool | None = None,
) -> SMCResult:
    """Twisted SMC for the token sequences of ``model`` (:class:`TwistedSequenceSMC` run by
    :func:`pathsmc.smc.smc`). ``result.particles`` are the sequences ``(B, N, T)`` and
    ``result.log_z`` estimates :meth:`MarkovSequence.log_z` (exactly, for ``twist="exact"``
    with the twisted proposal; unbiased in ``Ẑ`` for any twist). The plain bootstrap filter is
    ``twist="none", proposal="prior"``."""
    fk = TwistedSequenceSMC(model, twist=twist, proposal=proposal)
    return smc(fk, particles, model.batch, threshold=threshold, scheme=scheme,
               generator=generator, progress=progress, desc="twisted-smc")
