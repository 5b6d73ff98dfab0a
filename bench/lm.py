"""Tokens/s of token-level SMC over a causal LM: KV caches gathered by pathsmc vs other ways.

Every method runs the same SMC: B = 1 prompt of P = 8 tokens, N particles, ``--tokens`` L new
tokens, proposal = the LM restricted to an allowed-token mask (locally constrained, increment
``log Σ_allowed p``), resampling at *every* step (``threshold = 1``, systematic: the worst case
for cache handling), same generator and the same order of random draws — so the methods follow
the same trajectories and their log Ẑ agree to rounding (checked: ``|Δ log Ẑ|`` against the
first method). They differ only in how the KV cache follows the resampled ancestors:

- ``pathsmc``: :func:`pathsmc.integrations.transformers.lm_smc` — tokens, per-particle state
  and every cache tensor gathered in place by one ``pathsmc.ops.adaptive_resample_`` call;
- ``recompute``: no cache; each step runs the model on the full prefix (prompt + generated
  tokens) of every particle (twisted-smc-lm's way);
- ``deepcopy``: each particle owns its cache (a list of ``(1, heads, len, dim)`` tensors); at
  resampling every particle is ``copy.deepcopy``-ed from its ancestor (hfppl's particle
  objects); the forward pass is still batched (per-particle caches concatenated, the output
  split back and cloned per particle) — kinder than one forward per particle;
- ``reorder``: one batched ``DynamicCache`` reordered by transformers' own beam-search
  ``Cache.reorder_cache(ancestors)`` (one ``index_select`` per layer tensor).

Models: ``char`` — the shipped character GPT-2 (pathsmc.models.char_lm; mask: no letter 'e');
``gpt2-small`` — ``GPT2Config()`` defaults (12 layers, width 768, vocabulary 50257, 124 M
parameters), random weights (mask: a fixed random half of the vocabulary). Time: wall time of
a whole run (prefill included) after warm-up runs (each method with 2 tokens, then one
full-length run: the first long run of a size pays the memory allocator's growth, which would
bias whichever method goes first); pathsmc and reorder, the close pair, are timed
``--repeats`` times in alternating order and the minimum is kept; tokens/s = N·L / seconds.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/lm.py [--threads 1] [--quick]

Results: bench/results/lm-cpu.{json,md}.

``--memory``: instead of timing, the peak memory of each method's run, each in a fresh
process (peak RSS during the run minus RSS before it; glibc serves these large blocks with
mmap, so freed memory goes back and the peak is the run's own). Results:
bench/results/lm-memory-cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch
from machine import RESULTS, cpu_name, write_results  # bench/machine.py

import pathsmc
from pathsmc import ops
from pathsmc.integrations.transformers import (
    _forward_kwargs,
    _output_cache,
    _sample,
    cache_tensors,
    lm_smc,
    set_cache_tensors,
)

METHODS = ("pathsmc", "reorder", "deepcopy", "recompute")


def _log_probs(out) -> torch.Tensor:
    return out.logits[:, -1].to(torch.float64).log_softmax(-1)


@torch.no_grad()
def smc_baseline(model, prompt: torch.Tensor, n: int, steps: int, allowed: torch.Tensor,
                 method: str, gen: torch.Generator) -> float:
    """The SMC of ``lm_smc`` (proposal 'lm' + mask, threshold 1) with another cache strategy;
    returns log Ẑ."""
    arg = _forward_kwargs(model)
    p = prompt.shape[1]
    out = model(input_ids=prompt, use_cache=method != "recompute")
    log_p = _log_probs(out).expand(n, -1)
    if method != "recompute":
        cache = _output_cache(out)
        kv = [t.expand(n, *t.shape[1:]).contiguous() for t in cache_tensors(cache)]
        cache = set_cache_tensors(cache, kv)
        if method == "deepcopy":
            own = [[t[i:i + 1].clone() for t in kv] for i in range(n)]
    tokens = torch.empty(1, n, 0, dtype=torch.int64)
    logw = torch.zeros(1, n, dtype=torch.float64)
    for k in range(steps):
        logits = log_p.masked_fill(~allowed, -math.inf)[None]
        log_norm = torch.logsumexp(logits, -1)
        w = _sample(logits, gen)
        logw = logw + log_norm
        tokens = torch.cat([tokens, w[..., None]], -1)
        if k == steps - 1:
            break
        (tokens, w), logw, anc, _ = ops.adaptive_resample([tokens, w], logw, 1.0, "systematic",
                                                         generator=gen)
        if method == "recompute":
            ids = torch.cat([prompt.expand(n, p), tokens[0]], -1)
            log_p = _log_probs(model(input_ids=ids, use_cache=False))
            continue
        if method == "reorder":
            cache.reorder_cache(anc[0])
        elif method == "deepcopy":
            own = [copy.deepcopy(own[a]) for a in anc[0].tolist()]
            cache = set_cache_tensors(cache, [torch.cat([o[j] for o in own])
                                              for j in range(len(own[0]))])
        out = model(input_ids=w.reshape(n, 1), use_cache=True, **{arg: cache})
        cache = _output_cache(out)
        log_p = _log_probs(out)
        if method == "deepcopy":
            kv = cache_tensors(cache)
            own = [[t[i:i + 1].clone() for t in kv] for i in range(n)]
    return float(torch.logsumexp(logw, -1) - math.log(n))


def run(model, prompt, n, steps, allowed, method, seed) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    if method == "pathsmc":
        r = lm_smc(model, prompt, n, steps, allowed=allowed, threshold=1.0, generator=gen)
        lz = float(r.log_z[0])
    else:
        lz = smc_baseline(model, prompt, n, steps, allowed, method, gen)
    return time.perf_counter() - t0, lz


def build(name: str):
    """(model, prompt (1, 8), allowed mask, description)."""
    if name == "char":
        from pathsmc.models.char_lm import load_char_lm

        model, tok = load_char_lm()
        prompt = torch.tensor([tok.encode("return a")])
        return model, prompt, tok.mask("e"), "shipped char GPT-2 (0.8 M params, V=47), no 'e'"
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    g = torch.Generator().manual_seed(0)
    v = model.config.vocab_size
    prompt = torch.randint(0, v, (1, 8), generator=g)
    allowed = torch.rand(v, generator=g) < 0.5
    return model, prompt, allowed, "GPT-2-small config, random weights (124 M, V=50257)"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_child(name: str, method: str, n: int, steps: int, seed: int) -> None:
    """One run in this (fresh) process; prints a JSON line with the run's peak memory."""
    model, prompt, allowed, _ = build(name)
    run(model, prompt, 4, 2, allowed, method, seed)  # imports and code paths
    before = _rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sec, lz = run(model, prompt, n, steps, allowed, method, seed)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cfg = model.config
    cache = (n * (prompt.shape[1] + steps) * cfg.n_layer * 2 * cfg.n_embd
             * next(model.parameters()).element_size())
    print(json.dumps({"model": name, "method": method, "particles": n, "tokens": steps,
                      "peak_run_bytes": peak - before, "peak_before_run_bytes": peak_before,
                      "rss_before_bytes": before, "final_cache_bytes": cache,
                      "seconds": sec, "log_z": lz}), flush=True)


def memory(args) -> None:
    """Peak memory of each method (fresh process each) → lm-memory-cpu.{json,md}."""
    rows = []
    for name in args.models.split(","):
        for n in args.particles:
            for m in args.methods.split(","):
                if m == "recompute" and name != "char" and n > args.recompute_max:
                    continue
                cmd = [sys.executable, __file__, "--threads", str(args.threads), "--peak-child",
                       f"{name},{m},{n},{args.tokens}"]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{name:10s} N={n:5d} L={args.tokens:3d} {m:10s} peak "
                      f"{row['peak_run_bytes'] / 2**20:8.0f} MiB (final cache "
                      f"{row['final_cache_bytes'] / 2**20:.0f} MiB), {row['seconds']:.1f} s",
                      flush=True)
    machine = cpu_name()
    meta = {"machine": machine, "threads": args.threads, "torch": torch.__version__,
            "pathsmc": pathsmc.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    lines = [f"# LM SMC peak memory — {machine}", "",
             f"torch {meta['torch']}, {meta['date']}. Each run in a fresh process: peak RSS "
             "during the run minus RSS before it, in MiB; the final cache is the KV cache's "
             "size after the last token (N · (P + L) · layers · 2 · width · 4 bytes). "
             "Resampling at every step, as in the timing table.", "",
             "| model | N | L | method | peak MiB | final cache MiB | peak / cache | s |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['particles']} | {r['tokens']} | {r['method']} | "
                     f"{r['peak_run_bytes'] / 2**20:.0f} | {r['final_cache_bytes'] / 2**20:.0f}"
                     f" | {r['peak_run_bytes'] / r['final_cache_bytes']:.2f} | "
                     f"{r['seconds']:.1f} |")
    path = write_results(args.out_dir, "lm-memory-cpu" + args.suffix,
                         {"meta": meta, "rows": rows}, lines)
    print("\n".join(lines))
    print(f"wrote {path}.json/.md")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--particles", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--small-particles", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--small-tokens", type=int, default=16)
    ap.add_argument("--recompute-max", type=int, default=64,
                    help="gpt2-small: run 'recompute' only up to this N (it is quadratic)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="char: timed runs of pathsmc and reorder (min reported; the slow "
                         "baselines run once)")
    ap.add_argument("--small-repeats", type=int, default=1, help="the same for gpt2-small")
    ap.add_argument("--models", default="char,gpt2-small")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="N=16, 8 tokens, char model only")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated subset of " + ",".join(METHODS) + " (pathsmc first)")
    ap.add_argument("--suffix", default="", help="appended to the results' file name")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--memory", action="store_true",
                    help="measure each method's peak memory (fresh process each) instead")
    ap.add_argument("--peak-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak_child:
        name, m, n, steps = args.peak_child.split(",")
        peak_child(name, m, int(n), int(steps), args.seed)
        return
    if args.memory:
        memory(args)
        return
    if args.quick:
        args.particles, args.tokens, args.models = [16], 8, "char"
    import transformers

    chosen = args.methods.split(",")
    if chosen[:2] != ["pathsmc", "reorder"] or not set(chosen) <= set(METHODS):
        raise SystemExit(f"--methods: expected pathsmc,reorder[,...] from {METHODS}")
    rows = []
    load0 = [round(v, 2) for v in os.getloadavg()]
    for name in args.models.split(","):
        model, prompt, allowed, desc = build(name)
        small = name != "char"
        sizes = args.small_particles if small else args.particles
        steps = args.small_tokens if small else args.tokens
        repeats = args.small_repeats if small else args.repeats
        for n in sizes:
            methods = [m for m in METHODS if m in chosen
                       and not (small and m == "recompute" and n > args.recompute_max)]
            for m in methods:
                run(model, prompt, n, 2, allowed, m, args.seed + 1)  # warm-up (code paths)
            # a full-length warm-up run: the first run of a size pays the allocator's growth
            run(model, prompt, n, steps, allowed, "reorder", args.seed + 1)
            secs: dict[str, list[float]] = {m: [] for m in methods}
            lzs: dict[str, float] = {}
            for r in range(repeats):  # the close pair alternates; the slow baselines run once
                pair = ["pathsmc", "reorder"][:: 1 if r % 2 == 0 else -1]
                for m in pair + (methods[2:] if r == 0 else []):
                    sec, lzs[m] = run(model, prompt, n, steps, allowed, m, args.seed)
                    secs[m].append(sec)
            for m in methods:
                sec = min(secs[m])
                row = {"model": name, "particles": n, "tokens": steps, "method": m,
                       "seconds": sec, "all_seconds": secs[m], "tokens_per_s": n * steps / sec,
                       "log_z": lzs[m], "abs_dlogz_vs_pathsmc": abs(lzs[m] - lzs["pathsmc"])}
                rows.append(row)
                print(f"{name:10s} N={n:5d} L={steps:3d} {m:10s} {sec:8.2f} s "
                      f"{row['tokens_per_s']:9.0f} tok/s  log Z^ {lzs[m]:.4f}  "
                      f"(runs: {', '.join(f'{s:.2f}' for s in secs[m])})", flush=True)
        del model
    machine = cpu_name()
    meta = {"machine": machine, "threads": args.threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "pathsmc": pathsmc.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
            "loadavg_start": load0, "loadavg_end": [round(v, 2) for v in os.getloadavg()]}
    lines = [f"# LM SMC tokens/s — {machine}, {args.threads} thread(s)", "",
             f"torch {meta['torch']}, transformers {meta['transformers']}, {meta['date']}, "
             f"load average {load0} → {meta['loadavg_end']}. Resampling at every step; "
             "tokens/s = N·L / wall seconds (higher is better); speed-up = pathsmc tokens/s "
             "over the method's. `bench/lm.py` says what each method does.", ""]
    for name in args.models.split(","):
        sel = [r for r in rows if r["model"] == name]
        if not sel:
            continue
        lines += [f"## {name}: L = {sel[0]['tokens']} new tokens", "",
                  "| N | " + " | ".join(f"{m} tok/s" for m in METHODS)
                  + " | pathsmc speed-up vs " + " / ".join(METHODS[1:])
                  + " | max abs(Δ log Ẑ) |", "|---" * (len(METHODS) + 3) + "|"]
        for n in sorted({r["particles"] for r in sel}):
            by = {r["method"]: r for r in sel if r["particles"] == n}
            base = by["pathsmc"]["tokens_per_s"]
            tps = [f"{by[m]['tokens_per_s']:.0f}" if m in by else "—" for m in METHODS]
            sp = [f"{base / by[m]['tokens_per_s']:.1f}×" if m in by else "—"
                  for m in METHODS[1:]]
            dz = max(r["abs_dlogz_vs_pathsmc"] for r in by.values())
            lines.append(f"| {n} | " + " | ".join(tps) + " | " + " / ".join(sp)
                         + f" | {dz:.1e} |")
        lines.append("")
    if meta["malloc_env"]:
        lines.insert(3, f"glibc malloc settings: {meta['malloc_env']}")
    path = write_results(args.out_dir,
                         "lm-cpu" + ("-quick" if args.quick else "") + args.suffix,
                         {"meta": meta, "rows": rows}, lines)
    print("\n".join(lines))
    print(f"wrote {path}.json/.md")


if __name__ == "__main__":
    main()
