"""An OCI registry, any registry: asked over its HTTP API (v2) whether a tag exists."""

from __future__ import annotations

import httpx

MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


class Registry:
    def __init__(self, address: str, *, insecure: bool = True):
        self.address = address
        host = address.split("/")[0]
        self.prefix = address[len(host):].strip("/")
        scheme = "http" if insecure else "https"
        self.base = f"{scheme}://{host}/v2"

    def repository(self, name: str) -> str:
        return f"{self.address}/{name}"

    def manifest_digest(self, name: str, tag: str) -> str | None:
        """The digest of ``name:tag`` if the registry has it, else None."""
        path = f"{self.prefix}/{name}" if self.prefix else name
        response = httpx.head(f"{self.base}/{path}/manifests/{tag}", headers={"Accept": MANIFEST_TYPES}, timeout=15)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.headers.get("Docker-Content-Digest")

    def answers(self) -> bool:
        try:
            return httpx.get(f"{self.base}/", timeout=2).status_code in (200, 401)
        except httpx.TransportError:
            return False
