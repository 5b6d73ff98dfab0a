"""Loads the compiled extension ``pathsmc._C`` and checks it matches the running torch."""

from __future__ import annotations

import torch

_REBUILD = (
    "Rebuild it against the torch you run: `make build` in the pathsmc checkout, or "
    "`pip install --no-build-isolation -e .` from the repository root."
)

try:
    from pathsmc import _C
except ImportError as exc:  # missing .so, or undefined symbols from another torch
    raise ImportError(
        f"pathsmc: the compiled extension pathsmc._C could not be loaded ({exc}). {_REBUILD}"
    ) from exc

BUILD_INFO: dict = dict(_C.build_info())

if BUILD_INFO["torch_version"].split("+")[0] != torch.__version__.split("+")[0]:
    raise ImportError(
        f"pathsmc: the extension was built against torch {BUILD_INFO['torch_version']} but "
        f"torch {torch.__version__} is installed. {_REBUILD}"
    )


def build_info() -> dict:
    """How the extension was built: torch version, whether CUDA kernels exist, CUDA archs."""
    return dict(BUILD_INFO)
