"""INT8 and INT4 quantisation of the encoder's Linear layers (``-O int8``, ``-O int8wo``, ``-O int4``).

- ``int8``: INT8 per-channel weights and INT8 activations quantised on the fly (fbgemm dynamic linear; see
  :mod:`vitedge.compress.qlinear` for the measurement that chose it). Runs faster than fp32.
- ``int8wo`` / ``int4``: weight-only, per-channel (int8wo) or per-group (int4, ``group`` input channels per
  scale); ``outliers`` input channels per layer with the largest weights stay in fp32. They cut weight memory
  4x / ~8x; on CPU they do not run faster than fp32 (they dequantise to the activation dtype per call).

Outlier handling at layer level: ``keep_ends`` (default on) keeps the patch embedding and the head, and any
Linear outside the transformer blocks, in full precision, as the seed's mixed-precision plan does (22.4.2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from vitedge.api import register
from vitedge.compress.qlinear import Int8DynamicLinear, WeightOnlyLinear, is_plain_linear
from vitedge.models.base import Encoder
from vitedge.models.surgery import all_linears, block_linears, replace_module


@dataclass(frozen=True, kw_only=True)
class Int8Config:
    """INT8 weights (per output channel) and dynamically quantised INT8 activations."""

    keep_ends: bool = True


@dataclass(frozen=True, kw_only=True)
class Int8WeightOnlyConfig:
    """INT8 weights (per output channel), activations stay in the model's precision."""

    keep_ends: bool = True
    outliers: int = 0

    def __post_init__(self) -> None:
        if self.outliers < 0:
            raise ValueError(f"int8wo outliers must be >= 0 input channels, got {self.outliers}")


@dataclass(frozen=True, kw_only=True)
class Int4Config:
    """INT4 weights with one scale and offset per ``group`` input channels (weight-only)."""

    group: int = 64
    keep_ends: bool = True
    outliers: int = 0

    def __post_init__(self) -> None:
        if self.group < 2 or self.group % 2:
            raise ValueError(f"int4 group must be an even number >= 2, got {self.group}")
        if self.outliers < 0:
            raise ValueError(f"int4 outliers must be >= 0 input channels, got {self.outliers}")


def quantizable_linears(model: Encoder, *, keep_ends: bool, what: str) -> list[tuple[str, nn.Linear]]:
    """The float Linears a quantiser should replace; ValueError when there are none."""
    try:
        sites = block_linears(model) if keep_ends else all_linears(model)
    except NotImplementedError:
        sites = all_linears(model)
    sites = [(n, m) for n, m in sites if is_plain_linear(m)]
    if not sites:
        raise ValueError(
            f"{what} quantises nn.Linear layers, and {model.model_id} has none left to quantise "
            "(convolutional model, or already quantised)"
        )
    return sites


def replace_linears(
    model: Encoder, sites: list[tuple[str, nn.Linear]], make: Callable[[nn.Linear], nn.Module | None]
) -> int:
    """Replace each site by ``make(linear)`` (None keeps it); returns how many were replaced."""
    done = 0
    for name, lin in sites:
        new = make(lin)
        if new is not None:
            replace_module(model, name, new)
            done += 1
    return done


@register("int8")
def _apply_int8(model: Encoder, config: Int8Config) -> None:
    sites = quantizable_linears(model, keep_ends=config.keep_ends, what="int8")
    replace_linears(model, sites, Int8DynamicLinear)


@register("int8wo")
def _apply_int8wo(model: Encoder, config: Int8WeightOnlyConfig) -> None:
    sites = quantizable_linears(model, keep_ends=config.keep_ends, what="int8wo")
    replace_linears(
        model,
        sites,
        lambda lin: WeightOnlyLinear(lin, bits=8, group=lin.in_features, outliers=config.outliers),
    )


@register("int4")
def _apply_int4(model: Encoder, config: Int4Config) -> None:
    sites = quantizable_linears(model, keep_ends=config.keep_ends, what="int4")
    fits = [(n, m) for n, m in sites if m.in_features % config.group == 0]
    if not fits:
        widths = sorted({m.in_features for _, m in sites})
        raise ValueError(f"int4 group={config.group} divides none of the Linear input widths {widths}")
    # Layers whose width the group does not divide stay in full precision.
    replace_linears(
        model, fits, lambda lin: WeightOnlyLinear(lin, bits=4, group=config.group, outliers=config.outliers)
    )
