"""GPU-only checks: CPU/CUDA agreement, half-precision states, CUDA-graph capture of an SMC step,
and resampling at large N. Skipped without a GPU and a CUDA build of the extension."""

import math
import os

import pytest
import torch

import pathsmc
import pathsmc.reference as ref

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and pathsmc.build_info()["cuda"]),
    reason="needs a GPU and the CUDA kernels",
)


def _close(got, want, **kw):
    """assert_close whose message names the test case, shape and dtype (torch's gives the
    greatest absolute and relative differences): enough to act on from a GPU log."""
    case = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    torch.testing.assert_close(
        got, want, msg=lambda m: f"{case}: shape {tuple(want.shape)}, dtype {want.dtype}: {m}",
        **kw)


def _mismatches(got, want) -> str:
    bad = (got != want).nonzero()
    return f"{bad.shape[0]} of {want.numel()} differ, first at {bad[:3].tolist()}"


def _inputs(b, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, a, r, eps = (torch.randn(b, n, d, generator=g, dtype=dtype) for _ in range(4))
    logw = torch.randn(b, n, generator=g, dtype=torch.float64)
    return x, a, r, eps, logw


@pytest.mark.parametrize("d", [1, 3, 64, 700])
def test_em_step_cpu_and_cuda_agree(d):
    x, a, r, eps, logw = _inputs(3, 257, d, torch.float64)
    kw = dict(dt=0.01, sigma=0.8, ref_drifts=None, ref_coefs=None, fwd_coef=0.3, fwd_linear=-0.5)
    cpu = pathsmc.em_step(x, a, logw, noise=eps, **{**kw, "ref_drifts": [r], "ref_coefs": [0.7]})
    gpu = pathsmc.em_step(x.cuda(), a.cuda(), logw.cuda(), noise=eps.cuda(),
                          **{**kw, "ref_drifts": [r.cuda()], "ref_coefs": [0.7]})
    _close(gpu[0].cpu(), cpu[0], rtol=1e-12, atol=1e-12)
    _close(gpu[1].cpu(), cpu[1], rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_states_em_step(dtype):
    x, a, r, eps, logw = _inputs(2, 512, 16, torch.float32)
    xh, ah, rh, eh = (t.to(dtype).cuda() for t in (x, a, r, eps))
    out = pathsmc.em_step(xh, ah, logw.cuda(), dt=0.01, sigma=1.0, ref_drifts=[rh],
                          ref_coefs=[1.0], noise=eh)
    want = ref.em_step(*(t.float() for t in (xh, ah)), logw.cuda(), dt=0.01, sigma=1.0,
                       ref_drifts=[rh.float()], ref_coefs=[1.0], noise=eh.float())
    assert out[0].dtype == dtype
    _close(out[0].float(), want[0], rtol=1e-2, atol=1e-2)
    _close(out[1], want[1], rtol=1e-3, atol=1e-1)


def test_internal_noise_is_standard_normal_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.zeros(4, 1 << 16, 8, device="cuda")
    z = pathsmc.em_step(x, x, dt=1.0, sigma=1.0, generator=g)[0].double()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    z2 = pathsmc.em_step(x, x, dt=1.0, sigma=1.0, generator=g)[0].double()
    assert not torch.equal(z, z2)


@pytest.mark.parametrize("scheme", ["systematic", "stratified", "multinomial", "residual"])
def test_resample_matches_reference_on_cuda(scheme):
    g = torch.Generator().manual_seed(1)
    b, n, m = 3, 70000, 50001
    logw = 3 * torch.randn(b, n, generator=g, dtype=torch.float64)
    logw[1, ::3] = float("nan")
    logw[2] = float("nan")
    shape = (b,) if scheme == "systematic" else (b, m)
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    want = ref.resample(logw, scheme, m, u)
    got = pathsmc.resample(logw.cuda(), scheme, m, u.cuda()).cpu()
    # only positions within an ulp of a boundary may differ
    assert (got != want).sum().item() <= 2, _mismatches(got, want)


@pytest.mark.parametrize("log2n", [24, 26])
def test_systematic_counts_at_large_n(log2n):
    n = 1 << log2n
    g = torch.Generator(device="cuda").manual_seed(2)
    logw = torch.randn(1, n, device="cuda", dtype=torch.float64, generator=g)
    anc = pathsmc.resample(logw, "systematic", generator=g)
    counts = torch.bincount(anc[0], minlength=n).double()
    w = torch.softmax(logw[0], 0)
    assert ((counts - n * w).abs() < 1 + 1e-6).all()
    assert (anc[0][1:] >= anc[0][:-1]).all()


def test_adaptive_resample_matches_reference_on_cuda():
    g = torch.Generator().manual_seed(3)
    b, n = 8, 5000
    logw = torch.randn(b, n, generator=g, dtype=torch.float64) * torch.linspace(0, 4, b)[:, None]
    states = [torch.randn(b, n, 3, generator=g), torch.arange(b * n).reshape(b, n),
              torch.rand(b, n, 2, 2, generator=g) > 0.5]
    u = torch.rand(b, generator=g, dtype=torch.float64)
    want = ref.adaptive_resample(states, logw, 0.5, "systematic", u)
    got = pathsmc.adaptive_resample([s.cuda() for s in states], logw.cuda(), 0.5, "systematic",
                                    u.cuda())
    for s_got, s_want in zip(got[0], want[0], strict=True):
        assert torch.equal(s_got.cpu(), s_want)
    _close(got[1].cpu(), want[1])
    assert torch.equal(got[2].cpu(), want[2]) and torch.equal(got[3].cpu(), want[3])


def test_mala_and_replica_swap_match_reference_on_cuda():
    g = torch.Generator().manual_seed(4)
    x, xp, gr, gp = (torch.randn(2, 300, 40, generator=g, dtype=torch.float64) for _ in range(4))
    lp, lpp, u = (torch.randn(2, 300, generator=g, dtype=torch.float64) for _ in range(3))
    u = u.abs().clamp(max=0.999)
    want = ref.mala_accept(x, xp, lp, lpp, gr, gp, 0.1, u)
    got = pathsmc.mala_accept(*(t.cuda() for t in (x, xp, lp, lpp, gr, gp)), 0.1, u.cuda())
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.cpu(), b)
    states = [torch.randn(5, 7, 3, generator=g), torch.arange(35).reshape(5, 7)]
    lr = torch.randn(4, 7, generator=g)
    u = torch.rand(4, 7, generator=g)
    for parity in (0, 1):
        want = ref.replica_swap(states, lr, parity, u)
        got = pathsmc.replica_swap([s.cuda() for s in states], lr.cuda(), parity, u.cuda())
        for s_got, s_want in zip(got[0], want[0], strict=True):
            assert torch.equal(s_got.cpu(), s_want)
        assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[2].cpu(), want[2])


def test_cuda_graph_replays_an_smc_step_with_fresh_noise():
    """em_step -> potential -> adaptive_resample captured once; replays equal the eager run."""
    b, n, d, steps = 4, 4096, 2, 5

    def step(x, logw, gen):
        x_new, logw = pathsmc.em_step(x, -x, logw, dt=0.05, sigma=1.0, ref_drifts=[-0.5 * x],
                                      ref_coefs=[1.0], generator=gen)
        logw = logw - 0.1 * (x_new.double() ** 2).sum(-1)
        (x_new,), logw, _, _ = pathsmc.adaptive_resample([x_new], logw, 0.5, generator=gen)
        return x_new, logw

    x0 = torch.randn(b, n, d, device="cuda")
    lw0 = torch.zeros(b, n, device="cuda", dtype=torch.float64)
    gen = torch.Generator(device="cuda").manual_seed(7)
    x, lw, eager = x0.clone(), lw0.clone(), []
    for _ in range(steps):
        x, lw = step(x, lw, gen)
        eager.append((x.clone(), lw.clone()))

    gen = torch.Generator(device="cuda").manual_seed(7)
    static_x, static_lw = x0.clone(), lw0.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    graph.register_generator_state(gen)
    with torch.cuda.graph(graph):
        out_x, out_lw = step(static_x, static_lw, gen)
    for k in range(steps):
        graph.replay()
        _close(out_x, eager[k][0])
        _close(out_lw, eager[k][1])
        static_x.copy_(out_x)
        static_lw.copy_(out_lw)


@pytest.mark.parametrize("mode", ["temper", "reward"])
def test_captured_smc_replays_equal_eager_runs(mode):
    """A whole steering run (init + 50 steps + resampling) captured in one graph, with a model
    whose per-time cache starts empty: a replay after reseeding equals the eager run from the
    same seed (the same Philox draws, the same resampling), and successive replays are fresh,
    independent runs."""
    from pathsmc.diffusion import DiffusionModel, VPSchedule, steering_model
    from pathsmc.smc import CapturedSMC, smc
    from pathsmc.targets.gaussian_mixture import default_2d

    def job():  # a fresh model: nothing cached before the capture
        model = DiffusionModel.from_mixture(default_2d().to("cuda"), VPSchedule())
        kw = {"beta": 0.5} if mode == "temper" else {
            "reward": lambda x: x[..., 0].double(), "guidance": 1.0}
        return steering_model(model, mode, steps=50, device="cuda", **kw)

    g = torch.Generator(device="cuda").manual_seed(0)
    cap = CapturedSMC(job(), 1024, 8, threshold=0.7, generator=g)
    g.manual_seed(3)
    replay = cap.run()
    eager = smc(job(), 1024, 8, threshold=0.7,
                generator=torch.Generator(device="cuda").manual_seed(3))
    _close(replay.particles, eager.particles)
    _close(replay.logw, eager.logw)
    assert torch.equal(replay.resampled, eager.resampled) and bool(replay.resampled.any())
    runs = [cap.run() for _ in range(3)]
    assert not torch.equal(runs[0].particles, runs[1].particles)  # fresh noise per replay
    assert not torch.equal(runs[1].log_z, runs[2].log_z)
    with pytest.raises(ValueError, match="generator"):
        CapturedSMC(job(), 64, 1, generator=torch.Generator())


def test_steer_and_annealed_smc_loops_do_not_sync(monkeypatch):
    """torch's sync debug mode raises on any synchronizing call inside the loops."""
    import pathsmc.samplers as samplers
    import pathsmc.smc as smc_module
    from pathsmc.diffusion import DiffusionModel, VPSchedule, steer
    from pathsmc.targets.boltzmann import DiagonalGaussian, ManyWell
    from pathsmc.targets.gaussian_mixture import default_2d

    run, progress = smc_module._run, samplers._progress

    def strict(*args, **kwargs):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return run(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    class StrictBar:
        def __init__(self, *args, **kwargs):
            self.bar = progress(*args, **kwargs)

        def __enter__(self):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            return self.bar.__enter__()

        def __exit__(self, *exc):
            torch.cuda.set_sync_debug_mode(0)
            return self.bar.__exit__(*exc)

    model = DiffusionModel.from_mixture(default_2d().to("cuda"), VPSchedule())
    # warm-up: the model caches its per-time constants (built with cuSOLVER) for these times
    steer(model, "temper", beta=0.5, particles=256, batch=2, steps=10, device="cuda", seed=0)
    monkeypatch.setattr(smc_module, "_run", strict)
    for kw in ({"mode": "temper", "beta": 0.5},
               {"mode": "reward", "reward": lambda x: x[..., 0].double(), "guidance": 1.0}):
        steer(model, particles=256, batch=2, steps=10, threshold=0.9, device="cuda", seed=1,
              **kw)
    monkeypatch.setattr(samplers, "_progress", StrictBar)
    ref = DiagonalGaussian(4, device="cuda")
    for wf in (False, True):
        samplers.annealed_smc(ManyWell(dim=4), 256, batch=2, reference=ref, max_steps=8,
                              check_every=8, waste_free=wf,
                              generator=torch.Generator(device="cuda").manual_seed(0))


def test_cuda_limits_and_generator_device_are_clear_errors():
    x = torch.zeros(2, 8, 3, device="cuda")
    refs = [torch.zeros_like(x) for _ in range(9)]
    with pytest.raises(ValueError, match="ref_drifts: at most 8"):
        pathsmc.em_step(x, x, torch.zeros(2, 8, device="cuda", dtype=torch.float64), dt=0.1,
                        sigma=1.0, ref_drifts=refs, ref_coefs=[1.0] * 9)
    with pytest.raises(RuntimeError, match="generator"):
        pathsmc.resample(torch.zeros(2, 8, device="cuda", dtype=torch.float64),
                         generator=torch.Generator())  # a CPU generator for CUDA weights


@pytest.mark.parametrize("dtype,d", [(torch.float64, 3 * 96 * 96 + 5),
                                     (torch.float32, 3 * 96 * 96 + 5),
                                     (torch.float32, 16380)])  # an empty last segment
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("per_row", [False, True])
def test_em_step_long_rows_split_across_blocks(dtype, d, weighted, per_row):
    """Few rows of large D (a handful of images) take the segmented path: each row cut into
    blocks whose partial sums are added in order. Explicit noise: agrees with the CPU."""
    x, a, r, eps, logw = _inputs(2, 3, d, dtype, seed=3)
    dt = torch.tensor([0.02, 0.05], dtype=torch.float64) if per_row else 0.02
    kw = dict(dt=dt, sigma=0.9, fwd_coef=0.4, fwd_linear=-0.5,
              ref_drifts=[r, 0.5 * r], ref_coefs=[0.6, 0.3])
    lw = logw if weighted else None
    cpu = pathsmc.em_step(x, a, lw, noise=eps, **kw)
    gkw = {**kw, "ref_drifts": [t.cuda() for t in kw["ref_drifts"]],
           "dt": dt.cuda() if per_row else dt}
    gpu = pathsmc.em_step(x.cuda(), a.cuda(), None if lw is None else lw.cuda(),
                          noise=eps.cuda(), **gkw)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    _close(gpu[0].cpu(), cpu[0], rtol=tol, atol=tol)
    if weighted:  # float32 residuals may round differently (FMA contraction): ~1e-5 per row
        wtol = 1e-6 if dtype == torch.float64 else 1e-3
        _close(gpu[1].cpu(), cpu[1], rtol=1e-9, atol=wtol)


def test_em_step_noise_is_the_same_on_both_paths():
    """The in-kernel noise depends only on the generator state and the element index: the
    first rows of a call with few rows (segmented path) and of one with many rows (warp per
    row) get the same x'."""
    props = torch.cuda.get_device_properties(0)
    many = props.multi_processor_count * props.max_threads_per_multi_processor // 32 + 1
    d = 8192
    g = torch.Generator("cuda")
    x = torch.randn(1, many, d, device="cuda")
    a = torch.randn(1, many, d, device="cuda")
    logw = torch.zeros(1, many, dtype=torch.float64, device="cuda")
    few = pathsmc.em_step(x[:, :2], a[:, :2], logw[:, :2], dt=0.01, sigma=1.0,
                          generator=g.manual_seed(3))
    full = pathsmc.em_step(x, a, logw, dt=0.01, sigma=1.0, generator=g.manual_seed(3))
    assert torch.equal(few[0], full[0][:, :2])
    _close(few[1], full[1][:, :2], rtol=1e-12, atol=1e-9)


def test_em_step_long_rows_internal_noise():
    """In-kernel noise on the segmented path: standard normal, and the weight is the one the
    reference computes from the noise recovered from x'."""
    x, a, r, _, logw = _inputs(2, 2, 200003, torch.float64, seed=4)
    x, a, r, logw = x.cuda(), a.cuda(), r.cuda(), logw.cuda()
    dt, sigma = 0.01, 0.7
    g = torch.Generator(device="cuda").manual_seed(5)
    xn, lw = pathsmc.em_step(x, a, logw, dt=dt, sigma=sigma, ref_drifts=[r], ref_coefs=[1.0],
                             generator=g)
    eps = (xn - x - a * dt) / (sigma * math.sqrt(dt))
    assert abs(eps.mean().item()) < 5 / math.sqrt(eps.numel())
    assert abs(eps.var().item() - 1) < 5 * math.sqrt(2 / eps.numel())
    want = ref.em_step(x, a, logw, dt=dt, sigma=sigma, ref_drifts=[r], ref_coefs=[1.0],
                       noise=eps)[1]
    _close(lw, want, rtol=1e-8, atol=1e-6)


@pytest.mark.parametrize("d", [700, 3 * 128 * 128 + 1])  # one warp per row; segmented rows
def test_kernel_logpdf_cpu_and_cuda_agree(d):
    y, base, drift, _, logw = _inputs(2, 3, d, torch.float64, seed=6)
    kw = dict(dt=0.03, sigma=0.8, coef=0.7, linear=-0.5)
    cpu = pathsmc.kernel_logpdf(y, base, drift, logw=logw, **kw)
    gpu = pathsmc.kernel_logpdf(y.cuda(), base.cuda(), drift.cuda(), logw=logw.cuda(), **kw)
    _close(gpu.cpu(), cpu, rtol=1e-10, atol=1e-8)


def test_residual_with_a_dominant_particle():
    """Nearly every copy goes to one particle (the floor(M w) slots are found by binary search
    over the running counts, not written by that particle's thread)."""
    g = torch.Generator().manual_seed(8)
    b, n = 2, 1 << 20
    logw = torch.randn(b, n, generator=g, dtype=torch.float64)
    logw[0, 12345] = 40.0
    logw[1, ::2] = float("nan")
    u = torch.rand(b, n, generator=g, dtype=torch.float64)
    want = ref.resample(logw, "residual", n, u)
    got = pathsmc.resample(logw.cuda(), "residual", n, u.cuda()).cpu()
    assert (got != want).sum().item() <= 2, _mismatches(got, want)
    assert (got[0] == 12345).sum().item() >= n - 2


@pytest.mark.parametrize("n,m", [(1, 5), (1000, 333), (1000, 2500)])
def test_residual_other_sizes(n, m):
    g = torch.Generator().manual_seed(10)
    logw = torch.randn(3, n, generator=g, dtype=torch.float64)
    if n > 1:
        logw[1, ::3] = float("nan")
    u = torch.rand(3, m, generator=g, dtype=torch.float64)
    want = ref.resample(logw, "residual", m, u)
    got = pathsmc.resample(logw.cuda(), "residual", m, u.cuda()).cpu()
    assert (got != want).sum().item() <= 2, _mismatches(got, want)


def test_distributed_smc_on_one_gpu_with_nccl(tmp_path):
    """pathsmc.distributed on CUDA tensors (NCCL, one rank): the same run as the
    single-process driver."""
    import torch.distributed as dist

    from pathsmc import distributed
    from pathsmc.diffusion import DiffusionModel, VPSchedule, steering_model
    from pathsmc.smc import smc
    from pathsmc.targets import default_2d

    if not dist.is_nccl_available() or dist.is_initialized():
        pytest.skip("NCCL is not available, or a process group exists already")
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        theta = torch.tensor([1.0, -0.5], dtype=torch.float64, device="cuda")
        fk = steering_model(DiffusionModel.from_mixture(default_2d("cuda"), VPSchedule()),
                            "reward", reward=lambda x: x.double() @ theta, steps=30,
                            device="cuda")
        one = distributed.smc(fk, 1024, 4, generator=torch.Generator("cuda").manual_seed(0))
        ref = smc(fk, 1024, 4, generator=torch.Generator("cuda").manual_seed(0))
    finally:
        dist.destroy_process_group()
    _close(one.log_z, ref.log_z, rtol=1e-12, atol=1e-12)
    _close(one.particles, ref.particles, rtol=0, atol=0)


def test_mala_long_rows_split_across_blocks():
    """Few rows of large D (segmented: sums per block, then the decision, then the copy)
    agree with the reference, with about half the proposals accepted."""
    g = torch.Generator().manual_seed(9)
    d = 3 * 64 * 64 + 7
    x = torch.randn(2, 4, d, generator=g, dtype=torch.float64)
    gr, gp = (0.01 * torch.randn(2, 4, d, generator=g, dtype=torch.float64) for _ in range(2))
    xp = x + 0.01 * torch.randn(2, 4, d, generator=g, dtype=torch.float64)
    lp = torch.randn(2, 4, generator=g, dtype=torch.float64)
    lpp = lp + 3.0 * torch.tensor([[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0]],
                                  dtype=torch.float64)  # accept ~ always / ~ 5 %
    u = torch.rand(2, 4, generator=g, dtype=torch.float64)
    step = torch.tensor([0.1, 0.2], dtype=torch.float64)
    want = ref.mala_accept(x, xp, lp, lpp, gr, gp, step, u)
    got = pathsmc.mala_accept(*(t.cuda() for t in (x, xp, lp, lpp, gr, gp)), step.cuda(),
                              u.cuda())
    assert 0 < int(want[3].sum()) < 8
    for a, b in zip(got, want, strict=True):
        _close(a.cpu(), b, rtol=1e-12, atol=1e-12)
