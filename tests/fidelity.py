"""Independent references for embedder's features: each library's own model, transforms and forward.

For one architecture at one crop size, `compare` builds the model with the library's own builder
(timm.create_model / torchvision.models.get_model, seeded random init), saves its state dict, and
computes on the sample photos:
  * the reference: the library's documented eval pipeline on PIL images (timm: resolve_data_config +
    create_transform; torchvision: the weights' transforms() at that crop), then the model's own forward
    (timm: forward_features + forward_head(pre_logits=True); torchvision: the classifier's input, caught
    by a hook), and a layer's output caught by a forward hook, pooled as the test says;
  * embedder's features: load_backbone(NAME, weights=that file, image_size=N) over read_for_model, the
    reader stage of extraction (its own decoder, uint8 resize and crop, normalisation in the model).
It returns the smallest cosine per output. Used by tests/test_fidelity.py and benchmarks/fidelity.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "camera")  # RGB and one greyscale


@dataclass(frozen=True)
class Case:
    name: str  # embedder's --model
    layer: str  # a module path: its output is the "layer" feature
    pool: str = "avg"  # how that layer is pooled (tokens: avg of the patch tokens, or cls)


CASES = (
    Case("timm:resnet18", "layer3"),
    Case("timm:convnext_atto", "stages.2"),
    Case("timm:efficientnet_b0", "blocks.4"),
    Case("timm:mobilenetv3_small_100", "blocks.3"),
    Case("timm:regnety_002", "s3"),
    Case("timm:vit_tiny_patch16_224", "blocks.1", "cls"),
    Case("timm:vit_little_patch16_reg4_gap_256", "blocks.1", "avg"),
    Case("torchvision:resnet18", "layer3"),
    Case("torchvision:mobilenet_v3_small", "features.8"),
    Case("torchvision:efficientnet_b0", "features.5"),
    Case("torchvision:convnext_tiny", "features.5"),
    Case("torchvision:regnet_y_400mf", "trunk_output.block3"),
    Case("torchvision:densenet121", "features.denseblock3"),
)


def photos(folder: Path) -> list[Path]:
    from embedder.data.samples import make_samples

    made = make_samples(folder, ["photos"])["photos"]
    return [made / f"{n}.jpg" for n in PHOTO_NAMES]


def _cosines(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(1), b.double().flatten(1)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).min())


def _pool(x: torch.Tensor, pool: str, prefix: int) -> torch.Tensor:
    if x.ndim == 4:
        return x.mean(dim=(2, 3))
    return x[:, 0] if pool == "cls" else x[:, prefix:].mean(dim=1)


def _timm_reference(arch: str, size: int, case: Case, images: list[Path]):
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    torch.manual_seed(0)
    probe = timm.create_model(arch, pretrained=False)
    fixed = bool(probe.pretrained_cfg.get("fixed_input_size"))
    model = timm.create_model(arch, pretrained=False, img_size=size) if fixed else probe
    model.eval()
    transform = create_transform(**resolve_data_config({"input_size": (3, size, size)}, model=model))
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    seen = []
    handle = model.get_submodule(case.layer).register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.inference_mode():
        default = model.forward_head(model.forward_features(x), pre_logits=True)
    handle.remove()
    return model, default, _pool(seen[0], case.pool, int(getattr(model, "num_prefix_tokens", 0)))


def _torchvision_reference(arch: str, size: int, case: Case, images: list[Path]):
    import torchvision
    from PIL import Image

    from embedder.models.catalog import torchvision_head_path

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    base = weights.transforms()
    # torchvision's weights transforms take the crop and the resize as two arguments and define no rule
    # between them; the weights' own ratio (e.g. 232/224) is kept, as embedder keeps it.
    transform = weights.transforms(crop_size=size, resize_size=round(size * base.resize_size[0] / base.crop_size[0]))
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None).eval()
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(torchvision_head_path(model)).register_forward_pre_hook(
                 lambda m, a: seen.__setitem__("default", a[0])),
             model.get_submodule(case.layer).register_forward_hook(lambda m, a, out: seen.__setitem__("layer", out))]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    return model, seen["default"].flatten(1), _pool(seen["layer"], case.pool, 0)


def compare(case: Case, size: int, images: list[Path], tmp: Path, runtime: str = "torch") -> dict[str, float]:
    """{"default": min cosine, "layer": min cosine} of embedder's features against the library's."""
    from embedder.data.transforms import geometric_transform, read_for_model
    from embedder.extract.core import load_backbone

    library, _, arch = case.name.partition(":")
    reference = _timm_reference if library == "timm" else _torchvision_reference
    model, want_default, want_layer = reference(arch, size, case, images)
    weights = tmp / f"{arch}-{size}.pt"
    torch.save(model.state_dict(), weights)
    kw = {"weights": str(weights), "image_size": size, "device": "cpu", "precision": "fp32",
          "memory_layout": "contiguous", "runtime": runtime}
    default = load_backbone(case.name, **kw)
    layer = load_backbone(case.name, layer=case.layer, pool=case.pool, **kw)
    geometry = geometric_transform(default.preprocessing)
    pixels = torch.stack([read_for_model(p, geometry, default.preprocessing.resize_size, 1 << 28) for p in images])
    return {"default": _cosines(default(pixels), want_default), "layer": _cosines(layer(pixels), want_layer)}


def fidelity_table(sizes_of, folder: Path, runtimes=("torch",)) -> list[dict]:
    """One row per case, size and runtime: {architecture, size, runtime, default, layer} min cosines."""
    images = photos(folder / "samples")
    rows = []
    for case in CASES:
        for size in sizes_of(case):
            for runtime in runtimes:
                got = compare(case, size, images, folder, runtime)
                rows.append({"architecture": case.name, "size": size, "runtime": runtime, **got})
    return rows


def sizes(case: Case) -> tuple[int, int]:
    """Two small crops per model: ViTs at multiples of their 16-pixel patch; CNNs at 56 (where timm's
    floor(N / crop_pct) and a rounded ratio disagree for crop_pct 0.95) and 64."""
    return (32, 64) if "vit_" in case.name else (56, 64)

