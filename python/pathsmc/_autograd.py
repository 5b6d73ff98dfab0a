"""Autograd formulas of ``torch.ops.pathsmc.*`` (``torch.library.register_autograd``).

What is differentiable (the same for the raw ops and the wrappers in :mod:`pathsmc.ops`):

- ``em_step``: ``x'`` w.r.t. ``x``, ``drift`` and ``noise`` (reparameterized: ``x' = x + a·h +
  s·ε`` with the noise held fixed); ``logw'`` w.r.t. ``x``, ``drift``, every reference drift,
  ``logw`` and ``noise``. Scalars (``dt``, ``sigma``, coefficients) are constants; per-row
  ``dt``/``sigma`` tensors are not differentiable (a ValueError at the forward if they require
  grad). When the noise was drawn in-kernel the backward recovers it as
  ``ε = (x' − x − a·h)/s`` (exact in float64; :func:`pathsmc.ops.em_step` passes the noise
  explicitly whenever a graph is being recorded, so its gradients never rely on that
  recovery).
- ``kernel_logpdf``: w.r.t. ``y``, ``base``, ``drift`` and ``logw`` (``dt``, ``sigma``, ``coef``,
  ``linear`` are constants).
- ``normalize``: all three outputs w.r.t. ``logw`` (dead particles get zero gradient).
- ``adaptive_resample``: the gathered states carry gradient to the states they were copied from
  (a scatter-add by the ancestors); the reset weight ``log Ẑ`` of a resampled row carries the
  softmax of the row; the ancestor indices and the decision to resample are not differentiated
  (piecewise constant: the usual stop-gradient through resampling).
- ``mala_accept`` and ``replica_swap``: outputs are selections of inputs, so gradient flows to the
  input each output was taken from; the accept/swap decisions (``step``, ``log_ratio``,
  ``uniforms``) are piecewise constant and get no gradient.
- ``resample``: its only output is integer ancestors; nothing to differentiate.
"""

from __future__ import annotations

import math

import torch


def _rows(v: torch.Tensor | None, scalar: float, b: int):
    """A per-row (B,) step quantity as (B, 1, 1) float64, or the scalar."""
    return scalar if v is None else v.detach().to(torch.float64).reshape(b, 1, 1)


def _no_grad_rows(**rows: torch.Tensor | None) -> None:
    """Per-row step sizes are constants of the backward: refuse them when they require grad
    (at the forward, before a graph is built)."""
    for name, v in rows.items():
        if v is not None and v.requires_grad:
            raise ValueError(f"{name}: a per-row step tensor of pathsmc::em_step is not "
                             f"differentiable, but it requires grad; pass {name}.detach()")


# ---- em_step ------------------------------------------------------------------------------

def _em_step_setup(ctx, inputs, output):
    (x, drift, logw, dt, sigma, refs, coefs, fwd_coef, fwd_linear, noise, _gen, row_dt,
     row_sigma) = inputs
    ctx.scalars = (dt, sigma, list(coefs), fwd_coef, fwd_linear)
    ctx.has_logw, ctx.has_noise, ctx.n_refs = logw is not None, noise is not None, len(refs)
    _no_grad_rows(row_dt=row_dt, row_sigma=row_sigma)
    ctx.save_for_backward(x, drift, noise, output[0], row_dt, row_sigma, *refs)


def _em_step_backward(ctx, g_xnew, g_logw):
    x, drift, noise, x_new, row_dt, row_sigma, *refs = ctx.saved_tensors
    dt, sigma, coefs, fwd_coef, lam, = ctx.scalars
    b = x.shape[0]
    h = _rows(row_dt, dt, b)
    sg = _rows(row_sigma, sigma, b)
    s = sg * (h.sqrt() if isinstance(h, torch.Tensor) else math.sqrt(h))
    f64 = torch.float64
    xd, ad = x.to(f64), drift.to(f64)
    eps = noise.to(f64) if noise is not None else (x_new.to(f64) - xd - ad * h) / s
    gx = torch.zeros_like(xd) if g_xnew is None else g_xnew.to(f64)
    g_x, g_a, g_eps = gx.clone(), gx * h, gx * s
    g_refs = [None] * ctx.n_refs
    g_lw = None
    if ctx.has_logw and g_logw is not None:
        gw = g_logw.to(f64).unsqueeze(-1)
        h_s = h / s
        g_eps = g_eps + gw * eps  # the proposal's +½|ε|²
        for k, (bk, ck) in enumerate(zip(refs, coefs, strict=True)):
            zk = (ad - bk.to(f64)) * h_s + eps  # -½ c_k |z_k|²
            g_a = g_a - gw * (ck * h_s) * zk
            g_eps = g_eps - gw * ck * zk
            g_refs[k] = (gw * (ck * h_s) * zk).to(bk.dtype)
        if fwd_coef != 0.0:
            zf = (ad + lam * x_new.to(f64)) * h_s + eps  # -½ c_f |z_f|², x' = x + a h + s ε
            g_x = g_x - gw * (fwd_coef * lam) * h_s * zf
            g_a = g_a - gw * fwd_coef * (1.0 + lam * h) * h_s * zf
            g_eps = g_eps - gw * fwd_coef * (1.0 + lam * h) * zf
        g_lw = g_logw
    elif ctx.has_logw:
        g_lw = None
    g_noise = g_eps.to(x.dtype) if ctx.has_noise else None
    # an empty float list reads as an empty tensor list to autograd: mirror it
    g_coefs = [] if not coefs else None
    grads = (g_x.to(x.dtype), g_a.to(drift.dtype), g_lw, None, None, g_refs, g_coefs,
             None, None, g_noise, None, None, None)
    # the dispatcher drops trailing arguments equal to their defaults (row_dt/row_sigma None)
    # from the inputs autograd sees; return one gradient per input it saw
    return grads[:len(ctx.needs_input_grad)]


# ---- kernel_logpdf ------------------------------------------------------------------------

def _kernel_logpdf_setup(ctx, inputs, output):
    y, base, drift, dt, sigma, _logw, coef, linear = inputs
    ctx.scalars = (dt, sigma, coef, linear)
    ctx.has_drift = drift is not None
    ctx.save_for_backward(y, base, drift)


def _kernel_logpdf_backward(ctx, g_out):
    y, base, drift = ctx.saved_tensors
    dt, sigma, coef, lam = ctx.scalars
    s = sigma * math.sqrt(dt)
    f64 = torch.float64
    dr = drift.to(f64) if drift is not None else 0.0
    z = (y.to(f64) - base.to(f64) - (dr + lam * base.to(f64)) * dt) / s
    gz = g_out.to(f64).unsqueeze(-1) * (-coef / s) * z  # d/dy of -½ coef |z|²
    g_drift = (-gz * dt).to(drift.dtype) if drift is not None else None
    return (gz.to(y.dtype), (-gz * (1.0 + lam * dt)).to(base.dtype), g_drift, None, None,
            g_out, None, None)


# ---- normalize ----------------------------------------------------------------------------

def _normalize_setup(ctx, inputs, output):
    ctx.save_for_backward(output[0], output[2])


def _normalize_backward(ctx, g_lwn, g_lm, g_ess):
    lwn, ess = ctx.saved_tensors
    f64 = torch.float64
    live = torch.isfinite(lwn)
    p = torch.where(live, lwn.to(f64), -math.inf).exp()
    g = torch.zeros_like(p)
    if g_lwn is not None:
        gl = torch.where(live, g_lwn.to(f64), 0.0)
        g = g + gl - p * gl.sum(-1, keepdim=True)
    if g_lm is not None:
        g = g + p * g_lm.to(f64).unsqueeze(-1)
    if g_ess is not None:
        s2 = (p * p).sum(-1, keepdim=True)
        e = ess.to(f64).unsqueeze(-1)
        g = g - g_ess.to(f64).unsqueeze(-1) * 2.0 * e * e * p * (p - s2)
    return torch.where(live, g, 0.0).to(lwn.dtype)


# ---- gathers: adaptive_resample, mala_accept, replica_swap --------------------------------

def _scatter_back(grad, index, dim: int, like: torch.Tensor):
    """Adjoint of ``out = like.gather(dim, index)`` broadcast over trailing dims."""
    if grad is None or not like.is_floating_point():
        return None
    idx = index.reshape(index.shape + (1,) * (like.dim() - index.dim())).expand_as(like)
    return torch.zeros_like(like).scatter_add_(dim, idx, grad)


def _adaptive_setup(ctx, inputs, output):
    states, logw = inputs[0], inputs[1]
    ctx.n_states = len(states)
    ctx.save_for_backward(logw, output[2], output[3], *states)


def _adaptive_backward(ctx, g_states, g_logw, _g_anc, _g_mask):
    logw, anc, mask, *states = ctx.saved_tensors
    g_st = [_scatter_back(g, anc, 1, s) for g, s in zip(g_states, states, strict=True)]
    g_lw = None
    if g_logw is not None:
        p = torch.softmax(torch.nan_to_num(logw.to(torch.float64), nan=-math.inf), -1)
        p = torch.nan_to_num(p, nan=0.0)  # all-dead rows (never resampled)
        reset = p * g_logw.to(torch.float64).sum(-1, keepdim=True)
        g_lw = torch.where(mask.unsqueeze(-1), reset, g_logw.to(torch.float64)).to(logw.dtype)
    return g_st, g_lw, None, None, None, None


def _mala_setup(ctx, inputs, output):
    ctx.save_for_backward(output[3])


def _mala_backward(ctx, g_x, g_lp, g_grad, _g_acc):
    (acc,) = ctx.saved_tensors
    acc3 = acc.unsqueeze(-1)

    def split(g, mask):
        if g is None:
            return None, None
        return torch.where(mask, 0.0, g), torch.where(mask, g, 0.0)

    gx, gxp = split(g_x, acc3)
    glp, glpp = split(g_lp, acc)
    gg, ggp = split(g_grad, acc3)
    return gx, gxp, glp, glpp, gg, ggp, None, None, None


def _swap_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2], *inputs[0])


def _swap_backward(ctx, g_states, _g_acc, _g_perm):
    perm, *states = ctx.saved_tensors
    return [_scatter_back(g, perm, 0, s) for g, s in zip(g_states, states, strict=True)], \
        None, None, None, None


def register() -> None:
    """Register every formula above on ``torch.ops.pathsmc.*`` (once, at import)."""
    reg = torch.library.register_autograd
    reg("pathsmc::em_step", _em_step_backward, setup_context=_em_step_setup)
    reg("pathsmc::kernel_logpdf", _kernel_logpdf_backward, setup_context=_kernel_logpdf_setup)
    reg("pathsmc::normalize", _normalize_backward, setup_context=_normalize_setup)
    reg("pathsmc::adaptive_resample", _adaptive_backward, setup_context=_adaptive_setup)
    reg("pathsmc::mala_accept", _mala_backward, setup_context=_mala_setup)
    reg("pathsmc::replica_swap", _swap_backward, setup_context=_swap_setup)
