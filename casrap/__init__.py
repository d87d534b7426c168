"""casrap: Context Aware Structured Runtime Adaptive Pruning.

Importing the package registers the Gymnasium environments ``casrap/Pruning-v0``
and ``casrap/PruningReplay-v0`` (registration is cheap: no model is loaded).
"""

from __future__ import annotations

__version__ = "0.1.0"

from casrap.errors import CasrapError  # noqa: E402

try:  # registration must never make `import casrap` fail
    from casrap import envs as _envs  # noqa: F401
except ImportError:  # pragma: no cover - gymnasium missing
    pass

__all__ = ["AdaptiveLM", "CasrapError", "__version__"]


def __getattr__(name: str) -> object:
    """``from casrap import AdaptiveLM`` without importing torch on ``import casrap``."""
    if name == "AdaptiveLM":
        from casrap.runtime.adaptive import AdaptiveLM

        return AdaptiveLM
    raise AttributeError(f"module 'casrap' has no attribute {name!r}")
