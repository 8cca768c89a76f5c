"""Defaults of the model layer that configs and the CLI read without importing torch."""

POOLINGS = ("avg", "max", "gem", "none")  # how a [C, H, W] map becomes a vector (embedder.models.backbone)
DEFAULT_STYLE_DIM = 2048  # length of the projected style descriptor (embedder.models.style)
RUNTIMES = ("auto", "torch", "onnxruntime")  # what runs the frozen pass (embedder.models.runtime.choose_runtime)
