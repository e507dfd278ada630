"""Typed loading of plain data (parsed YAML) into dataclasses: the one validator behind the run config
(``ssfer_dist.config``) and the shard build spec (``ssfer-shard build --spec``).

Every dataclass field's annotation is checked (bool, int, float, str, Optional/Union, Literal, List,
Tuple, Dict, nested dataclasses); unknown keys and wrong types raise :class:`ConfigError` naming the key
path and what was expected (``optim.base_lr: expected float, got 'abc'``). ints are accepted for floats,
bools never for numbers.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, List, Literal, Tuple

from ssfer_dist.errors import UserError

__all__ = ["ConfigError", "build", "convert", "convert_fields", "type_name"]


class ConfigError(UserError):
    """A config problem; the message starts with the file and key path."""


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + "|".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, List):
        return "list"
    if origin in (tuple, Tuple):
        return f"list of {len(typing.get_args(tp))}"
    if origin in (dict, Dict):
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against type ``tp``; return the converted value or raise ConfigError(path)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{path}: expected {type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return build(tp, value, path)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for a in args:
            if a is type(None):
                continue
            try:
                return convert(value, a, path)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        for a in typing.get_args(tp):
            if value == a and type(value) is type(a):
                return a
        raise bad
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise bad
        (et,) = typing.get_args(tp)
        return [convert(v, et, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (tuple, Tuple):
        ets = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(ets):
            raise bad
        return tuple(convert(v, et, f"{path}[{i}]") for i, (v, et) in enumerate(zip(value, ets)))
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise bad
        kt, vt = typing.get_args(tp)
        return {convert(k, kt, f"{path}.<key>"): convert(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise ConfigError(f"{path}: unsupported type {tp}")


def convert_fields(cls: Any, data: Dict[str, Any], path: str = "") -> Dict[str, Any]:
    """``data``'s values converted to the types of ``cls``'s fields of the same name (the fields not in
    ``data`` are left to the caller); an unknown key is an error."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{path}.{k}" if path else str(k)
            raise ConfigError(f"{where}: unknown key{did_you_mean(str(k), names)} "
                              f"(expected one of: {', '.join(sorted(names))})")
    return {k: convert(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}


def build(cls: Any, data: Dict[str, Any], path: str = "") -> Any:
    """An instance of dataclass ``cls`` from the mapping ``data`` (missing fields take their defaults)."""
    return cls(**convert_fields(cls, data, path))


def did_you_mean(name: str, names) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``names`` to a mistyped ``name``, else ``""``."""
    import difflib

    close = difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_key_path(cls: Any, parts: List[str], label: str) -> None:
    """``parts`` (``["train", "max_step"]``) must name a field path of dataclass ``cls``; stops checking
    where the field is no longer a dataclass (a dict of free keys, a list). ``ConfigError`` starting with
    ``label`` (e.g. ``--set train.max_step=5``), naming the bad part and the closest field name."""
    node = cls
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            return
        names = {f.name for f in dataclasses.fields(node)}
        if part not in names:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"{label}: unknown key {part!r} in {where}{did_you_mean(part, names)} "
                              f"(expected one of: {', '.join(sorted(names))})")
        tp = typing.get_type_hints(node)[part]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        node = args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp
