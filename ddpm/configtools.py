"""Typed dataclass trees from YAML: coercion by type hint, unknown keys, dotted overrides, one-line errors.

The generic half of :mod:`ddpm.config` (which declares the sections). A tree is a dataclass whose fields
are section dataclasses; a section's fields are ``int``, ``float``, ``bool``, ``str``, a ``Literal`` of
strings, ``list[...]``, ``dict[str, str]`` or ``X | None``. Values are coerced to the hint (``"2e-4"``
read by PyYAML as a string is a float), then the sections validate themselves in ``__post_init__``.
Every error is a :class:`ConfigError` whose message starts with the key (``training.batch_size: ...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from ddpm.errors import ConfigError

T = TypeVar("T")


def require(ok: bool, key: str, value: object, expected: str) -> None:
    """Raise ``ConfigError("key: invalid value V (expected ...)")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: invalid value {value!r} (expected {expected})")


def type_name(tp: Any) -> str:
    """A hint as a user reads it: ``int | None`` -> ``"int or null"``."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "int", float: "float", bool: "bool", str: "str", type(None): "null"}[tp]


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` converted to the hint ``tp``, or a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return coerce(value, inner[0], key)
    if origin is Literal:
        if isinstance(value, str) and value in typing.get_args(tp):
            return value
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(tp)
            return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
    elif tp is bool and isinstance(value, bool):
        return value
    elif tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif tp is float and not isinstance(value, bool) and isinstance(value, (int, float)):
        return float(value)
    elif tp is float and isinstance(value, str):  # PyYAML reads "2e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: invalid value {value!r} (expected {type_name(tp)})")


def did_you_mean(name: str, choices: list[str], prefix: str) -> str:
    """`` (did you mean training.batch_size?)`` for a near miss, else the valid names."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else f" (valid: {', '.join(choices)})"


def _section(cls: type, name: str, raw: Any) -> Any:
    """One section dataclass from a mapping; ``metadata={"path": True}`` fields get ``~`` and ``$VAR`` expanded."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{name}.{key}: unknown key{did_you_mean(str(key), list(fields), f'{name}.')}")
        value = coerce(value, hints[key], f"{name}.{key}")
        if fields[key].metadata.get("path") and isinstance(value, str):  # resolved where it is loaded
            value = os.path.expanduser(os.path.expandvars(value))
        kwargs[key] = value
    return cls(**kwargs)


def tree_from_dict(cls: type[T], raw: Any) -> T:
    """Build (and so validate) the tree ``cls`` from nested plain types; unknown names are errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    for name in raw:
        if name not in hints:
            raise ConfigError(f"{name}: unknown section{did_you_mean(str(name), list(hints), '')}")
    return cls(**{name: _section(hints[name], name, value) for name, value in raw.items()})


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"training.batch_size=8"`` -> ``("training", "batch_size", 8)``; the value is parsed as YAML."""
    path, sep, value = text.partition("=")
    parts = path.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: expected section.key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err.__class__.__name__})") from None
    return parts[0], parts[1], parsed


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of the nested dict with every ``section.key=value`` applied."""
    out = {k: dict(v or {}) if isinstance(v, dict) or v is None else v for k, v in raw.items()}
    for text in overrides:
        section, key, value = parse_override(text)
        if not isinstance(out.setdefault(section, {}), dict):
            raise ConfigError(f"{section}: expected a mapping of keys")
        out[section][key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping; a missing file or malformed YAML names the file (and line)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(err, "problem", None) or err.__class__.__name__
        raise ConfigError(f"{where}: malformed YAML ({problem})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of sections at the top level")
    return raw or {}


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass ``cls`` (the string literal after it)."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args`` where the ``section.key=value`` overrides may stand anywhere among the options.

    argparse stops filling the ``overrides`` positional at the first option; the words it leaves over are
    overrides too (subcommands included, which ``parse_intermixed_args`` does not support). An unknown option
    is still the parser's usual error.
    """
    args, rest = parser.parse_known_args(argv)
    unknown = [r for r in rest if r.startswith("-") or "=" not in r]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*getattr(args, "overrides", []), *rest]
    return args


def describe(cls: type) -> str:
    """Every ``section.key`` of the tree ``cls`` with its type, default and docstring (``python -m ddpm.config``)."""
    lines = []
    for section in dataclasses.fields(cls):
        sec_cls = section.default_factory  # type: ignore[misc]
        hints, docs, default = typing.get_type_hints(sec_cls), field_docs(sec_cls), sec_cls()
        lines.append(f"{section.name}:  # {(sec_cls.__doc__ or '').strip()}")
        for f in dataclasses.fields(sec_cls):
            value = yaml.safe_dump(getattr(default, f.name), default_flow_style=True).strip().removesuffix("...")
            lines.append(f"  {f.name}: {value.strip()}  # {type_name(hints[f.name])}. {docs.get(f.name, '')}")
    return "\n".join(lines)
