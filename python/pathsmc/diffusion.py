"""Steering pretrained diffusion models with SMC.

The noise schedules (VP, VE), the reverse Euler–Maruyama step and the time grid live in
:mod:`pathsmc.schedules`, the model wrapper (:class:`DiffusionModel`,
:func:`convert_prediction`) in :mod:`pathsmc.diffusion_model`, and the up-front checks of user
functions in :mod:`pathsmc.user_checks`; all are re-exported here.

Steering pretrained models (docs/design.md, "The step weight"):

- :class:`DiffusionModel` wraps a user callable returning the score, the ε-prediction or the
  x0-prediction (:func:`convert_prediction` converts between them) and gives Tweedie's
  denoised mean :meth:`DiffusionModel.denoise`;
- :func:`steer` runs SMC along the reverse chain, one :func:`pathsmc.ops.em_step` per step
  (proposal and path-RND weight) plus the mode's potential, with :func:`pathsmc.smc.smc`
  resampling: reward tilting with FK potentials (:func:`fk_potential`), tempering p^β,
  products of models / classifier-free guidance, twisted (soft-value) guidance, and
  uncorrected guidance as a baseline.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from pathsmc.diffusion_model import PREDICTIONS, DiffusionModel, convert_prediction
from pathsmc.schedules import ReverseEM, Schedule, VESchedule, VPSchedule, time_grid
from pathsmc.user_checks import check_user_output, function_name
from pathsmc.user_checks import first_call as _first_call

if TYPE_CHECKING:
    from pathsmc.smc import SMCResult

__all__ = [
    "PREDICTIONS",
    "DiffusionModel",
    "ReverseEM",
    "VPSchedule",
    "VESchedule",
    "Schedule",
    "check_steering",
    "convert_prediction",
    "SteeringModel",
    "fk_potential",
    "model_exponents",
    "steer",
    "steering_model",
    "time_grid",
]


# ---------------------------------------------------------------------------------------------
# FK potentials (reward tilting)
# ---------------------------------------------------------------------------------------------

POTENTIALS = ("difference", "max", "sum")


def fk_potential(
    kind: str, r_new: torch.Tensor, carry: tuple[torch.Tensor, ...] | None, final: bool
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Log-potential of one FK-steering step and the carried state (per particle).

    ``r_new`` is the intermediate reward at the new state (``r(x̂_0)``, the reward at the
    denoised mean, or ``r(x)`` at the last step); ``carry`` is None at the start.

    - ``difference``: ``r_new − r_prev`` (carry ``(r,)``); the increments telescope to
      ``r(x_0)``: the target is exactly the tilted ``p_0(x) exp(r(x)) / Z``.
    - ``max``: ``max_{s ≥ t} r_s`` (running maximum), carry ``(max, accumulated)``;
    - ``sum``: ``Σ_{s ≥ t} r_s`` (running sum), carry ``(sum, accumulated)``.

    For ``max`` and ``sum`` the last increment is ``r(x_0) − (sum of the earlier
    increments)``, so every path's potentials multiply to ``exp(r(x_0))`` and the three
    variants target the same tilted distribution with the same Z (they differ only in how
    they resample on the way).
    """
    if carry is None:  # the initial potential
        if kind == "difference":
            return r_new, (r_new,)
        return r_new, (r_new, r_new)
    if kind == "difference":
        return r_new - carry[0], (r_new,)
    level, acc = carry
    if final:
        return r_new - acc, (r_new, acc)
    level = torch.maximum(level, r_new) if kind == "max" else level + r_new
    return level, (level, acc + level)


# ---------------------------------------------------------------------------------------------
# steer(): the SMC drivers
# ---------------------------------------------------------------------------------------------

MODES = ("reward", "temper", "product", "twisted", "uncorrected")
WEIGHTINGS = ("path", "density")
_LOG_2PI = math.log(2.0 * math.pi)


def _log_prior(x: torch.Tensor, std: float) -> torch.Tensor:
    z = x.double() / std
    return -0.5 * (z * z).sum(-1) - x.shape[-1] * (math.log(std) + 0.5 * _LOG_2PI)


class _Eval(NamedTuple):
    scores: list[torch.Tensor] | None  # per model, at (x, t); None at the last time
    potential: torch.Tensor | None  # r_t(x) or V_t(x), (B, N) float64
    grad: torch.Tensor | None  # ∇ of the potential (guidance), at non-final times
    logp: torch.Tensor | None  # Σ_k β_k log p_{k,t}(x) (weighting="density")


class SteeringModel:
    """The Feynman–Kac model of a steering run (built by :func:`steering_model`, run by
    :func:`steer` through :func:`pathsmc.smc.smc`, or captured by
    :class:`pathsmc.smc.CapturedSMC` for repeated replays).

    states = [x, score_1 … score_K, (guidance grad), (Σβ log p_t), *potential carry].
    """

    def __init__(self, *, models, betas, mode, times, dim, reward, value, potential,
                 guidance, weighting, device, dtype, ops, potential_every) -> None:
        self.models = models
        self.betas = betas
        self.mode = mode
        self.times = times
        self.num_steps = len(times) - 1
        self.dim = dim
        self.reward = reward
        self.value = value
        self.potential = potential
        self.guidance = float(guidance)
        self.potential_every = int(potential_every)
        self.weighting = weighting
        self.device = device
        self.dtype = dtype
        self.ops = ops
        self.schedule = models[0].schedule
        self.weighted = mode != "uncorrected"
        self.has_grad = self.guidance != 0.0
        self.has_logp = self.weighted and weighting == "density"
        # which potential the weights carry: reward (FK), value (twist), or none
        if mode == "reward":
            self.pot_kind = potential
        elif mode == "twisted":
            self.pot_kind = "difference"
        else:
            self.pot_kind = None
        self.uses_denoiser = reward is not None and mode in ("reward", "uncorrected") and (
            value is None)

    # ---- model evaluation at (x, t) ----

    def _evaluate(self, x: torch.Tensor, t: float, final: bool, apply: bool = True) -> _Eval:
        need_grad = self.has_grad and not final
        scores = pot = grad = None
        with torch.enable_grad() if need_grad else torch.no_grad():
            xg = x.detach().requires_grad_(need_grad)
            x0 = None
            if not final:
                if self.uses_denoiser:
                    s0, x0 = self.models[0].score_and_denoised(xg, t)
                    scores = [s0] + [m.score(xg, t) for m in self.models[1:]]
                else:
                    with torch.no_grad():
                        scores = [m.score(x, t) for m in self.models]
            if (self.pot_kind is not None and apply) or need_grad:
                if self.value is not None and not (final and self.reward is not None):
                    out = self.value(xg, t)
                    if isinstance(out, tuple):
                        pot, grad = out
                    else:
                        pot = out
                elif final:
                    pot = self.reward(x)
                else:
                    pot = self.reward(x0)
                if need_grad and grad is None:
                    (grad,) = torch.autograd.grad(pot.sum(), xg)
        if scores is not None:
            scores = [s.detach() for s in scores]
        if pot is not None:
            pot = pot.detach().double()
        if grad is not None:
            grad = grad.detach() if need_grad else None
        logp = None
        if self.has_logp:
            with torch.no_grad():
                logp = sum(b * m.log_prob(x, t).double() for b, m in zip(
                    self.betas, self.models, strict=True))
        return _Eval(scores, pot, grad, logp)

    # ---- FeynmanKacModel ----

    def _pack(self, x: torch.Tensor, ev: _Eval, old: list[torch.Tensor] | None,
              carry: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        k = len(self.models)
        scores = ev.scores if ev.scores is not None else old[1:1 + k]
        states = [x, *scores]
        i = 1 + k
        if self.has_grad:
            states.append(ev.grad if ev.grad is not None else old[i])
            i += 1
        if self.has_logp:
            states.append(ev.logp)
        return states + list(carry)

    def _unpack(self, states: list[torch.Tensor]):
        k = len(self.models)
        x, scores = states[0], states[1:1 + k]
        i = 1 + k
        grad = logp = None
        if self.has_grad:
            grad, i = states[i], i + 1
        if self.has_logp:
            logp, i = states[i], i + 1
        return x, scores, grad, logp, tuple(states[i:])

    def check_user_functions(self, x: torch.Tensor, t: float) -> None:
        """Call every user function once at ``(x, t)`` and check what it returns: a tensor
        on ``x``'s device, floating point, finite, shaped like ``x`` (model predictions,
        ∇V) or ``(B, N)`` (rewards, values, log-densities). Reads the data (a host sync):
        :meth:`init` runs it once per run, never inside the loop, and not while a CUDA graph
        is being recorded."""
        b, n = x.shape[:2]
        with torch.no_grad():
            for i, m in enumerate(self.models):
                what = f"model[{i}]" if len(self.models) > 1 else "model"
                name = f"{what} `{function_name(m.fn)}`"
                check_user_output(_first_call(name, m.predict, x, t), name, x.shape, x.device,
                                  "like x")
                if m.has_log_prob:
                    name = f"{what}.log_prob `{function_name(m._log_prob)}`"
                    check_user_output(_first_call(name, m.log_prob, x, t), name, (b, n),
                                      x.device)
            if self.reward is not None:
                name = f"reward `{function_name(self.reward)}`"
                check_user_output(_first_call(name, self.reward, x), name, (b, n), x.device)
        if self.value is not None:
            name = f"value `{function_name(self.value)}`"
            with torch.enable_grad():
                out = _first_call(name, self.value, x.detach().requires_grad_(self.has_grad), t)
            if isinstance(out, tuple):
                if len(out) != 2:
                    raise ValueError(f"{name}: returned a tuple of {len(out)}, expected V or "
                                     "(V, ∇V)")
                check_user_output(out[0], name + " (V)", (b, n), x.device)
                check_user_output(out[1], name + " (∇V)", x.shape, x.device, "like x")
            else:
                check_user_output(out, name, (b, n), x.device)
                if self.has_grad and not out.requires_grad:
                    raise ValueError(
                        f"{name} returned V without a gradient with respect to x "
                        "(V.requires_grad is False), and the guidance needs ∇V: compute V "
                        "from x with differentiable torch ops (no .detach(), no NumPy, no "
                        "torch.no_grad()), return (V, ∇V), or pass guidance=0")
        elif self.has_grad and self.reward is not None and self.uses_denoiser:
            # gradient guidance by autograd through the denoiser and the reward
            name = f"reward `{function_name(self.reward)}`"
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                _, x0 = self.models[0].score_and_denoised(xg, t)
                pot = self.reward(x0)
            if not (isinstance(pot, torch.Tensor) and pot.requires_grad):
                raise ValueError(
                    f"guidance: {name} at the model's denoised mean x̂_0(x, t) has no gradient "
                    f"with respect to x, and guidance = {self.guidance:g} needs one: the model "
                    f"`{function_name(self.models[0].fn)}` or the reward is not "
                    "differentiable (.detach(), NumPy, torch.no_grad()); make both "
                    "differentiable or pass guidance=0")

    def init(self, batch: int, particles: int, generator: torch.Generator | None):
        std = float(self.schedule.prior_std)
        x = std * torch.randn(batch, particles, self.dim, generator=generator,
                              device=self.device, dtype=self.dtype)
        t0 = self.times[0]
        if not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            self.check_user_functions(x, t0)
        ev = self._evaluate(x, t0, final=False)
        logw = torch.zeros(batch, particles, dtype=torch.float64, device=x.device)
        carry: tuple[torch.Tensor, ...] = ()
        if self.weighted:
            log_prior = _log_prior(x, std)
            if self.has_logp:
                logw = ev.logp - log_prior
            else:  # Σ_k β_k log p_{k,1}(x) − log p_prior(x), p_{k,1} ≈ prior when unknown
                with torch.no_grad():
                    for b, m in zip(self.betas, self.models, strict=True):
                        lp = m.log_prob(x, t0).double() if m.has_log_prob else log_prior
                        logw = logw + b * lp
                logw = logw - log_prior
            if self.pot_kind is not None:
                inc, carry = fk_potential(self.pot_kind, ev.potential, None, False)
                logw = logw + inc
        return self._pack(x, ev, None, carry), logw

    def step(self, k: int, states: list[torch.Tensor], logw: torch.Tensor,
             generator: torch.Generator | None):
        x, scores, grad, logp, carry = self._unpack(states)
        t, t_new = self.times[k], self.times[k + 1]
        em = self.schedule.reverse_em(t, t - t_new)
        prop = sum(b * s for b, s in zip(self.betas, scores, strict=True))
        if grad is not None:
            prop = prop + self.guidance * grad
        drift = em.drift(x, prop).to(x.dtype)
        if not self.weighted:
            x_new, _ = self.ops.em_step(x, drift, None, dt=em.dt, sigma=em.sigma,
                                        generator=generator)
        elif self.weighting == "path":
            refs = [em.drift(x, s).to(x.dtype) for s in scores]
            x_new, logw = self.ops.em_step(
                x, drift, logw, dt=em.dt, sigma=em.sigma, ref_drifts=refs,
                ref_coefs=list(self.betas), fwd_coef=1.0 - sum(self.betas),
                fwd_linear=em.fwd_linear, generator=generator)
        else:
            x_new, logw = self.ops.em_step(x, drift, logw, dt=em.dt, sigma=em.sigma,
                                           fwd_coef=1.0, fwd_linear=em.fwd_linear,
                                           generator=generator)
        final = k + 1 == self.num_steps
        apply = final or (k + 1) % self.potential_every == 0
        ev = self._evaluate(x_new, t_new, final, apply)
        if self.weighted:
            if self.has_logp:
                logw = logw + (ev.logp - logp)
            if self.pot_kind is not None and apply:
                inc, carry = fk_potential(self.pot_kind, ev.potential, carry, final)
                logw = logw + inc
        return self._pack(x_new, ev, states, carry), logw


def _length(v: Any) -> int | None:
    """The number of entries of a sequence-like ``v`` (1 for a number; None: not a sequence)."""
    if _is_number(v):
        return 1
    try:
        return None if isinstance(v, str) else len(v)
    except TypeError:
        return None


def _single(v: Any) -> Any:
    """The entry of a one-element sequence of a number, else None."""
    if _length(v) != 1 or _is_number(v):
        return None
    (one,) = list(v)
    return one if _is_number(one) else None


def default_threshold(betas: Sequence[float]) -> float:
    """:func:`steer`'s resampling threshold: 0.5, or 1.0 (every step) when the target
    sharpens the models (Σ_k β_k > 1), whose weights are heavy-tailed."""
    return 1.0 if sum(betas) > 1.0 + 1e-12 else 0.5


def _is_number(v: Any) -> bool:
    """A real number: Python, NumPy or a one-element tensor (not a bool, a flag)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and not v.dtype.is_complex and v.dtype != torch.bool
    return isinstance(v, numbers.Real)


def model_exponents(beta: float | Sequence[float] | None, num_models: int, *,
                    name: str = "beta", error: type[Exception] = ValueError) -> list[float]:
    """One finite exponent per model from a number (one model), a sequence, or None (1 each);
    the parser of :func:`steer`'s, CREPE's and the sampling config's ``beta``."""
    if beta is None:
        return [1.0] * num_models
    try:
        seq = [beta] if _is_number(beta) else list(beta)
    except TypeError:
        seq = [beta]
    if not all(_is_number(b) for b in seq):
        raise error(f"{name}: expected numbers, got {beta!r}")
    betas = [float(b) for b in seq]
    if len(betas) != num_models:
        raise error(f"{name}: expected {num_models} exponent{'s' if num_models != 1 else ''} "
                    f"(one per model), got {len(betas)}")
    if not all(math.isfinite(b) for b in betas):
        raise error(f"{name}: expected finite exponents, got {betas}")
    return betas


def check_steering(
    mode: str,
    log_probs: Sequence[bool],
    *,
    reward: bool,
    value: bool,
    beta: float | Sequence[float] | None,
    guidance: float | None,
    weighting: str,
    name: Callable[[str], str] = str,
    error: type[Exception] = ValueError,
) -> tuple[list[float], float]:
    """The rules that tie :func:`steer`'s arguments to its mode, in one place (``steer`` and
    ``pathsmc sample`` both use them). Returns ``(betas, guidance)``: the exponent per model
    and the guidance scale with the mode's default filled in.

    Args:
        mode: one of :data:`MODES`.
        log_probs: per model, whether it has an exact ``log_prob`` (their number is the number
            of models).
        reward, value: whether a reward / a value function is given.
        beta, guidance, weighting: as given to :func:`steer`.
        name: maps an argument name (``"model"``, ``"reward"``, ``"value"``, ``"beta"``,
            ``"guidance"``, ``"weighting"``, ``"log_prob[i]"``) to the name the caller's user
            knows it by (a config key); errors name that.
        error: the exception type raised.
    """
    n = len(log_probs)
    if mode not in MODES:
        raise error(f"{name('mode')}: expected one of {MODES}, got {mode!r}")
    if mode in ("reward", "temper", "twisted") and n != 1:
        raise error(f"{name('model')}: mode {mode!r} takes one model, got {n}")
    if weighting not in WEIGHTINGS:
        raise error(f"{name('weighting')}: expected one of {WEIGHTINGS}, got {weighting!r}")
    # exponents
    if mode in ("reward", "twisted"):
        if beta is not None:
            raise error(f"{name('beta')}: not used by mode {mode!r} (use 'temper' / "
                        "'product')")
        betas = [1.0]
    elif mode == "temper":
        one = beta if _is_number(beta) else _single(beta)  # 0.5, [0.5], np.array([0.5])
        if one is None:
            raise error(f"{name('beta')}: mode 'temper' needs the exponent β (a number), "
                        f"got {beta!r}")
        betas = model_exponents(one, 1, name=name("beta"), error=error)
        if not betas[0] > 0.0:
            raise error(f"{name('beta')}: mode 'temper' needs β > 0 (the target p^β), got "
                        f"{betas[0]}")
    elif mode == "product" and _length(beta) not in (None, n):
        raise error(f"{name('beta')}: mode 'product' takes one β per model; got "
                    f"{_length(beta)} β for {n} model{'s' if n != 1 else ''} (give the models "
                    "as a list, e.g. model=[m1, m2], beta=[1.0, 1.0])")
    elif beta is None and mode == "product":
        raise error(f"{name('beta')}: mode 'product' needs one weight per model, e.g. "
                    "[1.0, 1.0]")
    else:
        betas = model_exponents(beta, n, name=name("beta"), error=error)
    # potentials
    if mode == "reward" and not reward:
        raise error(f"{name('reward')}: mode 'reward' needs reward(x) -> (B, N)")
    if mode == "twisted" and not value:
        raise error(f"{name('value')}: mode 'twisted' needs value(x, t) -> V or (V, ∇V)")
    for arg, given in (("reward", reward), ("value", value)):
        if given and mode in ("temper", "product"):
            raise error(f"{name(arg)}: not used by mode {mode!r}")
    if mode == "reward" and value:
        raise error(f"{name('value')}: not used by mode 'reward' (use 'twisted')")
    if guidance is None:
        guidance = 1.0 if mode == "twisted" or (mode == "uncorrected" and (reward or value)) \
            else 0.0
    guidance = float(guidance)
    if guidance != 0.0 and mode in ("temper", "product"):
        raise error(f"{name('guidance')}: mode {mode!r} has no potential to guide with")
    if guidance != 0.0 and mode == "uncorrected" and not (reward or value):
        raise error(f"{name('guidance')}: mode 'uncorrected' needs a reward or a value to "
                    "guide with")
    if weighting == "density":
        for i, has in enumerate(log_probs):
            if not has:
                raise error(f"{name(f'log_prob[{i}]')}: weighting 'density' needs the exact "
                            "log-density of every model")
    return betas, guidance


def steer(
    model: DiffusionModel | Sequence[DiffusionModel],
    mode: str = "reward",
    *,
    particles: int,
    batch: int = 1,
    steps: int = 100,
    dim: int | None = None,
    reward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    potential: str = "difference",
    potential_every: int = 1,
    value: Callable[[torch.Tensor, float], Any] | None = None,
    beta: float | Sequence[float] | None = None,
    guidance: float | None = None,
    weighting: str = "path",
    t_end: float = 0.0,
    times: Sequence[float] | None = None,
    threshold: float | None = None,
    scheme: str = "systematic",
    generator: torch.Generator | None = None,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    ops: Any = None,
    progress: bool | None = None,
    cuda_graph: bool = False,
    replicates: bool | None = None,
) -> SMCResult:
    """Steer a pretrained diffusion model with SMC along its reverse-time Euler–Maruyama chain.

    Particles start from the schedule's prior N(0, prior_std² I) at t = 1 and take ``steps``
    uniform steps to ``t_end``. Each step is one :func:`pathsmc.ops.em_step` — the proposal and
    the path-RND weight of docs/design.md ("The step weight") — plus the mode's potential; the
    generic driver :func:`pathsmc.smc.smc` resamples adaptively and estimates log Ẑ per row.

    Modes (the target at t = 0 and how it is weighted):

    - ``"reward"``: ``p_0(x) exp(r(x)) / Z``. Reference kernel the model (c = (1), c_f = 0),
      FK potentials on the intermediate rewards ``r_t(x) = r(x̂_0(x, t))`` at Tweedie's
      denoised mean (``potential``: ``"difference"`` — exact, telescoping —, ``"max"`` or
      ``"sum"``, see :func:`fk_potential`); optional gradient guidance
      ``guidance · g(t)² ∇_x r_t(x)`` (autograd through the model) in the proposal.
    - ``"temper"``: ``p_0(x)^β / Z``. Proposal with the annealed score ``β · score``; path-RND
      weight with c = (β), c_f = 1 − β (forward kernel from the schedule's drift) and initial
      weight ``β log p_1(x) − log p_prior(x)``.
    - ``"product"``: ``Π_k p_k(x)^{β_k} / Z`` for several models (``model`` a sequence, one β
      each): products of experts, and classifier-free guidance with ``model = [conditional,
      unconditional]`` and ``beta = (w, 1 − w)``. Proposal score ``Σ_k β_k score_k``, weight
      c = (β_1, β_2, …), c_f = 1 − Σ_k β_k.
    - ``"twisted"``: ``p_0(x) exp(V_0(x)) / Z`` with a user value function (twist) ``V_t``:
      potential ``V_{t−h}(x') − V_t(x)``, guidance ``guidance · g(t)² ∇V_t(x)`` (default 1:
      soft-value / twisted SMC, optimal when V_t is the exact soft value
      ``log E[exp(r(X_0)) | X_t = x]``), reference kernel the model (c = (1)). With ``reward``
      also given, the last potential uses ``r(x)`` instead of ``V_0(x)``.
    - ``"uncorrected"``: the proposal built from the same arguments (``beta`` for the
      annealed / combined score, ``reward`` or ``value`` with ``guidance``) without any weight
      or resampling — the guidance baseline; ``log_z`` is 0 and every ESS is N.

    The initial weight is ``Σ_k β_k log p_{k,1}(x) − log p_prior(x)`` plus the first
    potential, with ``p_{k,1}`` the model's ``log_prob`` at t = 1 when given and the prior
    itself otherwise (VP: p_1 ≈ N(0, I); VE: ≈ N(0, σ_max² I)).

    The path-RND weights are exact in the continuous-time limit; with finitely many steps the
    target is that of the discretized chain, and log Ẑ carries an O(h) bias (h = 1/steps)
    that grows with the target's sharpness. Measured on a 1-D two-component mixture
    (``bench/steer_bias.py``, E[log Ẑ] − log Z ± its standard error): the exact twist
    (``"twisted"``) +0.0113 ± 0.0006 nats at 50 steps, +0.0058 ± 0.0004 at 100,
    +0.0030 ± 0.0003 at 200 (about 0.6·h); classifier-free guidance with w = 1.5
    +0.046 ± 0.004, +0.022 ± 0.004, +0.004 ± 0.003 (about 2·h); p^0.5 within ± 0.005 at
    every step count. To shrink it: more ``steps``; a grid finer near t = 0, where the score
    is stiffest (``times``; ``(1 − k/K)²`` took the exact twist at 50 steps from +0.0113 to
    +0.0035 ± 0.0006); or — when every model has an exact ``log_prob`` —
    ``weighting="density"``, which replaces the RND by the exact intermediate targets
    ``Π_k p_{k,t}^{β_k}`` (forward kernel only, c_f = 1): then Ẑ is unbiased for any number
    of steps (−0.0003 ± 0.0009 at 50 steps).

    Sharpening targets (Σ_k β_k > 1: β > 1, products of two models) are hard for the annealed
    proposal, which contracts faster than the target (for Gaussians its variance goes to
    1/(2β − 1) of the model's instead of 1/β): the weights are heavy-tailed and log Ẑ spreads
    widely unless N is large. With adaptive resampling at ESS < N/2 the distribution of log Ẑ
    is then right-skewed and its mean biased low (≈ −0.14 nats at N = 8192 for β = 2 on a 1-D
    mixture); resampling at every step removes the tail, so the default ``threshold`` is 1.0
    for Σ_k β_k > 1 and 0.5 otherwise. β ≤ 1 and Σ_k β_k = 1 (classifier-free guidance) are
    benign.

    Dtypes: the particles take ``dtype`` (default float32, what networks run in; pass
    float64 for exact test models); log-weights, log Ẑ and ESS are always float64. Model
    outputs may be any floating dtype (they are cast to the particles' dtype).

    User functions (each model's ``fn`` and ``log_prob``, ``reward``, ``value``) are called
    once at the start on the prior's particles and checked: a :class:`torch.Tensor` on the
    particles' device, floating point, finite, shaped like ``x`` (predictions, ∇V) or
    ``(B, N)`` (rewards, values, log-densities); errors name the function. Inside the loop
    nothing is read back: particles that die there (NaN / inf output) are counted at the end
    (``result.dead_particles``), and a collapse of the weights (ESS below a few particles,
    a non-finite log Ẑ, log Ẑ spreading by more than a nat across replicate rows — see
    ``replicates``) is reported in ``result.warnings`` and as a
    :class:`pathsmc.diagnostics.CollapseWarning` — e.g. a reward tilt far from what the
    model generates.

    Args:
        model: a :class:`DiffusionModel`, or a sequence of them for ``"product"`` (and for
            ``"uncorrected"`` with several ``beta``); all share the first one's schedule.
        mode: one of ``"reward"``, ``"temper"``, ``"product"``, ``"twisted"``,
            ``"uncorrected"``.
        particles: N particles per problem.
        batch: B independent problems (rows), each with its own log Ẑ; per-row conditions go
            in the models' ``condition`` and in ``reward`` / ``value`` (which see all rows).
        steps: Euler–Maruyama steps from t = 1 to ``t_end``.
        dim: event size D (default: ``model.dim``).
        reward: ``reward(x) -> (B, N)`` log-potential r at the end (a log-likelihood,
            β·reward, ...); required for ``"reward"``.
        potential: the FK potential of ``"reward"``: ``"difference"``, ``"max"`` or ``"sum"``.
        potential_every: apply the potential (FK reward or twist) only every this many steps,
            and always at the last one (FK steering's resampling interval). Every choice
            targets the same distribution; with ``"max"`` / ``"sum"`` fewer factors give
            weights of much lower variance.
        value: ``value(x, t) -> V (B, N)`` or ``(V, ∇V)``, the twist of ``"twisted"`` (also
            accepted by ``"uncorrected"`` for its guidance); without ∇V the gradient comes from
            autograd.
        beta: the exponent of ``"temper"`` (a float) or the weights of ``"product"`` (one per
            model); for ``"uncorrected"`` the score combination (default 1 per model).
        guidance: scale of the gradient guidance (default 0 for ``"reward"``, 1 for
            ``"twisted"``, 1 for ``"uncorrected"`` when ``reward`` or ``value`` is given).
        weighting: ``"path"`` (path-RND from the scores; default) or ``"density"`` (exact
            intermediate densities from the models' ``log_prob``).
        t_end: the final diffusion time (0: data).
        times: an explicit decreasing time grid ``1 = t_0 > t_1 > … > t_K = t_end``
            (overrides ``steps`` and ``t_end``), e.g. finer where the schedule is stiff.
        threshold: resample a row when its ESS < threshold · N (1: every step). Default
            (None): 0.5, or 1.0 for sharpening targets (Σ_k β_k > 1, see above).
        scheme: resampling scheme (``systematic``, ``stratified``, ``multinomial``,
            ``residual``).
        generator: seeds the prior, the step noise and the resampling.
        seed: creates ``generator`` on ``device`` when that is not given.
        device: where the particles live.
        dtype: particle dtype (default float32, the rule for networks in docs/design.md,
            "Conventions"; log-weights are float64).
        ops: the module providing ``em_step``, ``normalize`` and ``adaptive_resample``
            (default :mod:`pathsmc.ops`; :mod:`pathsmc.reference` runs the whole loop in pure
            PyTorch).
        progress: show a progress bar (default: when stderr is a terminal).
        cuda_graph: capture the whole run in one CUDA graph and replay it
            (:class:`pathsmc.smc.CapturedSMC`; CUDA only, no progress bar). Models, rewards
            and values must then be free of host reads (``.item()``, ``bool(tensor)``). One
            captured run is not faster than an eager one; for repeated runs keep a
            ``CapturedSMC(steering_model(...), ...)`` and replay it.
        replicates: the rows are replicates of one problem, so a spread of log Ẑ across them
            above :data:`pathsmc.diagnostics.SPREAD_LIMIT` nats is reported as a collapse
            (the estimate is then meaningless). Default (None): true for ``"temper"`` and
            ``"product"`` runs of several rows whose models have no ``condition`` (every row
            then has the same target); rewards and values may differ per row, so say
            ``replicates=True`` for tilts that are the same in every row.

    Returns:
        :class:`pathsmc.smc.SMCResult`: ``particles`` ``(B, N, D)``, ``logw``, ``log_z``
        ``(B,)``, ESS and resampling histories, dead rows, ``dead_particles`` and
        ``warnings`` (the collapse diagnostics).
    """
    from pathsmc.smc import smc

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device: {str(device)!r} was asked for but CUDA is not available "
                           f"(torch {torch.__version__}, built with CUDA: "
                           f"{torch.version.cuda or 'no'}); use device='cpu'")
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    fk = steering_model(model, mode, steps=steps, dim=dim, reward=reward, potential=potential,
                        potential_every=potential_every, value=value, beta=beta,
                        guidance=guidance, weighting=weighting, t_end=t_end, times=times,
                        device=device, dtype=dtype, ops=ops)
    if threshold is None:
        threshold = default_threshold(fk.betas)
    if replicates is None:
        replicates = (batch > 1 and getattr(fk, "mode", None) in ("temper", "product")
                      and all(isinstance(m, DiffusionModel) and m.condition is None
                              for m in getattr(fk, "models", [None])))
    return smc(fk, particles, batch, threshold=threshold if fk.weighted else 0.0,
               scheme=scheme, generator=generator, progress=progress, desc=f"steer:{mode}",
               ops=fk.ops, cuda_graph=cuda_graph, replicates=bool(replicates))


def steering_model(
    model: DiffusionModel | Sequence[DiffusionModel],
    mode: str = "reward",
    *,
    steps: int = 100,
    dim: int | None = None,
    reward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    potential: str = "difference",
    potential_every: int = 1,
    value: Callable[[torch.Tensor, float], Any] | None = None,
    beta: float | Sequence[float] | None = None,
    guidance: float | None = None,
    weighting: str = "path",
    t_end: float = 0.0,
    times: Sequence[float] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    ops: Any = None,
) -> SteeringModel:
    """The Feynman–Kac model of :func:`steer` without running it (same arguments and checks).

    For repeated runs of one job: capture it once and replay it,
    ``CapturedSMC(steering_model(...), particles, batch, generator=g).run()`` (CUDA), or hand
    it to :func:`pathsmc.smc.smc` yourself. ``threshold`` must then be 0 for
    ``"uncorrected"`` (its ``weighted`` attribute is False), as :func:`steer` does.
    """
    if getattr(model, "is_discrete_chain", False) or (
            isinstance(model, (list, tuple)) and model
            and getattr(model[0], "is_discrete_chain", False)):
        # diffusers chains: weighted with the scheduler's exact kernels (integrations)
        from pathsmc.integrations.diffusers import chain_steering_model
        return chain_steering_model(
            model, mode, steps=steps, reward=reward, potential=potential, value=value,
            beta=beta, guidance=guidance, weighting=weighting, device=device, dtype=dtype,
            ops=ops, dim=dim, potential_every=potential_every, t_end=t_end, times=times)
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if isinstance(model, DiffusionModel):
        models = [model]
    elif isinstance(model, Sequence) and not isinstance(model, str):
        models = list(model)
    else:
        models = [model]
    bad = [m for m in models if not isinstance(m, DiffusionModel)]
    if not models or bad:
        how = (f"; wrap the function `{function_name(bad[0])}`: DiffusionModel(fn, "
               "VPSchedule(), prediction='eps' (or 'score', 'x0'), dim=D)"
               if bad and callable(bad[0]) else "")
        raise TypeError("model: expected a DiffusionModel or a non-empty sequence of them, got "
                        f"{type(bad[0] if bad else model).__name__}{how}")
    if potential not in POTENTIALS:
        raise ValueError(f"potential: expected one of {POTENTIALS}, got {potential!r}")
    if steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps}")
    if int(potential_every) < 1:
        raise ValueError(f"potential_every: expected a positive integer, got {potential_every}")
    if not 0.0 <= t_end < 1.0:
        raise ValueError(f"t_end: expected 0 <= t_end < 1, got {t_end}")
    betas, guidance = check_steering(
        mode, [m.has_log_prob for m in models], reward=reward is not None,
        value=value is not None, beta=beta, guidance=guidance, weighting=weighting,
        name=lambda k: f"model[{k[9:-1]}].log_prob" if k.startswith("log_prob") else k)
    schedule = models[0].schedule
    if any(m.schedule != schedule for m in models[1:]):
        raise ValueError("model: every model must use the same schedule")
    if dim is None:
        dim = models[0].dim
    if dim is None or int(dim) < 1:
        raise ValueError("dim: give the event size D (or build the model with dim=...)")
    device = torch.device(device)
    if ops is None:
        import pathsmc.ops as ops
    if times is None:
        times = time_grid(steps, 1.0, float(t_end))
    else:
        times = [float(t) for t in times]
        if (len(times) < 2 or times[0] != 1.0 or not 0.0 <= times[-1] < 1.0
                or any(b >= a for a, b in zip(times, times[1:], strict=False))):
            raise ValueError("times: expected a decreasing grid from 1.0 to t_end in [0, 1)")
    return SteeringModel(models=models, betas=betas, mode=mode, times=times, dim=int(dim),
                         reward=reward, value=value, potential=potential, guidance=guidance,
                         weighting=weighting, device=device, dtype=dtype, ops=ops,
                         potential_every=potential_every)
