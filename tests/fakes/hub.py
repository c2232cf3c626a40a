"""A small JupyterHub REST API on loopback that keeps state, for tests of target-neutral
hub code: the subset olab uses, with the shapes JupyterHub answers with.

Its user servers serve one page per lab for the health check's browser: a formula already
typeset, a slider a keyboard moves, and an output the server redraws for each value (asked
by the page with the user's token, as a kernel would be), so the browser check runs its whole
path (a user's token made and deleted, the page judged, a screenshot) against a gke site.
What Voilà, MathJax and ipywidgets really do in a browser is tested on a real hub
(tests/tasks/test_browser.py)."""

from __future__ import annotations

import json
import re
import secrets
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
        self.tokens: dict[str, tuple[str, str]] = {}  # a user's token -> (user, token id)
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
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                if not hub.allowed(self.headers.get("Authorization") or "", path):
                    return self._send(403, {"status": 403, "message": "Missing or invalid credentials"})
                with hub.lock:
                    status, answer, kind = hub.answer(method, path, body, self.path)
                self._send(status, answer, kind)

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

    def allowed(self, authorization: str, path: str) -> bool:
        """The olab service's token everywhere; a user's own token on their own server."""
        if authorization == f"token {self.token}":
            return True
        user, _ = self.tokens.get(authorization.removeprefix("token "), (None, None))
        return user is not None and path.startswith(f"/user/{user}/")

    def answer(self, method: str, path: str, body: dict, raw_path: str = "") -> tuple[int, object, str]:
        json_type = "application/json"
        if m := re.fullmatch(r"/hub/api/users/([^/]+)/tokens", path):
            name = m.group(1)
            if name not in self.users or method != "POST":
                return 404, {"status": 404, "message": "Not Found"}, json_type
            token, token_id = secrets.token_hex(16), f"a{len(self.requests)}"
            self.tokens[token] = (name, token_id)
            return 201, {"id": token_id, "token": token, "user": name, "note": body.get("note"),
                         "scopes": body.get("scopes"), "expires_in": body.get("expires_in")}, json_type
        if m := re.fullmatch(r"/hub/api/users/([^/]+)/tokens/([^/]+)", path):
            found = [t for t, (user, tid) in self.tokens.items() if (user, tid) == m.groups()]
            if method != "DELETE" or not found:
                return 404, {"status": 404, "message": "Not Found"}, json_type
            del self.tokens[found[0]]
            return 204, None, json_type
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
            if rest.startswith("voila/render/") and rest.endswith("/draw"):
                rho = float(raw_path.partition("rho=")[2] or 0)
                return 200, f"rho = {rho:g}: {len(self.users)} users, drawn again", "text/plain"
            if rest.startswith("voila/render/"):
                return 200, self.dashboard(rest), "text/html"
        return 404, {"status": 404, "message": "Not Found"}, json_type

    def dashboard(self, rest: str) -> str:
        if not self.render_widgets:
            return f"<html><body>{rest}</body></html>"
        return DASHBOARD.replace("{rest}", rest).replace("{WIDGET_MIME}", WIDGET_MIME)


DASHBOARD = """<!doctype html>
<html><head><meta charset="utf-8"><title>{rest}</title><link rel="icon" href="data:;base64,="></head>
<body>
<div class="jp-RenderedMarkdown jp-RenderedHTMLCommon"><p>The Lorenz system:
<mjx-container>x&#775; = &#963;(y &#8722; x)</mjx-container></p></div>
<script type="{WIDGET_MIME}">{}</script>
<div class="jupyter-widgets widget-slider"><div class="widget-label">&#961;</div>
<div role="slider" tabindex="0" aria-valuenow="28" aria-valuetext="28">&#9679;</div></div>
<div class="jupyter-widgets widget-output"><pre>rho = 28</pre></div>
<script>
const handle = document.querySelector('[role="slider"]');
handle.addEventListener('keydown', async event => {
  const step = {ArrowRight: 1, ArrowLeft: -1}[event.key];
  if (!step) return;
  const value = Number(handle.getAttribute('aria-valuenow')) + step;
  handle.setAttribute('aria-valuenow', value);
  handle.setAttribute('aria-valuetext', value);
  const answer = await fetch('draw?rho=' + value);
  document.querySelector('.widget-output').innerHTML = '<pre>' + await answer.text() + '</pre>';
});
</script>
</body></html>
"""
