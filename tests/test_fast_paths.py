"""Fast paths (--precision int8, bf16, fast) and their fidelity cards (embedder.extract.fidelity, issue 29)."""

from __future__ import annotations

import json
import subprocess

import h5py
import numpy as np
import pytest

from embedder.cache.reader import FeatureCache
from embedder.errors import ConfigError
from embedder.extract.core import embed_images
from embedder.extract.fidelity import Gates, fidelity_card, knn_overlap
from embedder.extract.local import embed
from embedder.models.onnx import cache_root
from embedder.search.query import query_backbone
from tests.conftest import embedder_cmd, env_with_repo, fast_config, make_tree, write_image
from tests.test_cache import read_all


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("fidelity") / "src", classes=("a", "b", "c"), per_class=10)


def cfg(source, out, **overrides):
    # Random-init weights on random pictures: their class is noise, so on ~20 images the probe's accuracy
    # swings by whole images; the accuracy gate is tested on its own (test_card_figures_...).
    # MinMax: no histograms to build, the quickest of ONNX Runtime's calibration methods.
    return fast_config(source, out, **{"runtime": "auto", "calibration_images": 8, "max_accuracy_drop": 100.0,
                                       "calibration": "minmax", **overrides})


def _cosines(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_int8_run_stores_its_card_shown_by_info_and_its_quantised_graph_is_reused(tree, tmp_path):
    exact = embed(cfg(tree, tmp_path / "fp32.h5", precision="auto"))
    assert exact.config["precision"] == "fp32" and exact.fidelity is None
    report = embed(cfg(tree, tmp_path / "int8.h5", precision="int8"))
    card = report.fidelity
    assert card["precision"] == "int8" and card["calibration"]["images"] == 8
    assert card["held_aside_images"] == 30 - 8  # every row after the calibration ones, none of them
    int8 = card["cards"]["int8"]
    assert int8["passes"] and int8["mean_cosine"] >= 0.995 and int8["knn_overlap"] >= 0.9
    assert "probe_drop" in int8 and "knn_drop" in int8  # the tree is labelled
    # Each level tried keeps its figures, so a card shows why the levels before the chosen one failed.
    last = int8["attempts"][-1]
    assert last["level"] == int8["level"] and last["failure"] is None
    assert (last["mean_cosine"], last["knn_overlap"], last["speedup"]) == (
        int8["mean_cosine"], int8["knn_overlap"], int8["speedup"])
    quant = json.loads(report.config["quantization"])
    assert quant["calibration_images"] == 8 and quant["per_channel"] and quant["fp32_nodes"] == int8["fp32_nodes"]
    with h5py.File(tmp_path / "int8.h5") as f:
        assert json.loads(f.attrs["fidelity"])["cards"]["int8"]["mean_cosine"] == int8["mean_cosine"]
    # The stored features are the int8 graph's, near fp32's but not equal to them.
    fast, *_ = read_all(tmp_path / "int8.h5")
    ref, *_ = read_all(tmp_path / "fp32.h5")
    cos = _cosines(fast, ref)
    assert cos.min() > 0.99 and not np.array_equal(fast, ref)
    graphs = sorted(p.name for p in cache_root().iterdir() if "-int8-" in p.name)
    again = embed(cfg(tree, tmp_path / "again.h5", precision="int8"))
    assert sorted(p.name for p in cache_root().iterdir() if "-int8-" in p.name) == graphs  # keyed, not rebuilt
    assert again.fingerprint == report.fingerprint
    assert np.array_equal(read_all(tmp_path / "again.h5")[0], fast)
    # A query by image rebuilds the cache's own int8 graph from the graph cache (no calibration images needed).
    with FeatureCache(tmp_path / "int8.h5") as cache:
        components, paths = cache.file_components, cache.paths
    backbone = query_backbone(components)
    assert backbone.config.precision == "int8" and backbone.quantization == quant
    got, _ = embed_images(backbone, [tree / p for p in paths[:4]], batch_size=4)
    assert np.allclose(got, fast[:4], atol=1e-5)
    shown = subprocess.run(embedder_cmd("info", str(tmp_path / "int8.h5")), env=env_with_repo(), capture_output=True,
                           text=True, check=True, timeout=120).stdout
    assert "fidelity card --precision int8 -> int8" in shown and "k-NN@10 overlap" in shown


def test_an_appended_int8_cache_keeps_its_calibration_rows(tmp_path):
    src = make_tree(tmp_path / "src", classes=("b", "c"), per_class=12)
    first = embed(cfg(src, tmp_path / "c.h5", precision="int8", calibration_images=6))
    make_tree(src, classes=("a",), per_class=4, seed=3)  # sorts before: SOURCE's first 6 images change
    report = embed(cfg(src, tmp_path / "c.h5", precision="int8", calibration_images=6))
    assert report.already_cached == 24 and report.total_rows == 28
    assert report.fidelity["calibration"]["paths"] == first.fidelity["calibration"]["paths"]
    assert report.config["quantization"] == first.config["quantization"]


def test_a_path_that_fails_its_gate_is_refused_naming_the_figure_and_the_override(tree, tmp_path):
    out = tmp_path / "strict.h5"
    with pytest.raises(ConfigError, match=r"--precision int8 fails.*mean cosine to fp32 0\.\d+ < 0\.9999999 "
                                          r"\(--min-cosine to accept\)"):
        embed(cfg(tree, out, precision="int8", min_cosine=0.9999999))
    assert not out.exists()
    with pytest.raises(ConfigError, match=r"k-NN@10 overlap.*--min-overlap"):
        embed(cfg(tree, out, precision="bf16", min_cosine=0.0, min_overlap=1.01))


def test_a_fast_path_is_timed_against_the_exact_default_not_its_own_runtime_in_fp32(tree, tmp_path):
    default = embed(cfg(tree, tmp_path / "fp32.h5", precision="auto"))
    report = embed(cfg(tree, tmp_path / "bf16.h5", precision="bf16", min_cosine=0.0, min_overlap=0.0))
    assert report.config["precision"] == "bf16" and "runtime" not in report.config  # bf16 itself runs on torch
    assert default.config["runtime"].startswith("onnxruntime")  # ResNet's exact default
    assert report.fidelity["exact"]["runtime"] == "onnxruntime"  # so the card's speed-up is against it


def test_fast_takes_the_fastest_passing_path_it_measured_and_records_it(tree, tmp_path):
    report = embed(cfg(tree, tmp_path / "fast.h5", precision="fast"))
    card = report.fidelity
    passing = {p: c["img_per_s"] for p, c in card["cards"].items() if c["passes"]}
    best = max(passing, key=passing.get, default="fp32")
    expected = best if best != "fp32" and passing[best] > card["exact"]["img_per_s"] else "fp32"
    assert card["asked"] == "fast" and card["precision"] == expected == report.config["precision"]
    assert set(card["cards"]) == {"int8", "bf16"}
    # Resumed or appended, `fast` keeps what it chose: no second measurement can change the cache's path.
    again = embed(cfg(tree, tmp_path / "fast.h5", precision="fast"))
    assert again.up_to_date and again.config["precision"] == expected


def test_too_few_images_to_calibrate_and_check_is_refused(tmp_path):
    src = make_tree(tmp_path / "src", classes=("a",), per_class=12)
    with pytest.raises(ConfigError, match="needs at least 22 images.*--precision fp32"):
        embed(cfg(src, tmp_path / "c.h5", precision="int8", calibration_images=32))


def test_card_figures_measure_what_they_name():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 16))
    labels = np.repeat(np.arange(4), 10)
    same = fidelity_card({"f": x}, {"f": x.copy()}, labels)
    assert same["mean_cosine"] == pytest.approx(1.0) and same["knn_overlap"] == 1.0
    assert same["probe_drop"] == 0 and same["knn_drop"] == 0
    shuffled = x[rng.permutation(40)]
    moved = fidelity_card({"f": x}, {"f": shuffled}, labels)
    assert moved["mean_cosine"] < 0.5 and moved["knn_overlap"] < 0.5
    assert knn_overlap(x, x * 3.0) == 1.0  # cosine neighbours: the scale does not matter
    assert fidelity_card({"f": x}, {"f": x}, -np.ones(40, np.int64)).get("probe_drop") is None  # no labels
    gates = Gates()
    assert gates.failure(same) is None
    assert "--min-cosine" in gates.failure(moved)
    assert "--max-accuracy-drop" in gates.failure({**same, "knn_drop": 0.6})


def test_cli_refusal_is_one_line_with_exit_2(tree, tmp_path):
    args = ["embed", str(tree), "--model", "resnet18", "--weights", "none", "--image-size", "32", "--out",
            str(tmp_path / "c.h5"), "--precision", "bf16", "--min-overlap", "1.01",
            "--workers", "0", "--quiet"]
    done = subprocess.run(embedder_cmd(*args), env=env_with_repo(), capture_output=True, text=True, timeout=300,
                          check=False)
    errors = [line for line in done.stderr.splitlines() if "fails its fidelity card" in line]
    assert done.returncode == 2 and len(errors) == 1 and "(--min-overlap to accept)" in errors[0]
    assert "Traceback" not in done.stderr and not (tmp_path / "c.h5").exists()


def test_models_card_measures_the_fast_paths_on_sample_images_and_writes_nothing(tree, tmp_path, monkeypatch, capsys):
    from embedder.cli.main import main

    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tree.rglob("*"))
    assert main(["models", "resnet18", "--card", str(tree), "--weights", "none", "--image-size", "32",
                 "--calibration-images", "8", "--fidelity-images", "20", "--json"]) == 0
    card = json.loads(capsys.readouterr().out)["card"]
    assert card["asked"] == "fast" and set(card["cards"]) == {"int8", "bf16"} and card["held_aside_images"] == 20
    carded = [c for c in card["cards"].values() if "mean_cosine" in c]  # a path slower than fp32 is not carded
    assert carded and all(c["failure"] for c in card["cards"].values() if "mean_cosine" not in c)
    for c in carded:
        assert 0 < c["min_cosine"] <= c["mean_cosine"] <= 1 + 1e-6 and 0 <= c["knn_overlap"] <= 1
    passing = {p: c["img_per_s"] for p, c in card["cards"].items() if c["passes"]}
    best = max(passing, key=passing.get, default="fp32")
    assert card["precision"] == (best if best != "fp32" and passing[best] > card["exact"]["img_per_s"] else "fp32")
    calibrated = card["calibration"]["paths"]
    assert len(calibrated) == 8 and all((tree / p).is_file() for p in calibrated)
    assert sorted(p.name for p in tree.rglob("*")) == before and not list(tmp_path.iterdir())  # no cache, nothing
    # the text form shows the entry, then the card
    assert main(["models", "resnet18", "--card", str(tree), "--weights", "none", "--image-size", "32",
                 "--calibration-images", "8", "--fidelity-images", "20"]) == 0
    text = capsys.readouterr().out
    assert "fidelity card" in text and "int8" in text and "bf16" in text and text.index("weights:") < text.index("card")


def test_models_card_shows_its_steps_on_stderr_and_quiet_hides_them(tree, tmp_path, monkeypatch, capsys):
    from embedder.cli.main import main

    monkeypatch.chdir(tmp_path)
    argv = ["models", "resnet18", "--card", str(tree), "--weights", "none", "--image-size", "32",
            "--calibration-images", "8", "--fidelity-images", "20", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("fidelity card:")]
    assert "\r" not in captured.err and lines and lines[-1].startswith("fidelity card: 100%"), captured.err
    done, total = lines[-1].split("|")[2].split()[0].split("/")
    assert done == total and int(total) >= 5  # fp32 build, sample, fp32 pass, >= 1 int8 level, bf16
    assert json.loads(captured.out)["card"]["asked"] == "fast"  # stdout carries the JSON alone
    assert main([*argv, "--quiet"]) == 0
    assert "fidelity card" not in capsys.readouterr().err


@pytest.mark.parametrize("argv, names", [
    (["models", "--card", "x"], "give NAME"),
    (["models", "--all", "resnet", "--card", "x"], "give NAME"),
    (["models", "resnet18", "--weights", "none"], "--weights"),
    (["models", "resnet18", "--calibration-images", "8"], "--calibration-images"),
    (["models", "resnet18", "--card", "/nonexistent/photos"], "/nonexistent/photos"),
])
def test_models_card_refusals_are_one_line_with_exit_2(argv, names, capsys):
    from embedder.cli.main import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and names in err


def test_an_int8_card_is_reused_on_the_same_images_and_measured_again_when_anything_it_depends_on_changes(
        tmp_path, monkeypatch):
    from embedder.extract import cardstore, fidelity

    monkeypatch.setenv("EMBEDDER_CACHE", str(tmp_path / "cache"))  # no card from another test
    source = make_tree(tmp_path / "src", classes=("a", "b", "c"), per_class=10)
    passes = []
    real = fidelity._timed_outputs
    monkeypatch.setattr(fidelity, "_timed_outputs", lambda *a: passes.append(1) or real(*a))
    first = embed(cfg(source, tmp_path / "one.h5", precision="int8"))
    assert "reused" not in first.fidelity and passes and len(list(cardstore.folder().glob("*.json"))) == 1
    passes.clear()
    again = embed(cfg(source, tmp_path / "two.h5", precision="int8"))
    card = again.fidelity
    assert passes == []  # neither path ran over the sample: the stored figures are the card
    assert card["reused"]["seconds"] == first.fidelity["seconds"]
    assert card["cards"] == first.fidelity["cards"] and card["exact"] == first.fidelity["exact"]
    assert again.fingerprint == first.fingerprint
    assert np.array_equal(read_all(tmp_path / "two.h5")[0], read_all(tmp_path / "one.h5")[0])
    shown = subprocess.run(embedder_cmd("info", str(tmp_path / "two.h5")), env=env_with_repo(), capture_output=True,
                           text=True, check=True, timeout=120).stdout
    assert "reused: measured " + card["reused"]["at"] in shown
    # Measured again when anything it depends on changes: the gates, the CPU, a held-aside image's pixels.
    assert "reused" not in embed(cfg(source, tmp_path / "g.h5", precision="int8", min_cosine=0.99)).fidelity
    with monkeypatch.context() as patched:
        patched.setattr(cardstore, "cpu_identity", lambda: "another CPU")
        assert "reused" not in embed(cfg(source, tmp_path / "cpu.h5", precision="int8")).fidelity
    held = next(p for p in sorted(source.rglob("*.png"))
                if p.relative_to(source).as_posix() not in card["calibration"]["paths"])
    write_image(held, np.random.default_rng(1), size=(40, 40))
    assert "reused" not in embed(cfg(source, tmp_path / "px.h5", precision="int8")).fidelity
    # A damaged stored card is measured again and written anew.
    for stored in cardstore.folder().glob("*.json"):
        stored.write_text("{")
    assert "reused" not in embed(cfg(source, tmp_path / "bad.h5", precision="int8")).fidelity
    assert "reused" in embed(cfg(source, tmp_path / "good.h5", precision="int8")).fidelity
