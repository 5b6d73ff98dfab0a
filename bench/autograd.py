"""Forward + backward of ``em_step``: the fused op with its fused backward op
(``pathsmc::em_step_backward``, registered in ``pathsmc._autograd``) against autograd
through ``pathsmc.reference``, eager and under ``torch.compile``.

One timed call is the forward ``(x', logw') = em_step(x, drift, logw, dt, σ, ref_drifts=[b],
ref_coefs=[1], noise=ε)`` (the guidance-correction step, K = 1, as in an ELBO or a
reparameterized path) followed by ``torch.autograd.grad`` of ``Σ c_x·x' + Σ c_w·logw'`` with
respect to x, drift, b and logw (fixed random cotangents). The noise is explicit in every
variant (a graph-recording ``pathsmc.ops.em_step`` draws it explicitly anyway), float32 states,
float64 log-weights. Variants:

- **fused**: ``pathsmc.ops.em_step`` (fused forward kernel; backward = the fused
  ``em_step_backward`` kernel, one pass over the elements);
- **reference**: ``pathsmc.reference.em_step`` differentiated by autograd;
- **fused compiled** / **reference compiled**: ``torch.compile`` of the forward (AOT autograd
  compiles the backward too), compiled and run three times before timing.

Before timing, the gradients of the four variants are compared (float32: 1e-4 relative).
Timing: each round times one batch of back-to-back calls (≥ 20 ms) of every variant in a
rotating order; the median per call over the rounds is reported (min and max in the JSON).
On CUDA the batch is synchronized before and after (wall time of the whole batch).

    .venv/bin/python bench/autograd.py [--sizes 1x256x2 4x4096x16 4x4096x256] [--rounds 9]
        [--no-compile] [--threads 1] [--device cpu|cuda]

Results: bench/results/autograd-cpu.{json,md} (autograd-cuda.* on CUDA).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import time

import torch
from machine import RESULTS, device_name, write_results  # bench/machine.py

import pathsmc
import pathsmc.ops as P
import pathsmc.reference as R

DT, SIGMA = 0.05, 1.0


def _step(ops):
    def f(x, drift, ref, logw, noise):
        return ops.em_step(x, drift, logw, dt=DT, sigma=SIGMA, ref_drifts=[ref],
                           ref_coefs=[1.0], noise=noise)

    return f


def _inputs(b: int, n: int, d: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(0)

    def rn(*shape, dtype=torch.float32, grad=True):
        t = torch.randn(*shape, generator=g, dtype=dtype).to(device)
        return t.requires_grad_(grad)

    x, drift, ref = rn(b, n, d), rn(b, n, d), rn(b, n, d)
    logw = rn(b, n, dtype=torch.float64)
    noise = rn(b, n, d, grad=False)
    cx, cw = rn(b, n, d, grad=False), rn(b, n, dtype=torch.float64, grad=False)
    return (x, drift, ref, logw, noise), (cx, cw)


def _fwd_bwd(fn, inputs, cot):
    x_new, lw_new = fn(*inputs)
    loss = (x_new * cot[0]).sum() + (lw_new * cot[1]).sum()
    return torch.autograd.grad(loss, inputs[:4])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _per_call(call, device: str, min_s: float = 0.02) -> tuple[int, float]:
    """(calls per batch, seconds per call of one sizing batch)."""
    reps = 1
    while True:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            call()
        _sync(device)
        dt = time.perf_counter() - t0
        if dt >= min_s or reps >= 1 << 14:
            return reps, dt / reps
        reps *= 2


def bench_size(b: int, n: int, d: int, rounds: int, compile_: bool, device: str) -> dict:
    inputs, cot = _inputs(b, n, d, device)
    fns = {"fused": _step(P), "reference": _step(R)}
    compile_s = {}
    if compile_:
        for name in ("fused", "reference"):
            torch._dynamo.reset()
            c = torch.compile(_step(P if name == "fused" else R))
            t0 = time.perf_counter()
            for _ in range(3):
                _fwd_bwd(c, inputs, cot)
            compile_s[f"{name} compiled"] = time.perf_counter() - t0
            fns[f"{name} compiled"] = c
    grads = {name: _fwd_bwd(fn, inputs, cot) for name, fn in fns.items()}
    check = {}
    for name, gs in grads.items():
        err = max(float((a - r).abs().max() / (r.abs().max() + 1e-30))
                  for a, r in zip(gs, grads["reference"], strict=True))
        check[name] = err
        if err > 1e-4:
            print(f"  CHECK FAILED: {name} gradients differ from the reference by {err:.2e}")
    calls = {name: (lambda fn=fn: _fwd_bwd(fn, inputs, cot)) for name, fn in fns.items()}
    batch = {name: _per_call(c, device)[0] for name, c in calls.items()}
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    gc.disable()
    try:
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(batch[name]):
                    calls[name]()
                _sync(device)
                times[name].append((time.perf_counter() - t0) / batch[name])
    finally:
        gc.enable()
    return {"shape": [b, n, d], "elements": b * n * d,
            "median_us": {k: 1e6 * statistics.median(v) for k, v in times.items()},
            "min_us": {k: 1e6 * min(v) for k, v in times.items()},
            "max_us": {k: 1e6 * max(v) for k, v in times.items()},
            "grad_rel_err_vs_reference": check, "compile_s": compile_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["1x256x2", "4x4096x16", "4x4096x256"],
                   help="BxNxD shapes")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    on_cuda = args.device.startswith("cuda")
    load0 = list(os.getloadavg())
    rows = []
    for size in args.sizes:
        b, n, d = (int(v) for v in size.split("x"))
        print(f"em_step fwd+bwd B={b} N={n} D={d} ...", flush=True)
        rows.append(bench_size(b, n, d, args.rounds, not args.no_compile, args.device))
        print("  " + ", ".join(f"{k} {v:.0f} us" for k, v in rows[-1]["median_us"].items()))
    data = {"machine": device_name(args.device), "device": args.device,
            "torch": torch.__version__, "pathsmc": pathsmc.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "threads": args.threads, "loadavg_start": load0,
            "loadavg_end": list(os.getloadavg()), "command": " ".join(sys.argv), "rows": rows}
    variants = list(rows[0]["median_us"])
    kind = "CUDA" if on_cuda else "CPU"
    lines = [f"# em_step forward + backward, {kind} ({data['machine']}, torch {data['torch']}, "
             f"{args.threads} thread(s), {data['date']})", "",
             f"`{data['command']}`; load average {load0[0]:.1f} at the start, "
             f"{data['loadavg_end'][0]:.1f} at the end (a shared machine: compare within a "
             "row).", "",
             "Median µs per forward + backward (K = 1 reference drift, float32 states, explicit "
             "noise); speed-up = reference eager / variant.", "",
             "| B×N×D | " + " | ".join(variants) + " | fused vs reference |",
             "|---|" + "---|" * (len(variants) + 1)]
    for r in rows:
        m = r["median_us"]
        lines.append(f"| {'×'.join(map(str, r['shape']))} | "
                     + " | ".join(f"{m[v]:.0f}" for v in variants)
                     + f" | {m['reference'] / m['fused']:.2f}x |")
    lines += ["", "Gradients checked against the reference before timing (max relative "
              "difference per row): " + "; ".join(
                  f"{'×'.join(map(str, r['shape']))}: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in r["grad_rel_err_vs_reference"].items())
                  for r in rows)]
    print("\n".join(lines))
    print(write_results(args.out_dir, f"autograd-{'cuda' if on_cuda else 'cpu'}", data, lines))


if __name__ == "__main__":
    main()
