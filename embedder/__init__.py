"""embedder: frozen pretrained CNN features, extracted once into an HDF5 cache."""

__version__ = "0.1.0"
