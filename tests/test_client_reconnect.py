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
        net = RelayNetwork(topo, tmp_path)
        client = net.start_client("c1", wait=False, extra=["-v"])
        client.wait_for(r"attempt 4 failed", timeout=30)
        delays = [float(m.group(2)) for m in
                  (re.search(r"attempt (\d+) failed; next in ([\d.]+) s", l) for l in client.lines()) if m]
        assert delays[0] == 1.0
        for attempt, delay in enumerate(delays[1:4], start=2):
            ceiling = min(30.0, 2.0 ** (attempt - 1))
            assert max(1.0, ceiling / 2) <= delay <= ceiling, (attempt, delay, delays)
        assert "connection refused" in client.output()
        assert "mnedc0" in topo.run("c1", ["ip", "-o", "link"]).stdout    # the interface waits too
        started = time.monotonic()
        net.start_server()
        client.wait_for(r"connected to relay", timeout=20)
        assert time.monotonic() - started < 16          # the next attempt is at most 8 s away
