"""Issue #15, end to end as root: the virtual network behaves as one LAN segment for
broadcast and link-local multicast (mDNS, SSDP), across the nested NATs, with the relay's
budget and policy in force.

    srv (relay, 198.18.0.1)  <-  natA  <-  a
                             <-  natB  <-  b
                                      <-  natC  <-  c      (c is behind two NATs)
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.nettopo import Topology, have_netns_support
from tests.relaynet import CLIENT, SERVER, RelayNetwork

SUPPORTED, WHY_NOT = have_netns_support()
pytestmark = pytest.mark.skipif(not SUPPORTED, reason="needs root, ip netns, iptables and /dev/net/tun: %s" % WHY_NOT)
PEER = os.path.join(ROOT, "tests", "udp_peer.py")
BROADCAST = "198.18.0.255"
BUDGET_PPS = 40


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    with Topology() as topo:
        network = RelayNetwork(topo, tmp_path_factory.mktemp("lan"), keepalive=6)
        network.start_server(options={"multicast_packets_per_second": BUDGET_PPS})
        for name in topo.clients:
            network.start_client(name)
        yield network


def server_status(net):
    return json.loads(net.topo.run("srv", [net.python, SERVER, "--control", net.control_socket, "status", "--json"]).stdout)


def listeners(net, names, port, *extra):
    procs = {}
    for name in names:
        procs[name] = net.topo.spawn(name, [sys.executable, "-u", PEER, "listen", str(port), "--seconds", "30"] + list(extra))
        procs[name].wait_for(r"listening on")
    return procs


def heard(proc, source, destination=None):
    """The datagrams proc printed from source (to destination), as (destination, first line)."""
    found = []
    for line in proc.lines():
        words = line.split(" ", 5)
        if words[0] == "got" and words[1] == source and destination in (None, words[3]):
            found.append((words[3], words[5] if len(words) > 5 else ""))
    return found


def wait_heard(proc, source, destination, count, timeout=10):
    """Whether proc prints count datagrams from source to destination within timeout."""
    deadline = time.monotonic() + timeout
    while len(heard(proc, source, destination)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(heard(proc, source, destination)) >= count


def send(net, name, address, port, text, *extra, timeout=30):
    return net.topo.run(name, [sys.executable, PEER, "send", address, str(port), text] + list(extra), timeout=timeout).stdout


def test_a_broadcast_reaches_every_other_device_and_the_relay_host_but_not_its_sender(net):
    procs = listeners(net, ("a", "b", "srv"), 40001)
    before = net.client_status("c")["packets_in"]
    try:
        send(net, "c", BROADCAST, 40001, "subnet-broadcast", "--count", "3", "--rate", "20")
        send(net, "c", "255.255.255.255", 40001, "limited-broadcast", "--count", "3", "--rate", "20", "--device", "mnedc0")
        for name, proc in procs.items():
            assert wait_heard(proc, net.vip["c"], "255.255.255.255", 3), (name, proc.tail())
            assert len(heard(proc, net.vip["c"], BROADCAST)) == 3, (name, proc.tail())
            time.sleep(0.2)     # nothing more arrives
            assert len(heard(proc, net.vip["c"], "255.255.255.255")) == 3, (name, proc.tail())
    finally:
        for proc in procs.values():
            proc.stop()
    assert net.client_status("c")["packets_in"] == before, "the relay sent a broadcast back to its sender"
    assert server_status(net)["totals"]["broadcasts"] >= 6


def test_an_ssdp_search_finds_a_responder_behind_another_nat_and_other_groups_need_the_operator(net):
    answer = "HTTP/1.1 200 OK\\r\\nST: upnp:rootdevice\\r\\nLOCATION: http://%s:49152/description.xml\\r\\n" % net.vip["b"]
    responder = listeners(net, ("b",), 1900, "--join", "239.255.255.250", "--on", net.vip["b"], "--answer", answer)["b"]
    search = "M-SEARCH * HTTP/1.1\\r\\nHOST: 239.255.255.250:1900\\r\\nMAN: \"ssdp:discover\"\\r\\nMX: 1\\r\\nST: upnp:rootdevice\\r\\n"
    try:
        replies = send(net, "c", "239.255.255.250", 1900, search, "--on", net.vip["c"], "--replies", "3")
        assert "reply %s 1900 HTTP/1.1 200 OK" % net.vip["b"] in replies, replies
        assert "LOCATION: http://%s:49152/description.xml" % net.vip["b"] in replies, replies
        assert heard(responder, net.vip["c"], "239.255.255.250")[0][1] == "M-SEARCH * HTTP/1.1"
    finally:
        responder.stop()
    # 239.1.2.3 is no link-local group: dropped and counted, until the operator lists it
    group = listeners(net, ("a",), 40002, "--join", "239.1.2.3", "--on", net.vip["a"])["a"]
    try:
        mark = len(net.server.lines())
        send(net, "c", "239.1.2.3", 40002, "unlisted-group", "--on", net.vip["c"], "--count", "2")
        net.server.wait_for(r"dropped packet from device device-c .*multicast group not relayed", start=mark)
        with net.reloaded("multicast_groups = 239.1.2.3\n"):
            send(net, "c", "239.1.2.3", 40002, "listed-group", "--on", net.vip["c"], "--count", "2")
            group.wait_for(r"got %s \d+ 239.1.2.3 .*listed-group" % re.escape(net.vip["c"]))
        assert not [line for line in heard(group, net.vip["c"]) if "unlisted" in line[1]], group.tail()
    finally:
        group.stop()


def test_the_policy_of_each_receiver_applies_to_broadcasts(net, tmp_path):
    policy = tmp_path / "policy"
    policy.write_text("deny device-c -> device-b\nallow * -> *\n")
    procs = listeners(net, ("a", "b"), 40003)
    try:
        with net.reloaded("policy_file = %s\n" % policy):
            send(net, "c", BROADCAST, 40003, "judged-per-receiver", "--count", "3", "--rate", "20")
            procs["a"].wait_for(r"judged-per-receiver")
            send(net, "a", BROADCAST, 40003, "from-a-still-reaches-b", "--count", "1")
            procs["b"].wait_for(r"from-a-still-reaches-b")
        assert heard(procs["a"], net.vip["c"]) and not heard(procs["b"], net.vip["c"]), procs["b"].tail()
    finally:
        for proc in procs.values():
            proc.stop()


def iperf3_mbits(net, source, target, seconds=2):
    server = net.topo.spawn(target, ["iperf3", "-s", "-1", "-B", net.vip[target], "-p", "5301"])
    try:
        deadline = time.monotonic() + 10
        while not net.topo.run(target, ["ss", "-Hltn", "sport = :5301"]).stdout.strip():
            assert time.monotonic() < deadline, server.tail()
            time.sleep(0.05)
        result = net.topo.run(source, ["iperf3", "-J", "-c", net.vip[target], "-p", "5301", "-t", str(seconds)],
                              timeout=seconds + 20)
        return json.loads(result.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        server.stop()


def test_a_device_over_its_broadcast_budget_is_cut_to_it_while_unicast_between_the_others_flows(net):
    baseline = iperf3_mbits(net, "a", "b")
    procs = listeners(net, ("a",), 40004)
    dropped_before = server_status(net)["totals"]["drops"].get("over its broadcast budget", 0)
    seconds, rate = 3.0, 1000
    flood = net.topo.spawn("c", [sys.executable, "-u", PEER, "send", BROADCAST, "40004", "flood", "--size", "200",
                                 "--count", str(int(seconds * rate)), "--rate", str(rate)])
    try:
        during = iperf3_mbits(net, "a", "b")
        flood.wait_for(r"sent \d+ in", timeout=30)
        time.sleep(0.5)
    finally:
        flood.stop()
        for proc in procs.values():
            proc.stop()
    got = len(heard(procs["a"], net.vip["c"]))
    status = server_status(net)
    dropped = status["totals"]["drops"].get("over its broadcast budget", 0) - dropped_before
    print("c broadcast %d packets in %.0f s; a got %d (budget %d/s); a -> b %.0f Mbit/s alone, %.0f during the flood"
          % (seconds * rate, seconds, got, BUDGET_PPS, baseline, during))
    # at most the budget's second of burst, then its rate, for as long as the flood lasted (with slack for a slow start)
    assert BUDGET_PPS <= got <= BUDGET_PPS * (seconds + 2), got
    assert dropped >= seconds * rate - got - BUDGET_PPS * 2, (dropped, got)
    assert got + dropped >= seconds * rate * 0.9, "the relay did not see the flood"
    assert during >= baseline * 0.5, (baseline, during)


BUS_CONFIG = """<busconfig><type>system</type><listen>unix:path=%s</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow own="*"/>
<allow send_type="method_call"/><allow send_type="method_return"/><allow send_type="signal"/><allow send_type="error"/>
<allow receive_type="method_call"/><allow receive_type="method_return"/><allow receive_type="signal"/><allow receive_type="error"/>
</policy></busconfig>
"""
AVAHI_STOCK = """[server]
host-name=%s
use-ipv4=yes
use-ipv6=yes
allow-interfaces=mnedc0
enable-dbus=yes

[publish]
publish-hinfo=no
publish-workstation=no
"""


def avahi_on(net, name, workdir, stack):
    """avahi-daemon in namespace name on its own D-Bus, with the configuration install.sh
    made of a stock one (tests/test_install.py checks that edit; here the real daemon reads it).
    Returns the environment that reaches its bus."""
    root = os.path.join(workdir, "root-" + name)
    conf = os.path.join(root, "etc", "avahi", "avahi-daemon.conf")
    os.makedirs(os.path.dirname(conf))
    with open(conf, "w") as sink:
        sink.write(AVAHI_STOCK % ("mnedc-" + name))
    client_ini = os.path.join(workdir, "client-%s-install.ini" % name)
    with open(client_ini, "w") as sink:
        sink.write("[client]\nserver = 192.0.2.1\n")
    installed = subprocess.run(["sh", os.path.join(ROOT, "install.sh"), "client", "--init", "sysv", "--root", root,
                                "--config", client_ini], capture_output=True, text=True, timeout=120)
    assert "set allow-point-to-point=yes" in installed.stdout, installed.stdout + installed.stderr
    bus = os.path.join(workdir, "bus-" + name)
    with open(bus + ".conf", "w") as sink:
        sink.write(BUS_CONFIG % bus)
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS="unix:path=" + bus)
    stack.append(net.topo.spawn(name, ["dbus-daemon", "--config-file=" + bus + ".conf", "--nofork", "--nopidfile",
                                       "--print-address"]))
    stack[-1].wait_for(r"unix:path=")
    # each `ip netns exec` has a mount namespace of its own: a tmpfs there gives this daemon its
    # own /run/avahi-daemon (pid file, socket) without touching the host's
    stack.append(net.topo.spawn(name, ["sh", "-c", "mkdir -p /run/avahi-daemon && mount -t tmpfs tmpfs /run/avahi-daemon && "
                                       "exec avahi-daemon -f %s --no-drop-root --no-chroot --no-rlimits" % conf], env=env))
    stack[-1].wait_for(r"Server startup complete", timeout=20)
    return env


def test_avahi_on_a_device_behind_one_nat_resolves_a_service_published_behind_two(net, tmp_path):
    stack = []
    try:
        env_c = avahi_on(net, "c", str(tmp_path), stack)
        env_a = avahi_on(net, "a", str(tmp_path), stack)
        stack.append(net.topo.spawn("c", ["avahi-publish", "-s", "kitchen-web", "_http._tcp", "8080", "path=/status"], env=env_c))
        stack[-1].wait_for(r"Established under name 'kitchen-web'", timeout=20)
        browse = net.topo.spawn("a", ["avahi-browse", "-r", "-p", "_http._tcp"], env=env_a)
        stack.append(browse)
        found = browse.wait_for(r"^=;mnedc0;IPv4;kitchen-web;.*", timeout=20).group(0)
        assert found.split(";")[6:10] == ["mnedc-c.local", net.vip["c"], "8080", '"path=/status"'], found
        ipv6_of_c = [address.split("/")[0] for address in net.client_status("c")["ipv6"]]
        found = browse.wait_for(r"^=;mnedc0;IPv6;kitchen-web;.*", timeout=20).group(0)      # over IPv6: ff02::fb
        assert found.split(";")[7] in ipv6_of_c and found.split(";")[8:10] == ["8080", '"path=/status"'], found
        resolved = net.topo.run("a", ["avahi-resolve", "-4", "-n", "mnedc-c.local"], env=env_a, timeout=20).stdout
        assert resolved.split() == ["mnedc-c.local", net.vip["c"]], resolved
        resolved = net.topo.run("a", ["avahi-resolve", "-6", "-n", "mnedc-c.local"], env=env_a, timeout=20).stdout
        assert resolved.split()[0] == "mnedc-c.local" and resolved.split()[1] in ipv6_of_c, resolved
    finally:
        for proc in reversed(stack):
            proc.stop()


def dig(net, name, *query, check=True):
    return net.topo.run(name, ["dig", "+time=2", "+tries=1", "@" + net.server_vip] + list(query), timeout=20, check=check).stdout


def test_the_relay_answers_dns_for_its_devices_over_udp_and_tcp(net):
    assert dig(net, "c", "device-a.mnedc", "A", "+short").split() == [net.vip["a"]]
    assert dig(net, "c", "DEVICE-B.Mnedc", "A", "+short", "+tcp").split() == [net.vip["b"]]
    assert dig(net, "a", "-x", net.vip["c"], "+short").split() == ["device-c.mnedc."]
    full = dig(net, "a", "device-c.mnedc", "A")
    assert "status: NOERROR" in full and " aa" in full.split("flags:")[1].split(";")[0], full
    assert "status: NXDOMAIN" in dig(net, "a", "nobody.mnedc", "A")
    assert "status: REFUSED" in dig(net, "a", "example.com", "A"), "the relay is no recursive resolver"
    nodata = dig(net, "a", "device-c.mnedc", "MX")
    assert "status: NOERROR" in nodata and "ANSWER: 0" in nodata and "SOA" in nodata, nodata
    assert server_status(net)["totals"]["dns_queries"] >= 7


def test_ping_by_name_works_with_the_one_resolv_conf_line_and_the_underlay_gets_no_answer(net):
    net.topo.etc_file("c", "resolv.conf", "nameserver %s\n" % net.server_vip)
    assert net.topo.ping("c", "device-a.mnedc", count=1, timeout_s=5), "ping device-a.mnedc from c"
    # natA routes 198.18.0.1 to the relay host over the underlay: the kernel would take it there
    # (any local address on any interface), the responder does not
    underlay = net.topo.run("natA", ["dig", "+time=1", "+tries=1", "@" + net.server_vip, "device-a.mnedc"],
                            check=False, timeout=20)
    assert underlay.returncode == 9 and "ANSWER SECTION" not in underlay.stdout, underlay.stdout   # 9: no reply


def test_a_member_flooding_the_dns_is_cut_to_its_rate(net):
    flood = ("import socket, struct, time\n"
             "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)\n"
             "query = lambda n: struct.pack('!HHHHHH', n, 0x0100, 1, 0, 0, 0) + b'\\x08device-a\\x05mnedc\\x00' + struct.pack('!HH', 1, 1)\n"
             "for n in range(300): s.sendto(query(n), ('%s', 53))\n"
             "got = 0\n"
             "try:\n"
             "    while True: s.recv(512); got += 1\n"
             "except socket.timeout: pass\n"
             "print(got)\n" % net.server_vip)
    before = server_status(net)["totals"]["dns_unanswered"]
    answered = int(net.topo.run("b", [sys.executable, "-c", flood], timeout=30).stdout)
    unanswered = server_status(net)["totals"]["dns_unanswered"] - before
    assert 20 <= answered <= 60 and unanswered >= 240, (answered, unanswered)
    assert dig(net, "a", "device-b.mnedc", "+short").split() == [net.vip["b"]], "others are still answered"


def test_hosts_prints_a_line_per_device_for_scripts(net):
    result = net.topo.run("c", [net.python, CLIENT, "-c", os.path.join(net.workdir, "client-c.ini"), "hosts"], timeout=30)
    lines = [line.split() for line in result.stdout.splitlines() if not line.startswith("#")]
    assert sorted(lines) == sorted([[net.vip[name], "device-%s.mnedc" % name, "device-" + name] for name in ("a", "b", "c")]), result.stdout


RESOLVECTL = """#!/bin/sh
printf '%%s\\n' "$*" >> %s
"""


def test_where_systemd_resolved_runs_the_client_routes_the_domain_to_the_relay_and_reverts_at_stop(net, tmp_path):
    """systemd-resolved cannot run in a namespace here: a resolvectl on PATH records what the
    client asks of it, in a mount namespace where /run/systemd/resolve exists (as it does
    while resolved runs)."""
    calls = tmp_path / "calls"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "resolvectl").write_text(RESOLVECTL % calls)
    (fake / "resolvectl").chmod(0o755)
    config = net.write_config("client-d", "client", {
        "server": net.relay_host, "secret_file": net.secret_path, "device_id": "device-d", "interface": "mnedc1",
        "server_pin": net.pin, "domain": "Home.Example", "control_socket": os.path.join(net.workdir, "client-d.sock")})
    # natA: a namespace with no MNEDC client of its own (the test's own route to the network)
    proc = net.topo.spawn("natA", ["sh", "-c", "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/resolve && "
                                "PATH=%s:$PATH exec %s -u %s -c %s" % (fake, net.python, CLIENT, config)])
    try:
        address = proc.wait_for(r"connected to relay \S+ as (\S+)/", timeout=30).group(1)
        proc.wait_for(r"systemd-resolved sends \*\.home\.example to %s on mnedc1" % re.escape(net.server_vip))
        assert calls.read_text().splitlines() == ["dns mnedc1 %s" % net.server_vip, "domain mnedc1 ~home.example"]
        assert address
    finally:
        proc.stop()
    assert calls.read_text().splitlines()[-1] == "revert mnedc1"


@pytest.mark.parametrize("layout", ["conf-file", "conf-dir"])
def test_where_dnsmasq_reads_the_servers_file_the_client_routes_the_domain_to_the_relay_and_takes_it_back(net, tmp_path, layout):
    """A real dnsmasq in natC (a namespace with no MNEDC client of its own), its servers file
    named as OpenWrt's generated -C file names it, or as Debian's does: a file in the conf-dir
    its command line gives (-7 /etc/dnsmasq.d,.dpkg-dist,...), where install.sh puts it."""
    servers = tmp_path / "dnsmasq.servers"
    servers.write_text("")                  # install.sh makes it
    conf = tmp_path / "dnsmasq.conf"
    base = "port=53\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\nno-hosts\nuser=root\n"
    if layout == "conf-file":
        conf.write_text(base + "servers-file=%s\n" % servers)
        where = ["-C", str(conf)]
    else:
        conf.write_text(base)
        (tmp_path / "dnsmasq.d").mkdir()
        (tmp_path / "dnsmasq.d" / "mnedc").write_text("servers-file=%s\n" % servers)
        where = ["-C", str(conf), "-7", "%s,.dpkg-dist,.dpkg-old" % (tmp_path / "dnsmasq.d")]
    dnsmasq = net.topo.spawn("natC", ["dnsmasq", "-k"] + where + ["--pid-file=%s" % (tmp_path / "pid"),
                                                                 "--log-facility=-"])
    config = net.write_config("client-e", "client", {
        "server": net.relay_host, "secret_file": net.secret_path, "device_id": "device-e", "interface": "mnedc1",
        "server_pin": net.pin, "dnsmasq_servers": str(servers),
        "control_socket": os.path.join(net.workdir, "client-e.sock")})
    client = None
    try:
        dnsmasq.wait_for(r"started, version", timeout=10)
        client = net.topo.spawn("natC", [net.python, "-u", CLIENT, "-c", config])
        client.wait_for(r"dnsmasq \(pid %d\) sends \*\.mnedc to %s" % (dnsmasq.pid, re.escape(net.server_vip)), timeout=30)
        assert servers.read_text() == "server=/mnedc/%s\n" % net.server_vip
        asked = net.topo.run("natC", ["dig", "+time=2", "+tries=1", "+short", "@127.0.0.1", "device-a.mnedc"], timeout=20)
        assert asked.stdout.split() == [net.vip["a"]], asked.stdout
    finally:
        if client is not None:
            client.stop()
    try:
        assert servers.read_text() == "", "the client takes its line back at stop"
        after = net.topo.run("natC", ["dig", "+time=2", "+tries=1", "@127.0.0.1", "device-a.mnedc"], timeout=20, check=False)
        assert "ANSWER SECTION" not in after.stdout, after.stdout
    finally:
        dnsmasq.stop()
