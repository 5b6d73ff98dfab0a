"""The fused backward ops ``pathsmc::em_step_backward`` and ``pathsmc::kernel_logpdf_backward``.

- equal to their PyTorch twins in :mod:`pathsmc._autograd` (the formulas the backward used
  before it was fused) for random inputs: K = 0..3 reference drifts, with and without the
  forward kernel, scalar and per-row dt / sigma, explicit and in-kernel (recovered) noise,
  partial output masks, missing upstream gradients, and dead particles (NaN / -inf log-weights,
  a state that became inf), on every device (CUDA when available);
- the registered backward of em_step / kernel_logpdf runs the fused op;
- the ops are differentiable (their own backward re-runs the twin): gradcheck and
  gradgradcheck of the raw ops;
- ``torch.library.opcheck`` of both ops, with and without inputs that require grad.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.utils._python_dispatch import TorchDispatchMode

import pathsmc.ops as P
from pathsmc import _autograd as A

pytestmark = pytest.mark.usefixtures("one_thread")

F32, F64 = torch.float32, torch.float64
OPS = torch.ops.pathsmc
B, N, D = 3, 5, 7  # B·N·D = 105: several CPU chunks are not needed, odd sizes are
# (rtol, atol) of the fused op against its twin: float64 takes the same operations in the same
# order; float32 may round h/s (per-row) or 1 + λh once differently.
TOL = {F64: (1e-12, 1e-12), F32: (2e-6, 2e-6)}


def _rn(*shape, seed: int, dtype=F64, device: str = "cpu", grad: bool = False,
        scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = (scale * torch.randn(*shape, generator=g, dtype=F64)).to(dtype).to(device)
    return t.requires_grad_(grad)


def _steps(per_row: bool, device: str):
    if not per_row:
        return 0.1, 1.3, None, None
    return (1.0, 1.0, torch.tensor([0.1, 0.25, 0.04], dtype=F64, device=device),
            torch.tensor([1.3, 0.7, 2.0], dtype=F64, device=device))


def _em_args(k: int, fwd: bool, per_row: bool, explicit_noise: bool, dtype, device: str,
             dead: bool, seed: int = 0):
    """Forward em_step on random inputs, then the backward op's arguments (with random
    upstream gradients). ``dead``: NaN and -inf log-weights and one state that is inf."""
    x = _rn(B, N, D, seed=seed + 1, dtype=dtype, device=device)
    drift = _rn(B, N, D, seed=seed + 2, dtype=dtype, device=device)
    noise = _rn(B, N, D, seed=seed + 3, dtype=dtype, device=device)
    refs = [_rn(B, N, D, seed=seed + 10 + i, dtype=dtype, device=device) for i in range(k)]
    coefs = [0.6, 1.1, -0.4][:k]
    logw = _rn(B, N, seed=seed + 4, device=device)
    if dead:
        logw[0, 1], logw[1, 2] = math.nan, -math.inf
        x[2, 3, 4] = math.inf
    dt, sigma, row_dt, row_sigma = _steps(per_row, device)
    fc, lam = (0.7, -0.4) if fwd else (0.0, 0.0)
    x_new, lw_new = OPS.em_step(x, drift, logw, dt, sigma, refs, coefs, fc, lam, noise, None,
                                row_dt, row_sigma)
    g_x = _rn(B, N, D, seed=seed + 5, dtype=dtype, device=device)
    g_w = _rn(B, N, seed=seed + 6, device=device)
    if dead:
        g_w[0, 1] = 0.0  # a typical loss gives a dead particle a zero gradient ...
        g_w[1, 3] = math.nan  # ... but NaN must go through the same way in both
    return [g_x, g_w, x, drift, noise if explicit_noise else None, x_new, dt, sigma, refs,
            coefs, fc, lam, [True, True, True, True], row_dt, row_sigma], lw_new


def _assert_same(fused, ref, like: torch.Tensor, dtype) -> None:
    """Fused outputs against the twin's (None = zeros when the output was wanted)."""
    rtol, atol = TOL[dtype]
    for i, (a, r) in enumerate(zip(fused, ref, strict=True)):
        if isinstance(a, (list, tuple)):
            _assert_same(a, r, like, dtype)
            continue
        if r is None:
            r = torch.zeros_like(like) if a.numel() else a
        assert a.shape == r.shape and a.dtype == r.dtype, f"output {i}: {a.shape} {a.dtype}"
        torch.testing.assert_close(a, r, rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m, i=i: f"output {i}: {m}")


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("per_row", [False, True], ids=["scalar_dt", "per_row_dt"])
@pytest.mark.parametrize("fwd", [False, True], ids=["no_fwd", "fwd"])
@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_em_step_backward_equals_twin(device: str, k: int, fwd: bool, per_row: bool,
                                      dtype) -> None:
    for explicit_noise in (True, False):
        for dead in (False, True):
            args, _ = _em_args(k, fwd, per_row, explicit_noise, dtype, device, dead, seed=k)
            fused = OPS.em_step_backward(*args)
            ref = A.em_step_backward_reference(*args)
            _assert_same(fused, ref, args[2], dtype)
            if dead:  # the dead particles do reach the outputs (not a vacuous comparison)
                assert bool(fused[3].isnan().any())


@pytest.mark.parametrize("mask", [[True, False, False, False], [False, True, True, False],
                                  [False, False, False, True], [True, True, False, True]])
@pytest.mark.parametrize("missing", ["none", "grad_x_new", "grad_logw"])
def test_em_step_backward_masks_and_missing_grads(device: str, mask, missing: str) -> None:
    args, _ = _em_args(2, True, True, True, F64, device, dead=False, seed=7)
    args[12] = mask
    if missing != "none":
        args[0 if missing == "grad_x_new" else 1] = None
    fused = OPS.em_step_backward(*args)
    ref = A.em_step_backward_reference(*args)
    for i, m in enumerate(mask):
        out = fused[i]
        if i == 2:
            assert len(out) == (2 if m else 0)
        else:
            assert out.shape == ((B, N, D) if m else (0,))
    ref = [r if m else ([] if i == 2 else fused[i])
           for i, (r, m) in enumerate(zip(ref, mask, strict=True))]
    _assert_same(fused, ref, args[2], F64)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("has_drift", [True, False], ids=["drift", "no_drift"])
def test_kernel_logpdf_backward_equals_twin(device: str, has_drift: bool, dtype) -> None:
    y = _rn(B, N, D, seed=1, dtype=dtype, device=device)
    base = _rn(B, N, D, seed=2, dtype=dtype, device=device)
    drift = _rn(B, N, D, seed=3, dtype=dtype, device=device) if has_drift else None
    y[1, 2, 3] = math.inf
    grad = _rn(B, N, seed=4, device=device)
    grad[0, 0] = math.nan
    for mask in ([True, True, True], [False, True, False], [True, False, True]):
        for coef, lin in ((0.6, 0.4), (-1.0, 0.0)):
            args = (grad, y, base, drift, 0.1, 1.3, coef, lin, mask)
            fused = OPS.kernel_logpdf_backward(*args)
            ref = A.kernel_logpdf_backward_reference(*args)
            ref = [r if m and (i < 2 or has_drift) else fused[i]
                   for i, (r, m) in enumerate(zip(ref, mask, strict=True))]
            _assert_same(fused, ref, y, dtype)
            assert fused[2].numel() == (y.numel() if mask[2] and has_drift else 0)


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_registered_backward_runs_the_fused_ops() -> None:
    x, drift, ref = (_rn(B, N, D, seed=i, grad=True) for i in range(3))
    logw, noise = _rn(B, N, seed=4, grad=True), _rn(B, N, D, seed=5)
    x_new, lw = P.em_step(x, drift, logw, dt=0.1, sigma=1.3, ref_drifts=[ref], ref_coefs=[1.0],
                          noise=noise)
    out = P.kernel_logpdf(x_new, x, drift, dt=0.1, sigma=1.3, logw=lw, coef=0.5)
    with _Record() as rec:
        torch.autograd.grad(out.sum() + x_new.sum(), (x, drift, ref, logw))
    assert "pathsmc.em_step_backward.default" in rec.ops
    assert "pathsmc.kernel_logpdf_backward.default" in rec.ops


def test_em_step_backward_gradcheck() -> None:
    """The fused backward is differentiable (its backward re-runs the twin): first and second
    derivatives of the raw op, per-row steps, two refs, the forward kernel, recovered noise."""
    args, _ = _em_args(2, True, True, False, F64, "cpu", dead=False, seed=3)
    (g_x, g_w, x, drift, _, x_new, dt, sigma, refs, coefs, fc, lam, mask, rdt, rsg) = args
    tensors = [t.detach().requires_grad_() for t in (g_x, g_w, x, drift, x_new, *refs)]

    def f(g_x, g_w, x, drift, x_new, *refs):
        o = OPS.em_step_backward(g_x, g_w, x, drift, None, x_new, dt, sigma, list(refs), coefs,
                                 fc, lam, mask, rdt, rsg)
        return o[0], o[1], *o[2], o[3]

    assert gradcheck(f, tensors)
    assert gradgradcheck(f, tensors)


def test_kernel_logpdf_backward_gradcheck() -> None:
    t = [_rn(B, N, seed=1, grad=True)] + [_rn(B, N, D, seed=i, grad=True) for i in (2, 3, 4)]

    def f(grad, y, base, drift):
        return OPS.kernel_logpdf_backward(grad, y, base, drift, 0.1, 1.3, 0.6, 0.4,
                                          [True, True, True])

    assert gradcheck(f, t)
    assert gradgradcheck(f, t)


def _opcheck_cases(grad: bool):
    args, _ = _em_args(2, True, True, True, F32, "cpu", dead=False, seed=5)
    if grad:
        for i in (0, 1, 2, 3, 4, 5):
            args[i] = args[i].detach().requires_grad_()
    recovered, _ = _em_args(1, False, False, False, F64, "cpu", dead=False, seed=6)
    recovered[12] = [True, False, True, True]
    y, base, drift = (_rn(B, N, D, seed=i, dtype=F32, grad=grad) for i in (1, 2, 3))
    g = _rn(B, N, seed=4, grad=grad)
    return {
        "em_step_backward": (OPS.em_step_backward.default, tuple(args)),
        "em_step_backward_recovered": (OPS.em_step_backward.default, tuple(recovered[:13])),
        "kernel_logpdf_backward": (OPS.kernel_logpdf_backward.default,
                                   (g, y, base, drift, 0.1, 1.2, 0.6, 0.4, [True, True, True])),
        "kernel_logpdf_backward_nodrift": (
            OPS.kernel_logpdf_backward.default,
            (g, y.double(), base.double(), None, 0.1, 1.2, -1.0, 0.0, [True, False, True])),
    }


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("case", list(_opcheck_cases(False)))
def test_opcheck(case: str, grad: bool) -> None:
    op, args = _opcheck_cases(grad)[case]
    torch.library.opcheck(op, args)
