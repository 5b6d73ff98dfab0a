"""pathsmc: fused kernels for path-space Sequential Monte Carlo and replica exchange.

The ops live in :mod:`pathsmc.ops` (``torch.ops.pathsmc.*`` underneath) and their pure-PyTorch
twins in :mod:`pathsmc.reference` (imported here, so ``ops=pathsmc.reference`` works after a
plain ``import pathsmc``). The drivers (:mod:`pathsmc.smc`, :mod:`pathsmc.diffusion`, ...) and
the targets (:mod:`pathsmc.targets`) are imported on demand.
"""

from pathsmc import reference  # pure PyTorch, imports no driver: ops=pathsmc.reference
from pathsmc._build import build_info
from pathsmc.ops import (
    adaptive_resample,
    adaptive_resample_,
    em_step,
    kernel_logpdf,
    mala_accept,
    normalize,
    replica_swap,
    resample,
)

__version__ = "0.1.0"

__all__ = [
    "adaptive_resample",
    "adaptive_resample_",
    "build_info",
    "em_step",
    "kernel_logpdf",
    "mala_accept",
    "normalize",
    "reference",
    "replica_swap",
    "resample",
]
