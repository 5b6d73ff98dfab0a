"""Train the shipped digits models: the class-conditional DDPM, the two classifiers and the
learned twist.

    nice -n 10 .venv/bin/python tools/train_digits.py --steps 16000 --threads 1

writes into ``python/pathsmc/models/weights/``:

- ``digits_unet.safetensors`` + ``digits_unet.json``: the ``UNet2DModel`` (EMA of the weights)
  and the UNet/DDPM-scheduler configs. Class labels 0..9, label 10 = unconditional; the label
  is replaced by 10 with probability ``--p-uncond`` during training (classifier-free guidance).
- ``digits_reward_cnn.safetensors``: the reward CNN (trained on the train split).
- ``digits_judge_logreg.safetensors``: the judge, scikit-learn logistic regression on pixels
  (coefficients only; no pickle).
- ``digits_noisy_classifier.safetensors``: a learned twist for the class rewards, the
  :class:`~pathsmc.learn.NoisyClassifier` ``log q_θ(k | x_t, t) ≈ log E[p₁(k | X₀) | x_t]`` fit
  by soft-label regression on paths of the shipped UNet's unconditional ``--noisy-steps`` chain
  labelled by the reward CNN (``--noisy-only`` retrains just this one).
- ``digits_training.json``: steps, wall time, final loss, held-out accuracies.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pathsmc.models import digits
from pathsmc.models.digits_arch import (
    NULL_CLASS,
    SCHEDULER_CONFIG,
    UNET_CONFIG,
    DigitCNN,
    LinearJudge,
    build_scheduler,
    build_unet,
)


def accuracy(log_probs: torch.Tensor, y: torch.Tensor) -> float:
    return float((log_probs.argmax(-1) == y).float().mean())


def train_reward(steps: int, seed: int) -> tuple[DigitCNN, float]:
    """The CNN on the train split, with mild noise augmentation (x̂₀ is never exactly clean)."""
    x, y = digits.digits_data("train")
    xt, yt = digits.digits_data("test")
    g = torch.Generator().manual_seed(seed)
    model = DigitCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        i = torch.randint(0, len(y), (128,), generator=g)
        sigma = 0.2 * torch.rand(128, 1, 1, 1, generator=g)
        xb = (x[i] + sigma * torch.randn(x[i].shape, generator=g)).clamp(-1, 1)
        loss = F.nll_loss(model(xb), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return model, accuracy(model(xt), yt)


def train_judge() -> tuple[LinearJudge, float]:
    from sklearn.linear_model import LogisticRegression

    x, y = digits.digits_data("train")
    xt, yt = digits.digits_data("test")
    clf = LogisticRegression(C=0.1, max_iter=2000).fit(x.flatten(1).numpy(), y.numpy())
    judge = LinearJudge(torch.tensor(clf.coef_), torch.tensor(clf.intercept_))
    with torch.no_grad():
        return judge, accuracy(judge(xt), yt)


def train_unet(steps: int, batch: int, lr: float, p_uncond: float, seed: int):
    """ε-prediction DDPM loss on all 1797 digits; returns (EMA model, final loss, loss log)."""
    x, y = digits.digits_data("all")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    unet = build_unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    sched = build_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    lr_at = lambda s: lr * min(1.0, (s + 1) / 200) * 0.5 * (1 + torch.cos(  # noqa: E731
        torch.tensor(torch.pi * s / steps)).item()) + 1e-5
    T = sched.config.num_train_timesteps
    history, recent = [], []
    t_start = time.perf_counter()
    for s in range(steps):
        i = torch.randint(0, len(y), (batch,), generator=g)
        x0 = x[i]
        labels = torch.where(torch.rand(batch, generator=g) < p_uncond, NULL_CLASS, y[i])
        t = torch.randint(0, T, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt = sched.add_noise(x0, noise, t)
        loss = F.mse_loss(unet(xt, t, class_labels=labels).sample, noise)
        for group in opt.param_groups:
            group["lr"] = lr_at(s)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(0.999, (1 + s) / (10 + s))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        recent.append(loss.item())
        if s + 1 == 50:
            print(f"first 50 steps: {(time.perf_counter() - t_start) / 50:.3f} s/step", flush=True)
        if (s + 1) % 250 == 0:
            history.append((s + 1, sum(recent) / len(recent)))
            print(f"step {s + 1}/{steps}  loss {history[-1][1]:.4f}", flush=True)
            recent = []
    return ema.eval(), history[-1][1] if history else float("nan"), history


def train_noisy(paths: int, held_out: int, steps: int, epochs: int, seed: int, out: Path):
    """The noisy classifier on the chain of the UNet and reward CNN found in ``out``."""
    from pathsmc.integrations.diffusers import DiffusersModel
    from pathsmc.learn import NoisyClassifier, fit_class_twist

    config = json.loads((out / digits.UNET_CONFIG_FILE).read_text())
    unet = build_unet(config["unet"])
    unet.load_state_dict(digits._load(digits.UNET_FILE, out))
    unet.eval().requires_grad_(False)
    reward = DigitCNN()
    reward.load_state_dict(digits._load(digits.REWARD_FILE, out))
    reward.eval().requires_grad_(False)
    model = DiffusersModel(unet, build_scheduler(config["scheduler"]),
                           class_labels=torch.tensor([NULL_CLASS]))
    torch.manual_seed(seed)
    net = NoisyClassifier(64, digits.NUM_CLASSES, **digits.NOISY_ARCH)
    net, info = fit_class_twist(model, steps, reward, paths=paths, held_out=held_out,
                                epochs=epochs, net=net, seed=seed,
                                log=lambda m: print(m, flush=True))
    info["arch"] = digits.NOISY_ARCH
    return net.eval(), info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=16000, help="UNet optimiser steps")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--p-uncond", type=float, default=0.15, help="null-class dropout")
    p.add_argument("--classifier-steps", type=int, default=1500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-unet", action="store_true",
                   help="only (re)train the classifiers and the noisy classifier")
    p.add_argument("--noisy-paths", type=int, default=32768,
                   help="plain-chain paths for the noisy classifier (+ 2048 held out)")
    p.add_argument("--noisy-steps", type=int, default=50, help="chain steps of those paths")
    p.add_argument("--noisy-epochs", type=int, default=1,
                   help="more overfits: each path carries one draw of its label")
    p.add_argument("--noisy-only", action="store_true",
                   help="only (re)train the noisy classifier, on the models in --out")
    p.add_argument("--out", type=Path, default=digits.WEIGHTS_DIR)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from safetensors.torch import save_file

    a.out.mkdir(parents=True, exist_ok=True)
    info_path = a.out / digits.INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.exists() else {}

    if a.noisy_only:
        a.skip_unet = True
    t0 = time.perf_counter()
    reward, reward_acc = (None, None) if a.noisy_only else train_reward(a.classifier_steps,
                                                                       a.seed)
    if not a.noisy_only:
        judge, judge_acc = train_judge()
        save_file({k: v.contiguous() for k, v in reward.state_dict().items()},
                  a.out / digits.REWARD_FILE)
        save_file({"coef": judge.coef.contiguous(), "intercept": judge.intercept.contiguous()},
                  a.out / digits.JUDGE_FILE)
        info["classifiers"] = {
            "reward_cnn_test_accuracy": reward_acc,
            "judge_logreg_test_accuracy": judge_acc,
            "test_images": len(digits.digits_data("test")[1]),
            "seconds": time.perf_counter() - t0,
        }
        print(f"reward CNN held-out accuracy {reward_acc:.4f}; judge {judge_acc:.4f}",
              flush=True)

    if not a.skip_unet:
        t0 = time.perf_counter()
        unet, final_loss, history = train_unet(a.steps, a.batch, a.lr, a.p_uncond, a.seed)
        seconds = time.perf_counter() - t0
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()},
                  a.out / digits.UNET_FILE)
        config = {"unet": {k: list(v) if isinstance(v, tuple) else v
                           for k, v in UNET_CONFIG.items()},
                  "scheduler": SCHEDULER_CONFIG}
        (a.out / digits.UNET_CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
        info["unet"] = {"steps": a.steps, "batch": a.batch, "lr": a.lr, "p_uncond": a.p_uncond,
                        "threads": a.threads, "seconds": seconds,
                        "final_loss_last_250_steps": final_loss, "loss_history": history}
        print(f"UNet: {a.steps} steps in {seconds:.0f} s, final loss {final_loss:.4f}")
    noisy, info["noisy_classifier"] = train_noisy(a.noisy_paths, 2048, a.noisy_steps,
                                                  a.noisy_epochs, a.seed, a.out)
    save_file({k: v.contiguous() for k, v in noisy.state_dict().items()},
              a.out / digits.NOISY_FILE)
    print(f"noisy classifier: held-out cross-entropy "
          f"{min(info['noisy_classifier']['held_out_loss']):.4f}")
    info_path.write_text(json.dumps(info, indent=1) + "\n")


if __name__ == "__main__":
    main()
