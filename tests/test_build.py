"""Build information and the errors a user sees when the extension does not match."""

import subprocess
import sys

import torch

import pathsmc


def test_build_info():
    info = pathsmc.build_info()
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda"], bool)
    for op in ("em_step", "kernel_logpdf", "normalize", "resample", "adaptive_resample",
               "adaptive_resample_", "mala_accept", "replica_swap"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pathsmc::{op}", "CPU")


def _import_error(prelude: str) -> str:
    code = prelude + "\ntry:\n    import pathsmc\nexcept ImportError as e:\n    print(e)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    return out.stdout + out.stderr


def test_missing_extension_says_how_to_rebuild():
    msg = _import_error("import sys; sys.modules['pathsmc._C'] = None")
    assert "could not be loaded" in msg and "make build" in msg


def test_torch_mismatch_says_how_to_rebuild():
    msg = _import_error("import torch; torch.__version__ = '0.0.1'")
    assert "was built against torch" in msg and "0.0.1" in msg and "make build" in msg


def test_info_command(capsys):
    from pathsmc.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"pathsmc {pathsmc.__version__}" in out and "cuda:" in out
    assert "gpus visible:" in out and "torch.distributed backends:" in out
