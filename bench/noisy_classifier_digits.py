"""A learned twist for all ten classes of the shipped digits DDPM: a noisy classifier trained by
soft-label regression on the plain chain's paths (:mod:`pathsmc.learn.noisy_classifier`), against
FK steering and the Tweedie twist (TDS).

1. Sample ``--paths`` (+ ``--held-out``) paths of the unguided 25-step chain, label each with the
   reward classifier's ``p₁(· | X_K)``, fit :class:`NoisyClassifier` for up to ``--epochs``
   (keeping the best held-out epoch).
2. Steer every class (rows ``b`` ask for digit ``b mod 10``, ``--runs`` replicates per class;
   unconditional model, reward r = log p₁(k | x)), same N, steps and seed for every method:
   - ``fk``: ``steer(model, "reward")`` (difference potentials r(x̂₀), no guidance);
   - ``tds``: ``steer(model, "reward", guidance=1)`` (the Tweedie twist and its gradient);
   - ``learned``: ``steer(model, "twisted", value=net.twist(classes), guidance=1)``;
   - ``*-t0.3``: potentials / guidance from t ≤ 0.3 only (the demo's setting).
3. Report per method: final and minimum ESS (mean over rows), the spread of log Ẑ (per class sd
   over replicates, root-mean-square over classes), the mean z-score of log Ẑ against the
   independent estimate ``log E[p₁(k | X)]`` from ``--plain`` samples of diffusers' own loop, and
   the exact check Σ_k Ẑ_k = 1 (mean over replicates ± SE).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/noisy_classifier_digits.py
"""

from __future__ import annotations

import argparse
import datetime
import math
import time

import torch
from machine import RESULTS, device_name, write_results  # bench/machine.py

from pathsmc.commands.demo_digits import (
    class_reward,
    independent_log_z,
    plain_samples,
    row_classes,
)
from pathsmc.diffusion import steer
from pathsmc.integrations.diffusers import DiffusersModel
from pathsmc.learn.noisy_classifier import NoisyClassifier, fit_class_twist
from pathsmc.models.digits import (
    NULL_CLASS,
    NUM_CLASSES,
    load_digits_model,
    load_noisy_classifier,
    load_reward_classifier,
    training_info,
)

METHODS = ("fk", "tds", "learned", "fk-t0.3", "tds-t0.3", "learned-t0.3")


def fit(unet, sched, reward_net, a) -> tuple[NoisyClassifier, dict]:
    model = DiffusersModel(unet, sched, class_labels=torch.tensor([NULL_CLASS]))
    torch.manual_seed(a.seed)
    net = NoisyClassifier(64, NUM_CLASSES, hidden=a.hidden, layers=a.layers)
    return fit_class_twist(model, a.steps, reward_net, paths=a.paths, held_out=a.held_out,
                           epochs=a.epochs, net=net, seed=a.seed + 1000, log=print)


def run(method: str, unet, sched, reward_net, net: NoisyClassifier, a,
        estimate: torch.Tensor, estimate_se: torch.Tensor) -> dict:
    classes = row_classes(a.runs)
    model = DiffusersModel(unet, sched, class_labels=torch.full_like(classes, NULL_CLASS),
                           t_start=0.3 if method.endswith("-t0.3") else 1.0)
    reward = class_reward(reward_net, classes)
    common = {"particles": a.particles, "batch": classes.numel(), "steps": a.steps,
              "seed": a.seed, "progress": False}
    t0 = time.perf_counter()
    if method.startswith("fk"):
        res = steer(model, "reward", reward=reward, **common)
    elif method.startswith("tds"):
        res = steer(model, "reward", reward=reward, guidance=1.0, **common)
    else:
        res = steer(model, "twisted", value=net.twist(classes), reward=reward, guidance=1.0,
                    **common)
    sec = time.perf_counter() - t0
    lz = res.log_z.double().reshape(a.runs, NUM_CLASSES)
    spread = float(lz.var(0).mean().sqrt())
    z = (lz.mean(0) - estimate) / (lz.var(0) / a.runs + estimate_se ** 2).sqrt()
    total = lz.exp().sum(1)
    return {"method": method, "seconds": sec,
            "final_ess": float(res.final_ess.double().mean()),
            "min_ess": float(res.ess.double().min(0).values.mean()),
            "log_z_spread": spread, "class_spread": [float(v) for v in lz.std(0)],
            "mean_z_score": float(z.mean()), "z_scores": [float(v) for v in z],
            "class_sum": float(total.mean()),
            "class_sum_se": float(total.std()) / math.sqrt(a.runs),
            "ess_by_step": [float(v) for v in res.ess.double().mean(1) / a.particles],
            "log_z_rows": [float(v) for v in lz.flatten()]}


def plot(data: dict, path) -> None:
    """Two panels: mean ESS/N along the chain per method, and per class the error of log Ẑ
    against plain sampling (each replicate a dot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    est = torch.tensor(data["plain"]["log_z"])
    for i, r in enumerate(data["methods"]):
        style = "-" if "t0.3" not in r["method"] else "--"
        ax1.plot(r["ess_by_step"], style, label=r["method"], color=f"C{i % 3}")
        err = torch.tensor(r["log_z_rows"]).reshape(-1, NUM_CLASSES) - est
        xs = torch.arange(NUM_CLASSES) + (i - len(data["methods"]) / 2) * 0.12
        ax2.plot(xs.expand_as(err).flatten(), err.flatten().clamp(min=-6), ".", ms=3,
                 color=f"C{i % 3}", alpha=0.35 if "t0.3" in r["method"] else 0.8,
                 label=r["method"])
    ax1.set(xlabel="chain step", ylabel="ESS / N (mean over rows)", ylim=(0, 1.02),
            title="ESS along the chain")
    ax1.legend(fontsize=8)
    ax2.axhline(0.0, color="k", lw=0.8)
    ax2.set(xlabel="class k", ylabel="log Ẑ_k − log E[p₁(k | X)] (clipped at −6)",
            xticks=range(NUM_CLASSES), title="log Ẑ per replicate against plain sampling")
    c = data["config"]
    fig.suptitle(f"digits DDPM, N = {c['particles']}, {c['steps']} steps, {c['runs']} "
                 "replicates per class: learned noisy-classifier twist vs FK / Tweedie (TDS)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(data: dict) -> list[str]:
    c, f = data["config"], data["fit"]
    what = (f"the shipped one (`load_noisy_classifier`, {f['params']} parameters, fit by "
            f"tools/train_digits.py on {f['paths']} paths of the {f['chain_steps']}-step chain)"
            if f.get("shipped") else
            f"NoisyClassifier ({c['hidden']}×{c['layers']}, {f['params']} parameters) fit on "
            f"{c['paths']} plain-chain paths of this chain")
    lines = [f"# Noisy-classifier twist vs Tweedie twist on the digits DDPM ({data['device']})",
             "", f"All 10 classes × {c['runs']} replicates, N = {c['particles']}, {c['steps']} "
             f"steps, seed {c['seed']}. Twist: {what} "
             f"({f['sample_seconds']:.0f} s to sample) for {len(f['train_loss'])} epoch(s) "
             f"({f['fit_seconds']:.0f} s), kept epoch {f['best_epoch']} (held-out cross-entropy "
             + ", ".join(f"{v:.3f}" for v in f["held_out_loss"]) + ").",
             "", "| method | final ESS | min ESS | log Ẑ spread | mean z vs plain | Σ_k Ẑ_k ± SE "
             "| time s |", "|---|---|---|---|---|---|---|"]
    for r in data["methods"]:
        lines.append(f"| {r['method']} | {r['final_ess']:.1f} | {r['min_ess']:.1f} | "
                     f"{r['log_z_spread']:.3f} | {r['mean_z_score']:+.1f} | "
                     f"{r['class_sum']:.3f} ± {r['class_sum_se']:.3f} | {r['seconds']:.1f} |")
    p = data["plain"]
    lines += ["", "log Ẑ spread: per class sd over replicates, root-mean-square over classes. "
              f"mean z: of (mean log Ẑ − log E[p₁(k | X)]) per class, the latter from "
              f"{p['samples']} samples of diffusers' own loop (class-mean "
              f"{p['log_z_mean']:.3f}); negative = Ẑ's heavy right tail not yet sampled "
              "(docs/diffusers.md). Σ_k Ẑ_k = 1 exactly in expectation."]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paths", type=int, default=32768, help="training paths")
    ap.add_argument("--held-out", type=int, default=2048, help="held-out paths")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--particles", type=int, default=64)
    ap.add_argument("--runs", type=int, default=8, help="replicates per class")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--plain", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--stem", default="noisy-classifier-digits-cpu")
    ap.add_argument("--plot", default=None,
                    help="where the PNG goes (default: next to the results; docs/ keeps one)")
    ap.add_argument("--shipped", action="store_true",
                    help="use the shipped twist (load_noisy_classifier) instead of fitting one")
    a = ap.parse_args()
    methods = a.methods.split(",")
    if unknown := set(methods) - set(METHODS):
        ap.error(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
    torch.set_num_threads(a.threads)
    unet, sched = load_digits_model()
    reward_net = load_reward_classifier()
    if a.shipped:
        net = load_noisy_classifier()
        info = training_info()["noisy_classifier"]
        fitted = {"shipped": True, "sample_seconds": info["sample_seconds"],
                  "fit_seconds": info["fit_seconds"], "train_loss": info["train_loss"],
                  "held_out_loss": info["held_out_loss"], "best_epoch": info["best_epoch"],
                  "params": sum(p.numel() for p in net.parameters()),
                  "paths": info["paths"], "chain_steps": info["chain_steps"]}
    else:
        net, fitted = fit(unet, sched, reward_net, a)
    g = torch.Generator().manual_seed(a.seed + 100)
    xs = plain_samples(unet, sched, torch.full((a.plain,), NULL_CLASS), a.steps, generator=g)
    est, est_se = independent_log_z(reward_net, xs)
    rows = []
    for m in methods:
        r = run(m, unet, sched, reward_net, net, a, est, est_se)
        print(f"{m:13s} final ESS {r['final_ess']:5.1f}  min ESS {r['min_ess']:5.1f}  "
              f"spread {r['log_z_spread']:.3f}  z {r['mean_z_score']:+.1f}  "
              f"Σ Ẑ {r['class_sum']:.3f} ± {r['class_sum_se']:.3f}  {r['seconds']:.1f} s")
        rows.append(r)
    data = {"device": f"{device_name('cpu')}, {a.threads} thread(s)",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "config": vars(a), "fit": fitted, "methods": rows,
            "plain": {"samples": a.plain, "log_z": [float(v) for v in est],
                      "se": [float(v) for v in est_se], "log_z_mean": float(est.mean())}}
    path = write_results(RESULTS, a.stem, data, markdown(data))
    try:
        png = a.plot or f"{path}.png"
        plot(data, png)
        print(f"wrote {png}")
    except ImportError:
        print("matplotlib is not installed: no plot")
    print("\n".join(markdown(data)))
    print(f"wrote {path}.{{json,md}}")


if __name__ == "__main__":
    main()
