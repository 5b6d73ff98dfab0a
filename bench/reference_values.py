"""Reference values of the DW-4 and LJ-13 targets from long adaptive annealed-SMC runs.

For each target (:mod:`pathsmc.targets.particle_systems`, default constants) this runs
:func:`pathsmc.samplers.annealed_smc` (conditional-ESS tempering, resampling every step, MALA
moves) with B independent rows of N particles, twice with quite different settings, and reports
for each run

- log Z of the COM-confined density as ``log mean_b Ẑ_b`` with its delta-method standard error
  over rows (as in tests/test_samplers.py), and ``log Z_int = log Z − log_z_com`` (exact shift);
- ``E[E_int]`` (mean internal energy, without the COM term) and ``E[mean_{i<j} d_ij]``: each
  row's self-normalized weighted average, then the mean over rows and its standard error.

The two runs are compared (difference in units of the combined standard error). The run with
the most target evaluations (N·B·evaluations per particle) is the one whose numbers go into the
target classes. Everything, with the settings, wall times, machine and torch version, is written
to bench/results/reference-values.json.

Threads: one by default (``--threads``): on this shared 2-core machine two OpenMP threads
contend with other processes and run small elementwise ops ~100× slower.

    .venv/bin/python bench/reference_values.py                 # both targets, full runs
    .venv/bin/python bench/reference_values.py --quick         # small runs, for timing
    .venv/bin/python bench/reference_values.py --targets dw4   # one target
    .venv/bin/python bench/reference_values.py --targets lj13 --runs check2   # a third run
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
from machine import cpu_name  # bench/machine.py (scripts run from bench/)

import pathsmc
from pathsmc.samplers import annealed_smc
from pathsmc.targets.boltzmann import DiagonalGaussian
from pathsmc.targets.particle_systems import DoubleWell4, LennardJones13

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "reference-values.json"

# Reference N(0, scale² I): roughly the spread of the particles about their centre of mass.
TARGETS = {
    "dw4": {"cls": DoubleWell4, "ref_scale": 2.0},
    "lj13": {"cls": LennardJones13, "ref_scale": 1.0},
}

# name -> (particles, batch, mcmc_steps, target_ess). "main" is the long run; "check" differs in
# every setting; "check2" (not run by default: --runs check2) is a third, independent run for
# when the first two disagree. Each run name has its own seed (--seed + 1000·position).
RUNS = {
    "dw4": {"main": (4096, 32, 50, 0.95), "check": (2048, 32, 20, 0.99),
            "check2": (4096, 32, 30, 0.97)},
    "lj13": {"main": (1024, 32, 80, 0.9), "check": (1024, 16, 20, 0.98),
             "check2": (1024, 32, 40, 0.97)},
}
QUICK = {
    "dw4": {"main": (512, 16, 10, 0.9), "check": (256, 16, 5, 0.98),
            "check2": (256, 16, 10, 0.95)},
    "lj13": {"main": (256, 16, 10, 0.9), "check": (128, 16, 5, 0.98),
             "check2": (128, 16, 10, 0.95)},
}
DEFAULT_RUNS = ["main", "check"]
DISAGREE = 2.0  # |difference| / combined standard error above which runs are flagged


def log_mean_z(log_z: torch.Tensor) -> tuple[float, float]:
    """``log mean_b Ẑ_b`` over rows and its standard error (delta method)."""
    b = log_z.numel()
    m = torch.logsumexp(log_z.double(), 0) - math.log(b)
    r = torch.exp(log_z.double() - m)
    return float(m), float(r.std() / math.sqrt(b))


def row_mean(per_row: torch.Tensor) -> tuple[float, float]:
    """Mean over rows and its standard error."""
    return float(per_row.mean()), float(per_row.std() / math.sqrt(per_row.numel()))


def run_one(target, ref_scale: float, particles: int, batch: int, mcmc: int, ess: float,
            seed: int) -> dict:
    ref = DiagonalGaussian(target.dim, 0.0, ref_scale)
    t0 = time.perf_counter()
    res = annealed_smc(target, particles, batch, reference=ref, criterion="cess",
                       target_ess=ess, resample_threshold=1.0, mcmc_steps=mcmc,
                       max_steps=10_000, generator=torch.Generator().manual_seed(seed),
                       progress=False)
    wall = time.perf_counter() - t0
    lz, lz_se = log_mean_z(res.log_z)
    w = res.weights
    energy = (w * target.internal_energy(res.particles)).sum(-1)
    dist = (w * target.pairwise_distances(res.particles).mean(-1)).sum(-1)
    e, e_se = row_mean(energy)
    d, d_se = row_mean(dist)
    return {
        "settings": {"particles": particles, "batch": batch, "mcmc_steps": mcmc,
                     "target_ess": ess, "criterion": "cess", "resample_threshold": 1.0,
                     "reference_scale": ref_scale, "seed": seed},
        "log_z": lz, "log_z_se": lz_se, "log_z_internal": lz - target.log_z_com,
        "log_z_row_sd": float(res.log_z.std()),
        "mean_energy": e, "mean_energy_se": e_se,
        "mean_distance": d, "mean_distance_se": d_se,
        "temperatures": [int(res.num_steps.min()), int(res.num_steps.max())],
        "target_evals_per_particle": res.target_evals,
        "total_target_evals": res.target_evals * particles * batch,
        "mala_accept": float(res.accept.mean()),
        "final_step_size": float(res.step_size[-1].mean()),
        "forced_rows": int(res.forced.sum()),
        "dead_rows": len(res.dead_rows),
        "wall_s": wall,
    }


def z_score(a: dict, b: dict, key: str) -> float:
    return (a[key] - b[key]) / math.hypot(a[key + "_se"], b[key + "_se"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--runs", nargs="*", default=DEFAULT_RUNS, choices=["main", "check", "check2"],
                    help="which runs to do; the JSON keeps a target's other runs from before "
                         "(none: only recompute the summaries from the stored runs)")
    ap.add_argument("--quick", action="store_true", help="small runs (timing, smoke test)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--out", type=Path, default=None,
                    help=f"JSON path (default {OUT.relative_to(RESULTS.parent.parent)}; "
                         "--quick runs are not written unless given)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else RUNS
    meta = {"machine": cpu_name(), "threads": args.threads, "torch": torch.__version__,
            "pathsmc": getattr(pathsmc, "__version__", None),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "quick": args.quick,
            "command": " ".join(["bench/reference_values.py", "--targets", *args.targets,
                                 "--runs", *args.runs] + (["--quick"] if args.quick else []))}
    out: dict = {"targets": {}}
    path = args.out if args.out is not None else (None if args.quick else OUT)
    if path is not None and path.exists():
        out["targets"] = json.loads(path.read_text()).get("targets", {})
    for key in args.targets:
        spec = TARGETS[key]
        target = spec["cls"]()
        runs = dict(out["targets"].get(key, {}).get("runs", {}))
        for name in args.runs:
            n, b, mcmc, ess = plan[key][name]
            seed = args.seed + 1000 * list(plan[key]).index(name)
            r = run_one(target, spec["ref_scale"], n, b, mcmc, ess, seed)
            r["meta"] = dict(meta, load_average=list(os.getloadavg()))
            runs[name] = r
            print(f"{key} {name}: N={n} B={b} mcmc={mcmc} ess={ess}: log Z = {r['log_z']:.4f} "
                  f"± {r['log_z_se']:.4f} (log Z_int {r['log_z_internal']:.4f}), "
                  f"E[E_int] = {r['mean_energy']:.4f} ± {r['mean_energy_se']:.4f}, "
                  f"E[d] = {r['mean_distance']:.5f} ± {r['mean_distance_se']:.5f}; "
                  f"{r['temperatures'][1]} temperatures, {r['wall_s']:.1f} s", flush=True)
        runs = {k: runs[k] for k in plan[key] if k in runs}
        chosen = max(runs, key=lambda k: runs[k]["total_target_evals"])
        agree = {f"{chosen} - {other}": {q: z_score(runs[chosen], runs[other], q)
                                         for q in ("log_z", "mean_energy", "mean_distance")}
                 for other in runs if other != chosen}
        c = runs[chosen]
        out["targets"][key] = {
            "class": spec["cls"].__name__, "dim": target.dim,
            "log_z_com": target.log_z_com, "com_std": target.com_std,
            "runs": runs,
            "agreement_z": agree,
            "disagree_threshold_z": DISAGREE,
            "chosen": chosen,
            "reference": {k: c[k] for k in ("log_z", "log_z_se", "log_z_internal",
                                             "mean_energy", "mean_energy_se",
                                             "mean_distance", "mean_distance_se")},
        }
        for pair, zs in agree.items():
            flag = ("" if all(abs(z) <= DISAGREE for z in zs.values())
                    else f"  <-- DISAGREE (> {DISAGREE:g} combined se)")
            print(f"{key}: {pair} in combined se: "
                  + ", ".join(f"{q} {z:+.2f}" for q, z in zs.items()) + flag)
        print(f"{key}: chosen ({chosen}, most target evaluations): log Z = {c['log_z']:.4f} ± "
              f"{c['log_z_se']:.4f}, log Z_int = {c['log_z_internal']:.4f}", flush=True)
    if path is not None:
        path.parent.mkdir(exist_ok=True, parents=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
