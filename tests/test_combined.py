"""`--layer a+b`: one output made of several layers' pooled outputs side by side (DINOv2's linear
eval concatenates the last blocks' class tokens), through the backbone, ONNX Runtime, the cache
and search by image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedder.cache.reader import FeatureCache
from embedder.errors import ConfigError
from embedder.extract.core import load_backbone
from embedder.extract.local import embed
from embedder.models.onnx import MIN_COSINE
from embedder.search.build import build_index
from embedder.search.query import SearchIndex
from tests.conftest import fast_config, make_tree
from tests.test_onnx import SMALL, min_cosine

IMAGES = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("model", "parts", "pool"), [
    ("timm:vit_tiny_patch16_224", ("blocks.10", "blocks.11"), "cls"),
    ("resnet18", ("layer3", "layer4"), "avg"),
])
def test_a_combined_layer_is_its_parts_side_by_side_bit_for_bit(model, parts, pool):
    combined = load_backbone(model, "none", layer="+".join(parts), pool=pool, runtime="torch", **SMALL)
    separate = load_backbone(model, "none", layer=parts[0], extra_layers=parts[1:], pool=pool, runtime="torch",
                             **SMALL)
    expected = separate.forward_all(IMAGES)
    assert combined.feature_dim == sum(separate.outputs.values())
    assert torch.equal(combined(IMAGES), torch.cat([expected[p] for p in parts], dim=1))


def test_l2_normalises_the_whole_vector_and_onnx_runtime_gives_the_same():
    kw = dict(SMALL, layer="layer3+layer4", normalize="l2")
    torch_pass = load_backbone("resnet18", "none", runtime="torch", **kw)(IMAGES)
    assert torch.allclose(torch_pass.norm(dim=1), torch.ones(len(IMAGES)), atol=1e-6)
    onnx = load_backbone("resnet18", "none", runtime="onnxruntime", **kw)(IMAGES)
    assert onnx.shape == torch_pass.shape and min_cosine(onnx, torch_pass) >= MIN_COSINE


def test_a_combined_layer_is_a_cache_layer_and_searchable_by_image(tmp_path):
    tree = make_tree(tmp_path / "imgs", classes=("a", "b"), per_class=3)
    config = fast_config(tree, tmp_path / "c.h5", layer="layer4", extra_layers=("layer3+layer4",))
    embed(config)
    with FeatureCache(tmp_path / "c.h5", layer="layer3+layer4") as c, FeatureCache(tmp_path / "c.h5") as primary:
        X, paths = c.features(), c.paths
        assert c.dim == 768 and np.array_equal(X[:, 256:], primary.features())  # layer4 is the second part
    build_index(tmp_path / "c.h5", tmp_path / "idx", layer="layer3+layer4", progress=False)
    index = SearchIndex(tmp_path / "idx")
    found, errors = index.search_files([str(tree / paths[2])], k=1)
    ((_, hits),) = found
    assert errors == [] and hits[0].path == paths[2] and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_style_cannot_be_part_of_a_combined_layer():
    with pytest.raises(ConfigError, match="style cannot be part of a combined layer"):
        load_backbone("resnet18", "none", layer="layer4+style", **SMALL)
