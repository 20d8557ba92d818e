"""Loading the run configuration: the schema's defaults (utils/config.py), overlaid by YAML files in order, then
``--set group.key=value`` overrides (the value parsed as YAML), validated once; pydantic's ValidationError becomes one
ConfigError line ``SOURCE: group.key=VALUE: what is wrong / what would be right``, SOURCE the file or ``--set`` that
gave the value.
"""
from __future__ import annotations

import math
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn

import yaml
from pydantic import BaseModel, ValidationError

from utils.config import Config, ConfigError, Invalid, Section, unknown


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-3, 1E5 and 2.5e4 as floats.

    YAML 1.1 (PyYAML) wants a dot and a signed exponent, so it would read these as strings and a learning rate
    written the usual way would fail.
    """


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """YAML text -> Python values, with YamlLoader's floats."""
    return yaml.load(text, Loader=YamlLoader)



def _out_of_range(value: Any) -> str | None:
    """What no setting may hold, anywhere inside its value (an augment entry's arguments too): nan or infinity, an
    integer beyond 64 bits (torch and numpy take no more), a NUL character (no path can hold one). None if none."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not allowed; use a finite number"
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        return f"{value} does not fit in 64 bits"
    if isinstance(value, str) and "\0" in value:
        return "contains a NUL character"
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((problem for item in items if (problem := _out_of_range(item))), None)


def _type_name(tp: Any) -> str:
    """A type hint as messages write it: list[int or float] or null."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is dict:
        return "mapping"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


BOUNDS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}  # a Field's ge, gt, le, lt


def _range(field: Any) -> str:
    """A Field's bounds as messages write them: "must be in [0, 1)", "must be >= 0", "must be positive"."""
    limits = {name: getattr(m, name) for m in field.metadata for name in ("ge", "gt", "le", "lt") if hasattr(m, name)}
    low = f"[{limits['ge']}" if "ge" in limits else f"({limits['gt']}" if "gt" in limits else None
    high = f"{limits['le']}]" if "le" in limits else f"{limits['lt']})" if "lt" in limits else None
    if low and high:
        return f"must be in {low}, {high}"
    if low == "(0":
        return "must be positive"
    return f"must be {'>=' if low[0] == '[' else '>'} {low[1:]}" if low else f"must be below {high[:-1]}"


class _Layers:
    """The raw groups of every overlay and --set, merged in order, and the source of each group.key."""

    def __init__(self, config_cls: type[BaseModel], source: str) -> None:
        self.sections: dict[str, type[Section]] = {name: f.annotation for name, f in config_cls.model_fields.items()}
        self.groups: dict[str, dict] = {}
        self.origins: dict[str, str] = {}
        self.source = source  # named for keys no overlay set (their defaults fail only in a check across keys)

    def fail(self, source: str, key: str, value: Any, problem: str) -> NoReturn:
        raise ConfigError(f"{source}: {key}={value!r}: {problem}")

    def set(self, source: str, group: str, key: str, value: Any, merge: bool = True) -> None:
        """group.key = value from `source`; with `merge`, a mapping updates the mapping below it (an augment entry)."""
        below = self.groups.get(group, {}).get(key, self.default(group, key))
        if merge and isinstance(value, dict) and isinstance(below, dict):
            value = {**below, **value}
        self.groups.setdefault(group, {})[key] = value
        self.origins[f"{group}.{key}"] = source

    def default(self, group: str, key: str) -> Any:
        field = self.sections[group].model_fields.get(key)
        return None if field is None else field.get_default(call_default_factory=True)

    def overlay(self, d: Any, source: str) -> None:
        """One file's (or a checkpoint's) mapping of groups over what is there."""
        if d is None:  # an empty file
            return
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping of groups ({', '.join(self.sections)}), got {d!r}")
        for name, body in d.items():
            if name not in self.sections:
                self.fail(source, name, body, unknown("group", name, self.sections))
            if body is not None and not isinstance(body, dict):
                keys = ", ".join(self.sections[name].model_fields)
                self.fail(source, name, body, f"expected a mapping of {name} keys ({keys})")
            for key, value in (body or {}).items():
                self.set(source, name, key, value)

    def override(self, item: str) -> None:
        """One --set group.key=value (or group.key.entry=value for one entry of a mapping)."""
        key, eq, text = item.partition("=")
        group, dot, name = key.strip().partition(".")
        if not (eq and dot and group and name):
            raise ConfigError(f"--set: {item!r}: expected the form group.key=value (or group.key.entry=value for a "
                              "mapping), e.g. data.img_size=320")
        if group not in self.sections:
            self.fail("--set", key, text, unknown("group", group, self.sections))
        try:
            value = yaml_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set: {key}={text!r}: value is not valid YAML: {' '.join(str(e).split())}") from e
        name, _, entry = name.partition(".")
        if entry:  # group.key.entry=value sets one entry of a mapping-valued key, e.g. augment.affine.p=0
            below = self.groups.get(group, {}).get(name, self.default(group, name))
            if not isinstance(below, dict):
                self.fail("--set", f"{group}.{name}", below, f"is not a mapping, so {key} cannot be set")
            value = {**below, entry: value}
        self.set("--set", group, name, value, merge=False)  # group.key={...} replaces the whole mapping

    def build(self, config_cls: type[BaseModel]) -> Any:
        """Validate the merged groups; the first problem as one ConfigError naming its source, key and value."""
        for group, body in self.groups.items():
            for key, value in body.items():
                if isinstance(key, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in key):
                    # a lone surrogate: pydantic cannot read the key and would name only the group
                    self.fail(self.origins.get(f"{group}.{key}", self.source), f"{group}.{key}", value,
                              unknown(f"{group} key", key, self.sections[group].model_fields))
                if problem := _out_of_range(value):
                    self.fail(self.origins[f"{group}.{key}"], f"{group}.{key}", value, problem)
        try:
            return config_cls.model_validate(self.groups)
        except ValidationError as e:
            error = e.errors(include_url=False)[0]
            group, found = error["loc"][0], error.get("ctx", {}).get("error")
            if len(error["loc"]) < 2 and not isinstance(found, Invalid):  # not a key's: nothing here raises one
                raise ConfigError(f"{self.source}: {group}: {error['msg']}") from e
            if isinstance(found, Invalid):  # a section's check
                key, value, problem = found.key, found.value, found.problem
            else:
                key = error["loc"][1]
                value = self.groups[group].get(key, error["input"])
                field = self.sections[group].model_fields.get(key)
                if error["type"] == "extra_forbidden":
                    problem = unknown(f"{group} key", key, self.sections[group].model_fields)
                elif error["type"] == "literal_error":
                    problem = unknown(key, value, typing.get_args(field.annotation))
                elif error["type"] in BOUNDS:
                    problem = _range(field)
                else:  # a type pydantic cannot take in strict mode
                    problem = f"expected {_type_name(field.annotation)}"
            full = f"{group}.{key}"
            self.fail(self.origins.get(full, self.source), full, value, problem)


def build_config(config_cls: type[BaseModel], layers: Any, source: str = "<dict>",
                 overrides: Sequence[str] = ()) -> Any:
    """config_cls (a model of Section fields) from its defaults, the overlay `layers` (one mapping, or a list of
    (source, mapping) applied in order) and the --set `overrides`, applied last; `source` names a single mapping."""
    merged = _Layers(config_cls, source)
    for name, d in layers if isinstance(layers, list) else [(source, layers)]:
        merged.source = name
        merged.overlay(d, name)
    for item in overrides:
        merged.override(item)
    return merged.build(config_cls)


def config_from_dict(d: dict, source: str = "<dict>", overrides: Sequence[str] = ()) -> Config:
    """Validate a nested dict (an overlay, or a checkpoint's whole config), apply overrides, and build a Config."""
    return build_config(Config, d, source, overrides)


def read_yaml(path: str | Path) -> Any:
    """A config file's YAML; a missing, unreadable or malformed file is a ConfigError naming it."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from e
    try:
        return yaml_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e


def load_config(path: str | Path | Sequence[str | Path] = "args.yaml", overrides: Sequence[str] = ()) -> Config:
    """The schema's defaults, overlaid by the YAML file `path` (or each of a list of files, in order), then by the
    "group.key=value" overrides; validated."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    return build_config(Config, [(str(p), read_yaml(p)) for p in paths], overrides=overrides)


def config_to_dict(cfg: BaseModel) -> dict:
    """Return cfg as plain nested dicts and lists, safe for yaml.safe_dump and config_from_dict."""
    return cfg.model_dump()


def save_config(cfg: Config, path: str | Path) -> None:
    """Write cfg to path as YAML that load_config reads back to an equal Config."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
