"""--runtime onnxruntime: the same frozen pass exported once and run by ONNX Runtime, with the
guarantees of the torch path (features within cosine 0.99999, bit-identical run to run, resume
after kill -9, recorded in the fingerprint) and BatchNorm exported in eval mode."""

from __future__ import annotations

import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from embedder.cache.reader import FeatureCache
from embedder.errors import CacheMismatchError, ConfigError, EmbedderNotice
from embedder.extract.core import backbone_for, load_backbone
from embedder.extract.local import embed
from embedder.models import runtime as runtimes
from embedder.models.onnx import MIN_COSINE, cache_root, graph_key
from embedder.models.runtime import choose_runtime, resolve_runtime
from embedder.models.space import components
from tests.conftest import cli_args, embedder_cmd, env_with_repo, fast_config, make_tree
from tests.test_cache import _wait_for_parts, assert_same_cache, read_all

SMALL = {"image_size": 32, "device": "cpu", "precision": "fp32", "memory_layout": "contiguous"}


def min_cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def test_every_output_matches_torch_and_repeats_bit_for_bit():
    kw = dict(SMALL, extra_layers=("layer3", "style"), style_layers=("layer1", "layer2"), style_dim=64, pool="gem")
    onnx = load_backbone("resnet18", "none", runtime="onnxruntime", **kw)
    torch_pass = load_backbone("resnet18", "none", runtime="torch", **kw)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    got, expected = onnx.forward_all(images), torch_pass.forward_all(images)
    assert list(got) == list(expected) == ["avgpool", "layer3", "style"]
    for name in got:
        assert got[name].shape == expected[name].shape
        assert min_cosine(got[name], expected[name]) >= MIN_COSINE, name
        assert torch.equal(onnx.forward_all(images)[name], got[name]), name  # run to run, bit for bit
    # The batch axis is dynamic: one image and an odd batch run without another export.
    assert min_cosine(onnx(images[:1]), expected["avgpool"][:1]) >= MIN_COSINE
    assert min_cosine(onnx(images[:5]), expected["avgpool"][:5]) >= MIN_COSINE


def test_uint8_crops_are_scaled_to_the_bits_torch_gives():
    # The session scales uint8 in numpy (off torch's thread pool); the graph must see torch's values.
    values = torch.arange(256, dtype=torch.uint8)
    assert np.array_equal(np.arange(256, dtype=np.uint8).astype(np.float32) / np.float32(255.0),
                          values.float().div_(255.0).numpy())
    onnx = load_backbone("resnet18", "none", runtime="onnxruntime", **SMALL)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    channels_last = images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # the reader's layout
    assert torch.equal(onnx(channels_last), onnx(images.float().div_(255.0)))


def test_unpooled_maps_and_unit_length_features_come_out_of_the_graph():
    kw = {**SMALL, "pool": "none", "normalize": "l2", "layer": "layer3"}
    onnx = load_backbone("resnet18", "none", runtime="onnxruntime", **kw)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    got = onnx(images)
    assert got.shape == (3, 256 * 2 * 2) and torch.allclose(got.norm(dim=1), torch.ones(3), atol=1e-5)
    assert min_cosine(got, load_backbone("resnet18", "none", runtime="torch", **kw)(images)) >= MIN_COSINE


def test_batchnorm_is_exported_with_its_running_statistics(tmp_path):
    # Random init has trivial statistics (mean 0, variance 1); give every BatchNorm real ones, so that
    # a graph exported in train mode (batch statistics) would give clearly different features.
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    torch.save(model.state_dict(), tmp_path / "stats.pt")
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=gen)
    onnx = load_backbone("resnet18", str(tmp_path / "stats.pt"), runtime="onnxruntime", **SMALL)
    eval_features = load_backbone("resnet18", str(tmp_path / "stats.pt"), runtime="torch", **SMALL)(images)
    assert min_cosine(onnx(images), eval_features) >= MIN_COSINE
    batch_stats = model.train()
    with torch.no_grad():
        pixels = (images.float() / 255 - onnx.mean) / onnx.std
        trunk = torch.nn.Sequential(*list(batch_stats.children())[:-1])
        train_features = trunk(pixels).flatten(1)
    assert min_cosine(onnx(images), train_features) < 0.99  # what the eval lock prevents


def test_the_export_is_cached_and_a_damaged_graph_is_rebuilt():
    load_backbone("resnet18", "none", runtime="onnxruntime", **SMALL)
    reference = load_backbone("resnet18", "none", runtime="torch", **SMALL)
    key, _ = graph_key(reference, components(reference))
    graph = cache_root() / key / "graph.onnx"
    assert graph.is_file() and (graph.parent / "meta.json").is_file()
    stamp = graph.stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmbedderNotice)  # a sound cached graph is used as it is
        load_backbone("resnet18", "none", runtime="onnxruntime", **SMALL)
    assert graph.stat().st_mtime_ns == stamp
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])  # a torn copy
    with pytest.warns(EmbedderNotice, match="damaged or stale; exporting it again"):
        rebuilt = load_backbone("resnet18", "none", runtime="onnxruntime", **SMALL)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    assert min_cosine(rebuilt(images), reference(images)) >= MIN_COSINE
    assert not list(cache_root().glob(f".{key}*"))  # no temporary folders left


def test_the_runtime_is_in_the_fingerprint_and_an_append_must_match(tmp_path):
    src = make_tree(tmp_path / "src", per_class=4)
    onnx = fast_config(src, tmp_path / "onnx.h5", runtime="onnxruntime")
    embed(onnx)
    embed(fast_config(src, tmp_path / "torch.h5"))
    with FeatureCache(onnx.out) as a, FeatureCache(tmp_path / "torch.h5") as b:
        assert a.components["runtime"].startswith("onnxruntime ")
        assert "runtime" not in b.components  # torch caches keep the fingerprints they always had
        assert a.paths == b.paths and min_cosine(a.features(), b.features()) >= MIN_COSINE
    make_tree(src / "more", classes=("cat",), per_class=2, seed=9)
    with pytest.raises(CacheMismatchError, match="runtime"):
        embed(fast_config(src, onnx.out, runtime="torch"))
    report = embed(fast_config(src, onnx.out, runtime="auto"))  # auto keeps the cache's own runtime
    assert report.embedded == 2 and report.config["runtime"].startswith("onnxruntime ")


@pytest.mark.slow
def test_a_killed_onnx_run_resumes_to_the_same_cache(tmp_path):
    src = make_tree(tmp_path / "src", classes=("a", "b"), per_class=24, seed=3)
    reference = fast_config(src, tmp_path / "reference.h5", commit_every=4, runtime="onnxruntime")
    embed(reference)
    killed = fast_config(src, tmp_path / "killed.h5", commit_every=4, runtime="onnxruntime")
    proc = subprocess.Popen(embedder_cmd("embed", *cli_args(killed)), env=env_with_repo(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_parts(tmp_path / "killed.h5.partial", 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    report = embed(fast_config(src, killed.out, commit_every=4, runtime="auto"))
    assert 0 < report.already_cached < 48
    assert_same_cache(killed.out, reference.out)
    features, *_ = read_all(reference.out)
    embed(fast_config(src, tmp_path / "again.h5", commit_every=4, runtime="onnxruntime"))
    assert np.array_equal(read_all(tmp_path / "again.h5")[0], features)  # run to run


def test_auto_takes_onnxruntime_only_where_it_runs_and_wins():
    assert choose_runtime("auto", "resnet", "cpu", "fp32") == "onnxruntime"
    assert choose_runtime("auto", "efficientnet_lite", "cpu", "fp32") == "onnxruntime"
    assert choose_runtime("auto", "resnet", "cpu", "fp32", compile=True) == "torch"
    assert choose_runtime("auto", "resnet", "cpu", "bf16") == "torch"
    assert choose_runtime("torch", "resnet", "cpu", "fp32") == "torch"
    assert choose_runtime("auto", "vgg", "cpu", "fp32") == "onnxruntime"
    assert choose_runtime("auto", "a-family-never-measured", "cpu", "fp32") == "torch"
    with pytest.raises(ConfigError, match="--runtime must be"):
        choose_runtime("tensorrt", "resnet")


def test_auto_precision_is_fp32_on_every_cpu_even_one_with_native_bf16(monkeypatch, tmp_path):
    monkeypatch.setattr(runtimes, "cpu_has_native_bf16", lambda: True)  # as on an AMX / AVX512-BF16 CPU
    for family in ("resnet", "vgg", "efficientnet_lite", None):
        assert resolve_runtime("cpu", "auto", family=family).precision == "fp32"
    assert resolve_runtime("cpu", "bf16", family="resnet").precision == "bf16"  # asked for: given
    assert choose_runtime("auto", "resnet", "cpu", "auto") == "onnxruntime"
    assert choose_runtime("auto", "resnet", "cpu", "int8") == "onnxruntime"
    assert choose_runtime("onnxruntime", "resnet", "cpu", "auto") == "onnxruntime"  # never overridden
    # --runtime onnxruntime with no --precision works on such a CPU (auto no longer picks bf16 there).
    backbone = load_backbone("resnet18", "none", runtime="onnxruntime", **{**SMALL, "precision": "auto"})
    assert backbone.config.precision == "fp32" and backbone.config.runtime == "onnxruntime"
    # A cache made with the old bf16 default (no fidelity card) is resumed and appended to in bf16 under `auto`.
    src = make_tree(tmp_path / "src", classes=("a", "b"), per_class=2)
    old = fast_config(src, tmp_path / "c.h5", precision="bf16", runtime="torch")
    embed(old, backbone=backbone_for(old))  # as the old default made it: no card
    make_tree(src, classes=("c",), per_class=2, seed=1)
    report = embed(fast_config(src, tmp_path / "c.h5", precision="auto", runtime="auto"))
    assert report.config["precision"] == "bf16" and report.already_cached == 4 and report.total_rows == 6


def test_what_onnxruntime_cannot_run_is_refused_naming_the_option():
    with pytest.raises(ConfigError, match="--compile is a torch.compile option.*--runtime torch"):
        load_backbone("resnet18", "none", runtime="onnxruntime", compile=True, **SMALL)
    with pytest.raises(ConfigError, match="runs fp32 on the CPU.*--runtime torch"):
        load_backbone("resnet18", "none", runtime="onnxruntime", **{**SMALL, "precision": "bf16"})


def test_without_onnxruntime_auto_falls_back_to_torch_with_one_notice(tmp_path):
    script = (
        "import sys, warnings; sys.modules['onnxruntime'] = None\n"  # as if it were not installed
        "from embedder.models.runtime import choose_runtime\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    print(choose_runtime('auto', 'resnet', 'cpu', 'fp32'))\n"
        "print(len(seen), seen[0].message)\n"
        "try:\n"
        "    choose_runtime('onnxruntime', 'resnet'); from embedder.models.onnx import require; require()\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env_with_repo(), capture_output=True, text=True, check=False,
                         timeout=120).stdout.splitlines()
    assert out[0] == "torch"
    assert out[1].startswith("1 ONNX Runtime is not installed") and "pip install onnxruntime" in out[1]
    assert out[2].startswith("ConfigError") and "--runtime torch" in out[2]


def _resnet18_with_cancelling_batchnorm(path, offset: float) -> str:
    """resnet18 (seeded random init) whose last BatchNorm subtracts a running mean of `offset` and adds it
    back through its bias: the features are unchanged in exact arithmetic, but fp32 loses their last
    digits to the cancellation, so torch's own fp32 pass is far from an fp64 one (a correct model whose
    fp32 round-off is large)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    bn = model.layer4[1].bn2
    with torch.no_grad():
        bn.running_mean.fill_(offset)
        bn.bias.copy_(offset * bn.weight / torch.sqrt(bn.running_var + bn.eps))
    torch.save(model.state_dict(), path)
    return str(path)


def test_a_correct_graph_is_accepted_where_fp32_itself_rounds_off_beyond_a_fixed_cosine(tmp_path):
    # Offset 1e7: torch fp32 is 1 - cosine ~6e-4 from fp64 on the sample photos and ONNX Runtime ~2e-8
    # (it folds the BatchNorm into the convolution). The fixed bar of main (cosine 0.99999 between torch
    # and ONNX Runtime on noise) refused this correct graph (cosine 0.999879).
    from embedder.models.onnx import check_against_torch, session_for

    weights = _resnet18_with_cancelling_batchnorm(tmp_path / "cancel.pth", 1e7)
    backbone = load_backbone("resnet18", weights, runtime="onnxruntime", image_size=64, device="cpu",
                             precision="fp32", memory_layout="contiguous")
    torch_pass = load_backbone("resnet18", weights, runtime="torch", image_size=64, device="cpu",
                               precision="fp32", memory_layout="contiguous")
    assert 1 - check_against_torch(torch_pass, session_for(torch_pass, components(torch_pass))) < 1e-5
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert min_cosine(backbone(images), torch_pass(images)) > 0.999  # the same features, up to fp32 round-off


def test_a_wrong_graph_is_refused_by_the_self_check():
    # The graph of slightly different weights (2% noise on one convolution's weights) run in place of the
    # right one: its features are off by far more than fp32 round-off (1 - cosine ~1e-4 against
    # ~1e-13 for torch fp32), and the check says so.
    from embedder.models.onnx import check_against_torch, session_for

    right = load_backbone("resnet18", "none", runtime="torch", **SMALL)
    wrong = load_backbone("resnet18", "none", runtime="torch", **SMALL)
    with torch.no_grad():
        weight = wrong.body.get_submodule("layer1.0.conv1").weight
        weight.mul_(1 + 0.02 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    session = session_for(wrong, components(wrong))  # a sound graph of `wrong`: accepted against `wrong` itself
    with pytest.raises(ConfigError, match="differ from an fp64 pass .* more than fp32 round-off explains"):
        check_against_torch(right, session)


def test_a_graph_is_checked_against_torch_once_per_process_and_graph(monkeypatch):
    """A fidelity card builds the fp32 backbone twice (exact, then the int8 one's base): the same graph
    bytes of the same network are checked once; another network's graph is checked on its own."""
    from embedder.models import onnx as onnx_module

    checked = []
    real = onnx_module.check_against_torch
    monkeypatch.setattr(onnx_module, "check_against_torch", lambda b, s: checked.append(s.path) or real(b, s))
    monkeypatch.setattr(onnx_module, "_CHECKED", set())
    first = load_backbone("resnet18", "none", runtime="onnxruntime", **SMALL)
    again = load_backbone("resnet18", "none", runtime="onnxruntime", **SMALL)
    assert len(checked) == 1 and first._session.path == again._session.path
    load_backbone("resnet18", "none", runtime="onnxruntime", **{**SMALL, "image_size": 48})
    assert len(checked) == 2 and checked[1] != checked[0]
