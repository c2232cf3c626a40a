"""Fixtures for the tests that need olab's container tools: one registry and one real
olab-user image per test session, shared by every module that renders, spawns or tests it.

These need buildah, podman, runc, docker-registry and debootstrap, which ./setup.sh installs
(and .ci/run runs it); modules that use them skip with that reason where they are missing.
"""

from __future__ import annotations

import shutil

import pytest

from core.config import olab_home
from flows.build_image import build_image
from tasks.local_registry import stop_local_registry
from tasks.oci import stop_api_socket
from tests.conftest import SiteFactory, free_port

NEEDED = ("buildah", "podman", "runc", "docker-registry", "debootstrap")
missing = [tool for tool in NEEDED if not shutil.which(tool)]


def oci_site(make_site, name, registry, **sections):
    """A site file whose image is built with buildah on an offline Debian base."""
    image = {"builder": "buildah", "base_image": "debootstrap:bookworm", "registry": registry}
    image.update(sections.pop("image", {}))
    return make_site(name, image=image, **sections)


@pytest.fixture(scope="session")
def registry_address(olab_home):
    """olab's registry on a free port, for the whole session (so the image is pushed once)."""
    address = f"127.0.0.1:{free_port()}"
    yield address
    store = olab_home / "containers"
    stop_local_registry(store)
    stop_api_socket(store)


@pytest.fixture(scope="session")
def user_image(tmp_path_factory, registry_address, prefect_server):
    """The real olab-user image, built once per session (later modules reuse it unchanged)."""
    factory = SiteFactory(tmp_path_factory.mktemp("oci-user"))
    path = oci_site(factory, "ociuser", registry_address)
    return path, build_image(site=str(path))
