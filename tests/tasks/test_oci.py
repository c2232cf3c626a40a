"""OCI user images for real: buildah builds on a debootstrap base, a local registry,
labs run inside the image, and the hub spawning containers of the pinned digest.

These tests need buildah, podman, runc, docker-registry and debootstrap, which
./setup.sh installs (and .ci/run runs it); where they are missing the module is
skipped with that reason.
"""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import httpx
import pytest

from flows.build_image import build_image
from flows.deploy_hub import deploy_hub
from flows.stop_hub import stop_hub
from flows.test_notebooks import LabsFailed
from flows.test_notebooks import test_notebooks as run_labs
from core.config import load_site, olab_home
from core.planning import lock_header
from core.runner import ToolMissing, pid_alive, run
from core.secrets import SecretStore
from tasks.oci import engine_for, resolve_builder, stop_api_socket
from tasks.local_registry import stop_local_registry
from tasks.registry import Registry
from tests.conftest import free_port, hub_pid

from tests.conftest import REPO  # noqa: E402
NEEDED = ("buildah", "podman", "runc", "docker-registry", "debootstrap")
missing = [tool for tool in NEEDED if not shutil.which(tool)]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed: run ./setup.sh as root"),
]


@pytest.fixture(scope="module")
def registry_address():
    address = f"127.0.0.1:{free_port()}"
    yield address
    store = olab_home() / "containers"
    stop_local_registry(store)
    stop_api_socket(store)


def oci_site(make_site, name, registry, **sections):
    image = {"builder": "buildah", "base_image": "debootstrap:bookworm", "registry": registry}
    image.update(sections.pop("image", {}))
    return make_site(name, image=image, **sections)


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
    assert Registry(registry_address).manifest_digest("olab-small", first.tag) == first.digest

    site = load_site(str(path))
    engine = engine_for("buildah", site.paths.containers, [registry_address])
    built_id = engine.image_id(first.location)
    tags = registry_tags(registry_address, "olab-small")
    plan = build_image(site=str(path), dry_run=True)
    assert [(s.verb, s.subject) for s in plan.steps] == [("reuse", first.pinned)]
    assert registry_tags(registry_address, "olab-small") == tags

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
    out = run(engine.run_prefix([]) + [changed.pinned, "cat", "/etc/olab-lock"], env=engine.env).output
    assert "# changed" in out


def registry_tags(address: str, name: str) -> list[str]:
    return sorted(httpx.get(f"http://{address}/v2/{name}/tags/list", timeout=10).json().get("tags") or [])


def test_missing_builder_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolMissing, match="apt-get install buildah podman"):
        resolve_builder("buildah")
    assert resolve_builder("auto") == "venv"


@pytest.fixture(scope="module")
def user_image(tmp_path_factory, registry_address):
    """The real olab-user image, built once for this module."""
    from tests.conftest import SiteFactory

    factory = SiteFactory(tmp_path_factory.mktemp("oci-user"))
    path = oci_site(factory, "ociuser", registry_address)
    return path, build_image(site=str(path))


def test_labs_run_inside_the_image(user_image, make_site, broken_labs, registry_address):
    path, image = user_image
    report = run_labs(site=str(path), image=image)
    assert report.passed and len(report.results) >= 4
    broken = oci_site(make_site, "ocibroken", registry_address, labs={"path": str(broken_labs)})
    with pytest.raises(LabsFailed) as info:
        run_labs(site=str(broken), image=image)
    bad = {r.lab: r for r in info.value.report.results}["bad_pendulum"]
    assert bad.failing_cell == 3 and "AssertionError" in bad.error


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
        assert (home / "notes.txt").read_text() == "my data", "the home is kept"
        assert (home / "labs" / "lorenz.ipynb").is_file()
    finally:
        api.close()
    assert stop_hub(site=str(path))
    assert not pid_alive(pid)


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
