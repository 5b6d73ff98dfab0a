"""The package layout: targets are plain math and import no driver; ``import pathsmc`` makes
the pure-PyTorch ops (``pathsmc.reference``) available without importing any driver."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRIVERS = ("pathsmc.smc", "pathsmc.diffusion", "pathsmc.samplers", "pathsmc.tempering",
           "pathsmc.crepe", "pathsmc.distributed", "pathsmc.sample", "pathsmc.demo",
           "pathsmc.cli", "pathsmc.samplers_demo")


def _modules_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    return set(out.split())


def test_targets_import_no_driver() -> None:
    loaded = _modules_after("import pathsmc.targets")
    assert "pathsmc.targets.gaussian_mixture" in loaded  # the check sees the targets
    assert not loaded & set(DRIVERS), sorted(loaded & set(DRIVERS))


def test_import_pathsmc_gives_reference_and_no_driver() -> None:
    loaded = _modules_after("import pathsmc\nassert callable(pathsmc.reference.resample)")
    assert "pathsmc.reference" in loaded
    assert not loaded & set(DRIVERS), sorted(loaded & set(DRIVERS))
