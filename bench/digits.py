"""The shipped digits DDPM (pathsmc.models.digits): steering throughput against diffusers' own
sampling loop, and the table of `pathsmc demo digits` for several population sizes.

1. Throughput (images/s) at the same batch (10 rows, one class each, N particles per row, K
   DDPM steps), three pairs, each timed as the median of `--repeats` rounds in rotating order:
   - `diffusers` (the scheduler.step loop of the null-class model) vs `steer-plain`
     (`steer(model, "uncorrected")`: the adapter's chain, no weights);
   - `diffusers+reward` (the same loop plus the reward CNN on `pred_original_sample` every
     step: the network work of FK steering without SMC) vs `steer-fk` (`steer(model,
     "reward")`, difference potentials, adaptive resampling): the SMC overhead;
   - `diffusers-cfg` (two UNet calls per step, ε = w ε_k + (1 − w) ε_∅) vs `steer-cfg-rnd`
     (product mode, path-RND weights).
2. The demo's table (`pathsmc.commands.demo_digits.digits_table`) for each N of `--particles`.

Results go to bench/results/digits-cpu.{json,md} (`--device cuda`: digits-cuda).

    nice -n 10 .venv/bin/python bench/digits.py --threads 1 --particles 64,256,1024
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
from machine import RESULTS, device_name, write_results  # bench/machine.py

import pathsmc
from pathsmc.commands.demo_digits import (
    DIGITS_METHODS,
    class_reward,
    digits_table,
    load_setup,
    row_classes,
)
from pathsmc.diffusion import steer
from pathsmc.integrations.diffusers import DiffusersModel
from pathsmc.models.digits import NULL_CLASS

W = 3.0


def diffusers_loop(setup, labels, steps, *, reward=None, cfg_labels=None, seed=0):
    """diffusers' own ancestral loop over all particles at once (optionally + the reward on
    x̂₀ every step, or classifier-free guidance with ``cfg_labels`` as the conditional)."""
    sched = copy.deepcopy(setup.scheduler)
    sched.set_timesteps(steps)
    g = torch.Generator(device=setup.device).manual_seed(seed)
    x = torch.randn(labels.shape[0], 1, 8, 8, generator=g, device=setup.device)
    acc = torch.zeros(labels.shape[0], dtype=torch.float64, device=setup.device)
    with torch.no_grad():
        for t in sched.timesteps:
            eps = setup.unet(x, t, class_labels=labels).sample
            if cfg_labels is not None:
                eps_c = setup.unet(x, t, class_labels=cfg_labels).sample
                eps = W * eps_c + (1.0 - W) * eps
            out = sched.step(eps, t, x, generator=g)
            if reward is not None:
                acc += reward(out.pred_original_sample).double()
            x = out.prev_sample
    return x


def throughput(setup, particles: int, steps: int, repeats: int, seed: int) -> dict:
    classes = row_classes(1, setup.device)
    b = classes.numel()
    m = b * particles
    null = torch.full((m,), NULL_CLASS, device=setup.device)
    cond_labels = classes.repeat_interleave(particles)
    uncond = DiffusersModel(setup.unet, setup.scheduler, class_labels=torch.full_like(
        classes, NULL_CLASS), chunk_size=m)
    cond = uncond.with_condition(class_labels=classes)
    reward = class_reward(setup.reward_net, classes)

    def flat_reward(x0):  # (M, 1, 8, 8) -> (M,) : log p1(k | x0), k of the particle's row
        return reward(x0.reshape(b, particles, *x0.shape[1:])).reshape(-1)

    common = {"particles": particles, "batch": b, "steps": steps, "seed": seed,
              "progress": False}
    variants = {
        "diffusers": lambda: diffusers_loop(setup, null, steps, seed=seed),
        "steer-plain": lambda: steer(uncond, "uncorrected", **common),
        "diffusers+reward": lambda: diffusers_loop(setup, null, steps, reward=flat_reward,
                                                   seed=seed),
        "steer-fk": lambda: steer(uncond, "reward", reward=reward, **common),
        "diffusers-cfg": lambda: diffusers_loop(setup, null, steps, cfg_labels=cond_labels,
                                                seed=seed),
        "steer-cfg-rnd": lambda: steer([cond, uncond], "product", beta=(W, 1 - W), **common),
    }
    names = list(variants)
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            variants[n]()
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    out = {"particles_per_row": particles, "rows": b, "images": m, "steps": steps,
           "repeats": repeats, "seconds": times,
           "median_s": med, "images_per_s": {n: m / s for n, s in med.items()}}
    out["overhead"] = {
        "steer-plain vs diffusers": med["steer-plain"] / med["diffusers"] - 1.0,
        "steer-fk vs diffusers+reward": med["steer-fk"] / med["diffusers+reward"] - 1.0,
        "steer-cfg-rnd vs diffusers-cfg": med["steer-cfg-rnd"] / med["diffusers-cfg"] - 1.0,
    }
    return out


def table(setup, particles: int, runs: int, steps: int, seed: int) -> dict:
    t0 = time.perf_counter()
    tab = digits_table(setup, particles=particles, steps=steps, runs=runs, seed=seed,
                       log=lambda s: print(s, flush=True))
    rows = {}
    for r in tab.rows:
        row = {"judge_accuracy": float(r.accuracy.mean()), "diversity": float(r.diversity.mean()),
               "seconds": r.seconds, "warnings": r.warnings}
        if r.log_z is not None:
            v = r.log_z.double().reshape(runs, 10)
            row["log_z_mean"] = float(v.mean())
            row["log_z_se"] = (math.sqrt(float(v.var(0).sum()) / runs) / 10 if runs > 1
                               else math.nan)
            row["log_z_per_class"] = [float(a) for a in v.mean(0)]
            row["final_ess_mean"] = float(r.final_ess.mean())
        rows[r.method] = row
    out = {"particles_per_row": particles, "runs": runs, "steps": steps, "plain": tab.plain,
           "plain_seconds": tab.plain_seconds,
           "independent_log_z_per_class": [float(a) for a in tab.estimate],
           "independent_se_per_class": [float(a) for a in tab.estimate_se],
           "independent_mean": tab.reference[0], "independent_mean_se": tab.reference[1],
           "methods": rows, "seconds": time.perf_counter() - t0}
    for m in ("fk-diff", "fk-max", "tds"):
        if m in rows:
            rows[m]["class_sum_z"], rows[m]["class_sum_z_se"] = tab.class_sum(m)
    if runs > 1:
        for m in ("fk-diff", "tds"):
            if m in rows:
                z = tab.z_scores(m)
                rows[m]["z_vs_independent"] = z
                rows[m]["max_abs_z"] = max(abs(a) for a in z)
    return out


def markdown(data: dict) -> list[str]:
    lines = ["# digits DDPM: steering throughput and the demo table", "",
             f"{data['device_name']}, torch {data['torch']}, pathsmc {data['pathsmc']}, "
             f"{data['threads']} thread(s), {data['date']}; load average at start "
             f"{data['loadavg_start']}, at end {data['loadavg_end']}.", ""]
    tp = data.get("throughput")
    if tp:
        run = data.get("throughput_run", {})
        lines += [f"## Throughput: 10 rows × {tp['particles_per_row']} particles "
                  f"({tp['images']} images), {tp['steps']} DDPM steps, median of "
                  f"{tp['repeats']}", "",
                  f"Run {run.get('date')}, load average {run.get('loadavg_start')} → "
                  f"{run.get('loadavg_end')}.", "",
                  "| variant | median s | images/s |", "|---|---:|---:|"]
        for n, s in tp["median_s"].items():
            lines.append(f"| {n} | {s:.3f} | {tp['images_per_s'][n]:.0f} |")
        lines += ["", "| overhead | |", "|---|---:|"]
        for n, v in tp["overhead"].items():
            lines.append(f"| {n} | {100 * v:+.1f} % |")
        lines.append("")
    for t in data.get("tables", []):
        lines += [f"## Demo table: N = {t['particles_per_row']} per row, {t['runs']} replicate "
                  f"rows per class, {t['steps']} DDPM steps", "",
                  "| method | judge acc | diversity | log Ẑ ± SE | final ESS | max abs z | "
                  "Σ_k Ẑ_k (exact 1) | s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for m, r in t["methods"].items():
            lz = (f"{r['log_z_mean']:.3f} ± {r['log_z_se']:.3f}" if "log_z_mean" in r else "—")
            ess = f"{r['final_ess_mean']:.0f}" if "final_ess_mean" in r else "—"
            z = f"{r['max_abs_z']:.2f}" if "max_abs_z" in r else ""
            cs = (f"{r['class_sum_z']:.3f} ± {r['class_sum_z_se']:.3f}"
                  if "class_sum_z" in r else "")
            lines.append(f"| {m} | {r['judge_accuracy']:.3f} | {r['diversity']:.3f} | {lz} | "
                         f"{ess} | {z} | {cs} | {r['seconds']:.1f} |")
        lines += [f"| plain (independent) | | | {t['independent_mean']:.3f} ± "
                  f"{t['independent_mean_se']:.3f} | | | | {t['plain_seconds']:.1f} |", ""]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--particles", default="64,256,1024",
                   help="comma-separated N per row for the demo table")
    p.add_argument("--runs", type=int, default=2, help="replicate rows per class (table)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--throughput-particles", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-throughput", action="store_true")
    p.add_argument("--no-table", action="store_true")
    p.add_argument("--out-dir", default=str(RESULTS))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    setup = load_setup(a.device)
    data = {"device": a.device, "device_name": device_name(a.device),
            "torch": torch.__version__, "pathsmc": pathsmc.__version__, "threads": a.threads,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "loadavg_start": list(os.getloadavg()), "methods": list(DIGITS_METHODS)}
    if not a.no_throughput:
        data["throughput"] = throughput(setup, a.throughput_particles, a.steps, a.repeats,
                                        a.seed)
        print(data["throughput"]["median_s"], data["throughput"]["overhead"], flush=True)
    if not a.no_table:
        data["tables"] = []
        for n in (int(s) for s in a.particles.split(",") if s.strip()):
            data["tables"].append(table(setup, n, a.runs, a.steps, a.seed))
            print(f"N = {n}: {data['tables'][-1]['seconds']:.0f} s", flush=True)
    data["loadavg_end"] = list(os.getloadavg())
    stem = "digits-" + ("cuda" if a.device.startswith("cuda") else "cpu")
    old = Path(a.out_dir) / f"{stem}.json"
    if old.exists():  # a partial run (--no-table / --no-throughput) keeps the other part
        prev = json.loads(old.read_text())
        if "tables" in data and "tables" in prev:  # other N of an earlier run are kept
            have = {t["particles_per_row"] for t in data["tables"]}
            data["tables"] = sorted(data["tables"] + [t for t in prev["tables"]
                                                      if t["particles_per_row"] not in have],
                                    key=lambda t: t["particles_per_row"])
        for key in ("throughput", "tables"):
            if key not in data and key in prev:
                data[key] = prev[key]
                data[f"{key}_run"] = prev.get(f"{key}_run", {k: prev.get(k) for k in (
                    "date", "loadavg_start", "loadavg_end")})
    for key in ("throughput", "tables"):
        data.setdefault(f"{key}_run", {k: data[k] for k in ("date", "loadavg_start",
                                                              "loadavg_end")})
    path = write_results(a.out_dir, stem, data, markdown(data))
    print("\n".join(markdown(data)))
    print(f"wrote {path}.json / .md")


if __name__ == "__main__":
    main()
