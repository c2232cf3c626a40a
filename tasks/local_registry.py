"""The local target's registry: for a loopback registry address olab runs one itself
(Debian's ``docker-registry``), shared by every site of this olab home."""

from __future__ import annotations

import shutil
from pathlib import Path

from core.files import atomic_write
from core.runner import ServerDidNotStart, ToolMissing, start_server, stop_pid_file
from tasks.registry import Registry


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
