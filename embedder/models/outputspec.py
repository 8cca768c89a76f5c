"""`OutputSpec`: one output a pass is asked for, parsed once from the name a person gives (`--layer`).

The grammar, as `FeatureSpace.layer` documents it:

* ``default`` (or no name): the model's default layer;
* a name: a layer alias of the model (``pool``, ``fc7``) or a graph node (``layer3``, ``blocks.10``);
* ``A+B``: the pooled outputs of A and B side by side, one output (a ViT's last blocks);
* ``style``: the Gram style descriptor (`embedder.models.constants.STYLE`).

A name is resolved to what the graph (and a cache's datasets) call it by `OutputSpec.node`, with an
alias map: the model's (`BackboneSpec.layer_aliases`) when a backbone is built, the one a cache
recorded (its `layer_names` attribute) when a cache is read, so that readers need no registry.
Torch-free: the cache reader and the CLI parse with it. (Not `embedder.outputs`, which is about files.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from embedder.errors import ConfigError
from embedder.models.constants import STYLE

COMBINE = "+"  # `--layer blocks.10+blocks.11`: one output, the parts pooled and concatenated
DEFAULT = "default"  # `--layer default`: the model's default layer (what no --layer means)


@dataclass(frozen=True)
class OutputSpec:
    """One requested output: `parts` are the names as given, pooled and concatenated in order;
    () is the default layer and (STYLE,) the Gram style descriptor."""

    parts: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str | None, flag: str = "--layer") -> OutputSpec:
        """The output `text` names; a name outside the grammar is a ConfigError naming the fix."""
        if text is None or text == DEFAULT:
            return cls()
        if not isinstance(text, str):
            raise ConfigError(f"{flag} takes a layer name, got {text!r}; list them with `embedder inspect MODEL`.")
        if not text.strip():
            raise ConfigError(f"{flag} {text!r} is empty: name a layer (`embedder inspect MODEL` lists them), "
                              "or leave it out for the model's default.")
        if any(c.isspace() for c in text):
            raise ConfigError(f"{flag} {text!r} has a space; layer names have none: write A+B without spaces.")
        parts = tuple(text.split(COMBINE))
        if len(parts) > 1:
            _check_combined(text, parts, flag)
        return cls(parts)

    @property
    def is_default(self) -> bool:
        return not self.parts

    @property
    def is_style(self) -> bool:
        return self.parts == (STYLE,)

    def __str__(self) -> str:
        return COMBINE.join(self.parts) if self.parts else DEFAULT

    def node(self, aliases: Mapping[str, str], default: str) -> str:
        """The output's name in the graph and in a cache (`a+b` for a combined one): each part through
        `aliases` (names not in it are graph nodes already), the default layer as `default`."""
        if not self.parts:
            return default
        return COMBINE.join(aliases.get(part, part) for part in self.parts)


def _check_combined(text: str, parts: tuple[str, ...], flag: str) -> None:
    if "" in parts:
        raise ConfigError(f"{flag} {text!r} has an empty part: write A+B with a layer name on each side of '+'.")
    if STYLE in parts:
        raise ConfigError(f"{flag} style cannot be part of a combined layer (`a+b`); give it as its own {flag}.")
    if DEFAULT in parts:
        raise ConfigError(f"{flag} {text!r}: `{DEFAULT}` names the default layer alone; in A+B name the layers "
                          "themselves (`embedder inspect MODEL` lists them).")


def parse_outputs(layer: str | None, extra_layers: Iterable[str] = ()) -> tuple[OutputSpec, ...]:
    """The requested outputs, primary first, parsed once: what `FeatureSpace.layer` and `extra_layers` name."""
    return tuple(OutputSpec.parse(name) for name in (layer, *extra_layers))
