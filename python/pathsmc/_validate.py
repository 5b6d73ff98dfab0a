"""Argument checks and shape canonicalization shared by :mod:`pathsmc.ops` and
:mod:`pathsmc.reference`.

Every error names the argument and says what was expected. Value checks (finite inputs,
uniforms in [0, 1)) read the data, so they run only on CPU tensors: on CUDA they would be a
host sync inside the sampling loop.
"""

from __future__ import annotations

import math

import torch

RESAMPLING_SCHEMES = ("systematic", "stratified", "multinomial", "residual")
FLOAT_DTYPES = (torch.float32, torch.float64)
# float16/bfloat16 states (float32 arithmetic, float64 sums) have CUDA kernels only.
CUDA_STATE_DTYPES = FLOAT_DTYPES + (torch.float16, torch.bfloat16)


def state_dtypes(t: object) -> tuple[torch.dtype, ...]:
    """dtypes accepted for states ``x`` on the tensor's device."""
    on_cuda = isinstance(t, torch.Tensor) and t.device.type == "cuda"
    return CUDA_STATE_DTYPES if on_cuda else FLOAT_DTYPES


def uniforms_shape(scheme: str, b: int, m: int) -> tuple[int, ...]:
    """Shape of the explicit uniforms a resampling scheme takes: (B,) or (B, M)."""
    check_scheme(scheme)
    return (b,) if scheme == "systematic" else (b, m)


def check_scheme(scheme: str) -> None:
    if scheme not in RESAMPLING_SCHEMES:
        raise ValueError(
            f"scheme: unknown resampling scheme {scheme!r}; expected one of {RESAMPLING_SCHEMES}"
        )


def check_tensor(
    t: object,
    name: str,
    *,
    shape: tuple[int, ...] | None = None,
    ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] | None = FLOAT_DTYPES,
    device: torch.device | None = None,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({allowed}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    return t


def check_uniforms(u: torch.Tensor, name: str, shape: tuple[int, ...], device) -> torch.Tensor:
    check_tensor(u, name, shape=shape, device=device)
    if u.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(((u >= 0) & (u < 1)).all()):
            raise ValueError(f"{name}: uniforms must lie in [0, 1)")
    return u


def check_positive(v: float, name: str, *, allow_zero: bool = False) -> float:
    v = float(v)
    ok = v >= 0 if allow_zero else v > 0
    if not ok or v != v or v == float("inf"):
        need = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected a finite float {need}, got {v}")
    return v


def states_to_bnd(x: torch.Tensor, name: str) -> torch.Tensor:
    """(N, D) -> (1, N, D); (B, N, *event) -> (B, N, prod(event)). A view when possible."""
    if x.dim() == 3:
        x3 = x
    elif x.dim() == 2:
        x3 = x.unsqueeze(0)
    elif x.dim() > 3:
        x3 = x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))
    else:
        raise ValueError(f"{name}: expected shape (N, D) or (B, N, *event), got {tuple(x.shape)}")
    if x3.shape[1] == 0:
        raise ValueError(f"{name}: empty population (N = 0) in shape {tuple(x.shape)}")
    if x3.shape[2] == 0:
        raise ValueError(f"{name}: empty event (D = 0) in shape {tuple(x.shape)}")
    return x3


def logw_to_bn(logw: torch.Tensor, name: str = "logw") -> torch.Tensor:
    """(N,) -> (1, N); (B, N) stays."""
    if logw.dim() == 1:
        return logw.unsqueeze(0)
    if logw.dim() == 2:
        return logw
    raise ValueError(f"{name}: expected shape (N,) or (B, N), got {tuple(logw.shape)}")
