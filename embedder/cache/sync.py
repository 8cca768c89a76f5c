"""Keeping a cache in step with its source: sort the listed paths, mark dead rows, compact.

A rerun of `embed` (and `embedder watch`, and `embedder.api.sync`) compares SOURCE's listing
with the cache's live rows and sorts every path into one of four kinds:

    new        listed, with no live row and no error recorded
    changed    listed, with a live row whose recorded size or mtime differ from the file's now
               (`--hash`: whose recorded SHA-256 of the bytes differs); embedded again
    gone       a live row (or a recorded error) whose path is no longer listed
    unchanged  the rest

Rows are never rewritten in place (a cache file is only ever replaced whole, see
embedder.cache.writer): a changed file's new row is appended like any new row and the old one
is marked *superseded*; a gone file's row is marked *removed*. The marks live in one dataset,

    /row_state   uint8 [N]   0 live, 1 superseded, 2 removed   (absent: every row is live)

and the file's `generation` attribute counts the consolidations that changed its rows (an index
records the generation it reflects). Rows keep their numbers across syncs, which is what lets an
index follow the cache by adding the new rows and removing the dead ones (embedder.search.update).
Every reader sees live rows only by default (`FeatureCache(..., live=True)`).

Which row of a path is live is decided from the whole file when it is consolidated: the last row
of each listed path, unless that path's newest outcome is an error. So a sync killed at any
moment and run again ends with exactly one live row per path, whatever was committed before the
kill.

A path in the errors table whose file was modified after the cache file was written (its mtime)
is read again, counted as changed: a repaired file, or one still being copied when it was read.

Tar rows compare their member's size and mtime in the shard's headers (a rewritten shard's
members change them). URL rows are never compared (that would download them): they stay as they
are unless `--refresh-urls` asks to fetch them all again.

`compact` writes the live rows only, sorted by path (the order in which `embed` lists a folder),
into a new file that replaces the cache in one step.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedder.cache.rowstate import LIVE, REMOVED, SUPERSEDED
from embedder.data.formats import is_url

STATE = "row_state"
HASH_COLUMN = "sha256"  # the column `--hash` stores (hex digest of the file's bytes)


@dataclass(frozen=True)
class SyncOptions:
    """How a rerun compares SOURCE with the cache. `hash`: content hashes instead of size and mtime
    (a cache that stores hashes keeps comparing them). `refresh_urls`: fetch every URL row again."""

    hash: bool = False
    refresh_urls: bool = False
    # Unlisted rows count as gone. False where the listing is not the whole of SOURCE (--limit).
    prune: bool = True


@dataclass
class SyncPlan:
    """What a rerun found: the four kinds (counts) and what to embed again."""

    new: int = 0
    changed: int = 0
    gone: int = 0
    unchanged: int = 0
    redo: set[str] = field(default_factory=set)  # listed paths whose live row (or error) must be replaced
    hashes: np.ndarray | None = None  # per listing row (object array of str), when hashes are compared

    def as_dict(self) -> dict:
        return {"new": self.new, "changed": self.changed, "gone": self.gone, "unchanged": self.unchanged}


@dataclass
class Record:
    """The cache's live rows as a rerun compares them (arrays aligned with `paths`), and its error paths."""

    paths: list[str]
    size: np.ndarray  # int64, -1 unknown
    mtime: np.ndarray  # float64, NaN unknown
    sha: np.ndarray  # object (str), '' unknown
    errors: set[str]
    written_at: float = float("inf")  # mtime of the cache file: an error is older than it

    def __post_init__(self):
        self.row = {p: i for i, p in enumerate(self.paths)}


def record_of(paths: list[str], state: np.ndarray | None, columns: dict[str, np.ndarray],
              errors: list[tuple[str, str]], written_at: float = float("inf")) -> Record:
    """The live rows of a cache whose physical rows are `paths` (`state` None: all live); `written_at`:
    the cache file's mtime (a file in the errors table modified since is read again)."""
    n = len(paths)
    live = np.arange(n) if state is None else np.flatnonzero(state == LIVE)
    size = columns.get("size", np.full(n, -1, np.int64))[live]
    mtime = columns.get("mtime", np.full(n, np.nan))[live]
    sha = columns.get(HASH_COLUMN, np.full(n, "", object))[live]
    return Record([paths[i] for i in live], size, mtime, sha, {p for p, _ in errors}, written_at)


def file_stat(root: str, path: str, member=None) -> tuple[int, float] | None:
    """(size, mtime) of a listed row now; None for a URL or a file that cannot be read."""
    if member is not None and hasattr(member, "mtime"):
        return int(member.size), float(member.mtime)
    if is_url(path):
        return None
    try:
        st = os.stat(os.path.join(root, path))  # strings, not Path objects: this runs once per listed file
    except OSError:
        return None
    return st.st_size, st.st_mtime


def file_hash(root: Path, path: str, member=None) -> str:
    """SHA-256 (hex) of a row's bytes; '' where they cannot be read (the reader records why)."""
    try:
        if member is not None and hasattr(member, "read"):
            return hashlib.sha256(member.read()).hexdigest()
        with open(root / path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except Exception:  # noqa: BLE001 - unreadable now: the reader of the batch records the reason
        return ""


def classify(listing, record: Record | None, options: SyncOptions) -> SyncPlan:
    """Sort `listing`'s paths against the cache's `record` (None: no complete cache yet, all new)."""
    plan = SyncPlan()
    members = listing.members or {}
    if options.hash:
        plan.hashes = np.array([file_hash(listing.root, p, members.get(p)) if not is_url(p) else ""
                                for p in listing.paths], dtype=object)
    if record is None:
        plan.new = len(listing)
        return plan
    known = [(i, record.row.get(p)) for i, p in enumerate(listing.paths)]
    cached = [(i, r) for i, r in known if r is not None]
    fresh = [listing.paths[i] for i, r in known if r is None]
    plan.new = sum(1 for p in fresh if p not in record.errors)
    # A file that failed and was modified after the cache recorded it (repaired, or copied in whole at last).
    repaired = {p for p in fresh if p in record.errors and _newer(listing, p, record.written_at, members)}
    plan.unchanged = len(fresh) - plan.new - len(repaired)
    changed = _changed(listing, cached, record, plan.hashes, options, members)
    plan.redo = {listing.paths[i] for (i, _), c in zip(cached, changed) if c} | repaired
    plan.changed = len(plan.redo)
    plan.unchanged += len(cached) - plan.changed
    if options.prune:
        listed = set(listing.paths)
        plan.gone = sum(1 for p in record.paths if p not in listed) + sum(1 for p in record.errors
                                                                          if p not in listed and p not in record.row)
    return plan


def _newer(listing, path: str, than: float, members: dict) -> bool:
    now = file_stat(str(listing.root), path, members.get(path))
    return now is not None and now[1] > than


def _changed(listing, cached: list[tuple[int, int]], record: Record, hashes, options: SyncOptions,
             members: dict) -> np.ndarray:
    """Per (listing row, record row) pair: whether the file changed since its row was written."""
    root, paths = str(listing.root), listing.paths
    rows = np.array([r for _, r in cached], dtype=np.int64)
    urls = np.array([is_url(paths[i]) for i, _ in cached], dtype=bool)
    by_hash = (np.array([bool(record.sha[r]) for r in rows], dtype=bool) & ~urls if hashes is not None
               else np.zeros(len(rows), bool))
    # One stat per file, vectorised comparison: this is the whole cost of an unchanged rerun.
    stats = [file_stat(root, paths[i], members.get(paths[i])) if not (u or h) else (0, 0.0)
             for (i, _), u, h in zip(cached, urls, by_hash)]
    unreadable = np.array([st is None for st in stats], dtype=bool)
    size = np.array([-1 if st is None else st[0] for st in stats], dtype=np.int64)
    mtime = np.array([np.nan if st is None else st[1] for st in stats], dtype=np.float64)
    known = (record.size[rows] >= 0) & ~np.isnan(record.mtime[rows]) if len(rows) else np.zeros(0, bool)
    # without a record to compare (a cache written before the columns) a row is left as it is;
    # listed but unreadable now: read it again, the reader records why
    out = unreadable | (known & ((size != record.size[rows]) | (mtime != record.mtime[rows])))
    if hashes is not None and by_hash.any():
        out[by_hash] = [hashes[cached[k][0]] != record.sha[rows[k]] for k in np.flatnonzero(by_hash)]
    out[urls] = options.refresh_urls
    return out


def changes_since(out, listing) -> SyncPlan | None:
    """How `listing` differs from the complete cache at `out` (None: no complete cache there)."""
    from embedder.cache.reader import FeatureCache
    from embedder.errors import CacheError

    try:
        cache = FeatureCache(out, require_complete=True, live=False)
    except CacheError:
        return None
    with cache:
        names = [n for n in ("size", "mtime", HASH_COLUMN) if n in cache.column_kinds]
        try:
            record = record_of(cache.paths, cache.row_state, cache.columns(names) if names else {}, cache.errors,
                               written_at=Path(out).stat().st_mtime)
        except OSError:
            # A sharded cache's view over shards still being written (a Ray run resumed from its parts)
            # cannot be read whole: there is nothing finished to compare with, and the run resumes.
            return None
    return classify(listing, record, SyncOptions())


def settle_states(paths: list[str], state: np.ndarray, listed: set[str] | None, failed: set[str]) -> np.ndarray:
    """The row states of a consolidated file of rows `paths` (`state`: the marks so far, new rows 0).

    Each listed path keeps its last row live and every earlier one superseded; a path whose newest
    outcome is an error (`failed`) keeps none; rows of paths no longer listed are removed. `listed`
    None (an append without sync) marks only the superseded rows."""
    state = state.copy()
    last: dict[str, int] = {}
    for i, p in enumerate(paths):
        if state[i] != LIVE:
            continue
        if p in last:
            state[last[p]] = SUPERSEDED
        last[p] = i
    for p, i in last.items():
        if listed is not None and p not in listed:
            state[i] = REMOVED
        elif p in failed:
            state[i] = SUPERSEDED
    return state
