"""``pathsmc demo digits``: steering the shipped digits DDPM toward every class at once.

The model (:mod:`pathsmc.models.digits`) is a class-conditional ``UNet2DModel`` with a DDPM
scheduler, trained here on scikit-learn's 8×8 digits; label 10 is the unconditional model.
Row b of a batch asks for class ``k_b = b mod 10`` (``runs`` replicate rows per class). Methods:

- ``fk-diff`` / ``fk-max``: the unconditional model, FK steering with the reward
  ``r(x) = log p₁(k | x)`` of the reward CNN at Tweedie's x̂₀, potentials ``"difference"``
  (exact, telescoping: the target is ``p(x) p₁(k | x) / Z`` with ``Z = E[p₁(k | X₀)]``) and
  ``"max"`` (FK steering's heuristic);
- ``tds``: twisted SMC (TDS): the same twist with classifier guidance ∇ log p₁(k | x̂₀) in the
  proposal and the exact weights (same target and Z as ``fk-diff``);
- ``learned``: twisted SMC with the shipped learned twist, a noisy classifier
  ``log q_θ(k | x_t, t) ≈ log E[p₁(k | X₀) | x_t]`` (the soft value itself, fit by
  ``tools/train_digits.py``; :mod:`pathsmc.learn.noisy_classifier`) and its gradient as guidance,
  from the first step whatever ``t_start`` (it is informative at high noise, where x̂₀ is not);
- ``cfg-rnd``: classifier-free guidance w = 3 (product mode, β = (w, 1 − w) over the
  conditional and null models) corrected by the path RND;
- ``cfg``: the plain CFG sampler (no weights);
- ``guided``: uncorrected classifier guidance (the TDS proposal without weights);
- ``cond``: the conditional model itself (w = 1), from diffusers' own sampling loop.

The independent check: ``log E[p₁(k | X₀)]`` from plain unconditional samples of the same
chain (diffusers' own loop, :func:`plain_samples`) must agree with log Ẑ of ``fk-diff``,
``tds`` and ``learned`` within Monte Carlo error.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DIGITS_METHODS",
    "DigitsRun",
    "DigitsSetup",
    "DigitsTable",
    "class_reward",
    "digits_table",
    "diversity",
    "format_digits_table",
    "independent_log_z",
    "judge_accuracy",
    "load_setup",
    "plain_samples",
    "row_classes",
    "run_digits_demo",
    "run_method",
]

DIGITS_METHODS = ("fk-diff", "fk-max", "tds", "learned", "cfg-rnd", "cfg", "guided", "cond")
_DESCRIPTIONS = {
    "fk-diff": "(a) FK steering, r = log p₁(k|x̂₀), potential difference",
    "fk-max": "(a) FK steering, r = log p₁(k|x̂₀), potential max",
    "tds": "(b) twisted SMC / TDS: twist log p₁(k|x̂₀) + classifier guidance",
    "learned": "(b') twisted SMC, learned twist: noisy classifier log q(k|x_t, t), from t = 1",
    "cfg-rnd": "(c) CFG w = 3 corrected by the path RND (product mode)",
    "cfg": "(c) plain CFG w = 3 (no weights)",
    "guided": "(d) uncorrected classifier guidance (TDS's proposal, no weights)",
    "cond": "    the conditional model (w = 1), diffusers' own loop",
}
NUM_CLASSES = 10


@dataclass
class DigitsSetup:
    """The shipped digits models on one device."""

    unet: Any
    scheduler: Any
    reward_net: torch.nn.Module
    judge: torch.nn.Module
    device: torch.device
    noisy: torch.nn.Module | None = None


def load_setup(device: str | torch.device = "cpu") -> DigitsSetup:
    """Load the shipped UNet + scheduler, the reward CNN, the judge and the learned twist (no
    download)."""
    from pathsmc.models.digits import (
        load_digits_model,
        load_judge_classifier,
        load_noisy_classifier,
        load_reward_classifier,
    )

    unet, scheduler = load_digits_model(device)
    return DigitsSetup(unet, scheduler, load_reward_classifier(device),
                       load_judge_classifier(device), torch.device(device),
                       load_noisy_classifier(device))


def row_classes(runs: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The class of each row, ``(10·runs,)``: row b asks for digit b mod 10."""
    return torch.arange(NUM_CLASSES, device=device).repeat(int(runs))


def class_reward(reward_net: torch.nn.Module,
                 classes: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``reward(images (B, n, 1, 8, 8)) -> log p₁(k_b | x) (B, n)`` for row classes ``k_b``."""
    def reward(images: torch.Tensor) -> torch.Tensor:
        b, n = images.shape[:2]
        lp = reward_net(images.reshape(b * n, *images.shape[2:])).reshape(b, n, -1)
        idx = classes.to(lp.device).view(b, 1, 1).expand(b, n, 1)
        return lp.gather(-1, idx).squeeze(-1)
    return reward


@torch.no_grad()
def plain_samples(unet: Any, scheduler: Any, labels: torch.Tensor, steps: int, *,
                  generator: torch.Generator | None = None, chunk: int = 4096) -> torch.Tensor:
    """Samples ``(M, 1, 8, 8)`` of diffusers' own ancestral loop (``scheduler.step``) with
    class labels ``(M,)`` (10: unconditional), ``steps`` inference steps."""
    import copy

    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(int(steps))
    device = labels.device
    cfg = unet.config
    shape = (int(labels.shape[0]), int(cfg.in_channels), int(cfg.sample_size),
             int(cfg.sample_size))
    x = torch.randn(shape, generator=generator, device=device) * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = torch.cat([unet(x[i:i + chunk], t, class_labels=labels[i:i + chunk]).sample
                         for i in range(0, shape[0], chunk)])
        x = sched.step(eps, t, x, generator=generator).prev_sample
    return x


@torch.no_grad()
def independent_log_z(reward_net: torch.nn.Module, samples: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor]:
    """``(log E[p₁(k | X₀)], its delta-method SE)`` per class k ``(10,)`` from plain samples."""
    lp = reward_net(samples).double()  # (M, 10)
    m = lp.shape[0]
    est = torch.logsumexp(lp, 0) - math.log(m)
    p = lp.exp()
    se = p.std(0) / (math.sqrt(m) * p.mean(0))
    return est, se


@torch.no_grad()
def judge_accuracy(judge: torch.nn.Module, images: torch.Tensor, classes: torch.Tensor,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the (weighted) fraction of ``images (B, N, 1, 8, 8)`` that the judge labels
    ``classes[b]``; uniform weights when None."""
    b, n = images.shape[:2]
    pred = judge(images.reshape(b * n, *images.shape[2:])).argmax(-1).reshape(b, n)
    hit = (pred == classes.view(b, 1).to(pred.device)).double()
    if weights is None:
        return hit.mean(1)
    return (hit * weights.double()).sum(1)


@torch.no_grad()
def diversity(images: torch.Tensor, weights: torch.Tensor | None = None, *,
              generator: torch.Generator | None = None, max_points: int = 512) -> torch.Tensor:
    """Per row, the mean pixel-space L2 distance between two independent draws from the
    weighted particle set (duplicates count as distance 0, so resampling collapse shows).
    Estimated from ``max_points`` resampled particles per row."""
    b, n = images.shape[:2]
    flat = images.reshape(b, n, -1).double()
    m = min(n, max_points)
    if weights is None:
        idx = torch.stack([torch.randperm(n, generator=generator)[:m] for _ in range(b)])
    else:
        idx = torch.multinomial(weights.double().cpu(), m, replacement=True, generator=generator)
    pts = flat.gather(1, idx.to(flat.device).unsqueeze(-1).expand(b, m, flat.shape[-1]))
    d = torch.cdist(pts, pts)
    return d.sum((1, 2)) / (m * (m - 1))


@dataclass
class DigitsRun:
    """One method's run: particles, weights and the table's numbers (per row)."""

    method: str
    particles: torch.Tensor
    weights: torch.Tensor | None
    log_z: torch.Tensor | None
    final_ess: torch.Tensor | None
    seconds: float
    accuracy: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    diversity: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    warnings: list[str] = field(default_factory=list)


def _models(setup: DigitsSetup, classes: torch.Tensor, chunk_size: int, t_start: float,
            potential_scale: Callable[[float], float] | None = None):
    from pathsmc.integrations.diffusers import DiffusersModel
    from pathsmc.models.digits import NULL_CLASS

    null = torch.full_like(classes, NULL_CLASS)
    uncond = DiffusersModel(setup.unet, setup.scheduler, class_labels=null,
                            chunk_size=chunk_size, t_start=t_start,
                            potential_scale=potential_scale)
    cond = uncond.with_condition(class_labels=classes)
    return uncond, cond


def run_method(setup: DigitsSetup, method: str, *, particles: int, runs: int = 1,
               steps: int = 50, seed: int = 0, w: float = 3.0, guidance: float = 1.0,
               t_start: float = 0.3, chunk_size: int = 4096,
               potential_scale: Callable[[float], float] | None = None) -> DigitsRun:
    """Run one method of the demo (see :data:`DIGITS_METHODS`) on ``10·runs`` rows of
    ``particles`` particles each; returns its particles, weights, log Ẑ and wall time."""
    import warnings as _warnings

    from pathsmc.diagnostics import CollapseWarning
    from pathsmc.diffusion import steer

    if method not in DIGITS_METHODS:
        raise ValueError(f"method: expected one of {DIGITS_METHODS}, got {method!r}")
    classes = row_classes(runs, setup.device)
    b = classes.numel()
    uncond, cond = _models(setup, classes, chunk_size, t_start, potential_scale)
    reward = class_reward(setup.reward_net, classes)
    common = {"particles": particles, "batch": b, "steps": steps, "seed": seed,
              "device": setup.device, "progress": False}
    t0 = time.perf_counter()
    if method == "cond":
        g = torch.Generator(device=setup.device).manual_seed(seed)
        x = plain_samples(setup.unet, setup.scheduler, classes.repeat_interleave(particles),
                          steps, generator=g, chunk=chunk_size)
        return DigitsRun(method, x.reshape(b, particles, *x.shape[1:]), None, None, None,
                         time.perf_counter() - t0)
    with _warnings.catch_warnings(record=True) as caught:
        _warnings.simplefilter("always")
        if method in ("fk-diff", "fk-max"):
            res = steer(uncond, "reward", reward=reward,
                        potential="difference" if method == "fk-diff" else "max", **common)
        elif method == "tds":
            res = steer(uncond, "reward", reward=reward, guidance=guidance, **common)
        elif method == "learned":
            if setup.noisy is None:
                raise ValueError("method 'learned': this DigitsSetup has no noisy classifier "
                                 "(load_setup loads the shipped one)")
            first, _ = _models(setup, classes, chunk_size, 1.0)  # a value is used as is
            res = steer(first, "twisted", value=setup.noisy.twist(classes), reward=reward,
                        guidance=guidance, **common)
        elif method == "guided":
            res = steer(uncond, "uncorrected", reward=reward, guidance=guidance, **common)
        else:
            res = steer([cond, uncond], "product" if method == "cfg-rnd" else "uncorrected",
                        beta=(w, 1.0 - w), **common)
    seconds = time.perf_counter() - t0
    weighted = method not in ("cfg", "guided")
    return DigitsRun(method, res.particles.detach(), res.weights.detach() if weighted else None,
                     res.log_z.detach() if weighted else None,
                     res.final_ess.detach() if weighted else None,
                     seconds, warnings=[str(c.message).splitlines()[0] for c in caught
                                        if issubclass(c.category, CollapseWarning)])


def _mean_se(values: torch.Tensor, runs: int) -> tuple[float, float]:
    """Mean over rows (10·runs, class-major in replicates) and its SE from the replicate
    spread within each class (nan for runs = 1)."""
    v = values.double().reshape(runs, NUM_CLASSES)
    if runs < 2:
        return float(v.mean()), math.nan
    return float(v.mean()), math.sqrt(float(v.var(0).sum()) / runs) / NUM_CLASSES


def format_digits_table(rows: Sequence[DigitsRun], runs: int, particles: int,
                        reference: tuple[float, float] | None = None) -> list[str]:
    """The demo's table: judge accuracy, diversity, log Ẑ ± SE, final ESS, wall time."""
    lines = [f"{'method':<8} {'judge acc':>9} {'divers.':>7} {'log Ẑ ± SE':>17} "
             f"{'final ESS':>11} {'time s':>7}"]
    for r in rows:
        lz = "—"
        if r.log_z is not None:
            m, se = _mean_se(r.log_z, runs)
            lz = f"{m:8.3f} ± {se:.3f}" if math.isfinite(se) else f"{m:8.3f}"
        ess = "—" if r.final_ess is None else f"{float(r.final_ess.mean()):5.0f}/{particles}"
        lines.append(f"{r.method:<8} {float(r.accuracy.mean()):>9.3f} "
                     f"{float(r.diversity.mean()):>7.3f} {lz:>17} {ess:>11} {r.seconds:>7.1f}")
    if reference is not None:
        lines.append(f"{'plain':<8} {'':>9} {'':>7} {reference[0]:8.3f} ± {reference[1]:.3f} "
                     f"{'':>11}   (log E[p₁(k|X₀)], plain unconditional samples)")
    return lines


def plot_grid(runs_: Sequence[DigitsRun], path: Path, *, columns: int = 10,
              seed: int = 0) -> Path:
    """A PNG grid per method: one row per class, ``columns`` particles drawn by weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    r = runs_[0]
    x = r.particles[:NUM_CLASSES].detach().cpu()
    if r.weights is None:
        idx = torch.arange(columns).expand(NUM_CLASSES, columns) % x.shape[1]
    else:
        idx = torch.multinomial(r.weights[:NUM_CLASSES].double().cpu(), columns,
                                replacement=True, generator=g)
    fig, axes = plt.subplots(NUM_CLASSES, columns, figsize=(columns * 0.6, NUM_CLASSES * 0.6))
    for k in range(NUM_CLASSES):
        for j in range(columns):
            ax = axes[k, j]
            ax.imshow(x[k, idx[k, j], 0].numpy(), cmap="gray_r", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{r.method}: judge acc {float(r.accuracy.mean()):.2f}", fontsize=9)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def run_digits_demo(*, particles: int = 64, steps: int = 50, runs: int = 2, seed: int = 0,
                    device: str = "cpu", out: str | Path = "out", plot: bool = True,
                    threads: int | None = None, plain: int | None = None,
                    methods: Sequence[str] = DIGITS_METHODS, t_start: float = 0.3,
                    log: Callable[[str], None] = print) -> int:
    """``pathsmc demo digits``: every method of :data:`DIGITS_METHODS` on 10·``runs`` rows
    (one class per row) of ``particles`` particles, ``steps`` DDPM steps; prints the table and
    the check of log Ẑ against the independent estimate from ``plain`` unconditional samples
    (see :func:`digits_table`); writes ``digits-<method>.png``. Returns a process
    exit code (1 when a log Ẑ is not finite)."""
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _run(particles=particles, steps=steps, runs=runs, seed=seed, device=device,
                    out=Path(out), plot=plot, plain=plain, methods=methods, t_start=t_start,
                    log=log)
    finally:
        torch.set_num_threads(saved)


@dataclass
class DigitsTable:
    """Everything :func:`run_digits_demo` prints: the method runs and the independent
    estimate ``log E[p₁(k | X₀)]`` (with SE) per class from ``plain`` unconditional samples."""

    rows: list[DigitsRun]
    estimate: torch.Tensor
    estimate_se: torch.Tensor
    plain: int
    plain_seconds: float
    particles: int
    runs: int
    steps: int

    @property
    def reference(self) -> tuple[float, float]:
        """The class-averaged independent estimate and its SE."""
        return (float(self.estimate.mean()),
                math.sqrt(float((self.estimate_se ** 2).sum())) / NUM_CLASSES)

    def z_scores(self, method: str) -> list[float]:
        """Per class, (mean log Ẑ of the class's rows − estimate) / SE for a run whose target is
        p(x) p₁(k|x). The SE of log Ẑ pools the replicate variance over the 10 classes (with 2
        replicates a per-class variance has one degree of freedom); nan for runs = 1."""
        r = next(r for r in self.rows if r.method == method)
        v = r.log_z.double().reshape(self.runs, NUM_CLASSES)
        if self.runs < 2:
            return [math.nan] * NUM_CLASSES
        se2 = float(v.var(0).mean()) / self.runs
        z = (v.mean(0) - self.estimate) / (se2 + self.estimate_se ** 2).sqrt()
        return [float(x) for x in z]


    def class_sum(self, method: str) -> tuple[float, float]:
        """An exact check that needs no reference sampler: the reward is log p₁(k | x) and
        Σ_k p₁(k | x) = 1, so Σ_k Z_k = 1. Returns the mean over replicates of Σ_k Ẑ_k (each
        replicate is one row per class) and its SE (nan for runs = 1). Ẑ is unbiased, but with
        a sharp classifier on Tweedie's x̂₀ its right tail is heavy (docs/diffusers.md): a
        value below 1 with a small SE is that tail not sampled yet."""
        r = next(r for r in self.rows if r.method == method)
        tot = r.log_z.double().reshape(self.runs, NUM_CLASSES).exp().sum(1)
        se = float(tot.std()) / math.sqrt(self.runs) if self.runs > 1 else math.nan
        return float(tot.mean()), se


def digits_table(setup: DigitsSetup, *, particles: int, steps: int = 50, runs: int = 2,
                 seed: int = 0, plain: int | None = None,
                 methods: Sequence[str] = DIGITS_METHODS, t_start: float = 0.3,
                 log: Callable[[str], None] | None = None) -> DigitsTable:
    """Run the demo's methods and the independent estimate (``plain`` unconditional samples of
    diffusers' own loop; default ``max(1024, 32·particles)``, at most 8192)."""
    from pathsmc.models.digits import NULL_CLASS

    classes = row_classes(runs, setup.device)
    plain = int(plain) if plain else min(8192, max(1024, 32 * particles))
    t0 = time.perf_counter()
    g = torch.Generator(device=setup.device).manual_seed(seed + 1)
    x_plain = plain_samples(setup.unet, setup.scheduler,
                            torch.full((plain,), NULL_CLASS, device=setup.device), steps,
                            generator=g)
    est, est_se = independent_log_z(setup.reward_net, x_plain)
    plain_s = time.perf_counter() - t0
    rows: list[DigitsRun] = []
    gdiv = torch.Generator().manual_seed(seed)
    for m in methods:
        r = run_method(setup, m, particles=particles, runs=runs, steps=steps, seed=seed,
                       t_start=t_start)
        r.accuracy = judge_accuracy(setup.judge, r.particles, classes, r.weights)
        r.diversity = diversity(r.particles, r.weights, generator=gdiv)
        rows.append(r)
        if log is not None:
            log(f"  ... {m} done in {r.seconds:.1f} s" + (
                f" ({len(r.warnings)} warning(s): {r.warnings[0]})" if r.warnings else ""))
    return DigitsTable(rows, est, est_se, plain, plain_s, particles, runs, steps)


def _run(*, particles, steps, runs, seed, device, out, plot, plain, methods, t_start,
         log) -> int:
    t_total = time.perf_counter()
    setup = load_setup(device)
    log(f"pathsmc demo digits: the shipped class-conditional DDPM on 8×8 digits "
        f"(pathsmc.models.digits), {steps} DDPM steps;")
    log(f"10 classes × {runs} replicate rows × {particles} particles per row, seed {seed}, "
        f"device {device}, {torch.get_num_threads()} thread(s); potentials and guidance from "
        f"t <= t_start = {t_start}")
    log("(a real network's Tweedie estimate x̂₀ is poor near the noise end: docs/diffusers.md)")
    for m in methods:
        log(f"  {m:<8} {_DESCRIPTIONS[m]}")
    tab = digits_table(setup, particles=particles, steps=steps, runs=runs, seed=seed,
                       plain=plain, methods=methods, t_start=t_start, log=log)
    rows, est, est_se = tab.rows, tab.estimate, tab.estimate_se
    log("")
    for line in format_digits_table(rows, runs, particles, reference=tab.reference):
        log("  " + line)
    log("  judge acc: weighted fraction of particles the judge (logistic regression, "
        "a different model from the reward CNN) labels k; divers.: mean L2 distance")
    log(f"  between two draws from the weighted particles (the data within a class: "
        f"{_data_diversity():.3f}); log Ẑ: mean over the 10·{runs} rows, SE from the "
        "replicates;")
    log(f"  final ESS: mean over rows. plain: {tab.plain} unconditional samples in "
        f"{tab.plain_seconds:.1f} s.")

    ok = True
    checked = [r for r in rows if r.method in ("fk-diff", "tds", "learned")]
    if checked:
        log("")
        log("log Ẑ (mean of the replicate rows) against the independent estimate "
            "log E[p₁(k | X₀)] per class:")
        head = "".join(f"{r.method + ' log Ẑ':>18}" for r in checked)
        log(f"  {'k':>2} {'plain samples':>16}{head}")
        for k in range(NUM_CLASSES):
            cells = []
            for r in checked:
                v = r.log_z.double().reshape(runs, NUM_CLASSES)
                m = float(v[:, k].mean())
                se = math.sqrt(float(v.var(0).mean()) / runs) if runs > 1 else math.nan
                ok = ok and math.isfinite(m)
                cells.append(f"{m:9.3f} ± {se:.3f}" if math.isfinite(se) else f"{m:17.3f}")
            log(f"  {k:>2} {float(est[k]):8.3f} ± {float(est_se[k]):.3f}"
                + "".join(f"{c:>18}" for c in cells))
        for r in checked:
            zf = [v for v in tab.z_scores(r.method) if math.isfinite(v)]
            if zf:
                chi2 = sum(v * v for v in zf)
                log(f"  {r.method}: max |z| = {max(abs(v) for v in zf):.2f}, Σz² = {chi2:.1f} "
                    f"over {len(zf)} classes (≈ {len(zf)} ± {math.sqrt(2 * len(zf)):.1f} when "
                    f"they agree)")
        log("  (SE of log Ẑ: replicate variance pooled over the classes. SMC's Ẑ is unbiased, "
            "so log Ẑ is slightly low when the ESS is small.)")
        sums = []
        for r in checked:
            m, se = tab.class_sum(r.method)
            sums.append(f"{r.method} {m:.3f}" + (f" ± {se:.3f}" if math.isfinite(se) else ""))
        log("  Σ_k Ẑ_k, mean over the replicates (exact value 1, as Σ_k p₁(k | x) = 1): "
            + ", ".join(sums) + (f" (an SE from {runs} replicates is rough: --runs 8 or more "
                                 "for a real check)" if runs < 8 else ""))
    if plot:
        try:
            written = [plot_grid([r], out / f"digits-{r.method}.png", seed=seed) for r in rows]
            log("wrote " + ", ".join(str(p) for p in written))
        except ImportError:
            log("matplotlib is not installed: no PNGs written")
    log(f"total wall time {time.perf_counter() - t_total:.1f} s")
    if not ok:
        print("pathsmc demo digits: log Ẑ disagrees with the independent estimate",
              file=sys.stderr)
    return 0 if ok else 1


def _data_diversity() -> float:
    from pathsmc.models.digits import digits_data

    x, y = digits_data("all")
    vals = []
    for k in range(NUM_CLASSES):
        f = x[y == k].flatten(1).double()
        d = torch.cdist(f, f)
        vals.append(float(d.sum() / (f.shape[0] * (f.shape[0] - 1))))
    return sum(vals) / len(vals)
