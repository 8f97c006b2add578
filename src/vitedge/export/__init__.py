"""Export an encoder with its ``-O`` stack to ONNX, run it in ONNX Runtime, and check it against torch.

- :mod:`~vitedge.export.plan`: which options the export carries (graph options applied in torch, quantisers
  mapped to ONNX Runtime's own INT8 / weight-only paths) and why the rest are refused;
- :mod:`~vitedge.export.graph`: ``torch.onnx`` export with a dynamic batch axis; ONNX Runtime quantisation;
- :mod:`~vitedge.export.runtime`: :class:`OrtModule` (an ONNX Runtime session as an ``nn.Module``, so the
  torch bench and eval helpers time and score it) and the parity figures;
- :mod:`~vitedge.export.command`: :func:`run_export`, the ``vitedge export`` command.
"""

from vitedge.export.command import ExportMismatchError, run_export
from vitedge.export.graph import EXPORTERS, export_graph, quantize_graph
from vitedge.export.plan import ExportPlan, OrtQuant, plan_export
from vitedge.export.runtime import OrtModule, Parity, check_inputs, ort_session, parity

__all__ = [
    "EXPORTERS",
    "ExportMismatchError",
    "ExportPlan",
    "OrtModule",
    "OrtQuant",
    "Parity",
    "check_inputs",
    "export_graph",
    "ort_session",
    "parity",
    "plan_export",
    "quantize_graph",
    "run_export",
]
