"""A class logs in at once (issue 12): thirty students start their servers through the hub's
API at the same moment, on the real local hub spawning containers of the built image.

Every start is accepted (201 or 202: no 429 "Too many users trying to log in", no 503 from
the proxy, no 500), all thirty end ready and answer through the proxy, and a student who has
to wait sees the hub's waiting page (/hub/spawn-pending/<name>), not an error. Then all
thirty are stopped and their containers are gone. One hub deployment for all of it.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from core.config import load_site
from core.runner import pid_alive, run
from core.secrets import SecretStore
from flows.deploy_hub import deploy_hub
from flows.stop_hub import stop_hub
from tasks.oci import engine_for
from tests.conftest import hub_pid
from tests.tasks.test_oci import _browser, _form, missing

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed: run ./setup.sh as root"),
]

STUDENTS = 30
WAITING_PAGE = "Your server is starting up"
# A generous bound on the whole class's start, so a broken hub fails the test instead of
# hanging it; the test does not assert on timing (about a minute on 2 cores).
READY_WITHIN_SECONDS = 600


def _servers(api: httpx.Client) -> dict[str, dict]:
    """Each user's default server as the hub reports it ({} when there is none)."""
    return {u["name"]: u["servers"].get("", {}) for u in api.get("/hub/api/users").raise_for_status().json()}


def _start_all_at_once(url: str, token: str, names: list[str]) -> dict[str, tuple[int, str]]:
    """POST /hub/api/users/<name>/server for every name, all released at the same moment."""
    gate = threading.Barrier(len(names))

    def start(name: str) -> tuple[int, str]:
        with httpx.Client(base_url=url, headers={"Authorization": f"token {token}"}, timeout=300) as own:
            own.get("/hub/api/").raise_for_status()  # the connection is open before the gate
            gate.wait()
            answer = own.post(f"/hub/api/users/{name}/server")
            return answer.status_code, answer.text[:300]

    with ThreadPoolExecutor(len(names)) as pool:
        return dict(zip(names, pool.map(start, names)))


def _signed_up_and_approved(url: str, site, name: str) -> str:
    """A student with a password of their own (native logins: signup, then an admin's approval)."""
    password = f"{name}-" + uuid.uuid4().hex
    with _browser(url) as signup:
        _form(signup, "/hub/signup", username=name, signup_password=password, signup_password_confirmation=password)
    admin_password = SecretStore(site.paths.secrets).load().admin_password.get_secret_value()
    with _browser(url) as admin:
        assert _form(admin, "/hub/login", username="admin", password=admin_password).status_code == 302
        assert admin.get(f"/hub/authorize/{name}").status_code == 302
    return password


def _opens_their_server(browser: httpx.Client, name: str) -> httpx.Response:
    """What a browser shows a logged-in student who opens their server (redirects followed)."""
    browser.follow_redirects = True
    try:
        return browser.get(f"/user/{name}/lab", headers={"Accept": "text/html"})
    finally:
        browser.follow_redirects = False


def test_thirty_simultaneous_server_starts_all_end_ready(user_image, stop_hubs):
    path, image = user_image
    stop_hubs.append(path)
    hub = deploy_hub(site=str(path), image=image, check=False)
    site = load_site(str(path))
    pid = hub_pid(site)
    engine = engine_for("buildah", site.paths.containers, [])
    prefix = f"olab-{site.name}-"
    token = SecretStore(site.paths.secrets).load().api_token.get_secret_value()
    names = [f"student{i:02d}" for i in range(STUDENTS)]
    browsing = names[-1]  # one of the class, logged in with a browser's cookie as a student is
    api = httpx.Client(base_url=hub.url, headers={"Authorization": f"token {token}"}, timeout=120)
    stack = contextlib.ExitStack()
    try:
        api.post("/hub/api/users", json={"usernames": names}).raise_for_status()
        password = _signed_up_and_approved(hub.url, site, browsing)
        browser = stack.enter_context(_browser(hub.url))
        assert _form(browser, "/hub/login", username=browsing, password=password).status_code == 302
        started = time.monotonic()
        answers = _start_all_at_once(hub.url, token, names)
        answered = time.monotonic() - started
        refused = {name: answer for name, answer in answers.items() if answer[0] not in (201, 202)}
        assert not refused, f"{len(refused)} of {STUDENTS} starts refused: {refused}"

        # She opens her server while it starts (thirty servers do not boot in the moment between
        # the starts and her look): the hub's waiting page, not an error.
        assert _servers(api)[browsing].get("pending") == "spawn", f"{browsing}'s server was not starting"
        waiting = _opens_their_server(browser, browsing)
        assert waiting.status_code == 200, f"{browsing} got {waiting.status_code} while waiting: {waiting.text[:300]}"
        if _servers(api)[browsing].get("pending") == "spawn":  # (else it got ready as she looked: her server)
            assert waiting.url.path == f"/hub/spawn-pending/{browsing}" and WAITING_PAGE in waiting.text, waiting.url

        not_ready = set(names)
        while not_ready and time.monotonic() - started < READY_WITHIN_SECONDS:
            servers = _servers(api)
            failed = {n: s for n, s in servers.items() if n in not_ready and not s}
            assert not failed, f"servers gone before they were ready (a failed spawn): {sorted(failed)}"
            not_ready = {n for n in not_ready if not servers[n].get("ready")}
            time.sleep(0.5)
        all_ready = time.monotonic() - started
        assert not not_ready, f"{len(not_ready)} of {STUDENTS} not ready after {READY_WITHIN_SECONDS} s: {sorted(not_ready)}"

        with ThreadPoolExecutor(8) as pool:
            statuses = dict(zip(names, pool.map(lambda n: api.get(f"/user/{n}/api/status").status_code, names)))
        assert set(statuses.values()) == {200}, statuses
        containers = run(["podman", "ps", "--format", "{{.Names}}"], env=engine.env).output.split()
        assert sorted(c for c in containers if c.startswith(prefix)) == sorted(prefix + n for n in names)
        print(f"\n{STUDENTS} starts answered in {answered:.1f}s ({sorted(a[0] for a in answers.values())}), "
              f"all ready after {all_ready:.1f}s; {browsing} saw {waiting.url.path} while waiting")
        # Once ready, the same browser gets her own server (the hub's OAuth, then JupyterLab).
        mine = _opens_their_server(browser, browsing)
        assert mine.status_code == 200 and mine.url.path.startswith(f"/user/{browsing}/"), (mine.status_code, mine.url)

        with ThreadPoolExecutor(8) as pool:
            stops = list(pool.map(lambda n: api.delete(f"/hub/api/users/{n}/server").status_code, names))
        assert set(stops) <= {202, 204}, stops
        for _ in range(480):
            if not any(_servers(api)[n] for n in names):
                break
            time.sleep(0.5)
        assert not any(_servers(api)[n] for n in names), "servers still listed after stopping"
        containers = run(["podman", "ps", "-a", "--format", "{{.Names}}"], env=engine.env).output.split()
        assert not [c for c in containers if c.startswith(prefix)], f"containers left: {containers}"
    finally:
        stack.close()
        api.close()
        # Whatever failed above: no student's container outlives the test.
        left = run(["podman", "ps", "-a", "--filter", f"name=^{prefix}", "--format", "{{.Names}}"], env=engine.env,
                   check=False).output.split()
        if left:
            run(["podman", "rm", "-f", "-t", "2", *left], env=engine.env, check=False, timeout=300)
    assert stop_hub(site=str(path))
    assert not pid_alive(pid)
