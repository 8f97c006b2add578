"""INT8 attention (``-O int8attn``) against unmodified fp32: each timing interleaved with its baseline in one
process (2 threads), plus accuracy on real data.

- ``kernels``: the attention op alone at the two model shapes and at ViT-B width (12 heads x 64) for N = 1024
  and 4096 tokens, fused fp32 SDPA against the INT8 pipeline with each integer product on offer on CPU:
  ``torch._int_mm`` looped over batch x heads (what the technique uses), ``matmul`` on int32 tensors, an fp32
  emulation of the same integer products (an accuracy reference only: no INT8 instruction runs), and ONNX
  Runtime's batched ``MatMulInteger`` (MLAS); the whole ``int8attn`` pipeline as one ONNX Runtime graph
  (checked against vitedge's before it is timed) and the same graph in fp32; and SDPA in bf16.
  ``torch.ops.quantized.matmul`` is not in the table: it requantises its output to 8 bits per tensor, so it
  cannot return the int32 scores the technique needs. torchao's INT8 SDPA fusion is not either: torchao 0.18
  lowers ``torchao.qscaled_dot_product`` to its C++ template only on CPUs with AMX tiles, and its wheel
  ships no CPU kernel for the op otherwise (read from its ``prototype/inductor/qsdpa_lowering.py``).
- ``speed``: whole models, ``bench_against_baseline``: cifar-vit at batch 64 and ViT-B/16 at 224, batch 16
  (random weights; speed only).
- ``accuracy``: cifar-vit top-1 on the CIFAR-10 test set (``--limit`` images, class-balanced), with the
  agreement and cosine of the variant's logits with the fp32 model's.

    python benchmarks/bench_int8attn.py [--quick] [--only kernels|speed|accuracy] [--limit N]
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitedge.api import optimize_
from vitedge.attention.int8 import Int8AttnConfig, int8_attention, int8_bmm
from vitedge.data import as_tensor_batches, open_dataset
from vitedge.measure.bench import BenchConfig, bench_against_baseline
from vitedge.measure.evaluate import evaluate
from vitedge.models import load
from vitedge.options import parse_options

THREADS = 2
# (model id, batch, -O stacks timed against the fp32 model)
SPEED_CASES: list[tuple[str, int, list[list[str]]]] = [
    (
        "cifar-vit",
        64,
        [
            ["int8attn"],
            ["int8attn:granularity=head"],
            ["int8attn:softmax=bf16"],
            ["int8"],
            ["int8", "int8attn"],
        ],
    ),
    (
        "timm:vit_base_patch16_224",
        16,
        [["int8attn"], ["int8attn:granularity=head"], ["int8"], ["int8", "int8attn"]],
    ),
]
# Attention shapes of those models, then long sequences at ViT-B width: (name, batch, heads, tokens, head_dim)
KERNEL_SHAPES = [
    ("cifar-vit b64", 64, 6, 66, 32),
    ("ViT-B/16 b16", 16, 12, 197, 64),
    ("ViT-B width b1", 1, 12, 1024, 64),
    ("ViT-B width b1", 1, 12, 4096, 64),
]
LONG = 1024  # from this many tokens, leave out the slow int32 and emulated products
ACCURACY_STACKS = [
    ["int8attn"],
    ["int8attn:granularity=head"],
    ["int8attn:softmax=bf16"],
    ["int8"],
    ["int8", "int8attn"],
    ["merge:r=2", "int8attn"],
]

IntMatmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MATMULS: dict[str, IntMatmul] = {
    "int8 _int_mm loop": int8_bmm,
    "int8 via int32 matmul": lambda a, b: a.int() @ b.int(),
    # Exact while d and N stay under ~1000 (int8 products summed below 2**24): same numbers, fp32 speed.
    "fp32 emulation (reference)": lambda a, b: (a.float() @ b.float()).int(),
}


class _Attention(nn.Module):
    """One attention op as a module for the interleaved bench. x: (B, 3, H, N, d) -> (B, H, N, d)."""

    def __init__(self, kernel: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = x.unbind(1)
        return self.kernel(q, k, v, attn_mask=None, scale=q.shape[-1] ** -0.5)


def kernels(cfg: BenchConfig) -> None:
    ort_matmul = ort_int8_matmul(THREADS)
    ort_int8, ort_fp32 = ort_attention(THREADS), ort_attention(THREADS, int8=False)
    for name, b, h, n, d in KERNEL_SHAPES:
        x = torch.randn(b, 3, h, n, d, generator=torch.Generator().manual_seed(0))
        q, k, v = x.unbind(1)
        ours = int8_attention(q, k, v, config=Int8AttnConfig())
        # A value on a rounding boundary may quantise one level apart (ONNX Runtime divides in its own way):
        # the graph must agree with int8attn far inside int8attn's own error against fp32.
        diff = (ort_int8(q, k, v) - ours).abs()
        own = (ours - F.scaled_dot_product_attention(q, k, v)).abs()
        gap = diff.mean().item()
        if gap > 0.01 * own.mean().item() or diff.max().item() > 0.5 * own.max().item():
            raise SystemExit(
                f"the ONNX Runtime graph differs from int8attn at N={n}: mean {gap:.2e}, max "
                f"{diff.max().item():.2e}, against int8attn's own error {own.mean().item():.2e}"
            )
        matmuls = {**MATMULS, "int8 onnxruntime MatMulInteger": ort_matmul}
        if n >= LONG:
            matmuls = {k_: m for k_, m in matmuls.items() if "int32" not in k_ and "emulation" not in k_}
        variants: dict[str, nn.Module] = {
            label: _Attention(
                lambda *a, mm=mm, **kw: int8_attention(*a, **kw, config=Int8AttnConfig(), matmul=mm)
            )
            for label, mm in matmuls.items()
        }
        variants["int8attn as one onnxruntime graph"] = _Attention(ort_int8)
        variants["fp32 unfused onnxruntime graph"] = _Attention(ort_fp32)
        variants["bf16 SDPA"] = _Attention(_bf16_sdpa)
        base_ips, timed = bench_against_baseline(
            _Attention(F.scaled_dot_product_attention), variants, x, dataclasses.replace(cfg, batch=b)
        )
        print(
            f"attention {name} (H={h}, N={n}, d={d}): fused fp32 SDPA {1e3 * b / base_ips:.2f} ms "
            f"(onnxruntime graph - int8attn: mean {gap:.1e})",
            flush=True,
        )
        for label, r in timed.items():
            paired = 1e3 * b / (r.baseline_images_per_s or float("nan"))
            print(
                f"  {label:36s} {r.p50_ms:9.2f} ms  speed-up {r.speedup:.2f}x "
                f"[{r.speedup_low:.2f}, {r.speedup_high:.2f}] (SDPA in its pair {paired:.2f} ms)",
                flush=True,
            )


def _bf16_sdpa(q, k, v, attn_mask=None, scale=None):  # type: ignore[no-untyped-def]
    out = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), scale=scale)
    return out.float()


# --- ONNX Runtime's INT8 paths ----------------------------------------------------------------------
OPSET = 17  # ReduceMax takes axes as an attribute, ReduceSum as an input


def _session(graph: Any, threads: int) -> Any:
    import onnx
    import onnxruntime as ort

    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # no notes about initializers a graph variant leaves unused
    # ONNX Runtime's threads spin after a run by default, taking the cores from the torch call timed next to
    # it: the interleaved baseline would look slower and the ratio better than it is.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def ort_int8_matmul(threads: int) -> Any:
    """Batched INT8 x INT8 -> INT32 through ONNX Runtime's MatMulInteger (MLAS kernels). a: (..., M, K) int8,
    b: (..., K, N) int8 -> (..., M, N) int32."""
    from onnx import TensorProto, helper

    dims = ["b", "h"]
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "int8_matmul",
        [
            helper.make_tensor_value_info("a", TensorProto.INT8, [*dims, "m", "k"]),
            helper.make_tensor_value_info("b", TensorProto.INT8, [*dims, "k", "n"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [*dims, "m", "n"])],
    )
    session = _session(graph, threads)

    def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        shape = a.shape
        a4 = a.reshape(-1, 1, *shape[-2:]).numpy()
        b4 = b.reshape(-1, 1, *b.shape[-2:]).numpy()
        (y,) = session.run(None, {"a": a4, "b": b4})
        return torch.from_numpy(y).view(*shape[:-1], b.shape[-1])

    return matmul


def ort_attention(threads: int, *, int8: bool = True) -> Any:
    """The whole ``int8attn`` (token granularity, fp32 softmax) as one ONNX Runtime graph; with
    ``int8=False`` the same graph in fp32 (MatMul), ONNX Runtime's own unfused attention.
    Called like SDPA with q, k, v: (B, H, N, d) fp32."""
    from onnx import TensorProto, helper

    nodes: list[Any] = []
    inits = [
        helper.make_tensor("qmax", TensorProto.FLOAT, [], [127.0]),
        helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-12]),
        helper.make_tensor("scale", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("last", TensorProto.INT64, [1], [-1]),
    ]

    def node(op: str, ins: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, ins, [out], **attrs))
        return out

    def quant(x: str, axis: int) -> tuple[str, str]:
        amax = node("ReduceMax", [node("Abs", [x], f"{x}_abs")], f"{x}_amax", axes=[axis], keepdims=1)
        s = node("Max", [node("Div", [amax, "qmax"], f"{x}_s0"), "eps"], f"{x}_s")
        xi = node(
            "Cast", [node("Round", [node("Div", [x, s], f"{x}_n")], f"{x}_r")], f"{x}_i", to=TensorProto.INT8
        )
        return xi, s

    if int8:
        qi, sq = quant("q", -1)
        ki, sk = quant("k", -1)
        kt = node("Transpose", [ki], "kt", perm=[0, 1, 3, 2])
        s_int = node("MatMulInteger", [qi, kt], "s_int")
        sf = node("Cast", [s_int], "s_f", to=TensorProto.FLOAT)
        skt = node("Transpose", [sk], "skt", perm=[0, 1, 3, 2])
        sf = node("Mul", [node("Mul", [sf, node("Mul", [sq, "scale"], "sqs")], "s1"), skt], "scores")
    else:
        kt = node("Transpose", ["k"], "kt", perm=[0, 1, 3, 2])
        sf = node("Mul", [node("MatMul", ["q", kt], "s0"), "scale"], "scores")
    mx = node("ReduceMax", [sf], "mx", axes=[-1], keepdims=1)
    e = node("Exp", [node("Sub", [sf, mx], "shift")], "e")
    rs = node("ReduceSum", [e, "last"], "rs", keepdims=1)
    if int8:
        p = node("Cast", [node("Round", [node("Mul", [e, "qmax"], "e127")], "pr")], "p", to=TensorProto.INT8)
        vi, sv = quant("v", -2)
        o = node("Cast", [node("MatMulInteger", [p, vi], "o_int")], "o_f", to=TensorProto.FLOAT)
        norm = node("Reciprocal", [node("Mul", [rs, "qmax"], "rs127")], "norm")
        node("Mul", [node("Mul", [o, norm], "o1"), sv], "out")
    else:
        node("Div", [node("MatMul", [e, "v"], "o0"), rs], "out")
    shape = ["b", "h", "n", "d"]
    graph = helper.make_graph(
        nodes,
        "int8_attention" if int8 else "fp32_attention",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape) for x in ("q", "k", "v")],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)],
        initializer=inits,
    )
    sessions: dict[float, Any] = {}

    def attention(q, k, v, attn_mask=None, scale=None):  # type: ignore[no-untyped-def]
        if attn_mask is not None:
            raise ValueError("the ONNX Runtime probe takes no mask")
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        if scale not in sessions:
            inits[2] = helper.make_tensor("scale", TensorProto.FLOAT, [], [scale])
            del graph.initializer[:]
            graph.initializer.extend(inits)
            sessions[scale] = _session(graph, threads)
        feeds = {n: t.float().contiguous().numpy() for n, t in zip("qkv", (q, k, v), strict=True)}
        (out,) = sessions[scale].run(None, feeds)
        return torch.from_numpy(np.asarray(out))

    return attention


def speed(cfg: BenchConfig) -> None:
    for model_id, batch, stacks in SPEED_CASES:
        try:
            base = load(model_id)
        except ValueError as e:  # e.g. cifar-vit not trained on this checkout
            print(f"{model_id}: skipped ({e})")
            continue
        variants = {" ".join(s): optimize_(load(model_id), *parse_options(s)) for s in stacks}
        x = base.example_input(batch)
        base_ips, timed = bench_against_baseline(base, variants, x, dataclasses.replace(cfg, batch=batch))
        print(f"{model_id} batch {batch}: fp32 {base_ips:.1f} img/s", flush=True)
        for label, r in timed.items():
            print(f"  {label:34s} {r.images_per_s:9.1f} img/s  speed-up {r.speedup:.2f}x", flush=True)


def accuracy(limit: int | None) -> None:
    try:
        base = load("cifar-vit")
    except ValueError as e:
        print(f"cifar-vit: skipped ({e})")
        return
    ds = open_dataset("cifar10", base.preprocess, limit=limit)
    models: dict[str, nn.Module] = {"fp32": base}
    models.update({" ".join(s): optimize_(load("cifar-vit"), *parse_options(s)) for s in ACCURACY_STACKS})
    results = evaluate(models, as_tensor_batches(ds, 250), threads=THREADS)
    ref = results[0]
    print(f"cifar-vit on {ref.n} CIFAR-10 test images: fp32 top-1 {ref.top1:.4f}")
    for r in results[1:]:
        print(
            f"  {r.name:26s} top-1 {r.top1:.4f} ({100 * (r.top1 - ref.top1):+.2f} pp)  "
            f"agreement {r.top1_agreement:.4f}  mean cosine {r.mean_cosine:.6f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one warm-up and two timed rounds per pair")
    parser.add_argument("--only", choices=["kernels", "speed", "accuracy"], action="append")
    parser.add_argument("--limit", type=int, default=None, help="CIFAR-10 test images (default: all 10,000)")
    args = parser.parse_args()
    if args.quick:
        cfg = BenchConfig(threads=THREADS, warmup=1, min_iters=2, max_iters=2, min_seconds=0.0)
    else:
        cfg = BenchConfig(threads=THREADS, warmup=2, min_iters=5, max_iters=50, min_seconds=4.0)
    parts = args.only or ["kernels", "speed", "accuracy"]
    if "kernels" in parts:
        kernels(cfg)
    if "speed" in parts:
        speed(cfg)
    if "accuracy" in parts:
        accuracy(args.limit)


if __name__ == "__main__":
    main()
