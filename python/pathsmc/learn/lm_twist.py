"""Learned token-local twists for causal language models (:func:`~pathsmc.integrations.
transformers.lm_smc`), by regression on the model's own samples.

For a terminal reward bounded above, ``r ≤ upper`` (use ``−inf`` for a violated constraint),
the exact token-local twist is ``Ṽ(x_{1:k}, w) = log E_p[exp r | x_{1:k}, x_{k+1} = w]``. On
continuations sampled from the plain LM, the label ``y = exp(r(x) − upper) ∈ [0, 1]`` of a path
is unbiased for ``exp(Ṽ(x_{1:k}, x_{k+1}) − upper)`` at each of its positions, so binary
cross-entropy of ``σ(f_θ(x_{1:k})[x_{k+1}])`` against ``y`` is minimal exactly at the soft value
(the same argument as :mod:`pathsmc.learn.noisy_classifier`; a FUDGE-style future discriminator,
Yang & Klein 2021, trained on the LM's samples). One forward pass over a path scores all its
positions (teacher forcing); only the sampled next token of each position gets a gradient.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PrefixValue", "fit_lm_twist", "lm_twist_loss", "plain_lm_paths"]


class PrefixValue(nn.Module):
    """``f_θ(ids)``: an embedding and a GRU read the prompt and the generated tokens; a linear
    head gives, after each position, one logit per candidate next token. The twist is
    ``Ṽ(x_{1:k}, w) = log σ(f_θ(prompt + x_{1:k})[w]) + upper``.

    Args:
        vocab_size: the LM's vocabulary V.
        hidden, embed: GRU and embedding widths.
        upper: the reward's upper bound (labels are ``exp(r − upper)``).
    """

    def __init__(self, vocab_size: int, *, hidden: int = 64, embed: int = 32,
                 upper: float = 0.0) -> None:
        super().__init__()
        if min(int(vocab_size), int(hidden), int(embed)) < 1:
            raise ValueError(f"vocab_size, hidden, embed: expected positive integers, got "
                             f"{vocab_size}, {hidden}, {embed}")
        if not math.isfinite(float(upper)):
            raise ValueError(f"upper: must be finite, got {upper}")
        self.vocab_size, self.upper = int(vocab_size), float(upper)
        self.embed = nn.Embedding(self.vocab_size, int(embed))
        self.rnn = nn.GRU(int(embed), int(hidden), batch_first=True)
        self.head = nn.Linear(int(hidden), self.vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(M, L, V)``: entry ``[:, j]`` scores the token after ``ids[:, :j+1]``."""
        if ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError(f"ids: expected int64 (M, L), got {ids.dtype} {tuple(ids.shape)}")
        h, _ = self.rnn(self.embed(ids))
        return self.head(h)

    def twist(self, prompt_ids: torch.Tensor) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """A token-local twist for ``lm_smc(model, prompt_ids, ..., twist=...)``:
        ``twist(k, tokens (B, N, k)) -> Ṽ (B, N, V)`` float64, for the same prompts ``(B, P)``.
        Each call re-reads the whole prefix (no recurrent state to follow the resampling)."""
        prompt_ids = torch.as_tensor(prompt_ids, dtype=torch.long)
        if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
            raise ValueError(f"prompt_ids: expected (B, P) with P >= 1, got "
                             f"{tuple(prompt_ids.shape)}")

        @torch.no_grad()
        def twist(k: int, tokens: torch.Tensor) -> torch.Tensor:
            b, n = tokens.shape[:2]
            if b != prompt_ids.shape[0]:
                raise ValueError(f"prompt_ids: {prompt_ids.shape[0]} rows, but the tokens have "
                                 f"{b}")
            pr = prompt_ids.to(tokens.device)[:, None].expand(b, n, -1)
            ids = torch.cat([pr, tokens.long()], -1).reshape(b * n, -1)
            out = F.logsigmoid(self(ids)[:, -1].double()) + self.upper
            return out.reshape(b, n, self.vocab_size)

        return twist


def lm_twist_loss(net: PrefixValue, prompt_ids: torch.Tensor, tokens: torch.Tensor,
                  lengths: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of ``σ(f_θ(prompt + x_{1:j})[x_{j+1}])`` against
    ``exp(r(x) − upper)`` over the positions ``j < length`` of paths ``tokens (B, N, L)`` of
    the plain LM (``lengths (B, N)`` count the EOS; ``reward (B, N)``, ``−inf`` allowed)."""
    b, n, length = tokens.shape
    if lengths.shape != (b, n) or reward.shape != (b, n):
        raise ValueError(f"lengths, reward: expected ({b}, {n}), got {tuple(lengths.shape)}, "
                         f"{tuple(reward.shape)}")
    r = reward.double()
    if bool(torch.isnan(r).any()) or float(r.max()) > net.upper + 1e-9:
        raise ValueError(f"reward: must not be NaN and must be <= upper = {net.upper}, got a "
                         f"maximum of {float(r.max())}")
    p = prompt_ids.shape[1]
    ids = torch.cat([prompt_ids.to(tokens.device)[:, None].expand(b, n, p), tokens.long()], -1)
    logits = net(ids.reshape(b * n, p + length))[:, p - 1:p - 1 + length]  # (BN, L, V)
    taken = logits.gather(-1, tokens.reshape(b * n, length, 1).long())[..., 0]
    y = (r - net.upper).exp().reshape(b * n, 1).expand(-1, length).to(taken.dtype)
    valid = torch.arange(length, device=tokens.device) < lengths.reshape(b * n, 1)
    bce = F.binary_cross_entropy_with_logits(taken, y, reduction="none")
    return (bce * valid).sum() / valid.sum().clamp(min=1)


@torch.no_grad()
def plain_lm_paths(model: Any, prompt_ids: torch.Tensor, paths: int, max_new_tokens: int, *,
                   eos_token_id: int | None = None, chunk: int = 1024,
                   generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``paths`` continuations per prompt sampled from the plain LM (``lm_smc`` with no twist,
    no reward and no resampling): ``tokens (B, paths, L)`` and ``lengths (B, paths)``."""
    from pathsmc.integrations.transformers import lm_smc

    if int(paths) < 1 or int(chunk) < 1:
        raise ValueError(f"paths, chunk: expected positive integers, got {paths}, {chunk}")
    toks, lens = [], []
    for i in range(0, int(paths), int(chunk)):
        res = lm_smc(model, prompt_ids, min(int(chunk), int(paths) - i), max_new_tokens,
                     eos_token_id=eos_token_id, threshold=0.0, generator=generator)
        pad = max_new_tokens - res.tokens.shape[-1]
        fill = eos_token_id if eos_token_id is not None else 0
        toks.append(F.pad(res.tokens, (0, pad), value=fill))
        lens.append(res.lengths)
    return torch.cat(toks, 1), torch.cat(lens, 1)


def fit_lm_twist(model: Any, prompt_ids: torch.Tensor,
                 reward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                 max_new_tokens: int, upper: float | None = None, paths: int = 4096,
                 held_out: int = 512, eos_token_id: int | None = None, epochs: int = 8,
                 batch_paths: int = 256, lr: float = 3e-3, net: PrefixValue | None = None,
                 seed: int = 0, log: Callable[[str], None] | None = None
                 ) -> tuple[PrefixValue, dict]:
    """Sample ``paths + held_out`` plain continuations per prompt, label them with
    ``reward(tokens (B, M, L), lengths (B, M)) <= upper`` (tokens padded with the EOS id after
    it; ``lengths`` count the EOS; ``−inf`` for a violated constraint) and fit ``net`` (default
    ``PrefixValue(model.config.vocab_size, upper=upper or 0)``; a given ``net`` brings its own
    ``upper``) by :func:`lm_twist_loss` with Adam, keeping the epoch with the lowest loss on the
    held-out paths (watch ``info["held_out_loss"]``: still falling at the end means more
    epochs or paths). Returns the frozen network (``net.twist(prompt_ids)`` is the twist) and a
    dict of what was done."""
    vocab = int(model.config.vocab_size)
    if net is None:
        torch.manual_seed(seed)
        net = PrefixValue(vocab, upper=0.0 if upper is None else upper)
    elif upper is not None and float(upper) != net.upper:
        raise ValueError(f"upper: {upper} given, but net.upper = {net.upper} (the net's bound "
                         "is the one used; leave upper=None)")
    if net.vocab_size != vocab:
        raise ValueError(f"net: vocab_size {net.vocab_size}, but the model's is {vocab}")
    if not any(p.requires_grad for p in net.parameters()):
        raise ValueError("net: no parameter requires grad (fit_lm_twist returns a frozen "
                         "network: call net.requires_grad_(True) to train it further)")
    if int(held_out) < 1 or int(epochs) < 1 or int(batch_paths) < 1:
        raise ValueError(f"held_out, epochs, batch_paths: expected positive integers, got "
                         f"{held_out}, {epochs}, {batch_paths}")
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    tokens, lengths = plain_lm_paths(model, prompt_ids, int(paths) + int(held_out),
                                     max_new_tokens, eos_token_id=eos_token_id, generator=gen)
    r = reward(tokens, lengths)
    if not isinstance(r, torch.Tensor) or not r.is_floating_point() or \
            r.shape != lengths.shape:
        raise ValueError(f"reward: expected a floating-point tensor of shape "
                         f"{tuple(lengths.shape)}, got {getattr(r, 'dtype', type(r))} "
                         f"{tuple(getattr(r, 'shape', ()))}")
    r = r.double()
    sample_s = time.perf_counter() - t0
    m = int(paths)
    held = (tokens[:, m:], lengths[:, m:], r[:, m:])
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses: list[float] = []
    valid: list[float] = []
    best, best_epoch = None, -1
    t0 = time.perf_counter()
    for ep in range(int(epochs)):
        perm = torch.randperm(m, generator=gen)
        total, count = 0.0, 0
        for i in range(0, m, int(batch_paths)):
            idx = perm[i:i + int(batch_paths)]
            opt.zero_grad()
            loss = lm_twist_loss(net, prompt_ids, tokens[:, idx], lengths[:, idx], r[:, idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
            count += idx.numel()
        losses.append(total / count)
        with torch.no_grad():
            valid.append(float(lm_twist_loss(net, prompt_ids, *held)))
        if valid[-1] <= min(valid):
            best, best_epoch = copy.deepcopy(net.state_dict()), ep
        if log is not None:
            log(f"epoch {ep:3d}  t={time.perf_counter() - t0:6.1f}s  loss={losses[-1]:.4f}  "
                f"held-out={valid[-1]:.4f}")
    net.load_state_dict(best)
    net.requires_grad_(False)
    return net, {"paths": m, "held_out": int(held_out), "sample_seconds": sample_s,
                 "fit_seconds": time.perf_counter() - t0, "loss": losses,
                 "held_out_loss": valid, "best_epoch": best_epoch,
                 "label_mean": float((r - net.upper).exp().mean())}
