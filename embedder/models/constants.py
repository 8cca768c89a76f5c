"""Defaults of the model layer that configs and the CLI read without importing torch."""

# How a [C, H, W] map or a [T, C] token sequence becomes a vector (embedder.models.backbone);
# cls and cls+avg are for token sequences only (DINOv2's linear-eval choices).
POOLINGS = ("avg", "max", "gem", "none", "cls", "cls+avg")
DEFAULT_STYLE_DIM = 2048  # length of the projected style descriptor (embedder.models.style)
RUNTIMES = ("auto", "torch", "onnxruntime")  # what runs the frozen pass (embedder.models.runtime.choose_runtime)


# Images per forward pass when --batch-size is not given. On CPU, small batches keep the
# activations in cache: model-only fp32 channels_last at 224 px on the 2-core dev machine,
# batch 4 vs 32: EfficientNet-Lite0 56.5 vs 26.5 img/s, ResNet-50 11.0 vs 8.6, and batches
# of 2-4 were best for ResNet-18 and VGG-16 too (`python -m benchmarks extraction` sweeps it).
# On GPUs large batches are what fills the device; 32 is unmeasured there (no GPU lent yet).
CPU_BATCH_SIZE = 4
GPU_BATCH_SIZE = 32


def batch_size_for(device: str = "auto") -> int:
    """`--batch-size auto`, the same in every command and in the Python API (embedder.models.runtime's
    CPU_BATCH_SIZE and GPU_BATCH_SIZE). Without a GPU device node there is no CUDA device to ask
    torch about, so the answer needs no torch import (which takes seconds): a bad command line is
    refused before it."""
    import os

    if device == "cpu" or (device == "auto" and not any(
            os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/proc/driver/nvidia"))):
        return CPU_BATCH_SIZE
    from embedder.models.runtime import auto_batch_size

    return auto_batch_size(device)
