"""Parallel tempering (pathsmc.tempering) against exact answers on 1-D double wells.

Every exact answer comes from quadrature on the geometric path π_β ∝ ref^{1−β} γ^β
(:class:`pathsmc.targets.double_well.TemperedPath1D`): moments of each level, log Z, the swap
rejection rate of every adjacent pair and the global barrier Λ = ∫ λ.

Monte Carlo errors are batch means over the C chain columns of a run: each column is an
independent PT system (its own K replicas), so the per-column averages over the scans of a
round are i.i.d. whatever the autocorrelation inside a column, and their spread gives the
standard error. The checks return a list of failures, so that the same checks can be shown to
fail when a sign or a coefficient of the swap log-ratio or of the MALA acceptance is perturbed
(injected by wrapping ``tempering.swap_log_ratio`` / ``ops.mala_accept``; the library has no
test switches).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import perturbed_mala_accept, requires_cuda

import pathsmc.tempering as tempering
from pathsmc import ops
from pathsmc.targets.boltzmann import DiagonalGaussian, double_well_log_z
from pathsmc.targets.double_well import DoubleWell1D
from pathsmc.tempering import (
    MonotoneCubic,
    ParallelTempering,
    PerProblemTarget,
    levels_for_barrier,
    optimal_schedule,
    parallel_tempering,
    round_trip_rate,
    swap_log_ratio,
)

F64 = torch.float64
Z = 4.5  # standard errors allowed for one statistic (about 60 are checked per run)
REF_SCALE = 1.5
# Two problems in one batch: the many-well factor (barrier ≈ 9 nats at β = 1, right well
# holding 84 %) and a shallower, left-tilted double well.
WELLS = [DoubleWell1D(), DoubleWell1D(a=0.3, b=-4.0, c=0.5)]
PATHS = [w.path(0.0, REF_SCALE, points=4001) for w in WELLS]
REFERENCE = DiagonalGaussian(1, 0.0, REF_SCALE)


@pytest.fixture(autouse=True)
def _one_thread(restore_threads):
    """Small tensors: one intra-op thread is fastest and avoids contention on shared cores."""
    torch.set_num_threads(1)


def gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def run_pt(seed: int, rounds: int = 11, chains: int = 128, levels: int = 10, **kw):
    """Both double wells, adaptive schedule and steps, the last round (frozen) recorded."""
    return parallel_tempering(PerProblemTarget(WELLS), REFERENCE, rounds=rounds,
                              num_levels=levels, num_chains=chains, num_problems=len(WELLS),
                              record=True, generator=gen(seed), **kw)


def batch_mean(per_column: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error over the last dim (independent columns)."""
    c = per_column.shape[-1]
    return per_column.mean(-1).item(), per_column.std(-1).item() / math.sqrt(c)


def level_failures(res, z: float = Z) -> list[str]:
    """Each level's samples against its tempered target (mean, E X², P(X > 0)) and the
    stepping-stone log Z (forward and backward) against the exact one, for every problem."""
    st, bad = res.last, []
    for b, (well, path) in enumerate(zip(WELLS, PATHS, strict=True)):
        for k, beta in enumerate(st.betas[b].tolist()):
            x = st.level_samples(k, b)[..., 0].double()  # (S, C)
            exact = path.moments(beta)
            for name, v in (("mean", x), ("m2", x * x), ("p_right", (x > 0).double())):
                m, se = batch_mean(v.mean(0))
                if abs(m - exact[name]) > z * se:
                    bad.append(f"problem {b} level {k} (β = {beta:.3f}) {name}: {m:.4f} vs "
                               f"exact {exact[name]:.4f} (se {se:.4f})")
        for name, est, se in (("forward", st.log_z[b], st.log_z_se[b]),
                              ("backward", st.log_z_backward[b], st.log_z_backward_se[b])):
            if abs(est.item() - well.log_z) > z * se.item():
                bad.append(f"problem {b} {name} log Z {est.item():.4f} vs exact "
                           f"{well.log_z:.4f} (se {se.item():.4f})")
    return bad


@pytest.fixture(scope="module")
def main_run():
    threads = torch.get_num_threads()  # (module fixtures run before the autouse one)
    torch.set_num_threads(1)
    try:
        return run_pt(seed=0)
    finally:
        torch.set_num_threads(threads)


def equal_barrier_schedule(path, k: int) -> np.ndarray:
    """The exact schedule with equal barrier between levels: Λ^{-1}(j·Λ/(K − 1))."""
    fine = torch.linspace(0, 1, 101, dtype=F64)
    cum = path.cumulative_barrier(fine).numpy()
    out = np.interp(np.linspace(0, cum[-1], k), cum, fine.numpy())
    out[-1] = 1.0
    return out


# ---- the exact side -------------------------------------------------------------------------


def test_double_well_target_and_quadrature():
    dw = DoubleWell1D()
    assert dw.log_z == pytest.approx(double_well_log_z()[0], abs=1e-12)
    x = torch.linspace(-3, 3, 13, dtype=F64).unsqueeze(-1).requires_grad_(True)
    lp, g = dw.log_prob_and_grad(x)
    (auto,) = torch.autograd.grad(lp.sum(), x)
    torch.testing.assert_close(g, auto)
    path = dw.path(0.0, REF_SCALE)
    assert path.log_z(0.0) == pytest.approx(0.0, abs=1e-12)
    assert path.log_z(1.0) == pytest.approx(dw.log_z, abs=1e-10)
    m0 = path.moments(0.0)  # the reference N(0, 1.5²)
    assert m0["mean"] == pytest.approx(0.0, abs=1e-12)
    assert m0["m2"] == pytest.approx(REF_SCALE**2, rel=1e-10)
    assert m0["p_right"] == pytest.approx(0.5, abs=1e-12)
    assert path.moments(1.0)["p_right"] == pytest.approx(dw.p_right, abs=1e-8)


def test_barrier_formulas_by_brute_force():
    # The O(n log n) sorted-grid formulas against the O(n²) double sums on a coarse grid.
    path = WELLS[0].path(0.0, REF_SCALE, points=801)
    ell = path.ell
    for b0, b1 in [(0.0, 0.05), (0.2, 0.35), (0.6, 0.5), (0.9, 1.0)]:
        p0, p1 = path.probs(b0), path.probs(b1)
        acc = torch.clamp(torch.exp((b1 - b0) * (ell[:, None] - ell[None, :])), max=1.0)
        brute = 1.0 - (p0[:, None] * p1[None, :] * acc).sum().item()
        assert path.swap_rejection(b0, b1) == pytest.approx(brute, abs=1e-12)
        lam = 0.5 * (p0[:, None] * p0[None, :] * (ell[:, None] - ell[None, :]).abs()).sum()
        assert path.local_barrier(b0) == pytest.approx(lam.item(), rel=1e-12)
    # r(β, β + δ) = λ(β)·δ + O(δ³) and Σ_k r_k → Λ as the schedule is refined.
    fine = torch.linspace(0, 1, 401, dtype=F64)
    assert path.pair_rejections(fine).sum().item() == pytest.approx(path.global_barrier(),
                                                                     rel=2e-3)


def test_swap_log_ratio_is_the_target_ratio():
    g = gen(1)
    k, b, c = 5, 3, 4
    betas = torch.sort(torch.rand(k, b, dtype=F64, generator=g), 0).values
    lt = torch.randn(k, b, c, dtype=F64, generator=g)
    lr = torch.randn(k, b, c, dtype=F64, generator=g)

    def logpi(beta, i):  # log π_β at the state of level i (unnormalized)
        return (1 - beta).unsqueeze(-1) * lr[i] + beta.unsqueeze(-1) * lt[i]

    direct = torch.stack([logpi(betas[i], i + 1) + logpi(betas[i + 1], i) - logpi(betas[i], i)
                          - logpi(betas[i + 1], i + 1) for i in range(k - 1)])
    torch.testing.assert_close(swap_log_ratio(betas, lt - lr), direct)


def test_monotone_cubic_and_optimal_schedule():
    x = np.array([0.0, 0.1, 0.3, 0.7, 1.0])
    y = np.array([0.0, 0.5, 0.6, 2.0, 2.1])
    f = MonotoneCubic(x, y)
    np.testing.assert_allclose(f(x), y, atol=1e-14)
    t = np.linspace(0, 1, 1001)
    assert np.all(np.diff(f(t)) >= -1e-14)  # monotone data, monotone interpolant
    lin = MonotoneCubic(x, 3.0 * x)
    np.testing.assert_allclose(lin(t), 3.0 * t, atol=1e-12)
    np.testing.assert_allclose(lin.derivative(t), 3.0, atol=1e-12)
    # Equal rejections on a uniform schedule: a fixed point.
    betas = np.linspace(0, 1, 9)
    new, cum = optimal_schedule(betas, np.full(8, 0.2))
    np.testing.assert_allclose(new, betas, atol=1e-9)
    assert cum[-1] == pytest.approx(1.6)
    # Uneven rejections: the new β's sit at equal quantiles of the interpolated barrier.
    rej = np.array([0.5, 0.3, 0.1, 0.05, 0.05, 0.02, 0.02, 0.01])
    new, cum = optimal_schedule(betas, rej)
    lam = MonotoneCubic(betas, cum)(new)
    np.testing.assert_allclose(lam, np.linspace(0, rej.sum(), 9), atol=1e-4)
    assert new[0] == 0.0 and new[-1] == 1.0 and np.all(np.diff(new) > 0)
    assert new[1] < betas[1]  # levels move to where the barrier is


# ---- PT against the exact answers -----------------------------------------------------------


def test_levels_match_tempered_targets(main_run):
    assert level_failures(main_run) == []
    st = main_run.last
    assert st.samples.shape == (st.scans, 10, 2, 128, 1)
    # The two problems got their own schedules.
    assert not torch.allclose(st.betas[0], st.betas[1])


def test_stepping_stone_log_z(main_run):
    st = main_run.last
    for b, well in enumerate(WELLS):
        err = st.log_z[b].item() - well.log_z
        assert abs(err) < Z * st.log_z_se[b].item()
        assert st.log_z_se[b].item() < 0.01  # and the error bar is informative
        assert abs(st.log_z_backward[b].item() - well.log_z) < Z * st.log_z_backward_se[b].item()


def test_barrier_matches_quadrature(main_run):
    st = main_run.last
    for b, path in enumerate(PATHS):
        betas = st.betas[b]
        exact_pairs = path.pair_rejections(betas)  # exact rejection rates, this schedule
        z = (st.rejection[b] - exact_pairs) / st.swap_accept_se[b]
        assert bool((z.abs() < Z).all()), z
        lam_sum = exact_pairs.sum().item()
        lam = path.global_barrier()  # ∫₀¹ λ(β) dβ by quadrature
        assert abs(st.barrier[b].item() - lam_sum) < Z * st.barrier_se[b].item()
        # Σ_k r_k differs from Λ by the discretization error, O(Σ Δβ³): below 1 % here.
        assert abs(st.barrier[b].item() - lam) < Z * st.barrier_se[b].item() + 0.01 * lam
        # Cumulative barrier at the schedule and the interpolated local barrier.
        cum_exact = path.cumulative_barrier(betas)
        torch.testing.assert_close(st.cumulative_barrier[b], cum_exact, atol=0.02, rtol=0)
        grid, lam_hat = st.local_barrier(b, np.array([0.3, 0.5, 0.8]))
        lam_exact = np.array([path.local_barrier(float(x)) for x in grid])
        np.testing.assert_allclose(lam_hat, lam_exact, rtol=0.15)


def test_schedule_equalizes_rejections(main_run):
    st = main_run.last
    for b, path in enumerate(PATHS):
        rej = st.rejection[b]
        assert (rej.max() - rej.min()).item() < 0.1 * rej.mean().item()
        # ... and is the exact equal-barrier schedule.
        exact = equal_barrier_schedule(path, 10)
        np.testing.assert_allclose(st.betas[b].numpy(), exact, atol=0.01)
    # Rounds doubled in length and the step sizes were frozen in the last one.
    assert [r.scans for r in main_run.rounds] == [2**r for r in range(11)]
    assert not st.adapted and all(r.adapted for r in main_run.rounds[:-1])
    acc = st.mala_accept[:, 1:]
    assert bool((acc > 0.45).all() and (acc < 0.7).all())
    assert bool(st.mala_accept[:, 0].isnan().all())  # level 0: exact reference draws


def test_levels_for_barrier():
    # Equal rejections Λ/(K − 1) per pair in Syed et al.'s DEO rate, checked by hand.
    assert round_trip_rate(2.0, 5) == pytest.approx(1.0 / (2.0 + 2.0 * 4 * 0.5 / 0.5))
    assert round_trip_rate(2.0, 3) == 0.0  # two pairs at rejection 1
    assert round_trip_rate(0.0, 2) == 0.5
    for lam in (0.0, 0.3, 1.2, 4.7, 20.0, 75.5):
        ks = np.arange(2, 2001)
        per_level = np.array([round_trip_rate(lam, int(k)) / k for k in ks])
        assert levels_for_barrier(lam, max_levels=2000) == ks[per_level.argmax()]
        limit = 1.0 / (2.0 + 2.0 * lam)
        k = levels_for_barrier(lam, efficiency=0.9, max_levels=2000)
        assert round_trip_rate(lam, k) >= 0.9 * limit > round_trip_rate(lam, k - 1) or k == 2
    # The "about 2Λ chains" rule for large Λ; capped by max_levels.
    assert abs(levels_for_barrier(50.0) - 101) <= 1
    assert levels_for_barrier(50.0, max_levels=40) == 40
    for bad in (dict(barrier=-1.0), dict(barrier=math.inf), dict(barrier=1.0, efficiency=1.0),
                dict(barrier=1.0, max_levels=1)):
        with pytest.raises(ValueError, match="barrier|efficiency|max_levels"):
            levels_for_barrier(**bad)


def test_adapt_levels_from_barrier():
    # From 3 levels, K follows the barrier estimate to the 90 %-efficiency choice; the levels
    # of the (resized) last round still match their exact tempered targets.
    res = run_pt(seed=5, rounds=10, chains=96, levels=3, adapt_levels=True,
                 level_efficiency=0.9)
    ks = [s.shape[1] for s in res.schedules]
    # The K that the exact barrier asks for (quadrature): Λ̂ from the resized schedules must
    # have converged to it (from 3 levels, Λ̂ <= 2 starts biased low).
    exact = levels_for_barrier(max(p.global_barrier() for p in PATHS), efficiency=0.9)
    assert ks[0] == 3 and abs(ks[-1] - exact) <= 1, (ks, exact)
    assert ks[-1] == ks[-2]  # K is not changed right before the final round
    assert res.last.samples.shape[1] == ks[-1] == res.betas.shape[1]
    assert level_failures(res) == []
    # Too many levels shrink (per-level-scan optimum: about 2Λ + 1 ≈ 3–4 here).
    res = run_pt(seed=6, rounds=6, chains=64, levels=24, adapt_levels=True)
    assert [s.shape[1] for s in res.schedules][-1] <= 6
    with pytest.raises(ValueError, match="adapt_levels"):
        run_pt(seed=0, rounds=2, adapt_levels=True, adapt_schedule=False)
    with pytest.raises(ValueError, match="level_efficiency"):
        run_pt(seed=0, rounds=2, level_efficiency=0.9)
    with pytest.raises(ValueError, match="efficiency"):
        run_pt(seed=0, rounds=2, adapt_levels=True, level_efficiency=1.5)


def test_deo_more_round_trips_than_seo():
    betas = equal_barrier_schedule(PATHS[0], 12)
    rates, predicted = {}, {}
    for swap in ("deo", "seo"):
        pt = ParallelTempering(WELLS[0], REFERENCE, betas=betas, num_chains=64, swap=swap,
                               generator=gen(3))
        pt.run_round(128)  # burn-in (adapts the steps)
        st = pt.run_round(512, adapt_step=False)
        rates[swap] = st.round_trip_rate.item()
        predicted[swap] = st.predicted_round_trip_rate.item()
        assert st.restarts.sum() > 0
    assert rates["deo"] > 3.0 * rates["seo"], rates
    # Under efficient local exploration DEO would reach 1/(2 + 2 Σ r/(1 − r)); one MALA step
    # per scan gets within 30 % of it.
    assert 0.7 * predicted["deo"] < rates["deo"] < 1.05 * predicted["deo"], (rates, predicted)


def _deo_all_accepted(k: int, scans: int) -> tuple[int, int]:
    """Round trips and restarts of one column when every swap is accepted, by hand."""
    at = list(range(k))  # replica at each level
    phase = [0] * k
    trips = restarts = 0
    for t in range(scans):
        for i in range(t % 2, k - 1, 2):
            at[i], at[i + 1] = at[i + 1], at[i]
        r0, rt = at[0], at[-1]
        trips += phase[r0] == 2
        phase[r0] = 1
        restarts += phase[rt] == 1
        phase[rt] = 2 if phase[rt] == 1 else phase[rt]
    return trips, restarts


def test_round_trip_accounting_when_every_swap_is_accepted():
    # target = reference: ℓ ≡ 0, every swap accepted, Λ = 0; DEO moves every replica
    # ballistically (a round trip every 2K scans), SEO makes a random walk of it.
    k, scans = 8, 200
    out = {}
    for swap in ("deo", "seo"):
        pt = ParallelTempering(REFERENCE, REFERENCE, num_levels=k, num_chains=3, swap=swap,
                               generator=gen(0))
        st = pt.run_round(scans)
        assert st.barrier.item() == 0.0
        assert bool((st.swap_accept_empirical == 1).all())
        out[swap] = st
    trips, restarts = _deo_all_accepted(k, scans)
    assert out["deo"].round_trips.tolist() == [[trips] * 3]
    assert out["deo"].restarts.tolist() == [[restarts] * 3]
    assert trips > 0.45 * scans  # rate → 1/2 = 1/(2 + 2Λ)
    assert out["seo"].round_trips.sum() < 0.25 * out["deo"].round_trips.sum()


# ---- the checks fail when the algorithm is perturbed ----------------------------------------




def _perturbed_swap(kind: str):
    orig = tempering.swap_log_ratio
    if kind == "sign":
        return lambda betas, ell: -orig(betas, ell)
    if kind == "coef":
        return lambda betas, ell: 1.25 * orig(betas, ell)
    # "beta": the β's instead of their differences
    return lambda betas, ell: betas[1:].unsqueeze(-1) * (ell[:-1] - ell[1:])


# Calibration (in-kernel noise, seeds 10-17, 480 statistics): z mean 0.03, sd 1.08, max 4.7.
PERTURBED_RUN = {"seed": 11, "rounds": 10, "chains": 64}


@pytest.mark.parametrize("kind", ["swap:sign", "swap:coef", "swap:beta", "mala:hastings_sign",
                                  "mala:hastings_coef", "mala:density_coef"])
def test_checks_fail_when_perturbed(kind, monkeypatch):
    where, what = kind.split(":")
    if where == "swap":
        monkeypatch.setattr(tempering, "swap_log_ratio", _perturbed_swap(what))
    else:
        monkeypatch.setattr(ops, "mala_accept", perturbed_mala_accept(what))
    assert level_failures(run_pt(**PERTURBED_RUN)) != []


def test_unperturbed_small_run_passes():
    # The configuration of the perturbed runs passes the same checks.
    assert level_failures(run_pt(**PERTURBED_RUN)) == []


# ---- interface --------------------------------------------------------------------------------


def test_report_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "barrier.png"
    res = parallel_tempering(WELLS[0], REFERENCE, rounds=4, num_levels=6, num_chains=8,
                             report=True, plot=str(png), progress=True, generator=gen(2))
    cap = capsys.readouterr()
    out = cap.out
    assert "round" in out and "log Z" in out and len(out.splitlines()) == 2 + 4 + 1
    assert "parallel tempering" in cap.err and "/15" in cap.err  # 1 + 2 + 4 + 8 scans
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "parallel tempering: 1 problem(s) × 6 levels × 8 chains" in res.summary()
    st = res.last
    assert st.energy.shape == (8, 1, 6) and st.round_trips.shape == (1, 8)
    assert st.samples is None and res.schedules[0].shape == (1, 6)


def test_float32_callables_and_no_reference_sampler():
    # Plain callables (no .sample): MALA at level 0 too; float32 states.
    def target(x):
        return WELLS[1].log_prob_and_grad(x)

    def reference(x):
        return REFERENCE.log_prob_and_grad(x)

    res = parallel_tempering(target, reference, dim=1, rounds=9, num_levels=8, num_chains=64,
                             dtype=torch.float32, generator=gen(4))
    st = res.last
    assert res.states.dtype == torch.float32 and res.states.shape == (8, 1, 64, 1)
    assert not st.mala_accept[:, 0].isnan().any()
    assert abs(st.log_z.item() - WELLS[1].log_z) < Z * st.log_z_se.item()


def test_argument_errors():
    with pytest.raises(ValueError, match="betas"):
        ParallelTempering(WELLS[0], betas=[0.0, 0.5, 0.4, 1.0])
    with pytest.raises(ValueError, match="betas"):
        ParallelTempering(WELLS[0], betas=[0.1, 0.5, 1.0])
    with pytest.raises(ValueError, match="swap"):
        ParallelTempering(WELLS[0], swap="odd")
    with pytest.raises(ValueError, match="reference_iid"):
        ParallelTempering(WELLS[0], WELLS[1], reference_iid=True)
    with pytest.raises(ValueError, match="dim"):
        ParallelTempering(lambda x: (x.sum(-1), x), lambda x: (x.sum(-1), x))
    with pytest.raises(ValueError, match="step_size"):
        ParallelTempering(WELLS[0], num_levels=4, step_size=torch.ones(3))


@requires_cuda
def test_cuda_scans_do_not_sync():
    dev = "cuda"
    ref = DiagonalGaussian(1, 0.0, REF_SCALE, device=dev)
    pt = ParallelTempering(WELLS[0], ref, num_levels=8, num_chains=256, device=dev,
                           generator=gen(0, dev))
    pt.run_round(4)  # warm-up (allocations, lazy init)
    acc = pt._new_accumulators()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call inside the scans raises
    try:
        for _ in range(32):
            pt._scan(acc, adapt_step=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    pt.run_round(128)
    st = pt.run_round(512, adapt_step=False)
    assert abs(st.log_z.item() - WELLS[0].log_z) < Z * st.log_z_se.item()
