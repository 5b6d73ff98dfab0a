"""Adaptive tempered SMC: pathsmc.samplers.annealed_smc against BlackJAX's adaptive_tempered_smc.

Same algorithm on both sides: geometric path from a Gaussian reference to the unnormalized
target, the next β chosen so that the ESS of the incremental weights is ``target_ess``·N,
systematic resampling at every step, ``mcmc_steps`` MALA moves per temperature with a fixed
step size h, float64. (pathsmc: ``criterion="ess", resample_threshold=1, adapt_rate=0``; these
are the settings its docstring names as BlackJAX's algorithm.) A third row, ``pathsmc-default``,
runs pathsmc's own defaults (conditional ESS, adaptive resampling, adaptive MALA step) with the
same ``target_ess`` and ``mcmc_steps``.

Targets (pathsmc.targets.boltzmann, exact log Z):

- ``manywell``: ManyWell(dim=32): ``log γ(x) = Σ_{i<D/2} −(a d_i + b d_i² + c d_i⁴) − v_i²/2``,
  ``d_i = x_{2i}``, ``v_i = x_{2i+1}``, (a, b, c) = (−0.5, −6, 1). Written again in JAX below
  (:func:`jax_manywell`) from that definition; reference N(0, 2² I), h = 0.03.
- ``gmm40``: GaussianMixture40 (2-D, 40 equal-weight components, means from torch's generator
  seeded 0, std softplus(1)), log_z = 0; the JAX side reads the means from the target spec the
  pathsmc side writes (the means come from torch's RNG). Reference N(0, 30² I), h = 0.5.

The JAX target is checked against torch's: the pathsmc side writes test points with torch's
log γ and ∇log γ, the JAX side reports the largest absolute difference (``check`` in its JSON).

Measured per (target, N, seed): wall time of one full run (after one warm-up run of the same
shape: JIT compilation on the JAX side is not counted) and log Ẑ − log Z. The merge step gives,
per N, the median time and the RMSE over seeds, and the time to reach an RMSE ε, interpolated
log-log along the error/time curve over N (the smallest N whose RMSE ≤ ε, interpolated between
it and the previous N; "—" when no N reaches ε, "<" when the smallest N already does).

The two sides run in different environments, one process each:

    .venv/bin/python bench/vs_blackjax.py --side pathsmc          # also writes the target spec
    .venv-bench/bin/python bench/vs_blackjax.py --side jax         # needs blackjax (not in .venv)
    .venv/bin/python bench/vs_blackjax.py --side merge             # table

Results: bench/results/vs-blackjax-<cpu>.{json,md} (the per-side raw files
``vs-blackjax-<side>-<cpu>.json`` and the spec ``vs-blackjax-spec.json`` next to them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import time
from pathlib import Path

from machine import cpu_name, slug  # bench/machine.py (scripts run from bench/)

RESULTS = Path(__file__).resolve().parent / "results"

CONFIG = {
    "manywell": {"dim": 32, "ref_scale": 2.0, "step_size": 0.03},
    "gmm40": {"dim": 2, "ref_scale": 30.0, "step_size": 0.5},
}
TARGET_ESS = 0.9
MCMC_STEPS = 10
PARTICLES = [256, 1024, 4096, 16384]
SEEDS = 6
EPSILONS = [0.3, 0.1, 0.03]


# ---- machine ----


def loadavg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def spec_path(out: Path) -> Path:
    return out / "vs-blackjax-spec.json"


def side_path(out: Path, side: str) -> Path:
    return out / f"vs-blackjax-{side}-{slug(cpu_name())}.json"


# ---- pathsmc side ----


def run_pathsmc(args) -> None:
    import torch

    import pathsmc
    from pathsmc.samplers import annealed_smc
    from pathsmc.targets.boltzmann import DiagonalGaussian, GaussianMixture40, ManyWell

    load0 = loadavg()
    targets = {
        "manywell": ManyWell(dim=CONFIG["manywell"]["dim"]),
        "gmm40": GaussianMixture40(log_z=0.0),
    }
    # target spec for the JAX side: parameters, exact log Z, and test points with torch's values
    g = torch.Generator().manual_seed(123)
    spec = {}
    for name, t in targets.items():
        cfg = CONFIG[name]
        pts = torch.randn(16, t.dim, generator=g, dtype=torch.float64) * cfg["ref_scale"]
        lp, gr = t.log_prob_and_grad(pts)
        spec[name] = {**cfg, "log_z": t.log_z, "points": pts.tolist(), "log_prob": lp.tolist(),
                      "grad": gr.tolist()}
        if name == "manywell":
            spec[name].update(a=t.a, b=t.b, c=t.c)
        else:
            spec[name].update(means=t.means.tolist(), scale=t.scale)
    args.out.mkdir(parents=True, exist_ok=True)
    spec_path(args.out).write_text(json.dumps(spec))

    variants = {
        "pathsmc": lambda cfg: dict(criterion="ess", resample_threshold=1.0, adapt_rate=0.0,
                                    step_size=cfg["step_size"]),
        "pathsmc-default": lambda cfg: dict(step_size=cfg["step_size"]),
    }
    rows = []
    for name, t in targets.items():
        cfg = CONFIG[name]
        ref = DiagonalGaussian(t.dim, scale=cfg["ref_scale"])
        for variant, kw in variants.items():
            for n in args.particles:
                def once(seed, t=t, n=n, ref=ref, kw=kw, cfg=cfg):
                    gen = torch.Generator().manual_seed(seed)
                    t0 = time.perf_counter()
                    r = annealed_smc(t, n, 1, reference=ref, target_ess=TARGET_ESS,
                                     mcmc_steps=MCMC_STEPS, generator=gen, progress=False,
                                     **kw(cfg))
                    lz = float(r.log_z[0])
                    return time.perf_counter() - t0, lz, int(r.num_steps[0])
                once(10_000)  # warm-up
                for s in range(args.seeds):
                    sec, lz, steps = once(s)
                    rows.append({"target": name, "method": variant, "particles": n, "seed": s,
                                 "seconds": sec, "log_z_hat": lz, "error": lz - t.log_z,
                                 "steps": steps})
                last = [r for r in rows if r["method"] == variant and r["particles"] == n
                        and r["target"] == name]
                med = statistics.median(r["seconds"] for r in last)
                print(f"{name} {variant} N={n}: median {med:.3f} s, "
                      f"rmse {math.sqrt(statistics.fmean(r['error'] ** 2 for r in last)):.4f}",
                      flush=True)
    side_path(args.out, "pathsmc").write_text(json.dumps({
        "side": "pathsmc", "cpu": cpu_name(), "torch": torch.__version__,
        "pathsmc": getattr(pathsmc, "__version__", "?"), "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "loadavg_start": load0, "loadavg": loadavg(), "rows": rows}, indent=1))


# ---- JAX / BlackJAX side ----


def jax_manywell(a: float, b: float, c: float):
    """The many-well log-density of pathsmc.targets.boltzmann.ManyWell, in JAX, for one x (D,):
    ``Σ_i −(a d_i + b d_i² + c d_i⁴) − v_i²/2`` with ``d = x[0::2]``, ``v = x[1::2]``."""
    import jax.numpy as jnp

    def logp(x):
        d, v = x[0::2], x[1::2]
        d2 = d * d
        return jnp.sum(-(a * d + b * d2 + c * d2 * d2) - 0.5 * v * v)
    return logp


def jax_gmm(means, scale: float, log_z: float):
    """GaussianMixture40's ``log_z + log (1/K) Σ_k N(x; μ_k, s² I)`` for one x (D,)."""
    import jax.numpy as jnp
    from jax.scipy.special import logsumexp

    mu = jnp.asarray(means, dtype=jnp.float64)
    k, d = mu.shape
    const = log_z - math.log(k) - d * (math.log(scale) + 0.5 * math.log(2 * math.pi))

    def logp(x):
        diff = x[None, :] - mu
        return const + logsumexp(-0.5 * jnp.sum(diff * diff, -1) / scale**2)
    return logp


def run_jax(args) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    import blackjax
    import jax.numpy as jnp
    import numpy as np
    from blackjax.smc import extend_params, resampling

    load0 = loadavg()
    spec = json.loads(spec_path(args.out).read_text())
    rows, checks = [], {}
    for name, sp in spec.items():
        if name == "manywell":
            logp = jax_manywell(sp["a"], sp["b"], sp["c"])
        else:
            logp = jax_gmm(sp["means"], sp["scale"], sp["log_z"])
        pts = jnp.asarray(sp["points"])
        lp = jax.vmap(logp)(pts)
        gr = jax.vmap(jax.grad(logp))(pts)
        checks[name] = {
            "max_abs_log_prob_diff": float(np.max(np.abs(np.asarray(lp)
                                                          - np.array(sp["log_prob"])))),
            "max_abs_grad_diff": float(np.max(np.abs(np.asarray(gr) - np.array(sp["grad"])))),
        }
        print(name, "JAX vs torch target:", checks[name], flush=True)
        dim, s, h = sp["dim"], sp["ref_scale"], sp["step_size"]

        def logprior(x, s=s, dim=dim):
            return (-0.5 * jnp.sum(x * x) / s**2
                    - dim * (math.log(s) + 0.5 * math.log(2 * math.pi)))

        def loglik(x, logp=logp, logprior=logprior):
            return logp(x) - logprior(x)

        for n in args.particles:
            alg = blackjax.adaptive_tempered_smc(
                logprior, loglik, blackjax.mala.build_kernel(), blackjax.mala.init,
                extend_params({"step_size": jnp.asarray(h, dtype=jnp.float64)}),
                resampling.systematic, TARGET_ESS, num_mcmc_steps=MCMC_STEPS)

            @jax.jit
            def run(key, alg=alg, n=n, dim=dim, s=s):
                k0, key = jax.random.split(key)
                state = alg.init(s * jax.random.normal(k0, (n, dim), dtype=jnp.float64))

                def cond(c):
                    return (c[1].tempering_param < 1.0 - 1e-12) & (c[3] < 1000)

                def body(c):
                    key, st, lz, i = c
                    key, sub = jax.random.split(key)
                    st, info = alg.step(sub, st)
                    return key, st, lz + info.log_likelihood_increment, i + 1

                _, _, lz, steps = jax.lax.while_loop(
                    cond, body, (key, state, jnp.zeros((), jnp.float64), jnp.zeros((), jnp.int32)))
                return lz, steps

            t0 = time.perf_counter()
            jax.block_until_ready(run(jax.random.PRNGKey(10_000)))  # compile + warm-up
            compile_s = time.perf_counter() - t0
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                lz, steps = jax.block_until_ready(run(jax.random.PRNGKey(seed)))
                sec = time.perf_counter() - t0
                rows.append({"target": name, "method": "blackjax", "particles": n, "seed": seed,
                             "seconds": sec, "log_z_hat": float(lz),
                             "error": float(lz) - sp["log_z"], "steps": int(steps),
                             "compile_seconds": compile_s})
            last = [r for r in rows if r["particles"] == n and r["target"] == name]
            print(f"{name} blackjax N={n}: compile {compile_s:.1f} s, median "
                  f"{statistics.median(r['seconds'] for r in last):.3f} s, rmse "
                  f"{math.sqrt(statistics.fmean(r['error'] ** 2 for r in last)):.4f}", flush=True)
    side_path(args.out, "jax").write_text(json.dumps({
        "side": "jax", "cpu": cpu_name(), "jax": jax.__version__,
        "blackjax": blackjax.__version__, "jax_devices": [str(d) for d in jax.devices()],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "loadavg_start": load0, "loadavg": loadavg(), "target_check": checks,
        "rows": rows}, indent=1))


# ---- merge ----


def time_to_eps(curve: list[tuple[float, float]], eps: float) -> str:
    """``curve``: (median seconds, RMSE) by increasing N. Log-log interpolation of the time at
    which the RMSE first reaches ``eps``."""
    for i, (t, e) in enumerate(curve):
        if e <= eps:
            if i == 0:
                return f"< {t:.3g}"
            t0, e0 = curve[i - 1]
            if e0 <= e or e0 <= 0 or e <= 0:
                return f"{t:.3g}"
            f = (math.log(e0) - math.log(eps)) / (math.log(e0) - math.log(e))
            return f"{math.exp(math.log(t0) + f * (math.log(t) - math.log(t0))):.3g}"
    return "—"


def merge(args) -> None:
    sides = {s: json.loads(side_path(args.out, s).read_text())
             for s in ("pathsmc", "jax") if side_path(args.out, s).exists()}
    rows = [r for d in sides.values() for r in d["rows"]]
    spec = json.loads(spec_path(args.out).read_text())
    summary = []
    for target in spec:
        for method in ("blackjax", "pathsmc", "pathsmc-default"):
            for n in sorted({r["particles"] for r in rows}):
                rs = [r for r in rows if (r["target"], r["method"], r["particles"]) ==
                      (target, method, n)]
                if not rs:
                    continue
                errs = [r["error"] for r in rs]
                summary.append({
                    "target": target, "method": method, "particles": n, "runs": len(rs),
                    "median_seconds": statistics.median(r["seconds"] for r in rs),
                    "rmse": math.sqrt(statistics.fmean(e * e for e in errs)),
                    "mean_error": statistics.fmean(errs),
                    "median_abs_error": statistics.median(abs(e) for e in errs),
                    "mean_steps": statistics.fmean(r["steps"] for r in rs),
                })
    cpu = cpu_name()
    lines = [f"# Adaptive tempered SMC vs BlackJAX — {cpu}", ""]
    for name, d in sides.items():
        extra = (f"torch {d.get('torch')}, {d.get('threads')} threads" if name == "pathsmc"
                 else f"jax {d.get('jax')}, blackjax {d.get('blackjax')}")
        lines.append(f"- {name} side: {d['date']}, {extra}, load average "
                     f"{d.get('loadavg_start', '?')} → {d['loadavg']}")
    if "jax" in sides:
        lines.append("- JAX target vs torch target (max abs diff of log γ, ∇log γ at 16 points): "
                     + "; ".join(f"{k}: {v['max_abs_log_prob_diff']:.1e}, "
                                 f"{v['max_abs_grad_diff']:.1e}"
                                 for k, v in sides["jax"]["target_check"].items()))
    lines += [f"- ESS target {TARGET_ESS}, {MCMC_STEPS} MALA moves per temperature, float64, "
              f"seeds per cell: {args.seeds}; time: median wall time of one run (JIT excluded)",
              ""]
    for target in spec:
        cfg = spec[target]
        lines += [f"## {target} (D = {cfg['dim']}, log Z = {cfg['log_z']:.4f}, reference "
                  f"N(0, {cfg['ref_scale']}² I), MALA h = {cfg['step_size']})", "",
                  "| method | N | median s | steps | RMSE log Ẑ | mean error |",
                  "|---|---:|---:|---:|---:|---:|"]
        for s in summary:
            if s["target"] == target:
                lines.append(f"| {s['method']} | {s['particles']} | {s['median_seconds']:.4f} | "
                             f"{s['mean_steps']:.1f} | {s['rmse']:.4f} | {s['mean_error']:+.4f} |")
        lines += ["", "Time (s) to reach an RMSE of log Ẑ of ε (interpolated along N):", "",
                  "| method | " + " | ".join(f"ε = {e}" for e in EPSILONS) + " |",
                  "|---|" + "---:|" * len(EPSILONS)]
        for method in ("blackjax", "pathsmc", "pathsmc-default"):
            curve = [(s["median_seconds"], s["rmse"]) for s in summary
                     if s["target"] == target and s["method"] == method]
            if curve:
                lines.append(f"| {method} | " + " | ".join(time_to_eps(curve, e) for e in EPSILONS)
                             + " |")
        lines.append("")
    base = args.out / f"vs-blackjax-{slug(cpu)}"
    base.with_suffix(".md").write_text("\n".join(lines))
    base.with_suffix(".json").write_text(json.dumps(
        {"cpu": cpu, "sides": {k: {kk: vv for kk, vv in v.items() if kk != "rows"}
                               for k, v in sides.items()},
         "config": CONFIG, "target_ess": TARGET_ESS, "mcmc_steps": MCMC_STEPS,
         "summary": summary, "rows": rows}, indent=1))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--side", choices=("pathsmc", "jax", "merge"), required=True)
    p.add_argument("--particles", type=int, nargs="+", default=PARTICLES)
    p.add_argument("--seeds", type=int, default=SEEDS)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    {"pathsmc": run_pathsmc, "jax": run_jax, "merge": merge}[args.side](args)


if __name__ == "__main__":
    main()
