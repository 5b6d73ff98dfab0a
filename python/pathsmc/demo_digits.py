"""Deprecated location, kept for one release (see CHANGELOG.md): this module moved to
``pathsmc.commands.demo_digits`` with the rest of the command line. Importing it warns and gives the
moved module itself, so attributes and monkeypatches reach it."""

import sys
import warnings

from pathsmc.commands import demo_digits as _moved

warnings.warn("pathsmc.demo_digits moved to pathsmc.commands.demo_digits; import it from there",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
