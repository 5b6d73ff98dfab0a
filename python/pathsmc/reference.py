"""Pure-PyTorch references for every pathsmc op.

Same signatures and semantics as :mod:`pathsmc.ops`, written the plain way (Gaussian
log-densities, ``softmax`` + ``cumsum`` + ``searchsorted``, advanced indexing). They are the
ground truth for the op tests and the baseline for the benchmarks. Shapes follow docs/design.md:
states ``(B, N, D)``, log-weights ``(B, N)``. When no explicit noise/uniforms are passed, the
references draw them with ``torch.randn`` / ``torch.rand`` (a different stream than the
kernels' in-kernel Philox, so only the distributions agree).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from pathsmc._validate import RESAMPLING_SCHEMES, logw_to_bn, states_to_bnd, uniforms_shape

__all__ = [
    "em_step",
    "kernel_logpdf",
    "normalize",
    "resample",
    "adaptive_resample",
    "adaptive_resample_",
    "mala_accept",
    "replica_swap",
    "gaussian_logpdf",
]

_LOG_2PI = math.log(2.0 * math.pi)


def gaussian_logpdf(y: torch.Tensor, mean: torch.Tensor, std) -> torch.Tensor:
    """log N(y; mean, std² I), summed over the last dim in float64 (std: float or (B, 1, 1))."""
    z = (y - mean).double() / std
    d = y.shape[-1]
    log_std = torch.log(std).reshape(-1, 1) if isinstance(std, torch.Tensor) else math.log(std)
    return -0.5 * (z * z).sum(-1) - d * (log_std + 0.5 * _LOG_2PI)


def _per_row(v, b: int, name: str = "dt"):
    """A float stays; a (B,) tensor becomes (B, 1, 1) float64 for broadcasting."""
    if isinstance(v, torch.Tensor):
        return v.to(torch.float64).reshape(-1).expand(b).reshape(b, 1, 1)
    return _number(v, name)


def _number(v, name: str) -> float:
    """A real number (not a string, bool or tensor), else a TypeError naming the argument (the
    message of :mod:`pathsmc.ops`)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(v).__name__} {v!r}")
    return float(v)


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
    """One Euler–Maruyama step with the path-RND log-weight increment (docs/design.md)."""
    shape = x.shape
    x, drift = states_to_bnd(x, "x"), states_to_bnd(drift, "drift")
    ref_drifts = [states_to_bnd(r, "ref_drifts") for r in ref_drifts or ()]
    logw_shape = None if logw is None else logw.shape
    if noise is not None:
        noise = states_to_bnd(noise, "noise")
    if logw is not None:
        logw = logw_to_bn(logw)
    if noise is None:
        noise = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
    dt, sigma = _per_row(dt, x.shape[0], "dt"), _per_row(sigma, x.shape[0], "sigma")
    s = sigma * (dt.sqrt() if isinstance(dt, torch.Tensor) else math.sqrt(dt))
    if isinstance(s, torch.Tensor):
        dt_x, s_x = dt.to(x.dtype) if isinstance(dt, torch.Tensor) else dt, s.to(x.dtype)
    else:
        dt_x, s_x = dt, s
    mean = x + drift * dt_x
    x_new = mean + s_x * noise
    if logw is None:
        return x_new.reshape(shape), None
    delta = -gaussian_logpdf(x_new, mean, s)
    for b, c in zip(ref_drifts or (), ref_coefs or (), strict=True):
        delta = delta + c * gaussian_logpdf(x_new, x + b * dt_x, s)
    if fwd_coef != 0.0:
        delta = delta + fwd_coef * gaussian_logpdf(x, x_new + fwd_linear * x_new * dt_x, s)
    return x_new.reshape(shape), (logw.double() + delta).to(logw.dtype).reshape(logw_shape)


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
    """logw + coef · log N(y; base + (drift + linear·base)·dt, σ²dt I)."""
    dt, sigma = _number(dt, "dt"), _number(sigma, "sigma")
    y, base = states_to_bnd(y, "y"), states_to_bnd(base, "base")
    drift = None if drift is None else states_to_bnd(drift, "drift")
    step = linear * base if drift is None else drift + linear * base
    mean = base + step * dt
    lp = gaussian_logpdf(y, mean, sigma * math.sqrt(dt)).reshape(logw.shape)
    return (logw.double() + coef * lp).to(logw.dtype)


def _clean(logw: torch.Tensor) -> torch.Tensor:
    """NaN log-weights are dead particles: -inf."""
    return torch.nan_to_num(logw, nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def normalize(logw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise (log normalized weights, log mean weight = log Ẑ increment, ESS)."""
    if logw.dim() == 1:
        lwn, lm, ess = normalize(logw.unsqueeze(0))
        return lwn[0], lm[0], ess[0]
    lw = _clean(logw).double()
    n = lw.shape[-1]
    lse = torch.logsumexp(lw, -1, keepdim=True)
    dead = torch.isneginf(lse)
    lwn = torch.where(dead, -math.inf, lw - lse)
    w = lwn.exp()
    ess = torch.where(dead.squeeze(-1), 0.0, 1.0 / (w * w).sum(-1))
    log_mean = lse.squeeze(-1) - math.log(n)
    return lwn.to(logw.dtype), log_mean.to(logw.dtype), ess.to(logw.dtype)


def _inverse_cdf(cdf: torch.Tensor, pos: torch.Tensor, last_live: torch.Tensor) -> torch.Tensor:
    """First j with cdf[j] > pos (row-wise), never past the last live particle."""
    idx = torch.searchsorted(cdf.contiguous(), pos.contiguous(), right=True)
    return torch.minimum(idx, last_live.unsqueeze(-1))


def _draw_uniforms(shape, like: torch.Tensor, generator) -> torch.Tensor:
    return torch.rand(shape, dtype=torch.float64, device=like.device, generator=generator)


def resample(
    logw: torch.Tensor,
    scheme: str = "systematic",
    num_samples: int | None = None,
    uniforms: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Ancestor indices ``(B, M)`` (int64) by inverse CDF of the normalized weights.

    Dead rows (every weight NaN or -inf) return ``arange(M) % N``.
    """
    if scheme not in RESAMPLING_SCHEMES:
        raise ValueError(f"resample: unknown scheme {scheme!r}")
    if logw.dim() == 1:
        u = None if uniforms is None else uniforms.unsqueeze(0)
        return resample(logw.unsqueeze(0), scheme, num_samples, u, generator)[0]
    b, n = logw.shape
    m = n if num_samples is None else num_samples
    if uniforms is None:
        uniforms = _draw_uniforms(uniforms_shape(scheme, b, m), logw, generator)
    u = uniforms.double()
    lw = _clean(logw).double()
    w = torch.softmax(lw, -1)
    dead = torch.isneginf(lw.max(-1).values)
    w = torch.where(dead.unsqueeze(-1), 0.0, w)
    live = w > 0
    idx = torch.arange(n, device=logw.device)
    last_live = torch.where(live, idx, 0).max(-1).values
    ar = torch.arange(m, device=logw.device, dtype=torch.float64)
    if scheme == "systematic":
        anc = _inverse_cdf(torch.cumsum(w, -1), (ar + u.unsqueeze(-1)) / m, last_live)
    elif scheme == "stratified":
        anc = _inverse_cdf(torch.cumsum(w, -1), (ar + u) / m, last_live)
    elif scheme == "multinomial":
        anc = _inverse_cdf(torch.cumsum(w, -1), u, last_live)
    else:  # residual: floor(M w_j) copies, then multinomial on the remainders
        rows = []
        for r in range(b):
            mw = m * w[r]
            counts = torch.floor(mw)
            # Rounding can make the floors add up to more than M: keep the first M, as the
            # kernels do.
            det = torch.repeat_interleave(idx, counts.long())[:m]
            rest = m - det.numel()
            if rest > 0:
                resid = torch.cumsum(mw - counts, 0)
                resid = resid / resid[-1]
                extra = _inverse_cdf(resid[None], u[r, :rest][None], last_live[r : r + 1])[0]
                det = torch.cat([det, extra])
            rows.append(det)
        anc = torch.stack(rows)
    ident = (torch.arange(m, device=logw.device) % n).expand(b, m)
    return torch.where(dead.unsqueeze(-1), ident, anc)


def adaptive_resample(
    states: Sequence[torch.Tensor],
    logw: torch.Tensor,
    threshold: float = 0.5,
    scheme: str = "systematic",
    uniforms: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resample rows with ESS < threshold·N (threshold >= 1: every live row)."""
    if logw.dim() == 1:
        u = None if uniforms is None else uniforms.unsqueeze(0)
        out, lw, anc, mask = adaptive_resample(
            [s.unsqueeze(0) for s in states], logw.unsqueeze(0), threshold, scheme, u, generator
        )
        return [s[0] for s in out], lw[0], anc[0], mask[0]
    b, n = logw.shape
    _, log_mean, ess = normalize(logw)
    dead = torch.isneginf(log_mean)
    if threshold >= 1.0:
        mask = ~dead
    else:
        mask = (ess.double() < threshold * n) & ~dead
    anc = resample(logw, scheme, n, uniforms, generator)
    ident = torch.arange(n, device=logw.device).expand(b, n)
    anc = torch.where(mask.unsqueeze(-1), anc, ident)
    rows = torch.arange(b, device=logw.device).unsqueeze(-1)
    states_out = [s[rows, anc] for s in states]
    logw_out = torch.where(mask.unsqueeze(-1), log_mean.unsqueeze(-1).expand(b, n), logw)
    return states_out, logw_out, anc, mask


def adaptive_resample_(
    states: Sequence[torch.Tensor],
    logw: torch.Tensor,
    threshold: float = 0.5,
    scheme: str = "systematic",
    uniforms: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`adaptive_resample` writing the gathered states back into ``states``."""
    out, logw_out, anc, mask = adaptive_resample(states, logw, threshold, scheme, uniforms,
                                                 generator)
    for s, o in zip(states, out, strict=True):
        s.copy_(o)
    return logw_out, anc, mask


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
    """Metropolis–Hastings correction of a MALA proposal, q(y|x) = N(y; x + step·∇, 2·step·I)."""
    shape, lshape = x.shape, logp.shape
    x, x_prop = states_to_bnd(x, "x"), states_to_bnd(x_prop, "x_prop")
    grad, grad_prop = states_to_bnd(grad, "grad"), states_to_bnd(grad_prop, "grad_prop")
    logp, logp_prop = logw_to_bn(logp, "logp"), logw_to_bn(logp_prop, "logp_prop")
    if uniforms is not None:
        uniforms = logw_to_bn(uniforms, "uniforms")
    b, n = logp.shape
    if uniforms is None:
        uniforms = _draw_uniforms((b, n), logp, generator)
    h = torch.as_tensor(step, dtype=torch.float64, device=x.device).expand(b).reshape(b, 1)
    fwd = ((x_prop - x - h.unsqueeze(-1) * grad).double() ** 2).sum(-1) / (4 * h)
    bwd = ((x - x_prop - h.unsqueeze(-1) * grad_prop).double() ** 2).sum(-1) / (4 * h)
    log_alpha = logp_prop.double() - logp.double() - bwd + fwd
    accepted = torch.log(uniforms.double()) < log_alpha  # NaN compares False: rejected
    a3 = accepted.unsqueeze(-1)
    return (
        torch.where(a3, x_prop, x).reshape(shape),
        torch.where(accepted, logp_prop, logp).reshape(lshape),
        torch.where(a3, grad_prop, grad).reshape(shape),
        accepted.reshape(lshape),
    )


def replica_swap(
    states: Sequence[torch.Tensor],
    log_ratio: torch.Tensor,
    parity: int,
    uniforms: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Swap levels (k, k+1), k ≡ parity (mod 2), with probability min(1, exp(log_ratio[k]))."""
    km1, c = log_ratio.shape
    k = km1 + 1
    if uniforms is None:
        uniforms = _draw_uniforms((km1, c), log_ratio, generator)
    levels = torch.arange(km1, device=log_ratio.device).unsqueeze(-1)
    attempted = (levels % 2) == (parity % 2)
    accepted = attempted & (torch.log(uniforms.double()) < log_ratio.double())
    perm = torch.arange(k, device=log_ratio.device).unsqueeze(-1).expand(k, c).clone()
    up = torch.zeros(k, c, dtype=torch.bool, device=log_ratio.device)
    down = torch.zeros_like(up)
    up[:-1] = accepted  # level k takes level k+1's state
    down[1:] = accepted  # level k+1 takes level k's state
    perm = torch.where(up, perm + 1, torch.where(down, perm - 1, perm))
    cols = torch.arange(c, device=log_ratio.device).unsqueeze(0)
    states_out = [s[perm, cols] for s in states]
    return states_out, accepted, perm
