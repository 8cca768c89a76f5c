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
listings of the same shards give the same rows.

Every member is accounted for (issue 25; docs/RELIABILITY.md, "Tar shards"):
  * a damaged header is walked past to the next header that parses, and the bytes skipped are
    an ignored entry `shard/@offset` ("damaged tar header ... a member there is lost");
  * a member whose data runs past the end of the file (a shard cut short, or a damaged size)
    is a row that the reader records as an error ("truncated tar member"), and the walk goes on
    inside its data; a member over MAX_MEMBER_BYTES is refused unread, a label member over
    MAX_LABEL_BYTES ignored unread: no header's size is ever allocated;
  * one row per member name (normalised: `./a.jpg` is `a.jpg`): the *last* member of a name,
    as `tar -x` leaves on disk, with the label of the last member of its label's name; earlier
    ones are ignored ("replaced by a later member of the same name");
  * a hard or symbolic link is resolved within the shard: to an image member that is a row it is
    ignored as the same bytes; to another regular member it is a row with that member's bytes;
    to nothing in the shard, or a loop, it is ignored with the reason. Directory, FIFO, device
    and sparse members are ignored with their kind (directories without an image name silently:
    they are folders, not files);
  * a shard that cannot be opened at all (empty, not a tar, unreadable) refuses the run, naming
    it: it most often means the wrong SOURCE or a shard still being written, and a listing that
    left a whole shard out would store a cache that looks complete. Remove or repair it and run
    again; the rows already cached are kept.

A `{a..b}` pattern is counted before it is expanded (more than MAX_SHARDS shards are refused)
and its shards are looked at in order, the first missing one refusing the run.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
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
MAX_MEMBER_BYTES = 1 << 30  # an image member above this is refused unread: no image under the pixel cap needs it
MAX_LABEL_BYTES = 1 << 20  # a .cls/.txt/.json member above this is ignored unread
MAX_SHARDS = 1_000_000  # a pattern naming more shards is refused before any is looked at
DAMAGED = "damaged tar header"
REPLACED = "replaced by a later member of the same name"
SAME_MEMBER = "link to another image member of the shard (same bytes)"
_KINDS = {tarfile.DIRTYPE: "directory", tarfile.FIFOTYPE: "FIFO", tarfile.CHRTYPE: "character device",
          tarfile.BLKTYPE: "block device"}
_LINK_HOPS = 8  # symlinks followed within a shard before the link counts as a loop
_SHELL = set("*?[]")


@dataclass(frozen=True)
class TarMember:
    """Where one image member's bytes lie: its shard (absolute), data offset, size and mtime."""

    shard: str
    offset: int
    size: int
    mtime: float

    def read(self) -> bytes:
        """The member's bytes; BadImageError where the shard is gone, ends inside them, or the
        header claims more than MAX_MEMBER_BYTES (refused before anything is allocated)."""
        if self.size > MAX_MEMBER_BYTES:
            raise BadImageError(f"tar member of {self.size:,} bytes is over the {MAX_MEMBER_BYTES >> 20:,} MB "
                                "member cap (its header may be damaged)")
        try:
            with open(self.shard, "rb") as f:
                left = os.fstat(f.fileno()).st_size - self.offset
                if left < self.size:
                    raise BadImageError(f"truncated tar member: {max(left, 0):,} of {self.size:,} bytes in the shard")
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
    _brace_count(pattern)
    return list(_expand(pattern))


def _brace_count(pattern: str) -> int:
    """How many names the pattern gives (its ranges' sizes multiplied), refused above MAX_SHARDS
    before a single name is made."""
    if _SHELL & set(pattern) or _BRACE.sub("", pattern).count("{") or _BRACE.sub("", pattern).count("}"):
        raise SourceError(f"SOURCE {pattern!r}: only `{{a..b}}` ranges of integers are expanded "
                          "(e.g. shards/{00000..00099}.tar); no globs, lists or other shell syntax.")
    count = 1
    for m in _BRACE.finditer(pattern):
        a, b = int(m.group(1)), int(m.group(2))
        if b < a:
            raise SourceError(f"SOURCE {pattern!r}: the range {m.group(0)} is empty (its end is below its start).")
        count *= b - a + 1
        if count > MAX_SHARDS:
            raise SourceError(f"SOURCE {pattern!r} names more than {MAX_SHARDS:,} shards. Check the pattern's "
                              "range, or embed the shards in several runs into one cache.")
    return count


def _expand(pattern: str):
    """The pattern's names, one at a time (a pattern checked by _brace_count)."""
    m = _BRACE.search(pattern)
    if m is None:
        yield pattern
        return
    a, b = m.group(1), m.group(2)
    width = len(a) if a.startswith("0") or len(a) == len(b) else 0
    head, tail = pattern[: m.start()], pattern[m.end():]
    for i in range(int(a), int(b) + 1):
        yield from _expand(f"{head}{i:0{width}d}{tail}")


def shard_files(source: str) -> tuple[Path, list[Path]]:
    """(the shards' folder, the shard files sorted) for a tar SOURCE; SourceError names what is
    missing. A pattern's shards are looked at in order and the first missing one refuses the
    run: a pattern of a million missing shards is refused at the first."""
    if not Path(source).expanduser().exists():
        count = _brace_count(source)
        folders = functools.lru_cache(maxsize=1024)(lambda d: Path(d).expanduser().resolve())
        shards = []
        for name in _expand(source):
            folder, _, base = name.rpartition("/")
            shard = folders(folder or ".") / base
            if not shard.is_file():
                raise SourceError(f"SOURCE {source}: shards named by the pattern do not exist (the first: {shard}; "
                                  f"the pattern names {count:,}). Check the pattern's range.")
            shards.append(shard)
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
    ignored: list[tuple[str, str]] = []
    try:
        # ignore_zeros: a header that does not parse is skipped block by block to the next one that
        # does (tarfile would otherwise take it for the archive's end); _headers says what was skipped.
        with tarfile.open(shard, mode="r:", ignore_zeros=True) as tar:
            infos = _latest(list(_headers(tar, shard, rel, ignored)), rel, ignored)
            return _shard_rows(tar, str(shard), rel, infos, is_image, label_from, ignored), ignored
    except (tarfile.TarError, OSError) as exc:
        raise SourceError(f"{shard} is not a readable tar file ({exc}). Remove it from the folder or the pattern's "
                          "range, or repair it: one unreadable shard refuses the run, so that no shard's samples "
                          "go missing unnoticed.") from None


def _shard_rows(tar, name: str, rel: str, infos: dict, is_image, label_from, ignored) -> list[tuple]:
    """The rows of a shard's members (`infos`: {normalised name: TarInfo}, the latest of each name)."""
    images: list[tuple[str, str, TarMember]] = []
    labels: dict[str, tuple[object, str | None]] = {}  # key -> (label, the .json key it came from)
    records: dict[str, dict] = {}  # key -> the sample's first .json object
    extras: dict[str, dict] = {}  # key -> {"txt": caption, "cls": index} not taken as the label
    # Each member's bytes are one row: an image member's own, else the first image-named link's.
    claimed = {id(i): i.name for i in infos.values() if i.isreg() and is_image(i.name)}
    for norm, info in infos.items():
        key, ext = sample_key(norm), info.name.rsplit(".", 1)[-1].lower()  # `./a.jpg` and `a.cls`: one sample
        wanted = is_image(info.name) or ext in LABEL_EXTENSIONS
        data, why = _regular(info, infos) if wanted or not info.isdir() else (None, None)
        if data is None:
            if why is not None and (wanted or not info.isdir()):
                ignored.append((f"{rel}/{info.name}", why))
            continue
        if is_image(info.name):
            if claimed.setdefault(id(data), info.name) != info.name:
                ignored.append((f"{rel}/{info.name}", f"{SAME_MEMBER} ({claimed[id(data)]})"))
                continue
            images.append((f"{rel}/{info.name}", key, TarMember(name, data.offset_data, data.size, float(data.mtime))))
        elif ext in LABEL_EXTENSIONS:  # every one is read: what is not the label is a column
            if data.size > MAX_LABEL_BYTES:
                ignored.append((f"{rel}/{info.name}", f"label member over {MAX_LABEL_BYTES >> 20} MB, not read"))
                continue
            _read_label_member(tar, data, ext, key, labels, records, extras, label_from)
        else:
            ignored.append((f"{rel}/{info.name}", "not an image or label member"))
    rows = []
    for path, key, member in images:
        label, from_key = labels.get(key, (None, None))
        record = records.get(key)
        if record is not None and from_key is not None:
            record = {k: v for k, v in record.items() if k != from_key}
        if key in extras:
            record = {**extras[key], **(record or {})}
        rows.append((path, member, label, record))
    return rows


def _regular(info: tarfile.TarInfo, infos: dict) -> tuple[tarfile.TarInfo | None, str | None]:
    """(the regular member whose bytes `info` names: itself, or a link's target in the shard, or
    None, with why it has none)."""
    seen = 0
    while info.issym() or info.islnk():
        # A hard link names its target from the archive's root, a symlink from its own folder.
        target = info.linkname if info.islnk() else posixpath.join(posixpath.dirname(info.name), info.linkname)
        found = infos.get(_norm(target))
        seen += 1
        if found is None or seen > _LINK_HOPS:
            kind = "hard link" if info.islnk() else "symbolic link"
            return None, f"{kind} to {info.linkname!r}, which is not a member of this shard" if found is None \
                else f"symbolic link loop through {info.linkname!r}"
        info = found
    if info.type == tarfile.GNUTYPE_SPARSE:
        return None, "sparse member (its bytes are not stored in one piece)"
    if not info.isreg():
        return None, f"not a regular file ({_KINDS.get(info.type, 'type ' + repr(info.type))})"
    return info, None


def _norm(name: str) -> str:
    """A member name as `tar -x` would place it: `./a.jpg`, `b/../a.jpg` and `a.jpg` are one file."""
    return posixpath.normpath("/" + name).lstrip("/")


def _latest(infos: list[tarfile.TarInfo], rel: str, ignored: list) -> dict[str, tarfile.TarInfo]:
    """{normalised name: the last member of that name}, in tar order of those kept. An earlier
    member of the same name is ignored: `tar -x` leaves the last one on disk (`tar -r` appends
    a newer version), and one row per name keeps each row's features and label from one member."""
    latest = {_norm(i.name): i for i in infos}
    kept = {id(i) for i in latest.values()}
    for i in infos:
        if id(i) not in kept and not i.isdir():
            ignored.append((f"{rel}/{i.name}", f"{REPLACED} ({_norm(i.name)})"))
    return {n: i for n, i in sorted(latest.items(), key=lambda kv: kv[1].offset)}


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
        return f.read().decode("utf-8-sig").strip() if f is not None else ""  # -sig: a BOM is not the label
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


def _headers(tar: tarfile.TarFile, shard: Path, rel: str, ignored: list[tuple[str, str]]):
    """The shard's member headers in order. Bytes between two members that are not the zero blocks
    tar pads with (a damaged header: tarfile skips it to the next header that parses) are noted
    in `ignored` with their offsets, since a member was lost there; a header whose size runs past
    the shard's end (cut short, or a damaged size) is listed (the reader records its error) and
    the walk goes on from its data, where the next member's header may still be."""
    end = shard.stat().st_size
    expected, last = 0, None  # where the next header should start; the last member listed
    while True:
        try:
            info = tar.next()
        except (tarfile.ReadError, OSError) as exc:  # OSError: a seek past what the file system allows
            if last is not None and last.offset_data + last.size > end:
                # The last member's data runs past the end: look for headers inside it (a damaged size),
                # its bytes being that member's (its row's error says it is cut short), not a loss.
                tar.offset, expected, last = last.offset_data, end, None
                continue
            if tar.offset == 0 or not isinstance(exc, tarfile.ReadError):
                raise
            if tar.offset >= end:
                return
            ignored.append((f"{rel}/@{tar.offset}", f"{DAMAGED} ({exc})"))
            tar.offset += tarfile.BLOCKSIZE
            continue
        except (ValueError, UnicodeError, OverflowError) as exc:
            ignored.append((f"{rel}/@{tar.offset}", f"{DAMAGED} ({exc})"))
            tar.offset += tarfile.BLOCKSIZE
            continue
        stop = info.offset if info is not None else end
        if stop > expected and not _zeros(shard, expected, stop):
            if info is None and expected == 0:
                raise tarfile.ReadError("no tar header in it")
            ignored.append((f"{rel}/@{expected}",
                            f"{DAMAGED}: bytes {expected:,} to {stop:,} skipped, a member there is lost"))
        if info is None:
            return
        expected = tar.offset
        last = info
        yield info


def _zeros(path: Path, start: int, stop: int) -> bool:
    """Whether the bytes [start, stop) of `path` are all zero (tar's padding), read 1 MB at a time."""
    with open(path, "rb") as f:
        f.seek(start)
        while start < stop:
            chunk = f.read(min(1 << 20, stop - start))
            if not chunk:
                return True
            if chunk.count(0) != len(chunk):
                return False
            start += len(chunk)
    return True
