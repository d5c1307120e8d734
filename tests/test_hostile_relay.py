"""A TUN client does not trust its relay further than it must (issue #13): a relay that knows
the secret (compromised, or someone who stole the secret) cannot inject packets to other hosts
through the client, nor spoof sources from outside the virtual network, nor make the client
route a LAN into the tunnel with a WELCOME it chose. Real client, real TUN, a lying relay."""

import os
import socket
import struct
import sys

import pytest

from tests.conftest import ROOT
from tests.nettopo import Topology, have_netns_support
from tests.relaynet import RelayNetwork
import mnedc_client

SUPPORTED, WHY_NOT = have_netns_support()
pytestmark = pytest.mark.skipif(not SUPPORTED, reason="needs root, ip netns and /dev/net/tun: %s" % WHY_NOT)

HOSTILE = os.path.join(ROOT, "tests", "hostile_relay.py")
CLIENT_ADDRESS = "198.18.0.5"
# A UDP port in the client's namespace that prints each datagram with its source
UDP_SINK = r"""
import socket
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", 9999))
sock.settimeout(60)
print("sink ready", flush=True)
for _ in range(20):
    data, peer = sock.recvfrom(2048)
    print("got %r from %s" % (data.decode(), peer[0]), flush=True)
"""


def udp_packet(source, destination, payload):
    """An IPv4/UDP packet with a valid header checksum (the kernel checks it), no UDP checksum."""
    udp = struct.pack("!HHHH", 40000, 9999, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                         socket.inet_aton(source), socket.inet_aton(destination))
    total = sum(struct.unpack("!10H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return header[:10] + struct.pack("!H", ~total & 0xFFFF) + header[12:] + udp


def udp6_packet(source, destination, payload):
    """An IPv6/UDP packet with its checksum (IPv6 requires one: RFC 8200 8.1)."""
    source, destination = (socket.inet_pton(socket.AF_INET6, address) for address in (source, destination))
    length = 8 + len(payload)
    pseudo = source + destination + struct.pack("!IxxxB", length, 17)
    udp = struct.pack("!HHHH", 40000, 9999, length, 0) + payload
    data = pseudo + udp + b"\0" * (len(udp) & 1)
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    udp = udp[:6] + struct.pack("!H", ~total & 0xFFFF or 0xFFFF) + udp[8:]
    return struct.pack("!IHBB", 6 << 28, length, 17, 64) + source + destination + udp


UDP6_SINK = UDP_SINK.replace("socket.AF_INET,", "socket.AF_INET6,").replace('"0.0.0.0"', '"::"')


def client_drops(net, at_least):
    """The client's drop counters, once they add up to at_least (read while it runs: 50 reads at most)."""
    drops = {}
    for _ in range(50):
        drops = net.client_status("c1")["drops"]
        if sum(drops.values()) >= at_least:
            break
    return drops


def hostile_relay(topo, net, welcome, packets, ipv6_prefix=None):
    packets_file = os.path.join(net.workdir, "packets.txt")
    with open(packets_file, "w") as sink:
        sink.write("\n".join(packet if isinstance(packet, str) else packet.hex() for packet in packets) + "\n")
    relay = topo.spawn("srv", [sys.executable, "-u", HOSTILE, "3334", net.secret_path, welcome,
                               "198.18.0.1", packets_file] + ([ipv6_prefix] if ipv6_prefix else []))
    relay.wait_for("hostile relay ready", timeout=15)
    return relay


def test_the_client_writes_to_its_tun_only_packets_for_it_from_the_virtual_network(tmp_path):
    with Topology(layout="flat", clients=1) as topo:
        net = RelayNetwork(topo, tmp_path, tls=False)     # the liar speaks plaintext
        sink = topo.spawn("c1", [sys.executable, "-u", "-c", UDP_SINK])
        sink.wait_for("sink ready", timeout=10)
        lan = topo.addr("c1")
        relay = hostile_relay(topo, net, CLIENT_ADDRESS + "/24", [
            udp_packet("198.18.0.9", "198.18.0.77", b"to another device's address"),
            udp_packet("198.18.0.9", lan, b"to the client's LAN address"),
            udp_packet("203.0.113.66", CLIENT_ADDRESS, b"from outside the network"),
            "vnet:" + udp_packet("198.18.0.9", "198.18.0.78", b"offload frame to another").hex(),
            udp_packet("198.18.0.1", CLIENT_ADDRESS, b"legit"),
        ])
        net.start_client("c1")
        relay.wait_for("sent 5 packets", timeout=15)
        sink.wait_for(r"got 'legit' from 198\.18\.0\.1", timeout=10)
        drops = client_drops(net, 4)
        assert drops == {"not addressed to this device": 3, "source outside the virtual network": 1}
        assert [line for line in sink.lines() if line.startswith("got")] == ["got 'legit' from 198.18.0.1"]


def test_the_client_writes_to_its_tun_only_ipv6_packets_for_it_from_the_virtual_network(tmp_path):
    with Topology(layout="flat", clients=1) as topo:
        net = RelayNetwork(topo, tmp_path, tls=False)     # the liar speaks plaintext
        sink = topo.spawn("c1", [sys.executable, "-u", "-c", UDP6_SINK])
        sink.wait_for("sink ready", timeout=10)
        relay = hostile_relay(topo, net, CLIENT_ADDRESS + "/24", [
            udp6_packet("fd00:0:0:1::9", "fd00:0:0:1::77", b"to another device's address"),
            udp6_packet("fd00:0:0:1::9", "2001:db8::5", b"to an address beyond the client"),
            udp6_packet("2001:db8::66", "fd00:0:0:1::5", b"from outside the network"),
            udp6_packet("2001:db8::66", "ff02::1", b"to everyone from outside"),
            udp6_packet("fd00:0:0:1::1", "fd00:0:0:1::5", b"legit"),
            udp6_packet("fe80::1", "fe80::5", b"legit link-local"),
        ], ipv6_prefix="fd00:0:0:1::")
        net.start_client("c1")
        relay.wait_for("sent 6 packets", timeout=15)
        sink.wait_for(r"got 'legit link-local' from fe80::1", timeout=10)
        drops = client_drops(net, 4)
        assert drops == {"not addressed to this device": 2, "source outside the virtual network": 2}
        assert [line for line in sink.lines() if line.startswith("got")] == [
            "got 'legit' from fd00:0:0:1::1", "got 'legit link-local' from fe80::1"]


def test_a_relay_cannot_make_the_client_route_or_serve_networks_that_are_no_lans(tmp_path):
    """Issue #16's ROUTES from a lying relay: half the Internet as ours to forward, or into the
    tunnel, or a network holding the relay itself; only a plain LAN grant is taken."""
    routes = [(socket.inet_aton("0.0.0.0"), 1, True), (socket.inet_aton("128.0.0.0"), 1, False),
              (socket.inet_aton("192.0.2.96"), 28, False), (socket.inet_aton("198.51.100.0"), 24, False)]
    with Topology(layout="flat", clients=1) as topo:
        net = RelayNetwork(topo, tmp_path, tls=False)     # the liar speaks plaintext
        relay = hostile_relay(topo, net, CLIENT_ADDRESS + "/24", ["routes:" + mnedc_client.encode_routes(routes).hex()])
        client = net.start_client("c1")
        relay.wait_for("sent 1 packets", timeout=15)
        client.wait_for(r"routing 198\.51\.100\.0/24 into mnedc0", timeout=10)
        for complaint in (r"not serving 0\.0\.0\.0/1 as its gateway: no LAN of this host's",
                          r"not routing 128\.0\.0\.0/1 into mnedc0: it is wider than a /8",
                          r"not routing 192\.0\.2\.96/28 into mnedc0: it holds the relay's own address 192\.0\.2\.100"):
            client.wait_for(complaint, timeout=5)
        routes_now = topo.run("c1", ["ip", "-o", "route", "show", "dev", "mnedc0"]).stdout
        assert "198.51.100.0/24" in routes_now and "128.0.0.0" not in routes_now and "192.0.2.96" not in routes_now, routes_now
        assert net.client_status("c1")["gateway_for"] == []


@pytest.mark.parametrize("welcome, ipv6_prefix, complaint", [
    ("192.0.2.77/24", None, r"WELCOME offers 192\.0\.2\.0/24, which overlaps 192\.0\.2\.\d+/30 on up0: refused"),
    ("198.18.0.5/8", None, r"WELCOME offers a /8; an MNEDC network is /16 to /29"),
    ("198.18.0.5/24", "2001:db8::", r"WELCOME offers the IPv6 network 2001:db8::/64, which is not unique-local "
                                    r"\(fc00::/7\): refused"),
])
def test_a_welcome_that_would_take_over_a_network_is_refused(tmp_path, welcome, ipv6_prefix, complaint):
    with Topology(layout="flat", clients=1) as topo:
        net = RelayNetwork(topo, tmp_path, tls=False)     # the liar speaks plaintext
        hostile_relay(topo, net, welcome, [], ipv6_prefix)
        client = net.start_client("c1", wait=False)
        client.wait_for(complaint, timeout=15)
        links = topo.run("c1", ["ip", "-o", "-4", "addr", "show", "dev", "mnedc0"]).stdout
        assert links.strip() == "", links                   # no address, so no route into the tunnel
        routes = topo.run("c1", ["ip", "-o", "route"]).stdout
        assert "mnedc0" not in routes, routes


def test_a_relay_that_changes_the_network_under_a_running_client_is_refused(tmp_path):
    with Topology(layout="flat", clients=1) as topo:
        net = RelayNetwork(topo, tmp_path, tls=False)     # the liar speaks plaintext
        first = hostile_relay(topo, net, CLIENT_ADDRESS + "/24", [])
        client = net.start_client("c1")
        first.stop()
        hostile_relay(topo, net, "198.19.0.5/24", [])
        client.wait_for(r"the relay moved this device to another network, 198\.19\.0\.0/24 \(it was "
                        r"198\.18\.0\.0/24\): restart the client if that is right", timeout=20)
        addresses = topo.run("c1", ["ip", "-o", "-4", "addr", "show", "dev", "mnedc0"]).stdout
        assert CLIENT_ADDRESS + "/24" in addresses and "198.19." not in addresses
