"""Whether the Hugging Face hub can be reached: one answer for datasets and model weights alike.

It lives beside the layers, not in ``data/`` or ``models/``, so that model loading (hub ids in
``model.init``) and dataset loading (hub ids in ``data.source``) ask the same question without a
model module importing the data package.
"""

from __future__ import annotations

import os

__all__ = ["env_offline", "hub_offline_reason"]


def env_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` asks for no network."""
    return any(
        os.environ.get(var, "").lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def hub_offline_reason(timeout: float = 2.0) -> str | None:
    """Why the Hugging Face hub cannot be reached now, or None when it can.

    ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set, or a TCP connection to the hub endpoint
    (``$HF_ENDPOINT``, default ``https://huggingface.co``) failing within ``timeout`` seconds,
    so a mistyped local path never waits for the hub's network retries.
    """
    if env_offline():
        return "HF_HUB_OFFLINE=1 is set"
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{host} cannot be reached (no network? {type(err).__name__}: {err})"
