"""As root: the benchmark's OpenVPN reference (bench/openvpn_peer.py) on the nested NAT topology.

    srv (OpenVPN TCP server, 198.19.0.1)  <-  natA  <-  a
                                          <-  natB  <-  b

a and b sit behind different NATs, so a <-> b only works through the server
(client-to-client).  Each variant gets its own topology.
"""

import json
import os
import shutil

import pytest

from bench.openvpn_peer import OpenVpnNetwork, openvpn_available
from tests.nettopo import Topology, have_netns_support

NETNS_OK, NETNS_WHY = have_netns_support()
OPENVPN_OK, OPENVPN_WHY = openvpn_available()
pytestmark = [
    pytest.mark.skipif(not NETNS_OK, reason="needs root, ip netns, iptables and /dev/net/tun: %s" % NETNS_WHY),
    pytest.mark.skipif(not OPENVPN_OK, reason="needs OpenVPN 2.6 and openssl: %s" % OPENVPN_WHY),
]
needs_iperf3 = pytest.mark.skipif(shutil.which("iperf3") is None, reason="iperf3 not installed (apt-get install iperf3)")
IPERF_PORT = 5201


@pytest.fixture(scope="module", params=["default", "plaintext"])
def ovpn(request, tmp_path_factory):
    with Topology() as topo:
        net = OpenVpnNetwork(topo, tmp_path_factory.mktemp("openvpn"), request.param).start(("a", "b"))
        yield net
        net.stop()


def test_each_client_gets_its_own_address_in_198_19_0_0_24(ovpn):
    assert sorted(ovpn.vip) == ["a", "b"]
    assert len(set(ovpn.vip.values())) == 2
    for name, address in ovpn.vip.items():
        assert address.startswith("198.19.0.") and address != ovpn.server_vip, address
        assert "%s/24" % address in ovpn.topo.run(name, ["ip", "-o", "-4", "addr"]).stdout
    assert ovpn.server_proc.alive() and all(p.alive() for p in ovpn.client_procs.values())


def test_a_and_b_behind_different_nats_ping_each_other_through_the_server(ovpn):
    assert ovpn.topo.ping("a", ovpn.vip["b"], count=2), ovpn.log_tails()
    assert ovpn.topo.ping("b", ovpn.vip["a"], count=2), ovpn.log_tails()


def test_the_tunnel_mtu_is_the_variants(ovpn):
    expected = {"default": 1500, "plaintext": 48000}[ovpn.variant]
    for name in ("a", "b"):
        link = ovpn.topo.run(name, ["ip", "-o", "link", "show", "dev", "tun0"]).stdout
        assert " mtu %d " % expected in link, link


def test_the_data_channel_cipher_is_the_variants(ovpn):
    if ovpn.variant == "plaintext":
        assert ovpn.data_channel_in_clear(), "\n".join(ovpn.cipher_lines())
        for name in ("a", "b"):
            assert ovpn.data_channel[name] == ("[null-cipher]", "[null-digest]"), ovpn.data_channel
    else:
        assert not ovpn.data_channel_in_clear()
        for name in ("a", "b"):
            assert ovpn.data_channel[name][0] == "AES-256-GCM", ovpn.data_channel
        assert not [l for l in ovpn.cipher_lines() if "none" in l]


@needs_iperf3
def test_iperf3_from_a_to_b_through_the_tunnel_moves_data(ovpn):
    topo = ovpn.topo
    server = topo.spawn("b", ["iperf3", "-s", "-1", "--forceflush", "-B", ovpn.vip["b"], "-p", str(IPERF_PORT)])
    server.wait_for(r"Server listening", timeout=10)
    result = topo.run("a", ["iperf3", "-J", "-c", ovpn.vip["b"], "-p", str(IPERF_PORT), "-t", "1"], timeout=20)
    report = json.loads(result.stdout)
    received = report["end"]["sum_received"]
    assert received["bytes"] > 0 and received["bits_per_second"] > 0, result.stdout[-2000:]
    assert server.wait(10) == 0
    print("OpenVPN %s: iperf3 a -> b %.0f Mbit/s" % (ovpn.variant, received["bits_per_second"] / 1e6))


def test_stop_ends_every_openvpn_process(ovpn):
    """Last in this module for each variant: it stops OpenVPN."""
    procs = ovpn.procs
    assert len(procs) == 3
    ovpn.stop()
    assert not [p for p in procs if p.alive()]
    assert os.path.isdir(ovpn.workdir)
