"""`olab preview LAB`: one lab served to its author as students will see it.

The site's current image (the one build-image last made) runs a Jupyter server with the
image's own configuration, so the page is Voilà with the template, extensions and packages
of the hub's servers, at the path a student opens (``/voila/render/labs/LAB.ipynb``). An OCI
image runs as a container with one port published on loopback and the staged lab mounted
read-only; a venv image runs the venv's own server on loopback. Either way the server asks
for a random token, printed once, in the URL, to the author's terminal: nothing
unauthenticated listens on loopback. The token reaches the server as a 0600 file named by
JUPYTER_TOKEN_FILE: not an argv, and not ``podman run -e JUPYTER_TOKEN``, whose value podman
writes into the container's runtime spec (config.json, mode 0644).

The lab's file is watched: an edit is staged again as .ipynb, and since Voilà executes the
notebook afresh on every page load, the next load shows it.

This is an interactive server for one person, in the foreground until Ctrl-C, and it
changes nothing on the site: not a Prefect flow (nothing to retry, schedule or record).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import quote

import httpx

from core.config import ConfigError, Site
from core.models import ImageRef, LabSource
from core.runner import CommandError, ToolMissing, log_tail, pid_alive, start_background, stop_process
from core.state import load_state
from tasks.local_hub import CONTAINER_UID
from tasks.notebooks import discover_labs, private_lab_env, stage_index, stage_lab
from tasks.oci import Engine, engine_for

CONTAINER_HOME = "/home/jovyan"
CONTAINER_PORT = 8888
CONTAINER_TOKEN_FILE = "/run/olab/preview-token"
WATCH_SECONDS = 0.5


class PreviewError(RuntimeError):
    """One line for the author: an image that is not there, a server that did not start."""


def find_lab(site: Site, name: str) -> LabSource:
    """The lab named ``name`` in the site's labs folder; else bad input, in one line that
    names the labs there are."""
    try:
        return discover_labs(site.labs_dir, [name])[0]
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError([str(exc)]) from None


def site_image(site: Site, site_ref: str) -> ImageRef:
    """The image build-image last made for the site (what its hub runs)."""
    image = load_state(site).image
    if image is None or (not image.is_oci and not image.python.exists()):
        raise PreviewError(f"site {site.name} has no image built yet: run `olab build --site {site_ref}` first")
    return image


def preview_url(port: int, lab: str, token: str) -> str:
    return f"http://127.0.0.1:{port}/voila/render/labs/{quote(lab)}.ipynb?token={token}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(port: int, token: str) -> bool:
    try:
        status = httpx.get(f"http://127.0.0.1:{port}/api/status", headers={"Authorization": f"token {token}"}, timeout=2)
    except httpx.TransportError:
        return False
    return status.status_code == 200


def _server_options(ip: str, port: int) -> list[str]:
    # WARN: the author's terminal gets what went wrong, not a line per request. No "open in
    # a browser" file: jupyter writes the token into it, readable by all (0644).
    return ["--no-browser", "--ServerApp.no_browser_open_file=True", f"--ServerApp.ip={ip}",
            f"--ServerApp.port={port}", "--ServerApp.log_level=WARN"]


def write_token(path: Path, token: str, owner: int | None) -> None:
    """The token in a 0600 file, owned by the server's user (a container's user is not this
    process's), in a folder only this process's user can enter."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, token.encode())
        if owner is not None:
            os.fchown(fd, owner, owner)
    finally:
        os.close(fd)


def container_command(engine: Engine, image: ImageRef, work: Path, port: int, name: str, site: Site) -> list[str]:
    """``podman run`` of the image's Jupyter server, the staged labs and the token file
    mounted read-only."""
    mounts = [(work / "root" / "labs", f"{CONTAINER_HOME}/labs"), (work / "token", CONTAINER_TOKEN_FILE)]
    argv = engine.run_prefix(mounts, workdir=CONTAINER_HOME)
    # run_prefix keeps a container off every network; a preview publishes one port on
    # loopback, from the runtime's default bridge (no other container's network).
    argv[argv.index("--network") + 1] = "bridge"
    argv += ["--name", name, "--label", f"olab-preview={site.name}", "-p", f"127.0.0.1:{port}:{CONTAINER_PORT}",
             "-e", f"JUPYTER_TOKEN_FILE={CONTAINER_TOKEN_FILE}"]
    return [*argv, image.pinned, "jupyter-server", *_server_options("0.0.0.0", CONTAINER_PORT), f"--ServerApp.root_dir={CONTAINER_HOME}"]


def venv_command(image: ImageRef, root: Path, port: int) -> list[str]:
    # As the hub runs a venv's servers: as this process's user, root included.
    as_root = ["--allow-root"] if os.geteuid() == 0 else []
    return [str(image.bin / "jupyter-server"), *as_root, *_server_options("127.0.0.1", port), f"--ServerApp.root_dir={root}"]


def venv_env(image: ImageRef, home: Path) -> dict[str, str]:
    env = private_lab_env(image.bin, home)
    # The lab runner draws off-screen; a page must get ipykernel's inline figures.
    env.pop("MPLBACKEND")
    return env


class LabWatcher:
    """Stages the lab again when its file changes; a version that does not parse leaves
    the last good one served, and says why."""

    def __init__(self, lab: LabSource, dest: Path, say: Callable[[str], None]):
        self.lab, self.dest, self.say = lab, dest, say
        self.seen = self._stamp()
        try:
            self._stage()
        except Exception as exc:  # noqa: BLE001 - a lab that does not parse, whatever the parser raises
            raise PreviewError(f"{lab.path}: not a notebook ({type(exc).__name__}: {_one_line(str(exc))})") from None

    def _stage(self) -> None:
        stage_lab(self.lab, self.dest)
        # The O-Lab bar's way back leads to the lab index: one of this lab alone, as its
        # title and line will show there (staged again with each edit).
        stage_index([self.lab], self.dest)

    def _stamp(self) -> tuple[int, int] | None:
        try:
            found = self.lab.path.stat()
        except OSError:  # an editor's save in progress (write aside, then rename)
            return None
        return found.st_mtime_ns, found.st_size

    def poll(self) -> bool:
        stamp = self._stamp()
        if stamp is None or stamp == self.seen:
            return False
        self.seen = stamp
        try:
            self._stage()
        except Exception as exc:  # noqa: BLE001 - any parse error of a half-written lab
            self.say(f"{self.lab.path}: not staged ({type(exc).__name__}: {_one_line(str(exc))}); the last good version is served")
            return False
        self.say(f"{self.lab.name}: edit staged; the next page load shows it")
        return True


def _stop_container(engine: Engine, name: str) -> None:
    """The container gone, even when its ``run`` was killed before it could remove it."""
    try:
        engine.run([engine.runtime, "rm", "-f", name], check=False, timeout=60)
    except CommandError:
        pass


def _one_line(text: str) -> str:
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


def _wait_until_ready(pid: int, port: int, token: str, log: Path, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _answers(port, token):
        if not pid_alive(pid):
            raise PreviewError(f"{what} exited while starting: {_one_line(log_tail(log, 5))}")
        if time.monotonic() > deadline:
            raise PreviewError(f"{what} did not answer within {timeout:.0f}s: {_one_line(log_tail(log, 5))}")
        time.sleep(0.2)


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def preview(site: Site, site_ref: str, lab_name: str, *, show_url: Callable[[str], None],
            say: Callable[[str], None]) -> None:
    """Serve ``lab_name`` until Ctrl-C (or SIGTERM): stage it, start the server, hand the
    URL to ``show_url``, restage on every edit. Everything it started is stopped on the
    way out, whatever ends it. PreviewError (one line) for what the author can fix."""
    lab = find_lab(site, lab_name)
    image = site_image(site, site_ref)
    token = secrets.token_urlsafe(32)
    port = _free_port()
    with ExitStack() as stack:
        if threading.current_thread() is threading.main_thread():  # where Python allows a handler
            stack.callback(signal.signal, signal.SIGTERM, signal.signal(signal.SIGTERM, _on_sigterm))
        work = Path(tempfile.mkdtemp(prefix=f"olab-preview-{lab.name}-"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        # The server's root holds the labs only: its token, log and home stay beside it.
        labs = work / "root" / "labs"
        labs.mkdir(mode=0o755, parents=True)
        os.chmod(labs, 0o755)  # read by the image's own user, whatever the umask
        watcher = LabWatcher(lab, labs, say)
        if image.is_oci:
            from targets import platform_for

            access = platform_for(site).image_registry(prepare=False)
            engine = engine_for(image.builder, site.paths.containers, [access.host] if access.insecure else [])
            say(f"preview of {lab.name}: making sure {image.pinned} is on this machine")
            try:
                engine.ensure_local(image.pinned, access.login)
            except CommandError as exc:
                raise PreviewError(f"image {image.pinned} is not on this machine and could not be pulled: {_one_line(str(exc))}") from None
            name = f"olab-preview-{site.name}-{lab.name}-{uuid.uuid4().hex[:8]}".lower().replace("_", "-")
            write_token(work / "token", token, CONTAINER_UID)
            argv, env = container_command(engine, image, work, port, name, site), engine.env
            stack.callback(_stop_container, engine, name)
            what = f"the preview container {name}"
        else:
            home = work / "home"
            home.mkdir(mode=0o700)
            write_token(work / "token", token, None)
            argv, env = venv_command(image, work / "root", port), {**venv_env(image, home), "JUPYTER_TOKEN_FILE": str(work / "token")}
            what = "the preview server"
        say(f"preview of {lab.name}: starting {what} from {image.pinned} (Ctrl-C stops it)")
        log = work / "server.log"  # 0600 in a 0700 folder, removed at the end; the token is not in it
        try:
            # Not start_server: a Ctrl-C while it waits must still find the pid to stop.
            pid = start_background(argv, cwd=work, log_file=log, env=env)
        except ToolMissing as exc:
            raise PreviewError(str(exc)) from None
        stack.callback(stop_process, pid, grace_seconds=10)
        _wait_until_ready(pid, port, token, log, what, site.config.hub.start_timeout_seconds)
        show_url(preview_url(port, lab.name, token))
        say(f"watching {lab.path}: each edit is staged again; Ctrl-C stops the preview")
        while pid_alive(pid):
            time.sleep(WATCH_SECONDS)
            watcher.poll()
        raise PreviewError(f"{what} exited on its own: {_one_line(log_tail(log, 5))}")


def run_preview(site: Site, site_ref: str, lab_name: str) -> int:
    """The CLI's side: the URL on stdout (the author's terminal only, like jupyter's own),
    progress and errors on stderr; 0 after Ctrl-C, 1 on an error (a lab name that is not
    there is the caller's ConfigError: exit 2)."""

    def show_url(url: str) -> None:
        print(f"preview: {url}", flush=True)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        preview(site, site_ref, lab_name, show_url=show_url, say=say)
    except KeyboardInterrupt:
        say(f"preview of {lab_name}: stopped")
        return 0
    except PreviewError as exc:
        say(f"olab preview: {exc}")
        return 1
    return 0
