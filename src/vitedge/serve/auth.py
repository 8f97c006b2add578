"""API keys for the encoder service: stored hashed, compared in constant time.

A key file holds one key per line as ``sha256:<64 hex digits>`` (the SHA-256 of the key's UTF-8 bytes), an
optional label after whitespace, and ``#`` comments. The keys themselves never touch the disk on the server::

    KEY=$(python -c "import secrets; print(secrets.token_urlsafe(32))")
    echo "sha256:$(printf %s "$KEY" | sha256sum | cut -d' ' -f1) my-app" >> keys.txt

Clients send the key as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``. Keys are random tokens, not
passwords, so one SHA-256 suffices (no slow key derivation); every stored hash is compared with
:func:`hmac.compare_digest`, without stopping at the first match, so the time taken says nothing about which
or how many bytes matched.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(r"^sha256:([0-9a-fA-F]{64})(?:\s+(.*))?$")


def hash_key(key: str) -> str:
    """The line to store for ``key``: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRing:
    """The hashed keys a service accepts (``digests``: raw SHA-256 digests) and their labels."""

    digests: tuple[bytes, ...]
    labels: tuple[str, ...]

    @classmethod
    def from_file(cls, path: str | Path) -> KeyRing:
        """Read a key file (see the module docstring).

        Raises:
            ValueError: the file is missing, holds no key, or a line is not a hashed key.
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"API key file {path} does not exist")
        return cls.from_lines(path.read_text().splitlines(), source=f"API key file {path}")

    @classmethod
    def from_lines(cls, lines: list[str], *, source: str = "the key list") -> KeyRing:
        """Parse the lines of a key file (what :meth:`lines` writes back).

        Raises:
            ValueError: no key, or a line is not a hashed key.
        """
        digests: list[bytes] = []
        labels: list[str] = []
        for number, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            match = _LINE.match(line)
            if match is None:
                raise ValueError(
                    f"line {number} of {source} is not a hashed key: store 'sha256:<64 hex digits> [label]', "
                    'the SHA-256 of the key (printf %s "$KEY" | sha256sum), never the key itself'
                )
            digests.append(bytes.fromhex(match.group(1)))
            labels.append(match.group(2) or f"key{len(labels) + 1}")
        if not digests:
            raise ValueError(f"{source} holds no key")
        return cls(tuple(digests), tuple(labels))

    def lines(self) -> list[str]:
        """The hashed keys as key-file lines (to hand to another process; no key is in them)."""
        return [f"sha256:{d.hex()} {label}" for d, label in zip(self.digests, self.labels, strict=True)]

    def check(self, presented: str | None) -> str | None:
        """The label of the key ``presented`` matches, or None; the same work whatever matches."""
        if not presented:
            return None
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for stored, label in zip(self.digests, self.labels, strict=True):
            if hmac.compare_digest(stored, digest):
                found = label
        return found


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key a request carries: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``."""
    if x_api_key:
        return x_api_key.strip()
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, *, keys: KeyRing | None, insecure: bool) -> None:
    """Refuse to serve beyond this machine without API keys, unless the user says ``--insecure``."""
    if keys is None and not insecure and not is_loopback(host):
        raise ValueError(
            f"--host {host} would serve other machines with no API key; give --api-key-file FILE "
            "(hashed keys), or --insecure to serve without keys"
        )
