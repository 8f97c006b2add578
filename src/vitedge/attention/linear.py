"""Linear attention (seed 22.1.4), ``-O linear``: softmax(QK^T)V replaced by phi(Q) (phi(K)^T V).

With a feature map phi: R^d -> R^m applied to every query and key, attention becomes

    out_i = phi(q_i)^T S / phi(q_i)^T z,   S = sum_j phi(k_j) v_j^T  (m x d),   z = sum_j phi(k_j)  (m)

which costs O(N m d) instead of O(N^2 d) and never holds an N x N matrix. ``kind`` picks phi:

- ``performer`` (FAVOR+, Choromanski et al. 2021): positive orthogonal random features,
  phi(x) = m^-1/2 exp(W x' - |x'|^2 / 2), with x' = x * scale^(1/2) so that phi(q)^T phi(k) is an unbiased
  estimate of exp(q^T k * scale). W (m x d) stacks blocks of orthogonal rows (QR of a Gaussian matrix) with
  row norms drawn from the chi distribution of a Gaussian vector. Numerical stability: each query row's
  exponent is shifted by the maximum of its W x' and all keys of a (batch, head) by their common maximum
  (as performer-pytorch does); both shifts cancel in the normalisation. The projection is drawn from
  ``seed`` and the block index, so a model is reproducible; with ``redraw=N`` training forwards draw a new
  one every N calls (inference always uses draw 0, the one the fine-tune ended robust to). The orthogonal
  blocks have the signs of R's diagonal fixed after QR, which makes them Haar-distributed and the estimate
  unbiased (without it, the mean over draws stayed about 6 % off; see docs/attention.md).
- ``elu``: phi(x) = elu(x) + 1 (Katharopoulos et al. 2020), m = d, no randomness.
- ``relu``: phi(x) = relu(x) + eps, m = d.

Precision, as the seed lays it out: the projection W x runs in the inputs' dtype (bf16 under ``-O bf16``),
the feature map, the running sums S and z and the normalisation in fp32. Tokens go through in chunks of
``chunk``, so memory beyond the inputs is O(chunk x m + m x d) per (batch, head) rather than O(N x m): the
key pass keeps a running maximum and rescales S and z when it grows (as an online softmax does).

An additive bias per key (``attn_mask`` of shape (B, H|1, 1, N), e.g. token merging's log-size bias)
multiplies that key's features by exp(bias); a bias that differs per query has no linear form and is refused.
The class and register tokens are keys and queries like any other: nothing assumes a grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vitedge.api import Composition, register
from vitedge.models.base import Encoder, SequenceEncoder
from vitedge.models.spec import KernelCost, product
from vitedge.plan import PlanBuilder

KINDS = ("performer", "elu", "relu")
TOKEN_REDUCERS = ("merge", "prune", "adaptive")  # -O names that change the token count between blocks
EPS = 1e-4  # added to Performer's features (as performer-pytorch does) and to ReLU's
DENOM_MIN = 1e-6  # floor of the normaliser phi(q)^T z


@dataclass(frozen=True, kw_only=True)
class LinearAttnConfig:
    """``kind`` of feature map (:data:`KINDS`); ``features``: Performer's random features m; ``redraw``:
    training forwards between redraws of Performer's features (0: never); ``seed`` of the projections;
    ``chunk``: tokens per chunk of the feature maps (bounds memory)."""

    kind: str = "performer"
    features: int = 256
    redraw: int = 0
    seed: int = 0
    chunk: int = 1024

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"linear:kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.features < 1:
            raise ValueError(f"linear:features must be >= 1, got {self.features}")
        if self.redraw < 0:
            raise ValueError(f"linear:redraw must be >= 0 (0: never), got {self.redraw}")
        if self.chunk < 1:
            raise ValueError(f"linear:chunk must be >= 1 token, got {self.chunk}")


# --- pure math -------------------------------------------------------------------------------------
def orthogonal_features(m: int, d: int, *, generator: torch.Generator) -> torch.Tensor:
    """FAVOR+'s projection: (m, d), blocks of d orthogonal rows, each row scaled to the norm of a Gaussian
    vector in R^d (so every row is distributed as a Gaussian one, and rows of a block are orthogonal)."""
    blocks = []
    for _ in range(math.ceil(m / d)):
        q, r = torch.linalg.qr(torch.randn(d, d, generator=generator))
        # LAPACK's QR leaves the signs of R's diagonal free, which skews Q away from uniform (and the kernel
        # estimate away from unbiased); fixing them makes Q Haar-distributed
        blocks.append((q * r.diagonal().sign()).T)
    w = torch.cat(blocks)[:m]  # (m, d)
    norms = torch.randn(m, d, generator=generator).norm(dim=1)
    return w * norms[:, None]


def _sums_dtype(x: torch.Tensor) -> torch.dtype:
    """Feature maps and running sums: fp32, or fp64 for fp64 inputs (gradient checks)."""
    return torch.promote_types(x.dtype, torch.float32)


def performer_exponent(
    x: torch.Tensor, proj: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """W x' and |x'|^2 / 2 with x' = x * scale^(1/2): x (..., N, d), proj (m, d) -> (..., N, m) and
    (..., N, 1), fp32; the projection runs in the inputs' precision."""
    xs = x * scale**0.5
    acc = _sums_dtype(x)
    dash = (xs @ proj.to(x.dtype).T).to(acc)
    return dash, xs.to(acc).pow(2).sum(-1, keepdim=True) / 2


def feature_map(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The deterministic maps: (..., N, d) -> (..., N, d) fp32."""
    xf = x.to(_sums_dtype(x))
    if kind == "elu":
        return F.elu(xf) + 1.0
    if kind == "relu":
        return F.relu(xf) + EPS
    raise ValueError(f"{kind!r} has no deterministic feature map; one of elu, relu")


def _key_bias(attn_mask: torch.Tensor | None, b: int, h: int, n: int) -> torch.Tensor | None:
    """An additive bias that depends on the key only, as (B, H, N, 1) fp32; a per-query bias is refused."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        raise ValueError("linear attention takes an additive float bias per key, not a boolean mask")
    if attn_mask.dim() != 4 or attn_mask.shape[-2] != 1:
        raise ValueError(
            "linear attention takes only a bias that depends on the key (shape (B, H|1, 1, N)), got "
            f"{tuple(attn_mask.shape)}: a bias per query and key has no linear form"
        )
    return attn_mask.to(_sums_dtype(attn_mask)).expand(b, h, 1, n).transpose(-2, -1)  # (B, H, N, 1)


def _exp_features(
    dash: torch.Tensor, half_norm: torch.Tensor, shift: torch.Tensor, grad: bool
) -> torch.Tensor:
    """FAVOR+'s features exp(W x' - |x'|^2 / 2 - shift) + EPS (before the m^-1/2, which cancels), written
    over ``dash`` at inference; out of place when autograd records them (it needs exp's output)."""
    if grad:
        return (dash - half_norm - shift).exp() + EPS
    return dash.sub_(half_norm).sub_(shift).exp_().add_(EPS)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    kind: str,
    proj: torch.Tensor | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Linear attention, called like ``F.scaled_dot_product_attention``.

    q, k, v: (B, H, N, d) (k, v may have another length M); ``proj`` (m, d) for ``performer`` ->
    (B, H, N, d) in q's dtype. ``attn_mask``: an additive bias per key, (B, H|1, 1, M), or None.
    """
    b, h, n, d = q.shape
    mk = k.shape[-2]
    scale = d**-0.5 if scale is None else scale
    if kind == "performer" and proj is None:
        raise ValueError("performer attention needs its projection (m, d)")
    bias = _key_bias(attn_mask, b, h, mk)
    e = v.shape[-1]
    m = proj.shape[0] if proj is not None and kind == "performer" else d
    acc = _sums_dtype(q)
    s = q.new_zeros(b, h, m, e, dtype=acc)  # sum_j phi(k_j) v_j^T
    z = q.new_zeros(b, h, m, 1, dtype=acc)  # sum_j phi(k_j)
    top = torch.full((b, h, 1, 1), -math.inf, dtype=acc, device=q.device)  # running key max
    # in-place exp/scale/clamp save memory at inference; under autograd they would overwrite what the
    # backward pass needs (exp's output, the sums before a rescale)
    grad = torch.is_grad_enabled()
    for start in range(0, mk, chunk):
        kc = k[:, :, start : start + chunk]
        vc = v[:, :, start : start + chunk].to(acc)
        if kind == "performer":
            assert proj is not None
            dash, half_norm = performer_exponent(kc, proj, scale)  # (B, H, c, m), (B, H, c, 1)
            new_top = torch.maximum(top, dash.amax(dim=(-2, -1), keepdim=True))
            if start:  # earlier chunks were shifted by the old maximum
                shrink = (top - new_top).exp()
                s, z = (s * shrink, z * shrink) if grad else (s.mul_(shrink), z.mul_(shrink))
            top = new_top
            phi = _exp_features(dash, half_norm, top, grad)
            del dash  # phi is dash itself at inference
        else:
            phi = feature_map(kc, kind)
        if bias is not None:  # a key weighted by exp(bias), as if present exp(bias) times
            phi = phi * bias[:, :, start : start + chunk].exp()
        kv = phi.transpose(-2, -1) @ vc  # (B, H, m, e)
        ksum = phi.sum(-2).unsqueeze(-1)  # (B, H, m, 1)
        del phi  # before the next chunk's features exist
        s, z = (s + kv, z + ksum) if grad else (s.add_(kv), z.add_(ksum))
        del kv, ksum
    out = q.new_empty(b, h, n, e, dtype=acc)
    for start in range(0, n, chunk):
        qc = q[:, :, start : start + chunk]
        if kind == "performer":
            assert proj is not None
            dash, half_norm = performer_exponent(qc, proj, scale)
            phi = _exp_features(dash, half_norm, dash.amax(-1, keepdim=True), grad)  # the shift cancels
            del dash
        else:
            phi = feature_map(qc, kind)
        num = phi @ s  # (B, H, c, e)
        den = (phi @ z).clamp_min(DENOM_MIN)  # (B, H, c, 1)
        del phi
        out[:, :, start : start + chunk] = num / den if grad else num.div_(den)
        del num, den
    return out.to(q.dtype)


def linear_attention_cost(
    *, name: str, tokens: int, heads: int, head_dim: int, kind: str, features: int, chunk: int
) -> KernelCost:
    """Matmul work and peak elements of :func:`linear_attention` for one image at inference (fp32, no key
    bias), N = ``tokens``, m features (d for elu/relu), c = min(chunk, N) rows at a time:

    * MACs: the feature projections of q and k (performer: 2 N d m), the key sums phi(K)^T V (m N d) and
      the output phi(Q) [S | z] (N m (d + 1)), per head;
    * peak: the output (N d), one chunk's exponent, features and temporaries (c (m + d + 2), plus c d for
      performer's squared norms) and the running sums (m (d + 1)), per head.
    """
    n, d = tokens, head_dim
    m = features if kind == "performer" else d
    c = min(chunk, n)
    # elu/relu are fixed maps: no feature projection
    features_op = product(f"{name}.features", tokens=2 * heads * n, in_features=d, out_features=m)
    ops = [features_op] if kind == "performer" else []
    ops += [
        product(f"{name}.kv", tokens=heads * m, in_features=n, out_features=d),
        product(f"{name}.out", tokens=heads * n, in_features=m, out_features=d + 1),  # numerator | normaliser
    ]
    chunk_elements = c * (m + d + 2) + (c * d if kind == "performer" else 0)
    return KernelCost(ops=tuple(ops), elements=heads * (n * d + chunk_elements + m * (d + 1)))


def softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """The materialised softmax(q k^T * scale) v in fp32: the reference the approximations are measured
    against. q, k, v: (B, H, N, d) -> (B, H, N, d)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return ((q.float() @ k.float().transpose(-2, -1)) * scale).softmax(-1) @ v.float()


# --- technique -------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class _Draws:
    """The projections one step has drawn, by (draw, d, device); training forwards counted for redraws."""

    calls: int = 0
    cache: dict[tuple[int, int, str], torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class LinearAttentionStep:
    """The attention step of one block: :func:`linear_attention` with the block's own projection."""

    config: LinearAttnConfig
    block: int
    label: str
    draws: _Draws = field(default_factory=_Draws, compare=False, repr=False)

    @property
    def detail(self) -> str:
        c = self.config
        return f"linear {c.kind}" + (f" m={c.features}" if c.kind == "performer" else "")

    def cost(self, *, name: str, tokens: int, heads: int, head_dim: int) -> KernelCost:
        c = self.config
        return linear_attention_cost(
            name=name,
            tokens=tokens,
            heads=heads,
            head_dim=head_dim,
            kind=c.kind,
            features=c.features,
            chunk=c.chunk,
        )

    def projection(self, d: int, device: torch.device, draw: int = 0) -> torch.Tensor:
        """Performer's (m, d) projection of draw ``draw``: a function of the seed, the block and the draw."""
        key = (draw, d, str(device))
        proj = self.draws.cache.get(key)
        if proj is None:
            g = torch.Generator().manual_seed(hash_seed(self.config.seed, self.block, draw))
            proj = orthogonal_features(self.config.features, d, generator=g).to(device)
            self.draws.cache = {k: p for k, p in self.draws.cache.items() if k[0] == 0 or k[0] == draw}
            self.draws.cache[key] = proj
        return proj

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        c = self.config
        proj = None
        if c.kind == "performer":
            draw = 0
            if c.redraw and torch.is_grad_enabled() and q.requires_grad:  # a training forward
                draw = self.draws.calls // c.redraw
                self.draws.calls += 1
            proj = self.projection(q.shape[-1], q.device, draw)
        return linear_attention(q, k, v, attn_mask, scale, kind=c.kind, proj=proj, chunk=c.chunk)


def hash_seed(seed: int, block: int, draw: int) -> int:
    """One generator seed per (seed, block, draw), stable across processes (no Python ``hash``)."""
    return (seed * 1_000_003 + block * 10_007 + draw) % (2**63)


def linear_steps(model: Encoder, config: LinearAttnConfig, plan: PlanBuilder) -> None:
    for i in range(plan.depth):
        plan.set_block(i, "attention", LinearAttentionStep(config=config, block=i, label=plan.current))


def check_sequence(model: Encoder, name: str) -> None:
    """A ValueError unless vitedge's token loop can replace ``model``'s attention."""
    if not isinstance(model, SequenceEncoder):
        raise ValueError(
            f"{name} needs a single-sequence encoder (ViT, DeiT, CLIP, SigLIP, ViT4MNIST); "
            f"{model.model_id} is a {model.info.family} model (Swin's windowed attention, with its "
            "relative-position bias and shifted-window masks, runs inside timm's blocks; its window kernel "
            "is -O winkernel)"
        )
    if any(v.attn.rope for v in model.blocks):
        raise ValueError(
            f"{name} cannot run on {model.model_id}: its rotary position embeddings (EVA) are applied "
            "inside timm's attention, which vitedge's attention loop does not reproduce"
        )


@register("linear", steps=linear_steps, compose=Composition(fills=frozenset({"attention"})))
def _apply_linear(model: Encoder, config: LinearAttnConfig) -> None:
    check_sequence(model, "linear")
