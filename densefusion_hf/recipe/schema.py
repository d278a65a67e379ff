"""A small typed-schema checker for recipe files.

A recipe section is a dataclass; each field declares its type with an annotation and its limits with
``option(...)``.  ``parse(cls, data)`` turns the YAML mapping into instances and reports the first
problem with the field's dotted path, what was found and what is allowed, so that a typo in a
recipe fails at load time instead of halfway through a download.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from densefusion_hf.errors import RecipeError

_NONE = type(None)


def option(default: Any = dataclasses.MISSING, *, help: str = "", ge: float | None = None,
           gt: float | None = None, le: float | None = None, pattern: str | None = None,
           factory: Any = None) -> Any:
    """Declare a recipe field: its default (none means required), a help text and numeric limits."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "pattern": pattern}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class SchemaProblem(Exception):
    def __init__(self, where: str, message: str):
        super().__init__(message)
        self.where = where
        self.message = message


def _describe(tp: Any) -> str:
    """Words for a type, as shown in an error message."""
    origin = get_origin(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is Path:
        return "a path (relative to the recipe's folder)"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is Union:
        parts = [_describe(a) for a in get_args(tp) if a is not _NONE]
        return " or ".join(parts) + (" or null" if _NONE in get_args(tp) else "")
    if origin is list:
        return f"a list of {_describe_plural(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of names to {_describe_plural(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping with the fields " + ", ".join(f.name for f in dataclasses.fields(tp))
    return getattr(tp, "__name__", str(tp))


def _describe_plural(tp: Any) -> str:
    words = _describe(tp)
    for article in ("an ", "a "):
        if words.startswith(article):
            return words[len(article):] + "s"
    return words


def _found(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _check_limits(value: Any, meta: dict, where: str) -> None:
    ge, gt, le, pattern = meta.get("ge"), meta.get("gt"), meta.get("le"), meta.get("pattern")
    if ge is not None and value < ge:
        raise SchemaProblem(where, f"must be >= {ge}, found {value!r}")
    if gt is not None and value <= gt:
        raise SchemaProblem(where, f"must be > {gt}, found {value!r}")
    if le is not None and value > le:
        raise SchemaProblem(where, f"must be <= {le}, found {value!r}")
    if pattern is not None:
        import re

        if not re.fullmatch(pattern, value):
            raise SchemaProblem(where, f"must match the pattern {pattern}, found {value!r}")


def _convert(value: Any, tp: Any, where: str, meta: dict, base: Path) -> Any:
    origin = get_origin(tp)
    if origin is Union:
        args = get_args(tp)
        if value is None and _NONE in args:
            return None
        errors = []
        for arg in args:
            if arg is _NONE:
                continue
            try:
                return _convert(value, arg, where, meta, base)
            except SchemaProblem as exc:
                errors.append(exc)
        # A limit violation on the matching type says more than "wrong type".
        for exc in errors:
            if not exc.message.startswith("expected "):
                raise exc
        raise SchemaProblem(where, f"expected {_describe(tp)}, found {_found(value)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise SchemaProblem(where, f"expected {_describe(tp)}, found {_found(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise SchemaProblem(where, f"expected {_describe(tp)}, found {_found(value)}")
        (item_tp,) = get_args(tp)
        return [_convert(v, item_tp, f"{where}[{i}]", meta, base) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SchemaProblem(where, f"expected {_describe(tp)}, found {_found(value)}")
        _, item_tp = get_args(tp)
        return {str(k): _convert(v, item_tp, f"{where}.{k}", meta, base) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, value, where, base)
    if tp is bool:
        if not isinstance(value, bool):
            raise SchemaProblem(where, f"expected true or false, found {_found(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaProblem(where, f"expected an integer, found {_found(value)}")
        _check_limits(value, meta, where)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaProblem(where, f"expected a number, found {_found(value)}")
        _check_limits(float(value), meta, where)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SchemaProblem(where, f"expected a string, found {_found(value)}")
        _check_limits(value, meta, where)
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise SchemaProblem(where, f"expected {_describe(tp)}, found {_found(value)}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base / path)
    raise TypeError(f"unsupported schema type {tp!r} at {where}")


def _parse_dataclass(cls: Any, data: Any, where: str, base: Path) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SchemaProblem(where or "(top level)", f"expected {_describe(cls)}, found {_found(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in known:
            path = f"{where}.{key}" if where else str(key)
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise SchemaProblem(path, f"unknown field; allowed here: {', '.join(known)}.{hint}")
    values = {}
    for name, f in known.items():
        path = f"{where}.{name}" if where else name
        if name in data:
            values[name] = _convert(data[name], hints[name], path, dict(f.metadata), base)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                values[name] = _parse_dataclass(hints[name], {}, path, base)
            else:
                raise SchemaProblem(path, f"required field is missing; expected {_describe(hints[name])}")
    try:
        return cls(**values)
    except SchemaProblem as exc:  # cross-field checks in __post_init__
        if not exc.where:
            exc.where = where or "(top level)"
        raise


def parse(cls: Any, data: Any, *, source: Path, base: Path) -> Any:
    """Build ``cls`` from a parsed YAML document, raising ``RecipeError`` naming ``source``."""
    try:
        return _parse_dataclass(cls, data, "", base)
    except SchemaProblem as exc:
        raise RecipeError(f"{source}: {exc.where}: {exc.message}") from None


def describe_fields(cls: Any, prefix: str = "") -> list[tuple[str, str, str]]:
    """(path, type, help) for every field, for documentation and ``df-hf recipe fields``."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        optional = [a for a in get_args(tp) if a is not _NONE] if get_origin(tp) is Union else []
        if len(optional) == 1 and dataclasses.is_dataclass(optional[0]):  # an optional section
            rows.append((path, "section or null", f.metadata.get("help", "")))
            rows.extend(describe_fields(optional[0], path + "."))
        elif dataclasses.is_dataclass(tp):
            rows.append((path, "section", f.metadata.get("help", "")))
            rows.extend(describe_fields(tp, path + "."))
        else:
            rows.append((path, _describe(tp), f.metadata.get("help", "")))
    return rows
