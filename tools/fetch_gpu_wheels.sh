#!/usr/bin/env bash
# Download, here (online), the pure-Python wheels the offline GPU host lacks, into wheels/, for
# the device call to carry:  run(command="tools/gpu_checks.sh all", carry=["wheels"], ...).
# gpu_checks.sh then installs from wheels/ and from nowhere else (PIP_FIND_LINKS, PIP_NO_INDEX).
# The host has torch 2.11, transformers, numpy, scipy, requests, filelock, regex and JAX with
# CUDA (BUILD-NOTES of the device tool); these are what diffusers and blackjax need on top.
# Each wheel is fetched without its dependencies, for CPython 3.12 on manylinux x86_64, so the
# folder stays small (about 25 MB; the device tool carries at most 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(diffusers pillow huggingface-hub safetensors importlib-metadata zipp
          blackjax optax chex absl-py toolz)
mkdir -p wheels
for p in "${PACKAGES[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d wheels "$p" 2>&1 | grep -v "^WARNING: Location" || true
done
ls -1 wheels
du -sh wheels
