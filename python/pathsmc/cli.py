"""The ``pathsmc`` console script's entry point (``pathsmc = "pathsmc.cli:main"``) and
``python -m pathsmc.cli``. The command line itself lives in the subpackage
:mod:`pathsmc.commands` (the parser, ``demo``, ``sample``, ``samplers_demo``, ...)."""

from pathsmc.commands import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
