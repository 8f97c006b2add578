"""``torch.compile`` of the whole encoder forward (``-O compile``).

Once merging or pruning has shrunk the token count and bf16 or INT8 has sped up the linear layers, the
linear layers stop being most of the time. Profiled on cifar-vit with ``merge:r=6`` and ``bf16`` (batch 64,
2 threads), the bf16 ``addmm`` calls run near the CPU's bf16 roof but take only 41 % of the forward; copies
(q/k/v reshapes, dtype casts around the fp32 softmax, merge gathers), the softmax itself, LayerNorm, GELU and
residual adds take the rest. Inductor fuses those element-wise and reduction ops into generated C++ loops,
which eager PyTorch cannot do; ``benchmarks/bench_cifar_recipes.py`` measures what that is worth.

The compiled function is the encoder's logits path (token runners and autocast included);
input checks and the dtype casts at the edges stay eager, so bad input still gets vitedge's clear errors.
Compilation is lazy: the first call of each new input shape compiles (about a minute on 2 CPU cores for
cifar-vit), later calls reuse it. With ``dynamic=0`` (the default) torch compiles the first shape
statically and recompiles once with a symbolic batch when a second batch size arrives; ``dynamic=1`` starts
symbolic. ``compile`` is the execution plan's *compiled* step and must be the last option of a stack
(:func:`vitedge.optimize_` refuses anything after it), so no technique changes or runs the model under a
compiled graph while it is being applied, and it refuses to follow ``adaptive`` and ``int8attn``
(:data:`NOT_COMPILABLE`). The feature cache and video
reuse call the encoder's feature path directly and run eagerly; the cache namespace leaves ``compile`` out.

Outputs match the eager model within floating-point tolerance, not bit for bit: fused kernels round in a
different order (in bf16 that moves logits by a few hundredths). Inductor on CPU needs a C++ compiler.
"""

from __future__ import annotations

import os
import shutil
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vitedge.api import Composition, register
from vitedge.models.base import Encoder
from vitedge.plan import PlanBuilder

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True, kw_only=True)
class CompileConfig:
    """Compile the encoder forward with ``torch.compile``: ``mode`` (one of :data:`MODES`), ``dynamic``
    to trace a symbolic batch size from the first call."""

    mode: str = "default"
    dynamic: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"compile:mode must be one of {', '.join(MODES)}, got {self.mode!r}")


def cxx_compiler() -> str | None:
    """The C++ compiler Inductor calls on CPU ($CXX, else the one in its config: g++ on Linux), or None."""
    from torch._inductor import config as inductor_config

    names = [os.environ["CXX"]] if os.environ.get("CXX") else [c for c in inductor_config.cpp.cxx if c]
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


# Options that compile refuses to follow: data-dependent control flow that would recompile per batch.
NOT_COMPILABLE = {
    "adaptive": "adaptive splits each batch by per-image keep rates, which recompiles for every split",
    "int8attn": "int8attn loops in Python over batch x heads, which compiling unrolls for every batch size",
}


def private_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` over its own copy of its code object.

    Dynamo keeps compiled graphs per code object and recompiles at most ``torch._dynamo.config
    .recompile_limit`` (8) times for one before falling back to eager. Every encoder shares the code of
    :meth:`Encoder.logits`, so a sweep of compiled variants (each a new structure, each recompiled once for a
    second batch size) would run out of that budget; a private code object gives each its own.
    """
    assert isinstance(fn, types.FunctionType)
    code = fn.__code__.replace()  # an equal but distinct code object
    twin = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    twin.__kwdefaults__ = fn.__kwdefaults__
    twin.__qualname__ = fn.__qualname__
    return twin


def compile_steps(model: Encoder, config: CompileConfig, plan: PlanBuilder) -> None:
    plan.set_model(
        "compiled",
        torch.compile(
            private_copy(type(model).logits), mode=config.mode, dynamic=True if config.dynamic else None
        ),
    )


@register(
    "compile",
    steps=compile_steps,
    compose=Composition(fills=frozenset({"compiled"}), last=True, not_after=NOT_COMPILABLE),
)
def _apply_compile(model: Encoder, config: CompileConfig) -> None:
    uses_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if uses_cpu and cxx_compiler() is None:
        raise ValueError(
            "compile on CPU needs a C++ compiler for torch's Inductor backend (install g++, or set CXX); "
            "drop -O compile to run eagerly"
        )
