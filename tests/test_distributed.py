"""pathsmc.distributed on CPU: 2 and 3 ranks (gloo, spawned processes) against the
single-process ops on the whole population, and a distributed steering run against an exact
log Z.

Each world size spawns its ranks once (a module fixture); every rank runs all the checks'
distributed halves and saves what it got, and the tests compare in this process.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pathsmc.ops as ops
from pathsmc.distributed import DistributedOps

F64 = torch.float64
B, N_LOCAL, D = 6, 7, 3
STEER = {"particles": 256, "batch": 16, "steps": 40}
THETA = [0.8]
K_SE = 4.5
ANNEAL = {"dim": 4, "particles": 128, "batch": 16}
PT = {"levels": 8, "chains": 32, "rounds": 8}

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def global_logw(world: int, dtype=F64) -> torch.Tensor:
    """The whole population's log-weights ``(B, world·N_LOCAL)`` with the edge cases: a row
    whose weight sits on rank 0 only, one dead on the last rank, NaN (dead) particles, an
    all-dead row, a flat row (ESS = N: never resampled at threshold 0.5)."""
    g = torch.Generator().manual_seed(7)
    n = world * N_LOCAL
    lw = (3.0 * torch.randn(B, n, generator=g, dtype=F64)).to(dtype)
    lw[1, N_LOCAL:] = -math.inf
    lw[2, -N_LOCAL:] = -math.inf
    lw[3, ::4] = math.nan
    lw[4] = -math.inf
    lw[5] = 0.25
    return lw


def global_states(world: int) -> list[torch.Tensor]:
    n = world * N_LOCAL
    index = torch.arange(n).expand(B, n)
    return [index.double().unsqueeze(-1).expand(B, n, D).contiguous() + 0.5,
            index % 3 == 0, index.clone()]


def local(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[:, rank * N_LOCAL:(rank + 1) * N_LOCAL]


def _worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=world)
    from pathsmc import distributed
    from pathsmc.diffusion import DiffusionModel, VPSchedule, steering_model
    from pathsmc.targets import GaussianMixture

    out: dict = {}
    dops = DistributedOps()
    for name, dtype in (("f64", F64), ("f32", torch.float32)):
        out[f"normalize_{name}"] = dops.normalize(local(global_logw(world, dtype), rank))
    gen = torch.Generator().manual_seed(11)
    states = [local(s, rank).contiguous() for s in global_states(world)]
    out["resample"] = dops.adaptive_resample(states, local(global_logw(world), rank),
                                             threshold=0.5, generator=gen)
    out["resample_all"] = dops.adaptive_resample(states, local(global_logw(world), rank),
                                                 threshold=1.0, scheme="residual",
                                                 generator=gen)
    out["resample_global"] = dops.resample(local(global_logw(world), rank), "stratified",
                                           num_samples=2 * world * N_LOCAL + 1,
                                           generator=torch.Generator().manual_seed(12))
    # Mismatched shapes are refused on every rank before the loop.
    mix = GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-2.0], [1.5]]),
                          torch.tensor([[0.3], [0.5]]))
    theta = torch.tensor(THETA, dtype=F64)
    model = steering_model(DiffusionModel.from_mixture(mix, VPSchedule()), "reward",
                           reward=lambda x: x.double() @ theta, steps=STEER["steps"])
    try:
        distributed.smc(model, 8 + rank, 2, generator=torch.Generator().manual_seed(rank))
        out["mismatch"] = None
    except ValueError as err:
        out["mismatch"] = str(err)
    gen = torch.Generator().manual_seed(100 + rank)
    res = distributed.smc(model, STEER["particles"], STEER["batch"], generator=gen)
    out["smc"] = {"log_z": res.log_z, "ess": res.ess, "resampled": res.resampled,
                  "weights": res.weights, "particles": res.particles, "rank": res.rank,
                  "world_size": res.world_size}
    from pathsmc.targets import DiagonalGaussian, ManyWell

    target = ManyWell(dim=ANNEAL["dim"])
    res = distributed.annealed_smc(target, ANNEAL["particles"], ANNEAL["batch"],
                                   reference=DiagonalGaussian(ANNEAL["dim"], 0.0, 2.0),
                                   generator=torch.Generator().manual_seed(200 + rank))
    out["annealed"] = {"log_z": res.log_z, "betas": res.betas, "ess": res.ess,
                       "weights": res.weights, "particles": res.particles,
                       "population": res.population}
    try:
        distributed.annealed_smc(target, 8, 1, waste_free=True)
        out["annealed_waste_free"] = None
    except ValueError as err:
        out["annealed_waste_free"] = str(err)
    from pathsmc.targets.double_well import DoubleWell1D

    for swap in ("deo", "seo"):
        pt = distributed.DistributedParallelTempering(
            DoubleWell1D(), DiagonalGaussian(1, 0.0, 1.5), num_levels=PT["levels"],
            num_chains=PT["chains"], swap=swap, generator=torch.Generator().manual_seed(rank))
        res = pt.run(PT["rounds"])
        st = res.last
        out[f"pt_{swap}"] = {k: getattr(st, k) for k in (
            "betas", "step_size", "log_z", "log_z_se", "barrier", "barrier_se", "swap_accept",
            "swap_accept_empirical", "round_trips", "mala_accept", "energy")}
        out[f"pt_{swap}"]["schedules"] = res.schedules
        out[f"pt_{swap}"]["x"] = res.states
    # The loop (model steps, global normalization, resampling) reads nothing back to the host.
    from conftest import HostRead, no_host_reads

    from pathsmc.smc import run_loop
    try:
        with no_host_reads():
            run_loop(model, 32, 2, STEER["steps"], 0.5, "systematic", gen, dops)
        out["host_read"] = None
    except HostRead as err:
        out["host_read"] = str(err)
    torch.save(out, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory) -> tuple[int, list[dict]]:
    world = request.param
    folder = tmp_path_factory.mktemp(f"dist{world}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(world, str(folder)), nprocs=world, join=True)
    return world, [torch.load(Path(folder) / f"rank{r}.pt", weights_only=False)
                   for r in range(world)]


@pytest.mark.parametrize("dtype", ["f64", "f32"])
def test_normalize_is_the_global_one(ranks, dtype: str) -> None:
    world, outs = ranks
    lw = global_logw(world, F64 if dtype == "f64" else torch.float32)
    lwn, log_mean, ess = ops.normalize(lw)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == "f64" else {"rtol": 2e-5, "atol": 2e-5}
    for rank, out in enumerate(outs):
        got_lwn, got_mean, got_ess = out[f"normalize_{dtype}"]
        assert got_lwn.dtype == lw.dtype and got_lwn.shape == (B, N_LOCAL)
        torch.testing.assert_close(got_lwn, local(lwn, rank), equal_nan=True, **tol)
        torch.testing.assert_close(got_mean, log_mean, **tol)
        torch.testing.assert_close(got_ess, ess, **tol)
    assert float(outs[0][f"normalize_{dtype}"][2][4]) == 0.0  # the all-dead row


@pytest.mark.parametrize("case", ["resample", "resample_all"])
def test_adaptive_resample_is_the_global_one(ranks, case: str) -> None:
    """Rank 0 draws with the same generator as the single-process op here, so the ancestors,
    the gathered states and the new weights agree exactly."""
    world, outs = ranks
    gen = torch.Generator().manual_seed(11)
    want_states, want_logw, want_anc, want_mask = ops.adaptive_resample(
        global_states(world), global_logw(world), threshold=0.5, generator=gen)
    if case == "resample_all":  # the second call: every live row, residual resampling
        want_states, want_logw, want_anc, want_mask = ops.adaptive_resample(
            global_states(world), global_logw(world), threshold=1.0, scheme="residual",
            generator=gen)
    for rank, out in enumerate(outs):
        states, logw, anc, mask = out[case]
        torch.testing.assert_close(anc, local(want_anc, rank), rtol=0, atol=0)
        torch.testing.assert_close(mask, want_mask, rtol=0, atol=0)
        torch.testing.assert_close(logw, local(want_logw, rank), rtol=0, atol=0,
                                   equal_nan=True)
        for got, want in zip(states, want_states, strict=True):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, local(want, rank), rtol=0, atol=0)
    # Row 1's weight is on rank 0 only: once resampled, every rank holds rank 0's particles.
    assert bool(want_mask[1])
    for out in outs:
        assert bool((out[case][2][1] < N_LOCAL).all())
    assert not bool(want_mask[4])  # all-dead rows keep their particles


def test_resample_gives_global_ancestors(ranks) -> None:
    world, outs = ranks
    want = ops.resample(global_logw(world), "stratified", num_samples=2 * world * N_LOCAL + 1,
                        generator=torch.Generator().manual_seed(12))
    for out in outs:
        assert torch.equal(out["resample_global"], want)


def test_mismatched_shapes_are_refused_on_every_rank(ranks) -> None:
    _, outs = ranks
    for out in outs:
        assert out["mismatch"] is not None and "same (batch, particles" in out["mismatch"]


def test_distributed_steering_matches_exact_log_z(ranks) -> None:
    """Reward tilting of a 1-D mixture (exact log Z in closed form), world·256 particles per
    row: log Ẑ within K_SE standard errors (estimated over the 16 rows), the same global
    results on every rank, and weights that sum to 1 over all ranks."""
    from pathsmc.targets import GaussianMixture

    world, outs = ranks
    mix = GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-2.0], [1.5]]),
                          torch.tensor([[0.3], [0.5]]))
    exact = float(mix.linear_tilt(torch.tensor(THETA, dtype=F64)).log_z)
    res = [o["smc"] for o in outs]
    for r in res[1:]:
        for key in ("log_z", "ess", "resampled"):
            torch.testing.assert_close(r[key], res[0][key], rtol=0, atol=0)
    assert [r["rank"] for r in res] == list(range(world))
    total = sum(r["weights"].sum(-1) for r in res)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=1e-9, atol=1e-9)
    lz = res[0]["log_z"].double()
    se = float(lz.std()) / math.sqrt(lz.numel())
    assert abs(float(lz.mean()) - exact) < K_SE * se + 0.02, (float(lz.mean()), exact, se)
    # The ESS history is the global one: at most world·N, and resampling happened.
    assert float(res[0]["ess"].max()) <= world * STEER["particles"] + 1e-6
    assert bool(res[0]["resampled"].any())
    # The ranks' particles are independent draws, not copies of each other.
    assert not torch.equal(res[0]["particles"], res[1]["particles"])


def test_loop_does_not_read_the_host(ranks) -> None:
    _, outs = ranks
    assert [o["host_read"] for o in outs] == [None] * len(outs)


def test_distributed_annealed_smc_matches_exact_log_z(ranks) -> None:
    """Many-well d = 4 (exact log Z by quadrature), world·128 particles per row: log of the
    mean Ẑ over 16 rows within K_SE standard errors; one β schedule for all ranks; global
    weights."""
    from pathsmc.targets import ManyWell

    world, outs = ranks
    res = [o["annealed"] for o in outs]
    for r in res[1:]:
        for key in ("log_z", "betas", "ess"):
            torch.testing.assert_close(r[key], res[0][key], rtol=0, atol=0)
    assert all(r["population"] == world * ANNEAL["particles"] for r in res)
    total = sum(r["weights"].sum(-1) for r in res)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=1e-9, atol=1e-9)
    lz = res[0]["log_z"].double()
    m = torch.logsumexp(lz, 0) - math.log(lz.numel())
    se = float(torch.exp(lz - m).std()) / math.sqrt(lz.numel())
    exact = ManyWell(dim=ANNEAL["dim"]).log_z
    assert abs(float(m) - exact) < K_SE * se, (float(m), exact, se)
    assert not torch.equal(res[0]["particles"], res[1]["particles"])
    assert all("waste_free" in o["annealed_waste_free"] for o in outs)


@pytest.mark.parametrize("swap", ["deo", "seo"])
def test_distributed_parallel_tempering(ranks, swap: str) -> None:
    """Chains split across ranks: every rank gets the same round statistics over all
    world·32 columns and the same adapted schedules, and the stepping-stone log Ẑ matches the
    double well's exact log Z within its standard error."""
    from pathsmc.targets.double_well import DoubleWell1D

    world, outs = ranks
    res = [o[f"pt_{swap}"] for o in outs]
    for r in res[1:]:
        for key, v in res[0].items():
            if key == "x":
                assert not torch.equal(r[key], v)  # the ranks' chains are their own
            elif key == "schedules":
                for a, b in zip(r[key], v, strict=True):
                    torch.testing.assert_close(a, b, rtol=0, atol=0)
            else:
                torch.testing.assert_close(r[key], v, rtol=0, atol=0, equal_nan=True)
    st = res[0]
    assert st["round_trips"].shape == (1, world * PT["chains"])
    exact = DoubleWell1D().log_z
    assert abs(float(st["log_z"][0]) - exact) < K_SE * float(st["log_z_se"][0]), (
        float(st["log_z"][0]), exact, float(st["log_z_se"][0]))
    assert float(st["barrier"][0]) > 0.5 and int(st["round_trips"].sum()) > 0


@pytest.fixture
def one_rank_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_one_rank_is_the_single_process_driver(one_rank_group) -> None:
    """With one rank every collective is the identity and rank 0 draws with the caller's
    generator: the same draws as the single-process drivers, so the same numbers."""
    from pathsmc import distributed
    from pathsmc.samplers import annealed_smc
    from pathsmc.targets import DiagonalGaussian, ManyWell

    target, reference = ManyWell(dim=4), DiagonalGaussian(4, 0.0, 2.0)
    one = distributed.annealed_smc(target, 64, 3, reference=reference,
                                   generator=torch.Generator().manual_seed(5))
    ref = annealed_smc(target, 64, 3, reference=reference,
                       generator=torch.Generator().manual_seed(5))
    for key in ("betas", "particles"):  # the same draws and the same decisions
        torch.testing.assert_close(getattr(one, key), getattr(ref, key), rtol=0, atol=0)
    for key in ("log_z", "ess", "weights"):  # the global sums round differently
        torch.testing.assert_close(getattr(one, key), getattr(ref, key), rtol=1e-12, atol=0)


def test_needs_an_initialized_process_group() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedOps()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_rank_env() -> dict[str, str]:
    root = Path(__file__).resolve().parents[1]
    return dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1",
                PYTHONPATH=str(root / "python"))


def test_worked_example_lives_in_examples() -> None:
    """The worked example is examples/distributed_smc.py (one rank here, as torchrun would set
    it up); ``python -m pathsmc.distributed`` still runs it, with a DeprecationWarning."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    args = ["--particles", "64", "--batch", "4", "--steps", "10"]
    out = subprocess.run([sys.executable, str(root / "examples" / "distributed_smc.py"), *args],
                         capture_output=True, text=True, env=_one_rank_env(), cwd=root,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "1 ranks × 64 particles × 4 rows: log Ẑ = " in out.stdout and "exact 2.9688" in (
        out.stdout)
    old = subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "-m",
                          "pathsmc.distributed", *args], capture_output=True, text=True,
                         env=_one_rank_env(), cwd=root, timeout=120)
    assert old.returncode == 0, old.stderr
    assert "moved to examples/distributed_smc.py" in old.stderr
    assert "log Ẑ = " in old.stdout
