"""CREPE on a diffusers chain: replica exchange across the steps of a scheduler's sampling chain.

The same sampler as :class:`pathsmc.crepe.CREPE`, with the levels placed on the steps of the
discrete chain of a :class:`~pathsmc.integrations.diffusers.DiffusersModel` (chain index 0 is
pure noise, index K the sample) and the Euler–Maruyama kernels replaced by the chain's exact
Gaussian kernels:

- the *noising* path of a swap uses the scheduler's forward kernel
  ``F_n(x_n | x_{n+1}) = N(a_n x_{n+1}, v_n I)`` (``ChainStep.fwd_a``, ``fwd_var``; no network);
- the *denoising* path uses the chain's kernel with the β-combined network output,
  ``G_n(x_{n+1} | x_n) = N(mean_n(Σ_j β_j out_j), std_n² I)``, and each model's own kernel
  ``G_{j,n}`` enters the step weight
  ``Δ_n = Σ_j β_j log G_{j,n} + (1 − Σ_j β_j) log F_n − log G_n``: the weight of
  :func:`pathsmc.steer`'s tempering / product modes on the same chain.

Level l targets ``Π_j p_{j,c_l}^{β_j} · exp(r_{c_l})`` at chain index ``c_l``, with
``r_c(x) = r(x̂₀(x))`` (the first model's x̂₀, clipped as the scheduler clips) and, at the data
level, the reward of the sample. The swap acceptance is the path RND of the two paths, as in
continuous time; it replaces each model's marginal ratio ``p_{c}(x_c) / p_{c'}(x_{c'})`` by
``Π G_j / F`` along the path, which is exact when the model's chain is the time reversal of the
scheduler's noising process (e.g. the exact denoiser of Gaussian data with DDPM's
``fixed_large`` variance, the test case) and otherwise carries the network's own error, like the
continuous-time driver's O(h) term. With one model, β = 1 and no reward, Δ ≡ 0 and every swap is
accepted.

The chain's last step is deterministic for DDPM, DDIM and flow matching (the variance is 0):
the data level then sits at index K − 1 and the recorded samples are its deterministic image
(the last step's mean), which is also what the reward sees there — as in ``steer``.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from pathsmc.crepe import CREPE, CREPEResult
from pathsmc.diffusion import model_exponents
from pathsmc.integrations.diffusers import DiffusersModel

__all__ = ["ChainCREPE", "chain_crepe", "default_level_steps"]

# keys of pathsmc.crepe.CREPE that a diffusers chain fixes
_CONTINUOUS_ONLY = ("level_times", "times", "max_step", "substeps", "dim", "exact_top",
                    "num_chains", "num_problems")


def default_level_steps(num_levels: int, data_index: int) -> list[int]:
    """``num_levels`` chain indices from ``data_index`` (the data level) down to 0 (noise),
    equally spaced in the chain's steps (duplicates dropped)."""
    if int(num_levels) < 2:
        raise ValueError(f"num_levels: expected at least 2, got {num_levels}")
    idx = np.round(np.linspace(data_index, 0, int(num_levels))).astype(int).tolist()
    return sorted(set(idx), reverse=True)


class ChainCREPE(CREPE):
    """Replica exchange over the steps of a diffusers chain (see the module docstring).

    Args:
        model: a :class:`DiffusersModel` or a sequence of them (a product / CFG), sharing the
            scheduler (config, η) and the sample shape.
        beta: the exponent(s) β_j (default 1 each; Σ_j β_j > 0).
        reward: optional ``reward(images (B, C, *shape)) -> (B, C)``, the log-potential of the
            tilt (decoded first when the model has ``decode``).
        steps: inference steps of the scheduler's chain (default 50).
        num_levels: levels L >= 2, equally spaced in chain steps (ignored with ``level_steps``).
        level_steps: chain indices of the levels, strictly decreasing from the data level
            (K − 1 when the last step is deterministic, else K) to 0 (pure noise).
        particles: C independent systems per problem; batch: B problems (per-row conditions
            come from the models' ``class_labels`` / ``encoder_hidden_states``).
        swap: ``"deo"`` or ``"seo"``; init: initial states ``(L, B, C, D)`` with D the
            flattened sample size; dtype, device, generator, ops: as for ``CREPE``.

    States are kept flattened, ``(L, B, C, D)``; the result's ``samples`` have the image shape
    ``(S, B, C, *sample_shape)``.
    """

    def __init__(
        self,
        model: DiffusersModel | Sequence[DiffusersModel],
        *,
        beta: float | Sequence[float] | None = None,
        reward: Callable[[torch.Tensor], torch.Tensor] | None = None,
        steps: int = 50,
        num_levels: int = 8,
        level_steps: Sequence[int] | None = None,
        particles: int = 64,
        batch: int = 1,
        swap: str = "deo",
        init: torch.Tensor | None = None,
        weighting: str = "path",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        ops: Any = None,
    ) -> None:
        models = [model] if isinstance(model, DiffusersModel) else list(model)
        if not models or not all(isinstance(m, DiffusersModel) for m in models):
            raise TypeError("model: expected a DiffusersModel or a non-empty sequence of them")
        first = models[0]
        for i, m in enumerate(models[1:], 1):
            if (m.sample_shape != first.sample_shape or m.eta != first.eta
                    or type(m.scheduler) is not type(first.scheduler)
                    or dict(m.scheduler.config) != dict(first.scheduler.config)):
                raise ValueError(f"model[{i}]: every model must share the scheduler (config, "
                                 "eta) and the sample shape of model[0]")
        if weighting != "path":
            raise ValueError("weighting: a diffusers chain has no exact log-density; use 'path'")
        if first.potential_scale is not None:
            raise ValueError("potential_scale: steer's FK potentials only; CREPE weights each "
                             "level by the reward itself (build the model without it)")
        self.models = models
        self.chain = first.chain(int(steps))
        betas = model_exponents(beta, len(models))
        if not sum(betas) > 0:
            raise ValueError(f"beta: expected exponents with a positive sum, got {betas}")
        self.betas, self.beta_sum = betas, sum(betas)
        self.fwd_coef = 1.0 - self.beta_sum
        self.reward = reward
        self.weighting, self.density = "path", False
        self.delta_zero = len(models) == 1 and betas[0] == 1.0
        self.has_phi = reward is not None
        if swap not in ("deo", "seo"):
            raise ValueError(f"swap: expected 'deo' or 'seo', got {swap!r}")
        self.swap = swap
        if int(particles) < 1 or int(batch) < 1:
            raise ValueError("particles and batch must be >= 1")
        self.C, self.B = int(particles), int(batch)
        self.shape = first.sample_shape
        self.D = math.prod(self.shape)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype: expected float32 or float64, got {dtype}")
        self.dtype, self.device = dtype, torch.device(device)
        self.generator = generator
        if ops is None:
            import pathsmc.ops as ops
        self.ops = ops
        self.exact_top = False
        self.prior_std = float(getattr(self.chain.scheduler, "init_noise_sigma", 1.0))
        self.top_std = self.prior_std / math.sqrt(self.beta_sum)
        seed = generator.initial_seed() if generator is not None else torch.initial_seed()
        self._host_rng = random.Random(seed ^ 0xC4E9E)
        self.model_calls = self.model_evals = self.log_prob_calls = 0
        self.round_count = 0
        k_steps = self.chain.num_steps
        self.last_deterministic = self.chain.steps[k_steps - 1].std == 0.0
        self.data_index = k_steps - 1 if self.last_deterministic else k_steps
        self.set_levels(default_level_steps(num_levels, self.data_index) if level_steps is None
                        else level_steps)
        if reward is not None:  # checked once, up front, on a prior draw of images
            from pathsmc.user_checks import check_user_output, first_call, function_name

            g = torch.Generator(device=self.device).manual_seed(0)
            img = torch.randn(self.B, self.C, *self.shape, dtype=dtype, device=self.device,
                              generator=g)
            name = f"reward `{function_name(reward)}`"
            with torch.no_grad():
                check_user_output(first_call(name, reward, img), name, (self.B, self.C),
                                  img.device)
        if init is None:
            self._init_states()
        else:
            x = init.to(device=self.device, dtype=dtype)
            if tuple(x.shape) != (self.K, self.B, self.C, self.D):
                raise ValueError(f"init: expected shape ({self.K}, {self.B}, {self.C}, "
                                 f"{self.D}), got {tuple(init.shape)}")
            self.x = x.clone()
        self.phi = self._level_potentials()
        self.phase = torch.zeros(self.K, self.B * self.C, dtype=torch.int8, device=self.device)

    # ---- levels ----

    def set_levels(self, level_steps: Sequence[int]) -> None:
        """Place the levels on chain indices (data level first, 0 = noise last)."""
        lv = [int(c) for c in level_steps]
        if (len(lv) < 2 or lv[0] != self.data_index or lv[-1] != 0
                or any(b >= a for a, b in zip(lv, lv[1:], strict=False))):
            raise ValueError(f"level_steps: expected chain indices strictly decreasing from "
                             f"{self.data_index} (the data level) to 0, got {lv}")
        if hasattr(self, "x") and len(lv) != self.x.shape[0]:
            raise ValueError(f"level_steps: the sampler has {self.x.shape[0]} levels")
        self.levels = lv
        # level "times" for the reports: 0 = data, 1 = noise, the chain's noise level between
        self.times = [0.0] + [float(self.chain.steps[c].frac) for c in lv[1:-1]] + [1.0]
        self._index = dict(zip(self.times, lv, strict=True))
        self._sub = [list(range(lv[i + 1], lv[i] + 1)) for i in range(len(lv) - 1)]
        if hasattr(self, "phi"):
            self.phi = self._level_potentials()

    def set_times(self, times: Sequence[float]) -> None:  # noqa: D102
        raise ValueError("a diffusers chain's levels sit on its steps: use set_levels")

    # ---- network ----

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:2], *self.shape)

    def _evaluate(self, y: torch.Tensor, c: int, *, means: bool = True, x0: bool = False):
        """(proposal mean, model means, first model's x̂₀) at chain index c for flat states
        ``(B, n, D)``, in particle chunks of the model's ``chunk_size``."""
        b, n = y.shape[:2]
        self.model_calls += len(self.models)
        self.model_evals += len(self.models) * n
        size = max(1, self.models[0].chunk_size // b)
        props, mods, x0s = [], [[] for _ in self.models], []
        with torch.no_grad():
            for j0 in range(0, n, size):
                img = self._images(y[:, j0:j0 + size])
                outs = [m.predict(img, c, self.chain) for m in self.models]
                den = [self.chain.denoise(c, img, o) for o in outs]
                comb = sum(bk * o for bk, o in zip(self.betas, outs, strict=True))
                px0, peps = self.chain.denoise(c, img, comb)
                props.append(self.chain.mean(c, img, px0, peps).flatten(2))
                if means:
                    for i, (m0, me) in enumerate(den):
                        mods[i].append(self.chain.mean(c, img, m0, me).flatten(2))
                if x0:
                    x0s.append(den[0][0])
        prop = torch.cat(props, 1).to(y.dtype)
        mods_out = [torch.cat(m, 1).to(y.dtype) for m in mods] if means else None
        return prop, mods_out, torch.cat(x0s, 1) if x0 else None

    def _final_images(self, x: torch.Tensor) -> torch.Tensor:
        """The sample of data-level states: the deterministic last step's mean, or x."""
        if self.last_deterministic:
            x = self._evaluate(x, self.data_index, means=False)[0]
        return self._images(x)

    def _potential(self, x: torch.Tensor, t: float, x0: torch.Tensor | None = None
                   ) -> torch.Tensor | None:
        """``r_c(x)`` ``(B, C)`` float64 at the level of report time t, or None."""
        if self.reward is None:
            return None
        c = self._index[t]
        if c == self.data_index:
            img = self._final_images(x)
        else:
            img = x0 if x0 is not None else self._evaluate(x, c, means=False, x0=True)[2]
        dec = self.models[0].decode
        with torch.no_grad():
            if dec is not None:
                b, n = img.shape[:2]
                d = dec(img.reshape(b * n, *img.shape[2:]))
                img = d.reshape(b, n, *d.shape[1:])
            return self.reward(img).double()

    # ---- paths ----

    def _randn(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, dtype=like.dtype, device=like.device,
                           generator=self.generator)

    def _init_states(self) -> None:
        """One unweighted pass of the β-combined chain from the top prior to the data level."""
        x = self.top_std * torch.randn(self.B, self.C, self.D, dtype=self.dtype,
                                       device=self.device, generator=self.generator)
        at = {0: x}
        for c in range(self.data_index):
            prop = self._evaluate(x, c, means=False)[0]
            x = prop + self.chain.steps[c].std * self._randn(x)
            at[c + 1] = x
        self.x = torch.stack([at[c] for c in self.levels]).contiguous()

    def _pair_paths(self, k: int, x_lo: torch.Tensor, x_hi: torch.Tensor):
        """The noising path from ``x_lo`` (chain index a) up to the upper level (b < a) with
        the forward kernels, and the denoising path from ``x_hi`` down with the β-combined
        kernel; both weighted in one network call per step (see :meth:`CREPE._pair_paths`)."""
        a, b = self.levels[k], self.levels[k + 1]
        c = x_lo.shape[1]
        zs = {a: x_lo}
        for n in range(a - 1, b - 1, -1):
            st = self.chain.steps[n]
            zs[n] = st.fwd_a * zs[n + 1] + math.sqrt(st.fwd_var) * self._randn(x_lo)
        x0_z = None
        if self.delta_zero:
            w = x_hi
            for n in range(b, a):
                w = self._evaluate(w, n, means=False)[0] + self.chain.steps[n].std * \
                    self._randn(w)
            dw = dz = torch.zeros(x_hi.shape[:2], dtype=torch.float64, device=x_hi.device)
        else:
            delta = torch.zeros(x_hi.shape[0], 2 * c, dtype=torch.float64, device=x_hi.device)
            w = x_hi
            for n in range(b, a):
                st = self.chain.steps[n]
                y = torch.cat([w, zs[n]], 1)
                want_x0 = n == b and self.reward is not None
                prop, mods, x0 = self._evaluate(y, n, x0=want_x0)
                if x0 is not None:
                    x0_z = x0[:, c:]
                eps_z = (zs[n + 1] - prop[:, c:]) / st.std  # reproduces the noising path
                noise = torch.cat([self._randn(w), eps_z], 1)
                y_new, delta = self.ops.em_step(
                    y, prop - y, delta, dt=1.0, sigma=st.std, ref_drifts=[m - y for m in mods],
                    ref_coefs=list(self.betas), noise=noise)
                if self.fwd_coef != 0.0:  # (1 − Σβ) log F_n(y | y_new)
                    delta = self.ops.kernel_logpdf(y, y_new, None, dt=1.0,
                                                   sigma=math.sqrt(st.fwd_var), logw=delta,
                                                   coef=self.fwd_coef, linear=st.fwd_a - 1.0)
                w = y_new[:, :c]
            dw, dz = delta[:, :c], delta[:, c:]
        z = zs[b]
        return (w, dw, self._potential(w, self.times[k]), z, dz,
                self._potential(z, self.times[k + 1], x0_z))

    # ---- runs ----

    def run(self, rounds: int, *, burn_in: int = 0, adapt_times: int = 0,
            record_all: bool = False, progress: bool | None = None) -> CREPEResult:
        """As :meth:`CREPE.run`; ``samples`` are images ``(S, B, C, *sample_shape)`` (the data
        level's sample), ``states`` and ``all_samples`` stay flattened chain states."""
        if adapt_times:
            raise ValueError("adapt_times: not supported on a diffusers chain (the levels sit "
                             "on its steps; choose level_steps)")
        res = super().run(rounds, burn_in=burn_in, record_all=record_all, progress=progress)
        s, b, c, _ = res.samples.shape
        flat = res.samples.to(self.device).reshape(s * b, c, self.D)
        imgs = [self._final_images(flat[i:i + b]) for i in range(0, s * b, b)]
        return dataclasses.replace(res, samples=torch.cat(imgs).reshape(
            s, b, c, *self.shape).cpu(), model_calls=self.model_calls,
            model_evals=self.model_evals)


def chain_crepe(
    model: DiffusersModel | Sequence[DiffusersModel],
    *,
    rounds: int,
    burn_in: int = 0,
    adapt_times: int = 0,
    record_all: bool = False,
    seed: int | None = None,
    progress: bool | None = None,
    **kwargs: Any,
) -> CREPEResult:
    """Run :class:`ChainCREPE` (what :func:`pathsmc.crepe.crepe` calls for diffusers models).

    ``kwargs`` go to :class:`ChainCREPE`; ``seed`` creates ``generator`` on ``device``.
    Keys of the continuous-time sampler that the chain fixes are errors that name them.
    """
    for key in _CONTINUOUS_ONLY:
        if kwargs.get(key) is not None:
            raise ValueError(f"{key}: not used with a DiffusersModel (the scheduler's chain "
                             "fixes the levels' grid and the state shape; see level_steps, "
                             "steps)")
        kwargs.pop(key, None)
    if kwargs.get("generator") is None and seed is not None:
        device = torch.device(kwargs.get("device", "cpu"))
        kwargs["generator"] = torch.Generator(device=device).manual_seed(int(seed))
    sampler = ChainCREPE(model, **kwargs)
    return sampler.run(rounds, burn_in=burn_in, adapt_times=adapt_times,
                       record_all=record_all, progress=progress)
