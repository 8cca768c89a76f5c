"""Fine-tuning a pretrained backbone end to end, or training only a new head on a frozen one.

Three ways of training, all on the same train/val/test split as the cached linear probe
(`embedder.data.splits.assign_splits`, same seed, same fractions):

  finetune          every weight trains (the default);
  --freeze-bn       every weight trains except the backbone's BatchNorm layers, which stay
                    in eval mode with their affine weights frozen: their running statistics
                    keep describing the pretraining data, which is what small fine-tuning
                    sets (and small batches) cannot estimate well;
  --freeze-backbone "ConvNet as fixed feature extractor" from the PyTorch transfer-learning
                    tutorial: the backbone runs again every epoch on augmented images and
                    only the head trains. Done right: the tutorial calls `model.train()`,
                    which puts the frozen backbone's BatchNorm layers in training mode, so
                    their running statistics drift towards the new data and the "frozen"
                    features change from epoch to epoch. Here every backbone module is held
                    in eval mode, so its weights and buffers stay bit-identical.

Images are decoded with `embedder.data.decode.load_rgb` and cropped on uint8 tensors in the
loader workers (4x less data to move than float32); conversion to float and the
normalisation happen on the device, in `FinetuneNetwork`, as in `FrozenBackbone`.

The best epoch (by validation accuracy, ties to the earlier epoch) is kept in memory and
saved as an `embedder.learn.checkpoint` checkpoint, so `load_classifier` and `embedder predict`
use a fine-tuned model exactly like an exported probe.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2
from tqdm.auto import tqdm

from embedder.atomic import staged_dir
from embedder.data.decode import DEFAULT_MAX_PIXELS
from embedder.data.sources import Listing, list_source
from embedder.data.splits import Splits, assign_splits, check_labels
from embedder.data.transforms import geometric_transform, read_for_model
from embedder.errors import AllImagesFailedError, BadImageError, ConfigError
from embedder.learn.checkpoint import ClassifierInfo, save_classifier
from embedder.learn.config import HEADS, FinetuneConfig
from embedder.models.backbone import build_model
from embedder.models.heads import head_slot, mlp_head, replace_head
from embedder.models.registry import BackboneSpec, Preprocessing, get_backbone_spec
from embedder.models.runtime import resolve_runtime
from embedder.models.weights import ResolvedWeights, resolve_weights

PROBE_FILE = "probe.pt"


# --- data ----------------------------------------------------------------------------------


def train_transform(pre: Preprocessing) -> v2.Compose:
    """uint8 [3, H, W] -> uint8 [3, crop, crop]: random area/aspect crop and a horizontal flip."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(pre.crop_size, interpolation=InterpolationMode(pre.interpolation), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    )


class ImageRows(Dataset):
    """Item i: listing row `rows[i]` decoded and transformed, or the reason it could not be.

    A bad file is one failed item, never an exception: `collate_rows` drops it and the
    training loop records it, so one corrupt JPEG cannot end a long run.
    """

    def __init__(
        self,
        listing: Listing,
        rows: np.ndarray,
        transform: v2.Compose,
        resize_size: int | None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        """`resize_size`: the shorter side `transform` resizes to (None when it only crops)."""
        self.root, self.paths, self.labels = listing.root, listing.paths, listing.labels
        self.rows = np.asarray(rows, dtype=np.int64)
        self.transform = transform
        self.resize_size = resize_size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = int(self.rows[i])
        try:
            image = read_for_model(self.root / self.paths[row], self.transform, self.resize_size, self.max_pixels)
        except BadImageError as exc:
            return {"row": row, "error": exc.reason}
        return {"row": row, "image": image, "label": int(self.labels[row])}


def collate_rows(items: list[dict]) -> dict:
    """Stack the items that decoded; pass the failures on as (row, reason)."""
    ok = [it for it in items if "image" in it]
    return {
        "images": torch.stack([it["image"] for it in ok]) if ok else torch.empty((0, 3, 1, 1), dtype=torch.uint8),
        "labels": torch.tensor([it["label"] for it in ok], dtype=torch.int64),
        "rows": [it["row"] for it in ok],
        "errors": [(it["row"], it["error"]) for it in items if "error" in it],
    }


def _seed_worker(worker_id: int) -> None:
    # DataLoader already seeds each worker's torch RNG (which the v2 transforms use) from the
    # loader's generator; seed numpy and `random` from it too, so any transform is reproducible.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# --- the network ---------------------------------------------------------------------------


def build_network(
    spec: BackboneSpec,
    weights: ResolvedWeights,
    layer: str | None,
    n_classes: int,
    head: str = "linear",
    mlp_hidden: int = 512,
) -> tuple[nn.Module, nn.Module, str]:
    """The backbone with its weights and a new head for `n_classes` on `layer`'s features.

    Returns (model, the new head, its dotted path). The head is a *new module* (the
    `fc.out_features = n` mistake leaves 1000 outputs); its random init uses torch's global
    RNG, so callers seed it.
    """
    if head not in HEADS:
        raise ConfigError(f"--head must be one of {', '.join(HEADS)}, got {head!r}.")
    in_features = head_slot(spec, layer)[1]
    module = nn.Linear(in_features, n_classes) if head == "linear" else mlp_head(in_features, n_classes, mlp_hidden)
    model = build_model(spec, weights)
    installed, path = replace_head(model, spec, layer, module)
    return model, installed, path


class FinetuneNetwork(nn.Module):
    """uint8 images [N, 3, S, S] -> logits, normalised on the device, with the freezing rules.

    `train()` puts the network in training mode *except* for the frozen modules, and
    `forward` re-asserts that, so neither `net.train()` nor code that flips modules one by
    one can make a frozen BatchNorm layer update its running statistics.
    """

    def __init__(
        self,
        model: nn.Module,
        head: nn.Module,
        preprocessing: Preprocessing,
        *,
        freeze_backbone: bool = False,
        freeze_bn: bool = False,
    ):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1), persistent=False)
        in_head = {id(m) for m in head.modules()}
        backbone = [m for m in model.modules() if id(m) not in in_head]  # includes `model` itself
        if freeze_backbone:
            self._frozen = backbone
        elif freeze_bn:
            self._frozen = [m for m in backbone if isinstance(m, _BatchNorm)]
        else:
            self._frozen = []
        for m in self._frozen:
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FinetuneNetwork:
        super().train(mode)
        self._lock()
        return self

    def _lock(self) -> None:
        for m in self._frozen:
            m.training = False

    @property
    def bn_trains(self) -> bool:
        """Whether a BatchNorm layer updates in training mode (then a batch of one image cannot train)."""
        return any(isinstance(m, _BatchNorm) and m.training for m in self.model.modules())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._lock()
        x = images.to(self.mean.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return self.model((x - self.mean) / self.std)


# --- the report ----------------------------------------------------------------------------


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


# --- training ------------------------------------------------------------------------------


def finetune(config: FinetuneConfig) -> FinetuneReport:
    """Train on `config.source`, keep the best epoch by validation accuracy, save it in `config.out`.

    OUT is written as a whole (best.pt and history.json into a temporary folder that replaces
    OUT in one step), and its write lock is held from the start, so a second run into the same
    OUT is refused before it trains."""
    out = _check_out(config.out)
    with staged_dir(out) as tmp:
        return _finetune(config, out, tmp)


def _finetune(config: FinetuneConfig, out: Path, tmp: Path) -> FinetuneReport:
    t_start = time.perf_counter()
    # Cheap checks first: a bad model, layer, device or probe fails before any image is read.
    spec = get_backbone_spec(config.model)
    node = spec.resolve_layer(config.layer)
    in_features = head_slot(spec, config.layer)[1]
    runtime = resolve_runtime(config.device, "fp32", "contiguous")
    listing = list_source(config.source, config.layout, config.limit)
    check_labels(listing.labels, listing.classes, what=f"SOURCE {config.source}")
    splits = assign_splits(
        listing.paths, listing.labels, listing.classes, config.seed, config.val_fraction, config.test_fraction
    )
    probe = _read_probe(config.init_head, spec, node, listing.classes, in_features) if config.init_head else None
    weights = resolve_weights(spec.weights, config.weights)
    preprocessing = spec.preprocessing
    if config.image_size is not None:
        preprocessing = preprocessing.with_image_size(config.image_size)
    device = torch.device(runtime.device)

    with _seeded_rng(config.seed, device):
        model, head, _ = build_network(spec, weights, node, len(listing.classes), config.head, config.mlp_hidden)
        if probe is not None:
            with torch.no_grad():
                head.weight.copy_(probe["coef"])
                head.bias.copy_(probe["intercept"])
        net = FinetuneNetwork(
            model, head, preprocessing, freeze_backbone=config.freeze_backbone, freeze_bn=config.freeze_bn
        ).to(device)
        net.train()
        if config.batch_size < 2 and net.bn_trains:
            raise ConfigError(
                "--batch-size 1 cannot train BatchNorm layers (they need two or more images per batch). "
                "Use --batch-size 2 or more, or --freeze-bn / --freeze-backbone."
            )
        net.eval()
        trainer = _Trainer(config, net, listing, splits, preprocessing, device)
        history, best_epoch, best_state = trainer.fit()
        net.model.load_state_dict(best_state)
        test_acc = trainer.evaluate_test()

    best = history[best_epoch - 1]
    resolved = {
        "layer": node,
        "head": config.head,
        "mlp_hidden": config.mlp_hidden,
        "weights": weights.identity,
        "device": runtime.device,
        "classes": list(listing.classes),
        "image_size": preprocessing.crop_size,
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
    info = ClassifierInfo(
        model=spec.name,
        layer=node,
        classes=list(listing.classes),
        head_kind=config.head,
        mlp_hidden=config.mlp_hidden,
        image_size=config.image_size,
        precision="fp32",
        memory_layout="contiguous",
        weights=weights.identity,
        origin={
            "kind": "finetune",
            "mode": config.mode,
            "freeze_bn": config.freeze_bn,
            "best_epoch": best_epoch,
            "val_accuracy": best["val_acc"],
            "test_accuracy": test_acc,
            "splits": splits.as_dict(),
            "seed": config.seed,
            "init_head": config.init_head,
        },
    )
    save_classifier(tmp / "best.pt", net.model.cpu(), info)
    report = FinetuneReport(
        out=str(out),
        model=spec.name,
        mode=config.mode,
        epochs=history,
        best_epoch=best_epoch,
        best_val_acc=best["val_acc"],
        test_acc=test_acc,
        train_acc=best["train_acc"],
        wall_s=0.0,
        splits=splits.as_dict(),
        errors=trainer.error_list(),
        config=resolved,
    )
    report.wall_s = round(time.perf_counter() - t_start, 3)
    _write_json(tmp / "history.json", report.as_dict())
    return report


class _Trainer:
    """The epoch loop of one run: loaders, optimiser, schedule, history, best state, skipped files."""

    def __init__(
        self,
        config: FinetuneConfig,
        net: FinetuneNetwork,
        listing: Listing,
        splits: Splits,
        pre: Preprocessing,
        device: torch.device,
    ):
        self.config, self.net, self.listing, self.splits, self.device = config, net, listing, splits, device
        self.on_gpu = device.type == "cuda"
        self.errors: dict[str, str] = {}  # path -> reason; a bad file fails every epoch, report it once
        self.workers = config.resolved_workers()
        eval_tf = geometric_transform(pre)  # the weights' own eval transform
        self.train_loader = self._loader(
            ImageRows(listing, splits.train, train_transform(pre), None, config.max_pixels), shuffle=True, keep=True
        )
        self.val_loader = self._loader(
            ImageRows(listing, splits.val, eval_tf, pre.resize_size, config.max_pixels), shuffle=False, keep=True
        )
        self.test_set = ImageRows(listing, splits.test, eval_tf, pre.resize_size, config.max_pixels)
        self.optimizer = torch.optim.SGD(
            net.trainable_parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        if config.schedule == "step":
            self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, config.step_size, config.gamma)
        else:
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=config.epochs)

    def _loader(self, dataset: ImageRows, shuffle: bool, keep: bool) -> DataLoader:
        # The shuffling generator is seeded, and DataLoader derives each worker's torch seed
        # (which drives the random crops and flips) from it: same seed, same batches, same pixels.
        return DataLoader(
            dataset,
            batch_size=self.config.batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(self.config.seed),
            num_workers=self.workers,
            collate_fn=collate_rows,
            pin_memory=self.on_gpu,
            worker_init_fn=_seed_worker if self.workers else None,
            persistent_workers=keep and self.workers > 0,  # no process start-up every epoch
        )

    def fit(self) -> tuple[list[dict], int, dict[str, torch.Tensor]]:
        history: list[dict] = []
        best_epoch, best_acc, best_state = 0, -1.0, {}
        n_epochs = self.config.epochs
        for epoch in range(1, n_epochs + 1):
            t0 = time.perf_counter()
            lr = float(self.optimizer.param_groups[0]["lr"])
            self.net.train()
            train_loss, train_acc, n_train = self._phase(self.train_loader, f"epoch {epoch}/{n_epochs} train", True)
            if n_train == 0:
                raise AllImagesFailedError(self._nothing_usable("training", len(self.splits.train)))
            self.net.eval()
            val_loss, val_acc, n_val = self._phase(self.val_loader, f"epoch {epoch}/{n_epochs} val", False)
            if n_val == 0:
                raise AllImagesFailedError(self._nothing_usable("validation", len(self.splits.val)))
            self.scheduler.step()
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "train_acc": train_acc,
                    "val_loss": val_loss,
                    "val_acc": val_acc,
                    "seconds": round(time.perf_counter() - t0, 3),
                    "lr": lr,
                }
            )
            improved = val_acc > best_acc  # strictly better: ties keep the earlier (less trained) epoch
            if improved:
                best_epoch, best_acc = epoch, val_acc
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.net.model.state_dict().items()}
            if self.config.progress:  # the bars are transient; leave one line per epoch
                tqdm.write(
                    f"epoch {epoch}/{n_epochs}: train loss {train_loss:.4f} acc {train_acc:.1%} | "
                    f"val loss {val_loss:.4f} acc {val_acc:.1%} | lr {lr:.3g} | "
                    f"{time.perf_counter() - t0:.1f} s{'  (best so far)' if improved else ''}",
                    file=sys.stderr,
                )
        return history, best_epoch, best_state

    def evaluate_test(self) -> float | None:
        if len(self.test_set) == 0:
            return None
        self.net.eval()
        _, acc, n = self._phase(self._loader(self.test_set, shuffle=False, keep=False), "test", False)
        return acc if n else None

    def _phase(self, loader: DataLoader, desc: str, train: bool) -> tuple[float, float, int]:
        """One pass over `loader`: (mean loss, accuracy, images used)."""
        loss_sum, correct, total = 0.0, 0, 0
        bar = tqdm(
            total=len(loader.dataset), unit="img", desc=desc, disable=not self.config.progress, dynamic_ncols=True,
            file=sys.stderr, mininterval=0.1 if sys.stderr.isatty() else 30.0, leave=False,
        )
        skip_single = train and self.net.bn_trains
        with bar, torch.set_grad_enabled(train):
            for batch in loader:
                for row, reason in batch["errors"]:
                    self.errors.setdefault(self.listing.paths[row], reason)
                n = len(batch["labels"])
                bar.update(n + len(batch["errors"]))
                # A BatchNorm layer in training mode cannot normalise a batch of one image.
                if n == 0 or (skip_single and n < 2):
                    continue
                images = batch["images"].to(self.device, non_blocking=True)
                labels = batch["labels"].to(self.device, non_blocking=True)
                logits = self.net(images)
                loss = F.cross_entropy(logits, labels)
                if train:
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                loss_sum += float(loss.detach()) * n
                correct += int((logits.argmax(dim=1) == labels).sum())
                total += n
                bar.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{correct / total:.1%}", refresh=False)
        if total == 0:
            return math.nan, math.nan, 0
        return loss_sum / total, correct / total, total

    def error_list(self) -> list[tuple[str, str]]:
        return list(self.errors.items())

    def _nothing_usable(self, split: str, n: int) -> str:
        sample = "; ".join(f"{p}: {r}" for p, r in list(self.errors.items())[:3])
        return (
            f"None of the {n} {split} images of {self.config.source} could be used ({sample or 'no reason recorded'}). "
            "Check that SOURCE holds readable images."
        )


@contextlib.contextmanager
def _seeded_rng(seed: int, device: torch.device):
    """Seed torch's global RNG (head init, in-process augmentation, dropout) and restore it after."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# --- files ---------------------------------------------------------------------------------


def _check_out(out: str) -> Path:
    """The output directory; created only when there is something to write into it."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"--out {out} is a file; finetune writes a directory (best.pt, history.json). Pass a directory path."
        )
    return path


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


def _read_probe(probe_dir: str, spec: BackboneSpec, node: str, classes: list[str], in_features: int) -> dict:
    """probe.pt of a linear probe, checked against this run: same model, head slot and classes."""
    path = Path(probe_dir).expanduser()
    if path.is_dir():
        path = path / PROBE_FILE
    try:
        probe = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(
            f"--init-head: no {PROBE_FILE} in {probe_dir}. Pass the output directory of a trained linear probe."
        ) from None
    except Exception as exc:
        raise ConfigError(f"--init-head: {path} is not a readable probe file: {exc}") from exc
    need = ("coef", "intercept", "classes", "model", "layer")
    if not isinstance(probe, dict) or any(k not in probe for k in need):
        raise ConfigError(f"--init-head: {path} is not a linear probe (it needs the keys {', '.join(need)}).")
    differences = []
    if probe["model"] != spec.name:
        differences.append(f"model: probe has {probe['model']!r}, this run uses {spec.name!r}")
    else:
        # A probe on any output point that feeds the same head slot (e.g. ResNet `layer4`,
        # globally pooled, and `avgpool`) computed exactly the features this head consumes.
        try:
            same_slot = head_slot(spec, probe["layer"]) == head_slot(spec, node)
        except ConfigError:
            same_slot = False
        if not same_slot:
            differences.append(f"layer: probe has {probe['layer']!r}, this run uses {node!r} (pass --layer)")
        pooling = json.loads(probe.get("components", "{}")).get("pooling", "avg")
        if pooling != "avg":
            differences.append(f"pooling: probe has {pooling!r}, the network's head sees average pooling (--pool avg)")
    if list(probe["classes"]) != list(classes):
        differences.append(f"classes: probe has {list(probe['classes'])}, SOURCE has {list(classes)}")
    if differences:
        raise ConfigError(
            f"--init-head: the probe in {probe_dir} does not fit this run:\n  "
            + "\n  ".join(differences)
            + "\nTrain the probe on features of the same model and layer, from the same labelled images."
        )
    coef = torch.as_tensor(probe["coef"], dtype=torch.float32)
    intercept = torch.as_tensor(probe["intercept"], dtype=torch.float32)
    if tuple(coef.shape) != (len(classes), in_features) or tuple(intercept.shape) != (len(classes),):
        raise ConfigError(
            f"--init-head: {path} has coef {tuple(coef.shape)} and intercept {tuple(intercept.shape)}; this head "
            f"needs [{len(classes)}, {in_features}] and [{len(classes)}]. Re-train the probe on this model's features."
        )
    return {"coef": coef, "intercept": intercept}
