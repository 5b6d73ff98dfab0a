"""Up-front checks of user functions: called once on the first batch, before any sampling loop.

A driver calls each user function (model, reward, value, log-density) once through
:func:`_first_call`, which puts the call's context (shapes, dtype, device, t) into any error
while keeping the user's frames, and checks what came back with :func:`check_user_output`: a
floating-point :class:`torch.Tensor` of the expected shape on the particles' device, finite.
Every error names the function by its import path (:func:`function_name`) and says what was
expected. These checks read data back to the host once per run, never inside a loop.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["check_user_output", "first_call", "function_name"]


def function_name(f: Any) -> str:
    """``module:qualname`` of a user function (its import path), else its repr."""
    mod, qual = getattr(f, "__module__", None), getattr(f, "__qualname__", None)
    if qual is None:  # a callable object, a functools.partial
        inner = getattr(f, "func", None) or type(f)
        mod, qual = getattr(inner, "__module__", None), getattr(inner, "__qualname__", None)
    return f"{mod}:{qual}" if mod and qual else repr(f)


def _first_call(name: str, f: Callable[..., Any], x: torch.Tensor, *args: Any) -> Any:
    """The first call of a user function, with the context in the error if it fails."""
    try:
        return f(x, *args)
    except Exception as exc:
        msg = (f"{name} failed on its first call, with x of shape {tuple(x.shape)} "
               f"(B, N, D = dim), dtype {x.dtype}, on {x.device}"
               + (f", t = {args[0]}" if args else "") + f": {type(exc).__name__}: {exc}")
        try:
            err = type(exc)(msg)
        except Exception:  # an exception type that does not take one message
            err = RuntimeError(msg)
        raise err.with_traceback(exc.__traceback__) from exc  # keeps the user's frames


def check_user_output(out: Any, name: str, shape: Sequence[int], device: torch.device,
                      like: str | None = None) -> torch.Tensor:
    """Check one output of a user function (called once, up front): a floating-point tensor
    of ``shape`` on ``device``, finite. Errors name the function and what was expected."""
    want = f"{tuple(shape)}" + (f" {like}" if like else "")
    if not isinstance(out, torch.Tensor):
        hint = (" (convert with torch.as_tensor(..., device=x.device))"
                if type(out).__module__.startswith("numpy") or isinstance(out, numbers.Number)
                else " (a factory? call it first; in a `pathsmc sample` config give its "
                "arguments as `..._args`, {} for none)" if callable(out) else "")
        raise TypeError(f"{name} returned a {type(out).__module__}.{type(out).__qualname__}, "
                        f"expected a torch.Tensor of shape {want}{hint}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} returned shape {tuple(out.shape)}, expected {want}"
                         + (" (no broadcasting)" if out.numel() != math.prod(shape) else ""))
    if not out.is_floating_point():
        raise TypeError(f"{name} returned dtype {out.dtype}, expected a floating-point tensor")
    if out.device != device:
        raise ValueError(f"{name} returned a tensor on {out.device}, expected {device} (the "
                         "particles' device)")
    bad = ~torch.isfinite(out.detach())
    if bool(bad.any()):
        raise ValueError(f"{name} returned {int(bad.sum())} non-finite values (NaN / inf) of "
                         f"{out.numel()} at the first check (t = 1, the prior's particles)")
    return out


first_call = _first_call
