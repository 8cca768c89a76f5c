"""Vectors from outside (`import-vectors`, `search --vector`): an adversarial corpus of arrays and
tables. Each bad input is refused in one line that names the file and its first bad row (exit 2),
and a refused import leaves nothing behind: no CACHE.h5, no CACHE.h5.partial, an old cache whole."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedder.cache.reader import FeatureCache
from embedder.cli.main import main
from embedder.search.build import build_index
from tests.test_index import synthetic_cache

N, D = 8, 4


def good(n=N, d=D) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)


def with_value(dtype, row: int, value) -> np.ndarray:
    x = good().astype(dtype)
    x[row, 1] = value
    return x


# ---- clip-retrieval's layout: img_emb/img_emb_0.npy + metadata/metadata_0.parquet


def npy_input(tmp, array, rows: int | None = None, allow_pickle: bool = False) -> tuple[str, str]:
    (tmp / "in" / "img_emb").mkdir(parents=True)
    (tmp / "in" / "metadata").mkdir()
    npy = tmp / "in" / "img_emb" / "img_emb_0.npy"
    if isinstance(array, bytes):
        npy.write_bytes(array)
    else:
        np.save(npy, array, allow_pickle=allow_pickle)
    rows = len(array) if rows is None else rows
    pq.write_table(pa.table({"image_path": [f"p{i}.jpg" for i in range(rows)]}),
                   tmp / "in" / "metadata" / "metadata_0.parquet")
    return str(tmp / "in"), "img_emb_0.npy"


def truncated_npy() -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, good())
    return buf.getvalue()[:-10]


def ragged_objects() -> np.ndarray:
    array = np.empty(N, dtype=object)
    for i in range(N):
        array[i] = [0.5] * (D if i != 3 else D + 1)
    return array


NPY_CASES = {
    "nan": (lambda: with_value(np.float32, 3, np.nan), "row 3 holds nan"),
    "inf": (lambda: with_value(np.float32, 5, np.inf), "row 5 holds inf"),
    "-inf": (lambda: with_value(np.float64, 0, -np.inf), "row 0 holds -inf"),
    "float64 over float32": (lambda: with_value(np.float64, 2, 1e39), "row 2 holds 1e+39 in column 1, beyond float32"),
    "float64 far under": (lambda: with_value(np.float64, 7, -1e300), "row 7 holds -1e+300"),
    "float16 inf": (lambda: with_value(np.float16, 6, np.inf), "row 6 holds inf"),
    "longdouble over float32": (lambda: with_value(np.longdouble, 4, 1e40), "row 4 holds 1e+40"),
    "complex": (lambda: good().astype(np.complex64) + 1j, "complex"),
    "object": (lambda: (ragged_objects(), True), "Python object"),
    "strings": (lambda: good().astype(str), "string"),
    "bytes": (lambda: good().astype("S8"), "bytes"),
    "bool": (lambda: good() > 0, "bool"),
    "datetime": (lambda: np.zeros((N, D), "datetime64[s]"), "datetime"),
    "structured": (lambda: np.zeros((N, D), [("a", "f4"), ("b", "f4")]), "structured"),
    "one dimension": (lambda: good()[:, 0], "shape (8,)"),
    "three dimensions": (lambda: good()[:, :, None], "shape (8, 4, 1)"),
    "zero width": (lambda: np.zeros((N, 0), np.float32), "shape (8, 0)"),
    "not npy": (lambda: b"\x89PNG\r\n\x1a\n" + bytes(200), "not a readable .npy"),
    "truncated": (lambda: truncated_npy(), "not a readable .npy"),
}


@pytest.mark.parametrize("case", list(NPY_CASES))
def test_a_bad_npy_is_refused_in_one_line_naming_the_file_and_row(case, tmp_path, capsys):
    make, words = NPY_CASES[case]
    made = make()
    array, pickled = made if isinstance(made, tuple) else (made, False)
    src, name = npy_input(tmp_path, array, rows=N, allow_pickle=pickled)
    assert_refused(["import-vectors", src, "--out", str(tmp_path / "c.h5")], tmp_path / "c.h5", name, words, capsys)


# ---- one Parquet table with an `embedding` column


def parquet_input(tmp, column: pa.Array, extra_groups: list[pa.Array] = ()) -> tuple[str, str]:
    file = tmp / "e.parquet"
    with pq.ParquetWriter(file, pa.schema([("path", pa.string()), ("embedding", column.type)])) as writer:
        start = 0
        for part in [column, *extra_groups]:
            paths = pa.array([f"p{i}.jpg" for i in range(start, start + len(part))])
            writer.write_table(pa.table({"path": paths, "embedding": part}))
            start += len(part)
    return str(file), "e.parquet"


def lists(rows: list, kind: pa.DataType | None = None) -> pa.Array:
    return pa.array(rows, type=kind or pa.list_(pa.float32()))


def good_rows() -> list:
    return good().tolist()


def edited(row: int, value) -> list:
    rows = good_rows()
    rows[row] = value
    return rows


def edited_value(row: int, value) -> list:
    rows = good_rows()
    rows[row][2] = value
    return rows


PARQUET_CASES = {
    "ragged": (lambda: lists(edited(2, [1.0, 2.0, 3.0])), "row 2 has 3 values, the rows before it 4"),
    "ragged large_list": (lambda: lists(edited(5, [1.0] * 7), pa.large_list(pa.float64())), "row 5 has 7 values"),
    "null embedding": (lambda: lists(edited(1, None)), "row 1 has a null embedding"),
    "empty first": (lambda: lists(edited(0, [])), "row 0 has 0 values"),
    "all empty": (lambda: lists([[] for _ in range(N)]), "row 0 has 0 values"),
    "null value": (lambda: lists(edited_value(4, None)), "row 4 has a null value"),
    "nan in list": (lambda: lists(edited_value(3, float("nan"))), "row 3 holds nan"),
    "float64 over float32": (lambda: lists(edited_value(6, 1e39), pa.list_(pa.float64())), "row 6 holds 1e+39"),
    "inf fixed size": (lambda: lists(edited_value(7, float("inf")), pa.list_(pa.float32(), D)), "row 7 holds inf"),
    "scalar column": (lambda: pa.array(np.arange(N, dtype=np.float64)), "holds double, not a list"),
    "string column": (lambda: pa.array([f"v{i}" for i in range(N)]), "holds string, not a list"),
    "list of strings": (lambda: lists([["a"] * D] * N, pa.list_(pa.string())), "not a list of real numbers"),
    "list of bools": (lambda: lists([[True] * D] * N, pa.list_(pa.bool_())), "not a list of real numbers"),
    "struct column": (lambda: pa.array([{"x": 1.0}] * N), "not a list of real numbers"),
}


@pytest.mark.parametrize("case", list(PARQUET_CASES))
def test_a_bad_parquet_embedding_is_refused_in_one_line_naming_the_file_and_row(case, tmp_path, capsys):
    make, words = PARQUET_CASES[case]
    src, name = parquet_input(tmp_path, make())
    assert_refused(["import-vectors", src, "--out", str(tmp_path / "c.h5")], tmp_path / "c.h5", name, words, capsys)


def test_a_width_change_between_blocks_and_parts_names_the_row(tmp_path, capsys):
    # Row groups of 4: the change is in the second block read, at row 4 of the file.
    src, name = parquet_input(tmp_path, lists(good_rows()[:4]), [lists(np.ones((4, D + 1)).tolist())])
    assert_refused(["import-vectors", src, "--out", str(tmp_path / "c.h5"), "--block-rows", "4"], tmp_path / "c.h5",
                   name, "row 4 has 5 values, the rows before it 4", capsys)


def test_a_file_that_is_not_parquet_is_refused(tmp_path, capsys):
    (tmp_path / "e.parquet").write_bytes(b"PAR1 but not really" * 10)
    assert_refused(["import-vectors", str(tmp_path / "e.parquet"), "--out", str(tmp_path / "c.h5")],
                   tmp_path / "c.h5", "e.parquet", "not a readable Parquet file", capsys)


def test_a_refused_import_leaves_an_old_cache_whole_even_under_overwrite(tmp_path, capsys):
    pq.write_table(pa.table({"path": ["a.jpg", "b.jpg"], "embedding": lists([[1.0, 2.0], [3.0, 4.0]])}),
                   tmp_path / "ok.parquet")
    out = tmp_path / "c.h5"
    assert main(["import-vectors", str(tmp_path / "ok.parquet"), "--out", str(out), "--quiet"]) == 0
    before = out.read_bytes()
    src, name = parquet_input(tmp_path, lists(edited_value(4, float("nan"))))
    capsys.readouterr()
    assert main(["import-vectors", src, "--out", str(out), "--overwrite", "--quiet"]) == 2
    assert name in capsys.readouterr().err
    assert out.read_bytes() == before and not out.with_name("c.h5.partial").exists()
    with FeatureCache(out) as cache:
        assert cache.paths == ["a.jpg", "b.jpg"]


def test_good_vectors_of_every_real_type_import_as_float32(tmp_path):
    for dtype in (np.float16, np.float64, np.int8, np.uint16, np.int64):
        folder = tmp_path / np.dtype(dtype).name
        folder.mkdir()
        x = (good() * 10).astype(dtype)
        src, _ = npy_input(folder, x)
        assert main(["import-vectors", src, "--out", str(folder / "c.h5"), "--quiet"]) == 0
        with FeatureCache(folder / "c.h5") as cache:
            assert np.array_equal(cache.features(), x.astype(np.float32))


def assert_refused(args, out, name: str, words: str, capsys) -> None:
    capsys.readouterr()
    assert main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert name in lines[0] and words in lines[0], lines[0]
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


# ---- search --vector: the service's check


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vq")
    build_index(synthetic_cache(tmp / "c.h5", good(40, D)), tmp / "idx", kind="flat", progress=False)
    return tmp / "idx"


@pytest.mark.parametrize("query, words", [
    (np.full(D, np.nan, np.float32), "holds nan at position 0"),
    (np.array([1, np.inf, 0, 0], np.float32), "holds inf at position 1"),
    (np.array([[1, 2, 3, 4], [0, 0, -1e39, 0]], np.float64), "Query vector 1 holds -1e+39"),
    (np.zeros(D, np.float32), "all-zero vector has no direction"),
    (np.ones(D + 1, np.float32), "has 5 values; this index holds 4-d"),
    (np.array(["a"] * D), "give one vector"),
    (np.ones((2, 2, D), np.float32), "give one vector"),
    (np.ones(D, np.complex64), "give one vector"),
])
def test_search_vector_refuses_what_the_service_refuses(index_dir, tmp_path, capsys, query, words):
    np.save(tmp_path / "q.npy", query)
    for extra in ([], ["--exclude-examples"]):  # a plain query, and the examples' path
        capsys.readouterr()
        assert main(["search", str(index_dir), "--vector", str(tmp_path / "q.npy"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err


def test_search_vector_refuses_a_pickle_and_still_finds_a_row(index_dir, tmp_path, capsys):
    np.save(tmp_path / "q.npy", np.array([[0.5] * D], dtype=object), allow_pickle=True)
    assert main(["search", str(index_dir), "--vector", str(tmp_path / "q.npy")]) == 2
    assert "not a readable .npy" in capsys.readouterr().err
    np.save(tmp_path / "q.npy", good(40, D)[7] * 1e30)  # far from float32's limits, yet finite
    assert main(["search", str(index_dir), "--vector", str(tmp_path / "q.npy"), "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hits"][0]["id"] == 7
