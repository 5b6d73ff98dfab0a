"""The progress bar every driver shows: one public helper instead of a private import."""

from __future__ import annotations

import sys

__all__ = ["progress_bar"]


def progress_bar(total: int, enabled: bool | None = None, desc: str = ""):
    """A tqdm bar on stderr over ``total`` steps, used as a context manager.

    ``enabled=None`` shows it when stderr is a terminal; a disabled bar still accepts
    ``update`` calls, so the loops need no branch.
    """
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, file=sys.stderr)
