"""`--compile` (torch.compile, inductor, weights frozen) against eager mode: the measurement
behind leaving it off by default.

    python -m benchmarks compiled            # resnet50 at 224 px, batch 4 and 16
    python -m benchmarks compiled --quick    # resnet18 at 112 px, batch 4

Both run the real FrozenBackbone with the CPU defaults (fp32, channels_last), interleaved
round by round. Prints the one-off compile time (the first call), steady images/s, the
ratio, the cosine similarity and largest absolute difference to eager features, and the
break-even: how many images a job needs before the compile time is paid back. A second
compiled backbone is then timed too: inductor caches its kernels on disk
(/tmp/torchinductor_$USER), so a later run of the same model and batch starts faster.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import torch

from embedder.models.backbone import FrozenBackbone
from embedder.models.runtime import resolve_runtime
from embedder.models.space import FeatureSpace


def compare(model: str, size: int, batch: int, rounds: int, batches_per_round: int) -> None:
    runtime = resolve_runtime("cpu")
    torch.manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)

    def make(compile: bool) -> FrozenBackbone:
        return FeatureSpace(model, weights="none", device="cpu", precision=runtime.precision,
                            memory_layout=runtime.memory_layout, image_size=size, compile=compile,
                            runtime="torch").load()

    eager, compiled = make(False), make(True)
    t0 = time.perf_counter()
    got = compiled(x)  # compiles
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    make(True)(x)  # compiles again, from inductor's kernel cache
    warm_setup = time.perf_counter() - t0
    want = eager(x)
    seconds = {"eager": 0.0, "compiled": 0.0}
    for _ in range(rounds):
        for name, net in (("eager", eager), ("compiled", compiled)):
            t0 = time.perf_counter()
            for _ in range(batches_per_round):
                net(x)
            seconds[name] += time.perf_counter() - t0
    images = rounds * batches_per_round * batch
    rate = {k: images / s for k, s in seconds.items()}
    saved_per_image = 1 / rate["eager"] - 1 / rate["compiled"]
    break_even = f"{setup / saved_per_image:,.0f}" if saved_per_image > 0 else "never"
    cos = torch.nn.functional.cosine_similarity(got, want).min().item()
    print(f"\n{model} at {size} px, batch {batch}, {runtime.precision} "
          f"{'channels_last' if runtime.channels_last else 'contiguous'}, {images} images per variant")
    print(f"  eager     {rate['eager']:7.1f} img/s")
    print(f"  compiled  {rate['compiled']:7.1f} img/s   {rate['compiled'] / rate['eager']:.2f}x, "
          f"after {setup:.1f} s compiling ({warm_setup:.1f} s again with the kernel cache warm)")
    print(f"  features: min cosine {cos:.7f}, max |diff| {(got - want).abs().max().item():.2e}")
    print(f"  break-even: {break_even} images (compile time / time saved per image)")


def run(quick: bool = False) -> None:
    # A fresh kernel cache, so that the first compile is timed cold, as on a new machine.
    cache = tempfile.mkdtemp(prefix="embedder-inductor-")
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    try:
        if quick:
            compare("resnet18", size=112, batch=4, rounds=2, batches_per_round=4)
        else:
            for batch in (4, 16):
                compare("resnet50", size=224, batch=batch, rounds=4, batches_per_round=40 // batch * 2)
    finally:
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
        shutil.rmtree(cache, ignore_errors=True)
