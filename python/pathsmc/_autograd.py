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
- The backward passes of ``em_step`` and ``kernel_logpdf`` are the fused ops
  ``pathsmc::em_step_backward`` / ``pathsmc::kernel_logpdf_backward`` (CPU and CUDA kernels, one
  pass over the elements). Their PyTorch twins :func:`em_step_backward_reference` and
  :func:`kernel_logpdf_backward_reference` compute the same formulas; the fused ops are
  differentiable through them (their registered backward is the ``torch.func.vjp`` of the twin),
  which gives the double backward of ``em_step`` and ``kernel_logpdf``.
- ``normalize``: all three outputs w.r.t. ``logw`` (dead particles get zero gradient).
- ``adaptive_resample``: the gathered states carry gradient to the states they were copied from
  (a scatter-add by the ancestors); the reset weight ``log Ẑ`` of a resampled row carries the
  softmax of the row; the ancestor indices and the decision to resample are not differentiated
  (piecewise constant: the usual stop-gradient through resampling).
- ``mala_accept`` and ``replica_swap``: outputs are selections of inputs, so gradient flows to the
  input each output was taken from; the accept/swap decisions (``step``, ``log_ratio``,
  ``uniforms``) are piecewise constant and get no gradient.
- ``resample``: its only output is integer ancestors; nothing to differentiate.
- ``adaptive_resample_`` (in place): not differentiable; it raises when a state or ``logw``
  requires grad (with grad mode on).
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
#
# The first-order backward is the fused op ``pathsmc::em_step_backward`` (CPU and CUDA kernels,
# one pass over the elements). Its PyTorch twin :func:`em_step_backward_reference` is the
# reference of the tests and gives the op its own backward (the double backward of em_step):
# the backward of ``em_step_backward`` re-runs the twin under autograd and differentiates it.

def _em_step_setup(ctx, inputs, output):
    (x, drift, logw, dt, sigma, refs, coefs, fwd_coef, fwd_linear, noise, _gen, row_dt,
     row_sigma) = inputs
    ctx.scalars = (dt, sigma, list(coefs), fwd_coef, fwd_linear)
    ctx.has_logw, ctx.has_noise, ctx.n_refs = logw is not None, noise is not None, len(refs)
    _no_grad_rows(row_dt=row_dt, row_sigma=row_sigma)
    ctx.save_for_backward(x, drift, noise, output[0], row_dt, row_sigma, *refs)


def _needs(ctx, i: int):
    """``needs_input_grad`` of input ``i`` (a list for a tensor list); inputs dropped by the
    dispatcher (trailing defaults) need none."""
    need = ctx.needs_input_grad
    return need[i] if i < len(need) else False


def em_step_backward_reference(grad_x_new, grad_logw, x, drift, noise, x_new, dt, sigma,
                               ref_drifts, ref_coefs, fwd_coef, fwd_linear, output_mask,
                               row_dt=None, row_sigma=None):
    """PyTorch twin of ``torch.ops.pathsmc.em_step_backward`` (same arguments).

    Returns ``(g_x, g_drift, g_refs, g_noise)``: gradients of ``Σ grad_x_new·x' + Σ
    grad_logw·logw'`` of em_step with respect to x, drift, each reference drift and the noise
    (held fixed; recovered from x' in float64 when ``noise`` is None). An output masked out by
    ``output_mask`` (x, drift, refs, noise) is None (``g_refs`` a list of None), and so is one
    without any contribution (the op returns zeros there). Per-element terms in the states'
    dtype; differentiable (the double backward of em_step runs through it).
    """
    dt, sigma, coefs, fwd_coef, lam = dt, sigma, list(ref_coefs), fwd_coef, fwd_linear
    refs = list(ref_drifts)
    f = x.dtype
    b = x.shape[0]
    need_x, need_a, need_r, need_noise = (bool(m) for m in output_mask)
    if row_dt is None and row_sigma is None:
        h, s = dt, sigma * math.sqrt(dt)
    else:
        h64 = _rows(row_dt, dt, b)
        s64 = _rows(row_sigma, sigma, b) * (h64.sqrt() if isinstance(h64, torch.Tensor)
                                            else math.sqrt(h64))
        h = h64.to(f) if isinstance(h64, torch.Tensor) else h64
        s = s64.to(f) if isinstance(s64, torch.Tensor) else s64
    h_s = h / s
    gx = grad_x_new
    gw = None if grad_logw is None else grad_logw.to(f).unsqueeze(-1)
    g_refs: list[torch.Tensor | None] = [None] * len(refs)
    w = None  # gw · (Σ_k c_k z_k + c_f (1 + λh) z_f): the weight's pull on drift and noise
    g_x_fwd = None
    if gw is not None:
        if noise is not None:
            eps = noise
        else:  # drawn in the kernel: ε = (x' − x − a h)/s, recovered in float64
            f64 = torch.float64
            h64_ = h.to(f64) if isinstance(h, torch.Tensor) else h
            s64_ = s.to(f64) if isinstance(s, torch.Tensor) else s
            eps = ((x_new.to(f64) - x.to(f64) - drift.to(f64) * h64_) / s64_).to(f)
        for k, (bk, ck) in enumerate(zip(refs, coefs, strict=True)):
            gz = gw * ((drift - bk) * h_s + eps)  # log N(x'; x + b_k h) = -½|z_k|²
            if need_r:
                g_refs[k] = gz * (ck * h_s)
            w = gz * ck if w is None else torch.add(w, gz, alpha=ck)
        if fwd_coef != 0.0:
            gz = gw * ((drift + lam * x_new) * h_s + eps)  # log N(x; x' + λx'h) = -½|z_f|²
            wf = gz * (fwd_coef * (1.0 + lam * h))
            w = wf if w is None else w + wf
            if need_x:
                g_x_fwd = gz * (-fwd_coef * lam * h_s)
    g_x = g_a = g_noise = None
    if need_x:
        g_x = gx if g_x_fwd is None else (g_x_fwd if gx is None else gx + g_x_fwd)
    if need_a:
        if gx is not None:
            g_a = gx * h if w is None else gx * h - w * h_s
        elif w is not None:
            g_a = w * -h_s
    if need_noise:
        parts = [t for t in (None if gx is None else gx * s,
                             None if gw is None else gw * eps - (0.0 if w is None else w))
                 if t is not None]
        g_noise = parts[0] + parts[1] if len(parts) == 2 else (parts[0] if parts else None)
    return g_x, g_a, g_refs, g_noise


def _em_step_backward(ctx, g_xnew, g_logw):
    x, drift, noise, x_new, row_dt, row_sigma, *refs = ctx.saved_tensors
    dt, sigma, coefs, fwd_coef, lam = ctx.scalars
    need_x, need_a = bool(_needs(ctx, 0)), bool(_needs(ctx, 1))
    need_refs = list(_needs(ctx, 5)) or [False] * len(refs)
    need_noise = ctx.has_noise and bool(_needs(ctx, 9))
    mask = [need_x, need_a, any(need_refs), need_noise]
    # the weight's gradient reaches the states only through the kernels and the noise
    gw = g_logw if (ctx.has_logw and g_logw is not None
                    and (ctx.n_refs or fwd_coef != 0.0 or need_noise)) else None
    g_x = g_a = g_noise = None
    g_refs: list[torch.Tensor | None] = [None] * ctx.n_refs
    if any(mask) and (g_xnew is not None or gw is not None):
        o_x, o_a, o_refs, o_noise = torch.ops.pathsmc.em_step_backward(
            g_xnew, gw, x, drift, noise, x_new, dt, sigma, refs, coefs, fwd_coef, lam, mask,
            row_dt, row_sigma)
        g_x = o_x if need_x else None
        g_a = o_a if need_a else None
        g_noise = o_noise if need_noise else None
        if mask[2]:
            g_refs = [g if n else None for g, n in zip(o_refs, need_refs, strict=True)]
    g_lw = g_logw if ctx.has_logw else None
    # an empty float list reads as an empty tensor list to autograd: mirror it
    g_coefs = [] if not coefs else None
    grads = (g_x, g_a, g_lw, None, None, g_refs, g_coefs, None, None, g_noise, None, None, None)
    # the dispatcher drops trailing arguments equal to their defaults (row_dt/row_sigma None)
    # from the inputs autograd sees; return one gradient per input it saw
    return grads[:len(ctx.needs_input_grad)]


def _vjp_through(reference, args, wrt: dict, out_grads):
    """Backward of a fused backward op: the vector-Jacobian product of its PyTorch twin
    ``reference(*args)`` with the cotangents ``out_grads`` (one per flat output of the twin),
    with respect to the inputs ``wrt`` ({input index: tensor or list of tensors (None
    entries skipped)}, only those that need a gradient). ``torch.func.vjp`` takes partial
    derivatives (x' is an input of its own even where it was computed from x) and its result
    stays differentiable under autograd. Returns {index: gradient (or list)}."""
    flat_in, where = [], []
    for i, t in wrt.items():
        items = t if isinstance(t, list) else [t]
        for j, v in enumerate(items):
            if v is not None:
                flat_in.append(v)
                where.append((i, j if isinstance(t, list) else None))
    if not flat_in:
        return {}

    def f(*flat):
        a = list(args)
        for (i, j), v in zip(where, flat, strict=True):
            if j is None:
                a[i] = v
            else:
                a[i] = list(a[i])
                a[i][j] = v
        outs = []
        for o in reference(*a):
            outs.extend(o if isinstance(o, list) else [o])
        # outputs without a contribution (None) stand in as zero scalars
        return tuple(flat[0].new_zeros(()) if o is None else o for o in outs)

    outs, vjp_fn = torch.func.vjp(f, *flat_in)
    cots = tuple(g if g is not None and g.shape == o.shape else torch.zeros_like(o)
                 for o, g in zip(outs, out_grads, strict=True))
    grads = vjp_fn(cots)
    res: dict = {}
    for (i, j), g in zip(where, grads, strict=True):
        if j is None:
            res[i] = g
        else:
            res.setdefault(i, [None] * len(wrt[i]))[j] = g
    return res


def _em_step_bwd_setup(ctx, inputs, output):
    (g_xnew, g_logw, x, drift, noise, x_new, dt, sigma, refs, coefs, fwd_coef, lam, mask,
     *rows) = inputs
    row_dt, row_sigma = (list(rows) + [None, None])[:2]
    ctx.scalars = (dt, sigma, list(coefs), fwd_coef, lam, list(mask))
    ctx.n_refs = len(refs)
    ctx.save_for_backward(g_xnew, g_logw, x, drift, noise, x_new, row_dt, row_sigma, *refs)


def _em_step_bwd_backward(ctx, gg_x, gg_a, gg_refs, gg_noise):
    g_xnew, g_logw, x, drift, noise, x_new, row_dt, row_sigma, *refs = ctx.saved_tensors
    dt, sigma, coefs, fwd_coef, lam, mask = ctx.scalars
    tensors = {0: g_xnew, 1: g_logw, 2: x, 3: drift, 4: noise, 5: x_new}
    wrt: dict = {i: t for i, t in tensors.items() if t is not None and _needs(ctx, i)}
    need_refs = list(_needs(ctx, 8)) or [False] * ctx.n_refs
    if any(need_refs):
        wrt[8] = [r if n else None for r, n in zip(refs, need_refs, strict=True)]
    gg_refs = list(gg_refs or [])
    gg_refs += [None] * (ctx.n_refs - len(gg_refs))
    args = (g_xnew, g_logw, x, drift, noise, x_new, dt, sigma, refs, coefs, fwd_coef, lam, mask,
            row_dt, row_sigma)
    res = _vjp_through(em_step_backward_reference, args, wrt,
                       [gg_x, gg_a, *gg_refs, gg_noise])
    grads = [res.get(i) for i in range(6)] + [None, None, res.get(8, [None] * ctx.n_refs)]
    grads += [[] if not coefs else None, None, None, None, None, None]
    return tuple(grads[:len(ctx.needs_input_grad)])


# ---- kernel_logpdf ------------------------------------------------------------------------

def _kernel_logpdf_setup(ctx, inputs, output):
    y, base, drift, dt, sigma, _logw, coef, linear = inputs
    ctx.scalars = (dt, sigma, coef, linear)
    ctx.has_drift = drift is not None
    ctx.save_for_backward(y, base, drift)


def kernel_logpdf_backward_reference(grad, y, base, drift, dt, sigma, coef, linear,
                                     output_mask):
    """PyTorch twin of ``torch.ops.pathsmc.kernel_logpdf_backward`` (same arguments).

    Returns ``(g_y, g_base, g_drift)`` of ``Σ grad·out`` for ``out = kernel_logpdf(...)``; an
    output masked out (or ``g_drift`` without a drift) is None. In the states' dtype.
    """
    lam = linear
    r = y - base * (1.0 + lam * dt)  # = s z, z = (y − base − (drift + λ base) dt)/s
    if drift is not None:
        r = torch.add(r, drift, alpha=-dt)
    gz = (grad.to(y.dtype).unsqueeze(-1) * (-coef / (sigma * sigma * dt))) * r  # d/dy
    g_base = gz * -(1.0 + lam * dt) if output_mask[1] else None
    g_drift = gz * -dt if drift is not None and output_mask[2] else None
    return (gz if output_mask[0] else None), g_base, g_drift


def _kernel_logpdf_backward(ctx, g_out):
    y, base, drift = ctx.saved_tensors
    dt, sigma, coef, lam = ctx.scalars
    need = ctx.needs_input_grad
    mask = [bool(need[0]), bool(need[1]), bool(need[2]) and drift is not None]
    g_y = g_base = g_drift = None
    if any(mask):
        o_y, o_base, o_drift = torch.ops.pathsmc.kernel_logpdf_backward(
            g_out, y, base, drift, dt, sigma, coef, lam, mask)
        g_y, g_base, g_drift = (o if m else None for o, m in
                                zip((o_y, o_base, o_drift), mask, strict=True))
    return (g_y, g_base, g_drift, None, None, g_out, None, None)


def _kernel_logpdf_bwd_setup(ctx, inputs, output):
    grad, y, base, drift, dt, sigma, coef, linear, mask = inputs
    ctx.scalars = (dt, sigma, coef, linear, list(mask))
    ctx.save_for_backward(grad, y, base, drift)


def _kernel_logpdf_bwd_backward(ctx, gg_y, gg_base, gg_drift):
    grad, y, base, drift = ctx.saved_tensors
    dt, sigma, coef, linear, mask = ctx.scalars
    tensors = {0: grad, 1: y, 2: base, 3: drift}
    wrt = {i: t for i, t in tensors.items() if t is not None and _needs(ctx, i)}
    res = _vjp_through(kernel_logpdf_backward_reference,
                       (grad, y, base, drift, dt, sigma, coef, linear, mask), wrt,
                       [gg_y, gg_base, gg_drift])
    return res.get(0), res.get(1), res.get(2), res.get(3), None, None, None, None, None


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


# ---- adaptive_resample_: in place, not differentiable ------------------------------------

_LIB = torch.library.Library("pathsmc", "IMPL")  # noqa: TOR901 (kept alive with the module)


def _inplace_resample_autograd(states, logw, threshold, scheme, uniforms, generator):
    """The Autograd kernel of ``pathsmc::adaptive_resample_``: refuses inputs that need grad
    (an in-place gather cannot pass a correct gradient), then runs the device kernel."""
    if torch.is_grad_enabled():
        for i, s in enumerate(states):
            if s.requires_grad:
                raise RuntimeError(f"pathsmc::adaptive_resample_: states[{i}] requires grad; "
                                   "the in-place gather is not differentiable (use "
                                   "pathsmc::adaptive_resample)")
        if logw.requires_grad:
            raise RuntimeError("pathsmc::adaptive_resample_: logw requires grad; the in-place "
                               "op is not differentiable (use pathsmc::adaptive_resample)")
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.pathsmc.adaptive_resample_(states, logw, threshold, scheme, uniforms,
                                                    generator)


def register() -> None:
    """Register every formula above on ``torch.ops.pathsmc.*`` (once, at import)."""
    _LIB.impl("adaptive_resample_", _inplace_resample_autograd, "Autograd")
    reg = torch.library.register_autograd
    reg("pathsmc::em_step", _em_step_backward, setup_context=_em_step_setup)
    reg("pathsmc::kernel_logpdf", _kernel_logpdf_backward, setup_context=_kernel_logpdf_setup)
    reg("pathsmc::em_step_backward", _em_step_bwd_backward, setup_context=_em_step_bwd_setup)
    reg("pathsmc::kernel_logpdf_backward", _kernel_logpdf_bwd_backward,
        setup_context=_kernel_logpdf_bwd_setup)
    reg("pathsmc::normalize", _normalize_backward, setup_context=_normalize_setup)
    reg("pathsmc::adaptive_resample", _adaptive_backward, setup_context=_adaptive_setup)
    reg("pathsmc::mala_accept", _mala_backward, setup_context=_mala_setup)
    reg("pathsmc::replica_swap", _swap_backward, setup_context=_swap_setup)
