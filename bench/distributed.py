"""Distributed SMC: what splitting the population across ranks costs and gains.

Run under torchrun, once per world size, e.g. on a 2-core CPU (gloo, one thread per rank):

    torchrun --nproc-per-node 1 bench/distributed.py --threads 2
    torchrun --nproc-per-node 2 bench/distributed.py --threads 1

or on G GPUs (NCCL): ``torchrun --nproc-per-node G bench/distributed.py --device cuda``.
Each run times the steering loop (reward tilting of the demo's 2-D mixture, 100 steps) on a
fixed global population N (strong scaling: N / world particles per rank), and the same loop
with the population ops made local (no collectives: what the communication costs). Rank 0
appends a row to bench/results/distributed-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import RESULTS, device_name, slug, write_results  # noqa: E402  (bench/machine.py)

import pathsmc  # noqa: E402
import pathsmc.ops  # noqa: E402
from pathsmc import distributed  # noqa: E402
from pathsmc.diffusion import DiffusionModel, VPSchedule, steering_model  # noqa: E402
from pathsmc.smc import _run  # noqa: E402
from pathsmc.targets import default_2d  # noqa: E402


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one warm-up run, with the
    ranks lined up before each run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--particles", type=int, default=65536, help="global N per row")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads per rank")
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if "RANK" not in os.environ:
        ap.error("run under torchrun (see the module docstring)")
    cuda = args.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else \
        torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.particles % world:
        ap.error(f"--particles {args.particles} is not a multiple of the world size {world}")
    n_local = args.particles // world
    theta = torch.tensor([1.0, -0.5], dtype=torch.float64, device=device)
    model = steering_model(DiffusionModel.from_mixture(default_2d(device), VPSchedule()),
                           "reward", reward=lambda x: x.double() @ theta, steps=args.steps,
                           device=device)
    gen = torch.Generator(device=device).manual_seed(rank)
    dops = distributed.DistributedOps()

    def run(ops) -> None:
        _run(model, n_local, args.batch, args.steps, 0.5, "systematic", gen, ops)

    seconds = timed(lambda: run(dops), device, args.repeats)
    local = timed(lambda: run(pathsmc.ops), device, args.repeats)
    res = distributed.smc(model, n_local, args.batch, generator=gen)
    if rank == 0:
        name = device_name(device)
        row = {"world_size": world, "backend": dist.get_backend(),
               "threads_per_rank": torch.get_num_threads(), "particles": args.particles,
               "particles_per_rank": n_local, "batch": args.batch, "steps": args.steps,
               "seconds": seconds, "seconds_without_collectives": local,
               "resampled_per_row": float(res.num_resampled.double().mean()),
               "log_z": [round(float(v), 4) for v in res.log_z.cpu()],
               "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "torch": torch.__version__}
        stem = f"distributed-{slug(name)}"
        path = args.out / f"{stem}.json"
        doc = json.loads(path.read_text()) if path.exists() else {"device": name, "rows": []}
        doc["rows"] = [r for r in doc["rows"] if r["world_size"] != world
                       or r["particles"] != args.particles] + [row]
        doc["rows"].sort(key=lambda r: (r["particles"], r["world_size"]))
        lines = [f"# Distributed steering loop: {name}", "",
                 f"`torchrun --nproc-per-node W bench/distributed.py`: reward tilting of the "
                 f"2-D demo mixture, {args.steps} steps, B = {args.batch} rows, the global "
                 "population N split over W ranks; median of "
                 f"{args.repeats} runs. \"local\" is the same loop with the population ops "
                 "made local (no collectives).", "",
                 "| N | W | backend | threads/rank | s | local s | collectives | "
                 "speed-up vs W = 1 |", "|---:|---:|---|---:|---:|---:|---:|---:|"]
        base = {r["particles"]: r["seconds"] for r in doc["rows"] if r["world_size"] == 1}
        for r in doc["rows"]:
            share = 1 - r["seconds_without_collectives"] / r["seconds"]
            sp = base.get(r["particles"])
            sp_text = f"{sp / r['seconds']:.2f}x" if sp else "—"
            lines.append(f"| {r['particles']} | {r['world_size']} | {r['backend']} | "
                         f"{r['threads_per_rank']} | {r['seconds']:.3f} | "
                         f"{r['seconds_without_collectives']:.3f} | {100 * share:.0f} % | "
                         f"{sp_text} |")
        write_results(args.out, stem, doc, lines)
        print("\n".join(lines))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
