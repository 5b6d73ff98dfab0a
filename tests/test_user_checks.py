"""User functions are checked once, up front, and collapsed runs warn.

Each silent wrong answer of issue 10 (a negative β, a broadcast ∇V, NaN model output, a
reward tilt that collapses the weights) is an error or a :class:`CollapseWarning` here, and
a table of bad user functions checks that each error names the function and what was
expected.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from pathsmc.diagnostics import CollapseWarning
from pathsmc.diffusion import DiffusionModel, VPSchedule, steer
from pathsmc.targets import GaussianMixture, default_2d

VP = VPSchedule()
MIX1 = GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-2.0], [1.5]]),
                       torch.tensor([[0.3], [0.5]]))
M1 = DiffusionModel.from_mixture(MIX1, VP)
M2 = DiffusionModel.from_mixture(default_2d(), VP)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(model=M1, mode="temper", **kw):
    kw.setdefault("particles", 64)
    kw.setdefault("steps", 10)
    kw.setdefault("seed", 0)
    if mode == "temper":
        kw.setdefault("beta", 1.0)
    return steer(model, mode, **kw)


def quiet(f):
    """Run f with CollapseWarning turned into an error (a sound run must not warn)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        return f()


# ---- arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [-1.0, 0.0])
def test_temper_needs_a_positive_beta(beta):
    with pytest.raises(ValueError, match="β > 0"):
        run(beta=beta)


def test_temper_accepts_a_one_element_beta():
    a = quiet(lambda: run(beta=0.5))
    for beta in ([0.5], np.array([0.5]), torch.tensor([0.5])):
        b = quiet(lambda beta=beta: run(beta=beta))
        torch.testing.assert_close(a.log_z, b.log_z)


def test_product_with_the_wrong_number_of_betas_says_so():
    with pytest.raises(ValueError, match=r"one β per model; got 2 β for 1 model \(give the"):
        run([M1], "product", beta=[1.0, 1.0])


def test_a_bare_function_says_how_to_wrap_it():
    with pytest.raises(TypeError, match=r"wrap the function `.*M1_fn`: DiffusionModel\(fn"):
        run(M1_fn)


def M1_fn(x, t):
    return M1.fn(x, t)


# ---- user functions: a table of bad outputs ----------------------------------------------


def out_numpy(x, t):
    return M1.fn(x, t).numpy()


def out_float(x, t):
    return 0.5


def out_shape(x, t):
    return M1.fn(x, t)[..., :1].expand(*x.shape[:2], 3).contiguous()


def out_int(x, t):
    return M1.fn(x, t).long()


def out_device(x, t):
    return torch.empty(x.shape, device="meta")


def out_nan(x, t):
    return torch.full_like(x, float("nan"))


def out_factory(x, t):
    return out_nan


MODEL_CASES = [
    (out_numpy, TypeError, r"returned a numpy\.ndarray, expected a torch\.Tensor of shape "
     r"\(2, 64, 1\) like x"),
    (out_float, TypeError, r"returned a builtins\.float, expected a torch\.Tensor"),
    (out_shape, ValueError, r"returned shape \(2, 64, 3\), expected \(2, 64, 1\) like x"),
    (out_int, TypeError, r"returned dtype torch\.int64, expected a floating-point tensor"),
    (out_device, ValueError, r"returned a tensor on meta, expected cpu"),
    (out_nan, ValueError, r"returned 128 non-finite values"),
    (out_factory, TypeError, r"returned a builtins\.function, .*\(a factory\? call it first"),
]


@pytest.mark.parametrize("fn,exc,match", MODEL_CASES, ids=[c[0].__name__ for c in MODEL_CASES])
def test_bad_model_output_names_the_model(fn, exc, match):
    with pytest.raises(exc, match=rf"model `{__name__}:{fn.__name__}` {match}"):
        run(DiffusionModel(fn, VP, dim=1), batch=2)


def reward_of(out_fn):
    """A reward built from a model-output case: the same bad output, shaped (B, N) when fine."""
    def reward(x):
        out = out_fn(x, 1.0)
        return out[..., 0] if isinstance(out, torch.Tensor) and out.dim() == 3 else out
    reward.__qualname__ = f"reward_{out_fn.__name__}"
    return reward


@pytest.mark.parametrize("fn,exc,match", [c for c in MODEL_CASES if c[0] is not out_shape],
                         ids=[c[0].__name__ for c in MODEL_CASES if c[0] is not out_shape])
def test_bad_reward_output_names_the_reward(fn, exc, match):
    match = match.replace(r"\(2, 64, 1\) like x", r"\(2, 64\)").replace("128", "128")
    with pytest.raises(exc, match=rf"reward `{__name__}:reward_{fn.__name__}` {match}"):
        run(mode="reward", reward=reward_of(fn), batch=2)


def test_reward_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"reward `.*` returned shape \(2, 64, 1\), expected "
                                         r"\(2, 64\)"):
        run(mode="reward", reward=lambda x: x.double(), batch=2)


def test_value_gradient_is_not_broadcast():
    """∇V shaped (B, N, 1) for 2-D particles was broadcast silently and moved log Ẑ."""
    def value(x, t):
        return x.double().sum(-1) * 0.5, torch.full((*x.shape[:2], 1), 0.5, dtype=x.dtype)

    with pytest.raises(ValueError, match=r"value `.*value` \(∇V\) returned shape \(2, 64, 1\), "
                                         r"expected \(2, 64, 2\) like x"):
        run(M2, "twisted", value=value, batch=2)


def test_value_of_the_wrong_shape_and_a_failing_model():
    with pytest.raises(ValueError, match=r"value `.*` returned shape \(1, 64, 2\), expected "
                                         r"\(1, 64\)"):
        run(M2, "twisted", value=lambda x, t: x.double())
    # a model that fails on the first call: the error says what it was called with
    with pytest.raises(ValueError, match=r"failed on its first call, with x of shape "
                                         r"\(1, 64, 2\) \(B, N, D = dim\)"):
        run(DiffusionModel(M1.fn, VP, dim=2))


def test_a_value_without_a_gradient_says_so():
    """V alone, detached from x: the guidance's autograd failed with a bare torch error."""
    with pytest.raises(ValueError, match=r"value `.*` returned V without a gradient with "
                                         r"respect to x .* or pass guidance=0"):
        run(M2, "twisted", value=lambda x, t: x.detach().double().sum(-1))
    quiet(lambda: run(M2, "twisted", value=lambda x, t: 0.1 * x.double().sum(-1)))
    with pytest.raises(ValueError, match=r"guidance: reward `.*` at the model's denoised mean "
                                         r".* has no gradient"):
        run(mode="reward", reward=lambda x: x.detach().double()[..., 0], guidance=1.0)


@pytest.mark.parametrize("threshold", [-1.0, float("nan"), float("inf"), "0.5", True])
def test_threshold_must_be_a_number_at_least_zero(threshold):
    """threshold = -1 ran silently as 'never resample'."""
    with pytest.raises(ValueError, match=r"^threshold: expected a finite number >= 0"):
        run(threshold=threshold)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_without_cuda_says_so():
    with pytest.raises(RuntimeError, match=r"device: 'cuda' was asked for but CUDA is not "
                                           r"available"):
        run(device="cuda")


def test_log_prob_is_checked():
    bad = DiffusionModel(M1.fn, VP, log_prob=lambda x, t: torch.zeros(x.shape[:2]).numpy(), dim=1)
    with pytest.raises(TypeError, match=r"model\.log_prob `.*` returned a numpy\.ndarray"):
        run(bad)


def test_model_outputs_of_another_float_dtype_are_fine():
    """from_mixture returns float64 for float32 particles: accepted, and no warning."""
    res = quiet(lambda: run(batch=2))
    assert res.particles.dtype == torch.float32 and res.logw.dtype == torch.float64
    assert res.warnings == [] and res.dead_particles.tolist() == [0, 0]


# ---- collapse and dead particles ---------------------------------------------------------


def nan_late(x, t):
    """Fine at the first check, NaN everywhere after t < 0.5."""
    s = M1.fn(x, t)
    return torch.full_like(s, float("nan")) if t < 0.5 else s


def nan_half(x, t):
    """NaN for the particles at x > 0 once t < 0.5."""
    s = M1.fn(x, t)
    return torch.where(x > 0, float("nan"), s) if t < 0.5 else s


def test_uncorrected_nan_model_warns_and_counts():
    """Every particle NaN in 'uncorrected' gave log_z 0 and no report."""
    with pytest.warns(CollapseWarning, match=r"log Ẑ is not finite.*row 0: 64"):
        res = run(DiffusionModel(nan_late, VP, dim=1), "uncorrected")
    assert bool(torch.isnan(res.log_z).all())
    assert res.dead_particles.tolist() == [64]
    assert "WARNING" in res.summary()


def test_particles_killed_by_nan_are_counted_per_row():
    """Half the particles NaN: they were dropped silently."""
    with pytest.warns(CollapseWarning, match=r"particles died from non-finite .*row 0: \d+, "
                                             r"row 1: \d+"):
        res = run(DiffusionModel(nan_half, VP, dim=1), batch=2, particles=128)
    dead = res.dead_particles
    assert dead.shape == (2,) and bool((dead > 0).all())
    # at least the particles at x > 0 when the NaN start, about 70 % of 128 (mixture weight)
    assert bool((dead >= 40).all())
    assert "dead particles" in res.summary()


def test_reward_tilt_that_collapses_warns():
    """A tilt far from what the model generates: ESS 1, which was silent."""
    with pytest.warns(CollapseWarning, match=r"ESS fell below 3 of 64 particles in rows 0"):
        res = run(mode="reward", reward=lambda x: 200.0 * x.double().sum(-1))
    assert float(res.min_ess[0]) < 3.0
    assert res.warnings and "ESS fell below" in res.summary()


def test_sharpening_targets_resample_every_step_by_default():
    res = quiet(lambda: run(beta=2.0))
    assert bool(res.resampled[:-1].all())
    res = quiet(lambda: run(beta=0.5))
    assert not bool(res.resampled[:-1].all())
    res = quiet(lambda: run(beta=2.0, threshold=0.5))  # an explicit threshold wins
    assert not bool(res.resampled[:-1].all())


def test_generic_smc_counts_nan_weights():
    from pathsmc.smc import smc

    class NanModel:
        """Each step makes particle 0 of every row NaN (weights and state)."""

        num_steps = 3

        def init(self, batch, particles, generator):
            return [torch.zeros(batch, particles, 1)], torch.zeros(batch, particles,
                                                                  dtype=torch.float64)

        def step(self, k, states, logw, generator):
            x = states[0].clone()
            x[:, 0] = float("nan")
            logw = logw.clone()
            logw[:, 0] = float("nan")
            return [x], logw

    with pytest.warns(CollapseWarning, match="particles died"):
        res = smc(NanModel(), 8, 2, threshold=1.0)
    # resampled every step: one fresh death per row per step
    assert res.dead_particles.tolist() == [3, 3]
    with pytest.warns(CollapseWarning):
        res = smc(NanModel(), 8, 2, threshold=0.0)
    assert res.dead_particles.tolist() == [1, 1]  # never resampled: the same particle


# ---- pathsmc sample configs ----------------------------------------------------------------

USER_MODULE = '''
import numpy as np
import torch

def score(x, t, cond=None):
    return -x.double()

def score_3d(x, t):
    return -x.double()[..., :1].expand(*x.shape[:2], 3)

def score_np(x, t):
    return (-x).numpy()

def make_reward(scale):
    return lambda x: scale * x.double()[..., 0]

def reward(x):
    return x.double()[..., 0]
'''


def sample_config(tmp_path, **over):
    import json

    (tmp_path / "user_fns.py").write_text(USER_MODULE)
    cfg = {"particles": 16, "steps": 4, "dim": 2, "batch": 2,
           "model": {"path": "user_fns:score"},
           "steer": {"mode": "reward", "reward": "user_fns:reward"}}
    for k, v in over.items():  # model tables are merged, everything else replaced
        cfg[k] = {**cfg[k], **v} if k == "model" and isinstance(v, dict) else v
    path = tmp_path / "job.json"
    path.write_text(json.dumps(cfg))
    return path


SAMPLE_CASES = [
    ("condition rows", {"model": {"condition": [0, 1, 2]}},
     r"model\.condition: expected one entry per row \(first dimension batch = 2\)"),
    ("dim contradicts the model", {"model": {"path": "user_fns:score_3d"}},
     r"model\.path: model `user_fns:score_3d` returned shape \(2, 16, 3\), expected "
     r"\(2, 16, 2\) like x .*dim = 2"),
    ("numpy model", {"model": {"path": "user_fns:score_np"}},
     r"model\.path: model `user_fns:score_np` returned a numpy\.ndarray"),
    ("product dims", {"model": [{"path": "user_fns:score"}, {"path": "user_fns:score_3d"}],
                      "steer": {"mode": "product", "beta": [0.5, 0.5]}},
     r"model\[1\]\.path: model\[1\] `user_fns:score_3d` returned shape \(2, 16, 3\)"),
    ("factory without args", {"steer": {"mode": "reward", "reward": "user_fns:make_reward"}},
     r"steer\.reward: reward `user_fns:make_reward` returned a builtins\.function, .*"
     r"\(a factory\? call it first"),
]


@pytest.mark.parametrize("over,match", [c[1:] for c in SAMPLE_CASES],
                         ids=[c[0] for c in SAMPLE_CASES])
def test_sample_config_errors_name_the_key(tmp_path, over, match):
    from pathsmc.commands.sample import ConfigError, run_sample

    path = sample_config(tmp_path, **over)
    with pytest.raises(ConfigError, match=match):
        run_sample(path, out=tmp_path / "out", progress=False)


def test_sample_reward_factory_with_its_args_runs(tmp_path):
    from pathsmc.commands.sample import run_sample

    path = sample_config(tmp_path, steer={"mode": "reward", "reward": "user_fns:make_reward",
                                          "reward_args": {"scale": 0.5}})
    assert run_sample(path, out=tmp_path / "out", progress=False) == 0


# ---- the spread of log Ẑ across replicate rows ---------------------------------------------

M2D = M2  # a 2-D mixture; p^3 with a handful of particles spreads log Ẑ by nats


def test_spread_across_replicate_rows_warns():
    """β = 3 on the 2-D mixture, 16 particles: every row finishes (ESS fine in most rows), but
    log Ẑ spreads by ~1.8 nats across the 32 replicate rows — the estimate is meaningless."""
    with pytest.warns(CollapseWarning, match=r"log Ẑ spreads by \d\.\d\d nats \(sd\) across 32 "
                                             r"replicate rows"):
        res = run(M2D, beta=3.0, particles=16, steps=50, batch=32)
    assert res.replicate_spread()["sd"] > 1.0
    assert any("spreads" in w for w in res.warnings) and "spreads" in res.summary()


def test_spread_is_checked_only_for_replicates():
    # the same run with the rows declared different problems: no spread message
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CollapseWarning)
        res = run(M2D, beta=3.0, particles=16, steps=50, batch=32, replicates=False)
    assert res.replicate_spread()["sd"] > 1.0
    assert not any("spreads" in w for w in res.warnings)
    # conditioned rows are not replicates by default; reward rows only when told so
    cond = DiffusionModel(lambda x, t, c: M2.fn(x, t), VP, condition=torch.zeros(32), dim=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CollapseWarning)
        res = run(cond, beta=3.0, particles=16, steps=50, batch=32)
    assert not any("spreads" in w for w in res.warnings)
    with pytest.warns(CollapseWarning, match="replicate rows"):
        run(M2D, "reward", reward=lambda x: 3.0 * x.double()[..., 0], particles=4, steps=20,
            batch=32, replicates=True)


def test_sound_replicates_do_not_warn():
    res = quiet(lambda: run(M2D, beta=0.5, particles=256, steps=20, batch=32))
    assert res.replicate_spread()["sd"] < 0.3 and res.warnings == []


def test_spread_message_limits():
    from pathsmc.diagnostics import SPREAD_LIMIT, spread_message

    lz = torch.tensor([0.0, 1.0, 2.0, 3.0, -3.0, float("-inf")], dtype=torch.float64)
    assert "across 5 replicate rows" in spread_message(lz)  # the −inf row is left out
    assert spread_message(lz[:3]) is None  # too few rows to tell
    # sd 0.92 (n − 1 in the denominator): under the limit
    assert spread_message(0.8 * SPREAD_LIMIT * torch.tensor([1.0, -1.0, 1.0, -1.0])) is None


def test_sample_report_warns_on_spread(tmp_path, capsys):
    from pathsmc.commands.sample import run_sample

    path = sample_config(tmp_path, batch=16, particles=4, steps=20,
                         steer={"mode": "reward", "reward": "user_fns:make_reward",
                                "reward_args": {"scale": 4.0}})
    run_sample(path, out=tmp_path / "out", progress=False)
    assert "WARNING: log Ẑ spreads by" in capsys.readouterr().out
    # with a per-row condition the rows are different problems: no spread line
    path = sample_config(tmp_path, batch=16, particles=4, steps=20,
                         model={"condition": list(range(16))},
                         steer={"mode": "reward", "reward": "user_fns:make_reward",
                                "reward_args": {"scale": 4.0}})
    run_sample(path, out=tmp_path / "out2", progress=False)
    assert "spreads" not in capsys.readouterr().out
