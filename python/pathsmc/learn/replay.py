"""A replay buffer of detached paths for off-policy training."""

from __future__ import annotations

import torch

__all__ = ["ReplayBuffer"]


class ReplayBuffer:
    """FIFO store of paths: each :meth:`add` takes tensors ``(B, N, ...)`` (one entry per
    path) under fixed names; :meth:`sample` returns ``{name: (1, n, ...)}`` drawn uniformly
    with replacement.

    Args:
        capacity: the most paths kept (the oldest go first).
    """

    def __init__(self, capacity: int = 10_000) -> None:
        if int(capacity) < 1:
            raise ValueError(f"capacity: expected a positive integer, got {capacity}")
        self.capacity = int(capacity)
        self._data: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return 0 if not self._data else next(iter(self._data.values())).shape[0]

    def add(self, **paths: torch.Tensor) -> None:
        """Add paths (detached, flattened over ``(B, N)``); every call uses the same names."""
        if self._data and set(paths) != set(self._data):
            raise ValueError(f"paths: expected the names {sorted(self._data)}, got "
                             f"{sorted(paths)}")
        sizes = {k: v.shape[0] * v.shape[1] for k, v in paths.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"paths: expected the same (B, N) for every tensor, got {sizes}")
        for k, v in paths.items():
            flat = v.detach().reshape(-1, *v.shape[2:])
            old = self._data.get(k)
            cat = flat if old is None else torch.cat([old, flat])
            self._data[k] = cat[-self.capacity:]

    def sample(self, n: int, generator: torch.Generator | None = None
               ) -> dict[str, torch.Tensor]:
        """``n`` paths with replacement, each tensor ``(1, n, ...)``."""
        if not self._data:
            raise ValueError("ReplayBuffer.sample: the buffer is empty")
        size = len(self)
        dev = next(iter(self._data.values())).device
        idx = torch.randint(size, (int(n),), generator=generator,
                            device=generator.device if generator is not None else "cpu").to(dev)
        return {k: v[idx].unsqueeze(0) for k, v in self._data.items()}
