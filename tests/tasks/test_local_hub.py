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
                           docker_socket=Path("/run/podman.sock") if image.is_oci else None,
                           gateway="10.88.0.1" if image.is_oci else None, **kw)


def test_a_spec_renders_to_settings_with_culling_and_container_limits(make_site):
    site = load_site(str(make_site("r1", hub={"memory_limit": "2G", "cpu_limit": 1.5, "cull_idle_seconds": 600, "admins": ["b", "a"]})))
    settings = render(site, OCI)
    assert settings["spawner"] == "docker" and settings["image"] == OCI.pinned
    assert (settings["mem_limit"], settings["cpu_limit"]) == ("2G", 1.5)
    assert settings["admins"] == ["a", "b"]
    assert settings["cull"]["timeout"] == 600 and settings["cull"]["every"] == 300
    assert settings["cull"]["command"][-2:] == ["-m", "core.culler"]
    off = load_site(str(make_site("r2", hub={"cull_idle_seconds": 0})))
    assert render(off, VENV)["cull"] is None


def test_what_the_local_target_cannot_do_is_refused_not_ignored(make_site):
    limited = load_site(str(make_site("r3", hub={"memory_limit": "1G"})))
    with pytest.raises(HubError, match="cannot limit"):
        render(limited, VENV)
    platform = {"issuer": "https://lms.example.org", "authorize_url": "https://lms.example.org/auth",
                "jwks_endpoint": "https://lms.example.org/jwks"}
    lti = load_site(str(make_site("r4", hub={"authenticator": "lti", "lti": platform})))
    with pytest.raises(HubError, match="hub.authenticator lti: a venv image runs every student's server"):
        render(lti, VENV)


def test_config_hash_covers_settings_template_and_labs():
    settings = {"port": 1, "admins": ["a"]}
    h = config_hash(settings, "t", "l")
    assert h == config_hash(dict(reversed(settings.items())), "t", "l")
    variants = {h, config_hash({**settings, "port": 2}, "t", "l"), config_hash(settings, "t2", "l"), config_hash(settings, "t", "l2")}
    assert len(variants) == 4


def hub_config(tmp_path, settings: dict):
    """The rendered hub config, evaluated as JupyterHub evaluates it (the template's own code)."""
    import json
    from types import SimpleNamespace

    from traitlets.config import Config

    from tasks.local_hub import hub_template

    (tmp_path / "secrets.json").write_text(json.dumps({
        "cookie_secret": "00" * 32, "proxy_auth_token": "p", "admin_password": "a" * 32, "user_password": "u" * 12, "api_token": "t"}))
    (tmp_path / "olab-hub.json").write_text(json.dumps({**settings, "secrets_file": str(tmp_path / "secrets.json")}))
    config = Config()
    scope = {"get_config": lambda: config, "__file__": str(tmp_path / "jupyterhub_config.py")}
    exec(compile(hub_template(), "jupyterhub_config.py", "exec"), scope)
    return config, scope, SimpleNamespace


def test_the_lab_copy_at_spawn_follows_no_link_a_student_made(make_site, tmp_path):
    site = load_site(str(make_site("r5")))
    settings = render(site, VENV)
    homes, labs = tmp_path / "homes", tmp_path / "labs"
    (homes / "ann").mkdir(parents=True)
    labs.mkdir()
    (labs / "lorenz.ipynb").write_text("{}")
    config, scope, ns = hub_config(tmp_path, {**settings, "homes": str(homes), "labs": str(labs)})
    give = scope["_give_labs"]
    outside = tmp_path / "etc"
    outside.mkdir()
    (homes / "ann" / "labs").symlink_to(outside)  # the student's link, made from inside their server
    with pytest.raises(OSError):
        give(ns(user=ns(name="ann")))
    assert list(outside.iterdir()) == [], "nothing was written through the link"
    (homes / "ann" / "labs").unlink()
    (homes / "ann" / "labs").mkdir()
    (homes / "ann" / "labs" / "lorenz.ipynb").symlink_to(outside / "passwd")
    give(ns(user=ns(name="ann")))
    assert not (outside / "passwd").exists(), "a link in the student's labs is left as it is, not written through"
    give(ns(user=ns(name="bob")))
    assert (homes / "bob" / "labs" / "lorenz.ipynb").read_text() == "{}"
    with pytest.raises(ValueError, match="cannot name a home folder"):
        give(ns(user=ns(name="..")))


def test_the_venv_fallback_and_the_demo_mode_let_one_person_in(make_site, tmp_path):
    venv = render(load_site(str(make_site("r6", hub={"admins": ["prof", "ta"]}))), VENV)
    assert venv["single_user"] == "prof"
    config, _, _ = hub_config(tmp_path, venv)
    assert config.Authenticator.allowed_users == {"prof"} and config.Authenticator.allow_all is False
    assert render(load_site(str(make_site("r7", hub={"authenticator": "shared-password"}))), OCI)["single_user"] == "admin", (
        "shared-password: the demo mode")
    native = render(load_site(str(make_site("r8"))), OCI)
    assert native["authenticator"] == "native" and native["single_user"] is None, "a class: native, on an OCI image"


def test_the_hub_wraps_its_spawner_to_see_a_started_server_at_once(make_site, tmp_path):
    """core/seen_at_once.py, as the local hub runs it: from its settings, around the spawner
    that boots in turns (its behaviour: tests/core/test_seen_at_once.py)."""
    for name, image in (("r9", VENV), ("r10", OCI)):
        config, _, _ = hub_config(tmp_path, render(load_site(str(make_site(name))), image))
        spawner = config.JupyterHub.spawner_class
        assert spawner.__name__ == "SeenAtOnceBootingInTurns" and spawner.start.__qualname__.startswith("seen_at_once.")
