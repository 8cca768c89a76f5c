"""Resolve `auto` device, precision and memory layout into concrete, fingerprinted choices.

The CPU defaults come from measurement (`python -m benchmarks precision`, docs/BENCHMARKS.md):
on a CPU without native bf16 (no AVX512-BF16 / AMX), bf16 autocast is emulated and ran
3.5x *slower* than fp32 for ResNet-50, while channels_last fp32 ran 1.5x faster than
contiguous fp32. With native bf16 the opposite holds (2-2.6x faster than torch fp32 for
ResNet-50 and VGG-16), so bf16 is chosen only where the CPU advertises it, and only for a
family where it also beats the fastest fp32 path (ONNX Runtime): not EfficientNet-Lite.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch

from embedder.errors import ConfigError, EmbedderNotice
from embedder.models.constants import CPU_BATCH_SIZE, GPU_BATCH_SIZE
from embedder.models.onnx import INSTALL, versions


@dataclass(frozen=True)
class Runtime:
    device: str
    precision: str
    channels_last: bool

    @property
    def memory_layout(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


# Model-only speed of torch eager bf16 over the fastest fp32 path (ONNX Runtime) on a CPU with
# native bf16, batch 4, 224 px, 2 threads, interleaved rounds (docs/BENCHMARKS.md, 2026-12-01):
# ResNet-50 1.45x, VGG-16 1.55x, EfficientNet-Lite0 0.62x. Where it is below 1, `--precision auto`
# stays fp32 there: faster, and the features stay exact (bf16 moved Lite0's real features to a
# cosine of 0.9866). A family not listed gets bf16, torch's fast path on such a CPU.
BF16_CPU_SPEEDUP = {"resnet": 1.45, "vgg": 1.55, "efficientnet_lite": 0.62}


def resolve_runtime(device: str = "auto", precision: str = "auto", memory_layout: str = "auto",
                    family: str | None = None) -> Runtime:
    """Concrete device, precision and layout. `family` (the model family, when known) lets
    `--precision auto` keep fp32 on a native-bf16 CPU for a family whose fp32 path is faster."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but torch sees no CUDA device. Use --device cpu or auto.")
    elif not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError(f"--device must be auto, cpu or cuda[:N], got {device!r}.")
    on_gpu = device.startswith("cuda")

    if precision == "auto":
        if on_gpu:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_native_bf16() and BF16_CPU_SPEEDUP.get(family, 2.0) > 1.0 else "fp32"
    elif precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"--precision must be auto, fp32, bf16 or fp16, got {precision!r}.")

    if memory_layout == "auto":
        channels_last = True  # faster on GPU tensor cores and on CPU oneDNN convolutions alike
    elif memory_layout in ("channels_last", "contiguous"):
        channels_last = memory_layout == "channels_last"
    else:
        raise ConfigError(f"--memory-layout must be auto, channels_last or contiguous, got {memory_layout!r}.")
    return Runtime(device=device, precision=precision, channels_last=channels_last)


# Model-only speed of ONNX Runtime over torch eager, both fp32 (batch 4, 224 px, 2 threads;
# torch in channels_last, the CPU default), measured side by side by `python -m benchmarks runtime`
# (docs/BENCHMARKS.md): on the 2-core AMD EPYC dev VM (AVX-512, native bf16), with ORT's threads
# not spinning, ResNet-50 1.61x, EfficientNet-Lite0 2.43x, VGG-16 1.12x; on the earlier 2-core AVX2
# VM ResNet-50 1.29x and Lite0 1.90x (issue 15). `--runtime auto` takes ONNX Runtime for fp32 on the
# CPU for a family listed here; where `--precision auto` picks bf16 (BF16_CPU_SPEEDUP) bf16 runs on torch.
ONNX_CPU_SPEEDUP = {"resnet": 1.61, "efficientnet_lite": 2.43, "vgg": 1.12}


def choose_runtime(runtime: str, family: str, device: str = "auto", precision: str = "auto",
                   compile: bool = False) -> str:
    """`auto` -> "onnxruntime" on the CPU in fp32 for a family where it is faster and installed, else
    "torch"; an explicit choice is returned as it is (the backbone refuses what it cannot run)."""
    if runtime != "auto":
        if runtime not in ("torch", "onnxruntime"):
            raise ConfigError(f"--runtime must be auto, torch or onnxruntime, got {runtime!r}.")
        return runtime
    resolved = resolve_runtime(device, precision, "auto", family)
    if resolved.device != "cpu" or resolved.precision != "fp32" or compile:
        return "torch"  # ONNX Runtime's CPU provider runs fp32; on CUDA and with --compile torch is the fast path
    if ONNX_CPU_SPEEDUP.get(family, 1.0) <= 1.0:
        return "torch"
    if versions() is None:
        warnings.warn(f"ONNX Runtime is not installed, so --runtime auto runs torch ({INSTALL} for "
                      f"{ONNX_CPU_SPEEDUP[family]:.2f}x on this model family).", EmbedderNotice, stacklevel=2)
        return "torch"
    return "onnxruntime"




def auto_batch_size(device: str = "auto") -> int:
    resolved = resolve_runtime(device, "fp32", "contiguous").device
    return CPU_BATCH_SIZE if resolved == "cpu" else GPU_BATCH_SIZE


def auto_workers(workers: int | None) -> int:
    """Reader processes: as given, else one per spare core (the model stage keeps one), at most 8."""
    if workers is not None:
        return workers
    return max(1, min(8, (os.cpu_count() or 2) - 1))
