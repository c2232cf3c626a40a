"""The local target's registry: for a loopback registry address olab runs one itself
(Debian's ``docker-registry``), shared by every site of this olab home.

It requires credentials (htpasswd, bcrypt): pushes and deletes are olab's alone, not
anyone's who reaches the loopback port (a student's process on the host network could
otherwise push an image under the next content tag, which olab would pin and deploy to
everyone). The credential is made once and kept in ``<store>/registry/credentials.json``
(0600, in a 0700 folder); the registry reads its bcrypt hash only. olab also records every
digest it pushed there, and build-image refuses to reuse a tag whose digest it did not push.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from core.files import atomic_write
from core.models import RegistryLogin
from core.runner import ServerDidNotStart, ToolMissing, pid_alive, read_pid_file, register_secrets, start_server, stop_pid_file
from tasks.registry import Registry

USER = "olab"


def _folder(store: Path) -> Path:
    folder = store / "registry"
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder


def registry_login(store: Path) -> RegistryLogin:
    """olab's credential for its own registry (made the first time)."""
    path = _folder(store) / "credentials.json"
    try:
        password = json.loads(path.read_text())["password"]
    except (OSError, ValueError, KeyError):
        password = secrets.token_urlsafe(24)
        atomic_write(path, json.dumps({"username": USER, "password": password}), mode=0o600)
    register_secrets([password])
    return RegistryLogin(username=USER, password=password)


def _pushed_file(store: Path) -> Path:
    return _folder(store) / "pushed.json"


def record_pushed(store: Path, repository: str, digest: str) -> None:
    """Remember that olab pushed ``digest`` to ``repository``."""
    path = _pushed_file(store)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known.setdefault(repository, [])
    if digest not in known[repository]:
        known[repository].append(digest)
    atomic_write(path, json.dumps(known, indent=1), mode=0o600)


def pushed_by_olab(store: Path, repository: str, digest: str) -> bool:
    try:
        return digest in json.loads(_pushed_file(store).read_text()).get(repository, [])
    except (OSError, ValueError):
        return False


def ensure_local_registry(store: Path, address: str) -> Registry:
    """olab's registry on a loopback address, answering and requiring olab's credential.

    A registry there that lets anyone in is olab's own from before this requirement (it is
    restarted with credentials) or someone else's (refused: olab will not push to or deploy
    from a registry anyone on this machine can write)."""
    import httpx

    login = registry_login(store)
    registry = Registry(address, login=login)
    folder = _folder(store)
    pid_file = folder / "registry.pid"
    if registry.answers():
        host = address.split("/")[0]
        if httpx.get(f"http://{host}/v2/", timeout=5).status_code == 401:
            return registry
        pid = read_pid_file(pid_file)
        if pid is None or not pid_alive(pid):
            raise RuntimeError(
                f"a registry that asks no credentials answers at {address}, and it is not olab's: anyone on this "
                "machine could push to it; stop it, or set image.registry to a free loopback address"
            )
        stop_pid_file(pid_file)  # olab's own, started before it required credentials
    binary = shutil.which("docker-registry") or shutil.which("registry")
    if not binary:
        raise ToolMissing(f"no registry answers at {address} and none is installed to start: apt-get install docker-registry")
    import bcrypt

    htpasswd = folder / "htpasswd"
    hashed = bcrypt.hashpw(login.password.get_secret_value().encode(), bcrypt.gensalt()).decode()
    atomic_write(htpasswd, f"{USER}:{hashed}\n", mode=0o600)
    host = address.split("/")[0]
    config = folder / "config.yml"
    atomic_write(
        config,
        "version: 0.1\nlog:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {folder / 'data'}\n  delete:\n    enabled: true\n"
        f"auth:\n  htpasswd:\n    realm: olab\n    path: {htpasswd}\n"
        f"http:\n  addr: {host}\n",
        mode=0o600,
    )
    stop_pid_file(pid_file)  # one that no longer answers
    try:
        start_server(
            [binary, "serve", str(config)], cwd=folder, log_file=folder / "registry.log",
            ready=registry.answers, timeout=20, what=f"the registry at {address}", pid_file=pid_file, poll=0.1,
        )
    except ServerDidNotStart as exc:
        raise RuntimeError(str(exc)) from None
    return registry


def stop_local_registry(store: Path) -> bool:
    return stop_pid_file(store / "registry" / "registry.pid")
