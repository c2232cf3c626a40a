"""Students' bridges of two olab homes on one machine, for real (podman, its API services, the
host's routes): each home has its own container store and podman service, and both have a site
and students of the same names, which is what two test sessions (or two courses) look like.

A CI run once saw a student's server answer with another's 403 while another session ran a
class. Reproduced by hand: with networks named and labelled by site alone, one home's cleanup
removed the other home's live network (podman deletes its bridge too), then gave its subnet, its
interface name and the very address to a new bridge of its own. These tests hold olab to:
disjoint subnets and distinct interfaces whoever makes bridges at the same time, and each home
removing only its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import httpx
import pytest

from core import bridges
from core.config import load_site
from core.secrets import SecretStore
from flows.deploy_hub import deploy_hub
from flows.stop_hub import stop_hub
from tasks.local_registry import registry_login
from tasks.oci import Engine, engine_for, stop_api_socket
from tests.conftest import SiteFactory, hub_pid
from tests.tasks.conftest import missing, oci_site
from tests.tasks.test_oci import _ready

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed: run ./setup.sh as root"),
]

SITE = "twin"
PREFIX = f"olab-{SITE}"
STUDENTS = 8
TINY = "localhost/olab-test-sleep:1"


def tiny_image(engine: Engine, folder: Path) -> str:
    """An image of this machine's /bin/sleep and the libraries it loads (a few MB), so that a
    container can join a bridge and bring it up."""
    archive = folder / "sleep.tar"
    if not archive.exists():
        libraries = re.findall(r"(/\S+) \(0x", subprocess.run(["ldd", "/bin/sleep"], capture_output=True, text=True, check=True).stdout)
        with tarfile.open(archive, "w") as tar:
            for path in ["/bin/sleep", *libraries]:
                tar.add(Path(path).resolve(), arcname=path.lstrip("/"))
    if not engine.image_id(TINY):
        engine.run(["podman", "import", str(archive), TINY])
    return TINY


@pytest.fixture
def two_homes(tmp_path):
    """Two olab homes' container stores, each with its own podman API service."""
    engines = [Engine(builder="podman", store=tmp_path / name / "containers").prepare([]) for name in ("home-a", "home-b")]
    try:
        for engine in engines:
            engine.ensure_api_socket()
            tiny_image(engine, tmp_path)
        yield engines
    finally:
        for engine in engines:
            engine.remove_leftovers(PREFIX, SITE)
            stop_api_socket(engine.store)


def api_client(engine: Engine):
    import docker

    return docker.APIClient(base_url=f"unix://{engine.socket}", version="auto", timeout=120)


def every_bridge(engine: Engine) -> dict[str, tuple[IPv4Network, str, dict]]:
    """(subnet, interface, options) of every bridge network on this machine, by name, as podman
    itself reports them (one listing: other sessions may add and remove networks meanwhile)."""
    found = json.loads(engine.run(["podman", "network", "ls", "--format", "json"]))
    return {n["name"]: (IPv4Network(n["subnets"][0]["subnet"]), n["network_interface"], n.get("options") or {})
            for n in found if n["driver"] == "bridge" and n.get("subnets")}


def route_device(address: str) -> str:
    """The interface this machine sends ``address``'s traffic to (the longest prefix wins)."""
    matching = [(n.prefixlen, dev) for n, dev in bridges.host_routes() if IPv4Address(address) in n]
    return max(matching)[1] if matching else "(the default route)"


def start_student(engine: Engine, container: str, network: str) -> str:
    """A container on the student's network (its bridge comes up); returns its address."""
    engine.run(["podman", "run", "-d", "--name", container, "--network", network, "--runtime", "runc", "--stop-signal", "KILL",
                TINY, "/bin/sleep", "600"])
    return engine.run(["podman", "inspect", container, "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"]).strip()


def test_two_homes_making_bridges_at_once_get_disjoint_subnets_and_remove_only_their_own(two_homes):
    home_a, home_b = two_homes
    students = [f"{PREFIX}-s{i:02d}" for i in range(STUDENTS)]
    names = {engine.store: [bridges.network_name(c, engine.store) for c in students] for engine in two_homes}
    gate = threading.Barrier(2 * STUDENTS)

    def make(engine: Engine, network: str) -> None:
        with contextlib.closing(api_client(engine)) as client:
            gate.wait()
            bridges.make_student_network(client, network, store=str(engine.store), site=SITE)

    with ThreadPoolExecutor(2 * STUDENTS) as pool:
        for made in [pool.submit(make, e, n) for e in two_homes for n in names[e.store]]:
            made.result()

    listed = every_bridge(home_a)
    ours = {n: listed[n] for e in two_homes for n in names[e.store] if n in listed}
    assert len(ours) == 2 * STUDENTS, sorted(ours)
    assert all(options.get("isolate") == "true" for _, _, options in ours.values()), "a student's bridge is not isolated"
    subnets = [subnet for subnet, _, _ in ours.values()]
    assert len({interface for _, interface, _ in ours.values()}) == 2 * STUDENTS, ours
    assert not [(a, b) for i, a in enumerate(subnets) for b in subnets[i + 1:] if a.overlaps(b)], "two bridges share addresses"
    others = {n: v for n, v in listed.items() if n not in ours}
    for name, (subnet, interface, _) in ours.items():
        clash = [o for o, (s, i, _) in others.items() if s.overlaps(subnet) or i == interface]
        assert not clash, f"{name} ({subnet}, {interface}) clashes with {clash}"
    with bridges.held() as ledger:
        for engine in two_homes:
            for network in names[engine.store]:
                subnet, interface, _ = ours[network]
                assert ledger.entries[network] == {"subnet": str(subnet), "interface": interface, "store": str(engine.store), "site": SITE}

    # One student of each home, of the same name, on their own bridges: the host routes each
    # one's address to that one's bridge.
    first = {e.store: names[e.store][0] for e in two_homes}
    address = {e.store: start_student(e, students[0], first[e.store]) for e in two_homes}
    for engine in two_homes:
        assert route_device(address[engine.store]) == ours[first[engine.store]][1]
    assert address[home_a.store] != address[home_b.store]

    # Home b's cleanup after a hub killed outright removes its own containers and networks, and
    # nothing of home a's: a's student keeps its bridge and its route.
    removed = home_b.remove_leftovers(PREFIX, SITE)
    assert sorted(removed) == sorted([students[0], *names[home_b.store]])
    left = every_bridge(home_a)
    assert all(n in left for n in names[home_a.store]) and not any(n in left for n in names[home_b.store])
    assert route_device(address[home_a.store]) == ours[first[home_a.store]][1]
    with bridges.held() as ledger:
        assert all(n in ledger.entries for n in names[home_a.store])
        assert not any(n in ledger.entries for n in names[home_b.store])

    # A new bridge of home b stays clear of home a's, which still carries traffic.
    again = bridges.network_name(f"{PREFIX}-late", home_b.store)
    client = {e.store: api_client(e) for e in two_homes}
    late = bridges.make_student_network(client[home_b.store], again, store=str(home_b.store), site=SITE)
    assert not any(late.subnet.overlaps(ours[n][0]) or late.interface == ours[n][1] for n in names[home_a.store])

    # A server stopped: its network, its bridge and its ledger entry go.
    bridges.remove_student_network(client[home_b.store], again)
    assert again not in every_bridge(home_b) and not Path("/sys/class/net", late.interface).exists()
    home_a.run(["podman", "rm", "-f", "-t", "0", students[0]])
    for network in names[home_a.store]:
        bridges.remove_student_network(client[home_a.store], network)
    with bridges.held() as ledger:
        assert not any(e["store"] in (str(home_a.store), str(home_b.store)) for e in ledger.entries.values())
    assert not Path("/sys/class/net", ours[first[home_a.store]][1]).exists(), "the stopped server's bridge stays up"


def test_two_homes_hubs_each_reach_only_their_own_student(user_image, registry_address, olab_home, tmp_path, monkeypatch,
                                                          stop_hubs):
    """The real thing: two hubs of sites named alike, in two olab homes, each with a student1
    started at the same moment. Each student's server is on a bridge of its own and answers
    through its own hub's proxy only; one home's hub killed outright and cleaned up after
    leaves the other home's student running and reachable."""
    _, image = user_image
    homes = {"a": olab_home, "b": tmp_path / "home-b"}
    paths = {h: oci_site(SiteFactory(tmp_path / h), SITE, registry_address) for h in homes}
    stop_hubs.extend(paths.values())
    engines = {h: engine_for("buildah", home / "containers", [registry_address]) for h, home in homes.items()}
    # Home b's store gets the image from the session's registry, with olab's credential for it (home a's).
    engines["b"].ensure_local(image.pinned, registry_login(homes["a"] / "containers"))

    @contextlib.contextmanager
    def in_home(h):
        with monkeypatch.context() as patch:
            patch.setenv("OLAB_HOME", str(homes[h]))
            yield

    apis: dict[str, httpx.Client] = {}
    try:
        sites = {}
        for h in homes:
            with in_home(h):
                hub = deploy_hub(site=str(paths[h]), image=image, check=False)
                sites[h] = load_site(str(paths[h]))
            token = SecretStore(sites[h].paths.secrets).load().api_token.get_secret_value()
            apis[h] = httpx.Client(base_url=hub.url, headers={"Authorization": f"token {token}"}, timeout=120)
        with ThreadPoolExecutor(len(homes)) as pool:
            for started in [pool.submit(_ready, apis[h], "student1") for h in homes]:
                started.result()

        container = f"{PREFIX}-student1"
        network, address, view = {}, {}, {}
        for h, engine in engines.items():
            inspect = engine.run(["podman", "inspect", container, "--format",
                                  "{{range $net, $s := .NetworkSettings.Networks}}{{$net}} {{$s.IPAddress}}{{end}}"])
            network[h], address[h] = inspect.split()
            view[h] = every_bridge(engine)[network[h]]
        assert network["a"] != network["b"], "two homes' students share one network"
        assert not view["a"][0].overlaps(view["b"][0]) and view["a"][1] != view["b"][1], view
        for h in homes:
            assert route_device(address[h]) == view[h][1], f"home {h}'s student is not routed to its own bridge"
            status = apis[h].get("/user/student1/api/status")
            assert status.status_code == 200 and status.headers.get("X-JupyterHub-Version"), (h, status.status_code, status.headers)
            apis[h].put("/user/student1/api/contents/home.txt",
                        json={"type": "file", "format": "text", "content": f"home {h}"}).raise_for_status()
            assert (sites[h].paths.homes / "student1" / "home.txt").read_text() == f"home {h}"

        # Home b's hub is killed outright, and olab's stop cleans up after it: home a's student
        # keeps its bridge and still answers through home a's hub.
        pid = hub_pid(sites["b"])
        os.kill(pid, signal.SIGKILL)
        with in_home("b"):
            stop_hub(site=str(paths["b"]))
        assert container not in engines["b"].run(["podman", "ps", "-a", "--format", "{{.Names}}"]).split()
        assert network["b"] not in every_bridge(engines["a"]) and network["a"] in every_bridge(engines["a"])
        assert route_device(address["a"]) == view["a"][1]
        assert apis["a"].get("/user/student1/api/status").status_code == 200

        apis["a"].delete("/hub/api/users/student1/server").raise_for_status()
        for _ in range(240):
            if not apis["a"].get("/hub/api/users/student1").json()["servers"]:
                break
            time.sleep(0.25)
        assert network["a"] not in every_bridge(engines["a"]), "a stopped server's network stays"
        with bridges.held() as ledger:
            assert not {network["a"], network["b"]} & set(ledger.entries)
    finally:
        for api in apis.values():
            api.close()
        with in_home("b"):
            stop_hub(site=str(paths["b"]))
        engines["b"].remove_leftovers(PREFIX, SITE)
        stop_api_socket(engines["b"].store)
