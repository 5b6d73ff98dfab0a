"""Where the token twisted-SMC driver lives (it may move out of the targets package)."""

from __future__ import annotations

try:  # the driver module, once the driver has moved out of the targets package
    from pathsmc.twisted_sequence import TwistedSequenceSMC  # type: ignore[import-not-found]
except ImportError:
    from pathsmc.targets.sequence import TwistedSequenceSMC

__all__ = ["TwistedSequenceSMC"]
