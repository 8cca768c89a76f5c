"""Turn SOURCE into an ordered list of (relative path, label).

Layouts (auto-detected, or forced with `layout=`):
  imagefolder        SOURCE/<class>/**/<image>; labels are class-folder indices
  split-imagefolder  SOURCE/<split>/<class>/**/<image> with split in train/val/test
                     (the classic transfer-learning tutorial layout); the split stays
                     the first component of each path, labels are the class folder
  flat               SOURCE/**/<image>, no labels (-1)
  filelist           a .txt/.csv file of `path[,label]` lines, relative to the list's folder

Folder listings are sorted by relative POSIX path, so two runs give the same rows.
A file list keeps the order it was written in (duplicates dropped).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from embedder.errors import SourceError

IMAGE_EXTENSIONS = frozenset(
    [".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"]
)
SPLIT_NAMES = ("train", "val", "valid", "validation", "test")
LAYOUTS = ("auto", "imagefolder", "split-imagefolder", "flat", "filelist")


@dataclass
class Listing:
    root: Path  # paths are relative to this folder
    paths: list[str]
    labels: np.ndarray  # int64, -1 = unlabelled
    classes: list[str]
    layout: str
    ignored: list[str] = field(default_factory=list)  # files skipped for their extension

    def __len__(self) -> int:
        return len(self.paths)

    def limit(self, n: int | None) -> Listing:
        if n is None:
            return self
        if n < 1:
            raise SourceError(f"--limit must be at least 1, got {n}.")
        return Listing(self.root, self.paths[:n], self.labels[:n], self.classes, self.layout, self.ignored)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _walk_images(folder: Path, root: Path, ignored: list[str]) -> list[str]:
    """Relative POSIX paths of the image files under `folder`, sorted; hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if _visible(d)]
        for name in filenames:
            if not _visible(name):
                continue
            rel = Path(dirpath, name).relative_to(root).as_posix()
            (found if is_image_name(name) else ignored).append(rel)
    return sorted(found)


def _subdirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and _visible(e.name))


def _detect_layout(root: Path) -> str:
    subdirs = _subdirs(root)
    if not subdirs:
        return "flat"
    if all(d in SPLIT_NAMES for d in subdirs) and all(_subdirs(root / d) for d in subdirs):
        return "split-imagefolder"
    return "imagefolder"


def list_source(source: str | os.PathLike, layout: str = "auto", limit: int | None = None) -> Listing:
    src = Path(source).expanduser()
    if layout not in LAYOUTS:
        raise SourceError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}.")
    if not src.exists():
        raise SourceError(f"SOURCE {src} does not exist. Pass an image folder or a .txt/.csv file list.")
    if src.is_file():
        if layout not in ("auto", "filelist"):
            raise SourceError(f"SOURCE {src} is a file, so it must be a file list (not --layout {layout}).")
        listing = _list_file(src)
    else:
        if layout == "filelist":
            raise SourceError(f"--layout filelist needs a .txt/.csv file, but {src} is a folder.")
        root = src.resolve()
        chosen = _detect_layout(root) if layout == "auto" else layout
        listing = _list_folder(root, chosen)
    if not listing.paths:
        hint = f" ({len(listing.ignored)} files were skipped for their extension)" if listing.ignored else ""
        raise SourceError(
            f"SOURCE {src} holds no images{hint}. Image extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}."
        )
    return listing.limit(limit)


def _list_folder(root: Path, layout: str) -> Listing:
    ignored: list[str] = []
    if layout == "flat":
        paths = _walk_images(root, root, ignored)
        return Listing(root, paths, np.full(len(paths), -1, dtype=np.int64), [], layout, ignored)

    if layout == "split-imagefolder":
        class_dirs = [(split, Path(split, c)) for split in _subdirs(root) for c in _subdirs(root / split)]
        classes = sorted({d.name for _, d in class_dirs})
    elif layout == "imagefolder":
        class_dirs = [("", Path(c)) for c in _subdirs(root)]
        classes = [d.name for _, d in class_dirs]
    else:
        raise SourceError(f"unknown layout {layout!r}")
    index = {c: i for i, c in enumerate(classes)}
    # Images outside class folders have no label in these layouts: report, don't guess.
    for entry in os.scandir(root):
        if entry.is_file() and _visible(entry.name):
            ignored.append(entry.name)
    rows: list[tuple[str, int]] = []
    for _, rel_dir in class_dirs:
        label = index[rel_dir.name]
        rows += [(p, label) for p in _walk_images(root / rel_dir, root, ignored)]
    rows.sort()
    return Listing(
        root,
        [p for p, _ in rows],
        np.array([lab for _, lab in rows], dtype=np.int64),
        classes,
        layout,
        ignored,
    )


def _list_file(list_path: Path) -> Listing:
    """`path[,label]` per line; `#` comments and blank lines skipped; an optional `path,label` header."""
    root = list_path.resolve().parent
    rows: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    try:
        with open(list_path, newline="", encoding="utf-8") as f:
            for lineno, rec in enumerate(csv.reader(f), start=1):
                if not rec or not rec[0].strip() or rec[0].lstrip().startswith("#"):
                    continue
                if lineno == 1 and rec[0].strip().lower() in ("path", "file", "filename", "image"):
                    continue
                if len(rec) > 2:
                    raise SourceError(
                        f"{list_path}:{lineno}: expected `path[,label]`, got {len(rec)} fields. "
                        "Quote paths that contain commas."
                    )
                p = Path(rec[0].strip())
                rel = p.as_posix() if not p.is_absolute() else _relative_if_inside(p, root)
                label = rec[1].strip() if len(rec) == 2 and rec[1].strip() else None
                if rel not in seen:
                    seen.add(rel)
                    rows.append((rel, label))
    except UnicodeDecodeError as exc:
        raise SourceError(f"{list_path} is not a UTF-8 text file list: {exc}") from exc
    classes = sorted({lab for _, lab in rows if lab is not None})
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[lab] if lab is not None else -1 for _, lab in rows], dtype=np.int64)
    return Listing(root, [p for p, _ in rows], labels, classes, "filelist")


def _relative_if_inside(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()
