"""The sampling loops never read a device value on the host.

On a GPU such a read (``.item()``, ``bool(t)``, ``float(t)``, ``.cpu()``, ``.tolist()``) is a
synchronization that stalls the launch queue and breaks CUDA-graph capture. Without a GPU the
mistake is caught here: the loops run with those Tensor methods replaced by ones that raise, so
a Python-level host read anywhere in a loop body — driver, model wrapper or op wrapper — fails
the test on CPU. Synchronizing ATen calls that return new tensors (``torch.nonzero``, boolean
masks, ``torch.unique``, ``torch.equal``) are not seen here; on a GPU, tests/test_cuda.py and
the PT/CREPE tests run the loops under torch's sync debug mode, which catches those too.
The one exception is the ops' argument checks that read values only for CPU tensors (by
design: on CUDA they are skipped, see pathsmc._validate): reads from those functions of CPU
tensors are let through.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import HostRead, no_host_reads

import pathsmc.samplers as samplers
import pathsmc.smc as smc_module
from pathsmc.crepe import CREPE
from pathsmc.diffusion import DiffusionModel, VPSchedule, steer
from pathsmc.targets.boltzmann import DiagonalGaussian, ManyWell
from pathsmc.targets.double_well import DoubleWell1D
from pathsmc.targets.gaussian_mixture import default_2d
from pathsmc.tempering import ParallelTempering


def test_the_guard_catches_host_reads():
    x = torch.ones(3)
    for read in (lambda: x.sum().item(), lambda: bool(x.any()), lambda: float(x[0]),
                 lambda: x.cpu(), lambda: x.tolist(), lambda: range(x[0].long())):
        with pytest.raises(HostRead), no_host_reads():
            read()
    assert x.sum().item() == 3.0  # restored


@pytest.fixture
def guarded_smc_loop(monkeypatch):
    """Run pathsmc.smc's loop (init, every step, every resampling) under the guard."""
    run = smc_module._run

    def guarded(*args, **kwargs):
        with no_host_reads():
            return run(*args, **kwargs)

    monkeypatch.setattr(smc_module, "_run", guarded)


MODES = [
    dict(mode="reward", reward=lambda x: -0.5 * (x * x).sum(-1).double()),
    dict(mode="reward", reward=lambda x: x[..., 0].double(), guidance=1.0, potential="max"),
    dict(mode="temper", beta=0.5),
    dict(mode="temper", beta=0.5, weighting="density"),
    dict(mode="uncorrected", beta=0.5),
]


@pytest.mark.parametrize("kw", MODES, ids=lambda kw: f"{kw['mode']}")
def test_steer_loop_does_not_read_the_device(guarded_smc_loop, kw):
    model = DiffusionModel.from_mixture(default_2d(), VPSchedule())
    res = steer(model, particles=64, batch=2, steps=8, threshold=0.9, seed=0, **kw)
    assert res.particles.shape == (2, 64, 2)
    assert bool(torch.isfinite(res.log_z).all())


def test_product_and_twisted_loops_do_not_read_the_device(guarded_smc_loop):
    mix = default_2d()
    sched = VPSchedule()
    model = DiffusionModel.from_mixture(mix, sched)
    steer([model, model], "product", beta=(0.5, 0.5), particles=32, steps=6, seed=1)

    def value(x, t):  # a smooth twist with a closed-form gradient
        return (-0.1 * (x * x).sum(-1)).double(), -0.2 * x

    steer(model, "twisted", value=value, particles=32, steps=6, seed=2)


@pytest.mark.parametrize("criterion", ["cess", "ess"])
def test_annealed_smc_loop_reads_only_at_checks(guarded_annealed_loop, criterion):
    # Between "has every row finished?" checks the loop is device-only: with the check
    # spaced past max_steps it never reads.
    target = ManyWell(dim=4)
    res = samplers.annealed_smc(target, 128, batch=3, criterion=criterion, max_steps=12,
                                check_every=12, mcmc_steps=2,
                                generator=torch.Generator().manual_seed(0))
    assert res.log_z.shape == (3,)
    # ... and a check inside the loop is a read, which the guard sees.
    with pytest.raises(HostRead):
        samplers.annealed_smc(target, 64, max_steps=12, check_every=2)


def test_parallel_tempering_scans_do_not_read_the_device():
    pt = ParallelTempering(DoubleWell1D(), DiagonalGaussian(1, 0.0, 1.5), num_levels=6,
                           num_chains=16, generator=torch.Generator().manual_seed(0))
    for swap in ("deo", "seo"):
        pt.swap = swap
        acc = pt._new_accumulators()
        with no_host_reads():
            for _ in range(6):
                pt._scan(acc, adapt_step=True)
    st = pt.run_round(8)
    assert math.isfinite(st.log_z.item())


def test_crepe_rounds_do_not_read_the_device():
    model = DiffusionModel.from_mixture(default_2d(), VPSchedule())
    sampler = CREPE(model, num_levels=5, num_chains=8, beta=0.5, substeps=2,
                    generator=torch.Generator().manual_seed(0))
    acc = sampler._new_accumulators()
    with no_host_reads():
        for _ in range(4):
            sampler.round(acc)
