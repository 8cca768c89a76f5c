"""The command line, the pipeline runner and the sample data, run as a user would."""

from __future__ import annotations

import json
import subprocess

import pytest

from embedder.cache.reader import FeatureCache
from embedder.cli.main import main
from embedder.cli.pipeline import load_pipeline
from embedder.data.samples import make_samples
from embedder.errors import ConfigError
from embedder.models.registry import list_backbones
from tests.conftest import REPO, embedder_cmd, env_with_repo


def test_models_lists_every_backbone_with_width_and_offline_flag(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert sorted(rows) == sorted(list_backbones())
    assert len(rows) == 14  # resnet18-152, vgg11-19 with and without BN, efficientnet_lite0
    assert rows["resnet50"]["feature_dim"] == 2048 and rows["resnet18"]["feature_dim"] == 512
    assert rows["vgg16"]["feature_dim"] == 512 and rows["vgg16"]["other_layers"]["fc7"] == 4096
    assert rows["efficientnet_lite0"]["feature_dim"] == 1280
    assert rows["efficientnet_lite0"]["weights_offline"] is True
    assert rows["resnet18"]["weights_offline"] is False  # TORCH_HOME points at an empty folder in tests


def test_module_entry_point_and_help():
    proc = subprocess.run(embedder_cmd("embed", "--help"), env=env_with_repo(), capture_output=True, text=True, check=False)
    assert proc.returncode == 0
    for flag in ("--weights", "--batch-size", "--workers", "--device", "--precision", "--image-size", "--limit",
                 "--overwrite", "--layer", "--normalize"):
        assert flag in proc.stdout


def test_bad_option_value_is_one_clean_line(tmp_path, capsys):
    code = main(["embed", str(tmp_path), "--model", "resnet18", "--out", str(tmp_path / "c.h5"), "--batch-size", "0"])
    err = capsys.readouterr().err
    assert code != 0 and "batch-size must be a positive integer" in err


def test_pipeline_runs_steps_and_info(tmp_path, capsys):
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        """
[pipeline]
name = "tiny"

[[steps]]
run = "make-samples"
out = "data"
only = ["photos"]

[[steps]]
run = "embed"
source = "data/photos"
model = "resnet18"
weights = "none"
image_size = 32
precision = "fp32"
workers = 0
out = "out/photos.h5"

[[steps]]
run = "info"
cache = "out/photos.h5"
"""
    )
    assert main(["run", str(pipeline), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "[tiny 3/3]" in printed and "8 x 512" in printed
    with FeatureCache(tmp_path / "out" / "photos.h5") as c:
        assert len(c) == 8 and "chelsea.jpg" in c.paths


def test_pipeline_is_validated_before_anything_runs(tmp_path):
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        '[[steps]]\nrun = "make-samples"\nout = "data"\n\n[[steps]]\nrun = "embed"\nsource = "x"\nmodel = "resnet18"\n'
        'out = "c.h5"\nbatch = 3\n'
    )
    with pytest.raises(ConfigError, match="step 2 .*batch"):
        load_pipeline(pipeline)
    assert not (tmp_path / "data").exists()


def test_quickstart_pipeline_is_valid():
    _, steps = load_pipeline(REPO / "pipelines" / "quickstart.toml")
    kinds = [s.kind for s in steps]
    assert kinds[0] == "make-samples" and "embed" in kinds
    assert all("efficientnet_lite0" in s.describe for s in steps if s.kind == "embed")


def test_samples_are_made_from_shipped_data(tmp_path):
    made = make_samples(tmp_path)
    digits = sorted(p for p in made["digits"].rglob("*.png"))
    assert len(digits) == 1797 and len({p.parent.name for p in digits}) == 10
    lfw = list(made["lfw_subset"].rglob("*.png"))
    assert len(lfw) == 200
    assert {p.relative_to(made["lfw_subset"]).parts[:2] for p in lfw} == {
        ("train", "face"), ("train", "non_face"), ("val", "face"), ("val", "non_face")
    }
    assert len(list((made["lfw_subset"] / "val" / "face").iterdir())) == 30
    assert (made["photos"] / "chelsea.jpg").is_file()
    # A second call leaves the finished samples alone.
    stamp = (made["digits"] / "0").stat().st_mtime_ns
    make_samples(tmp_path)
    assert (made["digits"] / "0").stat().st_mtime_ns == stamp


def test_pipeline_probe_step_prints_a_results_table(tmp_path, capsys):
    from tests.conftest import make_tree

    make_tree(tmp_path / "images", classes=("a", "b"), per_class=6)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        """
[[steps]]
run = "embed"
label = "extract"
source = "images"
model = "resnet18"
weights = "none"
image_size = 32
precision = "fp32"
workers = 0
out = "c.h5"

[[steps]]
run = "probe"
label = "my probe"
cache = "c.h5"
Cs = [0.1, 1.0]
out = "probe"
"""
    )
    assert main(["run", str(pipeline), "--quiet"]) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("method"):]
    assert "my probe" in table and "extract" in table and "%" in table
    assert (tmp_path / "probe" / "probe.pt").is_file()


def test_compare_pipeline_is_valid_and_covers_the_four_methods():
    _, steps = load_pipeline(REPO / "pipelines" / "compare.toml")
    labels = [s.label for s in steps if s.kind in ("probe", "finetune")]
    assert len(labels) == 4
    kinds = [(s.kind, s.describe) for s in steps]
    assert any(k == "probe" and "logreg" in d for k, d in kinds)
    assert any(k == "finetune" and "fixed feature extractor" in d for k, d in kinds)
    assert any(k == "finetune" and d.startswith("fine-tune") for k, d in kinds)


def test_finetune_cli_writes_a_checkpoint_that_predict_reads(tmp_path, capsys):
    from tests.conftest import make_tree

    tree = make_tree(tmp_path / "img", classes=("a", "b"), per_class=5)
    out = tmp_path / "ft"
    assert main(["finetune", str(tree), "--model", "resnet18", "--weights", "none", "--image-size", "32",
                 "--epochs", "1", "--batch-size", "4", "--workers", "0", "--out", str(out), "--quiet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "finetune" and len(report["epochs"]) == 1 and "val_accuracy" in report
    assert main(["predict", str(out / "best.pt"), str(tree / "a"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 5 and all(r["label"] in ("a", "b") for r in rows)
