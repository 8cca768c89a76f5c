"""Keeping a cache and its index in step with a folder: `sync` once, or `watch` as files come and go.

`sync(config, index_dir)` is one rerun of `embed` (which sorts SOURCE into new, changed, gone and
unchanged files and marks the cache's dead rows: embedder.cache.sync), then `index --update` on
INDEX_DIR (which adds the new rows and takes the superseded and removed ones out of every search),
or a first build when INDEX_DIR does not exist yet. Each step is atomic on its own: the cache file
is replaced in one rename, the index folder in one swap (embedder.atomic.publish_dir). A kill
between them leaves a cache one generation ahead of its index, which `info INDEX_DIR` reports and
the next sync catches up.

`watch` runs `sync` once (catching up with what changed while nothing watched), then waits for
file-system events (watchdog; its polling observer with `--poll`, or where the platform's own
events are unavailable). Events are gathered until the folder has been quiet for `quiet`
seconds *and* every touched file kept the same size and mtime over that time, so a file still
being copied in is not read half-done; then one sync runs over what arrived (a small batch).
Ctrl-C stops between or inside a sync; what a sync had committed stays, and the next `watch`
or `embed` resumes and catches up. The model is built once and reused by every sync.

A running `embedder serve` sees each update as a new index folder swapped in whole: meta.json's
`cache_generation` (and its `updates` list) change with every published generation.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from embedder.errors import ConfigError
from embedder.extract.config import EmbedConfig


@dataclass
class SyncReport:
    """What one sync did: the embed run's report (with its four counts) and the index's update."""

    embed: object  # embedder.extract.local.EmbedReport
    index: dict | None = None  # update_index's report, or the build's metadata; None without an index
    wall_s: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.embed.sync)

    def summary(self) -> str:
        c = self.counts
        line = (f"sync {self.embed.out}: {c.get('new', 0)} new, {c.get('changed', 0)} changed, {c.get('gone', 0)} gone, "
                f"{c.get('unchanged', 0)} unchanged; {self.embed.total_rows} live rows")
        if self.index is not None:
            added, removed = self.index.get("rows_added"), self.index.get("rows_removed")
            line += (f"; index built ({self.index.get('ntotal')} rows)" if added is None else
                     f"; index +{added} -{removed or 0}" if self.index.get("status") == "updated" else "; index up to date")
        return line + f" ({self.wall_s:.1f} s)"

    def as_dict(self) -> dict:
        index = None if self.index is None else {k: v for k, v in self.index.items() if k != "meta"}
        return {"sync": self.counts, "embed": self.embed.as_dict(), "index": index, "wall_s": self.wall_s}


def sync(config: EmbedConfig, index_dir=None, *, backbone=None, progress: bool | None = None) -> SyncReport:
    """Bring the cache `config.out` (and the index at `index_dir`, when given) in step with `config.source`.

    `backbone`: one built already (a watch reuses its own). Returns a `SyncReport`."""
    from embedder.extract.local import embed

    t0 = time.perf_counter()
    report = embed(config, backbone=backbone)
    index = None
    if index_dir is not None:
        index = _follow(config.out, Path(index_dir), config.progress if progress is None else progress)
    return SyncReport(report, index, time.perf_counter() - t0)


def _follow(cache, index_dir: Path, progress: bool) -> dict:
    from embedder.search.build import build_index
    from embedder.search.update import update_index

    if (index_dir / "meta.json").is_file():
        return update_index(cache, index_dir, progress=progress)
    return build_index(cache, index_dir, progress=progress)


@dataclass
class _Arrivals:
    """Paths touched by events since the last sync, and when the last event came."""

    paths: set[str] = field(default_factory=set)
    last: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    wake: threading.Event = field(default_factory=threading.Event)

    def touch(self, *paths: str) -> None:
        with self.lock:
            self.paths.update(p for p in paths if p)
            self.last = time.monotonic()
        self.wake.set()

    def snapshot(self) -> tuple[frozenset[str], float]:
        """The touched paths and the seconds since the last event, read together: the observer's
        thread adds paths while a sync waits, so nothing may iterate the live set."""
        with self.lock:
            return frozenset(self.paths), time.monotonic() - self.last

    def take(self) -> set[str]:
        with self.lock:
            taken, self.paths = self.paths, set()
            self.wake.clear()
        return taken


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def settle(arrivals: _Arrivals, quiet: float, stop: threading.Event) -> set[str]:
    """Wait until no event came for `quiet` seconds and every touched file kept its size and mtime
    over that time (a copy in progress keeps changing them). Returns the touched paths."""
    paths, _ = arrivals.snapshot()
    seen = {p: _stat(p) for p in paths}
    while not stop.is_set():
        stop.wait(quiet)
        paths, idle = arrivals.snapshot()
        now = {p: _stat(p) for p in paths}
        if idle >= quiet and now == seen:
            return arrivals.take()
        seen = now
    return arrivals.take()


def _observer(source: Path, arrivals: _Arrivals, poll: bool, interval: float, wanted):
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer
    from watchdog.observers.polling import PollingObserver

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event):
            if event.event_type in ("opened", "closed_no_write"):
                return  # reads (our own reader's included) change nothing
            paths = [str(p) for p in (event.src_path, getattr(event, "dest_path", "")) if p]
            arrivals.touch(*[p for p in paths if event.is_directory or wanted(p)])

    def start(cls, **kwargs):
        observer = cls(**kwargs)
        observer.schedule(Handler(), str(source), recursive=True)
        observer.start()
        return observer

    if not poll:
        try:
            return start(Observer), "events"
        except OSError:  # e.g. inotify watches exhausted: poll instead
            pass
    return start(PollingObserver, timeout=interval), "polling"


def watch(config: EmbedConfig, index_dir=None, *, quiet: float = 1.0, poll: bool = False, interval: float = 1.0,
          stop: threading.Event | None = None, on_sync=None) -> None:
    """Keep `config.out` (and `index_dir`) in step with the folder `config.source` until `stop` is set
    (or Ctrl-C). `on_sync(report, mode)` is called after every sync, the first (catch-up) one included."""
    from embedder.extract.core import backbone_for, with_runtime

    source = Path(config.source)
    if not source.is_dir():
        raise ConfigError(f"watch follows a folder; SOURCE {source} is not one. For a file list or a table, rerun "
                          f"`embedder embed {source} --out {config.out}` when it changes: each rerun syncs.")
    stop = stop or threading.Event()
    config = with_runtime(config)
    backbone = backbone_for(config)
    arrivals = _Arrivals()
    observer, mode = _observer(source, arrivals, poll, interval, _wanted(config, index_dir))
    try:
        report = sync(config, index_dir, backbone=backbone, progress=False)  # what changed while nobody watched
        if on_sync:
            on_sync(report, mode)
        while not stop.is_set():
            if not arrivals.wake.wait(0.2):
                continue
            settle(arrivals, quiet, stop)
            if stop.is_set():
                break
            report = sync(config, index_dir, backbone=backbone, progress=False)
            if on_sync:
                on_sync(report, mode)
    finally:
        observer.stop()
        observer.join()


def _wanted(config: EmbedConfig, index_dir):
    """Which event paths may change SOURCE's listing: image names, not hidden, not our own outputs
    (a cache or an index kept inside the folder it follows)."""
    from embedder.data.sources import is_image_name

    ours = tuple(str(Path(p).absolute()) for p in (config.out, index_dir) if p is not None)

    def wanted(path: str) -> bool:
        name = os.path.basename(path)
        return is_image_name(name) and not name.startswith(".") and not os.path.abspath(path).startswith(ours)

    return wanted


def embed_config_of(config) -> EmbedConfig:
    """The EmbedConfig part of a WatchConfig (what the cache records as its command)."""
    return EmbedConfig(**{f.name: getattr(config, f.name) for f in fields(EmbedConfig)})
