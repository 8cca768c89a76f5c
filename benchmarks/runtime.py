"""Runtimes side by side, against the machine's own GEMM peak: the evidence behind `--runtime auto`.

    python -m benchmarks runtime            # resnet50, efficientnet_lite0 and vgg16; model only and end to end
    python -m benchmarks runtime --quick    # resnet18 only, fewer images, no --compile

One process. The roofline line first: the fp32 peak of a large `torch.mm` on this machine's threads
(and the bf16 one where the CPU has native bf16). Then per model, interleaved round by round so
that drift on a shared machine hits every variant alike, on random uint8 input at 224 px, batch 4
(the CPU default): torch eager fp32 channels_last, torch eager bf16 (native bf16 only), torch.compile
fp32 (full mode), and ONNX Runtime fp32. Each variant prints images/s, the ratio to torch fp32,
GFLOP/s achieved from the FLOPs counted on the graph (torch.utils.flop_counter, not a constant), that
as a share of the fp32 peak, and the smallest cosine of its features to torch fp32's.

End to end: JPEG photos on disk -> committed HDF5 cache with `embed()` for each runtime and the
default (`--runtime auto --precision auto`), whole process, against the fastest model-only rate.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.extraction import make_jpegs
from embedder.extract.config import EmbedConfig
from embedder.extract.core import load_backbone, with_runtime
from embedder.extract.local import embed
from embedder.models.onnx import cache_root
from embedder.models.registry import get_backbone_spec
from embedder.models.runtime import cpu_has_native_bf16, resolve_runtime

BATCH = 4
# Enough photos that start-up (model build, reader processes, the graph check) is a small share.
E2E_IMAGES = {"resnet50": 480, "efficientnet_lite0": 768, "vgg16": 192}


def _best_rate(fn, flops: float, seconds: float = 2.0) -> float:
    fn()
    best = 0.0
    for _ in range(3):
        t0, reps = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds / 3:
            fn()
            reps += 1
        best = max(best, flops * reps / (time.perf_counter() - t0) / 1e9)
    return best


def gemm_peaks(n: int = 2048) -> dict[str, float]:
    """GFLOP/s of a large fp32 square matmul in each library on this process's threads. The best of
    them is the roofline: the libraries differ by up to 2x on one CPU (MKL, which torch.mm and
    numpy may use, is slow on AMD; ONNX Runtime's MLAS is not)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a, b = torch.randn(n, n), torch.randn(n, n)
    an, bn = a.numpy(), b.numpy()
    flops = 2 * n**3
    peaks = {"torch.mm": _best_rate(lambda: torch.mm(a, b), flops), "numpy": _best_rate(lambda: np.matmul(an, bn), flops)}
    spec = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in "ABC"]
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "mm", spec[:2], spec[2:])
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
                                   .SerializeToString(), options, providers=["CPUExecutionProvider"])
    peaks["onnxruntime MatMul"] = _best_rate(lambda: session.run(None, {"A": an, "B": bn}), flops)
    return peaks


def _bf16_peak(n: int = 2048) -> float:
    a, b = torch.randn(n, n).bfloat16(), torch.randn(n, n).bfloat16()
    return _best_rate(lambda: torch.mm(a, b), 2 * n**3)


def flops_per_image(model: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    net = load_backbone(model, "none", device="cpu", precision="fp32", memory_layout="contiguous", runtime="torch")
    with FlopCounterMode(display=False) as counter:
        net.feature_maps(torch.rand(1, 3, 224, 224))
    return counter.get_total_flops()


def variants(model: str, compile: bool) -> dict:
    common = {"device": "cpu", "memory_layout": "channels_last"}
    out = {"torch fp32": load_backbone(model, "none", precision="fp32", runtime="torch", **common)}
    if cpu_has_native_bf16():
        out["torch bf16"] = load_backbone(model, "none", precision="bf16", runtime="torch", **common)
    if compile:
        out["torch.compile fp32"] = load_backbone(model, "none", precision="fp32", runtime="torch", compile=True,
                                                  **common)
    t0 = time.perf_counter()
    out["onnxruntime fp32"] = load_backbone(model, "none", precision="fp32", runtime="onnxruntime", **common)
    exported = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_backbone(model, "none", precision="fp32", runtime="onnxruntime", **common)
    size = sum(f.stat().st_size for f in cache_root().rglob("graph.onnx") if model in f.parent.name)
    print(f"\n{model}: ONNX export and first load {exported:.1f} s; a later load from the graph cache "
          f"{time.perf_counter() - t0:.1f} s (torch model build and the check against torch included); "
          f"graph {size / 2**20:.0f} MiB")
    return out


def model_only(model: str, compile: bool, rounds: int, seconds: float, peak: float) -> dict[str, float]:
    x = torch.randint(0, 256, (BATCH, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    nets = variants(model, compile)
    reference = nets["torch fp32"](x)
    for net in nets.values():
        net(x)  # warm-up (and the compile)
    images, spent = dict.fromkeys(nets, 0), dict.fromkeys(nets, 0.0)
    for _ in range(rounds):
        for name, net in nets.items():
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                net(x)
                images[name] += BATCH
            spent[name] += time.perf_counter() - t0
    flops = flops_per_image(model)
    rates = {name: images[name] / spent[name] for name in nets}
    print(f"\n{model}: {flops / 1e9:.2f} GFLOP per image (counted), batch {BATCH}, 224 px, model only")
    print(f"{'variant':<22}{'img/s':>8}{'vs torch fp32':>15}{'GFLOP/s':>9}{'of fp32 peak':>14}{'min cosine':>12}")
    for name, net in nets.items():
        cos = torch.nn.functional.cosine_similarity(net(x).float(), reference).min().item()
        gflops = rates[name] * flops / 1e9
        print(f"{name:<22}{rates[name]:>8.1f}{rates[name] / rates['torch fp32']:>14.2f}x{gflops:>9.0f}"
              f"{gflops / peak:>13.0%}{cos:>12.6f}")
    return rates


def end_to_end(model: str, n: int, work: Path, fastest: float) -> None:
    photos = work / f"photos-{n}"
    if not photos.exists():
        make_jpegs(photos / "all", n)
    cores = os.cpu_count() or 1
    print(f"\n{model}: {n} JPEG photos -> committed cache, whole embed() call (decode workers: auto)")
    # The reading share: the reader processes' decode + resize seconds (one core each) over those plus
    # the fastest model-only rate's work on every core. Reading shares the cores with the model, so the
    # end-to-end rate cannot stay near the model-only one where this share is large.
    print(f"{'runtime':<34}{'img/s':>8}{'of fastest model-only':>24}{'reading ms/img':>16}{'reading share':>15}")
    for runtime, precision in (("torch", "fp32"), ("onnxruntime", "fp32"), ("auto", "auto")):
        config = EmbedConfig.of(source=str(photos), model=model, out=str(work / f"{model}-{runtime}.h5"), weights="none",
                             runtime=runtime, precision=precision, device="cpu", progress=False, overwrite=True)
        resolved = with_runtime(config)
        t0 = time.perf_counter()
        report = embed(config)
        rate = n / (time.perf_counter() - t0)
        read_ms = 1000 * (report.stage_s.get("decode", 0.0) + report.stage_s.get("resize", 0.0)) / n
        share = read_ms / (read_ms + 1000 * cores / fastest)
        chosen = resolve_runtime("cpu", precision, "auto", get_backbone_spec(model).family).precision
        label = f"{runtime} {precision}" + (f" (= {resolved.space.runtime} {chosen})" if runtime == "auto" else "")
        print(f"{label:<34}{rate:>8.1f}{rate / fastest:>23.0%}{read_ms:>16.2f}{share:>15.0%}")


def run(quick: bool = False) -> None:
    threads = torch.get_num_threads()
    peaks = gemm_peaks()
    peak = max(peaks.values())
    print(f"# roofline: fp32 GEMM peak {peak:.0f} GFLOP/s on {threads} threads (best of "
          + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()) + ")"
          + (f", bf16 torch.mm {_bf16_peak():.0f} GFLOP/s (native bf16)" if cpu_has_native_bf16() else "")
          + f"; CPU {platform.processor() or platform.machine()}")
    print("# GFLOP/s below count a direct convolution's multiply-adds (x2); a library that runs 3x3 convolutions "
          "as Winograd does fewer, so a share above 100% is possible")
    models = ["resnet18"] if quick else ["resnet50", "efficientnet_lite0", "vgg16"]
    work = Path(tempfile.mkdtemp(prefix="embedder-runtime-"))
    os.environ["EMBEDDER_CACHE"] = str(work / "graphs")  # so that the export is timed, never reused
    try:
        for model in models:
            rates = model_only(model, compile=not quick, rounds=2 if quick else 3, seconds=1.0 if quick else 3.0,
                               peak=peak)
            end_to_end(model, 32 if quick else E2E_IMAGES[model], work, max(rates.values()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
