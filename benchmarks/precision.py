"""CPU precision and memory layout, side by side: the measurement behind `--precision auto`.

    python -m benchmarks precision            # resnet50 and efficientnet_lite0, batch 16
    python -m benchmarks precision --quick    # resnet18 only, shorter

Variants run interleaved round by round (so drift on a shared machine hits all of them
alike) through the real FrozenBackbone on random uint8 input at 224 px. Prints images/s,
the ratio to fp32/contiguous, and the cosine similarity of each variant's features to
the fp32 ones.
"""

from __future__ import annotations

import platform
import time

import torch

from embedder.models.runtime import cpu_has_native_bf16, resolve_runtime
from embedder.models.space import FeatureSpace

VARIANTS = [("fp32", False), ("fp32", True), ("bf16", True)]


def compare(models: list[str], batch: int, rounds: int, batches_per_round: int) -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
    print(f"# CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"native bf16: {cpu_has_native_bf16()}, torch {torch.__version__}")
    print(f"# auto resolves to: {resolve_runtime('cpu')}")
    for model in models:
        nets = {
            (p, cl): FeatureSpace(model, weights="none", device="cpu", precision=p, runtime="torch",
                                  memory_layout="channels_last" if cl else "contiguous").load()
            for p, cl in VARIANTS
        }
        reference = nets[("fp32", False)](x)
        seconds = dict.fromkeys(nets, 0.0)
        for net in nets.values():
            net(x)  # warm-up
        for _ in range(rounds):
            for key, net in nets.items():
                t0 = time.perf_counter()
                for _ in range(batches_per_round):
                    net(x)
                seconds[key] += time.perf_counter() - t0
        images = rounds * batches_per_round * batch
        base = images / seconds[("fp32", False)]
        print(f"\n{model} (batch {batch}, {images} images per variant)")
        print(f"{'variant':<24}{'img/s':>8}{'vs fp32':>9}{'cosine to fp32':>16}")
        for (p, cl), net in nets.items():
            rate = images / seconds[(p, cl)]
            cos = torch.nn.functional.cosine_similarity(net(x), reference).min().item()
            name = f"{p} {'channels_last' if cl else 'contiguous'}"
            print(f"{name:<24}{rate:>8.1f}{rate / base:>8.2f}x{cos:>16.6f}")


def run(quick: bool = False) -> None:
    if quick:
        compare(["resnet18"], batch=16, rounds=2, batches_per_round=1)
    else:
        compare(["resnet50", "efficientnet_lite0"], batch=16, rounds=3, batches_per_round=2)
