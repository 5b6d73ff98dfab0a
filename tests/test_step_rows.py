"""em_step with per-row step sizes and noise scales (dt, sigma as (B,) tensors)."""

import pytest
import torch

import pathsmc
import pathsmc.reference as ref


def _inputs(dtype, b=3, n=5, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, a, r, e = (torch.randn(b, n, d, generator=g, dtype=dtype) for _ in range(4))
    return x, a, r, e, torch.randn(b, n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("which", ["dt", "sigma", "both"])
def test_per_row_matches_reference_and_scalar_calls(dtype, which):
    x, a, r, e, lw = _inputs(dtype)
    h = torch.tensor([0.1, 0.01, 0.5]) if which != "sigma" else 0.1
    sg = torch.tensor([1.0, 2.0, 0.3], dtype=torch.float64) if which != "dt" else 1.3
    kw = dict(dt=h, sigma=sg, ref_drifts=[r], ref_coefs=[0.7], fwd_coef=0.2, fwd_linear=-0.5,
              noise=e)
    got = pathsmc.em_step(x, a, lw, **kw)
    want = ref.em_step(x, a, lw, **kw)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
    torch.testing.assert_close(got[1], want[1], rtol=tol, atol=100 * tol)
    for i in range(3):  # bitwise equal to one call per row with scalars
        hi = float(h[i]) if isinstance(h, torch.Tensor) else h
        si = float(sg[i]) if isinstance(sg, torch.Tensor) else sg
        one = pathsmc.em_step(x[i:i + 1], a[i:i + 1], lw[i:i + 1], dt=hi, sigma=si,
                              ref_drifts=[r[i:i + 1]], ref_coefs=[0.7], fwd_coef=0.2,
                              fwd_linear=-0.5, noise=e[i:i + 1])
        assert torch.equal(one[0], got[0][i:i + 1]) and torch.equal(one[1], got[1][i:i + 1])


def test_per_row_internal_noise_scales_rows():
    g = torch.Generator().manual_seed(3)
    x = torch.zeros(2, 20000, 4)
    out, _ = pathsmc.em_step(x, x, dt=torch.tensor([1.0, 0.25]), sigma=2.0, generator=g)
    sd = out.std(dim=(1, 2))
    torch.testing.assert_close(sd, torch.tensor([2.0, 1.0]), rtol=0.02, atol=0.0)


@pytest.mark.parametrize("bad, match", [
    (dict(dt=torch.ones(2)), "dt: expected a float or a tensor of shape \\(3,\\)"),
    (dict(dt=torch.tensor([0.1, -0.1, 0.1])), "dt: every entry must be finite and > 0"),
    (dict(sigma=torch.tensor([1.0, float("nan"), 1.0])), "sigma: every entry"),
])
def test_per_row_bad_input(bad, match):
    x, a, _, _, lw = _inputs(torch.float32)
    kw = {"dt": 0.1, "sigma": 1.0, **bad}
    with pytest.raises(ValueError, match=match):
        pathsmc.em_step(x, a, lw, **kw)


def test_opcheck_per_row():
    x, a, r, e, lw = _inputs(torch.float64)
    args = (x, a, lw, 1.0, 1.0, [r], [0.5], 0.1, -0.5, e, None,
            torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64),
            torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64))
    torch.library.opcheck(torch.ops.pathsmc.em_step.default, args)


@pytest.mark.parametrize("shape", [(1, 2, 0), (2, 3, 1, 0)])
def test_empty_event_is_a_clear_error(shape):
    x = torch.zeros(shape)
    with pytest.raises(ValueError, match="x: empty event"):
        pathsmc.em_step(x, x, torch.zeros(shape[:2], dtype=torch.float64), dt=0.1, sigma=1.0)
