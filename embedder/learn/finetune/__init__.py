"""Fine-tuning a pretrained backbone end to end, or training only a new head on a frozen one.

    from embedder.learn.finetune import FinetuneConfig, finetune

    report = finetune(FinetuneConfig.of(source="photos/", model="resnet18", out="runs/ft"))

One module per job, in the order a run uses them:

The settings, `FinetuneConfig`, are declared with the other learn settings in
embedder.learn.config, so the CLI builds its parser without importing torch.

  data.py     datasets over the listing, augmentation, the seeded loaders
  network.py  the backbone with a new head, what may train (--freeze-backbone, --freeze-bn),
              the probe of --init-head
  loop.py     optimiser and schedule, the epoch loop, evaluation
  run.py      `finetune(config)`: resolve, train, save OUT as a whole; `FinetuneReport`
"""

from embedder.learn.config import HEADS, SCHEDULES, FinetuneConfig
from embedder.learn.finetune.data import ImageRows, collate_rows, train_transform
from embedder.learn.finetune.network import FinetuneNetwork, build_network
from embedder.learn.finetune.run import FinetuneReport, finetune

__all__ = [
    "HEADS",
    "SCHEDULES",
    "FinetuneConfig",
    "FinetuneNetwork",
    "FinetuneReport",
    "ImageRows",
    "build_network",
    "collate_rows",
    "finetune",
    "train_transform",
]
