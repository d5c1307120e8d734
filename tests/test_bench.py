"""The benchmark runs (in its quick mode) and reports every path it promises, with figures."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.nettopo import have_netns_support

SUPPORTED, WHY_NOT = have_netns_support()


@pytest.mark.skipif(not SUPPORTED, reason="the benchmark needs root, ip netns and /dev/net/tun: %s" % WHY_NOT)
def test_bench_quick_measures_raw_mnedc_stream_mode_floor_and_scale(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--quick", "--no-openvpn",
                             "--output", str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    table = (tmp_path / "latest.md").read_text()
    for label in ("raw underlay", "MNEDC TUN a -> relay -> b, default settings (TLS)",
                  "MNEDC stream mode, forwarded port a -> b, default settings (TLS)",
                  "MNEDC TUN a -> relay -> b, tls = no",
                  "MNEDC TUN a -> relay -> b over IPv6 (ULA), default settings (TLS)",
                  "MNEDC over IPv6 / over IPv4 (TLS), throughput"):
        assert label in table
    figures = {m["name"]: m["median"] for m in json.loads((tmp_path / "latest.json").read_text())["measurements"]}
    assert set(figures) == {"raw", "mnedc", "stream", "mnedc-ipv6", "mnedc-plaintext", "floor", "scale", "scale-tun-50"}
    fleet = figures["scale-tun-50"]
    assert fleet["clients"] == 50 and fleet["tun"] and 0 < fleet["join_s"] < 10
    assert 0 < fleet["stall_join_ms"] < 5000 and 0 < fleet["stall_idle_ms"] < 5000
    assert figures["scale"]["clients"] == 50 and 0 < figures["scale"]["join_s"] < 10
    assert 0 < figures["scale"]["server_rss_mb"] < 200
    assert "seconds for 50 clients to join" in table
    for name in ("raw", "mnedc", "stream", "mnedc-ipv6", "mnedc-plaintext"):
        assert figures[name]["gbps"] > 0.01, (name, figures[name])
    assert figures["mnedc"]["rtt_ms"] > 0 and figures["mnedc"]["cpu_s_per_gb"] > 0
    assert figures["mnedc"]["peak_rss_client_kb"] > 1000
    # the least-work Python relay moved real traffic on both of its paths, in both loop styles
    assert figures["floor"]["gbps"] > 0.01 and figures["floor"]["cpu_s_per_gb"] > 0
    assert figures["floor"]["rtt_ms"] > 0 and figures["floor"]["rtt_ms_selectors"] > 0
    assert figures["floor"]["rtt_ms_tls"] > 0 and figures["floor"]["peak_rss_tls_client_kb"] > 1000
    assert "(floor) MNEDC RTT / least-work Python relay RTT, one selectors loop, TLS" in table
    assert "(floor) MNEDC stream mode / least-work Python stream chain" in table
    assert "(floor) MNEDC RTT / least-work Python relay RTT, one selectors loop" in table
