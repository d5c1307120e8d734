"""TSO and checksum offload on the TUN (IFF_VNET_HDR), end to end, as root.

At MTU 1500 a client with offload hands the relay TCP segments of up to 64 KB whose checksums
are still to finish; a peer without offload (offload = no) finishes them in Python and still
receives every byte intact. Both directions, and to and from the server's own TUN.

    srv (relay, 198.18.0.1, offload)  <-  natA  <-  a  (offload, MTU 1500)
                                      <-  natB  <-  b  (offload = no, MTU 1500)
"""

import hashlib
import os
import time

import pytest

from tests.nettopo import Topology, have_netns_support
from tests.relaynet import RelayNetwork

SUPPORTED, WHY_NOT = have_netns_support()
pytestmark = pytest.mark.skipif(not SUPPORTED, reason="needs root, ip netns, iptables and /dev/net/tun: %s" % WHY_NOT)
MTU = 1500
PORT = 5301


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    with Topology(layout="flat", clients=2) as topo:
        network = RelayNetwork(topo, tmp_path_factory.mktemp("offload"), keepalive=6)
        network.start_server(options={"mtu": MTU})
        network.start_client(topo.clients[0], label="a", options={"mtu": MTU})
        network.start_client(topo.clients[1], label="b", options={"mtu": MTU, "offload": "no"})
        yield network


def transfer(net, source, sink, address, data, tmp_path):
    """Send data with nc from namespace source to a listener in sink; the bytes that arrived."""
    original, received = tmp_path / ("%s-%s.out" % (source, sink)), tmp_path / ("%s-%s.in" % (source, sink))
    original.write_bytes(data)
    listener = net.topo.spawn(sink, ["sh", "-c", "exec nc -l %d > %s" % (PORT, received)])
    try:
        deadline = time.monotonic() + 10
        while not net.topo.run(sink, ["ss", "-Hltn", "sport = :%d" % PORT]).stdout.strip():
            assert time.monotonic() < deadline, "nc never listened in %s" % sink
            time.sleep(0.05)
        net.topo.run(source, ["sh", "-c", "nc -N %s %d < %s" % (address, PORT, original)], timeout=120)
        listener.wait(30)
    finally:
        listener.stop()
    return received.read_bytes()


def test_the_logs_say_which_ends_offload(net):
    assert net.clients["a"].wait_for(r"created interface \S+ \(offloads on\)", timeout=5)
    assert net.clients["b"].wait_for(r"created interface \S+ \(no offloads\)", timeout=5)
    assert net.server.wait_for(r"on interface \S+ \(offloads on\)", timeout=5)
    assert net.client_status("a")["offload"] is True and net.client_status("b")["offload"] is False


@pytest.mark.parametrize("source, sink", [("a", "b"), ("b", "a"), ("a", "srv"), ("srv", "b")])
def test_20_mb_arrive_intact_between_offload_and_plain_ends(net, tmp_path, source, sink):
    namespace = {"a": net.topo.clients[0], "b": net.topo.clients[1], "srv": "srv"}
    address = net.server_vip if sink == "srv" else net.vip[sink]
    data = os.urandom(20 * 1000 * 1000)
    received = transfer(net, namespace[source], namespace[sink], address, data, tmp_path)
    assert len(received) == len(data)
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()


def test_at_mtu_1500_the_offloading_client_sends_64_kb_segments(net, tmp_path):
    """Only TSO can put more than 1500 bytes in one packet at MTU 1500; the plain end cannot.

    Each side is measured while it sends the data (its outgoing packets are then segments, not
    ACKs)."""
    sizes = {}
    for label, peer, namespaces in (("a", "b", net.topo.clients), ("b", "a", net.topo.clients[::-1])):
        before = net.client_status(label)
        transfer(net, namespaces[0], namespaces[1], net.vip[peer], os.urandom(5 * 1000 * 1000), tmp_path)
        after = net.client_status(label)
        packets = after["packets_out"] - before["packets_out"]
        sizes[label] = (after["bytes_out"] - before["bytes_out"]) / float(packets)
    assert sizes["a"] > 4 * MTU, sizes          # whole segments, not 1500-byte packets
    assert sizes["b"] <= MTU, sizes
    print("bytes per packet sent at MTU %d: offload %.0f, plain %.0f" % (MTU, sizes["a"], sizes["b"]))


def test_under_a_small_max_frame_bytes_clients_turn_tso_off_and_fit(tmp_path):
    """TSO hands over 64 KB whatever the MTU: under the server's 8000-byte frame limit (told in
    WELCOME) the clients turn it off and lower their MTU, and traffic still flows."""
    with Topology(layout="flat", clients=2) as topo:
        network = RelayNetwork(topo, tmp_path, keepalive=6)
        network.start_server(options={"max_frame_bytes": 8000})
        for name in topo.clients:
            network.start_client(name, label=name)
        first, second = topo.clients
        for name in topo.clients:
            network.clients[name].wait_for(r"the server takes frames of at most 8000 bytes: MTU 7990")
            assert network.client_status(name)["mtu"] == 7990
        data = os.urandom(5 * 1000 * 1000)
        assert transfer(network, first, second, network.vip[second], data, tmp_path) == data
        assert transfer(network, second, first, network.vip[first], data, tmp_path) == data
        assert "exceeds the limit" not in network.server.output()
        # the server comes back without the limit: TSO and the full MTU come back too
        network.server.stop()
        marks = {name: len(network.clients[name].lines()) for name in topo.clients}
        network.start_server()
        for name in topo.clients:
            deadline = time.monotonic() + 30
            while not any("connected to relay" in line for line in network.clients[name].lines()[marks[name]:]):
                assert time.monotonic() < deadline, "%s did not come back" % name
                time.sleep(0.1)
            status = network.client_status(name)
            assert status["tso"] is True and status["mtu"] == 65520, status
        before = network.client_status(first)
        assert transfer(network, first, second, network.vip[second], data, tmp_path) == data
        after = network.client_status(first)
        assert (after["bytes_out"] - before["bytes_out"]) / float(after["packets_out"] - before["packets_out"]) > 8000


def test_a_vxlan_tunnel_carried_over_the_network_crosses_offload_and_plain_ends(net, tmp_path):
    """The kernel leaves a tunnel's inner TCP checksum open, deep in the packet: legal, and the
    plain end (b) finishes it. Nobody is disconnected for it."""
    a, b = net.topo.clients
    pairs = ((a, net.vip["a"], net.vip["b"], "198.19.5.1"), (b, net.vip["b"], net.vip["a"], "198.19.5.2"))
    for name, local, remote, inner in pairs:
        added = net.topo.run(name, ["ip", "link", "add", "vx0", "type", "vxlan", "id", "7", "local", local,
                                    "remote", remote, "dstport", "4789"], check=False)
        if added.returncode != 0:
            pytest.skip("no VXLAN in this kernel: %s" % added.stderr.strip())
        net.topo.run(name, ["ip", "addr", "add", inner + "/24", "dev", "vx0"])
        net.topo.run(name, ["ip", "link", "set", "vx0", "up"])
    try:
        reconnects = {label: net.client_status(label)["reconnects"] for label in ("a", "b")}
        data = os.urandom(2 * 1000 * 1000)
        assert transfer(net, a, b, "198.19.5.2", data, tmp_path) == data
        assert transfer(net, b, a, "198.19.5.1", data, tmp_path) == data
        assert {label: net.client_status(label)["reconnects"] for label in ("a", "b")} == reconnects
        assert "refusing" not in net.server.output()
    finally:
        for name in (a, b):
            net.topo.run(name, ["ip", "link", "del", "vx0"], check=False)
