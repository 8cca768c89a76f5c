"""Layer names are parsed once (`OutputSpec`) and resolved once, by the run that writes a cache: the
cache records {name: layer} (`layer_names`), and readers resolve `--layer` with it, not the registry.
Caches written before it (no attribute) take the legacy route through the registry."""

from __future__ import annotations

import json
import re
import shutil

import h5py
import pytest
import torch

from embedder.cache.reader import FeatureCache
from embedder.cli.main import main
from embedder.errors import CacheError, ConfigError
from embedder.extract.config import EmbedConfig
from embedder.extract.local import embed
from embedder.models.outputspec import OutputSpec, parse_outputs
from embedder.models.space import FeatureSpace
from embedder.search.build import build_index
from tests.conftest import REPO, fast_config, make_tree

# resnet18's aliases are pool and fc_input, both for avgpool.
LAYERS = {"layer": "layer3", "extra_layers": ("pool", "layer2+fc_input")}
RECORDED = {"layer3": "layer3", "pool": "avgpool", "layer2+fc_input": "layer2+avgpool", "fc_input": "avgpool"}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A cache written now with aliases and a combined layer (read-only for the tests: copy to change it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny passes on a shared machine
    try:
        tmp = tmp_path_factory.mktemp("names")
        tree = make_tree(tmp / "imgs", classes=("a", "b"), per_class=2)
        return embed(fast_config(tree, tmp / "c.h5", **LAYERS)).out
    finally:
        torch.set_num_threads(threads)


def _copy(src, dst, *, model: str | None = None, names: bool = True):
    """A copy of `src` whose recorded model is `model` (one this version does not know), with or without
    `layer_names` (without: the file a version from before it wrote)."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        if model is not None:
            components = json.loads(f.attrs["fingerprint_components"])
            f.attrs["fingerprint_components"] = json.dumps({**components, "model": model}, sort_keys=True)
            f.attrs["model"] = model
        if not names:
            del f.attrs["layer_names"]
    return dst


def test_a_cache_records_the_names_its_run_resolved(written):
    with h5py.File(written, "r") as f:
        assert json.loads(f.attrs["layer_names"]) == RECORDED
        assert list(json.loads(f.attrs["layers"])) == ["layer3", "avgpool", "layer2+avgpool"]
    with FeatureCache(written, layer="pool") as c:
        assert c.layer == "avgpool" and c.spec.names == RECORDED  # a copy of the cache keeps them


def test_a_reader_resolves_aliases_from_the_cache_not_the_registry(written, tmp_path):
    # The model is one this version does not know: the registry cannot resolve `pool` ...
    retired = _copy(written, tmp_path / "retired.h5", model="retired-net")
    with FeatureCache(retired, layer="pool") as c:  # ... the cache's own record does
        assert c.layer == "avgpool"
    with FeatureCache(retired, layer="layer2+pool") as c:  # part by part, as the backbone resolved them
        assert c.layer == "layer2+avgpool"
    with FeatureCache(retired, layer="default") as c:
        assert c.layer == "layer3"
    # Without the record, the same file has only its stored names: the record is what resolved `pool`.
    bare = _copy(retired, tmp_path / "bare.h5", names=False)
    with pytest.raises(CacheError, match="has no layer 'pool'; it holds layer3, avgpool, layer2\\+avgpool"):
        FeatureCache(bare, layer="pool")
    with FeatureCache(bare, layer="avgpool") as c:
        assert c.layer == "avgpool"


def test_a_cache_from_before_the_record_resolves_through_the_registry(written, tmp_path):
    old = _copy(written, tmp_path / "old.h5", names=False)
    with FeatureCache(old, layer="fc_input") as c:
        assert c.layer == "avgpool" and c.spec.names == {}  # copies stay legacy: nothing is invented
    with FeatureCache(old, layer="layer2+pool") as c:
        assert c.layer == "layer2+avgpool"
    with FeatureCache(REPO / "tests" / "fixtures" / "legacy" / "layers.h5", layer="pool") as c:
        assert c.layer == "avgpool" and c.layer_names is None


def test_search_checks_an_index_layer_with_the_names_its_cache_recorded(written, tmp_path, capsys):
    retired = _copy(written, tmp_path / "retired.h5", model="retired-net")
    build_index(retired, tmp_path / "idx", layer="pool", progress=False)
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["layer"] == "avgpool" and meta["layer_names"] == RECORDED
    assert main(["search", str(tmp_path / "idx"), "--id", "0", "-k", "1", "--layer", "fc_input", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["hits"][0]["id"] == 0
    assert main(["search", str(tmp_path / "idx"), "--id", "0", "--layer", "layer3"]) == 2
    assert "indexes the layer 'avgpool', not 'layer3'" in capsys.readouterr().err


@pytest.mark.parametrize("text, fix", [
    ("", "name a layer"),
    ("   ", "name a layer"),
    ("layer 3", "without spaces"),
    ("layer3+", "a layer name on each side of '+'"),
    ("+layer3", "a layer name on each side of '+'"),
    ("layer3+style", "give it as its own --layer"),
    ("default+layer3", "name the layers themselves"),
    (3, "takes a layer name"),
])
def test_a_name_outside_the_grammar_is_one_line_naming_the_fix(text, fix):
    with pytest.raises(ConfigError, match=re.escape(fix)) as caught:
        OutputSpec.parse(text)
    assert "\n" not in str(caught.value)


def test_the_grammar():
    assert parse_outputs(None, ("default", "pool", "style", "a+b")) == (
        OutputSpec(), OutputSpec(), OutputSpec(("pool",)), OutputSpec(("style",)), OutputSpec(("a", "b")))
    assert OutputSpec.parse("style").is_style and OutputSpec.parse(None).is_default
    assert [str(o) for o in parse_outputs("pool+layer3", ())] == ["pool+layer3"]
    assert OutputSpec.parse("pool+layer3").node({"pool": "avgpool"}, "layer4") == "avgpool+layer3"
    assert OutputSpec.parse("default").node({"pool": "avgpool"}, "layer4") == "layer4"


def test_a_bad_name_is_refused_by_the_reader_and_the_backbone(written):
    with pytest.raises(ConfigError, match="a layer name on each side"):
        FeatureCache(written, layer="layer3+")
    from embedder.extract.core import load_backbone

    with pytest.raises(ConfigError, match="without spaces"):
        load_backbone("resnet18", "none", layer="layer3", extra_layers=("pool ",), device="cpu", image_size=32)


def test_a_bad_name_is_refused_where_the_space_is_made_before_any_model(tmp_path, capsys, monkeypatch):
    """The names are parsed once, when the FeatureSpace is made from a flag, a TOML key or a keyword: a bad
    one is refused there, by every front door, and no model is built (the registry's builder is never called)."""
    from embedder.models import backbone

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built for a config that names a bad layer")

    monkeypatch.setattr(backbone, "build_model", no_model)
    tree = make_tree(tmp_path / "img", classes=("a", "b"), per_class=1)
    with pytest.raises(ConfigError, match="a layer name on each side"):
        FeatureSpace("resnet18", layer="layer3+")
    with pytest.raises(ConfigError, match="without spaces"):
        EmbedConfig.of(source=str(tree), model="resnet18", out=str(tmp_path / "c.h5"), extra_layers=("pool ",))
    code = main(["embed", str(tree), "--model", "resnet18", "--weights", "none", "--out", str(tmp_path / "c.h5"),
                 "--layer", "layer3", "--layer", "style+pool"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "style cannot be part of a combined layer" in err[0]
    assert not (tmp_path / "c.h5").exists()
