"""Deprecated location, kept for one release (see CHANGELOG.md): this module moved to
``pathsmc.commands.samplers_demo`` with the rest of the command line. Importing it warns and
gives the moved module itself, so attributes and monkeypatches reach it."""

import sys
import warnings

from pathsmc.commands import samplers_demo as _moved

warnings.warn("pathsmc.samplers_demo moved to pathsmc.commands.samplers_demo; import it from there",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
