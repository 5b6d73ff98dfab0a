"""Every ```python block of docs/concepts.md runs as is (each in a fresh namespace; the blocks
check their own claims with asserts)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "concepts.md"


def _blocks() -> list[tuple[str, str]]:
    """(id, code) of every python block, the id from the section heading above it."""
    text = DOC.read_text()
    out, heading, counts = [], "top", {}
    for m in re.finditer(r"^(#+ [^\n]*)$|^```python\n(.*?)^```", text, re.M | re.S):
        if m.group(1):
            heading = re.sub(r"\W+", "-", m.group(1).lstrip("# ").lower()).strip("-")
            continue
        counts[heading] = counts.get(heading, 0) + 1
        line = text.count("\n", 0, m.start(2))  # so that tracebacks point into the .md
        out.append((f"{heading}-{counts[heading]}", "\n" * line + m.group(2)))
    return out


BLOCKS = _blocks()


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_doc_has_examples_for_every_concept() -> None:
    ids = " ".join(i for i, _ in BLOCKS)
    for concept in ("step-weight", "nelson", "soft-value", "soc-guidance", "twisted-smc",
                    "fk-potentials", "tempering"):
        assert concept in ids, (concept, ids)


@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[i for i, _ in BLOCKS])
def test_doc_block_runs(code: str) -> None:
    exec(compile(code, str(DOC), "exec"), {"__name__": "docs_concepts"})
