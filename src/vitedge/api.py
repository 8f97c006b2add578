"""``vitedge.optimize_(model, *configs)`` and the registry of techniques.

Each technique is a frozen, keyword-only dataclass config plus a handler registered for that config type,
as in torchao's ``quantize_``. The ``-O`` name of a technique maps to its config class, so the CLI, saved
optimised directories and the cache namespace all speak the same language.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from vitedge.models.base import Encoder

Config = Any
Handler = Callable[[Encoder, Any], None]
C = TypeVar("C")

_HANDLERS: dict[type, Handler] = {}
_BY_NAME: dict[str, type] = {}
_NAME_OF: dict[type, str] = {}

# Modules that register techniques; importing one registers its config and handler.
_TECHNIQUE_MODULES = (
    "vitedge.compress.bf16",
    "vitedge.compress.quant",
    "vitedge.compress.structured",
    "vitedge.compress.mixed",
    "vitedge.compress.sparse",
    "vitedge.tokens.merge",
    "vitedge.tokens.prune",
    "vitedge.tokens.adaptive",
    "vitedge.attention.int8",
    "vitedge.runtime.compile",
)
_loaded = False
# Options that change how the forward runs, not what it computes: the cache key and export ignore them.
RUNTIME_ONLY = frozenset({"compile"})


def register(name: str, config_type: type | None = None) -> Callable[[Handler], Handler]:
    """Register ``handler(model, config)`` under ``-O`` ``name`` for ``config_type`` (default: the type
    annotated on the handler's ``config`` parameter, looked up in the handler's module).

    Usage::

        @register("bf16")
        def _apply(model: Encoder, config: Bf16Config) -> None: ...
    """

    def deco(handler: Handler) -> Handler:
        cfg_type = config_type or handler.__annotations__.get("config")
        if isinstance(cfg_type, str):
            cfg_type = getattr(importlib.import_module(handler.__module__), cfg_type, None)
        if not (isinstance(cfg_type, type) and dataclasses.is_dataclass(cfg_type)):
            raise TypeError(f"handler {handler.__name__} must annotate 'config' with a dataclass type")
        if not cfg_type.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(f"{cfg_type.__name__} must be a frozen dataclass")
        _HANDLERS[cfg_type] = handler
        _BY_NAME[name] = cfg_type
        _NAME_OF[cfg_type] = name
        return handler

    return deco


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        for mod in _TECHNIQUE_MODULES:
            importlib.import_module(mod)
        _loaded = True


def technique_names() -> list[str]:
    _ensure_loaded()
    return sorted(_BY_NAME)


def config_class(name: str) -> type:
    """The config class registered under ``-O`` ``name``."""
    _ensure_loaded()
    if name not in _BY_NAME:
        raise ValueError(f"unknown optimisation {name!r}; available: {', '.join(technique_names())}")
    return _BY_NAME[name]


def config_name(config: Config) -> str:
    _ensure_loaded()
    try:
        return _NAME_OF[type(config)]
    except KeyError:
        raise TypeError(f"{type(config).__name__} is not a registered vitedge technique config") from None


def config_to_dict(config: Config) -> dict[str, Any]:
    """JSON-ready form: ``{"name": ..., "params": {...}}`` with every field of the config."""
    return {"name": config_name(config), "params": dataclasses.asdict(config)}


def config_from_dict(data: dict[str, Any]) -> Config:
    cls = config_class(str(data["name"]))
    return cls(**data.get("params", {}))


def describe(config: Config) -> str:
    """The canonical ``-O`` string of a config: ``name`` or ``name:key=value,...`` for non-default fields."""
    name = config_name(config)
    parts = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        if value != default:
            parts.append(f"{f.name}={value}")
    return f"{name}:{','.join(parts)}" if parts else name


def optimize_(model: Encoder, *configs: Config) -> Encoder:
    """Apply technique configs to ``model`` in place, in the order given, and return it.

    Raises:
        TypeError: ``model`` is not an Encoder or a config is not a registered technique config.
        ValueError: a technique cannot apply to this model (the message says why).
    """
    _ensure_loaded()
    if not isinstance(model, Encoder):
        raise TypeError(
            f"optimize_ takes a vitedge Encoder (vitedge.models.load), got {type(model).__name__}"
        )
    for config in configs:
        handler = _HANDLERS.get(type(config))
        if handler is None:
            raise TypeError(f"{type(config).__name__} is not a registered vitedge technique config")
        if model.compiled_logits is not None:
            raise ValueError(
                f"-O {describe(config)} comes after -O compile; compile must be the last option of a stack "
                "(it compiles the model the options before it built)"
            )
        handler(model, config)
        model.applied.append(config)
    return model
