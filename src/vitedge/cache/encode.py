"""``vitedge.encode(images, model, cache=...)``: encoder features served from the tiered cache when known.

Also the plain functions behind ``vitedge encode``, ``vitedge cache stats`` and ``vitedge cache invalidate``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vitedge.cache.keys import Namespace, content_digest
from vitedge.cache.store import CacheConfig, FeatureCache

__all__ = [
    "EncodeReport",
    "encode",
    "encode_report",
    "forward_features",
    "list_images",
    "run_cache_invalidate",
    "run_cache_stats",
]

log = logging.getLogger(__name__)

ImageLike = str | Path | Image.Image | np.ndarray | torch.Tensor
CacheLike = FeatureCache | CacheConfig | str | None


@dataclass
class EncodeReport:
    """What one :func:`encode_report` call did."""

    features: torch.Tensor  # (B, N, D) float32
    hits: int = 0
    misses: int = 0
    compute_s: float = 0.0  # forward time spent on the misses
    lookup_s: float = 0.0  # time spent reading the cache
    namespace: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"} of files skipped


_FILE_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError)


def _pixels(image: ImageLike, max_pixels: int) -> torch.Tensor:
    """Any accepted image -> decoded uint8 ``(C, H, W)``."""
    from vitedge.data import read_image, to_uint8_tensor

    if isinstance(image, str | Path):
        return to_uint8_tensor(read_image(image, max_pixels=max_pixels))
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3:
            raise ValueError(
                "image tensors must be uint8 (C, H, W) decoded pixels, "
                f"got {image.dtype} {tuple(image.shape)}"
            )
        return image.contiguous()
    return to_uint8_tensor(image)


def _as_cache(cache: CacheLike) -> tuple[FeatureCache | None, bool]:
    """The cache object and whether this call owns (and must close) it."""
    if cache is None or isinstance(cache, FeatureCache):
        return cache, False
    if isinstance(cache, CacheConfig):
        return FeatureCache(cache), True
    if isinstance(cache, str):
        return FeatureCache(CacheConfig.parse(cache)), True
    raise TypeError(
        "cache must be a FeatureCache, CacheConfig, tier list such as 'memory,disk', or None, "
        f"got {type(cache).__name__}"
    )


def forward_features(model: Any, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, N, D)
    """The features `encode` returns for a preprocessed batch: the model's dtype and autocast, float32 out."""
    with torch.inference_mode():
        x = x.to(model.compute_dtype)
        with model.autocast(x):  # the same autocast as the model's own forward
            return model.forward_features(x).float()


def encode_report(
    images: ImageLike | Sequence[ImageLike],
    model: Any,
    *,
    cache: CacheLike = "memory",
    batch: int = 16,
    progress: Callable[[int], None] | None = None,
    skip_bad_files: bool = False,
    max_pixels: int | None = None,
) -> EncodeReport:
    """Like :func:`encode`, and also count hits, misses and time (see :class:`EncodeReport`).

    With ``skip_bad_files``, a file that cannot be read (undecodable, truncated, over ``max_pixels``) is
    reported in ``errors`` and skipped, and ``features`` holds the files that were encoded, in order.
    """
    from vitedge.data import build_transform
    from vitedge.data.images import DEFAULT_MAX_PIXELS
    from vitedge.models import Encoder, load

    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    enc = load(model) if isinstance(model, str) else model
    if not isinstance(enc, Encoder):
        raise TypeError(f"model must be a model id or a vitedge Encoder, got {type(model).__name__}")
    items = (
        [images] if isinstance(images, str | Path | Image.Image | np.ndarray | torch.Tensor) else list(images)
    )
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        items = list(images)
    store, owned = _as_cache(cache)
    ns = Namespace.of(enc)
    digest = ns.digest
    transform = build_transform(enc.preprocess)
    report = EncodeReport(features=torch.empty(0), namespace=digest)
    try:
        if store is not None:
            store.register(digest, ns.to_json())
        out: list[torch.Tensor | None] = [None] * len(items)
        pending: list[tuple[int, str, torch.Tensor]] = []
        done = 0
        for i, item in enumerate(items):
            try:
                px = _pixels(item, max_pixels or DEFAULT_MAX_PIXELS)
            except _FILE_ERRORS as e:
                if not (skip_bad_files and isinstance(item, str | Path)):
                    raise
                report.errors.append({"path": str(item), "reason": str(e).splitlines()[0]})
                log.warning("encode: skipped %s: %s", item, e)
                done += 1
                if progress:
                    progress(done)
                continue
            content = content_digest(px.numpy())
            if store is not None:
                t0 = time.perf_counter()
                cached = store.get(digest, content)
                report.lookup_s += time.perf_counter() - t0
                if cached is not None:
                    out[i] = torch.from_numpy(cached)
                    report.hits += 1
                    done += 1
                    if progress:
                        progress(done)
                    continue
            pending.append((i, content, transform.batch(px)))
            if len(pending) == batch:
                done += _compute(enc, pending, out, store, digest, report)
                pending = []
                if progress:
                    progress(done)
        if pending:
            done += _compute(enc, pending, out, store, digest, report)
            if progress:
                progress(done)
        encoded = [t for t in out if t is not None]
        report.features = torch.stack(encoded) if encoded else torch.empty(0)
        return report
    finally:
        if owned and store is not None:
            store.close()


def _compute(
    enc: Any,
    pending: list[tuple[int, str, torch.Tensor]],
    out: list[torch.Tensor | None],
    store: FeatureCache | None,
    namespace: str,
    report: EncodeReport,
) -> int:
    t0 = time.perf_counter()
    feats = forward_features(enc, torch.stack([x for _, _, x in pending]))
    elapsed = time.perf_counter() - t0
    report.compute_s += elapsed
    report.misses += len(pending)
    for (i, content, _), f in zip(pending, feats, strict=True):
        if store is None:
            out[i] = f
        else:
            # What a later hit returns (fp16/int8 rounded), so hits and misses agree exactly.
            out[i] = torch.from_numpy(store.put(namespace, content, f.numpy(), cost=elapsed / len(pending)))
    return len(pending)


def encode(
    images: ImageLike | Sequence[ImageLike],
    model: Any,
    *,
    cache: CacheLike = "memory",
    batch: int = 16,
) -> torch.Tensor:
    """Encoder features ``(B, N, D)`` float32 for images, from the cache where it holds them.

    Args:
        images: one image or a sequence: file paths, PIL images, uint8 arrays ``(H, W[, C])`` or uint8 tensors
            ``(C, H, W)`` (or a uint8 batch ``(B, C, H, W)``).
        model: a loaded :class:`~vitedge.models.base.Encoder` or a model id.
        cache: a :class:`FeatureCache` (reused across calls), a :class:`CacheConfig`, a tier list such as
            ``"memory,disk,redis"``, or None to compute without caching. A config or string builds a cache
            for this call only; pass a FeatureCache to keep the memory tier warm between calls.
        batch: images per forward for the misses.

    Returns:
        The features, rounded through the cache's value format (fp16 by default) when a cache is used, so a
        hit and a miss give the same tensor.

    Raises:
        ValueError: a bad tier name, image, or batch size; TypeError: a wrong argument type.
    """
    return encode_report(images, model, cache=cache, batch=batch).features


def list_images(directory: str | Path, *, limit: int | None = None) -> list[Path]:
    """Image files under ``directory`` (recursively, sorted); ``imagenet-sample`` names the shared sample."""
    from vitedge.data import IMAGE_EXTENSIONS
    from vitedge.paths import data_root

    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be a positive integer, got {limit}")
    root = (
        data_root() / "imagenet-sample"
        if str(directory) == "imagenet-sample"
        else Path(directory).expanduser()
    )
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"{root} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files[:limit]


def _single_image_ms(enc: Any, path: Path) -> float:
    from vitedge.data import build_transform, read_image

    x = build_transform(enc.preprocess)(read_image(path)).unsqueeze(0)  # the guarded decode path
    forward_features(enc, x)
    t0 = time.perf_counter()
    forward_features(enc, x)
    return (time.perf_counter() - t0) * 1e3


def run_encode(
    model_id: str,
    directory: str | Path,
    *,
    cache: str = "memory,disk",
    value_format: str = "fp16",
    batch: int = 16,
    limit: int | None = None,
    threads: int = 2,
    cache_dir: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    opts: list[str] | None = None,
    weights: Path | None = None,
    max_pixels: int | None = None,
    redis_ttl_s: int | None = None,
    redis_max_bytes: str | None = None,
) -> dict[str, Any]:
    """Encode every image under ``directory`` through the cache (with the ``-O`` stack ``opts``); report
    hits and time saved. A file that cannot be read is reported in ``errors`` and the rest are encoded."""
    from vitedge.commands import build_model
    from vitedge.options import parse_options

    files = list_images(directory, limit=limit)
    from vitedge.measure.memory import parse_bytes

    config = CacheConfig.parse(
        cache,
        value_format=value_format,
        disk_dir=cache_dir,
        redis_ttl_s=redis_ttl_s,
        redis_max_bytes=None if redis_max_bytes is None else parse_bytes(redis_max_bytes),
    )
    torch.set_num_threads(threads)
    # random-weight models come from a fixed seed: a stable namespace
    enc = build_model(model_id, parse_options(opts or []), img_size=None, weights=weights)
    t0 = time.perf_counter()
    with FeatureCache(config) as store:
        rep = encode_report(
            files,
            enc,
            cache=store,
            batch=batch,
            progress=(lambda n: progress(n, len(files))) if progress else None,
            skip_bad_files=True,
            max_pixels=max_pixels,
        )
        total_s = time.perf_counter() - t0
        per_image_ms = rep.compute_s * 1e3 / rep.misses if rep.misses else 0.0
        if not rep.misses and rep.hits:
            bad = {e["path"] for e in rep.errors}
            good = [f for f in files if str(f) not in bad]
            per_image_ms = _single_image_ms(enc, good[0])
        tiers = store.report()
    saved = max(rep.hits * per_image_ms / 1e3 - rep.lookup_s, 0.0)
    encoded = rep.hits + rep.misses
    return {
        "model": model_id,
        "name": " ".join(opts or []) or "baseline",
        "images": len(files),
        "encoded": encoded,
        "errors": rep.errors,
        "hits": rep.hits,
        "misses": rep.misses,
        "hit_rate": rep.hits / encoded if encoded else 0.0,
        "time_s": total_s,
        "compute_s": rep.compute_s,
        "lookup_s": rep.lookup_s,
        "compute_ms_per_image": per_image_ms,
        "time_saved_s": saved,
        "namespace": rep.namespace,
        "value_format": value_format,
        "shape": list(rep.features.shape[1:]),
        "tiers": tiers,
    }


def _store_for_admin(cache: str, cache_dir: str | None) -> FeatureCache:
    config = CacheConfig.parse(cache, disk_dir=cache_dir)
    if "memory" in config.tiers:
        raise ValueError(
            "the memory tier lives inside one process; 'cache' commands take disk, redis, redis-cluster"
        )
    return FeatureCache(config)


def run_cache_stats(*, cache: str = "disk,redis", cache_dir: str | None = None) -> dict[str, Any]:
    """What each persistent tier holds, and the namespaces (model, weights, settings) it holds them for."""
    with _store_for_admin(cache, cache_dir) as store:
        tiers = {tier.name: tier.info() for tier in store.tiers}
        namespaces = store.namespaces()
    return {
        "tiers": tiers,
        "namespaces": [
            {"namespace": ns, "model_id": meta.get("model_id"), "configs": meta.get("configs", [])}
            for ns, meta in sorted(namespaces.items())
        ],
    }


def run_cache_invalidate(
    model_id: str, *, cache: str = "disk,redis", cache_dir: str | None = None
) -> dict[str, Any]:
    """Drop every namespace of ``model_id`` (any weights, preprocessing or optimisation) from the tiers."""
    if not model_id:
        raise ValueError("--model must name a model id, e.g. timm:vit_base_patch16_224")
    with _store_for_admin(cache, cache_dir) as store:
        matching = [ns for ns, meta in store.namespaces().items() if meta.get("model_id") == model_id]
        dropped: dict[str, int] = {t.name: 0 for t in store.tiers}
        for ns in matching:
            for name, n in store.drop_namespace(ns).items():
                dropped[name] += n
    return {"model": model_id, "namespaces": matching, "entries_dropped": dropped}
