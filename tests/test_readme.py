"""The README's ten-line SMC loop runs and estimates its exact log Z."""

import math
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_smc_loop_estimates_exact_log_z():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    log_z = scope["log_Z_hat"]
    exact = -math.log(3) - 2 / 3
    # 4 independent rows; the Monte Carlo sd of one row is ~0.07 at N = 1024
    assert abs(log_z.mean().item() - exact) < 0.12
    assert (scope["ess"] > 0).all()
