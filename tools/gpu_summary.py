"""Summary of a tools/gpu_checks.sh run: one line per stage, then the failed test ids.

Reads LOGS/stages.tsv (name, rc, seconds, result per stage, written by the script) and the
junit XML of the pytest stages (LOGS/NAME.xml); prints, e.g.

    stage=tests rc=1 seconds=97 result=FAIL passed=540 failed=2 errors=0 skipped=7
    failed: tests/test_step.py::test_em_step_matches_reference[cuda-float32-...]

Standard library only: it runs under any python3, before or without the project's venv.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def junit_counts(path: Path) -> tuple[dict[str, int], list[str]]:
    """(passed/failed/errors/skipped counts, failed test ids) of a pytest junit XML file."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag == "failure":
                outcome = "failed"
            elif child.tag == "error":
                outcome = "errors"
            elif child.tag == "skipped" and outcome == "passed":
                outcome = "skipped"
        counts[outcome] += 1
        if outcome in ("failed", "errors"):
            module = case.get("classname", "").replace(".", "/")
            failed.append(f"{module}.py::{case.get('name')}")
    return counts, failed


def summary(logs: Path) -> list[str]:
    lines, failed = [], []
    for row in (logs / "stages.tsv").read_text().splitlines():
        name, rc, seconds, result = row.split("\t")
        fields = [f"stage={name}", f"rc={rc}", f"seconds={seconds}"]
        result, _, note = result.partition(":")
        fields.append(f"result={result}")
        xml = logs / f"{name}.xml"
        if xml.exists():
            try:
                counts, ids = junit_counts(xml)
            except ET.ParseError:  # cut off by a timeout
                fields.append("note=junit-xml-unreadable")
            else:
                fields += [f"{k}={v}" for k, v in counts.items()]
                failed += [f"failed: {i}  (stage {name})" for i in ids]
        elif result in ("FAIL", "TIMEOUT") and name not in ("build",):
            fields.append("note=no-junit-xml")
        if note:
            fields.append(f"note={note.replace(' ', '-')}")
        lines.append(" ".join(fields))
    return lines + failed


if __name__ == "__main__":
    print("\n".join(summary(Path(sys.argv[1] if len(sys.argv) > 1 else "logs"))))
