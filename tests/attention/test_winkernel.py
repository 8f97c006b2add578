"""The tiny-window kernel for Swin: matches timm's blocks within 1e-5 on the project's and timm's Swin."""

from __future__ import annotations

import copy

import pytest
import torch

import vitedge
from support import load_cached
from vitedge.attention.winkernel import WinKernelConfig, pick_kernel
from vitedge.models import load
from vitedge.options import parse_options


@pytest.mark.parametrize("kernel", ["bmm", "sdpa", "auto"])
@pytest.mark.parametrize("model_id", ["cifar-swin", "timm:swin_tiny_patch4_window7_224"])
def test_matches_the_native_blocks(model_id: str, kernel: str) -> None:
    base = load("cifar-swin") if model_id == "cifar-swin" else load_cached(model_id)
    enc = vitedge.optimize_(copy.deepcopy(base), WinKernelConfig(kernel=kernel))
    assert enc.plan is not None and all(b.window is not None for b in enc.plan.blocks)
    x = base.example_input(3)
    with torch.inference_mode():
        torch.testing.assert_close(enc(x), base(x), atol=1e-5, rtol=1e-5)


def test_auto_picks_by_window_tokens() -> None:
    assert pick_kernel("auto", (4, 4)) == "bmm"
    assert pick_kernel("auto", (7, 7)) == "bmm"
    assert pick_kernel("auto", (16, 16)) == "sdpa"
    assert pick_kernel("sdpa", (4, 4)) == "sdpa"


def test_refusals() -> None:
    with pytest.raises(ValueError, match="Swin"):
        vitedge.optimize_(load("vit4mnist"), WinKernelConfig())
    with pytest.raises(ValueError, match="window step"):
        vitedge.optimize_(load("cifar-swin"), *parse_options(["window_prune:keep=0.5", "winkernel"]))
    with pytest.raises(ValueError, match="winkernel:kernel"):
        parse_options(["winkernel:kernel=flash"])
