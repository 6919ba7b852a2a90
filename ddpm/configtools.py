"""Typed dataclass trees from YAML: types by hint, unknown and moved keys, dotted overrides, one-line errors.

The generic half of :mod:`ddpm.config` (which declares the sections). A tree is a dataclass whose fields
are section dataclasses; a section's fields are ``int``, ``float``, ``bool``, ``str``, a ``Literal`` of
strings, ``tuple[X, ...]`` (a YAML list), ``Mapping[str, str]`` (read-only), ``X | None`` or a nested section.
Each section's ``__post_init__`` first calls :func:`check_fields`, so a section built in Python obeys the rules a
YAML file does and raises the same message; the YAML loader only adds reading ``"2e-4"`` (a string to PyYAML)
as a float. A key a section lists in its ``MOVED`` table is one line naming its new home.
Every error is a :class:`ConfigError` whose message starts with the key (``training.batch_size: ...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import os
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from ddpm.errors import ConfigError

T = TypeVar("T")


class FrozenMap(dict):  # a dict subclass: JSON-able, picklable (submitit), equal to the plain dict
    """A read-only dict: a frozen section's mapping (``slurm.additional``) cannot change in place."""

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a config mapping is read-only: build a new section with dataclasses.replace")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _read_only  # type: ignore

    def __reduce__(self) -> tuple[Any, ...]:
        return FrozenMap, (dict(self),)

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))


def plain(value: Any) -> Any:
    """``value`` as plain YAML types: sections -> dicts, tuples -> lists, mappings -> dicts (recursively)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


def require(ok: bool, key: str, value: object, expected: str) -> None:
    """Raise ``ConfigError("key: invalid value V (expected ...)")`` unless ``ok`` (V as YAML types: lists)."""
    if not ok:
        raise ConfigError(f"{key}: invalid value {plain(value)!r} (expected {expected})")


def is_section(tp: Any) -> bool:
    """Whether the hint ``tp`` is a section (a dataclass) nested in its parent."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def type_name(tp: Any) -> str:
    """A hint as a user reads it: ``int | None`` -> ``"int or null"``."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Mapping):
        return "a mapping"
    if is_section(tp):
        return "a mapping of keys"
    return {int: "int", float: "float", bool: "bool", str: "str", type(None): "null"}[tp]


def conform(value: Any, tp: Any, key: str, from_yaml: bool = False) -> Any:
    """``value`` as the hint ``tp`` holds it (tuples for lists, floats for ints, :class:`FrozenMap` for mappings),
    or a ConfigError naming ``key``. Both paths use it: a section's ``__post_init__`` and, with ``from_yaml``
    (which also reads ``"2e-4"``, a string to PyYAML, as a float), the YAML loader."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        try:
            return conform(value, inner[0], key, from_yaml)
        except ConfigError as err:
            if str(err).startswith(f"{key}: invalid value"):  # the whole value: name every type it may have
                raise ConfigError(f"{key}: invalid value {plain(value)!r} (expected {type_name(tp)})") from None
            raise
    if origin is Literal:
        if isinstance(value, str) and value in typing.get_args(tp):
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            item = typing.get_args(tp)[0]
            return tuple(conform(v, item, f"{key}[{i}]", from_yaml) for i, v in enumerate(value))
    elif origin is Mapping:
        if isinstance(value, Mapping):
            bad = next((k for k, v in value.items() if not isinstance(v, (str, int, float, bool))), None)
            if bad is not None:
                raise ConfigError(f"{key}.{bad}: invalid value {plain(value[bad])!r} (expected str)")
            return value if isinstance(value, FrozenMap) else FrozenMap({str(k): str(v) for k, v in value.items()})
    elif tp is bool and isinstance(value, bool):
        return value
    elif tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif tp is float and not isinstance(value, bool) and isinstance(value, (int, float)):
        return float(value)
    elif tp is float and from_yaml and isinstance(value, str):  # PyYAML reads "2e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: invalid value {plain(value)!r} (expected {type_name(tp)})")


def did_you_mean(name: str, choices: list[str], prefix: str) -> str:
    """`` (did you mean training.batch_size?)`` for a near miss, else the valid names."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else f" (valid: {', '.join(choices)})"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _join(name: str, key: str) -> str:
    return f"{name}.{key}" if name else key


def build_section(cls: type[T], name: str, raw: Any, base: T | None = None, from_yaml: bool = False) -> T:
    """The section ``cls`` at dotted ``name`` from a mapping: ``base`` (else the defaults) with ``raw``'s keys.

    An unknown key is an error, a key in ``cls.MOVED`` one line naming its new home, a key in ``cls.FIXED`` (one
    the section leaves to its stage) one line saying why. Nested sections recurse."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{name or 'config'}: expected a mapping of {'keys' if name else 'sections'}, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    moved = getattr(cls, "MOVED", {})
    kwargs = {}
    for key, value in raw.items():
        full = _join(name, str(key))
        if key in moved:
            raise ConfigError(f"{full} moved: use {moved[key]}")
        if key in getattr(cls, "FIXED", {}):
            raise ConfigError(f"{full}: not a key of {name}: {cls.FIXED[key]}")
        if key not in fields:
            what = "unknown key" if name else "unknown section"
            raise ConfigError(f"{full}: {what}{did_you_mean(str(key), list(fields), f'{name}.' if name else '')}")
        tp = _hints(cls)[key]
        if is_section(tp):
            inner = getattr(base, key) if base is not None else _default(fields[key])
            kwargs[key] = build_section(tp, full, value, inner, from_yaml)
        else:
            kwargs[key] = conform(value, tp, full, from_yaml)
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]


def check_fields(section: Any, name: str) -> None:
    """Every field of the dataclass ``section`` (at dotted ``name``) as its type hint says, converted in place
    (lists to tuples, ints to floats, mappings read-only, ``path`` fields' ``~`` and ``$VAR`` expanded, a nested
    section given as a mapping built from its default); the first wrong one raises the ConfigError the YAML loader
    raises for it. Each section's ``__post_init__`` calls it first."""
    for f in dataclasses.fields(section):
        value, tp, key = getattr(section, f.name), _hints(type(section))[f.name], _join(name, f.name)
        if is_section(tp):
            if not isinstance(value, tp):
                value = build_section(tp, key, value, _default(f))
        else:
            value = conform(value, tp, key)
            if f.metadata.get("path") and isinstance(value, str):  # resolved where it is loaded
                value = os.path.expanduser(os.path.expandvars(value))
        if value is not getattr(section, f.name):
            object.__setattr__(section, f.name, value)  # a frozen dataclass: only while it is being built


def tree_from_dict(cls: type[T], raw: Any) -> T:
    """Build (and so validate) the tree ``cls`` from nested plain types (YAML's); unknown names are errors."""
    return build_section(cls, "", raw, from_yaml=True)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"training.batch_size=8"`` -> ``(["training", "batch_size"], 8)`` (also ``eval.sampling.num_steps=20``);
    the value is parsed as YAML."""
    path, sep, value = text.partition("=")
    parts = path.strip().split(".")
    if not sep or not 2 <= len(parts) <= 3 or not all(parts):
        raise ConfigError(f"override {text!r}: expected section.key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err.__class__.__name__})") from None
    return parts, parsed


def _copy(raw: Any) -> Any:
    return {k: _copy(v) for k, v in raw.items()} if isinstance(raw, dict) else raw


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of the nested dict with every ``section.key=value`` (or ``section.sub.key=value``) applied."""
    out = _copy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"{'.'.join(parts[:i + 1])}: expected a mapping of keys")
            node = node[part]
        node[parts[-1]] = value
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


def _describe_section(section: Any, indent: str) -> list[str]:
    """``section``'s keys with their values (as its parent's default holds them), types and docstrings."""
    cls, lines = type(section), []
    hints, docs = _hints(cls), field_docs(cls)
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if is_section(hints[f.name]):
            lines.append(f"{indent}{f.name}:  # {docs.get(f.name, '')}")
            lines += _describe_section(value, indent + "  ")
            continue
        text = yaml.safe_dump(plain(value), default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"{indent}{f.name}: {text}  # {type_name(hints[f.name])}. {docs.get(f.name, '')}")
    return lines


def describe(cls: type) -> str:
    """Every ``section.key`` of the tree ``cls`` with its type, default and docstring (``python -m ddpm.config``)."""
    lines = []
    for section in dataclasses.fields(cls):
        default = _default(section)
        lines.append(f"{section.name}:  # {(type(default).__doc__ or '').strip()}")
        lines += _describe_section(default, "  ")
    return "\n".join(lines)
