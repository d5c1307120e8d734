"""The TUN client waits for a missing server with growing, jittered delays, then joins."""

import re
import time

import pytest

from tests.nettopo import Topology, have_netns_support
from tests.relaynet import RelayNetwork

SUPPORTED, WHY_NOT = have_netns_support()
pytestmark = pytest.mark.skipif(not SUPPORTED, reason="needs root, ip netns and /dev/net/tun: %s" % WHY_NOT)


def test_backoff_grows_from_1_s_with_jitter_and_the_client_joins_when_the_server_comes(tmp_path):
    with Topology(layout="flat", clients=1) as topo:
        net = RelayNetwork(topo, tmp_path, tls=False)   # a client before any relay: no pin yet
        client = net.start_client("c1", wait=False, extra=["-v"])
        client.wait_for(r"attempt 4 failed", timeout=40)
        delays = [float(m.group(2)) for m in
                  (re.search(r"attempt (\d+) failed; next in ([\d.]+) s", l) for l in client.lines()) if m]
        for attempt, delay in enumerate(delays[:4], start=1):
            base = min(30.0, 2.0 ** (attempt - 1))       # 1, 2, 4, 8 s, each up to 50 % longer
            assert base <= delay <= base * 1.5, (attempt, delay, delays)
        assert len(set(delays[:4])) == 4
        assert "connection refused" in client.output()
        assert "mnedc0" in topo.run("c1", ["ip", "-o", "link"]).stdout    # the interface waits too
        started = time.monotonic()
        net.start_server()
        client.wait_for(r"connected to relay", timeout=20)
        assert time.monotonic() - started < 20          # the next attempt is at most 12 s away


def test_two_devices_with_one_device_id_back_off_instead_of_fighting(tmp_path):
    with Topology(layout="flat", clients=2) as topo:
        net = RelayNetwork(topo, tmp_path).start(names=[])
        first = net.start_client("c1", device_id="twin")
        started = time.monotonic()
        second = net.start_client("c2", device_id="twin")
        first.wait_for(r"another connection took over device_id twin", timeout=10)
        time.sleep(max(0.0, 12 - (time.monotonic() - started)))
        joins = [l for l in net.server.lines() if "device twin joined" in l]
        assert 2 <= len(joins) <= 4, joins          # fighting every second would be about 12
        assert second.alive() and first.alive()


@pytest.mark.parametrize("where", ["client", "server"])
def test_a_deleted_tun_interface_ends_the_daemon_with_status_1(tmp_path, where):
    with Topology(layout="flat", clients=1) as topo:
        net = RelayNetwork(topo, tmp_path).start()
        proc, namespace = (net.clients["c1"], "c1") if where == "client" else (net.server, "srv")
        topo.run(namespace, ["ip", "link", "del", "mnedc0"])
        proc.wait_for(r"interface mnedc0 failed", timeout=10)
        assert proc.wait(10) == 1          # so its supervisor starts it again with a fresh one
