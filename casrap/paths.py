"""Where casrap keeps caches and run artefacts.

``CASRAP_HOME`` overrides the cache root (default: ``~/.cache/casrap``); the
converted embedded model and calibrations keyed to a model live under it.
"""

from __future__ import annotations

import os
from pathlib import Path


def casrap_home() -> Path:
    """Root of casrap's cache; created on demand."""
    root = os.environ.get("CASRAP_HOME")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "casrap"
    base.mkdir(parents=True, exist_ok=True)
    return base
