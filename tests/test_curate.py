"""Curation scores on seeded data where the answer is known, and dedup through ANN indexes.

Label mistakes: flipped labels of a clustered dataset must rank first. Outliers: planted far
points rank first. Leaks: near-copies planted across splits are all found. Duplicates: the ANN
range search finds every planted pair, as the exact all-pairs search in numpy does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedder.cache.reader import CacheSpec
from embedder.cache.writer import CacheWriter
from embedder.cli.main import main
from embedder.curate import labels as mistakes
from embedder.curate import neighbours as nb
from embedder.curate.config import CurateConfig
from embedder.curate.run import SCORE_COLUMNS, run_curate
from embedder.data.sources import Listing
from embedder.errors import ConfigError
from embedder.search.dedup import anchored_groups, find_duplicates


def cache_file(path: Path, X: np.ndarray, labels: np.ndarray, names: list[str] | None = None,
               classes: list[str] | None = None) -> Path:
    """A real cache (the real writer) holding `X`, labelled with codes into `classes`."""
    n, d = X.shape
    names = names or [f"v{i:06d}.png" for i in range(n)]
    classes = classes or [f"c{i}" for i in range(int(labels.max()) + 1)]
    listing = Listing(path.parent, names, labels.astype(np.int64), classes, "imagefolder")
    spec = CacheSpec({"model": "synthetic", "dim": str(d)}, str(path.parent), d, layout="imagefolder")
    with CacheWriter(path, spec, listing, commit_every=10**9) as w:
        w.add(np.arange(n), X.astype(np.float32), [])
        w.finish()
    return path


def clustered(n_per=60, classes=5, d=16, spread=1.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d)) * 3
    y = np.repeat(np.arange(classes), n_per)
    return (centres[y] + spread * rng.normal(size=(len(y), d))).astype(np.float32), y, rng


def unit(X):
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def test_label_issues_are_cleanlabs_confident_learning():
    cleanlab_filter = pytest.importorskip("cleanlab.filter")
    rng = np.random.default_rng(1)
    for n, k in ((300, 3), (500, 7)):
        y = rng.integers(0, k, n)
        logits = rng.normal(size=(n, k)) * 2
        logits[np.arange(n), y] += rng.normal(1.5, 1.0, n)  # mostly right, some confidently wrong
        P = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        expected = cleanlab_filter.find_label_issues(y, P, filter_by="confident_learning",
                                                     return_indices_ranked_by="self_confidence")
        assert len(expected) > 5
        np.testing.assert_array_equal(mistakes.label_issues(y, P), expected)


def test_flipped_labels_rank_first():
    X, y, rng = clustered(n_per=60, classes=5, spread=1.2)
    flipped = rng.choice(len(y), size=15, replace=False)  # 5 %
    given = y.copy()
    given[flipped] = (y[flipped] + rng.integers(1, 5, 15)) % 5
    P, _ = mistakes.out_of_fold_probabilities(X, given, 5, folds=5, seed=0, device="cpu")
    top = mistakes.mistake_ranking(given, P)[: len(flipped)]
    precision = len(set(top.tolist()) & set(flipped.tolist())) / len(flipped)
    assert precision >= 0.8, precision
    # label_quality is the out-of-fold self-confidence: the flipped rows score far lower.
    quality = P[np.arange(len(y)), given]
    assert np.median(quality[flipped]) < 0.2 < np.median(np.delete(quality, flipped))


def test_neighbour_scores_match_numpy_and_planted_outliers_rank_first():
    X, y, rng = clustered(n_per=50, classes=4, spread=0.5)
    far = rng.normal(size=(6, X.shape[1])).astype(np.float32) * 3  # directions no cluster has
    X = np.concatenate([X, far])
    Xn = unit(X).astype(np.float32)
    sims, _ = nb.neighbours(Xn, 10)
    S = Xn @ Xn.T
    np.fill_diagonal(S, -np.inf)
    ref = -np.sort(-S, axis=1)[:, :10]
    np.testing.assert_allclose(sims, ref, atol=1e-5)
    outlier = nb.outlier_scores(sims, 10)
    np.testing.assert_allclose(outlier, 1 - ref[:, 9], atol=1e-5)
    assert set(np.argsort(-outlier)[:6].tolist()) == set(range(len(X) - 6, len(X)))
    u = nb.uniqueness(sims)
    raw = (1 - ref[:, :3]) @ np.array([0.6, 0.3, 0.1])
    np.testing.assert_allclose(u, raw / raw.max(), atol=1e-5)
    assert u.min() >= 0 and u.max() == pytest.approx(1.0)
    labels = np.concatenate([y, np.full(6, -1)])
    rank = nb.representatives(Xn, labels, 2, seed=0)
    for c in range(4):
        assert sorted(rank[labels == c][rank[labels == c] > 0].tolist()) == [1, 2]
    assert (rank[labels < 0] == 0).all()


def _split_tree(tmp_path: Path):
    """A split-tree cache (train/ val/ test/) with near-copies of train rows planted in val and test."""
    X, y, rng = clustered(n_per=60, classes=3, d=24, spread=3.0, seed=4)  # no two rows alike by chance
    split = rng.choice(["train", "val", "test"], size=len(y), p=[0.6, 0.2, 0.2])
    train = np.flatnonzero(split == "train")
    others = np.flatnonzero(split != "train")
    planted = rng.choice(others, size=8, replace=False)
    sources = rng.choice(train, size=8, replace=False)
    X[planted] = X[sources] + 1e-3 * rng.normal(size=(8, X.shape[1]))
    y[planted] = y[sources]
    names = [f"{s}/c{c}/img{i:04d}.png" for i, (s, c) in enumerate(zip(split, y))]
    path = cache_file(tmp_path / "tree.h5", X, y, names, ["c0", "c1", "c2"])
    return path, names, planted, sources


def test_curate_finds_every_planted_leak_and_writes_the_scores(tmp_path, capsys):
    path, names, planted, sources = _split_tree(tmp_path)
    out = tmp_path / "report"
    assert main(["curate", str(path), "--out", str(out), "--device", "cpu", "--quiet", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    table = pq.read_table(out / "scores.parquet").to_pydict()
    assert tuple(table) == SCORE_COLUMNS and len(table["path"]) == len(names)
    leaked = {p: t for p, t in zip(table["path"], table["leak_of"]) if t}
    assert leaked == {names[p]: names[s] for p, s in zip(planted, sources)}
    assert summary["leaks"]["count"] == 8 and summary["split_how"] == "split folders"
    # Each planted copy shares a duplicate group with its original, and one of each pair is kept.
    group = np.array(table["duplicate_group"])
    for p, s in zip(planted, sources):
        assert group[p] == group[s] >= 0
        assert table["duplicate_keep"][p] != table["duplicate_keep"][s]
    q = np.array(table["label_quality"], dtype=float)
    assert ((q >= 0) & (q <= 1)).all() and set(table["suggested_label"]) <= {"c0", "c1", "c2"}
    assert sorted(table["mistake_rank"]) == list(range(1, len(names) + 1))
    assert (out / "scores.csv").read_text().splitlines()[0].replace('"', "").split(",") == list(SCORE_COLUMNS)
    page = (out / "gallery.html").read_text()
    assert "Leaks between splits" in page and names[planted[0]] in page


def test_curate_with_separate_caches_and_without_splits(tmp_path, capsys):
    X, y, _ = clustered(n_per=30, classes=3, d=12, spread=3.0, seed=5)
    train = cache_file(tmp_path / "train" / "t.h5", X[:60], y[:60])
    val_X = X[60:].copy()
    val_X[0] = X[3] * 1.0001
    val = cache_file(tmp_path / "val" / "v.h5", val_X, y[60:])
    s = run_curate(CurateConfig(str(train), out=str(tmp_path / "r"), val_cache=str(val), device="cpu",
                                gallery=0, progress=False))
    assert s["split_how"] == "separate caches" and s["splits"] == {"train": 60, "val": 30, "test": 0}
    assert s["leaks"]["count"] >= 1 and s["leaks"]["pairs"][0]["train_path"] == "v000003.png"
    assert not (tmp_path / "r" / "gallery.html").exists()
    flat = run_curate(CurateConfig(str(train), out=str(tmp_path / "r2"), device="cpu", progress=False))
    assert "skipped" in flat["leaks"]
    with pytest.raises(ConfigError, match="--test-cache needs --val-cache"):
        CurateConfig(str(train), out="r", test_cache=str(val))
    assert main(["curate", str(train), "--out", str(tmp_path / "r3"), "--folds", "1"]) == 2
    assert "--folds must be at least 2" in capsys.readouterr().err


def _planted_duplicates(n=4000, d=32, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    originals = rng.choice(n, size=40, replace=False)
    copies = rng.choice(np.setdiff1d(np.arange(n), originals), size=40, replace=False)
    X[copies] = X[originals] + 0.02 * rng.normal(size=(40, d)).astype(np.float32)
    return X, originals, copies


def exact_groups(X: np.ndarray, threshold: float) -> list[list[int]]:
    Xn = unit(X)
    S = Xn @ Xn.T
    i, j = np.nonzero(np.triu(S >= threshold, k=1))
    pairs = np.stack([i, j], axis=1)
    return anchored_groups(pairs, np.unique(pairs))[0]


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfsq", "hnsw"])
def test_dedup_through_an_ann_index_finds_every_planted_pair(tmp_path, kind):
    X, _, _ = _planted_duplicates()
    path = cache_file(tmp_path / "c.h5", X, np.zeros(len(X), np.int64))
    found = find_duplicates(path, 0.97, kind=kind, block_rows=1000)
    assert found.kind == kind
    expected = exact_groups(X, 0.97)
    assert len(expected) == 40
    assert found.groups == expected  # recall 1.0, and nothing else
    assert len(found.drop()) == 40


def test_dedup_against_another_cache_and_keep_largest(tmp_path, capsys):
    X, _, _ = _planted_duplicates(n=600, seed=2)
    rng = np.random.default_rng(3)
    other = rng.normal(size=(300, X.shape[1])).astype(np.float32)
    shared = rng.choice(600, size=12, replace=False)
    other[:12] = X[shared] * 1.001
    a = cache_file(tmp_path / "a" / "a.h5", X, np.zeros(600, np.int64))
    b = cache_file(tmp_path / "b" / "b.h5", other, np.zeros(300, np.int64))
    assert main(["dedup", str(a), "--against", str(b), "--threshold", "0.97", "--quiet", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    pairs = {(next(e["path"] for e in g if e["cache"] == "cache"), next(e["path"] for e in g if e["cache"] == "other"))
             for g in doc["groups"]}
    assert pairs == {(f"v{s:06d}.png", f"v{i:06d}.png") for i, s in enumerate(shared)}
    assert all(e["keep"] == (e["cache"] == "other") for g in doc["groups"] for e in g)
    # --keep largest: the bigger file of a pair on disk is kept; --keep first: the first by path.
    Y = rng.normal(size=(50, 8)).astype(np.float32)
    Y[20] = Y[7]
    c = cache_file(tmp_path / "c" / "c.h5", Y, np.zeros(50, np.int64))
    (tmp_path / "c" / "v000007.png").write_bytes(b"x" * 10)
    (tmp_path / "c" / "v000020.png").write_bytes(b"x" * 500)
    assert find_duplicates(c, 0.999, keep="largest").keep == [[20]]
    assert find_duplicates(c, 0.999, keep="first").keep == [[7]]


def test_a_pipeline_curate_step_runs_like_the_command(tmp_path):
    from embedder.cli.pipeline import load_pipeline

    X, y, _ = clustered(n_per=20, classes=2, d=8, spread=3.0, seed=6)
    cache_file(tmp_path / "c.h5", X, y)
    (tmp_path / "p.toml").write_text('[[steps]]\nrun = "curate"\ncache = "c.h5"\nout = "report"\nfolds = 3\n'
                                     'device = "cpu"\ngallery = 4\n')
    _, steps = load_pipeline(tmp_path / "p.toml", progress=False)
    assert steps[0].config.out == str(tmp_path / "report") and steps[0].config.folds == 3
    summary = steps[0].execute().as_dict()
    assert summary["label_mistakes"]["folds"] == 3 and (tmp_path / "report" / "gallery.html").is_file()


def test_curate_takes_the_neighbours_from_an_index_of_the_cache(tmp_path):
    from embedder.search.build import build_index

    X, y, _ = clustered(n_per=40, classes=3, d=16, spread=3.0, seed=7)
    path = cache_file(tmp_path / "c.h5", X, y)
    build_index(path, tmp_path / "idx", kind="flat", metric="cosine", progress=False)  # exact: equal scores
    build_index(path, tmp_path / "l2", kind="flat", metric="l2", progress=False)
    common = {"device": "cpu", "gallery": 0, "progress": False}
    run_curate(CurateConfig(str(path), out=str(tmp_path / "own"), **common))
    run_curate(CurateConfig(str(path), out=str(tmp_path / "via"), index=str(tmp_path / "idx"), **common))
    own, via = (pq.read_table(tmp_path / d / "scores.parquet").to_pydict() for d in ("own", "via"))
    np.testing.assert_allclose(via["outlier_score"], own["outlier_score"], atol=1e-5)
    np.testing.assert_allclose(via["uniqueness"], own["uniqueness"], atol=1e-5)
    with pytest.raises(ConfigError, match="must be a cosine index of"):
        run_curate(CurateConfig(str(path), out=str(tmp_path / "bad"), index=str(tmp_path / "l2"), **common))


def test_a_class_with_one_labelled_image_is_left_unscored(tmp_path):
    X, y, _ = clustered(n_per=20, classes=3, d=8, spread=3.0, seed=8)
    keep = np.concatenate([np.arange(40), [40]])  # class c2 keeps one image
    path = cache_file(tmp_path / "c.h5", X[keep], y[keep])
    s = run_curate(CurateConfig(str(path), out=str(tmp_path / "r"), device="cpu", gallery=0, progress=False))
    assert s["label_mistakes"]["unscored_classes"] == ["c2"]
    table = pq.read_table(tmp_path / "r" / "scores.parquet").to_pydict()
    assert table["label_quality"][40] is None or np.isnan(table["label_quality"][40])
    assert table["mistake_rank"][40] == 0 and sorted(table["mistake_rank"][:40]) == list(range(1, 41))


def test_the_gallery_embeds_thumbnails_of_real_images(tmp_path, capsys):
    from embedder.extract.local import embed
    from tests.conftest import fast_config, make_tree

    tree = make_tree(tmp_path / "images", per_class=6)
    config = fast_config(tree, tmp_path / "c.h5")
    embed(config)
    out = tmp_path / "report"
    assert main(["curate", str(config.out), "--out", str(out), "--folds", "3", "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "label mistakes" in printed and "leaks           skipped" in printed
    page = (out / "gallery.html").read_text()
    assert page.count("data:image/jpeg;base64,") >= 18  # outliers and least unique alone show every image
    assert "unreadable" not in page and "http" not in page  # self-contained: nothing fetched


def _chain(tmp_path: Path, sizes=None) -> Path:
    """Rows a, b, c (v000000..2) at 0, 15 and 30 degrees: cos(a, b) = cos(b, c) = 0.966 >= 0.95,
    cos(a, c) = 0.866 < 0.95; then 20 rows far from them and from each other."""
    rng = np.random.default_rng(4)
    angles = np.radians([0.0, 15.0, 30.0])
    X = np.zeros((23, 24), np.float32)
    X[:3, 0], X[:3, 1] = np.cos(angles), np.sin(angles)
    X[3:, 2:] = rng.normal(size=(20, 22))
    path = cache_file(tmp_path / "c" / "c.h5", X, np.zeros(23, np.int64))
    for i, size in enumerate(sizes or []):
        (tmp_path / "c" / f"v{i:06d}.png").write_bytes(b"x" * size)
    return path


def _dedup_json(path: Path, capsys, *flags) -> dict:
    assert main(["dedup", str(path), "--threshold", "0.95", "--quiet", "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("keep", "sizes", "expected"), [
    ("first", None, [[("v000000.png", True), ("v000001.png", False)]]),  # a keeps b; c matches only b: left out
    ("largest", [10, 500, 20], [[("v000000.png", False), ("v000001.png", True), ("v000002.png", False)]]),
    ("largest", [10, 20, 500], [[("v000001.png", False), ("v000002.png", True)]]),  # c keeps b; a left out
])
def test_dedup_groups_do_not_chain(tmp_path, capsys, keep, sizes, expected):
    """a ~ b ~ c with a and c apart: never one group where a is kept and c dropped, or c kept and a dropped
    (connected components made {a, b, c} with two to drop whichever was kept)."""
    doc = _dedup_json(_chain(tmp_path, sizes), capsys, "--keep", keep)
    assert [[(e["path"], e["keep"]) for e in g] for g in doc["groups"]] == expected
    assert doc["pairs"] == 2 and doc["large_groups"] == 0


def _assert_every_dropped_row_matches_its_kept_row(X, groups, keep, threshold):
    Xn = unit(X)
    seen = set()
    for g, k in zip(groups, keep):
        assert len(k) == 1 and k[0] in g and len(g) >= 2 and not seen & set(g)
        seen |= set(g)
        sims = Xn[g] @ Xn[k[0]]
        assert (sims >= threshold - 1e-5).all(), (g, k, sims)


@pytest.mark.filterwarnings("ignore::embedder.errors.EmbedderNotice")  # the walks chain on purpose
@pytest.mark.parametrize("seed", range(4))
def test_every_dropped_row_matches_its_groups_kept_row_on_random_chains(tmp_path, seed):
    """Random walks with steps just under the threshold chain into long components; the groups may
    not. And no pair is left with both rows outside every group (nothing that matches is missed)."""
    rng = np.random.default_rng(seed)
    walks = [np.cumsum(0.25 * rng.normal(size=(30, 16)), axis=0) + 4 * rng.normal(size=16) for _ in range(20)]
    X = np.concatenate(walks + [rng.normal(size=(200, 16))]).astype(np.float32)
    order = rng.permutation(len(X))
    X = X[order]
    path = cache_file(tmp_path / "c" / "c.h5", X, np.zeros(len(X), np.int64))
    for i in rng.choice(len(X), size=300, replace=False):  # sizes for --keep largest: some known, some not
        (tmp_path / "c" / f"v{i:06d}.png").write_bytes(b"x" * int(rng.integers(1, 1000)))
    threshold = 0.97
    S = unit(X) @ unit(X).T
    i, j = np.nonzero(np.triu(S >= threshold, k=1))
    components = exact_components(i, j, len(X))
    assert max(components) >= 10  # the data does chain
    for keep in ("largest", "first"):
        found = find_duplicates(path, threshold, keep=keep, kind="flat", block_rows=128)
        _assert_every_dropped_row_matches_its_kept_row(X, found.groups, found.keep, threshold)
        grouped = {r for g in found.groups for r in g}
        assert all(a in grouped or b in grouped for a, b in zip(i, j))
        assert found.pairs == len(i)


def exact_components(i, j, n) -> list[int]:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    _, comp = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)), directed=False)
    return np.bincount(comp).tolist()


def test_dedup_against_another_cache_keeps_one_other_row_each_group_matches(tmp_path):
    rng = np.random.default_rng(7)
    base = rng.normal(size=(40, 16)).astype(np.float32)
    other = np.concatenate([base, base + 0.25 * rng.normal(size=base.shape)]).astype(np.float32)  # near pairs
    X = np.concatenate([base + 0.2 * rng.normal(size=base.shape), rng.normal(size=(60, 16))]).astype(np.float32)
    a = cache_file(tmp_path / "a" / "a.h5", X, np.zeros(len(X), np.int64))
    b = cache_file(tmp_path / "b" / "b.h5", other, np.zeros(len(other), np.int64))
    found = find_duplicates(a, 0.97, against=b)
    assert found.groups
    both = np.concatenate([X, other])
    _assert_every_dropped_row_matches_its_kept_row(both, found.groups, found.keep, 0.97)
    assert all(k[0] >= len(X) and all(r < len(X) for r in g if r != k[0]) for g, k in zip(found.groups, found.keep))


def test_an_unusually_large_group_is_reported(tmp_path, capsys):
    rng = np.random.default_rng(5)
    X = rng.normal(size=(200, 16)).astype(np.float32)
    X[:60] = X[0] + 1e-4 * rng.normal(size=(60, 16))  # 60 copies of one image: above max(50, 1%)
    path = cache_file(tmp_path / "c.h5", X, np.zeros(200, np.int64))
    assert main(["dedup", str(path), "--json", "--quiet"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["large_groups"] == 1
    assert "1 near-duplicate group(s) hold more than 50 rows (the largest 60" in out.err
    assert "59 of 200 rows (30%) would be dropped" in out.err
    from embedder.errors import EmbedderNotice

    with pytest.warns(EmbedderNotice, match="more than 50 rows.*raise --duplicate-threshold"):
        s = run_curate(CurateConfig(str(path), out=str(tmp_path / "r"), device="cpu", gallery=0, progress=False))
    assert s["duplicates"]["large_groups"] == 1 and s["duplicates"]["to_drop"] == 59


def test_curates_duplicate_columns_do_not_chain(tmp_path):
    path = _chain(tmp_path, [10, 500, 20])
    s = run_curate(CurateConfig(str(path), out=str(tmp_path / "r"), device="cpu", gallery=0, progress=False,
                                folds=2))
    table = pq.read_table(tmp_path / "r" / "scores.parquet").to_pydict()
    assert table["duplicate_group"][:4] == [0, 0, 0, -1] and table["duplicate_keep"][:4] == [False, True, False, True]
    assert s["duplicates"]["to_drop"] == 2
    path = _chain(tmp_path / "first")
    run_curate(CurateConfig(str(path), out=str(tmp_path / "r2"), device="cpu", gallery=0, progress=False, folds=2,
                            keep="first"))
    table = pq.read_table(tmp_path / "r2" / "scores.parquet").to_pydict()
    assert table["duplicate_group"][:3] == [0, 0, -1] and table["duplicate_keep"][:3] == [True, False, True]
