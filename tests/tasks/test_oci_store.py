"""The container store's configuration, shared by every site of an olab home: fast, no build."""

from __future__ import annotations

import json
import shutil

import pytest

from core.runner import run
from tasks.oci import engine_for, registries_conf


def test_a_sites_registry_is_added_to_the_stores_never_put_in_their_place(tmp_path):
    store = tmp_path / "containers"
    engine_for("buildah", store, ["127.0.0.1:5000"])  # a local site's build
    engine_for("buildah", store, [])  # a gke site's, in the same olab home
    engine = engine_for("buildah", store, ["127.0.0.1:5001"])  # another local site's
    text = (store / "registries.conf").read_text()
    assert text == registries_conf("", ["127.0.0.1:5000", "127.0.0.1:5001"])
    assert text.count("insecure = true") == 2
    # Nothing changed, nothing written: the file is the same one, not a new copy.
    inode = (store / "registries.conf").stat().st_ino
    engine_for("buildah", store, ["127.0.0.1:5000"])
    assert (store / "registries.conf").stat().st_ino == inode
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (./setup.sh as root): the file is checked, not podman's reading of it")
    info = json.loads(run(["podman", "info", "--format", "json"], env=engine.env).output)
    registries = info["registries"]
    assert {host: registries[host]["Insecure"] for host in ("127.0.0.1:5000", "127.0.0.1:5001")} == {
        "127.0.0.1:5000": True, "127.0.0.1:5001": True}
