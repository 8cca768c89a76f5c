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
