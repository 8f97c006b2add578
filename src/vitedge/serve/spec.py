"""What one encoder service is built from, as JSON: the CLI builds its service from it, and each Ray Serve
replica (:mod:`vitedge.scale.replicas`) rebuilds the same service from the same JSON in its own process.

A spec names the model and its ``-O`` stack (never a loaded model), so it crosses process boundaries as
plain JSON; API keys travel as their hashed key-file lines.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ServiceSpec"]


@dataclass(frozen=True, kw_only=True)
class ServiceSpec:
    """One encoder service: the model, its batcher and its limits.

    Attributes:
        model: a model id or an ``optimize --out`` directory.
        opts: ``-O`` strings applied on load.
        img_sizes: input sizes served (the first is the default); empty: the model's own.
        weights: local weights for ``timm:`` models.
        max_batch: images per forward at most; None: the warm-up's sweet spot within the memory plan.
        threads: torch threads of the model worker.
        cache: feature-cache tiers for ``/v1/encode``; None: off.
        keys: accepted API keys as hashed key-file lines; None: open.
        replica: a name this service puts in its answers' ``X-Replica`` header (None: no header).
    """

    model: str
    opts: tuple[str, ...] = ()
    img_sizes: tuple[int, ...] = ()
    weights: str | None = None
    max_batch: int | None = None
    max_wait_ms: float = 10.0
    queue: int = 256
    deadline_ms: float = 30_000.0
    latency_target_ms: float | None = None
    memory_budget: str | None = None
    threads: int = 2
    cache: str | None = "memory"
    redis_url: str | None = None
    keys: tuple[str, ...] | None = None
    replica: str | None = None
    sweep_seconds: float = 20.0

    def __post_init__(self) -> None:
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (or None: auto), got {self.max_batch}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.img_sizes and (min(self.img_sizes) < 1 or len(set(self.img_sizes)) != len(self.img_sizes)):
            raise ValueError(f"img_sizes must be distinct positive sizes, got {list(self.img_sizes)}")

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServiceSpec:
        """Rebuild a spec from :meth:`to_json`; unknown keys are an error, not ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown service spec keys: {', '.join(unknown)}")
        fixed: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fixed)

    def build(self, *, on_ready: Callable[[], None] | None = None) -> Any:
        """Load the model(s) and return the FastAPI app (:func:`vitedge.serve.app.create_app`)."""
        from vitedge.commands import build_model
        from vitedge.options import parse_options
        from vitedge.serve.app import ServeConfig, create_app
        from vitedge.serve.auth import KeyRing
        from vitedge.serve.batcher import BatcherConfig

        configs = parse_options(list(self.opts))
        weights = Path(self.weights) if self.weights is not None else None
        encoders = {}
        for size in self.img_sizes or (None,):
            enc = build_model(self.model, configs, img_size=size, weights=weights)
            encoders[tuple(enc.img_size)] = enc
        batcher = BatcherConfig(
            max_batch=64 if self.max_batch is None else self.max_batch,
            max_wait_ms=self.max_wait_ms,
            queue_size=self.queue,
            deadline_ms=self.deadline_ms,
            latency_target_ms=self.latency_target_ms,
        )
        config = ServeConfig(
            batcher=batcher,
            threads=self.threads,
            cache=self.cache,
            redis_url=self.redis_url,
            keys=None if self.keys is None else KeyRing.from_lines(list(self.keys)),
            auto_batch=self.max_batch is None,
            memory_budget=self.memory_budget,
            sweep_seconds=self.sweep_seconds,
            replica=self.replica,
        )
        return create_app(encoders, config, on_ready=on_ready)
