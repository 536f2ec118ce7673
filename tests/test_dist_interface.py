"""pretrain.dist's choice of gloo's network interface (GLOO_SOCKET_IFNAME), over this machine's real
interfaces; iproute2's listing is the independent answer where it is installed. The two-namespace run over
a veth pair is in tests/test_launch.py."""
import shutil
import subprocess

import pytest

from pretrain.dist.rendezvous import _interface_of, _local_addr_to, gloo_interface


def _ip_addrs() -> dict[str, str]:
    """{IPv4 address: interface} as `ip -o -4 addr` lists them."""
    if not shutil.which("ip"):
        pytest.skip("needs iproute2's `ip` to list interfaces independently")
    out = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True).stdout
    return {f.split()[3].split("/")[0]: f.split()[1] for f in out.splitlines()}


def _outside_addr(addrs: dict) -> str:
    non_loop = [a for a in addrs if not a.startswith("127.")]
    if not non_loop:
        pytest.skip("this machine has no non-loopback IPv4 address")
    return non_loop[0]


def test_interface_of_every_address_matches_iproute2():
    addrs = _ip_addrs()
    for addr, name in addrs.items():
        assert _interface_of(addr) == name, (addr, name)
    assert _interface_of("203.0.113.250") is None  # an address no interface holds


def test_route_to_an_address_of_this_machine_is_that_address():
    addrs = _ip_addrs()
    for addr in addrs:
        assert _local_addr_to(addr) == addr


def test_single_node_job_on_loopback_uses_lo():
    assert gloo_interface("127.0.0.1", ["127.0.0.1", "127.0.0.1"], multi_node=False) == "lo"


def test_master_name_resolving_to_127_0_1_1_on_its_own_node_takes_the_route_to_another_node():
    """MASTER_ADDR=node1 seen from node1 itself (/etc/hosts: 127.0.1.1 node1): loopback would strand the
    other nodes, so the route to a rank on another node picks the interface."""
    addrs = _ip_addrs()
    outside = _outside_addr(addrs)
    peers = ["127.0.0.1", "127.0.0.1", outside]  # ranks 0, 1 on this node, rank 2 elsewhere
    assert gloo_interface("127.0.1.1", peers, multi_node=True) == addrs[outside]


def test_a_rank_on_another_node_takes_the_route_to_the_master():
    addrs = _ip_addrs()
    outside = _outside_addr(addrs)
    assert gloo_interface(outside, [outside, outside], multi_node=True) == addrs[outside]


def test_no_route_or_all_loopback_leaves_gloo_its_default():
    # every "node" on loopback (the launch tests' cluster): nothing better to choose
    assert gloo_interface("127.0.1.1", ["127.0.0.1", "127.0.0.1"], multi_node=True) is None
    assert gloo_interface("::1", [], multi_node=False) is None  # IPv6 only: gloo's own choice
