"""tasks/kubernetes.py through the real ``kubernetes`` client against a fake API server on
loopback (tests/fakes/kubernetes.py), reached with the kubeconfig olab itself writes
(``tasks.gke.write_kubeconfig``: https, the cluster's CA, a bearer token): failing pods and
their events, Helm's release secrets, the claims that hold the students' disks, and errors
in the API's own words.

Fast: no Prefect server, no network beyond 127.0.0.1; every fake is stopped, with its
threads, when its test ends.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from core.retry import is_transient
from tasks import gke
from tasks import kubernetes as kube
from tests.conftest import free_port
from tests.fakes.gke import fake_ca_base64 as another_clusters_ca
from tests.fakes.kubernetes import FakeKubernetes, SeedContainer, fake_tls, helm_release

PROJECT, ZONE, NS = "olab-test", "europe-west2-a", "olab"
TOKEN = "ya29.kube-token-that-must-not-be-logged"
PODS = f"/api/v1/namespaces/{NS}/pods"
SECRETS = f"/api/v1/namespaces/{NS}/secrets"
LONDON = datetime.timezone(datetime.timedelta(hours=1))


@pytest.fixture(autouse=True)
def no_threads_left():
    """Whatever a test started (the fake's server and handler threads) has ended after it."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while (left := [t for t in threading.enumerate() if t not in before]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not left, f"threads left running: {[t.name for t in left]}"


@pytest.fixture
def fake():
    with FakeKubernetes(project=PROJECT, zone=ZONE, token=TOKEN) as server:
        server.add_namespace(NS)
        yield server


def cluster(endpoint: str, ca: str) -> gke.ClusterInfo:
    return gke.ClusterInfo(project=PROJECT, name="olab", location=ZONE, status="RUNNING", endpoint=endpoint, ca_certificate=ca)


def write_kubeconfig(folder: Path, endpoint: str, ca: str, token: str = TOKEN) -> Path:
    return gke.write_kubeconfig(folder / "kubeconfig", cluster(endpoint, ca), token, namespace=NS)


@pytest.fixture
def kubeconfig(fake, tmp_path) -> Path:
    return write_kubeconfig(tmp_path, fake.endpoint, fake.ca_certificate)


@pytest.fixture
def api(kubeconfig):
    with kube.api_from_kubeconfig(kubeconfig) as client:
        yield client


@pytest.fixture
def olab_logs(caplog):
    caplog.set_level(logging.INFO, logger="olab")
    return caplog


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text == text.strip(), text
    return text


# ---- the kubeconfig and the connection -------------------------------------------------


def test_the_kubeconfig_olab_writes_reaches_the_fake_over_https_with_its_token(fake, kubeconfig, api):
    server = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    assert server == f"https://{fake.endpoint}"
    assert api.configuration.host == fake.url
    assert api.configuration.verify_ssl is True
    assert Path(api.configuration.ssl_ca_cert).read_text() == fake_tls().ca_pem
    # A private configuration: the process-wide default is untouched.
    default = k8s.Configuration.get_default_copy()
    assert default.host != fake.url and "BearerToken" not in default.api_key

    assert kube.failing_pods(api, NS) == []
    assert fake.authorizations == [f"Bearer {TOKEN}"]
    assert fake.calls(PODS) == 1
    assert fake.tls_failures == []


def test_another_clusters_ca_fails_at_once_on_one_line(fake, tmp_path):
    kubeconfig = write_kubeconfig(tmp_path, fake.endpoint, another_clusters_ca())
    with kube.api_from_kubeconfig(kubeconfig) as api, pytest.raises(kube.KubernetesApiError) as caught:
        kube.failing_pods(api, NS)
    # One handshake, not retried: a retry's handshakes would all be made before the call raised.
    deadline = time.monotonic() + 5
    while not fake.tls_failures and time.monotonic() < deadline:
        time.sleep(0.02)  # the fake records a refused handshake once the client has hung up
    time.sleep(0.2)
    assert len(fake.tls_failures) == 1, fake.tls_failures
    assert "CERTIFICATE_VERIFY_FAILED" in one_line(caught.value)
    assert caught.value.code is None
    assert not is_transient(caught.value)
    assert fake.requests == []
    deadline = time.monotonic() + 2
    while not fake.tls_failures and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(fake.tls_failures) == 1


def test_a_refused_token_is_401_in_the_apis_words(fake, tmp_path):
    kubeconfig = write_kubeconfig(tmp_path, fake.endpoint, fake.ca_certificate, token="ya29.expired")
    with kube.api_from_kubeconfig(kubeconfig) as api, pytest.raises(kube.KubernetesApiError) as caught:
        kube.failing_pods(api, NS, backoff=0.01)
    assert one_line(caught.value) == "Kubernetes API: 401 Unauthorized: Unauthorized (list pods in olab)"
    assert (caught.value.code, caught.value.reason) == (401, "Unauthorized")
    assert "ya29.expired" not in str(caught.value)
    assert fake.authorizations == ["Bearer ya29.expired"]


def test_kubeconfig_problems_are_one_line(fake, kubeconfig, tmp_path):
    with pytest.raises(kube.KubernetesError) as caught:
        kube.api_from_kubeconfig(tmp_path / "absent")
    assert one_line(caught.value) == f"kubeconfig {tmp_path / 'absent'}: not found"

    with pytest.raises(kube.KubernetesError) as caught:
        kube.api_from_kubeconfig(kubeconfig, context="gke_other_cluster")
    assert one_line(caught.value).startswith(f"kubeconfig {kubeconfig}: ")
    assert "gke_other_cluster" in str(caught.value)

    broken = tmp_path / "broken"
    broken.write_text("clusters: [\n")
    with pytest.raises(kube.KubernetesError) as caught:
        kube.api_from_kubeconfig(broken)
    assert one_line(caught.value).startswith(f"kubeconfig {broken}: ")
    assert fake.requests == []


# ---- pods and events -------------------------------------------------------------------


def seed_a_broken_deploy(fake: FakeKubernetes) -> None:
    z2jh = {"app": "jupyterhub", "release": "olab"}
    fake.add_pod(
        NS, "hub-7d9f8c6b5-x2x4q", phase="Pending", labels={**z2jh, "component": "hub"},
        containers=[SeedContainer("hub", state="waiting", reason="ImagePullBackOff")],
    )
    fake.add_pod(NS, "proxy-5c6d7f8b9-abcde", labels={**z2jh, "component": "proxy"}, containers=[SeedContainer("chp")])
    fake.add_pod(
        NS, "jupyter-alice", labels={**z2jh, "component": "singleuser-server"},
        containers=[
            SeedContainer(
                "notebook", image="europe-west2-docker.pkg.dev/olab-test/olab/olab-user:1.2.0", state="waiting",
                reason="CrashLoopBackOff", restarts=4, last_reason="OOMKilled", last_exit_code=137,
            )
        ],
    )
    fake.add_pod(
        NS, "user-placeholder-0", phase="Pending", labels={**z2jh, "component": "user-placeholder"},
        unschedulable="0/3 nodes are available: 1 node(s) had untolerated taint {hub.jupyter.org_dedicated: user}, "
        "2 Insufficient memory. preemption: 0/3 nodes are available: 3 No preemption victims found for incoming pod.",
    )
    fake.add_pod(
        NS, "continuous-image-puller-k9z2t", phase="Pending", labels={**z2jh, "component": "continuous-image-puller"},
        containers=[
            SeedContainer(
                "image-pull-singleuser", image="europe-west2-docker.pkg.dev/olab-test/olab/olab-user:9.9.9",
                state="waiting", reason="ErrImagePull", init=True,
                message='rpc error: code = NotFound desc = failed to pull and unpack image\n"olab-user:9.9.9": not found',
            ),
            SeedContainer("pause", state="waiting", reason="PodInitializing"),
        ],
    )
    fake.add_pod(
        NS, "hub-6c5b4a3f2-evict", phase="Failed", labels={**z2jh, "component": "hub"}, reason="Evicted",
        message="The node was low on resource: memory. Threshold quantity: 100Mi, available: 91364Ki.",
        containers=[SeedContainer("hub", state="terminated", exit_code=137, reason="ContainerStatusUnknown")],
    )
    # On their way or done: not failing.
    fake.add_pod(
        NS, "hook-image-awaiter-7xk2p", phase="Succeeded", labels={**z2jh, "component": "image-puller"},
        containers=[SeedContainer("hook-image-awaiter", state="terminated", exit_code=0)],
    )
    fake.add_pod(
        NS, "user-scheduler-6f7d8-abc12", phase="Pending", labels={**z2jh, "component": "user-scheduler"},
        containers=[SeedContainer("kube-scheduler", state="waiting", reason="ContainerCreating")],
    )
    # Another namespace's trouble is not this release's.
    fake.add_namespace("other")
    fake.add_pod("other", "web-0", phase="Pending", containers=[SeedContainer("web", state="waiting", reason="ImagePullBackOff")])


def test_failing_pods_name_each_pod_and_why(fake, api):
    seed_a_broken_deploy(fake)
    problems = kube.failing_pods(api, NS)
    assert [(p.pod, p.phase, p.reason, p.container, p.restarts) for p in problems] == [
        ("continuous-image-puller-k9z2t", "Pending", "ErrImagePull", "init container image-pull-singleuser", 0),
        ("hub-6c5b4a3f2-evict", "Failed", "Evicted", None, 0),
        ("hub-7d9f8c6b5-x2x4q", "Pending", "ImagePullBackOff", "hub", 0),
        ("jupyter-alice", "Running", "CrashLoopBackOff", "notebook", 4),
        ("user-placeholder-0", "Pending", "Unschedulable", None, 0),
    ]
    by_pod = {p.pod: p for p in problems}
    assert by_pod["hub-7d9f8c6b5-x2x4q"].line == (
        'pod hub-7d9f8c6b5-x2x4q: Pending, ImagePullBackOff (container hub): '
        'Back-off pulling image "quay.io/jupyterhub/k8s-hub:4.4.0"'
    )
    assert by_pod["jupyter-alice"].message == (
        "back-off 5m0s restarting failed container=notebook pod=jupyter-alice; last exit: OOMKilled (exit code 137)"
    )
    assert by_pod["continuous-image-puller-k9z2t"].message == (
        'rpc error: code = NotFound desc = failed to pull and unpack image "olab-user:9.9.9": not found'
    )
    assert by_pod["user-placeholder-0"].message.startswith("0/3 nodes are available: 1 node(s) had untolerated taint")
    assert by_pod["hub-6c5b4a3f2-evict"].message.startswith("The node was low on resource: memory.")
    assert by_pod["hub-7d9f8c6b5-x2x4q"].node == "gke-olab-core-0"
    assert fake.calls(PODS) == 1


def test_failing_pods_take_a_label_selector(fake, api):
    seed_a_broken_deploy(fake)
    assert [p.pod for p in kube.failing_pods(api, NS, "component=hub")] == ["hub-6c5b4a3f2-evict", "hub-7d9f8c6b5-x2x4q"]
    assert [p.pod for p in kube.failing_pods(api, NS, "component in (proxy, user-placeholder)")] == ["user-placeholder-0"]
    assert [p.pod for p in kube.failing_pods(api, NS, "component notin (hub,singleuser-server),app=jupyterhub")] == [
        "continuous-image-puller-k9z2t",
        "user-placeholder-0",
    ]
    assert kube.failing_pods(api, NS, "component=proxy") == []
    assert kube.failing_pods(api, "other") != []


def test_pod_events_are_one_line_each_oldest_first(fake, api):
    seed_a_broken_deploy(fake)
    pod = "hub-7d9f8c6b5-x2x4q"
    t0 = datetime.datetime(2025, 5, 2, 14, 0, 0, tzinfo=datetime.UTC)
    at = lambda seconds: t0 + datetime.timedelta(seconds=seconds)  # noqa: E731
    image = "quay.io/jupyterhub/k8s-hub:4.4.0"
    fake.add_event(NS, pod, "BackOff", f'Back-off pulling image "{image}"', type="Normal", count=7, first=at(40), last=at(300))
    fake.add_event(
        NS, pod, "Scheduled", f"Successfully assigned {NS}/{pod} to gke-olab-core-0",
        type="Normal", component="default-scheduler", last=at(0),
    )
    fake.add_event(
        NS, pod, "Failed",
        'Failed to pull image "quay.io/jupyterhub/k8s-hub:4.4.0": rpc error: code = NotFound\n  desc = not found',
        count=4, first=at(30), last=at(200),
    )
    fake.add_event(NS, pod, "Pulling", f'Pulling image "{image}"', type="Normal", count=4, first=at(5), last=at(150))
    fake.add_event(NS, "proxy-5c6d7f8b9-abcde", "Started", "Started container chp", type="Normal", last=at(10))
    fake.add_event("other", pod, "Failed", "same name, other namespace", last=at(1))

    assert kube.pod_events(api, NS, pod) == [
        f"Normal Scheduled: Successfully assigned {NS}/{pod} to gke-olab-core-0",
        'Normal Pulling: Pulling image "quay.io/jupyterhub/k8s-hub:4.4.0" (x4)',
        'Warning Failed: Failed to pull image "quay.io/jupyterhub/k8s-hub:4.4.0": rpc error: code = NotFound desc = not found (x4)',
        'Normal BackOff: Back-off pulling image "quay.io/jupyterhub/k8s-hub:4.4.0" (x7)',
    ]
    assert kube.pod_events(api, NS, "jupyter-nobody") == []
    assert fake.calls(f"/api/v1/namespaces/{NS}/events") == 2


# ---- Helm's release secrets ------------------------------------------------------------

Z2JH_VALUES_V1 = {
    "hub": {"config": {"JupyterHub": {"admin_access": True}}, "db": {"type": "sqlite-pvc"}},
    "singleuser": {"image": {"name": "europe-west2-docker.pkg.dev/olab-test/olab/olab-user", "tag": "1.1.0"}},
    "proxy": {"chp": {"extraCommandLineFlags": ["--timeout=300000", "--proxy-timeout=300000"]}},
    "custom": {"banner": "<b>O-Lab</b> & friends", "cpu": 0.5},
}
Z2JH_VALUES_V3 = {
    "hub": {"config": {"JupyterHub": {"admin_access": True}}, "db": {"type": "sqlite-pvc"}},
    "singleuser": {"image": {"name": "europe-west2-docker.pkg.dev/olab-test/olab/olab-user", "tag": "1.2.0"}},
}


def seed_history(fake: FakeKubernetes) -> None:
    """Revision 1 written by Helm 3, 2 and 3 by Helm 4 (an upgrade that died mid-way),
    another release beside it, and a secret that only looks like Helm's."""
    fake.add_helm_release(
        helm_release(NS, NS, 1, "superseded", config=Z2JH_VALUES_V1, helm=3, description="Install complete",
                     last_deployed=datetime.datetime(2025, 5, 1, 9, 30, 15, 250000, tzinfo=LONDON)),
        modified_at=1746189015,
    )
    fake.add_helm_release(
        helm_release(NS, NS, 2, "deployed", config={**Z2JH_VALUES_V1, "custom": {"cpu": 1}}, helm=4,
                     first_deployed=datetime.datetime(2025, 5, 1, 9, 30, 15, 250000, tzinfo=LONDON),
                     last_deployed=datetime.datetime(2025, 5, 2, 14, 3, 11, tzinfo=datetime.UTC)),
        modified_at=1746194591,
    )
    fake.add_helm_release(
        helm_release(NS, NS, 3, "pending-upgrade", chart_version="4.4.1", app_version="5.4.4", config=Z2JH_VALUES_V3,
                     helm=4, last_deployed=datetime.datetime(2025, 5, 9, 8, 0, 0, 5000, tzinfo=datetime.UTC)),
        created_at=1746777600,
    )
    fake.add_helm_release(
        helm_release("olab-ingress", NS, 1, "deployed", chart="olab-ingress", chart_version="0.3.0", app_version="0.3.0")
    )
    fake.add_secret(NS, "not-helm", {"release": b"x"}, labels={"owner": "helm", "name": NS})


def test_the_fake_stores_releases_exactly_as_helms_secrets_driver(fake, api):
    seed_history(fake)
    core = k8s.CoreV1Api(api)
    secret = core.read_namespaced_secret("sh.helm.release.v1.olab.v1", NS)
    assert secret.type == "helm.sh/release.v1"
    assert secret.metadata.labels == {
        "modifiedAt": "1746189015", "name": "olab", "owner": "helm", "status": "superseded", "version": "1",
    }
    helm_text = base64.b64decode(secret.data["release"])  # the Secret's own base64
    compressed = base64.b64decode(helm_text, validate=True)  # Helm's encodeRelease
    assert compressed[:3] == b"\x1f\x8b\x08"
    raw = gzip.decompress(compressed)
    # Go's encoding/json: compact, struct fields in order, maps sorted, <>& escaped.
    assert raw.startswith(b'{"name":"olab","info":{"first_deployed":"2025-05-01T09:30:15.250000789+01:00",')
    assert b'"deleted":"","description":"Install complete","status":"superseded"}' in raw
    assert b'"banner":"\\u003cb\\u003eO-Lab\\u003c/b\\u003e \\u0026 friends"' in raw
    assert raw.endswith(b'"version":1,"namespace":"olab"}')
    release = json.loads(raw)
    assert list(release) == ["name", "info", "chart", "config", "manifest", "version", "namespace"]
    assert list(release["chart"]) == ["metadata", "lock", "templates", "values", "schema", "files"]

    stored = core.read_namespaced_secret("sh.helm.release.v1.olab.v3", NS).data["release"]
    helm4 = json.loads(gzip.decompress(base64.b64decode(base64.b64decode(stored))))
    assert "deleted" not in helm4["info"] and helm4["apply_method"] == "ssa"
    assert list(helm4["chart"]) == ["metadata", "lock", "templates", "values", "schema", "schemamodtime", "files"]


def test_helm_releases_are_decoded_revision_by_revision(fake, api):
    seed_history(fake)
    revisions = kube.helm_releases(api, NS, "olab")
    assert [(r.revision, r.status, r.chart, r.chart_version, r.app_version) for r in revisions] == [
        (1, "superseded", "jupyterhub", "4.4.0", "5.4.3"),
        (2, "deployed", "jupyterhub", "4.4.0", "5.4.3"),
        (3, "pending-upgrade", "jupyterhub", "4.4.1", "5.4.4"),
    ]
    first, second, third = revisions
    assert first.values == Z2JH_VALUES_V1
    assert second.values == {**Z2JH_VALUES_V1, "custom": {"cpu": 1}}
    assert third.values == Z2JH_VALUES_V3
    assert first.updated == datetime.datetime(2025, 5, 1, 9, 30, 15, 250000, tzinfo=LONDON)
    assert second.first_deployed == first.updated
    assert second.updated == datetime.datetime(2025, 5, 2, 14, 3, 11, tzinfo=datetime.UTC)
    assert third.updated == datetime.datetime(2025, 5, 9, 8, 0, 0, 5000, tzinfo=datetime.UTC)
    assert (first.description, third.description) == ("Install complete", "Preparing upgrade")
    assert {r.release for r in revisions} == {"olab"} and {r.namespace for r in revisions} == {NS}
    assert [r.secret for r in revisions] == [f"sh.helm.release.v1.olab.v{n}" for n in (1, 2, 3)]

    ingress = kube.helm_releases(api, NS, "olab-ingress")
    assert [(r.revision, r.chart, r.status, r.values) for r in ingress] == [(1, "olab-ingress", "deployed", {})]
    assert kube.helm_releases(api, NS, "never-installed") == []
    assert kube.helm_releases(api, "other-namespace", "olab") == []


def test_a_stuck_pending_upgrade_is_found(fake, api):
    seed_history(fake)
    stuck = kube.stuck_release(kube.helm_releases(api, NS, "olab"))
    assert stuck is not None
    assert (stuck.revision, stuck.status, stuck.chart_version) == (3, "pending-upgrade", "4.4.1")
    assert kube.stuck_release(kube.helm_releases(api, NS, "olab-ingress")) is None


def helm_binary() -> str:
    return shutil.which("helm") or ""


@pytest.mark.skipif(not helm_binary(), reason="no helm on PATH (setup.sh installs helm 4)")
def test_real_helm_reads_the_fakes_release_secrets_as_olab_does(fake, kubeconfig, api, tmp_path):
    """The fake's secrets are Helm's own format: helm (the binary setup.sh installs) lists
    the same history, and the same values, as helm_releases decodes."""
    seed_history(fake)
    env = {"KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path), "PATH": os.environ.get("PATH", "")}

    def helm(*args: str):
        done = subprocess.run([helm_binary(), *args, "-n", NS, "-o", "json"], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    ours = kube.helm_releases(api, NS, "olab")
    history = helm("history", "olab")
    assert [(h["revision"], h["status"], h["chart"], h["app_version"], h["description"]) for h in history] == [
        (r.revision, r.status, f"{r.chart}-{r.chart_version}", r.app_version, r.description) for r in ours
    ]
    for r in ours:
        assert helm("get", "values", "olab", "--revision", str(r.revision)) == r.values


def revision(number: int, status: str) -> kube.HelmRevision:
    return kube.HelmRevision(release="olab", namespace=NS, revision=number, status=status)


@pytest.mark.parametrize(
    ("history", "stuck"),
    [
        ([], None),
        ([(1, "pending-install")], 1),
        ([(1, "superseded"), (2, "failed"), (3, "pending-rollback")], 3),
        # Helm looks at the newest only: a pending revision under a newer one blocks nothing.
        ([(1, "superseded"), (2, "pending-upgrade"), (3, "deployed")], None),
        ([(4, "pending-upgrade"), (2, "superseded"), (3, "deployed")], 4),
        ([(1, "deployed"), (2, "failed")], None),
    ],
)
def test_stuck_release_is_the_newest_revision_when_it_is_pending(history, stuck):
    found = kube.stuck_release([revision(n, s) for n, s in history])
    assert (found.revision if found else None) == stuck


def test_old_uncompressed_releases_decode_and_a_corrupt_one_is_one_line(fake, api):
    # Releases stored before Helm compressed them: base64 of the JSON itself.
    old = helm_release(NS, NS, 1, "superseded", config={"a": 1}, helm=3)
    fake.add_secret(
        NS, "sh.helm.release.v1.olab.v1", {"release": base64.b64encode(json.dumps(old).encode())},
        type="helm.sh/release.v1", labels={"name": "olab", "owner": "helm", "status": "superseded", "version": "1"},
    )
    assert [(r.revision, r.values) for r in kube.helm_releases(api, NS, "olab")] == [(1, {"a": 1})]

    fake.add_secret(
        NS, "sh.helm.release.v1.olab.v2", {"release": base64.b64encode(b"\x1f\x8b\x08 truncated")},
        type="helm.sh/release.v1", labels={"name": "olab", "owner": "helm", "status": "deployed", "version": "2"},
    )
    with pytest.raises(kube.KubernetesError) as caught:
        kube.helm_releases(api, NS, "olab")
    assert one_line(caught.value).startswith("helm release secret sh.helm.release.v1.olab.v2: cannot decode: ")


def test_one_revision_and_a_404_in_the_apis_words(fake, api):
    seed_history(fake)
    second = kube.helm_revision(api, NS, "olab", 2)
    assert (second.revision, second.status, second.values["custom"]) == (2, "deployed", {"cpu": 1})

    with pytest.raises(kube.KubernetesApiError) as caught:
        kube.helm_revision(api, NS, "olab", 7, backoff=0.01)
    assert one_line(caught.value) == (
        'Kubernetes API: 404 NotFound: secrets "sh.helm.release.v1.olab.v7" not found (read revision 7 of helm release olab)'
    )
    assert (caught.value.code, caught.value.reason) == (404, "NotFound")
    assert not is_transient(caught.value)
    assert fake.calls(f"{SECRETS}/sh.helm.release.v1.olab.v7") == 1


# ---- claims and disks ------------------------------------------------------------------


def z2jh_claim_labels(username: str) -> dict[str, str]:
    return {
        "app": "jupyterhub", "chart": "jupyterhub-4.4.0", "component": "singleuser-storage", "heritage": "jupyterhub",
        "release": "olab", "hub.jupyter.org/username": username, "app.kubernetes.io/managed-by": "kubespawner",
    }


def seed_claims(fake: FakeKubernetes) -> dict[str, str]:
    """Z2JH's claims as GKE leaves them; the names of the volumes made."""
    volumes = {}
    _, pv = fake.add_claim(NS, "hub-db-dir", size="1Gi", reclaim_policy="Retain",
                           labels={"app": "jupyterhub", "component": "hub", "release": "olab"})
    volumes["hub-db-dir"] = pv.metadata.name
    _, pv = fake.add_claim(NS, "claim-alice", labels=z2jh_claim_labels("alice"),
                           annotations={"hub.jupyter.org/username": "alice"})
    volumes["claim-alice"] = pv.metadata.name
    _, pv = fake.add_claim(NS, "claim-bob-40example-2ecom", reclaim_policy="Retain", disk="olab-home-bob",
                           labels=z2jh_claim_labels("bob-40example-2ecom"),
                           annotations={"hub.jupyter.org/username": "bob@example.com"})
    volumes["claim-bob-40example-2ecom"] = pv.metadata.name
    # A volume of the old in-tree plugin: the disk's name, its zone in labels.
    _, pv = fake.add_claim(NS, "claim-carol", size="20Gi", storage_class="standard", reclaim_policy="Retain",
                           disk="gke-olab-dynamic-pvc-3f1e", in_tree=True, zone="europe-west2-b")
    volumes["claim-carol"] = pv.metadata.name
    # Waiting for its first consumer: no volume yet.
    fake.add_pvc(NS, "claim-dave", labels=z2jh_claim_labels("dave"))
    # Not Z2JH's: left out.
    fake.add_claim(NS, "grafana-data")
    fake.add_namespace("other")
    fake.add_claim("other", "claim-alice")
    return volumes


def test_user_claims_map_each_claim_to_its_disk(fake, api):
    volumes = seed_claims(fake)
    claims = kube.user_claims(api, NS)
    assert [(c.claim, c.kind, c.username) for c in claims] == [
        ("hub-db-dir", "hub", None),
        ("claim-alice", "user", "alice"),
        ("claim-bob-40example-2ecom", "user", "bob@example.com"),
        ("claim-carol", "user", "carol"),
        ("claim-dave", "user", "dave"),
    ]
    hub, alice, bob, carol, dave = claims
    assert hub.volume == volumes["hub-db-dir"]
    assert hub.disk == kube.GceDisk(name=volumes["hub-db-dir"], location=ZONE, project=PROJECT)
    assert (hub.size, hub.storage_class, hub.reclaim_policy, hub.phase, hub.volume_phase) == (
        "1Gi", "standard-rwo", "Retain", "Bound", "Bound",
    )
    assert alice.disk.path == f"projects/{PROJECT}/zones/{ZONE}/disks/{volumes['claim-alice']}"
    assert (alice.size, alice.reclaim_policy, alice.access_modes) == ("10Gi", "Delete", ["ReadWriteOnce"])
    assert alice.labels == z2jh_claim_labels("alice")
    assert bob.disk == kube.GceDisk(name="olab-home-bob", location=ZONE, project=PROJECT)
    assert bob.reclaim_policy == "Retain"
    assert carol.disk == kube.GceDisk(name="gke-olab-dynamic-pvc-3f1e", location="europe-west2-b", project=None)
    assert (carol.size, carol.storage_class) == ("20Gi", "standard")
    assert (dave.phase, dave.volume, dave.disk, dave.volume_phase, dave.reclaim_policy, dave.size) == (
        "Pending", None, None, None, None, "10Gi",
    )
    assert fake.calls(f"/api/v1/namespaces/{NS}/persistentvolumeclaims") == 1
    assert fake.calls("/api/v1/persistentvolumes") == 1


def test_a_regional_disk_and_an_empty_namespace(fake, api):
    pvc, pv = fake.add_claim(NS, "hub-db-dir", storage_class="standard-rwo-regional")
    pv.spec.csi.volume_handle = f"projects/{PROJECT}/regions/europe-west2/disks/{pv.metadata.name}"
    [hub] = kube.user_claims(api, NS)
    assert hub.disk == kube.GceDisk(name=pv.metadata.name, location="europe-west2", project=PROJECT, regional=True)
    assert hub.disk.path == f"projects/{PROJECT}/regions/europe-west2/disks/{pv.metadata.name}"

    assert kube.user_claims(api, "empty") == []
    assert fake.calls("/api/v1/persistentvolumes") == 1  # none asked for when no claim is Z2JH's


# ---- errors ----------------------------------------------------------------------------


def test_403_is_one_line_in_the_apis_words_and_not_retried(fake, api):
    seed_history(fake)
    fake.deny("list", "secrets", NS)
    with pytest.raises(kube.KubernetesApiError) as caught:
        kube.helm_releases(api, NS, "olab", backoff=0.01)
    assert one_line(caught.value) == (
        'Kubernetes API: 403 Forbidden: secrets is forbidden: User "olab-deployer@olab-test.iam.gserviceaccount.com" '
        'cannot list resource "secrets" in API group "" in the namespace "olab": '
        'requires one of ["container.secrets.list"] permission(s). (list helm release secrets of olab)'
    )
    assert (caught.value.code, caught.value.reason) == (403, "Forbidden")
    assert not is_transient(caught.value)
    assert fake.calls(SECRETS) == 1

    seed_claims(fake)
    fake.deny("list", "persistentvolumes")
    with pytest.raises(kube.KubernetesApiError) as caught:
        kube.user_claims(api, NS, backoff=0.01)
    assert 'cannot list resource "persistentvolumes" in API group "" at the cluster scope' in one_line(caught.value)
    assert fake.calls("/api/v1/persistentvolumes") == 1

    fake.allow()
    assert [r.revision for r in kube.helm_releases(api, NS, "olab")] == [1, 2, 3]


def test_a_503_twice_is_retried(fake, api, olab_logs):
    seed_a_broken_deploy(fake)
    fake.fail(PODS, 503, times=2)
    problems = kube.failing_pods(api, NS, backoff=0.01)
    assert len(problems) == 5
    assert fake.calls(PODS) == 3
    warnings = [r.getMessage() for r in olab_logs.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert warnings[0].startswith(
        "list pods in olab: Kubernetes API: 503 ServiceUnavailable: the server is currently unable to handle the request; "
        "trying again in 0.0s (1 of 5)"
    )
    assert TOKEN not in olab_logs.text


def test_transient_errors_past_the_retries_give_up_on_one_line(fake, api):
    fake.fail(SECRETS, 429, times=10)
    with pytest.raises(kube.KubernetesUnavailable) as caught:
        kube.helm_releases(api, NS, "olab", retries=2, backoff=0.01)
    assert one_line(caught.value) == (
        "Kubernetes API: 429 TooManyRequests: the server has received too many requests and has asked us to try "
        "again later (list helm release secrets of olab: gave up after 3 attempts)"
    )
    assert is_transient(caught.value)
    assert fake.calls(SECRETS) == 3


def test_retries_back_off_exponentially_up_to_a_cap_and_never_past_the_deadline(fake, api, olab_logs, monkeypatch):
    monkeypatch.setattr(kube, "MAX_BACKOFF", 0.3)
    fake.fail(PODS, 503, times=10)
    start = time.monotonic()
    with pytest.raises(kube.KubernetesUnavailable) as caught:
        kube.failing_pods(api, NS, retries=2, backoff=0.2)
    assert time.monotonic() - start >= 0.5
    assert one_line(caught.value).endswith("(list pods in olab: gave up after 3 attempts)")
    waits = [r.getMessage().split("; ")[-1] for r in olab_logs.records if r.levelno == logging.WARNING]
    assert waits == ["trying again in 0.2s (1 of 2)", "trying again in 0.3s (2 of 2)"]

    # A retry that would end past the deadline is not made: 0.2 s fits, the next 0.3 s does not.
    with pytest.raises(kube.KubernetesUnavailable) as caught:
        kube.failing_pods(api, NS, retries=5, backoff=0.2, deadline=time.monotonic() + 0.4)
    assert str(caught.value).endswith("gave up after 2 attempts)")
    assert fake.calls(PODS) == 3 + 2


def test_a_refused_connection_is_retried_then_unavailable(tmp_path, olab_logs):
    kubeconfig = write_kubeconfig(tmp_path, f"127.0.0.1:{free_port()}", fake_ca_base64_of_the_fake())
    with kube.api_from_kubeconfig(kubeconfig) as api, pytest.raises(kube.KubernetesUnavailable) as caught:
        kube.user_claims(api, NS, retries=2, backoff=0.01)
    text = one_line(caught.value)
    assert text.startswith("Kubernetes API unreachable: NewConnectionError: ")
    assert "Connection refused" in text and text.endswith("gave up after 3 attempts)")
    assert is_transient(caught.value)
    assert len([r for r in olab_logs.records if r.levelno == logging.WARNING]) == 2


def fake_ca_base64_of_the_fake() -> str:
    return base64.b64encode(fake_tls().ca_pem.encode()).decode()


def test_a_bad_selector_is_a_400_not_retried(fake, api):
    with pytest.raises(kube.KubernetesApiError) as caught:
        kube.failing_pods(api, NS, "component in ()", backoff=0.01)
    assert one_line(caught.value).startswith("Kubernetes API: 400 BadRequest: unable to parse requirement")
    assert fake.calls(PODS) == 1


# ---- the fake, through the real client -------------------------------------------------


def raw_json(response) -> dict:
    return json.loads(response.data)


def test_the_fake_answers_in_the_api_servers_shapes(fake, api):
    seed_a_broken_deploy(fake)
    fake.add_node("gke-olab-core-0", pool="core")
    fake.add_node("gke-olab-user-0", pool="user")
    fake.add_node("gke-olab-user-1", pool="user", ready=False)
    core = k8s.CoreV1Api(api)

    listed = raw_json(core.list_namespaced_pod(NS, _preload_content=False))
    assert (listed["kind"], listed["apiVersion"]) == ("PodList", "v1")
    assert all("kind" not in item and "apiVersion" not in item for item in listed["items"])
    names = [item["metadata"]["name"] for item in listed["items"]]
    assert names == sorted(names) and len(names) == 8
    got = raw_json(core.read_namespaced_pod("jupyter-alice", NS, _preload_content=False))
    assert (got["kind"], got["apiVersion"]) == ("Pod", "v1")
    status = got["status"]["containerStatuses"][0]
    assert status["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert status["lastState"]["terminated"] == {**status["lastState"]["terminated"], "exitCode": 137, "reason": "OOMKilled"}
    assert got["metadata"]["creationTimestamp"].endswith("Z") and got["metadata"]["uid"]

    with pytest.raises(ApiException) as caught:
        core.read_namespaced_pod("jupyter-nobody", NS)
    assert caught.value.status == 404
    assert json.loads(caught.value.body) == {
        "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
        "message": 'pods "jupyter-nobody" not found', "reason": "NotFound",
        "details": {"name": "jupyter-nobody", "kind": "pods"}, "code": 404,
    }

    assert core.list_namespaced_pod("no-such-namespace").items == []
    pending = core.list_namespaced_pod(NS, field_selector="status.phase=Pending")
    assert sorted(p.metadata.name for p in pending.items) == [
        "continuous-image-puller-k9z2t", "hub-7d9f8c6b5-x2x4q", "user-placeholder-0", "user-scheduler-6f7d8-abc12",
    ]
    not_hub = core.list_namespaced_pod(NS, label_selector="component!=hub,!no-such-label,app")
    assert "hub-7d9f8c6b5-x2x4q" not in [p.metadata.name for p in not_hub.items] and len(not_hub.items) == 6
    with pytest.raises(ApiException) as caught:
        core.list_namespaced_pod(NS, field_selector="spec.containers=hub")
    assert caught.value.status == 400 and json.loads(caught.value.body)["message"] == "field label not supported: spec.containers"

    users = core.list_node(label_selector="cloud.google.com/gke-nodepool=user")
    assert [n.metadata.name for n in users.items] == ["gke-olab-user-0", "gke-olab-user-1"]
    assert [c.status for c in users.items[1].status.conditions] == ["Unknown"]
    assert {n.metadata.name for n in core.list_namespace().items} >= {"default", "kube-system", NS, "other"}
    assert core.read_namespace(NS).status.phase == "Active"
    all_pods = core.list_pod_for_all_namespaces(field_selector="metadata.namespace=other")
    assert [p.metadata.name for p in all_pods.items] == ["web-0"]

    assert fake.counts()[f"GET {PODS}"] == 4


def test_the_fake_binds_a_retained_disk_again_and_releases_it(fake, api):
    core = k8s.CoreV1Api(api)
    handle = f"projects/{PROJECT}/zones/{ZONE}/disks/olab-home-alice"
    pv = core.create_persistent_volume(
        k8s.V1PersistentVolume(
            metadata=k8s.V1ObjectMeta(name="olab-home-alice"),
            spec=k8s.V1PersistentVolumeSpec(
                capacity={"storage": "10Gi"}, access_modes=["ReadWriteOnce"], persistent_volume_reclaim_policy="Retain",
                storage_class_name="standard-rwo",
                csi=k8s.V1CSIPersistentVolumeSource(driver="pd.csi.storage.gke.io", volume_handle=handle, fs_type="ext4"),
            ),
        )
    )
    assert pv.status.phase == "Available"
    claim = k8s.V1PersistentVolumeClaim(
        metadata=k8s.V1ObjectMeta(name="claim-alice", labels=z2jh_claim_labels("alice")),
        spec=k8s.V1PersistentVolumeClaimSpec(
            access_modes=["ReadWriteOnce"], volume_name="olab-home-alice",
            resources=k8s.V1VolumeResourceRequirements(requests={"storage": "10Gi"}),
        ),
    )
    created = core.create_namespaced_persistent_volume_claim(NS, claim)
    assert (created.status.phase, created.spec.storage_class_name) == ("Bound", "standard-rwo")
    bound = core.read_persistent_volume("olab-home-alice")
    assert (bound.status.phase, bound.spec.claim_ref.name, bound.spec.claim_ref.uid) == ("Bound", "claim-alice", created.metadata.uid)
    [alice] = kube.user_claims(api, NS)
    assert (alice.volume, alice.disk.path, alice.reclaim_policy) == ("olab-home-alice", handle, "Retain")

    with pytest.raises(ApiException) as caught:
        core.create_namespaced_persistent_volume_claim(NS, claim)
    assert caught.value.status == 409
    assert json.loads(caught.value.body)["message"] == 'persistentvolumeclaims "claim-alice" already exists'

    deleted = core.delete_namespaced_persistent_volume_claim("claim-alice", NS)
    assert deleted.metadata.deletion_timestamp is not None
    assert core.read_persistent_volume("olab-home-alice").status.phase == "Released"
    assert fake.deleted_disks == []
    # A released volume keeps its old claim's uid: a new claim of the same name waits.
    assert core.create_namespaced_persistent_volume_claim(NS, claim).status.phase == "Pending"

    with pytest.raises(ApiException) as caught:
        core.create_namespaced_persistent_volume_claim(
            NS,
            k8s.V1PersistentVolumeClaim(
                metadata=k8s.V1ObjectMeta(name="no-size"), spec=k8s.V1PersistentVolumeClaimSpec(access_modes=["ReadWriteOnce"])
            ),
        )
    assert caught.value.status == 422
    with pytest.raises(ApiException) as caught:
        core.create_namespaced_persistent_volume_claim("absent", claim)
    assert json.loads(caught.value.body)["message"] == 'namespaces "absent" not found'


def test_the_fake_deletes_a_disk_with_its_claim_unless_a_pod_holds_it(fake, api):
    core = k8s.CoreV1Api(api)
    _, alice_pv = fake.add_claim(NS, "claim-alice")
    _, bob_pv = fake.add_claim(NS, "claim-bob")
    fake.add_pod(NS, "jupyter-bob", claims=("claim-bob",))

    core.delete_namespaced_persistent_volume_claim("claim-alice", NS)
    assert fake.get("persistentvolumeclaims", "claim-alice", NS) is None
    assert fake.get("persistentvolumes", alice_pv.metadata.name) is None
    assert fake.deleted_disks == [alice_pv.spec.csi.volume_handle]

    core.delete_namespaced_persistent_volume_claim("claim-bob", NS)
    held = core.read_namespaced_persistent_volume_claim("claim-bob", NS)  # pvc-protection: Terminating
    assert held.metadata.deletion_timestamp is not None and held.status.phase == "Bound"
    assert fake.get("persistentvolumes", bob_pv.metadata.name) is not None


def test_the_fake_creates_lists_and_deletes_secrets(fake, api):
    core = k8s.CoreV1Api(api)
    secret = k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name="hub-extra", labels={"app": "olab"}),
        data={"token": base64.b64encode(b"s3cret").decode()},
    )
    created = core.create_namespaced_secret(NS, secret)
    assert (created.type, created.metadata.namespace) == ("Opaque", NS)
    assert [s.metadata.name for s in core.list_namespaced_secret(NS, label_selector="app=olab").items] == ["hub-extra"]
    assert core.list_namespaced_secret(NS, field_selector="type=helm.sh/release.v1").items == []
    done = core.delete_namespaced_secret("hub-extra", NS)
    assert (done.status, done.details.name) == ("Success", "hub-extra")
    with pytest.raises(ApiException) as caught:
        core.delete_namespaced_secret("hub-extra", NS)
    assert caught.value.status == 404
    assert fake.calls(f"{SECRETS}/hub-extra", "DELETE") == 2


# ---- claims bound again to restored disks (destroy mode) -------------------------------


def restored(claim: str, disk: str, **extra) -> kube.RestoredClaim:
    return kube.RestoredClaim(
        claim=claim, namespace=NS, volume=f"pvc-{claim}", size="10Gi", storage_class="standard-rwo",
        disk=kube.GceDisk(name=disk, location=ZONE, project=PROJECT), **extra,
    )


def test_restored_claims_bind_by_their_names_to_their_disks_and_a_rerun_takes_them_as_they_are(fake, api):
    wants = [restored("claim-ann", "disk-ann", username="ann", labels={"component": "singleuser-storage"}),
             restored("hub-db-dir", "disk-hub", helm_release="olab")]
    kube.ensure_namespace(api, "fresh")
    assert fake.get("namespaces", "fresh") is not None
    kube.ensure_namespace(api, "fresh")  # already there: fine
    assert kube.bind_restored_claims(api, wants) == ["claim-ann", "hub-db-dir"]
    claims = {c.claim: c for c in kube.user_claims(api, NS)}
    assert claims["claim-ann"].phase == "Bound" and claims["claim-ann"].disk.name == "disk-ann"
    assert claims["claim-ann"].username == "ann" and claims["claim-ann"].reclaim_policy == "Retain"
    assert claims["hub-db-dir"].disk.path == f"projects/{PROJECT}/zones/{ZONE}/disks/disk-hub"
    hub = fake.get("persistentvolumeclaims", "hub-db-dir", NS)
    assert hub.metadata.labels["app.kubernetes.io/managed-by"] == "Helm"
    assert {k: v for k, v in hub.metadata.annotations.items() if k.startswith("meta.helm.sh/")} == {
        "meta.helm.sh/release-name": "olab", "meta.helm.sh/release-namespace": NS}
    pv = fake.get("persistentvolumes", "pvc-claim-ann")
    assert pv.spec.node_affinity.required.node_selector_terms[0].match_expressions[0].values == [ZONE]
    assert kube.bind_restored_claims(api, wants) == [], "a rerun makes nothing again"


def test_a_claim_or_volume_already_elsewhere_is_refused_naming_it(fake, api):
    fake.add_claim(NS, "claim-bob", disk="someone-elses-disk")
    with pytest.raises(kube.KubernetesError, match=r"claim olab/claim-bob exists on volume pvc-.*, not on pvc-claim-bob"):
        kube.bind_restored_claims(api, [restored("claim-bob", "disk-bob")])
    fake.add_pv("pvc-claim-cy", disk="another-disk")
    with pytest.raises(kube.KubernetesError, match=r"persistent volume pvc-claim-cy exists on .*/disks/another-disk, not on .*/disks/disk-cy"):
        kube.bind_restored_claims(api, [restored("claim-cy", "disk-cy")])
