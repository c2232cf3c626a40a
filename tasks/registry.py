"""An OCI registry: asked over its HTTP API (v2) whether a tag exists.

For a loopback registry address olab runs the registry itself (Debian's
``docker-registry``), shared by every site of this olab home.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx

from olab.files import atomic_write
from olab.runner import ToolMissing, pid_alive, start_background, stop_process

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


def ensure_local_registry(store: Path, address: str) -> Registry:
    """Start olab's registry on a loopback address unless it already answers."""
    registry = Registry(address)
    if registry.answers():
        return registry
    binary = shutil.which("docker-registry") or shutil.which("registry")
    if not binary:
        raise ToolMissing(f"no registry answers at {address} and none is installed to start: apt-get install docker-registry")
    folder = store / "registry"
    folder.mkdir(parents=True, exist_ok=True)
    host = address.split("/")[0]
    config = folder / "config.yml"
    atomic_write(
        config,
        "version: 0.1\nlog:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {folder / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: {host}\n",
    )
    pid_file = folder / "registry.pid"
    old = int(pid_file.read_text()) if pid_file.exists() else None
    if pid_alive(old):
        stop_process(old)
    pid = start_background([binary, "serve", str(config)], cwd=folder, log_file=folder / "registry.log")
    pid_file.write_text(str(pid))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if registry.answers():
            return registry
        if not pid_alive(pid):
            break
        time.sleep(0.1)
    raise RuntimeError(f"the registry did not start at {address}; see {folder / 'registry.log'}")


def stop_local_registry(store: Path) -> bool:
    pid_file = store / "registry" / "registry.pid"
    if not pid_file.exists():
        return False
    return stop_process(int(pid_file.read_text()))
