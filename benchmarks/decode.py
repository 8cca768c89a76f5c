"""Reading JPEG photos for the model: the exact paths and `--jpeg-draft`, and the decode share per model.

    python -m benchmarks decode [--quick]

Photo-like JPEGs of 1-3 MP on disk (scikit-image's photographs, upscaled, with sensor-like
noise, quality 90, one in four EXIF-rotated as phone photos are), read to the model's
224 px input (resize 256, centre crop) four ways, interleaved round by round in one process:

  PIL (before)      embedder's reader until now: PIL decode, a contiguous copy, resize
  PIL, its layout   the same decode, resized in the decoder's own [H, W, 3] layout
  torchvision (now) the reader's default now: torchvision.io.decode_jpeg in its layout (PIL
                    for the photos EXIF turns upright)
  --jpeg-draft      PIL's draft: libjpeg DCT scaling to a shorter side >= 256, then resize

Prints decode and resize ms per image, images/s in one process and with 2 reader processes,
and the ratio to "before". Fidelity against "before": the largest pixel difference of the
model's input crops, and the cosine of efficientnet_lite0's features (its shipped pretrained
weights). Last, the decode share per model: read time per image (decode + resize, what a
reader worker does) over read + model forward per image, for resnet50 and efficientnet_lite0
in eager mode, batch 4, fp32, the forward timed in the same rounds as the reads.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from embedder.data import decode
from embedder.data.transforms import geometric_transform
from embedder.extract.core import load_backbone
from embedder.models.registry import get_backbone_spec

VARIANTS = ("PIL (before)", "PIL, its layout", "torchvision (now)", "--jpeg-draft")


def make_photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """JPEG photos of 1-3 MP: random crops of scikit-image's photographs, upscaled, with noise."""
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        src = photos[i % len(photos)]
        h, w = src.shape[:2]
        ch, cw = int(rng.integers(h * 2 // 3, h + 1)), int(rng.integers(w * 2 // 3, w + 1))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        scale = (rng.uniform(1.0, 3.0) * 1e6 / (ch * cw)) ** 0.5
        size = (round(cw * scale), round(ch * scale))
        big = np.asarray(Image.fromarray(src[y : y + ch, x : x + cw]).resize(size, Image.Resampling.BICUBIC))
        noisy = np.clip(big + rng.normal(0, 4, big.shape), 0, 255).astype(np.uint8)
        exif = Image.Exif()
        exif[0x0112] = 6 if i % 4 == 3 else 1
        paths.append(folder / f"{i:04d}.jpg")
        Image.fromarray(noisy).save(paths[-1], quality=90, exif=exif.tobytes())
    return paths


@contextmanager
def _pil_only():
    """Every JPEG through PIL, as before torchvision's decoder was used (benchmark only)."""
    real = decode._jpeg_decoder
    decode._jpeg_decoder = lambda: None
    try:
        yield
    finally:
        decode._jpeg_decoder = real


def read(variant: str, path: Path, transform, resize: int, seconds: dict | None = None) -> torch.Tensor:
    """One photo to the model's uint8 input the `variant` way, adding decode and resize seconds."""
    t0 = time.perf_counter()
    if variant.startswith("PIL"):
        with _pil_only():
            image = decode.load_rgb(path, contiguous=variant == "PIL (before)")
    else:
        image = decode.load_rgb(path, jpeg_min_side=resize if variant == "--jpeg-draft" else None, contiguous=False)
    t1 = time.perf_counter()
    crop = transform(image)
    if seconds is not None:
        seconds["decode"] += t1 - t0
        seconds["resize"] += time.perf_counter() - t1
    return crop


def one_process(paths: list[Path], transform, resize: int, rounds: int, models: dict, batches: int) -> dict:
    """Seconds per image: {variant: {"decode": s, "resize": s}} and {model: forward s}, in interleaved
    rounds, so that the VM's drift (and a neighbour's load) hits every variant and model alike."""
    seconds = {v: {"decode": 0.0, "resize": 0.0} for v in VARIANTS}
    forward = dict.fromkeys(models, 0.0)
    x = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8)
    for backbone in models.values():
        for _ in range(3):  # oneDNN settles in over the first calls
            backbone(x)
    for r in range(rounds):
        for v in VARIANTS[r % 4 :] + VARIANTS[: r % 4]:  # each variant first in turn
            for p in paths:
                read(v, p, transform, resize, seconds[v])
        for name, backbone in models.items():
            t0 = time.perf_counter()
            for _ in range(batches):
                backbone(x)
            forward[name] += time.perf_counter() - t0
    n = rounds * len(paths)
    return {v: {k: s / n for k, s in st.items()} for v, st in seconds.items()}, {
        m: s / (rounds * batches * 4) for m, s in forward.items()}


class _Reads(Dataset):
    def __init__(self, variant, paths, transform, resize):
        self.args = variant, paths, transform, resize

    def __len__(self):
        return len(self.args[1])

    def __getitem__(self, i):
        variant, paths, transform, resize = self.args
        return read(variant, paths[i], transform, resize)


def with_workers(paths: list[Path], transform, resize: int, workers: int, rounds: int) -> dict[str, float]:
    """Images/s read by `workers` reader processes (the DataLoader of `embedder embed`), started
    and warmed up by one untimed pass first."""
    seconds = dict.fromkeys(VARIANTS, 0.0)
    loaders = {v: DataLoader(_Reads(v, paths, transform, resize), batch_size=4, num_workers=workers,
                             persistent_workers=True, prefetch_factor=4) for v in VARIANTS}
    for r in range(rounds + 1):
        for v, loader in loaders.items():
            t0 = time.perf_counter()
            for _batch in loader:
                pass
            seconds[v] += (time.perf_counter() - t0) if r else 0.0
    return {v: rounds * len(paths) / s for v, s in seconds.items()}


def fidelity(paths: list[Path], transform, resize: int) -> dict[str, tuple[int, float, float, float]]:
    """{variant: (largest and mean input pixel difference, mean and least feature cosine)} against "before"."""
    backbone = load_backbone("efficientnet_lite0", "DEFAULT", device="cpu", precision="fp32")
    crops = {v: torch.stack([read(v, p, transform, resize) for p in paths]) for v in VARIANTS}
    feats = {v: torch.cat([backbone(c[i : i + 4]) for i in range(0, len(c), 4)]) for v, c in crops.items()}
    out = {}
    for v in VARIANTS[1:]:
        diff = (crops[v].int() - crops[VARIANTS[0]].int()).abs()
        cos = torch.nn.functional.cosine_similarity(feats[v], feats[VARIANTS[0]])
        out[v] = (int(diff.max()), float(diff.float().mean()), float(cos.mean()), float(cos.min()))
    return out


def eager(model: str):
    """`model` as `embedder embed` runs it on CPU in eager mode at fp32 (random init: the same speed)."""
    return load_backbone(model, "none", device="cpu", precision="fp32")


def run(quick: bool = False) -> None:
    n, rounds, batches = (8, 1, 1) if quick else (48, 3, 4)
    pre = get_backbone_spec("efficientnet_lite0").preprocessing  # resize 256 bicubic, crop 224
    transform = geometric_transform(pre)
    work = Path(tempfile.mkdtemp(prefix="embedder-bench-decode-"))
    try:
        paths = make_photos(work, n)
        mp = np.mean([np.prod(Image.open(p).size) for p in paths]) / 1e6
        kb = np.mean([p.stat().st_size for p in paths]) / 1024
        print(f"# {n} JPEG photos, {mp:.1f} MP and {kb:.0f} KB on average, to 224 px ({pre.interpolation}), "
              f"{torch.get_num_threads()} torch threads, {rounds} interleaved rounds")
        models = {m: eager(m) for m in ("resnet50", "efficientnet_lite0")}
        per_image, forward = one_process(paths, transform, pre.resize_size, rounds, models, batches)
        two = with_workers(paths, transform, pre.resize_size, 2, rounds)
        report_speed(per_image, two)
        report_fidelity(fidelity(paths[: 8 if quick else 32], transform, pre.resize_size))
        report_share(per_image, forward)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report_speed(per_image: dict, two: dict) -> None:
    base = sum(per_image[VARIANTS[0]].values())
    print(f"{'variant':<18}{'decode ms':>10}{'resize ms':>10}{'img/s':>8}{'ratio':>7}{'2 workers':>11}{'ratio':>7}")
    for v in VARIANTS:
        d, r = per_image[v]["decode"], per_image[v]["resize"]
        print(f"{v:<18}{d * 1e3:>10.2f}{r * 1e3:>10.2f}{1 / (d + r):>8.1f}{base / (d + r):>6.2f}x"
              f"{two[v]:>11.1f}{two[v] / two[VARIANTS[0]]:>6.2f}x")


def report_fidelity(fid: dict) -> None:
    print("  against PIL (before): pixel difference of the 224 px input; efficientnet_lite0 feature cosine")
    for v, (most, mean_diff, mean, least) in fid.items():
        print(f"  {v:<18} |diff| max {most:>3}, mean {mean_diff:5.2f}   cosine mean {mean:.6f}, least {least:.6f}")


def report_share(per_image: dict, models: dict[str, float]) -> None:
    print("  decode share = read (decode + resize) / (read + model forward), per image, eager batch 4 fp32:")
    for model, fwd in models.items():
        shares = ", ".join(f"{v} {sum(per_image[v].values()) / (sum(per_image[v].values()) + fwd):.0%}"
                           for v in VARIANTS)
        print(f"  {model:<18} forward {fwd * 1e3:6.1f} ms ({1 / fwd:5.1f} img/s): {shares}")
