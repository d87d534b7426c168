"""From profile names to a bank, the same way for the command line and the environment.

Which importance a model's profiles are built from, and whether its base is reordered by
it before the first profile exists, used to be decided twice (the CLI's helpers and the
environment's own bank building), and the two could differ. :func:`resolve_importance`
and :func:`bank_for` are the one place: the CLI wraps them with progress bars and the
environment calls them as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from casrap.profiles.bank import ModelLayout, ProfileBank, needs_reorder, reorder_enabled
from casrap.profiles.catalogue import FULL, PLD, parse_spec
from casrap.pruners.importance import Importance

log = logging.getLogger(__name__)

SLICING_KINDS = {"heads", "kvheads", "ffn", "shipped"}  # spec kinds whose profiles can be views of a reordered base
NO_IMPORTANCE_KINDS = {"lowrank", PLD}  # spec kinds built without importance (PCA basis; the full model's weights)


def resolve_importance(model: Any, tokenizer: Any = None, weight_norm: bool = False,
                       fallback: Callable[[Any], Importance | None] | None = None,
                       progress: Callable[[int, int], None] | None = None,
                       on_calibrate: Callable[[Path, int], None] | None = None) -> Importance:
    """The importance ``model``'s profiles are built from.

    Weight norms when ``weight_norm`` (data-free, far worse profiles: for comparison only);
    else the calibration cached for this model; else ``fallback(model)`` when it gives one
    (the CLI passes the shipped bundle's calibration of the embedded model); else a
    calibration run now on the calibration text (``on_calibrate(path, n_texts)`` is told
    first, ``progress(i, n)`` as it goes) and cached.
    """
    from casrap.pruners.importance import default_calibration_path, load_or_calibrate, weight_norm_importance

    if weight_norm:
        log.info("importance from weight norms, not calibration: pruned profiles will be much worse")
        return weight_norm_importance(model)
    path = default_calibration_path(model)
    if not path.is_file() and fallback is not None:
        found = fallback(model)
        if found is not None:
            return found
    if not path.is_file():
        from casrap.data.calibration import calibration_texts

        texts = calibration_texts()
        if on_calibrate is not None:
            on_calibrate(path, len(texts))
        return load_or_calibrate(model, tokenizer, path=path, texts=texts, progress=progress)[0]
    return load_or_calibrate(model, tokenizer, path=path)[0]


def bank_for(model: Any, tokenizer: Any, names: list[str], base_model: str = "", structural: bool | None = None,
             weight_norm: bool = False, **resolve: Any) -> ProfileBank:
    """A ProfileBank holding ``none`` and every spec or plan file in ``names``.

    Importance comes from :func:`resolve_importance` (``resolve`` passes its ``fallback``,
    ``progress`` and ``on_calibrate``), only when some profile needs it. When a head/FFN
    spec or plan is asked for, the model's :class:`ModelLayout` is reordered by calibrated
    importance before any profile is built (zero-copy profiles, whatever the order of
    ``names``); the bank shares that layout.
    """
    from casrap.profiles.factory import build_bank, is_plan_file
    from casrap.profiles.plan import PruningPlan

    specs = [n for n in names if n != FULL and not is_plan_file(n)]
    files = [PruningPlan.load(Path(n)) for n in names if is_plan_file(n)]
    slicing = (structural is not False and any(parse_spec(n)[0] in SLICING_KINDS for n in specs)) or needs_reorder(files)
    needs_importance = any(parse_spec(n)[0] not in NO_IMPORTANCE_KINDS for n in specs) or slicing
    importance = resolve_importance(model, tokenizer, weight_norm, **resolve) if needs_importance else None
    if slicing and importance is not None and importance.source.startswith("calibrated") and reorder_enabled():
        ModelLayout.of(model).reorder(model, importance)  # before any profile: the bank below shares this layout
    return build_bank(model, names, base_model=base_model, importance=importance, structural=structural, tokenizer=tokenizer)
