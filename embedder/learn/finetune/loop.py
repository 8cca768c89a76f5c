"""The training loop of a finetuning run: optimiser and schedule, epochs, evaluation.

The best epoch (by validation accuracy, ties to the earlier epoch) is kept in memory; a
file that cannot be decoded is skipped and reported once, however many epochs meet it.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from embedder.data.sources import Listing
from embedder.data.splits import Splits
from embedder.errors import AllImagesFailedError
from embedder.learn.config import FinetuneConfig
from embedder.learn.finetune.data import ImageRows, SplitSets, make_loader
from embedder.learn.finetune.network import FinetuneNetwork
from embedder.models.registry import Preprocessing
from embedder.progress import bar as progress_bar


def make_optimizer(config: FinetuneConfig, net: FinetuneNetwork):
    """SGD with momentum over what may train, and its per-epoch learning-rate schedule."""
    optimizer = torch.optim.SGD(
        net.trainable_parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    if config.schedule == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, config.step_size, config.gamma)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return optimizer, scheduler


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device):
    """Seed torch's global RNG (head init, in-process augmentation, dropout) and restore it after."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class Trainer:
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
        self.errors: dict[str, str] = {}  # path -> reason; a bad file fails every epoch, report it once
        self.workers = config.resolved_workers()
        sets = SplitSets.of(listing, splits, pre, config.max_pixels)
        self.train_loader = self._loader(sets.train, shuffle=True, keep=True)
        self.val_loader = self._loader(sets.val, shuffle=False, keep=True)
        self.test_set = sets.test  # its loader is made once, after training
        self.optimizer, self.scheduler = make_optimizer(config, net)

    def _loader(self, dataset: ImageRows, shuffle: bool, keep: bool) -> DataLoader:
        return make_loader(dataset, self.config.batch_size, self.config.seed, self.workers, shuffle=shuffle,
                           keep=keep, pin_memory=self.device.type == "cuda")

    def fit(self) -> tuple[list[dict], int, dict[str, torch.Tensor]]:
        """Train every epoch: (history, best epoch (1-based), the best epoch's state dict on the CPU)."""
        history: list[dict] = []
        best_epoch, best_acc, best_state = 0, -1.0, {}
        for epoch in range(1, self.config.epochs + 1):
            row = self._epoch(epoch)
            history.append(row)
            improved = row["val_acc"] > best_acc  # strictly better: ties keep the earlier (less trained) epoch
            if improved:
                best_epoch, best_acc = epoch, row["val_acc"]
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.net.model.state_dict().items()}
            if self.config.progress:  # the bars are transient; leave one line per epoch
                tqdm.write(_epoch_line(row, self.config.epochs, improved), file=sys.stderr)
        return history, best_epoch, best_state

    def _epoch(self, epoch: int) -> dict:
        """One training and one validation pass, then a step of the schedule: the epoch's history row."""
        t0 = time.perf_counter()
        lr = float(self.optimizer.param_groups[0]["lr"])
        of = f"epoch {epoch}/{self.config.epochs}"
        self.net.train()
        train_loss, train_acc, n_train = self._phase(self.train_loader, f"{of} train", True)
        if n_train == 0:
            raise AllImagesFailedError(self._nothing_usable("training", len(self.splits.train)))
        self.net.eval()
        val_loss, val_acc, n_val = self._phase(self.val_loader, f"{of} val", False)
        if n_val == 0:
            raise AllImagesFailedError(self._nothing_usable("validation", len(self.splits.val)))
        self.scheduler.step()
        return {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "seconds": round(time.perf_counter() - t0, 3),
            "lr": lr,
        }

    def evaluate_test(self) -> float | None:
        """Accuracy of the network as it is now on the test split; None without (usable) test images."""
        if len(self.test_set) == 0:
            return None
        self.net.eval()
        _, acc, n = self._phase(self._loader(self.test_set, shuffle=False, keep=False), "test", False)
        return acc if n else None

    def _phase(self, loader: DataLoader, desc: str, train: bool) -> tuple[float, float, int]:
        """One pass over `loader`: (mean loss, accuracy, images used)."""
        loss_sum, correct, total = 0.0, 0, 0
        bar = progress_bar(total=len(loader.dataset), unit="img", desc=desc, enabled=self.config.progress, leave=False)
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
                loss, n_correct = self._step(batch, train)
                loss_sum += loss * n
                correct += n_correct
                total += n
                bar.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{correct / total:.1%}", refresh=False)
        if total == 0:
            return math.nan, math.nan, 0
        return loss_sum / total, correct / total, total

    def _step(self, batch: dict, train: bool) -> tuple[float, int]:
        """Forward one batch (and, when training, one optimiser step): (mean loss, correct predictions)."""
        images = batch["images"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        logits = self.net(images)
        loss = F.cross_entropy(logits, labels)
        if train:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return float(loss.detach()), int((logits.argmax(dim=1) == labels).sum())

    def error_list(self) -> list[tuple[str, str]]:
        return list(self.errors.items())

    def _nothing_usable(self, split: str, n: int) -> str:
        sample = "; ".join(f"{p}: {r}" for p, r in list(self.errors.items())[:3])
        return (
            f"None of the {n} {split} images of {self.config.source} could be used ({sample or 'no reason recorded'}). "
            "Check that SOURCE holds readable images."
        )


def _epoch_line(row: dict, n_epochs: int, improved: bool) -> str:
    """The line a run leaves on stderr per epoch (with --progress)."""
    return (
        f"epoch {row['epoch']}/{n_epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.1%} | "
        f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.1%} | lr {row['lr']:.3g} | "
        f"{row['seconds']:.1f} s{'  (best so far)' if improved else ''}"
    )
