"""Cached linear probe against the tutorial's fixed-feature-extractor training.

    python -m benchmarks training [--quick]

Same data (the LFW sample in its train/val folders), same split, same backbone (the
shipped EfficientNet-Lite0), same number of epochs for the loop that re-runs the frozen
backbone on every image every epoch (`embedder finetune --freeze-backbone`, which keeps
the backbone eval-locked). The cached side pays for its one-off extraction. Prints wall
times, their ratio, and both validation accuracies.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from embedder.data.samples import make_samples
from embedder.extract.config import EmbedConfig
from embedder.extract.local import embed
from embedder.learn.finetune import FinetuneConfig, finetune
from embedder.learn.train import ProbeConfig, run_probe


def run(quick: bool = False) -> None:
    epochs = 3 if quick else 25
    work = Path(tempfile.mkdtemp(prefix="embedder-bench-"))
    try:
        data = make_samples(work, only=["lfw_subset"])["lfw_subset"]
        t0 = time.perf_counter()
        embed(EmbedConfig.of(source=str(data), model="efficientnet_lite0", out=str(work / "c.h5"), progress=False))
        extract_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        probe = run_probe(ProbeConfig(str(work / "c.h5"), out=str(work / "probe")))
        probe_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        loop = finetune(FinetuneConfig.of(source=str(data), model="efficientnet_lite0", out=str(work / "frozen"),
                                       freeze_backbone=True, epochs=epochs, lr=0.01, progress=False))
        loop_s = time.perf_counter() - t2
        cached = extract_s + probe_s
        print(f"{'method':<44}{'wall s':>9}{'val acc':>9}")
        print(f"{'cached: extract once + linear probe':<44}{cached:>9.1f}{100 * probe['val_accuracy']:>8.1f}%")
        print(f"{'  (of which extraction)':<44}{extract_s:>9.1f}")
        print(f"{f'fixed extractor loop, {epochs} epochs':<44}{loop_s:>9.1f}{100 * loop.best_val_acc:>8.1f}%")
        print(f"speed-up of the cached probe: {loop_s / cached:.1f}x; accuracy difference "
              f"{100 * (probe['val_accuracy'] - loop.best_val_acc):+.1f} points")
    finally:
        shutil.rmtree(work, ignore_errors=True)
