"""Print the requirements of the installed torch that a CUDA compile-and-link check needs.

`make cuda-build` installs the CUDA torch wheel with --no-deps, then these: everything torch
needs to import, without triton (0.9 GB, only torch.compile on a GPU uses it) and extras.
CI machines can be short of disk; the CUDA venv is the largest thing CI writes.
"""

import importlib.metadata

SKIPPED = ("triton",)

for requirement in importlib.metadata.requires("torch") or []:
    name = requirement.split(";")[0].strip()
    if "extra ==" in requirement or name.lower().startswith(SKIPPED):
        continue
    print(requirement)
