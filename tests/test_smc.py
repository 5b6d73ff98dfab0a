"""The generic Feynman–Kac driver against a Kalman filter's exact log-likelihood."""

import math

import pytest
import torch

import pathsmc
from pathsmc.smc import smc


class LinearGaussianSSM:
    """x_0 ~ N(0, 1), x_{k+1} = a x_k + sx ε, y_k ~ N(x_k, sy²): a bootstrap filter."""

    def __init__(self, ys: torch.Tensor, a: float = 0.9, sx: float = 0.7, sy: float = 0.5):
        self.ys, self.a, self.sx, self.sy = ys, a, sx, sy  # ys: (B, T)
        self.num_steps = ys.shape[1] - 1

    def _loglik(self, x: torch.Tensor, k: int) -> torch.Tensor:
        z = (self.ys[:, k : k + 1] - x[..., 0].double()) / self.sy
        return -0.5 * z * z - math.log(self.sy) - 0.5 * math.log(2 * math.pi)

    def init(self, batch, particles, generator):
        x = torch.randn(batch, particles, 1, generator=generator, dtype=torch.float64)
        return [x], self._loglik(x, 0)

    def step(self, k, states, logw, generator):
        x = states[0]
        x, _ = pathsmc.em_step(x, (self.a - 1.0) * x, dt=1.0, sigma=self.sx, generator=generator)
        return [x], logw + self._loglik(x, k + 1)


def kalman_loglik(ys, a, sx, sy):
    """Exact log p(y_0..T-1) per row."""
    out = []
    for y in ys.tolist():
        m, p, ll = 0.0, 1.0, 0.0
        for k, yk in enumerate(y):
            if k > 0:
                m, p = a * m, a * a * p + sx * sx
            s = p + sy * sy
            ll += -0.5 * (yk - m) ** 2 / s - 0.5 * math.log(2 * math.pi * s)
            gain = p / s
            m, p = m + gain * (yk - m), (1 - gain) * p
        out.append(ll)
    return torch.tensor(out, dtype=torch.float64)


def simulate(b, t, a=0.9, sx=0.7, sy=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, generator=g, dtype=torch.float64)
    ys = []
    for _ in range(t):
        ys.append(x + sy * torch.randn(b, generator=g, dtype=torch.float64))
        x = a * x + sx * torch.randn(b, generator=g, dtype=torch.float64)
    return torch.stack(ys, 1)


@pytest.mark.parametrize("scheme", ["systematic", "multinomial"])
def test_log_z_matches_kalman(scheme):
    ys = simulate(1, 25).expand(64, 25).contiguous()  # one data set, 64 independent filters
    model = LinearGaussianSSM(ys)
    res = smc(model, particles=256, batch=64, scheme=scheme,
              generator=torch.Generator().manual_seed(1), progress=False)
    exact = kalman_loglik(ys[:1], 0.9, 0.7, 0.5)[0].item()
    lz = res.log_z
    se = lz.std().item() / math.sqrt(64)
    assert abs(lz.mean().item() - exact) < 4 * se + 0.01  # log Ẑ bias is O(var/N)
    # unbiasedness of Ẑ itself: mean of Ẑ/Z over rows close to 1
    ratio = torch.exp(lz - exact)
    assert abs(ratio.mean().item() - 1) < 4 * ratio.std().item() / 8 + 0.01
    assert res.resampled.any() and not res.dead_rows
    assert res.ess.shape == (24, 64) and (res.ess > 0).all()


def test_wrong_weights_are_detected():
    """A filter that drops the initial weight (a typical driver bug) misses log Z by many SEs."""

    class NoInitialWeight(LinearGaussianSSM):
        def init(self, batch, particles, generator):
            states, logw = super().init(batch, particles, generator)
            return states, torch.zeros_like(logw)

    ys = simulate(1, 25).expand(32, 25).contiguous()
    res = smc(NoInitialWeight(ys), particles=256, batch=32,
              generator=torch.Generator().manual_seed(2), progress=False)
    exact = kalman_loglik(ys[:1], 0.9, 0.7, 0.5)[0].item()
    se = res.log_z.std().item() / math.sqrt(32)
    assert abs(res.log_z.mean().item() - exact) > 8 * se


class Killer:
    """Row 1 dies at step 2; row 0 lives."""

    num_steps = 4

    def init(self, batch, particles, generator):
        return [torch.zeros(batch, particles, 2)], torch.zeros(batch, particles,
                                                               dtype=torch.float64)

    def step(self, k, states, logw, generator):
        if k == 2:
            logw = logw.clone()
            logw[1] = float("nan")
        return states, logw


def test_dead_row_report():
    res = smc(Killer(), particles=8, batch=3, threshold=1.0, progress=False)
    assert res.dead_rows == {1: 2}
    assert torch.isneginf(res.log_z[1]) and torch.isfinite(res.log_z[[0, 2]]).all()
    assert "DEAD ROWS (1): row 1 at step 2" in res.summary()
    assert not torch.isnan(res.states[0]).any()


def test_bad_model_output_is_named():
    class Bad(Killer):
        def init(self, batch, particles, generator):
            return [torch.zeros(batch, particles)], torch.zeros(batch, particles + 1)

    with pytest.raises(ValueError, match="model.init: logw has shape"):
        smc(Bad(), particles=4, batch=2, progress=False)


def test_cuda_graph_needs_cuda():
    ys = simulate(2, 5)
    model = LinearGaussianSSM(ys)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda_graph: CUDA graphs need a GPU"):
            smc(model, particles=16, batch=2, cuda_graph=True)
    else:  # the model's tensors live on the CPU
        with pytest.raises(ValueError, match="tensors are on cpu"):
            smc(model, particles=16, batch=2, cuda_graph=True)
