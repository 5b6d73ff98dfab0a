"""Deprecated argument names kept for one release (see CHANGELOG.md)."""

from __future__ import annotations

import warnings
from typing import Any


def renamed_argument(where: str, new: str, new_value: Any, old: str, old_value: Any,
                     default: Any) -> Any:
    """The value of argument ``new`` of ``where``, accepting its deprecated name ``old``.

    ``new_value``/``old_value`` are None when not given; giving both is an error; giving
    ``old`` warns with a :class:`DeprecationWarning` that names ``new``.
    """
    if old_value is None:
        return default if new_value is None else new_value
    if new_value is not None:
        raise TypeError(f"{where}: got both {new!r} and its deprecated name {old!r}; "
                        f"give {new!r} only")
    warnings.warn(f"{where}: {old!r} is deprecated and will be removed in the next release; "
                  f"use {new!r}", DeprecationWarning, stacklevel=3)
    return old_value
