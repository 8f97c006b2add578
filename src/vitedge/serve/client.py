"""A Python client for ``vitedge serve`` (httpx): send an image, get features or top-k labels.

Light on purpose: it imports neither torch nor the model code, so a VLM application (or another process on
the same box) can call the service without loading the encoder. Features come back as numpy arrays
(``torch.from_numpy`` makes them tensors without a copy)::

    from vitedge.serve import Client

    with Client("http://127.0.0.1:8080") as client:
        out = client.encode("cat.jpg", priority="realtime")
        out.features.shape, out.cache  # (197, 768), "miss"
        client.classify("cat.jpg")[0]  # {"index": 281, "probability": 0.62}

A queue-full answer (429) is retried after its ``Retry-After`` up to ``retries`` times; every other error
raises :class:`ServiceError` with the status and the server's message.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

Image = bytes | str | Path | np.ndarray | Any  # encoded bytes, a file, an (H, W[, C]) uint8 array, PIL


class ServiceError(Exception):
    """The service answered ``status`` (with its ``message``); ``retry_after`` for 429, in seconds."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.retry_after = status, message, retry_after


@dataclass(frozen=True)
class Encoded:
    """One image's features ``(N, D)`` and how the service got them."""

    features: np.ndarray
    cache: str  # the tier that answered, "miss", or "off"
    queue_ms: float
    compute_ms: float
    replica: str | None = None  # the replica that answered, where several serve (--engine ray)


def image_bytes(image: Image) -> bytes:
    """The bytes to send for ``image``: as they are (bytes, a file's content), or PNG-encoded (arrays and
    PIL images, losslessly)."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, str | Path):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"no image file at {path}")
        return path.read_bytes()
    from PIL import Image as PILImage

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(
                f"an array image must be uint8 (H, W) or (H, W, C), got {image.dtype} {image.shape}"
            )
        image = PILImage.fromarray(image)
    if not isinstance(image, PILImage.Image):
        raise ValueError(
            f"cannot send a {type(image).__name__}; give bytes, a path, a uint8 array or a PIL image"
        )
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Client:
    """Calls one service at ``url``.

    Args:
        url: the service's base URL (``serve --json`` prints it).
        api_key: sent as ``Authorization: Bearer``, for a service started with ``--api-key-file``.
        timeout: seconds per request.
        retries: how many times a 429 is retried after its ``Retry-After``.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8080",
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 2,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.retries = retries

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _post(
        self,
        route: str,
        image: Image,
        *,
        accept: str,
        priority: str,
        deadline_ms: float | None,
        img_size: int | None,
    ) -> httpx.Response:
        headers = {"Accept": accept, "X-Priority": priority, "Content-Type": "application/octet-stream"}
        if deadline_ms is not None:
            headers["X-Deadline-Ms"] = str(deadline_ms)
        if img_size is not None:
            headers["X-Img-Size"] = str(img_size)
        body = image_bytes(image)
        for attempt in range(self.retries + 1):
            r = self._http.post(route, content=body, headers=headers)
            if r.status_code == 429 and attempt < self.retries:
                time.sleep(float(r.headers.get("retry-after", 1)))
                continue
            break
        if r.status_code != 200:
            try:
                message = r.json().get("error", r.text)
            except ValueError:
                message = r.text
            retry = r.headers.get("retry-after")
            raise ServiceError(r.status_code, message, float(retry) if retry else None)
        return r

    def encode(
        self,
        image: Image,
        *,
        priority: str = "normal",
        deadline_ms: float | None = None,
        img_size: int | None = None,
    ) -> Encoded:
        """Every token's features ``(N, D)`` for ``image`` (``priority``: realtime, normal or bulk)."""
        from safetensors.numpy import load

        r = self._post(
            "/v1/encode",
            image,
            accept="application/x-safetensors",
            priority=priority,
            deadline_ms=deadline_ms,
            img_size=img_size,
        )
        return Encoded(
            features=load(r.content)["features"],
            cache=r.headers.get("x-cache", "off"),
            queue_ms=float(r.headers.get("x-queue-ms", 0)),
            compute_ms=float(r.headers.get("x-compute-ms", 0)),
            replica=r.headers.get("x-replica"),
        )

    def classify(
        self,
        image: Image,
        *,
        priority: str = "normal",
        deadline_ms: float | None = None,
        img_size: int | None = None,
    ) -> list[dict[str, float]]:
        """The top-k classes of ``image``: ``[{"index", "probability"}, ...]``, most probable first."""
        r = self._post(
            "/v1/classify",
            image,
            accept="application/json",
            priority=priority,
            deadline_ms=deadline_ms,
            img_size=img_size,
        )
        return list(r.json()["top"])

    def ready(self) -> bool:
        """Whether the service is warmed up and admitting work (False while it starts or drains)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def metrics(self) -> str:
        """The Prometheus text of ``/metrics``."""
        r = self._http.get("/metrics")
        if r.status_code != 200:
            raise ServiceError(r.status_code, r.text)
        return r.text
