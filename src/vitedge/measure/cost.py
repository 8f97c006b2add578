"""Analytic cost of an encoder: MACs, parameters, bytes moved and peak activation memory.

Everything here is plain Python over an :class:`~vitedge.models.spec.ArchSpec`; no tensor is built. FLOPs
and MACs count matmul-type work only (linear and convolution layers, attention QK^T and AV), as the contract
fixes, and ``flops == 2 * macs``.

Bytes per element (``dtype``):

* ``float32`` (``fp32``): weights and activations 4 bytes.
* ``bfloat16`` (``bf16``) and ``float16`` (``fp16``): weights and activations 2 bytes.
* ``int8``: the matrix weights of linear and convolution layers take 1 byte; biases, norms, embeddings and
  every other parameter stay float32 (4 bytes), as dynamic INT8 quantisation keeps them; activations stay
  float32 (they are quantised on the fly inside each matmul and never stored as int8).

Peak activation memory (inference, one forward pass under ``no_grad``) is the largest, over layers, of the
tensors alive at once while that layer runs. The model counts what PyTorch eager code (timm and Hugging Face
blocks) actually keeps alive, per image, with ``I``, ``H``, ``O`` the layer's ``in_elements``,
``hidden_elements`` and ``out_elements`` and ``S`` the attention-score elements of its attention ops:

* always: the input images, which the caller holds for the whole forward, in float32 (4 bytes per element),
  plus their cast to the activation dtype where that is not float32 (``Encoder.forward`` casts them);
* ``held``: residual-stream tensors that enclosing calls still reference. vitedge runs the block loop
  itself and rebinds the stream, so the patch-embedding and patch-merge outputs live on only as the next
  block's input; during an MLP sub-block the block's input is held by the loop;
* ``embed``: ``I`` is the image itself; the convolution output ``P`` (patches x width, from its op) is
  written once in the backend's blocked layout and once in plain layout, the backend also reorders the
  kernel (a batch-independent copy of the weight), then the class-token concatenation and the
  position-embedding sum (``2 O``) coexist with ``P``: ``P + max(P, weight copy, 2 O)``;
* ``attn``: ``I`` + the normalised input ``I`` + ``H`` (q, k, v); window attention (any AttnOp with
  several windows, or a ``swin`` spec) adds ``2 I`` (cyclic shift / pad copy and window partition copy);
  fused attention then holds its output and the head-merge copy (``2 O``); unfused attention holds a
  scaled copy of q (``H/3``) and either the contiguous q, k operand copies of QK^T plus the scores
  (``2H/3 + S``) or the scores and their softmax (``2 S``); an attention kernel of the execution plan
  (linear, Linformer, windowed) holds its own peak ``K`` (its ``KernelCost.elements``, output included) and
  then its output and the head-merge copy: ``I + I + H + max(K, 2 O)``;
* ``mlp``: ``I`` + the normalised input ``I`` + ``2 H`` (the fc1 output and its activation coexist);
* ``merge``: ``I`` + the gathered 2x2 neighbours ``H`` + their normalised copy ``H`` + ``O``;
* ``head``: ``I`` + the final norm output ``I`` + ``O`` (the blocks' streams are released by then);
* any other kind: ``I + H + O``.

Unfused attention is the AttnOp's own ``fused=False`` (the model's code materialises scores) or
``fused_attention=False`` for all attention ops. On CPU, ``scaled_dot_product_attention`` dispatches to a
flash kernel that never stores the ``S`` scores. With torch 2.14.1 these rules reproduce, to the byte, the
peak of live tensors that the profiler records for timm DeiT/ViT (fused and unfused) and Swin, and for the
Hugging Face ViT and SigLIP towers (``vitedge.measure.memory.live_tensor_peak``).

``bytes`` of a layer (for arithmetic intensity) is its weights plus the activations entering and leaving it
(``I`` and ``O`` at the batch); intermediates are assumed to stay in cache, so this is a lower bound on
traffic and the intensity an upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vitedge.models.spec import ArchSpec, AttnOp, LayerSpec, LinearOp

# name -> (canonical name, bytes per matrix weight, bytes per other parameter, bytes per activation)
_DTYPES: dict[str, tuple[str, int, int, int]] = {
    "float32": ("float32", 4, 4, 4),
    "fp32": ("float32", 4, 4, 4),
    "float": ("float32", 4, 4, 4),
    "bfloat16": ("bfloat16", 2, 2, 2),
    "bf16": ("bfloat16", 2, 2, 2),
    "float16": ("float16", 2, 2, 2),
    "fp16": ("float16", 2, 2, 2),
    "half": ("float16", 2, 2, 2),
    "int8": ("int8", 1, 4, 4),
    "qint8": ("int8", 1, 4, 4),
}


@dataclass(frozen=True, kw_only=True)
class DtypeBytes:
    """Bytes per element for one deployment dtype (see the module docstring for the int8 rule)."""

    name: str
    matrix_weight: int
    other_param: int
    activation: int


def dtype_bytes(dtype: Any) -> DtypeBytes:
    """Resolve ``"fp32"``/``"bf16"``/``"fp16"``/``"int8"`` (or long names, or a ``torch.dtype``).

    Raises:
        ValueError: the dtype is not one of those.
    """
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use float32/fp32, bfloat16/bf16, float16/fp16 or int8")
    name, matrix, other, act = _DTYPES[key]
    return DtypeBytes(name=name, matrix_weight=matrix, other_param=other, activation=act)


@dataclass(frozen=True, kw_only=True)
class LayerCost:
    """Cost of one reported layer at the report's batch and dtype."""

    name: str
    kind: str
    macs: int
    flops: int
    params: int
    weight_bytes: int
    activation_bytes: int  # activations alive at once while this layer runs (its peak)
    bytes: int  # weights + activations entering and leaving the layer
    intensity: float  # flops / bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "macs": self.macs,
            "flops": self.flops,
            "params": self.params,
            "weight_bytes": self.weight_bytes,
            "activation_bytes": self.activation_bytes,
            "bytes": self.bytes,
            "intensity": self.intensity,
        }


@dataclass(frozen=True, kw_only=True)
class CostReport:
    """Totals for a forward pass of ``batch`` images; ``activation_bytes`` is the peak over layers."""

    macs: int
    flops: int
    params: int
    weight_bytes: int
    activation_bytes: int
    layers: tuple[LayerCost, ...]
    batch: int
    dtype: str
    fused_attention: bool
    peak_layer: str

    def to_json(self, *, counted_flops: int | None = None, max_batch: int | None = None) -> dict[str, Any]:
        """The contract's ``profile`` keys; ``counted_flops``/``max_batch`` are added when given."""
        out: dict[str, Any] = {
            "macs": self.macs,
            "flops": self.flops,
            "params": self.params,
            "weight_bytes": self.weight_bytes,
            "activation_bytes": self.activation_bytes,
            "layers": [layer.to_json() for layer in self.layers],
            "batch": self.batch,
            "dtype": self.dtype,
            "fused_attention": self.fused_attention,
            "peak_layer": self.peak_layer,
        }
        if counted_flops is not None:
            out["counted_flops"] = counted_flops
        if max_batch is not None:
            out["max_batch"] = max_batch
        return out


@dataclass(frozen=True, kw_only=True)
class LiveActivations:
    """What one layer keeps alive at its peak, per image, besides the input images.

    At batch B that is ``B * per_image`` activation elements plus the larger of two short-lived tensors that
    never coexist: ``B * transient_per_image`` elements, or a batch-independent ``fixed_bytes`` (a weight
    reordered into the backend's layout).
    """

    name: str
    per_image: int
    transient_per_image: int = 0
    fixed_bytes: int = 0

    def bytes_at(self, batch: int, act_bytes: int) -> int:
        transient = max(batch * self.transient_per_image * act_bytes, self.fixed_bytes)
        return batch * self.per_image * act_bytes + transient


def _matrix_elements(op: LinearOp) -> int:
    return op.in_features * op.out_features


def _layer_weight_bytes(layer: LayerSpec, db: DtypeBytes) -> int:
    # a product of two activations (token matching, weight=False) holds no weights
    matrix = sum(_matrix_elements(op) for op in layer.ops if isinstance(op, LinearOp) and op.weight)
    return matrix * db.matrix_weight + (layer.params - matrix) * db.other_param


def _attn_elements(layer: LayerSpec, *, fused_attention: bool, windowed: bool) -> int:
    """Elements per image an attention sub-block holds beyond its held residual streams."""
    i, h, o = layer.in_elements, layer.hidden_elements, layer.out_elements
    attn_ops = [op for op in layer.ops if isinstance(op, AttnOp)]
    live = 2 * i + h
    # Swin partitions even where one window covers the whole map (its last stage)
    if windowed or any(op.windows > 1 for op in attn_ops):
        live += 2 * i  # shift/pad copy and window-partition copy of the normalised input
    if layer.kernel_elements is not None:  # another kernel: its own peak, then the head-merge copy
        return live + max(layer.kernel_elements, 2 * o)
    unfused = [op for op in attn_ops if not (fused_attention and op.fused)]
    if unfused:
        scores = sum(op.score_elements for op in unfused)
        q = h // 3
        live += q + max(2 * q + scores, 2 * scores)
    else:
        live += 2 * o
    return live


def live_activations(
    spec: ArchSpec, *, fused_attention: bool = True, weight_bytes: int = 4
) -> list[LiveActivations]:
    """Per-layer live activations besides the input images (see the module docstring), in spec order.

    Args:
        spec: the encoder description.
        fused_attention: False makes every attention op materialise its scores.
        weight_bytes: bytes per matrix weight, for the embedding's reordered-kernel copy.
    """
    block_in = 0  # the block input the loop holds while the block's MLP runs
    lives: list[LiveActivations] = []
    for layer in spec.layers:
        i, h, o = layer.in_elements, layer.hidden_elements, layer.out_elements
        live = LiveActivations(name=layer.name, per_image=i + h + o)
        if layer.kind == "embed":
            lin = [op for op in layer.ops if isinstance(op, LinearOp)]
            conv_out = lin[0].tokens * lin[0].out_features if lin else h
            fixed = _matrix_elements(lin[0]) * weight_bytes if lin else 0
            live = LiveActivations(
                name=layer.name,
                per_image=conv_out,
                transient_per_image=max(conv_out, 2 * o),
                fixed_bytes=fixed,
            )
        elif layer.kind == "attn":
            own = _attn_elements(layer, fused_attention=fused_attention, windowed=spec.family == "swin")
            live = LiveActivations(name=layer.name, per_image=own)
            block_in = i
        elif layer.kind == "mlp":
            live = LiveActivations(name=layer.name, per_image=block_in + 2 * i + 2 * h)
            block_in = 0
        elif layer.kind == "merge":
            live = LiveActivations(name=layer.name, per_image=i + 2 * h + o)
        elif layer.kind == "head":
            live = LiveActivations(name=layer.name, per_image=2 * i + o)
        lives.append(live)
    return lives


def analyze(
    spec: ArchSpec, *, batch: int = 1, dtype: Any = "float32", fused_attention: bool = True
) -> CostReport:
    """MACs, FLOPs, parameters, weight bytes, peak activation bytes and per-layer intensity.

    Args:
        spec: the encoder for one image (``encoder.arch(img_size)``).
        batch: images per forward pass; every total is for the whole batch.
        dtype: deployment dtype: ``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``,
            ``"float16"``/``"fp16"``, ``"int8"``, or a ``torch.dtype``.
        fused_attention: whether attention runs a fused kernel that never stores the score matrix
            (CPU SDPA does); an AttnOp with ``fused=False`` materialises its scores either way.

    Raises:
        ValueError: ``batch`` is not a positive integer or ``dtype`` is unknown.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    db = dtype_bytes(dtype)
    lives = live_activations(spec, fused_attention=fused_attention, weight_bytes=db.matrix_weight)
    images = batch * spec.in_chans * spec.img_size[0] * spec.img_size[1]
    image_bytes = images * (4 + (db.activation if db.activation != 4 else 0))
    layers = []
    for layer, live in zip(spec.layers, lives, strict=True):
        macs = layer.macs * batch
        weight = _layer_weight_bytes(layer, db)
        moved = weight + batch * (layer.in_elements + layer.out_elements) * db.activation
        layers.append(
            LayerCost(
                name=layer.name,
                kind=layer.kind,
                macs=macs,
                flops=2 * macs,
                params=layer.params,
                weight_bytes=weight,
                activation_bytes=image_bytes + live.bytes_at(batch, db.activation),
                bytes=moved,
                intensity=2 * macs / moved if moved else 0.0,
            )
        )
    peak = max(layers, key=lambda lc: lc.activation_bytes) if layers else None
    macs = sum(lc.macs for lc in layers)
    weight_bytes = sum(lc.weight_bytes for lc in layers) + spec.other_params * db.other_param
    return CostReport(
        macs=macs,
        flops=2 * macs,
        params=spec.params,
        weight_bytes=weight_bytes,
        activation_bytes=peak.activation_bytes if peak else 0,
        layers=tuple(layers),
        batch=batch,
        dtype=db.name,
        fused_attention=fused_attention,
        peak_layer=peak.name if peak else "",
    )
