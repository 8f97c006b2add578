"""``vitedge export MODEL -O ... --format onnx --out FILE.onnx``: export, quantise, check, report."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vitedge.api import RUNTIME_ONLY, build_plan, config_name, describe, optimize_
from vitedge.commands import variant_name
from vitedge.compress.quant import quantizable_linears
from vitedge.export.graph import EXPORTERS, export_graph, quantize_graph
from vitedge.export.plan import ExportPlan, plan_export, refuse_applied
from vitedge.export.runtime import OrtModule, Parity, check_inputs, parity, run_in_chunks
from vitedge.models import Encoder, load
from vitedge.options import parse_options

FORMATS = ("onnx",)
# fp32 ONNX must reproduce torch up to float reassociation: max |diff| <= ATOL + RTOL * max |torch logit|.
FP32_ATOL = 1e-3
FP32_RTOL = 1e-3


class ExportMismatchError(RuntimeError):
    """The exported fp32 graph computes something other than the torch model (a bug, never a user error)."""


def fp32_tolerance(reference: torch.Tensor) -> float:
    return FP32_ATOL + FP32_RTOL * float(reference.abs().max())


def _validate(fmt: str, out: Path, exporter: str, check_n: int, threads: int) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; supported: {', '.join(FORMATS)}")
    if out.suffix != ".onnx":
        raise ValueError(f"--out must name a .onnx file, got {str(out)!r}")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; name a .onnx file")
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; use one of {', '.join(EXPORTERS)}")
    if check_n < 1:
        raise ValueError(f"--check-n must be a positive integer, got {check_n}")
    if threads < 1:
        raise ValueError(f"--threads must be a positive integer, got {threads}")


def _check_fp32(model_id: str, check: Parity, tolerance: float) -> None:
    if not check.max_abs_diff <= tolerance:  # also catches NaN
        raise ExportMismatchError(
            f"the fp32 ONNX export of {model_id} does not match torch: max |diff| {check.max_abs_diff:.3g} > "
            f"tolerance {tolerance:.3g} (mean cosine {check.mean_cosine:.6f}, top-1 agreement "
            f"{check.top1_agreement:.4f} on {check.n} images); nothing was written"
        )


@dataclass(kw_only=True)
class _Built:
    """An export checked against torch, still in its temporary folder."""

    path: Path
    opset: int
    export_s: float
    tolerance: float
    fp32_check: Parity
    check: Parity  # of the model at ``path`` (the quantised one when quantising)
    quantization: dict[str, Any] | None = None


def _build(
    enc: Encoder, plan: ExportPlan, x: torch.Tensor, folder: Path, *, exporter: str, threads: int
) -> _Built:
    """Export ``enc`` (options applied) into ``folder``, check it on ``x``, quantise as ``plan`` says."""
    reference = run_in_chunks(enc, x)
    fp32_path = folder / "fp32.onnx"
    t0 = time.perf_counter()
    opset = export_graph(enc, fp32_path, exporter=exporter)
    export_s = time.perf_counter() - t0
    fp32_check = parity(reference, run_in_chunks(OrtModule(fp32_path, threads=threads), x))
    tolerance = fp32_tolerance(reference)
    _check_fp32(enc.model_id, fp32_check, tolerance)
    built = _Built(
        path=fp32_path,
        opset=opset,
        export_s=export_s,
        tolerance=tolerance,
        fp32_check=fp32_check,
        check=fp32_check,
    )
    if plan.quant is None:
        return built
    sites = quantizable_linears(enc, keep_ends=plan.quant.keep_ends, what=plan.quant.option)
    built.path = folder / "quantized.onnx"
    t0 = time.perf_counter()
    built.quantization = quantize_graph(fp32_path, built.path, plan.quant, sites)
    built.quantization["quantize_s"] = time.perf_counter() - t0
    built.check = parity(reference, run_in_chunks(OrtModule(built.path, threads=threads), x))
    return built


def run_export(
    model_id: str,
    *,
    out: Path,
    opts: list[str] | None = None,
    fmt: str = "onnx",
    exporter: str = "dynamo",
    data: str | None = None,
    check_n: int = 32,
    img_size: int | None = None,
    weights: Path | None = None,
    threads: int = 2,
) -> dict[str, Any]:
    """Export ``model_id`` with its ``-O`` stack to ONNX at ``out`` and check it against torch.

    Graph options are applied in torch before the export; a quantiser (``int8``, ``int8wo``, ``int4``) is
    ONNX Runtime's quantisation of the exported fp32 graph (see :mod:`vitedge.export.plan`). The fp32 graph
    is always run in ONNX Runtime (``threads`` intra-op threads) on ``check_n`` real images (``data``;
    default: the model's own kind of data) and must match the torch model within :func:`fp32_tolerance`;
    the written model's ``max_abs_diff``, ``mean_cosine`` and ``top1_agreement`` against torch are reported.

    Raises:
        ValueError: a bad format, path, option or setting; an option ONNX cannot carry; an export failure.
        ExportMismatchError: the fp32 export does not reproduce torch (``out`` is then not written).
    """
    _validate(fmt, out, exporter, check_n, threads)
    plan = plan_export(parse_options(opts or []))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        enc = load(model_id, weights=weights, img_size=img_size)
        refuse_applied(model_id, enc.applied)
        # a saved directory's compile: export the eager model
        enc.applied = [c for c in enc.applied if config_name(c) not in RUNTIME_ONLY]
        enc.plan = build_plan(enc)
        optimize_(enc, *plan.graph_configs).eval()
        x, check_data = check_inputs(enc, data, check_n)
        with tempfile.TemporaryDirectory(prefix="vitedge-export-") as tmp:
            built = _build(enc, plan, x, Path(tmp), exporter=exporter, threads=threads)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(built.path), str(out))
    finally:
        torch.set_num_threads(previous_threads)
    result: dict[str, Any] = {
        "model": model_id,
        "name": variant_name(opts or []),
        "format": fmt,
        "out": str(out),
        "bytes": out.stat().st_size,
        "exporter": exporter,
        "opset": built.opset,
        "img_size": list(enc.img_size),
        "graph_options": [describe(c) for c in plan.graph_configs],
        "quantization": built.quantization,
        "threads": threads,
        "export_s": built.export_s,
        "check_data": check_data,
        **built.check.to_json(),
        "fp32_tolerance": built.tolerance,
    }
    if built.quantization is not None:
        result["fp32"] = built.fp32_check.to_json()
    return result
