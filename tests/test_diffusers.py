"""DiffusersModel: the scheduler's chain reproduced exactly, and steering weighted with its exact
Gaussian kernels (tiny random networks built from configs; no downloads)."""

from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from pathsmc.diffusion import steer, steering_model  # noqa: E402
from pathsmc.integrations.diffusers import DiffusersModel  # noqa: E402
from pathsmc.models.exact_gaussian import ExactGaussianEps  # noqa: E402

STEPS = 10
UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
            layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


def _unet(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(**{**UNET, **kw}).eval()


@pytest.fixture(scope="module")
def unet():
    return _unet()


def _reward(im: torch.Tensor) -> torch.Tensor:
    return 2.0 * im[..., 0, :4, :4].flatten(2).mean(-1).double()


SCHEDULERS = [
    ("ddpm", "epsilon", "fixed_small"), ("ddpm", "v_prediction", "fixed_small"),
    ("ddpm", "sample", "fixed_large"), ("ddim", "epsilon", None), ("ddim", "v_prediction", None),
    ("ddim", "sample", None), ("flow", None, None),
]


def _scheduler(kind, prediction, variance, **kw):
    if kind == "ddpm":
        return diffusers.DDPMScheduler(prediction_type=prediction, variance_type=variance, **kw)
    if kind == "ddim":
        return diffusers.DDIMScheduler(prediction_type=prediction, **kw)
    return diffusers.FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)


@pytest.mark.parametrize("kind,prediction,variance", SCHEDULERS)
@pytest.mark.parametrize("clip", [True, False])
def test_step_equals_scheduler_step(unet, kind, prediction, variance, clip):
    kw = {} if kind == "flow" else dict(clip_sample=clip, clip_sample_range=0.5)
    sch = _scheduler(kind, prediction, variance, **kw)
    model = DiffusersModel(unet, sch, eta=0.7)
    ref = type(sch).from_config(sch.config)
    ref.set_timesteps(STEPS)
    x = torch.randn(2, 3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for k, t in enumerate(ref.timesteps):
        noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(k))
        with torch.no_grad():
            out = unet(x.reshape(6, 1, 8, 8), t).sample
        if kind == "ddim":
            opts = dict(eta=0.7, variance_noise=noise)
        else:  # DDPM and flow draw the noise from the generator: the same draw
            opts = dict(generator=torch.Generator().manual_seed(k))
        want = ref.step(out, t, x.reshape(6, 1, 8, 8), **opts).prev_sample.reshape(x.shape)
        got = model.step(k, x, noise.reshape(x.shape), steps=STEPS)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        x = want


@pytest.mark.parametrize("kind,prediction,variance", SCHEDULERS[::3])
def test_no_reward_every_increment_zero(unet, kind, prediction, variance):
    # a product of the model with itself (β = ½, ½) and a zero reward are the plain chain
    model = DiffusersModel(unet, _scheduler(kind, prediction, variance))
    res = steer([model, model], "product", beta=(0.5, 0.5), particles=8, batch=2,
                steps=STEPS, seed=0)
    assert torch.equal(res.logw, torch.zeros_like(res.logw))
    # the plain chain, weighted (β = 1), with the same draws
    plain = steer(model, "temper", beta=1.0, particles=8, batch=2, steps=STEPS, seed=0)
    assert torch.equal(plain.logw, torch.zeros_like(plain.logw))
    torch.testing.assert_close(res.particles, plain.particles)
    zero = steer(model, "reward", reward=lambda im: torch.zeros(im.shape[:2],
                                                                dtype=torch.float64),
                 particles=8, batch=2, steps=STEPS, seed=0)
    assert torch.equal(zero.log_z, torch.zeros(2, dtype=torch.float64))


def _diffusers_log_mean_exp(unet, sch, reward, m: int, seed: int) -> tuple[float, float]:
    """log mean exp(r) over samples of diffusers' own loop, with its delta-method SE."""
    s = type(sch).from_config(sch.config)
    s.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 1, 8, 8, generator=g)
    with torch.no_grad():
        for t in s.timesteps:
            x = s.step(unet(x, t).sample, t, x, generator=g).prev_sample
    w = reward(x[None])[0].exp()
    return w.mean().log().item(), (w.std() / w.mean()).item() / math.sqrt(m)


@pytest.fixture(scope="module")
def ddpm_truth(unet):
    return _diffusers_log_mean_exp(unet, diffusers.DDPMScheduler(), _reward, 2000, seed=1)


@pytest.mark.parametrize("guidance,t_start", [(0.0, 1.0), (0.1, 1.0), (1.0, 0.5)])
def test_reward_log_z_matches_diffusers_loop(unet, ddpm_truth, guidance, t_start):
    sch = diffusers.DDPMScheduler()
    truth, se = ddpm_truth
    model = DiffusersModel(unet, sch, t_start=t_start)
    res = steer(model, "reward", reward=_reward, guidance=guidance, particles=256, batch=4,
                steps=STEPS, seed=3)
    lz = res.log_z
    assert bool(torch.isfinite(lz).all())
    se_smc = lz.std().item() / math.sqrt(lz.numel())
    tol = 5.0 * math.sqrt(se * se + se_smc * se_smc) + 0.01
    assert abs(lz.mean().item() - truth) < tol, (lz.tolist(), truth, se)


@pytest.mark.parametrize("potential,guidance,t_start", [("difference", 0.0, 1.0),
                                                         ("max", 0.0, 0.5),
                                                         ("difference", 1.0, 1.0)])
def test_class_rewards_sum_to_one(potential, guidance, t_start):
    """An exact answer with no reference sampler: for a classifier's reward
    r_k = log p(k | x), Σ_k Z_k = E[Σ_k p(k | X)] = 1, so the class-summed mean of the unbiased
    Ẑ_k over replicate rows is 1 within its Monte Carlo error. The denoiser is the exact ε of
    N(0, I) data, so Tweedie's x̂₀ is the posterior mean and the weights stay tame (on a random
    network's x̂₀ a sharp classifier makes Ẑ so heavy-tailed that sample means sit below 1:
    docs/diffusers.md). The identity holds for any normalized kernels, so it checks the
    potentials (a 0.7× first potential gives 1.41 ± 0.03 for 'max'), not which chain is
    weighted: the kernels are checked above and below."""
    k, reps, shape = 3, 48, (1, 4, 4)
    w = torch.randn(16, k, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    classes = torch.arange(k).repeat(reps)

    def reward(im):  # (B, n, 1, 4, 4) -> log p(k_b | x), a random linear softmax classifier
        lp = (0.35 * im.double().flatten(2) @ w).log_softmax(-1)
        return lp.gather(-1, classes.view(-1, 1, 1).expand(*lp.shape[:2], 1))[..., 0]

    sch = diffusers.DDPMScheduler(variance_type="fixed_large", clip_sample=False)
    model = DiffusersModel(ExactGaussianEps(sch), sch, sample_shape=shape, t_start=t_start,
                           chunk_size=4096)
    res = steer(model, "reward", reward=reward, potential=potential, guidance=guidance,
                particles=64, batch=k * reps, steps=STEPS, threshold=0.9, seed=0, progress=False)
    assert guidance or bool(res.resampled.any())  # (exact-score guidance keeps ESS > 0.9 N)
    z = res.log_z.exp().reshape(reps, k)
    assert bool((z.mean(0) > 0.15).all() and (z.mean(0) < 0.6).all()), z.mean(0)
    total = z.sum(1)
    se = total.std().item() / math.sqrt(reps)
    assert se < 0.04
    assert abs(total.mean().item() - 1.0) < 4.0 * se + 0.005, (total.mean().item(), se)


def test_one_step_weight_by_hand(unet):
    """The increment of a temper step, from the states before and after it:
    β log N(x'; μ, s²) + (1 − β) log N(x; a x', var_f) − log N(x'; μ_prop, s²)."""
    model = DiffusersModel(unet, diffusers.DDPMScheduler())
    fk = steering_model(model, "temper", beta=0.6, steps=STEPS)
    g = torch.Generator().manual_seed(0)
    states, logw = fk.init(2, 4, g)
    x, prop, mu = states[0], states[1], states[2]
    new, logw2 = fk.step(0, states, logw, g)
    st = fk.chain.steps[0]
    n = torch.distributions.Normal

    def lp(y, mean, std):
        return n(mean.double(), std).log_prob(y.double()).flatten(2).sum(-1)

    x1 = new[0]
    want = (0.6 * lp(x1, mu, st.std) + 0.4 * lp(x, st.fwd_a * x1, math.sqrt(st.fwd_var))
            - lp(x1, prop, st.std))
    torch.testing.assert_close(logw2 - logw, want, rtol=1e-6, atol=1e-6)
    # the initial weight: (β − 1) log N(x; 0, I)
    torch.testing.assert_close(logw, -0.4 * lp(x, torch.zeros_like(x), 1.0))


def test_cfg_identities_class_conditional():
    unet = _unet(num_class_embeds=3)
    sch = diffusers.DDIMScheduler()
    cond = DiffusersModel(unet, sch, class_labels=torch.tensor([0, 2]))
    null = cond.with_condition(class_labels=torch.tensor([1, 1]))
    # CFG with w = 1 is the conditional model
    cfg = steer([cond, null], "product", beta=(1.0, 0.0), particles=8, batch=2, steps=STEPS,
                seed=0)
    plain = steer(cond, "temper", beta=1.0, particles=8, batch=2, steps=STEPS, seed=0)
    torch.testing.assert_close(cfg.particles, plain.particles)
    assert torch.equal(cfg.log_z, torch.zeros(2, dtype=torch.float64))
    # w = 3: finite weights, and the rows see their own labels
    res = steer([cond, null], "product", beta=(3.0, -2.0), particles=8, batch=2, steps=STEPS,
                seed=0)
    assert bool(torch.isfinite(res.log_z).all())
    other = steer(cond.with_condition(class_labels=torch.tensor([0, 1])), "temper", beta=1.0,
                  particles=8, batch=2, steps=STEPS, seed=0)
    torch.testing.assert_close(other.particles[0], plain.particles[0])
    assert not torch.allclose(other.particles[1], plain.particles[1])


def test_chunked_equals_unchunked(unet):
    kw = dict(reward=_reward, guidance=0.5, particles=12, batch=2, steps=STEPS, seed=0)
    big = steer(DiffusersModel(unet, diffusers.DDPMScheduler(), chunk_size=1000), "reward",
                **kw)
    small = steer(DiffusersModel(unet, diffusers.DDPMScheduler(), chunk_size=6), "reward",
                  **kw)
    torch.testing.assert_close(small.particles, big.particles, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small.log_z, big.log_z, atol=1e-6, rtol=1e-6)


def test_every_mode_with_image_states(unet):
    model = DiffusersModel(unet, diffusers.DDIMScheduler(), chunk_size=8)

    def value(x, t):
        return -0.5 * (1.0 - t) * x.flatten(2).pow(2).mean(-1).double()

    common = dict(particles=6, batch=2, steps=5, seed=0)
    runs = {
        "reward": steer(model, "reward", reward=_reward, guidance=0.2, **common),
        "temper": steer(model, "temper", beta=0.8, **common),
        "product": steer([model, model], "product", beta=(0.7, 0.5), **common),
        "twisted": steer(model, "twisted", value=value, reward=_reward, **common),
        "uncorrected": steer(model, "uncorrected", reward=_reward, **common),
    }
    for mode, res in runs.items():
        assert res.particles.shape == (2, 6, 1, 8, 8), mode
        assert bool(torch.isfinite(res.log_z).all()), mode
        assert bool(torch.isfinite(res.particles).all()), mode


def test_guidance_leaks_no_graph_into_the_results(unet):
    # DDPM's kernel mean has an x term: the means that feed the weights must be taken at a
    # graph-free x, or logw / log Ẑ / particles carry autograd graphs across steps
    model = DiffusersModel(unet, diffusers.DDPMScheduler(), chunk_size=8)
    res = steer(model, "reward", reward=_reward, guidance=0.2, particles=6, batch=2, steps=5,
                seed=0)
    for name in ("logw", "log_z", "particles"):
        assert not getattr(res, name).requires_grad, name


def test_cross_attention_unet_and_latent_decode():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
        attention_head_dim=2, norm_num_groups=4).eval()
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=1, block_out_channels=(4,),
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=2, layers_per_block=1, sample_size=8).eval()
    seen = []

    def decode(z):
        return vae.decode(z / 0.18215).sample

    def reward(img):
        seen.append(tuple(img.shape))
        return img.flatten(2).mean(-1).double()

    emb = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1))
    cond = DiffusersModel(unet, diffusers.DDPMScheduler(), encoder_hidden_states=emb,
                          decode=decode, chunk_size=6)
    null = cond.with_condition(encoder_hidden_states=torch.zeros(2, 4, 8))
    res = steer([cond, null], "product", beta=(2.0, -1.0), particles=4, batch=2, steps=4,
                seed=0)
    assert res.particles.shape == (2, 4, 1, 8, 8)
    assert bool(torch.isfinite(res.log_z).all())
    res = steer(cond, "reward", reward=reward, guidance=0.5, particles=4, batch=2, steps=4,
                seed=0)
    assert bool(torch.isfinite(res.log_z).all())
    # decoded 3-channel images, in chunks of at most 6 // B = 3 particles of every row
    assert seen and all(s[0] == 2 and s[1] <= 3 and s[2:] == (3, 8, 8) for s in seen), seen
    assert {s[1] for s in seen} == {3, 1}


def test_errors(unet):
    with pytest.raises(ValueError, match="eta"):
        DiffusersModel(unet, diffusers.DDIMScheduler(), eta=0.0)
    with pytest.raises(ValueError, match="stochastic_sampling"):
        DiffusersModel(unet, diffusers.FlowMatchEulerDiscreteScheduler())
    with pytest.raises(TypeError, match="scheduler"):
        DiffusersModel(unet, diffusers.EulerDiscreteScheduler())
    with pytest.raises(ValueError, match="t_start"):
        DiffusersModel(unet, diffusers.DDPMScheduler(), t_start=0.0)
    model = DiffusersModel(unet, diffusers.DDPMScheduler())
    with pytest.raises(ValueError, match="weighting"):
        steer(model, "temper", beta=0.5, weighting="density", particles=2, steps=2)
    with pytest.raises(ValueError, match="times"):
        steer(model, "temper", beta=0.5, times=[1.0, 0.5, 0.0], particles=2, steps=2)


def test_potential_scale_keeps_the_target():
    """λ(t)·r on the intermediate potentials, r at the end: without resampling every path's
    weight is still exactly r(x_K); with it, Σ_k Ẑ_k = 1 holds; bad scales are named."""
    k, reps, shape = 3, 48, (1, 4, 4)
    w = torch.randn(16, k, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    classes = torch.arange(k).repeat(reps)

    def reward(im):  # row b asks for class b mod k (any batch that is a multiple of k)
        lp = (0.35 * im.double().flatten(2) @ w).log_softmax(-1)
        c = classes[:lp.shape[0]].view(-1, 1, 1).expand(*lp.shape[:2], 1)
        return lp.gather(-1, c)[..., 0]

    sch = diffusers.DDPMScheduler(variance_type="fixed_large", clip_sample=False)
    seen = []

    def lam(t):
        seen.append(t)
        return 0.6 * (1.0 - t) ** 2  # λ(0) = 0.6: the final potential must stay r

    model = DiffusersModel(ExactGaussianEps(sch), sch, sample_shape=shape, chunk_size=4096,
                           potential_scale=lam)
    plain = steer(model, "reward", reward=reward, particles=8, batch=k, steps=STEPS,
                  threshold=0.0, seed=1, progress=False)
    torch.testing.assert_close(plain.logw, reward(plain.particles))
    assert len(seen) == STEPS and min(seen) >= 0.0  # evaluated once per step, up front
    unscaled = steer(DiffusersModel(ExactGaussianEps(sch), sch, sample_shape=shape),
                     "reward", reward=reward, particles=8, batch=k, steps=STEPS, threshold=1.0,
                     seed=1, progress=False)
    scaled = steer(model, "reward", reward=reward, particles=8, batch=k, steps=STEPS,
                   threshold=1.0, seed=1, progress=False)
    assert not torch.allclose(scaled.logw, unscaled.logw)  # the scale acts on the way
    res = steer(model, "reward", reward=reward, guidance=1.0, particles=64, batch=k * reps,
                steps=STEPS, threshold=0.9, seed=0, progress=False)
    total = res.log_z.exp().reshape(reps, k).sum(1)
    se = total.std().item() / math.sqrt(reps)
    assert se < 0.04 and abs(total.mean().item() - 1.0) < 4.0 * se + 0.005
    with pytest.raises(TypeError, match="potential_scale"):
        DiffusersModel(ExactGaussianEps(sch), sch, sample_shape=shape, potential_scale=2.0)
    bad = DiffusersModel(ExactGaussianEps(sch), sch, sample_shape=shape,
                         potential_scale=lambda t: float("nan"))
    with pytest.raises(ValueError, match="potential_scale: not finite"):
        steer(bad, "reward", reward=reward, particles=4, batch=k, steps=STEPS, progress=False)
