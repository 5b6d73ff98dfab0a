"""The main job (``pathsmc demo``): log Ẑ and the posterior mean against the exact answers.

Independent runs are the B rows of one batched SMC (fixed seeds), so the standard error of
the mean over runs is estimated from the runs themselves. The hand-written loop
(:func:`run_tilted_smc`) is also checked to fail loudly when the step weight is wrong; the
table of every steering mode (:func:`run_steering_table`) is checked against its exact
answers, and the command end to end (table rows, one PNG per mode).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import faulty_ops

import pathsmc.ops as ops
import pathsmc.reference as reference
from pathsmc.cli import main
from pathsmc.commands.demo import (
    DEFAULT_THETA,
    STEER_MODES,
    TiltedSMCResult,
    case_stats,
    format_steering_table,
    run_steering_table,
    run_tilted_smc,
)
from pathsmc.targets import default_2d

RUNS = 8
K_SE = 4.5  # a correct sampler is within 4.5 SE (t with 7 dof: p ≈ 0.003 per check)


@pytest.fixture(scope="module")
def problem():
    mixture = default_2d()
    theta = torch.tensor(DEFAULT_THETA, dtype=torch.float64)
    tilt = mixture.linear_tilt(theta)
    return mixture, theta, float(tilt.log_z), tilt.mixture.mean()


def z_scores(res: TiltedSMCResult, log_z: float, mean: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(log Ẑ − log Z) and (posterior mean − exact mean) in standard errors over runs."""
    n = res.log_z.numel()
    lz = res.log_z
    z_lz = (float(lz.mean()) - log_z) / (float(lz.std()) / math.sqrt(n) + 1e-3)
    pm = res.posterior_mean()
    z_pm = (pm.mean(0) - mean) / (pm.std(0) / math.sqrt(n) + 1e-3)
    return z_lz, z_pm


@pytest.mark.parametrize("twist,steps", [("value", 40), ("tweedie", 40), ("value", 8)])
@pytest.mark.parametrize("module", [ops, reference], ids=["ops", "reference"])
def test_log_z_and_mean_match_exact(problem, module, twist: str, steps: int) -> None:
    mixture, theta, log_z, mean = problem
    res = run_tilted_smc(mixture, theta, particles=512, steps=steps, runs=RUNS, ops=module,
                         seed=11, twist=twist)
    assert res.log_z.shape == (RUNS,) and res.particles.shape == (RUNS, 512, 2)
    assert bool(torch.isfinite(res.log_z).all())
    assert bool(((res.ess >= 1) & (res.ess <= 512 + 1e-6)).all())
    z_lz, z_pm = z_scores(res, log_z, mean)
    assert abs(z_lz) < K_SE, (res.log_z, log_z)
    assert bool((z_pm.abs() < K_SE).all()), (res.posterior_mean(), mean)


def test_exact_value_twist_is_sharp(problem) -> None:
    """With the exact soft value and its guidance only the discretization is left to weight:
    log Ẑ is within a few hundredths of the exact value in every run."""
    mixture, theta, log_z, _ = problem
    res = run_tilted_smc(mixture, theta, particles=512, steps=40, runs=RUNS, seed=5,
                         twist="value", guidance=True)
    assert float((res.log_z - log_z).abs().max()) < 0.15
    assert float(res.ess.min()) > 0.5 * 512


@pytest.mark.parametrize("module", [ops, reference], ids=["ops", "reference"])
def test_on_device(problem, device: str, module) -> None:
    """The same job with the particles on ``device`` (CUDA when the extension has kernels)."""
    mixture, theta, log_z, mean = problem
    res = run_tilted_smc(mixture, theta, particles=512, steps=40, runs=RUNS, ops=module,
                         seed=13, twist="value", device=device)
    z_lz, z_pm = z_scores(res, log_z, mean)
    assert abs(z_lz) < K_SE and bool((z_pm.abs() < K_SE).all())


def test_float64_states(problem) -> None:
    mixture, theta, log_z, mean = problem
    res = run_tilted_smc(mixture, theta, particles=256, steps=20, runs=RUNS, seed=2,
                         dtype=torch.float64, twist="value")
    assert res.particles.dtype == torch.float64
    z_lz, _ = z_scores(res, log_z, mean)
    assert abs(z_lz) < K_SE


def test_reproducible_under_seed(problem) -> None:
    mixture, theta, _, _ = problem
    a = run_tilted_smc(mixture, theta, particles=128, steps=10, runs=2, seed=4)
    b = run_tilted_smc(mixture, theta, particles=128, steps=10, runs=2, seed=4)
    assert torch.equal(a.particles, b.particles) and torch.equal(a.log_z, b.log_z)




@pytest.mark.parametrize("twist", ["value", "tweedie"])
@pytest.mark.parametrize(
    "fault",
    [
        pytest.param({"fwd_coef": lambda c: 0.0}, id="no-forward-kernel"),
        pytest.param({"fwd_linear": lambda lam: -lam}, id="forward-drift-sign"),
    ],
)
def test_wrong_weights_are_detected(problem, fault, twist: str) -> None:
    """The same check as above rejects an SMC whose step weight is wrong."""
    mixture, theta, log_z, mean = problem
    res = run_tilted_smc(mixture, theta, particles=512, steps=40, runs=RUNS, seed=11,
                         ops=faulty_ops(**fault), twist=twist)
    z_lz, _ = z_scores(res, log_z, mean)
    assert abs(z_lz) > 20, (res.log_z, log_z)


def test_bad_twist(problem) -> None:
    mixture, theta, _, _ = problem
    with pytest.raises(ValueError, match="twist"):
        run_tilted_smc(mixture, theta, particles=8, steps=2, runs=1, twist="nope")


def test_cli_demo_end_to_end(tmp_path, capsys) -> None:
    rc = main(["demo", "--particles", "128", "--steps", "10", "--runs", "2", "--seed", "1",
               "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "exact log Z" in out and "pathsmc.reference" in out
    table = [line.split() for line in out.splitlines() if line.startswith("  ")]
    for mode in STEER_MODES:  # every steering mode has a row and a figure
        assert any(row and row[0] == mode for row in table), mode
        png = tmp_path / f"demo-{mode}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = tmp_path / "demo.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "total wall time" in out


def test_cli_demo_no_plot(tmp_path, capsys) -> None:
    rc = main(["demo", "--particles", "32", "--steps", "4", "--runs", "2", "--no-plot",
               "--no-progress", "--twist", "tweedie", "--modes", "temper,uncorrected",
               "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "temper" in out and "twisted " not in out
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        main(["demo", "--particles", "0"])
    with pytest.raises(SystemExit):
        main(["demo", "--modes", "reward,nope"])


@pytest.fixture(scope="module")
def steering_rows():
    """Every case of the demo's table at small sizes (fused and pure-PyTorch runs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield run_steering_table(particles=256, steps=40, runs=RUNS, seed=3)
    finally:
        torch.set_num_threads(n)


def test_steering_table_matches_exact(steering_rows) -> None:
    """The demo's weighted rows estimate the exact log Z (z within K_SE, or an absolute bound
    where the spread is tiny: the exact twist with path-RND weights carries an O(h) bias);
    the uncorrected rows are unweighted."""
    assert {r.case.mode for r in steering_rows} == set(STEER_MODES)
    for r in steering_rows:
        for res in (r.fused, r.reference):
            s = case_stats(r.case, res)
            assert not res.dead_rows and res.particles.shape == (RUNS, 256, 2)
            if not r.case.weighted:
                assert bool((res.log_z == 0).all()) and not bool(res.resampled.any())
                continue
            if r.case.variant.startswith("FK sum"):  # heavy-tailed weights: log Ẑ biased low
                assert abs(s.log_z - r.case.target.log_z) < 1.5, (r.case.variant, s)
                continue
            ok = abs(s.z) < K_SE or abs(s.log_z - r.case.target.log_z) < 0.1
            assert ok, (r.case.mode, r.case.variant, r.case.weighting, s)
    lines = format_steering_table(steering_rows)
    assert len(lines) == len(steering_rows) + 1 and "z torch" in lines[0]


def test_uncorrected_guidance_is_biased_and_exact_guidance_is_not(steering_rows) -> None:
    """Without weights, guidance by ∇r at the denoised mean misses the tilted target; the exact
    soft value's guidance g²∇V_t (the SOC optimum) does not (up to discretization)."""
    rows = {r.case.variant: r.stats for r in steering_rows if r.case.mode == "uncorrected"}
    heuristic = next(v for k, v in rows.items() if "E[X₀|x]" in k)
    exact = next(v for k, v in rows.items() if "SOC" in k)
    assert heuristic.mean_error > 0.25 and exact.mean_error < 0.18, rows
    assert heuristic.mean_error > 2 * exact.mean_error, rows
