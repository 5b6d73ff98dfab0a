"""The one-call GPU verification script (tools/gpu_checks.sh) and its summary: a shell mistake
found here costs no device time. The script's whole CPU dry run is CI's (.ci/run)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_checks.sh"

sys.path.insert(0, str(ROOT / "tools"))
import gpu_summary  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_unknown_stage_is_a_usage_error(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), "nonsense"], capture_output=True, text=True,
                       env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "usage" in r.stderr
    assert not any(tmp_path.iterdir())  # nothing ran, nothing written


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_step" name="test_a[cuda-float32]" time="0.1"/>
<testcase classname="tests.test_step" name="test_b[cuda-float64]" time="0.1">
  <failure message="max abs err 1e-3">...</failure></testcase>
<testcase classname="tests.test_cuda" name="test_c" time="0.1">
  <skipped message="no GPU"/></testcase>
<testcase classname="tests.test_cuda" name="test_d" time="0.1"><error message="x"/></testcase>
</testsuite></testsuites>"""


def test_summary_lines_and_failed_ids(tmp_path):
    (tmp_path / "stages.tsv").write_text(
        "build\t0\t80\tok\ntests\t1\t97\tFAIL\nmemcheck\t124\t60\tTIMEOUT\n"
        "racecheck\t-\t0\tskipped:no compute-sanitizer\n")
    (tmp_path / "tests.xml").write_text(JUNIT)
    (tmp_path / "memcheck.xml").write_text(JUNIT[:120])  # cut off by the timeout
    lines = gpu_summary.summary(tmp_path)
    assert lines[0] == "stage=build rc=0 seconds=80 result=ok"
    assert lines[1] == ("stage=tests rc=1 seconds=97 result=FAIL passed=1 failed=1 errors=1 "
                        "skipped=1")
    assert lines[2] == "stage=memcheck rc=124 seconds=60 result=TIMEOUT note=junit-xml-unreadable"
    assert lines[3] == "stage=racecheck rc=- seconds=0 result=skipped note=no-compute-sanitizer"
    assert lines[4:] == ["failed: tests/test_step.py::test_b[cuda-float64]  (stage tests)",
                         "failed: tests/test_cuda.py::test_d  (stage tests)"]
