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


def test_tempering_schedule_is_plain_math() -> None:
    """The schedule side of PT (Λ, schedule adaptation, round statistics) imports no driver,
    and the PT module re-exports it unchanged."""
    loaded = _modules_after("import pathsmc.tempering_schedule")
    assert not loaded & set(DRIVERS), sorted(loaded & set(DRIVERS))
    import pathsmc.tempering as pt
    import pathsmc.tempering_schedule as sched

    for name in sched.__all__:
        assert getattr(pt, name) is getattr(sched, name) and name in pt.__all__, name


def test_model_wrapper_and_user_checks_import_no_driver() -> None:
    """Where a newcomer looks for them: the model wrapper and the user-function checks are
    modules of their own, import no driver, and stay importable from pathsmc.diffusion."""
    loaded = _modules_after("import pathsmc.diffusion_model, pathsmc.user_checks")
    assert not loaded & set(DRIVERS), sorted(loaded & set(DRIVERS))
    import pathsmc.diffusion as diffusion
    import pathsmc.diffusion_model as diffusion_model
    import pathsmc.user_checks as user_checks

    for mod in (diffusion_model, user_checks):
        for name in mod.__all__:
            if name != "first_call":
                assert getattr(diffusion, name) is getattr(mod, name), name


def test_drivers_share_public_helpers_only() -> None:
    """No module of the package imports a private name (``_x``) of another pathsmc module:
    the drivers share public helpers (e.g. pathsmc.smc.run_loop, dead_rows,
    pathsmc.progress.progress_bar)."""
    import ast

    package = ROOT / "python" / "pathsmc"
    bad = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pathsmc"):
                mod = node.module.rsplit(".", 1)[-1]
                if mod.startswith("_") or node.module == "pathsmc":
                    continue  # private modules (_validate, _C, ...) and __version__ are shared
                bad += [f"{path.relative_to(package)}: {node.module}.{a.name}"
                        for a in node.names if a.name.startswith("_")]
    # the command line is being reorganized; its one import goes when it moves (CHANGELOG)
    bad = [b for b in bad if b != "cli.py: pathsmc.samplers_demo._HEADER"]
    assert not bad, bad


def test_import_pathsmc_gives_reference_and_no_driver() -> None:
    loaded = _modules_after("import pathsmc\nassert callable(pathsmc.reference.resample)")
    assert "pathsmc.reference" in loaded
    assert not loaded & set(DRIVERS), sorted(loaded & set(DRIVERS))
