"""Writing the feature cache: crash-safe commits, resume, append, consolidation.

Crash safety. HDF5 is not safe to modify in place across a `kill -9` (a half-flushed
metadata cache can leave a file that no longer opens), so the cache file itself is only
ever *replaced*, atomically (write a temporary file, fsync, `os.replace`). While a run is
in progress its rows are committed as immutable part files in `CACHE.h5.partial/`, each
written to a temporary name and renamed into place: the rename is the commit marker.
During a fresh run `CACHE.h5` is a small file whose datasets are HDF5 *virtual datasets*
over the committed parts (`complete = False`, `committed_rows` = rows readable), rewritten
atomically after each commit by `embedder.cache.view`, the writer of a sharded cache's view too. During an append run the previous complete cache stays in
place untouched. At the end everything is consolidated into one self-contained file and
the part folder is removed. Rerunning the command resumes after the last committed part;
parts are made of whole batches, so a resumed run feeds the network exactly the batches
an uninterrupted run would have, and the final file is bit-identical.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # typing.Self is Python 3.11+; annotations are not evaluated at run time
    from typing import Self

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import h5py
import numpy as np

from embedder.atomic import WriteLock, atomic_replace, discard, is_disk_full, remove_leftovers, temp_dir, temp_file
from embedder.cache.columns import GROUP, kinds_in, null_columns, read_columns, str_width, write_columns
from embedder.cache.columns import concat as column_concat
from embedder.cache.columns import differences as column_differences
from embedder.cache.reader import (
    FEATURE_DTYPES,
    PARTIAL_SUFFIX,
    SCHEMA_VERSION,
    STR,
    CacheSpec,
    FeatureCache,
    chunk_rows,
    read_paths,
)
from embedder.cache.sync import (
    HASH_COLUMN,
    STATE,
    SyncOptions,
    SyncPlan,
    classify,
    record_of,
    settle_states,
)
from embedder.cache.view import Member, error_widths, link_primary, merged, write_attrs, write_errors, write_view
from embedder.data.metadata import as_kind, nulls
from embedder.errors import CacheError, CacheMismatchError, DiskFullError
from embedder.names import decode_path, encode_path
from embedder.outputs import CACHE, claim


@dataclass
class _Part:
    """Rows of one commit, kept in memory until written."""

    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)
    extra: dict[str, list[np.ndarray]] = field(default_factory=dict)  # the other layers, by name
    columns: dict[str, list[np.ndarray]] = field(default_factory=dict)  # metadata columns, by name
    errors: list[tuple[str, str]] = field(default_factory=list)
    processed: int = 0  # files looked at, successes and errors


@dataclass
class _Committed:
    """What the parts already on disk hold (paths only; features stay on disk)."""

    files: list[Path] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    path_widths: list[int] = field(default_factory=list)  # bytes of each part's fixed-width paths
    column_widths: list[dict[str, int]] = field(default_factory=list)  # the same, per str column
    paths: set[str] = field(default_factory=set)
    errors: list[tuple[str, str]] = field(default_factory=list)
    error_counts: list[int] = field(default_factory=list)  # rows of each part's errors table
    error_widths: list[tuple[int, int] | None] = field(default_factory=list)  # None: variable-length (older runs)
    error_bytes: int = 0  # of every error's path and reason, kept as they come (summing them at each commit was quadratic)

    def add_errors(self, errors: list[tuple[str, str]], widths: tuple[int, int] | None) -> None:
        self.errors += errors
        self.error_counts.append(len(errors))
        self.error_widths.append(widths)
        self.error_bytes += sum(len(encode_path(p)) + len(r) for p, r in errors)


class CacheWriter:
    """Writes one run's rows into the cache at `path`, resuming any interrupted run.

    Usage (this is what `embedder.extract.core.embed_into` does)::

        with CacheWriter(path, spec, listing, overwrite=False, commit_every=512) as w:
            for batch in batches_of(w.pending):        # listing indices still to do
                w.add(ok_indices, features, errors)    # commits by itself every `commit_every` files
            w.finish()                                 # consolidate into one file
    """

    def __init__(
        self, path, spec: CacheSpec, listing, *, overwrite: bool = False, commit_every: int = 512,
        fixed_width_paths: bool = False, lock: WriteLock | None = None, ignored: dict | None = None,
        columns: dict[str, np.ndarray] | None = None, retry_errors: bool = False, sync: SyncOptions | None = None,
    ):
        """`lock`: the cache's write lock, when the caller took it already (`embed` does, before
        it builds the model, so that a second run is refused at once). `ignored`: {reason: files}
        not in the listing, recorded in the cache (default: the listing's own). `columns`: values
        of the columns of `spec.columns` known before reading (split, --metadata), aligned with
        the listing's rows; the others come with each batch (`add(..., columns=)`). `retry_errors`:
        the complete cache's errors-table rows are read again (a download that timed out, a file
        since repaired); the finished cache keeps each path's newest outcome. `sync`: compare the listing
        with the complete cache's live rows (embedder.cache.sync): changed files are embedded again
        and their old rows superseded, gone files' rows removed; `self.plan` counts the four kinds.
        None: append only (new paths; nothing is compared or marked)."""
        if spec.feature_dtype not in FEATURE_DTYPES:
            raise CacheError(f"feature dtype must be one of {FEATURE_DTYPES}, got {spec.feature_dtype!r}.")
        self.path = Path(path).absolute()
        self.spec = spec
        self.listing = listing
        self.overwrite = overwrite
        self.commit_every = max(1, int(commit_every))
        # Fixed-width /paths in the finished file: lets a virtual dataset span several caches
        # (the shards of a Ray run, embedder.cache.shards); variable-length strings cannot be mapped.
        self.fixed_width_paths = fixed_width_paths
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self._lock = lock
        self._own_lock = lock is None
        self.ignored = listing.ignored_counts() if ignored is None else dict(ignored)
        self.static_columns = dict(columns or {})
        for name, values in self.static_columns.items():
            if name not in spec.columns or len(values) != len(listing):
                raise ValueError(f"column {name!r}: not in the spec, or not one value per listing row")
        self._buffer = _Part()
        self.base: dict | None = None  # summary of the previous complete cache, when appending
        self.committed = _Committed()
        self.classes: list[str] = []  # label space of the parts (append-only)
        self._blocks: list[Member] = []  # block views written so far over the first parts (_blocked)
        self.pending: np.ndarray = np.zeros(0, dtype=np.int64)
        self.removed_from_source = 0
        self.retry_errors = retry_errors
        self.sync = sync
        self.plan: SyncPlan | None = None
        self._dead = 0  # dead rows (superseded, removed) of the consolidated file

    # lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._own_lock:
            self._lock = WriteLock(self.path)
            self._lock.acquire()
        try:
            # Whatever --overwrite says, only a feature cache is ever replaced (embedder.outputs).
            claim(self.path, CACHE)
            # We hold the lock: any temporary file of this cache is a dead run's.
            remove_leftovers(self.path)
            remove_leftovers(self.partial)
            self._prepare()
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._unlock()

    def _unlock(self) -> None:
        if self._own_lock and self._lock is not None:
            self._lock.release()
            self._lock = None

    # planning ------------------------------------------------------------------------------
    def _prepare(self) -> None:
        if self.overwrite:
            shutil.rmtree(self.partial, ignore_errors=True)
            if self.path.exists():
                self.path.unlink()
        existing = self._read_existing()
        manifest = self._read_manifest()
        self._keep_hashes(existing, manifest)
        if existing is not None and existing["complete"]:
            self.base = existing
            self._check_columns(existing["columns"], f"{self.path}")
        if manifest is not None:
            self._scan_parts()
            base_rows = self.base["rows"] if self.base else 0
            if manifest.get("base_rows", 0) != base_rows:
                if not self._parts_are_in(existing, manifest):
                    raise CacheError(
                        f"{self.partial} belongs to an interrupted run on a different version of {self.path}. "
                        "Rerun with --overwrite to start over."
                    )
                # A run killed after its consolidated file was in place, before the parts were
                # removed: the cache is complete and holds them. Drop them and carry on.
                self._drop_partial()
                self.committed, manifest = _Committed(), None
        if manifest is not None:
            self.classes = list(manifest["classes"])
            self._check_columns(manifest.get("columns", {}), f"the interrupted run whose parts are in {self.partial}")
        for name in self.listing.classes:
            if name not in self.classes:
                self.classes.append(name)
        if manifest is None or manifest["classes"] != self.classes:
            self._write_manifest()
        # listing label -> label in the parts' class list; the extra last entry maps -1 to -1
        self._relabel = np.array([self.classes.index(c) for c in self.listing.classes] + [-1], dtype=np.int64)

        done = set(self.committed.paths)
        done.update(p for p, _ in self.committed.errors)
        if self.sync is not None:
            self.plan = classify(self.listing, self.base["record"] if self.base else None, self.sync)
            if self.plan.hashes is not None:
                self.static_columns[HASH_COLUMN] = self.plan.hashes
        if self.base:
            if self.sync is not None:  # the live rows' paths, but those to embed again
                done.update(p for p in self.base["record"].paths if p not in self.plan.redo)
            else:
                done.update(self.base["paths"])
            if not self.retry_errors:  # (a sync reads again those modified since: plan.redo)
                redo = self.plan.redo if self.plan is not None else set()
                done.update(p for p, _ in self.base["errors"] if p not in redo)
            listed = set(self.listing.paths)
            self.removed_from_source = sum(1 for p in self.base["paths"] if p not in listed)
        self.pending = np.array([i for i, p in enumerate(self.listing.paths) if p not in done], dtype=np.int64)
        if self.base is None and manifest is None:
            self._write_view()  # from the first second on, CACHE.h5 opens and says "0 rows"

    def _keep_hashes(self, existing: dict | None, manifest: dict | None) -> None:
        """A cache (or an interrupted run) that stores content hashes keeps storing and comparing them;
        `--hash` adds them to one that does not (its earlier rows hold '')."""
        recorded = [(existing or {}).get("columns") or {}, (manifest or {}).get("columns") or {}]
        wanted = self.sync is not None and self.sync.hash
        if HASH_COLUMN in self.spec.columns or not (wanted or any(HASH_COLUMN in c for c in recorded)):
            return
        self.spec = replace(self.spec, columns={**self.spec.columns, HASH_COLUMN: "str"})
        self.sync = replace(self.sync or SyncOptions(), hash=True)

    def _check_columns(self, kinds: dict[str, str] | None, what: str) -> None:
        """An append or a resume keeps the cache's columns: refuse a run whose columns differ, naming
        them. A cache written before columns existed (None) takes them, its rows holding nulls; so does
        one written without --hash take the hash column."""
        if kinds is not None and HASH_COLUMN not in kinds:
            kinds = {**kinds, HASH_COLUMN: "str"} if HASH_COLUMN in self.spec.columns else kinds
        diff = "" if kinds is None else column_differences(kinds, self.spec.columns)
        if diff:
            raise CacheError(
                f"The metadata columns of {what} differ from this run's ({diff}). Columns come from "
                "--metadata and from SOURCE itself (a table's other columns, a tar sample's .json keys and .txt): "
                "give the same ones to append or resume, or use --overwrite to start over with these."
            )

    def _parts_are_in(self, existing: dict | None, manifest: dict) -> bool:
        """Whether the committed parts are already the last rows of the complete cache `existing`."""
        if existing is None or not existing["complete"]:
            return False
        base_rows = manifest.get("base_rows", 0)
        parts = [p for part in self._part_paths() for p in part]
        return existing["rows"] == base_rows + len(parts) and existing["paths"][base_rows:] == parts

    def _part_paths(self):
        for part in self.committed.files:
            with h5py.File(part, "r") as f:
                yield [decode_path(p) for p in f["paths"][:]]

    def _drop_partial(self) -> None:
        """Remove the part folder: first renamed away in one step (so a reader of the live view sees
        it gone at once, never half deleted: embedder.cache.reader), then deleted."""
        if not self.partial.exists():
            return
        trash = temp_dir(self.partial)
        os.replace(self.partial, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _read_existing(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            cache = FeatureCache(self.path, require_complete=False, live=False)
        except CacheError as exc:
            raise CacheError(f"{exc} Use --overwrite to replace it, or choose another --out.") from None
        with cache:
            diff = self.spec.differences(cache.file_components, cache.source)
            if diff:
                raise CacheMismatchError(self.path, diff, "Use --overwrite to replace it, or choose another --out.")
            if not cache.complete:
                return {"complete": False}
            paths, errors, state = cache.paths, cache.errors, cache.row_state
            kinds = kinds_in(cache.h5file)
            record = record_of(paths, state, cache.columns([n for n in ("size", "mtime", HASH_COLUMN)
                                                            if n in (kinds or {})]), errors,
                               written_at=self.path.stat().st_mtime)
            return {"complete": True, "rows": len(cache), "paths": paths, "errors": errors, "columns": kinds,
                    "state": state, "generation": cache.generation, "record": record}

    def _read_manifest(self) -> dict | None:
        mpath = self.partial / "manifest.json"
        if not mpath.exists():
            return None
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CacheError(f"{mpath} is unreadable ({exc}). Rerun with --overwrite to start over.") from exc
        diff = self.spec.differences(manifest["components"], manifest["source"])
        if diff:
            raise CacheMismatchError(
                self.path,
                diff,
                f"(These settings come from an interrupted run whose parts are in {self.partial}.) "
                "Rerun with the original settings to resume it, or use --overwrite to discard it.",
            )
        return manifest

    def _write_manifest(self) -> None:
        self.partial.mkdir(parents=True, exist_ok=True)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "components": self.spec.components,
            "fingerprint": self.spec.fingerprint,
            "source": self.spec.source,
            "classes": self.classes,
            "base_rows": self.base["rows"] if self.base else 0,
            "columns": self.spec.columns,
            "fidelity": self.spec.fidelity,  # a fast path's card: its calibration rows, reused on resume
        }
        tmp = self.partial / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        atomic_replace(tmp, self.partial / "manifest.json")

    def _scan_parts(self) -> None:
        for stale in self.partial.glob("*.tmp"):
            stale.unlink()  # a commit that was killed before its rename never happened
        for part in sorted(self.partial.glob("part-*.h5")):
            with h5py.File(part, "r") as f:
                paths = [decode_path(p) for p in f["paths"][:]]
                errors = list(zip(read_paths(f["errors/path"]), f["errors/reason"].asstr()[:]))
                widths = error_widths(f)
                self.committed.path_widths.append(f["paths"].dtype.itemsize)
                self.committed.column_widths.append(
                    {n: f[f"{GROUP}/{n}"].dtype.itemsize for n, k in self.spec.columns.items() if k == "str"})
            self.committed.files.append(part)
            self.committed.rows.append(len(paths))
            self.committed.paths.update(paths)
            self.committed.add_errors(errors, widths)

    @property
    def resumed_rows(self) -> int:
        return sum(self.committed.rows)

    # appending -----------------------------------------------------------------------------
    def add(self, indices: np.ndarray, features, errors: list[tuple[int, str]],
            columns: dict[str, np.ndarray] | None = None) -> None:
        """Record one batch: features of the listing rows `indices`, and (index, reason) failures.

        `features` is one array, or {layer: array} with every layer of `spec.layers` (multi-layer caches).
        `columns`: values of the columns of `spec.columns` measured while reading (size, mtime,
        width, height), aligned with `indices`; the others come from the writer's `columns`, and a
        column given by neither holds nulls (embedder.data.metadata).
        Commits a part once `commit_every` files have accumulated; call only on batch boundaries.
        """
        extra = {}
        if isinstance(features, dict):
            if list(features) != list(self.spec.layers):
                raise ValueError(f"features have layers {list(features)}, cache expects {list(self.spec.layers)}")
            for name, dim in self.spec.layers.items():
                if len(features[name]) != len(indices) or (len(indices) and features[name].shape[1] != dim):
                    raise ValueError(f"layer {name!r} has shape {features[name].shape}, cache expects width {dim}")
            primary, *others = self.spec.layers
            extra = {name: features[name] for name in others}
            features = features[primary]
        elif self.spec.layers:
            raise ValueError(f"this cache stores layers {list(self.spec.layers)}; pass features as a dict")
        if len(indices) != len(features):
            raise ValueError("indices and features differ in length")
        if len(features) and features.shape[1] != self.spec.feature_dim:
            raise ValueError(f"features have width {features.shape[1]}, cache expects {self.spec.feature_dim}")
        buf = self._buffer
        for i in indices:
            buf.paths.append(self.listing.paths[i])
            buf.labels.append(int(self._relabel[self.listing.labels[i]]))
        if len(features):
            buf.features.append(np.asarray(features, dtype=self.spec.feature_dtype))
            for name, value in extra.items():
                buf.extra.setdefault(name, []).append(np.asarray(value, dtype=self.spec.feature_dtype))
        self._add_columns(buf, np.asarray(indices, dtype=np.int64), columns or {})
        buf.errors += [(self.listing.paths[i], reason) for i, reason in errors]
        buf.processed += len(indices) + len(errors)
        if buf.processed >= self.commit_every:
            self.commit()

    def _add_columns(self, buf: _Part, indices: np.ndarray, given: dict[str, np.ndarray]) -> None:
        for name, kind in self.spec.columns.items():
            if name in given:
                values = given[name]
            elif name in self.static_columns:
                values = self.static_columns[name][indices]
            else:  # nobody knows them (e.g. vectors imported without it): nulls
                values = nulls(name, kind, len(indices))
            if len(values) != len(indices):
                raise ValueError(f"column {name!r} has {len(values)} values for {len(indices)} rows")
            buf.columns.setdefault(name, []).append(as_kind(values, kind))

    def commit(self) -> None:
        buf = self._buffer
        if not buf.processed:
            return
        number = len(self.committed.files)
        final = self.partial / f"part-{number:06d}.h5"
        tmp = final.with_suffix(".h5.tmp")
        with self._writing(tmp, needed=_part_bytes(buf)):
            self._write_part(tmp, buf)
            atomic_replace(tmp, final)
        self.committed.files.append(final)
        self.committed.rows.append(len(buf.paths))
        self.committed.path_widths.append(max((len(encode_path(p)) for p in buf.paths), default=1))
        self.committed.column_widths.append({n: str_width(v) for n, v in self._part_columns(buf).items()
                                             if self.spec.columns[n] == "str"})
        self.committed.paths.update(buf.paths)
        self.committed.add_errors(buf.errors, _widths(buf.errors))
        self._buffer = _Part()
        if self.base is None:
            self._write_view()

    @contextmanager
    def _writing(self, tmp: Path, needed: int):
        """Write `tmp`, which takes about `needed` bytes: gone again if the write fails.

        A full disk becomes a DiskFullError that says what is safe (the committed rows) and
        that rerunning resumes. It is checked *before* writing: HDF5 does not recover from a
        failed write (the file's handle stays broken, and the interpreter can crash at exit),
        so a write that would not fit is never started. One that fails anyway (the disk
        filled up meanwhile) is reported the same way, marked `unclean`."""
        free = _free_bytes(tmp.parent)
        if free is not None and free < needed + DISK_HEADROOM:
            raise self._disk_full(free, needed)
        try:
            yield
        except BaseException as exc:
            discard(tmp)
            if is_disk_full(exc):
                raise self._disk_full(_free_bytes(tmp.parent), needed, unclean=True) from None
            raise

    def _disk_full(self, free: int | None, needed: int, unclean: bool = False) -> DiskFullError:
        error = DiskFullError(
            f"Not enough space on the device of {self.path} (the next write needs about "
            f"{_size(needed + DISK_HEADROOM)}, {'?' if free is None else _size(free)} are free). "
            f"{self.resumed_rows + (self.base or {}).get('rows', 0)} rows are committed and safe: free some "
            "space and rerun the same command, it resumes from there."
        )
        error.unclean = unclean
        return error

    def _write_part(self, tmp: Path, buf: _Part) -> None:
        dim = self.spec.feature_dim
        feats = np.concatenate(buf.features) if buf.features else np.zeros((0, dim), self.spec.feature_dtype)
        width = max((len(encode_path(p)) for p in buf.paths), default=1)
        # The core driver builds the (small) part in memory and writes it in one go, so a failed
        # write is a plain OSError, not a broken HDF5 handle.
        with h5py.File(tmp, "w", track_order=False, driver="core", backing_store=True) as f:
            f.create_dataset("features", data=feats, track_times=False)
            for name, d in self.spec.extra_layers.items():
                arrays = buf.extra.get(name)
                data = np.concatenate(arrays) if arrays else np.zeros((0, d), self.spec.feature_dtype)
                f.create_dataset(f"layers/{name}", data=data, track_times=False)
            f.create_dataset("labels", data=np.asarray(buf.labels, dtype=np.int64), track_times=False)
            fixed = h5py.string_dtype("utf-8", width)  # fixed width: virtual datasets cannot span vlen strings
            paths = np.array([encode_path(p) for p in buf.paths], dtype=fixed)
            f.create_dataset("paths", data=paths, track_times=False)
            write_errors(f, buf.errors, fixed_width=True)  # fixed width: the view maps it
            write_columns(f, self.spec.columns, self._part_columns(buf), fixed_width=True)

    def _part_columns(self, buf: _Part) -> dict[str, np.ndarray]:
        return column_concat([{n: np.concatenate(v) for n, v in buf.columns.items()}] if buf.columns else [],
                             self.spec.columns)

    def _write_view(self) -> None:
        """CACHE.h5 as a view over the committed parts (fresh runs only; embedder.cache.view)."""
        c = self.committed
        # The parts' errors are mapped, not copied, unless a part of an older run holds them variable-length.
        mapped = all(w is not None or n == 0 for n, w in zip(c.error_counts, c.error_widths))
        members = self._blocked() if mapped else [self._member(i) for i in range(len(c.files))]
        needed = (64 << 10) + 512 * len(members) + (0 if mapped else 2 * c.error_bytes)
        write_view(self.path, self.spec, self.classes, members, None if mapped else c.errors, complete=False,
                   ignored=self.ignored, guard=lambda tmp: self._writing(tmp, needed=needed))

    def _member(self, i: int, folder: Path | None = None) -> Member:
        """Committed part `i` as a view's member, named relative to `folder` (default: the cache's)."""
        c = self.committed
        return Member(os.path.relpath(c.files[i], folder or self.path.parent), c.rows[i], c.path_widths[i],
                      c.column_widths[i], c.error_counts[i], c.error_widths[i])

    def _blocked(self) -> list[Member]:
        """The committed parts as a view's members, each full run of VIEW_BLOCK parts replaced by one
        block view over them: the run's view maps O(parts / VIEW_BLOCK + VIEW_BLOCK) members at each
        commit, not every part (that was quadratic over a run). A block is written once, when it fills;
        a resumed run writes its blocks anew (never trusting a file the killed run left)."""
        parts = len(self.committed.files)
        while len(self._blocks) < parts // VIEW_BLOCK:
            k = len(self._blocks)
            block = self.partial / f"view-{k:06d}.h5"
            inside = [self._member(i, self.partial) for i in range(k * VIEW_BLOCK, (k + 1) * VIEW_BLOCK)]
            write_view(block, self.spec, self.classes, inside, None, complete=False,
                       guard=lambda tmp: self._writing(tmp, needed=(64 << 10) + 512 * VIEW_BLOCK))
            self._blocks.append(merged(os.path.relpath(block, self.path.parent), inside))
        return self._blocks + [self._member(i) for i in range(len(self._blocks) * VIEW_BLOCK, parts)]

    # finishing -----------------------------------------------------------------------------
    def finish(self) -> int:
        """Commit what is buffered and consolidate base + parts into one file. Returns its live rows."""
        self.commit()
        if not self.committed.files and self.base is not None and not self._marks_change():
            self._drop_partial()
            state = self.base["state"]
            return self.base["rows"] - (0 if state is None else int(np.count_nonzero(state)))
        old = FeatureCache(self.path, require_complete=True, live=False) if self.base is not None else None
        tmp = temp_file(self.path)
        needed = sum(p.stat().st_size for p in self.committed.files) + (self.path.stat().st_size if old else 0)
        try:
            with self._writing(tmp, needed=needed + (256 << 10)):
                rows = self._consolidate(old, tmp)
                atomic_replace(tmp, self.path)  # the commit point: from here on the cache is complete
        finally:
            if old is not None:
                old.close()
        self._drop_partial()  # a kill before this is recognised by the next run (_parts_are_in)
        return rows - self._dead

    def _consolidate(self, old: FeatureCache | None, tmp: Path) -> int:
        """Base (when appending) + parts, as one self-contained file at `tmp`. Returns its rows."""
        classes = sorted(set(self.classes) | set(old.classes if old else []))
        total = (len(old) if old else 0) + self.resumed_rows
        with h5py.File(tmp, "w") as f:
            rows = self._create_rows(f, total)
            paths: list[str] = []
            errors: list[tuple[str, str]] = []
            values: list[dict[str, np.ndarray]] = []  # columns, like paths, are held in memory
            if old is not None:
                _copy_base(old, rows, _relabelling(old.classes, classes))
                paths, errors = old.paths, old.errors
                have = [n for n in self.spec.columns if n in old.column_kinds]
                values.append({**null_columns(self.spec.columns, len(old)), **old.columns(have)} if have
                              else null_columns(self.spec.columns, len(old)))
            new = self._copy_parts(rows, len(paths), _relabelling(self.classes, classes), values)
            # A base error read again (--retry-errors) is now a row or a newer error: the newest outcome wins.
            redone = set(new) | {p for p, _ in self.committed.errors}
            paths, errors = paths + new, [e for e in errors if e[0] not in redone]
            if self.sync is not None and self.sync.prune:  # a gone file's error goes with it
                listed = set(self.listing.paths)
                errors = [e for e in errors if e[0] in listed]
            self._create_paths(f, paths)
            self._write_states(f, paths)
            if self.spec.columns:
                write_columns(f, self.spec.columns, column_concat(values, self.spec.columns),
                              fixed_width=self.fixed_width_paths, resizable=True)
            f.create_dataset("classes", data=np.array(classes, dtype=object), dtype=STR, track_times=False)
            write_errors(f, errors + self.committed.errors)
            link_primary(f, self.spec)
            write_attrs(f, self.spec, rows=total, complete=True, ignored=self.ignored)
            f.attrs["generation"] = (self.base or {}).get("generation", 0) + 1
        return total

    def _states(self, paths: list[str]) -> np.ndarray:
        """The row states of the consolidated rows `paths` (embedder.cache.sync.settle_states)."""
        base = (self.base or {}).get("state")
        state = np.zeros(len(paths), np.uint8)
        if base is not None:
            state[:len(base)] = base
        listed = set(self.listing.paths) if self.sync is not None and self.sync.prune else None
        return settle_states(paths, state, listed, {p for p, _ in self.committed.errors})

    def _marks_change(self) -> bool:
        """Whether a sync with nothing to embed still changes the base's row states (gone files)."""
        if self.sync is None:
            return False
        base = self.base["state"] if self.base["state"] is not None else np.zeros(self.base["rows"], np.uint8)
        return not np.array_equal(self._states(self.base["paths"]), base)

    def _write_states(self, f: h5py.File, paths: list[str]) -> None:
        """/row_state, only where a row is dead: a cache without dead rows is as it always was."""
        state = self._states(paths)
        self._dead = int(np.count_nonzero(state))
        if self._dead:
            f.create_dataset(STATE, data=state, maxshape=(None,), chunks=(min(65536, max(len(state), 1)),),
                             track_times=False)

    def _create_rows(self, f: h5py.File, total: int) -> dict[str, h5py.Dataset]:
        return create_rows(f, self.spec, total)

    def _copy_parts(self, rows: dict[str, h5py.Dataset], start: int, relabel: np.ndarray,
                    values: list[dict[str, np.ndarray]]) -> list[str]:
        """The committed parts' rows, from row `start` on. Returns their paths; appends their columns to `values`."""
        paths: list[str] = []
        for part, n in zip(self.committed.files, self.committed.rows):
            with h5py.File(part, "r") as pf:
                for name, ds in rows.items():
                    ds[start : start + n] = relabel[pf["labels"][:]] if name == "labels" else pf[name][:]
                paths += [decode_path(p) for p in pf["paths"][:]]
                values.append(read_columns(pf, self.spec.columns))
            start += n
        return paths

    def _create_paths(self, f: h5py.File, paths: list[str]) -> None:
        create_paths(f, paths, self.fixed_width_paths)


def create_rows(f: h5py.File, spec: CacheSpec, total: int) -> dict[str, h5py.Dataset]:
    """The row datasets of a finished cache but /paths, by name: chunked (~1 MiB) and resizable
    along N, so that a later append run can grow them."""
    dtype = spec.feature_dtype
    widths = {"features": spec.feature_dim, **{f"layers/{k}": d for k, d in spec.extra_layers.items()}}
    rows = {
        name: f.create_dataset(name, shape=(total, dim), maxshape=(None, dim), dtype=dtype, track_times=False,
                               chunks=(min(chunk_rows(dim, np.dtype(dtype).itemsize), max(total, 1)), dim))
        for name, dim in widths.items()
    }
    rows["labels"] = f.create_dataset("labels", shape=(total,), maxshape=(None,), dtype=np.int64,
                                      chunks=(min(65536, max(total, 1)),), track_times=False)
    return rows


def create_paths(f: h5py.File, paths: list[str], fixed_width: bool = False) -> None:
    """/paths of a finished cache: variable-length UTF-8, or fixed width (a Ray shard: virtual datasets map it)."""
    encoded = [encode_path(p) for p in paths]
    if fixed_width:
        path_dtype = h5py.string_dtype("utf-8", max((len(p) for p in encoded), default=1))
        data = np.array(encoded, dtype=path_dtype)
    else:
        data, path_dtype = np.array(encoded, dtype=object), STR
    f.create_dataset("paths", data=data, dtype=path_dtype, shape=(len(paths),), maxshape=(None,),
                     chunks=(min(65536, max(len(paths), 1)),), track_times=False)


def _relabelling(classes: list[str], merged: list[str]) -> np.ndarray:
    """Labels over `classes` -> labels over `merged`; the extra last entry maps -1 (unlabelled) to -1."""
    index = {c: i for i, c in enumerate(merged)}
    return np.array([index[c] for c in classes] + [-1], dtype=np.int64)


def _copy_base(old: FeatureCache, rows: dict[str, h5py.Dataset], relabel: np.ndarray, block_rows: int = 65536) -> None:
    """The previous complete cache's rows, block by block (it need not fit in memory)."""
    labels = old.labels
    for begin in range(0, len(old), block_rows):
        block = slice(begin, min(begin + block_rows, len(old)))
        for name, ds in rows.items():
            if name == "labels":
                ds[block] = relabel[labels[block]]
            else:
                layer = old.primary_layer if name == "features" else name.removeprefix("layers/")
                ds[block] = old.layer_rows(layer, block)


DISK_HEADROOM = 256 << 10  # bytes kept free beyond an estimate: HDF5's own overhead varies
VIEW_BLOCK = 32  # parts per block view of a run's live view (_blocked)


def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _size(n: int) -> str:
    return f"{n / 2**10:.0f} KiB" if n < 10 << 20 else f"{n / 2**20:.0f} MiB"


def _part_bytes(buf: _Part) -> int:
    """About what a part file of `buf` takes on disk."""
    feats = sum(a.nbytes for a in buf.features) + sum(a.nbytes for arrays in buf.extra.values() for a in arrays)
    paths = len(buf.paths) * max((len(encode_path(p)) for p in buf.paths), default=1)
    errors = sum(len(encode_path(p)) + len(r) for p, r in buf.errors)
    return feats + paths + 8 * len(buf.paths) + 2 * errors + (64 << 10)


def _widths(errors: list[tuple[str, str]]) -> tuple[int, int]:
    """The bytes of a part's fixed-width errors table (as view.write_errors writes it)."""
    return (max((len(encode_path(p)) for p, _ in errors), default=1) or 1,
            max((len(r.encode("utf-8", "backslashreplace")) for _, r in errors), default=1) or 1)
