"""The index a running service answers from: re-opened when INDEX_DIR changes under it.

Every writer of an index folder (`embedder index` builds, `--update`, `--remove`, `map`'s map.h5
aside) stages a new folder and swaps it in whole (embedder.atomic.publish_dir), so a new
generation is a new folder at the same path. Each request stats the folder and the files the
index is read from (microseconds); when that differs from the generation being served, the new
one is opened (by the first request to see the change, while the others go on with the old
one rather than wait) and swapped in.
A request holds the generation it started with until it ends, so a query in flight never mixes
two generations, and the old one is freed when its last request is done.

A new generation whose width or metric differs cannot be served by this process: the request
schemas (the vector's length, the range's name) were built from the first one. Every request
is then answered 503 saying to restart the service. A folder that is missing for an instant
(the two-rename fallback of publish_dir) keeps the current generation; one that cannot be
opened is a 503 with the reason until it can.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path

import anyio

from embedder.errors import EmbedderError
from embedder.search.query import SearchIndex

# Read when an index is opened: a change to any of them (or a new folder) is a new generation.
GENERATION_FILES = ("meta.json", "rows.h5", "index.faiss")


class IndexChanged(EmbedderError):
    """INDEX_DIR now holds an index this service cannot serve without a restart (a 503 with the fix)."""


def generation(index_dir: Path) -> tuple | None:
    """What identifies the folder's current contents: the folder's and its files' inode, size and
    mtime. None while the folder or a file is missing (a swap in progress)."""
    try:
        stats = [os.stat(path) for path in _watched(str(index_dir))]
    except FileNotFoundError:
        return None
    return tuple((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) for st in stats)


@functools.lru_cache(maxsize=8)
def _watched(index_dir: str) -> tuple[str, ...]:
    return (index_dir, *(os.path.join(index_dir, name) for name in GENERATION_FILES))


class LiveIndex:
    """The current generation of INDEX_DIR as a SearchIndex (`current()`), reloaded when it changes."""

    def __init__(self, index_dir, open_index: Callable[[Path], SearchIndex]):
        self.dir = Path(index_dir)
        self._open = open_index
        self._lock = threading.Lock()
        self.key = generation(self.dir)
        self.index = open_index(self.dir)
        self.first = self.index
        self.reloads = 0
        self._refusal: tuple[tuple | None, EmbedderError] | None = None
        self.limiter = anyio.CapacityLimiter(1)  # reloads from the event loop: their own thread, one at a time

    def fresh(self) -> bool:
        """Whether the generation being served is the folder's current one (no reload needed)."""
        key = generation(self.dir)
        return (key is None or key == self.key) and self._refusal is None

    def current(self) -> SearchIndex:
        """The generation to answer this request from (blocking: it may open a new one)."""
        key = generation(self.dir)
        if key is None or (key == self.key and self._refusal is None):
            return self.index
        if self._refusal is not None and self._refusal[0] == key:
            raise self._refusal[1]
        # The first request to see the change opens the new generation; the others meanwhile go on
        # with the one being served rather than wait (opening a large index takes seconds).
        if not self._lock.acquire(blocking=False):
            return self.index
        try:
            key = generation(self.dir)  # again, under the lock: the generation about to be opened
            if key is not None and (key != self.key or self._refusal is not None):
                self._reload(key)
            return self.index
        finally:
            self._lock.release()

    async def current_async(self) -> SearchIndex:
        """current() for code on the event loop: a reload runs in a thread of its own, never on the loop
        (nor in the threadpool, which may be busy), so /health answers while work fills every thread."""
        if self.fresh():
            return self.index
        return await anyio.to_thread.run_sync(self.current, limiter=self.limiter)

    def _reload(self, key: tuple) -> None:
        try:
            new = self._open(self.dir)
        except EmbedderError as exc:
            self._refusal = (key, IndexChanged(f"{self.dir} changed and cannot be opened: {exc} (the service "
                                               "answers again once it can; the last generation is not served)"))
            raise self._refusal[1] from None
        first = self.first
        if (new.dim, new.metric) != (first.dim, first.metric):
            self._refusal = (key, IndexChanged(
                f"{self.dir} now holds an index of {new.dim}-d features by {new.metric}; this service started on "
                f"{first.dim}-d by {first.metric} and its request schemas are built for those: restart "
                "`embedder serve` to serve the new index"))
            raise self._refusal[1]
        new.adopt_backbone(self.index)
        self.index, self.key, self._refusal = new, key, None
        self.reloads += 1
