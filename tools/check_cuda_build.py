"""Checks a CUDA build of pathsmc on a machine that may have no GPU: the extension imports,
reports CUDA kernels, and every op has a kernel registered for the CUDA dispatch key."""

import sys

import torch

import pathsmc

OPS = ("em_step", "kernel_logpdf", "em_step_backward", "kernel_logpdf_backward", "normalize",
       "resample", "adaptive_resample", "adaptive_resample_", "mala_accept", "replica_swap")

info = pathsmc.build_info()
print(f"pathsmc built against torch {info['torch_version']}, CUDA kernels: {info['cuda']}, "
      f"archs: {info['cuda_archs']!r}")
missing = [op for op in OPS
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pathsmc::{op}", "CUDA")]
if not info["cuda"] or missing:
    sys.exit(f"CUDA build incomplete: cuda={info['cuda']}, ops without a CUDA kernel: {missing}")
print(f"all {len(OPS)} ops have CUDA kernels")
