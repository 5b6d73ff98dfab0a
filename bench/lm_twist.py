"""A learned token-local twist on the shipped character GPT-2: the lipogram of ``pathsmc demo
lm`` (continuations of "return the " with no 'e', at most 40 characters).

1. Sample ``--paths`` continuations of the plain LM; label each 1 if it avoids the letters
   (reward 0 / −inf, upper 0) and fit :class:`pathsmc.learn.PrefixValue` (``fit_lm_twist``):
   ``Ṽ(x_{1:k}, w) ≈ log P_p(the rest avoids them | x_{1:k}, w)``.
2. An independent log Z: the fraction of ``--reference`` further plain samples that avoid them.
3. ``--runs`` independent rows at each N: SMC with the demo's proposal (the LM masked to the
   allowed letters, exact locally constrained weights) against twisted SMC with the learned
   twist (``proposal="twisted"``, same mask). Reported: log Ẑ mean and sd over rows, its
   z-score against the reference, the mean minimum ESS, time.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/lm_twist.py
"""

from __future__ import annotations

import argparse
import datetime
import math
import time
import warnings

import torch
from machine import RESULTS, device_name, write_results  # bench/machine.py

from pathsmc.diagnostics import CollapseWarning
from pathsmc.integrations.transformers import lm_smc
from pathsmc.learn import fit_lm_twist, plain_lm_paths
from pathsmc.models.char_lm import load_char_lm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", default="return the ")
    ap.add_argument("--exclude", default="e")
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--paths", type=int, default=16384)
    ap.add_argument("--reference", type=int, default=32768)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--particles", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--runs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stem", default="lm-twist-cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_char_lm()
    allowed = tok.mask(a.exclude)
    banned = torch.tensor([i for i in range(len(allowed)) if not bool(allowed[i])])
    eos = tok.eos_token_id

    def reward(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[-1])
        hit = torch.isin(tokens, banned) & (pos < lengths[..., None])
        return torch.where(hit.any(-1), -math.inf, 0.0).double()

    prompt1 = torch.tensor([tok.encode(a.prompt)])
    net, fit = fit_lm_twist(model, prompt1, reward, max_new_tokens=a.tokens, paths=a.paths,
                            eos_token_id=eos, epochs=a.epochs, seed=a.seed, log=print)
    print(f"fit: {fit['sample_seconds']:.0f} s sampling, {fit['fit_seconds']:.0f} s fitting, "
          f"label mean {fit['label_mean']:.4f}")
    t0 = time.perf_counter()
    toks, lens = plain_lm_paths(model, prompt1, a.reference, a.tokens, eos_token_id=eos,
                                generator=torch.Generator().manual_seed(a.seed + 1))
    hits = reward(toks, lens).isfinite().double().flatten()
    p = float(hits.mean())
    ref = {"log_z": math.log(p), "se": math.sqrt((1 - p) / (p * hits.numel())),
           "samples": a.reference, "seconds": time.perf_counter() - t0}
    print(f"reference: P(avoid) = {p:.4f}, log Z = {ref['log_z']:.3f} ± {ref['se']:.3f}")
    prompts = prompt1.expand(a.runs, -1).contiguous()
    rows = []
    for n in a.particles:
        for method in ("masked-lm", "learned-twist"):
            kw = {"proposal": "lm"} if method == "masked-lm" else {
                "proposal": "twisted", "twist": net.twist(prompts)}
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CollapseWarning)
                res = lm_smc(model, prompts, n, a.tokens, allowed=allowed, eos_token_id=eos,
                             generator=torch.Generator().manual_seed(a.seed + n), **kw)
            sec = time.perf_counter() - t0
            lz = res.log_z.double()
            z = (float(lz.mean()) - ref["log_z"]) / math.sqrt(
                float(lz.var()) / a.runs + ref["se"] ** 2)
            rows.append({"particles": n, "method": method, "log_z_mean": float(lz.mean()),
                         "log_z_sd": float(lz.std()), "z": z,
                         "log_mean_z": float(torch.logsumexp(lz, 0) - math.log(a.runs)),
                         "min_ess": float(res.ess.double().min(0).values.mean()),
                         "seconds": sec})
            print(f"N={n:4d} {method:14s} log Ẑ {lz.mean():.3f} ± sd {lz.std():.3f}  "
                  f"z {z:+.1f}  min ESS {rows[-1]['min_ess']:.1f}  {sec:.1f} s")
    data = {"device": f"{device_name('cpu')}, {a.threads} thread(s)",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "config": vars(a), "fit": fit, "reference": ref, "rows": rows}
    lines = [f"# Learned twist on the character GPT-2 lipogram ({data['device']})", "",
             f"Continuations of {a.prompt!r} with no {a.exclude!r}, at most {a.tokens} "
             f"characters; {a.runs} independent rows per N, seed {a.seed}. Twist: PrefixValue "
             f"fit on {a.paths} plain paths ({fit['sample_seconds']:.0f} s sampling, "
             f"{fit['fit_seconds']:.0f} s fitting, {a.epochs} epochs; {100 * fit['label_mean']:.2f}"
             f" % of the paths avoid the letters). Reference log Z = {ref['log_z']:.3f} ± "
             f"{ref['se']:.3f} from {a.reference} further plain samples.", "",
             "| N | method | log Ẑ mean | log Ẑ sd | z vs reference | log mean Ẑ | min ESS | "
             "time s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['particles']} | {r['method']} | {r['log_z_mean']:.3f} | "
                     f"{r['log_z_sd']:.3f} | {r['z']:+.1f} | {r['log_mean_z']:.3f} | "
                     f"{r['min_ess']:.1f} | {r['seconds']:.1f} |")
    path = write_results(RESULTS, a.stem, data, lines)
    print("\n".join(lines))
    print(f"wrote {path}.{{json,md}}")


if __name__ == "__main__":
    main()
