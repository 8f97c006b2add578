"""ONNX export: fp32 matches torch within tolerance, ONNX Runtime's INT8 path keeps top-1 on real data, the
-O stack maps or is refused clearly, and the CLI prints one JSON object."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from vitedge.api import optimize_
from vitedge.cli import app
from vitedge.commands import run_optimize
from vitedge.compress.quant import quantizable_linears
from vitedge.data import as_tensor_batches, open_dataset
from vitedge.export import OrtModule, parity, plan_export, quantize_graph, run_export
from vitedge.export import command as export_command
from vitedge.export.plan import auto_block_size
from vitedge.measure.evaluate import evaluate
from vitedge.models import load
from vitedge.options import parse_options

# Trained models with their own real test data: the check runs on it, and so does the INT8 accuracy test.
TRAINED = [("vit4mnist", "mnist"), ("cifar-vit", "cifar10")]


@pytest.fixture(scope="module", params=TRAINED, ids=[m for m, _ in TRAINED])
def exported(request, tmp_path_factory):
    """The default (dynamo) fp32 export of a trained model: (model id, data name, run_export's result)."""
    model_id, data = request.param
    out = tmp_path_factory.mktemp("export") / f"{model_id}.onnx"
    return model_id, data, run_export(model_id, out=out, check_n=40)


def test_fp32_export_matches_torch(exported) -> None:
    _, data, r = exported
    assert r["check_data"] == data and r["n"] == 40
    assert r["max_abs_diff"] <= r["fp32_tolerance"] <= 0.1
    assert r["max_abs_diff"] < 1e-4  # float reassociation only
    assert r["mean_cosine"] > 0.99999
    assert r["top1_agreement"] == 1.0
    assert r["quantization"] is None and r["exporter"] == "dynamo"
    model = onnx.load(r["out"])
    onnx.checker.check_model(model)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis


@pytest.mark.parametrize("batch", [1, 5])
def test_export_runs_any_batch(exported, batch: int) -> None:
    model_id, _, r = exported
    enc = load(model_id)
    x = enc.example_input(batch)
    with torch.inference_mode():
        got = OrtModule(r["out"])(x)
        ref = enc(x)
    assert got.shape == ref.shape
    assert parity(ref, got).max_abs_diff < 1e-4


def test_ort_int8_keeps_top1_on_real_data(exported, tmp_path) -> None:
    model_id, data, r = exported
    enc = load(model_id)
    int8_path = tmp_path / "int8.onnx"
    plan = plan_export(parse_options(["int8"]))
    assert plan.quant is not None
    sites = quantizable_linears(enc, keep_ends=True, what="int8")
    info = quantize_graph(r["out"], int8_path, plan.quant, sites)
    assert info["quantized_layers"] == len(sites)
    ops = {n.op_type for n in onnx.load(str(int8_path)).graph.node}
    assert "DynamicQuantizeLinear" in ops or "DynamicQuantizeMatMul" in ops
    dataset = open_dataset(data, enc.preprocess, limit=200)
    base, ort_int8 = evaluate(
        {"torch": enc, "ort int8": OrtModule(int8_path)}, as_tensor_batches(dataset, 100)
    )
    assert ort_int8.top1_agreement is not None and ort_int8.top1_agreement >= 0.97
    assert ort_int8.top1 >= base.top1 - 0.02
    assert int8_path.stat().st_size < 0.5 * r["bytes"]


def test_run_export_int8_reports_fp32_and_int8(tmp_path) -> None:
    out = tmp_path / "v.onnx"
    r = run_export("vit4mnist", out=out, opts=["int8"], exporter="torchscript", check_n=48)
    assert out.is_file() and r["bytes"] == out.stat().st_size
    assert r["quantization"]["method"] == "dynamic_int8" and r["quantization"]["quantized_layers"] == 24
    assert r["fp32"]["max_abs_diff"] <= r["fp32_tolerance"]
    assert r["fp32"]["top1_agreement"] == 1.0
    assert r["top1_agreement"] >= 0.97 and r["mean_cosine"] > 0.999
    assert r["max_abs_diff"] > r["fp32"]["max_abs_diff"]  # it really is quantised


@pytest.mark.parametrize(
    ("opts", "check"),
    [
        (["structured:heads=0.5,mlp=0.5"], lambda r: r["graph_options"] == ["structured:heads=0.5,mlp=0.5"]),
        (["merge:r=2"], lambda r: r["graph_options"] == ["merge:r=2"]),
        (["prune:keep=0.7", "sparse:n=2,m=4"], lambda r: len(r["graph_options"]) == 2),
        (["int4:group=32"], lambda r: r["quantization"]["block_size"] == 32),
        (["int8wo"], lambda r: r["quantization"]["bits"] == 8),
    ],
    ids=["structured", "merge", "prune+sparse", "int4", "int8wo"],
)
def test_option_stacks_export(tmp_path, opts: list[str], check) -> None:
    r = run_export("vit4mnist", out=tmp_path / "m.onnx", opts=opts, exporter="torchscript", check_n=32)
    assert check(r)
    assert r["top1_agreement"] >= 0.9
    if r["quantization"] is None:  # graph options: the export reproduces the optimised torch model
        assert r["max_abs_diff"] <= r["fp32_tolerance"]


def test_structured_exports_with_dynamo(tmp_path) -> None:
    opts = ["structured:heads=0.5,mlp=0.5"]
    r = run_export("vit4mnist", out=tmp_path / "s.onnx", opts=opts, check_n=16)
    pruned = optimize_(load("vit4mnist"), *parse_options(opts))
    assert r["max_abs_diff"] <= r["fp32_tolerance"]
    # the graph carries the pruned weights, not the original ones
    weights = [i for i in onnx.load(r["out"]).graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    stored = sum(int(np.prod(i.dims)) for i in weights)
    assert stored <= sum(p.numel() for p in pruned.parameters()) + 1000
    assert stored < 0.7 * sum(p.numel() for p in load("vit4mnist").parameters())


@pytest.mark.slow
def test_timm_random_weights_export(tmp_path) -> None:
    r = run_export("timm:deit_tiny_patch16_224", out=tmp_path / "deit.onnx", check_n=4)
    assert r["img_size"] == [224, 224]
    assert r["max_abs_diff"] <= r["fp32_tolerance"]
    assert r["mean_cosine"] > 0.99999


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fmt": "tflite"}, "unknown export format 'tflite'"),
        ({"out_name": "model.pt"}, "must name a .onnx file"),
        ({"exporter": "tracing"}, "unknown exporter 'tracing'"),
        ({"opts": ["bf16"]}, "export cannot carry -O bf16: ONNX Runtime's CPU provider has no bfloat16"),
        ({"opts": ["mixed"]}, "export cannot carry -O mixed"),
        ({"opts": ["adaptive"]}, "export cannot carry -O adaptive"),
        ({"opts": ["int8", "int4"]}, "both quantise the weights"),
        ({"opts": ["int4:group=48"]}, "powers of two >= 16"),
        ({"opts": ["int8wo:outliers=4"]}, "no fp32 outlier channels"),
        ({"opts": ["nonsense"]}, "unknown optimisation 'nonsense'"),
        ({"check_n": 0}, "--check-n must be a positive integer"),
    ],
)
def test_bad_inputs_raise_clear_value_errors(tmp_path, kwargs: dict, message: str) -> None:
    out = tmp_path / kwargs.pop("out_name", "m.onnx")
    with pytest.raises(ValueError, match=re.escape(message)):
        run_export("vit4mnist", out=out, **kwargs)
    assert not out.exists()


def test_plan_orders_quantisation_after_graph_options() -> None:
    plan = plan_export(parse_options(["int8", "structured:heads=0.25,mlp=0", "merge:r=1"]))
    assert [type(c).__name__ for c in plan.graph_configs] == ["StructuredConfig", "MergeConfig"]
    assert plan.quant is not None and plan.quant.method == "dynamic_int8" and plan.quant.keep_ends
    assert plan_export([]).quant is None
    assert auto_block_size([192, 384]) == 64 and auto_block_size([768, 3072]) == 128
    assert auto_block_size([24]) == 16


def test_saved_torch_int8_model_is_refused(tmp_path) -> None:
    saved = tmp_path / "opt"
    run_optimize("vit4mnist", opts=["int8"], out=saved)
    with pytest.raises(ValueError, match="was saved with -O int8 applied in torch"):
        run_export(str(saved), out=tmp_path / "m.onnx")


def test_mismatch_fails_loudly_and_writes_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(export_command, "fp32_tolerance", lambda reference: -1.0)
    out = tmp_path / "m.onnx"
    with pytest.raises(export_command.ExportMismatchError, match="does not match torch"):
        run_export("vit4mnist", out=out, exporter="torchscript", check_n=8)
    assert not out.exists()
    result = CliRunner().invoke(
        app, ["export", "vit4mnist", "--exporter", "torchscript", "--check-n", "8", "--out", str(out)]
    )
    assert result.exit_code == 1 and "does not match torch" in result.output


def test_cli_prints_one_json_object(tmp_path) -> None:
    out = tmp_path / "cli.onnx"
    args = ["export", "vit4mnist", "-O", "int8", "--exporter", "torchscript", "--check-n", "8"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    assert {"max_abs_diff", "mean_cosine", "top1_agreement", "out", "quantization", "fp32"} <= set(r)
    assert r["name"] == "int8" and out.is_file()
    bad = CliRunner().invoke(app, ["export", "vit4mnist", "-O", "bf16", "--out", str(out)])
    assert bad.exit_code == 2 and "bfloat16" in bad.output
