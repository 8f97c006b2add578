"""FLOPs counted by executing a model under :class:`torch.utils.flop_counter.FlopCounterMode`.

``FlopCounterMode`` has no formula for the CPU flash-attention kernel that ``scaled_dot_product_attention``
dispatches to (``aten._scaled_dot_product_flash_attention_for_cpu``), so attention QK^T and AV would count
as zero on CPU; this module registers one (and its backward) on import. The other CPU paths need nothing:
the math fallback (taken e.g. when the value head size differs from the query's) decomposes into ``bmm``,
which is counted, and the efficient/cuDNN kernels are CUDA-only and already registered. The INT8 x INT8 ->
INT32 ``aten._int_mm`` (``-O int8attn``'s QK^T and AV) has no formula either; it counts as ``mm`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

_aten = torch.ops.aten


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # query: (B, Hq, L, E), key: (B, Hkv, S, E), value: (B, Hkv, S, Ev) -> 2*B*Hq*L*S*(E + Ev)
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _int_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    # a: (M, K) int8, b: (K, N) int8 -> 2*M*K*N, as for mm
    m, k = a_shape
    return 2 * m * k * b_shape[1]


def register_cpu_attention_formulas() -> None:
    """Register FLOP formulas for the CPU flash-attention ops and ``_int_mm``; a no-op for any already
    registered."""
    for op, formula in (
        (_aten._scaled_dot_product_flash_attention_for_cpu, _sdpa_cpu_flop),
        (_aten._scaled_dot_product_flash_attention_for_cpu_backward, _sdpa_cpu_backward_flop),
        (_aten._int_mm, _int_mm_flop),
    ):
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)


register_cpu_attention_formulas()


@dataclass(frozen=True, kw_only=True)
class CountedFlops:
    """FLOPs of one executed forward pass (matmul-type work, as ``FlopCounterMode`` counts it).

    ``by_module`` maps the model's direct children (by attribute name) to their FLOPs; work done by the
    root module itself, outside any child, is under ``"<root>"``. ``by_op`` maps aten op names to FLOPs.
    """

    total: int
    by_module: dict[str, int] = field(default_factory=dict)
    by_op: dict[str, int] = field(default_factory=dict)
    batch: int = 1

    @property
    def macs(self) -> int:
        return self.total // 2

    def to_json(self) -> dict[str, Any]:
        return {
            "counted_flops": self.total,
            "by_module": self.by_module,
            "by_op": self.by_op,
            "batch": self.batch,
        }


def _by_child(model: nn.Module, flops: dict[str, int]) -> dict[str, int]:
    """FLOPs per direct child, from FlopCounterMode's per-module totals (keyed ``Root.child.sub...``).

    A child that is never called itself (a ModuleList, or a model whose ``forward_features`` its parent calls
    directly) has no entry of its own; its outermost called descendants are summed instead.
    """
    root = type(model).__name__
    out: dict[str, int] = {}
    for name, _ in model.named_children():
        prefix = f"{root}.{name}"
        under = [k for k in flops if k == prefix or k.startswith(prefix + ".")]
        outermost = [k for k in under if not any(k.startswith(a + ".") for a in under)]
        total = sum(flops[k] for k in outermost)
        if total:
            out[name] = int(total)
    return out


def count_flops(model: nn.Module, x: torch.Tensor) -> CountedFlops:
    """Run ``model(x)`` once in eval mode under ``no_grad`` and count its FLOPs.

    Every module's ``training`` flag is restored afterwards.

    Args:
        model: any module; for an Encoder ``x`` is a (B, C, H, W) image batch.
        x: the input tensor; totals are for its whole batch.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``x`` not a tensor.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    modes = {m: m.training for m in model.modules()}
    # FlopCounterMode's module tracker hooks autograd on every input that requires grad; a view of a
    # parameter made under no_grad (timm's attention-pool latent) requires grad yet has no grad_fn and
    # crashes it, so parameters are frozen for the count and restored afterwards.
    grads = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    try:
        for p in grads:
            p.requires_grad_(False)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
    finally:
        for m, training in modes.items():
            m.training = training
        for p, req in grads.items():
            p.requires_grad_(req)
    counts = counter.get_flop_counts()
    total = counter.get_total_flops()
    by_module = _by_child(model, {name: sum(ops.values()) for name, ops in counts.items()})
    rest = total - sum(by_module.values())
    if rest:
        by_module["<root>"] = int(rest)
    by_op = {str(op).removeprefix("aten."): int(n) for op, n in counts.get("Global", {}).items()}
    return CountedFlops(
        total=int(total), by_module=by_module, by_op=by_op, batch=int(x.shape[0]) if x.ndim else 1
    )
