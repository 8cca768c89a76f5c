"""The public API: `embedder.extract` (row i is image i, whatever the images are) and `embedder.Index`."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch
from PIL import Image

import embedder
from embedder.cache.reader import FeatureCache
from embedder.cli.main import main
from embedder.data.sources import list_source
from embedder.errors import ConfigError, EmbedderError
from embedder.extract.api import MODEL_SETTINGS
from embedder.extract.core import backbone_for, embed_images, load_backbone
from embedder.extract.local import embed
from tests.conftest import fast_config, make_tree, write_image

# fast_config's backbone settings, as extract's keywords (random-init resnet18 at 32 px, fp32, torch)
SMALL = {"weights": "none", "image_size": 32, "device": "cpu", "precision": "fp32", "memory_layout": "contiguous",
         "runtime": "torch"}


@pytest.fixture
def damaged(tmp_path):
    """A labelled tree with one corrupt file inside it, embedded by `embed` (which records it as an error)."""
    tree = make_tree(tmp_path / "img", classes=("a", "b"), per_class=5)
    (tree / "a" / "a_002b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    config = fast_config(tree, tmp_path / "c.h5")
    embed(config)
    return tree, config


def cache_rows(path) -> dict[str, np.ndarray]:
    with FeatureCache(path) as cache:
        return dict(zip(cache.paths, cache.features()))


def test_a_missing_and_a_corrupt_file_keep_the_rows_aligned(damaged):
    tree, config = damaged
    listing = list_source(tree).paths  # embed's order: the same batches, so the same bits
    assert "a/a_002b.jpg" in listing
    files = [tree / p for p in listing] + [tree / "a" / "gone.jpg"]
    X, errors = embedder.extract(files, model="resnet18", batch_size=config.batch_size, errors="return", **SMALL)
    bad = [listing.index("a/a_002b.jpg"), len(files) - 1]
    assert X.dtype == np.float32 and X.shape == (len(files), 512)
    assert [e.index for e in errors] == bad
    assert [e.image for e in errors] == [str(files[i]) for i in bad]
    with FeatureCache(config.out) as cache:
        assert errors[0].reason == dict(cache.errors)["a/a_002b.jpg"]  # the reason embed recorded
    assert errors[1].reason == "file not found"
    assert np.isnan(X[bad]).all() and not np.isnan(np.delete(X, bad, axis=0)).any()
    cached = cache_rows(config.out)
    assert len(cached) == len(files) - 2
    for i, p in enumerate(listing):
        if i not in bad:
            assert np.array_equal(X[i], cached[p]), p  # bit for bit
    # embed_images, the older name, is the same rows with (path, reason) errors
    same, pairs = embed_images(backbone_for(config), files, batch_size=config.batch_size)
    assert np.array_equal(same, X, equal_nan=True)
    assert pairs == [(str(files[i]), e.reason) for i, e in zip(bad, errors)]


def test_pil_images_arrays_bytes_and_tensors_give_the_files_rows(tmp_path):
    rng = np.random.default_rng(3)
    rgb = write_image(tmp_path / "rgb.png", rng, size=(45, 37))
    gray = write_image(tmp_path / "gray.png", rng, size=(33, 50), mode="L")
    photo = write_image(tmp_path / "photo.jpg", rng, size=(40, 52))
    rgba = tmp_path / "rgba.png"
    Image.fromarray(rng.integers(0, 256, (30, 41, 4), dtype=np.uint8), "RGBA").save(rgba)
    backbone = load_backbone("resnet18", **SMALL)
    for path in (rgb, gray, photo, rgba):
        with Image.open(path) as img:
            img.load()
            pixels = np.asarray(img)
            inputs = [path, str(path), path.read_bytes(), img, pixels]
            if pixels.ndim == 3:
                inputs.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))  # torchvision's [C, H, W]
            X = embedder.extract(inputs, model=backbone, batch_size=1)  # batches of one: each row alone
        assert not np.isnan(X).any()
        for i in range(1, len(X)):
            assert np.array_equal(X[i], X[0]), (path.name, type(inputs[i]).__name__)
    # an [N, H, W, 3] array is N images
    stack = np.stack([np.asarray(Image.open(rgb))] * 2)
    assert np.array_equal(embedder.extract(stack, model=backbone, batch_size=1),
                          embedder.extract([rgb, rgb], model=backbone, batch_size=1))


def test_errors_raise_names_the_file(damaged):
    tree, _ = damaged
    files = [tree / "a" / "a_000.jpg", tree / "a" / "a_002b.jpg", tree / "a" / "gone.jpg"]
    with pytest.raises(EmbedderError, match=r"a_002b\.jpg \(image 1\) cannot be used: truncated image") as raised:
        embedder.extract(files, model="resnet18", **SMALL)  # errors="raise" is the default
    assert "gone.jpg" not in str(raised.value)  # one error: the first


def test_inputs_that_are_not_images_are_refused_before_the_model_is_built(tmp_path):
    for images, said in [([np.zeros((8, 8, 3), np.float32)], "uint8"), ([np.zeros((8, 8, 5), np.uint8)], "C = 1"),
                         ([3], "give a path"), ("a.jpg", "list of images")]:
        with pytest.raises(ConfigError, match=said):
            embedder.extract(images, model="no_such_model")
    with pytest.raises(ConfigError, match="errors must be"):
        embedder.extract([], model="resnet18", errors="ignore")


def test_a_built_backbone_is_reused_and_its_settings_are_not_overridden():
    backbone = load_backbone("resnet18", **SMALL)
    assert embedder.extract([], model=backbone).shape == (0, 512)
    with pytest.raises(ConfigError, match="layer cannot change a backbone already built"):
        embedder.extract([], model=backbone, layer="layer3")


def test_extract_defaults_are_load_backbones():
    ours, theirs = inspect.signature(embedder.extract.api.extract).parameters, inspect.signature(load_backbone).parameters
    assert {n: ours[n].default for n in MODEL_SETTINGS} == {n: theirs[n].default for n in MODEL_SETTINGS}


# ------------------------------------------------------------------------------------------ Index


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_index_from_array_finds_each_row_itself_first(metric):
    X = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)
    names = [f"img/{i:02d}.jpg" for i in range(50)]
    index = embedder.Index.from_array(X, paths=names, metric=metric, columns={"odd": np.arange(50) % 2})
    assert len(index) == 50 and index.dim == 16 and index.metric == metric
    for queries in (X, list(range(50)), np.arange(50)):  # by vector, by row id
        scores, ids, paths = index.search(queries, k=4)
        assert ids.shape == scores.shape == (50, 4)
        assert (ids[:, 0] == np.arange(50)).all()
        assert [p[0] for p in paths] == names
        order = -scores if metric == "cosine" else scores
        assert (np.diff(order, axis=1) >= -1e-6).all()  # nearest first
    # the exact neighbours, as a brute-force computation gives them
    d = ((X[:, None] - X[None]) ** 2).sum(-1) if metric == "l2" else -(
        (X / np.linalg.norm(X, axis=1, keepdims=True)) @ (X / np.linalg.norm(X, axis=1, keepdims=True)).T)
    assert (index.search(X, k=4).ids == np.argsort(d, axis=1, kind="stable")[:, :4]).all()
    kept = index.search(X[:5], k=30, where="odd == 1 and id < 40")
    assert kept.ids.shape == (5, 30) and (kept.ids[:, :20] % 2 == 1).all() and (kept.ids[:, 20:] == -1).all()
    assert np.isnan(kept.scores[:, 20:]).all() and kept.paths[0][20:] == [None] * 10


def test_index_from_array_refuses_what_it_cannot_index():
    X = np.ones((3, 4), np.float32)
    with pytest.raises(ConfigError, match="every value must be a finite"):
        embedder.Index.from_array(np.vstack([X, np.full((1, 4), np.nan)]))  # an image that failed: a NaN row
    with pytest.raises(ConfigError, match="paths has 2 values for the 3 rows"):
        embedder.Index.from_array(X, paths=["a", "b"])
    index = embedder.Index.from_array(X)
    assert index.paths is None and index.search(0, k=2).paths is None
    with pytest.raises(ConfigError, match="Row id 3 is not in the index"):
        index.search([3])
    with pytest.raises(ConfigError, match="4 values; this index holds 4-d|holds 4-d"):
        index.search(np.ones((1, 5), np.float32))


def test_index_build_and_open_give_the_hits_of_embedder_search(tmp_path, capsys):
    tree = make_tree(tmp_path / "img", classes=("a", "b"), per_class=5)
    config = fast_config(tree, tmp_path / "c.h5")
    embed(config)
    built = embedder.Index.build(config.out, tmp_path / "idx")
    opened = embedder.Index.open(tmp_path / "idx")
    assert len(built) == len(opened) == 10 and built.meta["kind"] == "flat" and built.paths == opened.paths
    with FeatureCache(config.out) as cache:
        assert opened.paths == cache.paths
        X = cache.features()
    for row in (0, 3, 7):
        assert main(["search", str(tmp_path / "idx"), "--id", str(row), "-k", "5", "--json"]) == 0
        cli = json.loads(capsys.readouterr().out)["hits"]
        for index in (built, opened):
            for queries in ([row], X[row]):
                found = index.search(queries, k=5)
                assert found.ids[0].tolist() == [h["id"] for h in cli]
                assert found.paths[0] == [h["path"] for h in cli]
                np.testing.assert_allclose(found.scores[0], [h["score"] for h in cli], rtol=1e-5, atol=1e-6)
    assert main(["search", str(tmp_path / "idx"), "--id", "3", "-k", "5", "--where", "label == 'b'", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)["hits"]
    assert opened.search(3, k=5, where="label == 'b'").ids[0].tolist() == [h["id"] for h in cli]
    # by image, through the cache's own backbone: as `search --image`; a failed image answers with no hits
    image = tree / opened.paths[3]
    assert main(["search", str(tmp_path / "idx"), "--image", str(image), "-k", "5", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)["hits"]
    Q, errors = opened.extract([image, tmp_path / "gone.jpg"], errors="return")
    assert [e.index for e in errors] == [1] and np.isnan(Q[1]).all()
    found = opened.search(Q, k=5)
    assert found.ids[0].tolist() == [h["id"] for h in cli] and found.ids[0, 0] == 3
    assert (found.ids[1] == -1).all() and found.paths[1] == [None] * 5
    with pytest.raises(ConfigError, match="has no model"):
        embedder.Index.from_array(X).extract([image])
    # a Query (negatives, a range, a filter, rows left out): the one path the CLI and the service answer through
    from embedder import Example, Query

    asked = Query(positives=(Example.of_id(0),), negatives=(Example.of_id(7),), k=4, exclude_examples=True)
    assert main(["search", str(tmp_path / "idx"), "--id", "0", "--negative-id", "7", "-k", "4",
                 "--exclude-examples", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)["hits"]
    found = opened.search(asked)
    assert found.ids[0].tolist() == [h["id"] for h in cli] and 0 not in found.ids[0] and 7 not in found.ids[0]
    ranged = opened.search(Query(positives=(Example.of_id(2),), k=None, threshold=-1.0, where="label == 'a'"))
    assert sorted(ranged.ids[0].tolist()) == [i for i, p in enumerate(opened.paths) if p.startswith("a/")]
    memory = embedder.Index.from_array(X, paths=opened.paths)  # in memory, through the same `answer`
    assert memory.search(asked).ids.tolist() == found.ids.tolist() and memory.search(asked).paths == found.paths


def test_the_public_names_import_lazily_from_a_fresh_interpreter():
    """`embedder.extract` is the subpackage made callable: reachable as an attribute before anything imported it."""
    import subprocess
    import sys

    from tests.conftest import env_with_repo

    code = ("import sys, embedder\n"
            "assert callable(embedder.extract) and 'torch' not in sys.modules\n"
            "from embedder import *\n"
            "print(sorted(n for n in embedder.__all__ if n in globals()))")
    proc = subprocess.run([sys.executable, "-c", code], env=env_with_repo(), capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(sorted(embedder.__all__))


# A class that users get from its constructors, not its __init__ (which takes internals).
BUILT_BY = {"Index": ("from_array", "build", "open")}


def _public_callables():
    """(name, object) of every public name of `embedder.__all__` and the public methods of its classes."""
    for name in embedder.__all__:
        obj = embedder.extract.api.extract if name == "extract" else getattr(embedder, name)
        if name.startswith("__") or (inspect.isclass(obj) and issubclass(obj, BaseException)):
            continue
        if not inspect.isclass(obj):
            yield name, obj
            continue
        if name not in BUILT_BY:
            yield name, obj
        for member, value in vars(obj).items():
            if not member.startswith("_") and (inspect.isfunction(value) or isinstance(value, (classmethod, staticmethod))):
                yield f"{name}.{member}", getattr(obj, member)


def _doc_problems(name: str, obj) -> list[str]:
    doc = inspect.getdoc(obj) or ""
    params = [p for p in inspect.signature(obj).parameters.values() if p.name not in ("self", "cls")]
    problems = [f"{name}: {p.name} has no type hint" for p in params if p.annotation is inspect.Parameter.empty]
    if not doc:
        problems.append(f"{name}: no docstring")
    elif params and "Parameters\n----------" not in doc:
        problems.append(f"{name}: no numpydoc Parameters section")
    returns = inspect.signature(obj).return_annotation
    # A function of no arguments says what it returns in its summary line (`list_backbones`).
    if params and returns not in (None, "None", inspect.Signature.empty) and not inspect.isclass(obj) \
            and not any(s in doc for s in ("Returns\n-------", "Yields\n------")):
        problems.append(f"{name}: no numpydoc Returns section")
    return problems


def test_every_public_function_and_class_has_type_hints_and_numpydoc_sections():
    seen = dict(_public_callables())
    assert {"extract", "Index.search", "Index.from_array", "LinearProbe.fit", "EmbedConfig.of", "FeatureCache.features",
            "load_backbone", "embed"} <= set(seen)
    problems = [p for name, obj in seen.items() for p in _doc_problems(name, obj)]
    assert problems == []
    # The settings' entries come from their one declaration (FeatureSpace's options), not a second text.
    from embedder.models.space import FeatureSpace
    from embedder.options import specs

    for spec in specs(FeatureSpace):
        assert spec.option.help.rstrip(".")[:40] in " ".join(inspect.getdoc(FeatureSpace).split()), spec.name
    assert "pool : {'avg'" in inspect.getdoc(embedder.extract.api.extract)
    assert "precision : {'auto'" in inspect.getdoc(embedder.load_backbone)
