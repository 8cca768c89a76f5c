"""`--batch-size auto`: images per forward pass for a device, answered without importing torch on a CPU-only
machine. Above both embedder.models.constants (the numbers) and embedder.models.runtime (the device)."""

from __future__ import annotations

import os

from embedder.models.constants import CPU_BATCH_SIZE


def batch_size_for(device: str = "auto") -> int:
    """`--batch-size auto`, the same in every command and in the Python API (embedder.models.constants'
    CPU_BATCH_SIZE and GPU_BATCH_SIZE). Without a GPU device node there is no CUDA device to ask
    torch about, so the answer needs no torch import (which takes seconds): a bad command line is
    refused before it."""
    if device == "cpu" or (device == "auto" and not any(
            os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/proc/driver/nvidia"))):
        return CPU_BATCH_SIZE
    from embedder.models.runtime import auto_batch_size

    return auto_batch_size(device)
