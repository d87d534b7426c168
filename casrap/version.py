"""The installed package's version, read from its metadata (ground floor: imports nothing of casrap)."""

from __future__ import annotations

from importlib import metadata


def package_version() -> str:
    """casrap's version as installed; ``"0+unknown"`` when run from a tree that was never installed."""
    try:
        return metadata.version("casrap")
    except metadata.PackageNotFoundError:
        return "0+unknown"
