"""`embedder stylize`: neural style transfer (Gatys et al. 2016) with a frozen backbone.

The optimised variable is the image: its RGB pixels in [0, 1], clamped back into that
range after every step. The backbone is the same eval-locked, frozen `FrozenBackbone` the
feature cache uses; `feature_maps` lets gradients reach the pixels and never the weights.

    loss = content_weight · ‖F_c(x) − F_c(content)‖² / ‖F_c(content)‖²
         + style_weight · Σ_l w_l · ‖G_l(x) − G_l(style)‖² / ‖G_l(style)‖²

with F_c the content layer's map, G_l the Gram matrix (embedder.models.style.gram) of style layer
l, and per-layer weights w_l normalised to sum to 1. Each term is relative to its target's
size, so the same weights mean the same thing for VGG, ResNet and EfficientNet, whose maps
differ in scale by orders of magnitude. The optimiser is L-BFGS with a strong-Wolfe line
search; the image starts from the content image (or seeded noise with --init noise), and a
run is deterministic for a given seed (deterministic algorithms are switched on for it).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from embedder.data.decode import DEFAULT_MAX_PIXELS, load_rgb
from embedder.errors import BadImageError, ConfigError, SourceError
from embedder.models.backbone import FrozenBackbone
from embedder.models.config import StylizeConfig
from embedder.models.registry import get_backbone_spec
from embedder.models.space import FeatureSpace
from embedder.models.style import gram
from embedder.outputs import PICTURE, claim, png_metadata, write_file
from embedder.progress import bar as progress_bar


@dataclass
class StylizeReport:
    out: str
    model: str
    size: tuple[int, int]  # (height, width) of the output
    steps: int
    initial_loss: float
    final_loss: float
    final_content_loss: float
    final_style_loss: float
    seconds: float
    content_layer: str
    style_layers: dict[str, float]

    @property
    def reduction(self) -> float:
        return self.initial_loss / self.final_loss if self.final_loss > 0 else float("inf")

    def summary(self) -> str:
        return (
            f"wrote {self.out} ({self.size[1]}x{self.size[0]}) with {self.model} in {self.seconds:.1f} s\n"
            f"  loss {self.initial_loss:.4g} -> {self.final_loss:.4g} ({self.reduction:.1f}x lower) in "
            f"{self.steps} L-BFGS steps; content {self.final_content_loss:.4g}, style {self.final_style_loss:.4g}\n"
            f"  content layer {self.content_layer}; style layers "
            + ", ".join(f"{n} ({w:.2f})" for n, w in self.style_layers.items())
        )

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["reduction"] = self.reduction
        return d


def parse_style_layers(items: tuple[str, ...] | list[str]) -> list[tuple[str, float]]:
    """["relu1_1", "relu2_1:0.5"] -> [(name, weight)]; weight 1 when not given."""
    out = []
    for item in items:
        name, _, weight = item.partition(":")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(f"--style-layer {item!r}: the weight after ':' must be a number.") from None
        if w < 0:
            raise ConfigError(f"--style-layer {item!r}: the weight must be >= 0.")
        out.append((name, w))
    return out


def _load(path: str) -> torch.Tensor:
    if not Path(path).is_file():
        raise SourceError(f"No image at {path}.")
    try:
        return load_rgb(path, DEFAULT_MAX_PIXELS).float().div_(255.0)
    except BadImageError as exc:
        raise SourceError(f"Cannot use {path}: {exc.reason}.") from None


def _resize(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.interpolate(img[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]


@contextlib.contextmanager
def _deterministic(seed: int):
    """Seeded RNG and deterministic kernels for the run, then the caller's settings back.

    cuBLAS needs a fixed workspace for deterministic matmuls (read when its handle is
    created, i.e. on the first matmul); an op with no deterministic kernel warns, not fails.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def stylize(config: StylizeConfig, backbone: FrozenBackbone | None = None) -> StylizeReport:
    """Write `config.out`: the content image repainted with the style image's texture."""
    t0 = time.perf_counter()
    claim(config.out, PICTURE, [config.content, config.style], config.overwrite)  # before the backbone is built
    spec = get_backbone_spec(config.model)
    content_layer, weighted = _layers(config, spec)
    if backbone is None:
        backbone = _stylize_backbone(config, content_layer, weighted)
    content_node = spec.node_name(content_layer)
    total_w = sum(w for _, w in weighted)
    style_nodes = [(spec.node_name(n), w / total_w) for n, w in weighted]
    missing = {content_node, *(n for n, _ in style_nodes)} - set(backbone.layers)
    if missing:
        raise ConfigError(f"The backbone passed to stylize does not return {sorted(missing)}; build it with "
                          "layer=<content layer> and extra_layers=<style layers>.")
    content, style = _images(config, backbone.device)
    with _deterministic(config.seed):
        losses = _objective(backbone, content, style, content_node, style_nodes)

        def total(c, s):
            return config.content_weight * c + config.style_weight * s

        start = content.clone() if config.init == "content" else torch.rand(content.shape, device="cpu").to(backbone.device)
        image = start.requires_grad_(True)
        with torch.no_grad():
            initial = float(total(*losses(image)))
        _optimise(image, lambda x: total(*losses(x)), config.steps, config.progress)
        with torch.no_grad():
            c, s = losses(image)
            final = float(total(c, s))
    out = _save(image, config)
    return StylizeReport(
        out=str(out), model=config.model, size=tuple(content.shape[2:]), steps=config.steps, initial_loss=initial,
        final_loss=final, final_content_loss=float(c), final_style_loss=float(s),
        seconds=time.perf_counter() - t0, content_layer=content_node,
        style_layers={n: wt for n, wt in style_nodes},
    )


def _layers(config: StylizeConfig, spec) -> tuple[str, list[tuple[str, float]]]:
    """The content layer and the weighted style layers: the options', else the registry's."""
    content_layer = config.content_layer or spec.content_layer
    weighted = parse_style_layers(config.style_layers) if config.style_layers else [(n, 1.0) for n in spec.style_layers]
    if not content_layer or not weighted:
        raise ConfigError(f"Model {config.model!r} has no default style/content layers; name them with "
                          "--style-layer and --content-layer (see `embedder inspect`).")
    if sum(w for _, w in weighted) <= 0:
        raise ConfigError("At least one --style-layer needs a positive weight.")
    return content_layer, weighted


def _stylize_backbone(config: StylizeConfig, content_layer: str, weighted) -> FrozenBackbone:
    # The torch pass in fp32: the style loss differentiates through it to the pixels.
    return FeatureSpace(
        model=config.model, weights=config.weights, layer=content_layer, extra_layers=tuple(n for n, _ in weighted),
        image_size=config.image_size, device=config.device, precision="fp32", memory_layout="contiguous",
        runtime="torch",
    ).load()


def _images(config: StylizeConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The content image at --image-size (longest side), and the style image at the same area, own aspect."""
    content = _load(config.content)
    scale = config.image_size / max(content.shape[1:])
    h, w = max(1, round(content.shape[1] * scale)), max(1, round(content.shape[2] * scale))
    content = _resize(content, h, w)[None].to(device)
    style = _load(config.style)
    s_scale = (h * w / (style.shape[1] * style.shape[2])) ** 0.5
    style = _resize(style, max(1, round(style.shape[1] * s_scale)), max(1, round(style.shape[2] * s_scale)))
    return content, style[None].to(device)


def _objective(backbone: FrozenBackbone, content, style, content_node: str, style_nodes):
    """`losses(x) -> (content loss, style loss)`, each relative to its target's size."""
    with torch.no_grad():
        content_target = backbone.feature_maps(content)[content_node].detach()
        style_maps = backbone.feature_maps(style)
        style_targets = {n: gram(style_maps[n]).detach() for n, _ in style_nodes}
    for n, _ in style_nodes:
        if style_maps[n].ndim != 4:
            raise ConfigError(f"Style layer {n!r} is not a [C, H, W] feature map; pick convolutional layers.")
    c_norm = content_target.pow(2).mean().clamp_min(1e-12)
    s_norms = {n: g.pow(2).mean().clamp_min(1e-12) for n, g in style_targets.items()}

    def losses(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = backbone.feature_maps(x)
        c = (maps[content_node] - content_target).pow(2).mean() / c_norm
        s = sum(wt * (gram(maps[n]) - style_targets[n]).pow(2).mean() / s_norms[n] for n, wt in style_nodes)
        return c, s

    return losses


def _optimise(image: torch.Tensor, loss_of, steps: int, progress: bool) -> None:
    """L-BFGS on the pixels, clamped to [0, 1] after every step."""
    optimizer = torch.optim.LBFGS([image], lr=1.0, max_iter=1, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = loss_of(image)
        loss.backward()
        return loss

    bar = progress_bar(range(steps), desc="stylize", unit="step", enabled=progress)
    for _ in bar:
        loss = optimizer.step(closure)
        with torch.no_grad():
            image.clamp_(0.0, 1.0)
        bar.set_postfix(loss=f"{loss.item():.4g}")


def _save(image: torch.Tensor, config: StylizeConfig) -> Path:
    from PIL.PngImagePlugin import PngInfo

    pixels = image.detach()[0].mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    inputs = [config.content, config.style]
    marker = PngInfo()
    for key, value in png_metadata(inputs).items():
        marker.add_text(key, value)
    with write_file(config.out, PICTURE, inputs, config.overwrite) as tmp:
        Image.fromarray(np.ascontiguousarray(pixels)).save(tmp, format="PNG", pnginfo=marker)
    return Path(config.out)
