"""`finetune(config)`: one run from SOURCE to OUT (best.pt and history.json), and its report.

The best epoch (by validation accuracy, ties to the earlier epoch) is saved as an
`embedder.learn.checkpoint` checkpoint, so `load_classifier` and `embedder predict` use a
fine-tuned model exactly like an exported probe.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from embedder.data.formats import is_url
from embedder.data.sources import Listing, list_source
from embedder.data.splits import Splits, assign_splits, check_labels
from embedder.data.transforms import Preprocessing
from embedder.errors import ConfigError
from embedder.learn.checkpoint import ClassifierInfo, save_classifier
from embedder.learn.config import FinetuneConfig
from embedder.learn.finetune.loop import Trainer, seeded_rng
from embedder.learn.finetune.network import FinetuneNetwork, build_network, load_head, read_init_head
from embedder.learn.probefile import ProbeFile
from embedder.models.heads import head_slot
from embedder.models.registry import get_backbone_spec
from embedder.models.space import FeatureSpace
from embedder.models.spec import BackboneSpec
from embedder.models.weights import ResolvedWeights
from embedder.outputs import FINETUNE, claim, write_dir


@dataclass
class FinetuneReport:
    out: str
    model: str
    mode: str  # "finetune" or "frozen-backbone"
    epochs: list[dict]  # per epoch: epoch, train_loss, train_acc, val_loss, val_acc, seconds, lr
    best_epoch: int  # 1-based
    best_val_acc: float
    test_acc: float | None  # the best checkpoint on the test split; None without test rows
    train_acc: float  # the best epoch's training accuracy (on augmented images)
    wall_s: float
    splits: dict  # Splits.as_dict()
    errors: list[tuple[str, str]]  # (path, reason) of files that could not be used (skipped)
    config: dict = field(default_factory=dict)  # resolved settings: layer node, head, weights, device, ...

    def summary(self) -> str:
        cfg = self.config
        what = f"{cfg.get('head', 'linear')} head on {cfg.get('layer', '?')}"
        if cfg.get("freeze_bn") and self.mode == "finetune":
            what += ", BatchNorm frozen"
        s = self.splits
        lines = [
            f"trained {self.model} ({self.mode}, {what}) -> {self.out}",
            f"  split: {s.get('train')} train / {s.get('val')} val / {s.get('test')} test  ({s.get('how')})",
            (
                f"  {'epoch':>5}  {'train loss':>10}  {'train acc':>9}  {'val loss':>8}  {'val acc':>7}  "
                f"{'lr':>9}  {'seconds':>7}"
            ),
        ]
        for e in self.epochs:
            mark = "  *" if e["epoch"] == self.best_epoch else ""
            lines.append(
                f"  {e['epoch']:>5}  {e['train_loss']:>10.4f}  {e['train_acc']:>9.1%}  {e['val_loss']:>8.4f}  "
                f"{e['val_acc']:>7.1%}  {e['lr']:>9.3g}  {e['seconds']:>7.1f}{mark}"
            )
        lines.append(
            f"  best epoch {self.best_epoch} (*): val accuracy {self.best_val_acc:.1%}, "
            f"train accuracy {self.train_acc:.1%}"
        )
        if self.test_acc is None:
            lines.append("  test accuracy: - (no test images)")
        else:
            lines.append(f"  test accuracy of the best checkpoint: {self.test_acc:.1%}")
        if self.errors:
            lines.append(f"  skipped files: {len(self.errors)}")
            lines += [f"    {p}: {r}" for p, r in self.errors[:5]]
            if len(self.errors) > 5:
                lines.append(f"    ... and {len(self.errors) - 5} more (see history.json)")
        lines.append(f"  wall time: {self.wall_s:.1f} s")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "out": self.out,
            "model": self.model,
            "mode": self.mode,
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "val_accuracy": self.best_val_acc,
            "test_accuracy": self.test_acc,
            "train_accuracy": self.train_acc,
            "wall_s": self.wall_s,
            "splits": self.splits,
            "errors": [{"path": p, "reason": r} for p, r in self.errors],
            "config": self.config,
        }

def finetune(config: FinetuneConfig) -> FinetuneReport:
    """Train on `config.source`, keep the best epoch by validation accuracy, save it in `config.out`.

    OUT is written as a whole (best.pt and history.json into a temporary folder that replaces
    OUT in one step), and its write lock is held from the start, so a second run into the same
    OUT is refused before it trains."""
    out = Path(config.out).expanduser()
    claim(out, FINETUNE, [config.source], config.overwrite)  # before any model is built
    with write_dir(out, FINETUNE, [config.source], config.overwrite) as (tmp, _):
        return _finetune(config, out, tmp)


@dataclass
class _Run:
    """What a run works on, resolved from its config before any image is decoded."""

    spec: BackboneSpec
    node: str  # the feature layer the head sits on
    space: FeatureSpace  # resolved: the network's model, weights, image size and device (trained in fp32)
    model: nn.Module  # the space's network, its new head not yet on
    listing: Listing
    splits: Splits
    probe: ProbeFile | None  # --init-head
    weights: ResolvedWeights
    preprocessing: Preprocessing

    @property
    def device(self) -> torch.device:
        return torch.device(self.space.device)


def _resolve(config: FinetuneConfig) -> _Run:
    # Cheap checks first: a bad model, layer, device or probe fails before any image is read.
    spec = get_backbone_spec(config.space.model)
    node = spec.resolve_layer(config.space.layer)
    in_features = head_slot(spec, config.space.layer)[1]
    space = replace(config.space, layer=node, precision="fp32", memory_layout="contiguous", runtime="torch").resolve()
    listing = list_source(config.source, config.layout, config.limit)
    urls = sum(map(is_url, listing.paths))
    if urls:
        # Every epoch reads every image again: over the network that is a download per image per epoch.
        raise ConfigError(f"SOURCE {config.source} has {urls} http(s) URL rows, which finetune does not fetch (it reads "
                          "every image each epoch). Download them once: `embedder embed SOURCE ... --keep-downloads "
                          "DIR`, then finetune on a file list of DIR's files (DIR/urls.tsv maps them to the URLs).")
    check_labels(listing.labels, listing.classes, what=f"SOURCE {config.source}")
    splits = assign_splits(
        listing.paths, listing.labels, listing.classes, config.seed, config.val_fraction, config.test_fraction
    )
    probe = read_init_head(config.init_head, spec, node, listing.classes, in_features) if config.init_head else None
    _, model, weights = space.network()
    preprocessing = spec.preprocessing_for(config.space.image_size)
    return _Run(spec, node, space, model, listing, splits, probe, weights, preprocessing)


def _finetune(config: FinetuneConfig, out: Path, tmp: Path) -> FinetuneReport:
    t_start = time.perf_counter()
    run = _resolve(config)
    with seeded_rng(config.seed, run.device):
        net = _network(config, run)
        trainer = Trainer(config, net, run.listing, run.splits, run.preprocessing, run.device)
        history, best_epoch, best_state = trainer.fit()
        net.model.load_state_dict(best_state)
        test_acc = trainer.evaluate_test()
    best = history[best_epoch - 1]
    save_classifier(tmp / "best.pt", net.model.cpu(), _classifier_info(config, run, best_epoch, best, test_acc))
    report = FinetuneReport(
        out=str(out),
        model=run.spec.name,
        mode=config.mode,
        epochs=history,
        best_epoch=best_epoch,
        best_val_acc=best["val_acc"],
        test_acc=test_acc,
        train_acc=best["train_acc"],
        wall_s=0.0,
        splits=run.splits.as_dict(),
        errors=trainer.error_list(),
        config=_settings(config, run),
    )
    report.wall_s = round(time.perf_counter() - t_start, 3)
    _write_json(tmp / "history.json", report.as_dict())
    return report


def _network(config: FinetuneConfig, run: _Run) -> FinetuneNetwork:
    """The backbone with its new head (from the probe with --init-head), on the device, in eval mode.

    Its head's random init draws from torch's global RNG: callers seed it."""
    model, head, _ = build_network(run.spec, run.model, run.node, len(run.listing.classes), config.head,
                                   config.mlp_hidden)
    if run.probe is not None:
        load_head(head, run.probe)
    net = FinetuneNetwork(
        model, head, run.preprocessing, freeze_backbone=config.freeze_backbone, freeze_bn=config.freeze_bn
    ).to(run.device)
    net.train()
    if config.batch_size < 2 and net.bn_trains:
        raise ConfigError(
            "--batch-size 1 cannot train BatchNorm layers (they need two or more images per batch). "
            "Use --batch-size 2 or more, or --freeze-bn / --freeze-backbone."
        )
    return net.eval()


def _settings(config: FinetuneConfig, run: _Run) -> dict:
    """The resolved settings history.json records: what was asked for, and what it resolved to."""
    return {
        "layer": run.node,
        "head": config.head,
        "mlp_hidden": config.mlp_hidden,
        "weights": run.weights.identity,
        "device": run.space.device,
        "classes": list(run.listing.classes),
        "image_size": run.preprocessing.crop_size,
        "freeze_backbone": config.freeze_backbone,
        "freeze_bn": config.freeze_bn,
        "init_head": config.init_head,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "momentum": config.momentum,
        "weight_decay": config.weight_decay,
        "schedule": config.schedule,
        "step_size": config.step_size,
        "gamma": config.gamma,
        "seed": config.seed,
        "source": str(config.source),
    }


def _classifier_info(config: FinetuneConfig, run: _Run, best_epoch: int, best: dict,
                     test_acc: float | None) -> ClassifierInfo:
    """What best.pt records: enough to rebuild the network, and how it was trained."""
    return ClassifierInfo(
        model=run.spec.name,
        layer=run.node,
        classes=list(run.listing.classes),
        head_kind=config.head,
        mlp_hidden=config.mlp_hidden,
        image_size=config.space.image_size,
        precision="fp32",
        memory_layout="contiguous",
        weights=run.weights.identity,
        origin={
            "kind": "finetune",
            "mode": config.mode,
            "freeze_bn": config.freeze_bn,
            "best_epoch": best_epoch,
            "val_accuracy": best["val_acc"],
            "test_accuracy": test_acc,
            "splits": run.splits.as_dict(),
            "seed": config.seed,
            "init_head": config.init_head,
        },
    )


def _strict(value):
    """NaN/inf (a diverged run) become null: strict JSON parsers reject bare NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(_strict(payload), f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)

