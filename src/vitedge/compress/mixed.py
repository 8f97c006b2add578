"""Mixed precision from measured sensitivity (``-O mixed:budget=0.005``; the seed's 22.4.2).

Every Linear inside the transformer blocks runs either INT8 (dynamic, the fast path) or the ``fallback``
precision (``bf16``, or ``fp32``). Each layer's sensitivity is measured on the calibration images
(:mod:`vitedge.compress.calibration`) as the KL divergence of the model's outputs when that layer alone is
INT8; the least sensitive layers go INT8 first, and the largest such set whose top-1 disagreement with the
unmodified model on the calibration images stays within ``budget`` (a fraction: 0.005 = half a point) wins.

The plan is a deterministic function of the weights and the calibration data, so a saved model re-derives
the same plan on load; ``plan`` (one letter per layer: ``8`` INT8, ``f`` fallback) pins it explicitly.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitedge.api import register
from vitedge.compress.calibration import calibration_batches
from vitedge.compress.qlinear import Int8DynamicLinear
from vitedge.compress.quant import quantizable_linears
from vitedge.models.base import Encoder
from vitedge.models.surgery import replace_module

log = logging.getLogger(__name__)
FALLBACKS = ("bf16", "fp32")


@dataclass(frozen=True, kw_only=True)
class MixedConfig:
    """INT8 where the model tolerates it, ``fallback`` elsewhere, within ``budget`` top-1 disagreement."""

    budget: float = 0.005
    fallback: str = "bf16"
    plan: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.budget < 1.0:
            raise ValueError(f"mixed budget is a fraction of top-1 in [0, 1), got {self.budget}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"mixed fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if set(self.plan) - {"8", "f"}:
            raise ValueError(f"mixed plan is a string of '8' (INT8) and 'f' (fallback), got {self.plan!r}")


class Bf16Linear(nn.Linear):
    """A Linear computed in bf16 (weights stored in bf16), returning the input dtype."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().bfloat16(), requires_grad=False)
        b = linear.bias
        self.bias = None if b is None else nn.Parameter(b.detach().bfloat16(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., K) -> (..., N)
        return F.linear(x.bfloat16(), self.weight, self.bias).to(x.dtype)


def _apply_plan(model: Encoder, sites: list[tuple[str, nn.Linear]], plan: str, fallback: str) -> None:
    for (name, lin), p in zip(sites, plan, strict=True):
        if p == "8":
            replace_module(model, name, Int8DynamicLinear(lin))
        elif fallback == "bf16":
            replace_module(model, name, Bf16Linear(lin))


def _outputs(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(x).float() for x in batches])  # (n, K)


def _variant(model: Encoder, plan: str, fallback: str) -> Encoder:
    enc = copy.deepcopy(model)
    _apply_plan(enc, quantizable_linears(enc, keep_ends=True, what="mixed"), plan, fallback)
    return enc


def _disagreement(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.argmax(1) != ref.argmax(1)).float().mean())


def choose_plan(model: Encoder, config: MixedConfig, batches: list[torch.Tensor]) -> str:
    """Measure per-layer sensitivity and return the plan with the most INT8 layers within the budget.

    Raises:
        ValueError: even the plan with no INT8 layer exceeds the budget (the fallback alone costs too much).
    """
    n = len(quantizable_linears(model, keep_ends=True, what="mixed"))
    ref = _outputs(model, batches)
    if _disagreement(_outputs(_variant(model, "f" * n, config.fallback), batches), ref) > config.budget:
        raise ValueError(
            f"mixed:budget={config.budget} cannot be met on {model.model_id}: {config.fallback} alone "
            "already changes more top-1 predictions on the calibration images; raise the budget or use "
            "fallback=fp32"
        )
    logp_ref = F.log_softmax(ref, dim=1)
    sensitivity = []
    for i in range(n):
        plan = "".join("8" if j == i else "x" for j in range(n))
        out = _outputs(_variant(model, plan, "fp32"), batches)
        kl = F.kl_div(F.log_softmax(out, dim=1), logp_ref, log_target=True, reduction="batchmean")
        sensitivity.append(float(kl))
    order = sorted(range(n), key=lambda i: sensitivity[i])

    def plan_for(k: int) -> str:
        chosen = set(order[:k])
        return "".join("8" if i in chosen else "f" for i in range(n))

    def fits(k: int) -> bool:
        out = _outputs(_variant(model, plan_for(k), config.fallback), batches)
        return _disagreement(out, ref) <= config.budget

    lo, hi = 0, n  # largest k that fits, by bisection (disagreement grows with k, near enough)
    if fits(n):
        return plan_for(n)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    log.info("mixed: %d of %d layers INT8, sensitivities %s", lo, n, sensitivity)
    return plan_for(lo)


@register("mixed")
def _apply_mixed(model: Encoder, config: MixedConfig) -> None:
    sites = quantizable_linears(model, keep_ends=True, what="mixed")
    plan = config.plan
    if plan and len(plan) != len(sites):
        raise ValueError(f"mixed plan has {len(plan)} letters but {model.model_id} has {len(sites)} layers")
    if not plan:
        plan = choose_plan(model, config, calibration_batches(model, images=256, batch=128))
    _apply_plan(model, sites, plan, config.fallback)
