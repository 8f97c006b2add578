"""Running an exported model in ONNX Runtime, and checking it against the torch model it came from.

:class:`OrtModule` wraps an ``InferenceSession`` as an ``nn.Module`` (tensor in, tensor out), so the same
timing (:func:`vitedge.measure.bench.bench`) and evaluation (:func:`vitedge.measure.evaluate.evaluate`) code
measures torch and ONNX Runtime side by side.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitedge.models.base import Encoder, Preprocess

log = logging.getLogger(__name__)

CHECK_BATCH = 16  # check in chunks (the last may be smaller), so the dynamic batch axis is exercised too


def ort_session(path: str | Path, *, threads: int = 2) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads and every graph optimisation on."""
    import onnxruntime as ort

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise here
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OrtModule(nn.Module):
    """An ONNX model run by ONNX Runtime on CPU, behind ``forward(images) -> logits`` (float32 tensors)."""

    def __init__(self, path: str | Path, *, threads: int = 2) -> None:
        super().__init__()
        self.path = Path(path)
        self.threads = threads
        self.session = ort_session(path, threads=threads)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        feed = np.ascontiguousarray(x.detach().cpu().float().numpy())
        (out,) = self.session.run([self.output_name], {self.input_name: feed})
        return torch.from_numpy(out)

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, threads={self.threads}"


@dataclass(frozen=True, kw_only=True)
class Parity:
    """How closely one model's outputs follow a reference's on the same ``n`` images."""

    n: int
    max_abs_diff: float
    mean_cosine: float
    top1_agreement: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parity(reference: torch.Tensor, output: torch.Tensor) -> Parity:
    """Compare outputs row by row. reference, output: (B, K) -> Parity."""
    if reference.shape != output.shape:
        raise ValueError(f"outputs differ in shape: {tuple(reference.shape)} vs {tuple(output.shape)}")
    ref, out = reference.double(), output.double()
    return Parity(
        n=int(ref.shape[0]),
        max_abs_diff=float((ref - out).abs().max()),
        mean_cosine=float(F.cosine_similarity(out, ref, dim=1).mean()),
        top1_agreement=float((out.argmax(1) == ref.argmax(1)).double().mean()),
    )


def run_in_chunks(model: nn.Module, x: torch.Tensor, chunk: int = CHECK_BATCH) -> torch.Tensor:
    """``model`` over ``x`` in batches of ``chunk``. x: (N, C, H, W) -> (N, K) float32."""
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(x[i : i + chunk]).float() for i in range(0, x.shape[0], chunk)])


def default_check_data(pre: Preprocess) -> str:
    """The dataset a model's inputs look like: MNIST digits, CIFAR-10 thumbnails, or ImageNet photos."""
    if pre.in_chans == 1:
        return "mnist"
    if pre.img_size == (32, 32):
        return "cifar10"
    return "imagenet-sample"


def check_inputs(enc: Encoder, data: str | None, n: int) -> tuple[torch.Tensor, str]:
    """``n`` real images for the parity check, preprocessed for ``enc``, and where they came from.

    ``data`` is a ``--data`` name or folder; None picks :func:`default_check_data` and falls back to seeded
    random inputs (``"random"``) when that dataset is not on disk.
    """
    from vitedge.data import as_tensor_batches, open_dataset

    if n < 1:
        raise ValueError(f"the check needs at least 1 image, got {n}")
    name = data or default_check_data(enc.preprocess)
    try:
        dataset = open_dataset(name, enc.preprocess, limit=n)
    except FileNotFoundError as e:
        if data is not None:
            raise
        log.warning("no %s data (%s); checking the export on seeded random inputs", name, e)
        return enc.example_input(n), "random"
    x = torch.cat([xb for xb, _ in as_tensor_batches(dataset, CHECK_BATCH)]).float()
    if x.shape[1:] != (enc.preprocess.in_chans, *enc.img_size):
        raise ValueError(
            f"{name} gives images shaped {tuple(x.shape[1:])}, {enc.model_id} takes "
            f"{(enc.preprocess.in_chans, *enc.img_size)}"
        )
    return x, name
