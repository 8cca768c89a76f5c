"""Registry entries made on demand from a library's name: `torchvision:NAME[.WEIGHTS]` and `timm:NAME[.TAG]`.

The curated entries in embedder.models.registry state their output points by hand; these are
read off the model itself, once, when the entry is first asked for: the classifier head is
found by the library's convention (torchvision's `fc`, `classifier[-1]`, `heads.head`; timm's
`get_classifier()`), and the default feature is the graph node whose output the head consumes
(the pooled input of the classifier), found by one forward pass at the crop size.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from embedder.data.transforms import Preprocessing, preprocessing_from_transforms
from embedder.errors import ConfigError, WeightsUnavailableError
from embedder.models.graph import feature_extractor, graph_node_names
from embedder.models.spec import BackboneSpec
from embedder.models.weights import TorchvisionWeights, WeightsSource, read_state_dict

PREFIXES = ("torchvision:", "timm:")


def is_catalog_name(name: str) -> bool:
    return name.startswith(PREFIXES)


def catalog_spec(name: str):
    """The BackboneSpec for a `torchvision:` or `timm:` name (ConfigError for an unknown one)."""
    if name.startswith("torchvision:"):
        return _torchvision_spec(name)
    return _timm_spec(name)


# --- finding the head and its input ----------------------------------------------------------


def torchvision_head_path(model: nn.Module) -> str:
    """The dotted path of a torchvision classifier's last Linear: `fc`, `classifier[-1]`, `heads.head`, `head`."""
    for path in ("fc", "heads.head", "head", "classifier"):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            return path
        if isinstance(module, nn.Sequential):
            linear = [i for i, m in enumerate(module) if isinstance(m, (nn.Linear, nn.Conv2d))]
            if linear:
                return f"{path}.{linear[-1]}"
    raise ConfigError(f"Cannot find the classifier head of {type(model).__name__} (no fc, classifier, heads.head).")


def timm_head_path(model: nn.Module) -> str:
    """The dotted path of the module timm's `get_classifier()` returns (a distilled model's
    (head, head_dist) pair: its class-token head)."""
    head = model.get_classifier()
    if isinstance(head, tuple):
        head = head[0]
    for path, module in model.named_modules():
        if module is head:
            return path
    raise ConfigError(f"Cannot find the classifier head of {type(model).__name__} (get_classifier()).")


def head_input_node(model: nn.Module, head_path: str, size: int, uses_timm: bool) -> tuple[str, int]:
    """(graph node whose output the head consumes, its width). The head's input is caught by a hook
    on the model, then matched by value against every traced node (fx may trace through the head,
    so a hook inside the traced graph would not fire)."""
    model.eval()
    nodes = [n for n in graph_node_names(model, uses_timm) if n != head_path and not n.startswith(head_path + ".")]
    body = feature_extractor(model, tuple(nodes), uses_timm)
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(head_path).register_forward_hook(lambda m, args, out: seen.append(args[0]))
    # Seeded noise, not zeros: distinct layers rarely agree on it.
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            model(x)
            maps = body(x)
    finally:
        handle.remove()
    if not seen:
        raise ConfigError(f"The head {head_path!r} did not run; name a layer with --layer.")
    want = seen[0]
    matches = [n for n, v in maps.items()
               if isinstance(v, torch.Tensor) and v.shape == want.shape and torch.equal(v, want)]
    if not matches:
        raise ConfigError(f"Cannot tell which layer feeds the head {head_path!r}; name a layer with --layer.")
    # The last match: a flatten or an eval-mode dropout passes its input on unchanged. A map
    # (SqueezeNet's 1x1-convolution head) is pooled like any other, to its channels.
    width = want.shape[1] if want.ndim == 4 else int(math.prod(want.shape[1:]))
    return matches[-1], int(width)


def _spec(name, build, weights, preprocessing, find_head, uses_timm, model, build_at=None, preprocessing_at=None):
    head = find_head(model)
    node, width = head_input_node(model, head, preprocessing.crop_size, uses_timm)
    # Only a Linear can be replaced by a head trained on the pooled features (SqueezeNet's
    # convolution runs before its ReLU and pooling, so no linear head on them equals it).
    # A distilled timm model (DeiT, LeViT) averages two heads: one new Linear cannot stand for both.
    replaceable = (isinstance(model.get_submodule(head), (nn.Linear, nn.Identity))
                   and not (uses_timm and isinstance(model.get_classifier(), tuple)))
    prefix, blocks, tokens = token_layout(model)
    class_token = bool(prefix) and has_class_token(model)
    aliases = {"pool": node, "fc_input": node}
    if tokens:
        aliases["tokens"] = tokens  # the final (normed) token sequence, for --pool cls|avg|cls+avg
    return BackboneSpec(
        name=name,
        family=name.split(":", 1)[0],  # not in the runtime's speed table: torch, bf16 where native
        build=build,
        weights=weights,
        preprocessing=preprocessing,
        default_layer=node,
        layer_dims={node: width},
        layer_aliases=aliases,
        head=head,
        head_inputs=(node,) if replaceable else (),
        uses_timm=uses_timm,
        prefix_tokens=prefix,
        class_token=class_token,
        blocks=blocks,
        build_at=build_at,
        preprocessing_at=preprocessing_at,
    )


def token_layout(model: nn.Module) -> tuple[int, tuple[str, ...], str]:
    """(prefix tokens, transformer block paths, final token node) of a ViT; (0, (), "") for others."""
    if hasattr(model, "num_prefix_tokens") and hasattr(model, "blocks"):  # timm VisionTransformer
        prefix, root, final = int(model.num_prefix_tokens), "blocks", "norm"
    elif hasattr(model, "class_token") and hasattr(model, "encoder"):  # torchvision VisionTransformer
        prefix, root, final = 1, "encoder.layers", "encoder.ln"
    else:
        return 0, (), ""
    if prefix == 0:
        return 0, (), ""
    blocks = tuple(f"{root}.{n}" for n, _ in model.get_submodule(root).named_children())
    return prefix, blocks, final


def has_class_token(model: nn.Module) -> bool:
    """Whether token 0 is a class token, as the model describes itself: timm's `has_class_token`
    (False for `*_gap` ViTs, whose prefix tokens are registers), else a `cls_token` parameter
    (timm's Eva and others); torchvision's VisionTransformer always has its `class_token`."""
    if hasattr(model, "has_class_token"):
        return bool(model.has_class_token)
    if hasattr(model, "class_token") and hasattr(model, "encoder"):  # torchvision VisionTransformer
        return True
    return getattr(model, "cls_token", None) is not None


def sized_builder(name: str, build_at, patch: int, native: int):
    """`build_at(size)` for a model whose position embeddings fix its input size (a ViT), checked:
    the size must be a multiple of the patch, and the model must run at it (one zero image),
    so that a size it cannot take is a ConfigError naming the sizes it can, not a traceback
    from the first batch."""

    def build(size: int) -> nn.Module:
        if size % patch:
            raise ConfigError(
                f"{name} cuts images into {patch}-pixel patches, so --image-size must be a multiple of {patch} "
                f"(its weights were trained at {native}), got {size}."
            )
        try:
            model = build_at(size)
            with torch.inference_mode():
                model.eval()(torch.zeros(1, 3, size, size))
        except Exception as exc:
            raise ConfigError(
                f"{name} cannot take --image-size {size} ({type(exc).__name__}: {str(exc)[:200]}); "
                f"its weights were trained at {native} pixels."
            ) from exc
        return model.train()

    return build


# --- torchvision -----------------------------------------------------------------------------


def _torchvision_spec(name: str):
    import torchvision

    arch, _, tag = name.removeprefix("torchvision:").partition(".")
    classification = set(torchvision.models.list_models(module=torchvision.models))
    if arch not in classification:
        import difflib

        close = difflib.get_close_matches(arch, sorted(classification), n=3)
        hint = f" Did you mean {', '.join('torchvision:' + c for c in close)}?" if close else ""
        raise ConfigError(f"torchvision has no classification model {arch!r}.{hint} "
                          "List them with `embedder models --all torchvision:`.")
    enum = torchvision_weights(arch, tag or "DEFAULT")

    def build_at(size: int | None = None) -> nn.Module:
        return torchvision.models.get_model(arch, weights=None, **({} if size is None else {"image_size": size}))

    model, build, sized = build_at(), build_at, None
    if isinstance(model, torchvision.models.VisionTransformer):
        # Its position embeddings fix the input size: the weights' own (min_size, as torchvision's
        # builder sets it: 384 for the SWAG E2E weights), or --image-size, resampled on loading.
        native = int(enum.meta["min_size"][0])
        build = functools.partial(build_at, native)
        sized = sized_builder(name, build_at, model.patch_size, native)
        if model.image_size != native:
            model = build()
    return _spec(
        name,
        build,
        TorchvisionWeights(enum),
        preprocessing_from_transforms(enum.transforms()),
        torchvision_head_path,
        uses_timm=False,
        model=model,
        build_at=sized,
    )


def torchvision_weights(arch: str, tag: str):
    """The member `tag` (DEFAULT or e.g. IMAGENET1K_V1) of the model's WeightsEnum."""
    import torchvision

    members = torchvision.models.get_model_weights(arch)
    if tag.upper() == "DEFAULT":
        return members.DEFAULT
    try:
        return members[tag]
    except KeyError:
        names = ", ".join(["DEFAULT"] + [m.name for m in members])
        raise ConfigError(f"torchvision:{arch} has no weights {tag!r}. Weights: {names}.") from None


# --- timm ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimmWeights(WeightsSource):
    """A timm pretrained tag's weights: the Hugging Face hub cache, else downloaded into it (HF_ENDPOINT,
    HF_HOME and HF_HUB_OFFLINE apply, as for timm.create_model(pretrained=True))."""

    model_name: str  # e.g. vit_small_patch16_224.dino
    hf_hub_id: str  # e.g. timm/vit_small_patch16_224.dino

    @property
    def identity(self) -> str:
        return f"timm:{self.model_name}:hf:{self.hf_hub_id}"

    def _cached(self) -> str | None:
        if not self.hf_hub_id:
            return None
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(self.hf_hub_id, filename)
            if isinstance(found, str) and os.path.isfile(found):
                return found
        return None

    def location(self) -> str:
        cached = self._cached()
        if cached:
            return cached
        from huggingface_hub.constants import HF_HUB_CACHE

        return os.path.join(HF_HUB_CACHE, "models--" + self.hf_hub_id.replace("/", "--"))

    def available_offline(self) -> bool:
        return self._cached() is not None

    def offline_hint(self) -> str:
        if not self.hf_hub_id:
            return f"timm names no Hugging Face file for {self.model_name}; pass --weights /path/to/file"
        return (f"run `huggingface-cli download {self.hf_hub_id}` on a machine with network access and copy the "
                f"folder to {self.location()} (HF_HOME chooses the cache directory)")

    def _download(self) -> tuple[str | None, str]:
        """(the file fetched from the hub into its cache, as timm.create_model(pretrained=True) fetches it:
        model.safetensors, else pytorch_model.bin; None and why where that fails: offline, HF_HUB_OFFLINE)."""
        if not self.hf_hub_id:
            return None, "timm names no hub file"
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        why = ""
        for filename in ("model.safetensors", "pytorch_model.bin"):
            try:
                return hf_hub_download(self.hf_hub_id, filename), ""
            except EntryNotFoundError as exc:
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            except Exception as exc:  # noqa: BLE001 (no network, a proxy, offline mode: the message below says what to do)
                return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return None, why

    def state_dict(self) -> dict[str, torch.Tensor]:
        from pathlib import Path

        from huggingface_hub.constants import ENDPOINT

        cached = self._cached()
        why = ""
        if cached is None:
            cached, why = self._download()
        if cached is None:
            where = f"{ENDPOINT}/{self.hf_hub_id}" if self.hf_hub_id else "(timm names no hub file)"
            raise WeightsUnavailableError(
                f"The weights of timm:{self.model_name} are not in the Hugging Face cache and could not be "
                f"downloaded from {where} ({why}).\n"
                f"Download model.safetensors from {where} on a machine with network access "
                f"(e.g. `huggingface-cli download {self.hf_hub_id}`) and copy the cache folder to\n"
                f"  {self.location()}\n"
                "(set HF_HOME to use another cache directory), or pass the file with "
                "--weights /path/to/model.safetensors, or use --weights none for random initialisation."
            )
        return read_state_dict(Path(cached))


def _timm_spec(name: str):
    import timm

    model_name = name.removeprefix("timm:")
    arch = model_name.partition(".")[0]
    if not timm.is_model(arch):
        import difflib

        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise ConfigError(f"timm has no model {arch!r}.{hint} List them with `embedder models --all timm:`.")

    def build(size: int | None = None) -> nn.Module:
        return timm.create_model(model_name, pretrained=False, **({} if size is None else {"img_size": size}))

    probe = build()
    cfg = probe.pretrained_cfg or {}
    preprocessing = timm_preprocessing(cfg)
    sized = None
    if cfg.get("fixed_input_size"):
        # timm's flag for "the model takes an img_size argument that fixes its input size" (ViTs,
        # Swin, ...); the weights' position embeddings are resampled on loading, as timm does.
        patch = getattr(getattr(probe, "patch_embed", None), "patch_size", 1)
        patch = patch if isinstance(patch, int) else patch[0]  # (16, 16), or 16 (XCiT)
        sized = sized_builder(name, build, int(patch), preprocessing.crop_size)
    return _spec(
        name,
        build,
        TimmWeights(model_name, cfg.get("hf_hub_id") or ""),
        preprocessing,
        timm_head_path,
        uses_timm=True,
        model=probe,
        build_at=sized,
        preprocessing_at=functools.partial(timm_preprocessing, dict(cfg)),
    )


def timm_preprocessing(pretrained_cfg: dict, image_size: int | None = None) -> Preprocessing:
    """The eval preprocessing that timm builds for the model at crop `image_size` (None: its own):
    `create_transform(**resolve_data_config({"input_size": ...}, pretrained_cfg=...))`, read back off
    the transform objects themselves (its Resize is floor(crop / crop_pct)), so the sizes are timm's
    and never re-derived here."""
    from timm.data import create_transform, resolve_data_config
    from torchvision import transforms as T

    args = {} if image_size is None else {"input_size": (3, int(image_size), int(image_size))}
    data = resolve_data_config(args, pretrained_cfg=dict(pretrained_cfg))
    steps = create_transform(**data, is_training=False).transforms
    resize = next((t for t in steps if isinstance(t, T.Resize)), None)
    crop = next((t for t in steps if isinstance(t, T.CenterCrop)), None)
    if resize is None or crop is None:  # crop_mode border: no plain Resize; the shorter side as timm scales it
        side, crop_side = math.floor(data["input_size"][-1] / float(data["crop_pct"])), data["input_size"][-1]
    else:  # crop_mode squash resizes both sides to the same length; embedder resizes the shorter one
        side = resize.size if isinstance(resize.size, int) else resize.size[0]
        crop_side = crop.size if isinstance(crop.size, int) else crop.size[0]
    interpolation = data.get("interpolation", "bicubic")
    # mean and std as the config states them (the Normalize tensors are float32-rounded copies of them)
    return Preprocessing(
        resize_size=int(side),
        crop_size=int(crop_side),
        interpolation=interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bicubic",
        mean=tuple(float(v) for v in data["mean"]),
        std=tuple(float(v) for v in data["std"]),
    )
