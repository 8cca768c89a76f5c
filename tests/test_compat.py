"""Caches written by an earlier embedder stay valid: same layout read, same fingerprint computed.

`tests/fixtures/legacy/` holds two small caches written by the code as it was before the
package was split into subpackages (single-layer, and multi-layer with a style descriptor),
with their source images. A rerun of the same configuration today must find them up to
date, and a fresh run must reproduce them bit for bit.
"""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from embedder.cache.reader import FeatureCache
from embedder.extract.local import embed
from tests.conftest import REPO, fast_config

FIXTURES = REPO / "tests" / "fixtures" / "legacy"
CASES = {
    "single.h5": {},
    "layers.h5": {"layer": "avgpool", "extra_layers": ("layer3",), "style": True, "style_dim": 64},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_cache_from_before_is_up_to_date_and_reproduced_bit_for_bit(tmp_path, name):
    src = shutil.copytree(FIXTURES / "src", tmp_path / "src")
    cache = shutil.copy(FIXTURES / name, tmp_path / name)
    with h5py.File(cache, "r+") as f:  # it moved with its images: SOURCE is where they are now
        f.attrs["source"] = str(src.resolve())
        stored = str(f.attrs["fingerprint"])
    report = embed(fast_config(src, cache, **CASES[name]))
    assert report.up_to_date and report.fingerprint == stored and report.total_rows == 6
    fresh = embed(fast_config(src, tmp_path / "fresh.h5", **CASES[name]))
    assert fresh.fingerprint == stored
    with FeatureCache(cache) as old, FeatureCache(fresh.out) as new:
        assert old.layers == new.layers and old.file_components == new.file_components
        assert (old.paths, old.labels.tolist(), old.classes, old.errors) == (
            new.paths, new.labels.tolist(), new.classes, new.errors)
        assert old.errors == [("bee/broken.jpg", new.errors[0][1])]
        for layer in old.layers:
            assert np.array_equal(old.layer_rows(layer), new.layer_rows(layer)), layer


@pytest.mark.parametrize("settings", [
    {"model": "resnet18", "weights": "none", "image_size": 32, "pool": "gem", "normalize": "l2"},
    {"model": "resnet18", "weights": "none", "image_size": 48, "layer": "layer3", "style_layers": ("layer1",),
     "style_dim": 16, "memory_layout": "channels_last"},
])
def test_backbone_settings_invert_the_fingerprint(settings):
    # One pair of functions maps options -> fingerprint and back (search by image and export use the
    # inverse); the backbone rebuilt from a fingerprint must fingerprint the same.
    from embedder.cache.fingerprint import backbone_settings, fingerprint_components
    from embedder.extract.core import load_backbone

    original = fingerprint_components(load_backbone(device="cpu", precision="fp32", **settings), "float32")
    rebuilt = fingerprint_components(load_backbone(**backbone_settings(original)), "float32")
    assert rebuilt == original


# Defaults changed on purpose, each with its reason: predict's --batch-size is `auto`, the same
# automatic choice as embed's and the Python API's (issue 24: one default for one idea).
CHANGED_ON_PURPOSE = {("predict", "--batch-size"): None}


def test_the_cli_keeps_every_flag_its_choices_and_default():
    # tests/fixtures/legacy/cli.json: every flag of the CLI before options were declared once
    # (commit 05b1800), with its choices and argparse default. Each must still exist with the same
    # choices, in their order (new ones may be added), and the config field behind it must default to
    # the same value. (An old default of None meant "the library's default"; there only the flag's
    # presence is checked.)
    import argparse
    import json

    from embedder.cli.main import COMMANDS, build_parser
    from embedder.extract.config import RayOptions
    from embedder.options import parse_size, specs

    legacy = json.loads((REPO / "tests" / "fixtures" / "legacy" / "cli.json").read_text())
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, flags in legacy.items():
        actions = {s: a for a in sub.choices[command]._actions for s in a.option_strings}
        cmd = COMMANDS[command]
        classes = ([cmd.config()] if cmd.config else []) + ([RayOptions] if command == "embed" else [])
        fields = {s.flag: s for cls in classes for s in specs(cls)}
        for flag, old in flags.items():
            assert flag in actions, f"{command} {flag} is gone"
            new_choices = list(actions[flag].choices) if actions[flag].choices else None
            # Every old choice is kept; new ones may be added (probe --classifier knn-vote, plot --method umap).
            kept = new_choices if old["choices"] is None or new_choices is None else \
                [c for c in new_choices if c in old["choices"]]
            assert kept == old["choices"], (command, flag)
            if old["default"] is None:
                continue
            spec = fields.get(flag)
            if spec is None:  # not a config field (--backend): argparse holds the default
                assert actions[flag].default == old["default"], (command, flag)
                continue
            expected = old["default"]
            if (command, flag) in CHANGED_ON_PURPOSE:
                assert spec.field.default == CHANGED_ON_PURPOSE[command, flag], (command, flag)
                continue
            if spec.option.parse is parse_size and isinstance(expected, str):
                expected = parse_size(expected)
            default = (not spec.field.default) if spec.option.inverse else spec.field.default
            assert default == (tuple(expected) if isinstance(expected, list) else expected), (command, flag)
