"""CREPE on a diffusers chain (pathsmc.crepe.crepe with a DiffusersModel): exact level-0
moments for a denoiser whose chain is the exact time reversal of the scheduler's noising
process (the ε of N(0, I) data with DDPM's fixed_large variance), for a reward tilt, tempering
and a product; a perturbed step weight fails; a random tiny UNet runs end to end."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import pathsmc  # noqa: E402
from pathsmc.crepe import crepe  # noqa: E402
from pathsmc.integrations.diffusers import DiffusersModel  # noqa: E402
from pathsmc.models.exact_gaussian import ExactGaussianEps  # noqa: E402

SHAPE = (1, 2, 2)
THETA = torch.tensor([0.5, -0.3, 0.2, 0.0], dtype=torch.float64)


@pytest.fixture(scope="module")
def exact():
    sch = diffusers.DDPMScheduler(variance_type="fixed_large", clip_sample=False)
    # the last (deterministic) step maps x to √ᾱ₀ x: the data are N(0, ᾱ₀ I)
    return DiffusersModel(ExactGaussianEps(sch), sch, sample_shape=SHAPE), float(
        sch.alphas_cumprod[0])


def _reward(im: torch.Tensor) -> torch.Tensor:
    return (im.flatten(2).double() * THETA).sum(-1)


def _run(model, ops=None, **kw):
    kw = dict(dict(steps=20, num_levels=6, particles=128, batch=2, rounds=200, burn_in=50,
                   seed=0, dtype=torch.float64), **kw)
    return crepe(model, ops=ops, **kw)


def _within(mean, se, exact, z=4.5):
    assert bool(((mean - exact).abs() < z * se).all()), (mean, se, exact)


def test_one_model_accepts_every_swap(exact) -> None:
    model, _ = exact
    res = _run(model, rounds=20, burn_in=0)
    assert torch.allclose(res.swap_accept, torch.ones_like(res.swap_accept))
    assert res.samples.shape == (20, 2, 128, *SHAPE)


def test_reward_tilt_level0_mean(exact) -> None:
    # N(0, a I) e^{θ·y} = N(a θ, a I)
    model, a0 = exact
    res = _run(model, reward=_reward)
    mean, se = res.estimate(lambda s: s.flatten(3))
    _within(mean, se, a0 * THETA)


@pytest.mark.parametrize("kind", ["temper", "product"])
def test_sharpened_level0_second_moment(exact, kind) -> None:
    # temper β = 1/2: N(0, 2a I); product of two copies (β = 1, 1): N(0, a/2 I)
    model, a0 = exact
    if kind == "temper":
        res, var = _run(model, beta=0.5), a0 / 0.5
    else:
        res, var = _run([model, model], beta=[1.0, 1.0]), a0 / 2.0
    mean, se = res.estimate(lambda s: s.flatten(3) ** 2)
    _within(mean, se, torch.full((4,), var, dtype=torch.float64))


class _PerturbedOps:
    """pathsmc.ops with em_step's model-kernel coefficients scaled by 0.8 (a wrong weight)."""

    def __getattr__(self, name):
        return getattr(pathsmc.ops, name)

    @staticmethod
    def em_step(*args, ref_coefs=None, **kw):
        coefs = None if ref_coefs is None else [0.8 * c for c in ref_coefs]
        return pathsmc.ops.em_step(*args, ref_coefs=coefs, **kw)


def test_a_wrong_step_weight_fails(exact) -> None:
    model, a0 = exact
    res = _run(model, beta=0.5, ops=_PerturbedOps())
    mean, se = res.estimate(lambda s: s.flatten(3) ** 2)
    assert bool(((mean - 2 * a0).abs() > 6 * se).any()), (mean, se)


def test_random_unet_class_conditional_end_to_end() -> None:
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=3).eval()
    sch = diffusers.DDIMScheduler(num_train_timesteps=100)
    cond = DiffusersModel(unet, sch, class_labels=torch.tensor([0, 2]), chunk_size=64)
    null = cond.with_condition(class_labels=torch.tensor([1, 1]))
    res = crepe([cond, null], beta=[2.0, -1.0], reward=lambda im: im.mean((-1, -2, -3)),
                steps=8, num_levels=3, particles=4, batch=2, rounds=3, seed=1)
    assert res.samples.shape == (3, 2, 4, 1, 8, 8)
    assert torch.isfinite(res.samples).all() and torch.isfinite(res.swap_accept).all()
    assert res.model_calls > 0


def test_continuous_only_keys_name_themselves(exact) -> None:
    model, _ = exact
    for key, value in (("max_step", 0.01), ("level_times", [0.0, 1.0]), ("dim", 4)):
        with pytest.raises(ValueError, match=rf"^{key}: not used with a DiffusersModel"):
            crepe(model, rounds=1, **{key: value})
    with pytest.raises(ValueError, match="level_steps"):
        crepe(model, rounds=1, steps=10, level_steps=[9, 5, 5, 0])
    with pytest.raises(ValueError, match="adapt_times"):
        crepe(model, rounds=1, burn_in=4, adapt_times=1, steps=10, num_levels=3)


def test_reward_is_checked_up_front(exact) -> None:
    model, _ = exact
    with pytest.raises(ValueError, match=r"reward `.*` returned shape \(2, 4, 1\)"):
        crepe(model, reward=lambda im: im.flatten(2).sum(-1, keepdim=True), steps=10,
              num_levels=3, particles=4, batch=2, rounds=1)
