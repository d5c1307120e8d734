"""Tests for the namespace topology helper (tests/nettopo.py).

Needs root and network-namespace support; the whole module is skipped otherwise.
"""

import ipaddress
import os
import signal
import subprocess
import sys

import pytest

from tests import nettopo
from tests.nettopo import Proc, Topology, have_netns_support, leftover_namespaces

_OK, _WHY = have_netns_support()
pytestmark = pytest.mark.skipif(not _OK, reason="network namespaces unavailable: " + _WHY)

PY = sys.executable

# Prints "ready", then the source address of the first UDP datagram / TCP connection.
UDP_LISTENER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
data, peer = s.recvfrom(100)
print("peer %s %s" % (peer[0], data.decode()), flush=True)
"""
TCP_LISTENER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(1)
print("ready", flush=True)
conn, peer = s.accept()
print("peer %s %s" % (peer[0], conn.recv(100).decode()), flush=True)
"""
UDP_SEND = ("import socket,sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
            ".sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))")
TCP_SEND = ("import socket,sys; c=socket.create_connection((sys.argv[1], int(sys.argv[2])), 5);"
            " c.sendall(sys.argv[3].encode()); c.close()")


def pid_gone(pid):
    """True if no (non-zombie) process with this PID exists."""
    return not nettopo._pid_running(pid)


def netns_inode(path):
    return os.stat(path).st_ino


@pytest.fixture(scope="module")
def nested():
    topo = Topology()
    with topo:
        yield topo
    assert topo.teardown_errors == []
    assert leftover_namespaces(topo.prefix) == []


# --------------------------------------------------------------------------
# Plans (pure data)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("layout,clients", [("nested", 3), ("flat", 1), ("flat", 62)])
def test_plan_uses_only_test_nets(layout, clients):
    plan = Topology(layout=layout, clients=clients).plan
    test_nets = [ipaddress.ip_network(n) for n in
                 ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]
    for ip in plan.all_ips():
        assert any(ip in net for net in test_nets), ip
    for v in plan.veths:
        assert len(v.if1) <= 15 and len(v.if2) <= 15


def test_prefix_and_names():
    topo = Topology()
    assert topo.prefix.startswith("mnt") and len(topo.prefix) == 10
    assert topo.names == ["srv", "natA", "a", "natB", "b", "natC", "c"]
    assert topo.clients == ["a", "b", "c"]
    assert topo.ns("natB") == topo.prefix + "natB"
    assert topo.addr("a") == "198.51.100.2"
    assert topo.public_addr("c") == "192.0.2.6"
    assert Topology().prefix != topo.prefix
    with pytest.raises(KeyError):
        topo.ns("nope")
    with pytest.raises(ValueError):
        Topology(layout="flat", clients=0)


# --------------------------------------------------------------------------
# Nested layout
# --------------------------------------------------------------------------

@pytest.mark.parametrize("client", ["a", "b", "c"])
def test_clients_reach_server(nested, client):
    assert nested.ping(client, nested.server_ip), nested.dump()


@pytest.mark.parametrize("client", ["a", "b", "c"])
def test_server_cannot_reach_clients(nested, client):
    assert not nested.ping("srv", nested.addr(client), timeout_s=1)


def test_server_has_no_default_route(nested):
    routes = nested.run("srv", ["ip", "route"]).stdout
    assert "default" not in routes
    assert "198.51.100." not in routes and "203.0.113." not in routes


@pytest.mark.parametrize("client", ["a", "b", "c"])
def test_udp_source_is_nat_wan_address(nested, client):
    listener = nested.spawn("srv", [PY, "-u", "-c", UDP_LISTENER, "4000"])
    listener.wait_for("^ready$", timeout=5)
    nested.run(client, [PY, "-c", UDP_SEND, nested.server_ip, "4000", "hi-" + client])
    m = listener.wait_for(r"^peer (\S+) (\S+)$", timeout=5)
    assert m.group(2) == "hi-" + client
    assert m.group(1) == nested.public_addr(client)
    assert listener.wait(5) == 0


def test_tcp_from_doubly_natted_client_arrives_from_natb(nested):
    listener = nested.spawn("srv", [PY, "-u", "-c", TCP_LISTENER, "4001"])
    listener.wait_for("^ready$", timeout=5)
    nested.run("c", [PY, "-c", TCP_SEND, nested.server_ip, "4001", "hello"])
    m = listener.wait_for(r"^peer (\S+) (\S+)$", timeout=5)
    assert m.groups() == ("192.0.2.6", "hello")


def test_spawned_pid_is_the_program_inside_the_namespace(nested):
    p = nested.spawn("b", [PY, "-u", "-c", "import time; print('up'); time.sleep(30)"])
    p.wait_for("^up$", timeout=5)
    # `ip netns exec` execs in place: same PID, now running python in b's netns.
    with open("/proc/%d/cmdline" % p.pid, "rb") as f:
        assert os.path.basename(f.read().split(b"\0")[0]).startswith(b"python")
    assert netns_inode("/proc/%d/ns/net" % p.pid) == \
        netns_inode("/run/netns/" + nested.ns("b"))
    assert p.stop() == -signal.SIGTERM
    assert p.stop() == -signal.SIGTERM  # idempotent
    assert pid_gone(p.pid)


def test_run_reports_output_on_failure(nested):
    with pytest.raises(nettopo.CommandError) as ei:
        nested.run("a", ["sh", "-c", "echo to-out; echo to-err >&2; exit 3"])
    msg = str(ei.value)
    assert "to-out" in msg and "to-err" in msg and "3" in msg
    assert nested.run("a", ["sh", "-c", "exit 4"], check=False).returncode == 4


# --------------------------------------------------------------------------
# Flat layout and teardown
# --------------------------------------------------------------------------

def test_flat_two_clients():
    with Topology(layout="flat", clients=2) as topo:
        assert topo.clients == ["c1", "c2"]
        assert [topo.addr(c) for c in topo.clients] == ["192.0.2.2", "192.0.2.6"]
        for c in topo.clients:
            assert topo.ping(c, topo.server_ip)
        assert topo.ping("srv", topo.addr("c2"))  # no NAT: srv reaches clients
        assert not topo.ping("c1", topo.addr("c2"), timeout_s=1)  # srv doesn't forward
        sleeper = topo.spawn("c1", ["sleep", "60"])
    assert topo.teardown_errors == []
    assert leftover_namespaces(topo.prefix) == []
    assert pid_gone(sleeper.pid)


def test_teardown_on_exception_in_with_block():
    topo = Topology(layout="flat", clients=1)
    with pytest.raises(RuntimeError, match="boom"):
        with topo:
            # One that exits on SIGTERM, one that ignores it (forces SIGKILL).
            plain = topo.spawn("srv", ["sleep", "60"])
            stubborn = topo.spawn("c1", [PY, "-u", "-c",
                                         "import signal,time; signal.signal(signal.SIGTERM,"
                                         " signal.SIG_IGN); print('armed'); time.sleep(60)"])
            stubborn.wait_for("armed", timeout=5)
            raise RuntimeError("boom")
    assert topo.teardown_errors == []
    assert leftover_namespaces(topo.prefix) == []
    assert pid_gone(plain.pid) and pid_gone(stubborn.pid)
    assert stubborn.returncode == -signal.SIGKILL
    assert topo.teardown() == []  # second call is a harmless no-op


def test_teardown_when_build_fails_half_way(monkeypatch):
    def broken(self):
        raise RuntimeError("injected failure")
    monkeypatch.setattr(Topology, "_add_routes", broken)
    topo = Topology()
    with pytest.raises(RuntimeError, match="injected failure"):
        with topo:
            pytest.fail("body must not run")
    assert leftover_namespaces(topo.prefix) == []


def test_teardown_kills_unregistered_processes_in_namespace():
    with Topology(layout="flat", clients=1) as topo:
        # A daemonising child escapes Proc tracking; the netns sweep gets it.
        out = topo.run("c1", ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"]).stdout
        orphan = int(out.strip())
        assert not pid_gone(orphan)
    assert topo.teardown_errors == []
    assert pid_gone(orphan)


# --------------------------------------------------------------------------
# Proc without a namespace
# --------------------------------------------------------------------------

def test_proc_wait_for_and_output():
    p = Proc.start([PY, "-u", "-c", "print('one'); print('two'); print('one again')"])
    assert p.wait_for("one").group(0) == "one"
    assert p.wait_for("one", start=1).string == "one again"
    assert p.wait(5) == 0
    assert p.lines() == ["one", "two", "one again"]
    assert p.output() == "one\ntwo\none again"
    assert not p.alive()
    assert p.stop() == 0


def test_proc_wait_for_fails_fast_when_process_exits():
    p = Proc.start([PY, "-u", "-c", "import sys; print('last words'); sys.exit(2)"])
    with pytest.raises(AssertionError) as ei:
        p.wait_for("never", timeout=10)
    assert "last words" in str(ei.value) and "exit code 2" in str(ei.value)


def test_proc_wait_for_timeout_shows_output():
    p = Proc.start([PY, "-u", "-c", "import time; print('still here'); time.sleep(30)"])
    try:
        with pytest.raises(AssertionError) as ei:
            p.wait_for("never", timeout=0.5)
        assert "still here" in str(ei.value) and "timed out" in str(ei.value)
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait(0.1)
    finally:
        p.stop()
    assert pid_gone(p.pid)


def test_proc_stdin_pipe():
    p = Proc.start([PY, "-u", "-c", "import sys; print('got ' + sys.stdin.readline().strip())"],
                   stdin=subprocess.PIPE)
    p.stdin.write(b"ping\n")
    p.stdin.flush()
    assert p.wait_for("^got ping$", timeout=5)
    assert p.wait(5) == 0
