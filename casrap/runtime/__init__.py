"""Adaptive inference for users: the policy bundle, the Router, ``AdaptiveLM``, the server.

- :mod:`casrap.runtime.bundle`: policy + exact plans + model fingerprint + observation spec;
- :mod:`casrap.decide.router`: the one decision path (observe -> decide -> switch -> generate);
- :mod:`casrap.runtime.adaptive`: :class:`AdaptiveLM` (Python API, one request at a time);
- :mod:`casrap.runtime.server`: the OpenAI-compatible HTTP app (``casrap serve``);
- :mod:`casrap.runtime.loadtest`: policy vs full model vs static profiles under load.

Imports are lazy so that ``import casrap`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AdaptiveLM", "Generation", "GenerationRecord", "PolicyBundle", "Router", "load_bundle", "write_bundle"]


def __getattr__(name: str) -> Any:
    if name in {"AdaptiveLM", "Generation", "GenerationRecord", "GenerationStream"}:
        from casrap.runtime import adaptive

        return getattr(adaptive, name)
    if name in {"PolicyBundle", "load_bundle", "write_bundle", "RuntimeDefaults"}:
        from casrap.runtime import bundle

        return getattr(bundle, name)
    if name in {"Router", "Decision"}:
        from casrap.decide import router

        return getattr(router, name)
    raise AttributeError(name)
