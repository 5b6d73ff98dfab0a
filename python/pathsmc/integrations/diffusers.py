"""diffusers denoisers and schedulers as steerable models.

API (stable)::

    from pathsmc.integrations.diffusers import DiffusersModel
    model = DiffusersModel(unet, scheduler, eta=1.0, class_labels=None,
                           encoder_hidden_states=None, chunk_size=256, decode=None,
                           t_start=1.0, potential_scale=None, sample_shape=None)
    null = model.with_condition(class_labels=null_labels)       # CFG's unconditional model
    res = pathsmc.steer(model, "reward", reward=r, particles=N, batch=B, steps=K, seed=0)
    res = pathsmc.steer([model, null], "product", beta=(w, 1 - w), particles=N, batch=B,
                        steps=K)                               # classifier-free guidance
    res.particles                      # (B, N, C, H, W) final chain states (latents if latent)
    model.step(k, x, noise=eps)        # one chain step with explicit noise (scheduler.step)

- ``unet``: a ``UNet2DModel`` (unconditional, or class-conditional: ``class_labels`` (B,)) or a
  ``UNet2DConditionModel`` (``encoder_hidden_states`` (B, L, E)); any module called as
  ``unet(x, t, class_labels=..., encoder_hidden_states=...).sample`` works.
- ``scheduler``: ``DDPMScheduler``, ``DDIMScheduler`` (η = ``eta`` > 0) or
  ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``; the prediction type
  (epsilon, v_prediction, sample; flow: velocity) and the x̂₀ clipping / thresholding come
  from its config. It is copied, never modified; ``steer``'s ``steps`` is the number of
  inference steps.
- ``reward(images) -> (B, n)`` sees ``decode(x̂₀)`` (``decode`` maps ``(M, C, h, w)`` latents to
  images; identity when None) at Tweedie's estimate, and the decoded final sample at the end;
  ``images`` is ``(B, n, ...)`` with n ≤ N particles per row (one chunk).
- ``value(x, t) -> V or (V, ∇V)`` (twisted mode) sees the noisy states ``(B, n, C, H, W)``
  and ``t`` ∈ [0, 1] (timestep / num_train_timesteps; flow: σ; 0 at the end).
- Potentials and guidance start at the first step whose noise level t ≤ ``t_start``;
  ``potential_scale(t)`` multiplies the intermediate potentials (the final one is exact).
- Network calls, rewards and gradient guidance run in chunks of ``chunk_size`` particles.

Weights use the chain's exact Gaussian kernels (see docs/diffusers.md): reward tilting and
twisted SMC are exact for the chain the model samples, for any number of steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pathsmc.integrations.diffusers_chain import SchedulerChain

__all__ = ["DiffusersModel", "DiffusersSteeringModel", "chain_steering_model"]

_LOG_2PI = math.log(2.0 * math.pi)


class DiffusersModel:
    """A diffusers denoiser + scheduler: the discrete sampling chain as a steerable model.

    Args:
        unet: the denoiser (``UNet2DModel``, ``UNet2DConditionModel`` or a module with the
            same call signature returning ``.sample``).
        scheduler: ``DDPMScheduler``, ``DDIMScheduler`` or
            ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``.
        eta: DDIM's η (> 0); ignored by the other schedulers.
        class_labels: per-row class labels ``(B,)`` (class-conditional ``UNet2DModel``).
        encoder_hidden_states: per-row prompt embeddings ``(B, L, E)``
            (``UNet2DConditionModel``).
        chunk_size: at most this many particles per network call (and per reward / guidance
            call): the B·N particles are split into chunks of ``max(1, chunk_size // B)``
            particles of every row.
        decode: ``decode(latents (M, C, h, w)) -> images (M, ...)`` for latent models; rewards
            see decoded images.
        t_start: potentials and guidance apply from the first step with noise level
            t ≤ t_start (t ∈ [0, 1]); before it the chain runs unweighted (FK steering's start).
        potential_scale: ``λ(t) -> float``: the intermediate potentials (and so the guidance)
            use ``λ(t)·r(x̂₀)``; the final one is ``r(x)`` itself, so the increments still
            telescope to ``r`` and the target and Z are unchanged. A λ rising to 1 (e.g. ᾱ_t)
            tames the weights of a reward that is sharp on Tweedie's x̂₀ (docs/diffusers.md).
        sample_shape: ``(C, H, W)`` of a state (default from ``unet.config``).
        use_clipped_model_output: DDIM's option of the same name.
    """

    is_discrete_chain = True

    def __init__(
        self,
        unet: Any,
        scheduler: Any,
        *,
        eta: float = 1.0,
        class_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        chunk_size: int = 256,
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
        t_start: float = 1.0,
        potential_scale: Callable[[float], float] | None = None,
        sample_shape: Sequence[int] | None = None,
        use_clipped_model_output: bool = False,
    ) -> None:
        if not callable(unet):
            raise TypeError(f"unet: expected a callable module, got {type(unet).__name__}")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size}")
        if not 0.0 < float(t_start) <= 1.0:
            raise ValueError(f"t_start: expected 0 < t_start <= 1, got {t_start}")
        if potential_scale is not None and not callable(potential_scale):
            raise TypeError("potential_scale: expected a callable t -> float (or None)")
        if decode is not None and not callable(decode):
            raise TypeError("decode: expected a callable latents -> images")
        for name, c, dims in (("class_labels", class_labels, 1),
                              ("encoder_hidden_states", encoder_hidden_states, 3)):
            if c is not None and (not isinstance(c, torch.Tensor) or c.dim() != dims):
                raise ValueError(f"{name}: expected a tensor with {dims} dimension(s) "
                                 f"(one row per problem), got "
                                 f"{tuple(c.shape) if isinstance(c, torch.Tensor) else c!r}")
        if sample_shape is None:
            cfg = getattr(unet, "config", None)
            if cfg is None:
                raise ValueError("sample_shape: give (C, H, W) (unet has no config)")
            size = cfg.sample_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            sample_shape = (int(cfg.in_channels), *size)
        self.unet = unet
        self.scheduler = scheduler
        self.eta = float(eta)
        self.class_labels = class_labels
        self.encoder_hidden_states = encoder_hidden_states
        self.chunk_size = int(chunk_size)
        self.decode = decode
        self.t_start = float(t_start)
        self.potential_scale = potential_scale
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.use_clipped_model_output = bool(use_clipped_model_output)
        self._chains: dict[int, SchedulerChain] = {}
        SchedulerChain(scheduler, 1, eta=self.eta)  # checks the scheduler up front

    def __repr__(self) -> str:
        return (f"DiffusersModel({type(self.unet).__name__}, {type(self.scheduler).__name__}, "
                f"shape={self.sample_shape}, conditional="
                f"{self.class_labels is not None or self.encoder_hidden_states is not None})")

    def with_condition(self, *, class_labels: torch.Tensor | None = None,
                       encoder_hidden_states: torch.Tensor | None = None) -> DiffusersModel:
        """The same network and chain with another condition (e.g. CFG's null condition)."""
        return DiffusersModel(self.unet, self.scheduler, eta=self.eta, class_labels=class_labels,
                              encoder_hidden_states=encoder_hidden_states,
                              chunk_size=self.chunk_size, decode=self.decode,
                              t_start=self.t_start, potential_scale=self.potential_scale,
                              sample_shape=self.sample_shape,
                              use_clipped_model_output=self.use_clipped_model_output)

    def chain(self, steps: int) -> SchedulerChain:
        """The scheduler's chain with ``steps`` inference steps (cached)."""
        ch = self._chains.get(int(steps))
        if ch is None:
            ch = SchedulerChain(self.scheduler, int(steps), eta=self.eta,
                                use_clipped_model_output=self.use_clipped_model_output)
            self._chains[int(steps)] = ch
        return ch

    # ---- network calls ----

    def predict(self, x: torch.Tensor, k: int, chain: SchedulerChain) -> torch.Tensor:
        """The network output at chain step k for states ``(B, n, C, H, W)`` (one call)."""
        b, n = x.shape[:2]
        kw: dict[str, Any] = {}
        if self.class_labels is not None:
            kw["class_labels"] = self.class_labels.to(x.device).repeat_interleave(n, 0)
        if self.encoder_hidden_states is not None:
            e = self.encoder_hidden_states.to(device=x.device, dtype=x.dtype)
            kw["encoder_hidden_states"] = e.repeat_interleave(n, 0)
        t = chain.steps[k].timestep
        flat = x.reshape(b * n, *x.shape[2:])
        out = self.unet(flat, t, **kw).sample
        if out.shape != flat.shape:
            raise ValueError(f"unet: returned shape {tuple(out.shape)} for input "
                             f"{tuple(flat.shape)} (learned variances are not supported)")
        return out.reshape(x.shape)

    def step(self, k: int, x: torch.Tensor, noise: torch.Tensor | None = None, *,
             steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One plain chain step k of a ``steps``-step chain from states ``(B, N, C, H, W)``:
        ``scheduler.step`` with ``noise`` as its variance noise (drawn when None)."""
        ch = self.chain(steps)
        with torch.no_grad():
            out = self.predict(x, k, ch)
            x0, eps = ch.denoise(k, x, out)
            mean = ch.mean(k, x, x0, eps)
        st = ch.steps[k]
        if st.std == 0.0:
            return mean
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return mean + st.std * noise


def _checked_scale(scale: Callable[[float], float] | None, chain: SchedulerChain
                   ) -> list[float] | None:
    """``potential_scale`` evaluated once per chain step (a user function checked up front)."""
    if scale is None:
        return None
    vals = []
    for st in chain.steps:
        v = scale(st.frac)
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise TypeError(f"potential_scale: expected a float for t = {st.frac:.4g}, got "
                            f"{type(v).__name__}") from None
        if not math.isfinite(v):
            raise ValueError(f"potential_scale: not finite ({v}) at t = {st.frac:.4g}")
        vals.append(v)
    return vals


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _log_normal(x: torch.Tensor, std: float) -> torch.Tensor:
    z = x.double().flatten(2) / std
    return -0.5 * (z * z).sum(-1) - z.shape[-1] * (math.log(std) + 0.5 * _LOG_2PI)


class DiffusersSteeringModel:
    """The Feynman–Kac model of a steering run over a diffusers chain (built by
    :func:`chain_steering_model`; :func:`pathsmc.steer` dispatches here).

    states = [x, proposal mean, model mean 1 … K (weighted modes), *potential carry];
    means are those of the next step at the current x (so each x is evaluated once).
    """

    def __init__(self, *, models, betas, mode, steps, reward, value, potential, guidance,
                 device, dtype, ops) -> None:
        from pathsmc.diffusion import fk_potential

        self._fk_potential = fk_potential
        self.models = models
        self.betas = betas
        self.mode = mode
        self.chain = models[0].chain(steps)
        self.num_steps = self.chain.num_steps
        self.reward = reward
        self.value = value
        self.potential = potential
        self.guidance = float(guidance)
        self.device = device
        self.dtype = dtype
        self.ops = ops
        self.weighted = mode != "uncorrected"
        self.pot_kind = potential if mode == "reward" else ("difference" if mode == "twisted"
                                                              else None)
        self.has_pot = self.pot_kind is not None or self.guidance != 0.0
        self.fwd_coef = 1.0 - sum(betas)
        self.shape = models[0].sample_shape
        self.t_start = models[0].t_start
        self.potential_scale = _checked_scale(models[0].potential_scale, self.chain)
        self._seen: set[str] = set()  # user functions whose output shape was checked

    def _active(self, k: int) -> bool:
        """Potentials / guidance at chain state k (k = num_steps: the final sample)."""
        return k == self.num_steps or self.chain.steps[k].frac <= self.t_start + 1e-12

    def _checked(self, out: Any, fn: Callable[..., Any], role: str, x: torch.Tensor) -> Any:
        """The first output of each user function: a ``(B, n)`` tensor, or a pair
        ``(values, gradients)``; the error names the function."""
        if role in self._seen:
            return out
        from pathsmc.user_checks import function_name

        b, n = x.shape[:2]
        name = f"{role} `{function_name(fn)}`"
        pot = out[0] if isinstance(out, tuple) else out
        if not isinstance(pot, torch.Tensor) or tuple(pot.shape) != (b, n):
            got = tuple(pot.shape) if isinstance(pot, torch.Tensor) else type(pot).__name__
            hint = (" (a network? pass its twist, e.g. value=net.twist(classes))"
                    if role == "value" and isinstance(fn, torch.nn.Module) else "")
            raise ValueError(f"{name} returned {got}, expected a tensor of shape ({b}, {n}): "
                             f"one value per (row, particle) of states {tuple(x.shape)}{hint}")
        if isinstance(out, tuple) and (len(out) != 2 or not isinstance(out[1], torch.Tensor)
                                       or out[1].shape[:2] != x.shape[:2]):
            raise ValueError(f"{name} returned a tuple: expected (values ({b}, {n}), "
                             f"gradients with the states' leading shape ({b}, {n}, ...))")
        self._seen.add(role)
        return out

    def _potential(self, x: torch.Tensor, x0: torch.Tensor | None, k: int) -> torch.Tensor:
        final = k == self.num_steps
        if self.value is not None and not (final and self.reward is not None):
            t = 0.0 if final else self.chain.steps[k].frac
            return self._checked(self.value(x, t), self.value, "value", x)
        img = x if final else x0
        dec = self.models[0].decode
        if dec is not None:
            b, n = img.shape[:2]
            d = dec(img.reshape(b * n, *img.shape[2:]))
            img = d.reshape(b, n, *d.shape[1:])
        r = self._checked(self.reward(img), self.reward, "reward", x)
        if final or self.potential_scale is None:
            return r
        lam = self.potential_scale[k]
        return tuple(lam * v for v in r) if isinstance(r, tuple) else lam * r

    def _evaluate(self, x: torch.Tensor, k: int):
        """(proposal mean, model means, potential) at chain state k, in particle chunks."""
        b, n = x.shape[:2]
        final = k == self.num_steps
        active = self._active(k)
        want_pot = active and self.pot_kind is not None
        want_grad = active and not final and self.guidance != 0.0 \
            and self.chain.steps[k].std > 0.0
        size = max(1, self.models[0].chunk_size // b)
        # a learned value needs no gradient through the network: only the reward on x̂₀ does
        net_grad = want_grad and self.value is None
        props, means, pots = [], [[] for _ in self.models], []
        for j0, j1 in _chunks(n, size):
            xc = x[:, j0:j1].detach()
            with torch.enable_grad() if want_grad else torch.no_grad():
                xg = xc.detach().requires_grad_(want_grad)  # xc stays graph-free (weights)
                pot = grad = None
                if final:
                    if want_pot:
                        pot = self._potential(xc, None, k)
                    pots.append(pot)
                    continue
                xn = xg if net_grad else xc
                with torch.enable_grad() if net_grad else torch.no_grad():
                    outs = [m.predict(xn, k, self.chain) for m in self.models]
                    x0s = [self.chain.denoise(k, xn, o) for o in outs]
                    comb = sum(bk * o for bk, o in zip(self.betas, outs, strict=True))
                    px0, peps = self.chain.denoise(k, xn, comb)
                    pmean = self.chain.mean(k, xn, px0, peps)
                if want_pot or want_grad:
                    out = self._potential(xg, x0s[0][0], k)
                    if isinstance(out, tuple):
                        pot, grad = out
                    else:
                        pot = out
                    if want_grad and grad is None:
                        (grad,) = torch.autograd.grad(pot.sum(), xg)
                if grad is not None:
                    var = self.chain.steps[k].std ** 2
                    pmean = pmean + (self.guidance * var) * grad.detach()
                props.append(pmean.detach())
                if self.weighted:
                    for i, (x0, eps) in enumerate(x0s):
                        means[i].append(self.chain.mean(k, xc, x0.detach(), eps.detach()))
                pots.append(None if pot is None else pot.detach().double())
        prop = None if final else torch.cat(props, 1).to(x.dtype)
        mods = None if final or not self.weighted else [torch.cat(m, 1).to(x.dtype)
                                                        for m in means]
        pot = torch.cat(pots, 1) if want_pot else None
        return prop, mods, pot

    def _pack(self, x, prop, mods, carry):
        return [x, prop, *(mods or []), *carry]

    def init(self, batch: int, particles: int, generator: torch.Generator | None):
        x = torch.randn(batch, particles, *self.shape, generator=generator, device=self.device,
                        dtype=self.dtype)
        x = x * float(getattr(self.chain.scheduler, "init_noise_sigma", 1.0))
        prop, mods, pot = self._evaluate(x, 0)
        logw = torch.zeros(batch, particles, dtype=torch.float64, device=x.device)
        carry: tuple = ()
        if self.weighted:
            if self.fwd_coef != 0.0:  # Σβ log prior − log prior
                logw = logw - self.fwd_coef * _log_normal(x, 1.0)
            if pot is not None:
                inc, carry = self._fk_potential(self.pot_kind, pot, None, False)
                logw = logw + inc
        return self._pack(x, prop, mods, carry), logw

    def _unpack(self, states):
        k = len(self.models) if self.weighted else 0
        return states[0], states[1], states[2:2 + k], tuple(states[2 + k:])

    def step(self, k: int, states, logw, generator):
        x, prop, mods, carry = self._unpack(states)
        st = self.chain.steps[k]
        if st.std == 0.0:  # deterministic (last) step: no kernel to weight, x' = mean
            x_new = prop
        elif not self.weighted:
            x_new, _ = self.ops.em_step(x, prop - x, None, dt=1.0, sigma=st.std,
                                        generator=generator)
        else:
            x_new, logw = self.ops.em_step(
                x, prop - x, logw, dt=1.0, sigma=st.std, ref_drifts=[m - x for m in mods],
                ref_coefs=list(self.betas), generator=generator)
            if self.fwd_coef != 0.0:  # forward noising kernel N(x; a x', var)
                logw = self.ops.kernel_logpdf(x, x_new, None, dt=1.0,
                                              sigma=math.sqrt(st.fwd_var), logw=logw,
                                              coef=self.fwd_coef, linear=st.fwd_a - 1.0)
        prop, mods, pot = self._evaluate(x_new, k + 1)
        if self.weighted and pot is not None:
            final = k + 1 == self.num_steps
            if not carry:  # the first active potential counts from zero (telescoping)
                inc, carry = self._fk_potential(self.pot_kind, pot, None, final)
            else:
                inc, carry = self._fk_potential(self.pot_kind, pot, carry, final)
            logw = logw + inc
        if prop is None:  # final: keep the state list's layout
            prop = x_new
            mods = [x_new] * (len(self.models) if self.weighted else 0)
        return self._pack(x_new, prop, mods, carry), logw


def chain_steering_model(
    model: DiffusersModel | Sequence[DiffusersModel],
    mode: str = "reward",
    *,
    steps: int = 100,
    reward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    potential: str = "difference",
    value: Callable[..., Any] | None = None,
    beta: float | Sequence[float] | None = None,
    guidance: float | None = None,
    weighting: str = "path",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    ops: Any = None,
    **unsupported: Any,
) -> DiffusersSteeringModel:
    """The FK model of :func:`pathsmc.steer` for :class:`DiffusersModel` models (called by
    :func:`pathsmc.diffusion.steering_model`; same arguments). ``steps`` is the number of
    inference steps of the scheduler's chain."""
    from pathsmc.diffusion import MODES, POTENTIALS, check_steering

    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    models = [model] if isinstance(model, DiffusersModel) else list(model)
    if not models or not all(isinstance(m, DiffusersModel) for m in models):
        raise TypeError("model: expected a DiffusersModel or a non-empty sequence of them "
                        "(DiffusersModel and DiffusionModel cannot be mixed)")
    for key, val in unsupported.items():
        if val not in (None, 1, 0.0, False):
            raise ValueError(f"{key}: not supported for DiffusersModel (the scheduler's chain "
                             f"fixes the time grid and the state shape), got {val!r}")
    if potential not in POTENTIALS:
        raise ValueError(f"potential: expected one of {POTENTIALS}, got {potential!r}")
    if weighting != "path":
        raise ValueError("weighting: DiffusersModel has no exact log-density; use 'path' "
                         "(the chain's exact kernels)")
    betas, guidance = check_steering(mode, [False] * len(models), reward=reward is not None,
                                     value=value is not None, beta=beta, guidance=guidance,
                                     weighting="path")
    first = models[0]
    for i, m in enumerate(models[1:], 1):
        if m.sample_shape != first.sample_shape or type(m.scheduler) is not type(
                first.scheduler) or dict(m.scheduler.config) != dict(first.scheduler.config) \
                or m.eta != first.eta:
            raise ValueError(f"model[{i}]: every model must share the scheduler (config, eta) "
                             "and the sample shape of model[0]")
    if value is not None and any(m.potential_scale is not None for m in models):
        raise ValueError("potential_scale: it scales reward potentials r(x̂₀); a value= twist "
                         "is used as given (drop potential_scale, or fold it into the value)")
    if ops is None:
        import pathsmc.ops as ops
    return DiffusersSteeringModel(models=models, betas=betas, mode=mode, steps=int(steps),
                                  reward=reward, value=value, potential=potential,
                                  guidance=guidance, device=torch.device(device), dtype=dtype,
                                  ops=ops)
