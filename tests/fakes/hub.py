"""A small JupyterHub REST API on loopback that keeps state, for tests of target-neutral
hub code: the subset olab uses, with the shapes JupyterHub answers with."""

from __future__ import annotations

import json
import re
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


class FakeHub:
    def __init__(self, token: str, version: str = "5.3.0", *, render_widgets: bool = True):
        self.token = token
        self.version = version
        self.render_widgets = render_widgets
        self.users: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: object = None, content_type: str = "application/json") -> None:
                data = b"" if body is None else (body.encode() if isinstance(body, str) else json.dumps(body).encode())
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                path = unquote(self.path.split("?")[0])
                with hub.lock:
                    hub.requests.append((method, path))
                if path == "/hub/api/" and method == "GET":
                    return self._send(200, {"version": hub.version})
                if self.headers.get("Authorization") != f"token {hub.token}":
                    return self._send(403, {"status": 403, "message": "Missing or invalid credentials"})
                with hub.lock:
                    status, body, kind = hub.answer(method, path)
                self._send(status, body, kind)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _user(self, name: str) -> dict:
        return {"kind": "user", "name": name, "admin": False, "servers": self.users[name]["servers"], "last_activity": None}

    def answer(self, method: str, path: str) -> tuple[int, object, str]:
        json_type = "application/json"
        if path == "/hub/api/users" and method == "GET":
            return 200, [self._user(n) for n in sorted(self.users)], json_type
        if m := re.fullmatch(r"/hub/api/users/([^/]+)", path):
            name = m.group(1)
            if method == "POST":
                self.users.setdefault(name, {"servers": {}})
                return 201, self._user(name), json_type
            if name not in self.users:
                return 404, {"status": 404, "message": "Not Found"}, json_type
            return 200, self._user(name), json_type
        if m := re.fullmatch(r"/hub/api/users/([^/]+)/server", path):
            name = m.group(1)
            if name not in self.users:
                return 404, {"status": 404, "message": "Not Found"}, json_type
            if method == "POST":
                now = datetime.now(UTC).isoformat()
                self.users[name]["servers"][""] = {"name": "", "ready": True, "pending": None, "started": now, "url": f"/user/{name}/"}
                return 201, None, json_type
            if method == "DELETE":
                self.users[name]["servers"].clear()
                return 204, None, json_type
        if m := re.fullmatch(r"/user/([^/]+)/(.*)", path):
            name, rest = m.groups()
            if not self.users.get(name, {}).get("servers"):
                return 503, "<html><title>503: Service Unavailable</title></html>", "text/html"
            if rest == "api/status":
                return 200, {"started": "now", "last_activity": datetime.now(UTC).isoformat()}, json_type
            if rest.startswith("voila/render/"):
                widgets = f'<script type="{WIDGET_MIME}">{{}}</script>' if self.render_widgets else ""
                return 200, f"<html><body>{rest}{widgets}</body></html>", "text/html"
        return 404, {"status": 404, "message": "Not Found"}, json_type
