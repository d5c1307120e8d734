"""Issue #16, end to end as root: the LAN behind a device, reached by its own addresses.

    srv (relay)  <-  natA  <-  a  --  lan (198.51.100.128/26, no MNEDC on it: 198.51.100.130)
                 <-  natB  <-  b
                          <-  natC  <-  c      (c is behind two NATs)

The operator grants a the LAN (`route 198.51.100.128/26 = device-a`, by SIGHUP); c and b reach
the LAN host through the relay and a, which forwards.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.nettopo import Topology, have_netns_support
from tests.relaynet import SERVER, RelayNetwork

SUPPORTED, WHY_NOT = have_netns_support()
pytestmark = pytest.mark.skipif(not SUPPORTED, reason="needs root, ip netns, iptables and /dev/net/tun: %s" % WHY_NOT)
PEER = os.path.join(ROOT, "tests", "ip6_peer.py")
LAN, LAN_HOST, GATEWAY_SIDE = "198.51.100.128/26", "198.51.100.130", "198.51.100.129"
LAN6, LAN6_HOST, GATEWAY6_SIDE = "fd00:5e:1::/64", "fd00:5e:1::130", "fd00:5e:1::1"


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    with Topology() as topo:
        # the LAN behind a: a namespace of the topology's prefix, so its teardown sweeps it too
        lan = topo.prefix + "lanA"
        for command in (["ip", "netns", "add", lan],
                        ["ip", "-n", topo.ns("a"), "link", "add", "lan1", "type", "veth", "peer", "name", "eth0", "netns", lan],
                        ["ip", "-n", topo.ns("a"), "addr", "add", GATEWAY_SIDE + "/26", "dev", "lan1"],
                        ["ip", "-n", topo.ns("a"), "link", "set", "lan1", "up"],
                        ["ip", "-n", lan, "addr", "add", LAN_HOST + "/26", "dev", "eth0"],
                        ["ip", "-n", lan, "link", "set", "eth0", "up"],
                        ["ip", "-n", lan, "link", "set", "lo", "up"],
                        ["ip", "-n", lan, "route", "add", "default", "via", GATEWAY_SIDE],
                        # and IPv6 on that LAN (the topology turns it off in every namespace)
                        ["ip", "netns", "exec", lan, "sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=0"],
                        ["ip", "netns", "exec", topo.ns("a"), "sysctl", "-qw", "net.ipv6.conf.lan1.disable_ipv6=0",
                         "net.ipv6.conf.all.forwarding=1", "net.ipv4.ip_forward=1"],
                        ["ip", "-n", lan, "-6", "addr", "add", LAN6_HOST + "/64", "dev", "eth0", "nodad"],
                        ["ip", "-n", topo.ns("a"), "-6", "addr", "add", GATEWAY6_SIDE + "/64", "dev", "lan1", "nodad"],
                        ["ip", "-n", lan, "-6", "route", "add", "default", "via", GATEWAY6_SIDE]):
            subprocess.run(command, check=True, timeout=10)
        network = RelayNetwork(topo, tmp_path_factory.mktemp("gateways"), keepalive=6)
        network.start_server()
        for name in topo.clients:
            network.start_client(name)
        network.lan = lan
        yield network


def server_status(net):
    return json.loads(net.topo.run("srv", [net.python, SERVER, "--control", net.control_socket, "status", "--json"]).stdout)


def in_lan(net, argv, **kw):
    return subprocess.run(["ip", "netns", "exec", net.lan] + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, **kw)


def assert_byte_exact(net, source, host, port, size):
    """size random bytes from source to a TCP sink on the LAN host, compared by SHA-256."""
    sink = subprocess.Popen(["ip", "netns", "exec", net.lan, sys.executable, "-u", PEER, "sink", str(port)],
                            stdout=subprocess.PIPE, universal_newlines=True)
    try:
        assert sink.stdout.readline().startswith("listening")
        sent = net.topo.run(source, [sys.executable, PEER, "source", host, str(port), str(size)], timeout=60).stdout.split()
        assert sink.stdout.readline().split() == ["got"] + sent[1:]
    finally:
        sink.kill()
        sink.wait(5)


def drops(net, reason):
    return server_status(net)["totals"]["drops"].get(reason, 0)


def test_without_a_grant_packets_for_the_lan_are_dropped_and_counted(net):
    before = drops(net, "unknown destination")
    net.topo.run("c", ["ip", "route", "add", LAN, "dev", "mnedc0"])        # c sends them in anyway
    try:
        assert not net.topo.ping("c", LAN_HOST, count=2)
    finally:
        net.topo.run("c", ["ip", "route", "del", LAN, "dev", "mnedc0"])
    assert drops(net, "unknown destination") - before >= 2


def test_a_granted_lan_is_reached_across_the_nats_byte_exact_and_only_its_gateway_may_speak_for_it(net):
    mark = {name: len(net.clients[name].lines()) for name in ("a", "b", "c")}
    with net.reloaded("route %s = device-a\nroute 203.0.113.0/24 = device-b\n" % LAN):
        net.clients["c"].wait_for(r"routing 198\.51\.100\.128/26 into mnedc0", start=mark["c"])
        net.clients["c"].wait_for(r"not routing 203\.0\.113\.0/24 into mnedc0: it overlaps 203\.0\.113\.0/24 on up0",
                                  start=mark["c"])     # c's own LAN stays out of the tunnel
        net.clients["a"].wait_for(r"this device is the gateway for 198\.51\.100\.128/26$", start=mark["a"])
        assert net.topo.ping("c", LAN_HOST, count=2) and net.topo.ping("b", LAN_HOST, count=2)
        assert in_lan(net, ["ping", "-n", "-q", "-c", "2", "-W", "2", net.vip["c"]], timeout=15).returncode == 0, \
            "the LAN host reaches c too: its source lies in a's granted network"
        assert_byte_exact(net, "c", LAN_HOST, 5310, 4 << 20)
        status = server_status(net)
        assert status["server"]["routes"] == {LAN: "device-a", "203.0.113.0/24": "device-b"}
        assert {d["device_id"]: d["routes"] for d in status["devices"]}["device-a"] == [LAN]
        assert net.client_status("c")["routes"] == [LAN] and net.client_status("a")["gateway_for"] == [LAN]
        before = drops(net, "spoofed source")
        net.topo.run("b", ["ip", "addr", "add", "198.51.100.140/32", "dev", "mnedc0"])     # b speaks for a's LAN
        try:
            assert not net.topo.run("b", ["ping", "-n", "-q", "-c", "2", "-W", "1", "-I", "198.51.100.140", net.vip["c"]],
                                    check=False, timeout=15).returncode == 0
        finally:
            net.topo.run("b", ["ip", "addr", "del", "198.51.100.140/32", "dev", "mnedc0"])
        assert drops(net, "spoofed source") - before >= 2
    for _ in range(50):             # the grant is gone: c takes the route out again (5 s at most)
        if not net.topo.run("c", ["ip", "route", "show", LAN]).stdout.strip():
            break
        time.sleep(0.1)
    assert net.topo.run("c", ["ip", "route", "show", LAN]).stdout.strip() == ""
    assert not net.topo.ping("c", LAN_HOST, count=1)


def test_with_gateway_nat_lan_hosts_without_a_route_back_answer_and_the_rule_goes_at_stop(net):
    in_lan(net, ["ip", "route", "del", "default"], timeout=10)     # the LAN knows no way to 198.18.0.0/24
    mark = len(net.clients["c"].lines())
    try:
        with net.reloaded("route %s = device-a\n" % LAN):
            net.clients["c"].wait_for(r"routing 198\.51\.100\.128/26 into mnedc0", timeout=15, start=mark)
            assert not net.topo.ping("c", LAN_HOST, count=1), "without gateway_nat the answers have no way back"
            net.clients["a"].stop()
            net.start_client("a", options={"gateway_nat": "yes"})
            net.clients["a"].wait_for(r"masquerading 198\.18\.0\.0/24 onto 198\.51\.100\.128/26 \(gateway_nat\)")
            assert net.topo.ping("c", LAN_HOST, count=2)
            assert_byte_exact(net, "c", LAN_HOST, 5312, 4 << 20)
            rules = net.topo.run("a", ["iptables", "-t", "nat", "-S", "POSTROUTING"]).stdout
            assert "-s 198.18.0.0/24 -d 198.51.100.128/26" in rules and "MASQUERADE" in rules, rules
            net.clients["a"].stop()
            assert "MASQUERADE" not in net.topo.run("a", ["iptables", "-t", "nat", "-S", "POSTROUTING"]).stdout
            net.start_client("a")
    finally:
        in_lan(net, ["ip", "route", "add", "default", "via", GATEWAY_SIDE], timeout=10)


def test_an_ipv6_lan_is_granted_and_reached_the_same_way(net):
    mark = len(net.clients["c"].lines())
    with net.reloaded("route %s = device-a\n" % LAN6):
        net.clients["c"].wait_for(r"routing fd00:5e:1::/64 into mnedc0", timeout=15, start=mark)
        ping = net.topo.run("c", ["ping", "-6", "-n", "-q", "-c", "2", "-i", "0.2", "-W", "2", LAN6_HOST], check=False, timeout=15)
        assert ping.returncode == 0, ping.stdout
        assert_byte_exact(net, "c", LAN6_HOST, 5311, 2 << 20)


def test_a_member_with_accept_routes_no_keeps_to_the_virtual_network(net):
    with net.reloaded("route %s = device-a\n" % LAN):
        net.clients["b"].stop()
        net.start_client("b", options={"accept_routes": "no"})
        try:
            assert net.topo.run("b", ["ip", "route", "show", LAN]).stdout.strip() == ""
            assert net.topo.ping("b", net.vip["a"], count=1) and not net.topo.ping("b", LAN_HOST, count=1)
        finally:
            net.clients["b"].stop()
            net.start_client("b")


def test_a_policy_rule_can_name_the_lan_instead_of_its_gateway(net, tmp_path):
    policy = tmp_path / "policy"
    policy.write_text("deny device-c -> %s\n" % LAN)
    before, mark = drops(net, "denied by policy"), len(net.clients["b"].lines())
    with net.reloaded("route %s = device-a\npolicy_file = %s\n" % (LAN, policy)):
        net.clients["b"].wait_for(r"routing 198\.51\.100\.128/26 into mnedc0", timeout=15, start=mark)
        assert not net.topo.ping("c", LAN_HOST, count=2), "c may not reach the LAN"
        assert net.topo.ping("c", net.vip["a"], count=1), "but still its gateway"
        assert net.topo.ping("b", LAN_HOST, count=1), "and b the LAN"
    assert drops(net, "denied by policy") - before >= 2


def test_a_gateway_without_forwarding_says_what_to_turn_on(net):
    net.topo.run("a", ["sysctl", "-qw", "net.ipv4.ip_forward=0"])
    try:
        with net.reloaded("route %s = device-a\n" % LAN):
            net.clients["a"].stop()
            net.start_client("a")
            net.clients["a"].wait_for(r"this device is the gateway for 198\.51\.100\.128/26: turn forwarding on "
                                      r"\(sysctl -w net\.ipv4\.ip_forward=1\)", timeout=15)
    finally:
        net.topo.run("a", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])


def test_a_relay_restarted_without_its_grants_takes_the_routes_out_of_every_member(net):
    """Grants live in the relay's configuration: an operator's edit or a reinstall can bring the
    relay back with none, and every member hears so at its rejoin (an empty ROUTES), so no LAN
    stays routed into a tunnel that no longer leads to it."""
    marks = {name: len(net.clients[name].lines()) for name in ("a", "c")}
    net.server.stop()
    try:
        net.start_server(options={"route " + LAN: "device-a", "restart_window": 1})
        net.clients["c"].wait_for(r"routing 198\.51\.100\.128/26 into mnedc0", timeout=30, start=marks["c"])
        net.clients["a"].wait_for(r"this device is the gateway for 198\.51\.100\.128/26$", timeout=30, start=marks["a"])
        assert net.topo.ping("c", LAN_HOST, count=2)
        marks = {name: len(net.clients[name].lines()) for name in ("a", "c")}
        net.server.stop()
        net.start_server(options={"restart_window": 1})         # back without the grant
        for name in ("a", "c"):
            net.clients[name].wait_for(r"connected to relay", timeout=15, start=marks[name])
        for _ in range(50):
            if not net.topo.run("c", ["ip", "route", "show", LAN]).stdout.strip():
                break
            time.sleep(0.1)
        assert net.topo.run("c", ["ip", "route", "show", LAN]).stdout.strip() == ""
        assert net.client_status("c")["routes"] == [] and net.client_status("a")["gateway_for"] == []
        assert not net.topo.ping("c", LAN_HOST, count=1)
        assert net.topo.ping("c", net.vip["a"], count=1), "the virtual network itself is untouched"
    finally:
        net.server.stop()
        marks = {name: len(net.clients[name].lines()) for name in net.topo.clients}
        net.start_server()
        for name in net.topo.clients:
            net.clients[name].wait_for(r"connected to relay", timeout=15, start=marks[name])
