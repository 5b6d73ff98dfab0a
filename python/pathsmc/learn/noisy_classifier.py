"""Soft values of a classifier reward, learned as a classifier of noisy states.

For the reward ``r_k(x) = log p(k | x)`` of a classifier and the plain chain ``p``, the soft value
is ``V_t^k(x) = log E_p[p(k | X_K) | X_t = x]``: the log of a noisy classifier. The soft labels
``p(· | X_K)`` of the chain's own samples are unbiased for ``exp V_t(X_t)``, so the expected
cross-entropy ``E_p[−Σ_k p(k | X_K) log q_θ(k | X_t, t)]`` is minimal exactly at
``q_θ(· | x, t) = exp V_t(x)`` (cross-entropy is a proper scoring rule): plain regression on
detached paths of the unguided chain, with no weights and no log Z, learns the twists of every
class at once. This is the Monte Carlo regression of soft values (the blog's conditional
expectation ``exp V_t = E[exp r | x_t]``, eq. 7) for the special case of class rewards, and the
noisy classifier of classifier guidance (Dhariwal & Nichol, 2021) trained on the model's samples
with the clean classifier's soft labels.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["FitHistory", "NoisyClassifier", "bounded_reward_labels", "fit_class_twist",
           "soft_label_loss", "train_noisy_classifier"]


def soft_label_loss(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy ``−Σ_k targets_k · log_probs_k`` over the leading dims; both
    ``(..., K)``. ``log_probs`` must be normalized (``log_softmax``, as
    :class:`NoisyClassifier` returns; raw logits make it unbounded below); then it is minimal
    at ``log E[targets | inputs]``."""
    if log_probs.shape != targets.shape:
        raise ValueError(f"targets: expected shape {tuple(log_probs.shape)}, got "
                         f"{tuple(targets.shape)}")
    return -(targets.to(log_probs.dtype) * log_probs).sum(-1).mean()


def bounded_reward_labels(reward: torch.Tensor, upper: float = 0.0) -> torch.Tensor:
    """Soft labels ``(1 − e^{r − upper}, e^{r − upper})`` ``(..., 2)`` for a scalar reward
    bounded above, ``r ≤ upper``: the reward as the log-probability of a Bernoulli "success".
    A two-class :class:`NoisyClassifier` fit to them learns ``V_t = log q_θ(1 | x_t, t) + upper``;
    steer with ``net.twist(ones)`` (the constant ``upper`` cancels in the weights). The labels
    carry little signal when ``r − upper`` is very negative on most paths (a sharp reward):
    the regression then needs many paths."""
    r = torch.as_tensor(reward, dtype=torch.float64)
    if not bool(torch.isfinite(r).all()):
        raise ValueError("reward: must be finite (a -inf reward is a zero label: clamp it)")
    if float(r.max()) > float(upper) + 1e-9:
        raise ValueError(f"reward: must be <= upper = {upper}, got a maximum of {float(r.max())}")
    p = (r - float(upper)).clamp(max=0.0).exp()
    return torch.stack([1.0 - p, p], -1)


class NoisyClassifier(nn.Module):
    """``log q_θ(k | x, t)``: an MLP on the flattened state and Fourier features of ``t``.

    Args:
        dim: the flattened state size (64 for the 8×8 digits).
        classes: the number of classes K.
        hidden: hidden width; ``layers`` hidden layers (SiLU).
        frequencies: Fourier features ``sin/cos(2^j π t)``, ``j < frequencies``, of the noise
            level ``t ∈ [0, 1]`` (``SchedulerChain`` steps' ``frac``; 0 at the sample).
    """

    def __init__(self, dim: int, classes: int, hidden: int = 256, layers: int = 3,
                 frequencies: int = 6) -> None:
        super().__init__()
        if min(int(dim), int(classes), int(hidden), int(layers)) < 1 or int(classes) < 2:
            raise ValueError(f"dim, classes, hidden, layers: expected positive integers "
                             f"(classes >= 2), got {dim}, {classes}, {hidden}, {layers}")
        self.dim, self.classes = int(dim), int(classes)
        self.register_buffer("freq", math.pi * 2.0 ** torch.arange(int(frequencies)))
        width = self.dim + 1 + 2 * int(frequencies)
        mods: list[nn.Module] = []
        for _ in range(int(layers)):
            mods += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        mods.append(nn.Linear(width, self.classes))
        self.mlp = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """``log q_θ(· | x, t)`` ``(..., K)`` for states ``(..., C, H, W)`` flattening to
        ``dim`` values and ``t`` a float or a tensor broadcastable to the leading shape."""
        lead = x.shape[:-3]
        flat = x.reshape(*lead, -1).to(self.freq.dtype)
        if flat.shape[-1] != self.dim:
            raise ValueError(f"x: expected states of {self.dim} values, got {tuple(x.shape)}")
        tt = torch.as_tensor(t, dtype=flat.dtype, device=flat.device).expand(lead)[..., None]
        ang = tt * self.freq
        feats = torch.cat([flat, tt, ang.sin(), ang.cos()], -1)
        return torch.log_softmax(self.mlp(feats), -1)

    def twist(self, classes: torch.Tensor
              ) -> Callable[[torch.Tensor, float], torch.Tensor]:
        """``value(x (B, n, C, H, W), t) -> log q_θ(k_b | x, t)`` ``(B, n)`` for row classes
        ``classes (B,)``: the ``value=`` of ``steer(model, "twisted", reward=...)`` (differentiable
        in ``x``; ``steer`` takes ``∇V`` by autograd)."""
        classes = torch.as_tensor(classes, dtype=torch.long)
        if classes.dim() != 1 or bool(((classes < 0) | (classes >= self.classes)).any()):
            raise ValueError(f"classes: expected a 1-D tensor of labels in [0, {self.classes}),"
                             f" got {classes.tolist()}")

        def value(x: torch.Tensor, t: float) -> torch.Tensor:
            if x.shape[0] != classes.shape[0]:
                raise ValueError(f"classes: {classes.shape[0]} rows, but the states have "
                                 f"{x.shape[0]}")
            lp = self(x, float(t))
            idx = classes.to(lp.device).view(-1, 1, 1).expand(*lp.shape[:2], 1)
            return lp.gather(-1, idx)[..., 0].double()

        return value


@dataclass
class FitHistory:
    """Mean loss per epoch on the training paths and (if given) the held-out paths; the
    returned network holds the parameters of ``best_epoch`` (0-based; the lowest held-out
    loss, else the last epoch)."""

    train: list[float] = field(default_factory=list)
    valid: list[float] = field(default_factory=list)
    best_epoch: int = -1


def _pairs(states: torch.Tensor, times: Sequence[float], targets: torch.Tensor, classes: int,
           name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(states, times, soft labels) flattened to one row per (path, noise level)."""
    if states.dim() < 5:
        raise ValueError(f"{name}: expected states (M, T, C, H, W), got "
                         f"{tuple(states.shape)}")
    m, t_n = states.shape[:2]
    if m < 1:
        raise ValueError(f"{name}: no paths")
    if len(times) != t_n:
        raise ValueError(f"times: expected {t_n} noise levels for {name}, got {len(times)}")
    if targets.shape != (m, classes):
        raise ValueError(f"{name}: expected soft labels ({m}, {classes}), got "
                         f"{tuple(targets.shape)}")
    if not bool(torch.isfinite(states).all()) or not bool(torch.isfinite(targets).all()):
        raise ValueError(f"{name}: states and soft labels must be finite")
    sums = targets.double().sum(-1)
    if bool((targets < 0).any()) or not bool(((sums - 1.0).abs() < 1e-3).all()):
        raise ValueError(f"{name}: soft labels must be probabilities summing to 1 per path (got "
                         f"row sums from {float(sums.min()):.4g} to {float(sums.max()):.4g}; "
                         "a classifier must return log-probabilities, e.g. log_softmax)")
    x = states.reshape(m * t_n, *states.shape[2:])
    tt = torch.as_tensor(list(times), dtype=torch.float32, device=states.device).repeat(m)
    return x, tt, targets.repeat_interleave(t_n, 0)


def train_noisy_classifier(net: NoisyClassifier, states: torch.Tensor, times: Sequence[float],
                           targets: torch.Tensor, *, epochs: int = 5, batch_size: int = 512,
                           lr: float = 2e-3, weight_decay: float = 0.0,
                           validation: tuple[torch.Tensor, torch.Tensor] | None = None,
                           seed: int = 0, log: Callable[[str], None] | None = None
                           ) -> FitHistory:
    """Fit ``net`` by :func:`soft_label_loss` on chain paths: ``states (M, T, C, H, W)`` at
    noise levels ``times (T,)``; every state of a path shares its soft label ``targets (M, K)``
    (e.g. ``classifier(X_K).exp()``). AdamW (decoupled ``weight_decay``) with cosine decay over
    ``epochs`` passes of shuffled (state, t) pairs.

    ``validation = (states, targets)`` of held-out paths (same ``times``): evaluated after each
    epoch, and the parameters of the best epoch are kept. At high noise the soft value is
    nearly constant while each path's label is a single draw, so a large network memorizes the
    labels after a few epochs: keep epochs few or hold paths out."""
    if int(epochs) < 1 or int(batch_size) < 1:
        raise ValueError(f"epochs, batch_size: expected positive integers, got {epochs}, "
                         f"{batch_size}")
    if not any(p.requires_grad for p in net.parameters()):
        raise ValueError("net: no parameter requires grad (load_noisy_classifier() returns a "
                         "frozen network: call net.requires_grad_(True) to fine-tune it)")
    x, tt, y = _pairs(states, times, targets, net.classes, "states/targets")
    valid = None if validation is None else _pairs(*validation[:1], times, validation[1],
                                                   net.classes, "validation")
    gen = torch.Generator(device=x.device).manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, max(1, int(epochs) * math.ceil(x.shape[0] / batch_size)))
    hist = FitHistory()
    best: dict[str, torch.Tensor] | None = None
    t0 = time.perf_counter()
    for ep in range(int(epochs)):
        perm = torch.randperm(x.shape[0], generator=gen, device=x.device)
        total = 0.0
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad()
            loss = soft_label_loss(net(x[idx], tt[idx]), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * idx.numel()
        hist.train.append(total / x.shape[0])
        msg = f"epoch {ep:3d}  t={time.perf_counter() - t0:6.1f}s  loss={hist.train[-1]:.4f}"
        if valid is not None:
            with torch.no_grad():
                vx, vt, vy = valid
                v = sum(float(soft_label_loss(net(vx[i:i + 8192], vt[i:i + 8192]),
                                              vy[i:i + 8192])) * vx[i:i + 8192].shape[0]
                        for i in range(0, vx.shape[0], 8192)) / vx.shape[0]
            hist.valid.append(v)
            msg += f"  held-out={v:.4f}"
            if v <= min(hist.valid):
                best = copy.deepcopy(net.state_dict())
                hist.best_epoch = ep
        if log is not None:
            log(msg)
        if not math.isfinite(hist.train[-1]):
            raise FloatingPointError(f"loss: not finite at epoch {ep}")
    if best is not None:
        net.load_state_dict(best)
    else:
        hist.best_epoch = int(epochs) - 1
    return hist


def fit_class_twist(model, steps: int, classifier: Callable[[torch.Tensor], torch.Tensor], *,
                    paths: int = 32768, held_out: int = 2048, epochs: int = 1,
                    net: NoisyClassifier | None = None, seed: int = 0,
                    log: Callable[[str], None] | None = None
                    ) -> tuple[NoisyClassifier, dict]:
    """The whole recipe: ``paths + held_out`` paths of ``model``'s plain ``steps``-step chain
    (:func:`~pathsmc.learn.chain_paths.chain_states`; ``model.class_labels`` of one row, e.g.
    the null class), soft labels ``classifier(X_K).exp()`` (``classifier`` maps samples
    ``(M, C, H, W)`` to log-probabilities ``(M, K)``; for a scalar reward bounded above use
    ``lambda x: bounded_reward_labels(r(x), upper).log()`` and a twist of class 1), and
    :func:`train_noisy_classifier` with the held-out paths for early stopping, all on the
    UNet's device. ``net`` defaults to a ``NoisyClassifier(dim, K)`` seeded by ``seed``.
    Returns the frozen network (``requires_grad_(False)``, ready for ``net.twist``) and a dict
    of what was done (paths, seconds, losses, best epoch, parameters)."""
    from pathsmc.learn.chain_paths import chain_states

    if int(held_out) < 1:
        raise ValueError(f"held_out: expected a positive integer, got {held_out}")
    dev = next((q.device for q in model.unet.parameters()), torch.device("cpu"))
    t0 = time.perf_counter()
    xs, times = chain_states(model, steps, paths=int(paths) + int(held_out),
                             generator=torch.Generator(device=dev).manual_seed(seed), device=dev)
    with torch.no_grad():
        labels = classifier(xs[:, -1]).exp()
    if labels.dim() != 2 or labels.shape[0] != xs.shape[0]:
        raise ValueError(f"classifier: expected log-probabilities ({xs.shape[0]}, K), got "
                         f"{tuple(labels.shape)}")
    sample_s = time.perf_counter() - t0
    if net is None:
        torch.manual_seed(seed)
        net = NoisyClassifier(xs[0, 0].numel(), labels.shape[1]).to(dev)
    p = int(paths)
    t0 = time.perf_counter()
    hist = train_noisy_classifier(net, xs[:p], times, labels[:p], epochs=epochs,
                                  validation=(xs[p:], labels[p:]), seed=seed, log=log)
    net.requires_grad_(False)
    info = {"paths": p, "held_out": int(held_out), "chain_steps": int(steps),
            "epochs": int(epochs), "best_epoch": hist.best_epoch, "train_loss": hist.train,
            "held_out_loss": hist.valid, "sample_seconds": sample_s,
            "fit_seconds": time.perf_counter() - t0,
            "params": sum(q.numel() for q in net.parameters())}
    return net, info
