"""Shared fixtures and helpers for the op tests.

``device`` runs a test on CPU and, when torch sees a GPU and the extension was built with
CUDA kernels, on CUDA (the CUDA cases are skipped otherwise). Tolerances follow the dtype of
the data being compared; float64 comparisons are tight (rtol 1e-10).
"""

from __future__ import annotations

import contextlib
import math
import sys

import pytest
import torch

import pathsmc


def _cuda_ok() -> bool:
    return torch.cuda.is_available() and bool(pathsmc.build_info().get("cuda", False))


CUDA_OK = _cuda_ok()
requires_cuda = pytest.mark.skipif(
    not CUDA_OK, reason="needs a GPU and pathsmc built with CUDA kernels"
)
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
FLOATS = [torch.float32, torch.float64]
SCHEMES = ["systematic", "stratified", "multinomial", "residual"]

# (rtol, atol) for values computed in the given dtype.
_TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
}


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small problems: fastest on a loaded two-core
    machine, and results do not depend on it. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tol(*dtypes: torch.dtype) -> dict:
    """rtol/atol for a result whose accuracy is limited by the coarsest of ``dtypes``."""
    rtol = max(_TOL[d][0] for d in dtypes)
    atol = max(_TOL[d][1] for d in dtypes)
    return {"rtol": rtol, "atol": atol}


def weight_tol(state_dtype: torch.dtype, logw_dtype: torch.dtype, d: int) -> dict:
    """Tolerance for log-weights accumulated over D elements of ``state_dtype`` states.

    float32 states carry ~1e-7 relative rounding in every residual (x' - mean) / s; each
    Gaussian term adds |z|·δz per element, so the absolute error grows with D.
    """
    if state_dtype == torch.float64 and logw_dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-10 * max(1, d)}
    if state_dtype == torch.float64:  # float32 log-weights: one rounding of the result
        return {"rtol": 2e-6, "atol": 1e-5}
    return {"rtol": 2e-5, "atol": 5e-5 * max(1, d)}


def assert_close(actual, expected, what: str = "", **kw) -> None:
    """torch.testing.assert_close whose message also names ``what`` (the op and output), the
    shape, dtype and device: a failure in a GPU log says what was off, where, and by how much
    (torch's message gives the greatest absolute and relative differences)."""
    kw.setdefault("equal_nan", True)
    if "rtol" not in kw:
        kw.update(tol(expected.dtype))
    where = (f"{what + ': ' if what else ''}shape {tuple(expected.shape)}, dtype "
             f"{expected.dtype}, device {actual.device}")
    assert actual.dtype == expected.dtype, (where, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (where, actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, check_device=True,
                               msg=lambda m: f"{where}: {m}", **kw)


def gen(device: str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def rand_open(shape, g: torch.Generator, device: str = "cpu") -> torch.Tensor:
    """float64 uniforms in [0, 1) drawn on CPU with ``g`` (a CPU generator), moved to device."""
    return torch.rand(shape, dtype=torch.float64, generator=g).to(device)


def mc_bound(n: int, var: float = 1.0, z: float = 5.0) -> float:
    """z standard errors of a mean of n i.i.d. samples with variance ``var``."""
    return z * math.sqrt(var / n)


# ---- host-read guard (tests/test_no_sync.py explains it) ----

_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")
# Value checks that pathsmc runs on CPU tensors only (skipped on CUDA).
_CPU_ONLY_CHECKS = {"_scalar_or_rows", "check_uniforms"}
# The one-time checks of the user's functions before the first step (one read on any device,
# never inside the loop).
_UP_FRONT_CHECKS = {"check_user_output"}


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads():
    """Make every host read of a tensor raise :class:`HostRead` inside the block."""
    saved = {name: getattr(torch.Tensor, name) for name in _READS}

    def forbid(name):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_name
            if caller in _UP_FRONT_CHECKS or (
                    self.device.type == "cpu" and caller in _CPU_ONLY_CHECKS):
                return saved[name](self, *args, **kwargs)
            raise HostRead(f"Tensor.{name}() inside a sampling loop (a host sync on a GPU)")
        return read

    try:
        for name in _READS:
            setattr(torch.Tensor, name, forbid(name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@pytest.fixture
def guarded_annealed_loop(monkeypatch):
    """Run annealed_smc's step loop (the body of its progress-bar block) under the guard."""
    import pathsmc.samplers as samplers

    progress = samplers.progress_bar

    @contextlib.contextmanager
    def guarded(*args, **kwargs):
        with progress(*args, **kwargs) as bar, no_host_reads():
            yield bar

    monkeypatch.setattr(samplers, "progress_bar", guarded)


# ---- fault injection for the MALA acceptance (samplers, tempering, waste-free tests) ----


def mala_hastings(x, x_prop, grad, grad_prop, step) -> torch.Tensor:
    """log q(x|x') − log q(x'|x) of the MALA proposal ``N(x + h∇, 2h I)``, ``(rows, C)``."""
    h = torch.as_tensor(step, dtype=torch.float64).reshape(-1, 1, 1)
    fwd = ((x_prop - x - h * grad).double() ** 2).sum(-1)
    bwd = ((x - x_prop - h * grad_prop).double() ** 2).sum(-1)
    return (fwd - bwd) / (4 * h[..., 0])


def perturbed_mala_accept(kind: str):
    """``pathsmc.ops.mala_accept`` with its log acceptance ratio perturbed through
    ``logp_prop`` (the returned log-density stays the true one): ``"hastings_sign"`` flips the
    Hastings term, ``"hastings_coef"`` halves it, ``"density_coef"`` scales the target ratio
    by 0.8. Install with ``monkeypatch.setattr(pathsmc.ops, "mala_accept", ...)``."""
    orig = pathsmc.ops.mala_accept

    def wrapped(x, x_prop, logp, logp_prop, grad, grad_prop, step, uniforms=None,
                generator=None):
        if kind == "hastings_sign":
            off = -2.0 * mala_hastings(x, x_prop, grad, grad_prop, step)
        elif kind == "hastings_coef":
            off = -0.5 * mala_hastings(x, x_prop, grad, grad_prop, step)
        elif kind == "density_coef":
            off = -0.2 * (logp_prop - logp)
        else:
            raise ValueError(f"unknown perturbation {kind!r}")
        xo, _, go, acc = orig(x, x_prop, logp, logp_prop + off, grad, grad_prop, step,
                              uniforms, generator)
        return xo, torch.where(acc, logp_prop, logp), go, acc

    return wrapped


def faulty_ops(**override):
    """An ``ops`` module (for the drivers' ``ops=``) whose ``em_step`` rewrites some keyword
    arguments, e.g. ``faulty_ops(fwd_coef=lambda c: -c)``: a wrong step weight."""
    from types import SimpleNamespace

    def em_step(*args, **kwargs):
        for key, fn in override.items():
            kwargs[key] = fn(kwargs[key])
        return pathsmc.ops.em_step(*args, **kwargs)

    return SimpleNamespace(em_step=em_step, normalize=pathsmc.ops.normalize,
                           adaptive_resample=pathsmc.ops.adaptive_resample)

