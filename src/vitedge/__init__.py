"""vitedge: fast, cheap vision encoders for VLMs on edge hardware.

A session::

    import timm, vitedge

    model = vitedge.load("cifar-vit")                     # a model id, or:
    model = vitedge.wrap(timm.create_model("deit_tiny_patch16_224").eval())  # a module you hold
    vitedge.profile(model)["macs"]
    vitedge.optimize_(model, "merge:r=5", vitedge.Int8Config())  # -O strings or configs, in order
    print(vitedge.explain(model)["blocks"][0])            # the execution plan, block by block
    vitedge.evaluate(model, "cifar10", baseline="cifar-vit")
    vitedge.save(model, "out/cifar-vit-fast"); vitedge.load("out/cifar-vit-fast")

Everything here is exported lazily (module ``__getattr__``): ``import vitedge`` or ``import vitedge.models``
loads no technique code until a name is used. The public surface, kept stable across refactors:
``load``, ``wrap``, ``optimize_``, ``save``, ``explain``, ``profile``, ``evaluate``, ``bench``, ``encode``,
the config classes (their field names too), :class:`Encoder` (``preprocess``, ``blocks``, ``plan``,
``forward_traced``), ``vitedge.data.open_dataset`` / ``as_tensor_batches`` and
``vitedge.options.parse_options``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    "Encoder": ("vitedge.models.base", "Encoder"),
    "Trace": ("vitedge.models.base", "Trace"),
    "load": ("vitedge.models", "load"),
    "wrap": ("vitedge.models.wrap", "wrap"),
    "optimize_": ("vitedge.api", "optimize_"),
    "describe": ("vitedge.api", "describe"),
    "technique_names": ("vitedge.api", "technique_names"),
    "Composition": ("vitedge.api", "Composition"),
    "save": ("vitedge.models.saved", "save"),
    "explain": ("vitedge.plan.explain", "explain"),
    "ExecutionPlan": ("vitedge.plan", "ExecutionPlan"),
    "profile": ("vitedge.toolkit", "profile"),
    "evaluate": ("vitedge.toolkit", "evaluate"),
    "bench": ("vitedge.toolkit", "bench"),
    "encode": ("vitedge.cache.encode", "encode"),
    # technique configs, one per -O name
    "Bf16Config": ("vitedge.compress.bf16", "Bf16Config"),
    "Int8Config": ("vitedge.compress.quant", "Int8Config"),
    "Int8WeightOnlyConfig": ("vitedge.compress.quant", "Int8WeightOnlyConfig"),
    "Int4Config": ("vitedge.compress.quant", "Int4Config"),
    "MixedConfig": ("vitedge.compress.mixed", "MixedConfig"),
    "StructuredConfig": ("vitedge.compress.structured", "StructuredConfig"),
    "SparseConfig": ("vitedge.compress.sparse", "SparseConfig"),
    "MergeConfig": ("vitedge.tokens.merge", "MergeConfig"),
    "PruneConfig": ("vitedge.tokens.prune", "PruneConfig"),
    "AdaptiveConfig": ("vitedge.tokens.adaptive", "AdaptiveConfig"),
    "WindowMergeConfig": ("vitedge.tokens.window_merge", "WindowMergeConfig"),
    "WindowPruneConfig": ("vitedge.tokens.windows", "WindowPruneConfig"),
    "Int8AttnConfig": ("vitedge.attention.int8", "Int8AttnConfig"),
    "LinearAttnConfig": ("vitedge.attention.linear", "LinearAttnConfig"),
    "LinformerConfig": ("vitedge.attention.linformer", "LinformerConfig"),
    "WindowAttnConfig": ("vitedge.attention.window", "WindowAttnConfig"),
    "WinKernelConfig": ("vitedge.attention.winkernel", "WinKernelConfig"),
    "ExitConfig": ("vitedge.dynamic.exit", "ExitConfig"),
    "CompileConfig": ("vitedge.runtime.compile", "CompileConfig"),
}

__all__ = [
    "AdaptiveConfig",
    "Bf16Config",
    "CompileConfig",
    "Composition",
    "Encoder",
    "ExecutionPlan",
    "ExitConfig",
    "Int4Config",
    "Int8AttnConfig",
    "Int8Config",
    "Int8WeightOnlyConfig",
    "LinearAttnConfig",
    "LinformerConfig",
    "MergeConfig",
    "MixedConfig",
    "PruneConfig",
    "SparseConfig",
    "StructuredConfig",
    "Trace",
    "WinKernelConfig",
    "WindowAttnConfig",
    "WindowMergeConfig",
    "WindowPruneConfig",
    "__version__",
    "bench",
    "describe",
    "encode",
    "evaluate",
    "explain",
    "load",
    "optimize_",
    "profile",
    "save",
    "technique_names",
    "wrap",
]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'vitedge' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load on first use
    from vitedge.api import Composition, describe, optimize_, technique_names
    from vitedge.attention.int8 import Int8AttnConfig
    from vitedge.attention.linear import LinearAttnConfig
    from vitedge.attention.linformer import LinformerConfig
    from vitedge.attention.window import WindowAttnConfig
    from vitedge.attention.winkernel import WinKernelConfig
    from vitedge.cache.encode import encode
    from vitedge.compress.bf16 import Bf16Config
    from vitedge.compress.mixed import MixedConfig
    from vitedge.compress.quant import Int4Config, Int8Config, Int8WeightOnlyConfig
    from vitedge.compress.sparse import SparseConfig
    from vitedge.compress.structured import StructuredConfig
    from vitedge.dynamic.exit import ExitConfig
    from vitedge.models import load
    from vitedge.models.base import Encoder, Trace
    from vitedge.models.saved import save
    from vitedge.models.wrap import wrap
    from vitedge.plan import ExecutionPlan
    from vitedge.plan.explain import explain
    from vitedge.runtime.compile import CompileConfig
    from vitedge.tokens.adaptive import AdaptiveConfig
    from vitedge.tokens.merge import MergeConfig
    from vitedge.tokens.prune import PruneConfig
    from vitedge.tokens.window_merge import WindowMergeConfig
    from vitedge.tokens.windows import WindowPruneConfig
    from vitedge.toolkit import bench, evaluate, profile
