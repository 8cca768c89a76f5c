"""Extraction efficiency: JPEG files on disk -> committed cache, against the bare model.

    python -m benchmarks extraction [--quick]

Both sides use the same backbone, batch size, precision and memory layout, in one process,
alternating round by round. "model only" feeds ready uint8 crops to the backbone; "end to
end" is `embedder.embed` from JPEG files to a finished HDF5 cache (decode, resize, transfer,
model, write, commit, consolidate), once per reader-worker setting. Prints images/s, the
ratio end-to-end / model-only, and the per-stage seconds of the end-to-end runs.

Two sweeps check the other extraction defaults: model-only images/s at batch 2..32 (the
CPU default is 4), and the JPEG decoder: embedder's `load_rgb` (with its EXIF/alpha/bomb
rules; torchvision's decoder for JPEGs since benchmarks/decode.py, which compares the
reading paths in full) against the bare `torchvision.io.decode_jpeg` call, per image, with
the largest pixel difference.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from embedder.extract.config import EmbedConfig
from embedder.extract.core import load_backbone
from embedder.extract.local import embed


def make_jpegs(folder: Path, n: int, seed: int = 0, scale: float = 1.5) -> list[Path]:
    """Photo-like JPEGs of varying size: random crops of scikit-image's bundled photographs."""
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        src = photos[i % len(photos)]
        h, w = src.shape[:2]
        ch, cw = int(rng.integers(h // 2, h)), int(rng.integers(w // 2, w))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        img = Image.fromarray(src[y : y + ch, x : x + cw]).resize((int(cw * scale), int(ch * scale)))
        path = folder / f"{i:05d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def run(quick: bool = False) -> None:
    from embedder.models.runtime import auto_batch_size

    batch = auto_batch_size()  # the default of `embedder embed`
    model, n, rounds = ("resnet18", 64, 2) if quick else ("resnet50", 192, 2)
    work = Path(tempfile.mkdtemp(prefix="embedder-bench-"))
    try:
        make_jpegs(work / "images", n)
        backbone = load_backbone(model, "none")
        cfg = backbone.config
        crops = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
        backbone(crops)  # warm-up
        print(f"# {model}, batch {batch}, {n} JPEGs, precision {cfg.precision}, "
              f"{'channels_last' if cfg.channels_last else 'contiguous'}, {torch.get_num_threads()} threads")
        model_s, e2e = 0.0, {}
        stages: dict[int, dict] = {}
        for r in range(rounds):
            t0 = time.perf_counter()
            for _ in range(0, n, batch):
                backbone(crops)
            model_s += time.perf_counter() - t0
            for workers in (0, 1):
                out = work / f"c{r}-{workers}.h5"
                report = embed(EmbedConfig.of(source=str(work / "images"), model=model, out=str(out), weights="none",
                                           batch_size=batch, workers=workers, progress=False), backbone=backbone)
                e2e[workers] = e2e.get(workers, 0.0) + report.wall_s
                stages[workers] = report.stage_s
        model_rate = rounds * n / model_s
        print(f"{'variant':<34}{'img/s':>8}{'vs model':>10}")
        print(f"{'model only (ready uint8 crops)':<34}{model_rate:>8.1f}{1.0:>9.2f}x")
        for workers, seconds in e2e.items():
            rate = rounds * n / seconds
            print(f"{f'end to end, {workers} reader workers':<34}{rate:>8.1f}{rate / model_rate:>9.2f}x")
        for workers, st in stages.items():
            print(f"  stages, {workers} workers (last round, s): " + ", ".join(f"{k} {v:.2f}" for k, v in st.items()))
        batch_sweep(backbone, 64 if quick else 128)
        decoders(sorted((work / "images").glob("*.jpg")))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def batch_sweep(backbone, n: int) -> None:
    sizes = (2, 4, 8, 16, 32)
    seconds = dict.fromkeys(sizes, 0.0)
    for _ in range(2):  # interleaved rounds
        for b in sizes:
            crops = torch.randint(0, 256, (b, 3, 224, 224), dtype=torch.uint8)
            backbone(crops)  # warm-up for this shape
            t = time.perf_counter()
            for _ in range(0, n, b):
                backbone(crops)
            seconds[b] += time.perf_counter() - t
    base = 2 * n / seconds[4]
    print("  batch size (model only): " + ", ".join(f"{b}: {2 * n / s:.1f} img/s ({2 * n / s / base:.2f}x)"
                                                   for b, s in seconds.items()))


def decoders(paths: list[Path]) -> None:
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    from embedder.data.decode import load_rgb

    t = time.perf_counter()
    pil = [load_rgb(p) for p in paths]
    pil_s = time.perf_counter() - t
    t = time.perf_counter()
    tv = [decode_jpeg(read_file(str(p)), mode=ImageReadMode.RGB) for p in paths]
    tv_s = time.perf_counter() - t
    diff = max(int((a.int() - b.int()).abs().max()) for a, b in zip(pil, tv))
    print(f"  JPEG decode: load_rgb {len(paths) / pil_s:.0f} img/s, bare decode_jpeg {len(paths) / tv_s:.0f} img/s "
          f"({pil_s / tv_s:.2f}x); largest pixel difference {diff}")
