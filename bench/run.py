"""Microbenchmarks of the pathsmc ops against their pure-PyTorch references.

For every op (and size) this times, in one process:

- ``pathsmc.ops`` (the fused C++/CUDA kernels), randomness drawn in-kernel from an explicit
  ``torch.Generator`` (no explicit noise: the in-kernel Philox is part of the cost);
- ``pathsmc.reference`` eager, drawing its own ``torch.randn`` / ``torch.rand`` (also part of its
  cost);
- ``torch.compile(reference)``, compiled once and warmed up before timing;

and reports medians of repeated runs, the speedups, the bytes each op must move (docs/design.md,
"Performance model") as GB/s and as % of the copy bandwidth measured in the same run, and the
issue targets (PASS / MISS) where one exists. Results go to ``bench/results/<device>.json`` and
``.md``; the table is also printed. See bench/README.md.

    .venv/bin/python bench/run.py                      # everything, default device
    .venv/bin/python bench/run.py --quick --no-compile # tiny sizes, smoke test
    .venv/bin/python bench/run.py --only em_step --repeats 21
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from machine import device_name, slug  # bench/machine.py (scripts run from bench/)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCHEMES = ("systematic", "stratified", "multinomial", "residual")
FAMILIES = ("em_step", "kernel_logpdf", "normalize", "resample", "resample+gather",
            "adaptive_resample", "mala_accept", "replica_swap")
QUICK_ELEMS = 1 << 12  # element budget of a --quick shape
TARGET_LABELS = {"vs_eager": "x eager", "vs_compile": "x compile", "pct_copy": "% copy bw"}
# Check tolerances: floats relative to max(1, |reference|); indices/bools: mismatch fraction
# (inverse-CDF boundaries and accept/reject thresholds may round differently).
FLOAT_TOL = 1e-3
INDEX_TOL = 1e-3
NOISY_CORES = 0.2  # other processes' average CPU use above which a row is flagged NOISY


# --------------------------------------------------------------------------------------------
# machine description


# --------------------------------------------------------------------------------------------
# timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batch(fn: Callable[[], object], inner: int, device: torch.device) -> float:
    """Seconds per call of ``inner`` back-to-back calls (CUDA: events on the current stream,
    launch overhead included as in a real loop; CPU: ``perf_counter``)."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def time_variants(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                  warmup: int, max_total_s: float) -> dict[str, dict]:
    """Median seconds per call of each variant, the variants interleaved round by round.

    Each variant is warmed up, then one call sizes its batch (``inner`` calls lasting a few
    ms, so tiny ops are not dominated by timer resolution). Every round times one batch of
    each variant, in a rotating order, so a change in background load hits all variants
    alike. At least 3 rounds, at most ``repeats``, fewer when a round is slow
    (``max_total_s``). A variant that raises is reported as ``{"error": ...}``.
    """
    out: dict[str, dict] = {}
    live: dict[str, tuple[Callable[[], object], int]] = {}
    min_batch = 2e-3 if device.type == "cuda" else 1e-2
    per_round = 0.0
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            est = max(time.perf_counter() - t0, 1e-7)
        except Exception as exc:
            out[name] = {"error": first_line(exc)}
            continue
        inner = max(1, min(1000, math.ceil(min_batch / est)))
        live[name] = (fn, inner)
        per_round += est * inner
    rounds = max(3, min(repeats, int(max_total_s / max(per_round, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in live}
    names = list(live)
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            k = r % max(1, len(names))
            for name in names[k:] + names[:k]:
                if name in out:
                    continue
                fn, inner = live[name]
                try:
                    samples[name].append(time_batch(fn, inner, device))
                except Exception as exc:
                    out[name] = {"error": first_line(exc)}
    finally:
        gc.enable()
    for name, xs in samples.items():
        if name not in out:
            out[name] = {"median_ms": statistics.median(xs) * 1e3, "min_ms": min(xs) * 1e3,
                         "max_ms": max(xs) * 1e3, "repeats": len(xs), "inner": live[name][1]}
    return out


class CopyProbe:
    """Copy bandwidth: the median of ``dst.copy_(src)`` on float32 buffers far larger than the
    caches, counting 2·numel·4 bytes. Measured at the start, before every case and at the end;
    background load can only lower it, so the highest measurement is the machine's."""

    def __init__(self, device: torch.device, quick: bool):
        if quick:
            numel = 1 << 22
        elif device.type == "cuda":
            numel = 1 << 28  # 1 GiB each
        else:
            numel = 1 << 25  # 128 MiB each
        self.device = device
        self.src = torch.randn(numel, device=device, dtype=torch.float32)
        self.dst = torch.empty_like(self.src)
        self.nbytes = 2 * numel * self.src.element_size()
        self.samples: list[float] = []

    def measure(self, repeats: int) -> float:
        t = time_variants({"copy": lambda: self.dst.copy_(self.src)}, self.device, repeats, 2,
                          5.0)["copy"]
        gbps = self.nbytes / (t["median_ms"] * 1e-3) / 1e9
        self.samples.append(gbps)
        return gbps

    def best(self) -> float:
        return max(self.samples)

    def as_dict(self) -> dict:
        return {"bytes": self.nbytes, "GBps": self.best(), "start_GBps": self.samples[0],
                "end_GBps": self.samples[-1],
                "measurements_GBps": [round(g, 2) for g in self.samples]}


class CpuMeter:
    """Average number of cores busy with *other* processes since creation (Linux /proc/stat
    minus the CPU time of this process and its children): how much the timings were disturbed.
    """

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as fh:
                vals = [int(v) for v in fh.readline().split()[1:9]]
            busy = (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None
        own = os.times()  # children: the compiler runs of torch.compile
        own_s = own.user + own.system + own.children_user + own.children_system
        return busy, own_s, time.perf_counter()

    def background(self) -> float | None:
        end = self._read()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return None
        other = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return round(max(0.0, other / (end[2] - self.start[2])), 2)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# cases


@dataclass
class Built:
    """Inputs of one case: ``fn(*args, **kwargs)`` for both the op and the reference."""

    args: tuple
    kwargs: dict
    draws: bool  # the op takes a generator (in-kernel randomness)
    check_kwargs: dict = field(default_factory=dict)  # explicit noise/uniforms for the check


@dataclass
class Case:
    family: str
    label: str
    size: str
    dtype: str
    nbytes: int
    fn_name: str  # name in pathsmc.ops / pathsmc.reference
    build: Callable[[], Built]
    target: list[tuple[str, float]] | None = None
    target_src: str = ""
    note: str = ""

    def __post_init__(self):
        if not self.target:
            self.target_src = ""


def pow2(n: int) -> str:
    e = math.log2(n)
    return f"2^{int(e)}" if e == int(e) else str(n)


def shrink(shape: tuple[int, ...], budget: int = QUICK_ELEMS) -> tuple[int, ...]:
    """Halve the largest dim until the shape holds at most ``budget`` elements (--quick)."""
    s = list(shape)
    while math.prod(s) > budget:
        i = max(range(len(s)), key=lambda j: s[j])
        if s[i] == 1:
            break
        s[i] = max(1, s[i] // 2)
    return tuple(s)


def bnd_label(b: int, n: int, d: int | None = None) -> str:
    if d is None:
        return f"B={b} N={pow2(n)}"
    return f"B={b} N={pow2(n)} D={d} ({pow2(b * n * d)})"


class Factory:
    """Builds the case list for one device; tensors are created lazily by ``Case.build``."""

    def __init__(self, device: torch.device, xdt: torch.dtype, wdt: torch.dtype):
        self.dev = device
        self.xdt = xdt
        self.wdt = wdt
        self.xs = torch.tensor([], dtype=xdt).element_size()
        self.ws = torch.tensor([], dtype=wdt).element_size()
        self.dtype = f"{str(xdt)[6:]}/{str(wdt)[6:]}"

    def randn(self, *shape, dtype=None, scale=1.0):
        return torch.randn(shape, device=self.dev, dtype=dtype or self.xdt) * scale

    def rand(self, *shape):
        return torch.rand(shape, device=self.dev, dtype=torch.float64)

    # ---- em_step: reads x, drift, K ref drifts, logw; writes x', logw' ----
    def em_step(self, k: int, b: int, n: int, d: int, target=None, src="") -> Case:
        def build() -> Built:
            x = self.randn(b, n, d)
            drift = -0.5 * x
            refs = [drift + self.randn(b, n, d, scale=0.1) for _ in range(k)]
            logw = self.randn(b, n, dtype=self.wdt)
            kw = {"dt": 0.01, "sigma": 1.0, "ref_drifts": refs, "ref_coefs": [1.0] * k}
            if k == 0:  # tempering at beta = 0: proposal vs the linear forward kernel
                kw.update(fwd_coef=1.0, fwd_linear=-0.5)
            return Built((x, drift, logw), kw, True, {"noise": self.randn(b, n, d)})

        nbytes = (3 + k) * b * n * d * self.xs + 2 * b * n * self.ws
        note = "c=(1), c_f=0" if k else "c=(), c_f=1, lambda=-0.5"
        return Case("em_step", f"em_step K={k}", bnd_label(b, n, d), self.dtype, nbytes,
                    "em_step", build, target, src, note)

    # ---- kernel_logpdf: reads y, base, drift, logw; writes logw' ----
    def kernel_logpdf(self, b: int, n: int, d: int) -> Case:
        def build() -> Built:
            y, base, drift = self.randn(b, n, d), self.randn(b, n, d), self.randn(b, n, d)
            logw = self.randn(b, n, dtype=self.wdt)
            kw = {"dt": 0.01, "sigma": 1.0, "logw": logw, "coef": 0.7, "linear": -0.5}
            return Built((y, base, drift), kw, False)

        nbytes = 3 * b * n * d * self.xs + 2 * b * n * self.ws
        return Case("kernel_logpdf", "kernel_logpdf", bnd_label(b, n, d), self.dtype, nbytes,
                    "kernel_logpdf", build)

    # ---- normalize: reads logw; writes log w normalized, log mean w, ess ----
    def normalize(self, b: int, n: int) -> Case:
        def build() -> Built:
            return Built((self.randn(b, n, dtype=self.wdt, scale=2.0),), {}, False)

        nbytes = 2 * b * n * self.ws + 2 * b * self.ws
        return Case("normalize", "normalize", bnd_label(b, n), str(self.wdt)[6:], nbytes,
                    "normalize", build)

    # ---- resample: reads N weights, writes M int64 ancestors ----
    def resample(self, scheme: str, b: int, n: int, target=None, src="") -> Case:
        def build() -> Built:
            from pathsmc._validate import uniforms_shape

            logw = self.randn(b, n, dtype=self.wdt, scale=2.0)
            u = self.rand(*uniforms_shape(scheme, b, n))
            return Built((logw, scheme), {}, True, {"uniforms": u})

        nbytes = b * n * self.ws + b * n * 8
        return Case("resample", f"resample {scheme}", bnd_label(b, n), str(self.wdt)[6:],
                    nbytes, "resample", build, target, src)

    # ---- adaptive_resample: reads logw, writes logw', ancestors; gathers (B, N, D) ----
    def _adaptive(self, family: str, threshold: float, b: int, n: int, d: int, target, src,
                  note: str) -> Case:
        def build() -> Built:
            x = self.randn(b, n, d)
            if threshold >= 1.0:
                scale = torch.full((b, 1), 2.0, device=self.dev, dtype=self.wdt)
            else:  # even rows ESS ~ 0.99 N (kept), odd rows ESS ~ e^-9 N (resampled)
                scale = torch.tensor([0.1 if r % 2 == 0 else 3.0 for r in range(b)],
                                     device=self.dev, dtype=self.wdt).unsqueeze(-1)
            logw = self.randn(b, n, dtype=self.wdt) * scale
            kw = {"threshold": threshold, "scheme": "systematic"}
            return Built(([x], logw), kw, True, {"uniforms": self.rand(b)})

        nbytes = 2 * b * n * d * self.xs + 2 * b * n * self.ws + b * n * 8
        label = "resample+gather" if family == "resample+gather" else "adaptive_resample"
        return Case(family, label, bnd_label(b, n, d), self.dtype, nbytes, "adaptive_resample",
                    build, target, src, note)

    def resample_gather(self, b: int, n: int, d: int, target=None, src="") -> Case:
        return self._adaptive("resample+gather", 1.0, b, n, d, target, src,
                              "adaptive_resample(threshold=1): every row, systematic")

    def adaptive_resample(self, b: int, n: int, d: int, target=None, src="") -> Case:
        return self._adaptive("adaptive_resample", 0.5, b, n, d, target, src,
                              "threshold 0.5, half of the rows resample, systematic")

    # ---- mala_accept: reads x, x', grad, grad', logp, logp'; writes x, grad, logp, acc ----
    def mala_accept(self, b: int, n: int, d: int) -> Case:
        step = 0.05

        def build() -> Built:
            x = self.randn(b, n, d)
            grad = -x
            x_prop = x + step * grad + math.sqrt(2 * step) * self.randn(b, n, d)
            grad_prop = -x_prop
            logp = -0.5 * (x.double() ** 2).sum(-1).to(self.wdt)
            logp_prop = -0.5 * (x_prop.double() ** 2).sum(-1).to(self.wdt)
            return Built((x, x_prop, logp, logp_prop, grad, grad_prop, step), {}, True,
                         {"uniforms": self.rand(b, n)})

        nbytes = 6 * b * n * d * self.xs + 3 * b * n * self.ws + b * n
        return Case("mala_accept", "mala_accept", bnd_label(b, n, d), self.dtype, nbytes,
                    "mala_accept", build)

    # ---- replica_swap: reads/writes states (K, C, D), reads log_ratio; writes acc, perm ----
    def replica_swap(self, k: int, c: int, d: int) -> Case:
        def build() -> Built:
            states = [self.randn(k, c, d)]
            log_ratio = self.randn(k - 1, c, dtype=self.wdt)
            return Built((states, log_ratio, 0), {}, True, {"uniforms": self.rand(k - 1, c)})

        nbytes = 2 * k * c * d * self.xs + (k - 1) * c * (self.ws + 1) + k * c * 8
        return Case("replica_swap", "replica_swap", f"K={k} C={c} D={d} ({pow2(k * c * d)})",
                    self.dtype, nbytes, "replica_swap", build, note="parity 0")


def make_cases(device: torch.device, quick: bool) -> list[Case]:
    f = Factory(device, torch.float32, torch.float64)
    q = (lambda *s: shrink(s)) if quick else (lambda *s: s)
    cpu_t, gpu_t = "issue 2 (CPU)", "issue 3 (H100)"
    on_cpu = device.type == "cpu"
    # The issue-2 sizes run on every device; their targets are CPU targets.
    cases = [
        f.em_step(0, *q(4, 4096, 256)),
        f.em_step(1, *q(4, 4096, 256), [("vs_eager", 4.0)] if on_cpu else None, cpu_t),
        f.kernel_logpdf(*q(4, 4096, 256)),
        f.normalize(*q(64, 1 << 16)),
    ]
    for s in SCHEMES:
        tgt = [("vs_eager", 6.0)] if on_cpu and s == "systematic" else None
        cases.append(f.resample(s, *q(1, 1 << 20), tgt, cpu_t))
    cases += [
        f.resample_gather(*q(16, 1 << 14, 16)),
        f.resample_gather(*q(1, 1 << 20, 1)),
        f.adaptive_resample(*q(16, 65536, 2), [("vs_eager", 3.0)] if on_cpu else None, cpu_t),
        f.mala_accept(*q(16, 1 << 14, 16)),
        f.replica_swap(*q(16, 4096, 64)),
    ]
    if device.type == "cuda":  # the issue-3 GPU sizes (2^26 states, N up to 2^24)
        rg = [("pct_copy", 60.0), ("vs_eager", 5.0)]
        cases += [
            f.em_step(0, *q(16, 1 << 14, 256)),
            f.em_step(1, *q(16, 1 << 14, 256),
                      [("pct_copy", 80.0), ("vs_eager", 6.0), ("vs_compile", 2.0)], gpu_t),
            f.kernel_logpdf(*q(16, 1 << 14, 256)),
            f.normalize(*q(64, 1 << 20)),
        ]
        for s in SCHEMES:
            cases.append(f.resample(s, *q(1, 1 << 24)))
            cases.append(f.resample(s, *q(64, 1 << 16)))
        cases += [
            f.resample_gather(*q(64, 1 << 16, 64), rg, gpu_t),
            f.resample_gather(*q(1, 1 << 24, 1), rg, gpu_t),
            f.adaptive_resample(*q(64, 1 << 16, 2), [("vs_eager", 5.0)], gpu_t),
            f.mala_accept(*q(64, 1 << 16, 16)),
            f.replica_swap(*q(32, 1 << 15, 64)),
            # A handful of images (16 particles of 3×256×256): the segmented long-row kernels.
            f.em_step(1, *q(1, 16, 3 * 256 * 256)),
            f.kernel_logpdf(*q(1, 16, 3 * 256 * 256)),
            f.mala_accept(*q(1, 16, 3 * 256 * 256)),
        ]
    return cases


def selected(case: Case, only: list[str]) -> bool:
    if not only:
        return True
    for pat in only:
        if pat in (case.family, case.label) or fnmatch.fnmatch(case.label, pat):
            return True
    return False


# --------------------------------------------------------------------------------------------
# correctness spot check (explicit noise/uniforms, not timed)


def compare(a, b) -> float:
    """Worst disagreement of two op outputs (nested lists/tuples of tensors)."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else math.inf
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return math.inf
        return max((compare(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    if not isinstance(a, torch.Tensor):
        return 0.0
    if tuple(a.shape) != tuple(b.shape):
        return math.inf
    if a.numel() == 0:
        return 0.0
    if a.is_floating_point():
        a64, b64 = a.double(), b.double()
        same = (a64 == b64) | (a64.isnan() & b64.isnan())
        diff = torch.where(same, 0.0, (a64 - b64).abs()).nan_to_num(nan=math.inf)
        scale = max(1.0, float(b64[b64.isfinite()].abs().max()) if b64.isfinite().any() else 1.0)
        return float(diff.max()) / scale / FLOAT_TOL
    return float((a != b).double().mean()) / INDEX_TOL


def spot_check(case: Case, built: Built, ops_fn, ref_fn) -> dict:
    """Run op and reference once on the same explicit noise; err <= 1 means agreement."""
    try:
        got = ops_fn(*built.args, **built.kwargs, **built.check_kwargs)
        want = ref_fn(*built.args, **built.kwargs, **built.check_kwargs)
        err = compare(got, want)
        return {"err": err, "ok": bool(err <= 1.0)}
    except Exception as exc:
        return {"err": None, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}


# --------------------------------------------------------------------------------------------
# running


def first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def run_case(case: Case, device: torch.device, args, ops, ref, copy_gbps: float) -> dict:
    ops_fn, ref_fn = getattr(ops, case.fn_name), getattr(ref, case.fn_name)
    built = case.build()
    sync(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    a, kw = built.args, built.kwargs
    extra = {"generator": gen} if built.draws else {}
    warm = 3 if device.type == "cuda" else 2
    row: dict = {
        "op": case.label, "family": case.family, "size": case.size, "dtype": case.dtype,
        "bytes": case.nbytes, "note": case.note, "target_src": case.target_src,
    }
    row["check"] = spot_check(case, built, ops_fn, ref_fn)

    fns = {"ops": lambda: ops_fn(*a, **kw, **extra), "eager": lambda: ref_fn(*a, **kw)}
    cfn = None
    if args.compile:
        cfn = torch.compile(ref_fn)
        t0 = time.perf_counter()
        try:
            for _ in range(3):  # compile, then let automatic-dynamic recompiles settle
                cfn(*a, **kw)
            sync(device)
            row["compile_s"] = time.perf_counter() - t0
            fns["compile"] = lambda: cfn(*a, **kw)
        except Exception as exc:
            row["compile"] = {"error": first_line(exc)}
    row.update(time_variants(fns, device, args.repeats, warm, args.max_seconds))
    if cfn is not None:
        torch._dynamo.reset()  # drop the compiled graphs (and their memory)
    row["target_spec"] = [list(t) for t in case.target] if case.target else None
    derive(row, copy_gbps)
    evaluate(row, args.quick)
    return row


def ms(entry: dict | None) -> float | None:
    return None if not entry or "median_ms" not in entry else entry["median_ms"]


def derive(row: dict, copy_gbps: float) -> None:
    o, e, c = ms(row["ops"]), ms(row["eager"]), ms(row.get("compile"))
    row["vs_eager"] = e / o if o and e else None
    row["vs_compile"] = c / o if o and c else None
    row["GBps"] = row["bytes"] / (o * 1e-3) / 1e9 if o else None
    row["pct_copy"] = 100.0 * row["GBps"] / copy_gbps if row["GBps"] else None
    row["eager_GBps"] = row["bytes"] / (e * 1e-3) / 1e9 if e else None


def target_text(target: list[tuple[str, float]] | None) -> str:
    if not target:
        return ""
    parts = []
    for metric, thr in target:
        num = f"{thr:g}"
        parts.append(f">={num}{TARGET_LABELS[metric]}")
    return ", ".join(parts)


def evaluate(row: dict, quick: bool) -> None:
    target = row["target_spec"]
    row["target"] = target_text(target)
    if not target:
        row["result"] = ""
        return
    if quick:
        row["result"] = "n/a (quick)"
        return
    missed, unknown = [], []
    for metric, thr in target:
        val = row.get(metric)
        if val is None:
            unknown.append(metric)
        elif val < thr:
            missed.append(metric)
    row["missed"] = missed
    row["result"] = "MISS" if missed else ("n/a" if unknown else "PASS")


# --------------------------------------------------------------------------------------------
# output


def fmt(v: float | None, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def fmt_ms(entry: dict | None) -> str:
    if entry is None:
        return "-"
    if "error" in entry:
        return "error"
    v = entry["median_ms"]
    return f"{v:.3g}" if v >= 0.01 else f"{v:.2e}"


COLUMNS = ["op", "size", "dtype", "ops ms", "eager ms", "compile ms", "vs eager",
           "vs compile", "GB/s", "% copy bw", "target", "result"]


def is_noisy(row: dict) -> bool:
    bg = row.get("background_cores")
    return bg is not None and bg > NOISY_CORES


def table_rows(rows: list[dict], flag_noisy: bool) -> list[list[str]]:
    out = []
    for r in rows:
        result = r["result"]
        if flag_noisy and is_noisy(r):
            result = f"{result} (noisy)" if result else "noisy"
        out.append([
            r["op"], r["size"], r["dtype"], fmt_ms(r["ops"]), fmt_ms(r["eager"]),
            fmt_ms(r.get("compile")), fmt(r["vs_eager"], ".2f", "x"),
            fmt(r["vs_compile"], ".2f", "x"), fmt(r["GBps"], ".1f"),
            fmt(r["pct_copy"], ".0f", "%"), r["target"], result,
        ])
    return out


def markdown_table(rows: list[dict], flag_noisy: bool = False) -> str:
    body = table_rows(rows, flag_noisy)
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c)
              for i, c in enumerate(COLUMNS)]
    right = {3, 4, 5, 6, 7, 8, 9}

    def line(cells):
        padded = [c.rjust(w) if i in right else c.ljust(w)
                  for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2))
                         for i, w in enumerate(widths)) + "|"
    return "\n".join([line(COLUMNS), sep, *(line(b) for b in body)])


def notes(rows: list[dict], copy_gbps: float, flag_noisy: bool = True) -> list[str]:
    out = []
    for r in rows:
        name = f"{r['op']} [{r['size']}]"
        if r["result"] == "MISS":
            got = {"vs_eager": f"{fmt(r['vs_eager'], '.2f')}x eager",
                   "vs_compile": f"{fmt(r['vs_compile'], '.2f')}x compile",
                   "pct_copy": f"{fmt(r['pct_copy'], '.0f')}% of copy bandwidth"}
            wanted = ", ".join(f"{target_text([(m, t)])} (got {got[m]})"
                               for m, t in r["target_spec"] if m in r["missed"])
            floor = r["bytes"] / (copy_gbps * 1e9) * 1e3
            out.append(
                f"MISS {name}: {wanted}. The op moves {r['bytes'] / 1e6:.1f} MB in "
                f"{fmt(ms(r['ops']), '.3g')} ms = {fmt(r['GBps'], '.1f')} GB/s "
                f"({fmt(r['pct_copy'], '.0f')}% of copy; the copy-bandwidth floor is "
                f"{floor:.3g} ms); eager reference {fmt(ms(r['eager']), '.3g')} ms "
                f"({fmt(r['eager_GBps'], '.1f')} GB/s).")
        chk = r["check"]
        if not chk["ok"]:
            why = chk.get("error") or f"error {chk['err']:.3g} x tolerance"
            out.append(f"CHECK FAILED {name}: ops and reference disagree on explicit "
                       f"noise/uniforms ({why}).")
        if flag_noisy and is_noisy(r):
            out.append(f"NOISY {name}: other processes kept {r['background_cores']:.2f} cores "
                       "busy while it ran; "
                       "its times are unreliable (rerun it with --only on a quiet machine)")
        for k in ("ops", "eager", "compile"):
            if r.get(k) and "error" in r[k]:
                out.append(f"ERROR {name} {k}: {r[k]['error']}")
    return out


def merge(path: Path, meta: dict, run: dict, rows: list[dict], order: list[tuple],
          partial: bool) -> dict:
    """The results document: a full run replaces it; an ``--only`` run replaces its own rows
    in the file of the same device/torch/build (so a long run can be split) and keeps the rest.
    """
    runs, old_rows = [], []
    if partial and path.exists():
        try:
            old = json.loads(path.read_text())
            same = all(old["meta"].get(k) == meta[k]
                       for k in ("device_name", "torch", "build_info", "quick"))
        except (OSError, ValueError, KeyError):
            old, same = None, False
        if same:
            runs, old_rows = old["runs"], old["rows"]
        elif old is not None:
            print(f"bench: {path.name} is from another torch/build/device; starting afresh",
                  file=sys.stderr)
    for r in rows:
        r["run"] = len(runs)
    runs = [*runs, run]
    mine = {(r["op"], r["size"]) for r in rows}
    merged = [r for r in old_rows if (r["op"], r["size"]) not in mine] + rows
    rank = {k: i for i, k in enumerate(order)}
    merged.sort(key=lambda r: rank.get((r["op"], r["size"]), len(rank)))
    used = sorted({r["run"] for r in merged})
    remap = {old_i: new_i for new_i, old_i in enumerate(used)}
    for r in merged:
        r["run"] = remap[r["run"]]
    return {"meta": meta, "runs": [runs[i] for i in used], "rows": merged}


def render(doc: dict) -> str:
    meta, runs, rows = doc["meta"], doc["runs"], doc["rows"]
    head = [
        f"# pathsmc benchmarks: {meta['device_name']}",
        "",
        f"- device: {meta['device']} ({meta['device_name']}); torch {meta['torch']}, "
        f"python {meta['python']}, {meta['threads']} threads",
        f"- pathsmc build: {meta['build_info']}",
    ]
    for i, run in enumerate(runs):
        c = run["copy_bandwidth"]
        tag = f"run {i}" if len(runs) > 1 else "run"
        load = run.get("loadavg")
        load_txt = f"; load average {load[0]:.2f} -> {load[1]:.2f}" if load else ""
        if run.get("background_cores") is not None:
            load_txt += (f"; other processes kept {run['background_cores']:.2f} cores busy "
                         "on average")
        head.append(
            f"- {tag}: {run['date']}, `{run['command']}`; copy bandwidth "
            f"(dst.copy_(src), {c['bytes'] / 2**20:.0f} MiB moved) {c['GBps']:.1f} GB/s "
            f"(the highest of {len(c.get('measurements_GBps', [0, 0]))} measurements between "
            f"the cases; start {c['start_GBps']:.1f}, end {c['end_GBps']:.1f})"
            f"{load_txt}; medians of up to {run['repeats']} samples; torch.compile: "
            f"{run['compile']}")
    head += [
        "- ops ms / eager ms / compile ms: median time per call of pathsmc.ops, "
        "pathsmc.reference eager and torch.compile(pathsmc.reference); vs eager / vs compile: "
        "their time over ops ms; GB/s and % copy bw: the bytes the op must move "
        "(bench/README.md) over ops ms",
        "",
    ]
    cpu = meta["device"].startswith("cpu")
    text = "\n".join(head) + "\n" + markdown_table(rows, flag_noisy=cpu) + "\n"
    if len(runs) > 1:
        text += "\nRows by run: " + "; ".join(
            f"run {i}: " + ", ".join(f"{r['op']} [{r['size']}]" for r in rows if r["run"] == i)
            for i in range(len(runs))) + "\n"
    row_notes = [f"- {r['op']}: {r['note']}" for r in rows if r["note"]]
    if row_notes:
        text += "\nCase notes:\n\n" + "\n".join(dict.fromkeys(row_notes)) + "\n"
    tail = []
    for r in rows:
        tail += notes([r], runs[r["run"]]["copy_bandwidth"]["GBps"],
                      flag_noisy=cpu)
    if tail:
        text += "\nNotes:\n\n" + "\n".join(f"- {t}" for t in tail) + "\n"
    return text


def write_results(doc: dict, out_dir: Path, stem: str) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{stem}.json", "w") as fh:
        json.dump(doc, fh, indent=1, default=str)
        fh.write("\n")
    text = render(doc)
    (out_dir / f"{stem}.md").write_text(text)
    return text


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto (cuda when available; default)")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny shapes (<= {QUICK_ELEMS} elements), few repeats: a smoke test; "
                        "targets are not judged")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="run only these ops: a family (" + ", ".join(FAMILIES) + "), a row "
                        "label or a glob on it ('resample s*'); repeatable or comma-separated. "
                        "The rows replace their own in the device's results file")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed samples per variant (default 15 CPU, 30 CUDA; 3 with --quick)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip torch.compile of the reference")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="time budget per timed variant; fewer repeats beyond it (>= 3)")
    p.add_argument("--list", action="store_true",
                   help="list the cases for the device (* = selected by --only) and exit")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR,
                   help="where the JSON and markdown go (default bench/results)")
    args = p.parse_args(argv)
    args.only = [s.strip() for item in args.only for s in item.split(",") if s.strip()]
    return args


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import pathsmc
        import pathsmc.ops as ops
        import pathsmc.reference as ref
    except ImportError as exc:
        print(f"bench: cannot import pathsmc ({exc}).\nBuild it first: `make build`.",
              file=sys.stderr)
        return 2

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("bench: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
            return 2
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif args.compile:
        # No pool of compile workers: on a small CPU machine their background start-up would
        # compete with the timed code.
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 3 if args.quick else (30 if device.type == "cuda" else 15)
    torch.manual_seed(1234)

    all_cases = make_cases(device, args.quick)
    cases = [c for c in all_cases if selected(c, args.only)]
    if args.list:
        for c in all_cases:
            mark = "*" if c in cases else " "
            tgt = f"{target_text(c.target)} ({c.target_src})" if c.target else ""
            print(f"{mark} {c.family:18s} {c.label:22s} {c.size:26s} {tgt}")
        return 0
    if not cases:
        print(f"bench: --only {args.only} matches no case; families: {', '.join(FAMILIES)} "
              "(--list shows the cases)", file=sys.stderr)
        return 2

    name = device_name(device)
    meta = {
        "device": str(device), "device_name": name, "torch": torch.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "host": platform.node(), "quick": args.quick,
        "build_info": pathsmc.build_info() if hasattr(pathsmc, "build_info") else {},
    }
    if device.type == "cuda":
        meta["cuda"] = torch.version.cuda
        meta["gpu_memory_GiB"] = round(
            torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    run = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["bench/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "repeats": args.repeats,
        "compile": "torch.compile(reference), default mode" if args.compile else "skipped",
    }

    def log(*a):
        print(*a, file=sys.stderr, flush=True)

    load0 = loadavg()
    log(f"bench: {name} | {device} | torch {torch.__version__} | "
        f"{torch.get_num_threads()} threads | {len(cases)} cases"
        + (f" | load average {load0:.2f}" if load0 is not None else ""))
    if device.type == "cpu" and load0 is not None and load0 > 0.5 * (os.cpu_count() or 1):
        log("bench: warning: the machine is busy; CPU timings will be noisy")

    run_meter = CpuMeter()
    probe = CopyProbe(device, args.quick)
    probe.measure(max(args.repeats, 10))
    log(f"  copy bandwidth {probe.best():.1f} GB/s")
    rows = []
    for i, case in enumerate(cases, 1):
        probe.measure(5)
        log(f"  [{i}/{len(cases)}] {case.label} {case.size} ...")
        t0 = time.perf_counter()
        meter = CpuMeter()
        row = run_case(case, device, args, ops, ref, probe.best())
        row["background_cores"] = meter.background()
        free_memory(device)
        rows.append(row)
        log(f"      ops {fmt_ms(row['ops'])} ms, eager {fmt_ms(row['eager'])} ms, "
            f"compile {fmt_ms(row.get('compile'))} ms, vs eager {fmt(row['vs_eager'], '.2f')}x"
            f", {fmt(row['pct_copy'], '.0f')}% copy bw, check "
            f"{'ok' if row['check']['ok'] else 'FAILED'} {row['result']} "
            f"({time.perf_counter() - t0:.0f} s, other processes {row['background_cores']} "
            "cores)")
    probe.measure(max(args.repeats, 10))
    copy = probe.as_dict()
    del probe
    free_memory(device)
    run["copy_bandwidth"] = copy
    run["background_cores"] = run_meter.background()
    load1 = loadavg()
    if load0 is not None and load1 is not None:
        run["loadavg"] = [load0, load1]
    for row in rows:
        derive(row, copy["GBps"])
        evaluate(row, args.quick)

    stem = slug(name) + ("-quick" if args.quick else "")
    order = [(c.label, c.size) for c in all_cases]
    doc = merge(args.out_dir / f"{stem}.json", meta, run, rows, order, bool(args.only))
    text = write_results(doc, args.out_dir, stem)
    print(text)
    log(f"bench: wrote {args.out_dir / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
