"""The Terraform modules of the gke target: formatted, shaped as the seed's node pools, and valid.

Fast: no cloud, no server. The variables' types and validations are evaluated by terraform itself
(no provider needed). `terraform validate` needs the google provider; where it cannot be
installed (offline) those tests are skipped, saying what terraform printed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import hcl2
import pytest

from core.config import load_site

from tests.conftest import REPO

MODULES = REPO / "terraform"
GKE = MODULES / "gke"
BOOTSTRAP = MODULES / "bootstrap"

GKE_VARIABLES = {
    "project",
    "region",
    "zone",
    "cluster_name",
    "release_channel",
    "core_pool",
    "user_pool",
    "registry_repository",
    "static_ip_name",
    "labels",
    "cluster",
}
GKE_OUTPUTS = {
    "cluster_name",
    "location",
    "endpoint",
    "ca_certificate",
    "static_ip",
    "static_ip_name",
    "registry",
    "core_pool",
    "user_pool",
    "workload_pool",
}

# What terraform (or tofu) prints when it cannot fetch a provider, as opposed to a broken module.
PROVIDER_FAILURES = (
    "Failed to query available provider packages",
    "Failed to install provider",
    "Failed to resolve provider packages",
    "could not connect to registry",
)
INIT_TIMEOUT_SECONDS = 120


def terraform_binary() -> str | None:
    found = shutil.which("terraform")
    if found:
        return found
    fallback = Path("/usr/local/bin/terraform")
    return str(fallback) if fallback.is_file() and os.access(fallback, os.X_OK) else None


@pytest.fixture
def terraform() -> str:
    binary = terraform_binary()
    if binary is None:
        pytest.skip("terraform is neither on PATH nor at /usr/local/bin/terraform")
    return binary


def parse_module(folder: Path) -> dict[str, list]:
    """Every top-level block of a module's .tf files, by block type, as python-hcl2 reads them."""
    options = None
    if hasattr(hcl2, "SerializationOptions"):
        # python-hcl2 8 keeps quotes and block markers unless told not to; older ones never did.
        options = hcl2.SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)
    merged: dict[str, list] = {}
    files = sorted(folder.glob("*.tf"))
    assert files, f"no .tf files in {folder}"
    for path in files:
        with path.open(encoding="utf-8") as handle:
            tree = hcl2.load(handle, serialization_options=options) if options else hcl2.load(handle)
        for block_type, blocks in tree.items():
            merged.setdefault(block_type, []).extend(blocks)
    return merged


def named(blocks: list[dict]) -> dict[str, dict]:
    """`variable "x" {...}` blocks, by name."""
    return {name: body for block in blocks for name, body in block.items()}


def resources(module: dict, kind: str) -> dict[str, dict]:
    """The module's resources of one type, by name."""
    found: dict[str, dict] = {}
    for block in module.get("resource", []):
        found.update(block.get(kind, {}))
    return found


def one(body: dict, block: str) -> dict:
    """A nested block that appears exactly once (python-hcl2 gives nested blocks as lists)."""
    value = body.get(block)
    assert isinstance(value, list) and len(value) == 1, f"expected one {block} block, found {value!r}"
    return value[0]


@pytest.fixture(scope="module")
def gke() -> dict:
    return parse_module(GKE)


@pytest.fixture(scope="module")
def bootstrap() -> dict:
    return parse_module(BOOTSTRAP)


# --- formatting -------------------------------------------------------------------------------


def test_modules_are_formatted(terraform):
    result = subprocess.run(
        [terraform, "fmt", "-check", "-recursive", "-diff", "-no-color", str(MODULES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"terraform fmt would change:\n{result.stdout}{result.stderr}"


# --- the gke module's shape -------------------------------------------------------------------


def test_user_pool_is_the_seeds(gke):
    pools = resources(gke, "google_container_node_pool")
    user = pools["user"]
    config = one(user, "node_config")
    assert config["labels"] == {"hub.jupyter.org/node-purpose": "user"}
    assert config["taint"] == [{"key": "hub.jupyter.org_dedicated", "value": "user", "effect": "NO_SCHEDULE"}]
    assert config["machine_type"] == "${var.user_pool.machine_type}"
    assert config["preemptible"] == "${var.user_pool.preemptible}"
    assert one(config, "workload_metadata_config") == {"mode": "GKE_METADATA"}
    autoscaling = one(user, "autoscaling")
    assert autoscaling["min_node_count"] == "${var.user_pool.min_nodes}"
    assert autoscaling["max_node_count"] == "${var.user_pool.max_nodes}"
    # The autoscaler owns the size: a fixed node_count would fight it on every apply.
    assert "node_count" not in user


def test_core_pool_is_labelled_core_and_untainted(gke):
    core = resources(gke, "google_container_node_pool")["core"]
    config = one(core, "node_config")
    assert config["labels"] == {"hub.jupyter.org/node-purpose": "core"}
    assert "taint" not in config
    assert config["machine_type"] == "${var.core_pool.machine_type}"
    assert one(core, "autoscaling") == {
        "min_node_count": "${var.core_pool.min_nodes}",
        "max_node_count": "${var.core_pool.max_nodes}",
    }


def test_pools_are_separate_from_the_cluster(gke):
    clusters = resources(gke, "google_container_cluster")
    assert len(clusters) == 1
    (cluster_name, cluster), = clusters.items()
    assert "node_pool" not in cluster, "pools inside the cluster resource cannot be removed on their own"
    assert cluster["remove_default_node_pool"] is True
    assert cluster["initial_node_count"] == 1
    assert cluster["deletion_protection"] is False
    assert cluster["location"] in ("${local.location}", "${coalesce(var.zone, var.region)}")
    pools = resources(gke, "google_container_node_pool")
    assert set(pools) == {"core", "user"}
    for pool in pools.values():
        assert pool["cluster"] == f"${{google_container_cluster.{cluster_name}[0].name}}"
        assert pool["location"] == f"${{google_container_cluster.{cluster_name}[0].location}}"


def test_cluster_and_pools_exist_only_while_var_cluster(gke):
    # The weekend shutdown's destroy mode plans cluster = false: pools and cluster go, the
    # registry and the hub's address stay (their DNS record and pinned images with them).
    counted = {**resources(gke, "google_container_cluster"), **resources(gke, "google_container_node_pool")}
    assert len(counted) == 3 and all(r["count"] == "${var.cluster ? 1 : 0}" for r in counted.values())
    for kind in ("google_artifact_registry_repository", "google_compute_global_address"):
        assert all("count" not in r for r in resources(gke, kind).values())
    assert named(gke["variable"])["cluster"]["default"] is True
    moved = [(m["from"], m["to"]) for m in gke.get("moved", [])]
    assert ("${google_container_cluster.olab}", "${google_container_cluster.olab[0]}") in moved or \
        ("google_container_cluster.olab", "google_container_cluster.olab[0]") in moved, moved


def test_cluster_has_workload_identity_and_release_channel(gke):
    (cluster,) = resources(gke, "google_container_cluster").values()
    assert one(cluster, "workload_identity_config") == {"workload_pool": "${var.project}.svc.id.goog"}
    assert one(cluster, "release_channel") == {"channel": "${var.release_channel}"}
    assert cluster["resource_labels"] == "${var.labels}"


def test_zone_or_region_decides_the_location(gke):
    locals_ = {k: v for block in gke.get("locals", []) for k, v in block.items()}
    assert locals_.get("location") == "${coalesce(var.zone, var.region)}"
    zone = named(gke["variable"])["zone"]
    assert zone["default"] is None


def test_registry_and_global_address(gke):
    (repository,) = resources(gke, "google_artifact_registry_repository").values()
    assert repository["format"] == "DOCKER"
    assert repository["location"] == "${var.region}"
    assert repository["repository_id"] == "${var.registry_repository}"
    (address,) = resources(gke, "google_compute_global_address").values()
    assert address["name"] == "${var.static_ip_name}"
    assert not resources(gke, "google_compute_address"), "a ManagedCertificate ingress needs a global address"


def test_backend_is_partial_gcs_and_provider_pinned(gke):
    (settings,) = gke["terraform"]
    assert settings["backend"] == [{"gcs": {}}], "bucket and prefix come from olab's backend config file"
    assert settings["required_version"] == ">= 1.5"
    (providers,) = settings["required_providers"]
    assert providers["google"] == {"source": "hashicorp/google", "version": "~> 6.0"}


def test_interface_variables_and_outputs(gke):
    variables = named(gke["variable"])
    assert set(variables) == GKE_VARIABLES
    assert set(named(gke["output"])) == GKE_OUTPUTS
    for pool in ("core_pool", "user_pool"):
        # python-hcl2 7 writes the object type as JSON, 8 as HCL: compare them bare.
        bare = re.sub(r'[\s"]', "", variables[pool]["type"]).replace(":", "=")
        assert bare == "${object({machine_type=string,min_nodes=number,max_nodes=number,preemptible=bool})}"
    assert variables["labels"]["default"] == {}
    assert "RAPID" in json.dumps(variables["release_channel"]["validation"])
    outputs = named(gke["output"])
    assert outputs["registry"]["value"].endswith(
        "-docker.pkg.dev/${var.project}/${google_artifact_registry_repository.images.repository_id}"
    )
    assert "sensitive" not in outputs["ca_certificate"], "the cluster CA is public; olab reads it from the output"


def test_example_site_gives_the_seeds_user_pool():
    site = load_site(str(REPO / "sites" / "example-gke.yaml"))
    gke = site.config.gke
    assert gke is not None
    assert gke.user_pool.machine_type == "e2-standard-2"
    assert (gke.user_pool.min_nodes, gke.user_pool.max_nodes) == (0, 3)
    assert gke.user_pool.preemptible is False
    assert gke.zone is not None, "the example site is zonal, olab's default"
    assert gke.release_channel in ("RAPID", "REGULAR", "STABLE")


# --- the bootstrap module ---------------------------------------------------------------------


def test_bootstrap_makes_a_guarded_state_bucket_with_local_state(bootstrap):
    (settings,) = bootstrap["terraform"]
    assert "backend" not in settings, "the bootstrap's state cannot live in the bucket it makes"
    assert set(named(bootstrap["variable"])) == {"project", "region", "bucket_name"}
    assert set(named(bootstrap["output"])) == {"bucket"}
    (bucket,) = resources(bootstrap, "google_storage_bucket").values()
    assert bucket["name"] == "${var.bucket_name}"
    assert one(bucket, "versioning") == {"enabled": True}
    assert bucket["uniform_bucket_level_access"] is True
    assert bucket["public_access_prevention"] == "enforced"
    assert bucket["force_destroy"] is False


# --- terraform itself -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def plugin_cache(tmp_path_factory) -> Path:
    """One provider download per session (where there is a network), outside the repository."""
    cache = Path(os.environ.get("TF_PLUGIN_CACHE_DIR") or tmp_path_factory.mktemp("plugin-cache"))
    cache.mkdir(parents=True, exist_ok=True)
    return cache


@pytest.fixture
def tf_env(tmp_path, plugin_cache) -> dict[str, str]:
    return {
        **os.environ,
        "TF_IN_AUTOMATION": "1",
        "TF_INPUT": "0",
        "CHECKPOINT_DISABLE": "1",
        "TF_DATA_DIR": str(tmp_path / "tf-data"),
        "TF_PLUGIN_CACHE_DIR": str(plugin_cache),
    }


def provider_error(output: str, phrase: str) -> str:
    """Terraform's paragraph about the failed download, on one line."""
    paragraphs = output[output.index(phrase) :].split("\n\n")
    return " ".join(" ".join(paragraphs[:2]).split())[:400]


def run(terraform: str, folder: Path, env: dict[str, str], *args: str, timeout: int = 60):
    return subprocess.run(
        [terraform, f"-chdir={folder}", *args, "-no-color"],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.mark.parametrize("module", ["gke", "bootstrap"])
def test_module_validates(terraform, tmp_path, tf_env, module):
    # A copy, so neither .terraform nor a lock file lands in the repository.
    work = tmp_path / module
    shutil.copytree(MODULES / module, work)
    init = run(terraform, work, tf_env, "init", "-backend=false", "-input=false", timeout=INIT_TIMEOUT_SECONDS)
    output = init.stdout + init.stderr
    if init.returncode != 0:
        cannot_fetch = [text for text in PROVIDER_FAILURES if text in output]
        if cannot_fetch and "problems with the configuration" not in output:
            pytest.skip(f"the google provider cannot be installed: terraform init printed: {provider_error(output, cannot_fetch[0])}")
        pytest.fail(f"terraform init failed in {module}:\n{output}")
    result = run(terraform, work, tf_env, "validate")
    assert result.returncode == 0, f"terraform validate of {module}:\n{result.stdout}{result.stderr}"


def plan_variables(terraform: str, tmp_path: Path, env: dict[str, str], values: dict):
    """Plan a module made of the gke module's variables.tf alone: terraform evaluates their
    types and validations with no provider to download."""
    work = tmp_path / "variables-only"
    work.mkdir(exist_ok=True)
    shutil.copy(GKE / "variables.tf", work / "variables.tf")
    (work / "location.tf").write_text('output "location" {\n  value = coalesce(var.zone, var.region)\n}\n')
    (work / "site.auto.tfvars.json").write_text(json.dumps(values))
    init = run(terraform, work, env, "init", "-input=false", timeout=INIT_TIMEOUT_SECONDS)
    assert init.returncode == 0, init.stdout + init.stderr
    return run(terraform, work, env, "plan", "-input=false", "-refresh=false", "-lock=false")


def site_variables() -> dict:
    """The example site's variables as olab renders them for the module."""
    from targets.gke import terraform_variables

    return terraform_variables(load_site(str(REPO / "sites" / "example-gke.yaml")))


def test_variables_accept_the_example_site(terraform, tmp_path, tf_env):
    # Both sides of the contract: what olab renders is what the module declares and accepts.
    values = site_variables()
    assert set(values) <= GKE_VARIABLES
    result = plan_variables(terraform, tmp_path, tf_env, values)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f'location = "{values["zone"]}"' in result.stdout


def test_null_zone_means_a_regional_cluster(terraform, tmp_path, tf_env):
    result = plan_variables(terraform, tmp_path, tf_env, {**site_variables(), "zone": None})
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'location = "europe-west2"' in result.stdout


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"release_channel": "FAST"}, "release_channel must be RAPID, REGULAR or STABLE"),
        ({"zone": "europe-west2"}, "zone must be a zone name"),
        (
            {"user_pool": {"machine_type": "e2-standard-2", "min_nodes": 4, "max_nodes": 3, "preemptible": False}},
            "user_pool needs 0 <= min_nodes <= max_nodes",
        ),
    ],
)
def test_variables_refuse_bad_values(terraform, tmp_path, tf_env, change, message):
    result = plan_variables(terraform, tmp_path, tf_env, {**site_variables(), **change})
    assert result.returncode != 0
    assert message in " ".join((result.stdout + result.stderr).split())
