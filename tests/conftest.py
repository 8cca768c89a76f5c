"""Shared fixtures: small generated image trees and a fast, fully pinned embed config.

Fast tests use random-init resnet18 at 32 px in fp32/contiguous, with no reader workers,
so they are deterministic and take well under a second per extraction.
"""

from __future__ import annotations

import os

# scikit-learn's array-API estimator check only runs with this set before scipy is imported;
# without it the check is skipped, and every estimator check should run.
os.environ.setdefault("SCIPY_ARRAY_API", "1")

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedder.extract.config import EmbedConfig
from embedder.options import to_arguments

REPO = Path(__file__).resolve().parents[1]


def write_image(path: Path, rng: np.random.Generator, size=(40, 30), mode="RGB", fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "L": 1}[mode]
    array = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(array.squeeze() if channels == 1 else array, mode=mode).save(path, format=fmt)
    return path


def make_tree(root: Path, classes=("cat", "dog", "fox"), per_class=6, seed=0) -> Path:
    """An ImageFolder tree of random PNG and JPEG images of varying sizes."""
    rng = np.random.default_rng(seed)
    for c in classes:
        for i in range(per_class):
            ext = ".png" if i % 2 else ".jpg"
            write_image(root / c / f"{c}_{i:03d}{ext}", rng, size=(int(rng.integers(24, 64)), int(rng.integers(24, 64))))
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_tree(tmp_path / "images")


def fast_config(source, out, **overrides) -> EmbedConfig:
    values = {
        "source": str(source),
        "model": "resnet18",
        "out": str(out),
        "weights": "none",
        "image_size": 32,
        "batch_size": 4,
        "workers": 0,
        "device": "cpu",
        "precision": "fp32",
        "memory_layout": "contiguous",
        "runtime": "torch",  # the reference pass; tests/test_onnx.py runs the ONNX Runtime path
        "progress": False,
    }
    values.update(overrides)
    return EmbedConfig.of(**values)


def network_of(model: str, image_size: int | None = None):
    """A random-init network of `model`, built as finetune builds one (`FeatureSpace.network()`)."""
    from embedder.models.space import FeatureSpace

    return FeatureSpace(model, "none", image_size=image_size).network()[1]


def cli_args(config: EmbedConfig) -> list[str]:
    """The `embedder embed` command line equivalent to `config`."""
    return to_arguments(config)


def embedder_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "embedder", *args]


@pytest.fixture(autouse=True)
def _offline_torch_home(tmp_path_factory, monkeypatch):
    # Tests must never find (or download into) a user's weight cache by accident.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch_home"))
    # Exported ONNX graphs: shared by the session's tests (an export costs seconds), never the user's.
    monkeypatch.setenv("EMBEDDER_CACHE", str(tmp_path_factory.getbasetemp() / "embedder_cache"))
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    # timm weights download from the hub when it answers (embedder.models.catalog.TimmWeights): the tests
    # never reach the real one (tests/test_weights_download.py serves a loopback hub), and offline mode
    # makes a missing file an immediate error rather than five retries.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    yield


def env_with_repo() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
