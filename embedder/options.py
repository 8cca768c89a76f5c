"""Every option declared once: a config dataclass field is the single source of a setting.

A command's settings are one frozen dataclass (`EmbedConfig`, `ProbeConfig`, ...). Each field
says, through `option(...)`, its default, its help and how it is spelled on the command line;
its type comes from the annotation. From that one declaration:

  * `add_arguments(parser, Config)` adds the argparse flags (help text shows the default),
  * `from_arguments(Config, namespace)` builds the config from parsed flags,
  * `from_table(Config, table, base_dir, what)` builds it from a pipeline TOML table (unknown
    and missing keys refused by name; path fields taken relative to the pipeline's folder),
  * `from_keywords(Config, **values)` builds it from flat keywords (a Python caller's `Config.of(...)`),
  * `to_arguments(config)` gives back the command-line tokens (what a cache records so that
    an interrupted run can say how to resume).

A field declared `option(nested=True)` holds another config dataclass (`EmbedConfig.space`, a
`FeatureSpace`) whose options are this command's own, flat: `--pool` and the TOML key `pool` fill
`config.space.pool`, the nested class's declaration (help, choices, default) is the one used, and
`to_arguments` gives back the same flat tokens. The nesting field may take only some of them
(`only`), replace their help groups (`group`; "" = none) or amend one where this command differs
(`amend`: {field: {Option attribute: value}}, e.g. embed's extra precision "fast").

Defaults live only in the dataclass: argparse leaves a setting the user did not give at None,
and None means "not given", so the CLI, a TOML step and a Python caller who leave a setting
out all get the same default.
Validation lives in the dataclass's `__post_init__`, so all three are checked by the same code.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedder.errors import ConfigError, did_you_mean

METADATA_KEY = "embedder.option"


@dataclass(frozen=True)
class Option:
    """How a config field appears on the command line and in a pipeline table."""

    help: str = ""
    flag: str | None = None  # e.g. "--dtype" or "-k"; default: --field-name
    positional: bool = False  # a positional argument (a tuple field takes one or more)
    choices: tuple | None = None
    parse: Callable[[str], Any] | None = None  # command-line (and TOML string) text -> value
    metavar: str | None = None
    cli: bool = True  # False: not on the command line
    toml: bool = True  # False: not a pipeline key
    path: bool | tuple[str, ...] = False  # a path (True), or a path unless one of these keywords
    inverse: str | None = None  # a boolean spelled as the flag that turns it off (progress: --quiet)
    repeat: bool = False  # a repeatable flag even though the field holds one value (see _from_cli)
    group: str | None = None  # argparse group title
    exclusive: str | None = None  # name of a mutually exclusive group (see REQUIRED_GROUPS)
    nargs: str | None = None  # a tuple flag that takes its values at once (`--only a b`), not repeated
    aliases: tuple[str, ...] = ()  # other spellings of the flag (`-k` and `--top-k` in every command)
    nested: bool = False  # the field is a config dataclass whose options are flattened into this one's
    only: tuple[str, ...] | None = None  # nested: the nested options this command takes (default: all)
    amend: dict[str, dict] | None = None  # nested: {field: {Option attribute: value}} where this command differs


def option(default: Any = dataclasses.MISSING, **kwargs) -> Any:
    """A dataclass field with its command-line and pipeline spelling (see `Option`)."""
    return dataclasses.field(default=default, metadata={METADATA_KEY: Option(**kwargs)})


@dataclass(frozen=True)
class _Spec:
    field: dataclasses.Field
    option: Option
    kind: type  # bool, int, float, str (the element type for tuples)
    many: bool  # a tuple field
    optional: bool  # None is allowed
    owner: str | None = None  # the nesting field that holds it (`space`), None for a field of the config itself

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def required(self) -> bool:
        return self.field.default is dataclasses.MISSING and self.field.default_factory is dataclasses.MISSING

    @property
    def flag(self) -> str:
        return self.option.inverse or self.option.flag or "--" + self.name.replace("_", "-")

    @property
    def key(self) -> str:
        """The pipeline TOML key: the flag's name (`--dtype` -> dtype, `-k` -> k); a positional's field name."""
        return self.name if self.option.positional else self.flag.lstrip("-").replace("-", "_")


def specs(cls) -> list[_Spec]:
    """The declared options of a config class, in field order, a nested field's options in its place."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        opt = f.metadata.get(METADATA_KEY)
        if opt is None:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with option(...)")
        if opt.nested:
            out += _nested_specs(f.name, hints[f.name], opt)
            continue
        kind, many, optional = _kind(hints[f.name])
        out.append(_Spec(f, opt, kind, many, optional))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise TypeError(f"{cls.__name__} declares {sorted({n for n in names if names.count(n) > 1})} twice")
    return out


def _nested_specs(owner: str, inner: type, outer: Option) -> list[_Spec]:
    """The options of the config class `inner` as the field `owner` takes them (see `Option.nested`)."""
    found = specs(inner)
    unknown = (set(outer.only or ()) | set(outer.amend or {})) - {s.name for s in found}
    if unknown:
        raise TypeError(f"{owner}: {inner.__name__} has no option {sorted(unknown)}")
    out = []
    for s in found:
        if outer.only is not None and s.name not in outer.only:
            continue
        changes = {"group": outer.group} if outer.group is not None else {}
        changes.update((outer.amend or {}).get(s.name, {}))
        out.append(dataclasses.replace(s, option=dataclasses.replace(s.option, **changes), owner=owner))
    return out


def _value(config, spec: _Spec):
    """The value of a (possibly nested) option in `config`."""
    holder = getattr(config, spec.owner) if spec.owner else config
    return getattr(holder, spec.name)


def _kind(hint) -> tuple[type, bool, bool]:
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    optional = False
    if origin in (typing.Union, types.UnionType):
        optional = type(None) in args
        rest = [a for a in args if a is not type(None)]
        hint = rest[0]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        return args[0], True, optional
    return hint, False, optional


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Add one argparse argument per declared option of `cls` (defaults stay in the dataclass)."""
    groups: dict[str, Any] = {}
    required_groups = getattr(cls, "REQUIRED_GROUPS", ())
    for spec in specs(cls):
        opt = spec.option
        if not opt.cli or spec.name in skip:
            continue
        target = parser
        if opt.exclusive:
            key = "exclusive:" + opt.exclusive
            if key not in groups:
                groups[key] = parser.add_mutually_exclusive_group(required=opt.exclusive in required_groups)
            target = groups[key]
        elif opt.group:
            groups.setdefault(opt.group, parser.add_argument_group(opt.group))
            target = groups[opt.group]
        target.add_argument(*_names(spec), **_argparse_kwargs(spec))


def _names(spec: _Spec) -> list[str]:
    return [spec.name] if spec.option.positional else [spec.flag, *spec.option.aliases]


def _argparse_kwargs(spec: _Spec) -> dict:
    opt = spec.option
    kw: dict[str, Any] = {"help": _help(spec)}
    if not opt.positional:
        kw["dest"] = spec.name
    if spec.kind is bool and not spec.many:
        kw["action"] = "store_false" if opt.inverse else "store_true"
        kw["default"] = None
        return kw
    kw["type"] = _argparse_type(opt.parse) if opt.parse else spec.kind
    if opt.choices:
        kw["choices"] = opt.choices
    if opt.metavar:
        kw["metavar"] = opt.metavar
    if opt.positional:
        if spec.many:
            kw["nargs"] = "+" if spec.required else "*"
        elif not spec.required:
            kw["nargs"] = "?"
        kw["default"] = None
        return kw
    if opt.nargs:
        # extend: `--image a.jpg --image b.jpg` keeps both, as `--image a.jpg b.jpg` does
        kw["nargs"], kw["action"] = opt.nargs, "extend"
    elif spec.many or opt.repeat:
        kw["action"] = "append"
    kw["default"] = None
    if spec.required:
        kw["required"] = True
    return kw


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` as argparse wants it: a refusal becomes argparse's one-line usage error."""
    def convert(text: str):
        try:
            return parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__  # argparse names the type in its message
    return convert


def _help(spec: _Spec) -> str:
    text = spec.option.help
    default = spec.field.default
    if spec.required or default in (None, (), False) or spec.option.inverse or "default" in text.lower():
        return text
    return f"{text} (default: {default})" if text else f"default: {default}"


def from_arguments(cls, namespace: argparse.Namespace, **fixed):
    """The config of `cls` from parsed arguments: what was given, the dataclass's defaults otherwise."""
    values = dict(fixed)
    for spec in specs(cls):
        value = getattr(namespace, spec.name, None) if spec.option.cli else None
        if value is not None:  # None: not given, the dataclass's default applies
            values[spec.name] = tuple(value) if spec.many else value
    return _build(cls, values, "command line")


def to_arguments(config) -> list[str]:
    """Command-line tokens that reproduce `config` (options left at their defaults are left out)."""
    values = {spec.name: _value(config, spec) for spec in specs(type(config))}
    values = config._to_cli(values) if hasattr(config, "_to_cli") else values
    positional, flags = [], []
    for spec in specs(type(config)):
        if not spec.option.cli or spec.name not in values:
            continue
        value = values[spec.name]
        if spec.option.positional:
            positional += [str(v) for v in value] if spec.many else [str(value)]
        elif value != spec.field.default and value is not None:
            flags += _tokens(spec, value)
    return positional + flags


def _tokens(spec: _Spec, value) -> list[str]:
    if spec.kind is bool and not spec.many:
        return [spec.flag] if bool(value) != bool(spec.option.inverse) else []
    if isinstance(value, (tuple, list)) and spec.option.nargs:
        return [spec.flag, *map(str, value)]
    if isinstance(value, (tuple, list)):
        return [tok for v in value for tok in (spec.flag, str(v))]
    return [spec.flag, str(value)]


# ------------------------------------------------------------------------- pipeline tables


def from_table(cls, table: dict, base_dir: Path | None, what: str):
    """A config from a pipeline TOML table: unknown keys and missing required keys are refused by
    name; path options are resolved against `base_dir`; strings are parsed like the CLI's."""
    declared = [s for s in specs(cls) if s.option.toml]
    known = {s.key: s for s in declared}
    legacy = {s.name: s for s in declared if s.name not in known}  # keys of pipelines written before (feature_dtype)
    unknown = sorted(set(table) - set(known) - set(legacy))
    if unknown:
        raise ConfigError(f"Unknown {what} setting {unknown[0]!r}.{did_you_mean(unknown[0], known)} "
                          f"Known: {', '.join(sorted(known))}.")
    given = {(known.get(k) or legacy[k]).name for k in table}
    missing = [key for key, s in known.items() if s.required and s.name not in given]
    if missing:
        raise ConfigError(f"The {what} step needs {', '.join(missing)}.")
    values = {}
    for key, value in table.items():
        spec = known.get(key) or legacy[key]
        name = spec.name
        if spec.many:
            value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if spec.option.parse and isinstance(value, str) and spec.kind is not str:
            try:
                value = spec.option.parse(value)
            except ConfigError as exc:
                raise ConfigError(f"{what} setting {key}: {exc}") from None
        _check_type(spec, key, value, what)
        if spec.option.path and base_dir is not None:
            value = _resolved(value, spec.option.path, base_dir)
        values[name] = value
    return _build(cls, values, what)


_TOML_TYPES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _check_type(spec: _Spec, key: str, value, what: str) -> None:
    """A TOML value of the wrong type is the user's mistake (exit 2), not a crash deeper down."""
    kind = spec.kind
    if kind not in _TOML_TYPES or value is None:
        return
    items = value if spec.many or (spec.option.repeat and isinstance(value, list)) else (value,)
    for item in items:
        ok = isinstance(item, kind) and not (kind is int and isinstance(item, bool))
        ok = ok or (kind is float and isinstance(item, int) and not isinstance(item, bool))
        if not ok and not (item is None and spec.optional):
            raise ConfigError(f"{what} setting {key} must be {_TOML_TYPES[kind]}, got {item!r}.")


def _resolved(value, path, base_dir: Path):
    if isinstance(value, tuple):
        return tuple(_resolved(v, path, base_dir) for v in value)
    if value is None or (isinstance(path, tuple) and str(value).lower() in {k.lower() for k in path}):
        return value
    p = Path(os.path.expanduser(str(value)))
    return str(p if p.is_absolute() else base_dir / p)


def from_keywords(cls, **values):
    """A config from flat keywords, as a Python caller writes them: `model=...` fills `space.model` (a
    config's `of`: `EmbedConfig.of(source=..., model=..., out=...)`)."""
    return _build(cls, values, "keyword")


def _build(cls, values: dict, what: str):
    if hasattr(cls, "_from_cli"):
        values = cls._from_cli(values)
    try:
        return cls(**_nest(cls, values))
    except TypeError as exc:
        raise ConfigError(f"Bad {what} settings: {exc}") from exc


def _nest(cls, values: dict) -> dict:
    """Flat values (`pool`) -> the keywords of `cls` (`space=FeatureSpace(..., pool=...)`)."""
    hints = typing.get_type_hints(cls)
    values = dict(values)
    for f in dataclasses.fields(cls):
        if f.metadata[METADATA_KEY].nested and f.name not in values:
            inner = {s.name: values.pop(s.name) for s in specs(cls) if s.owner == f.name and s.name in values}
            values[f.name] = hints[f.name](**inner)
    return values


# ------------------------------------------------------------------------------ docs


def parameters_doc(cls, names: tuple[str, ...] | None = None, *, flat: bool = True) -> str:
    """numpydoc ``Parameters`` entries (``name : type`` then the help, indented) of `cls`'s options, from
    their one declaration, so that a docstring cannot drift from the flags. `names`: only these; `flat`:
    a nested config's options in its place (False: the nesting field itself, as its class)."""
    lines = []
    entries = [_entry(s) for s in specs(cls)] if flat else _own_entries(cls)
    for name, kind, text in entries:
        if names is None or name in names:
            lines.append(f"{name} : {kind}")
            lines += textwrap.wrap(text.rstrip(".") + ".", 100, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines)


def document(cls):
    """Add the numpydoc Parameters section of a config class's fields to its docstring (the fields'
    `option(help=...)` are its only text); a class decorator."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    cls.__doc__ = f"{doc}\n\nParameters\n----------\n{parameters_doc(cls, flat=False)}\n"
    return cls


def _own_entries(cls) -> list[tuple[str, str, str]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        opt = f.metadata[METADATA_KEY]
        if opt.nested:
            out.append((f.name, hints[f.name].__name__, opt.help or f"the {hints[f.name].__name__}'s settings"))
        else:
            out.append(_entry(_Spec(f, opt, *_kind(hints[f.name]))))
    return out


def _entry(spec: _Spec) -> tuple[str, str, str]:
    kind = f"tuple of {spec.kind.__name__}" if spec.many else spec.kind.__name__
    if spec.option.choices and not spec.many:
        kind = "{" + ", ".join(map(repr, spec.option.choices)) + "}"
    return spec.name, kind + (", optional" if spec.optional else ""), _help(spec) or spec.name.replace("_", " ")


# ------------------------------------------------------------------------------ parsers


def int_or_auto(value: str) -> int | None:
    """`auto` -> None (the config resolves it), else an integer. A ConfigError (exit 2) on the command
    line (as argparse's usage error) and in a pipeline TOML alike."""
    if value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"expected an integer or auto, got {value!r}") from None


def parse_size(text: str) -> int:
    """`512M`, `4G`, `2GiB`, `1024` -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, KeyError):
        raise ConfigError(f"Cannot read size {text!r}; write e.g. 512M or 4G.") from None


OVERWRITE_HELP = ("replace an output of this command's kind at --out that was made from other inputs or another "
                  "configuration (one made from the same inputs is rebuilt without it; anything embedder did not "
                  "write is never replaced: docs/reference/exit-codes.md)")


def overwrite_option() -> Any:
    """`--overwrite`, the same flag with the same meaning in every command that writes (embedder.outputs)."""
    return option(False, help=OVERWRITE_HELP)


def check_choices(cfg) -> None:
    """Refuse a value outside a field's declared `choices`, naming the flag: the one check the CLI,
    the pipeline TOML and the Python API all go through (each config's __post_init__ calls it)."""
    for spec in specs(type(cfg)):
        choices = spec.option.choices
        if choices is None:
            continue
        value = _value(cfg, spec)
        for item in value if spec.many and isinstance(value, tuple | list) else (value,):
            if item is None and spec.optional:
                continue
            if item not in choices:
                raise ConfigError(f"{spec.flag} must be one of {', '.join(map(str, choices))}, got {item!r}.")


def positive(cfg, *names: str, optional: bool = False) -> None:
    """Refuse anything but a positive integer in the named fields (None allowed when `optional`)."""
    for name in names:
        value = getattr(cfg, name)
        if value is None and optional:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}.")
