"""End to end, as root: the real server and TUN clients across real nested NAT in namespaces.

    srv (relay, 198.18.0.1)  <-  natA  <-  a
                             <-  natB  <-  b
                                      <-  natC  <-  c      (c is behind two NATs)
"""

import hashlib
import json
import os
import re
import signal
import subprocess
import time

import pytest

from tests.nettopo import Topology, have_netns_support
from tests.relaynet import CLIENT, JOINED, SERVER, RelayNetwork

SUPPORTED, WHY_NOT = have_netns_support()
pytestmark = pytest.mark.skipif(not SUPPORTED, reason="needs root, ip netns, iptables and /dev/net/tun: %s" % WHY_NOT)
KEEPALIVE_S = 6


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    with Topology() as topo:
        yield RelayNetwork(topo, tmp_path_factory.mktemp("e2e"), keepalive=KEEPALIVE_S).start()


def wait_listening(topo, name, port, timeout=10):
    """Wait until a TCP socket listens on port inside name (nc has no readiness line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if topo.run(name, ["ss", "-Hltn", "sport = :%d" % port]).stdout.strip():
            return
        time.sleep(0.05)
    raise AssertionError("nothing listens on port %d in %s after %d s" % (port, name, timeout))


def test_the_server_cannot_reach_the_clients_real_addresses(net):
    for name in ("a", "b", "c"):
        assert not net.topo.ping("srv", net.topo.addr(name), timeout_s=1), name
        assert net.topo.ping(name, net.topo.server_ip), name


def test_every_device_reaches_every_other_by_virtual_ip(net):
    addresses = dict(net.vip, srv=net.server_vip)
    assert len(set(addresses.values())) == 4
    for source in addresses:
        for target, address in addresses.items():
            if source != target:
                assert net.topo.ping(source, address, count=2), "%s -> %s (%s)" % (source, target, address)


def test_a_20_mb_tcp_transfer_from_c_to_a_arrives_byte_identical(net, tmp_path):
    original = tmp_path / "original.bin"
    original.write_bytes(os.urandom(20 * 1000 * 1000))
    received = tmp_path / "received.bin"
    sink = net.topo.spawn("a", ["sh", "-c", "exec nc -l 5001 > %s" % received])
    wait_listening(net.topo, "a", 5001)
    started = time.monotonic()
    net.topo.run("c", ["sh", "-c", "nc -N %s 5001 < %s" % (net.vip["a"], original)], timeout=120)
    sink.wait(30)
    seconds = time.monotonic() - started
    assert received.stat().st_size == original.stat().st_size
    assert hashlib.sha256(received.read_bytes()).digest() == hashlib.sha256(original.read_bytes()).digest()
    print("20 MB c -> a through two NATs and the relay in %.2f s" % seconds)


def test_with_the_default_configuration_the_relays_wire_never_shows_what_crosses_it(net, tmp_path):
    """The fixture's relay and clients run with no TLS settings but the pin the relay printed:
    the default. A capture on the relay's underlay, where every link arrives, sees the tunnel's
    bytes go by and never the pattern sent through it."""
    assert net.pin and "certificate pin %s" % net.pin in net.server.output()
    assert "tls = no" not in open(os.path.join(net.workdir, "server.ini")).read()
    pattern = b"MNEDC-PLAINTEXT-MARKER-" + os.urandom(6).hex().encode()
    payload = tmp_path / "payload.bin"
    payload.write_bytes(pattern * (2 * 1000 * 1000 // len(pattern)))
    capture, received = tmp_path / "relay.pcap", tmp_path / "received.bin"
    tcpdump = net.topo.spawn("srv", ["tcpdump", "-Z", "root", "-B", "16384", "-i", "any", "-U", "-s", "0",
                                     "-w", str(capture), "tcp", "port", "3334"])
    try:
        tcpdump.wait_for(r"listening on", timeout=10)
        sink = net.topo.spawn("a", ["sh", "-c", "exec nc -l 5003 > %s" % received])
        wait_listening(net.topo, "a", 5003)
        net.topo.run("c", ["sh", "-c", "nc -N %s 5003 < %s" % (net.vip["a"], payload)], timeout=60)
        sink.wait(30)
    finally:
        tcpdump.stop()
    assert received.read_bytes() == payload.read_bytes()           # it crossed, and arrived whole
    wire = capture.read_bytes()
    assert len(wire) > payload.stat().st_size       # it saw the tunnel go by (in from c, out to a;
    #                                                 a busy kernel may drop some of it from a capture)
    assert pattern not in wire and pattern[:16] not in wire
    links = net.topo.run("srv", [net.python, SERVER, "--control", net.control_socket, "status", "--json"]).stdout
    assert all(device["tls"] for device in json.loads(links)["devices"]), links


def test_a_port_rule_stops_tcp_over_tun_and_lets_another_port_through(net, tmp_path):
    """Issue #14: 'deny * -> device-a port 5004' let TCP over TUN through; only streams obeyed."""
    policy = tmp_path / "policy"
    policy.write_text("deny * -> device-a port 5004\nallow * -> *\n")
    config = os.path.join(net.workdir, "server.ini")
    original = open(config).read()
    sinks = []
    try:
        with open(config, "w") as sink:
            sink.write(original + "policy_file = %s\n" % policy)
        mark = len(net.server.lines())
        net.server.send_signal(signal.SIGHUP)
        net.server.wait_for(r"reloaded the configuration", start=mark)
        for port in (5004, 5005):
            sinks.append(net.topo.spawn("a", ["nc", "-l", str(port)]))
            wait_listening(net.topo, "a", port)
        denied = net.topo.run("c", ["nc", "-z", "-w", "2", net.vip["a"], "5004"], check=False, timeout=15)
        allowed = net.topo.run("c", ["nc", "-z", "-w", "5", net.vip["a"], "5005"], check=False, timeout=15)
        assert denied.returncode != 0 and allowed.returncode == 0, (denied, allowed)
        net.server.wait_for(r"dropped packet from device device-c .*denied by policy %s -> %s"
                            % (re.escape(net.vip["c"]), re.escape(net.vip["a"])), start=mark)
    finally:
        with open(config, "w") as sink:
            sink.write(original)
        mark = len(net.server.lines())
        net.server.send_signal(signal.SIGHUP)
        net.server.wait_for(r"reloaded the configuration", start=mark)
        for sink in sinks:
            sink.stop()


def test_after_a_server_sigkill_every_device_keeps_its_address_and_tcp_survives(net):
    listener = net.topo.spawn("a", ["nc", "-l", "5002"])
    wait_listening(net.topo, "a", 5002)
    talker = net.topo.spawn("c", ["nc", net.vip["a"], "5002"], stdin=subprocess.PIPE)
    talker.stdin.write(b"before the crash\n")
    talker.stdin.flush()
    listener.wait_for(r"before the crash", timeout=10)

    clients = {name: net.clients[name] for name in net.topo.clients}
    marks = {name: len(proc.lines()) for name, proc in clients.items()}
    net.server.send_signal(signal.SIGKILL)
    net.server.wait(10)
    for name, proc in clients.items():
        proc.wait_for(r"relay connection lost", timeout=10, start=marks[name])
    net.start_server()
    for name, proc in clients.items():
        again = proc.wait_for(JOINED, timeout=30, start=marks[name])
        assert again.group(1) == net.vip[name], "%s came back as %s" % (name, again.group(1))

    talker.stdin.write(b"after the restart\n")
    talker.stdin.flush()
    listener.wait_for(r"after the restart", timeout=30)
    assert talker.alive() and listener.alive()
    talker.stop()
    listener.stop()


def test_a_dropped_nat_mapping_is_detected_on_both_sides_and_healed(net):
    client, server = net.clients["a"], net.server
    client_mark, server_mark = len(client.lines()), len(server.lines())
    drop = ["iptables", "-I", "FORWARD", "-s", net.topo.addr("a"), "-j", "DROP"]
    net.topo.run("natA", drop)
    started = time.monotonic()
    try:
        client.wait_for(r"relay connection lost: no frame from the server for %d s" % KEEPALIVE_S,
                        timeout=KEEPALIVE_S + 5, start=client_mark)
        server.wait_for(r"device device-a \(%s\) from \S+ left: no frame for %d s" % (re.escape(net.vip["a"]), KEEPALIVE_S),
                        timeout=KEEPALIVE_S + 5, start=server_mark)
        detected = time.monotonic() - started
    finally:
        net.topo.run("natA", ["iptables", "-D"] + drop[2:])
    assert detected < KEEPALIVE_S + 4
    again = client.wait_for(JOINED, timeout=45, start=client_mark)
    assert again.group(1) == net.vip["a"]
    assert net.topo.ping("a", net.vip["c"], count=2)


def test_a_client_with_the_wrong_secret_is_told_so_and_exits(net, tmp_path):
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("this-is-not-the-secret\n")
    mark = len(net.server.lines())
    intruder = net.start_client("b", device_id="intruder", secret_path=str(wrong), interface="mnedc9",
                                wait=False, label="intruder")
    intruder.wait_for(r"the server refused this device: authentication failed: wrong secret, or this device may not join")
    assert intruder.wait(10) == 1
    net.server.wait_for(r"device intruder from .*(proof is wrong|wrong secret)", start=mark)


def test_sigterm_removes_the_interface_and_the_device_rejoins_with_its_address(net):
    old = net.clients["b"]
    old.send_signal(signal.SIGTERM)
    assert old.wait(10) == 0
    assert "removed interface mnedc0" in old.output()
    links = net.topo.run("b", ["ip", "-o", "link"]).stdout
    assert "mnedc0" not in links
    address = net.vip["b"]
    net.start_client("b")
    assert net.vip["b"] == address


def test_stream_mode_works_beside_the_tun_client_of_the_same_device(net, tmp_path):
    received = tmp_path / "received.txt"
    sink = net.topo.spawn("a", ["sh", "-c", "exec nc -l 127.0.0.1 7001 > %s" % received])
    wait_listening(net.topo, "a", 7001)
    config_a = os.path.join(net.workdir, "client-a.ini")       # the TUN client's own config
    tun_mark = len(net.clients["a"].lines())
    listener = net.topo.spawn("a", [net.python, "-u", CLIENT, "-c", config_a, "listen", "--forward=7001", "7"])
    listener.wait_for(r"listening on virtual port 7 of device device-a")
    config_c = os.path.join(net.workdir, "client-c.ini")
    result = net.topo.run("c", [net.python, CLIENT, "-c", config_c, "connect", "device-a", "7"],
                          input="over the relay, two NATs deep\n", timeout=30)
    assert "closed gracefully" in result.stderr
    sink.wait(10)
    assert received.read_text() == "over the relay, two NATs deep\n"
    assert net.topo.ping("c", net.vip["a"], count=2)                 # TUN mode is untouched
    assert not [l for l in net.clients["a"].lines()[tun_mark:] if "relay connection lost" in l]
    listener.stop()


def test_server_sigterm_removes_its_interface_tells_clients_and_saves_leases(net):
    """Last in this module: it stops the server."""
    marks = {name: len(net.clients[name].lines()) for name in net.topo.clients}
    net.server.send_signal(signal.SIGTERM)
    assert net.server.wait(10) == 0
    assert "removed interface mnedc0: server shutting down" in net.server.output()
    assert "mnedc0" not in net.topo.run("srv", ["ip", "-o", "link"]).stdout
    leases = open(os.path.join(net.workdir, "server-state", "leases.json")).read()
    for name in net.topo.clients:
        assert '"address": "%s"' % net.vip[name] in leases
        net.clients[name].wait_for(r"server shutting down: the relay is restarting", start=marks[name])
        # the RESTARTING frame, not only the ERROR: the client returns within the window
        delay = net.clients[name].wait_for(r"the relay is restarting: reconnecting in ([\d.]+) s", start=marks[name])
        assert 1.0 <= float(delay.group(1)) <= 10.0

