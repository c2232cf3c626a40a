"""core.hub_values: a HubSpec as Zero-to-JupyterHub values (the site layer), the layers merged as
helm merges them, and the values checked against the chart's own schema and defaults (4.4.0, from
shared/z2jh) and olab's rules. Pure and fast: no helm here (tests/tasks/test_helm.py has it)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import hcl2
import pytest
import yaml

from core.config import parse_site
from core.hub_values import (
    INGRESS_NAME,
    LABS_MAX_BYTES,
    LABS_MOUNT,
    LTI13_CLASS,
    PROXY_SERVICE,
    Z2JH_REPOSITORY,
    LtiPlatform,
    chart_source,
    ingress_values,
    labs_delivery,
    merge_values,
    schema_problems,
    secrets_layer,
    validate_values,
    values_diff,
    with_defaults,
    z2jh_values,
)
from core.models import HubSpec, ImageRef, ResourceLimits
from core.planning import hub_spec
from core.secrets import HubSecrets

from tests.conftest import REPO

DIGEST = "sha256:" + "0123456789abcdef" * 4
BASE_FILE = REPO / "helm" / "values" / "base.yaml"
LTI = LtiPlatform(
    issuer="https://canvas.instructure.com",
    authorize_url="https://sso.canvaslms.com/api/lti/authorize_redirect",
    jwks_endpoint="https://sso.canvaslms.com/api/lti/security/jwks",
)
CLIENT_IDS = ["10000000000042"]


def z2jh_dir() -> Path:
    """The published chart 4.4.0 (shared/z2jh beside the project, or OLAB_Z2JH_DIR)."""
    folder = Path(os.environ.get("OLAB_Z2JH_DIR") or REPO.parent / "shared" / "z2jh")
    if not (folder / "4.4.0" / "values.schema.json").is_file():
        pytest.fail(f"{folder}: no Zero-to-JupyterHub 4.4.0 here (shared/z2jh beside the project, or set OLAB_Z2JH_DIR)")
    return folder


def chart_schema() -> dict:
    return json.loads((z2jh_dir() / "4.4.0" / "values.schema.json").read_text())


def chart_defaults() -> dict:
    return yaml.safe_load((z2jh_dir() / "4.4.0" / "values.yaml").read_text())


def base_layer() -> dict:
    return yaml.safe_load(BASE_FILE.read_text())


def gke_site(tmp_path: Path, name: str = "course", **hub):
    data = {
        "name": name,
        "target": "gke",
        "hub": {"admins": ["lab-admin", "teacher@example.org"], "authenticator": "lti",
                "lti": LTI.model_dump(), "default_url": "/voila/render/labs/lorenz.ipynb", **hub},
        "gke": {
            "project": "my-olab-project", "region": "europe-west2", "zone": "europe-west2-a",
            "domains": ["olab.example.org", "lab.example.org"],
            "registry": "europe-west2-docker.pkg.dev/my-olab-project/olab",
            "terraform_state_bucket": "my-olab-project-tfstate",
        },
    }
    source = tmp_path / f"{name}.yaml"
    source.write_text(yaml.safe_dump(data))
    return parse_site(source.read_text(), source, tmp_path)


def oci_image(site) -> ImageRef:
    repository = f"{site.config.gke.registry}/{site.config.image.name}"
    return ImageRef(
        name=site.config.image.name, tag="a1b2c3d4e5f6a7b8c9d0", digest=DIGEST, builder="buildah",
        location=f"{repository}:a1b2c3d4e5f6a7b8c9d0", repository=repository,
    )


def plain_secrets() -> dict[str, str]:
    generated = HubSecrets.generate()
    return {k: v.get_secret_value() for k, v in generated.__dict__.items()}


def layers(site, spec: HubSpec, *, lti: LtiPlatform | None = LTI, client_ids=CLIENT_IDS) -> list[dict]:
    base = base_layer()
    return [
        base,
        z2jh_values(site, spec, lti=lti, base=base),
        secrets_layer(spec, plain_secrets(), lti_client_ids=client_ids),
    ]


# --- the site layer ------------------------------------------------------------------------------


def test_the_site_layer_renders_the_hubspec(tmp_path):
    site = gke_site(tmp_path, cull_idle_seconds=1800, start_timeout_seconds=300)
    spec = hub_spec(site, oci_image(site), [])
    values = z2jh_values(site, spec, lti=LTI)

    user = values["singleuser"]
    assert user["image"] == {
        "name": "europe-west2-docker.pkg.dev/my-olab-project/olab/olab-user",
        "tag": f"a1b2c3d4e5f6a7b8c9d0@{DIGEST}",
    }
    assert user["defaultUrl"] == "/voila/render/labs/lorenz.ipynb"
    assert user["startTimeout"] == 300
    assert user["extraEnv"] == {"OLAB_SITE": "course"}

    config = values["hub"]["config"]
    assert config["JupyterHub"] == {"authenticator_class": LTI13_CLASS}
    assert config["Authenticator"] == {"admin_users": ["lab-admin", "teacher@example.org"], "allow_all": True}
    assert config["LTI13Authenticator"] == {
        "issuer": "https://canvas.instructure.com",
        "authorize_url": "https://sso.canvaslms.com/api/lti/authorize_redirect",
        "jwks_endpoint": "https://sso.canvaslms.com/api/lti/security/jwks",
        "username_key": "email",
        "uri_scheme": "https",
    }
    assert "client_id" not in config["LTI13Authenticator"]  # the secrets layer's

    assert values["cull"] == {"enabled": True, "timeout": 1800, "every": 600}
    annotations = values["proxy"]["service"]["annotations"]
    assert json.loads(annotations["cloud.google.com/backend-config"]) == {"default": INGRESS_NAME}
    assert json.loads(annotations["cloud.google.com/neg"]) == {"ingress": True}


def leaf_paths(values: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        out |= leaf_paths(value, path) if isinstance(value, dict) and value else {path}
    return out


def test_the_site_layer_holds_no_secret_and_the_secrets_layer_nothing_else(tmp_path):
    for authenticator in ("lti", "shared-password"):
        site = gke_site(tmp_path, name=f"s-{authenticator}", authenticator=authenticator)
        spec = hub_spec(site, oci_image(site), [])
        site_paths = leaf_paths(z2jh_values(site, spec, lti=LTI, base=base_layer()))
        secret_paths = leaf_paths(secrets_layer(spec, plain_secrets(), lti_client_ids=CLIENT_IDS))
        assert not site_paths & secret_paths
        assert not [p for p in site_paths if any(w in p.lower() for w in ("secret", "token", "password", "client_id"))]
        assert secret_paths >= {"hub.config.JupyterHub.cookie_secret", "hub.services.olab.apiToken"}


def test_idle_culling_off_when_the_site_says_never(tmp_path):
    site = gke_site(tmp_path, cull_idle_seconds=0)
    values = z2jh_values(site, hub_spec(site, oci_image(site), []), lti=LTI)
    assert values["cull"] == {"enabled": False}


def test_short_culling_checks_often(tmp_path):
    site = gke_site(tmp_path, cull_idle_seconds=300)
    assert z2jh_values(site, hub_spec(site, oci_image(site), []), lti=LTI)["cull"]["every"] == 150


def test_site_limits_replace_the_base_and_lower_its_guarantees(tmp_path):
    base = base_layer()
    assert base["singleuser"]["memory"]["guarantee"] == "512M" and base["singleuser"]["cpu"]["guarantee"] == 0.1

    small = gke_site(tmp_path, memory_limit="256M", cpu_limit=0.05)
    values = z2jh_values(small, hub_spec(small, oci_image(small), []), lti=LTI, base=base)
    assert values["singleuser"]["memory"] == {"limit": "256M", "guarantee": "256M"}
    assert values["singleuser"]["cpu"] == {"limit": 0.05, "guarantee": 0.05}

    large = gke_site(tmp_path, name="large", memory_limit="4G", cpu_limit=2)
    values = z2jh_values(large, hub_spec(large, oci_image(large), []), lti=LTI, base=base)
    assert values["singleuser"]["memory"] == {"limit": "4G"}
    assert values["singleuser"]["cpu"] == {"limit": 2.0}
    merged = with_defaults(merge_values(base, values), chart_defaults())
    assert merged["singleuser"]["memory"] == {"limit": "4G", "guarantee": "512M"}

    unset = gke_site(tmp_path, name="unset")
    values = z2jh_values(unset, hub_spec(unset, oci_image(unset), []), lti=LTI, base=base)
    assert "memory" not in values["singleuser"] and "cpu" not in values["singleuser"]


def test_a_venv_image_cannot_run_on_gke(tmp_path):
    site = gke_site(tmp_path)
    venv = ImageRef(name="olab-user", tag="t", digest=DIGEST, builder="venv", location="/srv/envs/x")
    with pytest.raises(ValueError, match="OCI images"):
        z2jh_values(site, hub_spec(site, venv, []), lti=LTI)


def test_a_local_site_has_no_z2jh_values(tmp_path):
    source = tmp_path / "local.yaml"
    source.write_text("target: local\n")
    site = parse_site(source.read_text(), source, tmp_path)
    spec = HubSpec(image=oci_image(gke_site(tmp_path)), authenticator="lti", admins=["a"], default_url="/lab",
                   start_timeout_seconds=60, limits=ResourceLimits())
    with pytest.raises(ValueError, match="gke sites"):
        z2jh_values(site, spec)


def test_shared_password_logins_take_their_passwords_from_the_secrets_layer(tmp_path):
    site = gke_site(tmp_path, authenticator="shared-password")
    spec = hub_spec(site, oci_image(site), [])
    site_layer = z2jh_values(site, spec)
    assert site_layer["hub"]["config"]["JupyterHub"]["authenticator_class"] == "shared-password"
    assert "SharedPasswordAuthenticator" not in site_layer["hub"]["config"]
    secrets = plain_secrets()
    layer = secrets_layer(spec, secrets)
    assert layer["hub"]["config"]["SharedPasswordAuthenticator"] == {
        "user_password": secrets["user_password"], "admin_password": secrets["admin_password"],
    }
    assert layer["hub"]["services"] == {"olab": {"apiToken": secrets["api_token"]}}
    assert validate_values(merge_values(base_layer(), site_layer, layer), chart_schema(), chart_defaults()) == []


def test_the_secrets_layer_carries_the_lti_client_ids_and_the_hub_secrets(tmp_path):
    site = gke_site(tmp_path)
    spec = hub_spec(site, oci_image(site), [])
    secrets = plain_secrets()
    layer = secrets_layer(spec, secrets, lti_client_ids=["2", "1", "2"])
    config = layer["hub"]["config"]
    assert config["LTI13Authenticator"] == {"client_id": ["1", "2"]}
    assert config["JupyterHub"] == {"cookie_secret": secrets["cookie_secret"]}
    assert config["ConfigurableHTTPProxy"] == {"auth_token": secrets["proxy_auth_token"]}
    assert "SharedPasswordAuthenticator" not in config


def test_the_ingress_layer_puts_the_sites_domains_on_the_static_ip(tmp_path):
    site = gke_site(tmp_path)
    assert ingress_values(site, static_ip_name="olab-hub") == {
        "name": INGRESS_NAME,
        "domains": ["olab.example.org", "lab.example.org"],
        "staticIpName": "olab-hub",
        "service": {"name": PROXY_SERVICE, "port": 80},
    }
    with pytest.raises(ValueError, match="provision-cluster"):
        ingress_values(site, static_ip_name="")


def test_the_chart_is_pinned_to_the_sites_version(tmp_path):
    assert chart_source(gke_site(tmp_path)) == ("jupyterhub", Z2JH_REPOSITORY, "4.4.0")


def test_lti_platform_endpoints_must_be_https():
    with pytest.raises(ValueError):
        LtiPlatform(issuer="https://lms.example.org", authorize_url="http://lms.example.org/auth",
                    jwks_endpoint="https://lms.example.org/jwks")


# --- merging, as helm merges -f files -----------------------------------------------------------


def test_layers_merge_deeply_later_winning_lists_replaced_and_inputs_untouched():
    base = {"a": {"b": 1, "c": [1, 2], "d": {"e": "base"}}, "keep": True}
    site = {"a": {"c": [3], "d": {"f": "site"}}, "new": 1}
    secrets = {"a": {"b": 2, "d": None}}
    merged = merge_values(base, site, None, secrets)
    assert merged == {"a": {"b": 2, "c": [3], "d": None}, "keep": True, "new": 1}
    assert base == {"a": {"b": 1, "c": [1, 2], "d": {"e": "base"}}, "keep": True}
    merged["a"]["c"].append(9)
    assert site["a"]["c"] == [3]


def test_a_null_removes_a_chart_default_as_helm_does():
    defaults = {"singleuser": {"memory": {"limit": None, "guarantee": "1G"}, "cmd": "jupyterhub-singleuser"}}
    full = with_defaults({"singleuser": {"memory": {"guarantee": None}, "unknown": None}}, defaults)
    assert full == {"singleuser": {"memory": {"limit": None}, "cmd": "jupyterhub-singleuser", "unknown": None}}
    assert defaults["singleuser"]["memory"]["guarantee"] == "1G"


# --- validation ------------------------------------------------------------------------------------


def test_the_layered_values_of_a_gke_site_are_valid(tmp_path):
    site = gke_site(tmp_path, memory_limit="1G")
    spec = hub_spec(site, oci_image(site), [])
    assert validate_values(merge_values(*layers(site, spec)), chart_schema(), chart_defaults()) == []


NOTEBOOKS = {"lorenz.ipynb": '{"cells": ["lorenz v2"]}', "index.ipynb": '{"cells": ["index v2"]}'}


def test_the_labs_travel_with_the_release_and_the_values_stay_valid(tmp_path):
    site = gke_site(tmp_path)
    spec = hub_spec(site, oci_image(site), [])
    base = base_layer()
    site_layer = z2jh_values(site, spec, lti=LTI, base=base, notebooks=NOTEBOOKS)
    files = site_layer["singleuser"]["extraFiles"]
    assert {f["mountPath"]: f["stringData"] for f in files.values()} == {
        f"{LABS_MOUNT}/{name}": text for name, text in NOTEBOOKS.items()
    }
    assert all(f["mode"] == 0o644 for f in files.values()), "a student's copy must be writable"
    merged = merge_values(base, site_layer, secrets_layer(spec, plain_secrets(), lti_client_ids=CLIENT_IDS))
    assert validate_values(merged, chart_schema(), chart_defaults()) == []


def test_a_student_keeps_their_labs_and_gets_new_ones_and_the_fresh_index(tmp_path):
    """The postStart hook's own command, run by sh here with the mount replaced by a folder:
    what a pod does when a server starts."""
    mount, home = tmp_path / "mount", tmp_path / "home"
    mount.mkdir()
    for name, text in {**NOTEBOOKS, "pendulum.ipynb": "pendulum"}.items():
        (mount / name).write_text(text)
    (home / "labs").mkdir(parents=True)
    (home / "labs" / "lorenz.ipynb").write_text("the student's edited lorenz")
    (home / "labs" / "index.ipynb").write_text("last term's index")
    (home / "mine.ipynb").write_text("the student's own notebook")
    (home / "labs" / "pendulum.ipynb").symlink_to(home / "mine.ipynb")  # a student's link: left alone
    command = labs_delivery(NOTEBOOKS | {"pendulum.ipynb": "pendulum"})["lifecycleHooks"]["postStart"]["exec"]["command"]
    script = command[2].replace(LABS_MOUNT, str(mount))
    for _ in range(2):  # every start
        subprocess.run([command[0], command[1], script], env={"HOME": str(home), "PATH": os.environ["PATH"]}, check=True)
        assert (home / "labs" / "lorenz.ipynb").read_text() == "the student's edited lorenz"
        assert (home / "labs" / "index.ipynb").read_text() == NOTEBOOKS["index.ipynb"]
        assert (home / "mine.ipynb").read_text() == "the student's own notebook"
    (home / "labs" / "index.ipynb").unlink()
    (home / "labs" / "index.ipynb").symlink_to(home / "mine.ipynb")  # the index replaced, not written through
    subprocess.run([command[0], command[1], script], env={"HOME": str(home), "PATH": os.environ["PATH"]}, check=True)
    assert (home / "mine.ipynb").read_text() == "the student's own notebook"
    assert not (home / "labs" / "index.ipynb").is_symlink()


def test_lab_names_kubernetes_cannot_key_and_labs_too_large_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"my lab\.ipynb: a gke site's lab file names") as info:
        labs_delivery({"my lab.ipynb": "{}"})
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="travel in its Helm release") as info:
        labs_delivery({"big.ipynb": "x" * (LABS_MAX_BYTES + 1)})
    assert "\n" not in str(info.value)


def test_a_changed_lab_shows_in_the_diff_by_size_and_digest_not_its_text():
    old = {"singleuser": {"extraFiles": {"lab-lorenz.ipynb": {"stringData": "a" * 5000}}}}
    new = {"singleuser": {"extraFiles": {"lab-lorenz.ipynb": {"stringData": "b" * 5000}}}}
    (line,) = values_diff(old, new, {})
    assert "aaaa" not in line and "5,002 characters" in line and len(line) < 200


def test_a_misspelt_key_is_named_with_its_path_and_a_suggestion(tmp_path):
    site = gke_site(tmp_path)
    spec = hub_spec(site, oci_image(site), [])
    typo = {"singleuser": {"imagee": {"name": "x"}, "memory": {"limt": "1G"}}, "hub": {"config": {"lowercase": {}}}}
    problems = validate_values(merge_values(*layers(site, spec), typo), chart_schema(), chart_defaults())
    assert problems == [
        "hub.config.lowercase: unknown key",
        "singleuser.imagee: unknown key; did you mean 'image'?",
        "singleuser.memory.limt: unknown key; did you mean 'limit'?",
    ]


def test_a_wrong_type_is_named_without_quoting_the_value(tmp_path):
    site = gke_site(tmp_path, authenticator="shared-password")
    spec = hub_spec(site, oci_image(site), [])
    leaked = {"hub": {"cookieSecret": ["s3cret-value-xyz"]}, "cull": {"timeout": "s3cret-value-xyz"}}
    problems = validate_values(merge_values(*layers(site, spec), leaked), chart_schema(), chart_defaults())
    assert "cull.timeout: must be integer or null, not a string" in problems
    assert "hub.cookieSecret: must be string or null, not a list" in problems
    assert not [p for p in problems if "s3cret" in p]


def test_a_null_that_removes_a_required_key_is_named(tmp_path):
    site = gke_site(tmp_path)
    spec = hub_spec(site, oci_image(site), [])
    problems = validate_values(merge_values(*layers(site, spec), {"singleuser": {"image": {"tag": None}}}),
                               chart_schema(), chart_defaults())
    assert "singleuser.image.tag: required" in problems


def test_lti_logins_need_the_platform_and_the_client_id(tmp_path):
    site = gke_site(tmp_path)
    spec = hub_spec(site, oci_image(site), [])
    problems = validate_values(merge_values(*layers(site, spec, client_ids=None)), chart_schema(), chart_defaults())
    assert problems == ["hub.config.LTI13Authenticator.client_id: required for LTI 1.3 logins (from the secrets layer)"]
    # A layer that drops the platform's endpoints (the site file always has them) is caught too.
    values = merge_values(*layers(site, spec))
    for key in ("issuer", "authorize_url", "jwks_endpoint"):
        del values["hub"]["config"]["LTI13Authenticator"][key]
    assert validate_values(values, chart_schema(), chart_defaults()) == [
        "hub.config.LTI13Authenticator.issuer: required for LTI 1.3 logins (from the LTI platform's settings)",
        "hub.config.LTI13Authenticator.authorize_url: required for LTI 1.3 logins (from the LTI platform's settings)",
        "hub.config.LTI13Authenticator.jwks_endpoint: required for LTI 1.3 logins (from the LTI platform's settings)",
    ]


def test_olab_refuses_an_open_hub_an_unpinned_image_and_requests_over_limits(tmp_path):
    site = gke_site(tmp_path)
    spec = hub_spec(site, oci_image(site), [])
    bad = {
        "hub": {"config": {"JupyterHub": {"authenticator_class": "dummy"}}},
        "singleuser": {"image": {"tag": "latest"}, "memory": {"limit": "1G", "guarantee": "2G"}, "cpu": {"limit": 0.5, "guarantee": 1}},
    }
    problems = validate_values(merge_values(*layers(site, spec), bad), chart_schema(), chart_defaults())
    assert problems == [
        "hub.config.JupyterHub.authenticator_class: dummy lets anyone in; the site's hub.authenticator chooses lti or shared-password",
        "singleuser.image.tag: the user image must be pinned by digest (<tag>@sha256:<64 hex>)",
        "singleuser.memory.guarantee: 2G exceeds singleuser.memory.limit 1G (Kubernetes refuses such a pod)",
        "singleuser.cpu.guarantee: 1 exceeds singleuser.cpu.limit 0.5 (Kubernetes refuses such a pod)",
    ]


def test_the_base_alone_is_refused_for_what_only_the_site_and_secrets_give():
    problems = validate_values(base_layer(), chart_schema(), chart_defaults())
    assert problems == [
        "hub.config.JupyterHub.authenticator_class: dummy lets anyone in; the site's hub.authenticator chooses lti or shared-password",
        "hub.loadRoles.olab-operator.services: olab is not in hub.services (its apiToken comes from the secrets layer)",
        "singleuser.image.tag: the user image must be pinned by digest (<tag>@sha256:<64 hex>)",
    ]
    # ... and it is valid for the chart itself.
    assert schema_problems(base_layer(), chart_schema(), chart_defaults()) == []


def test_shared_passwords_shorter_than_jupyterhub_takes_are_refused(tmp_path):
    site = gke_site(tmp_path, authenticator="shared-password")
    spec = hub_spec(site, oci_image(site), [])
    short = {"hub": {"config": {"SharedPasswordAuthenticator": {"user_password": "short", "admin_password": "also-short"}}}}
    problems = validate_values(merge_values(*layers(site, spec), short), chart_schema(), chart_defaults())
    assert problems == [
        "hub.config.SharedPasswordAuthenticator.user_password: required, at least 8 characters (from the secrets layer)",
        "hub.config.SharedPasswordAuthenticator.admin_password: at least 32 characters",
    ]


# --- the base layer against the terraform pools -------------------------------------------------------


def node_configs() -> dict[str, dict]:
    options = None
    if hasattr(hcl2, "SerializationOptions"):
        options = hcl2.SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)
    with (REPO / "terraform" / "gke" / "main.tf").open() as handle:
        tree = hcl2.load(handle, serialization_options=options) if options else hcl2.load(handle)
    pools = {}
    for block in tree["resource"]:
        for name, body in block.get("google_container_node_pool", {}).items():
            pools[name] = body["node_config"][0]
    return pools


def test_the_base_layer_sends_user_pods_to_the_user_pool_and_core_pods_to_the_core_pool():
    pools = node_configs()
    full = with_defaults(base_layer(), chart_defaults())
    scheduling = full["scheduling"]
    # Zero-to-JupyterHub matches on hub.jupyter.org/node-purpose = core | user: the pools' labels.
    assert pools["user"]["labels"] == {"hub.jupyter.org/node-purpose": "user"}
    assert pools["core"]["labels"] == {"hub.jupyter.org/node-purpose": "core"}
    assert scheduling["userPods"]["nodeAffinity"]["matchNodePurpose"] == "require"
    assert scheduling["corePods"]["nodeAffinity"]["matchNodePurpose"] == "require"
    # The user pool's taint is tolerated by user pods, and only by them.
    (taint,) = pools["user"]["taint"]
    effect = {"NO_SCHEDULE": "NoSchedule"}[taint["effect"]]
    wanted = {"key": taint["key"], "operator": "Equal", "value": taint["value"], "effect": effect}
    assert wanted in scheduling["userPods"]["tolerations"]
    assert wanted not in scheduling["corePods"]["tolerations"]
    assert "taint" not in pools["core"]


def test_the_base_layer_gives_each_student_a_claim_and_culls_idle_servers():
    full = with_defaults(base_layer(), chart_defaults())
    storage = full["singleuser"]["storage"]
    assert storage["type"] == "dynamic"
    assert storage["dynamic"]["pvcNameTemplate"] == "claim-{username}"
    assert storage["homeMountPath"] == "/home/jovyan"
    assert full["cull"]["enabled"] is True and full["cull"]["users"] is False
    assert full["proxy"]["service"]["type"] == "ClusterIP" and full["proxy"]["https"]["enabled"] is False
    assert full["ingress"]["enabled"] is False
