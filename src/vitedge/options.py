"""Parsing of ``-O NAME[:key=value[,key=value...]]`` (grammar in ``../shared/CONTRACT.md``).

Values are numbers, words or fractions, without units. Ranges (``r=0..16`` or ``r=0,4,8,16``) are allowed only
where ``allow_range`` is set (``sweep``), and then in one option only.
"""

from __future__ import annotations

import dataclasses
import re
import types
from typing import Any, Union, get_args, get_origin, get_type_hints

from vitedge.api import Config, config_class

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_KEY = re.compile(r"^[a-z][a-z0-9_]*$")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def _split_pairs(body: str, text: str) -> list[tuple[str, str]]:
    """Split ``k=v,k=v`` where a list value ``k=0,4,8`` keeps its bare items."""
    pairs: list[tuple[str, str]] = []
    for item in body.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"malformed -O {text!r}: empty item between commas")
        if "=" in item:
            key, _, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not _KEY.match(key) or not value:
                raise ValueError(f"malformed -O {text!r}: {item!r} is not key=value")
            pairs.append((key, value))
        elif pairs:
            k, v = pairs[-1]
            pairs[-1] = (k, f"{v},{item}")
        else:
            raise ValueError(f"malformed -O {text!r}: {item!r} is not key=value")
    return pairs


def _convert(value: str, typ: Any, where: str) -> Any:
    origin = get_origin(typ)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(typ):
            if arg is type(None):
                if value.lower() == "none":
                    return None
                continue
            try:
                return _convert(value, arg, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{where}: cannot read {value!r}")
    if typ is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where} takes true/false, got {value!r}")
    if typ is int:
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{where} takes an integer, got {value!r}") from None
    if typ is float:
        try:
            if "/" in value:
                num, den = value.split("/", 1)
                return float(num) / float(den)
            return float(value)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{where} takes a number, got {value!r}") from None
    if typ is str:
        return value
    raise ValueError(f"{where}: unsupported field type {typ!r}")


def _values(raw: str, allow_range: bool, where: str) -> list[str]:
    m = _RANGE.match(raw)
    if m or "," in raw:
        if not allow_range:
            raise ValueError(f"{where}: ranges such as {raw!r} are allowed only in 'vitedge sweep'")
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f"{where}: empty range {raw!r}")
            return [str(v) for v in range(lo, hi + 1)]
        return [v.strip() for v in raw.split(",")]
    return [raw]


def parse_option(text: str, *, allow_range: bool = False) -> list[Config]:
    """Parse one ``-O`` string into configs (one, or several for a range)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty -O option; write NAME or NAME:key=value")
    name, sep, body = text.strip().partition(":")
    if not _NAME.match(name):
        raise ValueError(f"malformed -O {text!r}: {name!r} is not an optimisation name")
    cls = config_class(name)
    hints = get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    pairs = _split_pairs(body, text) if sep else []
    kwargs: dict[str, list[Any]] = {}
    for key, raw in pairs:
        if key not in fields:
            allowed = ", ".join(sorted(fields)) or "no parameters"
            raise ValueError(f"-O {name} has no parameter {key!r} (takes {allowed})")
        if key in kwargs:
            raise ValueError(f"-O {text!r} sets {key!r} twice")
        where = f"-O {name}:{key}"
        kwargs[key] = [_convert(v, hints[key], where) for v in _values(raw, allow_range, where)]
    ranged = [k for k, v in kwargs.items() if len(v) > 1]
    if len(ranged) > 1:
        raise ValueError(f"-O {text!r}: only one parameter may carry a range, got {ranged}")
    range_key = ranged[0] if ranged else None
    base = {k: v[0] for k, v in kwargs.items()}
    variants = kwargs[range_key] if range_key else [None]
    configs = []
    for v in variants:
        args = dict(base, **({range_key: v} if range_key else {}))
        try:
            configs.append(cls(**args))
        except TypeError as e:
            raise ValueError(f"-O {text!r}: {e}") from None
    return configs


def parse_options(texts: list[str] | tuple[str, ...]) -> list[Config]:
    """Parse the ``-O`` options of ``bench``/``eval``/``optimize``: one stacked variant, no ranges."""
    out: list[Config] = []
    for t in texts:
        out += parse_option(t, allow_range=False)
    return out


def parse_sweep(texts: list[str] | tuple[str, ...]) -> list[list[Config]]:
    """Parse ``sweep`` options: at most one option carries a range; returns one config stack per point."""
    parsed = [parse_option(t, allow_range=True) for t in texts]
    ranged = [i for i, p in enumerate(parsed) if len(p) > 1]
    if len(ranged) > 1:
        raise ValueError("sweep: only one -O option may carry a range")
    if not ranged:
        return [[p[0] for p in parsed]]
    i = ranged[0]
    return [[*(p[0] for p in parsed[:i]), c, *(p[0] for p in parsed[i + 1 :])] for c in parsed[i]]
