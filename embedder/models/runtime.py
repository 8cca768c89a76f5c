"""Resolve `auto` device, precision and memory layout into concrete, fingerprinted choices.

On the CPU, `--precision auto` is fp32 on every machine: the same image and configuration give the
same features whichever CPU ran the command (issue 29). bf16 moved real features far more than
random inputs suggest (ResNet tutorial cosine 0.9635, Lite0 minimum 0.9866) and its speed depends on
the CPU (emulated and 3.5x slower without AVX512-BF16 / AMX), so it is an opt-in, as is int8; both
carry a fidelity card (embedder.extract.fidelity), and `--precision fast` picks between them by
measuring on the machine that runs it. channels_last stays the layout: 1.5x faster than contiguous
fp32 for ResNet-50 on the CPU, same features (`python -m benchmarks precision`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from embedder.errors import ConfigError, EmbedderNotice
from embedder.models.constants import CPU_BATCH_SIZE, GPU_BATCH_SIZE
from embedder.models.onnx import INSTALL, versions

AUTO_VALUE = "auto"


@dataclass(frozen=True)
class Runtime:
    device: str
    precision: str
    channels_last: bool

    @property
    def memory_layout(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"


@lru_cache(maxsize=1)
def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, feature flags) of this machine's CPU, from /proc/cpuinfo (the platform's names and no
    flags where there is none): what decides which int8 and bf16 kernels run, and how fast."""
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}".strip(), frozenset()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith(("flags", "Features"))), [])
    return name, frozenset(flags)


def cpu_has_native_bf16() -> bool:
    return bool(cpu_info()[1] & {"avx512_bf16", "amx_bf16"})



def resolve_runtime(device: str = "auto", precision: str = "auto", memory_layout: str = "auto",
                    family: str | None = None) -> Runtime:
    """Concrete device, precision and layout. `--precision auto` is fp32 on every CPU (bf16 only when
    asked: exact and the same on every machine), the documented bf16 or fp16 on a GPU. int8 runs on
    the CPU only (a quantised ONNX Runtime graph, embedder.models.quantize); `fast` is resolved by
    measuring (embedder.extract.fidelity), never here. `family` is kept for callers' signatures."""
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
            precision = "fp32"  # exact everywhere, whatever cpu_has_native_bf16() says
    elif precision == "fast":
        raise ConfigError("--precision fast is chosen by `embed`, which measures each path on SOURCE's images; "
                          "name fp32, bf16 or int8 here.")
    elif precision == "int8" and on_gpu:
        raise ConfigError("--precision int8 runs on the CPU (ONNX Runtime); use --device cpu, or bf16/fp16 on a GPU.")
    elif precision not in ("fp32", "bf16", "fp16", "int8"):
        raise ConfigError(f"--precision must be auto, fp32, bf16, fp16, int8 or fast, got {precision!r}.")

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
# CPU for a family listed here; bf16 runs on torch (asked for only), int8 always on ONNX Runtime.
ONNX_CPU_SPEEDUP = {"resnet": 1.61, "efficientnet_lite": 2.43, "vgg": 1.12}


def choose_runtime(runtime: str, family: str, device: str = "auto", precision: str = "auto",
                   compile: bool = False) -> str:
    """`auto` -> "onnxruntime" on the CPU in fp32 for a family where it is faster and installed, else
    "torch"; an explicit choice is returned as it is (the backbone refuses what it cannot run)."""
    if runtime != "auto":
        if runtime not in ("torch", "onnxruntime"):
            raise ConfigError(f"--runtime must be auto, torch or onnxruntime, got {runtime!r}.")
        if runtime == "torch" and precision == "int8":
            raise ConfigError("--precision int8 runs on ONNX Runtime; drop --runtime torch (or use --precision bf16).")
        return runtime
    if AUTO_VALUE in (device, precision):  # a caller with resolved values (FeatureSpace.resolve) resolves once
        resolved = resolve_runtime(device, precision, "auto", family)
        device, precision = resolved.device, resolved.precision
    if precision == "int8":
        return "onnxruntime"
    if device != "cpu" or precision != "fp32" or compile:
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
