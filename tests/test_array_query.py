"""A `Query` put to `Index.from_array` is answered by the same `answer` as an index folder's: the same
hits as `Index.build` over a cache of the same vectors, and the exact ones a plain faiss IndexFlat
or numpy gives."""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import embedder
from embedder import Example, Query
from embedder.cache.reader import FeatureCache
from embedder.cache.vectors import import_vectors
from embedder.errors import ConfigError, FilterError

N, D = 120, 16


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache of seeded vectors (imported: no model), labelled a/b, with an int column `width`."""
    tmp = tmp_path_factory.mktemp("arrayq")
    rng = np.random.default_rng(7)
    X = rng.normal(size=(N, D)).astype(np.float32)
    labels = ["a" if i % 3 else "b" for i in range(N)]
    pq.write_table(pa.table({"path": [f"img/{i:04d}.png" for i in range(N)], "label": labels,
                             "width": pa.array(rng.integers(32, 512, N), pa.int64()),
                             "embedding": pa.array(X.tolist(), pa.list_(pa.float32(), D))}), tmp / "v.parquet")
    import_vectors([str(tmp / "v.parquet")], tmp / "c.h5", progress=False)
    return tmp / "c.h5"


@pytest.fixture(scope="module", params=["cosine", "l2"])
def pair(request, cache, tmp_path_factory):
    """(built from the cache, from_array over the cache's own vectors, paths and columns, X)."""
    metric = request.param
    built = embedder.Index.build(cache, tmp_path_factory.mktemp(metric) / "idx", kind="flat", metric=metric)
    with FeatureCache(cache) as c:
        X, paths = c.features(), c.paths
        columns = {"label": [c.classes[y] for y in c.labels], **c.columns(["width"])}
    return built, embedder.Index.from_array(X, paths=paths, metric=metric, columns=columns), X


def queries(X: np.ndarray, metric: str) -> dict[str, Query]:
    rng = np.random.default_rng(1)
    v = rng.normal(size=(2, D)).astype(np.float32)
    bound = 0.35 if metric == "cosine" else 2.0 * D * 0.55  # some rows in range, not all of them
    return {
        "by id": Query((Example.of_id(3), Example.of_id(40)), k=7),
        "by vector": Query((Example.of_vector(v[0]), Example.of_vector(X[9], row=9)), k=5, exclude_examples=True),
        "negatives": Query((Example.of_id(0), Example.of_id(5)), (Example.of_id(7), Example.of_vector(v[1])), k=8,
                           exclude_examples=True),
        "combined, beta": Query((Example.of_id(2), Example.of_id(11)), combine=True, beta=0.4, k=6),
        "range": Query((Example.of_id(4),), k=None, threshold=bound),
        "range, capped": Query((Example.of_id(4), Example.of_vector(v[0])), k=3, threshold=bound,
                               exclude_examples=True),
        "filter": Query((Example.of_id(1), Example.of_id(6)), k=9, where="label == 'b' and width >= 200"),
        "filter, range": Query((Example.of_id(8),), k=None, threshold=bound, where="path glob 'img/00[0-5]*'"),
        "exclude": Query((Example.of_id(10),), (Example.of_id(12),), k=6, exclude=(13, 14, 15), where="width < 400"),
    }


def test_a_query_through_from_array_gives_the_hits_of_the_built_index(pair):
    built, memory, X = pair
    for name, query in queries(X, built.metric).items():
        a, b = built.search(query), memory.search(query)
        assert a.ids.shape == b.ids.shape and a.ids.shape[1] > 0, name
        assert (a.ids == b.ids).all(), name
        assert a.paths == b.paths, name
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5, err_msg=name)


def test_a_query_through_from_array_is_exact(pair):
    """Against faiss's own IndexFlat over the same vectors, and numpy for the combined query."""
    _, memory, X = pair
    cosine = memory.metric == "cosine"
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    rows = unit if cosine else X
    flat = faiss.IndexFlatIP(D) if cosine else faiss.IndexFlatL2(D)
    flat.add(np.ascontiguousarray(rows))
    scores, ids = flat.search(rows[[3, 40]], 7)
    found = memory.search(Query((Example.of_id(3), Example.of_id(40)), k=7))
    assert (found.ids == ids).all()
    np.testing.assert_allclose(found.scores, scores, rtol=1e-5, atol=1e-5)
    # Rocchio, the examples left out: alpha * mean(positives) - beta * mean(negatives), scored by hand
    q = rows[[0, 5]].mean(0) - 0.75 * rows[[7]].mean(0)
    q = q / np.linalg.norm(q) if cosine else q
    score = rows @ q if cosine else ((X - q) ** 2).sum(1)
    order = [int(i) for i in np.argsort(-score if cosine else score, kind="stable") if i not in (0, 5, 7)][:8]
    found = memory.search(Query((Example.of_id(0), Example.of_id(5)), (Example.of_id(7),), k=8,
                                exclude_examples=True))
    assert found.ids[0].tolist() == order
    # a range under a filter: every allowed row in range, and only those
    bound = float(np.sort(score)[::-1][30] if cosine else np.sort(score)[30])
    width = memory._searcher.filter_columns()["width"]
    found = memory.search(Query((Example.of_vector(q),), k=None, threshold=bound, where="width > 150"))
    inside = (score >= bound) if cosine else (score <= bound)
    assert sorted(found.ids[0].tolist()) == np.flatnonzero(inside & (width > 150)).tolist()


def test_from_array_without_names_or_columns_answers_a_query():
    X = np.random.default_rng(3).normal(size=(20, 4)).astype(np.float32)
    index = embedder.Index.from_array(X, metric="l2")
    found = index.search(Query((Example.of_id(2),), (Example.of_id(3),), k=4, where="id >= 5"))
    assert found.paths is None and found.ids.shape == (1, 4) and (found.ids >= 5).all()
    with pytest.raises(FilterError):
        index.search(Query((Example.of_id(2),), where="path glob '*.jpg'"))  # no names: no path column
    with pytest.raises(ConfigError, match="Row id 20 is not in the index"):
        index.search(Query((Example.of_id(20),)))
    with pytest.raises(ConfigError, match="4-d|4 dimensions|holds 4"):
        index.search(Query((Example.of_vector(np.ones(5)),), (Example.of_id(1),)))
