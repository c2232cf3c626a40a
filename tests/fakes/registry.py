"""A registry that wants credentials, as Artifact Registry does: Debian's docker-registry
with htpasswd auth on a free loopback port (plain HTTP: loopback only)."""

from __future__ import annotations

import shutil
from pathlib import Path

from core.files import atomic_write
from core.runner import start_server, stop_process
from tests.conftest import free_port


class AuthRegistry:
    def __init__(self, folder: Path, users: dict[str, str]):
        self.folder = folder
        self.users = users
        self.address = f"127.0.0.1:{free_port()}"
        self.pid: int | None = None

    def __enter__(self) -> AuthRegistry:
        import bcrypt
        import httpx

        binary = shutil.which("docker-registry") or shutil.which("registry")
        assert binary, "docker-registry is not installed (setup.sh installs it)"
        self.folder.mkdir(parents=True, exist_ok=True)
        htpasswd = self.folder / "htpasswd"
        atomic_write(
            htpasswd,
            "".join(f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}\n" for user, pw in self.users.items()),
            mode=0o600,
        )
        config = self.folder / "config.yml"
        atomic_write(
            config,
            "version: 0.1\nlog:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.folder / 'data'}\n"
            f"auth:\n  htpasswd:\n    realm: olab-test\n    path: {htpasswd}\n"
            f"http:\n  addr: {self.address}\n",
        )
        self.pid = start_server(
            [binary, "serve", str(config)], cwd=self.folder, log_file=self.folder / "registry.log",
            ready=lambda: httpx.get(f"http://{self.address}/v2/", timeout=2).status_code == 401,
            timeout=30, what="the registry with credentials",
        )
        return self

    def __exit__(self, *exc) -> None:
        if self.pid:
            stop_process(self.pid, grace_seconds=5)
