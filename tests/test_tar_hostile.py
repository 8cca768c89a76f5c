"""Damaged and hostile tar shards (issue 25): every member ends as a row, a row's error, or an ignored
entry with its reason; one row per member name; bounded memory; patterns checked fast.

The corpus is generated here: shards written with tarfile and then damaged byte by byte."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from embedder.cache.reader import FeatureCache
from embedder.cli.main import main
from embedder.data.sources import label_indices, list_source
from embedder.data.table import TableColumns
from embedder.data.tar import DAMAGED, MAX_LABEL_BYTES, MAX_MEMBER_BYTES, REPLACED, SAME_MEMBER, expand_braces
from embedder.errors import BadImageError, SourceError
from tests.conftest import cli_args, fast_config, make_tree


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[bytes]:
    tree = make_tree(tmp_path_factory.mktemp("imgs"), classes=("a",), per_class=6)
    return [p.read_bytes() for p in sorted(tree.rglob("*.*"))]


def _info(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname, info.mtime = size, kind, link, 1_700_000_000
    return info


def shard(path: Path, members: list) -> list[int]:
    """Write `members` ((name, bytes) or a TarInfo) as a tar; return each member's header offset."""
    buf = io.BytesIO()
    offsets = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for m in members:
            offsets.append(buf.tell())
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                tar.addfile(_info(m[0], len(m[1])), io.BytesIO(m[1]))
    path.write_bytes(buf.getvalue())
    return offsets


def patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def set_size(path: Path, header: int, size: int) -> None:
    """Give the header at `header` a (base-256) size field and a valid checksum."""
    raw = bytearray(path.read_bytes())
    raw[header + 124 : header + 136] = b"\x80" + size.to_bytes(11, "big")
    raw[header + 148 : header + 156] = b" " * 8
    raw[header + 148 : header + 156] = b"%06o\0 " % sum(raw[header : header + 512])
    path.write_bytes(bytes(raw))


def accounted(listing, names: list[str], shard_name: str = "s.tar") -> dict[str, str]:
    """{member: "row" or its ignored reason}; asserts that every member is one or the other."""
    rows = {p.split("/", 1)[1] for p in listing.paths}
    ignored = {p.split("/", 1)[1]: r for p, r in listing.ignored if p.startswith(shard_name + "/")}
    out = {}
    for n in names:
        assert n in rows or n in ignored, f"{n} is neither a row nor ignored"
        out[n] = "row" if n in rows else ignored[n]
    return out


def test_a_damaged_header_mid_shard_loses_only_its_member_and_says_where(tmp_path, images):
    names = [f"{i}.jpg" for i in range(5)]
    offsets = shard(tmp_path / "s.tar", list(zip(names, images)))
    for garbage in (b"\xff" * 512, b"\x00" * 100 + b"x" * 50, b"not a header at all"):
        shard(tmp_path / "s.tar", list(zip(names, images)))
        patch(tmp_path / "s.tar", offsets[2], garbage)
        listing = list_source(tmp_path / "s.tar")
        assert listing.paths == [f"s.tar/{n}" for n in names if n != "2.jpg"]
        lost = [(p, r) for p, r in listing.ignored if r.startswith(DAMAGED)]
        assert len(lost) == 1 and lost[0][0] == f"s.tar/@{offsets[2]}" and "a member there is lost" in lost[0][1]


def test_a_damaged_first_header_is_walked_past(tmp_path, images):
    offsets = shard(tmp_path / "s.tar", [("0.jpg", images[0]), ("1.jpg", images[1])])
    patch(tmp_path / "s.tar", 0, b"\x01" * 512)
    listing = list_source(tmp_path / "s.tar")
    assert listing.paths == ["s.tar/1.jpg"] and [p for p, _ in listing.ignored] == ["s.tar/@0"]
    assert offsets[1] > 0


@pytest.mark.parametrize("where", ["middle", "last"])
def test_a_header_claiming_a_huge_size_is_refused_unread_and_the_walk_goes_on(tmp_path, images, where):
    names = [f"{i}.jpg" for i in range(4)]
    offsets = shard(tmp_path / "s.tar", list(zip(names, images)))
    victim = 1 if where == "middle" else 3
    set_size(tmp_path / "s.tar", offsets[victim], 1 << 62)
    listing = list_source(tmp_path / "s.tar")
    assert listing.paths == [f"s.tar/{n}" for n in names]  # the members after it are still found
    member = listing.members[f"s.tar/{names[victim]}"]
    with pytest.raises(BadImageError, match=f"over the {MAX_MEMBER_BYTES >> 20:,} MB member cap"):
        member.read()  # refused before a 4 EiB buffer is asked for
    assert listing.members[f"s.tar/{names[0]}"].read() == images[0]
    assert not [r for _, r in listing.ignored if r.startswith(DAMAGED)]  # its bytes are its row's, not a loss


def test_a_size_past_the_shards_end_is_a_truncated_member_not_an_allocation(tmp_path, images):
    offsets = shard(tmp_path / "s.tar", [("0.jpg", images[0]), ("1.jpg", images[1])])
    set_size(tmp_path / "s.tar", offsets[1], 900 << 20)  # under the cap, past the end of a small file
    listing = list_source(tmp_path / "s.tar")
    with pytest.raises(BadImageError, match=r"truncated tar member: [\d,]+ of 943,718,400 bytes"):
        listing.members["s.tar/1.jpg"].read()


def test_links_are_resolved_within_the_shard_or_recorded(tmp_path, images):
    members = [
        ("a.jpg", images[0]), ("blob.bin", images[1]),
        _info("hard.jpg", kind=tarfile.LNKTYPE, link="a.jpg"),  # GNU tar's hard link to a listed image
        _info("sym.jpg", kind=tarfile.SYMTYPE, link="a.jpg"),
        _info("sub/up.jpg", kind=tarfile.SYMTYPE, link="../a.jpg"),
        _info("data.jpg", kind=tarfile.SYMTYPE, link="blob.bin"),  # the only image name for those bytes
        _info("chain.jpg", kind=tarfile.SYMTYPE, link="data.jpg"),
        _info("gone.jpg", kind=tarfile.SYMTYPE, link="nowhere.jpg"),
        _info("out.jpg", kind=tarfile.SYMTYPE, link="../../etc/passwd"),
        _info("hardgone.png", kind=tarfile.LNKTYPE, link="missing.png"),
        _info("loop1.jpg", kind=tarfile.SYMTYPE, link="loop2.jpg"),
        _info("loop2.jpg", kind=tarfile.SYMTYPE, link="loop1.jpg"),
        _info("self.jpg", kind=tarfile.SYMTYPE, link="self.jpg"),
        _info("abs.jpg", kind=tarfile.SYMTYPE, link="/a.jpg"),
    ]
    shard(tmp_path / "s.tar", members)
    listing = list_source(tmp_path / "s.tar")
    got = accounted(listing, [m[0] if isinstance(m, tuple) else m.name for m in members])
    assert got["a.jpg"] == got["data.jpg"] == "row" and got["blob.bin"] == "not an image or label member"
    assert listing.members["s.tar/data.jpg"].read() == images[1]
    for name in ("hard.jpg", "sym.jpg", "sub/up.jpg", "chain.jpg", "abs.jpg"):
        assert got[name].startswith(SAME_MEMBER), (name, got[name])
    for name in ("gone.jpg", "out.jpg", "hardgone.png"):
        assert "which is not a member of this shard" in got[name], (name, got[name])
    for name in ("loop1.jpg", "loop2.jpg", "self.jpg"):
        assert got[name].startswith("symbolic link loop"), (name, got[name])


def test_other_member_kinds_are_ignored_with_their_kind(tmp_path, images):
    members = [("a.jpg", images[0]), _info("dir.jpg", kind=tarfile.DIRTYPE), _info("fifo.png", kind=tarfile.FIFOTYPE),
               _info("tty.jpg", kind=tarfile.CHRTYPE), _info("disk.png", kind=tarfile.BLKTYPE),
               _info("pipe", kind=tarfile.FIFOTYPE), _info("folder/", kind=tarfile.DIRTYPE)]
    shard(tmp_path / "s.tar", members)
    got = accounted(list_source(tmp_path / "s.tar"), ["a.jpg", "dir.jpg", "fifo.png", "tty.jpg", "disk.png", "pipe"])
    assert got == {"a.jpg": "row", "dir.jpg": "not a regular file (directory)", "fifo.png": "not a regular file (FIFO)",
                   "tty.jpg": "not a regular file (character device)", "disk.png": "not a regular file (block device)",
                   "pipe": "not a regular file (FIFO)"}


@pytest.mark.parametrize("second", ["a.jpg", "./a.jpg", "sub/../a.jpg", "b//../a.jpg"])
def test_one_row_per_member_name_the_last_with_its_own_label(tmp_path, images, second):
    shard(tmp_path / "s.tar", [("a.jpg", images[0]), ("a.cls", b"3"), ("b.jpg", images[2]),
                               (second, images[1]), (second.replace(".jpg", ".cls"), b"7")])
    listing = list_source(tmp_path / "s.tar")
    assert [p for p in listing.paths if p != "s.tar/b.jpg"] == [f"s.tar/{second}"]
    member = listing.members[f"s.tar/{second}"]
    assert member.read() == images[1]  # the features of the last member ...
    row = listing.paths.index(f"s.tar/{second}")
    assert listing.classes[listing.labels[row]] == "7"  # ... and its label, from the same (last) .cls
    assert sorted(r.split(" (")[0] for _, r in listing.ignored) == [REPLACED, REPLACED]


def test_label_members_are_read_in_bounded_memory_and_huge_indices_are_labels(tmp_path, images):
    offsets = shard(tmp_path / "s.tar", [("a.jpg", images[0]), ("a.cls", b"1"), ("b.jpg", images[1]),
                                         ("b.cls", b"2000000000"), ("c.jpg", images[2]), ("c.cls", b"5")])
    set_size(tmp_path / "s.tar", offsets[5], 1 << 61)  # c.cls claims 2 EiB
    listing = list_source(tmp_path / "s.tar")
    got = accounted(listing, ["a.jpg", "b.jpg", "c.jpg", "c.cls"])
    assert got["c.cls"] == f"label member over {MAX_LABEL_BYTES >> 20} MB, not read"
    assert listing.classes == ["1", "2000000000"]  # the values seen, not range(2e9 + 1)
    assert [listing.classes[i] if i >= 0 else None for i in listing.labels] == ["1", "2000000000", None]


def test_label_indices_keep_small_indices_and_never_allocate_by_the_largest():
    labels, classes = label_indices([0, 2, None])
    assert list(labels) == [0, 2, -1] and classes == ["0", "1", "2"]  # a subset keeps its indices
    labels, classes = label_indices([10**18, 5, 10**18])
    assert classes == ["5", str(10**18)] and list(labels) == [1, 0, 1]


def test_label_members_pair_by_normalised_name_and_drop_a_bom(tmp_path, images):
    shard(tmp_path / "s.tar", [("./a.jpg", images[0]), ("a.txt", "\ufeffcat".encode()), ("b.jpg", images[1]),
                               ("./b.txt", b"dog")])
    listing = list_source(tmp_path / "s.tar", columns=TableColumns(label="txt"))
    assert [listing.classes[i] for i in listing.labels] == ["cat", "dog"]


def test_trailing_garbage_after_the_archive_is_recorded(tmp_path, images):
    shard(tmp_path / "s.tar", [("a.jpg", images[0])])
    with open(tmp_path / "s.tar", "ab") as f:
        f.write(b"\x00" * 1024 + b"junk appended by a broken copy" + b"\x00" * 600)
    listing = list_source(tmp_path / "s.tar")
    assert listing.paths == ["s.tar/a.jpg"] and [r.split(":")[0] for _, r in listing.ignored] == [DAMAGED]


def test_an_unreadable_shard_among_many_refuses_the_run_naming_it(tmp_path, images):
    (tmp_path / "shards").mkdir()
    shard(tmp_path / "shards" / "0.tar", [("a.jpg", images[0])])
    for bad in (b"", b"<html>502 Bad Gateway</html>" * 30, b"\x1f\x8b" + b"gzip" * 300):
        (tmp_path / "shards" / "1.tar").write_bytes(bad)
        with pytest.raises(SourceError, match=r"1\.tar is not a readable tar file .*one unreadable shard refuses"):
            list_source(tmp_path / "shards")
    (tmp_path / "shards" / "1.tar").write_bytes(b"\x00" * 10240)  # an empty archive: nothing to list, nothing lost
    assert list_source(tmp_path / "shards").paths == ["0.tar/a.jpg"]


@pytest.mark.parametrize("pattern, match", [
    ("{0..999999}.tar", "do not exist .*the pattern names 1,000,000"),
    ("{0..1000000}.tar", "names more than 1,000,000 shards"),
    ("{0..999}/{0..9999}.tar", "names more than 1,000,000 shards"),
    ("{0..99999999999999999999999999}.tar", "names more than 1,000,000 shards"),
    ("{00000..00009}-{0..9}.tar", "do not exist .*00000-0.tar; the pattern names 100"),
])
def test_a_pattern_of_many_missing_shards_is_refused_at_once(tmp_path, pattern, match):
    with pytest.raises(SourceError, match=match):
        list_source(str(tmp_path / pattern))


def test_brace_expansion_is_the_product_of_its_ranges():
    assert expand_braces("{1..2}/{08..10}") == ["1/08", "1/09", "1/10", "2/08", "2/09", "2/10"]


def test_a_hostile_shard_embeds_with_each_loss_accounted(tmp_path, images, capsys):
    names = [f"{i}.jpg" for i in range(5)]
    offsets = shard(tmp_path / "s.tar", list(zip(names, images)) + [_info("l.jpg", kind=tarfile.SYMTYPE, link="x")])
    patch(tmp_path / "s.tar", offsets[1], b"\xff" * 512)
    set_size(tmp_path / "s.tar", offsets[3], 1 << 62)
    config = fast_config(tmp_path / "s.tar", tmp_path / "c.h5")
    assert main(["embed", *cli_args(config)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    with FeatureCache(tmp_path / "c.h5") as c:
        assert sorted(c.paths) == ["s.tar/0.jpg", "s.tar/2.jpg", "s.tar/4.jpg"]
        assert [p for p, _ in c.errors] == ["s.tar/3.jpg"] and "member cap" in c.errors[0][1]
