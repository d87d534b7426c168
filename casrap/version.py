"""The installed package's version, read from its metadata (ground floor: imports nothing of casrap)."""

from __future__ import annotations

from importlib import metadata


def package_version() -> str:
    """casrap's version as installed; ``"0+unknown"`` when run from a tree that was never installed."""
    try:
        return metadata.version("casrap")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def measurement_versions(root: str | None = None) -> dict[str, str]:
    """What a committed measurement records: casrap (with the source tree's commit), torch, transformers, Python.

    ``root``: the git checkout to read the commit from (default: this package's tree).
    """
    import platform
    import subprocess
    from pathlib import Path

    found = {"casrap": package_version()}
    for package in ("torch", "transformers"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    try:
        cwd = root or str(Path(__file__).resolve().parents[1])
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=cwd).stdout.strip()
    except OSError:
        commit = ""
    found["casrap"] = f"{found['casrap']} (commit {commit or 'unknown'})"
    found["python"] = platform.python_version()
    return found
