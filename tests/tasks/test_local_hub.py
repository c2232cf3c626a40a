"""The local target's rendering of a HubSpec into its hub's settings: pure, no server."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import load_site
from core.models import ImageRef, LabSource
from core.planning import hub_spec
from tasks.hub_api import HubError
from tasks.local_hub import config_hash, render_settings

VENV = ImageRef(name="u", tag="a" * 16, digest="sha256:" + "a" * 64, location="/envs/u")
OCI = ImageRef(name="u", tag="b" * 20, digest="sha256:" + "b" * 64, builder="buildah",
               location="127.0.0.1:5000/u:" + "b" * 20, repository="127.0.0.1:5000/u")
LABS = [LabSource(name="lorenz", path=Path("/labs/lorenz.md"), content_hash="c" * 64)]


def render(site, image, **kw):
    return render_settings(site, hub_spec(site, image, LABS), proxy_command=["chp"], run_as_root=False,
                           docker_socket=Path("/run/podman.sock") if image.is_oci else None, **kw)


def test_a_spec_renders_to_settings_with_culling_and_container_limits(make_site):
    site = load_site(str(make_site("r1", hub={"memory_limit": "2G", "cpu_limit": 1.5, "cull_idle_seconds": 600, "admins": ["b", "a"]})))
    settings = render(site, OCI)
    assert settings["spawner"] == "docker" and settings["image"] == OCI.pinned
    assert (settings["mem_limit"], settings["cpu_limit"]) == ("2G", 1.5)
    assert settings["admins"] == ["a", "b"]
    assert settings["cull"]["timeout"] == 600 and settings["cull"]["every"] == 300
    assert settings["cull"]["command"][-2:] == ["-m", "jupyterhub_idle_culler"]
    off = load_site(str(make_site("r2", hub={"cull_idle_seconds": 0})))
    assert render(off, VENV)["cull"] is None


def test_what_the_local_target_cannot_do_is_refused_not_ignored(make_site):
    limited = load_site(str(make_site("r3", hub={"memory_limit": "1G"})))
    with pytest.raises(HubError, match="cannot limit"):
        render(limited, VENV)
    platform = {"issuer": "https://lms.example.org", "authorize_url": "https://lms.example.org/auth",
                "jwks_endpoint": "https://lms.example.org/jwks"}
    lti = load_site(str(make_site("r4", hub={"authenticator": "lti", "lti": platform})))
    with pytest.raises(HubError, match="lti is not available on the local target"):
        render(lti, VENV)


def test_config_hash_covers_settings_template_and_labs():
    settings = {"port": 1, "admins": ["a"]}
    h = config_hash(settings, "t", "l")
    assert h == config_hash(dict(reversed(settings.items())), "t", "l")
    variants = {h, config_hash({**settings, "port": 2}, "t", "l"), config_hash(settings, "t2", "l"), config_hash(settings, "t", "l2")}
    assert len(variants) == 4
