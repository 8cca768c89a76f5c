"""Metadata columns: the built-in ones measured from the files, --metadata tables joined by path,
their kinds and nulls, and /columns carried through append, old caches, merge, the index and queries."""

from __future__ import annotations

import json
import os
import shutil

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from embedder.cache.reader import FeatureCache
from embedder.cache.vectors import export_vectors
from embedder.cli.main import main
from embedder.data.metadata import INT_NULL, read_table
from embedder.data.sources import Listing
from embedder.errors import CacheError, ConfigError, EmbedderNotice
from embedder.extract.core import load_metadata
from embedder.extract.local import embed
from embedder.search.build import build_index
from embedder.search.query import SearchIndex
from tests.conftest import REPO, fast_config, make_tree, write_image
from tests.test_cache import assert_same_cache


def rel_paths(src):
    return sorted(p.relative_to(src).as_posix() for p in src.rglob("*.*"))


def test_builtin_columns_are_each_files_own_stat_and_shown_size(tmp_path):
    src = make_tree(tmp_path / "src", per_class=4)
    # A phone photo stored sideways: its width and height are those shown (EXIF orientation applied).
    rotated = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(src / "cat" / "rotated.jpg", exif=exif)
    out = tmp_path / "c.h5"
    embed(fast_config(src, out))
    with FeatureCache(out) as cache:
        assert set(cache.column_names) == {"size", "mtime", "width", "height", "split"}
        assert cache.column_kinds == {"size": "int64", "mtime": "float64", "width": "int64", "height": "int64",
                                      "split": "str"}
        cols, paths = cache.columns(), cache.paths
    for i, path in enumerate(paths):
        st = os.stat(src / path)
        with Image.open(src / path) as img:
            shown = ImageOps.exif_transpose(img).size
        assert cols["size"][i] == st.st_size and cols["mtime"][i] == st.st_mtime, path
        assert (cols["width"][i], cols["height"][i]) == shown, path
        assert cols["split"][i] == ""
    assert (cols["width"][paths.index("cat/rotated.jpg")], cols["height"][paths.index("cat/rotated.jpg")]) == (30, 50)
    # --jpeg-draft decodes JPEGs smaller: the columns still hold the images' own sizes.
    embed(fast_config(src, tmp_path / "draft.h5", jpeg_draft=True, image_size=16))
    with FeatureCache(tmp_path / "draft.h5") as draft:
        assert np.array_equal(draft.columns(["width"])["width"], cols["width"])
        assert np.array_equal(draft.columns(["height"], rows=slice(2, 9))["height"], cols["height"][2:9])


def test_a_split_tree_fills_split_with_each_rows_split_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("ant", "bee"):
            for i in range(2):
                write_image(tmp_path / "src" / split / c / f"{c}{i}.png", rng)
    embed(fast_config(tmp_path / "src", tmp_path / "c.h5"))
    with FeatureCache(tmp_path / "c.h5") as cache:
        assert cache.attrs["layout"] == "split-imagefolder"
        assert cache.columns(["split"])["split"].tolist() == [p.split("/")[0] for p in cache.paths]


def _csv_table(path, rows):
    path.write_text("path,score,count,tag,flag,maybe\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def test_a_csv_table_is_joined_by_path_with_kinds_and_nulls(tmp_path):
    src = make_tree(tmp_path / "src", per_class=3)
    names = rel_paths(src)
    # every other file described; one cell of `count` and of `maybe` empty; two paths not in SOURCE
    rows = {p: (i * 0.25, "" if i == 2 else i, f"t{i}", "true" if i % 3 else "false", "" if i == 4 else "true")
            for i, p in enumerate(names) if i % 2 == 0}
    table = _csv_table(tmp_path / "m.csv", [(p, *v) for p, v in rows.items()] +
                       [("gone/a.jpg", 1, 1, "x", "true", "true"), ("gone/b.jpg", 1, 1, "x", "true", "true")])
    with pytest.warns(EmbedderNotice, match="'maybe' is bool with empty cells: stored as str"):
        report = embed(fast_config(src, tmp_path / "c.h5", metadata=str(table)))
    assert report.metadata_unlisted == 2 and report.metadata_unlisted_examples == ["gone/a.jpg", "gone/b.jpg"]
    assert "2 paths of the table are not in SOURCE" in report.summary()
    assert any("maybe" in n and "str" in n for n in report.notes)  # bool with an empty cell: stored as str
    with FeatureCache(tmp_path / "c.h5") as cache:
        kinds = cache.column_kinds
        cols, paths = cache.columns(), cache.paths
    assert {k: kinds[k] for k in ("score", "count", "tag", "flag", "maybe", "has_metadata")} == {
        "score": "float64", "count": "int64", "tag": "str", "flag": "bool", "maybe": "str", "has_metadata": "bool"}
    for i, path in enumerate(paths):  # the reference: the dict the table was written from
        if path not in rows:
            assert not cols["has_metadata"][i] and np.isnan(cols["score"][i]) and cols["count"][i] == INT_NULL
            assert cols["tag"][i] == "" and cols["flag"][i] == False and cols["maybe"][i] == ""
            continue
        score, count, tag, flag, maybe = rows[path]
        assert cols["has_metadata"][i] and cols["score"][i] == score and cols["tag"][i] == tag
        assert cols["count"][i] == (INT_NULL if count == "" else count)
        assert cols["flag"][i] == (flag == "true") and cols["maybe"][i] == maybe


def test_a_parquet_table_keeps_its_types_and_casts_the_others_with_a_note(tmp_path):
    src = make_tree(tmp_path / "src", classes=("a", "b"), per_class=3)
    names = rel_paths(src)
    n = len(names)
    table = pa.table({
        "path": names,
        "small": pa.array(range(n), pa.int32()),
        "ratio": pa.array([i / 7 for i in range(n)], pa.float32()),
        "when": pa.array([1_700_000_000 + 86400 * i for i in range(n)], pa.timestamp("s")),
        "ok": [i % 2 == 0 for i in range(n)],
        "note": [None if i == 1 else f"n{i}" for i in range(n)],
    })
    pq.write_table(table, tmp_path / "m.parquet")
    meta = read_table(tmp_path / "m.parquet")
    assert meta.kinds == {"small": "int64", "ratio": "float64", "when": "str", "ok": "bool", "note": "str"}
    assert len(meta.notes) == 3 and all(any(c in n for n in meta.notes) for c in ("small", "ratio", "when"))
    with pytest.warns(EmbedderNotice, match="is timestamp"):  # each cast is one notice before the run
        report = embed(fast_config(src, tmp_path / "c.h5", metadata=str(tmp_path / "m.parquet")))
    assert report.metadata_unlisted == 0
    with FeatureCache(tmp_path / "c.h5") as cache:
        order = [names.index(p) for p in cache.paths]
        cols = cache.columns(["small", "ratio", "when", "ok", "note"])
    assert cols["small"].tolist() == order and cols["small"].dtype == np.int64
    assert np.array_equal(cols["ratio"], np.array([i / 7 for i in order], np.float32).astype(np.float64))
    # pyarrow's own ISO text of the timestamps as the file holds them (Parquet keeps milliseconds)
    when = pa.compute.cast(pq.read_table(tmp_path / "m.parquet")["when"], pa.string()).to_pylist()
    assert when[0].startswith("2023-11-14 22:13:20")
    assert cols["when"].tolist() == [when[i] for i in order]
    assert cols["ok"].tolist() == [i % 2 == 0 for i in order]
    assert cols["note"].tolist() == ["" if i == 1 else f"n{i}" for i in order]


@pytest.mark.parametrize(("header", "match"), [
    ("path,label", "reserved"), ("path,id", "reserved"), ("path,width", "built-in"),
    ("path,has_metadata", "built-in"), ("file,score", "no `path` column"),
])
def test_reserved_and_builtin_names_and_tables_without_paths_are_refused(tmp_path, header, match):
    table = tmp_path / "m.csv"
    table.write_text(f"{header}\ncat/a.jpg,1\n")
    with pytest.raises(ConfigError, match=match):
        read_table(table)


def test_a_bad_table_is_one_line_from_the_cli(tree, tmp_path, capsys):
    (tmp_path / "m.csv").write_text("path,score\ncat/cat_000.jpg,1\ncat/cat_000.jpg,2\n")
    args = ["embed", str(tree), "--model", "resnet18", "--weights", "none", "--image-size", "32", "--device", "cpu",
            "--out", str(tmp_path / "c.h5"), "--metadata", str(tmp_path / "m.csv"), "--quiet"]
    assert main(args) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "listed twice" in err[0]
    assert main(args[:-3] + ["--metadata", str(tmp_path / "m.json")]) != 0
    assert ".csv or .parquet" in capsys.readouterr().err


def test_append_adds_the_new_rows_columns_and_refuses_other_metadata(tmp_path):
    src = make_tree(tmp_path / "src", per_class=4)
    names = rel_paths(src)
    table = _csv_table(tmp_path / "m.csv", [(p, i / 2, i, f"t{i}", "true", "false") for i, p in enumerate(names)])
    embed(fast_config(src, tmp_path / "grown.h5", metadata=str(table), limit=8))  # whole batches: the same features
    report = embed(fast_config(src, tmp_path / "grown.h5", metadata=str(table)))
    assert report.already_cached == 8 and report.embedded == len(names) - 8
    embed(fast_config(src, tmp_path / "once.h5", metadata=str(table)))
    assert_same_cache(tmp_path / "grown.h5", tmp_path / "once.h5")  # /columns included

    write_image(src / "cat" / "new.png", np.random.default_rng(5))
    other = tmp_path / "other.csv"
    other.write_text("path,colour\ncat/new.png,red\n")
    with pytest.raises(CacheError, match="only in the cache: .*count.*only in this run: colour") as err:
        embed(fast_config(src, tmp_path / "grown.h5", metadata=str(other)))
    assert "--overwrite" in str(err.value)
    with pytest.raises(CacheError, match="only in the cache"):  # no --metadata at all: refused too
        embed(fast_config(src, tmp_path / "grown.h5"))


def test_a_cache_from_before_columns_reads_as_none_and_an_append_gives_its_rows_nulls(tmp_path):
    src = shutil.copytree(REPO / "tests" / "fixtures" / "legacy" / "src", tmp_path / "src")
    cache = shutil.copy(REPO / "tests" / "fixtures" / "legacy" / "single.h5", tmp_path / "single.h5")
    with h5py.File(cache, "r+") as f:
        f.attrs["source"] = str(src.resolve())
    with FeatureCache(cache) as old:
        assert old.column_names == [] and old.columns() == {} and old.spec.columns == {}
        with pytest.raises(CacheError, match="no column 'size'.*re-embed"):
            old.columns(["size"])
    export_vectors(cache, tmp_path / "pq", progress=False)  # no columns to export: path, label, embedding
    assert pq.read_table(tmp_path / "pq" / "embeddings.parquet").column_names == ["id", "path", "label", "embedding"]
    build_index(cache, tmp_path / "idx", kind="flat", progress=False)
    index = SearchIndex.open(tmp_path / "idx")
    assert index.columns == {} and "metadata" not in index.search_ids([0], k=2)[0][0].as_dict()

    write_image(src / "bee" / "bee9.png", np.random.default_rng(2), size=(21, 33))
    report = embed(fast_config(src, cache))
    assert report.embedded == 1 and report.total_rows == 7
    with FeatureCache(cache) as grown:
        cols, paths = grown.columns(), grown.paths
    new = paths.index("bee/bee9.png")
    assert (cols["width"][new], cols["height"][new], cols["size"][new]) == (21, 33, os.stat(src / "bee/bee9.png").st_size)
    old_rows = [i for i in range(7) if i != new]
    assert (cols["width"][old_rows] == -1).all() and (cols["size"][old_rows] == -1).all()
    assert np.isnan(cols["mtime"][old_rows]).all() and set(cols["split"].tolist()) == {""}


def test_merge_of_a_sharded_cache_carries_the_columns(tmp_path):
    from tests.test_shards import embed_sharded

    src = make_tree(tmp_path / "src", per_class=5)
    table = _csv_table(tmp_path / "m.csv", [(p, i, i, f"t{i}", "true", "")
                                            for i, p in enumerate(rel_paths(src)) if i % 3])
    local = fast_config(src, tmp_path / "local.h5", metadata=str(table))
    embed(local)
    sharded = fast_config(src, tmp_path / "sharded.h5", metadata=str(table))
    shard_set, (_, complete) = embed_sharded(sharded, shard_size=4)
    assert complete and len(shard_set.shards) == 4
    assert_same_cache(local.out, sharded.out)  # the view maps every shard's /columns
    assert main(["merge", str(sharded.out), "--out", str(tmp_path / "merged.h5")]) == 0
    assert_same_cache(local.out, tmp_path / "merged.h5")
    with h5py.File(tmp_path / "merged.h5", "r") as f:
        assert not f["columns/tag"].is_virtual and "has_metadata" in f["columns"]


def test_the_index_copies_the_columns_and_hits_carry_them(tmp_path, capsys):
    src = make_tree(tmp_path / "src", per_class=4)
    names = rel_paths(src)
    table = _csv_table(tmp_path / "m.csv", [(p, i / 4, i, f"t{i}", "true", "true") for i, p in enumerate(names)
                                            if i != 3])
    embed(fast_config(src, tmp_path / "c.h5", metadata=str(table)))
    assert main(["index", str(tmp_path / "c.h5"), "--out", str(tmp_path / "idx"), "--kind", "flat", "--quiet"]) == 0
    with FeatureCache(tmp_path / "c.h5") as cache:
        expected = cache.columns()
        kinds = cache.column_kinds
    with h5py.File(tmp_path / "idx" / "rows.h5", "r") as f:
        assert set(f["columns"]) == set(kinds)
    index = SearchIndex.open(tmp_path / "idx")
    assert set(index.columns) == set(kinds)
    for name, values in expected.items():
        assert np.array_equal(index.columns[name], values) if kinds[name] != "float64" else np.array_equal(
            index.columns[name], values, equal_nan=True), name
    capsys.readouterr()
    assert main(["search", str(tmp_path / "idx"), "--id", "2", "-k", "12", "--json"]) == 0  # every row
    hits = json.loads(capsys.readouterr().out.splitlines()[0])["hits"]
    assert len(hits) == 12
    for hit in hits:
        i = hit["id"]
        meta = hit["metadata"]
        assert meta["tag"] == expected["tag"][i] and meta["width"] == int(expected["width"][i])
        score, count = expected["score"][i], expected["count"][i]
        assert meta["score"] is None if np.isnan(score) else meta["score"] == score
        assert meta["count"] is None if count == INT_NULL else meta["count"] == count
    # --exclude-examples ranks the hits again without the example: each keeps its columns.
    assert main(["search", str(tmp_path / "idx"), "--id", "2", "-k", "11", "--exclude-examples", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out.splitlines()[0])["hits"]
    assert len(hits) == 11 and 2 not in [h["id"] for h in hits] and [h["rank"] for h in hits] == list(range(1, 12))
    assert all(h["metadata"]["tag"] == expected["tag"][h["id"]] for h in hits)


def test_info_lists_the_columns_with_their_kinds(tmp_path, capsys):
    src = make_tree(tmp_path / "src", classes=("a", "b"), per_class=2)
    (tmp_path / "m.csv").write_text("path,score\na/a_000.jpg,0.5\n")
    embed(fast_config(src, tmp_path / "c.h5", metadata=str(tmp_path / "m.csv")))
    assert main(["info", str(tmp_path / "c.h5")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("columns"))
    for part in ("size (int64)", "mtime (float64)", "split (str)", "score (float64)", "has_metadata (bool)"):
        assert part in line
    assert main(["info", str(tmp_path / "c.h5"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["columns"]["score"] == "float64"


def test_load_metadata_follows_the_config(tmp_path):
    (tmp_path / "m.csv").write_text("path,x\na.png,1\n")
    listing = Listing(tmp_path, ["a.png"], np.full(1, -1), [], "flat")
    assert load_metadata(fast_config(tmp_path, tmp_path / "c.h5"), listing) is None
    assert load_metadata(fast_config(tmp_path, tmp_path / "c.h5", metadata=str(tmp_path / "m.csv")), listing).kinds == {
        "x": "int64"}
