"""torch -> ONNX, and ONNX Runtime's quantisation of the exported graph.

The batch axis is dynamic (the graph runs any batch size); the spatial size is the one the model was built
for. Quantisation targets exactly the ``nn.Linear`` layers the torch option would replace: each MatMul in the
graph is matched to its Linear by the value of its weight initialiser (the Linear's weight, transposed), which
works whatever names an exporter gives its nodes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from vitedge.export.plan import OrtQuant, auto_block_size
from vitedge.models.base import Encoder

EXPORTERS = ("dynamo", "torchscript")
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# A single-file ONNX model is one protobuf, which cannot exceed 2 GiB.
MAX_SINGLE_FILE_BYTES = 1_900_000_000


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep exporter chatter off stdout (``--json`` prints one object there) and drop the warnings the
    parity check makes moot: TorchScript's tracer and deprecation notices, ORT's pre-processing hint."""

    class _DropHint(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "pre-processing before quantization" not in record.getMessage()

    hint = _DropHint()
    logging.getLogger().addFilter(hint)
    try:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logging.getLogger().removeFilter(hint)


def _ort_quantizers() -> tuple[Any, Any, Any]:
    """ONNX Runtime's quantisers, imported without the side effect of its MatMulNBits module (which calls
    ``logging.basicConfig(level=INFO)`` on import and would flood the caller's root logger)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    finally:
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
    return QuantType, quantize_dynamic, MatMulNBitsQuantizer


def _torch_onnx_export(enc: Encoder, x: torch.Tensor, path: Path, exporter: str) -> None:
    if exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=65536)
        torch.onnx.export(
            enc,
            (x,),
            str(path),
            dynamo=True,
            dynamic_shapes=({0: batch},),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            external_data=False,
            verbose=False,
        )
    else:
        axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
        torch.onnx.export(
            enc,
            (x,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
        )


def export_graph(enc: Encoder, path: Path, *, exporter: str = "dynamo", example_batch: int = 2) -> int:
    """Write ``enc`` (eval mode, fp32) to ``path`` as ONNX with a dynamic batch axis; returns the opset.

    Input ``images`` ``(batch, C, H, W)`` float32, output ``logits`` ``(batch, classes)`` float32.

    Raises:
        ValueError: an unknown exporter, a model too large for one file, or a graph ``torch.onnx`` cannot
            export (the message carries the exporter's first line).
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; use one of {', '.join(EXPORTERS)}")
    if enc.compute_dtype != torch.float32:
        raise ValueError(f"export takes an fp32 model, {enc.model_id} computes in {enc.compute_dtype}")
    param_bytes = sum(p.numel() * p.element_size() for p in enc.parameters())
    if param_bytes > MAX_SINGLE_FILE_BYTES:
        gib = param_bytes / 2**30
        raise ValueError(f"{enc.model_id} has {gib:.1f} GiB of weights; one ONNX file holds 2 GiB")
    x = enc.example_input(example_batch)  # batch > 1, so the exporter cannot specialise the batch to 1
    enc.eval()
    try:
        with _quiet(), torch.inference_mode(False):
            _torch_onnx_export(enc, x, path, exporter)
    except Exception as e:  # the exporters raise many types; the user needs the first line and the hint
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        other = "torchscript" if exporter == "dynamo" else "dynamo"
        raise ValueError(
            f"torch.onnx ({exporter}) could not export {enc.model_id}: {first.strip()} "
            f"(try --exporter {other})"
        ) from e
    model = onnx.load(str(path))
    if _strip_debug_metadata(model):
        onnx.save(model, str(path))
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


# Per-node debug records of the dynamo exporter: the Python stack (with the exporting machine's file paths)
# and the FX node text. They are a third of a small model's file; the module scopes stay.
_DEBUG_KEYS = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")


def _strip_debug_metadata(model: onnx.ModelProto) -> bool:
    """Drop :data:`_DEBUG_KEYS` from every node; returns whether anything was dropped."""
    dropped = False
    for node in model.graph.node:
        keep = [p for p in node.metadata_props if p.key not in _DEBUG_KEYS]
        if len(keep) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
            dropped = True
    return dropped


def _weight_key(w: np.ndarray) -> tuple[tuple[int, ...], str]:
    return tuple(w.shape), hashlib.blake2b(np.ascontiguousarray(w).tobytes(), digest_size=16).hexdigest()


def linear_nodes(model: onnx.ModelProto, linears: list[tuple[str, nn.Linear]]) -> dict[str, str]:
    """Map the graph's MatMul nodes to the Linear layers they compute: ``{node name: module name}``.

    A Linear ``y = x W^T + b`` exports as ``MatMul(x, W^T)`` (plus ``Add``) with ``W^T`` an initialiser, so a
    node is matched when its second input holds exactly the transposed weight of one of ``linears``.
    """
    keys = {_weight_key(lin.weight.detach().float().T.contiguous().numpy()): name for name, lin in linears}
    inits = {i.name: i for i in model.graph.initializer}
    out: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        init = inits[node.input[1]]
        if len(init.dims) != 2 or init.data_type != onnx.TensorProto.FLOAT:
            continue
        name = keys.get(_weight_key(numpy_helper.to_array(init)))
        if name is not None:
            out[node.name] = name
    return out


def _matmul_names(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == "MatMul"]


def quantize_graph(
    src: Path, dst: Path, quant: OrtQuant, linears: list[tuple[str, nn.Linear]]
) -> dict[str, Any]:
    """Quantise the fp32 ONNX model ``src`` into ``dst`` with ONNX Runtime; returns what was done.

    ``linears`` are the (name, Linear) sites the matching torch option would replace (see
    :func:`vitedge.compress.quant.quantizable_linears`); only their MatMuls are quantised.

    Raises:
        ValueError: none of ``linears`` was found in the graph, or (int4) none has an input width the
            block size divides.
    """
    QuantType, quantize_dynamic, MatMulNBitsQuantizer = _ort_quantizers()
    model = onnx.load(str(src))
    sites = linear_nodes(model, linears)
    if not sites:
        raise ValueError(f"none of the {len(linears)} Linear layers to quantise appears as a MatMul in {src}")
    block_size = quant.block_size
    if quant.method == "weight_only":
        in_features = {name: lin.in_features for name, lin in linears}
        widths = {n: in_features[m] for n, m in sites.items()}
        block_size = block_size or auto_block_size(list(widths.values()))
        fits = {n: m for n, m in sites.items() if widths[n] % block_size == 0}
        if not fits:
            raise ValueError(
                f"-O {quant.option}: block size {block_size} divides none of the input widths "
                f"{sorted(set(widths.values()))}"
            )
        sites = fits  # as in torch, layers whose width the group does not divide stay in fp32
    with _quiet():
        if quant.method == "dynamic_int8":
            # Measured on cifar-vit and vit4mnist (2 threads, AVX-512 VNNI): signed INT8 weights run ~1.2x
            # faster than unsigned (the u8s8 VNNI path); per-channel scales cost nothing and agree best with
            # fp32; reduce_range only loses accuracy. Activation-by-activation products (QK^T, AV) stay fp32.
            quantize_dynamic(
                str(src),
                str(dst),
                op_types_to_quantize=["MatMul"],
                nodes_to_quantize=list(sites),
                per_channel=True,
                reduce_range=False,
                weight_type=QuantType.QInt8,
                extra_options={"MatMulConstBOnly": True},
            )
        else:
            # The quantiser takes every MatMul of op_types_to_quantize unless excluded: exclude all but sites.
            excluded = [n for n in _matmul_names(model) if n not in sites]
            q = MatMulNBitsQuantizer(
                model,
                bits=quant.bits,
                block_size=block_size,
                is_symmetric=False,
                nodes_to_exclude=excluded,
                op_types_to_quantize=("MatMul",),
            )
            q.process()
            q.model.save_model_to_file(str(dst), use_external_data_format=False)
    out = quant.to_json()
    if quant.method == "weight_only":
        out["block_size"] = block_size
    out["quantized_layers"] = len(sites)
    return out
