"""Students' bridges on the local target: which subnet and interface a new one gets, and the
machine's ledger of them (core/bridges.py), without podman: a ledger folder of the test's own."""

from __future__ import annotations

import json
import subprocess
import sys
from ipaddress import IPv4Network, ip_network
from pathlib import Path

import pytest

from core import bridges
from core.bridges import Bridge, Ledger, NoFreeSubnet, next_free_bridge, routed_networks, slot_of, slots

NET = IPv4Network


def test_a_new_bridge_takes_the_first_slot_clear_of_every_network_and_interface():
    assert next_free_bridge([], []) == Bridge(NET("10.89.0.0/26"), "olab-br0")
    # podman's own first network (10.89.0.0/24) covers four slots.
    assert next_free_bridge([NET("10.89.0.0/24"), NET("10.88.0.0/16")], []) == Bridge(NET("10.89.1.0/26"), "olab-br4")
    # An interface of that name already up (even without an address) is skipped with its slot.
    assert next_free_bridge([], ["lo", "olab-br0"]) == Bridge(NET("10.89.0.64/26"), "olab-br1")
    # A network that only partly overlaps a slot takes it out too; IPv6 networks are no obstacle.
    assert next_free_bridge([NET("10.89.0.8/29"), ip_network("fd00::/64")], []) == Bridge(NET("10.89.0.64/26"), "olab-br1")


def test_a_full_pool_says_so_in_one_line():
    with pytest.raises(NoFreeSubnet) as info:
        next_free_bridge([NET("10.0.0.0/8")], [])
    assert "\n" not in str(info.value) and "10.89.0.0/16" in str(info.value)


def test_every_slot_has_its_own_subnet_and_a_valid_interface_name():
    all_slots = list(slots())
    assert len(all_slots) == 1024
    assert len({b.subnet for b in all_slots}) == len({b.interface for b in all_slots}) == 1024
    assert max(len(b.interface) for b in all_slots) <= 15  # Linux's IFNAMSIZ - 1
    assert all(slot_of(b.subnet) == b for b in all_slots)
    assert slot_of(NET("10.89.0.0/24")) is None and slot_of(NET("10.90.0.0/26")) is None


ROUTES = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
cni-podman0\t0000580A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
olab-br3\tC000590A\t00000000\t0001\t0\t0\t0\tC0FFFFFF\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
"""


def test_the_hosts_routes_but_the_default_one_are_networks_in_use():
    assert routed_networks(ROUTES) == [
        (NET("10.88.0.0/16"), "cni-podman0"), (NET("10.89.0.192/26"), "olab-br3"), (NET("192.0.2.0/24"), "eth0"),
    ]


def test_each_olab_home_names_its_networks_apart():
    a, b = Path("/srv/a/containers"), Path("/srv/b/containers")
    assert bridges.store_tag(a) == bridges.store_tag(Path("/srv/a/containers")) != bridges.store_tag(b)
    assert bridges.network_name("olab-twin-ann", a) != bridges.network_name("olab-twin-ann", b)
    assert bridges.network_name("olab-twin-ann", a).startswith("olab-twin-ann-")


def test_podmans_network_list_gives_each_networks_ipv4_subnets():
    listed = [
        {"Name": "bridge", "IPAM": {"Config": [{"Subnet": "10.88.0.0/16", "Gateway": "10.88.0.1"}]}},
        {"Name": "dual", "IPAM": {"Config": [{"Subnet": "fd00::/64"}, {"Subnet": "10.89.7.0/24"}]}},
        {"Name": "macvlan-dhcp", "IPAM": {"Config": []}},
        {"Name": "none", "IPAM": None},
    ]
    assert bridges.podman_subnets(listed) == {
        "bridge": [NET("10.88.0.0/16")], "dual": [NET("10.89.7.0/24")], "macvlan-dhcp": [], "none": [],
    }


def made(ledger: Ledger, store: str) -> dict[str, list[IPv4Network]]:
    """What ``store``'s podman lists once the networks the ledger gave it are made."""
    return {name: [NET(e["subnet"])] for name, e in ledger.entries.items() if e["store"] == store}


def _claim(ledger: Ledger, network: str, store: str, listed=None, **kwargs) -> Bridge:
    return ledger.claim(network, store=store, site="twin", listed=made(ledger, store) if listed is None else listed,
                        routed=kwargs.pop("routed", []), interfaces=kwargs.pop("interfaces", []),
                        store_exists=kwargs.pop("store_exists", lambda s: True))


def test_two_homes_with_a_site_and_student_of_one_name_get_two_bridges():
    ledger = Ledger({})
    first = _claim(ledger, "olab-twin-ann-aaa", "/a", routed=[NET("10.88.0.0/16")])
    # The other home's podman lists none of the first's networks (another config folder): the ledger keeps them apart.
    second = _claim(ledger, "olab-twin-ann-bbb", "/b")
    assert first != second and not first.subnet.overlaps(second.subnet) and first.interface != second.interface
    assert ledger.entries["olab-twin-ann-bbb"] == {"subnet": str(second.subnet), "interface": second.interface, "store": "/b", "site": "twin"}


def test_a_listed_network_keeps_its_bridge_and_stale_entries_go():
    ledger = Ledger({
        "gone-of-a": {"subnet": "10.89.0.0/26", "interface": "olab-br0", "store": "/a", "site": "twin"},
        "of-a-deleted-home": {"subnet": "10.89.0.64/26", "interface": "olab-br1", "store": "/deleted", "site": "twin"},
        "of-b": {"subnet": "10.89.0.128/26", "interface": "olab-br2", "store": "/b", "site": "twin"},
    })
    listed = {"kept": [NET("10.89.1.0/26")], "bridge": [NET("10.88.0.0/16")]}
    kept = _claim(ledger, "kept", "/a", listed, store_exists=lambda s: s != "/deleted")
    assert kept == Bridge(NET("10.89.1.0/26"), "olab-br4")
    # /a's entry whose network its podman no longer lists and the deleted home's are dropped; /b's stays
    # (its podman may keep networks where /a's does not look).
    assert sorted(ledger.entries) == ["kept", "of-b"]
    assert _claim(ledger, "new", "/a", listed) == Bridge(NET("10.89.0.0/26"), "olab-br0")


def test_freeing_by_network_and_by_site():
    ledger = Ledger({})
    for network, store in (("n1", "/a"), ("n2", "/a"), ("n3", "/b")):
        _claim(ledger, network, store)
    assert ledger.free(["n1", "unknown"]) == ["n1"]
    assert ledger.free_site("/b", "twin") == ["n3"] and list(ledger.entries) == ["n2"]


def test_the_ledger_is_written_only_by_a_block_that_ends_normally(tmp_path):
    with bridges.held(tmp_path) as ledger:
        _claim(ledger, "n1", "/a")
    with pytest.raises(RuntimeError), bridges.held(tmp_path) as ledger:
        _claim(ledger, "n2", "/a")
        raise RuntimeError("the network could not be made")
    assert list(json.loads((tmp_path / "bridges.json").read_text())) == ["n1"]


CLAIMER = """
import sys, time
from core import bridges
folder, store, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
while time.time() < start:
    time.sleep(0.001)
for i in range(15):
    with bridges.held(bridges.Path(folder)) as ledger:
        listed = {n: [bridges.IPv4Network(e["subnet"])] for n, e in ledger.entries.items() if e["store"] == "/" + store}
        ledger.claim(f"{store}-{i}", store="/" + store, site="twin", listed=listed, routed=[], interfaces=[],
                     store_exists=lambda s: True)
"""


def test_processes_claiming_at_once_never_share_a_subnet(tmp_path):
    """Four processes (four hubs) claim fifteen bridges each at the same moment: the machine's
    lock lets none read the ledger while another writes it."""
    import time

    start = str(time.time() + 1.5)
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(tmp_path), f"s{n}", start], cwd=Path(bridges.__file__).parents[1])
             for n in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    entries = json.loads((tmp_path / "bridges.json").read_text())
    assert len(entries) == 60
    assert len({e["subnet"] for e in entries.values()}) == len({e["interface"] for e in entries.values()}) == 60


def test_the_module_runs_on_its_own_as_the_hub_runs_it(tmp_path):
    """The local hub runs this module's source from its settings, in a Python where olab may
    not be importable: it needs the standard library only."""
    import inspect

    code = (
        "import sys, types\n"
        "m = types.ModuleType('olab_bridges'); sys.modules['olab_bridges'] = m\n"
        "exec(compile(sys.stdin.read(), 'core/bridges.py', 'exec'), m.__dict__)\n"
        "print(m.next_free_bridge([], []).interface, 'core' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], input=inspect.getsource(bridges), capture_output=True,
                         text=True, cwd=tmp_path, check=True).stdout
    assert out.split() == ["olab-br0", "False"]
