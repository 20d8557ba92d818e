"""Typed YAML: a nested mapping checked against dataclasses, field by field, from their type hints.

The machinery behind utils/config.py (which holds the schema: the sections, their defaults and their checks). A
section is a dataclass whose fields carry type hints and defaults, with a ``check(origin)`` method for value
constraints; ``build_config`` type-checks each group of a mapping against its section, applies ``--set``
overrides (``group.key=value``, the value parsed as YAML; ``group.key.entry=value`` for one entry of a mapping)
and runs each section's check. Every problem raises ConfigError reading ``SOURCE: group.key=VALUE: what is
wrong / what would be right``, where SOURCE is the file or ``--set``.
"""
from __future__ import annotations

import difflib
import math
import re
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import yaml


class ConfigError(ValueError):
    """A config value that cannot be used; the message says where it came from and why."""


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-3, 1E5 and 2.5e4 as floats.

    YAML 1.1 (PyYAML) wants a dot and a signed exponent, so it would read
    these as strings and a learning rate written the usual way would fail.
    """


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """YAML text -> Python values, with YamlLoader's floats."""
    return yaml.load(text, Loader=YamlLoader)


def fail(source: str, key: str, value: Any, problem: str) -> NoReturn:
    """Raise ConfigError("SOURCE: key=VALUE: problem")."""
    raise ConfigError(f"{source}: {key}={value!r}: {problem}")


def unknown(what: str, name: Any, valid: Iterable[str]) -> str:
    """"unknown WHAT 'name'; did you mean ...? valid WHATs: ..." for a name that is not among `valid`."""
    valid = list(valid)
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown {what} {name!r}; {hint}valid {what}s: {', '.join(valid)}"


@dataclass(frozen=True)
class Origin:
    """Where one section's values came from, so errors can name the file or --set."""

    file: str
    group: str
    overridden: frozenset[str]

    def fail(self, key: str, value: Any, problem: str) -> NoReturn:
        """Raise ConfigError for `key` of this section, naming --set when the value came from there."""
        full = f"{self.group}.{key}"
        fail("--set" if full in self.overridden else self.file, full, value, problem)



class _Mismatch(Exception):
    pass


def _conform(value: Any, tp: Any) -> Any:
    """Return value as type tp (an int widened to float), or raise _Mismatch."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _conform(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch
        return [_conform(v, args[0]) for v in value]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _Mismatch
        return {k: _conform(v, args[1]) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)  # YAML writes 1.0 as 1
        except OverflowError:  # beyond 1.8e308: then reported as not finite
            return math.inf if value > 0 else -math.inf
    # bool subclasses int, but true for an int setting is a mistake, not 1
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise _Mismatch
    return value


def _out_of_range(value: Any) -> str | None:
    """What no setting may hold, anywhere inside its value: nan or infinity, an integer beyond 64 bits (torch and
    numpy take no more), a NUL character (no path can hold one). None when there is none."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not allowed; use a finite number"
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        return f"{value} does not fit in 64 bits"
    if isinstance(value, str) and "\0" in value:
        return "contains a NUL character"
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((problem for item in items if (problem := _out_of_range(item))), None)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is dict:
        return "mapping"
    if tp is Any:
        return "any value"
    return "null" if tp is type(None) else tp.__name__


def build_section(cls: type, raw: dict, origin: Origin) -> Any:
    """Type-check raw against cls's fields, build it and run its check()."""
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        if key not in hints:
            origin.fail(key, value, unknown(f"{origin.group} key", key, hints))
        try:
            values[key] = _conform(value, hints[key])
        except _Mismatch:
            origin.fail(key, value, f"expected {_type_name(hints[key])}")
        if problem := _out_of_range(values[key]):
            origin.fail(key, value, problem)
    section = cls(**values)
    section.check(origin)
    return section


def _groups(d: Any, source: str, sections: dict[str, type]) -> dict[str, dict]:
    """Split the top-level mapping into per-group dicts (copies; d is not changed)."""
    if d is None:  # an empty file
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of groups ({', '.join(sections)}), got {d!r}")
    groups = {}
    for name, body in d.items():
        if name not in sections:
            fail(source, name, body, unknown("group", name, sections))
        if body is not None and not isinstance(body, dict):
            keys = ", ".join(typing.get_type_hints(sections[name]))
            fail(source, name, body, f"expected a mapping of {name} keys ({keys})")
        groups[name] = dict(body or {})
    return groups


def _apply_overrides(groups: dict[str, dict], overrides: Sequence[str], sections: dict[str, type]) -> frozenset[str]:
    """Write each group.key=value into groups and return the keys set this way."""
    keys = set()
    for item in overrides:
        key, eq, text = item.partition("=")
        group, dot, name = key.strip().partition(".")
        if not (eq and dot and group and name):
            raise ConfigError(f"--set: {item!r}: expected the form group.key=value (or group.key.entry=value for a "
                              "mapping), e.g. data.img_size=320")
        if group not in sections:
            fail("--set", key, text, unknown("group", group, sections))
        try:
            value = yaml_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set: {key}={text!r}: value is not valid YAML: {' '.join(str(e).split())}") from e
        name, _, sub = name.partition(".")
        if sub:  # group.key.sub=value sets one entry of a mapping-valued key, e.g. augment.affine.p=0
            base = groups.setdefault(group, {}).get(name, getattr(sections[group](), name, {}))
            if not isinstance(base, dict):
                fail("--set", f"{group}.{name}", base, f"is not a mapping, so {key} cannot be set")
            value = {**base, sub: value}
        groups.setdefault(group, {})[name] = value
        keys.add(f"{group}.{name}")
    return frozenset(keys)


def choices(names: Iterable[str]) -> str:
    """The names quoted and comma-separated, for messages: 'a', 'b', 'c'."""
    return ", ".join(repr(n) for n in names)


def build_config(config_cls: type, d: Any, source: str = "<dict>", overrides: Sequence[str] = ()) -> Any:
    """Validate a nested mapping against config_cls (a dataclass of section dataclasses), apply overrides, run
    every section's check() and build config_cls; `source` names the mapping's origin in messages."""
    sections: dict[str, type] = typing.get_type_hints(config_cls)
    groups = _groups(d, source, sections)
    overridden = _apply_overrides(groups, overrides, sections)
    return config_cls(**{name: build_section(cls, groups.get(name, {}), Origin(source, name, overridden))
                         for name, cls in sections.items()})
