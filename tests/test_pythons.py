"""Both scripts start and relay packets on every Python from 3.7 that this machine has."""

import subprocess

import pytest

from tests.interpreters import interpreters
from tests.nettopo import Topology, have_netns_support
from tests.relaynet import CLIENT, SERVER, RelayNetwork
from tests.wire_peer import WirePeer, ipv4_packet, start_server

PYTHONS = interpreters()
SUPPORTED, WHY_NOT = have_netns_support()


def test_the_targets_floor_is_here():
    assert "3.7" in PYTHONS, "no Python 3.7 found (pyenv versions): the floor must be tested"


@pytest.mark.parametrize("version", sorted(PYTHONS))
@pytest.mark.parametrize("script", [SERVER, CLIENT])
def test_help_works(version, script):
    result = subprocess.run([PYTHONS[version], script, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "MNEDC" in result.stdout


@pytest.mark.parametrize("version", sorted(PYTHONS))
def test_server_relays_on_loopback(version, tmp_path):
    proc, port, secret = start_server(tmp_path, python=PYTHONS[version])
    try:
        one, two = WirePeer(port), WirePeer(port)
        one.handshake(secret, "one")
        two.handshake(secret, "two")
        packet = ipv4_packet(one.address, two.address, b"hello from %s" % version.encode())
        one.send_packet(packet)
        assert two.recv_packet() == packet
    finally:
        proc.stop()


@pytest.mark.skipif(not SUPPORTED, reason="needs root, ip netns and /dev/net/tun: %s" % WHY_NOT)
@pytest.mark.parametrize("version", sorted(PYTHONS))
def test_tun_clients_ping_each_other(version, tmp_path):
    with Topology(layout="flat", clients=2) as topo:
        net = RelayNetwork(topo, tmp_path, python=PYTHONS[version]).start()
        assert topo.ping("c1", net.vip["c2"], count=2)
        assert topo.ping("c2", net.server_vip, count=2)
