"""A learned twist for one class of the shipped digits DDPM vs the Tweedie twist (TDS) and FK.

1. Train :class:`pathsmc.learn.chain_paths.ChainValue` (the Tweedie twist r(x̂₀) times a learned
   per-time scale, plus a learned MLP correction; starts as the Tweedie twist) for
   ``--seconds`` by sub-trajectory balance (spans 1 and K) on detached paths of the chain
   (``--policy``: plain chain, current-twist-guided chain, or alternating).
2. Compare, at the same N, rows and steps (unconditional model, reward r = log p₁(k | x)):
   - ``fk``: ``steer(model, "reward")``, difference potentials r(x̂₀) (no guidance);
   - ``tds``: ``steer(model, "reward", guidance=1)``: the Tweedie twist with its gradient;
   - ``*-t0.3``: the same with potentials/guidance from t ≤ 0.3 only (the demo's setting);
   - ``learned``: ``steer(model, "twisted", value=net.twist(...), guidance=1)``.
   Metrics per row: final ESS, min ESS over the steps, log Ẑ; reported as mean over rows,
   log Ẑ's sd over rows (spread) and SE of its mean. All estimate the same
   Z = E[p₁(k | X_K)]; ``plain`` is log of the mean of p₁(k | x) over independent samples of
   diffusers' own loop.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/learn_digits.py --seconds 240
"""

from __future__ import annotations

import argparse
import datetime
import math
import time

import torch
from machine import RESULTS, device_name, write_results  # bench/machine.py

from pathsmc.commands.demo_digits import class_reward, independent_log_z, plain_samples
from pathsmc.diffusion import steer
from pathsmc.integrations.diffusers import DiffusersModel
from pathsmc.learn.chain_paths import ChainValue, train_chain_twist
from pathsmc.models.digits import NULL_CLASS, load_digits_model, load_reward_classifier


def run(method: str, unet, sched, reward_net, digit: int, rows: int, n: int, steps: int,
        seed: int, net: ChainValue | None) -> dict:
    t_start = 0.3 if method.endswith("-t0.3") else 1.0
    if method == "learned":
        t_start = net.t_start
    labels = torch.full((rows,), NULL_CLASS)
    model = DiffusersModel(unet, sched, class_labels=labels, t_start=t_start)
    reward = class_reward(reward_net, torch.full((rows,), digit))
    common = {"particles": n, "batch": rows, "steps": steps, "seed": seed, "progress": False}
    t0 = time.perf_counter()
    if method.startswith("fk"):
        res = steer(model, "reward", reward=reward, **common)
    elif method.startswith("tds"):
        res = steer(model, "reward", reward=reward, guidance=1.0, **common)
    else:
        value = net.twist(model, steps, reward)
        res = steer(model, "twisted", value=value, reward=reward, guidance=1.0, **common)
    sec = time.perf_counter() - t0
    lz = res.log_z.double()
    return {"method": method, "seconds": sec,
            "final_ess": float(res.final_ess.double().mean()),
            "min_ess": float(res.ess.double().min(0).values.mean()),
            "log_z_mean": float(lz.mean()), "log_z_sd": float(lz.std()),
            "log_z_se": float(lz.std()) / math.sqrt(rows),
            "log_mean_z": float(torch.logsumexp(lz, 0) - math.log(rows)),
            "log_z_rows": [float(v) for v in lz]}


def markdown(data: dict) -> list[str]:
    c = data["config"]
    lines = [f"# Learned twist vs Tweedie twist on the digits DDPM ({data['device']})", "",
             f"digit {c['digit']}, N = {c['particles']}, {c['rows']} rows, {c['steps']} steps, "
             f"seed {c['seed']}; training {data['train']['seconds']:.0f} s "
             f"({data['train']['iters']} iterations, policy {c['policy']}, "
             f"{'scale only' if c['no_correction'] else 'scale + MLP correction'}, "
             f"{data['train']['params']} parameters, t_start {c.get('t_start', 1.0)}, 1 thread), "
             f"loss {data['train']['loss_first']:.1f} → {data['train']['loss_last']:.2f} "
             f"(mean of the last 10: {data['train']['loss_last10']:.2f}).", "",
             "| method | final ESS | min ESS | log Ẑ mean ± SE | log Ẑ sd (rows) | "
             "log mean Ẑ | time s |",
             "|---|---|---|---|---|---|---|"]
    for r in data["methods"]:
        lines.append(f"| {r['method']} | {r['final_ess']:.1f} | {r['min_ess']:.1f} | "
                     f"{r['log_z_mean']:.3f} ± {r['log_z_se']:.3f} | {r['log_z_sd']:.3f} | "
                     f"{r['log_mean_z']:.3f} | {r['seconds']:.1f} |")
    p = data["plain"]
    lines += ["", f"plain: log E[p₁({c['digit']} | X)] = {p['log_z']:.3f} ± {p['se']:.3f} "
              f"({p['samples']} samples of diffusers' own loop)."]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--digit", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=240.0)
    ap.add_argument("--policy", default="mix", choices=("plain", "twist", "mix"))
    ap.add_argument("--particles", type=int, default=64)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--plain", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stem", default="learn-digits-cpu")
    ap.add_argument("--t-start", type=float, default=1.0,
                    help="train and run the learned twist from t <= t_start only")
    ap.add_argument("--no-correction", action="store_true",
                    help="learn only the per-time scale of the Tweedie twist")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    unet, sched = load_digits_model()
    reward_net = load_reward_classifier()
    model1 = DiffusersModel(unet, sched, class_labels=torch.tensor([NULL_CLASS]))
    reward1 = class_reward(reward_net, torch.tensor([a.digit]))
    net = ChainValue(64, correction=not a.no_correction)
    t0 = time.perf_counter()
    losses = train_chain_twist(model1, a.steps, reward1, net, seconds=a.seconds,
                               policy=a.policy, t_start=a.t_start, seed=0, log=print)
    net.t_start = a.t_start
    train = {"seconds": time.perf_counter() - t0, "iters": len(losses),
             "loss_first": losses[0], "loss_last": losses[-1],
             "loss_last10": sum(losses[-10:]) / len(losses[-10:]), "losses": losses,
             "params": sum(p.numel() for p in net.parameters())}
    net.requires_grad_(False)
    methods = []
    for m in ("fk", "tds", "fk-t0.3", "tds-t0.3", "learned"):
        r = run(m, unet, sched, reward_net, a.digit, a.rows, a.particles, a.steps, a.seed, net)
        print(f"{m:9s} final ESS {r['final_ess']:6.1f}  min ESS {r['min_ess']:6.1f}  "
              f"log Z {r['log_z_mean']:.3f} ± {r['log_z_se']:.3f}  sd {r['log_z_sd']:.3f}")
        methods.append(r)
    g = torch.Generator().manual_seed(a.seed + 100)
    xs = plain_samples(unet, sched, torch.full((a.plain,), NULL_CLASS), a.steps, generator=g)
    est, se = independent_log_z(reward_net, xs)
    plain = {"log_z": float(est[a.digit]), "se": float(se[a.digit]), "samples": a.plain}
    print(f"plain     log Z {plain['log_z']:.3f} ± {plain['se']:.3f}")
    data = {"device": f"{device_name('cpu')}, {a.threads} thread(s)",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "config": vars(a), "train": train, "methods": methods, "plain": plain}
    path = write_results(RESULTS, a.stem, data, markdown(data))
    print("\n".join(markdown(data)))
    print(f"wrote {path}.{{json,md}}")


if __name__ == "__main__":
    main()
