"""Evaluation on cached features: the k-NN vote, few-shot draws, top-5 and balanced accuracy, the layer sweep."""

from __future__ import annotations

import json

import joblib
import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

from embedder.cache.reader import FeatureCache
from embedder.cli.main import main
from embedder.cli.pipeline import run_pipeline
from embedder.data.splits import assign_splits
from embedder.errors import ConfigError
from embedder.extract.local import embed
from embedder.learn.fewshot import draw_shots
from embedder.learn.knn import KNNVote
from embedder.learn.metrics import balanced_accuracy, top_k_accuracy
from embedder.learn.train import ProbeConfig, evaluate_probe, run_probe
from tests.conftest import fast_config, make_tree

FAST_CS = (0.01, 1.0, 100.0)
CLASSES = ("ant", "bee", "cat", "dog", "eel", "fox", "gnu")  # more than 5: top-5 is reported


def overlapping_blobs(n_per_class=40, dim=16, k=6, seed=0):
    """Classes that overlap, so the vote's k and weights change predictions."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim)) * 0.4
    X = np.concatenate([c + rng.normal(size=(n_per_class, dim)) for c in centers]).astype(np.float32)
    return X, np.repeat(np.arange(k), n_per_class)


def brute_force_votes(train, codes, queries, k, T=0.07, n_classes=None):
    """DINOv2's vote written out: all similarities, top k by sorting, exp(sim / T) summed per class."""
    def unit(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    sim = unit(queries.astype(np.float64)) @ unit(train.astype(np.float64)).T
    k = min(k, len(train))
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(queries), n_classes or codes.max() + 1))
    for i in range(len(queries)):
        for j in top[i]:
            votes[i, codes[j]] += np.exp(sim[i, j] / T)
    return votes


def test_knn_vote_equals_brute_force_numpy_for_every_k():
    X, y = overlapping_blobs()
    rng = np.random.default_rng(1)
    order = rng.permutation(len(X))
    tr, va, te = order[:140], order[140:190], order[190:]
    ks = (1, 10, 20, 100, 200)  # 200 > 140 train rows: capped
    knn = KNNVote(ks=ks, batch_size=16).fit(X[tr], y[tr], X[va], y[va])  # several query blocks
    val_acc = {}
    for k in ks:
        ref_val = brute_force_votes(X[tr], y[tr], X[va], k).argmax(1)
        ref_test = brute_force_votes(X[tr], y[tr], X[te], k)
        np.testing.assert_array_equal(knn.votes(X[te], [k])[k].argmax(1), ref_test.argmax(1))
        np.testing.assert_allclose(knn.votes(X[te], [k])[k], ref_test, rtol=1e-4)
        val_acc[k] = (ref_val == y[va]).mean()
        assert knn.accuracy_by_k(X[va], y[va], [k])[k] == val_acc[k]
    best = max(ks, key=lambda k: (val_acc[k], -k))  # the smaller k wins a tie
    assert knn.k_ == min(best, 140) and knn.best_val_accuracy_ == val_acc[best]
    ref = brute_force_votes(X[tr], y[tr], X[te], best)
    np.testing.assert_array_equal(knn.predict(X[te]), ref.argmax(1))
    np.testing.assert_allclose(knn.predict_proba(X[te]), ref / ref.sum(1, keepdims=True), rtol=1e-4)
    assert len({tuple(knn.votes(X[te], [k])[k].argmax(1)) for k in ks}) > 1  # k matters on this data


def test_knn_vote_considers_small_k_and_picks_it_on_validation_when_it_wins():
    """40 arcs of the unit circle, classes alternating, 10 train rows per arc: only the nearest few
    neighbours share a row's arc. DINOv2's k (10, 20, 100, 200) alone forced k >= 10 here."""
    rng = np.random.default_rng(0)

    def arcs(n):
        t = rng.uniform(0, 2 * np.pi, n)
        return np.stack([np.cos(t), np.sin(t)], 1).astype(np.float32), (t // (2 * np.pi / 40) % 2).astype(int)

    (X, y), (X_val, y_val) = arcs(400), arcs(200)
    knn = KNNVote().fit(X, y, X_val, y_val)
    by_k = {r["k"]: r["val_accuracy"] for r in knn.cv_results_}
    assert {1, 3, 5} <= set(by_k) and knn.k_ < 10
    assert by_k[knn.k_] == max(by_k.values()) > max(v for k, v in by_k.items() if k >= 10)


def test_knn_vote_pickles_and_predicts_the_same():
    X, y = overlapping_blobs(seed=2)
    knn = KNNVote(k=10).fit(X[::2], np.array(["a", "b", "c", "d", "e", "f"])[y[::2]])
    again = joblib.load(_dump(knn))
    np.testing.assert_array_equal(again.predict(X[1::2]), knn.predict(X[1::2]))


def _dump(obj):
    import io

    buf = io.BytesIO()
    joblib.dump(obj, buf)
    buf.seek(0)
    return buf


def test_top5_and_balanced_accuracy_match_sklearn():
    rng = np.random.default_rng(3)
    n, c = 300, 9
    y = rng.integers(0, c, n)
    scores = rng.integers(0, 4, size=(n, c)).astype(float)  # many ties: the ranking rule is tested too
    for k in (1, 2, 5, 8):
        assert top_k_accuracy(y, scores, k) == pytest.approx(top_k_accuracy_score(y, scores, k=k, labels=range(c)))
    # Score columns in another order than the labels'.
    labels = rng.permutation(c)
    assert top_k_accuracy(y, scores, 5, labels) == pytest.approx(
        top_k_accuracy_score(y, scores[:, np.argsort(labels)], k=5, labels=range(c)))
    pred = np.where(rng.random(n) < 0.6, y, rng.integers(0, c, n))
    pred[y == 0] = 1  # a class never predicted right
    assert balanced_accuracy(y, pred) == pytest.approx(balanced_accuracy_score(y, pred))


@pytest.fixture(scope="module")
def two_layer_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    tree = make_tree(root / "images", classes=CLASSES, per_class=10, seed=5)
    out = root / "feats.h5"
    embed(fast_config(tree, out, layer="avgpool", extra_layers=("layer2",)))
    return out


def _split(cache_path, seed=0):
    with FeatureCache(cache_path) as c:
        return assign_splits(c.paths, c.labels, c.classes, seed, 0.2, 0.2), c.labels


def test_knn_vote_probe_reports_every_k_and_the_metrics(two_layer_cache, tmp_path, capsys):
    out = tmp_path / "knn"
    assert main(["probe", str(two_layer_cache), "--classifier", "knn-vote", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    splits, labels = _split(two_layer_cache)
    assert report["splits"]["train"] == len(splits.train) == 42
    assert set(report["accuracy_by_k"]) == {"1", "3", "5", "10", "20", "50", "100", "200"}
    assert report["accuracy_by_k"]["200"]["k_used"] == 42  # capped at the train size
    with FeatureCache(two_layer_cache) as c:
        X = c.features()
    ref = {k: (brute_force_votes(X[splits.train], labels[splits.train], X[splits.test], k, n_classes=7).argmax(1)
               == labels[splits.test]).mean() for k in (1, 3, 5, 10, 20, 50, 100, 200)}
    assert {int(k): r["test"] for k, r in report["accuracy_by_k"].items()} == pytest.approx(ref)
    chosen = report["chosen"]["k"]
    assert report["test_accuracy"] == pytest.approx(ref[chosen])
    val = {k: r["val"] for k, r in report["accuracy_by_k"].items()}
    assert report["val_accuracy"] == max(val.values())  # k chosen on validation, not test
    model = joblib.load(out / "classifier.joblib")["model"]
    proba = model.predict_proba(X[splits.test])
    m = report["metrics"]["test"]
    assert m["top1_accuracy"] == report["test_accuracy"]
    assert m["top5_accuracy"] == pytest.approx(top_k_accuracy_score(labels[splits.test], proba, k=5, labels=range(7)))
    assert m["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(labels[splits.test], model.predict(X[splits.test])))
    assert evaluate_probe(out, two_layer_cache)["rows"] == 70
    assert main(["probe", str(two_layer_cache), "--classifier", "knn-vote", "--out", str(out)]) == 0
    assert "<- chosen" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["probe", "ridge", "logreg"])
def test_every_classifier_reports_top5_and_balanced_accuracy(two_layer_cache, tmp_path, name):
    report = run_probe(ProbeConfig(str(two_layer_cache), out=str(tmp_path / name), classifier=name, Cs=FAST_CS,
                                   device="cpu"))
    for split in ("val", "test"):
        m = report["metrics"][split]
        assert m["top1_accuracy"] == report[f"{split}_accuracy"]
        assert 0 <= m["balanced_accuracy"] <= 1 and m["top1_accuracy"] <= m["top5_accuracy"] <= 1


def test_few_shot_draws_come_from_the_train_split_only(two_layer_cache, tmp_path):
    report = run_probe(ProbeConfig(str(two_layer_cache), out=str(tmp_path / "fs"), classifier="knn-vote",
                                   shots=(1, 2, 5), draws=3))
    fs = report["few_shot"]
    assert fs["val_overlap"] == 0 and set(fs["shots"]) == {"1", "2", "5"}
    splits, labels = _split(two_layer_cache)
    with FeatureCache(two_layer_cache) as c:
        X = c.features()
    for n in (1, 2, 5):
        row = fs["shots"][str(n)]
        assert row["train_rows"] == 7 * n and len(row["accuracies"]) == 3
        accs = []
        for d in range(3):
            rows = splits.train[draw_shots(labels[splits.train], n, 0, d)]
            assert not set(rows) & set(splits.val) and not set(rows) & set(splits.test)
            assert np.array_equal(np.bincount(labels[rows], minlength=7), np.full(7, n))
            knn = KNNVote().fit(X[rows], labels[rows], X[splits.val], labels[splits.val])
            accs.append((knn.predict(X[splits.test]) == labels[splits.test]).mean())
        assert row["accuracies"] == pytest.approx(accs)
        assert row["mean"] == pytest.approx(np.mean(accs)) and row["std"] == pytest.approx(np.std(accs))
    # Seeded: the same draw twice, another draw differs.
    codes = labels[splits.train]
    assert np.array_equal(draw_shots(codes, 2, 0, 1), draw_shots(codes, 2, 0, 1))
    assert not np.array_equal(draw_shots(codes, 2, 0, 0), draw_shots(codes, 2, 0, 1))


def test_few_shot_with_the_linear_probe_and_a_cv_classifier(two_layer_cache, tmp_path):
    for name in ("probe", "ridge"):
        report = run_probe(ProbeConfig(str(two_layer_cache), out=str(tmp_path / name), classifier=name,
                                       shots=(1,), draws=2, Cs=FAST_CS, device="cpu"))
        row = report["few_shot"]["shots"]["1"]
        assert len(row["chosen"]) == 2 and all(0 <= a <= 1 for a in row["accuracies"])


def test_few_shot_needs_test_rows_and_valid_shots(two_layer_cache, tmp_path):
    with pytest.raises(ConfigError, match="test rows"):
        run_probe(ProbeConfig(str(two_layer_cache), out=str(tmp_path / "x"), classifier="knn-vote", shots=(1,),
                              test_fraction=0.0))
    with pytest.raises(ConfigError, match="--shots"):
        ProbeConfig("c.h5", shots=(0,))
    assert ProbeConfig("c.h5", shots=("5,1", 2)).shots == (1, 2, 5)


def test_layer_sweep_trains_every_layer_on_one_split(two_layer_cache, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["probe", str(two_layer_cache), "--layer", "all", "--classifier", "knn-vote", "--out", str(out),
                 "--json"]) == 0
    sweep = json.loads(capsys.readouterr().out)
    assert [r["layer"] for r in sweep["layers"]] == ["avgpool", "layer2"]
    assert [r["dim"] for r in sweep["layers"]] == [512, 128]
    for r in sweep["layers"]:
        alone = run_probe(ProbeConfig(str(two_layer_cache), out=str(tmp_path / r["layer"]), classifier="knn-vote",
                                      layer=r["layer"]))
        assert (r["val_accuracy"], r["test_accuracy"]) == (alone["val_accuracy"], alone["test_accuracy"])
        assert json.loads((out / r["layer"] / "report.json").read_text())["layer"] == r["layer"]
    best = max(sweep["layers"], key=lambda r: r["val_accuracy"])
    assert sweep["best"] == best["layer"] and sweep["test_accuracy"] == best["test_accuracy"]
    assert (out / "layers.png").stat().st_size > 1000 and (out / "sweep.json").is_file()
    with pytest.raises(ConfigError, match="layer sweep.*avgpool"):
        evaluate_probe(out, two_layer_cache)
    assert evaluate_probe(out / sweep["best"], two_layer_cache)["rows"] == 70  # each folder is a probe
    plot = tmp_path / "elsewhere" / "acc.png"
    assert main(["probe", str(two_layer_cache), "--layer", "all", "--classifier", "knn-vote", "--out", str(out),
                 "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"* {sweep['best']}" in text


def test_layer_sweep_of_a_single_layer_cache_runs_that_layer(tmp_path):
    tree = make_tree(tmp_path / "images", classes=("a", "b"), per_class=6)
    embed(fast_config(tree, tmp_path / "one.h5"))
    sweep = run_probe(ProbeConfig(str(tmp_path / "one.h5"), layer="all", classifier="knn-vote"))
    assert [r["layer"] for r in sweep["layers"]] == ["avgpool"] and sweep["best"] == "avgpool"


def test_pipeline_probe_step_with_knn_vote_and_shots(two_layer_cache, tmp_path, capsys):
    toml = tmp_path / "eval.toml"
    toml.write_text(f"""
[pipeline]
name = "evaluation"

[[steps]]
run = "probe"
cache = "{two_layer_cache}"
classifier = "knn-vote"
shots = [1, 2]
draws = 2
out = "knn"
label = "k-NN vote"
""")
    (report,) = [r.as_dict() for r in run_pipeline(toml, progress=False)]  # the step validates its keys like the CLI
    assert report["classifier"] == "knn-vote" and set(report["few_shot"]["shots"]) == {"1", "2"}
    assert (tmp_path / "knn" / "classifier.joblib").is_file()
    printed = capsys.readouterr().out
    assert "k-NN vote" in printed and "few-shot" in printed


def test_the_shipped_evaluation_pipeline_validates():
    from pathlib import Path

    from embedder.cli.pipeline import load_pipeline

    name, steps = load_pipeline(Path(__file__).parent.parent / "pipelines" / "evaluation.toml")
    probes = [s.config for s in steps if s.kind == "probe"]
    assert name == "evaluation" and [p.classifier for p in probes] == ["probe", "knn-vote", "knn-vote"]
    assert probes[1].shots == (1, 2, 5, 10) and probes[2].layer == "all"
