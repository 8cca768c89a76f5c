"""`embedder inspect MODEL`: every layer a feature can be taken from, with its output shape.

The names are the eval-mode graph nodes that torchvision's (or timm's) feature extraction
accepts, so any name printed here works as `--layer NAME`. Shapes come from one forward
pass of a zero image at the model's input size (random init: shapes need no weights).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from embedder.models.backbone import build_model
from embedder.models.graph import feature_extractor, graph_node_names
from embedder.models.registry import get_backbone_spec
from embedder.models.spec import BackboneSpec
from embedder.models.weights import resolve_weights


@dataclass
class LayerRow:
    name: str  # graph node, usable as --layer
    kind: str  # module class, or the function/method the node calls
    shape: list[int] | None  # output shape for one image ([1, C, H, W]); None when not a tensor
    depth: int  # 0 = a child of the model
    child: bool  # a direct child module of the model (its output = its last node's output)
    marks: list[str]  # default, head, head input, style, content, aliases


@dataclass
class Inspection:
    model: str
    input_shape: list[int]
    default_layer: str
    head: str
    style_layers: list[str]
    content_layer: str
    layers: list[LayerRow]
    blocks: list[str] = field(default_factory=list)  # a ViT's transformer blocks (token outputs)

    def as_dict(self) -> dict:
        return asdict(self)


def inspect_model(name: str, image_size: int | None = None, weights: str = "none") -> Inspection:
    spec = get_backbone_spec(name)
    model = build_model(spec, resolve_weights(spec.weights, weights), image_size).eval()
    size = image_size or spec.preprocessing.crop_size
    nodes = [n for n in graph_node_names(model, spec.uses_timm) if n != "x"]
    extractor = feature_extractor(model, tuple(nodes), spec.uses_timm)
    with torch.inference_mode():
        outputs = extractor(torch.zeros(1, 3, size, size))
    modules = dict(model.named_modules())
    children = {n for n, _ in model.named_children()}
    marks = _marks(spec)
    rows, seen = [], set()
    for node in nodes:
        parts = node.split(".")
        for k in range(1, len(parts)):
            # A module holding several nodes (layer1, layer1.0): its output is its last node's output.
            prefix = ".".join(parts[:k])
            if prefix in modules and prefix not in seen:
                seen.add(prefix)
                last = [n for n in nodes if n.startswith(prefix + ".")][-1]
                rows.append(_row(prefix, modules, outputs[last], prefix in children, marks))
        seen.add(node)
        rows.append(_row(node, modules, outputs[node], node in children, marks))
    return Inspection(
        model=name,
        input_shape=[1, 3, size, size],
        default_layer=spec.default_layer,
        head=spec.head,
        style_layers=[spec.node_name(n) for n in spec.style_layers],
        content_layer=spec.node_name(spec.content_layer) if spec.content_layer else "",
        layers=rows,
        blocks=list(spec.blocks),
    )


def _row(name: str, modules: dict[str, nn.Module], out, child: bool, marks: dict[str, list[str]]) -> LayerRow:
    module = modules.get(name)
    kind = type(module).__name__ if module is not None else name.rsplit(".", 1)[-1].rstrip("_0123456789") or "op"
    shape = list(out.shape) if isinstance(out, torch.Tensor) else None
    return LayerRow(name, kind, shape, name.count("."), child, marks.get(name, []))


def _marks(spec: BackboneSpec) -> dict[str, list[str]]:
    marks: dict[str, list[str]] = {}

    def add(node: str, text: str) -> None:
        marks.setdefault(node, []).append(text)

    add(spec.default_layer, f"DEFAULT pooling point ({spec.feature_dim}-d feature)")
    bracket = re.sub(r"\.(\d+)", r"[\1]", spec.head)
    add(spec.head, f"classifier HEAD {bracket} (a new head replaces it)")
    for node in spec.head_inputs:
        if node != spec.default_layer:
            add(node, "head input")
    for name in spec.style_layers:
        add(spec.node_name(name), "style")
    if spec.content_layer:
        add(spec.node_name(spec.content_layer), "content")
    for alias, node in sorted(spec.layer_aliases.items()):
        add(node, f"alias {alias}")
    for i, node in enumerate(spec.blocks):
        add(node, f"block {i} (tokens: --pool {'|'.join(p for p in spec.poolings if p != 'none')})")
    return marks


def format_inspection(ins: Inspection, depth: int | None = None) -> str:
    """A table; `depth` = 0 shows only the model's children, 1 one level below, ..."""
    rows = [r for r in ins.layers if depth is None or r.depth <= depth]
    width = max(len("  " * r.depth + r.name) for r in rows) + 2
    kind_w = max(len(r.kind) for r in rows) + 2
    lines = [
        (f"{ins.model}: {len(ins.layers)} layers at input {'x'.join(map(str, ins.input_shape[1:]))} "
         "(names work as --layer NAME; shapes are for one image)"),
        f"{'layer':<{width}}{'type':<{kind_w}}{'output shape':<20}",
    ]
    for r in rows:
        shape = "x".join(map(str, r.shape[1:])) if r.shape else "-"
        note = ("  <- " + "; ".join(r.marks)) if r.marks else ""
        lines.append(f"{'  ' * r.depth + r.name:<{width}}{r.kind:<{kind_w}}{shape:<20}{note}".rstrip())
    lines.append(
        f"default pooling point: {ins.default_layer}; classifier head: {ins.head}; "
        f"style layers: {', '.join(ins.style_layers) or '-'}; content layer: {ins.content_layer or '-'}"
    )
    if ins.blocks:
        lines.append(f"transformer blocks ({len(ins.blocks)}, --layer NAME, repeatable): {', '.join(ins.blocks)}")
    return "\n".join(lines)
