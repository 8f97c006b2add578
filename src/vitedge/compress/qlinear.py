"""Quantised drop-in replacements for ``nn.Linear`` and the pure quantisation math they use.

Backends were chosen by measurement (``benchmarks/bench_compress_backends.py`` prints the table): on the
AVX-512 VNNI CPUs we target, fbgemm's dynamic INT8 linear (``torch.ops.quantized.linear_dynamic``, the kernel
behind ``torch.ao.quantization.quantize_dynamic``) runs ViT-B linear shapes at 2-3x fp32 and within reach of
bare ``torch._int_mm``; ``torch._int_mm`` with activation quantisation written in torch ops (eager or
``torch.compile``) and torchao's ``Int8DynamicActivationInt8WeightConfig`` were slower. For weight-only INT8
and INT4, dequantising to the activation dtype and calling ``F.linear`` was as fast as the packed CPU kernels
(``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) at batch 16, so the modules do that: they save
weight memory, not time.

The modules subclass ``nn.Linear`` so shape-reading code (``Encoder.arch()``) keeps seeing ``in_features`` and
``out_features``; their state is plain tensors (safetensors-friendly), and fbgemm's packed weight is a cache
rebuilt from them.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


# --- pure math -------------------------------------------------------------------------------------
def quantize_per_channel_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel INT8. w: (N, K) -> (q int8 (N, K), scale fp32 (N,))."""
    scale = (w.detach().float().abs().amax(dim=1) / 127).clamp_min(1e-12)
    q = torch.round(w.detach().float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_groups(
    w: torch.Tensor, bits: int, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-group quantisation along K. w: (N, K), K % group == 0.

    Returns ``q`` uint8 (N, K) in [0, 2**bits - 1], ``scale`` and ``low`` fp32 (N, K // group), so that
    ``w ~= q * scale + low`` group by group.
    """
    n, k = w.shape
    levels = 2**bits - 1
    wg = w.detach().float().reshape(n, k // group, group)
    low, high = wg.amin(-1), wg.amax(-1)
    scale = ((high - low) / levels).clamp_min(1e-12)
    q = torch.round((wg - low[..., None]) / scale[..., None]).clamp_(0, levels).to(torch.uint8)
    return q.reshape(n, k), scale, low


def dequantize_groups(
    q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`quantize_groups`. q: (N, K) -> (N, K) in ``dtype``."""
    n, k = q.shape
    g = k // scale.shape[1]
    w = q.reshape(n, -1, g).to(dtype) * scale[..., None].to(dtype) + low[..., None].to(dtype)
    return w.reshape(n, k)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values per byte. q: uint8 (N, K) in [0, 15], K even -> uint8 (N, K // 2)."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`. packed: uint8 (N, K // 2) -> uint8 (N, K)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def outlier_columns(w: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` input channels (columns of w: (N, K)) with the largest max |w|, sorted."""
    if count <= 0:
        return torch.zeros(0, dtype=torch.long)
    return w.detach().abs().amax(dim=0).topk(min(count, w.shape[1])).indices.sort().values


# --- modules ---------------------------------------------------------------------------------------
class _QuantLinearBase(nn.Linear):
    """An ``nn.Linear`` whose float weight is replaced by quantised tensors (no float weight parameter)."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)


class Int8DynamicLinear(_QuantLinearBase):
    """INT8 per-channel weights, activations quantised per call (fbgemm ``linear_dynamic``), fp32 output
    cast back to the input dtype."""

    weight_scale: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        q, scale = quantize_per_channel_int8(linear.weight)
        # An integer Parameter keeps the parameter count honest without being a float "compute dtype".
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self._packed: Any = None

    def _pack(self) -> Any:
        if self._packed is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # quantize_per_channel's deprecation notice
                zeros = torch.zeros_like(self.weight_scale, dtype=torch.long)
                wq = torch._make_per_channel_quantized_tensor(
                    self.weight, self.weight_scale.double(), zeros, 0
                )
                bias = None if self.bias is None else self.bias.float()
                self._packed = torch.ops.quantized.linear_prepack(wq, bias)
        return self._packed

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._packed = None  # .to()/.float() may replace the tensors the cache was built from
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., K) -> (..., N)
        y = torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._pack(), reduce_range=True)
        return y.to(x.dtype)


class WeightOnlyLinear(_QuantLinearBase):
    """Weight-only INT8 or INT4 with per-channel (``group == in_features``) or per-group scales.

    ``outliers`` input channels with the largest weights stay in fp32 beside the quantised matrix (their
    columns are zeroed before quantising, so they do not stretch the group scales).
    """

    def __init__(self, linear: nn.Linear, *, bits: int, group: int, outliers: int = 0) -> None:
        super().__init__(linear)
        k = linear.in_features
        if bits not in (4, 8) or group < 1 or k % group:
            raise ValueError(f"bits must be 4 or 8 and group divide {k}; got bits={bits}, group={group}")
        self.bits, self.group = bits, group
        w = linear.weight.detach().float().clone()
        idx = outlier_columns(w, outliers)
        self.register_buffer("outlier_index", idx)
        self.register_buffer("outlier_weight", w[:, idx].clone())
        w[:, idx] = 0.0
        q, scale, low = quantize_groups(w, bits, group)
        self.register_buffer("qweight", pack_int4(q) if bits == 4 else q)
        self.register_buffer("scale", scale)
        self.register_buffer("low", low)

    qweight: torch.Tensor
    scale: torch.Tensor
    low: torch.Tensor
    outlier_index: torch.Tensor
    outlier_weight: torch.Tensor

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # (N, K)
        q = unpack_int4(self.qweight) if self.bits == 4 else self.qweight
        w = dequantize_groups(q, self.scale, self.low, dtype)
        if self.outlier_index.numel():
            w[:, self.outlier_index] = self.outlier_weight.to(dtype)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., K) -> (..., N)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group={self.group}, outliers={self.outlier_index.numel()}"
        )


def is_plain_linear(m: nn.Module) -> bool:
    """A float ``nn.Linear`` not already replaced by a quantised or sparse variant."""
    return isinstance(m, nn.Linear) and not isinstance(m, _QuantLinearBase) and m.weight.is_floating_point()
