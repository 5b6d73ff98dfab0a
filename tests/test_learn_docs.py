"""Every ```python block of docs/learn.md runs as is (each in a fresh namespace; the blocks
check their own claims with asserts): the examples that train a twist in seconds on CPU."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "learn.md"


def _blocks() -> list[tuple[str, str]]:
    """(id, code) of every python block, numbered in order."""
    text = DOC.read_text()
    out = []
    for i, m in enumerate(re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S)):
        line = text.count("\n", 0, m.start(1))  # so that tracebacks point into the .md
        out.append((f"block-{i + 1}", "\n" * line + m.group(1)))
    return out


BLOCKS = _blocks()


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_doc_has_the_training_examples() -> None:
    code = "\n".join(c for _, c in BLOCKS)
    assert "train_token_twist" in code and "train_diffusion_twist" in code


@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[i for i, _ in BLOCKS])
def test_doc_block_runs(code: str) -> None:
    exec(compile(code, str(DOC), "exec"), {"__name__": "docs_learn"})
