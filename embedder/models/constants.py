"""Defaults of the model layer that configs and the CLI read without importing torch."""

# How a [C, H, W] map or a [T, C] token sequence becomes a vector (embedder.models.backbone);
# cls and cls+avg are for token sequences only (DINOv2's linear-eval choices).
POOLINGS = ("avg", "max", "gem", "none", "cls", "cls+avg")
DEFAULT_STYLE_DIM = 2048  # length of the projected style descriptor (embedder.models.style)
PRECISIONS = ("fp32", "bf16", "fp16", "int8")  # resolved precisions (their dtypes: embedder.models.backbone)
# The Gram style descriptor's name among the layers (`--layer style`), and its fingerprint component.
STYLE = "style"
RUNTIMES = ("auto", "torch", "onnxruntime")  # what runs the frozen pass (embedder.models.runtime.choose_runtime)


# Images per forward pass when --batch-size is not given. On CPU, small batches keep the
# activations in cache: model-only fp32 channels_last at 224 px on the 2-core dev machine,
# batch 4 vs 32: EfficientNet-Lite0 56.5 vs 26.5 img/s, ResNet-50 11.0 vs 8.6, and batches
# of 2-4 were best for ResNet-18 and VGG-16 too (`python -m benchmarks extraction` sweeps it).
# On GPUs large batches are what fills the device; 32 is unmeasured there (no GPU lent yet).
CPU_BATCH_SIZE = 4
GPU_BATCH_SIZE = 32
CALIBRATION_IMAGES = 32  # images that calibrate int8 (embed's and `models --card`'s default)
FIDELITY_IMAGES = 200  # held-aside images a fidelity card compares fp32 and a fast path on
