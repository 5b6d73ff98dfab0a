"""Token-level twisted SMC over Hugging Face causal language models, KV caches resampled in place.

Target, for each prompt (row) and the generated continuation ``x = x_{1:L}`` (ending at EOS or
at ``max_new_tokens``)::

    π(x) ∝ p_LM(x | prompt) · Π_k 1[x_k allowed | x_{<k}] · exp(r(x)).

The weights are the soft-value (twisted SMC) weights of :mod:`pathsmc.twisted_sequence`: with
twists ``Ṽ_k(x_{1:k})`` (``Ṽ_0 = 0``), step k draws ``x_{k+1} ~ q`` and adds::

    log w += log p(x_{k+1} | x_{1:k}) + log 1[allowed] + Ṽ_{k+1}(x_{1:k+1}) − Ṽ_k(x_{1:k})
             − log q(x_{k+1} | x_{1:k}),

and at the end ``r(x) − Ṽ_L(x)``, so the increments telescope to ``p·1[allowed]·exp r / q``
and ``Ẑ`` is unbiased for ``Z = E_p[1[allowed] exp r]`` whatever the twists. Proposals:

- ``"lm"``: ``q ∝ p^(1/temperature)`` restricted to the top-k and to the allowed tokens (with
  temperature 1 and no top-k the increment of a hard constraint is the exact locally
  constrained weight ``log Σ_allowed p``);
- ``"twisted"``: ``q ∝ p · 1[allowed] · exp Ṽ_{k+1}(x_{1:k}, ·)`` over the vocabulary, for a
  token-local twist (one value per candidate next token); the increment is
  ``logsumexp_w(log p + log 1[allowed] + Ṽ_{k+1}) − Ṽ_k``. With the exact soft values every
  particle gets the same weight and ``log Ẑ = log Z`` exactly.

Particles finished by EOS are frozen: they take no increment and feed the pad token so that all
rows of the batch keep one cache length; their weights stay and their reward is applied at the
end. Each step runs one forward pass of the B·N new tokens on the cache; resampling gathers the
tokens, per-particle bookkeeping and every cache tensor (viewed as ``(B, N, heads, len, dim)``)
in one :func:`pathsmc.ops.adaptive_resample` call, then writes them back into the cache object.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pathsmc import ops as fused_ops
from pathsmc.diagnostics import CollapseWarning

__all__ = ["CachedLMParticles", "LMSMCResult", "cache_tensors", "lm_smc", "set_cache_tensors"]

TokenTwist = Callable[[int, torch.Tensor], torch.Tensor]
"""``twist(k, tokens)``: tokens ``(B, N, k)`` int64 generated so far → ``Ṽ_{k+1}(x_{1:k}, w)``
for every next token w, ``(B, N, V)`` float (−inf allowed)."""
Reward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``reward(tokens, lengths)``: tokens ``(B, N, L)`` int64 (pad after EOS), lengths ``(B, N)``
→ ``r(x)`` ``(B, N)`` float (−inf allowed)."""
Allowed = torch.Tensor | Callable[[int, torch.Tensor], torch.Tensor]
"""A bool mask of allowed next tokens: ``(V,)`` or ``(B, V)``, or ``allowed(k, tokens)`` →
``(B, N, V)`` bool."""


# ---- caches ----------------------------------------------------------------------------------

def cache_tensors(cache: Any) -> list[torch.Tensor]:
    """Every tensor of a KV cache, ``(B·N, heads, len, dim)`` each: a ``DynamicCache`` (its
    ``.layers[i].keys / .values`` in transformers 5.x, ``key_cache / value_cache`` lists in 4.x)
    or a legacy tuple of per-layer ``(key, value)`` tuples."""
    if isinstance(cache, (tuple, list)):
        return [t for layer in cache for t in layer]
    if hasattr(cache, "layers"):
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    if hasattr(cache, "key_cache"):
        return [t for pair in zip(cache.key_cache, cache.value_cache, strict=True) for t in pair]
    raise TypeError(f"cache: unsupported KV cache type {type(cache).__name__}")


def set_cache_tensors(cache: Any, tensors: list[torch.Tensor]) -> Any:
    """Write ``tensors`` (in :func:`cache_tensors` order) back: in place for cache objects; a
    new tuple of the same structure for legacy tuples. Returns the cache."""
    if isinstance(cache, (tuple, list)):
        it = iter(tensors)
        return type(cache)(tuple(next(it) for _ in layer) for layer in cache)
    if hasattr(cache, "layers"):
        for i, layer in enumerate(cache.layers):
            layer.keys, layer.values = tensors[2 * i], tensors[2 * i + 1]
        return cache
    cache.key_cache[:] = tensors[0::2]
    cache.value_cache[:] = tensors[1::2]
    return cache


def _forward_kwargs(model: Any) -> str:
    """The name of the cache argument of ``model.forward`` (``cache`` in transformers ≥ 5.2x,
    ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(out: Any) -> Any:
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


class CachedLMParticles:
    """B prompts × N particles of a causal LM sharing one KV cache of B·N rows.

    The prompt ``(B, P)`` int64 (equal lengths) is run once per row, then its cache is expanded
    to N particles. :attr:`log_probs` are the next-token log-probabilities ``(B, N, V)`` float64
    of the current prefixes; :meth:`advance` feeds one token per particle; :meth:`resample`
    gathers tokens, cache and any extra per-particle states with one in-place
    ``adaptive_resample_``.
    """

    @torch.no_grad()
    def __init__(self, model: Any, prompt_ids: torch.Tensor, particles: int):
        if prompt_ids.dim() != 2 or prompt_ids.dtype != torch.int64 or prompt_ids.shape[1] < 1:
            raise ValueError(f"prompt_ids: expected int64 (B, P) with P >= 1, got "
                             f"{prompt_ids.dtype} {tuple(prompt_ids.shape)}")
        if particles < 1:
            raise ValueError(f"particles: expected >= 1, got {particles}")
        self.model, self.batch, self.particles = model, prompt_ids.shape[0], particles
        self._cache_arg = _forward_kwargs(model)
        b, n = self.batch, particles
        out = model(input_ids=prompt_ids, use_cache=True)
        cache = _output_cache(out)
        expanded = [t[:, None].expand(b, n, *t.shape[1:]).reshape(b * n, *t.shape[1:])
                    for t in cache_tensors(cache)]
        self.cache = set_cache_tensors(cache, expanded)
        self.prompt = prompt_ids
        self.tokens = torch.empty(b, n, 0, dtype=torch.int64, device=prompt_ids.device)
        last = out.logits[:, -1].to(torch.float64).log_softmax(-1)
        self.log_probs = last[:, None].expand(b, n, -1).contiguous()

    @property
    def vocab(self) -> int:
        return self.log_probs.shape[-1]

    @torch.no_grad()
    def advance(self, next_tokens: torch.Tensor) -> None:
        """Append ``next_tokens`` ``(B, N)`` and run one forward pass on the cache."""
        b, n = self.batch, self.particles
        self.tokens = torch.cat([self.tokens, next_tokens[..., None]], -1)
        out = self.model(input_ids=next_tokens.reshape(b * n, 1), use_cache=True,
                         **{self._cache_arg: self.cache})
        self.cache = _output_cache(out)
        self.log_probs = out.logits[:, -1].to(torch.float64).log_softmax(-1).view(b, n, -1)

    def resample(self, extra: list[torch.Tensor], logw: torch.Tensor, threshold: float,
                 scheme: str, generator: torch.Generator | None, *,
                 gather_log_probs: bool = True
                 ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Adaptive resampling of the rows with ESS < ``threshold``·N: gathers tokens, next-token
        log-probabilities, every cache tensor and ``extra`` (each ``(B, N, ...)``) in one
        in-place op call (:func:`pathsmc.ops.adaptive_resample_`), so the cache is never held
        twice: the extra memory is one row of one cache tensor on CPU, one cache tensor on
        CUDA. ``extra`` is copied first (the caller's tensors are not modified). Returns
        ``(extra gathered, logw, ancestors, resampled)``.

        ``gather_log_probs=False`` skips the ``(B, N, V)`` log-probabilities (a large copy for a
        large vocabulary) when :meth:`advance` follows at once; :attr:`log_probs` is then stale
        (None) until it does."""
        b, n = self.batch, self.particles
        # in place needs contiguous tensors; a tensor listed twice is gathered once
        kv = [t if t.is_contiguous() else t.contiguous() for t in cache_tensors(self.cache)]
        seen: set[int] = set()
        unique_kv = [t for t in kv if not (t.data_ptr() in seen or seen.add(t.data_ptr()))]
        self.tokens = self.tokens.contiguous()
        if gather_log_probs:
            self.log_probs = self.log_probs.contiguous()
        lp = [self.log_probs] if gather_log_probs else []
        extra = [e.clone(memory_format=torch.contiguous_format) for e in extra]
        states = [self.tokens, *lp, *extra, *(t.view(b, n, *t.shape[1:]) for t in unique_kv)]
        logw, anc, mask = fused_ops.adaptive_resample_(states, logw, threshold, scheme,
                                                       generator=generator)
        if not gather_log_probs:
            self.log_probs = None
        self.cache = set_cache_tensors(self.cache, kv)
        return extra, logw, anc, mask


# ---- the driver ------------------------------------------------------------------------------

@dataclass
class LMSMCResult:
    """What :func:`lm_smc` returns (histories have one entry per generated position).

    Attributes:
        tokens: generated token ids ``(B, N, L)`` (pad after EOS); ``lengths`` ``(B, N)``.
        logw: final log-weights ``(B, N)``; ``log_z`` ``(B,)`` estimates log Z per prompt.
        ess, resampled: ``(L, B)`` ESS before each step's resampling and whether it resampled.
        texts: decoded continuations ``[B][N]`` when a tokenizer was given.
        logw_history, ancestors: ``(L, B, N)`` per-step log-weights (before resampling) and
            ancestors, with ``tokens`` the detached paths (for learning twists); when
            ``record_paths``.
        warnings: collapse diagnostics (also raised as a :class:`CollapseWarning`).
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    logw: torch.Tensor
    log_z: torch.Tensor
    ess: torch.Tensor
    resampled: torch.Tensor
    texts: list[list[str]] | None = None
    logw_history: torch.Tensor | None = None
    ancestors: torch.Tensor | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def weights(self) -> torch.Tensor:
        """Normalized weights ``(B, N)``."""
        return fused_ops.normalize(self.logw)[0].exp()


def _check_values(name: str, v: Any, shape: tuple[int, ...], *, boolean: bool = False
                  ) -> torch.Tensor:
    """Check a user function's output once (host sync allowed: called before the loop)."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(v).__name__}")
    if tuple(v.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(v.shape)}")
    if boolean:
        if v.dtype != torch.bool:
            raise TypeError(f"{name}: expected a bool mask, got {v.dtype}")
        return v
    if not v.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating tensor, got {v.dtype}")
    if bool(torch.isnan(v).any()) or bool((v == math.inf).any()):
        raise ValueError(f"{name}: returned NaN or +inf (−inf is allowed)")
    return v


def _allowed_mask(allowed: Allowed | None, k: int, tokens: torch.Tensor, b: int, n: int,
                  v: int, check: bool) -> torch.Tensor | None:
    if allowed is None:
        return None
    if isinstance(allowed, torch.Tensor):
        m = allowed if allowed.dim() == 1 else allowed[:, None]
        return m.expand(b, n, v)
    m = allowed(k, tokens)
    return _check_values("allowed", m, (b, n, v), boolean=True) if check else m


def _proposal_logits(log_p: torch.Tensor, temperature: float, top_k: int | None
                     ) -> torch.Tensor:
    logits = log_p / temperature if temperature != 1.0 else log_p
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return logits


def _sample(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Gumbel-max draw per row (−inf logits never chosen when a finite one exists)."""
    u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return torch.argmax(logits - torch.log(-torch.log(u)), -1)


@torch.no_grad()
def lm_smc(
    model: Any,
    prompt_ids: torch.Tensor,
    particles: int,
    max_new_tokens: int,
    *,
    twist: TokenTwist | None = None,
    reward: Reward | None = None,
    allowed: Allowed | None = None,
    proposal: str = "lm",
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    threshold: float = 0.5,
    scheme: str = "systematic",
    generator: torch.Generator | None = None,
    tokenizer: Any = None,
    record_paths: bool = False,
) -> LMSMCResult:
    """Twisted SMC over the continuations of ``prompt_ids`` ``(B, P)`` under the causal LM
    ``model`` (any transformers ``AutoModelForCausalLM``-style model), ``particles`` per prompt.

    Args:
        twist: token-local twist ``twist(k, tokens (B, N, k)) -> (B, N, V)``, the soft value
            ``Ṽ_{k+1}`` of each candidate next token (the exact one is
            ``log E_p[1[allowed] exp r | x_{1:k+1}]``; for an EOS candidate or the last
            position, ``r`` of the finished sequence). None: ``Ṽ = 0`` (plain importance
            weights with resampling at the end).
        reward: terminal ``reward(tokens, lengths) -> (B, N)`` (None: 0).
        allowed: hard constraint, a bool mask of allowed next tokens (see :data:`Allowed`).
        proposal: ``"lm"`` (with ``temperature``/``top_k``) or ``"twisted"`` (needs ``twist``).
        eos_token_id: ends a particle (None: every particle runs ``max_new_tokens``);
            ``pad_token_id`` fills positions after EOS (default: the EOS id).
        threshold, scheme, generator: adaptive resampling (ESS < threshold·N) and randomness.
        tokenizer: anything with ``decode(list[int])``: fills ``texts``.
        record_paths: keep per-step log-weights and ancestors.

    The loop reads no device value; user functions are checked once on their first call.
    """
    if proposal not in ("lm", "twisted"):
        raise ValueError(f"proposal: expected 'lm' or 'twisted', got {proposal!r}")
    if proposal == "twisted" and twist is None:
        raise ValueError("proposal='twisted' needs a token-local twist")
    if proposal == "twisted" and (temperature != 1.0 or top_k is not None):
        raise ValueError("temperature/top_k apply to proposal='lm' only")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    if isinstance(allowed, torch.Tensor) and (allowed.dtype != torch.bool
                                              or allowed.dim() not in (1, 2)):
        raise ValueError(f"allowed: expected a bool mask (V,) or (B, V), got {allowed.dtype} "
                         f"{tuple(allowed.shape)}")
    pad = eos_token_id if pad_token_id is None else pad_token_id
    lm = CachedLMParticles(model, prompt_ids, particles)
    b, n, v = lm.batch, particles, lm.vocab
    if isinstance(allowed, torch.Tensor) and allowed.shape[-1] != v:
        raise ValueError(f"allowed: expected {v} entries (the LM's vocabulary), "
                         f"got {allowed.shape[-1]}")
    dev, f64 = prompt_ids.device, torch.float64
    logw = torch.zeros(b, n, dtype=f64, device=dev)
    v_prev = torch.zeros(b, n, dtype=f64, device=dev)
    done = torch.zeros(b, n, dtype=torch.bool, device=dev)
    lengths = torch.zeros(b, n, dtype=torch.int64, device=dev)
    ess_h, res_h, lw_h, anc_h = [], [], [], []
    for k in range(max_new_tokens):
        check = k == 0
        log_p = lm.log_probs
        mask = _allowed_mask(allowed, k, lm.tokens, b, n, v, check)
        base = log_p if mask is None else log_p.masked_fill(~mask, -math.inf)  # p·1[allowed]
        if twist is not None:
            v_next = twist(k, lm.tokens)
            if check:
                _check_values("twist", v_next, (b, n, v))
            v_next = v_next.to(f64)
        else:
            v_next = None  # Ṽ = 0
        if proposal == "twisted":
            logits = base + v_next
        else:
            logits = _proposal_logits(log_p, temperature, top_k)
            if mask is not None:
                logits = logits.masked_fill(~mask, -math.inf)
        log_norm = torch.logsumexp(logits, -1, keepdim=True)
        w = _sample(logits, generator)[..., None]
        log_q = logits.gather(-1, w)[..., 0] - log_norm[..., 0]
        vw = v_next.gather(-1, w)[..., 0] if v_next is not None else torch.zeros_like(v_prev)
        inc = base.gather(-1, w)[..., 0] + vw - v_prev - log_q
        # a particle with no admissible token dies (−inf), not NaN
        inc = torch.where(torch.isfinite(log_norm[..., 0]), inc, -math.inf)
        inc = torch.where(done, 0.0, inc)
        logw = logw + inc
        w = w[..., 0]
        if pad is not None:
            w = torch.where(done, pad, w)
        v_prev = torch.where(done, v_prev, vw)
        lengths = lengths + (~done).long()
        if eos_token_id is not None:
            done = done | (w == eos_token_id)
        ess_h.append(fused_ops.normalize(logw)[2])
        if k == max_new_tokens - 1:
            lm.tokens = torch.cat([lm.tokens, w[..., None]], -1)
            res_h.append(torch.zeros(b, dtype=torch.bool, device=dev))
            break
        if record_paths:
            lw_h.append(logw)
        # gather the new token with its ancestors, then one forward pass on the gathered cache
        (w, v_prev, done, lengths), logw, anc, res = lm.resample(
            [w, v_prev, done, lengths], logw, threshold, scheme, generator,
            gather_log_probs=False)
        res_h.append(res)
        if record_paths:
            anc_h.append(anc)
        lm.advance(w)
    if reward is not None:
        r = reward(lm.tokens, lengths)
        _check_values("reward", r, (b, n))
        logw = logw + r.to(f64) - v_prev
    elif twist is not None:
        logw = logw - v_prev
    log_z = torch.logsumexp(logw, -1) - math.log(n)
    ess = torch.stack(ess_h)
    ess[-1] = fused_ops.normalize(logw)[2]
    msgs = []
    if not bool(torch.isfinite(log_z).all()):
        bad = torch.nonzero(~torch.isfinite(log_z)).flatten().tolist()
        msgs.append(f"non-finite log Ẑ in rows {bad}")
    if n > 1 and bool((ess[-1] < 1.5).any()):
        msgs.append("final ESS ≈ 1 (collapse) in rows "
                    f"{torch.nonzero(ess[-1] < 1.5).flatten().tolist()}")
    if msgs:
        warnings.warn("lm_smc: " + "; ".join(msgs), CollapseWarning, stacklevel=2)
    texts = None
    if tokenizer is not None:
        toks, lens = lm.tokens.tolist(), lengths.tolist()
        texts = [[tokenizer.decode(toks[i][j][:lens[i][j]]) for j in range(n)] for i in range(b)]
    if record_paths:
        lw_h.append(logw)
        anc_h.append(torch.arange(n, device=dev).expand(b, n))
    return LMSMCResult(
        tokens=lm.tokens, lengths=lengths, logw=logw, log_z=log_z, ess=ess,
        resampled=torch.stack(res_h), texts=texts,
        logw_history=torch.stack(lw_h) if record_paths else None,
        ancestors=torch.stack(anc_h) if record_paths else None, warnings=msgs)
