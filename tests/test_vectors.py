"""export-vectors / import-vectors: files other tools read, and caches built from vectors made elsewhere."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedder.cache.reader import FeatureCache
from embedder.cache.vectors import IMPORTED, export_vectors, import_vectors
from embedder.cli.main import main
from embedder.data.metadata import INT_NULL
from embedder.errors import CacheError, ConfigError
from embedder.extract.local import embed
from embedder.search.build import build_index
from embedder.search.query import SearchIndex
from tests.conftest import fast_config, make_tree
from tests.test_cache import assert_same_columns
from tests.test_index import synthetic_cache


@pytest.fixture
def described(tmp_path):
    """A real cache of images with a --metadata table: nulls in each kind, a row the table lacks."""
    src = make_tree(tmp_path / "src", per_class=5)
    names = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.*"))
    rows = "".join(f"{p},{'' if i == 3 else i / 4},{'' if i == 5 else i},t{i}\n" for i, p in enumerate(names) if i != 7)
    (tmp_path / "m.csv").write_text("path,score,count,tag\n" + rows)
    out = tmp_path / "c.h5"
    embed(fast_config(src, out, metadata=str(tmp_path / "m.csv")))
    return out


def test_parquet_export_is_one_table_pyarrow_and_pandas_read(described, tmp_path):
    report = export_vectors(described, tmp_path / "pq", "parquet", block_rows=4, progress=False)
    file = tmp_path / "pq" / "embeddings.parquet"
    assert report.rows == 15 and report.files == ["embeddings.parquet"]
    assert pq.ParquetFile(file).metadata.num_row_groups == math.ceil(15 / 4)  # written while streaming
    table = pq.read_table(file)
    with FeatureCache(described) as cache:
        X, paths, labels, classes = cache.features(), cache.paths, cache.labels, cache.classes
        cols, kinds = cache.columns(), cache.column_kinds
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), X.shape[1])
    assert np.array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), X)
    assert table.column("id").to_pylist() == list(range(15)) and table.column("path").to_pylist() == paths
    assert table.column("label").to_pylist() == [classes[i] for i in labels]
    for name, kind in kinds.items():
        got = table.column(name).to_pylist()
        want = cols[name].tolist()
        if kind == "float64":
            want = [None if math.isnan(v) else v for v in want]
        elif kind == "int64" and name not in ("size", "width", "height"):
            want = [None if v == INT_NULL else v for v in want]
        assert got == want, name
    assert table.column("score").null_count == 2 and table.column("count").null_count == 2  # row 3/5, and 7
    frame = pd.read_parquet(file)
    assert list(frame["path"]) == paths and np.array_equal(np.stack(frame["embedding"].to_numpy()), X)
    sidecar = json.loads((tmp_path / "pq" / "embedder.json").read_text())
    assert sidecar["rows"] == 15 and sidecar["columns"] == kinds


def test_duckdb_reads_the_parquet_export(described, tmp_path):
    import duckdb

    export_vectors(described, tmp_path / "pq", progress=False)
    file = tmp_path / "pq" / "embeddings.parquet"
    (n,), = duckdb.sql(f"select count(*) from '{file}'").fetchall()
    assert n == 15
    rows = duckdb.sql(f"select id, path, embedding from '{file}' order by id").fetchall()
    with FeatureCache(described) as cache:
        assert [r[1] for r in rows] == cache.paths
        assert np.array_equal(np.array([r[2] for r in rows], dtype=np.float32), cache.features())


def test_npy_export_is_clip_retrievals_layout_and_faiss_finds_each_row_itself(tmp_path):
    import faiss

    X = np.random.default_rng(0).normal(size=(300, 24)).astype(np.float32)
    cache = synthetic_cache(tmp_path / "c.h5", X)
    export_vectors(cache, tmp_path / "npy", "npy", rows_per_file=128, block_rows=50, progress=False, metric="l2")
    parts = sorted((tmp_path / "npy" / "img_emb").glob("*.npy"))
    metas = sorted((tmp_path / "npy" / "metadata").glob("*.parquet"))
    assert [p.name for p in parts] == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy"]
    assert [p.name for p in metas] == ["metadata_0.parquet", "metadata_1.parquet", "metadata_2.parquet"]
    arrays = [np.load(p) for p in parts]
    assert [len(a) for a in arrays] == [128, 128, 44]
    assert np.array_equal(np.concatenate(arrays), X)
    meta = pd.concat([pd.read_parquet(p) for p in metas], ignore_index=True)
    with FeatureCache(cache) as c:
        assert list(meta["path"]) == c.paths
        assert list(meta["image_path"]) == [f"{c.source}/{p}" for p in c.paths]
    index = faiss.IndexFlatL2(24)
    for a in arrays:  # as autofaiss does: the parts one after the other
        index.add(a)
    _, ids = index.search(X, 1)
    assert np.array_equal(ids[:, 0], np.arange(300))


def test_the_npy_export_ranks_by_cosine_under_an_inner_product_tool_as_autofaiss_does(tmp_path):
    # autofaiss does not install beside the pinned pyarrow, so its default index is built the way it
    # builds it: faiss, metric inner product, the img_emb parts added in order. On unnormalised vectors
    # (norms from 0.1 to 10) inner product ranks by length, not by angle: recall@10 against cosine
    # ground truth was 0.016 for clip-retrieval on a default cache (issue 26); unit vectors give 1.0.
    import faiss

    rng = np.random.default_rng(0)
    X = (rng.normal(size=(400, 16)) * rng.uniform(0.1, 10, size=(400, 1))).astype(np.float32)
    cache = synthetic_cache(tmp_path / "c.h5", X)
    export_vectors(cache, tmp_path / "npy", "npy", rows_per_file=150, progress=False)
    side = json.loads((tmp_path / "npy" / "embedder.json").read_text())
    assert (side["metric"], side["normalized"]) == ("cosine", "l2")
    index = faiss.IndexFlat(16, faiss.METRIC_INNER_PRODUCT)
    for part in sorted((tmp_path / "npy" / "img_emb").glob("*.npy")):
        index.add(np.load(part))
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    truth = np.argsort(-(unit @ unit.T), axis=1)[:, :10]
    _, found = index.search(unit, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
    assert recall >= 0.99 and np.array_equal(found[:, 0], np.arange(400))
    export_vectors(cache, tmp_path / "raw", "npy", progress=False, metric="l2")  # as cached: not for inner product
    assert json.loads((tmp_path / "raw" / "embedder.json").read_text())["normalized"] == "as cached"
    assert np.array_equal(np.load(tmp_path / "raw" / "img_emb" / "img_emb_0.npy"), X)


def test_duckdb_array_functions_take_the_parquet_export_with_the_recorded_cast(tmp_path):
    import duckdb

    X = np.random.default_rng(1).normal(size=(20, 8)).astype(np.float32)
    export_vectors(synthetic_cache(tmp_path / "c.h5", X), tmp_path / "pq", progress=False)
    cast = json.loads((tmp_path / "pq" / "embedder.json").read_text())["duckdb_cast"]
    assert cast == "embedding::FLOAT[8]"
    file = tmp_path / "pq" / "embeddings.parquet"
    got = duckdb.sql(f"select a.id, b.id, array_cosine_similarity({cast.replace('embedding', 'a.embedding')}, "
                     f"{cast.replace('embedding', 'b.embedding')}) from '{file}' a, '{file}' b "
                     "order by a.id, b.id").fetchall()
    unit = X.astype(np.float64) / np.linalg.norm(X, axis=1, keepdims=True)
    assert np.allclose(np.array([r[2] for r in got]).reshape(20, 20), unit @ unit.T, atol=1e-5)


def test_export_refuses_an_existing_out_without_overwrite_and_a_failure_leaves_it_whole(described, tmp_path):
    out = tmp_path / "pq"
    export_vectors(described, out, progress=False)
    before = (out / "embeddings.parquet").read_bytes()
    other = tmp_path / "other.h5"  # an export of another cache is replaced only with --overwrite (README: Outputs)
    other.write_bytes(Path(described).read_bytes())
    with pytest.raises(ConfigError, match="--overwrite"):
        export_vectors(other, out, "npy", progress=False)
    with pytest.raises(CacheError, match="no layer"):
        export_vectors(described, out, layer="nope", overwrite=True, progress=False)
    assert (out / "embeddings.parquet").read_bytes() == before and not (out / "img_emb").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) in ([], [".pq.lock"])
    assert main(["export-vectors", str(described), "--out", str(out), "--format", "npy", "--overwrite",
                 "--quiet"]) == 0
    assert (out / "img_emb").is_dir() and not (out / "embeddings.parquet").exists()


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_import_gives_back_the_cache_rows_and_columns_under_an_imported_fingerprint(described, tmp_path, fmt):
    # --metric l2: the npy export writes the vectors as cached (cosine, the default, writes unit vectors)
    export_vectors(described, tmp_path / "out", fmt, rows_per_file=6, block_rows=4, progress=False, metric="l2")
    report = import_vectors([str(tmp_path / "out")], tmp_path / "imported.h5", block_rows=5, progress=False)
    assert report.rows == 15
    with FeatureCache(described) as a, FeatureCache(tmp_path / "imported.h5") as b:
        assert np.array_equal(a.features(), b.features()) and a.paths == b.paths
        assert a.classes == b.classes and np.array_equal(a.labels, b.labels) and a.source == b.source
        assert b.components["model"] == IMPORTED and b.components["weights"].startswith("sha256:")
        assert b.components["exported_fingerprint"] == a.fingerprint
        assert json.loads(b.components["imported_from"]) == [str(tmp_path / "out")]
    assert_same_columns(described, tmp_path / "imported.h5")  # nulls survive the round trip
    # Other inputs, another fingerprint; the same inputs again: the same one.
    import_vectors([str(tmp_path / "out")], tmp_path / "again.h5", progress=False)
    export_vectors(described, tmp_path / "other", fmt, rows_per_file=5, block_rows=3, progress=False, metric="l2")
    import_vectors([str(tmp_path / "other")], tmp_path / "other.h5", progress=False)
    with (FeatureCache(tmp_path / "imported.h5") as a, FeatureCache(tmp_path / "again.h5") as b,
          FeatureCache(tmp_path / "other.h5") as c):
        assert a.fingerprint == b.fingerprint
        assert c.components["weights"] != a.components["weights"]


def test_an_imported_cache_indexes_searches_and_probes_but_refuses_image_queries(described, tmp_path, capsys):
    export_vectors(described, tmp_path / "pq", progress=False)
    assert main(["import-vectors", str(tmp_path / "pq"), "--out", str(tmp_path / "imp.h5"), "--quiet"]) == 0
    build_index(described, tmp_path / "orig_idx", kind="flat", progress=False)
    assert main(["index", str(tmp_path / "imp.h5"), "--out", str(tmp_path / "idx"), "--kind", "flat", "--quiet"]) == 0
    original, imported = SearchIndex.open(tmp_path / "orig_idx"), SearchIndex.open(tmp_path / "idx")
    for a, b in zip(original.search_ids(list(range(15)), k=5), imported.search_ids(list(range(15)), k=5)):
        assert [h.id for h in a] == [h.id for h in b]
    assert set(imported.columns) == set(original.columns)
    with FeatureCache(tmp_path / "imp.h5") as cache:
        path = cache.paths[4]
        np.save(tmp_path / "q.npy", cache.features(slice(4, 5)))
    capsys.readouterr()
    assert main(["search", str(tmp_path / "idx"), "--path", path, "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hits"][0]["id"] == 4
    assert main(["search", str(tmp_path / "idx"), "--vector", str(tmp_path / "q.npy"), "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hits"][0]["id"] == 4
    assert main(["probe", str(tmp_path / "imp.h5"), "--out", str(tmp_path / "probe"), "--json"]) == 0
    assert "val_accuracy" in json.loads(capsys.readouterr().out)
    assert main(["dedup", str(tmp_path / "imp.h5"), "--threshold", "0.999", "--json"]) == 0
    capsys.readouterr()
    image = next((tmp_path / "src").rglob("*.png"))
    assert main(["search", str(tmp_path / "idx"), "--image", str(image)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "import-vectors" in err[0] and "--id" in err[0]
    # Nor can a probe of imported vectors become an image classifier: no backbone to put it on.
    assert main(["export", str(tmp_path / "probe"), "--out", str(tmp_path / "m.pt")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "import-vectors" in err[0] and "evaluate" in err[0]


def test_clip_retrievals_own_output_imports_with_its_image_paths(tmp_path):
    X = np.random.default_rng(1).normal(size=(12, 8)).astype(np.float16)
    (tmp_path / "cr" / "img_emb").mkdir(parents=True)
    (tmp_path / "cr" / "metadata").mkdir()
    for k, (a, b) in enumerate([(0, 7), (7, 12)]):
        np.save(tmp_path / "cr" / "img_emb" / f"img_emb_{k}.npy", X[a:b])
        pd.DataFrame({"image_path": [f"/photos/p{i:02d}.jpg" for i in range(a, b)],
                      "caption": [f"caption {i}" for i in range(a, b)]}).to_parquet(
            tmp_path / "cr" / "metadata" / f"metadata_{k}.parquet")
    import_vectors([str(tmp_path / "cr")], tmp_path / "c.h5", source="/photos", progress=False)
    with FeatureCache(tmp_path / "c.h5") as c:
        assert c.paths == [f"/photos/p{i:02d}.jpg" for i in range(12)] and (c.labels == -1).all()
        assert np.array_equal(c.features(), X.astype(np.float32))
        assert c.columns(["caption"])["caption"].tolist() == [f"caption {i}" for i in range(12)]
        assert (c.columns(["width"])["width"] == -1).all()  # built-ins nobody measured: nulls


def test_import_refuses_mismatched_parts_missing_metadata_and_an_existing_out(tmp_path):
    (tmp_path / "cr" / "img_emb").mkdir(parents=True)
    np.save(tmp_path / "cr" / "img_emb" / "img_emb_0.npy", np.zeros((3, 4), np.float32))
    with pytest.raises(ConfigError, match="no metadata part"):
        import_vectors([str(tmp_path / "cr")], tmp_path / "c.h5", progress=False)
    (tmp_path / "cr" / "metadata").mkdir()
    pd.DataFrame({"image_path": ["a.jpg", "b.jpg"]}).to_parquet(tmp_path / "cr" / "metadata" / "metadata_0.parquet")
    with pytest.raises(ConfigError, match="2 rows for the 3 vectors"):
        import_vectors([str(tmp_path / "cr")], tmp_path / "c.h5", progress=False)
    pd.DataFrame({"image_path": ["a.jpg", "b.jpg", "c.jpg"]}).to_parquet(
        tmp_path / "cr" / "metadata" / "metadata_0.parquet")
    import_vectors([str(tmp_path / "cr")], tmp_path / "c.h5", progress=False)
    pd.DataFrame({"image_path": ["a.jpg", "b.jpg", "d.jpg"]}).to_parquet(
        tmp_path / "cr" / "metadata" / "metadata_0.parquet")
    with pytest.raises(CacheError, match="--overwrite"):
        import_vectors([str(tmp_path / "cr")], tmp_path / "c.h5", progress=False)
    import_vectors([str(tmp_path / "cr")], tmp_path / "c.h5", overwrite=True, progress=False)
    with FeatureCache(tmp_path / "c.h5") as c:
        assert c.paths == ["a.jpg", "b.jpg", "d.jpg"]


def test_a_name_that_is_not_utf8_is_exported_with_escapes(tmp_path):
    from embedder.cache.reader import CacheSpec
    from embedder.cache.writer import CacheWriter
    from embedder.data.sources import Listing

    paths = ["caf\udce9.png", "plain.png"]  # Latin-1 bytes, as embedder.names reads them
    listing = Listing(tmp_path, paths, np.full(2, -1, np.int64), [], "flat")
    with CacheWriter(tmp_path / "c.h5", CacheSpec({"model": "synthetic"}, str(tmp_path), 4, layout="flat"),
                     listing) as w:
        w.add(np.arange(2), np.eye(2, 4, dtype=np.float32), [])
        w.finish()
    for fmt in ("parquet", "npy"):
        export_vectors(tmp_path / "c.h5", tmp_path / fmt, fmt, progress=False)
    assert pq.read_table(tmp_path / "parquet" / "embeddings.parquet")["path"].to_pylist() == ["caf\\xe9.png",
                                                                                               "plain.png"]
    assert pq.read_table(tmp_path / "npy" / "metadata" / "metadata_0.parquet")["path"].to_pylist()[0] == "caf\\xe9.png"


@pytest.mark.slow
def test_an_import_killed_mid_run_resumes_to_the_same_cache(tmp_path):
    import signal
    import subprocess

    from tests.conftest import embedder_cmd, env_with_repo
    from tests.test_cache import _wait_for_parts, assert_same_cache

    X = np.random.default_rng(3).normal(size=(60_000, 64)).astype(np.float32)
    export_vectors(synthetic_cache(tmp_path / "c.h5", X), tmp_path / "pq", progress=False)
    import_vectors([str(tmp_path / "pq")], tmp_path / "reference.h5", block_rows=500, progress=False)
    args = ["import-vectors", str(tmp_path / "pq"), "--out", str(tmp_path / "killed.h5"), "--block-rows", "500",
            "--quiet"]
    proc = subprocess.Popen(embedder_cmd(*args), env=env_with_repo(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for_parts(tmp_path / "killed.h5.partial", 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with FeatureCache(tmp_path / "killed.h5", require_complete=False) as partial:
        assert not partial.complete and 0 < len(partial) < 60_000
    assert main(args) == 0  # the rerun resumes after the committed parts
    assert_same_cache(tmp_path / "reference.h5", tmp_path / "killed.h5")
    with FeatureCache(tmp_path / "reference.h5") as a, FeatureCache(tmp_path / "killed.h5") as b:
        assert a.fingerprint == b.fingerprint
