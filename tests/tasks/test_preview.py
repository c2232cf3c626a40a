"""`olab preview LAB` for real: the olab CLI started as a process, serving a lab from the
session's real user image (a container with one port on loopback, the lab mounted
read-only) or from a venv image, its printed URL fetched, an edit seen on the next load,
Ctrl-C stopping it all.

``running_preview`` is the way in for other tests (a real browser on the preview's URL):
it starts the CLI, reads the URL it prints, and stops it with SIGINT at the end.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from core.config import load_site
from core.runner import run
from flows.build_image import build_image
from tasks.local_hub import port_in_use
from tasks.oci import engine_for
from tests.conftest import REPO
from tests.tasks.conftest import missing, oci_site

pytestmark = pytest.mark.slow
needs_oci = pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed: run ./setup.sh as root")

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
# A bound so that a broken preview fails the test instead of hanging it (no timing is asserted).
START_WITHIN_SECONDS = 300


@dataclass
class Preview:
    proc: subprocess.Popen
    url: str
    stderr: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return urlsplit(self.url).port

    @property
    def token(self) -> str:
        return parse_qs(urlsplit(self.url).query)["token"][0]


def _lines(stream, into) -> None:
    for line in stream:
        into(line.rstrip("\n"))


@contextmanager
def running_preview(site_path: Path, lab: str) -> Iterator[Preview]:
    """`olab preview LAB --site SITE` running, with the URL it printed; SIGINT at the end
    (if the test did not stop it), and its stderr in ``Preview.stderr`` as it comes."""
    proc = subprocess.Popen([sys.executable, "-m", "olab.cli", "preview", lab, "--site", str(site_path)], cwd=REPO,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    out: queue.Queue = queue.Queue()
    stderr: list[str] = []
    readers = [threading.Thread(target=_lines, args=(proc.stdout, out.put), daemon=True),
               threading.Thread(target=_lines, args=(proc.stderr, stderr.append), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        deadline = time.monotonic() + START_WITHIN_SECONDS
        url = None
        while url is None:
            assert time.monotonic() < deadline, f"no URL within {START_WITHIN_SECONDS}s; stderr: {stderr}"
            assert proc.poll() is None or not out.empty(), f"olab preview exited {proc.returncode}: {stderr}"
            try:
                line = out.get(timeout=1)
            except queue.Empty:
                continue
            if line.startswith("preview: "):
                url = line.removeprefix("preview: ")
        yield Preview(proc, url, stderr)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for reader in readers:
            reader.join(timeout=10)


def in_any_argv(text: str) -> bool:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                return True
        except OSError:
            pass
    return False


@pytest.fixture
def preview_site(make_site, registry_address, tmp_path) -> Path:
    """An OCI site with one quick lab in a folder the test may edit."""
    return oci_site(make_site, "preview", registry_address, labs=quick_labs(tmp_path / "labs"))


def quick_labs(folder: Path) -> dict:
    folder.mkdir()
    shutil.copy(REPO / "labs" / "radioactive_decay.md", folder / "radioactive_decay.md")
    return {"path": str(folder)}


def renders_with_widgets(url: str) -> httpx.Response:
    page = httpx.get(url, timeout=300)
    assert page.status_code == 200
    assert "Radioactive decay: a Monte-Carlo experiment" in page.text and WIDGET_VIEW in page.text
    return page


@needs_oci
def test_preview_serves_the_lab_from_the_image_and_shows_each_edit(user_image, preview_site):
    _, image = user_image
    site = load_site(str(preview_site))
    engine = engine_for("buildah", site.paths.containers, [])

    # Before any build on the site: one line saying what to run.
    done = subprocess.run([sys.executable, "-m", "olab.cli", "preview", "radioactive_decay", "--site", str(preview_site)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"olab preview: site preview has no image built yet: run `olab build --site {preview_site}` first"]
    # The session's image, unchanged: build-image finds it in the registry and builds nothing.
    assert build_image(site=str(preview_site)).pinned == image.pinned

    with running_preview(preview_site, "radioactive_decay") as preview:
        assert preview.url.startswith(f"http://127.0.0.1:{preview.port}/voila/render/labs/radioactive_decay.ipynb?token=")
        # The token is in no process's argv, and the server answers nothing without it.
        assert not in_any_argv(preview.token)
        bare = preview.url.split("?")[0]
        assert httpx.get(bare, timeout=30).status_code in (302, 403)
        assert httpx.get(f"http://127.0.0.1:{preview.port}/api/contents", timeout=30).status_code == 403

        # The container of the site's image, on loopback only, the lab mounted read-only.
        listed = engine.run(["podman", "ps", "--format", "{{.Names}} {{.Image}} {{.Ports}}"])
        ours = [line for line in listed.splitlines() if line.startswith("olab-preview-preview-radioactive-decay-")]
        assert len(ours) == 1 and f"127.0.0.1:{preview.port}->8888/tcp" in ours[0]
        container = ours[0].split()[0]
        mounts = engine.run(["podman", "inspect", "--format", "{{range .Mounts}}{{.Destination}} {{.RW}};{{end}}", container])
        assert "/home/jovyan/labs false;" in mounts
        # Nor is it in what podman keeps of the container (its environment, its runtime spec).
        assert preview.token not in engine.run(["podman", "inspect", container])

        renders_with_widgets(preview.url)

        # An edit shows on the next load: a new cell whose output exists only if it ran.
        lab = Path(site.labs_dir) / "radioactive_decay.md"
        marker = uuid.uuid4().hex[:12]
        lab.write_text(lab.read_text() + f'\n```{{code-cell}} ipython3\nprint("edited-{marker}", 6 * 7)\n```\n')
        deadline = time.monotonic() + 60
        while f"edited-{marker} 42" not in (page := httpx.get(preview.url, timeout=300)).text:
            assert time.monotonic() < deadline, f"the edit never showed; stderr: {preview.stderr}"
            time.sleep(1)
        assert WIDGET_VIEW in page.text

        # A half-written edit that does not parse keeps the last good version served.
        good = lab.read_text()
        lab.write_text(good.replace("kernelspec:", "kernelspec: [", 1))
        time.sleep(2)
        assert f"edited-{marker} 42" in httpx.get(preview.url, timeout=300).text
        lab.write_text(good)

        preview.proc.send_signal(signal.SIGINT)
        assert preview.proc.wait(timeout=120) == 0

    # Everything it started is gone: the container (running or not), the port.
    assert container not in engine.run(["podman", "ps", "-a", "--format", "{{.Names}}"])
    assert not port_in_use("127.0.0.1", preview.port)
    stderr = "\n".join(preview.stderr)
    assert "edit staged" in stderr and "not staged" in stderr and "stopped" in stderr
    assert preview.token not in stderr


def running_in_session(session: str) -> list[str]:
    """The processes of a session that are not zombies, as `ps` lists them."""
    listed = run(["ps", "-s", session, "-o", "stat=,pid=,args="], check=False).output.splitlines()
    return [line for line in listed if line.strip() and not line.split()[0].startswith("Z")]


def test_a_venv_image_is_previewed_with_its_own_server(make_site, tmp_path):
    path = make_site("previewvenv", labs=quick_labs(tmp_path / "labs"))
    image = build_image(site=str(path))
    assert not image.is_oci
    with running_preview(path, "radioactive_decay") as preview:
        assert preview.url.startswith(f"http://127.0.0.1:{preview.port}/voila/render/labs/radioactive_decay.ipynb?token=")
        assert not in_any_argv(preview.token)
        assert httpx.get(f"http://127.0.0.1:{preview.port}/api/contents", timeout=30).status_code == 403
        renders_with_widgets(preview.url)
        # The O-Lab bar's way back: an index of the previewed lab.
        index = httpx.get(preview.url.replace("radioactive_decay.ipynb", "index.ipynb"), timeout=120)
        assert index.status_code == 200 and "radioactive_decay.ipynb" in index.text, index.status_code
        # The venv's own server, a child of the preview.
        server = run(["pgrep", "-P", str(preview.proc.pid), "-a"]).output.strip().splitlines()
        assert len(server) == 1 and str(image.bin / "jupyter-server") in server[0]
        session = server[0].split()[0]
        assert running_in_session(session)  # the server
        # The lab's kernel, the server's child: it leads a session of its own (jupyter_client's way).
        children = [line.split() for line in run(["ps", "--ppid", session, "-o", "pid=,sid="], check=False).output.splitlines()]
        kernels = [pid for pid, sid in children if pid == sid]
        assert kernels
        preview.proc.send_signal(signal.SIGINT)
        assert preview.proc.wait(timeout=120) == 0
    # The server, its kernel and every process they started in their sessions are gone (an orphan's zombie,
    # waiting for init to reap it, is not a process running), and so is the port.
    assert running_in_session(session) == []
    assert [kernel for kernel in kernels if running_in_session(kernel)] == []
    assert not port_in_use("127.0.0.1", preview.port)


def test_a_lab_that_is_not_there_is_one_line_naming_the_labs(make_site, tmp_path):
    path = make_site("previewname", labs=quick_labs(tmp_path / "labs"))
    done = subprocess.run([sys.executable, "-m", "olab.cli", "preview", "radioactive_decy", "--site", str(path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"no lab named radioactive_decy in {load_site(str(path)).labs_dir} (labs: radioactive_decay)"]
