"""Twisted SMC over a causal LM (pathsmc.integrations.transformers), checked by exact enumeration.

A tiny random GPT-2 (vocabulary 6, EOS = 0) with at most 4 new tokens: every continuation is
enumerated through the LM itself, giving exact log Z and exact soft values of every prefix."""

from __future__ import annotations

import math
from functools import cache, lru_cache

import pytest
import torch

pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from pathsmc.integrations.transformers import (  # noqa: E402
    CachedLMParticles,
    cache_tensors,
    lm_smc,
    set_cache_tensors,
)

V, EOS, T = 6, 0, 4
PROMPTS = torch.tensor([[1, 2], [3, 4]])


@pytest.fixture(autouse=True)
def _one_thread(restore_threads):
    torch.set_num_threads(1)


@lru_cache(maxsize=1)
def tiny_lm() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                     bos_token_id=EOS, eos_token_id=EOS, initializer_range=0.6)
    return GPT2LMHeadModel(cfg).eval()


def reward_fn(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """r = 0.7 · (number of token 3) − 0.4 · length (generated tokens before EOS)."""
    pos = torch.arange(tokens.shape[-1])
    valid = pos < lengths[..., None]
    return (0.7 * ((tokens == 3) & valid).sum(-1) - 0.4 * lengths).double()


def allowed_fn(k: int, tokens: torch.Tensor) -> torch.Tensor:
    """No token 5, and no token repeated twice in a row (prefix-dependent)."""
    b, n = tokens.shape[:2]
    m = torch.ones(b, n, V, dtype=torch.bool)
    m[..., 5] = False
    if k > 0:
        m.scatter_(-1, tokens[..., -1:], False)
    return m


@torch.no_grad()
def enumerate_values(row: int, constrained: bool) -> tuple[float, dict]:
    """Exact (log Z, child values): ``child[prefix]`` is the (V,) tensor of exact twists
    ``Ṽ_{k+1}(prefix, w) = log E_p[1[allowed] exp r | prefix + w]``, by recursion over the
    tree of continuations with the LM's own next-token probabilities (no cache)."""
    lm = tiny_lm()
    prompt = PROMPTS[row].tolist()
    child: dict[tuple, torch.Tensor] = {}

    def leaf(seq: tuple) -> float:
        toks = torch.tensor(list(seq) + [EOS] * (T - len(seq)))[None, None]
        length = torch.tensor([[len(seq)]])
        return float(reward_fn(toks, length)[0, 0])

    def value(prefix: tuple) -> float:  # V(prefix) for a live (unfinished) prefix
        logits = lm(input_ids=torch.tensor([prompt + list(prefix)])).logits[0, -1]
        log_p = logits.double().log_softmax(-1)
        vals = torch.empty(V, dtype=torch.float64)
        for w in range(V):
            seq = prefix + (w,)
            vals[w] = leaf(seq) if (w == EOS or len(seq) == T) else value(seq)
        child[prefix] = vals
        terms = log_p + vals
        if constrained:
            a = allowed_fn(len(prefix), torch.tensor(list(prefix), dtype=torch.long)[None, None])
            terms = terms.masked_fill(~a[0, 0], -math.inf)
        return float(torch.logsumexp(terms, 0))

    return value(()), child


@cache
def exact(constrained: bool) -> tuple[torch.Tensor, list[dict]]:
    res = [enumerate_values(r, constrained) for r in range(PROMPTS.shape[0])]
    return torch.tensor([r[0] for r in res], dtype=torch.float64), [r[1] for r in res]


def table_twist(children: list[dict], noise: float = 0.0, seed: int = 0):
    """The exact twists looked up by prefix (plus fixed per-prefix noise when ``noise > 0``)."""
    g = torch.Generator().manual_seed(seed)
    noisy = [{p: v + noise * torch.randn(V, generator=g, dtype=torch.float64) for p, v in c.items()}
             for c in children]

    def twist(k: int, tokens: torch.Tensor) -> torch.Tensor:
        b, n = tokens.shape[:2]
        out = torch.zeros(b, n, V, dtype=torch.float64)
        rows = tokens.tolist()
        for i in range(b):
            for j in range(n):
                out[i, j] = noisy[i].get(tuple(rows[i][j]), out[i, j])  # finished: unused
        return out

    return twist


def run(constrained: bool, proposal: str, twist=None, n: int = 32, seed: int = 0, **kw):
    return lm_smc(tiny_lm(), PROMPTS, n, T, twist=twist, reward=reward_fn,
                  allowed=allowed_fn if constrained else None, proposal=proposal,
                  eos_token_id=EOS, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("constrained", [False, True])
def test_exact_twists_give_equal_weights_and_exact_log_z(constrained):
    log_z, children = exact(constrained)
    assert (log_z.diff().abs() > 0.05).all()  # rows differ: the check sees the prompt
    res = run(constrained, "twisted", table_twist(children), n=16, threshold=1.0)
    assert torch.allclose(res.log_z, log_z, atol=1e-5), (res.log_z, log_z)
    spread = res.logw.max(-1).values - res.logw.min(-1).values
    assert (spread < 1e-5).all(), spread
    assert res.resampled[:-1].all()  # resampled every step, caches gathered each time


@pytest.mark.parametrize("constrained,proposal,noise", [(False, "twisted", 0.7),
                                                        (True, "twisted", 0.7),
                                                        (True, "lm", 0.0),
                                                        (False, "lm", 0.0)])
def test_unbiased_z_with_perturbed_or_no_twists(constrained, proposal, noise):
    """Mean of Ẑ over 40 independent runs of 16 particles matches Z within 4.5 standard errors."""
    log_z, children = exact(constrained)
    twist = table_twist(children, noise, seed=3) if noise > 0 else None
    reps = 40
    prompts = PROMPTS.repeat_interleave(reps, 0)
    idx = torch.arange(PROMPTS.shape[0]).repeat_interleave(reps).tolist()

    def rep_twist(k, tokens):  # rows are replicates of the two prompts
        out = twist(k, tokens.reshape(PROMPTS.shape[0], reps * 16, k))
        return out.view(len(idx), -1, V)

    res = lm_smc(tiny_lm(), prompts, 16, T, twist=rep_twist if twist else None, reward=reward_fn,
                 allowed=allowed_fn if constrained else None, proposal=proposal,
                 eos_token_id=EOS, generator=torch.Generator().manual_seed(11), threshold=0.5)
    ratio = (res.log_z.view(2, reps) - log_z[:, None]).exp()  # Ẑ / Z
    mean, se = ratio.mean(1), ratio.std(1) / math.sqrt(reps)
    assert ((mean - 1).abs() < 4.5 * se + 1e-9).all(), (mean, se)
    assert (se > 1e-4).all() if noise > 0 or proposal == "lm" else True


def test_cache_gather_matches_recomputed_prefix():
    """After several resamplings the gathered cache gives the same next-token log-probs as
    running the LM on the full prefix of each particle."""
    lm = tiny_lm()
    parts = CachedLMParticles(lm, PROMPTS, 8)
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        w = torch.randint(0, V, (2, 8), generator=g)
        logw = torch.randn(2, 8, dtype=torch.float64, generator=g) * 2
        (w,), _, anc, res = parts.resample([w], logw, 1.0, "multinomial", g)
        assert res.all() and not (anc == torch.arange(8)).all()
        parts.advance(w)
    full = torch.cat([PROMPTS[:, None].expand(2, 8, 2), parts.tokens], -1).reshape(16, -1)
    want = lm(input_ids=full).logits[:, -1].double().log_softmax(-1).view(2, 8, V)
    assert torch.allclose(parts.log_probs, want, atol=1e-5)


def test_legacy_tuple_cache_round_trip():
    t = [torch.randn(4, 2, 3, 5) for _ in range(4)]
    legacy = ((t[0], t[1]), (t[2], t[3]))
    assert all(a is b for a, b in zip(cache_tensors(legacy), t, strict=True))
    new = set_cache_tensors(legacy, [x + 1 for x in t])
    assert isinstance(new, tuple) and torch.equal(new[1][0], t[2] + 1)


def test_user_function_checks_name_the_function():
    bad_shape = lambda k, tokens: torch.zeros(2, 4, V + 1)  # noqa: E731
    with pytest.raises(ValueError, match="twist"):
        lm_smc(tiny_lm(), PROMPTS, 4, 2, twist=bad_shape, proposal="twisted")
    with pytest.raises(ValueError, match="reward"):
        lm_smc(tiny_lm(), PROMPTS, 4, 2, reward=lambda t, n: torch.full((2, 4), math.nan))
    with pytest.raises(TypeError, match="allowed"):
        lm_smc(tiny_lm(), PROMPTS, 4, 2, allowed=lambda k, t: torch.ones(2, 4, V))
    with pytest.raises(ValueError, match="proposal"):
        lm_smc(tiny_lm(), PROMPTS, 4, 2, proposal="twisted")


def test_collapse_warning_and_paths():
    from pathsmc.diagnostics import CollapseWarning

    never = torch.zeros(V, dtype=torch.bool)
    with pytest.warns(CollapseWarning, match="non-finite"):
        res = lm_smc(tiny_lm(), PROMPTS, 4, 2, allowed=never)
    assert res.warnings and not torch.isfinite(res.log_z).any()
    res = run(False, "lm", n=8, record_paths=True)
    assert res.logw_history.shape == (T, 2, 8) and res.ancestors.shape == (T, 2, 8)
    assert (res.lengths >= 1).all() and (res.lengths <= T).all()
