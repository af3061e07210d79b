"""Names of cached files (images, snapshots, probe answers): a short hash of their inputs."""

from __future__ import annotations

import hashlib


def cache_key(*parts: str | bytes) -> str:
    """A short, stable hash of the given inputs, used in cached file names."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()[:16]
