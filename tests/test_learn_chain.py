"""Chain log-ratios for learning twists on a diffusers chain (pathsmc.learn.chain_paths),
checked on a tiny random UNet with a DDPM scheduler against diffusers' own step and
hand-written Gaussian log-densities."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from pathsmc.integrations.diffusers import DiffusersModel  # noqa: E402
from pathsmc.learn import consistency_residuals  # noqa: E402
from pathsmc.learn.chain_paths import (  # noqa: E402
    ChainValue,
    chain_log_ratios,
    sample_chain_paths,
)

STEPS = 5
GUIDANCE = 0.7


def _setup():
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
        add_attention=False).eval()  # no attention: the hand check double-differentiates
    unet.requires_grad_(False)
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                    clip_sample=True, variance_type="fixed_small")
    model = DiffusersModel(unet, sched)
    w = torch.randn(3, 64) * 0.5

    def reward(img):  # (B, n, 1, 8, 8) -> (B, n): log-softmax class 0 of a linear map
        return torch.log_softmax(img.reshape(*img.shape[:2], 64) @ w.T, -1)[..., 0]

    net = ChainValue(64, hidden=8)
    with torch.no_grad():  # a fixed, non-trivial V_θ
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model, sched, reward, net


def _hand_residuals(model, sched, reward, net, paths, x):
    """δ_k = V(x_k) − [log N(x_{k+1}; m_k, s_k²) − log N(x_{k+1}; m_k + γ s_k² ∇V, s_k²)]
    − V(x_{k+1}) with m_k from diffusers' scheduler.step, s_k from the scheduler's variance,
    V = a(t) r(x̂₀(x)) + c(x, t) and ∇V by autograd through the UNet."""
    sch = sched.__class__.from_config(sched.config)
    sch.set_timesteps(STEPS)
    vals, lrs = [], []
    for k, t in enumerate(sch.timesteps):
        xk = x[:, :, k].reshape(-1, 1, 8, 8)
        xg = xk.clone().requires_grad_(True)
        eps = model.unet(xg, t).sample
        a_t = float(sch.alphas_cumprod[int(t)]) ** 0.5
        x0 = ((xg - (1 - a_t ** 2) ** 0.5 * eps) / a_t).clamp(-1, 1)
        tt = torch.tensor(int(t) / 1000.0)
        a, c = net.parts(xg.reshape(x.shape[0], x.shape[1], 1, 8, 8), tt)
        v = a * reward(x0.reshape(x.shape[0], x.shape[1], 1, 8, 8)).double() + c.double()
        (g,) = torch.autograd.grad(v.sum(), xg, create_graph=True)
        seed = 1234 + k
        with torch.no_grad():
            out = sch.step(eps.detach(), t, xk, generator=torch.Generator().manual_seed(seed))
        s = float(sch._get_variance(int(t)) ** 0.5) if int(t) > 0 else 0.0
        noise = torch.randn(xk.shape, generator=torch.Generator().manual_seed(seed))
        m = (out.prev_sample - s * noise).double() if s > 0 else out.prev_sample.double()
        xn = x[:, :, k + 1].reshape(-1, 64).double()
        m = m.reshape(-1, 64)
        if s > 0:
            mq = m + GUIDANCE * s * s * g.reshape(-1, 64).double()
            lp = torch.distributions.Normal(m, s).log_prob(xn).sum(-1)
            lq = torch.distributions.Normal(mq, s).log_prob(xn).sum(-1)
            lr = lp - lq
        else:
            torch.testing.assert_close(xn, m, rtol=0, atol=1e-5)  # deterministic last step
            lr = torch.zeros(xn.shape[0], dtype=torch.float64) + 0.0 * g.sum()
        vals.append(v.reshape(x.shape[:2]))
        lrs.append(lr.reshape(x.shape[:2]))
    vals.append(reward(x[:, :, -1]).double())
    return torch.stack(vals, -1), torch.stack(lrs, -1)


def test_zero_twist_gives_zero_log_ratios():
    model, _, reward, net = _setup()
    paths = sample_chain_paths(model, STEPS, reward, particles=3, batch=2, net=net,
                               guidance=GUIDANCE, generator=torch.Generator().manual_seed(1))
    _, lr = chain_log_ratios(net, paths, guidance=0.0)  # guidance 0: q = p
    assert torch.equal(lr, torch.zeros_like(lr))
    zero = ChainValue(64, hidden=8)  # V = a · 0 + 0 with a zero base
    paths.base.zero_()
    paths.base_grad.zero_()
    _, lr = chain_log_ratios(zero, paths, guidance=GUIDANCE)
    assert torch.equal(lr, torch.zeros_like(lr))


def test_residuals_match_hand_computation_and_gradients_flow():
    model, sched, reward, net = _setup()
    paths = sample_chain_paths(model, STEPS, reward, particles=3, batch=2, net=net,
                               guidance=GUIDANCE, generator=torch.Generator().manual_seed(1))
    assert paths.x.shape == (2, 3, STEPS + 1, 1, 8, 8)
    values, lr = chain_log_ratios(net, paths, guidance=GUIDANCE)
    hv, hlr = _hand_residuals(model, sched, reward, net, paths, paths.x)
    assert lr[..., 0].abs().min() > 0.01  # guided steps carry non-trivial log-ratios
    assert torch.equal(lr[..., -1], torch.zeros_like(lr[..., -1]))  # last step: s = 0
    for span in (1, 2, None):
        got = consistency_residuals(values, lr, span)
        want = consistency_residuals(hv, hlr, span)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # gradients reach θ and equal those of the hand-written (pure torch) residuals
    loss = consistency_residuals(values, lr, 1).square().mean()
    hloss = consistency_residuals(hv, hlr, 1).square().mean()
    params = list(net.parameters())
    got = torch.autograd.grad(loss, params)
    want = torch.autograd.grad(hloss, params)
    assert all(float(g.abs().sum()) > 0 for g in got)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-3, atol=1e-5)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="dim"):
        ChainValue(0)
    net = ChainValue(64, hidden=4)
    with pytest.raises(ValueError, match="x: expected states of 64"):
        net.parts(torch.zeros(1, 2, 1, 4, 4), torch.tensor(0.5))


def test_t_start_keeps_the_active_steps_only():
    model, _, reward, net = _setup()
    paths = sample_chain_paths(model, STEPS, reward, particles=2, batch=1, net=net,
                               guidance=GUIDANCE, t_start=0.3,
                               generator=torch.Generator().manual_seed(2))
    values, lr = chain_log_ratios(net, paths, guidance=GUIDANCE)
    v3, lr3 = chain_log_ratios(net, paths, guidance=GUIDANCE, t_start=0.3)
    k0 = STEPS + 1 - v3.shape[-1]
    assert 0 < k0 < STEPS and float(paths.times[k0]) <= 0.3 < float(paths.times[k0 - 1])
    torch.testing.assert_close(v3, values[..., k0:], rtol=0, atol=0)
    torch.testing.assert_close(lr3, lr[..., k0:], rtol=0, atol=0)
