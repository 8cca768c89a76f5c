"""Sharded caches: the on-disk side of `embedder embed --backend ray`, with no Ray in it.

A sharded run of `--out OUT.h5` writes::

    OUT.h5.shards/manifest.json      the plan: fingerprint, listing checksum, shard size, batch size,
                                     `bounds` (each shard's first row, then the row count)
                                     (and `layers`, {name: width}, for a multi-layer cache; `columns`,
                                     {name: kind}, the metadata columns)
    OUT.h5.shards/shard-00000.h5     rows [0, S) of the listing: a normal finished cache (schema v1,
                                     same fingerprint as a local run, every layer), paths stored fixed-width
    OUT.h5.shards/shard-00000.done   JSON marker, written last (temp + atomic rename): rows, errors,
                                     size and SHA-256 of the shard file. No marker = not finished.
    OUT.h5                           HDF5 virtual datasets over the finished shards (/features, every
                                     /layers/<name>, /labels, /paths, every /columns/<name>), with the
                                     cache attributes and `shards`: `FeatureCache(OUT.h5)` and every command read it as is

Shards are contiguous row ranges of about `--shard-size` rows, cut at batch boundaries
(multiples of the batch size) and, for a tar SOURCE, at every tar shard's first row: one tar
shard is one shard (or, when it is longer than the shard size, several, cut at batch
boundaries), never part of two tar shards. Each shard is embedded by the one embed core
(`embedder.extract.core.embed_into`, called by `embedder.extract.ray.embed_shard`) over the
whole batches of the listing that hold its rows (`ShardSet.reads`): a shard that begins or ends
inside a batch also reads the neighbouring rows of that batch, embeds them with its own and
drops them, so the network sees exactly the batches a local run feeds it and the features are
bit-identical. A shard is itself resumable (its `CacheWriter` parts),
and a rerun skips every shard with a marker. The view is written by `embedder.cache.view`, the
same writer as a fresh run's live view over its parts. `merge_cache` consolidates the view
into one self-contained file (e.g. to copy it elsewhere): the file a local run writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import pickle
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from embedder.atomic import WriteLock, atomic_replace, remove_leftovers
from embedder.cache import view as views
from embedder.cache.reader import PARTIAL_SUFFIX, CacheSpec, FeatureCache
from embedder.cache.schema import SHARDS_SUFFIX
from embedder.cache.view import Member
from embedder.cache.writer import CacheWriter
from embedder.data.metadata import MetadataTable
from embedder.data.rows import rows_root
from embedder.data.sources import Listing
from embedder.errors import CacheError, CacheMismatchError, ConfigError
from embedder.outputs import CACHE, claim

DEFAULT_SHARD_SIZE = 65536


@dataclass(frozen=True)
class Shard:
    number: int
    start: int  # first listing row
    stop: int  # one past the last listing row

    @property
    def name(self) -> str:
        return f"shard-{self.number:05d}"

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ShardJob:
    """What a worker needs to embed any shard of a plan. The shard's rows travel with each
    task, so no worker ever holds the whole listing (hundreds of millions of paths)."""

    spec: CacheSpec
    folder: Path  # OUT.shards
    root: Path  # listing paths are relative to it
    classes: list[str]
    layout: str

    def listings(self, task: dict) -> tuple[Listing, Listing]:
        """(the rows a `ShardSet.task` reads, the rows it writes: its shard's), each with the rows'
        members (tar members, URLs) and the shard's with its rows of the SOURCE's own table."""
        members, table = pickle.loads(task["sources"])
        paths = [str(p) for p in task["paths"]]
        labels = np.asarray(task["labels"], dtype=np.int64)
        items = None if members is None else {p: m for p, m in zip(paths, members) if m is not None}
        first = int(task["start"]) - int(task["read_start"])
        last = first + int(task["stop"]) - int(task["start"])
        reads = Listing(self.root, paths, labels, self.classes, self.layout, members=items)
        return reads, Listing(self.root, paths[first:last], labels[first:last], self.classes, self.layout,
                              members=items, table=table)


def shard_rows(shard_size: int, batch_size: int) -> int:
    """The rows of a full shard: `shard_size` rounded up to whole batches."""
    if shard_size < 1 or batch_size < 1:
        raise ConfigError(f"--shard-size and --batch-size must be positive, got {shard_size} and {batch_size}.")
    return -(-shard_size // batch_size) * batch_size


def plan_shards(n_rows: int, shard_size: int, batch_size: int, breaks=()) -> list[Shard]:
    """Contiguous row ranges of about `shard_size` rows (rounded up to whole batches), cut at each
    row of `breaks` (where a tar shard begins), so no shard spans a break, and else only at batch
    boundaries: without breaks every bound is one, and a stretch between two breaks that is
    longer than the shard size is cut at the batch boundaries `shard_size` rows apart."""
    size = shard_rows(shard_size, batch_size)
    edges = sorted({0, n_rows, *(b for b in breaks if 0 < b < n_rows)})
    shards: list[Shard] = []
    for lo, hi in itertools.pairwise(edges):
        cuts = [lo, *range(lo - lo % batch_size + size, hi, size), hi]
        shards += [Shard(len(shards) + k, a, b) for k, (a, b) in enumerate(itertools.pairwise(cuts))]
    return shards


def source_breaks(listing: Listing) -> list[int]:
    """The rows where a new tar shard begins (a tar listing's rows are grouped by their member's
    `shard`: shards sorted, members in tar order). None where the rows are files, or items that
    lie in no shard (URLs)."""
    if listing.members is None:
        return []
    keys = [getattr(listing.members.get(p), "shard", None) for p in listing.paths]
    return [i for i in range(1, len(keys)) if keys[i] != keys[i - 1]]


def shards_dir(out) -> Path:
    out = Path(out).absolute()
    return out.with_name(out.name + SHARDS_SUFFIX)


def listing_checksum(listing: Listing) -> str:
    h = hashlib.sha256()
    for path, label in zip(listing.paths, listing.labels.tolist()):
        h.update(f"{path}\t{label}\n".encode())
    h.update(json.dumps(listing.classes).encode())
    return h.hexdigest()


def write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    atomic_replace(tmp, path)


# ----------------------------------------------------------------------------------------
# The plan and its manifest
# ----------------------------------------------------------------------------------------


class ShardSet:
    """The shards folder of one sharded cache: plan, markers, view."""

    def __init__(self, out, spec: CacheSpec, listing: Listing, shard_size: int, batch_size: int):
        self.out = Path(out).absolute()
        self.dir = shards_dir(self.out)
        self.spec, self.listing, self.batch_size = spec, listing, batch_size
        breaks = source_breaks(listing)
        self.shards = plan_shards(len(listing), shard_size, batch_size, breaks)
        self._table_rows: np.ndarray | None = None  # each listing row's position in listing.table (-1: none)
        if breaks:  # shards follow the tar shards: the size asked for, not the first shard's
            planned_size = shard_rows(shard_size, batch_size)
        else:  # as it always was (also for a listing shorter than one shard)
            planned_size = len(self.shards[0]) if self.shards else shard_size
        self.manifest = {
            "format": "embedder-shards/1",
            "fingerprint": spec.fingerprint,
            "components": spec.components,
            "source": spec.source,
            "layout": spec.layout,
            "feature_dim": spec.feature_dim,
            "command": spec.command,
            "classes": listing.classes,
            "listed": len(listing),
            "listing_sha256": listing_checksum(listing),
            "shard_size": planned_size,
            "batch_size": batch_size,
            "shards": len(self.shards),
            "bounds": [sh.start for sh in self.shards] + [len(listing)],
        }
        if spec.layers:  # multi-layer caches only: a single-layer plan's manifest is as it always was
            self.manifest["layers"] = spec.layers
        if spec.columns:
            self.manifest["columns"] = spec.columns
        if spec.names:  # the run's {name: layer}, which the view over the shards records (CacheSpec.names)
            self.manifest["layer_names"] = spec.names

    def prepare(self, overwrite: bool = False) -> None:
        """Create the folder, or check that an existing one belongs to this very plan."""
        if overwrite:
            shutil.rmtree(self.dir, ignore_errors=True)
            shutil.rmtree(self.out.with_name(self.out.name + PARTIAL_SUFFIX), ignore_errors=True)
            self.out.unlink(missing_ok=True)
        mpath = self.dir / "manifest.json"
        if mpath.exists():
            if self.out.exists() and not _is_view(self.out):
                raise CacheError(
                    f"{self.out} is no longer the view over {self.dir} (a local run rewrote it). "
                    "Use --overwrite to start the sharded cache over, or choose another --out."
                )
            old = json.loads(mpath.read_text())
            diff = self.spec.differences(old["components"], old["source"])
            if diff:
                raise CacheMismatchError(
                    self.dir, diff, "Rerun with the original settings to resume it, or use --overwrite to start over."
                )
            for key, fix in (
                ("listing_sha256", ("SOURCE changed since these shards were written (files added, removed or "
                                    "relabelled). Use --overwrite to re-embed, or write the new files to another --out.")),
                ("shard_size", "Rerun with the original --shard-size to resume, or use --overwrite."),
                ("batch_size", "Rerun with the original --batch-size to resume, or use --overwrite."),
                ("columns", "Rerun with the original --metadata to resume, or use --overwrite."),
            ):
                if old.get(key) != self.manifest.get(key):
                    raise CacheError(f"{self.dir}: {key} was {old.get(key)!r}, this run has "
                                     f"{self.manifest[key]!r}. {fix}")
            if "bounds" in old:  # folders written before plans were recorded are checked by the keys above
                self._check_bounds(old["bounds"])
        else:
            if self.out.exists():
                raise CacheError(
                    f"{self.out} exists and is not a sharded cache of this run. Use --overwrite to replace it, "
                    "or choose another --out."
                )
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json(mpath, self.manifest)

    def _check_bounds(self, old: list[int]) -> None:
        """Refuse a folder planned otherwise, naming the first shard whose rows differ."""
        new = self.manifest["bounds"]
        if old == new:
            return
        k = next((k for k, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
        k = max(k - 1, 0)  # the shard that starts or ends at the first differing bound
        was, now = old[k : k + 2], new[k : k + 2]
        raise CacheError(
            f"{self.dir}: its shards were planned otherwise: shard {k} was rows {_span(was)}, this run plans "
            f"{_span(now)} ({len(old) - 1} shards then, {len(new) - 1} now; shards follow SOURCE's tar shards, "
            "--shard-size and --batch-size). Rerun with the original settings to resume, or use --overwrite."
        )

    def lock(self):
        """The lock a local `CacheWriter` takes on OUT: one writer per cache, local or sharded."""
        return lock_output(self.out)

    def done(self) -> dict[int, dict]:
        """Markers of finished shards that match the plan (a marker is written last)."""
        found = {}
        for shard in self.shards:
            marker = self.dir / f"{shard.name}.done"
            if not marker.exists():
                continue
            doc = json.loads(marker.read_text())
            h5 = self.dir / f"{shard.name}.h5"
            if (doc.get("start"), doc.get("stop"), doc.get("fingerprint")) != (shard.start, shard.stop,
                                                                                self.spec.fingerprint):
                raise CacheError(f"{marker} does not belong to this plan. Use --overwrite to start over.")
            if not h5.exists() or h5.stat().st_size != doc["bytes"]:
                raise CacheError(f"{h5} is missing or changed since {marker} was written. Delete the marker "
                                 "to re-embed that shard.")
            found[shard.number] = doc
        return found

    def pending(self) -> list[Shard]:
        done = self.done()
        return [s for s in self.shards if s.number not in done]

    @property
    def job(self) -> ShardJob:
        return ShardJob(self.spec, self.dir, self.listing.root, self.listing.classes, self.listing.layout)

    def reads(self, shard: Shard) -> tuple[int, int]:
        """The rows `shard` is embedded with: the whole batches of the listing that hold its rows
        (the shard itself, when its bounds are batch boundaries)."""
        b = self.batch_size
        return shard.start - shard.start % b, min(shard.stop + (-shard.stop) % b, len(self.listing))

    def task(self, shard: Shard) -> dict:
        """One dataset row: the shard, and the rows of the listing it reads (`reads`): paths, labels,
        and pickled in `sources` their members (None for files) and the shard's rows of the SOURCE's
        own table. Plain columns and one bytes column: what Ray Data stores without conversion."""
        lo, hi = self.reads(shard)
        listing = self.listing
        members = None if listing.members is None else [listing.members.get(p) for p in listing.paths[lo:hi]]
        return {"shard": shard.number, "start": shard.start, "stop": shard.stop, "read_start": lo, "read_stop": hi,
                "paths": listing.paths[lo:hi], "labels": listing.labels[lo:hi].tolist(),
                "sources": pickle.dumps((members, self._table_of(shard)), protocol=pickle.HIGHEST_PROTOCOL)}

    def _table_of(self, shard: Shard) -> MetadataTable | None:
        """The shard's rows of `listing.table`; the table is indexed once, not once per shard."""
        table = self.listing.table
        if table is None:
            return None
        if self._table_rows is None:
            where = {p: i for i, p in enumerate(table.paths)}
            self._table_rows = np.array([where.get(p, -1) for p in self.listing.paths], dtype=np.int64)
        rows = self._table_rows[shard.start : shard.stop]
        return table.take(rows[rows >= 0])

    def write_view(self) -> tuple[int, bool]:
        """OUT as virtual datasets over the finished shards. Returns (rows, complete)."""
        done = self.done()
        files = [self.dir / f"{s.name}.h5" for s in self.shards if s.number in done]
        complete = len(done) == len(self.shards)
        rows = write_view(self.out, self.spec, self.listing.classes, files, complete, self.listing.ignored_counts())
        return rows, complete


@contextmanager
def lock_output(out, held: WriteLock | None = None):
    """Hold OUT's write lock (the one a local `CacheWriter` takes; `held` if the caller has it)
    and clear a dead writer's leftovers."""
    with contextlib.nullcontext(held) if held is not None else WriteLock(Path(out)) as lock:
        remove_leftovers(Path(out).absolute())
        yield lock


def _span(bounds: list[int]) -> str:
    return f"[{bounds[0]}, {bounds[1]})" if len(bounds) == 2 else "none (no such shard)"


def _is_view(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return "shards" in f.attrs
    except OSError:
        return False


# ----------------------------------------------------------------------------------------
# One cache over many: the virtual view, and consolidation
# ----------------------------------------------------------------------------------------


def write_view(out, spec: CacheSpec, classes: list[str], files: list[Path], complete: bool,
               ignored: dict | None = None) -> int:
    """Write `out` (atomically) as a cache whose rows are those of `files`, in order, without copying them.

    Every file must be a finished cache with `spec`'s fingerprint and layers, the same class
    list, and fixed-width paths. Errors tables are concatenated (they are small)."""
    out = Path(out).absolute()
    members, errors = [], []
    for path in files:
        with FeatureCache(path) as c:
            if (c.file_fingerprint != spec.fingerprint or c.spec.layers != spec.layers or c.classes != list(classes)
                    or c.column_kinds != spec.columns):
                raise CacheError(f"{path} does not belong to {out} (fingerprint, layers, classes or columns differ).")
            ds = c.h5file["paths"]
            if h5py.check_string_dtype(ds.dtype).length is None:
                raise CacheError(f"{path} stores variable-length paths; a view needs shards written by embedder.")
            widths = {n: c.h5file[f"columns/{n}"].dtype.itemsize for n, k in spec.columns.items() if k == "str"}
            members.append(Member(os.path.relpath(path, out.parent), len(c), ds.dtype.itemsize, widths))
            errors += c.errors
    return views.write_view(out, spec, classes, members, errors, complete=complete, ignored=ignored,
                           shards=len(members))


def row_ranges(cache: FeatureCache, block_rows: int = 65536) -> list[tuple[int, int]]:
    """The row ranges of a cache's shards when it is a view over shards, else blocks of `block_rows`."""
    ds = cache.h5file["features"]
    n = len(cache)
    if ds.is_virtual and cache.complete:
        ranges = []
        for vs in ds.virtual_sources():
            (lo, _), (hi, _) = vs.vspace.get_select_bounds()
            ranges.append((int(lo), int(hi) + 1))
        ranges.sort()
        if ranges and ranges[0][0] == 0 and ranges[-1][1] == n:
            return ranges
    return [(s, min(s + block_rows, n)) for s in range(0, n, block_rows)]


def _view_of(src) -> tuple[Path, bool]:
    """The cache file to read for `src` (a cache, or a `.shards` folder). True if it is temporary."""
    src = Path(src).absolute()
    if src.is_file():
        return src, False
    mpath = src / "manifest.json"
    if not src.is_dir() or not mpath.exists():
        raise CacheError(f"{src} is neither a feature cache nor a shards folder (no manifest.json).")
    m = json.loads(mpath.read_text())
    spec = CacheSpec(m["components"], m["source"], m["feature_dim"], m["layout"], m["command"], m.get("layers", {}),
                     m.get("columns", {}), names=m.get("layer_names", {}))
    files = [src / f"shard-{k:05d}.h5" for k in range(m["shards"]) if (src / f"shard-{k:05d}.done").exists()]
    _remove_dead_views(src)
    view = src / f".view-{os.getpid()}.h5"
    write_view(view, spec, m["classes"], files, complete=len(files) == m["shards"])
    return view, True


def _remove_dead_views(folder: Path) -> None:
    """Temporary views of merges whose process is gone (killed before it could remove its own)."""
    for view in folder.glob(".view-*.h5"):
        try:
            os.kill(int(view.name[len(".view-"):-len(".h5")]), 0)
        except ValueError:
            continue
        except ProcessLookupError:
            view.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, another user's


def merge_cache(src, out, overwrite: bool = False, block_rows: int = 65536) -> int:
    """Consolidate a sharded cache (its view file or its `.shards` folder) into one self-contained file.

    Written by `CacheWriter`, so the merge is itself crash-safe and resumable, and the result is
    the file a local run would have written, every layer included. Returns the rows written."""
    claim(out, CACHE)  # before the shards are read (embedder.outputs)
    view, temporary = _view_of(src)
    try:
        with FeatureCache(view) as cache:
            if Path(out).absolute() == view:
                raise ConfigError("merge --out must differ from the cache it merges.")
            with CacheWriter(out, cache.spec, _listing_of(cache), overwrite=overwrite, commit_every=block_rows,
                             ignored=cache.ignored_counts) as w:
                if w.base is not None and len(w.pending):
                    raise CacheError(f"{out} already exists. Use --overwrite to replace it.")
                # A complete OUT holding every row already is this very merge, finished (a rerun
                # after a kill that came once the file was in place): nothing to add.
                _copy_pending(cache, w, block_rows)
                return w.finish()
    finally:
        if temporary:
            view.unlink(missing_ok=True)


def _listing_of(cache: FeatureCache) -> Listing:
    """The listing a merge writes: the cache's rows, then its errors (labelled -1)."""
    errors = cache.errors
    return Listing(rows_root(cache.source), cache.paths + [p for p, _ in errors],
                   np.concatenate([cache.labels, np.full(len(errors), -1, np.int64)]),
                   cache.classes, str(cache.attrs["layout"]))


def _copy_pending(cache: FeatureCache, w: CacheWriter, block_rows: int) -> None:
    """Add to `w` the rows of `cache` it still lacks, one row range at a time (each range is
    one shard, read from one file), then the errors (the listing rows past the cache's rows)."""
    n, layers, todo = len(cache), w.spec.layers, w.pending
    for start, stop in row_ranges(cache, block_rows):
        sel = todo[(todo >= start) & (todo < stop)]
        if not len(sel):
            continue
        rows = slice(start, stop)
        columns = {name: v[sel - start] for name, v in cache.columns(list(w.spec.columns), rows).items()}
        if layers:
            w.add(sel, {name: cache.layer_rows(name, rows)[sel - start] for name in layers}, [], columns)
        else:
            w.add(sel, cache.features(rows)[sel - start], [], columns)
    errors = cache.errors
    none = ({name: np.zeros((0, dim), np.float32) for name, dim in layers.items()} if layers
            else np.zeros((0, w.spec.feature_dim), np.float32))
    w.add(np.zeros(0, np.int64), none, [(int(i), errors[i - n][1]) for i in todo[todo >= n]])
