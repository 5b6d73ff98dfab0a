"""Machine names for benchmark result files (no torch import: the JAX side uses them too)."""

from __future__ import annotations

import os
import platform
import re


def cpu_name() -> str:
    """CPU model and the cores this process may use, e.g. 'Intel Xeon ... (2 cores)'."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return f"{model} ({cores} cores)"


def slug(name: str) -> str:
    """A file-name-safe form of a device name."""
    name = re.sub(r"\((R|TM|tm|r)\)", "", name)
    name = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    return re.sub(r"-+", "-", name)
