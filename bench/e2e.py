"""End-to-end steering benchmark: the whole `pathsmc.diffusion.steer` loop with the fused ops
against the same loop in pure PyTorch, eager and with every op under torch.compile.

The model is the demo's: the exact score of a 2-D Gaussian mixture under the VP schedule, so
the model evaluation is cheap and the loop's own cost (steps, weights, resampling) dominates.
Each row of the table is one steering case of `pathsmc.commands.demo.steering_cases`; times are the
median of `--repeats` full runs after one warm-up. On CUDA a fourth variant, "graph", replays
the whole fused run captured once in a CUDA graph (`pathsmc.smc.CapturedSMC`; the one-off
capture time is reported separately): the launch-bound regime of small populations is where
it matters (docs/design.md; issue 3's target: 1000 steps, N = 4096, >= 10x the eager loop).
Results go to bench/results/e2e-<device>.{json,md}.

    .venv/bin/python bench/e2e.py [--device cuda] [--particles 4096] [--steps 100]
    .venv/bin/python bench/e2e.py --device cuda --steps 1000 --runs 1 --modes reward,temper
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from machine import (  # bench/machine.py (scripts run from bench/)
    RESULTS,
    device_name,
    slug,
    write_results,
)

import pathsmc
import pathsmc.ops
import pathsmc.reference
from pathsmc.commands.demo import run_steering_case, steering_cases
from pathsmc.diffusion import steering_model
from pathsmc.smc import CapturedSMC


def compiled_reference() -> SimpleNamespace:
    """pathsmc.reference with each op under torch.compile. The step's scalars change every step,
    so they enter as tensors (per-row dt/sigma, 0-dim λ) to avoid a recompilation per step, and
    the noise is drawn outside the compiled region (a generator argument breaks the graph)."""
    ref = pathsmc.reference
    core = torch.compile(ref.em_step)

    def em_step(x, drift, logw=None, *, dt, sigma, noise=None, generator=None, fwd_linear=0.0,
                **kw):
        if noise is None:
            noise = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        rows = (x.shape[0],)
        dt_t = torch.full(rows, float(dt), dtype=torch.float64, device=x.device)
        sigma_t = torch.full(rows, float(sigma), dtype=torch.float64, device=x.device)
        lam = torch.tensor(float(fwd_linear), dtype=x.dtype, device=x.device)
        return core(x, drift, logw, dt=dt_t, sigma=sigma_t, noise=noise, fwd_linear=lam, **kw)

    return SimpleNamespace(em_step=em_step, normalize=torch.compile(ref.normalize),
                           adaptive_resample=torch.compile(ref.adaptive_resample))


def time_case(case, ops, args) -> float:
    kw = dict(particles=args.particles, steps=args.steps, runs=args.runs, device=args.device,
              ops=ops)
    run_steering_case(case, seed=0, **kw)  # warm-up (and compilation)
    times = [run_steering_case(case, seed=1 + r, **kw)[1] for r in range(args.repeats)]
    return statistics.median(times)


def time_graph(case, args) -> tuple[float, float]:
    """(median replay time, capture time) of the fused run captured in one CUDA graph."""
    fk = steering_model(case.model, case.mode, steps=args.steps, device=args.device,
                        **case.kwargs)
    gen = torch.Generator(device=args.device).manual_seed(0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    cap = CapturedSMC(fk, args.particles, args.runs, threshold=0.5 if fk.weighted else 0.0,
                      generator=gen)
    torch.cuda.synchronize()
    capture = time.perf_counter() - t0
    cap.run()  # first replay (uploads the graph)
    times = []
    for _ in range(args.repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        cap.graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), capture


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--particles", type=int, default=4096)
    p.add_argument("--runs", type=int, default=4, help="independent rows (B)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default="reward,temper,twisted",
                   help="comma-separated steering modes to time")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph variant")
    args = p.parse_args()
    device = torch.device(args.device)
    cases = steering_cases(steps=args.steps, device=device, modes=args.modes.split(","))
    variants = {"pathsmc": pathsmc.ops, "eager": pathsmc.reference}
    if not args.no_compile:
        variants["compile"] = compiled_reference()
    graph = device.type == "cuda" and not args.no_graph
    rows = []
    for case in cases:
        t = {name: time_case(case, ops, args) for name, ops in variants.items()}
        row = {"mode": case.mode, "variant": case.variant, "seconds": t}
        if graph:
            t["graph"], row["capture_seconds"] = time_graph(case, args)
        rows.append(row)
        ratios = ", ".join(f"{k} {t[k] / t['pathsmc']:.2f}x" for k in t if k != "pathsmc")
        extra = (f"; graph replay {t['graph']:.4f} s = {t['pathsmc'] / t['graph']:.1f}x the "
                 f"fused eager loop, {t['eager'] / t['graph']:.1f}x the pure-PyTorch one"
                 if graph else "")
        print(f"{case.mode:12s} {case.variant:32s} pathsmc {t['pathsmc']:.3f} s; {ratios}"
              f"{extra}", flush=True)
    name = device_name(device)
    meta = {"device": name, "torch": torch.__version__, "build": pathsmc.build_info(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "particles": args.particles, "runs": args.runs, "steps": args.steps,
            "repeats": args.repeats, "load_average": list(_loadavg())}
    cols = list(variants) + (["graph"] if graph else [])
    lines = [f"# End-to-end steering loop: {name}", "",
             f"- torch {meta['torch']}, {meta['date']}, B={args.runs} rows × N={args.particles} "
             f"particles × {args.steps} steps, median of {args.repeats} runs; load average "
             f"{meta['load_average']}",
             "- pathsmc: fused ops; eager: the same loop with pathsmc.reference; compile: "
             "pathsmc.reference ops under torch.compile"
             + ("; graph: the fused run captured once in a CUDA graph, replayed" if graph
                else ""), "",
             "| mode | case | " + " | ".join(f"{c} s" for c in cols) + " | "
             + " | ".join(f"{c} / pathsmc" for c in cols[1:]) + " |",
             "|---|---|" + "---:|" * (2 * len(cols) - 1)]
    for r in rows:
        t = r["seconds"]
        lines.append(f"| {r['mode']} | {r['variant']} | "
                     + " | ".join(f"{t[c]:.3f}" for c in cols) + " | "
                     + " | ".join(f"{t[c] / t['pathsmc']:.2f}x" for c in cols[1:]) + " |")
    base = write_results(RESULTS, "e2e-" + slug(name), {"meta": meta, "rows": rows}, lines)
    print(f"wrote {base}.{{json,md}}")


def _loadavg():
    try:
        return tuple(round(float(v), 2) for v in Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ()


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.1f} s")
