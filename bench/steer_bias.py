"""The O(h) bias of steer's path-RND weights on a 1-D two-component mixture.

``steer(..., weighting="path")`` weights the Euler–Maruyama chain: log Ẑ estimates the
normalizer of the *discretized* chain's target, which differs from the continuous-time one by
O(h) (docs/design.md, "What is exact and what is O(h)"). This script measures the difference
``E[log Ẑ] − log Z`` against exact (closed-form or quadrature) log Z, over many rows, for

- the exact twist (``"twisted"`` with the exact soft value of a linear reward θ = 0.8): the
  weights are almost constant, so the bias is measured to a few 1e-4;
- classifier-free guidance (``"product"``, a class-conditional model and the mixture,
  w = 1.5, per-row class labels);
- tempering p^0.5 (``"temper"``);

at 50, 100 and 200 uniform steps, and, at 50 steps, two ways of shrinking it: a grid that is
finer near t = 0 (``times = (1 − k/K)²``) and ``weighting="density"`` (exact intermediate
densities; unbiased at any step count).

    OMP_NUM_THREADS=1 .venv/bin/python bench/steer_bias.py            # ~1 min on one core
    OMP_NUM_THREADS=1 .venv/bin/python bench/steer_bias.py --quick    # a smoke run

Prints a Markdown table: case, steps, mean of log Ẑ − log Z ± its standard error over rows.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from pathsmc.diffusion import DiffusionModel, VPSchedule, steer
from pathsmc.targets import GaussianMixture, geometric_product

F64 = torch.float64
VP = VPSchedule()
MIX = GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-2.0], [1.5]]),
                      torch.tensor([[0.3], [0.5]]))
THETA = torch.tensor([0.8], dtype=F64)


def component(c: int) -> GaussianMixture:
    return GaussianMixture(torch.ones(1), MIX.means[c:c + 1], MIX.covs[c:c + 1])


def class_conditional(x: torch.Tensor, t: float, labels: torch.Tensor) -> torch.Tensor:
    """Score of component ``labels[b]`` for row b (label −1: the whole mixture)."""
    dg = MIX.diffused(VP, t)
    mean = dg.means[labels.clamp(min=0)]
    prec = torch.linalg.inv(dg.covs[labels.clamp(min=0)])
    comp = -torch.matmul(x.double() - mean.unsqueeze(1), prec)
    return torch.where(labels.view(-1, 1, 1) >= 0, comp, dg.score(x))


def exact_twist(x: torch.Tensor, t: float):
    _, _, v, g = MIX.diffused(VP, t).log_prob_score_value(x, THETA, grad=True)
    return v, g


def run_case(name: str, steps: int, rows: int, particles: int, grid_power: float = 1.0,
             weighting: str = "path") -> tuple[float, float]:
    times = None
    if grid_power != 1.0:
        times = [(1.0 - k / steps) ** grid_power for k in range(steps + 1)]
    kw = dict(particles=particles, batch=rows, steps=steps, times=times, seed=1, dtype=F64,
              weighting=weighting, progress=False)
    model = DiffusionModel.from_mixture(MIX, VP)
    if name == "exact twist":
        res = steer(model, "twisted", value=exact_twist, **kw)
        exact = torch.full((rows,), float(MIX.linear_tilt(THETA).log_z), dtype=F64)
    elif name == "CFG w=1.5":
        labels = torch.tensor([0, 1]).repeat((rows + 1) // 2)[:rows]
        cond = DiffusionModel(class_conditional, VP, condition=labels, dim=1)
        uncond = cond.with_condition(torch.full_like(labels, -1))
        res = steer([cond, uncond], "product", beta=[1.5, -0.5], **kw)
        answers = [float(geometric_product([component(c), MIX], [1.5, -0.5]).log_z)
                   for c in (0, 1)]
        exact = torch.tensor([answers[c] for c in labels.tolist()], dtype=F64)
    elif name == "temper β=0.5":
        res = steer(model, "temper", beta=0.5, **kw)
        exact = torch.full((rows,), float(MIX.power(0.5).log_z), dtype=F64)
    else:
        raise KeyError(name)
    d = res.log_z.double() - exact
    return float(d.mean()), float(d.std()) / math.sqrt(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few rows and particles")
    args = ap.parse_args()
    torch.set_num_threads(1)
    scale = 8 if args.quick else 1
    sizes = {"exact twist": (256, 256), "CFG w=1.5": (128, 2048), "temper β=0.5": (128, 1024)}
    print("| case | steps | grid | weighting | E[log Ẑ] − log Z | seconds |")
    print("|---|---|---|---|---|---|")
    plan = [(name, steps, 1.0, "path") for name in sizes for steps in (50, 100, 200)]
    plan += [("exact twist", 50, 2.0, "path"), ("exact twist", 50, 1.0, "density")]
    for name, steps, power, weighting in plan:
        rows, particles = sizes[name]
        t0 = time.perf_counter()
        mean, se = run_case(name, steps, max(rows // scale, 8), max(particles // scale, 32),
                            power, weighting)
        grid = "uniform" if power == 1.0 else f"(1 − k/K)^{power:g}"
        print(f"| {name} | {steps} | {grid} | {weighting} | {mean:+.4f} ± {se:.4f} | "
              f"{time.perf_counter() - t0:.1f} |", flush=True)


if __name__ == "__main__":
    main()
