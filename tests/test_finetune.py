"""Fine-tuning: what trains and what must not, the head, checkpoints, reproducibility, probes.

Everything runs random-init resnet18 at 32 px on tiny generated trees, one or two epochs,
no reader workers. Frozen parts are compared with `torch.equal` against a freshly built
model: random init is seeded, so the fresh model is exactly where training started.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from embedder.data.sources import list_source
from embedder.errors import ConfigError
from embedder.learn.checkpoint import load_classifier
from embedder.learn.finetune import FinetuneConfig, FinetuneNetwork, build_network, finetune
from embedder.models.backbone import build_model
from embedder.models.registry import get_backbone_spec
from embedder.models.weights import resolve_weights
from tests.conftest import make_tree, network_of, write_image

CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # A 32 px resnet18 gains nothing from intra-op threads, and on a 2-core machine shared with
    # another busy process, OpenMP threads waiting on each other made each step 30x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """3 classes x 8 images: 60/20/20 gives 12 train, 6 val and 6 test images."""
    return make_tree(tmp_path_factory.mktemp("ft") / "images", per_class=8)


def ft_config(source, out, **overrides) -> FinetuneConfig:
    values = {
        "source": str(source),
        "model": "resnet18",
        "out": str(out),
        "weights": "none",
        "image_size": 32,
        "epochs": 1,
        "batch_size": 4,
        "lr": 0.1,
        "workers": 0,
        "device": "cpu",
        "progress": False,
    }
    values.update(overrides)
    return FinetuneConfig.of(**values)


def saved_state(out) -> dict[str, torch.Tensor]:
    return torch.load(out / "best.pt", map_location="cpu", weights_only=True)["state_dict"]


def fresh_state() -> dict[str, torch.Tensor]:
    """The backbone exactly as every `weights="none"` run starts from."""
    spec = get_backbone_spec("resnet18")
    return build_model(spec, resolve_weights(spec.weights, "none")).state_dict()


def bn_keys(state: dict[str, torch.Tensor]) -> list[str]:
    spec = get_backbone_spec("resnet18")
    model = build_model(spec, resolve_weights(spec.weights, "none"))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    keys = [f"{n}.{k}" for n in names for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    assert len(names) == 20 and all(k in state for k in keys)
    return keys


def test_finetuning_changes_backbone_weights_and_bn_statistics(images, tmp_path):
    report = finetune(ft_config(images, tmp_path / "ft"))
    assert report.mode == "finetune"
    state, fresh = saved_state(tmp_path / "ft"), fresh_state()
    for key in ("conv1.weight", "layer1.0.conv1.weight", "layer4.1.conv2.weight"):
        assert not torch.equal(state[key], fresh[key]), key
    # Ordinary fine-tuning updates BatchNorm statistics (the contrast to --freeze-bn below).
    assert not torch.equal(state["bn1.running_mean"], fresh["bn1.running_mean"])
    assert state["bn1.num_batches_tracked"] > 0


def test_freeze_backbone_keeps_every_backbone_weight_and_buffer_bit_identical(images, tmp_path):
    report = finetune(ft_config(images, tmp_path / "frozen", freeze_backbone=True))
    assert report.mode == "frozen-backbone"
    state, fresh = saved_state(tmp_path / "frozen"), fresh_state()
    backbone_keys = [k for k in fresh if not k.startswith("fc.")]
    assert len(backbone_keys) > 100  # parameters and BatchNorm buffers alike
    changed = [k for k in backbone_keys if not torch.equal(state[k], fresh[k])]
    assert changed == []
    # The head did train: compare with the same run (same seed, same initial head) at lr 0.
    finetune(ft_config(images, tmp_path / "lr0", freeze_backbone=True, lr=0.0))
    start = saved_state(tmp_path / "lr0")
    assert not torch.equal(state["fc.weight"], start["fc.weight"])
    assert not torch.equal(state["fc.bias"], start["fc.bias"])


def test_freeze_bn_locks_batchnorm_but_trains_convolutions(images, tmp_path):
    finetune(ft_config(images, tmp_path / "fbn", freeze_bn=True))
    state, fresh = saved_state(tmp_path / "fbn"), fresh_state()
    changed = [k for k in bn_keys(state) if not torch.equal(state[k], fresh[k])]
    assert changed == []
    assert int(state["bn1.num_batches_tracked"]) == 0
    for key in ("conv1.weight", "layer3.0.downsample.0.weight", "layer4.1.conv2.weight"):
        assert not torch.equal(state[key], fresh[key]), key


def test_freeze_bn_lock_survives_train_and_module_flips():
    spec = get_backbone_spec("resnet18")
    pre = spec.preprocessing.with_image_size(32)
    model, head, _ = build_network(spec, network_of("resnet18"), None, 3)
    net = FinetuneNetwork(model, head, pre, freeze_bn=True)
    net.train()
    assert model.conv1.training and model.fc.training
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert not any(p.requires_grad for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    model.bn1.train()  # someone flips one layer by hand: forward re-locks it
    before = model.bn1.running_mean.clone()
    net(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert torch.equal(model.bn1.running_mean, before) and not model.bn1.training


def test_new_heads_replace_fc_with_the_right_shape():
    spec = get_backbone_spec("resnet18")
    x = torch.randn(4, 3, 32, 32)

    model, head, path = build_network(spec, network_of("resnet18"), None, 3)
    assert path == "fc" and model.fc is head
    assert type(head) is nn.Linear and head.weight.shape == (3, 512) and head.bias.shape == (3,)
    assert model.eval()(x).shape == (4, 3)

    model, head, path = build_network(spec, network_of("resnet18"), "layer4", 5, head="mlp", mlp_hidden=16)
    assert path == "fc" and isinstance(head, nn.Sequential)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head[0].in_features == 512 and head[-1].weight.shape == (5, 16)
    seen = {}
    head[-1].register_forward_hook(lambda module, args, out: seen.setdefault("last", out))
    logits = model.eval()(x)
    assert logits.shape == (4, 5)
    # Logits, not ReLU outputs: the network's output is the last Linear's, untouched. (This was
    # `(logits < 0).any()`, which an unseeded random init could fail by chance.)
    assert torch.equal(logits, seen["last"])


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_best_checkpoint_loads_and_history_is_written(images, tmp_path, head):
    out = tmp_path / head
    config = ft_config(images, out, epochs=2, head=head, mlp_hidden=16, schedule="step", step_size=1, gamma=0.5)
    report = finetune(config)

    classifier = load_classifier(out / "best.pt", device="cpu", runtime="torch")
    assert classifier.classes == CLASSES
    assert classifier.info.origin["kind"] == "finetune" and classifier.info.origin["best_epoch"] == report.best_epoch
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    logits = classifier(x)
    assert logits.shape == (5, 3)
    # The checkpoint computes what the trained network computes.
    spec = get_backbone_spec("resnet18")
    model, head_module, _ = build_network(spec, network_of("resnet18"), None, 3, head, 16)
    model.load_state_dict(saved_state(out))
    net = FinetuneNetwork(model, head_module, spec.preprocessing.with_image_size(32)).eval()
    torch.testing.assert_close(logits, net(x))
    # `predict`'s default on the CPU: the same network under ONNX Runtime (head included).
    onnx = load_classifier(out / "best.pt", device="cpu", runtime="onnxruntime")
    assert torch.nn.functional.cosine_similarity(onnx(x), logits).min() >= 0.99999

    history = json.loads((out / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    assert [e["lr"] for e in history["epochs"]] == [0.1, 0.05]  # StepLR stepped once per epoch
    assert history["val_accuracy"] == report.best_val_acc == max(e["val_acc"] for e in history["epochs"])
    assert history["best_epoch"] == report.best_epoch
    assert history["mode"] == "finetune" and history["test_accuracy"] == report.test_acc is not None
    assert history["train_accuracy"] == history["epochs"][report.best_epoch - 1]["train_acc"]
    assert history["splits"] == {"train": 12, "val": 6, "test": 6, "how": "stratified 60%/20%/20%, seed 0"}
    assert "best epoch" in report.summary() and "test accuracy" in report.summary()


def test_same_seed_same_history_other_seed_other_history(images, tmp_path):
    def losses(name, seed):
        report = finetune(ft_config(images, tmp_path / name, epochs=2, seed=seed, schedule="cosine"))
        return [{k: v for k, v in e.items() if k != "seconds"} for e in report.epochs]

    first = losses("a", 0)
    # The run must depend on its seed only, not on whatever state torch's global RNG is in,
    # and must leave that state alone.
    torch.manual_seed(12345)
    ambient = torch.get_rng_state()
    second = losses("b", 0)
    assert torch.equal(torch.get_rng_state(), ambient)
    assert first == second
    assert [e["lr"] for e in first] == [0.1, 0.05]  # cosine over 2 epochs
    assert torch.equal(saved_state(tmp_path / "a")["conv1.weight"], saved_state(tmp_path / "b")["conv1.weight"])
    other = losses("c", 1)
    assert [e["train_loss"] for e in other] != [e["train_loss"] for e in first]


def test_same_seed_same_history_with_reader_workers(images, tmp_path):
    """Augmentation runs in the workers: their RNG must come from the seed too."""

    def history(name):
        report = finetune(ft_config(images, tmp_path / name, workers=2, lr=0.01))
        return [{k: v for k, v in e.items() if k != "seconds"} for e in report.epochs]

    assert history("a") == history("b")


def write_probe(directory, *, classes=CLASSES, model="resnet18", layer="avgpool", dim=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    probe = {
        "coef": torch.randn(len(classes), dim, generator=g),
        "intercept": torch.randn(len(classes), generator=g),
        "classes": list(classes),
        "model": model,
        "layer": layer,
    }
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(probe, directory / "probe.pt")
    return probe


def test_init_head_starts_from_the_probe(images, tmp_path):
    probe = write_probe(tmp_path / "probe")
    finetune(ft_config(images, tmp_path / "init", init_head=str(tmp_path / "probe"), lr=0.0, freeze_backbone=True))
    state = saved_state(tmp_path / "init")
    assert torch.equal(state["fc.weight"], probe["coef"])
    assert torch.equal(state["fc.bias"], probe["intercept"])

    # A probe on layer4 (globally pooled) saw exactly the features fc consumes: accepted.
    write_probe(tmp_path / "probe4", layer="layer4")
    finetune(ft_config(images, tmp_path / "init4", init_head=str(tmp_path / "probe4"), lr=0.0, freeze_backbone=True))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"classes": ["cat", "dog", "wolf"]}, "classes: probe has"),
        ({"model": "resnet34"}, "model: probe has 'resnet34'"),
        ({"dim": 256}, "needs \\[3, 512\\]"),
    ],
)
def test_init_head_refuses_a_probe_that_does_not_fit(images, tmp_path, change, message):
    write_probe(tmp_path / "probe", **change)
    with pytest.raises(ConfigError, match=message):
        finetune(ft_config(images, tmp_path / "out", init_head=str(tmp_path / "probe")))


def test_init_head_errors_before_training(images, tmp_path):
    with pytest.raises(ConfigError, match="cannot initialise an MLP head"):
        ft_config(images, tmp_path / "out", init_head=str(tmp_path), head="mlp")
    with pytest.raises(ConfigError, match="no probe.pt"):
        finetune(ft_config(images, tmp_path / "out", init_head=str(tmp_path / "missing")))


def test_split_folders_are_used(tmp_path):
    root = tmp_path / "split"
    make_tree(root / "train", per_class=4, seed=1)
    make_tree(root / "val", per_class=2, seed=2)
    make_tree(root / "test", per_class=1, seed=3)
    report = finetune(ft_config(root, tmp_path / "out"))
    assert report.splits == {"train": 12, "val": 6, "test": 3, "how": "split folders"}
    assert report.test_acc is not None


def test_bad_files_are_skipped_and_reported_once(tmp_path):
    root = make_tree(tmp_path / "images", per_class=6)
    (root / "dog" / "dog_broken.jpg").write_bytes(b"this is not a jpeg")
    write_image(root / "fox" / "fox_truncated.png", np.random.default_rng(0))
    data = (root / "fox" / "fox_truncated.png").read_bytes()
    (root / "fox" / "fox_truncated.png").write_bytes(data[: len(data) // 2])
    listing = list_source(root)
    report = finetune(ft_config(root, tmp_path / "out", epochs=2))
    paths = [p for p, _ in report.errors]
    assert sorted(paths) == ["dog/dog_broken.jpg", "fox/fox_truncated.png"]  # once each, over two epochs
    assert len(listing) == 20 and report.splits["train"] + report.splits["val"] + report.splits["test"] == 20
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert {e["path"] for e in history["errors"]} == set(paths)


def test_unlabelled_or_single_class_sources_are_refused(tmp_path):
    flat = tmp_path / "flat"
    rng = np.random.default_rng(0)
    for i in range(6):
        write_image(flat / f"img_{i}.png", rng)
    with pytest.raises(ConfigError, match="no labels"):
        finetune(ft_config(flat, tmp_path / "out"))
    single = make_tree(tmp_path / "single", classes=("cat",), per_class=6)
    with pytest.raises(ConfigError, match="single class"):
        finetune(ft_config(single, tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # a refused run leaves nothing behind


@pytest.mark.parametrize(
    "override, message",
    [
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"schedule": "linear"}, "--schedule must be one of step, cosine"),
        ({"head": "conv"}, "--head must be one of linear, mlp"),
        ({"lr": -1.0}, "--lr must be at least 0"),
        ({"momentum": 1.0}, "--momentum must be at least 0.0 and below 1.0"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "must leave images for training"),
        ({"workers": -1}, "--workers must be 0 or more"),
    ],
)
def test_bad_settings_are_config_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        ft_config(tmp_path, tmp_path / "out", **override)


def test_batch_of_one_cannot_train_batchnorm(images, tmp_path):
    with pytest.raises(ConfigError, match="--batch-size 1 cannot train BatchNorm"):
        finetune(ft_config(images, tmp_path / "out", batch_size=1))


def test_out_must_be_a_directory(images, tmp_path):
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="writes a directory"):
        finetune(ft_config(images, tmp_path / "model.pt"))


def test_from_mapping_resolves_paths_and_rejects_unknown_keys(tmp_path):
    config = FinetuneConfig.from_mapping(
        {"source": "data/images", "model": "resnet18", "out": "runs/ft", "init_head": "runs/probe", "epochs": 3},
        base_dir=tmp_path,
    )
    assert config.source == str(tmp_path / "data/images") and config.out == str(tmp_path / "runs/ft")
    assert config.init_head == str(tmp_path / "runs/probe") and config.epochs == 3 and config.space.weights == "DEFAULT"
    with pytest.raises(ConfigError, match=r"Unknown finetune setting 'epoch'\. Did you mean 'epochs'\?"):
        FinetuneConfig.from_mapping({"source": "x", "model": "resnet18", "out": "o", "epoch": 3})
    with pytest.raises(ConfigError, match="needs out"):
        FinetuneConfig.from_mapping({"source": "x", "model": "resnet18"})
