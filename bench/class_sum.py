"""Is reward steering's Ẑ unbiased on a diffusers chain? The class-sum identity Σ_k Z_k = 1.

For a classifier reward r_k(x) = log p(k | x), Σ_k Z_k = E[Σ_k p(k | X)] = 1 exactly, for any
chain and any classifier: an exact answer that needs no reference sampler. Each replicate is
one row per class; the table gives the mean over replicates of Σ_k Ẑ_k with its SE.

1. ``exact``: the chain of the exact ε of N(0, I) data (DDPM, fixed_small, squaredcos, 50 steps,
   x̂₀ clipping, 8×8 states), so Tweedie's x̂₀ is the true posterior mean, with a random linear
   softmax classifier over 3 classes, ``tame`` (logits × 0.35 on 4×4 states: |Δr| per step well
   under a nat) and ``sharp`` (logits × 2 on 8×8: log p(k | x̂₀) moves by tens of nats between
   steps, like a trained CNN on Tweedie's x̂₀). FK (difference potentials) and TDS (guidance 1),
   with no resampling (threshold 0: pure importance sampling), adaptive (0.5) and every step (1).
   ``sharp, λ=ᾱ²``: the sharp case with ``potential_scale`` λ(t) = ᾱ_t² on the intermediate
   potentials (the final one stays r: same target and Z, tamer weights on the way).
2. ``digits`` (``--digits N,runs``): the shipped digits DDPM with its reward CNN, FK and TDS
   from t ≤ 0.3 (the demo's settings), 10 classes; ``--digits-scale`` adds λ(t) = ᾱ_t².

    nice -n 10 .venv/bin/python bench/class_sum.py [--digits 256,16] [--threads 1]

Results: bench/results/class-sum-cpu.{json,md} (rows of earlier runs that a run does not redo
are kept, e.g. ``--no-exact --digits 256,16 --digits-scale-only`` adds the scaled digits rows).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time
from pathlib import Path

import torch
from machine import RESULTS, cpu_name, write_results  # bench/machine.py

import pathsmc
from pathsmc.diffusion import steer
from pathsmc.integrations.diffusers import DiffusersModel
from pathsmc.models.exact_gaussian import ExactGaussianEps


def class_sums(log_z: torch.Tensor, reps: int, k: int) -> tuple[float, float, float]:
    """(mean, SE, max) over replicates of Σ_k Ẑ_k; rows are replicate-major."""
    tot = log_z.double().reshape(reps, k).exp().sum(1)
    return float(tot.mean()), float(tot.std()) / math.sqrt(reps), float(tot.max())


def alpha_bar_squared(scheduler):
    """λ(t) = ᾱ_t² of ``scheduler`` (t = timestep / num_train_timesteps)."""
    ac = scheduler.alphas_cumprod.double()
    steps = int(scheduler.config.num_train_timesteps)
    return lambda t: float(ac[min(int(round(t * steps)), steps - 1)]) ** 2


def exact_case(sharp: bool, guidance: float, threshold: float, n: int, reps: int,
               seed: int, scaled: bool = False) -> dict:
    import diffusers

    k = 3
    shape, scale = ((1, 8, 8), 2.0) if sharp else ((1, 4, 4), 0.35)
    d = shape[1] * shape[2]
    w = torch.randn(d, k, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    classes = torch.arange(k).repeat(reps)

    def reward(im):
        lp = (scale * im.double().flatten(2) @ w).log_softmax(-1)
        return lp.gather(-1, classes.view(-1, 1, 1).expand(*lp.shape[:2], 1))[..., 0]

    sch = diffusers.DDPMScheduler(variance_type="fixed_small", clip_sample=True,
                                  beta_schedule="squaredcos_cap_v2")
    model = DiffusersModel(ExactGaussianEps(sch), sch, sample_shape=shape, chunk_size=1 << 20,
                           potential_scale=alpha_bar_squared(sch) if scaled else None)
    t0 = time.perf_counter()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = steer(model, "reward", reward=reward, guidance=guidance, particles=n,
                    batch=k * reps, steps=50, threshold=threshold, seed=seed, progress=False)
    mean, se, mx = class_sums(res.log_z, reps, k)
    case = ("sharp" if sharp else "tame") + (", λ=ᾱ²" if scaled else "")
    return {"case": case, "method": "tds" if guidance else "fk",
            "threshold": threshold, "particles": n, "replicates": reps, "seed": seed,
            "class_sum": mean, "se": se, "max": mx, "min_ess": float(res.ess.min()),
            "seconds": time.perf_counter() - t0}


def digits_case(method: str, n: int, runs: int, seed: int, scaled: bool = False) -> dict:
    from pathsmc.commands.demo_digits import load_setup, run_method

    setup = load_setup("cpu")
    scale = alpha_bar_squared(setup.scheduler) if scaled else None
    r = run_method(setup, method, particles=n, runs=runs, steps=50, seed=seed,
                   potential_scale=scale)
    mean, se, mx = class_sums(r.log_z, runs, 10)
    lz = r.log_z.double().reshape(runs, 10)
    return {"case": "digits" + (", λ=ᾱ²" if scaled else ""), "method": method,
            "threshold": 0.5, "particles": n,
            "replicates": runs, "seed": seed, "class_sum": mean, "se": se, "max": mx,
            "min_ess": float(r.final_ess.min()), "seconds": r.seconds,
            "sd_log_z_per_class": [float(v) for v in lz.std(0)],
            "mean_log_z": float(lz.mean()),
            "log_mean_z_per_class": [float(v) for v in lz.exp().mean(0).log()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--digits", default="", help="N,runs for the digits model (slow)")
    ap.add_argument("--digits-scale", action="store_true",
                    help="digits: also with potential_scale λ(t) = ᾱ_t²")
    ap.add_argument("--digits-scale-only", action="store_true",
                    help="digits: only with potential_scale λ(t) = ᾱ_t²")
    ap.add_argument("--no-exact", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out-dir", default=str(RESULTS))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    if not a.no_exact:
        plan = [(False, g, 0.5, 64, 48) for g in (0.0, 1.0)]
        plan += [(True, 0.0, thr, 8, 2048) for thr in (0.0, 0.5, 1.0)]
        plan += [(True, g, 0.5, n, r) for g in (0.0, 1.0) for n, r in ((64, 96), (1024, 16))]
        plan = [(*p, False) for p in plan]
        plan += [(True, g, 0.5, n, r, True) for g in (0.0, 1.0) for n, r in ((64, 96),
                                                                              (1024, 16))]
        for sharp, g, thr, n, reps, scaled in plan:
            for seed in range(a.seeds):
                row = exact_case(sharp, g, thr, n, reps, seed, scaled)
                rows.append(row)
                print(row, flush=True)
    if a.digits:
        n, runs = (int(v) for v in a.digits.split(","))
        scales = (True,) if a.digits_scale_only else (False, True) if a.digits_scale else (False,)
        for scaled in scales:
            for m in ("fk-diff", "tds"):
                row = digits_case(m, n, runs, seed=1, scaled=scaled)
                rows.append(row)
                print(row, flush=True)
    old = Path(a.out_dir) / "class-sum-cpu.json"
    if old.exists():  # rows of earlier runs that this one did not redo are kept
        def key(r):
            return (r["case"], r["method"], r["threshold"], r["particles"], r["replicates"],
                    r["seed"])
        have = {key(r) for r in rows}
        rows = [r for r in json.loads(old.read_text())["rows"] if key(r) not in have] + rows
    meta = {"machine": cpu_name(), "threads": a.threads, "torch": torch.__version__,
            "pathsmc": pathsmc.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "loadavg_end": [round(v, 2) for v in os.getloadavg()]}
    lines = [f"# Σ_k Ẑ_k = 1: reward steering's Ẑ on a diffusers chain — {meta['machine']}", "",
             f"torch {meta['torch']}, {meta['date']}, {a.threads} thread(s). Mean over "
             "replicates of Σ_k Ẑ_k (exact value 1) ± SE, and the largest replicate; "
             "`bench/class_sum.py` says what each case is.", "",
             "| case | method | threshold | N | replicates | seed | Σ_k Ẑ_k ± SE | max | "
             "min ESS | s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['method']} | {r['threshold']} | {r['particles']} | "
                     f"{r['replicates']} | {r['seed']} | {r['class_sum']:.4f} ± {r['se']:.4f} | "
                     f"{r['max']:.3g} | {r['min_ess']:.1f} | {r['seconds']:.1f} |")
    path = write_results(a.out_dir, "class-sum-cpu", {"meta": meta, "rows": rows}, lines)
    print("\n".join(lines))
    print(f"wrote {path}.json/.md")


if __name__ == "__main__":
    main()
