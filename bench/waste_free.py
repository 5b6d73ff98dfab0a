"""Waste-free vs standard annealed SMC at equal target evaluations (pathsmc.samplers).

Both variants run ``annealed_smc`` with its defaults (conditional-ESS tempering at
``--target-ess``, adaptive per-row MALA step) on ManyWell(dim=``--dim``) from the reference
N(0, 2² I), float64, B = ``--rows`` independent rows per run:

- ``standard``: N particles, ``--mcmc-steps`` k MALA moves per temperature, adaptive
  resampling (ESS < N/2): a step costs N·k target evaluations per row;
- ``waste-free``: k·N particles, chains of length P (default: annealed_smc's default P for that
  N; ``--chain-lengths`` adds more), M = k·N/P ancestors resampled every step: a step costs
  M·(P − 1) = k·N·(P − 1)/P evaluations per row, the same work as the standard step up to
  (P − 1)/P, so the two are compared at (nearly) equal cost. The evaluations actually made are
  measured (``evals/row`` = N·target_evals: the number of steps T is adaptive, so the totals
  differ a little) and the error is also reported normalized by them.

Per cell (variant, N, P): ``--runs`` runs with different seeds, each timed as a whole (wall time
of one batched run of B rows, after one warm-up run of the same shape). Error: log Ẑ − log Z
per row; RMSE, mean error (bias) and the work-normalized variance ``evals · MSE`` (lower is
better; constant in N for a √N-consistent estimator).

    .venv/bin/python bench/waste_free.py [--dim 32] [--particles 128 512] [--mcmc-steps 8]
        [--chain-lengths 8 32] [--rows 16] [--runs 3] [--threads 1]

Results: bench/results/waste-free-<cpu>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import time
from pathlib import Path

import torch
from machine import (  # bench/machine.py (scripts run from bench/)
    RESULTS,
    device_name,
    slug,
    write_results,
)

import pathsmc
from pathsmc.samplers import _chain_length, annealed_smc
from pathsmc.targets.boltzmann import DiagonalGaussian, ManyWell


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def cell(target, ref, args, n: int, seed0: int, **kw) -> dict:
    def once(seed):
        t0 = time.perf_counter()
        r = annealed_smc(target, n, args.rows, reference=ref, target_ess=args.target_ess,
                         generator=torch.Generator(device=args.device).manual_seed(seed),
                         progress=False, **kw)
        if args.device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, r

    once(10_000)  # warm-up
    secs, errs, evals, steps = [], [], [], []
    for s in range(args.runs):
        sec, r = once(seed0 + s)
        secs.append(sec)
        errs += (r.log_z - target.log_z).tolist()
        evals.append(n * r.target_evals)
        steps.append(float(r.num_steps.double().mean()))
    mse = statistics.fmean(e * e for e in errs)
    ev = statistics.fmean(evals)
    return {"particles": n, **kw, "median_seconds": statistics.median(secs), "seconds": secs,
            "rmse": math.sqrt(mse), "mean_error": statistics.fmean(errs),
            "sd": statistics.stdev(errs), "evals_per_row": ev, "evals_x_mse": ev * mse,
            "mean_steps": statistics.fmean(steps), "errors": errs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--particles", type=int, nargs="+", default=[128, 512],
                    help="N of the standard variant (waste-free: mcmc_steps·N)")
    ap.add_argument("--mcmc-steps", type=int, default=8)
    ap.add_argument("--chain-lengths", type=int, nargs="*", default=[],
                    help="extra waste-free chain lengths P, run at every N that they divide")
    ap.add_argument("--target-ess", type=float, default=0.9)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (1 keeps OpenMP from stalling on a busy machine)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    target = ManyWell(dim=args.dim)
    ref = DiagonalGaussian(args.dim, scale=2.0, device=args.device)
    cpu = device_name(args.device)
    load0 = loadavg()
    k = args.mcmc_steps
    rows = []
    for i, n in enumerate(args.particles):
        seed0 = 100 * i
        r = cell(target, ref, args, n, seed0, mcmc_steps=k)
        rows.append({"variant": "standard", **r})
        nw = k * n
        ps = sorted({_chain_length(nw, None, True)} | {p for p in args.chain_lengths
                                                       if p >= 2 and nw % p == 0})
        for p in ps:
            rows.append({"variant": "waste-free", **cell(target, ref, args, nw, seed0,
                                                         waste_free=True, chain_length=p)})
        for row in rows[-1 - len(ps):]:
            print(f"{row['variant']:>10} N={row['particles']:>6} P={row.get('chain_length', '-')}"
                  f" evals/row {row['evals_per_row']:.3g}  {row['median_seconds']:.3f} s  "
                  f"rmse {row['rmse']:.4f}  bias {row['mean_error']:+.4f}", flush=True)

    out = {"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "pathsmc": getattr(pathsmc, "__version__", "?"),
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "loadavg_start": load0, "loadavg": loadavg(), "log_z": target.log_z,
           "args": {k_: v for k_, v in vars(args).items() if k_ != "out"},
           "rows": rows}
    lines = [f"# Waste-free vs standard annealed SMC — {cpu}", "",
             f"{out['date']}, torch {out['torch']}, {out['threads']} threads, load average "
             f"{load0} → {out['loadavg']}. ManyWell(dim={args.dim}) (log Z = "
             f"{target.log_z:.4f}) from N(0, 2² I), float64, CESS target {args.target_ess}, "
             f"adaptive MALA step; standard: {k} MALA moves per step, resampling at ESS < N/2; "
             f"waste-free: {k}·N particles in chains of length P. {args.runs} runs × "
             f"{args.rows} rows per cell; time: median wall time of one run of "
             f"{args.rows} rows (min: the fastest; the 2-core machine is shared, so times carry "
             "background load).", "",
             "| variant | N | P | M | evals/row | steps | median s | min s | RMSE log Ẑ | bias "
             "| sd | evals·MSE |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = r.get("chain_length")
        lines.append(f"| {r['variant']} | {r['particles']} | {p or '—'} | "
                     f"{r['particles'] // p if p else '—'} | {r['evals_per_row']:.0f} | "
                     f"{r['mean_steps']:.1f} | {r['median_seconds']:.3f} | "
                     f"{min(r['seconds']):.3f} | {r['rmse']:.4f} | {r['mean_error']:+.4f} | "
                     f"{r['sd']:.4f} | {r['evals_x_mse']:.3g} |")
    write_results(args.out, f"waste-free-{slug(cpu)}", out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
