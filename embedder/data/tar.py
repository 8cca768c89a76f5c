"""Webdataset tar shards as SOURCE: a `.tar` file, a folder of them, or a brace pattern.

A sample is the members of one shard sharing a key (webdataset's convention: the member's
name up to the first dot of its basename). Its image member (any image extension) is the
row, keyed `shard/member` (`00000.tar/sample0001.jpg`, the shard relative to the shards'
folder). The label is the `.cls` member's integer class, else the `.json` object's "label"
(or "class") key; `--label-column` picks another: `txt` (the `.txt` member is the class
name), `cls`, or a `.json` key. A `.txt` member that is not the label is the sample's text
(img2dataset's caption), stored as the str column `txt`; a `.cls` that is not, as `cls`.

Every other key of a sample's `.json` object (img2dataset writes url, caption, key, status,
width, height, original_width, exif, sha256 ...) becomes a metadata column of the listing's
`table` (`json_table`), kinds and nulls as for a --metadata table, nested values as JSON text.
A key named like a column every cache has (the built-in size, mtime, width, height, split,
has_metadata; the reserved id, path, label) is stored as `json_<key>`: embedder's own
`width`/`height` are the image as decoded, img2dataset's are the size it resized to, and
both are kept. The key that gave the row's label is not stored again (it is `/labels`). A key
that cannot be a column name (empty, with a '/') is left out, with a note. Rows whose sample
has no `.json` object (nor `.txt`) hold nulls, and `has_metadata` is False for them.

The listing reads the tar headers once and records each image member's data offset, size
and mtime (`TarMember`), so a reader seeks to one member and reads its bytes without
extracting or re-scanning the shard. Shards are sorted, members kept in tar order, so two
listings of the same shards give the same rows. A shard cut short keeps the members listed
before the cut; a member whose data runs past the end of the file is a row that the reader
records as an error ("truncated tar member").
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from embedder.data.metadata import BUILTIN, MATCHED, RESERVED, MetadataTable, check_column_names, records_table
from embedder.errors import BadImageError, ConfigError, SourceError

LAYOUT = "tar"
LABEL_EXTENSIONS = ("cls", "txt", "json")
JSON_LABEL_KEYS = ("label", "class")
JSON_PREFIX = "json_"  # a .json key named like a built-in or reserved column is stored under this prefix
_TAKEN = frozenset(BUILTIN) | frozenset(RESERVED) | {MATCHED}
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_SHELL = set("*?[]")


@dataclass(frozen=True)
class TarMember:
    """Where one image member's bytes lie: its shard (absolute), data offset, size and mtime."""

    shard: str
    offset: int
    size: int
    mtime: float

    def read(self) -> bytes:
        """The member's bytes; BadImageError where the shard is gone or ends inside them."""
        try:
            with open(self.shard, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.size)
        except OSError as exc:
            raise BadImageError(f"cannot read tar shard: {exc.strerror or exc}") from None
        if len(data) < self.size:
            raise BadImageError(f"truncated tar member: {len(data)} of {self.size} bytes in the shard")
        return data


def is_tar_source(source: str) -> bool:
    """Whether SOURCE names tar shards: a .tar file, a pattern, or a folder holding .tar files only."""
    p = Path(source).expanduser()
    if (_SHELL | {"{", "}"}) & set(source) and not p.exists():
        return True  # a pattern (shell syntax other than {a..b} is refused by expand_braces, by name)
    if p.is_file():
        return p.suffix.lower() == ".tar"
    if p.is_dir():
        names = [e.name for e in os.scandir(p) if not e.name.startswith(".")]
        return bool(names) and all(n.lower().endswith(".tar") for n in names)
    return False


def expand_braces(pattern: str) -> list[str]:
    """`shards/{00000..00002}.tar` -> the three names; zero padding kept from the wider bound."""
    if _SHELL & set(pattern) or _BRACE.sub("", pattern).count("{") or _BRACE.sub("", pattern).count("}"):
        raise SourceError(f"SOURCE {pattern!r}: only `{{a..b}}` ranges of integers are expanded "
                          "(e.g. shards/{00000..00099}.tar); no globs, lists or other shell syntax.")
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    a, b = m.group(1), m.group(2)
    if int(b) < int(a):
        raise SourceError(f"SOURCE {pattern!r}: the range {{{a}..{b}}} is empty (its end is below its start).")
    width = len(a) if a.startswith("0") or len(a) == len(b) else 0
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [name for i in range(int(a), int(b) + 1) for name in expand_braces(f"{head}{i:0{width}d}{tail}")]


def shard_files(source: str) -> tuple[Path, list[Path]]:
    """(the shards' folder, the shard files sorted) for a tar SOURCE; SourceError names what is missing."""
    if not Path(source).expanduser().exists():
        shards = [Path(s).expanduser().resolve() for s in expand_braces(source)]
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise SourceError(f"SOURCE {source}: {len(missing)} of {len(shards)} shards do not exist "
                              f"(e.g. {missing[0]}). Check the pattern's range.")
    else:
        p = Path(source).expanduser().resolve()
        shards = [p] if p.is_file() else [p / e.name for e in os.scandir(p) if e.name.lower().endswith(".tar")]
    shards = sorted(set(shards))
    root = Path(os.path.commonpath([s.parent for s in shards]))
    return root, shards


def sample_key(name: str) -> str:
    """webdataset's key: the member's path up to the first dot of its basename."""
    folder, _, base = name.rpartition("/")
    return (folder + "/" if folder else "") + base.split(".", 1)[0]


def list_shard(shard: Path, rel: str, is_image, label_from: str | None = None
               ) -> tuple[list[tuple], list[tuple[str, str]]]:
    """One shard's rows as (`rel/member`, TarMember, label or None, record or None) in tar order,
    and its ignored members. The record is the sample's .json object less the key that gave the
    label, with its `.txt` / `.cls` where those are not the label. `label_from`: see the module
    docstring (None: .cls, else the .json's label/class key)."""
    images: list[tuple[str, str, TarMember]] = []
    labels: dict[str, tuple[object, str | None]] = {}  # key -> (label, the .json key it came from)
    records: dict[str, dict] = {}  # key -> the sample's first .json object
    extras: dict[str, dict] = {}  # key -> {"txt": caption, "cls": index} not taken as the label
    ignored: list[tuple[str, str]] = []
    name = str(shard)  # one string for all its members: less memory, and pickled once per Ray task
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for info in _members(tar, rel, ignored):
                if not info.isfile():
                    continue
                key, ext = sample_key(info.name), info.name.rsplit(".", 1)[-1].lower()
                if is_image(info.name):
                    member = TarMember(name, info.offset_data, info.size, float(info.mtime))
                    images.append((f"{rel}/{info.name}", key, member))
                elif ext in LABEL_EXTENSIONS:  # every one is read: what is not the label is a column
                    _read_label_member(tar, info, ext, key, labels, records, extras, label_from)
                else:
                    ignored.append((f"{rel}/{info.name}", "not an image or label member"))
    except (tarfile.TarError, OSError) as exc:
        raise SourceError(f"{shard} is not a readable tar file ({exc}). Remove it or fix the pattern.") from None
    rows = []
    for path, key, member in images:
        label, from_key = labels.get(key, (None, None))
        record = records.get(key)
        if record is not None and from_key is not None:
            record = {k: v for k, v in record.items() if k != from_key}
        if key in extras:
            record = {**extras[key], **(record or {})}
        rows.append((path, member, label, record))
    return rows, ignored


def _read_label_member(tar: tarfile.TarFile, info: tarfile.TarInfo, ext: str, key: str,
                       labels: dict, records: dict, extras: dict, label_from: str | None = None) -> None:
    """Record what a .cls/.txt/.json member gives: the sample's label (the first member that
    holds one wins), else its value as a column; for the first .json object, its record."""
    text = _text(tar, info)
    if text is None:
        return
    if ext != "json":
        value = (int(text) if re.fullmatch(r"-?\d+", text) else None) if ext == "cls" else (text or None)
        is_label = label_from == ext or (label_from is None and ext == "cls")
        if value is not None and is_label:
            # .cls wins over a .json's label key read before it, whose key then stays a column.
            if key not in labels or labels[key][1] is not None:
                labels[key] = (value, None)
        elif value is not None:
            extras.setdefault(key, {}).setdefault(ext, value)  # a caption, a class index not asked for
        return
    try:
        obj = json.loads(text)
    except ValueError:
        return
    if not isinstance(obj, dict):
        return
    first = records.setdefault(key, obj) is obj
    if key not in labels and label_from not in ("cls", "txt"):
        for k in ((label_from,) if label_from else JSON_LABEL_KEYS):
            if isinstance(obj.get(k), (int, str)) and not isinstance(obj.get(k), bool):
                labels[key] = (obj[k], k if first else None)  # None: not a key of the stored record
                return


def _text(tar: tarfile.TarFile, info: tarfile.TarInfo) -> str | None:
    f = tar.extractfile(info)
    try:
        return f.read().decode("utf-8").strip() if f is not None else ""
    except (UnicodeDecodeError, tarfile.TarError, OSError):
        return None


def json_table(root: Path, rows: list[tuple]) -> MetadataTable | None:
    """The listing's columns from its samples' .json records (`list_shard` rows), or None where
    no sample has a key beyond its label. Names follow the module docstring's rule."""
    paths = [row[0] for row in rows if row[3] is not None]
    records = [row[3] for row in rows if row[3] is not None]
    keys = list(dict.fromkeys(k for r in records for k in r))
    what = f"SOURCE {root} (.json members)"
    names, notes = {}, []
    for k in keys:
        name = k
        while name in _TAKEN or (name != k and name in keys):
            name = JSON_PREFIX + name  # json_width; json_json_width where the .json also has json_width
        try:
            check_column_names([name], what)
        except ConfigError:
            notes.append(f"{what}: key {k!r} cannot be a column name (empty, or with a '/' or surrounding "
                         "spaces): not stored")
            continue
        names[k] = name
    if not names:
        return None
    table = records_table(root, paths, [{names[k]: v for k, v in r.items() if k in names} for r in records], what)
    if table is not None:
        table.notes[:0] = notes
    return table


def _members(tar: tarfile.TarFile, rel: str, ignored: list[tuple[str, str]]):
    """The shard's member headers; a shard cut short ends them at the cut, noted once in `ignored`."""
    while True:
        try:
            info = tar.next()
        except tarfile.TarError as exc:
            ignored.append((f"{rel}/", f"tar shard cut short, members after the cut are lost ({exc})"))
            return
        if info is None:
            return
        yield info
