"""GPU figures in one short run: ResNet-50 model only and end to end, for a lent GPU machine.

    bash benchmarks/gpu.sh               # on the GPU machine (installs embedder --no-deps beside its torch)
    python -m benchmarks.gpu --dry-run   # anywhere: the same code on the CPU at toy sizes

Model only (random uint8 batches already on the device, 224 px): eager bf16 channels_last at
batch 64, 128 and 256, and `--compile` at the best of them. Decode: a batch of JPEG files through
`torchvision.io.decode_jpeg(device="cuda")` (nvJPEG) against PIL on the CPU workers. End to end:
JPEG files on disk -> committed cache with `embed()` at the chosen batch size. Reference points:
timm's 4,218 img/s for ResNet-50 model only on an RTX 4090, clip-retrieval's ~2,500 img/s per
A100 end to end (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.extraction import make_jpegs
from embedder.extract.config import EmbedConfig
from embedder.extract.core import load_backbone
from embedder.extract.local import embed


def rate(fn, images_per_call: int, seconds: float, sync) -> float:
    fn()
    sync()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        fn()
        n += images_per_call
    sync()
    return n / (time.perf_counter() - t0)


def model_only(device: str, batches: list[int], size: int, seconds: float, compile: bool, sync) -> int:
    precision = "bf16" if device == "cuda" else "fp32"
    net = load_backbone("resnet50", "none", device=device, precision=precision, memory_layout="channels_last",
                        image_size=size, runtime="torch")
    best, best_rate = batches[0], 0.0
    for batch in batches:
        x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
        r = rate(lambda x=x: net(x), batch, seconds, sync)
        print(f"resnet50 eager {precision} channels_last, batch {batch:>4}: {r:>8.0f} img/s")
        if r > best_rate:
            best, best_rate = batch, r
    if compile:
        net = load_backbone("resnet50", "none", device=device, precision=precision, memory_layout="channels_last",
                            image_size=size, runtime="torch", compile=True)
        x = torch.randint(0, 256, (best, 3, size, size), dtype=torch.uint8, device=device)
        t0 = time.perf_counter()
        net(x)
        sync()
        print(f"resnet50 --compile: compiled in {time.perf_counter() - t0:.0f} s; batch {best}: "
              f"{rate(lambda: net(x), best, seconds, sync):>8.0f} img/s")
    return best


def decode(paths: list[Path], device: str, sync) -> None:
    from torchvision.io import decode_jpeg, read_file

    data = [read_file(str(p)) for p in paths]
    r = rate(lambda: decode_jpeg(data, device=device), len(data), 3.0, sync)
    print(f"decode_jpeg(device={device!r}), batch of {len(data)} files in memory: {r:>8.0f} img/s")


def end_to_end(folder: Path, device: str, batch: int, work: Path) -> None:
    n = sum(1 for _ in folder.rglob("*.jpg"))
    config = EmbedConfig.of(source=str(folder), model="resnet50", out=str(work / "e2e.h5"), weights="none", device=device,
                         batch_size=batch, progress=False, overwrite=True, runtime="torch")
    t0 = time.perf_counter()
    embed(config)
    print(f"end to end: {n} JPEG files -> committed cache on {device}, batch {batch}: "
          f"{n / (time.perf_counter() - t0):>8.0f} img/s (whole embed() call)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="the CPU at toy sizes: checks the script, measures nothing")
    args = ap.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run this on the GPU machine, or pass --dry-run.")
    device = "cpu" if args.dry_run else "cuda"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    work = Path(tempfile.mkdtemp(prefix="embedder-gpu-"))
    try:
        paths = make_jpegs(work / "photos" / "all", 16 if args.dry_run else 2048)
        batch = model_only(device, [4] if args.dry_run else [64, 128, 256], 64 if args.dry_run else 224,
                           0.5 if args.dry_run else 5.0, compile=not args.dry_run, sync=sync)
        decode(paths[:8] if args.dry_run else paths[:256], device, sync)
        end_to_end(work / "photos", device, batch, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
