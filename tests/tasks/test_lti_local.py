"""LTI 1.3 logins on the local target (issue 12): a course platform played by the test
drives a real JupyterHub with the real jupyterhub-ltiauthenticator.

The platform is an RSA key, its JWKS served on a free loopback port, and launches signed
with PyJWT. A launch goes as a browser takes it: the platform starts the OIDC login at the
hub (/hub/lti13/oauth_login), the hub redirects to the platform's authorize_url with a
state (also in a cookie) and a nonce, and the platform's form posts the signed id_token and
the state back to /hub/lti13/oauth_callback. The hub's REST API (olab's service token from
the site's secret store) then says who exists and who is an admin.

The hub runs an OCI image's settings (LTI is refused with a venv image: its servers would all
run as the hub's own account); no user server starts for a login, so no image is built here.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, quote, urlparse

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from core.config import load_site
from core.hub_values import lti_admin_hook_code, lti_launch_admin, z2jh_values
from core.models import HubPlan, ImageRef
from core.planning import hub_spec
from core.secrets import LTI_CLIENT_ID, SecretStore
from olab.cli import main
from tasks.hub_api import HubError
from tasks.local_hub import apply_hub, config_hash, hub_template, proxy_command, render_settings, stop_hub
from tests.conftest import SiteFactory, hub_pid

CLIENT_ID = "olab-physics-10000000000042"
OCI = ImageRef(name="u", tag="b" * 20, digest="sha256:" + "b" * 64, builder="buildah",
               location="127.0.0.1:5000/u:" + "b" * 20, repository="127.0.0.1:5000/u")
VENV = ImageRef(name="u", tag="a" * 16, digest="sha256:" + "a" * 64, location="/envs/u")

LTI = "https://purl.imsglobal.org/spec/lti/claim/"
ROLE = "http://purl.imsglobal.org/vocab/lis/v2/"
INSTRUCTOR = ROLE + "membership#Instructor"
LEARNER = ROLE + "membership#Learner"
INSTITUTION_ADMIN = ROLE + "institution/person#Administrator"
STUDENT = ROLE + "institution/person#Student"


class CoursePlatform:
    """An LTI 1.3 platform as a hub sees it: a JWKS endpoint on loopback and launches signed
    with the platform's key."""

    kid = "platform-key-1"

    def __init__(self):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        body = json.dumps({"keys": [{**jwk, "kid": self.kid, "alg": "RS256", "use": "sig"}]}).encode()
        self.jwks_fetches = 0
        platform = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path != "/jwks":
                    self.send_error(404)
                    return
                platform.jwks_fetches += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def settings(self) -> dict:
        """The site file's hub.lti section for this platform."""
        return {"issuer": self.url, "authorize_url": self.url + "/authorize", "jwks_endpoint": self.url + "/jwks",
                "username_key": "email"}

    def id_token(self, nonce: str, email: str, roles: list[str], *, aud: str = CLIENT_ID, key=None, **claims) -> str:
        now = int(time.time())
        payload = {
            "iss": self.url, "aud": aud, "sub": uuid.uuid4().hex, "iat": now, "exp": now + 300, "nonce": nonce,
            "email": email, "name": email.split("@")[0],
            LTI + "version": "1.3.0", LTI + "message_type": "LtiResourceLinkRequest",
            LTI + "deployment_id": "1", LTI + "target_link_uri": "http://127.0.0.1/hub",
            LTI + "resource_link": {"id": "olab-physics"}, LTI + "roles": roles,
            LTI + "context": {"id": "phys101", "label": "PHYS101", "title": "Physics lab"},
            **claims,
        }
        return jwt.encode(payload, key or self.key, algorithm="RS256", headers={"kid": self.kid})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


class Launch(SimpleNamespace):
    """What a browser saw of a launch: the callback's answer, and who it is logged in as."""


def launch(hub_url: str, platform: CoursePlatform, email: str, roles: list[str], *, login_hint: str | None = None,
           replay: bool = False, other_browser: bool = False, token=None, **token_args) -> Launch:
    """One launch, as the student's browser carries it between platform and hub."""
    with httpx.Client(base_url=hub_url, follow_redirects=False, timeout=30) as browser:
        init = browser.post("/hub/lti13/oauth_login", data={
            "iss": platform.url, "login_hint": login_hint or email, "target_link_uri": hub_url + "/hub",
            "lti_message_hint": "resource-1", "client_id": CLIENT_ID,
        })
        assert init.status_code == 302, init.text
        location = urlparse(init.headers["location"])
        assert f"{location.scheme}://{location.netloc}{location.path}" == platform.url + "/authorize"
        asked = {key: values[0] for key, values in parse_qs(location.query).items()}
        assert asked["client_id"] == CLIENT_ID and asked["response_mode"] == "form_post"
        assert asked["redirect_uri"] == hub_url + "/hub/lti13/oauth_callback", "the local hub is on http (loopback)"
        signed = token(asked["nonce"]) if token else platform.id_token(asked["nonce"], email, roles, **token_args)
        form = {"id_token": signed, "state": asked["state"]}
        if other_browser:  # the form posted from a browser that did not start this login
            with httpx.Client(timeout=30, follow_redirects=False) as other:
                answer = other.post(asked["redirect_uri"], data=form)
        else:
            answer = browser.post(asked["redirect_uri"], data=form)
        again = browser.post(asked["redirect_uri"], data=form) if replay else None
        me = browser.get("/hub/api/user")
        return Launch(status=answer.status_code, again=again.status_code if again else None,
                      name=me.json()["name"] if me.status_code == 200 else None)


def lti_site(factory, platform: CoursePlatform, name: str, **hub):
    return factory(name, hub={"authenticator": "lti", "lti": platform.settings, "admins": ["prof@example.org"], **hub})


def settings_for(site, image=OCI) -> dict:
    return render_settings(site, hub_spec(site, image, []), proxy_command=proxy_command(), run_as_root=os.geteuid() == 0,
                           docker_socket=site.paths.runtime / "no-container-api.sock" if image.is_oci else None,
                           gateway="127.0.0.1" if image.is_oci else None)


def store_client_id(path: Path, client_id: str = CLIENT_ID, *extra: str) -> int:
    return main(["secrets", "init", "--site", str(path), "--lti-client-id", client_id, *extra])


# --- without a hub ---------------------------------------------------------------------------


@pytest.fixture
def platform():
    found = CoursePlatform()
    yield found
    found.close()


def test_lti_on_the_local_target_needs_an_oci_image_and_a_stored_client_id(make_site, platform, capsys):
    path = lti_site(make_site, platform, "lti-render")
    site = load_site(str(path))
    with pytest.raises(HubError) as venv:
        settings_for(site, VENV)
    assert "\n" not in str(venv.value) and "a venv image runs every student's server as the hub's own account" in str(venv.value)
    with pytest.raises(HubError) as missing:
        settings_for(site)
    assert "\n" not in str(missing.value)
    assert f"no LTI client id in the site's secret store; store the id the course platform gave this tool with " \
           f"`olab secrets init --site {path} --lti-client-id ID`" in str(missing.value)

    assert store_client_id(path) == 0
    settings = settings_for(site)
    assert settings["single_user"] is None, "LTI logins are for a class"
    lti = settings["lti"]
    assert {k: lti[k] for k in platform.settings} == platform.settings
    assert lti["uri_scheme"] == "http" and lti["admin_hook"] == lti_admin_hook_code()
    assert CLIENT_ID not in json.dumps(settings), "the client id is read from the 0600 store, never from the settings"
    # A replaced client id is a changed configuration: the next deploy restarts the hub with it.
    before = config_hash(settings, hub_template(), "")
    assert store_client_id(path, "another-registration-7", "--force") == 0
    assert config_hash(settings_for(site), hub_template(), "") != before
    capsys.readouterr()


def test_secrets_init_keeps_a_local_sites_lti_client_id_in_its_0600_store(make_site, platform, capsys):
    path = lti_site(make_site, platform, "lti-store")
    site = load_site(str(path))
    assert store_client_id(path) == 0
    out = capsys.readouterr().out
    assert f"stored the LTI client id of site lti-store in {site.paths.secrets}" in out and CLIENT_ID not in out
    store = SecretStore(site.paths.secrets)
    assert store.get(LTI_CLIENT_ID) == CLIENT_ID
    assert stat.S_IMODE(site.paths.secrets.stat().st_mode) == 0o600
    assert stat.S_IMODE(site.paths.secrets.parent.stat().st_mode) == 0o700
    api_token = store.load().api_token

    assert store_client_id(path) == 0 and "kept the LTI client id" in capsys.readouterr().out
    assert store_client_id(path, "another-registration-7") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds another LTI client id; --force replaces it" in err
    assert store.get(LTI_CLIENT_ID) == CLIENT_ID
    assert store_client_id(path, "another-registration-7", "--force") == 0
    out = capsys.readouterr().out
    assert "replaced the LTI client id" in out and "another-registration-7" not in out
    assert store.get(LTI_CLIENT_ID) == "another-registration-7"
    assert store.load().api_token == api_token, "only the client id is replaced"

    for bad in ("", "two words", "x" * 256):
        assert store_client_id(path, bad) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--lti-client-id: a client id is 1 to 255 visible ASCII characters" in err
    os.chmod(site.paths.secrets, 0o644)
    assert store_client_id(path, "third-one", "--force") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run chmod 600 on it" in err
    os.chmod(site.paths.secrets, 0o600)


def test_the_admin_rule_is_one_for_both_targets(tmp_path):
    authenticator = SimpleNamespace(admin_users={"prof@example.org"})

    def admin(name, roles):
        return lti_launch_admin(authenticator, None, {"name": name, "auth_state": {LTI + "roles": roles}})["admin"]

    assert admin("teacher@example.org", [INSTRUCTOR]) is True
    assert admin("dean@example.org", [STUDENT, INSTITUTION_ADMIN]) is True
    assert admin("ta@example.org", [ROLE + "membership#Administrator"]) is True
    assert admin("ta@example.org", [ROLE + "institution/person#Instructor"]) is True
    assert admin("ann@example.org", [LEARNER]) is False, "a learner is no admin: a former instructor loses it"
    assert admin("ann@example.org", ["Instructor"]) is False, "only full role URIs count"
    assert admin("ann@example.org", [ROLE + "membership/Instructor#TeachingAssistant"]) is False
    assert admin("prof@example.org", [LEARNER]) is True, "the site's admins stay admins"
    assert lti_launch_admin(authenticator, None, {"name": "x", "auth_state": None})["admin"] is False

    # The gke hub runs the same code, from Zero-to-JupyterHub's extraConfig.
    from tests.core.test_hub_values import LTI as GKE_LTI
    from tests.core.test_hub_values import gke_site, oci_image

    site = gke_site(tmp_path)
    values = z2jh_values(site, hub_spec(site, oci_image(site), []), lti=GKE_LTI)
    assert values["hub"]["extraConfig"]["olab-lti-admins"] == lti_admin_hook_code()
    from traitlets.config import Config

    config = Config()
    exec(values["hub"]["extraConfig"]["olab-lti-admins"], {"c": config})
    hook = config.Authenticator.post_auth_hook
    assert hook(authenticator, None, {"name": "t@example.org", "auth_state": {LTI + "roles": [INSTRUCTOR]}})["admin"] is True
    assert hook(authenticator, None, {"name": "s@example.org", "auth_state": {LTI + "roles": [LEARNER]}})["admin"] is False


# --- a real hub ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def course():
    found = CoursePlatform()
    yield found
    found.close()


@pytest.fixture(scope="module")
def lti_hub(tmp_path_factory, course):
    """A real hub of an lti site (OCI settings, no container API needed for logins), started
    as deploy-hub's apply step starts it; stopped at the end."""
    path = lti_site(SiteFactory(tmp_path_factory.mktemp("lti-hub")), course, "ltihub")
    assert store_client_id(path) == 0
    site = load_site(str(path))
    spec = hub_spec(site, OCI, [])
    settings = settings_for(site)
    template = hub_template()
    plan = HubPlan(action="start", config_hash=config_hash(settings, template, ""), url=site.hub_url, reason="first start")
    try:
        apply_hub(site, spec, plan, settings, template)
        token = SecretStore(site.paths.secrets).load().api_token.get_secret_value()
        with httpx.Client(base_url=site.hub_url, headers={"Authorization": f"token {token}"}, timeout=30) as api:
            yield SimpleNamespace(site=site, url=site.hub_url, api=api)
    finally:
        stop_hub(site)


def user(api: httpx.Client, name: str) -> dict | None:
    found = api.get(f"/hub/api/users/{quote(name)}")
    return found.json() if found.status_code == 200 else None


@pytest.mark.slow
def test_instructors_launch_as_admins_and_learners_as_students(lti_hub, course):
    teacher = launch(lti_hub.url, course, "teacher@example.org", [INSTRUCTOR])
    assert (teacher.status, teacher.name) == (302, "teacher@example.org")
    assert user(lti_hub.api, "teacher@example.org")["admin"] is True
    for name in ("ann@example.org", "bob@example.org"):  # a class: several students, each their own user
        student = launch(lti_hub.url, course, name, [LEARNER, STUDENT])
        assert (student.status, student.name) == (302, name)
        assert user(lti_hub.api, name)["admin"] is False
    dean = launch(lti_hub.url, course, "dean@example.org", [INSTITUTION_ADMIN])
    assert dean.status == 302 and user(lti_hub.api, "dean@example.org")["admin"] is True

    # The client id is read from the 0600 store: not in the hub's files nor on its command line.
    site = lti_hub.site
    written = (site.paths.hub / "olab-hub.json").read_text() + (site.paths.hub / "jupyterhub_config.py").read_text()
    assert CLIENT_ID not in written
    assert CLIENT_ID not in Path(f"/proc/{hub_pid(site)}/cmdline").read_bytes().decode(errors="replace")


@pytest.mark.slow
def test_admin_rights_follow_the_latest_launch_and_the_sites_admins_keep_theirs(lti_hub, course):
    assert launch(lti_hub.url, course, "ta@example.org", [INSTRUCTOR]).status == 302
    assert user(lti_hub.api, "ta@example.org")["admin"] is True
    assert launch(lti_hub.url, course, "ta@example.org", [LEARNER]).status == 302
    assert user(lti_hub.api, "ta@example.org")["admin"] is False, "enrolled as a learner now: no longer an admin"
    prof = launch(lti_hub.url, course, "prof@example.org", [LEARNER])
    assert (prof.status, prof.name) == (302, "prof@example.org")
    assert user(lti_hub.api, "prof@example.org")["admin"] is True, "hub.admins stay admins"


@pytest.mark.slow
def test_the_user_name_comes_only_from_the_signed_launch(lti_hub, course):
    # The login hint (what the browser carries in clear) names bob; the signed token names carl.
    carl = launch(lti_hub.url, course, "carl@example.org", [LEARNER], login_hint="bob@example.org")
    assert (carl.status, carl.name) == (302, "carl@example.org")

    # A student who edits the token's payload (to be the professor) breaks its signature.
    def forged(nonce):
        header, _, signature = course.id_token(nonce, "dora@example.org", [LEARNER]).split(".")
        claims = jwt.decode(course.id_token(nonce, "prof@example.org", [INSTRUCTOR]), options={"verify_signature": False})
        payload = jwt.utils.base64url_encode(json.dumps(claims).encode()).decode()
        return f"{header}.{payload}.{signature}"

    forgery = launch(lti_hub.url, course, "dora@example.org", [LEARNER], token=forged)
    assert forgery.status in (400, 401, 403) and forgery.name is None
    assert user(lti_hub.api, "dora@example.org") is None


@pytest.mark.slow
def test_launches_the_platform_did_not_sign_for_this_hub_are_refused(lti_hub, course):
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_key = launch(lti_hub.url, course, "eve@example.org", [INSTRUCTOR], key=stranger)
    assert other_key.status in (400, 401, 403) and other_key.name is None
    other_client = launch(lti_hub.url, course, "eve@example.org", [INSTRUCTOR], aud="another-tool")
    assert other_client.status == 401 and other_client.name is None
    other_issuer = launch(lti_hub.url, course, "eve@example.org", [INSTRUCTOR], iss="https://lms.example.org")
    assert other_issuer.status in (400, 401, 403) and other_issuer.name is None
    assert user(lti_hub.api, "eve@example.org") is None

    # The launch's form must come back to the browser that started the login, once.
    elsewhere = launch(lti_hub.url, course, "fay@example.org", [LEARNER], other_browser=True)
    assert elsewhere.status == 400 and elsewhere.name is None
    once = launch(lti_hub.url, course, "gil@example.org", [LEARNER], replay=True)
    assert (once.status, once.again) == (302, 400)
