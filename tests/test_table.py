"""Parquet and CSV tables as SOURCE: row and label columns, the other columns as metadata,
bit-identity with the folder, URL columns, and clear refusals."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedder.cache.reader import FeatureCache
from embedder.cli.main import main
from embedder.data.sources import list_source
from embedder.data.table import TableColumns
from embedder.errors import ConfigError, SourceError
from embedder.extract.local import embed
from tests.conftest import cli_args, fast_config, make_tree
from tests.loopback import LoopbackServer


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "imgs", classes=("cat", "dog"), per_class=4)


def _files(tree):
    return sorted(p.relative_to(tree.parent).as_posix() for p in tree.rglob("*.*"))


def _table(tree, **extra):
    files = _files(tree)
    return pa.table({"file": files, "species": [f.split("/")[1] for f in files],
                     "score": [i / 10 for i in range(len(files))], **extra})


def test_parquet_table_equals_the_folder_bit_for_bit_with_labels_and_metadata(tmp_path, tree):
    pq.write_table(_table(tree), tmp_path / "t.parquet")
    embed(fast_config(tree, tmp_path / "folder.h5"))
    embed(fast_config(tmp_path / "t.parquet", tmp_path / "table.h5", path_column="file", label_column="species"))
    with FeatureCache(tmp_path / "folder.h5") as f, FeatureCache(tmp_path / "table.h5") as t:
        assert t.paths == _files(tree)  # the table's order, relative to its folder
        by = {p: i for i, p in enumerate(f.paths)}
        rows = [by[p.split("/", 1)[1]] for p in t.paths]
        assert np.array_equal(t.features(), f.features()[rows])
        assert t.classes == ["cat", "dog"] and np.array_equal(t.labels, f.labels[rows])
        cols = t.columns()
        assert t.column_kinds["score"] == "float64" and np.allclose(cols["score"], np.arange(len(rows)) / 10)
        assert cols["has_metadata"].all() and np.array_equal(cols["size"], f.columns()["size"][rows])
        assert t.spec.layout == "table" and t.spec.source == str((tmp_path / "t.parquet").resolve())


def test_csv_table_integer_labels_are_class_indices_and_reserved_names_are_prefixed(tmp_path, tree):
    files = _files(tree)
    text = "path,cls,width,note\n" + "".join(f"{p},{i % 3},{100 + i},n{i}\n" for i, p in enumerate(files))
    (tmp_path / "t.csv").write_text(text)
    listing = list_source(tmp_path / "t.csv", columns=TableColumns(label="cls"))
    again = list_source(tmp_path / "t.csv", columns=TableColumns(label="cls"))
    assert again.paths == listing.paths and np.array_equal(again.labels, listing.labels)  # deterministic
    assert listing.layout == "table" and listing.classes == ["0", "1", "2"]
    assert list(listing.labels) == [i % 3 for i in range(len(files))]
    assert sorted(listing.table.kinds) == ["note", "source_width"]
    assert list(listing.table.columns["source_width"]) == [100 + i for i in range(len(files))]
    assert any("'width' is stored as 'source_width'" in n for n in listing.table.notes)


def test_a_header_with_url_or_more_than_two_columns_is_a_table_a_plain_list_is_not(tmp_path, tree):
    files = _files(tree)
    (tmp_path / "plain.csv").write_text("path,label\n" + "".join(f"{p},x\n" for p in files))
    (tmp_path / "wide.csv").write_text("path,label,extra\n" + "".join(f"{p},x,1\n" for p in files))
    assert list_source(tmp_path / "plain.csv").layout == "filelist"
    wide = list_source(tmp_path / "wide.csv")
    assert wide.layout == "table" and wide.classes == ["x"] and list(wide.table.kinds) == ["extra"]


def test_empty_and_repeated_rows_are_ignored_by_name_and_the_rest_listed(tmp_path, tree):
    files = _files(tree)
    pq.write_table(pa.table({"path": [files[0], None, files[1], files[0], " "]}), tmp_path / "t.parquet")
    listing = list_source(tmp_path / "t.parquet")
    assert listing.paths == files[:2] and listing.table is None
    assert listing.ignored == [("t.parquet:row 2", "table row without a path"),
                               (files[0], "listed more than once in the table"),
                               ("t.parquet:row 5", "table row without a path")]


def test_url_column_rows_are_fetched_and_equal_the_files(tmp_path, tree):
    files = _files(tree)
    with LoopbackServer(tree.parent) as srv:
        urls = [f"{srv.base}/img/{p}" for p in files]
        pq.write_table(pa.table({"url": urls + ["not-a-url.jpg"], "caption": [f"c{i}" for i in range(len(files) + 1)]}),
                       tmp_path / "t.parquet")
        report = embed(fast_config(tmp_path / "t.parquet", tmp_path / "u.h5", url_column="url"))
    embed(fast_config(tree, tmp_path / "folder.h5"))
    assert report.errors == [] and report.ignored_by_reason == {"not an http(s) URL (--url-column)": 1}
    with FeatureCache(tmp_path / "folder.h5") as f, FeatureCache(tmp_path / "u.h5") as u:
        assert u.paths == urls and list(u.columns()["caption"]) == [f"c{i}" for i in range(len(files))]
        by = {p: i for i, p in enumerate(f.paths)}
        assert np.array_equal(u.features(), f.features()[[by[p.split("/", 1)[1]] for p in files]])


@pytest.mark.parametrize(("columns", "match"), [
    (TableColumns(path="nope"), r"--path-column 'nope': SOURCE .* has no such column \(columns: file, species"),
    (TableColumns(label="nope"), r"--label-column 'nope'"),
    (TableColumns(path="file", url="file"), "not both"),
    (TableColumns(path="file", label="file"), "also the column of rows"),
])
def test_table_column_mistakes_are_refused_naming_the_columns(tmp_path, tree, columns, match):
    pq.write_table(_table(tree), tmp_path / "t.parquet")
    with pytest.raises(SourceError, match=match):
        list_source(tmp_path / "t.parquet", columns=columns)


def test_a_table_without_a_row_column_and_table_options_on_a_folder_are_refused(tmp_path, tree):
    pq.write_table(pa.table({"species": ["a"]}), tmp_path / "t.parquet")
    with pytest.raises(SourceError, match="none of the columns path, url, file, filename, image.*--path-column"):
        list_source(tmp_path / "t.parquet")
    with pytest.raises(SourceError, match="read a .parquet or .csv table, but SOURCE .* is a folder"):
        list_source(tree, columns=TableColumns(path="file"))


def test_table_columns_and_a_metadata_table_merge_and_a_clash_is_refused(tmp_path, tree):
    pq.write_table(_table(tree), tmp_path / "t.parquet")
    files = _files(tree)
    (tmp_path / "m.csv").write_text("path,extra\n" + "".join(f"{p},{i}\n" for i, p in enumerate(files)))
    config = fast_config(tmp_path / "t.parquet", tmp_path / "c.h5", path_column="file", metadata=str(tmp_path / "m.csv"))
    embed(config)
    with FeatureCache(tmp_path / "c.h5") as c:
        assert {"species", "score", "extra"} <= set(c.column_kinds)
        assert list(c.columns()["extra"]) == list(range(len(files)))
    (tmp_path / "m2.csv").write_text("path,score\n" + "".join(f"{p},1\n" for p in files))
    clash = fast_config(tmp_path / "t.parquet", tmp_path / "d.h5", path_column="file", metadata=str(tmp_path / "m2.csv"))
    with pytest.raises(ConfigError, match="column 'score' is also a column of SOURCE"):
        embed(clash)


def test_table_source_through_the_cli_and_search_where(tmp_path, tree, capsys):
    pq.write_table(_table(tree), tmp_path / "t.parquet")
    config = fast_config(tmp_path / "t.parquet", tmp_path / "c.h5", path_column="file", label_column="species")
    assert main(["embed", *cli_args(config)]) == 0
    assert main(["index", str(tmp_path / "c.h5"), "--out", str(tmp_path / "idx")]) == 0
    capsys.readouterr()
    assert main(["search", str(tmp_path / "idx"), "--id", "0", "-k", "3", "--where", "score >= 0.4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    files = _files(tree)
    assert result["query"] == str(tree / "cat" / "cat_000.jpg")  # a table's paths start from its folder
    assert len(result["hits"]) == 3 and all(files.index(h["path"]) >= 4 for h in result["hits"])
