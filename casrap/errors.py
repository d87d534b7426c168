"""User-facing errors.

Every error a user can cause (a bad model spec, an unreadable file, an empty prompt)
is a :class:`CasrapError`; the CLI prints its message as one line and exits non-zero
instead of showing a traceback.
"""

from __future__ import annotations


class CasrapError(Exception):
    """An error caused by input or environment, reported to the user as one line."""


class ModelLoadError(CasrapError):
    """The model spec could not be resolved or loaded."""


class UnsupportedModelError(CasrapError):
    """The model is not a LLaMA-family decoder casrap knows how to prune."""


class InputError(CasrapError):
    """Bad text, prompt or dataset input."""


class CheckpointError(CasrapError):
    """A checkpoint, plan or calibration file is missing, corrupt or mismatched."""
