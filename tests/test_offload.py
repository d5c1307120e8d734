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
