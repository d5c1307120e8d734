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


def hostile_relay(topo, net, welcome, packets):
    packets_file = os.path.join(net.workdir, "packets.txt")
    with open(packets_file, "w") as sink:
        sink.write("\n".join(packet if isinstance(packet, str) else packet.hex() for packet in packets) + "\n")
    relay = topo.spawn("srv", [sys.executable, "-u", HOSTILE, "3334", net.secret_path, welcome,
                               "198.18.0.1", packets_file])
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
        drops = {}
        for _ in range(50):             # the counters are read while the client runs: 5 s at most
            drops = net.client_status("c1")["drops"]
            if sum(drops.values()) >= 4:
                break
        assert drops == {"not addressed to this device": 3, "source outside the virtual network": 1}
        assert [line for line in sink.lines() if line.startswith("got")] == ["got 'legit' from 198.18.0.1"]


@pytest.mark.parametrize("welcome, complaint", [
    ("192.0.2.77/24", r"WELCOME offers 192\.0\.2\.0/24, which overlaps 192\.0\.2\.\d+/30 on up0: refused"),
    ("198.18.0.5/8", r"WELCOME offers a /8; an MNEDC network is /16 to /29"),
])
def test_a_welcome_that_would_take_over_a_network_is_refused(tmp_path, welcome, complaint):
    with Topology(layout="flat", clients=1) as topo:
        net = RelayNetwork(topo, tmp_path, tls=False)     # the liar speaks plaintext
        hostile_relay(topo, net, welcome, [])
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
