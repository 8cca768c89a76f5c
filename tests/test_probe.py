"""Training on cached features: the probe estimator, sklearn classifiers, export and predict."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from sklearn.utils.estimator_checks import parametrize_with_checks

from embedder.cache.reader import FeatureCache
from embedder.cli.main import main
from embedder.errors import CacheMismatchError, ConfigError
from embedder.extract.core import embed_images
from embedder.extract.local import embed
from embedder.learn.checkpoint import load_classifier
from embedder.learn.export import export_probe
from embedder.learn.knn import KNNVote
from embedder.learn.predict import predict
from embedder.learn.probe import LinearProbe
from embedder.learn.probefile import ProbeFile, read_probe, write_probe
from embedder.learn.train import ProbeConfig, evaluate_probe, run_probe
from tests.conftest import fast_config, make_tree

FAST_CS = (0.01, 1.0, 100.0)


@parametrize_with_checks([LinearProbe(Cs=FAST_CS, device="cpu"), KNNVote(ks=(1, 3, 10))])
def test_sklearn_estimator_checks(estimator, check):
    assert check(estimator) is None  # each scikit-learn check raises when the estimator breaks a rule


def blobs(n_per_class=60, dim=32, k=4, sep=6.0, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim)) * sep
    X = np.concatenate([c + rng.normal(size=(n_per_class, dim)) for c in centers]).astype(np.float32)
    y = np.repeat(np.array([f"c{i}" for i in range(k)]), n_per_class)
    return X, y


def test_probe_separates_separable_features():
    X, y = blobs()
    probe = LinearProbe(Cs=FAST_CS, device="cpu").fit(X[::2], y[::2])
    assert (probe.predict(X[1::2]) == y[1::2]).mean() >= 0.99
    assert probe.coef_.shape == (4, 32) and list(probe.classes_) == ["c0", "c1", "c2", "c3"]
    np.testing.assert_allclose(probe.predict_proba(X).sum(1), 1, rtol=1e-5)
    assert {r["C"] for r in probe.cv_results_} == set(FAST_CS)


def test_sweep_picks_strong_regularisation_when_features_are_noise():
    """Labels unrelated to 200 noisy dims and a handful of informative rows: the sweep must not
    pick the weakest regularisation (which memorises noise)."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(120, 200)).astype(np.float32)
    y = (X[:, 0] > 0).astype(int)
    X[:, 0] *= 0.3
    probe = LinearProbe(Cs=(1e-3, 1e-2, 1e-1, 1.0, 1e2, 1e4), device="cpu").fit(X, y)
    assert probe.C_ < 1e4


@pytest.fixture(scope="module")
def labelled_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    tree = make_tree(root / "images", classes=("ant", "bee", "cat"), per_class=10, seed=4)
    out = root / "feats.h5"
    embed(fast_config(tree, out))
    return tree, out


def test_probe_report_artifacts_and_json(labelled_cache, tmp_path, capsys):
    _, cache = labelled_cache
    out = tmp_path / "probe"
    assert main(["probe", str(cache), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("train_accuracy", "val_accuracy", "test_accuracy", "per_class", "chosen", "fingerprint"):
        assert key in report
    assert report["splits"] == {"train": 18, "val": 6, "test": 6, "how": "stratified 60%/20%/20%, seed 0"}
    assert set(report["per_class"]) == {"ant", "bee", "cat"}
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    saved = torch.load(out / "probe.pt", weights_only=True)
    with FeatureCache(cache) as c:
        assert saved["fingerprint"] == c.fingerprint and saved["classes"] == c.classes
    assert saved["C"] == report["chosen"]["C"]


def test_streaming_from_blocks_matches_in_memory(labelled_cache, tmp_path):
    _, cache = labelled_cache
    mem = run_probe(ProbeConfig(str(cache), out=str(tmp_path / "a"), Cs=FAST_CS, device="cpu"))
    # 18 train rows x 512 floats = 36 KiB: a 16 KiB budget forces several streamed blocks.
    streamed = run_probe(ProbeConfig(str(cache), out=str(tmp_path / "b"), Cs=FAST_CS, device="cpu",
                                     memory_budget=32 << 10))
    assert mem["chosen"]["streamed"] is False and streamed["chosen"]["streamed"] is True
    assert mem["chosen"]["C"] == streamed["chosen"]["C"]
    a = torch.load(tmp_path / "a" / "probe.pt", weights_only=True)["coef"]
    b = torch.load(tmp_path / "b" / "probe.pt", weights_only=True)["coef"]
    # Same objective and optimiser; only the float32 summation order differs.
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)
    assert evaluate_probe(tmp_path / "a", cache)["predictions"] == evaluate_probe(tmp_path / "b", cache)["predictions"]


@pytest.mark.parametrize("name", ["knn", "ridge"])
def test_sklearn_classifiers_are_reported_the_same_way(labelled_cache, tmp_path, name):
    _, cache = labelled_cache
    report = run_probe(ProbeConfig(str(cache), out=str(tmp_path / name), classifier=name))
    assert report["classifier"] == name and 0 <= report["test_accuracy"] <= 1
    assert (tmp_path / name / "classifier.joblib").is_file()
    assert evaluate_probe(tmp_path / name, cache)["rows"] == 30


def test_exported_model_predicts_like_the_probe(labelled_cache, tmp_path):
    tree, cache = labelled_cache
    run_probe(ProbeConfig(str(cache), out=str(tmp_path / "p"), Cs=FAST_CS, device="cpu"))
    model_path = export_probe(tmp_path / "p", tmp_path / "model.pt")
    classifier = load_classifier(model_path, device="cpu", runtime="torch")
    with FeatureCache(cache) as c:
        paths, features = c.paths, c.features()
    head = classifier.network.body.get_submodule("fc")
    assert isinstance(head, torch.nn.Linear) and tuple(head.weight.shape) == (3, 512)
    logits, errors = embed_images(classifier.network, [tree / p for p in paths], batch_size=4)
    assert not errors and logits.shape == (30, 3)
    probe_pred = evaluate_probe(tmp_path / "p", cache)["predictions"]
    assert [classifier.classes[i] for i in logits.argmax(1)] == probe_pred
    saved = torch.load(tmp_path / "p" / "probe.pt", weights_only=True)
    expected = features @ saved["coef"].numpy().T + saved["intercept"].numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    # The backbone inside stays eval-locked.
    classifier.train()
    assert not any(m.training for m in classifier.modules())


def test_predict_cli(labelled_cache, tmp_path, capsys):
    tree, cache = labelled_cache
    run_probe(ProbeConfig(str(cache), out=str(tmp_path / "p"), Cs=FAST_CS, device="cpu"))
    assert main(["export", str(tmp_path / "p"), "--out", str(tmp_path / "m.pt")]) == 0
    (tree.parent / "broken.jpg").write_bytes(b"nope")
    capsys.readouterr()
    # Every readable image is labelled, and the unreadable one fails the command (exit 2, issue 24).
    assert main(["predict", str(tmp_path / "m.pt"), str(tree / "ant"), str(tree.parent / "broken.jpg"), "--json"]) == 2
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 11 and rows[-1]["error"]
    assert all(r["label"] in ("ant", "bee", "cat") and 0 < r["probability"] <= 1 for r in rows[:-1])


def test_predict_returns_what_the_cli_prints(labelled_cache, tmp_path, capsys):
    tree, cache = labelled_cache
    run_probe(ProbeConfig(str(cache), out=str(tmp_path / "p"), Cs=FAST_CS, device="cpu"))
    model = export_probe(tmp_path / "p", tmp_path / "m.pt")
    (tmp_path / "broken.jpg").write_bytes(b"nope")
    with FeatureCache(cache) as c:
        paths = [str(tree / p) for p in c.paths]
    results = predict(model, [str(tmp_path / "broken.jpg"), *paths], top_k=2, device="cpu")
    assert [r["path"] for r in results] == [*paths, str(tmp_path / "broken.jpg")]  # decoded first, failures last
    assert "error" in results[-1] and not any("error" in r for r in results[:-1])
    assert [r["label"] for r in results[:-1]] == evaluate_probe(tmp_path / "p", cache)["predictions"]
    for r in results[:-1]:
        assert len(r["top"]) == 2 and r["top"][0] == {"label": r["label"], "probability": r["probability"]}
        assert r["top"][0]["probability"] >= r["top"][1]["probability"]
    capsys.readouterr()
    assert main(["predict", str(model), *paths[:3], "--top-k", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == results[:3]


def test_probe_file_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    written = ProbeFile(coef=torch.randn(3, 8, generator=g), intercept=torch.randn(3, generator=g),
                        classes=["a", "b", "c"], model="resnet18", layer="avgpool", fingerprint="f" * 64,
                        components={"model": "resnet18", "pooling": "avg"}, C=0.5)
    write_probe(tmp_path / "probe.pt", written)
    raw = torch.load(tmp_path / "probe.pt", weights_only=True)
    assert raw["format"] == "embedder-probe/1" and json.loads(raw["components"]) == written.components
    for where in (tmp_path, tmp_path / "probe.pt"):  # the folder or the file itself
        read = read_probe(where)
        assert torch.equal(read.coef, written.coef) and torch.equal(read.intercept, written.intercept)
        assert (read.classes, read.model, read.layer, read.fingerprint, read.components, read.C) == (
            written.classes, written.model, written.layer, written.fingerprint, written.components, written.C)
        assert read.path == tmp_path / "probe.pt"


def test_probe_file_refusals_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="No linear probe in .* Train one with `embedder probe"):
        read_probe(tmp_path)
    with pytest.raises(ConfigError, match="^--init-head: no probe.pt in .* Pass the output directory"):
        read_probe(tmp_path, option="--init-head")
    (tmp_path / "classifier.joblib").write_bytes(b"")
    with pytest.raises(ConfigError, match="holds a scikit-learn classifier; this needs a linear probe"):
        read_probe(tmp_path)
    (tmp_path / "probe.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="probe.pt is not a readable probe file"):
        read_probe(tmp_path)
    torch.save({"coef": torch.zeros(2, 2), "classes": ["a", "b"]}, tmp_path / "probe.pt")
    with pytest.raises(ConfigError, match="is not a linear probe \\(it needs the keys coef, intercept"):
        read_probe(tmp_path)
    torch.save({"format": "embedder-probe/2", "coef": torch.zeros(2, 2), "intercept": torch.zeros(2),
                "classes": ["a", "b"], "model": "resnet18", "layer": "avgpool"}, tmp_path / "probe.pt")
    with pytest.raises(ConfigError, match="'embedder-probe/2' file; this version of embedder reads embedder-probe/1"):
        read_probe(tmp_path)


def test_export_refuses_a_probe_without_its_cache_components(tmp_path):
    torch.save({"coef": torch.zeros(2, 512), "intercept": torch.zeros(2), "classes": ["a", "b"],
                "model": "resnet18", "layer": "avgpool"}, tmp_path / "probe.pt")  # enough for --init-head only
    with pytest.raises(ConfigError, match="does not record the cache it was trained on"):
        export_probe(tmp_path, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_vgg_fc7_head_goes_into_classifier_6(tmp_path):
    tree = make_tree(tmp_path / "img", classes=("a", "b"), per_class=5)
    cache = tmp_path / "vgg.h5"
    embed(fast_config(tree, cache, model="vgg11", layer="fc7"))
    run_probe(ProbeConfig(str(cache), out=str(tmp_path / "p"), Cs=(1.0,), device="cpu"))
    clf = load_classifier(export_probe(tmp_path / "p", tmp_path / "m.pt"), device="cpu", runtime="torch")
    head = clf.network.body.get_submodule("classifier.6")
    assert tuple(head.weight.shape) == (2, 4096)
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    assert clf(x).shape == (3, 2)


# -- bad input -------------------------------------------------------------------------------


def test_cache_without_labels_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    from tests.conftest import write_image

    for i in range(6):
        write_image(tmp_path / "flat" / f"{i}.png", rng)
    embed(fast_config(tmp_path / "flat", tmp_path / "c.h5"))
    with pytest.raises(ConfigError, match="no labels"):
        run_probe(ProbeConfig(str(tmp_path / "c.h5")))


def test_single_class_and_tiny_class_are_refused(tmp_path):
    one = make_tree(tmp_path / "one", classes=("only",), per_class=6)
    embed(fast_config(one, tmp_path / "one.h5"))
    with pytest.raises(ConfigError, match="single class"):
        run_probe(ProbeConfig(str(tmp_path / "one.h5")))
    tiny = make_tree(tmp_path / "tiny", classes=("big",), per_class=8)
    make_tree(tiny, classes=("small",), per_class=2, seed=9)
    embed(fast_config(tiny, tmp_path / "tiny.h5"))
    with pytest.raises(ConfigError, match="'small' has 2"):
        run_probe(ProbeConfig(str(tmp_path / "tiny.h5")))


def test_train_and_val_caches_must_share_a_fingerprint(labelled_cache, tmp_path):
    tree, cache = labelled_cache
    other = tmp_path / "other.h5"
    embed(fast_config(tree, other, image_size=48))
    with pytest.raises(CacheMismatchError, match="preprocessing"):
        run_probe(ProbeConfig(str(cache), val_cache=str(other)))


def test_probe_applied_to_another_backbone_is_refused(labelled_cache, tmp_path):
    tree, cache = labelled_cache
    run_probe(ProbeConfig(str(cache), out=str(tmp_path / "p"), Cs=FAST_CS, device="cpu"))
    other = tmp_path / "r34.h5"
    embed(fast_config(tree, other, model="resnet34"))
    with pytest.raises(CacheMismatchError, match="model"):
        evaluate_probe(tmp_path / "p", other)


def test_val_cache_is_used_for_selection(labelled_cache, tmp_path):
    _tree, cache = labelled_cache
    report = run_probe(ProbeConfig(str(cache), val_cache=str(cache), out=str(tmp_path / "p"), Cs=FAST_CS,
                                   device="cpu"))
    assert report["splits"]["how"] == "separate caches" and report["splits"]["val"] == 30
    assert report["test_accuracy"] is None and report["evaluated_on"] == "val"


@pytest.mark.slow
def test_real_lite0_features_of_digits_pass_a_floor(tmp_path):
    """Every third digit image (599), real EfficientNet-Lite0 weights, the probe's own split."""
    from embedder.data.samples import make_samples

    digits = make_samples(tmp_path, only=["digits"])["digits"]
    files = sorted(p.relative_to(digits).as_posix() for p in digits.rglob("*.png"))[::3]
    lst = digits / "every_third.csv"
    lst.write_text("".join(f"{f},{f.split('/')[0]}\n" for f in files))
    cache = tmp_path / "digits.h5"
    embed(fast_config(lst, cache, model="efficientnet_lite0", weights="DEFAULT", image_size=None, batch_size=32,
                      memory_layout="auto"))
    report = run_probe(ProbeConfig(str(cache), out=str(tmp_path / "p"), device="cpu"))
    with h5py.File(cache) as f:
        assert f["features"].shape == (599, 1280)
    # Measured 0.842 on this subset (120 test images); the full 1,797-image set gives 0.947.
    assert report["test_accuracy"] >= 0.82, report["test_accuracy"]


def test_zero_test_fraction_means_no_test_split():
    from embedder.data.splits import assign_splits

    paths = [f"{c}/{i}.png" for c in "ab" for i in range(10)]
    labels = np.array([0] * 10 + [1] * 10)
    s = assign_splits(paths, labels, ["a", "b"], test_fraction=0.0)
    assert len(s.test) == 0 and len(s.train) + len(s.val) == 20 and not set(s.train) & set(s.val)
    s = assign_splits(paths, labels, ["a", "b"])
    assert (len(s.train), len(s.val), len(s.test)) == (12, 4, 4)


STANDALONE = """
import json, sys
import numpy as np, onnxruntime, torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
described = json.load(open(sys.argv[1]))
pre = described["preprocessing"]
geometry = v2.Compose([v2.Resize(pre["resize_size"], interpolation=InterpolationMode(pre["interpolation"]),
                                 antialias=pre["antialias"]), v2.CenterCrop(pre["crop_size"])])
pixels = np.stack([geometry(torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1)).numpy()
                   for p in sys.argv[3:]]).astype(np.float32) / np.float32(255)
session = onnxruntime.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
logits = session.run([described["output"]], {described["input"]: pixels})[0]
assert not any(m == "embedder" or m.startswith("embedder.") for m in sys.modules)
print(json.dumps({"labels": [described["classes"][i] for i in logits.argmax(1)], "logits": logits.tolist()}))
"""


def test_an_exported_classifier_runs_without_embedder_and_predicts_as_predict_does(labelled_cache, tmp_path):
    import json
    import subprocess
    import sys

    from embedder.learn.export import standalone_paths
    from embedder.learn.predict import predict

    tree, cache = labelled_cache
    run_probe(ProbeConfig(str(cache), out=str(tmp_path / "p"), Cs=FAST_CS, device="cpu"))
    model_path = export_probe(tmp_path / "p", tmp_path / "model.pt")
    graph, described = standalone_paths(model_path)
    assert graph.is_file() and json.loads(described.read_text())["classes"] == ["ant", "bee", "cat"]
    images = sorted(str(p) for p in tree.rglob("*.*"))[:12]
    # A clean interpreter with no embedder on its path: onnxruntime, numpy, PIL and torchvision's transforms.
    done = subprocess.run([sys.executable, "-I", "-c", STANDALONE, str(described), str(graph), *images],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    outside = json.loads(done.stdout)
    ours = predict(model_path, images, device="cpu", runtime="torch")
    assert outside["labels"] == [r["label"] for r in ours]
    logits = np.array(outside["logits"])
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits), 1).numpy().max(1),
                               [r["probability"] for r in ours], rtol=1e-4, atol=1e-5)
