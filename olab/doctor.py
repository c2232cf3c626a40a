"""`olab doctor`: which builder and runtime this machine offers a site, and what is missing."""

from __future__ import annotations

import shutil

from core.config import Site
from core.runner import ToolMissing

TOOLS = {
    "buildah": "apt-get install buildah",
    "podman": "apt-get install podman",
    "runc": "apt-get install runc",
    "fuse-overlayfs": "apt-get install fuse-overlayfs",
    "docker-registry": "apt-get install docker-registry",
    "debootstrap": "apt-get install debootstrap",
    "docker": "a Docker engine (optional: buildah + podman need no daemon)",
}


def diagnose(site: Site) -> tuple[list[str], bool]:
    from tasks.local_hub import proxy_command
    from tasks.oci import resolve_builder
    from tasks.python_env import uv_binary
    from tasks.registry import Registry

    lines: list[str] = []
    ok = True
    setting = site.config.image.builder
    try:
        builder = resolve_builder(setting)
        runtime = {"venv": "local processes (no container runtime)", "docker": "docker"}.get(builder, "podman")
        lines.append(f"builder  {builder} (image.builder: {setting})")
        lines.append(f"runtime  {runtime}")
        if builder == "venv" and setting == "auto":
            lines.append("         no container tools found: images are venvs; for OCI images run ./setup.sh as root "
                         "(apt-get install buildah podman runc fuse-overlayfs docker-registry debootstrap)")
    except ToolMissing as exc:
        lines.append(f"builder  MISSING: {exc}")
        ok = False
    for tool, hint in TOOLS.items():
        found = shutil.which(tool)
        lines.append(f"  {tool:16} {found or 'not installed: ' + hint}")
    for name, find in (("uv", uv_binary), ("configurable-http-proxy", lambda: proxy_command()[0])):
        try:
            lines.append(f"  {name:16} {find()}")
        except ToolMissing as exc:
            lines.append(f"  {name:16} MISSING: {exc}")
            ok = False
    ok = _compiler(site, builder if ok else None, lines) and ok
    registry = site.config.image.registry
    answers = Registry(registry, insecure=site.config.image.local_registry).answers()
    lines.append(f"registry {registry}: " + ("answers" if answers else "not running" + (" (olab starts it on build)" if site.config.image.local_registry else "")))
    return lines, ok


def _compiler(site: Site, builder: str | None, lines: list[str]) -> bool:
    """ROOT's interpreter (cling) asks the C++ compiler for the standard headers when `import
    ROOT` starts it: an image brings its own g++, a venv environment uses this machine's."""
    found = shutil.which("c++")
    lock = site.image_context / "requirements.lock"
    wants_root = lock.is_file() and "\nroot==" in lock.read_text(errors="replace")
    if found or not wants_root:
        lines.append(f"  {'c++':16} {found or 'not installed (no lab needs it: the lock has no ROOT)'}")
        return True
    if builder == "venv":
        lines.append(f"  {'c++':16} MISSING: the lock pins ROOT, whose `import ROOT` needs a C++ compiler "
                     "in a venv environment: apt-get install g++")
        return False
    lines.append(f"  {'c++':16} not installed (images bring their own g++ for ROOT)")
    return True
