"""Multi-layer caches: several --layer and --style in one pass, each its own dataset, and
probe / index / search picking one with --layer."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from embedder.cache.reader import FeatureCache
from embedder.cache.writer import CacheWriter
from embedder.cli.main import main
from embedder.data.sources import list_source
from embedder.errors import CacheError, CacheMismatchError
from embedder.extract.core import BatchReader, backbone_for, cache_spec, known_columns
from embedder.extract.local import embed
from tests.conftest import cli_args, fast_config

MULTI = {"layer": "layer3", "extra_layers": ("avgpool", "layer1"), "pool": "gem", "style": True, "style_dim": 64}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """These tests run many tiny forward passes; on a shared 2-core machine two intra-op threads
    spin against each other and make them ~4x slower. One thread, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _layers(path):
    with h5py.File(path, "r") as f:
        return {name: f[f"layers/{name}"][:] for name in json.loads(f.attrs["layers"])}


def test_each_layer_is_a_dataset_and_reads_like_a_single_layer_cache(tree, tmp_path):
    multi = fast_config(tree, tmp_path / "multi.h5", commit_every=5, **MULTI)
    embed(multi)
    with h5py.File(multi.out, "r") as f:
        assert json.loads(f.attrs["layers"]) == {"layer3": 256, "avgpool": 512, "layer1": 64, "style": 64}
        assert f["layers/layer3"].id == f["features"].id  # a hard link: the primary layer is stored once
        assert f["layers/style"].shape == (18, 64) and f["layers/layer1"].shape == (18, 64)
        components = json.loads(f.attrs["fingerprint_components"])
    assert json.loads(components["layers"]) == ["layer3", "avgpool", "layer1", "style"]
    assert json.loads(components["style"])["layers"] == ["layer1", "layer2", "layer3", "layer4"]

    # Every layer equals (values and fingerprint) a cache embedded with that layer alone.
    for name, single in [("avgpool", {"layer": "avgpool", "pool": "gem"}), ("layer3", {"layer": "layer3", "pool": "gem"}),
                         ("style", {"layer": "style", "style_dim": 64, "pool": "gem"})]:
        ref = fast_config(tree, tmp_path / f"{name}.h5", **single)
        embed(ref)
        with FeatureCache(multi.out, layer=name) as a, FeatureCache(ref.out) as b:
            assert a.dim == b.dim and a.fingerprint == b.fingerprint and a.components == b.components
            np.testing.assert_allclose(a.features(), b.features(), rtol=1e-5, atol=1e-6)
            assert a.paths == b.paths and np.array_equal(a.labels, b.labels)
    with FeatureCache(multi.out) as c:
        assert c.layer == "layer3" and c.file_fingerprint != c.fingerprint
        np.testing.assert_array_equal(c.features(), _layers(multi.out)["layer3"])
    with FeatureCache(multi.out, layer="pool") as c:  # registry aliases work too
        assert c.layer == "avgpool"
    with pytest.raises(CacheError, match="holds layer3, avgpool, layer1, style"):
        FeatureCache(multi.out, layer="layer2")

    # The layer list is part of the fingerprint: another list is refused, not mixed in.
    with pytest.raises(CacheMismatchError, match="layers"):
        embed(fast_config(tree, multi.out, **{**MULTI, "extra_layers": ("avgpool",)}))


def test_interrupted_and_appended_multi_layer_runs_equal_an_uninterrupted_one(tree, tmp_path):
    full = fast_config(tree, tmp_path / "full.h5", **MULTI)
    embed(full)
    config = fast_config(tree, tmp_path / "c.h5", commit_every=4, **MULTI)
    embed(fast_config(tree, config.out, limit=6, **MULTI))
    listing = list_source(tree)
    backbone = backbone_for(config)
    spec = cache_spec(config, listing, backbone, "test")  # the built-in columns too, as `embed` writes them
    assert spec.layers == dict(backbone.outputs)
    with CacheWriter(config.out, spec, listing, commit_every=4, columns=known_columns(listing, None)[0]) as w:
        batch = BatchReader(listing.root, listing.paths, w.pending[:4], 4, backbone.preprocessing)[0]
        features = {k: v.numpy() for k, v in backbone.forward_all(batch["images"]).items()}
        w.add(batch["indices"], features, batch["errors"], batch["columns"])  # a part; then "dies"
    with FeatureCache(config.out, layer="style") as c:
        assert len(c) == 6 and c.complete  # the old cache is untouched and usable
    report = embed(config)
    assert report.already_cached == 10 and report.embedded == 8
    a, b = _layers(config.out), _layers(full.out)
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_probe_index_and_search_pick_a_layer(tree, tmp_path, capsys):
    config = fast_config(tree, tmp_path / "m.h5", layer="avgpool", style=True, style_dim=32)
    argv = ["embed", *cli_args(config), "--style", "--style-dim", "32", "--layer", "layer2"]
    assert main(argv) == 0
    capsys.readouterr()
    with FeatureCache(config.out) as c:
        assert c.layers == {"avgpool": 512, "layer2": 128, "style": 32}

    assert main(["probe", config.out, "--layer", "layer2", "--out", str(tmp_path / "probe"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layer"] == "layer2"
    assert main(["evaluate", str(tmp_path / "probe"), config.out, "--json"]) == 0  # finds layer2 by itself
    assert json.loads(capsys.readouterr().out)["rows"] == 18
    # layer2 is not what resnet18's fc consumes, so the probe cannot become the network's head
    assert main(["export", str(tmp_path / "probe"), "--out", str(tmp_path / "m.pt")]) == 2
    assert "cannot replace resnet18's classifier from layer 'layer2'" in capsys.readouterr().err

    out = tmp_path / "style_index"
    assert main(["index", config.out, "--layer", "style", "--out", str(out), "--kind", "flat", "--quiet", "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["layer"] == "style" and meta["dim"] == 32
    # search by image rebuilds the style backbone from the fingerprint: the image's own row is its top hit
    image = tree / "dog" / "dog_002.jpg"
    assert main(["search", str(out), "--image", str(image), "-k", "3", "--json", "--layer", "style"]) == 0
    hits = json.loads(capsys.readouterr().out.splitlines()[0])["hits"]
    assert hits[0]["path"] == "dog/dog_002.jpg" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert main(["search", str(out), "--id", "0", "--layer", "layer2"]) == 2
    assert "indexes the layer 'style'" in capsys.readouterr().err
