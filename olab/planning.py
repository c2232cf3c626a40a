"""What to change: pure functions over plain data, tested without any server."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from olab.config import Site
from olab.files import content_hash, sha256_bytes
from olab.models import HubAction, HubDeployment, ImageRef, LabResult, LabSource

LOCK_HEADER = re.compile(r"^# olab-input-sha256: ([0-9a-f]{64})\s*$", re.MULTILINE)
REQUIREMENTS_IN = "requirements.in"
REQUIREMENTS_LOCK = "requirements.lock"


class StaleLock(ValueError):
    """The lock file no longer matches the requirements it was made from."""


def check_lock(requirements_in: bytes, lock_text: str, lock_path: Path) -> None:
    found = LOCK_HEADER.search(lock_text)
    if not found:
        raise StaleLock(f"{lock_path}: no '# olab-input-sha256:' header; regenerate it with `olab lock`")
    if found.group(1) != sha256_bytes(requirements_in):
        raise StaleLock(
            f"{lock_path} was made from another {REQUIREMENTS_IN}; regenerate it with `olab lock`"
        )


def lock_header(requirements_in: bytes) -> str:
    return f"# olab-input-sha256: {sha256_bytes(requirements_in)}\n"


def image_tag(context_files: dict[str, bytes], python_version: str, builder: str) -> str:
    """The content hash of everything that goes into a user environment."""
    pieces = dict(context_files)
    pieces["\0python"] = python_version.encode()
    pieces["\0builder"] = builder.encode()
    return content_hash(pieces.items())


@dataclass(frozen=True)
class BuildPlan:
    tag: str
    build: bool
    reason: str


def plan_build(tag: str, existing: ImageRef | None) -> BuildPlan:
    """``tag`` is the full content hash; an image is pinned by it as its digest."""
    if existing is not None and existing.digest == f"sha256:{tag}":
        return BuildPlan(tag, False, f"environment {tag[:12]} is already built")
    return BuildPlan(tag, True, f"no complete environment for inputs {tag[:12]}")


def lab_cache_key(image: ImageRef, lab: LabSource, cell_timeout: int) -> str:
    return sha256_bytes(f"{image.digest}\0{lab.content_hash}\0{cell_timeout}".encode())


@dataclass(frozen=True)
class LabPlan:
    to_run: list[LabSource]
    reused: list[LabResult]


def plan_labs(labs: list[LabSource], cached: dict[str, LabResult]) -> LabPlan:
    """Labs whose (environment, content) pair already passed are not rerun."""
    to_run, reused = [], []
    for lab in labs:
        hit = cached.get(lab.name)
        if hit is not None and hit.passed:
            reused.append(hit.model_copy(update={"cached": True}))
        else:
            to_run.append(lab)
    return LabPlan(to_run, reused)


def hub_template() -> str:
    return resources.files("olab").joinpath("templates/jupyterhub_config.py").read_text()


def hub_settings(
    site: Site,
    image: ImageRef,
    *,
    proxy_command: list[str],
    run_as_root: bool,
    docker_socket: Path | None = None,
) -> dict:
    """The local hub's settings document (no secrets: only the store's path).

    A venv image runs users' servers as local processes; an OCI image runs
    each as a container of that digest, through a Docker-compatible API.
    """
    paths = site.paths
    hub = site.config.hub
    spawner = {"spawner": "process"}
    if image.is_oci:
        if docker_socket is None:
            raise ValueError("an OCI image needs a container API socket to spawn users")
        spawner = {
            "spawner": "docker",
            "docker_url": f"unix://{docker_socket}",
            "container_prefix": f"olab-{site.name}",
            "container_uid": 1000,
        }
    return {
        **spawner,
        "site": site.name,
        "host": hub.host,
        "port": hub.port,
        "hub_api_port": hub.hub_api_port,
        "proxy_api_port": hub.proxy_api_port,
        "admins": sorted(hub.admins),
        "default_url": hub.default_url,
        "start_timeout": hub.start_timeout_seconds,
        "db_file": str(paths.hub / "jupyterhub.sqlite"),
        "pid_file": str(paths.hub / "jupyterhub.pid"),
        "proxy_pid_file": str(paths.hub / "proxy.pid"),
        "secrets_file": str(paths.secrets),
        "homes": str(paths.homes),
        "labs": str(paths.labs),
        "proxy_command": proxy_command,
        "singleuser": str(image.bin / "jupyterhub-singleuser"),
        "singleuser_args": ["--allow-root"] if run_as_root else [],
        "image": image.pinned,
        "user_environment": {
            "PATH": f"{image.bin}:/usr/local/bin:/usr/bin:/bin",
            "OLAB_SITE": site.name,
        },
    }


def hub_config_hash(settings: dict, template: str, labs_hash: str) -> str:
    return content_hash(
        [
            ("settings", json.dumps(settings, sort_keys=True).encode()),
            ("template", template.encode()),
            ("labs", labs_hash.encode()),
        ]
    )


def plan_hub(config_hash: str, current: HubDeployment | None, running: bool) -> HubAction:
    """Start a hub that is not running; restart one whose config changed."""
    if current is None or not running:
        return "start"
    if current.config_hash != config_hash:
        return "restart"
    return "unchanged"
