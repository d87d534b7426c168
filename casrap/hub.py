"""Whether the Hugging Face hub can be reached, asked once cheaply before any slow client.

Models (:mod:`casrap.models.loader`), datasets (:mod:`casrap.data.prompts`,
:mod:`casrap.search.data`) and evaluation text (:mod:`casrap.measure.corpus`) all ask
this first: ``datasets`` and ``huggingface_hub`` retry for ~30 s when offline.
"""

from __future__ import annotations

import os
import socket


def hub_reachable(timeout: float = 2.0) -> bool:
    """False when ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set or no connection opens."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False
