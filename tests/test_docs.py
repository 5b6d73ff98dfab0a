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


ROOT = DOC.parents[1]
GLOSSARY_TERMS = ("FK", "ESS", "CESS", "RND", "DEO / SEO", "Λ", "Twist", "Soft value", "log Ẑ",
                  "Potential", "Proposal", "Tweedie")


def _project_text_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md"]
    for folder, pattern in (("docs", "*.md"), ("python", "*.py"), ("bench", "*.py"),
                            ("bench", "*.md"), ("examples", "*"), ("tools", "*")):
        files += [p for p in (ROOT / folder).rglob(pattern) if p.is_file()]
    return [p for p in files if p.exists() and p.suffix in (".md", ".py", ".toml", ".json")]


def test_docs_point_only_inside_the_repository() -> None:
    """No reference to the design notes or documents outside the repository."""
    bad = re.compile(r"DESIGN\.md|\bseeds'|seed's|\bthe seeds\b|shared/")
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
            for p in _project_text_files()
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
            if bad.search(line)]
    assert not hits, "\n".join(hits)


def test_markdown_links_resolve() -> None:
    """Relative links in README.md and docs/*.md point at files that exist."""
    for md in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text()):
            if "://" in target:
                continue
            assert (md.parent / target).exists(), f"{md.relative_to(ROOT)} links to {target}"


def test_glossary_defines_the_terms() -> None:
    text = (ROOT / "docs" / "glossary.md").read_text()
    defined = re.findall(r"^\*\*(.+?)\*\*", text, re.M)
    missing = [t for t in GLOSSARY_TERMS if not any(d.startswith(t) for d in defined)]
    assert not missing, missing


def test_design_doc_covers_its_sections() -> None:
    text = (ROOT / "docs" / "design.md").read_text()
    for section in ("## Conventions", "## The step weight", "## The op contract", "## Layout",
                    "## Performance model", "What is exact and what is O(h)"):
        assert section in text, section
