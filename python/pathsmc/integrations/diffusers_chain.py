"""The exact Gaussian kernels of a diffusers scheduler's sampling chain.

A diffusers sampler with a stochastic step defines a Markov chain x_0 → x_1 → … → x_K
(x_0 pure noise, x_K the sample) whose kernels are Gaussian with a mean given by the network
output and a variance fixed by the scheduler:

    x_{k+1} ~ N(mean_k(x_k, out), std_k² I).

:class:`SchedulerChain` reproduces ``scheduler.step`` for DDPM (``fixed_small`` /
``fixed_large`` / ``fixed_small_log`` variance), DDIM with η > 0 and the stochastic
flow-matching Euler sampler (``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``),
for ``epsilon``, ``v_prediction`` and ``sample`` predictions (flow: the velocity), with the
scheduler's x̂₀ clipping (``clip_sample``) and dynamic thresholding. It also gives the forward
(noising) kernel ``N(x_k; a_k x_{k+1}, var_k I)`` that tempering and products with
Σβ ≠ 1 need. Scalars are computed in float64 from the scheduler's tables.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ChainStep", "SchedulerChain"]

PREDICTIONS = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class ChainStep:
    """The numbers of one chain step k: network time, mean coefficients, std, forward kernel."""

    timestep: Any
    """what the network is called with (``scheduler.timesteps[k]``)."""
    frac: float
    """the step's noise level as a fraction in [0, 1] (t / num_train_timesteps; flow: σ)."""
    sqrt_ab: float  # VP: √ᾱ_t (x = √ᾱ x0 + √(1−ᾱ) ε); flow: 1 − σ
    sqrt_1mab: float  # VP: √(1 − ᾱ_t); flow: σ
    coef_x0: float
    coef_x: float
    coef_eps: float
    std: float
    fwd_a: float
    """forward kernel x_k ≈ fwd_a · x_{k+1} + sqrt(fwd_var) · ε."""
    fwd_var: float


class SchedulerChain:
    """The sampling chain of ``scheduler`` with ``steps`` inference steps.

    Args:
        scheduler: a ``DDPMScheduler``, ``DDIMScheduler`` or ``FlowMatchEulerDiscreteScheduler``
            with ``stochastic_sampling=True``. It is copied, never modified.
        steps: number of inference steps.
        eta: DDIM's η (> 0; ignored by the other schedulers).
        use_clipped_model_output: DDIM's option of the same name.
    """

    def __init__(self, scheduler: Any, steps: int, *, eta: float = 1.0,
                 use_clipped_model_output: bool = False) -> None:
        import diffusers

        sch = copy.deepcopy(scheduler)
        name = type(sch).__name__
        if isinstance(sch, diffusers.DDPMScheduler):
            self.kind = "ddpm"
        elif isinstance(sch, diffusers.DDIMScheduler):
            self.kind = "ddim"
            if not float(eta) > 0.0:
                raise ValueError(f"eta: DDIM needs eta > 0 for a stochastic chain (with eta = 0 "
                                 f"resampled copies stay identical), got {eta}")
        elif isinstance(sch, diffusers.FlowMatchEulerDiscreteScheduler):
            self.kind = "flow"
            if not sch.config.stochastic_sampling:
                raise ValueError("scheduler: FlowMatchEulerDiscreteScheduler must be built with "
                                 "stochastic_sampling=True (the deterministic Euler solver makes "
                                 "resampled copies identical)")
        else:
            raise TypeError(f"scheduler: expected DDPMScheduler, DDIMScheduler or "
                            f"FlowMatchEulerDiscreteScheduler, got {name}")
        cfg = sch.config
        if self.kind != "flow":
            pt = cfg.prediction_type
            if pt not in PREDICTIONS:
                raise ValueError(f"scheduler.config.prediction_type: expected one of "
                                 f"{PREDICTIONS}, got {pt!r}")
            self.prediction = pt
        else:
            self.prediction = "velocity"
        if self.kind == "ddpm" and cfg.variance_type not in ("fixed_small", "fixed_large",
                                                             "fixed_small_log"):
            raise ValueError(f"scheduler.config.variance_type: {cfg.variance_type!r} is not "
                             "supported (use fixed_small, fixed_small_log or fixed_large)")
        if int(steps) < 1:
            raise ValueError(f"steps: expected a positive integer, got {steps}")
        if self.kind == "flow" and cfg.use_dynamic_shifting:
            raise ValueError("scheduler: use_dynamic_shifting flow schedulers are not supported")
        sch.set_timesteps(int(steps))
        self.scheduler = sch
        self.eta = float(eta)
        self.use_clipped_model_output = bool(use_clipped_model_output)
        self.clip = self.kind != "flow" and bool(cfg.clip_sample)
        self.clip_range = float(getattr(cfg, "clip_sample_range", 1.0))
        self.thresholding = self.kind != "flow" and bool(cfg.thresholding)
        self.steps = [self._step(k) for k in range(len(sch.timesteps))]
        self.num_steps = len(self.steps)

    # ---- per-step scalars ----

    def _step(self, k: int) -> ChainStep:
        sch = self.scheduler
        t = sch.timesteps[k]
        T = int(sch.config.num_train_timesteps)
        if self.kind == "flow":
            s, s_next = float(sch.sigmas[k]), float(sch.sigmas[k + 1])
            a = (1.0 - s) / (1.0 - s_next)
            return ChainStep(t, s, 1.0 - s, s, 1.0 - s_next, 0.0, 0.0, s_next, a,
                             max(s * s - a * a * s_next * s_next, 0.0))
        ac = sch.alphas_cumprod.double()
        ti = int(t)
        ab = float(ac[ti])
        if self.kind == "ddpm":
            prev = int(sch.previous_timestep(t))
            ab_prev = float(ac[prev]) if prev >= 0 else 1.0
        else:
            prev = ti - T // sch.num_inference_steps
            ab_prev = float(ac[prev]) if prev >= 0 else float(sch.final_alpha_cumprod)
        cur_alpha = ab / ab_prev
        cur_beta = 1.0 - cur_alpha
        if self.kind == "ddpm":
            cx0 = math.sqrt(ab_prev) * cur_beta / (1.0 - ab)
            cx = math.sqrt(cur_alpha) * (1.0 - ab_prev) / (1.0 - ab)
            ceps = 0.0
            var = max((1.0 - ab_prev) / (1.0 - ab) * cur_beta, 1e-20)
            vt = sch.config.variance_type
            if vt == "fixed_large":
                var = cur_beta
            std = 0.0 if ti <= 0 else math.sqrt(var)
            if vt == "fixed_small_log" and ti > 0:
                std = math.exp(0.5 * math.log(var))
        else:
            var = (1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev)
            std = self.eta * math.sqrt(max(var, 0.0))
            cx0, cx = math.sqrt(ab_prev), 0.0
            ceps = math.sqrt(max(1.0 - ab_prev - std * std, 0.0))
        return ChainStep(t, ti / T, math.sqrt(ab), math.sqrt(1.0 - ab), cx0, cx, ceps, std,
                         math.sqrt(cur_alpha), cur_beta)

    # ---- the kernel mean ----

    def denoise(self, k: int, x: torch.Tensor, out: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x̂₀, ε̂)`` at step k from the network output ``out`` at ``x`` (``(M, C, H, W)``),
        with the scheduler's clipping / thresholding of x̂₀ applied."""
        st = self.steps[k]
        a, s = st.sqrt_ab, st.sqrt_1mab
        if self.kind == "flow":
            return x - s * out, x + a * out
        if self.prediction == "epsilon":
            x0, eps = (x - s * out) / a, out
        elif self.prediction == "sample":
            x0 = out
            eps = (x - a * x0) / s
        else:
            x0 = a * x - s * out
            eps = a * out + s * x
        if self.thresholding:
            x0 = self.scheduler._threshold_sample(x0)
        elif self.clip:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        if (self.thresholding or self.clip) and self.kind == "ddim" and \
                self.use_clipped_model_output:
            eps = (x - a * x0) / s
        return x0, eps

    def mean(self, k: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The kernel mean of step k."""
        st = self.steps[k]
        m = st.coef_x0 * x0
        if st.coef_x != 0.0:
            m = m + st.coef_x * x
        if st.coef_eps != 0.0:
            m = m + st.coef_eps * eps
        return m
