"""The cost model learns the attention variants: analytic FLOPs against counted execution, and each
kernel's peak memory against the profiler's live tensors, at the token counts of 448, 896 and 1024 px."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitedge
from vitedge.attention.linear import linear_attention, linear_attention_cost, orthogonal_features
from vitedge.attention.linformer import linformer_attention, linformer_cost, linformer_projection
from vitedge.attention.window import window_attention, window_cost
from vitedge.measure import analyze, count_flops
from vitedge.measure.memory import live_tensor_peak
from vitedge.models import load

OPTS = ["linear:features=64", "linear:kind=elu", "linformer:k=64", "window:size=14,global_blocks=4"]


@pytest.mark.parametrize("opt", OPTS)
@pytest.mark.parametrize("px", [448, 1024])
def test_counted_flops_match_the_cost_model(opt: str, px: int) -> None:
    enc = load("timm:deit_tiny_patch16_224", img_size=px)
    before = analyze(enc.arch()).flops
    vitedge.optimize_(enc, opt)
    counted = count_flops(enc, enc.example_input(1)).total
    analytic = analyze(enc.arch()).flops
    assert analytic != before  # the variant is costed, not SDPA
    assert abs(counted / analytic - 1) < 0.01, (opt, px, counted, analytic)


def heads_qkv(n: int, heads: int = 12, d: int = 64) -> tuple[torch.Tensor, ...]:
    # (B, H, N, d) views of a (B, N, H, d) tensor, as the token loop splits heads
    g = torch.Generator().manual_seed(n)
    return tuple(torch.randn(1, n, heads, d, generator=g).transpose(1, 2) for _ in range(3))


SIDES = [28, 56, 64]  # ViT-B/16 at 448, 896 and 1024 px: 784, 3136 and 4096 patches (+ class token)


def within(measured: int, elements: int, tol: float = 0.05, extra: int = 0) -> bool:
    return abs(measured / (4 * elements + extra) - 1) < tol


def sdpa_scratch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Bytes fused CPU SDPA allocates beyond its output (per-thread buffers, which the cost model leaves
    out), measured on the same inputs."""
    return live_tensor_peak(lambda t: F.scaled_dot_product_attention(*t), (q, k, v)) - q.nbytes


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("kind", ["performer", "elu"])
def test_linear_kernel_memory(side: int, kind: str) -> None:
    n = side * side + 1
    q, k, v = heads_qkv(n)
    proj = orthogonal_features(256, 64, generator=torch.Generator().manual_seed(0))
    measured = live_tensor_peak(lambda t: linear_attention(*t, kind=kind, proj=proj), (q, k, v))
    cost = linear_attention_cost(
        name="a", tokens=n, heads=12, head_dim=64, kind=kind, features=256, chunk=1024
    )
    assert within(measured, cost.elements), (measured, 4 * cost.elements)


@pytest.mark.parametrize("side", SIDES)
def test_linformer_kernel_memory(side: int) -> None:
    n = side * side + 1
    q, k, v = heads_qkv(n)
    e, f = linformer_projection(256, n - 1), linformer_projection(256, n - 1, seed=1)
    measured = live_tensor_peak(lambda t: linformer_attention(*t, e, f, prefix=1), (q, k, v))
    cost = linformer_cost(name="a", tokens=n, prefix=1, k=256, heads=12, head_dim=64)
    scratch = sdpa_scratch(q, k[:, :, :257], v[:, :, :257])  # its SDPA: N queries over 1 + 256 keys
    assert within(measured, cost.elements, extra=scratch), (measured, 4 * cost.elements, scratch)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("size", [14, 8])
def test_window_kernel_memory(side: int, size: int) -> None:
    n = side * side + 1
    q, k, v = heads_qkv(n)
    measured = live_tensor_peak(
        lambda t: window_attention(*t, prefix=1, grid=(side, side), size=size), (q, k, v)
    )
    cost = window_cost(name="a", prefix=1, grid=(side, side), size=size, heads=12, head_dim=64)
    assert within(measured, cost.elements), (measured, 4 * cost.elements)


@pytest.mark.parametrize("opt", OPTS)
@pytest.mark.parametrize("px", [448, 1024])
def test_whole_model_peak_matches_live_tensors(opt: str, px: int) -> None:
    """The activation model with a variant's kernel, against the profiler on the whole forward (deit-tiny,
    3 heads): equal to the byte where the MLP holds the peak; within 8 % where the kernel does."""
    enc = load("timm:deit_tiny_patch16_224", img_size=px)
    vitedge.optimize_(enc, opt)
    x = enc.example_input(1)
    measured = live_tensor_peak(enc, x) + x.nbytes
    modelled = analyze(enc.arch()).activation_bytes
    assert abs(measured / modelled - 1) < 0.08, (opt, px, measured, modelled)
