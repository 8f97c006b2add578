"""The on-store format of one cached feature: no pickle, self-describing, verified on every read.

Layout: ``MAGIC`` (8 bytes), header length (4 bytes, little endian), a JSON header, then the payload.
The header names the entry's namespace and key, the value format, shape and payload length, and carries a
BLAKE3-256 checksum over the header's other fields and the payload. :func:`decode` checks all of it and
raises :class:`CorruptEntry` on any mismatch, which every tier treats as a miss.

Formats: ``fp16`` (the feature as float16) or ``int8`` (symmetric int8 with one float32 scale per token).
"""

from __future__ import annotations

import json
import struct

import blake3
import numpy as np

__all__ = ["FORMATS", "MAGIC", "CorruptEntry", "decode", "encode", "peek_namespace"]

MAGIC = b"VTEDGEF1"
FORMATS = ("fp16", "int8")
_LEN = struct.Struct("<I")
_MAX_HEADER = 1 << 16


class CorruptEntry(ValueError):
    """A stored entry failed verification (truncated, altered, or written for another key/namespace)."""


def _checksum(fields: dict[str, object], payload: bytes | memoryview) -> str:
    h = blake3.blake3(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())
    h.update(payload)
    return h.hexdigest()


def encode(features: np.ndarray, *, namespace: str, key: str, fmt: str = "fp16") -> bytes:
    """Serialise one feature array ``(N, D)`` (any float dtype) for ``key`` in ``namespace``.

    Raises:
        ValueError: ``fmt`` is not fp16/int8, or ``features`` is not 2-D.
    """
    if fmt not in FORMATS:
        raise ValueError(f"value format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    arr = np.asarray(features, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"features must be (tokens, dim), got shape {arr.shape}")
    if fmt == "fp16":
        payload = arr.astype("<f2").tobytes()
    else:
        scale = np.abs(arr).max(axis=1) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype("<f4")
        q = np.clip(np.rint(arr / scale[:, None]), -127, 127).astype(np.int8)
        payload = scale.tobytes() + q.tobytes()
    fields = {"ns": namespace, "key": key, "fmt": fmt, "shape": list(arr.shape), "n": len(payload)}
    header = json.dumps({**fields, "b3": _checksum(fields, payload)}).encode()
    return MAGIC + _LEN.pack(len(header)) + header + payload


def _split(blob: bytes) -> tuple[dict, memoryview]:
    if len(blob) < len(MAGIC) + _LEN.size or blob[: len(MAGIC)] != MAGIC:
        raise CorruptEntry("entry has no vitedge header")
    (hlen,) = _LEN.unpack_from(blob, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    if hlen > _MAX_HEADER or start + hlen > len(blob):
        raise CorruptEntry("entry header is truncated")
    try:
        header = json.loads(bytes(blob[start : start + hlen]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptEntry(f"entry header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise CorruptEntry("entry header is not a JSON object")
    return header, memoryview(blob)[start + hlen :]


def peek_namespace(blob: bytes) -> str | None:
    """The namespace an entry claims (unverified), or None when the header is unreadable."""
    try:
        return str(_split(blob)[0].get("ns"))
    except CorruptEntry:
        return None


def decode(blob: bytes, *, namespace: str, key: str) -> np.ndarray:
    """Verify and decode an entry into float32 ``(N, D)``.

    Raises:
        CorruptEntry: bad magic or header, wrong namespace or key, wrong length, or checksum mismatch.
    """
    header, payload = _split(blob)
    try:
        fields = {k: header[k] for k in ("ns", "key", "fmt", "shape", "n")}
        stored_sum = str(header["b3"])
        n_tok, dim = (int(v) for v in fields["shape"])  # type: ignore[attr-defined]
    except (KeyError, TypeError, ValueError):
        raise CorruptEntry("entry header lacks fields") from None
    if fields["ns"] != namespace:
        raise CorruptEntry(f"entry belongs to namespace {fields['ns']!r}, not {namespace!r}")
    if fields["key"] != key:
        raise CorruptEntry("entry was written for another key")
    if fields["n"] != len(payload):
        raise CorruptEntry(f"entry payload is {len(payload)} bytes, header says {fields['n']}")
    if _checksum(fields, payload) != stored_sum:
        raise CorruptEntry("entry checksum mismatch")
    if fields["fmt"] == "fp16":
        if len(payload) != n_tok * dim * 2:
            raise CorruptEntry("fp16 payload size does not match its shape")
        return np.frombuffer(payload, dtype="<f2").reshape(n_tok, dim).astype(np.float32)
    if fields["fmt"] == "int8":
        if len(payload) != n_tok * 4 + n_tok * dim:
            raise CorruptEntry("int8 payload size does not match its shape")
        scale = np.frombuffer(payload[: n_tok * 4], dtype="<f4")
        q = np.frombuffer(payload[n_tok * 4 :], dtype=np.int8).reshape(n_tok, dim)
        return q.astype(np.float32) * scale[:, None]
    raise CorruptEntry(f"entry has unknown format {fields['fmt']!r}")
