"""User environments built as virtualenvs by uv (the local, daemonless builder).

The environment folder is content-addressed: its name carries the hash of its
inputs, and a marker written last says it is complete. A folder without the
marker is a build that died and is thrown away.
"""

from __future__ import annotations

import fcntl
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from prefect import task
from core.logs import task_logger

from core.files import tree_files, write_json
from core.models import BuildResult, ImageRef
from core.planning import REQUIREMENTS_IN, REQUIREMENTS_LOCK, check_lock, image_tag
from core.retry import retry_options
from core.runner import ToolMissing, run

MARKER = ".olab-image.json"


def uv_binary() -> str:
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if not found:
            raise ToolMissing("uv is not installed: pip install uv (it comes with `pip install -e .`)") from None
        return found


def read_context(context: Path) -> dict[str, bytes]:
    """Every file that goes into the environment, by path relative to its folder."""
    if not context.is_dir():
        raise FileNotFoundError(f"{context}: image context folder does not exist")
    files = {str(p.relative_to(context)): p.read_bytes() for p in tree_files(context)}
    for required in (REQUIREMENTS_IN, REQUIREMENTS_LOCK):
        if required not in files:
            raise FileNotFoundError(f"{context / required}: missing from the image context")
    check_lock(files[REQUIREMENTS_IN], files[REQUIREMENTS_LOCK].decode(), context / REQUIREMENTS_LOCK)
    return files


def venv_tag(context: Path) -> str:
    return image_tag(read_context(context), platform.python_version(), "venv")


def env_folder(envs: Path, name: str, tag: str) -> Path:
    return envs / f"{name}-{tag[:16]}"


def find_environment(envs: Path, name: str, tag: str) -> ImageRef | None:
    marker = env_folder(envs, name, tag) / MARKER
    if not marker.is_file():
        return None
    return ImageRef.model_validate_json(marker.read_text())


STARTUP_FILES = ("olab_kernel_fix.py", "olab-kernel-fix.pth")
# The context's folder laid over the environment's prefix (/opt/olab in the image): the
# Voilà template, the server's and Voilà's settings, JupyterLab's setting overrides.
PREFIX_OVERLAY = "prefix"


def install_startup_files(context: Path, env: Path) -> None:
    """What the Containerfile copies into site-packages and over /opt/olab, the venv gets too."""
    purelib = run(
        [str(env / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    ).output.strip().splitlines()[-1]
    for name in STARTUP_FILES:
        if (context / name).is_file():
            shutil.copy2(context / name, Path(purelib) / name)
    if (context / PREFIX_OVERLAY).is_dir():
        shutil.copytree(context / PREFIX_OVERLAY, env, dirs_exist_ok=True)


@contextmanager
def _build_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@task(name="build-venv", **retry_options(retries=2))
def build_environment(name: str, context: Path, envs: Path, tag: str) -> BuildResult:
    """Build the environment for ``tag`` unless a complete one exists."""
    logger = task_logger()
    started = time.monotonic()
    target = env_folder(envs, name, tag)
    with _build_lock(target.with_name(target.name + ".lock")):
        existing = find_environment(envs, name, tag)
        if existing is not None:
            return BuildResult(image=existing, built=False, seconds=time.monotonic() - started)
        if target.exists():
            logger.warning("removing incomplete environment %s", target)
            shutil.rmtree(target)
        uv = uv_binary()
        env = {**os.environ, "VIRTUAL_ENV": str(target)}
        env.pop("PYTHONPATH", None)
        run([uv, "venv", "--quiet", "--python", sys.executable, str(target)], env=env, on_line=logger.info)
        run(
            [uv, "pip", "sync", "--python", str(target / "bin" / "python"), str(context / REQUIREMENTS_LOCK)],
            env=env,
            on_line=logger.info,
            timeout=1800,
        )
        install_startup_files(context, target)
        image = ImageRef(name=name, tag=tag[:16], digest=f"sha256:{tag}", location=str(target))
        write_json(target / MARKER, image.model_dump(mode="json"))
    seconds = time.monotonic() - started
    logger.info("built %s in %.1fs", image.pinned, seconds)
    return BuildResult(image=image, built=True, seconds=seconds)
