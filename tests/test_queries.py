"""Queries people ask for: several examples combined (Rocchio), and range search, against numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from embedder.cache.reader import FeatureCache
from embedder.cli.main import main
from embedder.errors import ConfigError
from embedder.extract.local import embed
from embedder.search.build import build_index
from embedder.search.config import SearchConfig
from embedder.search.queries import range_search, rocchio
from embedder.search.query import SearchIndex
from tests.conftest import fast_config, make_tree
from tests.test_index import clustered, synthetic_cache


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------- rocchio


def test_rocchio_is_alpha_mean_of_positives_minus_beta_mean_of_negatives():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(size=(3, 8)) * [[1], [5], [0.2]], rng.normal(size=(2, 8))
    expected = unit(1.5 * unit(pos).mean(0) - 0.5 * unit(neg).mean(0))
    np.testing.assert_allclose(rocchio(pos, neg, alpha=1.5, beta=0.5), expected, rtol=1e-6, atol=1e-7)
    # without negatives: the direction of the mean of the unit positives, whatever their lengths
    np.testing.assert_allclose(rocchio(pos), unit(unit(pos).mean(0)), rtol=1e-6, atol=1e-7)
    # l2: the point itself, vectors taken as they are
    np.testing.assert_allclose(rocchio(pos, neg, 1.0, 0.75, "l2"), pos.mean(0) - 0.75 * neg.mean(0), rtol=1e-6)
    np.testing.assert_allclose(rocchio(pos[:1], None, 1.0, 0.75, "l2"), pos[0], rtol=1e-6)


def test_rocchio_refuses_a_query_the_negatives_cancel_and_mismatched_widths():
    v = np.ones((1, 4))
    with pytest.raises(ConfigError, match="cancel"):
        rocchio(v, 2 * v, alpha=1.0, beta=1.0)
    with pytest.raises(ConfigError, match="dimensions"):
        rocchio(v, np.ones((1, 5)))
    with pytest.raises(ConfigError, match="at least one positive"):
        rocchio(np.zeros((0, 4)))


# ---------------------------------------------------------------------------- range search


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("range")
    X = clustered(n=5000, d=32, centers=20)
    cache = synthetic_cache(root / "c.h5", X)
    rng = np.random.default_rng(1)
    Q = (X[::250] + 0.3 * rng.normal(size=(20, 32))).astype(np.float32)
    return root, cache, X, Q


def brute_force(X, Q, metric):
    if metric == "cosine":
        return unit(Q) @ unit(X).T
    return ((Q[:, None, :] - X[None, :, :]) ** 2).sum(-1)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_flat_range_search_equals_brute_force_exactly(data, metric):
    root, cache, X, Q = data
    build_index(cache, root / f"flat-{metric}", kind="flat", metric=metric, progress=False)
    index = SearchIndex.open(root / f"flat-{metric}")
    S = brute_force(X, Q, metric)
    cosine = metric == "cosine"
    # a threshold on a row's own float32 score: that row must come back (>= and <=, not > or <)
    T = float(np.float32(np.sort(S[0])[-200 if cosine else 200]))
    scores = brute_force(X, Q, metric)
    for n, hits in enumerate(range_search(index, Q, T)):
        inside = np.flatnonzero(scores[n] >= T - 1e-5 if cosine else scores[n] <= T + 1e-3)
        sure = np.flatnonzero(scores[n] >= T + 1e-5 if cosine else scores[n] <= T - 1e-3)
        got = [h.id for h in hits]
        assert set(sure) <= set(got) <= set(inside)  # float32 against float64 only at the boundary
        assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
        shown = [h.score for h in hits]
        assert shown == sorted(shown, reverse=cosine)
        np.testing.assert_allclose(shown, scores[n, got], rtol=1e-4, atol=1e-4)
    assert len(range_search(index, Q[:1], T)[0]) >= 200
    capped = range_search(index, Q[:1], T, max_results=7)[0]
    assert [h.id for h in capped] == [h.id for h in range_search(index, Q[:1], T)[0]][:7]


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfsq", "ivfpq"])
def test_approximate_range_search_returns_only_true_matches_with_high_recall(data, kind):
    """Every row returned has a true cosine >= T (by numpy on the exact vectors), and at
    least 95% of the rows that have one are returned (the tuned knob's recall)."""
    root, cache, X, Q = data
    build_index(cache, root / kind, kind=kind, progress=False)
    index = SearchIndex.open(root / kind)
    S = brute_force(X, Q, "cosine")
    for T in (0.95, 0.8):
        results = range_search(index, Q, T)
        got = sum(len(h) for h in results)
        truth = int((S >= T).sum())
        assert truth > 20 * 20  # many rows per query: more than the knob was tuned for (k = 10)
        for n, hits in enumerate(results):
            assert all(S[n, h.id] >= T - 1e-5 for h in hits)
            np.testing.assert_allclose([h.score for h in hits], S[n, [h.id for h in hits]], atol=1e-4)
        assert got / truth >= 0.95, f"{kind}: recall {got / truth:.3f} at T={T}"


def test_range_search_refuses_the_other_metric_and_bad_bounds(data, capsys):
    root, cache, _, Q = data
    build_index(cache, root / "cos", kind="flat", progress=False)
    np.save(root / "q.npy", Q[0])
    assert main(["search", str(root / "cos"), "--vector", str(root / "q.npy"), "--max-distance", "1"]) == 2
    err = capsys.readouterr().err
    assert "--min-score" in err and "Traceback" not in err
    for bad in ({"min_score": float("nan")}, {"min_score": 0.5, "max_distance": 1.0}, {"max_results": 3},
                {"min_score": 0.5, "max_results": 0}, {"beta": -1.0}, {"alpha": 0.0}):
        with pytest.raises(ConfigError):
            SearchConfig(index="x", vector="q.npy", **bad)


# ---------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    tree = make_tree(root / "img", per_class=5)
    cache = root / "c.h5"
    embed(fast_config(tree, cache))
    assert main(["index", str(cache), "--out", str(root / "idx"), "--quiet"]) == 0
    with FeatureCache(cache) as c:
        return root, tree, c.paths, c.features()


def search_json(capsys, *args) -> list[dict]:
    capsys.readouterr()
    code = main(["search", *map(str, args), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return [json.loads(line) for line in out.out.splitlines()]


def assert_ranked(hits: list[dict], scores: np.ndarray, k: int, skip=()) -> None:
    """`hits` are the k best rows by `scores` (numpy) apart from `skip`, in order: scores compared with a
    float32 tolerance, as random-init features leave near ties that float rounding may order either way."""
    best = [i for i in np.argsort(-scores, kind="stable") if i not in skip][:k]
    assert len(hits) == len(best) and not {h["id"] for h in hits} & set(skip)
    np.testing.assert_allclose([h["score"] for h in hits], scores[best], atol=2e-5)
    np.testing.assert_allclose([h["score"] for h in hits], scores[[h["id"] for h in hits]], atol=2e-5)


def test_several_images_combine_into_one_rocchio_query(images, capsys):
    root, tree, paths, F = images
    pos, neg = [paths.index("cat/cat_000.jpg"), paths.index("dog/dog_001.png")], [paths.index("fox/fox_002.jpg")]
    args = [root / "idx", "--image", tree / paths[pos[0]], "--image", tree / paths[pos[1]], "-k", "6"]
    # the default stays one result list per image, both --image kept
    assert [line["hits"][0]["id"] for line in search_json(capsys, *args)] == pos
    scores = unit(F) @ rocchio(F[pos], F[neg], 1.0, 0.75)
    (line,) = search_json(capsys, *args, "--negative", tree / paths[neg[0]])
    assert_ranked(line["hits"], scores, 6)
    assert " - " in line["query"] and " + " in line["query"]
    # the same query with the negative by its cached path, without the examples themselves
    (line,) = search_json(capsys, *args, "--negative-path", paths[neg[0]], "--exclude-examples")
    assert_ranked(line["hits"], scores, 6, skip=pos + neg)
    (line,) = search_json(capsys, *args, "--combine", "--beta", "0")
    assert_ranked(line["hits"], unit(F) @ rocchio(F[pos]), 6)


def test_cli_range_search_by_id_and_negative_id(images, capsys):
    root, _, _, F = images
    S = unit(F) @ unit(F[3])
    T = float(np.sort(S)[-8]) - 1e-4  # eight rows, with room for float32
    (line,) = search_json(capsys, root / "idx", "--id", 3, "--min-score", T)
    assert_ranked(line["hits"], S, 8)
    (line,) = search_json(capsys, root / "idx", "--id", 3, "--min-score", T, "--max-results", 3, "--exclude-examples")
    assert_ranked(line["hits"], S, 3, skip=[3])
    (line,) = search_json(capsys, root / "idx", "--id", 3, "--negative-id", 4, "--negative-id", 5, "-k", 4)
    assert_ranked(line["hits"], unit(F) @ rocchio(F[[3]], F[[4, 5]]), 4)
    capsys.readouterr()
    assert main(["search", str(root / "idx"), "--id", "3", "--negative-id", "999"]) == 2
    assert "999 is not in the index" in capsys.readouterr().err


def test_pipeline_search_step_takes_the_new_options(images, tmp_path, capsys):
    root, tree, paths, F = images
    steps = tmp_path / "p.toml"
    steps.write_text(f'[[steps]]\nrun = "search"\nindex = "{root / "idx"}"\nimage = ["{tree / paths[0]}"]\n'
                     f'negative = ["{tree / paths[7]}"]\nmin_score = -1.0\nmax_results = 4\nexclude_examples = true\n')
    assert main(["run", str(steps)]) == 0
    q = rocchio(F[[0]], F[[7]])
    expected = [i for i in np.argsort(-(unit(F) @ q), kind="stable") if i not in (0, 7)][:4]
    out = capsys.readouterr().out
    assert [out.index(Path(paths[i]).name) for i in expected] == sorted(out.index(Path(paths[i]).name)
                                                                        for i in expected)


# ------------------------------------------------------------ filters and removed rows


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("filtered")
    X = clustered(n=3000, d=32, centers=30, seed=3)
    labels = np.random.default_rng(4).integers(0, 3, len(X))
    cache = synthetic_cache(root / "c.h5", X, labels)
    for kind in ("flat", "ivf", "hnsw", "ivfpq"):
        build_index(cache, root / kind, kind=kind, progress=False, n_eval=200)
    build_index(cache, root / "flat-l2", kind="flat", metric="l2", progress=False)
    return root, X, labels


def allowed_best(S: np.ndarray, allowed: np.ndarray, k: int, cosine: bool) -> np.ndarray:
    rows = np.flatnonzero(allowed)
    return rows[np.argsort(-S[rows] if cosine else S[rows], kind="stable")[:k]]


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_a_filter_applies_to_a_combined_query_and_to_a_range_search(labelled, metric):
    """flat, exact: a Rocchio query's k nearest and a range search under `where` are the numpy
    answer among the rows the filter keeps, and the filter changes the answer."""
    root, X, labels = labelled
    index = SearchIndex.open(root / ("flat" if metric == "cosine" else "flat-l2"))
    cosine = metric == "cosine"
    where = "label == 'c1' and id >= 500"
    allowed = (labels == 1) & (np.arange(len(X)) >= 500)
    q = rocchio(X[[0, 1, 2]], X[[3]], 1.0, 0.75, metric)
    S = brute_force(X, q[None], metric)[0]
    hits = index.search(q, 10, where)[0]
    best = allowed_best(S, allowed, 10, cosine)
    np.testing.assert_allclose([h.score for h in hits], S[best], rtol=1e-4, atol=1e-3)
    assert all(allowed[h.id] for h in hits) and len(hits) == 10
    # a range reaching far beyond the allowed rows' best: the filter, not the bound, limits it
    T = float(np.sort(S[allowed])[::-1][40] if cosine else np.sort(S[allowed])[40])
    assert ((S >= T) if cosine else (S <= T))[~allowed].sum() > 40
    (found,) = range_search(index, q, T, where=where)
    tol = 1e-5 if cosine else 1e-3
    inside = allowed & ((S >= T - tol) if cosine else (S <= T + tol))
    sure = allowed & ((S >= T + tol) if cosine else (S <= T - tol))
    got = [h.id for h in found]
    assert set(np.flatnonzero(sure)) <= set(got) <= set(np.flatnonzero(inside))
    np.testing.assert_allclose([h.score for h in found], S[got], rtol=1e-4, atol=1e-3)
    assert [h.id for h in range_search(index, q, T, max_results=5, where=where)[0]] == got[:5]
    assert len(range_search(index, q, T)[0]) > len(got)  # without the filter, more rows pass
    assert range_search(index, q, T, where="id < 0") == [[]]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_removed_rows_never_come_back_from_combined_or_range_queries(labelled, tmp_path, kind):
    import shutil

    from embedder.errors import RemovedRowError
    from embedder.search.queries import rows_of_paths
    from embedder.search.removal import remove_rows

    root, X, labels = labelled
    shutil.copytree(root / kind, tmp_path / kind)
    gone = np.sort(np.random.default_rng(5).choice(len(X), 80, replace=False))
    remove_rows(tmp_path / kind, [f"v{i:06d}.png" for i in gone], progress=False)
    index = SearchIndex.open(tmp_path / kind)
    S = brute_force(X, X[gone[:4]], "cosine")
    T = float(np.sort(S[0])[-300])  # hundreds of rows in range, the removed query rows among them
    for exact_rows in (index.exact_rows, 0):  # hnsw: over the allowed rows' vectors, and the graph walk
        index.exact_rows = exact_rows
        for where in (None, "label != 'c2'"):
            found = range_search(index, X[gone[:4]], T, where=where)
            ids = {h.id for hits in found for h in hits}
            assert len(ids) > 100 and not ids & set(gone.tolist())
            assert all(S[n, h.id] >= T - 1e-4 for n, hits in enumerate(found) for h in hits)
            if where:
                assert all(labels[i] != 2 for i in ids)
            combined = index.search(rocchio(X[gone[:3]], X[gone[3:4]]), 50, where)[0]
            assert len(combined) == 50 and not {h.id for h in combined} & set(gone.tolist())
    with pytest.raises(RemovedRowError, match=f"row {gone[1]} "):
        index.row_vectors([int(gone[1])])
    with pytest.raises(RemovedRowError):
        rows_of_paths(index, [f"v{gone[2]:06d}.png"])


def test_cli_combined_and_range_queries_take_the_filter_and_skip_removed_rows(images, tmp_path, capsys):
    import shutil

    root, tree, paths, F = images
    idx = tmp_path / "idx"
    shutil.copytree(root / "idx", idx)
    dogs = np.array([p.startswith("dog/") for p in paths])
    q = rocchio(F[[3]], F[[4, 5]])
    scores = np.where(dogs, unit(F) @ q, -np.inf)
    (line,) = search_json(capsys, idx, "--id", 3, "--negative-id", 4, "--negative-id", 5, "-k", 3,
                          "--where", "label == 'dog'")
    assert_ranked(line["hits"], scores, 3)
    assert {h["label"] for h in line["hits"]} == {"dog"}
    S = np.where(dogs, unit(F) @ unit(F[3]), -np.inf)
    T = float(np.sort(S)[-3]) - 1e-4
    (line,) = search_json(capsys, idx, "--id", 3, "--min-score", T, "--where", "label == 'dog'")
    assert_ranked(line["hits"], S, 3)
    # removed rows: never in a range or combined answer, refused as examples by id or path
    gone = [i for i, p in enumerate(paths) if p.startswith("cat/")]
    assert main(["index", str(idx), "--remove", *[paths[i] for i in gone], "--quiet"]) == 0
    live, other = [i for i in range(len(paths)) if i not in gone][:2]
    for extra in (["--min-score", "-1"], ["--negative-id", str(other), "-k", "100"],
                  ["--image", str(tree / paths[gone[0]]), "--combine", "--exclude-examples", "-k", "100"]):
        args = ["--id", live] if "--image" not in extra else []
        (line,) = search_json(capsys, idx, *args, *extra)
        assert len(line["hits"]) == len(paths) - len(gone)  # a removed example file has nothing to leave out
        assert not {h["id"] for h in line["hits"]} & set(gone)
    for example in (["--id", str(live), "--negative-id", str(gone[0])], ["--path", paths[gone[1]], "--min-score", "0"],
                    ["--id", str(live), "--negative-path", paths[gone[2]]]):
        capsys.readouterr()
        assert main(["search", str(idx), *example]) == 2
        err = capsys.readouterr().err
        assert "was removed" in err and "Traceback" not in err
