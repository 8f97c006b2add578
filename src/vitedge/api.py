"""``vitedge.optimize_(model, *configs)`` and the registry of techniques.

Each technique is a frozen, keyword-only dataclass config plus a handler registered for that config type,
as in torchao's ``quantize_``. The ``-O`` name of a technique maps to its config class, so the CLI, saved
optimised directories and the cache namespace all speak the same language.

A registration says, in one place, everything :func:`optimize_` needs to know about a technique:

- ``handler(model, config)``: checks that the technique applies to this model (``ValueError`` naming why not)
  and changes the weights where the technique is a weight change (quantisation, pruning, bf16 cast);
- ``steps(model, config, builder)``: the execution-plan steps it contributes (:mod:`vitedge.plan`), for
  techniques that change how the forward runs;
- ``compose``: a :class:`Composition`, the plan steps it fills (one technique per step) and the orders that
  cannot work;
- ``version``: the technique's algorithm version, bumped whenever its outputs change for the same config
  (it is part of the feature cache's namespace, and ``tests/test_references.py`` holds recorded outputs to
  it). :func:`optimize_` checks the whole stack against these before applying anything, never
  reorders it, and refuses an order that cannot work with a message naming both techniques and the order
  that works.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vitedge.models.base import Encoder

if TYPE_CHECKING:
    from vitedge.plan import ExecutionPlan, PlanBuilder

Config = Any
Handler = Callable[[Encoder, Any], None]
Steps = Callable[[Encoder, Any, "PlanBuilder"], None]


@dataclass(frozen=True, kw_only=True)
class Composition:
    """How a technique stacks with others, declared where it is registered.

    Attributes:
        fills: the execution-plan steps it fills (``reducer``, ``attention``, ``window``, ``router``,
            ``autocast``, ``compiled``, ``gate``, ``exit``); a step takes one technique, so two techniques
            that fill the same step never stack, in either order.
        after: ``-O`` names of techniques that must come *after* this one -> why (``structured`` before
            ``int8``: it prunes float layers). Given after one of them, this technique is refused.
        last: it must be the last option of a stack (``compile``).
        not_after: ``-O`` names it can never follow, whatever the order of the rest -> why.
        excludes: ``-O`` names it never stacks with, in either order -> why.
    """

    fills: frozenset[str] = frozenset()
    after: Mapping[str, str] = field(default_factory=dict)
    last: bool = False
    not_after: Mapping[str, str] = field(default_factory=dict)
    excludes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from vitedge.plan import STEP_SLOTS

        unknown = sorted(set(self.fills) - set(STEP_SLOTS))
        if unknown:
            raise ValueError(
                f"Composition fills unknown plan steps {unknown}; steps: {', '.join(STEP_SLOTS)}"
            )


@dataclass(frozen=True)
class Technique:
    name: str
    config_type: type
    handler: Handler
    steps: Steps | None
    compose: Composition
    version: int


_BY_TYPE: dict[type, Technique] = {}
_BY_NAME: dict[str, type] = {}

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
    "vitedge.tokens.windows",
    "vitedge.tokens.window_merge",
    "vitedge.attention.int8",
    "vitedge.attention.linear",
    "vitedge.attention.linformer",
    "vitedge.attention.window",
    "vitedge.attention.winkernel",
    "vitedge.dynamic.exit",
    "vitedge.runtime.compile",
)
_loaded = False
# Options that change how the forward runs, not what it computes: the cache key and export ignore them.
RUNTIME_ONLY = frozenset({"compile"})


def register(
    name: str,
    config_type: type | None = None,
    *,
    steps: Steps | None = None,
    compose: Composition | None = None,
    version: int = 1,
) -> Callable[[Handler], Handler]:
    """Register ``handler(model, config)`` under ``-O`` ``name`` for ``config_type`` (default: the type
    annotated on the handler's ``config`` parameter, looked up in the handler's module), with the plan
    ``steps`` it contributes and how it composes with other techniques.

    Usage::

        @register("merge", steps=merge_steps, compose=Composition(fills=frozenset({"reducer"})))
        def _apply(model: Encoder, config: MergeConfig) -> None: ...
    """

    def deco(handler: Handler) -> Handler:
        cfg_type = config_type or handler.__annotations__.get("config")
        if isinstance(cfg_type, str):
            cfg_type = getattr(importlib.import_module(handler.__module__), cfg_type, None)
        if not (isinstance(cfg_type, type) and dataclasses.is_dataclass(cfg_type)):
            raise TypeError(f"handler {handler.__name__} must annotate 'config' with a dataclass type")
        if not cfg_type.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(f"{cfg_type.__name__} must be a frozen dataclass")
        _BY_TYPE[cfg_type] = Technique(name, cfg_type, handler, steps, compose or Composition(), version)
        _BY_NAME[name] = cfg_type
        return handler

    return deco


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        for mod in _TECHNIQUE_MODULES:
            importlib.import_module(mod)
        _loaded = True


def technique_names() -> list[str]:
    """Every registered ``-O`` name, sorted."""
    _ensure_loaded()
    return sorted(_BY_NAME)


def config_class(name: str) -> type:
    """The config class registered under ``-O`` ``name``."""
    _ensure_loaded()
    if name not in _BY_NAME:
        raise ValueError(f"unknown optimisation {name!r}; available: {', '.join(technique_names())}")
    return _BY_NAME[name]


def technique(config: Config) -> Technique:
    """The registration of ``config``'s technique.

    Raises:
        TypeError: ``config`` is not an instance of a registered config class.
    """
    _ensure_loaded()
    try:
        return _BY_TYPE[type(config)]
    except (KeyError, TypeError):
        raise TypeError(
            f"{type(config).__name__} is not a registered vitedge technique config "
            f"(use one of vitedge's config classes or an -O string such as 'merge:r=8')"
        ) from None


def config_name(config: Config) -> str:
    return technique(config).name


def algorithm_version(config: Config) -> int:
    """The algorithm version of ``config``'s technique (bumped when its outputs change)."""
    return technique(config).version


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


def check_stack(configs: Sequence[Config], *, applied: Sequence[Config] = ()) -> None:
    """Refuse a stack (``applied`` then ``configs``) whose order cannot work, before anything is applied.

    Raises:
        ValueError: two techniques fill the same plan step, or one comes in an order it cannot take; the
            message names both and, where one exists, the order that works.
    """
    stack = [*applied, *configs]
    for j, config in enumerate(stack):
        if j < len(applied):
            continue
        this = technique(config)
        for earlier_config in stack[:j]:
            earlier = technique(earlier_config)
            a, b = describe(earlier_config), describe(config)
            if this.name == earlier.name and (this.compose.fills or this.compose.last):
                raise ValueError(f"-O {b} is given twice (after -O {a}); give {this.name} once")
            if earlier.compose.last:
                where = (
                    "it is already applied to this model; apply -O {b} to one without it (reload the base)"
                    if any(earlier_config is c for c in applied)
                    else "put -O {b} before -O {a}"
                )
                raise ValueError(
                    f"-O {b} comes after -O {a}; {earlier.name} must be the last option of a stack "
                    f"({where.format(a=a, b=b)})"
                )
            reason = this.compose.after.get(earlier.name)
            if reason:
                raise ValueError(f"-O {b} cannot follow -O {a}: {reason}; put -O {b} before -O {a}")
            reason = (
                this.compose.not_after.get(earlier.name)
                or this.compose.excludes.get(earlier.name)
                or earlier.compose.excludes.get(this.name)
            )
            if reason:
                raise ValueError(f"-O {b} cannot follow -O {a}: {reason}; drop one of them")
            shared = sorted(this.compose.fills & earlier.compose.fills)
            if shared:
                raise ValueError(
                    f"-O {a} and -O {b} cannot stack: both fill the execution plan's {' and '.join(shared)} "
                    "step; use one of them"
                )


def build_plan(model: Encoder) -> ExecutionPlan | None:
    """The execution plan of ``model`` from its applied configs, in order (None: it runs natively)."""
    from vitedge.plan import PlanBuilder

    builder = PlanBuilder(len(model.blocks) if _has_blocks(model) else 0)
    for config in model.applied:
        tech = technique(config)
        if tech.steps is not None:
            builder.current = describe(config)
            tech.steps(model, config, builder)
    return builder.build()


def _has_blocks(model: Encoder) -> bool:
    try:
        model.blocks  # noqa: B018
    except NotImplementedError:
        return False
    return True


def optimize_(model: Any, *configs: Config | str) -> Encoder:
    """Apply techniques to ``model`` in the order given and return the optimised Encoder.

    Args:
        model: a vitedge Encoder (``vitedge.load`` or ``vitedge.wrap``), or a timm / Hugging Face module
            that :func:`vitedge.wrap` accepts.
        configs: technique configs (``vitedge.MergeConfig(r=8)``) or ``-O`` strings (``"merge:r=8"``).

    Returns:
        The same object when ``model`` is an Encoder. For a plain module, a new Encoder that wraps it and
        shares its parameters: like torchao's ``quantize_``, the techniques change the user's module in
        place (quantisation replaces its linear layers, pruning shrinks them), so keep a copy if you need
        the original.

    Raises:
        TypeError: ``model`` is neither an Encoder nor a supported module, or a config is not a technique's.
        ValueError: the stack's order cannot work (the message says why and which order works; checked
            before anything is applied), or a technique cannot apply to this model (the options before it
            stay applied).
    """
    from vitedge.options import parse_options

    _ensure_loaded()
    if not isinstance(model, Encoder):
        from vitedge.models.wrap import wrap

        model = wrap(model)
    parsed: list[Config] = []
    for config in configs:
        parsed += parse_options([config]) if isinstance(config, str) else [config]
    for config in parsed:
        technique(config)  # TypeError for anything that is not a registered config
    check_stack(parsed, applied=model.applied)
    for config in parsed:
        technique(config).handler(model, config)
        model.applied.append(config)
        model.plan = build_plan(model)
    return model
