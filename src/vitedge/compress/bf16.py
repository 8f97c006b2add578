"""bfloat16 inference (``-O bf16``).

``mode="cast"`` (default) stores weights in bf16 and casts the input, so every matmul runs the bf16 kernels
(AVX-512 BF16 on the target CPUs; FACTS.md measures 2.62x on ViT-B/16). ``mode="autocast"`` keeps fp32
weights and runs the forward under ``torch.autocast``, which converts weights at every call (2.38x) but
keeps LayerNorm and softmax in fp32. Outputs are returned in float32 either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitedge.api import Composition, register
from vitedge.models.base import Encoder
from vitedge.plan import PlanBuilder

MODES = ("cast", "autocast")


@dataclass(frozen=True, kw_only=True)
class Bf16Config:
    """Run the encoder in bfloat16."""

    mode: str = "cast"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"bf16 mode must be one of {MODES}, got {self.mode!r}")


def bf16_steps(model: Encoder, config: Bf16Config, plan: PlanBuilder) -> None:
    if config.mode == "autocast":
        plan.set_model("autocast", torch.bfloat16)


@register("bf16", steps=bf16_steps, compose=Composition(fills=frozenset({"autocast"})))
def _apply_bf16(model: Encoder, config: Bf16Config) -> None:
    if model.compute_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"bf16 needs a floating-point model, this one computes in {model.compute_dtype}")
    if config.mode == "cast":
        model.to(torch.bfloat16)
