"""Learning twists on a diffusers sampling chain (:class:`~pathsmc.integrations.diffusers.
DiffusersModel`): detached paths, per-step log-ratios with gradients, a value network that
starts at the Tweedie twist, and a short training loop.

The chain's kernels are Gaussian, ``p(x_{k+1} | x_k) = N(m_k(x_k), s_k² I)``
(:class:`~pathsmc.integrations.diffusers_chain.SchedulerChain`). The twisted proposal of
``steer(mode="twisted", guidance=γ)`` shifts the mean by ``γ s_k² ∇V_θ(x_k, t_k)``:
``q_θ(x_{k+1} | x_k) = N(m_k + γ s_k² ∇V_θ, s_k² I)``. Since the states are detached and the
denoiser is fixed, ``m_k`` (and the Tweedie base of the twist with its gradient) are recorded
while sampling; recomputing ``log p − log q_θ`` with gradients then needs only the value
network, never the denoiser. A deterministic step (``s_k = 0``, DDPM's last) has no density:
its log-ratio is 0 and it is never guided, as in ``steer``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import pathsmc.ops as fused_ops
from pathsmc.learn.path_consistency import path_consistency_loss

__all__ = ["ChainPaths", "ChainValue", "chain_log_ratios", "chain_loss", "chain_states",
           "sample_chain_paths", "train_chain_twist", "tweedie_base"]


def tweedie_base(model, steps: int, reward: Callable[[torch.Tensor], torch.Tensor]
                 ) -> Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]:
    """``base(x, k) -> (r(x̂₀(x)), ∇_x r(x̂₀(x)))`` at chain step k (the TDS twist; x̂₀ with
    the scheduler's clipping), for states ``(B, n, C, H, W)``; at ``k = steps`` the reward of
    the sample itself. Both outputs detached."""
    chain = model.chain(steps)

    def base(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            if k == chain.num_steps:
                img = xg
            else:
                img, _ = chain.denoise(k, xg, model.predict(xg, k, chain))
            r = reward(img)
            (g,) = torch.autograd.grad(r.sum(), xg)
        return r.detach().double(), g.detach()

    return base


class ChainValue(nn.Module):
    """``V_θ(x, k) = a_θ(t_k) · base(x, k) + c_θ(x, t_k)``: the Tweedie twist
    ``base = r(x̂₀)`` with a learned per-time scale ``a_θ(t) = 2 sigmoid(·) ∈ (0, 2)`` and a
    learned correction ``c_θ`` (an MLP on the flattened state and t). They start at
    ``a = 1, c = 0``, so the initial twist is the Tweedie twist exactly.

    Args:
        dim: the flattened state size (64 for the 8×8 digits).
        hidden: the correction's hidden width (two layers).
        correction: False: no ``c_θ`` (only the per-time scale is learned).
    """

    def __init__(self, dim: int, hidden: int = 32, *, correction: bool = True) -> None:
        super().__init__()
        if int(dim) < 1 or int(hidden) < 1:
            raise ValueError(f"dim, hidden: expected positive integers, got {dim}, {hidden}")
        self.dim = int(dim)
        self.corr = nn.Sequential(nn.Linear(self.dim + 1, hidden), nn.SiLU(),
                                  nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.scale = nn.Sequential(nn.Linear(1, 16), nn.SiLU(), nn.Linear(16, 1))
        for last in (self.corr[-1], self.scale[-1]):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        if not correction:
            self.corr = None

    def parts(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a_θ(t), c_θ(x, t))`` for states ``(..., C, H, W)`` flattening to ``dim`` and
        times ``t`` broadcastable to the leading shape ``(...)``."""
        lead = x.shape[:-3]
        flat = x.reshape(*lead, -1).float()
        if flat.shape[-1] != self.dim:
            raise ValueError(f"x: expected states of {self.dim} values, got {tuple(x.shape)}")
        tt = torch.as_tensor(t, dtype=flat.dtype, device=flat.device).expand(lead)[..., None]
        a = 2.0 * torch.sigmoid(self.scale(tt)[..., 0].double())
        if self.corr is None:
            return a, (0.0 * flat).sum(-1)
        return a, self.corr(torch.cat([flat, tt], -1))[..., 0]

    def value_and_grad(self, x: torch.Tensor, t: torch.Tensor, base: torch.Tensor,
                       base_grad: torch.Tensor, *, create_graph: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(V_θ, ∇_x V_θ)`` given the (detached) base and its gradient at ``x``."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            a, c = self.parts(xg, t)
            if self.corr is None:
                gc = torch.zeros_like(xg)
            else:
                (gc,) = torch.autograd.grad(c.sum(), xg, create_graph=create_graph)
        v = a * base + c.double()
        g = a.to(x.dtype)[(...,) + (None,) * 3] * base_grad + gc
        return v, g

    def twist(self, model, steps: int, reward: Callable[[torch.Tensor], torch.Tensor]
              ) -> Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]:
        """``value(x, t) -> (V, ∇V)`` (detached) for ``steer(model, "twisted", value=...,
        reward=reward, steps=steps)``."""
        chain = model.chain(steps)
        index = {round(st.frac, 9): k for k, st in enumerate(chain.steps)}
        base = tweedie_base(model, steps, reward)

        def value(x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
            k = index.get(round(float(t), 9))
            if k is None:
                raise ValueError(f"t: {t} is not a noise level of the {steps}-step chain")
            b, gb = base(x, k)
            v, g = self.value_and_grad(x, torch.tensor(float(t)), b, gb)
            return v.detach(), g.detach()

        return value


@dataclass
class ChainPaths:
    """Detached paths of a diffusers chain.

    Attributes:
        x: ``(B, N, K+1, C, H, W)`` states (``x[:, :, 0]`` noise, ``x[:, :, K]`` samples).
        mean: ``(B, N, K, C, H, W)`` the plain chain's kernel means ``m_k(x_k)``.
        base: ``(B, N, K+1)`` the Tweedie twist ``r(x̂₀(x_k))`` (``[..., K] = r(x_K)``).
        base_grad: ``(B, N, K, C, H, W)`` its gradient at ``x_k``.
        times: ``(K,)`` the noise levels ``t_k`` (float32).
        std: the K kernel standard deviations.
    """

    x: torch.Tensor
    mean: torch.Tensor
    base: torch.Tensor
    base_grad: torch.Tensor
    times: torch.Tensor
    std: list[float]


@torch.no_grad()
def sample_chain_paths(model, steps: int, reward: Callable[[torch.Tensor], torch.Tensor], *,
                       particles: int, batch: int = 1, net: ChainValue | None = None,
                       guidance: float = 1.0, t_start: float = 1.0,
                       generator: torch.Generator | None = None) -> ChainPaths:
    """Independent paths (no resampling, no weights) from the chain guided by ``net``'s twist
    (``None``: the plain chain; guidance only at noise levels ``t_k <= t_start``, as
    ``DiffusersModel(t_start=...)``), with the means and Tweedie bases recorded for
    :func:`chain_log_ratios`. ``model.class_labels`` must have ``batch`` rows if set."""
    chain = model.chain(steps)
    k_steps = chain.num_steps
    base_fn = tweedie_base(model, steps, reward)
    x = torch.randn(batch, particles, *model.sample_shape, generator=generator)
    x = x * float(getattr(chain.scheduler, "init_noise_sigma", 1.0))
    xs, means, bases, grads = [x], [], [], []
    times = torch.tensor([st.frac for st in chain.steps], dtype=torch.float32)
    for k in range(k_steps):
        st = chain.steps[k]
        out = model.predict(x, k, chain)
        x0, eps = chain.denoise(k, x, out)
        m = chain.mean(k, x, x0, eps)
        b, gb = base_fn(x, k)
        prop = m
        if net is not None and st.std > 0.0 and guidance != 0.0 and \
                st.frac <= t_start + 1e-12:
            _, g = net.value_and_grad(x, times[k], b, gb)
            prop = m + (guidance * st.std ** 2) * g
        noise = torch.randn(x.shape, generator=generator)
        x = prop + st.std * noise if st.std > 0.0 else prop
        xs.append(x)
        means.append(m)
        bases.append(b)
        grads.append(gb)
    bases.append(reward(x).double())
    return ChainPaths(torch.stack(xs, 2), torch.stack(means, 2), torch.stack(bases, -1),
                      torch.stack(grads, 2), times, [st.std for st in chain.steps])


@torch.no_grad()
def chain_states(model, steps: int, *, paths: int, chunk: int = 1024,
                 generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, list[float]]:
    """``paths`` independent paths of the plain chain (``model.step``: no guidance, no
    rewards): states ``(paths, K+1, C, H, W)`` and their noise levels ``[t_0, …, t_{K-1}, 0]``
    (the sample's is 0; DDPM's and DDIM's last step is at t = 0 too), ``chunk`` paths per
    network call. ``device``: where the paths live (default: the UNet's); a ``generator`` must
    be on that device. ``model.class_labels``, if set, must have one row."""
    if int(paths) < 1 or int(chunk) < 1:
        raise ValueError(f"paths, chunk: expected positive integers, got {paths}, {chunk}")
    if model.class_labels is not None and model.class_labels.shape[0] != 1:
        raise ValueError(f"model.class_labels: expected one row for chain_states, got "
                         f"{tuple(model.class_labels.shape)} (use model.with_condition(...))")
    if device is None:
        device = next((p.device for p in model.unet.parameters()), torch.device("cpu"))
    chain = model.chain(steps)
    sigma0 = float(getattr(chain.scheduler, "init_noise_sigma", 1.0))
    out = []
    for i in range(0, int(paths), int(chunk)):
        n = min(int(chunk), int(paths) - i)
        x = sigma0 * torch.randn(1, n, *model.sample_shape, generator=generator, device=device)
        xs = [x]
        for k in range(chain.num_steps):
            x = model.step(k, x, steps=steps, generator=generator)
            xs.append(x)
        out.append(torch.stack(xs, 2)[0])
    return torch.cat(out), [st.frac for st in chain.steps] + [0.0]


def chain_log_ratios(net: ChainValue, paths: ChainPaths, *, guidance: float = 1.0,
                     t_start: float = 1.0, ops=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values (B, N, K+1), log_ratios (B, N, K))`` along recorded paths, differentiable
    in ``net``: ``values[..., k] = V_θ(x_k, t_k)`` for k < K and ``r(x_K)`` at the end;
    ``log_ratios[..., k] = log N(x_{k+1}; m_k, s_k²) − log N(x_{k+1}; m_k + γ s_k² ∇V_θ,
    s_k²)`` (0 where ``s_k = 0``), from the ops' ``kernel_logpdf`` (fused backward).
    With ``t_start < 1`` only the steps from the first ``t_k <= t_start`` on are returned (the
    twisted SMC of ``DiffusersModel(t_start=...)`` starts its potentials there)."""
    ops = fused_ops if ops is None else ops
    x = paths.x.detach()
    k_steps = len(paths.std)
    if x.shape[2] != k_steps + 1:
        raise ValueError(f"paths.x: expected {k_steps + 1} states per path, got {x.shape[2]}")
    zeros = torch.zeros(x.shape[:2], dtype=torch.float64)
    k0 = next((k for k in range(k_steps) if float(paths.times[k]) <= t_start + 1e-6), k_steps)
    vals, out = [], []
    for k in range(k0, k_steps):
        xk, xn, m = x[:, :, k], x[:, :, k + 1], paths.mean[:, :, k]
        v, g = net.value_and_grad(xk, paths.times[k], paths.base[:, :, k],
                                  paths.base_grad[:, :, k], create_graph=True)
        vals.append(v)
        s = paths.std[k]
        if s == 0.0 or guidance == 0.0:
            out.append(zeros + 0.0 * v)  # keeps the graph; exactly 0
            continue
        lr = ops.kernel_logpdf(xn, xk, m - xk, dt=1.0, sigma=s, logw=zeros)
        drift_q = m - xk + (guidance * s * s) * g
        out.append(ops.kernel_logpdf(xn, xk, drift_q, dt=1.0, sigma=s, logw=lr, coef=-1.0))
    vals.append(paths.base[:, :, -1])
    return torch.stack(vals, -1), torch.stack(out, -1)


def chain_loss(net: ChainValue, paths: ChainPaths, *, guidance: float = 1.0,
               t_start: float = 1.0, spans: tuple[int | None, ...] = (1, None)) -> torch.Tensor:
    """The sum over ``spans`` of :func:`~pathsmc.learn.path_consistency_loss` (sub-trajectory
    balance with windows of ``c`` steps; None: the whole path)."""
    values, lr = chain_log_ratios(net, paths, guidance=guidance, t_start=t_start)
    return sum(path_consistency_loss(values, lr, span=c) for c in spans)


def train_chain_twist(model, steps: int, reward: Callable[[torch.Tensor], torch.Tensor],
                      net: ChainValue, *, seconds: float = 120.0, iters: int | None = None,
                      particles: int = 32, guidance: float = 1.0, lr: float = 1e-3,
                      inner: int = 4, spans: tuple[int | None, ...] = (1, None),
                      policy: str = "mix", clip: float = 10.0, t_start: float = 1.0,
                      seed: int = 0,
                      log: Callable[[str], None] | None = None
                      ) -> list[float]:
    """Train ``net`` by sub-trajectory balance (off-policy: any detached paths do) for
    ``seconds`` of wall time or ``iters`` iterations; fresh paths every iteration, ``inner``
    Adam steps on each batch, gradient norm clipped at ``clip``. ``policy``: where paths come
    from: ``"plain"`` (the unguided chain), ``"twist"`` (the chain guided by the current
    twist) or ``"mix"`` (alternating). Returns the loss per iteration."""
    if seconds <= 0 and iters is None:
        raise ValueError(f"seconds: expected > 0 when iters is None, got {seconds}")
    if policy not in ("plain", "twist", "mix"):
        raise ValueError(f"policy: expected 'plain', 'twist' or 'mix', got {policy!r}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses: list[float] = []
    t0 = time.perf_counter()
    it = 0
    while (iters is None and time.perf_counter() - t0 < seconds) or (
            iters is not None and it < iters):
        guided = policy == "twist" or (policy == "mix" and it % 2 == 1)
        paths = sample_chain_paths(model, steps, reward, particles=particles, batch=1,
                                   net=net if guided else None, guidance=guidance,
                                   t_start=t_start, generator=gen)
        for _ in range(inner):
            opt.zero_grad()
            loss = chain_loss(net, paths, guidance=guidance, t_start=t_start, spans=spans)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
        losses.append(float(loss.detach()))
        if log is not None and (it % 10 == 0):
            log(f"iter {it:4d}  t={time.perf_counter() - t0:6.1f}s  loss={losses[-1]:.4f}")
        it += 1
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"loss: not finite at iteration {it}")
    return losses
