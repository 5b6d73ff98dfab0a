"""``pathsmc demo lm``: constrained generation from the shipped character GPT-2 — a lipogram.

Target: continuations ``x`` of a prompt (ending at newline/EOS or after ``max_new_tokens``
characters) from the model ``p``, conditioned on containing none of the ``exclude`` letters::

    π(x) = p(x) · 1[x avoids them] / Z,     Z = P_p(x avoids them).

Three samplers, all with the locally constrained proposal ``q(x_k | x_<k) ∝ p · 1[allowed]``:

- **masked sampling** (the usual "logit mask" decoding): draws from ``q`` and stops there. Its
  distribution is *not* π: ``q(x) = p(x) / w(x)`` with ``w(x) = Π_k Σ_allowed p(· | x_<k)``, so it
  over-represents prefixes that run into contexts where the excluded letters were likely. Its
  distance to π is ``KL(q‖π) = log Z − E_q[log w]`` (nats), estimated here;
- **importance sampling**: the same draws weighted by ``w`` (unbiased Ẑ, no resampling);
- **SMC** (:func:`pathsmc.integrations.transformers.lm_smc`): the same proposal and weights with
  adaptive resampling; KV caches follow the resampled ancestors.

Reported: log Ẑ (mean ± sd over independent runs) per N for IS and SMC, a reference log Z
(pooled Ẑ of the largest-N SMC runs, ± its standard error), the KL of masked sampling, and the
expectations of a few statistics under masked sampling vs the SMC estimate of π.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["LMDemoResult", "format_lm_demo", "run_lm_demo", "sequence_stats"]


@dataclass
class LMDemoResult:
    """What :func:`run_lm_demo` returns (log-Ẑ arrays are ``(runs,)`` per N)."""

    prompt: str
    exclude: str
    max_new_tokens: int
    particles: list[int]
    smc_log_z: dict[int, torch.Tensor]
    is_log_z: dict[int, torch.Tensor]
    ref_log_z: float
    ref_se: float
    kl_masked: float
    stats_masked: dict[str, float]
    stats_smc: dict[str, float]
    samples_masked: list[str]
    samples_smc: list[str]
    seconds: float


@torch.no_grad()
def sequence_stats(model: Any, prompt_ids: torch.Tensor, tokens: torch.Tensor,
                   lengths: torch.Tensor, eos_token_id: int) -> dict[str, torch.Tensor]:
    """Per-sequence statistics ``(B, N)``: ``logp_per_char`` (log p(x) / length under the
    unconstrained model, EOS included), ``length`` (characters before EOS) and ``eos``
    (1 if the sequence ended with EOS within the limit)."""
    b, n, ell = tokens.shape
    p = prompt_ids.shape[1]
    ids = torch.cat([prompt_ids[:, None].expand(b, n, p), tokens], -1).reshape(b * n, p + ell)
    logp = model(input_ids=ids).logits[:, p - 1:-1].double().log_softmax(-1)
    tok_lp = logp.gather(-1, tokens.reshape(b * n, ell, 1))[..., 0].view(b, n, ell)
    valid = torch.arange(ell) < lengths[..., None]
    total = (tok_lp * valid).sum(-1)
    ended = (tokens == eos_token_id) & valid
    eos = ended.any(-1)
    return {"logp_per_char": total / lengths, "length": (lengths - eos.long()).double(),
            "eos": eos.double()}


def _pick(texts: list[str], weights: torch.Tensor, k: int, gen: torch.Generator) -> list[str]:
    idx = torch.multinomial(weights, k, replacement=True, generator=gen).tolist()
    return [texts[i].rstrip("\n") for i in idx]


def run_lm_demo(*, particles: Sequence[int] = (16, 64, 256), runs: int = 8,
                max_new_tokens: int = 40, exclude: str = "e", prompt: str = "return the ",
                seed: int = 0, threads: int | None = 1,
                log: Callable[[str], None] | None = print) -> LMDemoResult:
    """Run the lipogram demo (see the module docstring); ``log`` gets progress lines.

    Args:
        particles: the N of each SMC/IS run (the largest also gives the reference and stats).
        runs: independent runs per N (batched as rows), for the spread of log Ẑ.
        max_new_tokens: the longest continuation (characters, EOS included).
        exclude: letters the continuation must avoid.
        prompt: the text to continue (lower-cased; any character of the alphabet).
        seed, threads: randomness; torch threads (None: leave as is).
    """
    from pathsmc.diagnostics import CollapseWarning
    from pathsmc.integrations.transformers import lm_smc
    from pathsmc.models.char_lm import load_char_lm

    particles = sorted({int(n) for n in particles})
    if not particles or particles[0] < 2:
        raise ValueError(f"particles: expected values >= 2, got {particles}")
    if runs < 2:
        raise ValueError(f"runs: expected >= 2, got {runs}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, tok = load_char_lm()
    if not exclude or not all(c in tok.alphabet for c in exclude.lower()):
        raise ValueError(f"exclude: expected letters of {tok.alphabet!r}, got {exclude!r}")
    ctx = model.config.n_positions
    if len(prompt) + max_new_tokens > ctx:
        raise ValueError(f"prompt + max_new_tokens: {len(prompt)} + {max_new_tokens} exceeds the "
                         f"model's context of {ctx} characters")
    allowed = tok.mask(exclude)
    prompt_ids = torch.tensor([tok.encode(prompt)]).expand(runs, -1).contiguous()
    eos = tok.eos_token_id
    gen = torch.Generator().manual_seed(seed)
    say = log or (lambda _s: None)
    say(f"lipogram: continuations of {prompt!r} with no {exclude!r}, at most {max_new_tokens} "
        f"characters; {runs} runs per N")
    smc_z, is_z, last = {}, {}, {}
    for n in particles:
        common = dict(allowed=allowed, eos_token_id=eos, generator=gen, tokenizer=tok)
        with warnings.catch_warnings():  # IS degenerates by design: ESS is printed instead
            warnings.simplefilter("ignore", CollapseWarning)
            smc = lm_smc(model, prompt_ids, n, max_new_tokens, **common)
            imp = lm_smc(model, prompt_ids, n, max_new_tokens, threshold=0.0, **common)
        smc_z[n], is_z[n] = smc.log_z, imp.log_z
        last = {"smc": smc, "is": imp}
        say(f"  N={n:5d}  SMC log Ẑ {smc.log_z.mean():8.3f} ± {smc.log_z.std():.3f} "
            f"(final ESS {smc.ess[-1].mean():6.1f})   IS log Ẑ {imp.log_z.mean():8.3f} ± "
            f"{imp.log_z.std():.3f} (final ESS {imp.ess[-1].mean():6.1f})")
    # reference: the pooled (unbiased) Ẑ of the largest-N SMC rows; SE by the delta method
    lz = smc_z[particles[-1]]
    ref = float(torch.logsumexp(lz, 0) - math.log(runs))
    ratio = (lz - ref).exp()
    ref_se = float(ratio.std() / math.sqrt(runs))
    smc, imp = last["smc"], last["is"]
    # masked sampling = the IS draws, unweighted; E_q[log w] over every draw
    kl = ref - float(imp.logw.mean())
    st_q = sequence_stats(model, prompt_ids, imp.tokens, imp.lengths, eos)
    st_p = sequence_stats(model, prompt_ids, smc.tokens, smc.lengths, eos)
    w = smc.weights / runs  # each row's weights sum to 1; pool the rows equally
    stats_q = {k: float(v.mean()) for k, v in st_q.items()}
    stats_p = {k: float((v * w).sum()) for k, v in st_p.items()}
    flat = [t for row in smc.texts for t in row]
    samples_p = _pick(flat, w.flatten(), 3, gen)
    samples_q = [t.rstrip("\n") for t in imp.texts[0][:3]]
    return LMDemoResult(prompt, exclude, max_new_tokens, particles, smc_z, is_z, ref, ref_se,
                        kl, stats_q, stats_p, samples_q, samples_p, time.perf_counter() - t0)


def format_lm_demo(r: LMDemoResult) -> list[str]:
    """The demo's summary lines."""
    n = r.particles[-1]
    lines = [f"reference log Z = {r.ref_log_z:.3f} ± {r.ref_se:.3f} (pooled SMC, N={n}); "
             f"P(no {r.exclude!r}) ≈ {math.exp(r.ref_log_z):.2e}",
             f"masked sampling (logit mask, no weights) is biased: KL(q‖π) ≈ {r.kl_masked:.2f} "
             "nats",
             f"{'statistic':22s} {'masked sampling':>16s} {'SMC (π)':>10s}"]
    names = {"logp_per_char": "log p(x) per char", "length": "length (chars)",
             "eos": "P(ends by newline)"}
    for k, label in names.items():
        lines.append(f"{label:22s} {r.stats_masked[k]:16.3f} {r.stats_smc[k]:10.3f}")
    lines.append("masked samples:")
    lines += [f"  {r.prompt}{s}" for s in r.samples_masked]
    lines.append(f"SMC samples (N={n}, drawn by weight):")
    lines += [f"  {r.prompt}{s}" for s in r.samples_smc]
    lines.append(f"done in {r.seconds:.1f} s")
    return lines
