"""Removing rows from a saved index, and describing an index folder (`embedder info INDEX_DIR`).

Row ids stay cache row ids, whatever is removed: rows.h5 `/removed` (int64, sorted, unique)
lists the removed rows, and every search excludes them through its IDSelector
(embedder.search.query). Where faiss can remove in place without renumbering, it does:

    ivf, ivfsq, ivfpq   `remove_ids` takes the rows out of their inverted lists (ids are stored
                        in the lists, so the others keep theirs); lists on disk (--on-disk) are
                        read-only memory maps, so there the rows are hidden instead
    flat                `remove_ids` would shift every later row's id, so the rows stay and are hidden
    hnsw                a graph cannot drop nodes: the rows stay and are hidden

Hidden rows still cost search time (HNSW walks through them, flat compares them), so
`describe_index` says when a rebuild pays.

The edit is atomic like a build: the new folder is staged under INDEX_DIR's write lock and
swapped in whole (embedder.atomic.staged_dir); files it does not change are hard-linked.
Removing a path twice is harmless; a path the index does not hold is an error that lists it,
and nothing is changed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from embedder.atomic import staged_dir
from embedder.cache.reader import read_paths
from embedder.data.rows import rows_root
from embedder.errors import ConfigError
from embedder.search.kinds import INVERTED_LIST_KINDS, load_faiss

REBUILD_HIDDEN = 0.2  # hidden rows above this share of the rows: a rebuild pays
REBUILD_REMOVED_IVF = 0.5  # removed rows above this share: the trained lists no longer fit the data
SHOWN_UNKNOWN = 10


MAX_LIST_BYTES = 256 << 20  # a --remove-from list: room for millions of paths
MAX_PATH_BYTES = 4096  # PATH_MAX on Linux: a longer line is no path


def read_removal_list(path) -> list[str]:
    """The paths of a --remove-from file: one per line, blank lines skipped. Read in blocks and
    refused in one line at the first sign it is no list of paths (a NUL byte, a line longer than
    any path, more than MAX_LIST_BYTES), so that /dev/zero or an image costs one block, not memory."""
    data = bytearray()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                nul = block.find(b"\0")
                if nul >= 0:
                    raise _not_a_list(path, f"a NUL byte at offset {len(data) + nul}: a binary file")
                data += block
                if len(data) > MAX_LIST_BYTES:
                    raise _not_a_list(path, f"more than {MAX_LIST_BYTES >> 20} MiB")
    except OSError as exc:
        raise ConfigError(f"Cannot read --remove-from {path}: {exc.strerror or exc}.") from None
    lines = bytes(data).decode("utf-8", errors="surrogateescape").split("\n")
    too_long = next((i for i, line in enumerate(lines) if len(line) > MAX_PATH_BYTES), None)
    if too_long is not None:
        raise _not_a_list(path, f"line {too_long + 1} has {len(lines[too_long])} characters, more than any path "
                                f"({MAX_PATH_BYTES})")
    return [line.rstrip("\r") for line in lines if line.strip()]


def _clipped(path: str, limit: int = 200) -> str:
    """A path as an error shows it: whole up to `limit` characters (the refusal stays one readable line)."""
    return path if len(path) <= limit else f"{path[:limit // 2]}...{path[-limit // 2:]} ({len(path)} characters)"


def _not_a_list(path, why: str) -> ConfigError:
    return ConfigError(f"--remove-from {path} is not a list of paths ({why}): give a text file with one path per line.")


def _rows_of(given: list[str], row: dict[str, int], source: Path) -> tuple[list[int], list[str]]:
    """(rows, unknown): a path matches as the cache stored it (relative to SOURCE) or as a file's
    own path (absolute, or relative to the working folder) under SOURCE."""
    rows, unknown = [], []
    for path in given:
        if path in row:
            rows.append(row[path])
            continue
        try:
            rel = Path(path).absolute().relative_to(source.absolute()).as_posix()
        except ValueError:
            rel = None
        if rel in row:
            rows.append(row[rel])
        else:
            unknown.append(path)
    return rows, unknown


def _missing_rows(paths: list[str], source: Path, removed: set[int], progress: bool) -> tuple[list[int], int]:
    """Rows whose image is gone (a tar row: its shard), and how many URL rows were not checked
    (checking would fetch them)."""
    from embedder.data.rows import location_exists, row_location
    from embedder.progress import bar

    missing, unchecked = [], 0
    for i, p in enumerate(bar(paths, unit="file", desc="prune: checking files", enabled=progress)):
        if i in removed:
            continue
        there = location_exists(row_location(source, p))
        unchecked += there is None
        if there is False:
            missing.append(i)
    return missing, unchecked


def remove_rows(index_dir, paths=(), remove_from=None, prune_missing: bool = False, progress: bool = True) -> dict:
    """Remove rows from the index in `index_dir` by path (`paths`, the lines of `remove_from`) and,
    with `prune_missing`, every row whose source file no longer exists. Returns a report."""
    index_dir = Path(index_dir)
    if not (index_dir / "meta.json").is_file():
        raise ConfigError(f"No index at {index_dir}. Build one with `embedder index CACHE.h5 --out {index_dir}`.")
    given = list(paths) + (read_removal_list(remove_from) if remove_from else [])
    with staged_dir(index_dir) as tmp:  # the lock is held from here: no other writer edits the folder
        meta = json.loads((index_dir / "meta.json").read_text())
        with h5py.File(index_dir / "rows.h5", "r") as f:
            stored = read_paths(f["paths"]) if len(f["paths"]) else []
            before = f["removed"][:].astype(np.int64) if "removed" in f else np.zeros(0, np.int64)
        source = rows_root(meta["source"])  # a file list's paths start from its folder
        rows, unknown = _rows_of(given, {p: i for i, p in enumerate(stored)}, source)
        if unknown:
            shown = ", ".join(_clipped(p) for p in unknown[:SHOWN_UNKNOWN]) + (f" and {len(unknown) - SHOWN_UNKNOWN} more"
                                                           if len(unknown) > SHOWN_UNKNOWN else "")
            raise ConfigError(f"{len(unknown)} path(s) are not in the index, nothing was removed: {shown}. Paths are "
                              f"as the cache stored them (relative to {source}), or files under it.")
        unchecked = 0
        if prune_missing:
            missing, unchecked = _missing_rows(stored, source, set(before.tolist()), progress)
            rows += missing
        new = np.setdiff1d(np.array(rows, dtype=np.int64), before)
        removed = np.union1d(before, new).astype(np.int64)
        in_place = meta["kind"] in INVERTED_LIST_KINDS and not meta.get("on_disk")
        _write(index_dir, tmp, new if in_place else None, removed)
        meta.update(removed_rows=len(removed), removed_in_place=in_place)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return {"index": str(index_dir), "kind": meta["kind"], "asked": len(given), "newly_removed": len(new),
            "already_removed": len(set(rows) & set(before.tolist())), "pruned": prune_missing,
            "urls_not_checked": unchecked,
            "removed_rows": len(removed), "rows": len(stored), "removed_in_place": in_place,
            "paths": [stored[i] for i in new[:SHOWN_UNKNOWN]]}


def drop_dead_rows(index_dir: Path, tmp: Path, meta: dict, dead: np.ndarray, staged: bool) -> int:
    """Take the cache rows `dead` (superseded or removed by a sync, embedder.cache.sync) out of every
    search of the index staged in `tmp`, as `--remove` does: removed in place where faiss can, else
    hidden. `staged`: tmp holds the new index files already (a build or an update); else they are
    those of `index_dir`, linked in. Updates `meta`; returns the rows newly removed."""
    source = tmp if staged else index_dir
    with h5py.File(source / "rows.h5", "r") as f:
        before = f["removed"][:].astype(np.int64) if "removed" in f else np.zeros(0, np.int64)
    new = np.setdiff1d(np.asarray(dead, dtype=np.int64), before)
    removed = np.union1d(before, new).astype(np.int64)
    in_place = meta["kind"] in INVERTED_LIST_KINDS and not meta.get("on_disk")
    if not staged:
        _write(index_dir, tmp, new if in_place else None, removed)
    elif len(new):
        if in_place:
            faiss = load_faiss()
            index = faiss.read_index(str(tmp / "index.faiss"))
            index.remove_ids(faiss.IDSelectorBatch(new))
            faiss.write_index(index, str(tmp / "index.faiss.tmp"))
            os.replace(tmp / "index.faiss.tmp", tmp / "index.faiss")
        with h5py.File(tmp / "rows.h5", "a") as f:
            if "removed" in f:
                del f["removed"]
            f.create_dataset("removed", data=removed, dtype=np.int64)
    if len(removed):
        meta.update(removed_rows=len(removed), removed_in_place=in_place)
    return len(new)


def _write(index_dir: Path, tmp: Path, remove_ids: np.ndarray | None, removed: np.ndarray) -> None:
    """The staged folder: every file of `index_dir`, index.faiss edited when `remove_ids` is given,
    rows.h5 with the new /removed."""
    faiss = load_faiss()
    for entry in index_dir.iterdir():
        if entry.name == "meta.json" or (entry.name == "index.faiss" and remove_ids is not None):
            continue
        if entry.name == "rows.h5":
            shutil.copy2(entry, tmp / entry.name)
        else:
            _link_or_copy(entry, tmp / entry.name)
    if remove_ids is not None:
        index = faiss.read_index(str(index_dir / "index.faiss"))
        if len(remove_ids):
            index.remove_ids(faiss.IDSelectorBatch(remove_ids))
        faiss.write_index(index, str(tmp / "index.faiss"))
    with h5py.File(tmp / "rows.h5", "a") as f:
        if "removed" in f:
            del f["removed"]
        f.create_dataset("removed", data=removed, dtype=np.int64)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Unchanged files (the index, on-disk lists of many GB) are hard-linked where the file system can."""
    if src.is_dir():
        shutil.copytree(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def describe_index(index_dir) -> dict:
    """What `embedder info INDEX_DIR` shows: kind, rows, removed and hidden rows, and whether a rebuild pays."""
    index_dir = Path(index_dir)
    meta = json.loads((index_dir / "meta.json").read_text())
    with h5py.File(index_dir / "rows.h5", "r") as f:
        rows = len(f["paths"])
        removed = len(f["removed"]) if "removed" in f else 0
        columns = list(f["columns"]) if "columns" in f else []
    in_place = bool(meta.get("removed_in_place")) and removed > 0
    hidden = 0 if in_place else removed
    doc = {"index": str(index_dir), "kind": meta["kind"], "metric": meta["metric"], "dim": meta["dim"],
           "rows": rows, "ntotal": rows, "searchable": rows - removed, "removed": removed, "hidden": hidden,
           "removed_in_place": in_place, "columns": ["id", "path", "label", *columns],
           "params": meta.get("params", {}), "recall_at_10": meta.get("recall_at_10"), "cache": meta.get("cache"),
           "layer": meta.get("layer_label") or meta.get("layer"), "on_disk": bool(meta.get("on_disk"))}
    doc["rebuild"] = rebuild_advice(meta["kind"], rows, removed, hidden)
    doc["cache_generation"] = meta.get("cache_generation")
    doc["out_of_step"] = out_of_step(meta, rows)
    return doc


def out_of_step(meta: dict, rows: int) -> str | None:
    """Why the index no longer reflects its cache (the cache grew or was synced since), or None;
    None too when the cache is not where the index says."""
    path = meta.get("cache")
    try:
        with h5py.File(path, "r") as f:
            generation, stored = int(f.attrs.get("generation", 0)), int(f["features"].shape[0])
    except (OSError, TypeError, KeyError):
        return None
    known = meta.get("cache_generation")
    if stored == rows and (known is None or known == generation):
        return None
    fix = (f"`embedder index {path} --out INDEX_DIR --update` brings it in step" if stored >= rows else
           f"the cache was compacted or made again: rebuild, `embedder index {path} --out INDEX_DIR`")
    return (f"the cache is at generation {generation} with {stored} stored rows, the index reflects "
            f"{'an older generation' if known is None else f'generation {known}'} with {rows}: {fix}")


def rebuild_advice(kind: str, rows: int, removed: int, hidden: int) -> str | None:
    """Why a rebuild would pay now, or None."""
    cost = {"hnsw": "every search still walks through their graph nodes",
            "flat": "every search still compares them"}.get(kind, "every search still scans them in their lists")
    if rows and hidden / rows > REBUILD_HIDDEN:
        return (f"{hidden / rows:.0%} of the rows are hidden, not removed ({kind} cannot drop them): {cost}, and "
                "selective filters meet fewer allowed rows. Rebuild from a cache without them (or rebuild, then "
                "remove them again with --remove-from) to search only live rows.")
    if rows and kind in INVERTED_LIST_KINDS and removed / rows > REBUILD_REMOVED_IVF:
        return (f"{removed / rows:.0%} of the rows are removed: the inverted lists were trained on data that is "
                "mostly gone, so they are unbalanced and nprobe was tuned for other lists. A rebuild retrains them.")
    return None
