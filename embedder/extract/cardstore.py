"""Fidelity cards kept for reuse: an int8 card is a function of what it measured, so a rerun on the
same images does not measure it again.

What decides an `--precision int8` card's figures (cosines, overlaps, accuracies, the level the
ladder stopped at) is hashed into its key: the fp32 graph (its folder key hashes the network's
tensors, the settings and the exporter's versions), the calibration and held-aside pixels, the
labels, the calibration method, the gates, the thread count, the CPU and the versions of the
libraries that compute the card. fp32 is bit-identical run to run on one machine and ONNX Runtime
runs with deterministic compute, so the same key gives the same figures. A card is stored as
`$EMBEDDER_CACHE/cards/<key>.json` and reused while its key matches; its speeds are the ones measured
when it was made, and the card says when (`reused`). Deleting the folder makes every card fresh.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from embedder.atomic import staged_file
from embedder.models.onnx import cache_root
from embedder.models.runtime import cpu_info

STORE_FORMAT = "embedder-card-store-1"


def card_key(parts: dict) -> str:
    """The store key of a card decided by `parts` (JSON-serialisable)."""
    text = json.dumps({"store": STORE_FORMAT, **parts}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def folder() -> Path:
    return cache_root().parent / "cards"


def load(key: str) -> dict | None:
    """The card stored under `key`, or None (missing, or unreadable: it is then measured and written again)."""
    try:
        stored = json.loads((folder() / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) and stored.get("key") == key else None


def save(key: str, card: dict) -> None:
    """Store `card` under `key`, atomically (a reader sees the old file or the whole new one)."""
    folder().mkdir(parents=True, exist_ok=True)
    with staged_file(folder() / f"{key}.json") as tmp:
        tmp.write_text(json.dumps({**card, "key": key}, sort_keys=True))


def cpu_identity() -> str:
    """The CPU's model name and feature flags: a card's figures (int8 kernels, bf16) depend on them."""
    name, flags = cpu_info()
    return f"{name}; {' '.join(sorted(flags))}"
