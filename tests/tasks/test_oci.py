"""OCI user images for real: buildah builds on a debootstrap base, a local registry,
labs run inside the image, and the hub spawning containers of the pinned digest.

These tests need buildah, podman, runc, docker-registry and debootstrap, which
./setup.sh installs (and .ci/run runs it); where they are missing the module is
skipped with that reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import stat
from pathlib import Path

import uuid

import httpx
import pytest

from flows.build_image import build_image
from flows.deploy_hub import deploy_hub
from flows.stop_hub import stop_hub
from flows.test_notebooks import LabsFailed
from flows.test_notebooks import test_notebooks as run_labs
from core import bridges
from core.config import load_site, olab_home
from core.planning import lock_header
from core.runner import ToolMissing, pid_alive, run
from core.secrets import SecretStore
from tasks.local_hub import port_in_use
from tasks.oci import engine_for, resolve_builder
from tasks.local_registry import registry_login
from tasks.registry import Registry
from tests.conftest import hub_pid

from tests.conftest import REPO  # noqa: E402
from tests.tasks.conftest import missing, oci_site
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed: run ./setup.sh as root"),
]


def small_context(folder: Path, marker: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    requirements = b"# nothing to install: this image only proves the build path\n"
    (folder / "requirements.in").write_bytes(requirements)
    (folder / "requirements.lock").write_text(lock_header(requirements) + f"# {marker}\n")
    (folder / "Containerfile").write_text(
        "ARG BASE_IMAGE=localhost/none\nFROM ${BASE_IMAGE}\nCOPY requirements.lock /etc/olab-lock\n"
        "RUN python3 -c 'print(\"built\")' && useradd --uid 1000 --create-home jovyan\nUSER jovyan\n"
    )
    return folder


def test_small_image_builds_pushes_and_is_not_rebuilt(make_site, tmp_path, registry_address):
    context = small_context(tmp_path / "ctx", "first")
    path = oci_site(make_site, "ocismall", registry_address, image={"context": str(context), "name": "olab-small"})
    first = build_image(site=str(path))
    assert first.builder == "buildah"
    assert first.pinned.startswith(f"{registry_address}/olab-small@sha256:")
    site = load_site(str(path))
    # olab's registry requires olab's credential: nobody else on this machine pushes or reads.
    login = registry_login(site.paths.containers)
    assert httpx.get(f"http://{registry_address}/v2/olab-small/tags/list", timeout=10).status_code == 401
    assert Registry(registry_address, login=login).manifest_digest("olab-small", first.tag) == first.digest

    engine = engine_for("buildah", site.paths.containers, [registry_address])
    built_id = engine.image_id(first.location)
    tags = registry_tags(registry_address, "olab-small")
    plan = build_image(site=str(path), dry_run=True)
    assert [(s.verb, s.subject) for s in plan.steps] == [("reuse", first.pinned)]
    assert registry_tags(registry_address, "olab-small") == tags
    # A digest olab did not push there (someone else's registry on the port, or a push by
    # another hand) is never reused: built again instead.
    pushed = site.paths.containers / "registry" / "pushed.json"
    record = pushed.read_text()
    pushed.write_text("{}")
    plan = build_image(site=str(path), dry_run=True)
    assert plan.steps[-1].verb == "build", plan.steps
    pushed.write_text(record)

    lock = context / "requirements.lock"
    lock.write_text(lock.read_text() + "# planned\n")
    plan = build_image(site=str(path), dry_run=True)
    assert plan.steps[-1].verb == "build" and plan.steps[-1].subject.startswith(f"{registry_address}/olab-small:")
    assert registry_tags(registry_address, "olab-small") == tags, "a dry run pushes nothing"
    lock.write_text(lock.read_text().replace("# planned\n", ""))
    again = build_image(site=str(path))
    assert again == first
    assert engine.image_id(first.location) == built_id, "an unchanged image must not be rebuilt"

    lock = context / "requirements.lock"
    lock.write_text(lock.read_text() + "# changed\n")
    changed = build_image(site=str(path))
    assert changed.tag != first.tag and changed.digest != first.digest
    engine.ensure_local(changed.pinned, login)
    out = run(engine.run_prefix([]) + [changed.pinned, "cat", "/etc/olab-lock"], env=engine.env).output
    assert "# changed" in out


def registry_tags(address: str, name: str) -> list[str]:
    """The tags of olab's registry, read with olab's credential."""
    login = registry_login(olab_home() / "containers")
    auth = (login.username, login.password.get_secret_value())
    return sorted(httpx.get(f"http://{address}/v2/{name}/tags/list", timeout=10, auth=auth).json().get("tags") or [])


def test_missing_builder_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolMissing, match="apt-get install buildah podman"):
        resolve_builder("buildah")
    assert resolve_builder("auto") == "venv"


def test_labs_run_inside_the_image(user_image, make_site, broken_labs, registry_address):
    path, image = user_image
    report = run_labs(site=str(path), image=image)
    assert report.passed and len(report.results) >= 4
    broken = oci_site(make_site, "ocibroken", registry_address, labs={"path": str(broken_labs)})
    with pytest.raises(LabsFailed) as info:
        run_labs(site=str(broken), image=image)
    bad = {r.lab: r for r in info.value.report.results}["bad_pendulum"]
    assert bad.failing_cell == 3 and "AssertionError" in bad.error


def test_root_imports_inside_the_image(user_image):
    """PyPI's ROOT wheel (a pre-release) works in the image: `import ROOT` starts its C++
    interpreter, which needs the g++ the Containerfile installs, and the version installed
    is the one the lock pins."""
    path, image = user_image
    site = load_site(str(path))
    # The registry olab runs speaks plain HTTP on loopback: the engine must be told, or a
    # pull (when no test before this one pulled the image) fails "HTTP response to HTTPS client".
    engine = engine_for("buildah", site.paths.containers, [site.config.image.registry])
    engine.ensure_local(image.pinned, registry_login(site.paths.containers))
    probe = "import importlib.metadata as m, ROOT; print(m.version('root'), ROOT.gROOT.GetVersion())"
    out = run(engine.run_prefix([]) + [image.pinned, "python", "-W", "ignore", "-c", probe], env=engine.env).output
    wheel, version = out.strip().splitlines()[-1].split()
    lock = (site.image_context / "requirements.lock").read_text()
    assert f"\nroot=={wheel} " in lock, f"root {wheel} in the image is not the lock's"
    major, minor, _ = version.split(".")
    assert (int(major), int(minor)) >= (6, 30), version


def test_hub_spawns_a_container_of_the_digest(user_image, stop_hubs):
    path, image = user_image
    stop_hubs.append(path)
    hub = deploy_hub(site=str(path), image=image)
    site = load_site(str(path))
    pid = hub_pid(site)
    engine = engine_for("buildah", site.paths.containers, [])
    token = SecretStore(site.paths.secrets).load().api_token.get_secret_value()
    api = httpx.Client(base_url=hub.url, headers={"Authorization": f"token {token}"}, timeout=120)
    try:
        api.post("/hub/api/users/student1").raise_for_status()
        api.post("/hub/api/users/student1/server").raise_for_status()
        for _ in range(240):
            if api.get("/hub/api/users/student1").json()["servers"].get("", {}).get("ready"):
                break
            import time

            time.sleep(0.25)
        containers = run(["podman", "ps", "--format", "{{.Names}} {{.Image}}"], env=engine.env).output
        line = next(l for l in containers.splitlines() if "student1" in l)
        assert image.digest in line
        status = api.get("/user/student1/api/status")
        assert status.status_code == 200 and "started" in status.json()
        the_server_token_is_in_no_readable_file(site, engine, f"{hub_settings(site)['container_prefix']}-student1")
        page = api.get("/user/student1/voila/render/labs/radioactive_decay.ipynb")
        assert page.status_code == 200 and "application/vnd.jupyter.widget-view+json" in page.text
        # The student's work lands in their home under the site's data folder.
        api.put("/user/student1/api/contents/notes.txt", json={"type": "file", "format": "text", "content": "my data"}).raise_for_status()
        home = site.paths.homes / "student1"
        assert (home / "notes.txt").read_text() == "my data"
        api.delete("/hub/api/users/student1/server").raise_for_status()
        for _ in range(120):
            if not api.get("/hub/api/users/student1").json()["servers"]:
                break
            time.sleep(0.25)
        containers = run(["podman", "ps", "-a", "--format", "{{.Names}}"], env=engine.env).output
        assert "student1" not in containers, "the container is removed on stop"
        assert not (site.paths.runtime / "api-tokens" / "student1").exists(), "its API token file outlived it"
        assert (home / "notes.txt").read_text() == "my data", "the home is kept"
        assert (home / "labs" / "lorenz.ipynb").is_file()
        students_are_only_themselves(hub.url, site, api, engine)
        # A hub killed outright cannot stop its servers: stop-hub removes what it left (the
        # students' containers, their bridges, its proxy holding the site's port).
        _ready(api, "student1")
        os.kill(pid, signal.SIGKILL)
    finally:
        api.close()
    stop_hub(site=str(path))
    assert not pid_alive(pid)
    prefix = json.loads((site.paths.hub / "olab-hub.json").read_text())["container_prefix"]
    assert not [n for n in run(["podman", "ps", "-a", "--format", "{{.Names}}"], env=engine.env).output.split()
                if n.startswith(prefix + "-")]
    ours = ["--filter", f"label=olab-site={site.name}", "--filter", f"label=olab-store={bridges.store_tag(site.paths.containers)}"]
    assert not run(["podman", "network", "ls", "-q", *ours], env=engine.env).output.split()
    assert not port_in_use(site.config.hub.host, site.config.hub.port), "the orphaned proxy still holds the hub's port"
    assert not cullers_of(site), "the killed hub's idle culler is still running"


def cullers_of(site) -> list[int]:
    """The idle cullers (JupyterHub runs them in the hub's folder) of this site still running."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if b"culler" in (entry / "cmdline").read_bytes() and (entry / "cwd").resolve() == site.paths.hub.resolve():
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return [pid for pid in found if pid_alive(pid)]


def hub_settings(site) -> dict:
    return json.loads((site.paths.hub / "olab-hub.json").read_text())


def the_server_token_is_in_no_readable_file(site, engine, container: str) -> None:
    """A user server's API token (it acts as the student towards the hub) is not in its
    container's environment, and no file of the container store or the site's runtime that
    holds it is readable by another account: podman writes a container's environment into
    its runtime config.json, mode 0644."""
    token = run(["podman", "exec", container, "cat", "/run/olab/api-token"], env=engine.env).output.strip()
    assert len(token) >= 32
    env = run(["podman", "inspect", container, "--format", "{{json .Config.Env}}"], env=engine.env).output
    assert "JUPYTERHUB_API_TOKEN" not in env and token not in env
    served = run(["podman", "exec", container, "sh", "-c", "cat /proc/1/environ | tr '\\0' '\\n'"], env=engine.env).output
    assert f"JUPYTERHUB_API_TOKEN={token}" in served, "the server got its token"
    holders = []
    for root in (site.paths.containers / "run", site.paths.containers / "storage" / "overlay-containers",
                 site.paths.containers / "storage" / "libpod", site.paths.runtime):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink() and site.paths.homes not in path.parents:
                try:
                    if token.encode() in path.read_bytes():
                        holders.append(path)
                except OSError:
                    continue
    assert holders, "the token file was not found"
    loose = [f"{p} {stat.S_IMODE(p.stat().st_mode):o}" for p in holders if stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert not loose, loose
    token_file = site.paths.runtime / "api-tokens" / container.rsplit("-", 1)[-1]
    assert token_file in holders and token_file.stat().st_uid == hub_settings(site)["home_uid"]


@contextlib.contextmanager
def _browser(url: str):
    """A browser's session: its own cookies, the login page's _xsrf cookie first."""
    with httpx.Client(base_url=url, follow_redirects=False, timeout=60) as client:
        client.get("/hub/login")
        yield client


def _form(client: httpx.Client, path: str, **fields) -> httpx.Response:
    return client.post(path, data={**fields, "_xsrf": client.cookies.get("_xsrf")})


def _ready(api: httpx.Client, user: str) -> None:
    import time

    if api.get(f"/hub/api/users/{user}").status_code == 404:  # a signup is no JupyterHub user until its first login
        api.post(f"/hub/api/users/{user}").raise_for_status()
    api.post(f"/hub/api/users/{user}/server").raise_for_status()
    for _ in range(240):
        if api.get(f"/hub/api/users/{user}").json()["servers"].get("", {}).get("ready"):
            return
        time.sleep(0.25)
    raise AssertionError(f"{user}'s server did not start")


PROBE = """
import json, sys, urllib.request, urllib.error
found = {}
for name, url in json.loads(sys.argv[1]).items():
    try:
        found[name] = urllib.request.urlopen(url, timeout=5).status
    except urllib.error.HTTPError as e:
        found[name] = e.code
    except Exception as e:
        found[name] = type(e).__name__
print(json.dumps(found))
"""


def a_students_server_reaches_nothing_of_the_host(site, engine, api: httpx.Client) -> None:
    """From inside ann's container: this machine's loopback (the Prefect API, olab's registry,
    the hub's port) is out of reach; the hub's API answers nothing without a token; bob's
    server (on a bridge of its own) cannot be reached at all; ann's own server answers her
    through the hub's proxy; and it runs in a user namespace, as no account of this machine."""
    from prefect.settings import PREFECT_API_URL

    settings = json.loads((site.paths.hub / "olab-hub.json").read_text())
    gateway, hub_port = settings["gateway"], settings["hub_api_port"]
    prefect = PREFECT_API_URL.value().split("//", 1)[1].split("/", 1)[0]
    bob = run(["podman", "inspect", f"{settings['container_prefix']}-bob", "--format",
               "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"], env=engine.env).output.strip()
    assert bob, "bob's container has an address on its own bridge"
    targets = {
        "prefect": f"http://{prefect}/api/health",
        "registry": f"http://{site.config.image.registry}/v2/",
        "hub on loopback": f"http://127.0.0.1:{hub_port}/hub/api/",
        "hub api without a token": f"http://{gateway}:{hub_port}/hub/api/users",
        "bob's server": f"http://{bob}:8888/user/bob/api/contents",
    }
    out = run(["podman", "exec", f"{settings['container_prefix']}-ann", "python3", "-c", PROBE, json.dumps(targets)],
              env=engine.env).output
    found = json.loads(out.strip().splitlines()[-1])
    for name in ("prefect", "registry", "hub on loopback"):
        assert isinstance(found[name], str), f"{name} answered {found[name]} from inside a student's container"
    assert found["hub api without a token"] == 403, found
    assert isinstance(found["bob's server"], str), f"bob's server answered ann: {found}"
    assert api.get("/user/ann/api/status").status_code == 200, "ann's own server answers through the proxy"
    # Each on a bridge of its own; and ann's server runs as no account of this machine.
    nets = {name: run(["podman", "inspect", f"{settings['container_prefix']}-{name}", "--format",
                       "{{range $net, $_ := .NetworkSettings.Networks}}{{$net}}{{end}}"], env=engine.env).output.strip()
            for name in ("ann", "bob")}
    assert nets["ann"] != nets["bob"] and "podman" not in nets.values(), nets
    pid = int(run(["podman", "inspect", f"{settings['container_prefix']}-ann", "--format", "{{.State.Pid}}"],
                  env=engine.env).output.strip())
    for child in [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]:
        uid = int(next(l for l in Path(f"/proc/{child}/status").read_text().splitlines() if l.startswith("Uid:")).split()[1])
        assert uid == settings["home_uid"], f"ann's server process {child} runs as host uid {uid}"
        with pytest.raises(KeyError):
            pwd.getpwuid(uid)
    assert (site.paths.homes / "ann").stat().st_uid == settings["home_uid"]


def students_are_only_themselves(url: str, site, api: httpx.Client, engine) -> None:
    """hub.authenticator native (the local default): students sign up, an admin approves each
    name, and then each logs in as themself only, and cannot open another's server."""
    passwords = {"ann": "ann-" + uuid.uuid4().hex, "bob": "bob-" + uuid.uuid4().hex}
    for name, password in passwords.items():
        with _browser(url) as signup:
            _form(signup, "/hub/signup", username=name, signup_password=password, signup_password_confirmation=password)
    admin_password = SecretStore(site.paths.secrets).load().admin_password.get_secret_value()
    with _browser(url) as squatter:
        _form(squatter, "/hub/signup", username="admin", signup_password="x" * 20, signup_password_confirmation="x" * 20)
        assert _form(squatter, "/hub/login", username="admin", password="x" * 20).status_code != 302, "a signup took an admin's name"
    with _browser(url) as early:
        refused = _form(early, "/hub/login", username="ann", password=passwords["ann"])
        assert refused.status_code == 403, "no login before an admin approves"
    with _browser(url) as admin:
        assert _form(admin, "/hub/login", username="admin", password=admin_password).status_code == 302
        for name in passwords:
            assert admin.get(f"/hub/authorize/{name}").status_code == 302
    _ready(api, "bob")
    _ready(api, "ann")
    a_students_server_reaches_nothing_of_the_host(site, engine, api)
    with _browser(url) as ann:
        wrong = _form(ann, "/hub/login", username="bob", password=passwords["ann"])
        assert wrong.status_code == 403, "ann logged in as bob"
        assert _form(ann, "/hub/login", username="ann", password=passwords["ann"]).status_code == 302
        assert ann.get("/hub/api/user").json()["name"] == "ann"
        assert ann.get("/hub/api/users/bob").status_code in (403, 404), "ann reads bob's record"
        ann.follow_redirects = True
        other = ann.get("/user/bob/api/contents/")
        assert other.status_code == 403 or "/hub/login" in str(other.url), f"ann opened bob's server: {other.status_code} {other.url}"
        mine = ann.get("/hub/api/user")
        assert mine.json()["name"] == "ann"
    for name in ("ann", "bob"):
        api.delete(f"/hub/api/users/{name}/server")


def test_a_gke_site_pushes_to_its_artifact_registry_with_a_short_lived_google_token(make_site, tmp_path, monkeypatch):
    """Artifact Registry's login, as `gcloud auth configure-docker` does it: user oauth2accesstoken,
    a token of the site's Google credentials. A registry that requires it stands in for AR."""
    from tasks.registry import RegistryAuthError
    from tests.fakes.gke import FakeGke, service_account_key
    from tests.fakes.registry import AuthRegistry

    with FakeGke(project="olab-test-project") as gke, AuthRegistry(tmp_path / "ar", {"oauth2accesstoken": "ya29.fake-access-token"}) as ar:
        key = tmp_path / "sa.json"
        service_account_key(key, gke.token_uri, "olab-test-project")
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
        context = small_context(tmp_path / "ctx", "gke")
        registry = f"{ar.address}/olab-test-project/olab"
        path = make_site(
            "gkeimg", target="gke",
            image={"builder": "buildah", "base_image": "debootstrap:bookworm", "context": str(context), "name": "olab-user"},
            gke={"project": "olab-test-project", "region": "europe-west2", "zone": "europe-west2-a", "domains": ["olab.example.org"],
                 "registry": registry, "terraform_state_bucket": "olab-tfstate", "apis": {"container": gke.url}},
        )
        with pytest.raises(RegistryAuthError, match="wants credentials and the site gives none"):
            Registry(registry).manifest_digest("olab-user", "anything")

        first = build_image(site=str(path))
        assert first.pinned.startswith(f"{registry}/olab-user@sha256:")
        assert any(path.endswith("/token") for _, path in gke.requests), "the token came from the site's Google credentials"
        from core.models import RegistryLogin

        login = RegistryLogin(username="oauth2accesstoken", password="ya29.fake-access-token")
        assert Registry(registry, login=login).manifest_digest("olab-user", first.tag) == first.digest
        with pytest.raises(RegistryAuthError, match="refused the site's credentials"):
            Registry(registry, login=RegistryLogin(username="oauth2accesstoken", password="stale")).manifest_digest("olab-user", first.tag)

        again = build_image(site=str(path))
        assert again == first, "the same content-hash tag in the registry: nothing is built"
        plan = build_image(site=str(path), dry_run=True)
        assert [(s.verb, s.subject) for s in plan.steps] == [("reuse", first.pinned)]
        # The token reached buildah through a private auth file, never its command line or the logs.
        assert "ya29.fake-access-token" not in (tmp_path / "ar" / "registry.log").read_text()
