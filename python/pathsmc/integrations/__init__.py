"""Adapters to the libraries users' models live in.

- :mod:`pathsmc.integrations.diffusers`: diffusers denoisers and schedulers as steerable models.
- :mod:`pathsmc.integrations.transformers`: token-level twisted SMC over causal LMs with their
  KV caches resampled in place.

Each submodule imports its library lazily, so ``import pathsmc`` never needs them.
"""
