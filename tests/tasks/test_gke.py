"""tasks/gke.py through the real ClusterManagerClient (REST) against a fake GKE API on
loopback: waits that really poll, resizes through operations, errors as Google words them.

Fast: no Prefect server, no network beyond 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import time

import httpx
import pytest
import yaml
from google.cloud import container_v1

from core.config import GoogleApis
from core.retry import is_transient
from tasks import gke
from tests.fakes.gke import FakeGke, SeedPool, fake_ca_base64, fake_ca_pem, service_account_key

PROJECT, LOCATION = "olab-test", "europe-west2-a"
TOKEN = "ya29.secret-token-that-must-not-be-logged"


@pytest.fixture
def fake():
    with FakeGke(project=PROJECT, location=LOCATION, operation_polls=3) as server:
        yield server


@pytest.fixture
def client(fake):
    return gke.cluster_manager(GoogleApis(container=fake.url, anonymous=True))


@pytest.fixture
def olab_logs(caplog):
    caplog.set_level(logging.INFO, logger="olab")
    return caplog


def seed_running(fake: FakeGke, name: str = "olab", user_nodes: int = 2) -> None:
    fake.seed_cluster(name, [SeedPool("core", 1), SeedPool("user", user_nodes, 0, 3)])


def wait(client, pools=("core", "user"), cluster="olab", timeout=10.0, **kwargs):
    kwargs.setdefault("backoff", 0.01)
    return gke.wait_until_ready(client, PROJECT, LOCATION, cluster, list(pools), timeout, 0.01, **kwargs)


# ---- pure parts ------------------------------------------------------------------------


def test_cluster_info_takes_the_plain_facts_from_gkes_message():
    message = container_v1.Cluster(
        name="olab",
        location=LOCATION,
        status=container_v1.Cluster.Status.RECONCILING,
        endpoint="34.1.2.3",
        master_auth=container_v1.MasterAuth(cluster_ca_certificate="Q0E="),
        current_master_version="1.31.5-gke.1",
        current_node_count=3,
        node_pools=[
            container_v1.NodePool(
                name="core", initial_node_count=1, status=container_v1.NodePool.Status.RUNNING,
                config=container_v1.NodeConfig(machine_type="e2-standard-2"),
            ),
            container_v1.NodePool(
                name="user", initial_node_count=2, status=container_v1.NodePool.Status.RUNNING_WITH_ERROR,
                autoscaling=container_v1.NodePoolAutoscaling(enabled=True, min_node_count=0, max_node_count=5),
                conditions=[container_v1.StatusCondition(message="GCE out of resources")],
            ),
            # Location-policy autoscaling gives only total bounds.
            container_v1.NodePool(
                name="gpu", status=container_v1.NodePool.Status.PROVISIONING,
                autoscaling=container_v1.NodePoolAutoscaling(enabled=True, total_min_node_count=1, total_max_node_count=4),
            ),
        ],
    )
    info = gke.cluster_info(message, PROJECT)
    assert (info.name, info.location, info.status, info.endpoint, info.ca_certificate) == (
        "olab", LOCATION, "RECONCILING", "34.1.2.3", "Q0E="
    )
    assert info.current_node_count == 3 and info.master_version == "1.31.5-gke.1"
    core, user, gpu = info.pools
    assert core == gke.PoolInfo(name="core", status="RUNNING", machine_type="e2-standard-2", node_count=1)
    assert (user.node_count, user.autoscaling, user.min_nodes, user.max_nodes) == (2, True, 0, 5)
    assert user.status_message == "GCE out of resources"
    assert (gpu.min_nodes, gpu.max_nodes) == (1, 4)
    assert info.context_name == f"gke_{PROJECT}_{LOCATION}_olab"
    with pytest.raises(Exception):
        info.status = "RUNNING"  # frozen


def info_of(status: str, pools: dict[str, str], message: str = "") -> gke.ClusterInfo:
    return gke.ClusterInfo(
        project=PROJECT, name="olab", location=LOCATION, status=status, status_message=message,
        pools=[gke.PoolInfo(name=n, status=s, status_message=f"{n} trouble" if s == "ERROR" else "") for n, s in pools.items()],
    )


def test_summary_and_readiness_of_each_state():
    provisioning = info_of("PROVISIONING", {"core": "RUNNING"})
    assert gke.summary(provisioning, ["core", "user"]) == "cluster olab: PROVISIONING; pools core RUNNING, user absent"
    assert gke.readiness(provisioning, ["core", "user"]) is False  # a pool may still come
    assert gke.readiness(info_of("RUNNING", {"core": "RUNNING", "user": "RECONCILING"}), ["core", "user"]) is False
    assert gke.readiness(info_of("RUNNING", {"core": "RUNNING", "user": "RUNNING_WITH_ERROR"}), ["core", "user"]) is True
    assert gke.readiness(info_of("RUNNING", {"core": "RUNNING"}), []) is True
    with pytest.raises(gke.ClusterFailed, match=r"^cluster olab has no node pool user \(pools: core\)$"):
        gke.readiness(info_of("RUNNING", {"core": "RUNNING"}), ["core", "user"])
    with pytest.raises(gke.ClusterFailed, match=r"^cluster olab is DEGRADED: nodes unhealthy$"):
        gke.readiness(info_of("DEGRADED", {}, "nodes unhealthy"), [])
    with pytest.raises(gke.ClusterFailed, match=r"^cluster olab: node pool user is ERROR: user trouble$"):
        gke.readiness(info_of("RUNNING", {"user": "ERROR"}), ["user"])
    with pytest.raises(gke.ClusterFailed, match="STOPPING"):
        gke.readiness(info_of("STOPPING", {}), [])


def test_kubeconfig_document_has_the_standard_fields():
    info = info_of("RUNNING", {}).model_copy(update={"endpoint": "34.1.2.3", "ca_certificate": fake_ca_base64()})
    doc = gke.kubeconfig_document(info, TOKEN, namespace="olab")
    name = f"gke_{PROJECT}_{LOCATION}_olab"
    assert doc["current-context"] == name
    assert doc["clusters"] == [{"name": name, "cluster": {"server": "https://34.1.2.3", "certificate-authority-data": fake_ca_base64()}}]
    assert doc["users"] == [{"name": name, "user": {"token": TOKEN}}]
    assert doc["contexts"] == [{"name": name, "context": {"cluster": name, "user": name, "namespace": "olab"}}]
    with pytest.raises(gke.GkeError, match="no endpoint or CA certificate"):
        gke.kubeconfig_document(info_of("PROVISIONING", {}), TOKEN)
    with pytest.raises(gke.GkeError, match="no access token"):
        gke.kubeconfig_document(info, "")


# ---- waiting for a cluster -------------------------------------------------------------


def test_a_provisioning_cluster_with_reconciling_pools_is_polled_until_ready(fake, client, olab_logs):
    fake.seed_cluster(
        "olab",
        [SeedPool("core", 1), SeedPool("user", 0, 0, 3, status="RECONCILING", polls=5)],
        status="PROVISIONING",
        polls=3,
        endpoint="34.89.1.2",
    )
    started = time.monotonic()
    info = wait(client, log_every=0)
    assert time.monotonic() - started < 5
    # Three answers PROVISIONING, five with the user pool reconciling, then the sixth: ready.
    assert fake.calls(fake.cluster_path("olab"), "GET") == 6
    assert info.status == "RUNNING" and [p.status for p in info.pools] == ["RUNNING", "RUNNING"]
    assert (info.endpoint, info.ca_certificate) == ("34.89.1.2", fake_ca_base64())
    assert info.pool("user").max_nodes == 3
    lines = [r.getMessage() for r in olab_logs.records if r.name == "olab"]
    assert [line.rsplit(" (", 1)[0] for line in lines] == [
        "cluster olab: PROVISIONING; pools core RUNNING, user RECONCILING",
        "cluster olab: RUNNING; pools core RUNNING, user RECONCILING",
        "cluster olab: RUNNING; pools core RUNNING, user RUNNING",
    ]


def test_progress_is_logged_at_most_every_few_seconds(fake, client, olab_logs):
    fake.seed_cluster("olab", [SeedPool("core", 1, status="PROVISIONING", polls=4)], status="PROVISIONING", polls=2)
    wait(client, ["core"], log_every=60)
    lines = [r.getMessage() for r in olab_logs.records if r.name == "olab"]
    # The first state, then (changes within the minute held back) the final one.
    assert len(lines) == 2 and lines[0].startswith("cluster olab: PROVISIONING") and "core RUNNING" in lines[1]


def test_a_cluster_in_error_fails_with_its_message(fake, client):
    fake.seed_cluster(
        "olab", [SeedPool("core", 1)], status="PROVISIONING", polls=2, then="ERROR",
        message="Insufficient regional quota to satisfy request: resource \"CPUS\"",
    )
    with pytest.raises(gke.ClusterFailed) as failed:
        wait(client, ["core"])
    assert str(failed.value) == 'cluster olab is ERROR: Insufficient regional quota to satisfy request: resource "CPUS"'
    assert fake.calls(fake.cluster_path("olab")) == 3


def test_a_node_pool_in_error_fails_with_its_message(fake, client):
    fake.seed_cluster("olab", [SeedPool("core", 1), SeedPool("user", 0, status="ERROR", message="instance template not found")])
    with pytest.raises(gke.ClusterFailed, match=r"^cluster olab: node pool user is ERROR: instance template not found$"):
        wait(client)
    assert fake.calls(fake.cluster_path("olab")) == 1


def test_waiting_times_out_clearly(fake, client):
    fake.seed_cluster("olab", [SeedPool("core", 1, status="PROVISIONING", polls=10**6)], status="PROVISIONING", polls=10**6)
    started = time.monotonic()
    with pytest.raises(gke.GkeTimeout) as timed_out:
        gke.wait_until_ready(client, PROJECT, LOCATION, "olab", ["core"], 0.5, 0.05)
    took = time.monotonic() - started
    assert str(timed_out.value) == "cluster olab: PROVISIONING; pools core PROVISIONING: not ready after 0.5s"
    assert 0.5 <= took < 3
    assert fake.calls(fake.cluster_path("olab")) >= 5
    assert not is_transient(timed_out.value)  # a task would wait as long again


# ---- API errors ------------------------------------------------------------------------


def test_permission_denied_fails_at_once_with_the_apis_message(fake, client):
    seed_running(fake)
    path = fake.cluster_path("olab")
    fake.fail(
        path, 403, times=5,
        message=f"Required 'container.clusters.get' permission(s) for 'projects/{PROJECT}/locations/{LOCATION}/clusters/olab'.",
        details=[{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "IAM_PERMISSION_DENIED", "domain": "container.googleapis.com"}],
    )
    started = time.monotonic()
    with pytest.raises(gke.GkeApiError) as denied:
        wait(client, backoff=1.0)
    assert time.monotonic() - started < 1
    assert fake.calls(path) == 1
    assert str(denied.value) == (
        f"GKE API: 403 PERMISSION_DENIED: Required 'container.clusters.get' permission(s) for "
        f"'projects/{PROJECT}/locations/{LOCATION}/clusters/olab'."
    )
    assert (denied.value.code, denied.value.status) == (403, "PERMISSION_DENIED")
    assert not is_transient(denied.value)


def test_a_missing_cluster_fails_at_once(fake, client):
    with pytest.raises(gke.GkeApiError, match=r"^GKE API: 404 NOT_FOUND: Not found: projects/olab-test/zones/europe-west2-a/clusters/nope\.$"):
        wait(client, cluster="nope")
    assert fake.calls(fake.cluster_path("nope")) == 1


@pytest.mark.parametrize("code", [503, 429, 500, 502])
def test_transient_errors_are_tried_again_then_succeed(fake, client, olab_logs, code):
    seed_running(fake)
    path = fake.cluster_path("olab")
    fake.fail(path, code, times=2)
    info = wait(client)
    assert info.status == "RUNNING"
    assert fake.calls(path) == 3
    retries = [r.getMessage() for r in olab_logs.records if r.levelno == logging.WARNING]
    assert len(retries) == 2 and all(f"GKE API: {code} " in line for line in retries)


def test_transient_errors_that_last_give_up_after_bounded_retries(fake, client):
    seed_running(fake)
    path = fake.cluster_path("olab")
    fake.fail(path, 503, times=100)
    started = time.monotonic()
    with pytest.raises(gke.GkeUnavailable) as unavailable:
        wait(client, retries=3, backoff=0.02)
    # Our retries only (the library's own are off): backoff 0.02 + 0.04 + 0.08.
    assert fake.calls(path) == 4
    assert 0.14 <= time.monotonic() - started < 2
    assert str(unavailable.value) == (
        "GKE API: 503 UNAVAILABLE: The service is currently unavailable. (get cluster olab: gave up after 4 attempts)"
    )
    assert is_transient(unavailable.value)  # a Prefect task's retry_transient may try later


def test_an_unreachable_endpoint_is_transient():
    client = gke.cluster_manager(GoogleApis(container="http://127.0.0.1:9", anonymous=True))
    with pytest.raises(gke.GkeUnavailable, match=r"^GKE API unreachable: ConnectionError: .*gave up after 3 attempts\)$"):
        gke.wait_until_ready(client, PROJECT, LOCATION, "olab", [], 5, 0.01, retries=2, backoff=0.01)


# ---- operations and resizing -----------------------------------------------------------


def test_set_pool_size_waits_for_its_operation(fake, client, olab_logs):
    seed_running(fake, user_nodes=2)
    op = gke.set_pool_size(client, PROJECT, LOCATION, "olab", "user", 3, 10, 0.01, backoff=0.01, log_every=0)
    assert fake.pool_size("olab", "user") == 3
    assert op.status == container_v1.Operation.Status.DONE
    assert op.operation_type == container_v1.Operation.Type.SET_NODE_POOL_SIZE
    assert fake.calls(fake.pool_path("olab", "user") + ":setSize", "POST") == 1
    # RUNNING to three polls, DONE to the fourth.
    assert fake.calls(f"/v1/projects/{PROJECT}/locations/{LOCATION}/operations/{op.name}") == 4
    lines = [r.getMessage() for r in olab_logs.records]
    assert any(line.startswith(f"operation {op.name} SET_NODE_POOL_SIZE ") and ": RUNNING" in line for line in lines)


def test_the_pool_keeps_its_size_until_the_operation_is_done(fake, client):
    seed_running(fake, user_nodes=2)
    request = container_v1.SetNodePoolSizeRequest(name=gke.pool_path(PROJECT, LOCATION, "olab", "user"), node_count=0)
    started = client.set_node_pool_size(request=request)
    assert started.status == container_v1.Operation.Status.RUNNING
    assert fake.pool_size("olab", "user") == 2
    pool = client.get_node_pool(name=gke.pool_path(PROJECT, LOCATION, "olab", "user"))
    assert pool.status == container_v1.NodePool.Status.RECONCILING
    # node_count 0 goes over the wire as {} (proto3 leaves zeros out): still a resize to 0.
    assert [b for m, path, b in fake.bodies if path.endswith("/nodePools/user:setSize")] == [{}]
    done = gke.wait_for_operation(client, PROJECT, LOCATION, started.name, 10, 0.01)
    assert done.status == container_v1.Operation.Status.DONE
    assert fake.pool_size("olab", "user") == 0
    info = gke.wait_until_ready(client, PROJECT, LOCATION, "olab", ["core", "user"], 5, 0.01)
    assert info.current_node_count == 1
    # GKE's NodePool keeps its creation size: there is no current size to read.
    assert info.pool("user").node_count == 2


def test_a_failed_operation_raises_its_error(fake, client):
    seed_running(fake, user_nodes=2)
    fake.fail_next_operation("Insufficient quota to satisfy the request: Quota 'CPUS' exceeded. Limit: 8.0 in region europe-west2.")
    with pytest.raises(gke.OperationFailed) as failed:
        gke.set_pool_size(client, PROJECT, LOCATION, "olab", "user", 3, 10, 0.01)
    message = str(failed.value)
    assert message.startswith("operation operation-") and " SET_NODE_POOL_SIZE " in message
    assert message.endswith(": DONE with error: Insufficient quota to satisfy the request: Quota 'CPUS' exceeded. Limit: 8.0 in region europe-west2.")
    assert fake.pool_size("olab", "user") == 2


def test_a_resize_during_another_operation_fails_at_once(fake, client):
    seed_running(fake)
    request = container_v1.SetNodePoolSizeRequest(name=gke.pool_path(PROJECT, LOCATION, "olab", "core"), node_count=2)
    running = client.set_node_pool_size(request=request)
    with pytest.raises(gke.GkeApiError) as refused:
        gke.set_pool_size(client, PROJECT, LOCATION, "olab", "user", 0, 10, 0.01)
    assert str(refused.value) == f"GKE API: 400 FAILED_PRECONDITION: Cluster is running incompatible operation {running.name}."
    assert fake.calls(fake.pool_path("olab", "user") + ":setSize") == 1


def test_an_operation_that_takes_too_long_times_out(client):
    with FakeGke(project=PROJECT, location=LOCATION, operation_polls=10**6) as slow:
        slow.seed_cluster("olab", [SeedPool("user", 1)])
        slow_client = gke.cluster_manager(GoogleApis(container=slow.url, anonymous=True))
        with pytest.raises(gke.GkeTimeout, match=r"^operation operation-\S+ SET_NODE_POOL_SIZE .*/nodePools/user: RUNNING: not done after 0.3s$"):
            gke.set_pool_size(slow_client, PROJECT, LOCATION, "olab", "user", 0, 0.3, 0.05)
        assert slow.pool_size("olab", "user") == 1


# ---- the fake itself, through the real client ------------------------------------------


def test_the_fake_creates_and_deletes_clusters_and_pools_through_operations(fake, client):
    parent = f"projects/{PROJECT}/locations/{LOCATION}"
    cluster = container_v1.Cluster(
        name="fresh",
        release_channel=container_v1.ReleaseChannel(channel=container_v1.ReleaseChannel.Channel.REGULAR),
        node_pools=[container_v1.NodePool(name="core", initial_node_count=1, config=container_v1.NodeConfig(machine_type="e2-standard-2"))],
    )
    op = client.create_cluster(parent=parent, cluster=cluster)
    assert op.operation_type == container_v1.Operation.Type.CREATE_CLUSTER
    early = gke.cluster_info(client.get_cluster(name=f"{parent}/clusters/fresh"), PROJECT)
    assert early.status == "PROVISIONING" and early.endpoint == "" and early.pools[0].status == "PROVISIONING"
    info = gke.wait_until_ready(client, PROJECT, LOCATION, "fresh", ["core"], 5, 0.01)
    assert info.endpoint and base64.b64decode(info.ca_certificate).decode() == fake_ca_pem()
    with pytest.raises(Exception, match="409"):
        client.create_cluster(parent=parent, cluster=cluster)

    pools = f"{parent}/clusters/fresh"
    op = client.create_node_pool(
        parent=pools,
        node_pool=container_v1.NodePool(name="user", autoscaling=container_v1.NodePoolAutoscaling(enabled=True, max_node_count=3)),
    )
    assert gke.cluster_info(client.get_cluster(name=pools), PROJECT).status == "RECONCILING"
    gke.wait_for_operation(client, PROJECT, LOCATION, op.name, 5, 0.01)
    listed = client.list_node_pools(parent=pools)
    assert [p.name for p in listed.node_pools] == ["core", "user"]
    assert client.get_node_pool(name=f"{pools}/nodePools/user").autoscaling.max_node_count == 3

    op = client.delete_node_pool(name=f"{pools}/nodePools/user")
    gke.wait_for_operation(client, PROJECT, LOCATION, f"{parent}/operations/{op.name}", 5, 0.01)
    assert [p.name for p in client.list_node_pools(parent=pools).node_pools] == ["core"]
    op = client.delete_cluster(name=pools)
    assert fake.cluster_status("fresh") == "STOPPING"
    gke.wait_for_operation(client, PROJECT, LOCATION, op.name, 5, 0.01)
    assert fake.cluster_status("fresh") is None


def test_the_fake_encodes_enums_as_the_request_asks(fake):
    seed_running(fake)
    url = fake.url + fake.cluster_path("olab")
    assert httpx.get(url, params={"$alt": "json;enum-encoding=int"}).json()["status"] == 2
    by_name = httpx.get(url).json()
    assert by_name["status"] == "RUNNING" and by_name["nodePools"][1]["autoscaling"]["maxNodeCount"] == 3
    assert "description" not in by_name  # fields at their defaults are left out, as GKE does


# ---- kubeconfig ------------------------------------------------------------------------


def test_write_kubeconfig_is_private_and_complete_and_never_logs_the_token(fake, client, tmp_path, olab_logs):
    seed_running(fake)
    info = wait(client)
    path = tmp_path / "kube" / "config"
    path.parent.mkdir()
    path.write_text("old: config\n")
    os.chmod(path, 0o644)
    assert gke.write_kubeconfig(path, info, TOKEN, namespace="olab") == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["config"]  # no temporary left behind
    doc = yaml.safe_load(path.read_text())
    cluster, user, context = doc["clusters"][0]["cluster"], doc["users"][0]["user"], doc["contexts"][0]
    assert cluster["server"] == "https://34.89.10.20"
    from cryptography import x509

    ca = x509.load_pem_x509_certificate(base64.b64decode(cluster["certificate-authority-data"]))
    assert ca.subject.rfc4514_string() == "CN=fake-gke-cluster-ca"
    assert user == {"token": TOKEN}
    assert doc["current-context"] == context["name"] == f"gke_{PROJECT}_{LOCATION}_olab"
    assert context["context"]["namespace"] == "olab"
    logged = "\n".join(r.getMessage() for r in olab_logs.records)
    assert "kubeconfig for cluster olab" in logged and TOKEN not in logged


def test_kubernetes_client_accepts_the_kubeconfig(fake, client, tmp_path):
    config = pytest.importorskip("kubernetes.config", reason="the kubernetes package is not installed")
    from kubernetes import client as kube

    seed_running(fake)
    path = gke.write_kubeconfig(tmp_path / "config", wait(client), TOKEN)
    configuration = kube.Configuration()
    config.load_kube_config(config_file=str(path), client_configuration=configuration)
    assert configuration.host == "https://34.89.10.20"
    assert configuration.api_key.get("BearerToken", configuration.api_key.get("authorization")) == f"Bearer {TOKEN}"


# ---- credentials -----------------------------------------------------------------------


def test_anonymous_apis_give_no_token():
    assert gke.access_token(GoogleApis(container="http://127.0.0.1:1", anonymous=True)) is None


def test_default_credentials_give_a_token_and_authorize_the_client(fake, tmp_path, monkeypatch):
    key = tmp_path / "sa.json"
    service_account_key(key, fake.token_uri, PROJECT)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    apis = GoogleApis(container=fake.url)
    assert gke.access_token(apis) == fake.access_token
    assert fake.calls("/token", "POST") == 1
    seed_running(fake)
    gke.wait_until_ready(gke.cluster_manager(apis), PROJECT, LOCATION, "olab", ["core"], 5, 0.01)
    # The client signs its own JWT with a service account's key (GAPIC clients use
    # self-signed JWTs): a bearer token, yet no second trip to the token endpoint.
    scheme, jwt = fake.authorizations[-1].split(" ")
    payload = json.loads(base64.urlsafe_b64decode(jwt.split(".")[1] + "=="))
    assert scheme == "Bearer" and payload["iss"] == f"olab@{PROJECT}.iam.gserviceaccount.com"
    assert payload["scope"] == "https://www.googleapis.com/auth/cloud-platform"
    assert fake.calls("/token") == 1


def test_missing_credentials_fail_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "absent.json"))
    with pytest.raises(gke.GkeError, match=r"^no Google credentials: .*absent\.json.*GOOGLE_APPLICATION_CREDENTIALS") as failed:
        gke.access_token(GoogleApis())
    assert "\n" not in str(failed.value)
    with pytest.raises(gke.GkeError, match="^no Google credentials"):
        gke.cluster_manager(GoogleApis())


def test_a_kubeconfig_gets_a_fresh_token_and_stays_private(fake, client, tmp_path):
    seed_running(fake)
    path = gke.write_kubeconfig(tmp_path / "config", wait(client), "old-token")
    gke.refresh_kubeconfig_token(path, "new-token")
    config = yaml.safe_load(path.read_text())
    assert config["users"][0]["user"]["token"] == "new-token" and "old-token" not in path.read_text()
    assert config["clusters"][0]["cluster"]["server"] == "https://34.89.10.20"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
