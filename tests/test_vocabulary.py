"""One vocabulary across the drivers: the renamed arguments (see CHANGELOG.md) and their
deprecated aliases, which still work for one release and warn with the new name.

Each alias test checks three things: the old name gives the same result as the new one (same
seed), it warns with a DeprecationWarning that names the new one, and giving both is an error.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from pathsmc.crepe import CREPE
from pathsmc.diffusion import DiffusionModel, VPSchedule
from pathsmc.samplers import annealed_smc
from pathsmc.targets import GaussianMixture
from pathsmc.targets.boltzmann import DiagonalGaussian
from pathsmc.tempering import ParallelTempering

F64 = torch.float64


def _no_warning(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        return fn()


def _warns(new: str, old: str, fn):
    with pytest.warns(DeprecationWarning, match=f"'{old}' is deprecated.*use '{new}'"):
        return fn()


def test_annealed_smc_threshold() -> None:
    target = DiagonalGaussian(2, mean=torch.tensor([1.0, -1.0], dtype=F64), dtype=F64)

    def run(**kw):
        gen = torch.Generator().manual_seed(3)
        return annealed_smc(target, 64, 2, generator=gen, progress=False, max_steps=50, **kw)

    new = _no_warning(lambda: run(threshold=1.0))
    old = _warns("threshold", "resample_threshold", lambda: run(resample_threshold=1.0))
    assert torch.equal(new.log_z, old.log_z)
    default = _no_warning(lambda: run())
    assert not torch.equal(default.log_z, new.log_z)  # the value reaches the sampler
    with pytest.raises(TypeError, match="threshold"):
        run(threshold=1.0, resample_threshold=1.0)


def _pt(**kw) -> ParallelTempering:
    target = DiagonalGaussian(2, mean=torch.tensor([2.0, 0.0], dtype=F64), dtype=F64)
    return ParallelTempering(target, num_levels=4, generator=torch.Generator().manual_seed(0),
                             **kw)


def test_parallel_tempering_particles_and_batch() -> None:
    new = _no_warning(lambda: _pt(particles=5, batch=3))
    assert (new.B, new.C) == (3, 5)
    old = _warns("particles", "num_chains", lambda: _pt(num_chains=5, batch=3))
    assert (old.B, old.C) == (3, 5) and torch.equal(old.x, new.x)
    old = _warns("batch", "num_problems", lambda: _pt(particles=5, num_problems=3))
    assert (old.B, old.C) == (3, 5) and torch.equal(old.x, new.x)
    default = _no_warning(lambda: _pt())
    assert (default.B, default.C) == (1, 32)
    with pytest.raises(TypeError, match="particles"):
        _pt(particles=5, num_chains=5)


def _crepe(**kw) -> CREPE:
    mix = GaussianMixture(torch.tensor([0.4, 0.6], dtype=F64),
                          torch.tensor([[-1.0], [1.5]], dtype=F64),
                          torch.tensor([[[0.3]], [[0.5]]], dtype=F64))
    model = DiffusionModel.from_mixture(mix, VPSchedule())
    return CREPE(model, generator=torch.Generator().manual_seed(0), **kw)


def test_crepe_level_times_particles_and_batch() -> None:
    grid = [0.0, 0.3, 1.0]
    new = _no_warning(lambda: _crepe(level_times=grid, particles=4, batch=2))
    assert new.times == grid and (new.B, new.C) == (2, 4)
    old = _warns("level_times", "times", lambda: _crepe(times=grid, particles=4, batch=2))
    assert old.times == grid
    old = _warns("particles", "num_chains", lambda: _crepe(level_times=grid, num_chains=4,
                                                           batch=2))
    assert (old.B, old.C) == (2, 4)
    old = _warns("batch", "num_problems", lambda: _crepe(level_times=grid, particles=4,
                                                         num_problems=2))
    assert (old.B, old.C) == (2, 4)
    with pytest.raises(TypeError, match="level_times"):
        _crepe(level_times=grid, times=grid)
    with pytest.raises(ValueError, match="times"):  # the checks see the new name's value
        _crepe(level_times=[0.0, 0.5, 0.4, 1.0])
