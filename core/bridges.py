"""Each student's own bridge on the local target: a subnet and an interface name that no other
bridge on this machine has, whichever olab home, site or podman made the other.

Why olab chooses them and not podman: podman (4.3, CNI) takes the first free /24 from 10.89.0.0
and the first free ``cni-podmanN`` under a lock on its network config folder, free among the
networks *that folder* holds and the addresses up on the host. Every olab store of one account
shares that folder (/etc/cni/net.d for root), but a store whose podman keeps its networks
elsewhere (netavark's /etc/containers/networks: the backend is fixed per store when the store is
made, so a machine that gained netavark has both) sees no other store's bridge until it carries
traffic, and can hand out a subnet twice: the host then routes one site's traffic to another
site's container. So olab picks each bridge itself, under one lock for the whole machine,
clear of every network its podman lists, every network routed on the host and every bridge
in the ledger of all olab homes; podman still refuses a subnet or name its folder holds.

Names matter as much: podman's networks belong to the machine, not to a store, so a network
named after the container alone (``olab-<site>-<user>``) is the same network for a site of the
same name in another olab home, which would then join it, remove it under the other's student
(podman deletes the bridge), and hand its subnet to a new bridge. Each network's name and
labels therefore carry its store's tag.

The ledger (``bridges.json`` beside ``bridges.lock`` in /run/olab for root: bridges do not
outlive a boot, and neither does the ledger) maps each network to its subnet, interface, store
and site; an entry is written when its network is made and dropped when it is removed, and
entries whose olab home is gone, or whose network its own podman no longer lists, are dropped
at the next claim.

Standard library only: the local hub runs this module's source (its settings carry it, as they
carry the LTI admin rule), so the hub's spawner and olab's cleanup share one code and one ledger.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import json
import os
import socket
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from ipaddress import IPv4Network
from pathlib import Path
from typing import NamedTuple

# Where podman starts its own bridges' subnets; a /26 holds a server and its gateway many times
# over (host-local IPAM moves on at each restart), and the /16 holds 1024 of them.
POOL = IPv4Network("10.89.0.0/16")
PREFIX = 26
# A bridge's interface is named for its slot in the pool: a subnet no network holds is a name
# no olab network holds, even one whose ledger entry a reboot has wiped. (Linux: <= 15 bytes.)
INTERFACE_PREFIX = "olab-br"
SITE_LABEL = "olab-site"
STORE_LABEL = "olab-store"


class Bridge(NamedTuple):
    subnet: IPv4Network
    interface: str


class NoFreeSubnet(RuntimeError):
    """Every slot of the pool overlaps a network in use on this machine."""


# Decisions over plain data.


def slots(pool: IPv4Network = POOL, prefix: int = PREFIX) -> Iterator[Bridge]:
    for index, subnet in enumerate(pool.subnets(new_prefix=prefix)):
        yield Bridge(subnet, f"{INTERFACE_PREFIX}{index}")


def slot_of(subnet: IPv4Network, pool: IPv4Network = POOL, prefix: int = PREFIX) -> Bridge | None:
    """The pool's bridge for ``subnet``, if it is one of the pool's slots."""
    if subnet.prefixlen != prefix or not subnet.subnet_of(pool):
        return None
    index = (int(subnet.network_address) - int(pool.network_address)) >> (32 - prefix)
    return Bridge(subnet, f"{INTERFACE_PREFIX}{index}")


def next_free_bridge(
    used_subnets: Iterable[IPv4Network],
    used_interfaces: Iterable[str],
    pool: IPv4Network = POOL,
    prefix: int = PREFIX,
) -> Bridge:
    """The pool's first slot whose subnet overlaps none in use and whose name no interface has."""
    used = [n for n in used_subnets if n.version == 4]
    taken = set(used_interfaces)
    for bridge in slots(pool, prefix):
        if bridge.interface not in taken and not any(bridge.subnet.overlaps(n) for n in used):
            return bridge
    raise NoFreeSubnet(
        f"no free /{prefix} in {pool} for a student's bridge: every one overlaps a network of this machine "
        "(stop some servers, or remove podman networks nobody uses: podman network prune)"
    )


def routed_networks(route_table: str) -> list[tuple[IPv4Network, str]]:
    """(network, interface) of each route in /proc/net/route's text (hexadecimal, in host byte
    order) but the default one: an address up on an interface routes its subnet, so these are
    podman's "used on the host" and also what the host already sends elsewhere."""
    found = []
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        destination, mask = (socket.inet_ntoa(struct.pack("<I", int(fields[i], 16))) for i in (1, 7))
        if mask != "0.0.0.0":
            found.append((IPv4Network(f"{destination}/{mask}", strict=False), fields[0]))
    return found


def store_tag(store: Path | str) -> str:
    """A short name for one olab home's container store, in its networks' names and labels."""
    return hashlib.sha256(str(store).encode()).hexdigest()[:12]


def network_name(container: str, store: Path | str) -> str:
    return f"{container}-{store_tag(store)}"


def podman_subnets(networks: Iterable[Mapping]) -> dict[str, list[IPv4Network]]:
    """Each network's IPv4 subnets, from the Docker-compatible API's network list."""
    found: dict[str, list[IPv4Network]] = {}
    for network in networks:
        configs = (network.get("IPAM") or {}).get("Config") or []
        subnets = [ipaddress.ip_network(c["Subnet"], strict=False) for c in configs if c.get("Subnet")]
        found[network["Name"]] = [s for s in subnets if s.version == 4]
    return found


class Ledger:
    """Every olab home's students' bridges on this machine: network name -> its subnet,
    interface, store and site (plain JSON values)."""

    def __init__(self, entries: dict[str, dict]):
        self.entries = entries

    def claim(
        self,
        network: str,
        *,
        store: str,
        site: str,
        listed: Mapping[str, list[IPv4Network]],
        routed: Iterable[IPv4Network],
        interfaces: Iterable[str],
        store_exists: Callable[[str], bool] = os.path.isdir,
    ) -> Bridge:
        """The bridge ``network`` (of ``store``'s ``site``) gets, entered in the ledger.

        ``listed``: every network the store's podman lists, with its subnets (a listed
        ``network`` is kept as it is); ``routed`` and ``interfaces``: the host's.
        """
        for name, entry in list(self.entries.items()):
            mine = entry["store"] == store and name not in listed and name != network
            if mine or not store_exists(entry["store"]):
                del self.entries[name]
        if listed.get(network):
            subnet = listed[network][0]
            known = self.entries.get(network, {}).get("interface", "")
            bridge = slot_of(subnet) or Bridge(subnet, known)
        else:
            used = [s for subnets in listed.values() for s in subnets] + list(routed)
            used += [IPv4Network(e["subnet"]) for name, e in self.entries.items() if name != network]
            names = list(interfaces) + [e["interface"] for name, e in self.entries.items() if name != network]
            bridge = next_free_bridge(used, names)
        self.entries[network] = {"subnet": str(bridge.subnet), "interface": bridge.interface, "store": store, "site": site}
        return bridge

    def free(self, networks: Iterable[str]) -> list[str]:
        return [n for n in networks if self.entries.pop(n, None) is not None]

    def free_site(self, store: str, site: str) -> list[str]:
        return self.free([n for n, e in self.entries.items() if e["store"] == store and e["site"] == site])


# The machine's ledger, and the bridges made through a Docker-compatible API.


def ledger_dir() -> Path:
    """One for the machine (root's podman); rootless podman's bridges are the account's own."""
    if os.geteuid() == 0:
        return Path("/run/olab")
    return Path(os.environ.get("XDG_RUNTIME_DIR") or Path.home() / ".cache") / "olab"


@contextmanager
def held(folder: Path | None = None) -> Iterator[Ledger]:
    """The ledger under the machine's lock (an flock: released however its holder ends);
    written back when the block ends normally and changed it."""
    folder = folder or ledger_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bridges.json"
    with open(folder / "bridges.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            entries = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            entries = {}
        before = json.dumps(entries, sort_keys=True)
        ledger = Ledger(entries)
        yield ledger
        if json.dumps(ledger.entries, sort_keys=True) != before:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".bridges.", suffix=".tmp")
            with os.fdopen(fd, "w") as out:
                json.dump(ledger.entries, out, indent=1, sort_keys=True)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)


def host_routes() -> list[tuple[IPv4Network, str]]:
    return routed_networks(Path("/proc/net/route").read_text())


def host_interfaces() -> list[str]:
    return os.listdir("/sys/class/net")


def make_student_network(client, network: str, *, store: str, site: str, folder: Path | None = None) -> Bridge:
    """Make ``network`` through ``client`` (docker-py's APIClient on podman's socket), unless it
    exists, on a bridge chosen under the machine's lock: isolated (no traffic between two such
    bridges) and labelled with its site and store, for the cleanup after a hub killed outright."""
    with held(folder) as ledger:
        listed = podman_subnets(client.networks())
        bridge = ledger.claim(network, store=store, site=site, listed=listed, routed=[n for n, _ in host_routes()],
                              interfaces=host_interfaces())
        if not listed.get(network):
            client.create_network(
                network, driver="bridge", check_duplicate=True,
                options={"isolate": "true", "com.docker.network.bridge.name": bridge.interface},
                ipam={"Driver": "default", "Config": [{"Subnet": str(bridge.subnet)}]},
                labels={SITE_LABEL: site, STORE_LABEL: store_tag(store)},
            )
    return bridge


def remove_student_network(client, network: str, folder: Path | None = None) -> None:
    """Remove ``network`` (already gone is fine) and then its ledger entry."""
    try:
        client.remove_network(network)
    except Exception as exc:  # docker.errors.NotFound, without importing docker here
        if getattr(getattr(exc, "response", None), "status_code", None) != 404:
            raise
    with held(folder) as ledger:
        ledger.free([network])
