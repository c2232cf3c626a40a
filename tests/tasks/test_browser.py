"""A student's browser on a real hub: Debian's Chromium, driven by Playwright, on the real user
image's servers. The lab index and a dashboard as a student sees them, the health check's
browser step failing on a broken slider and on a missing image, and deploy-hub recording it.

These need the container tools (the real image) and /usr/bin/chromium, which ./setup.sh installs.
"""

from __future__ import annotations

import shutil
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from core.browser_verdict import BROWSER_CHECK, verdict
from core.config import load_site
from core.models import HubDeployment, UserLogin
from core.secrets import SecretStore
from core.state import load_state
from flows.deploy_hub import HealthCheckFailed, deploy_hub
from tasks import browser
from tasks.browser import BrowserMissing, StudentBrowser
from tasks.hub_api import HEALTH_USER, HubAPI
from tasks.local_hub import stop_hub
from tasks.notebooks import discover_labs
from tests.conftest import REPO, SiteFactory
from tests.flows.test_deploy_gke import artifacts, server_logs
from tests.flows.test_lifecycle import latest_artifact
from tests.tasks.conftest import missing, oci_site

no_browser = None if shutil.which("chromium") or browser.CHROMIUM.exists() else "chromium not installed: run ./setup.sh as root"
needs_a_hub = [
    pytest.mark.slow,
    # The first test of a session builds the user image (the module's hub needs it): 10+ minutes.
    pytest.mark.timeout(2400),
    pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed: run ./setup.sh as root"),
    pytest.mark.skipif(bool(no_browser), reason=no_browser or ""),
]


def with_a_hub(test):
    for mark in needs_a_hub:
        test = mark(test)
    return test


STUDENT = "student1"


def lab(body: str) -> str:
    """A lab in MyST markdown, with the front matter (its kernel) of the project's own labs."""
    front = (REPO / "labs" / "lorenz.md").read_text().split("---\n", 2)[1]
    return f"---\n{front}---\n{body}"


# Runs (test-notebooks would pass it: the first draw works); moving the slider raises.
BROKEN_SLIDER = lab("""
# A lab whose slider breaks

Moving $k$ away from 1 makes the callback raise.

```{code-cell} ipython3
%matplotlib inline
import matplotlib.pyplot as plt
from ipywidgets import interactive, IntSlider


def draw(k=1):
    if k != 1:
        raise ZeroDivisionError(f"k = {k}: the callback divides by zero")
    plt.plot([0, 1], [0, k])
    plt.show()


interactive(draw, k=IntSlider(value=1, min=0, max=5, description="k"))
```
""")

# Its figure is not in the labs folder. (An <img> tag, not markdown's ![](...): Voilà 0.5.13
# embeds markdown images itself through the async contents manager, gets a coroutine, and the
# page never finishes: the server log shows "TypeError: 'coroutine' object is not subscriptable".)
MISSING_IMAGE = lab("""
# A lab whose figure is missing

The apparatus, with a pendulum of length $L$:

<img src="apparatus.png" alt="the apparatus" width="200">

```{code-cell} ipython3
%matplotlib inline
import matplotlib.pyplot as plt
from ipywidgets import interactive, IntSlider


def draw(k=1):
    plt.plot([0, 1], [0, k])
    plt.show()


interactive(draw, k=IntSlider(value=1, min=0, max=5, description="k"))
```
""")


@pytest.fixture(scope="module")
def site(tmp_path_factory, user_image, registry_address):
    """One hub for the module, on the real image, with every lab of the project and two broken ones."""
    root = tmp_path_factory.mktemp("browser")
    labs = root / "labs"
    shutil.copytree(REPO / "labs", labs)
    (labs / "broken_slider.md").write_text(BROKEN_SLIDER)
    (labs / "missing_image.md").write_text(MISSING_IMAGE)
    path = oci_site(SiteFactory(root), "browse", registry_address, labs={"path": str(labs)})
    hub = deploy_hub(site=str(path), image=user_image[1], check=False)
    assert isinstance(hub, HubDeployment), hub
    yield path
    stop_hub(load_site(str(path)))


def set_labs(path: Path, **settings) -> None:
    data = yaml.safe_load(path.read_text())
    data["labs"].update(settings)
    path.write_text(yaml.safe_dump(data))


def hub_api(path: Path) -> HubAPI:
    the_site = load_site(str(path))
    token = SecretStore(the_site.paths.secrets).load().api_token.get_secret_value()
    return HubAPI(load_state(the_site).hub.url, token, timeout=120)


@pytest.fixture
def student(site):
    """A student's running server and a browser logged in as them (a token of theirs, in headers only)."""
    with hub_api(site) as api:
        api.ensure_user(STUDENT)
        api.start_server(STUDENT, timeout=300)
        try:
            with api.user_token(STUDENT, 1800, "test_browser") as token:
                login = UserLogin(hub_url=api.url, user=STUDENT, token=token)
                with StudentBrowser(login, timeout=300).session() as student_browser:
                    yield login, student_browser
        finally:
            api.stop_server(STUDENT, timeout=300)


@with_a_hub
def test_a_student_lands_on_the_lab_index_and_its_link_opens_a_dashboard(student, site, tmp_path):
    login, student_browser = student
    index = student_browser.view(login.server_url(), move_slider=False, screenshot=tmp_path / "index.png")
    # The site's default URL (where the hub sends a logged-in student) is the lab index.
    assert urlsplit(index.landed).path == f"/user/{STUDENT}/voila/render/labs/index.ipynb", index.landed
    labs = [lab.name for lab in discover_labs(load_site(str(site)).labs_dir)]
    dashboards = {lab: login.server_url(f"voila/render/labs/{lab}.ipynb") for lab in labs}
    assert set(dashboards.values()) <= set(index.links), sorted(set(dashboards.values()) - set(index.links))
    assert verdict(index, dashboard=False) is None, verdict(index, dashboard=False)
    lab = student_browser.view(dashboards["lorenz"], screenshot=tmp_path / "lorenz.png")
    assert urlsplit(lab.landed).path == f"/user/{STUDENT}/voila/render/labs/lorenz.ipynb"
    assert verdict(lab) is None, verdict(lab)


@with_a_hub
def test_a_dashboard_in_a_real_browser_typesets_loads_only_from_its_site_and_redraws(student, tmp_path):
    login, student_browser = student
    lab = student_browser.view(login.server_url("voila/render/labs/lorenz.ipynb"), screenshot=tmp_path / "lorenz.png")
    # The widgets work: a slider moved by keyboard redraws the attractor through the kernel's
    # WebSocket, which the token in the headers opened (no login cookie was ever set).
    assert lab.widget_views > 0 and lab.slider == "σ"
    assert lab.slider_values is not None and lab.slider_values[0] != lab.slider_values[1]
    assert lab.output_changed is True and lab.error_outputs == []
    assert not [c["name"] for c in student_browser.context.cookies() if c["name"].startswith("jupyterhub")]
    assert lab.screenshot == tmp_path / "lorenz.png" and lab.screenshot.stat().st_size > 10_000
    assert lab.failed_requests == []
    # Nothing beyond the site's own origin (127.0.0.1:<port>), which is all a closed classroom has.
    assert urlsplit(login.hub_url).hostname == "127.0.0.1"
    assert lab.foreign_requests == []
    assert lab.raw_formulas == [] and lab.typeset_formulas > 10
    assert lab.console_errors == []
    assert verdict(lab) is None


@with_a_hub
def test_the_browser_check_names_a_broken_slider_and_a_missing_image(site, user_image):
    the_site = load_site(str(site))
    shots = the_site.paths.runtime / "health"
    try:
        for lab, cause in [
            ("broken_slider", "slider moved, the output shows an error: ZeroDivisionError: k = 2: the callback divides by zero"),
            ("missing_image", f"1 request failed: /user/{HEALTH_USER}/voila/files/labs/apparatus.png (404)"),
        ]:
            set_labs(site, health_check_lab=lab)
            with pytest.raises(HealthCheckFailed) as failed:
                deploy_hub(site=str(site), image=user_image[1], check=True)
            message = str(failed.value)
            assert message.startswith(f"{BROWSER_CHECK}: ") and cause in message, message
            assert "\n" not in message
            # The failing report is the site's last health, with the screenshot a student would have seen.
            health = load_state(the_site).health
            (check,) = [c for c in health.checks if c.name == BROWSER_CHECK]
            assert not check.ok and cause in check.detail
            assert Path(check.link).parent == shots and Path(check.link).name.endswith(f"-{lab}.png")
            assert Path(check.link).is_file() and f"(screenshot: {check.link})" in message
            published = latest_artifact(f"{the_site.name}-health-check").data
            assert f"| {BROWSER_CHECK} | NO |" in published and Path(check.link).as_uri() in published
            # ... and the test user's server was stopped all the same.
            assert [c.name for c in health.checks][-1] == "stop server" and health.checks[-1].ok
    finally:
        set_labs(site, health_check_lab="lorenz")


@with_a_hub
def test_deploy_hub_records_the_browser_check_and_its_screenshot(site, user_image, monkeypatch):
    the_site = load_site(str(site))
    made = record_user_tokens(monkeypatch)
    before = set((the_site.paths.runtime / "health").glob("*.png"))
    outcome = deploy_hub(site=str(site), image=user_image[1], check=True, return_state=True)
    health = load_state(the_site).health
    names = [c.name for c in health.checks]
    assert names == ["hub api", "create test user", "start server", "server status", "render lab in Voilà",
                     BROWSER_CHECK, "stop server"]
    (check,) = [c for c in health.checks if c.name == BROWSER_CHECK]
    shot = Path(check.link)
    assert shot not in before and shot.is_file() and shot.name.endswith("-lorenz.png")
    assert shot.stat().st_size > 10_000
    # The token the browser used was the test user's, for that check only: it is gone, and it
    # is in no log, artifact, state or file name.
    assert len(made) == 1
    with hub_api(site) as api:
        tokens = api.request("GET", f"/hub/api/users/{HEALTH_USER}/tokens").json()["api_tokens"]
    assert not [t for t in tokens if (t.get("note") or "").startswith("olab health check")]
    run = outcome.state_details.flow_run_id
    written = [*server_logs([run]), *(a.data for a in artifacts([run])), the_site.paths.state.read_text(),
               (the_site.paths.logs / "hub.log").read_text(), *map(str, shot.parent.iterdir())]
    assert not [text for text in written if made[0] in str(text)]
    assert check.ok, check.detail
    assert outcome.is_completed(), outcome
    (artifact,) = [a for a in artifacts([run]) if a.key == f"{the_site.name}-deploy-hub"]
    assert f"| {BROWSER_CHECK} | yes |" in artifact.data and f"([screenshot]({shot.as_uri()}))" in artifact.data
    # Voilà's render through the API and the browser's look ran at the same time, each a task
    # run of the flow; the test user's server was stopped after both.
    spans = task_spans(run)
    (render,), (look,), (stop,) = spans["render-lab-in-voila"], spans["dashboard-in-browser"], spans["stop-test-server"]
    assert render[0] < look[1] and look[0] < render[1], f"not at the same time: render {render}, browser {look}"
    assert stop[0] >= max(render[1], look[1])


def task_spans(flow_run_id) -> dict[str, list[tuple]]:
    """A flow run's task runs by task name: (start, end) of each."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    spans: dict[str, list[tuple]] = {}
    for run in runs:
        spans.setdefault(run.name.rsplit("-", 1)[0], []).append((run.start_time, run.end_time))
    return spans


def record_user_tokens(monkeypatch) -> list[str]:
    """The tokens the health check makes for the test user, as they were handed to the browser."""
    made: list[str] = []
    original = HubAPI.user_token

    @contextmanager
    def recording(self, name, expires_in, note):
        with original(self, name, expires_in, note) as token:
            made.append(token.get_secret_value())
            yield token

    monkeypatch.setattr(HubAPI, "user_token", recording)
    return made


@with_a_hub
def test_a_site_can_turn_the_browser_check_off_and_the_report_says_so(site, user_image):
    set_labs(site, browser_check=False)
    try:
        deploy_hub(site=str(site), image=user_image[1], check=True, return_state=True)
        health = load_state(load_site(str(site))).health
        (check,) = [c for c in health.checks if c.name == BROWSER_CHECK]
        assert check.ok and check.detail == "off (labs.browser_check: false in the site file)" and check.link is None
    finally:
        set_labs(site, browser_check=True)


def test_without_chromium_the_check_says_to_run_setup_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(browser, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrowserMissing) as missing_browser:
        browser.chromium()
    message = str(missing_browser.value)
    assert "\n" not in message and "./setup.sh" in message and "labs.browser_check: false" in message


BAD_PAGE = """<!doctype html><html><head><title>bad</title><link rel="icon" href="data:;base64,=">
<script src="https://cdn.example.org/mathjax/tex-chtml.js"></script></head><body>
<div class="jp-RenderedMarkdown jp-RenderedHTMLCommon"><p>The rate is $\\dot x$.</p><img src="apparatus.png"></div>
<pre data-mime-type="application/vnd.jupyter.stderr">UserWarning: only a warning</pre>
<pre data-mime-type="application/vnd.jupyter.stderr">Traceback (most recent call last):
  File "lab.py", line 1, in draw
ValueError: no such rate</pre>
<script>console.error("boom from the page")</script></body></html>"""


@pytest.mark.skipif(bool(no_browser), reason=no_browser or "")
def test_the_browser_sees_what_a_student_would_on_any_page_and_sends_the_token_only_home():
    """No hub: a page on loopback that answers only with the token, and that asks another host
    for a script, a missing image for a figure, and logs an error, leaves raw TeX."""
    seen_headers: list[tuple[str, str | None]] = []

    class Page(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            seen_headers.append((self.path, self.headers.get("Authorization")))
            ok = self.headers.get("Authorization") == "token sesame" and self.path == "/page"
            body = BAD_PAGE.encode() if ok else b"no"
            self.send_response(200 if ok else 404 if self.headers.get("Authorization") else 403)
            self.send_header("Content-Type", "text/html" if ok else "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        login = UserLogin(hub_url=url, user="u", token="sesame")
        with StudentBrowser(login, timeout=30, react_seconds=2).session() as student_browser:
            seen = student_browser.view(f"{url}/page")
    finally:
        server.shutdown()
        server.server_close()
    assert seen.foreign_requests == ["https://cdn.example.org/mathjax/tex-chtml.js"]
    assert [(r.url, r.reason) for r in seen.failed_requests] == [(f"{url}/apparatus.png", "404")]
    assert seen.raw_formulas == ["$\\dot x$"] and seen.typeset_formulas == 0
    assert seen.console_errors == ["boom from the page"] and seen.widget_views == 0 and seen.slider is None
    assert seen.error_outputs == ["ValueError: no such rate"]  # a traceback is, a warning is not
    # Every request the page made reached its own server, each with the token.
    assert seen_headers == [("/page", "token sesame"), ("/apparatus.png", "token sesame")]
    assert verdict(seen) == (
        "1 request failed: /apparatus.png (404); 1 request to other hosts, which a classroom may not reach: "
        "cdn.example.org/mathjax/tex-chtml.js; formulas not typeset: raw `$\\dot x$` on the page; no widget rendered; "
        "the page shows an error: ValueError: no such rate; console: boom from the page"
    )
