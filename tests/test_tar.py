"""Webdataset tar shards as SOURCE: bit-identity with folders, labels, errors, resume, append, patterns."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import tarfile

import numpy as np
import pytest
import torch

from embedder.cache.reader import FeatureCache
from embedder.data.metadata import INT_NULL
from embedder.data.sources import list_source
from embedder.data.table import TableColumns
from embedder.data.tar import expand_braces
from embedder.errors import SourceError
from embedder.extract.local import embed
from tests.conftest import cli_args, embedder_cmd, env_with_repo, fast_config, make_tree
from tests.test_cache import _wait_for_parts, assert_same_cache


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float = 1_700_000_000) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), mtime
    tar.addfile(info, io.BytesIO(data))


def pack(tree, shards_dir, per_shard=5, label="cls"):
    """The tree's images packed into webdataset shards, keyed by file stem, with a label member each.
    Returns {member path `shard/member`: the image file}."""
    shards_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in tree.rglob("*.*") if p.is_file())
    classes = sorted({p.parent.name for p in files})
    where = {}
    for s in range(0, len(files), per_shard):
        shard = f"{s // per_shard:05d}.tar"
        with tarfile.open(shards_dir / shard, "w") as tar:
            for f in files[s : s + per_shard]:
                _add(tar, f.name, f.read_bytes())
                payload = {"cls": str(classes.index(f.parent.name)), "txt": f.parent.name,
                           "json": json.dumps({"label": f.parent.name, "source": "x"})}[label]
                _add(tar, f"{f.stem}.{label}", payload.encode())
                where[f"{shard}/{f.name}"] = f
    return where


def _rows(out):
    with FeatureCache(out) as c:
        return c.paths, c.features(), c.labels, c.errors, c.columns()


def test_tar_features_equal_folder_features_bit_for_bit(tmp_path):
    tree = make_tree(tmp_path / "imgs", per_class=4)
    where = pack(tree, tmp_path / "shards")
    embed(fast_config(tree, tmp_path / "folder.h5", layout="flat"))
    embed(fast_config(tmp_path / "shards", tmp_path / "tar.h5"))
    f_paths, f_feats, *_, f_cols = _rows(tmp_path / "folder.h5")
    t_paths, t_feats, t_labels, t_errors, t_cols = _rows(tmp_path / "tar.h5")
    assert t_errors == [] and sorted(t_paths) == sorted(where)
    by_file = {str(tree / p): i for i, p in enumerate(f_paths)}
    for i, p in enumerate(t_paths):
        j = by_file[str(where[p])]
        assert t_feats.dtype == np.float32 and np.array_equal(t_feats[i], f_feats[j]), p
        assert t_cols["size"][i] == where[p].stat().st_size and t_cols["mtime"][i] == 1_700_000_000
        assert (t_cols["width"][i], t_cols["height"][i]) == (f_cols["width"][j], f_cols["height"][j])
    classes = sorted({f.parent.name for f in where.values()})
    assert list(t_labels) == [classes.index(where[p].parent.name) for p in t_paths]


@pytest.mark.parametrize("kind", ["cls", "txt", "json"])
def test_labels_from_label_members(tmp_path, kind):
    tree = make_tree(tmp_path / "imgs", classes=("ant", "bee"), per_class=3)
    where = pack(tree, tmp_path / "shards", per_shard=4, label=kind)
    # A .txt is the label only when asked for (img2dataset's .txt is a caption).
    listing = list_source(tmp_path / "shards", columns=TableColumns(label="txt") if kind == "txt" else None)
    assert listing.layout == "tar" and listing.paths == list(where)  # shards sorted, members in tar order
    names = [where[p].parent.name for p in listing.paths]
    if kind == "cls":
        assert listing.classes == ["0", "1"] and list(listing.labels) == [["ant", "bee"].index(n) for n in names]
    else:
        assert [listing.classes[i] for i in listing.labels] == names


def test_corrupt_member_and_truncated_shard_are_errors_rest_embeds(tmp_path):
    tree = make_tree(tmp_path / "imgs", per_class=3)
    where = pack(tree, tmp_path / "shards", per_shard=4)
    with tarfile.open(tmp_path / "shards" / "zz_bad.tar", "w") as tar:
        _add(tar, "broken.jpg", b"plain text, not image bytes")
        _add(tar, "good.jpg", next(iter(where.values())).read_bytes())
    shard = tmp_path / "shards" / "00001.tar"
    data = shard.read_bytes()
    members = list_source(tmp_path / "shards").members
    last = max((m for p, m in members.items() if p.startswith("00001.tar/")), key=lambda m: m.offset)
    shard.write_bytes(data[: last.offset + last.size // 2])  # cut inside its last image
    embed(fast_config(tmp_path / "shards", tmp_path / "c.h5"))
    paths, feats, _, errors, _ = _rows(tmp_path / "c.h5")
    reasons = dict(errors)
    cut = next(p for p, m in members.items() if m == last)
    assert set(reasons) == {"zz_bad.tar/broken.jpg", cut}
    assert "truncated tar member" in reasons[cut] and "not an image" in reasons["zz_bad.tar/broken.jpg"]
    assert sorted(paths) == sorted(set(where) - {cut} | {"zz_bad.tar/good.jpg"}) and len(feats) == len(paths)


def test_new_shard_is_appended_alone(tmp_path):
    tree = make_tree(tmp_path / "imgs", per_class=4)
    pack(tree, tmp_path / "shards", per_shard=6)
    new = tmp_path / "shards" / "00001.tar"
    new.rename(tmp_path / "later.tar")
    first = embed(fast_config(tmp_path / "shards", tmp_path / "a.h5"))
    (tmp_path / "later.tar").rename(new)
    report = embed(fast_config(tmp_path / "shards", tmp_path / "a.h5"))
    assert report.already_cached == first.embedded and report.embedded == 6
    embed(fast_config(tmp_path / "shards", tmp_path / "ref.h5"))
    a, ref = _rows(tmp_path / "a.h5"), _rows(tmp_path / "ref.h5")
    assert sorted(a[0]) == sorted(ref[0])
    for i, p in enumerate(a[0]):
        assert np.array_equal(a[1][i], ref[1][ref[0].index(p)])


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    tree = make_tree(tmp_path / "imgs", classes=("a", "b"), per_class=40, seed=3)
    pack(tree, tmp_path / "shards", per_shard=16)
    reference = fast_config(tmp_path / "shards", tmp_path / "reference.h5", commit_every=8, image_size=64)
    embed(reference)
    killed = fast_config(tmp_path / "shards", tmp_path / "killed.h5", commit_every=8, image_size=64)
    proc = subprocess.Popen(embedder_cmd("embed", *cli_args(killed)), env=env_with_repo(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_parts(tmp_path / "killed.h5.partial", 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    report = embed(killed)
    assert 0 < report.already_cached < 80 and report.already_cached + report.embedded == 80
    assert_same_cache(killed.out, reference.out)


def test_brace_pattern_single_shard_and_folder_agree(tmp_path):
    tree = make_tree(tmp_path / "imgs", per_class=4)
    where = pack(tree, tmp_path / "shards", per_shard=2)  # 00000..00005
    pattern = list_source(str(tmp_path / "shards" / "{00001..00003}.tar"))
    assert pattern.paths == [p for p in where if p[:5] in ("00001", "00002", "00003")]
    single = list_source(tmp_path / "shards" / "00002.tar")
    assert single.paths == [p for p in where if p.startswith("00002.tar/")]
    folder = list_source(tmp_path / "shards")
    assert folder.paths == list(where)
    assert expand_braces("s/{8..10}.tar") == ["s/8.tar", "s/9.tar", "s/10.tar"]
    assert expand_braces("{008..010}") == ["008", "009", "010"]


@pytest.mark.parametrize("bad, match", [
    ("shards/*.tar", "no globs"), ("shards/{a,b}.tar", "no globs"), ("shards/{00009..00099}.tar", "do not exist"),
    ("nowhere", "does not exist"), ("{5..1}.tar", "empty"),
])
def test_sources_that_are_none_of_these_are_refused_clearly(tmp_path, bad, match):
    make_tree(tmp_path / "imgs", per_class=2)
    pack(tmp_path / "imgs", tmp_path / "shards")
    with pytest.raises(SourceError, match=match):
        list_source(bad if bad.startswith("{") else str(tmp_path / bad))


def test_not_a_tar_file_is_refused(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"garbage" * 100)
    with pytest.raises(SourceError, match="not a readable tar"):
        list_source(tmp_path / "x.tar")


def test_finetune_reader_reads_tar_members_as_the_folder_files(tmp_path):
    from torchvision.transforms import v2

    from embedder.learn.finetune.data import ImageRows

    tree = make_tree(tmp_path / "imgs", per_class=2)
    where = pack(tree, tmp_path / "shards", per_shard=3)
    listing = list_source(tmp_path / "shards")
    crop = v2.Compose([v2.Resize(20, antialias=True), v2.CenterCrop(16)])
    rows = ImageRows(listing, np.arange(len(listing)), crop, 20)
    files = list_source(tree, layout="flat")
    by_file = ImageRows(files, np.arange(len(files)), crop, 20)
    index = {str(tree / p): i for i, p in enumerate(files.paths)}
    for i, p in enumerate(listing.paths):
        a, b = rows[i], by_file[index[str(where[p])]]
        assert "error" not in a and torch.equal(a["image"], b["image"]), p


def img2dataset_like(tree, shards_dir, per_shard=4):
    """Shards as img2dataset writes them: KEY.jpg/png, KEY.txt (the caption), KEY.json with its keys;
    every third sample has no .json. Returns {row path: the record written, or None}."""
    shards_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in tree.rglob("*.*") if p.is_file())
    written = {}
    for s in range(0, len(files), per_shard):
        shard = f"{s // per_shard:05d}.tar"
        with tarfile.open(shards_dir / shard, "w") as tar:
            for j, f in enumerate(files[s : s + per_shard], start=s):
                key = f"{j:09d}"
                _add(tar, key + f.suffix, f.read_bytes())
                _add(tar, key + ".txt", f"a photo of a {f.parent.name} {j}".encode())
                record = None
                if j % 3:
                    record = {"url": f"https://example.com/{f.name}", "caption": f"a {f.parent.name}", "key": key,
                              "status": "success", "error_message": None, "width": 40 + j, "height": 30,
                              "original_width": 400 + j, "exif": json.dumps({"Make": "x"}),
                              "sha256": f"{j:064x}", "label": f.parent.name, "tags": [f.parent.name, j]}
                    _add(tar, key + ".json", json.dumps(record).encode())
                written[f"{shard}/{key}{f.suffix}"] = record
    return written


def test_json_keys_become_columns_named_apart_from_the_builtin_ones(tmp_path):
    tree = make_tree(tmp_path / "imgs", per_class=3)
    written = img2dataset_like(tree, tmp_path / "shards")
    listing = list_source(tmp_path / "shards")
    assert listing.paths == list(written)
    table = listing.table
    assert table.paths == list(written)  # every sample has its .txt caption
    # The label key is the label (not stored again); width/height are the .json's, renamed; the rest as they
    # are; the .txt is the caption column `txt`, not a label.
    assert table.kinds == {"txt": "str", "url": "str", "caption": "str", "key": "str", "status": "str", "error_message": "str",
                           "json_width": "int64", "json_height": "int64", "original_width": "int64", "exif": "str",
                           "sha256": "str", "tags": "str"}
    for i, p in enumerate(table.paths):
        r = written[p]
        assert table.columns["txt"][i].startswith("a photo of a ")
        if r is None:
            assert table.columns["url"][i] == "" and table.columns["json_width"][i] == INT_NULL
            continue
        assert table.columns["json_width"][i] == r["width"] and table.columns["url"][i] == r["url"]
        assert json.loads(table.columns["tags"][i]) == r["tags"] and table.columns["error_message"][i] == ""
    assert [listing.classes[k] if k >= 0 else None for k in listing.labels] == [
        r["label"] if r else None for r in written.values()]


def test_json_keys_rules_for_clashes_late_keys_mixed_types_and_bad_names(tmp_path):
    img = next(make_tree(tmp_path / "imgs", per_class=1).rglob("*.jpg")).read_bytes()
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "a.tar", "w") as tar:
        _add(tar, "s0.jpg", img)
        _add(tar, "s0.cls", b"1")  # the label comes from .cls: the .json's "label" is a column, renamed
        _add(tar, "s0.json", json.dumps({"label": "x", "split": "t", "n": 1, "a/b": 1, "json_width": 5,
                                         "width": 7}).encode())
        _add(tar, "s1.jpg", img)
        _add(tar, "s1.json", json.dumps({"n": "many", "late": 2.5, "id": 9}).encode())  # keys the first lacks
        _add(tar, "s2.jpg", img)
        _add(tar, "s2.json", b"[1, 2]")  # not an object: no record
    listing = list_source(tmp_path / "shards")
    assert list(listing.labels) == [1, -1, -1]
    t = listing.table
    assert t.paths == ["a.tar/s0.jpg", "a.tar/s1.jpg"]
    assert t.kinds == {"json_label": "str", "json_split": "str", "n": "str", "json_width": "int64",
                       "json_json_width": "int64", "late": "float64", "json_id": "int64"}
    assert list(t.columns["n"]) == ["1", "many"] and list(t.columns["json_json_width"]) == [7, INT_NULL]
    assert list(t.columns["json_width"]) == [5, INT_NULL] and np.isnan(t.columns["late"][0])
    assert any("'a/b'" in n and "not stored" in n for n in t.notes)
    assert any("'n'" in n and "several types" in n for n in t.notes)


def test_json_columns_through_embed_info_and_search_where(tmp_path, capsys):
    from embedder.cli.main import main

    tree = make_tree(tmp_path / "imgs", per_class=4)
    written = img2dataset_like(tree, tmp_path / "shards")
    config = fast_config(tmp_path / "shards", tmp_path / "c.h5")
    assert main(["embed", *cli_args(config), "--quiet"]) == 0
    assert main(["info", str(config.out)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("columns"))
    for part in ("width (int64)", "json_width (int64)", "url (str)", "caption (str)", "has_metadata (bool)"):
        assert part in line
    with FeatureCache(config.out) as c:
        paths, cols = c.paths, c.columns()
    for i, p in enumerate(paths):
        r = written[p]
        assert cols["has_metadata"][i]  # every sample has a .txt caption, stored as `txt`
        assert cols["txt"][i].startswith("a photo of a ")
        assert cols["json_width"][i] == (r["width"] if r else INT_NULL) and cols["url"][i] == (r["url"] if r else "")
        assert (cols["width"][i], cols["height"][i]) != (-1, -1)  # the image's own size, read when decoded
    assert main(["index", str(config.out), "--out", str(tmp_path / "idx"), "--kind", "flat", "--quiet"]) == 0
    capsys.readouterr()
    where = "url != '' and json_width > 45 and caption != 'a dog'"
    assert main(["search", str(tmp_path / "idx"), "--id", "0", "-k", "50", "--where", where, "--json"]) == 0
    hits = json.loads(capsys.readouterr().out.splitlines()[0])["hits"]
    expected = {p for p, r in written.items() if r and r["width"] > 45 and r["caption"] != "a dog"}
    assert expected and {h["path"] for h in hits} == expected


def test_label_column_picks_a_json_key_or_the_txt_and_table_options_are_refused(tmp_path):
    tree = make_tree(tmp_path / "imgs", classes=("ant", "bee"), per_class=2)
    written = img2dataset_like(tree, tmp_path / "shards")
    by_key = list_source(tmp_path / "shards", columns=TableColumns(label="status"))
    assert by_key.classes == ["success"] and [k for k in by_key.labels] == [0 if r else -1 for r in written.values()]
    assert "status" not in by_key.table.kinds and "json_label" in by_key.table.kinds  # "label" is a column now
    by_txt = list_source(tmp_path / "shards", columns=TableColumns(label="txt"))
    assert len(by_txt.classes) == len(written) and "txt" not in by_txt.table.kinds
    plain = list_source(tmp_path / "shards")
    assert "txt" in plain.table.kinds and plain.classes == ["ant", "bee"]
    with pytest.raises(SourceError, match="--label-column picks a tar sample's label"):
        list_source(tmp_path / "shards", columns=TableColumns(path="file"))
