"""Hostile tables and file lists as SOURCE (issue 25): encodings, bad cells, labels that are not labels,
two spellings of one file, column names that collide. Each row ends as a row or an ignored entry with
its reason, or the table is refused in one line; never a bogus row, a spoiled column or exit 70."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedder.cache.reader import FeatureCache
from embedder.cli.main import main
from embedder.data.sources import DENSE_CLASS_LIMIT, list_source
from embedder.data.table import NOT_UTF8, NUL_PATH, TableColumns
from embedder.errors import ConfigError, SourceError
from tests.conftest import cli_args, fast_config, make_tree

BOM = b"\xef\xbb\xbf"


@pytest.fixture
def files(tmp_path):
    tree = make_tree(tmp_path / "imgs", classes=("cat", "dog"), per_class=2)
    return sorted(p.relative_to(tmp_path).as_posix() for p in tree.rglob("*.*"))


def write(path, text: str, prefix: bytes = b"", encoding="utf-8"):
    path.write_bytes(prefix + text.encode(encoding))
    return path


@pytest.mark.parametrize("name, header, sep", [("t.csv", "path,label,note", ","), ("t.tsv", "path\tlabel\tnote", "\t"),
                                                ("l.csv", "path,label", ","), ("l.txt", "path,label", ",")])
def test_a_utf8_bom_is_not_part_of_the_first_column(tmp_path, files, name, header, sep):
    cols = header.count(sep) + 1
    body = "".join(sep.join([f, f.split("/")[1], "n"][:cols]) + "\r\n" for f in files)  # Excel: CRLF too
    listing = list_source(write(tmp_path / name, header + "\r\n" + body, BOM))
    assert listing.paths == files and listing.classes == ["cat", "dog"]
    assert listing.ignored == []


def test_utf16_text_is_refused_in_one_line(tmp_path, files):
    write(tmp_path / "t.csv", "path,label,note\n" + "".join(f"{f},x,y\n" for f in files), b"\xff\xfe", "utf-16-le")
    with pytest.raises(SourceError, match="is UTF-16 text: save it as UTF-8"):
        list_source(tmp_path / "t.csv", columns=TableColumns(path="path"))


@pytest.mark.parametrize("column", [0, 1, 2])
def test_a_cell_that_is_not_utf8_refuses_its_row_not_its_column(tmp_path, files, column):
    rows = [[f, f.split("/")[1], f"note {i}"] for i, f in enumerate(files)]
    raw = b"path,label,note\n" + b"".join(
        b",".join(c.encode() if not (i == 1 and j == column) else c.encode() + b"\xff\xfe" for j, c in enumerate(r))
        + b"\n" for i, r in enumerate(rows))
    (tmp_path / "t.csv").write_bytes(raw)
    listing = list_source(tmp_path / "t.csv")
    assert listing.paths == [f for i, f in enumerate(files) if i != 1]  # text, not b'...' reprs
    assert listing.classes == ["cat", "dog"]
    reason = f"{NOT_UTF8} in column {['path', 'label', 'note'][column]!r} (byte {len(rows[1][column].encode())})"
    assert listing.ignored == [("t.csv:row 2", reason)]
    assert list(listing.table.columns["note"]) == [r[2] for i, r in enumerate(rows) if i != 1]


def test_a_latin1_table_refuses_each_bad_row_by_name(tmp_path, files):
    names = ["café.png", "plain.png", "naïve.png"]
    for n in names:
        (tmp_path / n).write_bytes((tmp_path / files[0]).read_bytes())
    write(tmp_path / "t.csv", "path,label,note\n" + "".join(f"{n},x,y\n" for n in names), encoding="latin-1")
    listing = list_source(tmp_path / "t.csv")
    assert listing.paths == ["plain.png"] and [p for p, _ in listing.ignored] == ["t.csv:row 1", "t.csv:row 3"]


def test_a_file_list_line_that_is_not_utf8_is_ignored_by_number(tmp_path, files):
    (tmp_path / "l.txt").write_bytes(b"\n".join([files[0].encode(), b"bad\xff.png", files[1].encode()]) + b"\n")
    listing = list_source(tmp_path / "l.txt")
    assert listing.paths == files[:2] and listing.ignored == [("l.txt:line 2", NOT_UTF8)]


def test_a_binary_file_list_is_refused_in_one_line(tmp_path):
    (tmp_path / "l.txt").write_bytes(b"x" * 200_000 + b"\n")  # over csv's field limit
    with pytest.raises(SourceError, match="is not a text file list"):
        list_source(tmp_path / "l.txt")


def test_a_path_with_a_nul_byte_is_ignored_by_its_line(tmp_path, files):
    (tmp_path / "l.txt").write_bytes(b"a.png\x00b.png\n" + files[0].encode() + b"\n")
    listing = list_source(tmp_path / "l.txt")
    assert listing.paths == files[:1] and listing.ignored == [("l.txt:line 1", NUL_PATH)]
    pq.write_table(pa.table({"path": ["a\0.png", files[0]], "x": [1, 2]}), tmp_path / "t.parquet")
    listing = list_source(tmp_path / "t.parquet")
    assert listing.paths == files[:1] and listing.ignored == [("t.parquet:row 1", NUL_PATH)]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_nan_or_infinite_label_is_refused_naming_its_row(tmp_path, files, bad):
    pq.write_table(pa.table({"path": files, "label": [1.0, bad, 2.0, 0.0][: len(files)]}), tmp_path / "t.parquet")
    with pytest.raises(SourceError, match=r"t\.parquet: the label of row 2 is (nan|inf|-inf), neither"):
        list_source(tmp_path / "t.parquet")


def test_csv_null_markers_in_a_numeric_label_column_are_unlabelled_rows(tmp_path, files):
    write(tmp_path / "t.csv", "path,label,note\n" + "".join(f"{f},{v},n\n" for f, v in zip(files, ["1", "NaN", "", "2"])))
    listing = list_source(tmp_path / "t.csv")
    assert [listing.classes[i] if i >= 0 else None for i in listing.labels] == ["1", None, None, "2"]


@pytest.mark.parametrize("values, classes", [
    ([0, 3, 1, 3], ["0", "1", "2", "3"]),  # small indices are kept: classes 0..max
    ([DENSE_CLASS_LIMIT, 5, 5, 7], ["5", "7", str(DENSE_CLASS_LIMIT)]),
    ([2_000_000_000, 1, 10**7, 1], ["1", "10000000", "2000000000"]),
    ([2**63 - 1, 0, 0, 0], ["0", str(2**63 - 1)]),
    ([-1, 1, 2, 3], ["-1", "1", "2", "3"]),  # a negative index: the values are names
])
def test_a_huge_class_index_is_a_label_never_a_size(tmp_path, files, values, classes):
    pq.write_table(pa.table({"path": files, "label": values}), tmp_path / "t.parquet")
    listing = list_source(tmp_path / "t.parquet")
    assert listing.classes == classes
    assert [listing.classes[i] for i in listing.labels] == [str(v) for v in values]


@pytest.mark.parametrize("kind", ["table", "list"])
def test_two_spellings_of_one_file_are_one_row(tmp_path, files, kind):
    a, b = files[0], files[1]
    folder, name = a.rsplit("/", 1)
    spellings = [a, f"{folder}/../{folder.rsplit('/', 1)[1]}/{name}", f"./{a}", f"{folder}//{name}", str(tmp_path / a), f"{folder}/x/../{name}", b]
    if kind == "table":
        write(tmp_path / "t.csv", "path,label,note\n" + "".join(f"{p},x,n\n" for p in spellings))
        listing = list_source(tmp_path / "t.csv")
    else:
        write(tmp_path / "l.txt", "".join(p + "\n" for p in spellings))
        listing = list_source(tmp_path / "l.txt")
    assert listing.paths == [a, b]
    assert [p for p, _ in listing.ignored] == [a] * 5 and len({r for _, r in listing.ignored}) == 1


@pytest.mark.parametrize("columns, stored", [
    (["id", "source_id"], ["source_source_id", "source_id"]),
    (["width", "source_width", "source_source_width"], ["source_source_source_width", "source_width",
                                                          "source_source_width"]),
    (["source_id", "id"], ["source_id", "source_source_id"]),
    (["size", "mtime", "split"], ["source_size", "source_mtime", "source_split"]),
])
def test_metadata_names_that_collide_after_the_prefix_are_renamed_apart(tmp_path, files, columns, stored):
    pq.write_table(pa.table({"path": files, **{c: [f"{c}{i}" for i in range(len(files))] for c in columns}}),
                   tmp_path / "t.parquet")
    listing = list_source(tmp_path / "t.parquet")
    assert sorted(listing.table.kinds) == sorted(stored)
    for c, s in zip(columns, stored):
        assert list(listing.table.columns[s]) == [f"{c}{i}" for i in range(len(files))]


@pytest.mark.parametrize("header, error", [("path,label,a/b", ConfigError), ("path,label,", ConfigError),
                                           ("path,label,path", SourceError)])
def test_column_names_that_cannot_be_stored_are_refused_in_one_line(tmp_path, files, header, error):
    write(tmp_path / "t.csv", header + "\n" + "".join(f"{f},x,y\n" for f in files))
    with pytest.raises(error):
        list_source(tmp_path / "t.csv", columns=TableColumns(path="path"))


def test_a_hostile_table_embeds_through_the_cli(tmp_path, files, capsys):
    raw = BOM + b"path,label,id,source_id\n" + b"".join(
        f.encode() + (b"\xff" if i == 2 else b"") + f",{i * 10**9},i{i},s{i}\n".encode() for i, f in enumerate(files))
    (tmp_path / "t.csv").write_bytes(raw)
    config = fast_config(tmp_path / "t.csv", tmp_path / "c.h5")
    assert main(["embed", *cli_args(config)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    with FeatureCache(tmp_path / "c.h5") as c:
        assert c.paths == [f for i, f in enumerate(files) if i != 2]
        cols = c.columns()
        assert list(cols["source_id"]) == ["s0", "s1", "s3"] and list(cols["source_source_id"]) == ["i0", "i1", "i3"]
