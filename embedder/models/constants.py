"""Defaults of the model layer that configs and the CLI read without importing torch."""

# How a [C, H, W] map or a [T, C] token sequence becomes a vector (embedder.models.backbone);
# cls and cls+avg are for token sequences only (DINOv2's linear-eval choices).
POOLINGS = ("avg", "max", "gem", "none", "cls", "cls+avg")
DEFAULT_STYLE_DIM = 2048  # length of the projected style descriptor (embedder.models.style)
RUNTIMES = ("auto", "torch", "onnxruntime")  # what runs the frozen pass (embedder.models.runtime.choose_runtime)
