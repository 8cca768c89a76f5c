"""After the run: where a row's image lies (a file list's folder, a tar member, a URL), read back
for thumbnails and result grids, and checked by `index --prune-missing`."""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

from embedder.cli.main import main
from embedder.data.rows import location_exists, read_location, row_location, rows_root
from embedder.errors import BadImageError, ConfigError
from embedder.extract.local import embed
from embedder.learn.config import FinetuneConfig
from embedder.learn.finetune.run import finetune
from embedder.search.build import build_index
from embedder.search.query import SearchIndex
from embedder.search.removal import remove_rows
from embedder.serve.app import create_app
from tests.conftest import fast_config, make_tree
from tests.loopback import LoopbackServer, running
from tests.test_service import http
from tests.test_tar import pack


def test_row_location_of_each_source_kind(tmp_path):
    (tmp_path / "list.txt").write_text("x\n")
    assert rows_root(tmp_path / "list.txt") == tmp_path and rows_root(tmp_path) == tmp_path
    assert row_location(tmp_path / "list.txt", "a/b.jpg") == str(tmp_path / "a/b.jpg")
    assert row_location(tmp_path / "t.parquet", "/abs/c.png") == "/abs/c.png"
    assert row_location(tmp_path / "list.txt", "https://h/x.jpg") == "https://h/x.jpg"
    assert location_exists("https://h/x.jpg") is None and location_exists(str(tmp_path / "nope.jpg")) is False


def test_tar_rows_read_back_from_their_shard_and_a_deleted_shard_is_pruned(tmp_path):
    tree = make_tree(tmp_path / "imgs", classes=("a", "b"), per_class=3)
    where = pack(tree, tmp_path / "shards", per_shard=3)
    embed(fast_config(tmp_path / "shards", tmp_path / "c.h5"))
    build_index(tmp_path / "c.h5", tmp_path / "idx", progress=False)
    index = SearchIndex(tmp_path / "idx")
    for row, path in enumerate(index.paths):
        assert read_location(index.image_path(row)) == where[path].read_bytes()
    with pytest.raises(BadImageError, match="no longer a member"):
        read_location(str(tmp_path / "shards" / "00000.tar" / "gone.jpg"))
    (tmp_path / "shards" / "00001.tar").unlink()
    report = remove_rows(tmp_path / "idx", prune_missing=True, progress=False)
    gone = sorted(p for p in where if p.startswith("00001.tar/"))
    assert report["newly_removed"] == len(gone) == 3 and sorted(report["paths"]) == gone


def test_file_list_rows_start_from_the_lists_folder_in_search_and_thumbnails(tmp_path):
    tree = make_tree(tmp_path / "imgs", classes=("a", "b"), per_class=3)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tree.rglob("*.*"))
    (tmp_path / "list.txt").write_text("\n".join(files) + "\n")
    embed(fast_config(tmp_path / "list.txt", tmp_path / "c.h5"))
    build_index(tmp_path / "c.h5", tmp_path / "idx", progress=False)
    index = SearchIndex(tmp_path / "idx")
    assert [index.image_path(i) for i in range(len(files))] == [str(tmp_path / f) for f in index.paths]
    with running(create_app(tmp_path / "idx")) as (host, port):
        r = http("GET", f"http://{host}:{port}/thumbnail/0")
    assert r.status == 200 and Image.open(io.BytesIO(r.body)).format == "JPEG"
    (tmp_path / files[0]).unlink()
    report = remove_rows(tmp_path / "idx", prune_missing=True, progress=False)
    assert report["paths"] == [files[0]] and report["urls_not_checked"] == 0


def test_url_rows_thumbnails_are_fetched_and_prune_missing_leaves_them(tmp_path, capsys):
    tree = make_tree(tmp_path / "imgs", classes=("a",), per_class=3)
    names = sorted(os.listdir(tree / "a"))
    with LoopbackServer(tree / "a") as srv:
        (tmp_path / "urls.txt").write_text("".join(srv.url("img", n) + "\n" for n in names))
        embed(fast_config(tmp_path / "urls.txt", tmp_path / "c.h5"))
        build_index(tmp_path / "c.h5", tmp_path / "idx", progress=False)
        with running(create_app(tmp_path / "idx")) as (host, port):
            r = http("GET", f"http://{host}:{port}/thumbnail/1")
        assert r.status == 200 and Image.open(io.BytesIO(r.body)).size[0] > 0
        assert srv.hits[f"/img/{names[1]}"] == 2  # embedded once, then fetched for the thumbnail
    assert main(["index", str(tmp_path / "idx"), "--prune-missing", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "0 row(s) removed" in out and "3 URL row(s) not checked" in out


def test_finetune_refuses_url_rows_and_says_how_to_download_them(tmp_path):
    (tmp_path / "urls.csv").write_text("url,label\nhttp://127.0.0.1:9/a.jpg,a\nhttp://127.0.0.1:9/b.jpg,b\n")
    config = FinetuneConfig.of(source=str(tmp_path / "urls.csv"), model="resnet18", out=str(tmp_path / "ft"),
                            weights="none")
    with pytest.raises(ConfigError, match="2 http\\(s\\) URL rows.*--keep-downloads"):
        finetune(config)
    assert not (tmp_path / "ft").exists()
