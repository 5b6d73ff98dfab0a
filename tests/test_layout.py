"""The package layout: targets are plain math and import no driver; ``import pathsmc`` makes
the pure-PyTorch ops (``pathsmc.reference``) available without importing any driver."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRIVERS = ("pathsmc.smc", "pathsmc.diffusion", "pathsmc.samplers", "pathsmc.tempering",
           "pathsmc.crepe", "pathsmc.distributed", "pathsmc.commands.sample",
           "pathsmc.commands.demo", "pathsmc.cli", "pathsmc.commands",
           "pathsmc.commands.samplers_demo", "pathsmc.commands.demo_digits",
           "pathsmc.commands.lm_demo")


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
    assert not bad, bad


def test_command_line_is_one_subpackage() -> None:
    """The parser, demo, sample and samplers_demo live in pathsmc.commands; the old module
    paths are deprecated aliases of the moved modules themselves (so monkeypatches reach them),
    and the console script's ``pathsmc.cli:main`` (a module of its own: the editable install
    maps that name to cli.py) and ``python -m pathsmc.cli`` still work."""
    import importlib
    import warnings

    import pathsmc.cli
    import pathsmc.commands

    assert pathsmc.cli.main is pathsmc.commands.main
    for name in ("demo", "demo_digits", "lm_demo", "sample", "samplers_demo"):
        moved = importlib.import_module(f"pathsmc.commands.{name}")
        sys.modules.pop(f"pathsmc.{name}", None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            old = importlib.import_module(f"pathsmc.{name}")
        assert old is moved, name
        assert any(f"pathsmc.{name} moved to pathsmc.commands.{name}" in str(w.message)
                   for w in caught), name
    out = subprocess.run([sys.executable, "-m", "pathsmc.cli", "--version"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    assert out.startswith("pathsmc ")


def test_import_pathsmc_gives_reference_and_no_driver() -> None:
    loaded = _modules_after("import pathsmc\nassert callable(pathsmc.reference.resample)")
    assert "pathsmc.reference" in loaded
    assert not loaded & set(DRIVERS), sorted(loaded & set(DRIVERS))
