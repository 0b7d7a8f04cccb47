"""Validation of data read from files (checkpoint configs, export manifests): declarative tables
of field -> Field(type, range, choices), checked before anything is built from the data. Errors
name the field ("encoder.num_heads: ...") and are UserErrors (one line, exit code 2)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import UserError


@dataclass(frozen=True)
class Field:
    type: type | tuple  # int, float, str, bool, dict, list; (list, int) is a list of ints
    required: bool = True
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    length: int | None = None  # for lists: exact length

    def check(self, name: str, value: Any) -> None:
        kind, item = (self.type if isinstance(self.type, tuple) else (self.type, None))
        if not _is(value, kind):
            raise SchemaError(f"{name}: expected {_type_name(kind, item)}, got {_show(value)}")
        values = value if kind is list else [value]
        if kind is list:
            if self.length is not None and len(value) != self.length:
                raise SchemaError(f"{name}: expected {self.length} values, got {len(value)}")
            for v in value:
                if item is not None and not _is(v, item):
                    raise SchemaError(f"{name}: expected {_type_name(kind, item)}, got {_show(value)}")
        for v in values:
            if self.choices is not None and v not in self.choices:
                raise SchemaError(f"{name}: {v!r} is not one of {', '.join(map(repr, self.choices))}")
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if not math.isfinite(v):
                    raise SchemaError(f"{name}: {v} is not finite")
                if self.min is not None and v < self.min:
                    raise SchemaError(f"{name}: {v} is below the minimum {self.min:g}")
                if self.max is not None and v > self.max:
                    raise SchemaError(f"{name}: {v} is above the maximum {self.max:g}")


class SchemaError(UserError):
    pass


def _is(value, kind) -> bool:
    if kind is float:  # JSON writes 1.0 as 1 in some writers
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is list:
        return isinstance(value, (list, tuple))
    return isinstance(value, kind)


NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object", list: "a list"}


def _type_name(kind, item=None) -> str:
    return f"a list of {NAMES[item].split(' ', 1)[1]}s" if kind is list and item else NAMES.get(kind, kind.__name__)


def _show(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def check(data: Any, table: dict[str, Field], where: str = "", unknown: bool = False) -> None:
    """Check `data` (a dict) against `table`; keys in the table may be dotted (a.b) for nested
    objects, which must then be listed themselves. unknown=False refuses keys not in the table."""
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        raise SchemaError(f"{where or 'data'}: expected an object, got {_show(data)}")
    for name, field in table.items():
        *parents, leaf = name.split(".")
        node = data
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if leaf not in node:
            if field.required and (not parents or parents[0] in data):
                raise SchemaError(f"{prefix}{name}: missing")
            continue
        field.check(prefix + name, node[leaf])
    if not unknown:
        known = set(table)
        for key, value in data.items():
            if key not in known:
                raise SchemaError(f"{prefix}{key}: unknown field")
            if table[key].type is dict and isinstance(value, dict):
                for sub in value:
                    if f"{key}.{sub}" not in known:
                        raise SchemaError(f"{prefix}{key}.{sub}: unknown field")
