"""Which parts of a ``-O`` stack an ONNX export can carry, and how.

Three kinds of option:

- graph options (``structured``, ``merge``, ``prune``, ``window_merge``, ``window_prune``, ``sparse``)
  change the torch model in ways ``torch.onnx`` exports; they are applied with :func:`vitedge.optimize_`
  before the export, in the order given;
- quantisers (``int8``, ``int8wo``, ``int4``) map to ONNX Runtime's own quantisation of the exported fp32
  graph, because vitedge's torch INT8 modules (fbgemm) do not export. They run after every graph option,
  wherever they sit in the stack;
- the rest are refused with the reason (:data:`REFUSALS`), as is any option this module does not know.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vitedge.api import RUNTIME_ONLY, config_name, describe

GRAPH_OPTIONS = ("structured", "merge", "prune", "window_merge", "window_prune", "sparse")
QUANTIZERS = ("int8", "int8wo", "int4")
REFUSALS = {
    "bf16": (
        "ONNX Runtime's CPU provider has no bfloat16 MatMul, Gemm or Softmax kernels; export fp32, or add "
        "-O int8 for its INT8 path"
    ),
    "mixed": (
        "mixed chooses its layers by measuring vitedge's torch INT8 (fbgemm) modules, which do not export; "
        "use -O int8 for ONNX Runtime's INT8 path"
    ),
    "int8attn": (
        "int8attn runs torch._int_mm in a loop over batch x heads, which torch.onnx does not export; "
        "ONNX Runtime's INT8 path (-O int8) quantises the Linear layers and keeps QK^T and AV in fp32"
    ),
    "compile": (
        "compile is torch.compile for the running process; the ONNX graph is exported from the eager model "
        "and ONNX Runtime applies its own graph optimisations, so drop -O compile for export"
    ),
    "adaptive": (
        "adaptive splits each batch by per-image keep rates, data-dependent control flow that torch.export "
        "cannot capture; use -O prune:keep=... for a fixed keep rate"
    ),
}
# ONNX Runtime's weight-only kernel (com.microsoft MatMulNBits) takes power-of-two blocks of at least 16.
MIN_BLOCK = 16
# int8wo (per output channel in torch) gets the largest block up to this that divides every layer's width.
MAX_BLOCK = 128


@dataclass(frozen=True, kw_only=True)
class OrtQuant:
    """How ONNX Runtime quantises the exported fp32 graph.

    ``method`` is ``"dynamic_int8"`` (INT8 per-channel weights, activations quantised per call:
    ``quantize_dynamic`` -> DynamicQuantizeMatMul) or ``"weight_only"`` (``bits``-bit weights in blocks of
    ``block_size`` input channels, fp32 compute: MatMulNBits; 0 picks :func:`auto_block_size`).
    ``keep_ends`` leaves the layers outside the transformer blocks (patch embedding, head) in fp32, as the
    torch options do.
    """

    option: str
    method: str
    bits: int = 8
    block_size: int = 0
    keep_ends: bool = True

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"option": self.option, "method": self.method, "bits": self.bits}
        if self.method == "dynamic_int8":
            out.update(weight_type="int8", activations="uint8, per call", per_channel=True)
        else:
            out["block_size"] = self.block_size
        out["keep_ends"] = self.keep_ends
        return out


@dataclass(frozen=True, kw_only=True)
class ExportPlan:
    """The graph options to apply in torch, in order, and the ONNX Runtime quantisation (None: fp32)."""

    graph_configs: tuple[Any, ...]
    quant: OrtQuant | None


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _quantizer(config: Any) -> OrtQuant:
    name = config_name(config)
    if getattr(config, "outliers", 0):
        raise ValueError(
            f"-O {describe(config)}: ONNX Runtime's weight-only kernel has no fp32 outlier channels; "
            "drop outliers=... to export"
        )
    if name == "int8":
        return OrtQuant(option=describe(config), method="dynamic_int8", keep_ends=config.keep_ends)
    if name == "int8wo":
        return OrtQuant(
            option=describe(config),
            method="weight_only",
            bits=8,
            block_size=0,  # chosen from the layer widths: see auto_block_size
            keep_ends=config.keep_ends,
        )
    if not (_is_power_of_two(config.group) and config.group >= MIN_BLOCK):
        raise ValueError(
            f"-O {describe(config)}: ONNX Runtime's MatMulNBits takes groups that are powers of two >= "
            f"{MIN_BLOCK} (16, 32, 64, 128, ...), got group={config.group}"
        )
    return OrtQuant(
        option=describe(config),
        method="weight_only",
        bits=4,
        block_size=config.group,
        keep_ends=config.keep_ends,
    )


def auto_block_size(widths: list[int]) -> int:
    """The largest power of two <= :data:`MAX_BLOCK` that divides every input width (at least
    :data:`MIN_BLOCK`; layers it does not divide stay in fp32)."""
    block = MAX_BLOCK
    for w in widths:
        block = min(block, w & -w)  # the largest power of two dividing w
    return max(block, MIN_BLOCK)


def refuse_applied(model_id: str, applied: list[Any]) -> None:
    """Refuse a loaded model (an ``optimize --out`` directory) that already carries non-exportable options."""
    for config in applied:
        name = config_name(config)
        if name in GRAPH_OPTIONS or name in RUNTIME_ONLY:  # the export traces the eager model
            continue
        saved = f"{model_id} was saved with -O {describe(config)} applied in torch, which does not export"
        if name in QUANTIZERS:
            raise ValueError(f"{saved}; export its base model with -O {describe(config)} instead")
        raise ValueError(f"{saved}: {REFUSALS.get(name, 'export does not carry it')}")


def plan_export(configs: list[Any] | tuple[Any, ...]) -> ExportPlan:
    """Split a parsed ``-O`` stack into graph options and at most one ONNX Runtime quantiser.

    Raises:
        ValueError: an option ONNX cannot carry (the message says why and what to use instead), two
            quantisers, or a quantiser setting ONNX Runtime's kernels do not take.
    """
    graph: list[Any] = []
    quant: OrtQuant | None = None
    for config in configs:
        name = config_name(config)
        if name in GRAPH_OPTIONS:
            graph.append(config)
        elif name in QUANTIZERS:
            if quant is not None:
                raise ValueError(
                    f"-O {quant.option} and -O {describe(config)} both quantise the weights; export takes one"
                )
            quant = _quantizer(config)
        elif name in REFUSALS:
            raise ValueError(f"export cannot carry -O {describe(config)}: {REFUSALS[name]}")
        else:
            carried = ", ".join((*GRAPH_OPTIONS, *QUANTIZERS))
            raise ValueError(f"export cannot carry -O {describe(config)}; it carries {carried}")
    return ExportPlan(graph_configs=tuple(graph), quant=quant)
