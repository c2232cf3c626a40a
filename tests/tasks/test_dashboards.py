"""Dashboards as students see them, on a real hub spawning containers of the real image: a
student lands on the lab index, every page renders with O-Lab's Voilà template, and nothing
a page or the files it loads refer to lives outside the student's own server. The lab index
is olab's page, refreshed at each start; a lab the student changed is theirs and stays.

In a browser (typeset formulas, no failed request, a slider redrawing) the health check's
tests look at the same pages.
"""

from __future__ import annotations

import html.parser
import json
import re
import time
import uuid
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from core.config import load_site
from core.lab_index import INDEX_NAME
from core.secrets import SecretStore
from flows.deploy_hub import deploy_hub
from tasks.notebooks import discover_labs
from tests.tasks.conftest import missing, oci_site
from tests.tasks.test_oci import _browser, _form, _ready

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed: run ./setup.sh as root"),
]

# Not addresses but names: XML namespaces and the like, which a browser never fetches
# (the spinner's SVG declares them).
IDENTIFIERS = ("http://www.w3.org/", "https://www.w3.org/", "http://purl.org/dc/", "http://creativecommons.org/ns#")
ANY_URL = re.compile(r"""https?://[^\s"'`)<>\\]+""")
BLOCK_COMMENT = re.compile(r"/\*.*?\*/", re.S)
# "//" that starts a comment, not the one in "https://" or inside a quoted URL.
LINE_COMMENT = re.compile(r"""(?<![:\w\\"'])//[^\n]*""")
CSS_URL = re.compile(r"""url\(\s*['"]?([^'")]+)|@import\s+['"]([^'"]+)""")


class _References(html.parser.HTMLParser):
    """Every src and href of a page's elements."""

    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.found += [(tag, value) for name, value in attrs if name in ("src", "href") and value]


def outside_urls(text: str, server: str) -> list[str]:
    """Addresses in ``text`` (comments aside) that are not on ``server``."""
    code = LINE_COMMENT.sub("", BLOCK_COMMENT.sub("", text))
    return sorted({url for url in ANY_URL.findall(code) if not url.startswith(IDENTIFIERS) and urlsplit(url).netloc != server})


def loaded_files(page_url: str, page: str) -> list[str]:
    """What a page loads by itself: its scripts and stylesheets, and the widget extensions
    its page config names (Voilà's front end loads each one's remoteEntry)."""
    references = _References()
    references.feed(page)
    files = [urljoin(page_url, ref) for tag, ref in references.found if tag in ("script", "link") and not ref.startswith("data:")]
    config = json.loads(re.search(r'<script id="jupyter-config-data" type="application/json">(.*?)</script>', page, re.S).group(1))
    files += [
        urljoin(page_url, f"{config['fullLabextensionsUrl']}/{extension['name']}/{extension['load']}")
        for extension in config["federated_extensions"]
    ]
    return files


def assert_served_by_the_server(client: httpx.Client, page_url: str, page: str) -> None:
    server = urlsplit(page_url).netloc
    assert outside_urls(page, server) == [], f"{page_url} names addresses outside its server"
    files = loaded_files(page_url, page)
    assert any("voila.js" in f for f in files) and any(".css" in f for f in files), files
    for url in files:
        response = client.get(url)
        assert response.status_code == 200, f"{url}: {response.status_code}"
        assert urlsplit(str(response.url)).netloc == server
        assert outside_urls(response.text, server) == [], f"{url} names addresses outside the server"
        if urlsplit(url).path.endswith(".css"):
            for found in CSS_URL.findall(response.text):
                target = found[0] or found[1]
                assert target.startswith("data:") or urlsplit(urljoin(url, target)).netloc == server, f"{url}: {target}"


def olab_header(page: str) -> str:
    found = re.search(r'<header class="olab-header">(.*?)</header>', page, re.S)
    assert found, "not rendered with O-Lab's template"
    return found.group(1)


def wait_stopped(api: httpx.Client, user: str) -> None:
    api.delete(f"/hub/api/users/{user}/server")
    for _ in range(240):
        if not api.get(f"/hub/api/users/{user}").json()["servers"]:
            return
        time.sleep(0.25)
    raise AssertionError(f"{user}'s server did not stop")


def test_a_student_lands_on_the_lab_index_and_every_page_is_the_servers_own(user_image, registry_address, make_site, stop_hubs):
    _, image = user_image
    # What a browser makes of these pages is the health check's to judge (its own tests); here,
    # what the server serves.
    path = oci_site(make_site, "dash", registry_address, labs={"browser_check": False})
    stop_hubs.append(path)
    hub = deploy_hub(site=str(path), image=image)
    site = load_site(str(path))
    labs = discover_labs(site.config.labs.path)
    staged_index = site.paths.labs / f"{INDEX_NAME}.ipynb"
    assert staged_index.is_file(), "deploy stages the lab index beside the labs"

    secrets = SecretStore(site.paths.secrets).load()
    api = httpx.Client(base_url=hub.url, headers={"Authorization": f"token {secrets.api_token.get_secret_value()}"}, timeout=300)
    name, password = "dana", "dana-" + uuid.uuid4().hex
    try:
        with _browser(hub.url) as signup:
            _form(signup, "/hub/signup", username=name, signup_password=password, signup_password_confirmation=password)
        with _browser(hub.url) as admin:
            assert _form(admin, "/hub/login", username="admin", password=secrets.admin_password.get_secret_value()).status_code == 302
            assert admin.get(f"/hub/authorize/{name}").status_code == 302
        # Started through the API: the waiting page a browser would see needs JavaScript.
        _ready(api, name)
        with _browser(hub.url) as student:
            assert _form(student, "/hub/login", username=name, password=password).status_code == 302
            student.follow_redirects = True
            student.timeout = httpx.Timeout(300)

            # Where a student lands: the lab index, as a dashboard.
            landing = student.get("/hub/")
            index_url = str(landing.url)
            assert urlsplit(index_url).path == f"/user/{name}/voila/render/labs/{INDEX_NAME}.ipynb", index_url
            assert landing.status_code == 200
            header = olab_header(landing.text)
            assert "O-Lab" in header and "Labs" in header
            assert "open as notebook" not in header, "the index is olab's page, not a notebook to open"
            for lab in labs:
                assert f'href="{lab.name}.ipynb"' in landing.text, f"{lab.name} is not on the index"
                assert f'href="../../../lab/tree/labs/{lab.name}.ipynb"' in landing.text
            assert_served_by_the_server(student, index_url, landing.text)

            # A lab, by the index's own link: O-Lab's header, its widgets, nothing from outside.
            lab_url = urljoin(index_url, "lorenz.ipynb")
            lab_page = student.get(lab_url)
            assert lab_page.status_code == 200
            header = olab_header(lab_page.text)
            assert "The Lorenz system: deterministic chaos" in header
            assert f'href="/user/{name}/lab/tree/labs/lorenz.ipynb"' in header and "open as notebook" in header
            assert "application/vnd.jupyter.widget-view+json" in lab_page.text
            assert "def lorenz_deriv" not in lab_page.text, "code cells are hidden on a dashboard"
            assert_served_by_the_server(student, lab_url, lab_page.text)

            # The notebook view is one click away, with no news and no update check.
            notebook_view = student.get(urljoin(index_url, "../../../lab/tree/labs/lorenz.ipynb"))
            assert notebook_view.status_code == 200
            config = re.search(r'<script id="jupyter-config-data" type="application/json">(.*?)</script>', notebook_view.text, re.S)
            assert json.loads(config.group(1))["news"] == {"disabled": True}, "JupyterLab would fetch Jupyter's news"
            notification = student.get(f"/user/{name}/lab/api/settings/@jupyterlab/apputils-extension:notification").json()
            defaults = {key: value.get("default") for key, value in notification["schema"]["properties"].items()}
            assert defaults["fetchNews"] == "false" and defaults["checkForUpdates"] is False, "no pop-up asking about news"

        # The student's own lab stays theirs; the index is olab's and comes back at each start,
        # also where the student put a link in its place.
        home = site.paths.homes / name
        (home / "notes.txt").write_text("my notes")
        edited = json.loads((home / "labs" / "lorenz.ipynb").read_text())
        edited["cells"].append({"cell_type": "markdown", "id": "dana-1", "metadata": {}, "source": "My own conclusion."})
        api.put(f"/user/{name}/api/contents/labs/lorenz.ipynb", json={"type": "notebook", "content": edited}).raise_for_status()
        api.put(
            f"/user/{name}/api/contents/labs/{INDEX_NAME}.ipynb",
            json={"type": "file", "format": "text", "content": "the student's scribbles"},
        ).raise_for_status()
        wait_stopped(api, name)
        assert (home / "labs" / f"{INDEX_NAME}.ipynb").read_text() == "the student's scribbles"
        _ready(api, name)
        assert (home / "labs" / f"{INDEX_NAME}.ipynb").read_bytes() == staged_index.read_bytes()
        assert "My own conclusion." in (home / "labs" / "lorenz.ipynb").read_text(), "a student's lab was overwritten"

        wait_stopped(api, name)
        (home / "labs" / f"{INDEX_NAME}.ipynb").unlink()
        (home / "labs" / f"{INDEX_NAME}.ipynb").symlink_to("../notes.txt")
        _ready(api, name)
        index = home / "labs" / f"{INDEX_NAME}.ipynb"
        assert not index.is_symlink() and index.read_bytes() == staged_index.read_bytes()
        assert (home / "notes.txt").read_text() == "my notes", "the refresh wrote through the student's link"
        assert not [p.name for p in (home / "labs").iterdir() if ".olab-" in p.name], "a temporary file stayed"
        wait_stopped(api, name)
    finally:
        api.close()
