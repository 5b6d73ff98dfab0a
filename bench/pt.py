"""Parallel tempering: round trips per second with the fused ops vs the same code in pure PyTorch.

``pathsmc.tempering`` calls its ops through the module-level name ``ops`` (``from pathsmc import
ops``). The pure-PyTorch variant is the very same ``ParallelTempering`` code with that name
pointed at ``pathsmc.reference`` (the pure-PyTorch twins of every op, same signatures) for the
duration of the run; the library itself is not modified.

For each target a pilot run (fused ops, schedule and step-size adaptation, ``--pilot-rounds``
rounds) gives a schedule and MALA step sizes; both variants then run with that schedule and those
step sizes frozen (``adapt_step=False``): one warm-up round of ``--warmup`` scans, then
``--repeats`` timed rounds of ``--scans`` scans each, every one from the same seed. Reported per
variant: round trips (summed over the C chain columns) per second and per scan, and the wall
time per scan (median over the repeats), plus the speed-up of the fused ops. A third row,
"fused, K auto", runs the fused ops with the number of levels chosen from the pilot's barrier
(a second pilot with ``adapt_levels=True``: ``levels_for_barrier``, the K that maximizes round
trips per level-scan, about 2Λ + 1: best when a scan's cost grows with K), and a fourth,
"K auto 90 %", the smallest K reaching 90 % of the K → ∞ round-trip rate
(``level_efficiency=0.9``: best when extra levels are nearly free, as in launch-bound runs).

Targets: the 1-D double well (targets/double_well.py, DoubleWell1D) and ManyWell(dim=8), both
from the default N(0, I) reference with i.i.d. redraws at level 0.

    .venv/bin/python bench/pt.py [--levels 16] [--chains 32 512] [--scans 1024] [--repeats 3]
    .venv/bin/python bench/pt.py --device cuda --chains 32 512 8192

Results: bench/results/pt-<cpu>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import pathsmc
import pathsmc.reference
import pathsmc.tempering as tempering
from pathsmc.targets.boltzmann import ManyWell
from pathsmc.targets.double_well import DoubleWell1D

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, device_name, slug, write_results  # noqa: E402  (bench/machine.py)


@contextlib.contextmanager
def tempering_ops(module):
    """Point ``pathsmc.tempering.ops`` at ``module`` (pathsmc.ops or pathsmc.reference)."""
    saved = tempering.ops
    tempering.ops = module
    try:
        yield
    finally:
        tempering.ops = saved


def measure(target, betas, step, chains, args, ops_module) -> dict:
    with tempering_ops(ops_module):
        pt = tempering.ParallelTempering(
            target, None, num_chains=chains, betas=betas, step_size=step,
            local_steps=args.local_steps, device=args.device,
            generator=torch.Generator(device=args.device).manual_seed(1))
        pt.run_round(args.warmup, adapt_step=False)
        reps = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            st = pt.run_round(args.scans, adapt_step=False)
            sec = time.perf_counter() - t0
            reps.append({"seconds": sec, "round_trips": int(st.round_trips.sum()),
                         "restarts": int(st.restarts.sum()),
                         "swap_accept_mean": float(st.swap_accept.mean()),
                         "barrier": float(st.barrier.mean())})
    trips = sum(r["round_trips"] for r in reps)
    secs = sum(r["seconds"] for r in reps)
    med = statistics.median(r["seconds"] for r in reps)
    return {"reps": reps, "round_trips": trips, "seconds": secs,
            "round_trips_per_second": trips / secs,
            "round_trips_per_scan": trips / (args.scans * args.repeats),
            "median_ms_per_scan": 1e3 * med / args.scans}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--levels", type=int, default=16)
    p.add_argument("--chains", type=int, nargs="+", default=[32, 512])
    p.add_argument("--local-steps", type=int, default=1)
    p.add_argument("--scans", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pilot-rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    targets = {"double_well_1d": DoubleWell1D(), "many_well_d8": ManyWell(dim=8)}
    cpu = device_name(args.device)
    out = {"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "pathsmc": getattr(pathsmc, "__version__", "?"),
           "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "loadavg_start": [round(v, 2) for v in os.getloadavg()],
           "config": vars(args) | {"out": str(args.out)}, "targets": {}}
    for name, target in targets.items():
        pilot = tempering.parallel_tempering(
            target, rounds=args.pilot_rounds, num_levels=args.levels, num_chains=32,
            local_steps=args.local_steps, device=args.device,
            generator=torch.Generator(device=args.device).manual_seed(0))
        betas, step = pilot.betas[0], pilot.step_size[0]
        auto, auto90 = (tempering.parallel_tempering(
            target, rounds=args.pilot_rounds, num_levels=args.levels, num_chains=32,
            local_steps=args.local_steps, adapt_levels=True, level_efficiency=eff,
            device=args.device, generator=torch.Generator(device=args.device).manual_seed(0))
            for eff in (None, 0.9))
        for chains in args.chains:
            row = {"target": name, "dim": target.dim, "chains": chains, "betas": betas.tolist(),
                   "step_size": step.tolist(), "pilot_barrier": float(pilot.last.barrier.mean())}
            runs = (("fused", betas, step, pathsmc.ops),
                    ("pytorch", betas, step, pathsmc.reference),
                    ("fused_auto", auto.betas[0], auto.step_size[0], pathsmc.ops),
                    ("fused_auto90", auto90.betas[0], auto90.step_size[0], pathsmc.ops))
            for variant, b, h, module in runs:
                row[variant] = measure(target, b, h, chains, args, module)
                row[variant]["levels"] = len(b)
                r = row[variant]
                print(f"{name} C={chains} {variant}: {r['round_trips_per_second']:.1f} trips/s, "
                      f"{r['round_trips_per_scan']:.4f} trips/scan, "
                      f"{r['median_ms_per_scan']:.3f} ms/scan", flush=True)
            row["speedup"] = (row["pytorch"]["median_ms_per_scan"]
                              / row["fused"]["median_ms_per_scan"])
            out["targets"][f"{name}/C={chains}"] = row
    out["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]

    lines = [f"# Parallel tempering round trips — {cpu}", "",
             f"{out['date']}, torch {out['torch']}, {out['threads']} threads, load average "
             f"{out['loadavg_start']} → {out['loadavg_end']}; K = {args.levels} levels, "
             f"C chains, {args.local_steps} MALA move(s) per level per scan, "
             f"fixed schedule and step sizes from a {args.pilot_rounds}-round pilot (C = 32), "
             f"{args.repeats} × "
             f"{args.scans} scans after {args.warmup} warm-up scans.", "",
             "| target | D | C | barrier Λ | ops | K | round trips | trips/s | trips/scan | "
             "ms/scan | speed-up |", "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in out["targets"].values():
        for variant in ("fused", "pytorch", "fused_auto", "fused_auto90"):
            r = row[variant]
            sp = f"{row['speedup']:.2f}×" if variant == "fused" else ""
            lam = row["fused"]["reps"][0]["barrier"]
            name = {"fused_auto": "fused, K auto", "fused_auto90": "fused, K auto 90 %"}.get(
                variant, variant)
            lines.append(f"| {row['target']} | {row['dim']} | {row['chains']} | {lam:.2f} | "
                         f"{name} | {r['levels']} | {r['round_trips']} | "
                         f"{r['round_trips_per_second']:.1f} | "
                         f"{r['round_trips_per_scan']:.4f} | {r['median_ms_per_scan']:.3f} | "
                         f"{sp} |")
    write_results(args.out, f"pt-{slug(cpu)}", out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
