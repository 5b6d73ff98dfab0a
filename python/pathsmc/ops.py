"""The fused ops: validated Python entry points over ``torch.ops.pathsmc.*``.

Shapes (docs/design.md): states ``x`` are ``(B, N, D)``, also accepted as ``(N, D)`` (B = 1) or
``(B, N, *event)`` (flattened to D, a view for contiguous input); log-weights are ``(B, N)``
or ``(N,)``. Outputs come back in the caller's shapes. Every op draws its randomness with an
in-kernel counter-based Philox stream seeded from ``generator`` (the default generator of
the device when None) and also accepts explicit noise / uniforms. The same seed repeats a run
on a device, and results do not depend on the thread count; but a CPU generator (mt19937) has
no Philox offset, so the CPU kernels key their stream with a 64-bit draw from it while CUDA
uses the generator's (seed, offset) (graph-safe): CPU and CUDA noise for the same seed are
equally distributed, not identical. Pass the noise / uniforms explicitly for identical results
across devices.

NaN log-weights are dead particles (weight 0). A row whose weights are all dead has ESS 0 and
log mean weight -inf; it is never resampled.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

import pathsmc._build  # noqa: F401  (loads the extension and registers torch.ops.pathsmc)
from pathsmc import _autograd
from pathsmc._validate import (
    FLOAT_DTYPES,
    check_positive,
    check_scheme,
    check_tensor,
    check_uniforms,
    logw_to_bn,
    state_dtypes,
    states_to_bnd,
    uniforms_shape,
)

__all__ = [
    "em_step",
    "kernel_logpdf",
    "normalize",
    "resample",
    "adaptive_resample",
    "adaptive_resample_",
    "mala_accept",
    "replica_swap",
]

_CUDA_MAX_REFS = 8  # kMaxRefs in csrc/cuda/step.cu: the drift pointers go by value
_ops = torch.ops.pathsmc


def _like_states(t, name: str, ref: torch.Tensor, ref_shape) -> torch.Tensor:
    check_tensor(t, name, shape=ref_shape, dtypes=(ref.dtype,), device=ref.device)
    return states_to_bnd(t, name)


def _check_logw(logw, name: str, b: int, n: int, device) -> torch.Tensor:
    check_tensor(logw, name, dtypes=FLOAT_DTYPES, device=device)
    lw = logw_to_bn(logw, name)
    if tuple(lw.shape) != (b, n):
        raise ValueError(f"{name}: expected shape ({b}, {n}) or ({n},) to match the states, "
                         f"got {tuple(logw.shape)}")
    return lw


def _number(v, name: str) -> float:
    """A real number (not a string, bool or tensor), else a TypeError naming the argument."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(v).__name__} {v!r}")
    return float(v)


def _recording(*tensors) -> bool:
    """True when autograd records a graph through any of ``tensors``."""
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)


def _scalar_or_rows(v, name: str, b: int, device, *, allow_zero: bool = False):
    """(scalar for the op, per-row float64 tensor or None) from a float or a (B,) tensor."""
    if not isinstance(v, torch.Tensor):
        return check_positive(_number(v, name), name, allow_zero=allow_zero), None
    check_tensor(v, name, device=device)
    if v.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name}: a per-row tensor is not differentiable; pass {name}.detach()")
    if v.dim() > 1 or v.numel() not in (1, b):
        raise ValueError(f"{name}: expected a float or a tensor of shape ({b},), "
                         f"got shape {tuple(v.shape)}")
    rows = v.to(torch.float64).reshape(-1).expand(b).contiguous()
    if v.device.type == "cpu" and not torch.compiler.is_compiling():
        ok = bool((rows >= 0).all()) if allow_zero else bool((rows > 0).all())
        if not ok or not bool(torch.isfinite(rows).all()):
            need = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"{name}: every entry must be finite and {need}")
    return 1.0, rows


def em_step(
    x: torch.Tensor,
    drift: torch.Tensor,
    logw: torch.Tensor | None = None,
    *,
    dt: float | torch.Tensor,
    sigma: float | torch.Tensor,
    ref_drifts: Sequence[torch.Tensor] | None = None,
    ref_coefs: Sequence[float] | None = None,
    fwd_coef: float = 0.0,
    fwd_linear: float = 0.0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One Euler–Maruyama step ``x' = x + drift·dt + σ√dt·ε`` with the path-RND weight.

    With ``logw`` given, returns ``logw + Δ`` where
    ``Δ = Σ_k c_k log N(x'; x + b_k dt, σ²dt) + c_f log N(x; x' + λ x' dt, σ²dt)
    − log N(x'; x + drift·dt, σ²dt)`` (``b_k`` = ``ref_drifts``, ``c_k`` = ``ref_coefs``,
    ``c_f`` = ``fwd_coef``, ``λ`` = ``fwd_linear``), summed over D in float64.
    Without ``logw`` it is a plain EM step and returns ``(x', None)``.

    Args:
        x: states ``(B, N, D)``, ``(N, D)`` or ``(B, N, *event)``; float32 or float64.
        drift: proposal drift, same shape and dtype as ``x``.
        logw: log-weights ``(B, N)`` or ``(N,)``, float32 or float64, or None.
        dt: step size h > 0 (time runs backwards: the step goes from t to t - h); a float or
            a per-row tensor ``(B,)`` (e.g. MALA step sizes adapted per problem).
        sigma: diffusion coefficient σ (> 0 when weights are tracked); a float or ``(B,)``.
        ref_drifts: reference/model drifts, each shaped like ``x`` (at most 8 on CUDA).
        ref_coefs: one coefficient per reference drift.
        fwd_coef: coefficient of the linear forward kernel.
        fwd_linear: λ of the forward drift f(y) = λ y.
        noise: explicit standard normals shaped like ``x`` (else drawn in-kernel).
        generator: torch.Generator seeding the in-kernel Philox stream.

    A +inf log-weight is an error on CPU; on CUDA it is not checked (that would cost a host
    sync) and comes back +inf, which :func:`normalize` then reports as log Ẑ = +inf. A
    particle whose state is or becomes non-finite (NaN / inf in ``x``, the drift or ``x'``)
    gets a NaN log-weight: it is dead (weight 0, never resampled) and the drivers count it in
    ``SMCResult.dead_particles``.
    """
    check_tensor(x, "x", dtypes=state_dtypes(x))
    x3 = states_to_bnd(x, "x")
    b, n, _ = x3.shape
    d3 = _like_states(drift, "drift", x, x.shape)
    dt, row_dt = _scalar_or_rows(dt, "dt", b, x.device)
    sigma, row_sigma = _scalar_or_rows(sigma, "sigma", b, x.device, allow_zero=logw is None)
    refs = list(ref_drifts or [])
    coefs = [float(c) for c in (ref_coefs or [])]
    if len(refs) != len(coefs):
        raise ValueError(f"ref_coefs: expected {len(refs)} coefficients (one per ref_drifts "
                         f"tensor), got {len(coefs)}")
    if x.device.type == "cuda" and len(refs) > _CUDA_MAX_REFS:
        raise ValueError(f"ref_drifts: at most {_CUDA_MAX_REFS} reference drifts on CUDA, got "
                         f"{len(refs)} (sum drifts that share a coefficient first)")
    refs = [_like_states(r, f"ref_drifts[{i}]", x, x.shape) for i, r in enumerate(refs)]
    lw = None
    if logw is not None:
        lw = _check_logw(logw, "logw", b, n, x.device)  # +inf is rejected by the CPU kernel
    elif refs or fwd_coef != 0.0:
        raise ValueError("logw: ref_drifts/fwd_coef were given but logw is None; pass the "
                         "log-weights to accumulate the step weight into")
    nz = None if noise is None else _like_states(noise, "noise", x, x.shape)
    if nz is None and _recording(x, drift, logw, *refs):
        # The backward needs the exact ε: draw it with the same Philox stream the step would
        # use (a plain step from 0 with zero drift, h = σ = 1 returns ε) and pass it in.
        zero = torch.zeros_like(x3)
        nz = _ops.em_step(zero, zero, None, 1.0, 1.0, [], [], 0.0, 0.0, None, generator,
                          None, None)[0]
    x_new, lw_new = _ops.em_step(x3, d3, lw, dt, sigma, refs, coefs, float(fwd_coef),
                                 float(fwd_linear), nz, generator, row_dt, row_sigma)
    if x.dim() != 3:
        x_new = x_new.view(x.shape)
    if logw is None:
        return x_new, None
    return x_new, (lw_new if logw.dim() == 2 else lw_new.view(logw.shape))


def kernel_logpdf(
    y: torch.Tensor,
    base: torch.Tensor,
    drift: torch.Tensor | None = None,
    *,
    dt: float,
    sigma: float,
    logw: torch.Tensor,
    coef: float = 1.0,
    linear: float = 0.0,
) -> torch.Tensor:
    """``logw + coef · log N(y; base + (drift + linear·base)·dt, σ²dt·I)``.

    For backward kernels whose drift is only known at the new point (MALA, learned backward
    drifts): one pass over ``y``, ``base`` and ``drift``, summing over D in float64.
    """
    check_tensor(y, "y", dtypes=state_dtypes(y))
    y3 = states_to_bnd(y, "y")
    b, n, _ = y3.shape
    base3 = _like_states(base, "base", y, y.shape)
    dr3 = None if drift is None else _like_states(drift, "drift", y, y.shape)
    dt = check_positive(_number(dt, "dt"), "dt")
    sigma = check_positive(_number(sigma, "sigma"), "sigma")
    lw = _check_logw(logw, "logw", b, n, y.device)
    out = _ops.kernel_logpdf(y3, base3, dr3, dt, sigma, lw, float(coef), float(linear))
    return out.view(logw.shape)


def normalize(logw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise ``(log normalized weights, log mean weight, ESS)``.

    ``log mean weight = logsumexp(logw) − log N`` is the row's log Ẑ increment;
    ``ESS = 1 / Σ w²`` of the normalized weights, in [1, N] (0 for an all-dead row).
    """
    check_tensor(logw, "logw", dtypes=FLOAT_DTYPES)
    lw = logw_to_bn(logw)
    if lw.shape[1] == 0:
        raise ValueError("logw: empty population (N = 0)")
    lwn, log_mean, ess = _ops.normalize(lw)  # the CPU kernel rejects +inf itself
    if logw.dim() == 1:
        return lwn[0], log_mean[0], ess[0]
    return lwn, log_mean, ess


def _check_resample_args(logw, scheme, m, uniforms, name="logw"):
    check_scheme(scheme)
    check_tensor(logw, name, dtypes=FLOAT_DTYPES)
    lw = logw_to_bn(logw, name)
    b, n = lw.shape
    if n == 0:
        raise ValueError(f"{name}: empty population (N = 0)")
    u = None
    if uniforms is not None:
        shape = uniforms_shape(scheme, b, m)
        given = shape if logw.dim() == 2 else shape[1:]
        check_uniforms(uniforms, "uniforms", given, logw.device)
        u = uniforms.reshape(shape)
    return lw, u


def resample(
    logw: torch.Tensor,
    scheme: str = "systematic",
    num_samples: int | None = None,
    uniforms: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Ancestor indices ``(B, M)`` (int64), M = ``num_samples`` (default N).

    ``a_i`` is the first j whose cumulative normalized weight exceeds the i-th position:
    systematic ``(i + u_b)/M`` (uniforms ``(B,)``), stratified ``(i + u_bi)/M`` (``(B, M)``),
    multinomial ``u_bi`` (``(B, M)``); residual keeps ``floor(M w_j)`` copies of each j and
    draws the rest multinomially from the remainders using the first uniforms of each row.
    Systematic and stratified are O(N + M). Dead rows return ``arange(M) % N``.
    With in-kernel uniforms, multinomial draws (and residual's remainder draws) come out
    sorted on CPU (drawn as sorted positions) and in draw order on CUDA: the same law, a
    different order; with explicit ``uniforms`` both keep the uniforms' order.
    """
    check_tensor(logw, "logw", dtypes=FLOAT_DTYPES)
    n = logw_to_bn(logw).shape[1]
    if n == 0:
        raise ValueError("logw: empty population (N = 0)")
    m = n if num_samples is None else int(num_samples)
    if m <= 0:
        raise ValueError(f"num_samples: expected a positive count, got {num_samples}")
    lw, u = _check_resample_args(logw, scheme, m, uniforms)
    anc = _ops.resample(lw, scheme, m, u, generator)
    return anc[0] if logw.dim() == 1 else anc


def _adaptive_args(states, logw, threshold, scheme, uniforms, *, in_place: bool = False):
    """Checks of adaptive_resample(_): ``(threshold, states as (B, N, ...), logw (B, N),
    uniforms, squeeze)``; ``in_place`` also asks for contiguous states without grad."""
    threshold = float(threshold)
    if not threshold >= 0:
        raise ValueError(f"threshold: expected a float >= 0, got {threshold}")
    if logw.dim() not in (1, 2):
        raise ValueError(f"logw: expected shape (N,) or (B, N), got {tuple(logw.shape)}")
    lw, u = _check_resample_args(logw, scheme, logw.shape[-1], uniforms)
    b, n = lw.shape
    squeeze = logw.dim() == 1
    st = []
    for i, s in enumerate(states):
        check_tensor(s, f"states[{i}]", dtypes=None, device=logw.device)
        if in_place and s.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"states[{i}]: requires grad; in-place resampling is not "
                             "differentiable (use pathsmc.ops.adaptive_resample)")
        if in_place and not s.is_contiguous():
            raise ValueError(f"states[{i}]: must be contiguous to be gathered in place "
                             f"(shape {tuple(s.shape)}, strides {s.stride()})")
        s2 = s.unsqueeze(0) if squeeze else s
        if s2.dim() < 2 or tuple(s2.shape[:2]) != (b, n):
            want = f"({n}, ...)" if squeeze else f"({b}, {n}, ...)"
            raise ValueError(f"states[{i}]: expected shape {want} to match logw, "
                             f"got {tuple(s.shape)}")
        st.append(s2)
    return threshold, st, lw, u, squeeze


def adaptive_resample(
    states: Sequence[torch.Tensor],
    logw: torch.Tensor,
    threshold: float = 0.5,
    scheme: str = "systematic",
    uniforms: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resample the rows whose ESS < ``threshold``·N, without a host sync.

    Resampled rows gather every tensor in ``states`` (each ``(B, N, ...)`` of any dtype) by
    the ancestors and reset their log-weights to the row's log Ẑ (``logsumexp − log N``);
    other rows (and all-dead rows) keep states and weights and get identity ancestors.
    ``threshold >= 1`` resamples every live row.

    Returns ``(states_out, logw_out, ancestors (B, N) int64, resampled (B,) bool)``.
    """
    threshold, st, lw, u, squeeze = _adaptive_args(states, logw, threshold, scheme, uniforms)
    out, lw_out, anc, mask = _ops.adaptive_resample(st, lw, threshold, scheme, u, generator)
    if squeeze:
        return [o[0] for o in out], lw_out[0], anc[0], mask[0]
    return list(out), lw_out, anc, mask


def adaptive_resample_(
    states: Sequence[torch.Tensor],
    logw: torch.Tensor,
    threshold: float = 0.5,
    scheme: str = "systematic",
    uniforms: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`adaptive_resample` gathering every state in place (same decision, ancestors and
    random stream: the states end up equal to its outputs).

    For large states such as a language model's KV cache: the out-of-place op holds a second
    copy of every state until the caller drops the first; this one needs one extra row of one
    state (CPU) or one extra state (CUDA). Rows that are not resampled are not touched. States
    must be contiguous ``(B, N, ...)`` tensors (views of a larger contiguous tensor are fine)
    and cannot require grad (use :func:`adaptive_resample` to differentiate).

    Returns ``(logw_out, ancestors (B, N) int64, resampled (B,) bool)``.
    """
    threshold, st, lw, u, squeeze = _adaptive_args(states, logw, threshold, scheme, uniforms,
                                                   in_place=True)
    lw_out, anc, mask = _ops.adaptive_resample_(st, lw, threshold, scheme, u, generator)
    if squeeze:
        return lw_out[0], anc[0], mask[0]
    return lw_out, anc, mask


def mala_accept(
    x: torch.Tensor,
    x_prop: torch.Tensor,
    logp: torch.Tensor,
    logp_prop: torch.Tensor,
    grad: torch.Tensor,
    grad_prop: torch.Tensor,
    step: float | torch.Tensor,
    uniforms: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Metropolis–Hastings accept/reject of a MALA proposal.

    q(y|x) = N(y; x + step·∇log p(x), 2·step·I); accept where
    ``log u < log p(x') − log p(x) + log q(x|x') − log q(x'|x)`` (NaN: reject).
    ``step`` is a float or a per-row tensor ``(B,)``.
    Returns ``(x_out, logp_out, grad_out, accepted (B, N) bool)``.
    """
    check_tensor(x, "x", dtypes=state_dtypes(x))
    x3 = states_to_bnd(x, "x")
    b, n, _ = x3.shape
    xp3 = _like_states(x_prop, "x_prop", x, x.shape)
    g3 = _like_states(grad, "grad", x, x.shape)
    gp3 = _like_states(grad_prop, "grad_prop", x, x.shape)
    lp = _check_logw(logp, "logp", b, n, x.device)
    check_tensor(logp_prop, "logp_prop", shape=tuple(logp.shape), dtypes=(logp.dtype,),
                 device=x.device)
    lpp = logw_to_bn(logp_prop, "logp_prop")
    step_value, st = _scalar_or_rows(step, "step", b, x.device)
    if st is None:
        st = torch.full((b,), step_value, dtype=torch.float64, device=x.device)
    u = None
    if uniforms is not None:
        check_uniforms(uniforms, "uniforms", tuple(logp.shape), x.device)
        u = logw_to_bn(uniforms, "uniforms")
    xo, lpo, go, acc = _ops.mala_accept(x3, xp3, lp, lpp, g3, gp3, st, u, generator)
    return xo.view(x.shape), lpo.view(logp.shape), go.view(x.shape), acc.view(logp.shape)


def replica_swap(
    states: Sequence[torch.Tensor],
    log_ratio: torch.Tensor,
    parity: int,
    uniforms: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Swap adjacent levels (k, k+1) with k ≡ ``parity`` (mod 2).

    ``states``: tensors ``(K, C, ...)`` of any dtype (K levels, C chains); ``log_ratio``:
    ``(K-1, C)`` log acceptance ratios; a pair swaps where ``log u < log_ratio[k]``.
    Returns ``(states_out, accepted (K-1, C) bool, perm (K, C) int64)`` with
    ``states_out[k, c] = states[perm[k, c], c]``.
    """
    check_tensor(log_ratio, "log_ratio", ndim=2)
    km1, c = log_ratio.shape
    if km1 < 1 or c < 1:
        raise ValueError(f"log_ratio: expected shape (K-1, C) with K >= 2 and C >= 1, "
                         f"got {tuple(log_ratio.shape)}")
    if int(parity) not in (0, 1):
        raise ValueError(f"parity: expected 0 or 1, got {parity}")
    if len(states) == 0:
        raise ValueError("states: expected at least one tensor (K, C, ...)")
    for i, s in enumerate(states):
        check_tensor(s, f"states[{i}]", dtypes=None, device=log_ratio.device)
        if s.dim() < 2 or tuple(s.shape[:2]) != (km1 + 1, c):
            raise ValueError(f"states[{i}]: expected shape ({km1 + 1}, {c}, ...) to match "
                             f"log_ratio, got {tuple(s.shape)}")
    if uniforms is not None:
        check_uniforms(uniforms, "uniforms", (km1, c), log_ratio.device)
    out, acc, perm = _ops.replica_swap(list(states), log_ratio, int(parity), uniforms, generator)
    return list(out), acc, perm


# ---- fake (meta) implementations: shapes only, for torch.compile / FakeTensor tracing ----

@torch.library.register_fake("pathsmc::em_step")
def _em_step_fake(x, drift, logw, dt, sigma, ref_drifts, ref_coefs, fwd_coef, fwd_linear,
                  noise, generator, row_dt=None, row_sigma=None):
    lw = x.new_empty((0,), dtype=torch.float64) if logw is None else torch.empty_like(logw)
    return torch.empty_like(x), lw


@torch.library.register_fake("pathsmc::kernel_logpdf")
def _kernel_logpdf_fake(y, base, drift, dt, sigma, logw, coef, linear):
    return torch.empty_like(logw)


@torch.library.register_fake("pathsmc::em_step_backward")
def _em_step_backward_fake(grad_x_new, grad_logw, x, drift, noise, x_new, dt, sigma, ref_drifts,
                           ref_coefs, fwd_coef, fwd_linear, output_mask, row_dt=None,
                           row_sigma=None):
    def out(need):
        return torch.empty_like(x) if need else x.new_empty((0,))

    refs = [torch.empty_like(x) for _ in ref_drifts] if output_mask[2] else []
    return out(output_mask[0]), out(output_mask[1]), refs, out(output_mask[3])


@torch.library.register_fake("pathsmc::kernel_logpdf_backward")
def _kernel_logpdf_backward_fake(grad, y, base, drift, dt, sigma, coef, linear, output_mask):
    def out(need):
        return torch.empty_like(y) if need else y.new_empty((0,))

    return out(output_mask[0]), out(output_mask[1]), out(output_mask[2] and drift is not None)


@torch.library.register_fake("pathsmc::normalize")
def _normalize_fake(logw):
    b = logw.shape[0]
    return torch.empty_like(logw), logw.new_empty((b,)), logw.new_empty((b,))


@torch.library.register_fake("pathsmc::resample")
def _resample_fake(logw, scheme, num_samples, uniforms, generator):
    return logw.new_empty((logw.shape[0], num_samples), dtype=torch.int64)


@torch.library.register_fake("pathsmc::adaptive_resample")
def _adaptive_resample_fake(states, logw, threshold, scheme, uniforms, generator):
    b, n = logw.shape
    return (
        [torch.empty_like(s) for s in states],
        torch.empty_like(logw),
        logw.new_empty((b, n), dtype=torch.int64),
        logw.new_empty((b,), dtype=torch.bool),
    )


@torch.library.register_fake("pathsmc::adaptive_resample_")
def _adaptive_resample_inplace_fake(states, logw, threshold, scheme, uniforms, generator):
    b, n = logw.shape
    return (torch.empty_like(logw), logw.new_empty((b, n), dtype=torch.int64),
            logw.new_empty((b,), dtype=torch.bool))


@torch.library.register_fake("pathsmc::mala_accept")
def _mala_accept_fake(x, x_prop, logp, logp_prop, grad, grad_prop, step, uniforms, generator):
    return (torch.empty_like(x), torch.empty_like(logp), torch.empty_like(grad),
            logp.new_empty(logp.shape, dtype=torch.bool))


@torch.library.register_fake("pathsmc::replica_swap")
def _replica_swap_fake(states, log_ratio, parity, uniforms, generator):
    km1, c = log_ratio.shape
    return (
        [torch.empty_like(s) for s in states],
        log_ratio.new_empty((km1, c), dtype=torch.bool),
        log_ratio.new_empty((km1 + 1, c), dtype=torch.int64),
    )


_autograd.register()
