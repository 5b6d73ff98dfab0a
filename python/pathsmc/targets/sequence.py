"""A discrete sequence model with exact soft values (plain math: no driver).

The model (:class:`MarkovSequence`) is a Markov chain over a vocabulary of V tokens, length T,
batched over B independent problems (rows), with an additive reward::

    p(x_{1:T}) = p_1(x_1) Π_{t>1} P(x_t | x_{t-1}),     r(x_{1:T}) = Σ_t R_t(x_t),
    target π(x) = p(x) exp(r(x)) / Z.

``R`` covers per-token rewards with a temperature (``R_t(v) = β u(v)``) and terminal constraints
("ends in token k": ``R_T(v) = −∞`` or ``−penalty`` for ``v ≠ k``); entries may be −∞.

Indexing: tokens are stored 0-based, ``tokens[..., k]`` is x_{k+1}, and every per-position table
``(B, T, ...)`` is indexed the same way (``rewards[:, k]`` is R_{k+1}).

Exact answers by dynamic programming (backward recursion over the last token):

- to-go values ``h_t(v) = log E_p[exp(Σ_{s>t} R_s(x_s)) | x_t = v]``, ``h_T = 0``,
  ``h_t(v) = logsumexp_w [log P(w|v) + R_{t+1}(w) + h_{t+1}(w)]`` (:meth:`MarkovSequence.to_go`);
- soft values (blog eq. 6–8) ``V_t(x_{1:t}) = log E_p[exp r | x_{1:t}] = Σ_{s≤t} R_s(x_s) +
  h_t(x_t)``, ``V_0 = log Z``, ``V_T = r`` (:meth:`MarkovSequence.soft_values`);
- the optimal one-step policy (blog eq. 9) ``q*(x_{t+1} | x_{1:t}) = P(x_{t+1}|x_t)
  exp(V_{t+1} − V_t)`` (:meth:`MarkovSequence.optimal_proposal`), which samples the target
  exactly by forward sampling (:meth:`MarkovSequence.sample`);
- per-position marginals of the target by forward–backward (:meth:`MarkovSequence.marginals`).

Twisted SMC over these sequences lives in the driver module :mod:`pathsmc.twisted_sequence`
(``TwistedSequenceSMC``, ``twisted_smc``), a Feynman–Kac model for the generic driver
:func:`pathsmc.smc.smc`; its states are ``[tokens (B, N, T) int64,
twist value Ṽ_t (B, N) float64, reward so far Σ_{s≤t} R_s (B, N) float64]``. Step k draws
token x_{k+1} from the proposal ``q ∝ P(·|x_k) exp(Ṽ_{k+1}(x_{1:k}, ·))`` (``proposal="twisted"``)
or from ``P(·|x_k)`` (``proposal="prior"``) and adds the blog's eq. 19 increment::

    log w += Ṽ_{k+1}(x_{1:k+1}) − Ṽ_k(x_{1:k}) + log P(x_{k+1}|x_k) − log q(x_{k+1}|x_{1:k})

with ``Ṽ_0 = 0`` and ``Ṽ_T = r`` exactly, so the product of increments telescopes to
``p(x) exp(r(x)) / q(x)`` and ``Ẑ`` is unbiased for Z whatever the intermediate twists
``Ṽ_1..Ṽ_{T−1}``. With the exact twists and the twisted (then optimal) proposal every increment
is ``log Σ_w P(w|x_k) exp(V_{k+1}) − V_k = 0`` after the first (``= log Z``): every particle has
the same weight and ``log Ẑ = log Z`` with zero variance. Twists are given as ``"exact"``,
``"reward"`` (Ṽ_t = reward so far, a crude heuristic), ``"none"`` (Ṽ_t = 0 before the end:
with ``proposal="prior"`` the plain bootstrap filter), a to-go table ``(B, T, V)`` (e.g.
:meth:`MarkovSequence.noisy_to_go`) or a callable (:class:`SequenceTwist`).

Sampling uses the Gumbel-max trick with ``torch.rand(generator=...)`` (exact, handles −∞
logits, one pass, no host synchronization).
"""

from __future__ import annotations

import math

import torch

__all__ = ["PAD", "MarkovSequence", "sample_categorical"]

PAD = -1
"""The value of token positions not generated yet."""


def sample_categorical(logits: torch.Tensor, generator: torch.Generator | None = None
                       ) -> torch.Tensor:
    """One draw per row of ``logits`` (``(..., V)``, unnormalized log-probabilities, −∞ allowed)
    by the Gumbel-max trick: ``argmax(logits − log(−log u))``, ``u ~ U[0, 1)`` from
    ``generator``. Returns int64 ``(...)``. No host synchronization."""
    u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    gumbel = -torch.log(-torch.log(u))  # u = 0 gives −∞: never chosen over a finite logit
    return torch.argmax(logits.to(torch.float64) + gumbel, dim=-1)


def _rows(t: torch.Tensor, batch: int, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """Broadcast a shared ``shape`` table or a per-row ``(B, *shape)`` one to ``(B, *shape)``."""
    if tuple(t.shape) == shape:
        return t.expand(batch, *shape).contiguous()
    if tuple(t.shape) == (batch, *shape):
        return t.contiguous()
    raise ValueError(f"{name}: expected shape {shape} or {(batch, *shape)}, got {tuple(t.shape)}")


class MarkovSequence:
    """B Markov chains over V tokens of length T with additive rewards (module docstring).

    Args:
        log_init: ``log p_1`` — ``(V,)`` shared or ``(B, V)`` per row; normalized.
        log_trans: ``log P(w | v)`` at ``[..., v, w]`` — ``(V, V)`` or ``(B, V, V)``; rows
            normalized.
        rewards: ``R_t(v)`` at ``[b, t-1, v]`` — ``(B, T, V)`` (or ``(T, V)`` shared); −∞ allowed
            (hard constraints). B is taken from the first per-row argument (1 if none).

    Everything is stored in float64 on the device of ``rewards``.
    """

    def __init__(self, log_init: torch.Tensor, log_trans: torch.Tensor, rewards: torch.Tensor):
        batch = next((t.shape[0] for t, d in ((log_init, 2), (log_trans, 3), (rewards, 3))
                      if t.dim() == d), 1)
        if rewards.dim() not in (2, 3):
            raise ValueError(f"rewards: expected shape (T, V) or (B, T, V), "
                             f"got {tuple(rewards.shape)}")
        length, vocab = rewards.shape[-2:]
        if length < 1 or vocab < 1:
            raise ValueError(f"rewards: expected T >= 1 and V >= 1, got {tuple(rewards.shape)}")
        dev, f64 = rewards.device, torch.float64
        self.log_init = _rows(log_init.to(dev, f64), batch, (vocab,), "log_init")
        self.log_trans = _rows(log_trans.to(dev, f64), batch, (vocab, vocab), "log_trans")
        self.rewards = _rows(rewards.to(f64), batch, (length, vocab), "rewards")
        for name, t in (("log_init", self.log_init), ("log_trans", self.log_trans)):
            err = (torch.logsumexp(t, -1).abs().max()).item()
            if not err < 1e-6:
                raise ValueError(f"{name}: expected normalized log-probabilities "
                                 f"(logsumexp over the last dim = 0), off by {err:.3g}")
        self.batch, self.length, self.vocab = batch, length, vocab
        self._to_go: torch.Tensor | None = None

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def random(
        cls,
        batch: int = 1,
        vocab: int = 8,
        length: int = 12,
        *,
        beta: float = 1.0,
        end_penalty: float = math.inf,
        sharpness: float = 1.0,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> MarkovSequence:
        """A random problem per row: transitions ``softmax(sharpness·N(0,1))``, per-token rewards
        ``β·u(v)`` with ``u ~ N(0, 1)`` at every position, and the terminal constraint
        "ends in token ``b mod V``" for row b: ``R_T(v) −= end_penalty`` for the other tokens
        (``inf``: a hard constraint, ``0``: none)."""
        g = torch.Generator().manual_seed(seed)
        f64 = torch.float64
        log_init = torch.log_softmax(sharpness * torch.randn(batch, vocab, generator=g,
                                                             dtype=f64), -1)
        log_trans = torch.log_softmax(sharpness * torch.randn(batch, vocab, vocab, generator=g,
                                                              dtype=f64), -1)
        u = torch.randn(batch, 1, vocab, generator=g, dtype=f64)
        rewards = (beta * u).expand(batch, length, vocab).clone()
        if end_penalty != 0:
            other = torch.arange(vocab)[None, :] != (torch.arange(batch) % vocab)[:, None]
            rewards[:, -1] = torch.where(other, rewards[:, -1] - end_penalty, rewards[:, -1])
        return cls(log_init.to(device), log_trans.to(device), rewards.to(device))

    def repeat(self, times: int) -> MarkovSequence:
        """Each row repeated ``times`` times (consecutively): ``B·times`` rows, for independent
        repeats of the same problems."""
        return MarkovSequence(self.log_init.repeat_interleave(times, 0),
                              self.log_trans.repeat_interleave(times, 0),
                              self.rewards.repeat_interleave(times, 0))

    @property
    def device(self) -> torch.device:
        return self.rewards.device

    # ---- densities ------------------------------------------------------------------------

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if (tokens.dim() != 3 or tokens.shape[0] != self.batch or tokens.shape[2] != self.length
                or tokens.dtype != torch.int64):
            raise ValueError(f"tokens: expected int64 of shape ({self.batch}, N, {self.length}), "
                             f"got {tokens.dtype} {tuple(tokens.shape)}")

    def token_rewards(self, tokens: torch.Tensor) -> torch.Tensor:
        """``R_t(x_t)`` per position, ``(B, N, T)``."""
        self._check_tokens(tokens)
        r = self.rewards[:, None].expand(-1, tokens.shape[1], -1, -1)
        return r.gather(-1, tokens[..., None])[..., 0]

    def log_reward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``r(x) = Σ_t R_t(x_t)``, ``(B, N)``."""
        return self.token_rewards(tokens).sum(-1)

    def log_prob(self, tokens: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` under the chain, ``(B, N)``."""
        self._check_tokens(tokens)
        lp = self.log_init.gather(-1, tokens[..., 0])
        if self.length > 1:
            b, n = tokens.shape[:2]
            prev, nxt = tokens[..., :-1], tokens[..., 1:]
            rows = self.log_trans[:, None].expand(b, n, -1, -1)  # (B, N, V, V)
            step = rows.gather(2, prev[..., None].expand(-1, -1, -1, self.vocab))  # (B,N,T-1,V)
            lp = lp + step.gather(-1, nxt[..., None])[..., 0].sum(-1)
        return lp

    def log_target(self, tokens: torch.Tensor) -> torch.Tensor:
        """``log π(x) = log p(x) + r(x) − log Z``, ``(B, N)``."""
        return self.log_prob(tokens) + self.log_reward(tokens) - self.log_z()[:, None]

    # ---- exact answers by dynamic programming ----------------------------------------------

    def to_go(self) -> torch.Tensor:
        """Exact to-go values ``h[:, k, v] = h_{k+1}(v)``, ``(B, T, V)`` (``h[:, T-1] = 0``)."""
        if self._to_go is None:
            h = torch.zeros_like(self.rewards)
            for k in range(self.length - 2, -1, -1):
                nxt = self.rewards[:, k + 1] + h[:, k + 1]  # (B, V) over w
                h[:, k] = torch.logsumexp(self.log_trans + nxt[:, None, :], dim=-1)
            self._to_go = h
        return self._to_go

    def log_z(self) -> torch.Tensor:
        """Exact ``log Z = log E_p[exp r] = V_0``, ``(B,)``."""
        return torch.logsumexp(self.log_init + self.rewards[:, 0] + self.to_go()[:, 0], -1)

    def soft_values(self, tokens: torch.Tensor) -> torch.Tensor:
        """Exact soft values along each sequence, ``(B, N, T + 1)``: ``[..., t]`` is
        ``V_t(x_{1:t}) = log E_p[exp r | x_{1:t}]`` (``[..., 0] = log Z``, ``[..., T] = r``)."""
        acc = self.token_rewards(tokens).cumsum(-1)
        h = self.to_go()[:, None].expand(-1, tokens.shape[1], -1, -1)
        vt = acc + h.gather(-1, tokens[..., None])[..., 0]
        v0 = self.log_z()[:, None, None].expand(-1, tokens.shape[1], 1)
        return torch.cat([v0, vt], -1)

    def noisy_to_go(self, scale: float, generator: torch.Generator | None = None
                    ) -> torch.Tensor:
        """The exact to-go table plus ``scale``·N(0, 1) noise at positions 1..T−1 (the last
        stays 0; −∞ entries stay −∞): approximate twists for :class:`TwistedSequenceSMC`."""
        h = self.to_go()
        dev = generator.device if generator is not None else h.device
        noise = torch.randn(h.shape, dtype=h.dtype, device=dev, generator=generator).to(h.device)
        noise[:, -1] = 0
        return h + scale * noise

    def optimal_proposal(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The optimal one-step policy (blog eq. 9) as log-probabilities:
        ``log q*(x_1)`` ``(B, V)`` and ``log q*(x_{k+2}=w | x_{k+1}=v)`` at ``[b, k, v, w]``,
        ``(B, T−1, V, V)``: ``log P(w|v) + R_{k+2}(w) + h_{k+2}(w) − h_{k+1}(v)``, i.e.
        ``log P + V_{t+1} − V_t``. Rows of states that cannot meet the constraint
        (``h = −∞``) are NaN."""
        h = self.to_go()
        q1 = self.log_init + self.rewards[:, 0] + h[:, 0] - self.log_z()[:, None]
        nxt = self.rewards[:, 1:] + h[:, 1:]  # (B, T-1, V) over w
        q = self.log_trans[:, None] + nxt[:, :, None, :] - h[:, :-1, :, None]
        return q1, q

    def marginals(self) -> torch.Tensor:
        """Exact marginals ``π(x_t = v)`` of the target, ``(B, T, V)`` (forward–backward)."""
        h = self.to_go()
        alpha = [self.log_init + self.rewards[:, 0]]
        for k in range(1, self.length):
            a = torch.logsumexp(alpha[-1][:, :, None] + self.log_trans, dim=1)
            alpha.append(a + self.rewards[:, k])
        la = torch.stack(alpha, 1) + h
        return torch.exp(la - self.log_z()[:, None, None])

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact samples per row from the target ``π``, ``(B, n, T)`` int64: forward
        sampling with the optimal policy."""
        q1, q = self.optimal_proposal()
        x = torch.empty(self.batch, n, self.length, dtype=torch.int64, device=self.device)
        x[..., 0] = sample_categorical(q1[:, None].expand(-1, n, -1), generator)
        for k in range(1, self.length):
            rows = q[:, k - 1].gather(1, x[..., k - 1, None].expand(-1, -1, self.vocab))
            x[..., k] = sample_categorical(rows, generator)
        return x
