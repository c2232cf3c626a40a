"""A JupyterHub's REST API, on any target: the client, the health check, stopping servers.

It needs only the hub's URL and the olab service's token (a ``HubAccess``),
so the same code checks a hub on this machine and one behind a cluster's
HTTPS ingress.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import SecretStr

from core.logs import task_logger
from core.models import Check, HubAccess, UserLogin
from core.retry import TransientError, retry_options

HEALTH_USER = "olab-health"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


class HubError(RuntimeError):
    """The hub did something other than what was asked; the message says what."""


class HubAPI:
    """The hub's REST API, authenticated as the olab service (or anonymous, for its version)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0):
        self.url = url
        headers = {"Authorization": f"token {token}"} if token else {}
        self._client = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    @classmethod
    def of(cls, access: HubAccess, timeout: float = 30.0) -> HubAPI:
        return cls(access.url, access.token.get_secret_value(), timeout)

    def __enter__(self) -> HubAPI:
        return self

    def __exit__(self, *exc) -> None:
        self._client.close()

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        response = self._client.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                # An HTML error page: its title says enough.
                title = re.search(r"<title>(.*?)</title>", response.text, re.S)
                message = title.group(1).strip() if title else response.text[:120]
            raise httpx.HTTPStatusError(
                f"{method} {path}: {response.status_code} {message}", request=response.request, response=response
            )
        return response

    def version(self) -> str:
        return self.request("GET", "/hub/api/").json()["version"]

    def ensure_user(self, name: str) -> None:
        if self._client.get(f"/hub/api/users/{quote(name)}").status_code == 404:
            self.request("POST", f"/hub/api/users/{quote(name)}")

    def user(self, name: str) -> dict:
        return self.request("GET", f"/hub/api/users/{quote(name)}").json()

    def users(self) -> list[dict]:
        return self.request("GET", "/hub/api/users").json()

    def running_servers(self) -> list[str]:
        return [u["name"] for u in self.users() if u.get("servers")]

    def start_server(self, name: str, timeout: float) -> None:
        # A stop still under way (say, from an earlier attempt's clean-up) must finish first.
        self._wait(name, lambda server: not (server and server.get("pending")), timeout, "done stopping")
        server = self.user(name).get("servers", {}).get("")
        if not (server and server.get("ready")):
            self.request("POST", f"/hub/api/users/{quote(name)}/server")
        self._wait(name, lambda server: bool(server and server.get("ready")), timeout, "ready")

    def stop_server(self, name: str, timeout: float) -> None:
        """Stop ``name``'s server and wait until it is gone.

        A start still under way is let finish first (JupyterHub ends a start that runs too
        long by itself, within ``timeout``, its start timeout, plus as long again for the first
        answer). JupyterHub's DELETE would interrupt it instead: it cancels the start and
        answers 500 ("pending spawn") when the start takes more than a second to unwind, as a
        container's may, and the interrupted server can be left behind: still listed, running
        or not, and not stopped by a second DELETE.
        """
        server = self.user(name).get("servers", {}).get("")
        if server and server.get("pending") == "spawn":
            task_logger().info("%s's server is starting; stopping it once it has started", name)
            self._wait(name, lambda s: not (s and s.get("pending") == "spawn"), 2 * timeout, "done starting")
            server = self.user(name).get("servers", {}).get("")
        if server:
            self.request("DELETE", f"/hub/api/users/{quote(name)}/server")
        self._wait(name, lambda server: not server, timeout, "stopped")

    def _wait(self, name: str, done, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            server = self.user(name).get("servers", {}).get("")
            if done(server):
                return
            time.sleep(0.25)
        raise TransientError(f"server of {name} not {what} after {timeout:.0f}s")

    @contextmanager
    def user_token(self, name: str, expires_in: int, note: str) -> Iterator[SecretStr]:
        """A token of the user's own, only for their server, for the block; deleted after it
        (and expiring by itself should the deletion fail)."""
        made = self.request(
            "POST", f"/hub/api/users/{quote(name)}/tokens",
            json={"expires_in": expires_in, "note": note, "scopes": [f"access:servers!user={name}"]},
        ).json()
        try:
            yield SecretStr(made["token"])
        finally:
            try:
                self.request("DELETE", f"/hub/api/users/{quote(name)}/tokens/{made['id']}")
            except httpx.HTTPError as exc:
                task_logger().warning("could not delete %s's token %s (it expires in %ds): %s", name, made["id"], expires_in, exc)

    def get_user_page(self, name: str, path: str, timeout: float) -> httpx.Response:
        return self.request("GET", f"/user/{quote(name)}/{path}", timeout=timeout)


def hub_version(url: str) -> str | None:
    """The version a hub reports without a token, or None when it does not answer."""
    try:
        with HubAPI(url, timeout=3) as api:
            return api.version()
    except (httpx.HTTPError, ValueError, KeyError):
        return None


@task(name="stop-user-servers", cache_policy=NO_CACHE)
def stop_user_servers(access: HubAccess, timeout: float) -> list[str]:
    """Stop every running user server; waits until each is down. Returns whose were running."""
    with HubAPI.of(access) as api:
        running = api.running_servers()
        for name in running:
            api.stop_server(name, timeout=timeout)
    return running


def _timed(checks: list[Check], name: str, step) -> object:
    started = time.monotonic()
    try:
        detail = step()
    except Exception as exc:
        checks.append(Check(name=name, ok=False, detail=str(exc)[:300], seconds=time.monotonic() - started))
        raise
    checks.append(Check(name=name, ok=True, detail=str(detail or ""), seconds=time.monotonic() - started))
    return detail


def _one_check(name: str, step) -> Check:
    """One step as its own check (``_timed``'s, for a step that is a task of its own)."""
    checks: list[Check] = []
    _timed(checks, name, step)
    return checks[0]


def _stop_after_failure(api: HubAPI) -> None:
    try:
        api.stop_server(HEALTH_USER, 30)
    except Exception as cleanup:  # report the first failure, not the cleanup's
        task_logger().warning("could not stop %s's server after a failed check: %s", HEALTH_USER, cleanup)


# The health check, in steps a flow can run side by side: the test user's server is started,
# the lab is looked at (Voilà's page through the API; a browser, the caller's, with
# ``health_user_login``), the server is stopped. A step that fails raises, with its check's
# detail as the message; a failed start stops what it started, and ``stop_after_failure``
# is the caller's clean-up when a later step fails.


@task(name="start-test-server", cache_policy=NO_CACHE, **retry_options(retries=2))
def start_test_server(access: HubAccess, timeout: float) -> list[Check]:
    """The hub's API answers, the test user exists, their server starts and answers."""
    checks: list[Check] = []
    with HubAPI.of(access) as api:
        try:
            _timed(checks, "hub api", lambda: f"JupyterHub {api.version()}")
            _timed(checks, "create test user", lambda: api.ensure_user(HEALTH_USER) or HEALTH_USER)
            _timed(checks, "start server", lambda: api.start_server(HEALTH_USER, timeout))
            _timed(
                checks,
                "server status",
                lambda: "last activity " + str(api.get_user_page(HEALTH_USER, "api/status", 30).json().get("last_activity")),
            )
        except Exception:
            _stop_after_failure(api)
            raise
    return checks


@task(name="render-lab-in-voila", cache_policy=NO_CACHE, **retry_options(retries=2))
def render_in_voila(access: HubAccess, lab: str, timeout: float) -> Check:
    """The test user's server renders the lab as a Voilà dashboard with its widgets."""

    def render() -> str:
        page = api.get_user_page(HEALTH_USER, f"voila/render/labs/{quote(lab)}.ipynb", timeout)
        widgets = page.text.count(WIDGET_MIME)
        if widgets == 0:
            raise HubError(f"Voilà rendered labs/{lab}.ipynb without any widget")
        return f"labs/{lab}.ipynb: {len(page.content)} bytes, {widgets} widget views"

    with HubAPI.of(access) as api:
        return _one_check("render lab in Voilà", render)


@contextmanager
def health_user_login(access: HubAccess, timeout: float) -> Iterator[UserLogin]:
    """How a browser logs in as the test user: a token of theirs for their server only, long
    enough for the slowest page the caller waits for, deleted when the block ends."""
    with HubAPI.of(access) as api, api.user_token(HEALTH_USER, int(3 * timeout) + 120, "olab health check: a browser as the test user") as token:
        yield UserLogin(hub_url=access.url, user=HEALTH_USER, token=token)


@task(name="stop-test-server", cache_policy=NO_CACHE, **retry_options(retries=2))
def stop_test_server(access: HubAccess, timeout: float) -> Check:
    with HubAPI.of(access) as api:
        return _one_check("stop server", lambda: api.stop_server(HEALTH_USER, timeout))


def stop_after_failure(access: HubAccess) -> None:
    """The test user's server stopped after a failed step (a failure to stop it is logged)."""
    with HubAPI.of(access) as api:
        _stop_after_failure(api)


def log_checks(checks: list[Check]) -> None:
    logger = task_logger()
    for check in checks:
        logger.info("%-20s %-3s %5.1fs  %s", check.name, "ok" if check.ok else "NO", check.seconds, check.detail)
