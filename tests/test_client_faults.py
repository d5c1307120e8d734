"""The client bugs found in field trials (issue #12, part 2), against live processes: a resolver
that never answers, SIGHUP, a list of relay addresses, and the return after a relay crash."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import SUMMARY
from tests.nettopo import Topology, have_netns_support
from tests.relaynet import RelayNetwork
from tests.streamnet import StreamNet, TcpServer, echo, free_port
from tests.wire_peer import CLIENT

import mnedc_client

SUPPORTED, WHY_NOT = have_netns_support()
needs_netns = pytest.mark.skipif(not SUPPORTED, reason="needs root, ip netns and /dev/net/tun: %s" % WHY_NOT)

# A DNS server that takes every query and never answers; it says when one arrives.
SILENT_DNS = r"""
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", 53))
sock.settimeout(120)
print("silent dns ready", flush=True)
for _ in range(1000):
    data, peer = sock.recvfrom(512)
    print("query from %s:%d" % peer, flush=True)
"""


def silent_resolver(topo, name):
    """Namespace name resolves through a DNS server that never answers (glibc would wait
    30 s x 3 attempts for each query)."""
    topo.etc_file(name, "resolv.conf", "nameserver 127.0.0.1\noptions timeout:30 attempts:3\n")
    topo.etc_file(name, "hosts", "127.0.0.1 localhost\n")
    dns = topo.spawn(name, [sys.executable, "-u", "-c", SILENT_DNS])
    dns.wait_for("silent dns ready", timeout=10)
    return dns


def stops_within(proc, seconds):
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(seconds + 5)
    return code, time.monotonic() - started


@needs_netns
def test_a_resolver_that_never_answers_freezes_nothing(tmp_path):
    with Topology(layout="flat", clients=1) as topo:
        dns = silent_resolver(topo, "c1")
        net = RelayNetwork(topo, tmp_path, relay_host="relay.test", tls=False)    # no relay: nothing to pin
        tun = net.start_client("c1", wait=False)
        dns.wait_for("query from", timeout=10)          # the lookup is under way and stuck
        code, took = stops_within(tun, 2)
        assert code == 0 and took < 2, (code, took, tun.tail())
        assert "mnedc0" not in topo.run("c1", ["ip", "-o", "link"]).stdout

        config = net.write_config("stream", "client", {"server": "relay.test", "secret_file": net.secret_path,
                                                       "device_id": "streamer", "tls": "no"})
        mark = len(dns.lines())
        listen = topo.spawn("c1", [sys.executable, "-u", CLIENT, "-c", config, "listen", "--forward=9", "9"])
        dns.wait_for("query from", timeout=10, start=mark)
        code, took = stops_within(listen, 2)
        assert code == 0 and took < 2, (code, took, listen.tail())

        started = time.monotonic()
        services = topo.run("c1", [sys.executable, CLIENT, "-c", config, "services"], timeout=30, check=False)
        took = time.monotonic() - started
        assert services.returncode == 1 and took < mnedc_client.RESOLVE_TIMEOUT_S + 3, (took, services.stderr)
        assert "cannot resolve relay.test: the resolver did not answer within 10 s" in services.stderr


def test_sighup_reloads_a_stream_client_and_never_kills_it(tmp_path):
    net = StreamNet(tmp_path)
    target = TcpServer(echo)
    try:
        listen = net.listen("dev-a", "--forward=%d" % target.port, "7")
        config = net.config("dev-a")
        with open(config, "a") as sink:
            sink.write("log_level = debug\n")
        listen.send_signal(signal.SIGHUP)
        listen.wait_for(r"received SIGHUP: reloaded %s$" % re.escape(config), timeout=5)
        with open(config, "a") as sink:
            sink.write("interface = other0\n")
        mark = len(listen.lines())
        listen.send_signal(signal.SIGHUP)
        listen.wait_for(r"reloaded .*; interface changed, which takes a restart", timeout=5, start=mark)
        with open(config, "a") as sink:
            sink.write("keepalive = many\n")
        listen.send_signal(signal.SIGHUP)
        listen.wait_for(r"configuration is not usable, so the running one stays: .*keepalive", timeout=5)
        assert listen.alive()
        assert net.run("dev-b", "connect", "dev-a", "7", input=b"after three SIGHUPs").stdout == b"after three SIGHUPs"
    finally:
        target.close()
        net.stop()


@needs_netns
def test_sighup_keeps_a_tun_client_and_its_interface(tmp_path):
    with Topology(layout="flat", clients=2) as topo:
        net = RelayNetwork(topo, tmp_path).start()
        client = net.clients["c1"]
        mark = len(client.lines())
        client.send_signal(signal.SIGHUP)
        client.wait_for(r"received SIGHUP: reloaded", timeout=5, start=mark)
        assert client.alive()
        assert "mnedc0" in topo.run("c1", ["ip", "-o", "link"]).stdout
        assert topo.ping("c1", net.vip["c2"], count=2)


def test_a_list_of_relay_addresses_is_tried_in_order(tmp_path):
    net = StreamNet(tmp_path, relay_host="localhost")
    dead = free_port()
    try:
        config = os.path.join(str(tmp_path), "two.ini")
        with open(config, "w") as sink:
            sink.write("[client]\nserver = 127.0.0.1:%d, localhost:%d\nsecret = %s\ndevice_id = dev-two\n"
                       "server_pin = %s\n" % (dead, net.port, net.secret.decode(), net.pin))
        result = subprocess.run([sys.executable, CLIENT, "-c", config, "services"], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert "cannot reach the relay at 127.0.0.1:%d: connection refused; trying localhost:%d" \
            % (dead, net.port) in result.stderr
        with open(config, "w") as sink:
            sink.write("[client]\nserver = 127.0.0.1:%d, 127.0.0.2:%d\nsecret = %s\nserver_pin = %s\n"
                       % (dead, dead, net.secret.decode(), net.pin))
        result = subprocess.run([sys.executable, CLIENT, "-c", config, "services"], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 1
        assert "trying 127.0.0.2:%d" % dead in result.stderr
        assert "cannot reach the relay at 127.0.0.2:%d: connection refused" % dead in result.stderr
    finally:
        net.stop()


def test_backoff_has_jitter_at_every_step_and_never_passes_its_cap():
    client = mnedc_client.RelayClient.__new__(mnedc_client.RelayClient)
    client.quick_retry_until = 0.0
    for step in range(25):
        samples = []
        for _ in range(60):
            client.failures = step
            samples.append(client.next_backoff_s())
        base = min(mnedc_client.MAX_BACKOFF_S / 1.5, mnedc_client.MIN_BACKOFF_S * 2 ** step)
        assert all(base <= delay <= base * 1.5 <= mnedc_client.MAX_BACKOFF_S for delay in samples), (step, samples)
        assert max(samples) - min(samples) > base * 0.2, (step, samples)    # spread, not lockstep
    assert client.failures == 25


def test_after_a_healthy_link_the_first_retries_are_quick_then_the_backoff_resumes():
    client = mnedc_client.RelayClient.__new__(mnedc_client.RelayClient)
    client.failures = 0
    client.quick_retry_until = time.monotonic() + 60
    quick = [client.next_backoff_s() for _ in range(40)]
    low, high = mnedc_client.QUICK_RETRY_S
    assert all(low <= delay <= high for delay in quick) and max(quick) - min(quick) > 0.5
    client.quick_retry_until = time.monotonic() - 1
    assert [int(client.next_backoff_s()) for _ in range(3)] in ([1, 2, 4], [1, 2, 5], [1, 3, 4], [1, 3, 5])


def kill_relay_and_bring_it_back(net, outage_s):
    """SIGKILL the relay of net (a StreamNet or a RelayNetwork; no RESTARTING notice), restart
    it after outage_s on the same port and state; the monotonic time it was ready again."""
    net.server.send_signal(signal.SIGKILL)
    net.server.wait(10)
    time.sleep(outage_s)                # the outage itself: what this test measures around
    net.start_server()
    return time.monotonic()


def test_a_relay_back_from_a_crash_carries_traffic_again_within_seconds(tmp_path):
    """With the backoff alone, attempts at 1, 3, 7, 15 s (+50 % jitter) after the loss would
    leave a relay that is back after 10.5 s unused for at least 4 s."""
    net = StreamNet(tmp_path)
    target = TcpServer(echo)
    try:
        listen = net.listen("dev-a", "--forward=%d" % target.port, "7")
        time.sleep(mnedc_client.HEALTHY_LINK_S + 0.5)    # the link has been healthy for a while
        lost = time.monotonic()
        mark = len(listen.lines())
        ready = kill_relay_and_bring_it_back(net, 10.5)
        listen.wait_for(r"listening on virtual port 7", timeout=40, start=mark)
        back = time.monotonic()
        assert net.run("dev-b", "connect", "dev-a", "7", input=b"back").stdout == b"back"
        traffic = time.monotonic()
        SUMMARY.append(("relay crash, stream mode", [
            "outage %.1f s; relay ready -> listener registered %.2f s, -> first stream done %.2f s; "
            "relay lost -> traffic %.1f s" % (ready - lost, back - ready, traffic - ready, traffic - lost)]))
        assert back - ready <= mnedc_client.QUICK_RETRY_S[1] + 0.5, (back - ready, listen.tail())
    finally:
        target.close()
        net.stop()


@needs_netns
def test_tun_traffic_resumes_within_seconds_of_a_crashed_relay_returning(tmp_path):
    with Topology(layout="flat", clients=2) as topo:
        net = RelayNetwork(topo, tmp_path).start()
        ping = topo.spawn("c1", ["ping", "-n", "-i", "0.2", "-c", "400", "-W", "1", net.vip["c2"]])
        ping.wait_for(r"bytes from", timeout=10)
        time.sleep(mnedc_client.HEALTHY_LINK_S + 0.5)
        lost = time.monotonic()
        ready = kill_relay_and_bring_it_back(net, 10.5)
        mark = len(ping.lines())        # none came during the outage: at worst one reply is missed
        ping.wait_for(r"bytes from", timeout=40, start=mark)
        resumed = time.monotonic()
        SUMMARY.append(("relay crash, TUN mode", [
            "outage %.1f s; relay ready -> ping replies again %.2f s; relay lost -> traffic %.1f s"
            % (ready - lost, resumed - ready, resumed - lost)]))
        assert resumed - ready <= mnedc_client.QUICK_RETRY_S[1] + 1.0, resumed - ready
