"""Shard folders as img2dataset and webdataset tools write them: `00000.tar` beside `00000.parquet` and
`00000_stats.json`. The folder is a shard source; the sidecars are ignored with their reason (a sample's
metadata is its .json member, which is read), never a refusal that says "holds no images"."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from embedder.cache.reader import FeatureCache
from embedder.data.sources import SHARD_SIDECAR, list_source
from embedder.errors import SourceError
from embedder.extract.local import embed
from tests.conftest import fast_config, make_tree
from tests.test_tar import pack


def img2dataset_folder(tmp_path):
    tree = make_tree(tmp_path / "imgs", classes=("a", "b"), per_class=3)
    out = tmp_path / "img2dataset"
    where = pack(tree, out, per_shard=3, label="json")
    for shard in sorted(out.glob("*.tar")):
        keys = sorted({m.split("/")[-1].split(".")[0] for m in where if m.startswith(shard.name)})
        pd.DataFrame({"key": keys, "status": "success", "url": [f"http://x/{k}" for k in keys]}).to_parquet(
            out / f"{shard.stem}.parquet")
        (out / f"{shard.stem}_stats.json").write_text(json.dumps({"count": len(keys), "successes": len(keys)}))
    return tree, out, where


def test_an_img2dataset_output_folder_is_a_shard_source_its_sidecars_ignored_with_a_reason(tmp_path):
    _, out, where = img2dataset_folder(tmp_path)
    listing = list_source(out)
    assert sorted(listing.paths) == sorted(where) and listing.layout == "tar"
    assert sorted(listing.ignored) == sorted((n, SHARD_SIDECAR) for n in
                                             ["00000.parquet", "00000_stats.json", "00001.parquet", "00001_stats.json"])
    # Embedded as the same shards named by a pattern: the same rows, the same bits.
    embed(fast_config(out, tmp_path / "folder.h5"))
    embed(fast_config(str(out / "{00000..00001}.tar"), tmp_path / "pattern.h5"))
    with FeatureCache(tmp_path / "folder.h5") as a, FeatureCache(tmp_path / "pattern.h5") as b:
        assert a.paths == b.paths and np.array_equal(a.features(), b.features())
        assert a.classes == ["a", "b"] and np.array_equal(a.labels, b.labels)  # from the samples' .json members


def test_a_folder_of_shards_with_anything_else_names_the_shard_pattern(tmp_path):
    _, out, _ = img2dataset_folder(tmp_path)
    (out / "notes.md").write_text("not a sidecar")
    with pytest.raises(SourceError, match=r"holds no images .* It holds 2 \.tar files: .* a pattern such as "):
        list_source(out)
