"""``python -m pathsmc``: the same command line as the ``pathsmc`` console script."""

from pathsmc.cli import main

raise SystemExit(main())
