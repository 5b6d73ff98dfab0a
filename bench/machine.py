"""Machine names and result files of the benchmarks (torch is imported only where a device is
named: the JAX side of bench/vs_blackjax.py uses this module too)."""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


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


def device_name(device) -> str:
    """The GPU's name for a CUDA device (a ``torch.device`` or a string such as "cuda"), else
    the CPU's."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return cpu_name()


def write_results(directory: Path, stem: str, data: dict, lines: list[str]) -> Path:
    """Write ``<stem>.json`` (``data``) and ``<stem>.md`` (``lines``) under ``directory``;
    returns the path without suffix."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{stem}.json").write_text(json.dumps(data, indent=1))
    (directory / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return directory / stem
