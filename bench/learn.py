"""Learned twists against fixed twists (pathsmc.learn, issue 11): the longer trainings behind
the figures of docs/learn.md.

Diffusion: the 2-D six-component mixture (``pathsmc.targets.default_2d``, VP schedule) tilted
by the linear reward ``r(x) = θ·x``, θ = (1, −0.5), whose soft value ``V_t`` is closed form.
A ``ValueNetwork`` is trained with ``train_diffusion_twist`` (whole-path consistency by
default); then ``steer`` runs ``--repeats`` independent SMC rows of ``--eval-particles``
particles over ``--eval-steps`` steps, for each evaluation seed, with

- the learned twist (``mode="twisted"``, ``value=net.twist()``),
- the exact soft value (the best a twist can do on this chain),
- FK steering with the Tweedie twist (``mode="reward"``: potentials ``r(x̂_0(x, t))``),

and reports the log Ẑ standard deviation over the rows (the spread), the mean error against
the exact log Z, and the ratio spread(Tweedie) / spread(learned). The MSE of ``V_θ − V`` over
t ∈ {0.05, 0.2, …, 0.95} and x from the tilted diffused marginals (512 points each) measures
the fit.

Token model (``--token``): ``MarkovSequence.random(batch=2, vocab=4, length=6,
end_penalty=2.0, seed=0)``; ``TokenValue`` tables trained by CTL and by path consistency;
twisted SMC with 16 particles, log Ẑ spread over 32 repeats per row, against the untrained
table and the exact DP twist.

    .venv/bin/python bench/learn.py [--steps 20] [--iterations 1500] [--hidden 64]
        [--span none|C] [--ops fused|reference] [--repeats 64] [--seeds 2 3] [--token]

Results: bench/results/learn-<cpu>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch
from machine import RESULTS, cpu_name, slug, write_results  # bench/machine.py

import pathsmc
import pathsmc.reference
from pathsmc.diffusion import DiffusionModel, VPSchedule, steer
from pathsmc.learn import TokenValue, ValueNetwork, train_diffusion_twist, train_token_twist
from pathsmc.targets import MarkovSequence, default_2d
from pathsmc.twisted_sequence import twisted_smc

F64 = torch.float64
VP = VPSchedule()
MIX = default_2d()
THETA = torch.tensor([1.0, -0.5], dtype=F64)
MODEL = DiffusionModel.from_mixture(MIX, VP)
LOG_Z = float(MIX.linear_tilt(THETA).log_z)
MSE_TIMES = (0.05, 0.2, 0.4, 0.6, 0.8, 0.95)


def reward(x: torch.Tensor) -> torch.Tensor:
    return x.double() @ THETA


def exact(x: torch.Tensor, t: float):
    _, _, v, g = MIX.diffused(VP, t).log_prob_score_value(x, THETA, grad=True)
    return v, g


def value_mse(net: ValueNetwork) -> list[float]:
    """MSE of V_θ − V at each t of MSE_TIMES, x from the tilted diffused marginals."""
    tilt = MIX.linear_tilt(THETA).mixture
    out = []
    for t in MSE_TIMES:
        x = tilt.diffused(VP, t).sample(512, torch.Generator().manual_seed(1))[None]
        with torch.no_grad():
            out.append(float((net(x, t) - exact(x, t)[0]).pow(2).mean()))
    return out


def spreads(net: ValueNetwork, seed: int, repeats: int, particles: int, steps: int) -> dict:
    kw = {"particles": particles, "batch": repeats, "steps": steps, "seed": seed,
          "dtype": F64}
    runs = {"learned": steer(MODEL, "twisted", value=net.twist(), reward=reward, **kw),
            "exact": steer(MODEL, "twisted", value=exact, reward=reward, **kw),
            "tweedie": steer(MODEL, "reward", reward=reward, **kw)}
    out = {name: {"spread": float(r.log_z.std()), "error": float(r.log_z.mean()) - LOG_Z}
           for name, r in runs.items()}
    out["ratio"] = out["tweedie"]["spread"] / out["learned"]["spread"]
    return out


def diffusion(args) -> dict:
    torch.manual_seed(0)
    base = (lambda x, t: reward(x)) if args.base == "reward" else None
    net = ValueNetwork(2, hidden=args.hidden, layers=2, base=base)
    ops = pathsmc.ops if args.ops == "fused" else pathsmc.reference
    span = None if args.span == "none" else int(args.span)
    t0 = time.perf_counter()
    losses = train_diffusion_twist(MODEL, net, reward, objective="path_consistency", span=span,
                                   steps=args.steps, iterations=args.iterations,
                                   particles=128, batch_paths=args.batch_paths, lr=args.lr,
                                   generator=torch.Generator().manual_seed(0), ops=ops)
    train_s = time.perf_counter() - t0
    mse = value_mse(net)
    evals = {}
    for seed in args.seeds:
        for repeats in sorted({16, args.repeats}):
            evals[f"seed {seed}, {repeats} rows"] = spreads(net, seed, repeats,
                                                           args.eval_particles,
                                                           args.eval_steps)
    return {"train_s": train_s, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "mse": sum(mse) / len(mse), "mse_per_t": dict(zip(MSE_TIMES, mse, strict=True)),
            "evals": evals}


def token(_args) -> dict:
    model = MarkovSequence.random(batch=2, vocab=4, length=6, end_penalty=2.0, seed=0)
    reps = 32
    rows = model.repeat(reps)

    def spread(table) -> list[float]:
        res = twisted_smc(rows, 16, twist=table.detach().repeat_interleave(reps, 0),
                          generator=torch.Generator().manual_seed(1))
        return res.log_z.view(2, reps).std(1).tolist()

    out = {"untrained": {"spread": spread(TokenValue(2, 6, 4).table), "train_s": 0.0},
           "exact DP": {"spread": spread(model.to_go()), "train_s": 0.0}}
    for name, kw in (("ctl", {"objective": "ctl", "iterations": 200, "lr": 0.03}),
                     ("path consistency", {"objective": "path_consistency",
                                           "iterations": 100, "lr": 0.1})):
        twist = TokenValue(2, 6, 4)
        t0 = time.perf_counter()
        train_token_twist(model, twist, generator=torch.Generator().manual_seed(0), **kw)
        out[name] = {"spread": spread(twist.table), "train_s": time.perf_counter() - t0}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="steps of the training paths")
    p.add_argument("--iterations", type=int, default=1500)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--span", default="none", help="'none' (whole paths) or a window length")
    p.add_argument("--batch-paths", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--base", choices=("none", "reward"), default="none",
                   help="known part of V_θ: 'reward' learns V − r (the value at t = 0 is r)")
    p.add_argument("--ops", choices=("fused", "reference"), default="fused")
    p.add_argument("--repeats", type=int, default=64, help="SMC rows per evaluation")
    p.add_argument("--eval-particles", type=int, default=64)
    p.add_argument("--eval-steps", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[2, 3])
    p.add_argument("--token", action="store_true", help="also the token-model trainings")
    p.add_argument("--no-diffusion", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = {"config": vars(args), "machine": cpu_name(), "torch": torch.__version__,
            "pathsmc": pathsmc.__version__, "date": datetime.datetime.now(
                datetime.UTC).isoformat(timespec="seconds"),
            "loadavg": list(os.getloadavg()), "log_z": LOG_Z}
    lines = [f"# pathsmc.learn: learned vs fixed twists ({data['machine']}, torch "
             f"{data['torch']}, {data['date']})", "",
             f"`{' '.join(['bench/learn.py', *sys.argv[1:]])}`", ""]
    if not args.no_diffusion:
        d = data["diffusion"] = diffusion(args)
        lines += [f"Diffusion: ValueNetwork(2, {args.hidden}) trained {args.iterations} Adam "
                  f"steps on {args.steps}-step paths (span {args.span}, base {args.base}, "
                  f"{args.ops} ops) in "
                  f"{d['train_s']:.0f} s; MSE of V_θ − V {d['mse']:.3f} (per t: "
                  + ", ".join(f"{v:.3f}" for v in d["mse_per_t"].values()) + ").", "",
                  f"log Ẑ spread at N = {args.eval_particles}, {args.eval_steps} steps "
                  f"(log Z = {LOG_Z:.4f}):", "",
                  "| evaluation | learned | exact V | Tweedie FK | Tweedie / learned |",
                  "|---|---|---|---|---|"]
        for name, e in d["evals"].items():
            cells = [f"{e[k]['spread']:.4f} ({e[k]['error']:+.3f})"
                     for k in ("learned", "exact", "tweedie")]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {e['ratio']:.1f}x |")
        lines += ["", "Cells: spread (mean error of log Ẑ)."]
        print("\n".join(lines))
    if args.token:
        tk = data["token"] = token(args)
        lines += ["", "Token model (B=2, V=4, T=6), 16 particles, log Ẑ spread over 32 "
                  "repeats per row:", "", "| twist | row 0 | row 1 | train s |",
                  "|---|---|---|---|"]
        for name, e in tk.items():
            lines.append(f"| {name} | {e['spread'][0]:.2g} | {e['spread'][1]:.2g} | "
                         f"{e['train_s']:.1f} |")
        print("\n".join(lines[-len(tk) - 4:]))
    stem = f"learn-{slug(data['machine'])}"
    print(write_results(args.out_dir, stem, data, lines))


if __name__ == "__main__":
    main()
