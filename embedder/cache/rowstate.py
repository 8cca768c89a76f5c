"""The marks of /row_state: a row is live, superseded by a newer row of its path, or removed.

The reader counts them (`embedder info`), sync and the writer set them (embedder.cache.sync),
and compaction drops every row that is not live (embedder.cache.compact); the marks live here,
below all of them.
"""

from __future__ import annotations

import numpy as np

LIVE, SUPERSEDED, REMOVED = 0, 1, 2
COMPACT_PAYS = 0.2  # dead rows above this share of the rows: compaction pays (reads skip them, files shrink)


def dead_counts(state: np.ndarray | None) -> dict[str, int]:
    if state is None:
        return {"superseded": 0, "removed": 0}
    return {"superseded": int((state == SUPERSEDED).sum()), "removed": int((state == REMOVED).sum())}


def compaction_pays(rows: int, dead: int) -> str | None:
    """Why `embedder compact` pays now, or None."""
    if rows and dead / rows > COMPACT_PAYS:
        return (f"{dead / rows:.0%} of the rows are superseded or removed: every read still skips them and the "
                "file keeps their bytes. `embedder compact CACHE.h5` rewrites it with live rows only "
                "(an index of it must then be rebuilt).")
    return None
