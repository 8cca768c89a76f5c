"""Turn SOURCE into an ordered list of (relative path, label), accounting for every file.

Layouts (auto-detected, or forced with `layout=`):
  imagefolder        SOURCE/<class>/**/<image>; labels are class-folder indices
  split-imagefolder  SOURCE/<split>/<class>/**/<image> with split in train/val/test
                     (the classic transfer-learning tutorial layout); the split stays
                     the first component of each path, labels are the class folder
  flat               SOURCE/**/<image>, no labels (-1)
  filelist           a .txt/.csv file of `path[,label]` lines, relative to the list's folder
  table              a .parquet/.csv table: a column of paths or URLs, labels, metadata (embedder.data.table)
  tar                webdataset tar shards (embedder.data.tar); a folder of shards as img2dataset
                     writes it (with .parquet / _stats.json siblings) too, the siblings ignored (SHARD_SIDECAR)

A path in a file list or a table may be an http(s) URL: the row is then fetched by the
reader (embedder.data.fetch) and keyed by the URL itself.

No file is lost without a word. Every file under SOURCE becomes a row of the listing (and
later a feature row or an errors-table entry) or an *ignored* entry with its reason:
not an image name, hidden, outside the class folders, or the same file reached twice
(hard links, symlinks). Auto-detection never guesses: images both beside and inside
sub-folders (`photos/*.jpg` + `photos/thumbs/`) are refused with a message naming
`--layout`, since either reading would drop or mislabel some of them.

The walk follows directory symlinks but visits each real directory once (keyed by device
and inode), so a symlink loop ends the descent instead of the run. Real folders are walked
before symlinked ones and real files win over links to them, so the stored path is the
file's own whenever it lies inside SOURCE. A symlink that leads nowhere (missing target,
or a loop such as `loop.jpg -> loop.jpg`) stays a row and becomes an error entry.

Folder listings are sorted by relative POSIX path, so two runs give the same rows. A file
list keeps the order it was written in; its paths are normalised lexically (`sub/../x.png` is
`x.png`) and a path listed twice is kept once. A file list is UTF-8 (a BOM is dropped); a line
that is not, or whose path holds a NUL byte, is ignored by its line number.
"""

from __future__ import annotations

import csv
import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedder.data import tar as tarsrc
from embedder.data.formats import IMAGE_EXTENSIONS, is_url
from embedder.data.metadata import MetadataTable
from embedder.data.table import LAYOUT as TABLE_LAYOUT
from embedder.data.table import NOT_UTF8, NUL_PATH, TableColumns, is_table_source, list_table
from embedder.errors import SourceError

SPLIT_NAMES = ("train", "val", "valid", "validation", "test")
LAYOUTS = ("auto", "imagefolder", "split-imagefolder", "flat", "filelist")

# Why a file under SOURCE is not a row. Fixed strings, so that counts by reason add up.
NOT_IMAGE = "not an image file name"
HIDDEN = "hidden (name starts with '.')"
OUTSIDE_CLASSES = "outside the class folders"
SAME_FILE = "same file as another listed path (hard link or symlink)"
FOLDER_AGAIN = "folder already listed through another path (symlink)"
UNREADABLE_FOLDER = "folder cannot be read"
LISTED_TWICE = "listed more than once in the file list"
# img2dataset writes 00000.tar with 00000.parquet (every sample it tried, failed ones too) and
# 00000_stats.json (the shard's counts); webdataset tools add .idx / .json shard indexes. They are
# ignored, not read: a sample's own metadata is its .json member inside the tar, which the listing
# already reads (a table keyed like the rows), and the .parquet repeats it for the samples that made
# it into the shard, plus rows for those that did not (no image to embed).
SHARD_SIDECAR = "shard metadata beside the .tar shards (img2dataset/webdataset); the samples' .json members are read"
SHARD_SIDECAR_SUFFIXES = (".parquet", ".json", ".idx")


@dataclass
class Listing:
    root: Path  # paths are relative to this folder
    paths: list[str]
    labels: np.ndarray  # int64, -1 = unlabelled
    classes: list[str]
    layout: str
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): files that are not rows
    # Rows whose bytes are not a file under `root`: {path: item with .read() -> bytes}
    # (a tar member's offset in its shard, a URL to fetch). None: every row is root / path.
    members: dict[str, tarsrc.TarMember] | None = None
    # Columns SOURCE itself gives (a table source's other columns, a tar sample's .json keys),
    # stored like a --metadata table's (embedder.data.metadata).
    table: MetadataTable | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def limit(self, n: int | None) -> Listing:
        if n is None:
            return self
        if n < 1:
            raise SourceError(f"--limit must be at least 1, got {n}.")
        return Listing(self.root, self.paths[:n], self.labels[:n], self.classes, self.layout, self.ignored,
                       self.members, self.table.subset(self.paths[:n]) if self.table is not None else None)

    def ignored_counts(self) -> dict[str, int]:
        """{reason: files}, most frequent first."""
        return dict(Counter(reason for _, reason in self.ignored).most_common())


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def describe_ignored(counts: dict[str, int]) -> str:
    """`5 (3 not an image file name, 2 hidden ...)`: one line for a summary."""
    total = sum(counts.values())
    return f"{total} (" + ", ".join(f"{n} {reason}" for reason, n in counts.items()) + ")" if total else "0"


# ----------------------------------------------------------------------------------------
# Walking a folder
# ----------------------------------------------------------------------------------------


@dataclass
class _Walk:
    """Everything found under a root: image candidates, folders walked, and what was ignored."""

    images: list[str] = field(default_factory=list)
    dirs: set[str] = field(default_factory=set)  # relative paths of the folders walked
    ignored: list[tuple[str, str]] = field(default_factory=list)
    # Image candidates as (path, (device, inode) of the file or None for a broken link):
    # files found directly, and those reached through a symlink, which are resolved last.
    _files: list[tuple[str, tuple[int, int]]] = field(default_factory=list)
    _links: list[tuple[str, tuple[int, int] | None]] = field(default_factory=list)


def _walk(root: Path) -> _Walk:
    """Every image name under `root` (relative POSIX paths, sorted), each real file and folder once."""
    walk = _Walk()
    st = os.stat(root)
    visited = {(st.st_dev, st.st_ino)}
    real, linked = [(root, "", st.st_dev)], []
    # Real folders first, then folders reached through symlinks, so that a link into SOURCE
    # finds its target already listed under its own path.
    while real or linked:
        folder, rel, dev = real.pop() if real else linked.pop()
        for sub in _scan(walk, folder, rel, dev, visited):
            (linked if sub[3] else real).append(sub[:3])
    # Each real file once: the first of its paths in sorted order, links after real paths.
    listed: set[tuple[int, int]] = set()
    for rel, key in sorted(walk._files) + sorted(walk._links, key=lambda c: c[0]):
        if key is not None and key in listed:
            walk.ignored.append((rel, SAME_FILE))
            continue
        if key is not None:
            listed.add(key)
        walk.images.append(rel)
    walk.images.sort()
    return walk


def _scan(walk: _Walk, folder: Path, rel: str, dev: int, visited: set) -> list[tuple[Path, str, int, bool]]:
    """List one folder into `walk`; return its sub-folders to visit as (path, rel, device, via_symlink)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        if not rel:
            raise  # SOURCE itself: the caller says so
        walk.ignored.append((f"{rel}/", f"{UNREADABLE_FOLDER} ({exc.strerror})"))
        return []
    subdirs = []
    for entry in entries:
        child = f"{rel}/{entry.name}" if rel else entry.name
        try:
            is_dir = entry.is_dir()  # follows symlinks; a looping link raises
        except OSError:
            is_dir = False
        if entry.name.startswith("."):
            walk.ignored.append((child + "/" if is_dir else child, HIDDEN))  # a hidden folder is not searched
            continue
        if is_dir:
            try:
                st = entry.stat()
            except OSError as exc:
                walk.ignored.append((child + "/", f"{UNREADABLE_FOLDER} ({exc.strerror})"))
                continue
            key = (st.st_dev, st.st_ino)
            if key in visited:
                walk.ignored.append((child + "/", FOLDER_AGAIN))
                continue
            visited.add(key)
            walk.dirs.add(child)
            subdirs.append((Path(entry.path), child, st.st_dev, entry.is_symlink()))
        elif not is_image_name(entry.name):
            walk.ignored.append((child, NOT_IMAGE))
        elif entry.is_symlink():
            walk._links.append((child, _target_key(entry)))
        else:
            walk._files.append((child, (dev, entry.inode())))  # d_ino from the listing: no stat per file
    return subdirs


def _target_key(entry: os.DirEntry) -> tuple[int, int] | None:
    try:
        st = entry.stat()
    except OSError:
        return None  # a broken or looping link: listed, and the reader records why it fails
    return st.st_dev, st.st_ino


# ----------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------


def _depth(rel: str) -> int:
    return rel.count("/")


def _detect_layout(walk: _Walk) -> str:
    top = {d for d in walk.dirs if "/" not in d}
    if not any(_depth(p) for p in walk.images):
        return "flat"  # no image inside a sub-folder: the sub-folders (if any) are not classes
    if top and top <= set(SPLIT_NAMES) and all(any(d.startswith(t + "/") for d in walk.dirs) for t in top):
        return "split-imagefolder"
    return "imagefolder"


def _class_depth(layout: str) -> int:
    """How many folder levels sit above an image's class folder name: imagefolder 0, split 1."""
    return 1 if layout == "split-imagefolder" else 0


def list_source(source: str | os.PathLike, layout: str = "auto", limit: int | None = None,
                columns: TableColumns | None = None) -> Listing:
    """The rows of SOURCE (see the module docstring). `columns`: which columns of a table SOURCE
    hold the rows and labels (--path-column, --url-column, --label-column)."""
    columns = columns or TableColumns()
    sidecars = shard_folder_sidecars(source)
    if sidecars:  # an img2dataset / webdataset output folder: its shards, the sidecars ignored with a reason
        if layout not in ("auto", tarsrc.LAYOUT) or columns.path or columns.url:
            raise SourceError(f"SOURCE {source} is a folder of tar shards: --layout, --path-column and --url-column "
                              "do not apply (leave them out).")
        listing = _list_tar(str(source), columns.label)
        listing.ignored += [(name, SHARD_SIDECAR) for name in sidecars]
        return _nonempty(listing, source).limit(limit)
    if tarsrc.is_tar_source(str(source)):
        if layout not in ("auto", tarsrc.LAYOUT):
            raise SourceError(f"SOURCE {source} is tar shards, so --layout {layout} does not apply (leave it auto).")
        if columns.path or columns.url:
            raise SourceError(f"SOURCE {source} is tar shards: --path-column and --url-column read tables. "
                              "--label-column picks a tar sample's label: cls, txt or a .json key.")
        return _nonempty(_list_tar(str(source), columns.label), source).limit(limit)
    src = Path(source).expanduser()
    if layout not in LAYOUTS:
        raise SourceError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}.")
    if not src.exists():
        raise SourceError(f"SOURCE {src} does not exist. Pass an image folder, a .txt/.csv file list, "
                          "a .tar shard, a folder of .tar shards or a pattern such as shards/{00000..00099}.tar.")
    if columns.given() and not (src.is_file() and is_table_source(src, columns)):
        raise SourceError(f"--path-column, --url-column and --label-column read a .parquet or .csv table, but SOURCE "
                          f"{src} is {'a folder' if src.is_dir() else 'not one'}.")
    if columns.given() and layout != "auto":
        raise SourceError(f"--layout {layout} and the table options (--path-column, --url-column, --label-column) "
                          "exclude each other: leave --layout auto to read SOURCE as a table.")
    if src.is_file() and layout == "auto" and is_table_source(src, columns):
        return _nonempty(_list_table(src, columns), src).limit(limit)
    if src.is_file():
        if layout not in ("auto", "filelist"):
            raise SourceError(f"SOURCE {src} is a file, so it must be a file list (not --layout {layout}).")
        listing = _list_file(src)
    else:
        if layout == "filelist":
            raise SourceError(f"--layout filelist needs a .txt/.csv file, but {src} is a folder.")
        try:
            listing = _list_folder(src.resolve(), layout)
        except OSError as exc:
            raise SourceError(f"SOURCE {src} cannot be read ({exc.strerror}). Check its permissions.") from None
    return _nonempty(listing, src).limit(limit)


def shard_folder_sidecars(source: str | os.PathLike) -> list[str]:
    """The sidecar files (sorted names) of a folder of .tar shards as img2dataset and webdataset tools
    write it (SHARD_SIDECAR); [] when SOURCE is not such a folder (no sidecars, or anything else in it)."""
    p = Path(source).expanduser()
    if not p.is_dir():
        return []
    try:
        entries = [e for e in os.scandir(p) if not e.name.startswith(".")]
    except OSError:
        return []
    shards = [e for e in entries if e.name.lower().endswith(".tar") and e.is_file()]
    others = [e for e in entries if e not in shards]
    if not shards or not others:
        return []
    if not all(e.is_file() and e.name.lower().endswith(SHARD_SIDECAR_SUFFIXES) for e in others):
        return []
    return sorted(e.name for e in others)


def _nonempty(listing: Listing, src) -> Listing:
    if not listing.paths:
        hint = f" ({describe_ignored(listing.ignored_counts())} files ignored)" if listing.ignored else ""
        tars = _tar_names(src)
        shards = (f" It holds {len(tars)} .tar files: to embed the shards, pass them as SOURCE, e.g. "
                  f"{Path(src) / tars[0]} or a pattern such as {Path(src) / '{00000..00099}.tar'}.") if tars else ""
        raise SourceError(
            f"SOURCE {src} holds no images{hint}. Image extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}.{shards}"
        )
    return listing


def _tar_names(src) -> list[str]:
    p = Path(src).expanduser()
    try:
        return sorted(e.name for e in os.scandir(p) if e.name.lower().endswith(".tar")) if p.is_dir() else []
    except OSError:
        return []


def _list_tar(source: str, label_from: str | None = None) -> Listing:
    """Rows `shard/member` of every image member, shards sorted, members in tar order, and the
    samples' .json keys as the listing's table (embedder.data.tar)."""
    root, shards = tarsrc.shard_files(source)
    rows, ignored = [], []
    for shard in shards:
        found, skipped = tarsrc.list_shard(shard, shard.relative_to(root).as_posix(), is_image_name, label_from)
        rows += found
        ignored += skipped
    # Class indices (.cls, or integers in .json) are the labels as they are; names are sorted.
    labels, classes = label_indices([label for _, _, label, _ in rows])
    return Listing(root, [p for p, *_ in rows], labels, classes, tarsrc.LAYOUT,
                   ignored, {p: m for p, m, *_ in rows}, tarsrc.json_table(root, rows))


DENSE_CLASS_LIMIT = 100_000  # class indices below it are kept as they are; see label_indices


def label_indices(raw: list) -> tuple[np.ndarray, list[str]]:
    """(labels, classes) of raw labels (None: unlabelled). Where every label is an integer >= 0 and
    the largest is below DENSE_CLASS_LIMIT, the indices stay as they are (classes "0" .. max, so
    a subset of ImageNet keeps ImageNet's indices); otherwise (names, or an index such as a taxon
    id of 2,000,000,000) the classes are the distinct values seen, sorted (integers by value), and
    the labels index them: a class index is a label, never a size to allocate."""
    given = [lab for lab in raw if lab is not None]
    ints = bool(given) and all(isinstance(lab, int) and not isinstance(lab, bool) for lab in given)
    if ints and min(given) >= 0 and max(given) < DENSE_CLASS_LIMIT:
        return np.asarray([-1 if lab is None else lab for lab in raw], dtype=np.int64), [
            str(i) for i in range(max(given) + 1)]
    classes = [str(v) for v in sorted(set(given))] if ints else sorted({str(lab) for lab in given})
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([-1 if lab is None else index[str(lab)] for lab in raw], dtype=np.int64), classes


def _list_table(path: Path, columns: TableColumns) -> Listing:
    rows = list_table(path, columns)
    labels, classes = label_indices(rows.labels)
    return Listing(path.resolve().parent, rows.paths, labels, classes, TABLE_LAYOUT, rows.ignored,
                   table=rows.metadata)


def _list_folder(root: Path, layout: str) -> Listing:
    walk = _walk(root)
    chosen = _detect_layout(walk) if layout == "auto" else layout
    if chosen == "flat":
        return Listing(root, walk.images, np.full(len(walk.images), -1, dtype=np.int64), [], chosen, walk.ignored)
    if chosen not in ("imagefolder", "split-imagefolder"):
        raise SourceError(f"unknown layout {layout!r}")
    level = _class_depth(chosen)
    classes = sorted({d.split("/")[level] for d in walk.dirs if _depth(d) == level})
    inside = [p for p in walk.images if _depth(p) > level]
    outside = [p for p in walk.images if _depth(p) <= level]
    if outside and layout == "auto":
        folders = sorted(d for d in walk.dirs if "/" not in d)
        shown = ", ".join(folders[:3]) + (" ..." if len(folders) > 3 else "")
        raise SourceError(
            f"SOURCE {root} has {len(outside)} images outside its sub-folders (e.g. {outside[0]}) beside "
            f"{len(folders)} sub-folder{'s' if len(folders) > 1 else ''} ({shown}), so its layout is ambiguous. "
            "Use --layout flat to embed all of them unlabelled, or --layout imagefolder to label by sub-folder "
            "and ignore the images outside them."
        )
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[p.split("/")[level]] for p in inside], dtype=np.int64)
    ignored = walk.ignored + [(p, OUTSIDE_CLASSES) for p in outside]
    return Listing(root, inside, labels, classes, chosen, ignored)


def _list_file(list_path: Path) -> Listing:
    """`path[,label]` per line; `#` comments and blank lines skipped; an optional `path,label` header."""
    root = list_path.resolve().parent
    rows: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    ignored: list[tuple[str, str]] = []
    try:
        # utf-8-sig: a BOM is not part of the first path; surrogateescape: a line that is not UTF-8
        # is that line's problem (ignored, with its number), not the whole list's.
        with open(list_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            for lineno, rec in enumerate(csv.reader(f), start=1):
                if not rec or not rec[0].strip() or rec[0].lstrip().startswith("#"):
                    continue
                if not _utf8(rec) or "\0" in rec[0]:
                    ignored.append((f"{list_path.name}:line {lineno}", NOT_UTF8 if not _utf8(rec) else NUL_PATH))
                    continue
                if lineno == 1 and rec[0].strip().lower() in ("path", "url", "file", "filename", "image"):
                    continue
                if len(rec) > 2:
                    raise SourceError(
                        f"{list_path}:{lineno}: expected `path[,label]`, got {len(rec)} fields. "
                        "Quote paths that contain commas, or read it as a table: --path-column NAME "
                        "(and --label-column NAME) with a header row naming the columns."
                    )
                rel = _list_entry(rec[0].strip(), root)
                label = rec[1].strip() if len(rec) == 2 and rec[1].strip() else None
                if rel in seen:
                    ignored.append((rel, LISTED_TWICE))
                    continue
                seen.add(rel)
                rows.append((rel, label))
    except csv.Error as exc:  # a NUL byte, a field over csv's size limit: not a text file list
        raise SourceError(f"{list_path} is not a text file list ({exc}).") from None
    except OSError as exc:
        raise SourceError(f"{list_path} cannot be read ({exc.strerror}).") from None
    classes = sorted({lab for _, lab in rows if lab is not None})
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[lab] if lab is not None else -1 for _, lab in rows], dtype=np.int64)
    return Listing(root, [p for p, _ in rows], labels, classes, "filelist", ignored)


def _utf8(fields: list[str]) -> bool:
    try:
        for text in fields:
            text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: a byte that was not UTF-8
        return False
    return True


def _list_entry(text: str, root: Path) -> str:
    """A file list's path as a row: a URL as written, a path relative to the list's folder,
    normalised (`sub/../x.png` is `x.png`: one file, one row)."""
    if is_url(text):
        return text
    p = Path(posixpath.normpath(text))
    return p.as_posix() if not p.is_absolute() else _relative_if_inside(p, root)


def _relative_if_inside(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()
