"""MNEDC benchmark: the raw path, MNEDC (TUN and stream mode) and OpenVPN on one topology, one run.

    sudo python3 bench/run.py [--runs 3] [--duration 3] [--quick] [--no-openvpn]

It builds the nested-NAT namespaces of the tests (tests/nettopo.py), then measures, each figure
the median of --runs runs:
  raw        iperf3 from a to srv over the underlay, no tunnel
  mnedc      a -> relay -> b through the TUN interfaces, with MNEDC's default settings (TLS,
             the relay's own certificate, pinned): one stream each way (-R) and 4 in parallel
  mnedc-plaintext  the same with tls = no on both ends
  stream     MNEDC stream mode, default settings (TLS): connect --forward on a, listen --forward on b
  openvpn    OpenVPN 2.6 in TCP mode on the same topology (bench/openvpn_peer.py): its default
             (AES-256-GCM, MTU 1500), set beside MNEDC's default, and its fastest plaintext
             setting (no cipher, no auth, tun-mtu 48000), set beside MNEDC's tls = no
  floor      the least work a Python relay can do (bench/floor.py: processes that only pump
             bytes, no handshake, framing or flow control) on the same paths: ping RTT through
             its TUN pair and relay (blocking threads; one selectors loop in each process, as
             MNEDC's design card requires; and that loop with TLS links, beside MNEDC's
             default), the TLS TUN end's peak RSS, iperf3 through its stream chain. Rows marked
             (floor) compare MNEDC and OpenVPN with it: what MNEDC's own work costs, and what
             no such relay here can beat
and for each: ping RTT (50 pings 20 ms apart), CPU seconds of the tunnel processes per GB moved
(/proc/PID/stat), and their peak RSS (VmHWM). Then scale runs (bench/scale.py): 500 stream
sessions, each its own device_id, idle with keepalives for 60 s on one server: the time for all
to join, the server's CPU % and RSS; and fleets of 500, 1,000 and 5,000 TUN members (a lease
each) joining from cold all at once, then idle for 60 s, with a member pinging the relay every
10 ms throughout: its slowest answer is the loop's longest stall. It prints a table with ratios to the raw path and to
OpenVPN and the goals, and writes it to bench/results/latest.md and latest.json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.nettopo import Topology, have_netns_support  # noqa: E402
from tests.relaynet import CLIENT, RelayNetwork  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results")
IPERF_PORT = 5201
STREAM_LOCAL_PORT = 15201
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def board_python():
    """The interpreter a board has: the system python3 (no site-packages of a dev setup) when it
    is 3.7 or newer, else this one."""
    for path in ("/usr/bin/python3",):
        if os.path.exists(path) and subprocess.run(
                [path, "-c", "import sys; sys.exit(sys.version_info < (3, 7))"]).returncode == 0:
            return path
    return sys.executable


BOARD_PYTHON = board_python()
PYTHON_VERSION = subprocess.run([BOARD_PYTHON, "-c", "import platform; print(platform.python_version())"],
                                stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / float(CLOCK_TICKS)


def peak_rss_kb(pid):
    try:
        for line in open("/proc/%d/status" % pid):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def wait_listening(topo, name, port, timeout=10):
    deadline = time.monotonic() + timeout
    while not topo.run(name, ["ss", "-Hltn", "sport = :%d" % port]).stdout.strip():
        if time.monotonic() > deadline:
            raise RuntimeError("nothing listens on port %d in %s" % (port, name))
        time.sleep(0.05)


def iperf(topo, client_ns, server_ns, target, duration, extra=(), tunnel_pids=(), port=IPERF_PORT):
    """(Gbit/s, CPU s per GB of the tunnel processes) of one iperf3 run; the server listens on
    IPERF_PORT, the client connects to target:port (a forwarded port may lead there)."""
    server = topo.spawn(server_ns, ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)])
    try:
        wait_listening(topo, server_ns, IPERF_PORT)
        cpu_before = cpu_seconds(tunnel_pids)
        result = topo.run(client_ns, ["iperf3", "-c", target, "-p", str(port), "-t", str(duration),
                                      "-J"] + list(extra), timeout=duration + 30)
        cpu = cpu_seconds(tunnel_pids) - cpu_before
    finally:
        server.stop()
    report = json.loads(result.stdout)
    if "sum_received" not in report.get("end", {}):
        raise RuntimeError("iperf3 to %s:%d failed: %s" % (target, port, report.get("error", result.stdout[-500:])))
    summary = report["end"]["sum_received"]
    gigabytes = summary["bytes"] / 1e9
    return summary["bits_per_second"] / 1e9, (cpu / gigabytes if tunnel_pids and gigabytes else None)


def ping_ms(topo, source, target):
    result = topo.run(source, ["ping", "-n", "-q", "-c", "50", "-i", "0.02", "-W", "2", target], timeout=30)
    line = [l for l in result.stdout.splitlines() if "min/avg/max" in l][0]
    return float(line.split("=")[1].split("/")[1])


class Measurement:
    """The runs of one path: medians of throughput, RTT, CPU per GB; peak RSS."""

    def __init__(self, name, label):
        self.name, self.label = name, label
        self.samples = {}

    def add(self, key, value):
        if value is not None:
            self.samples.setdefault(key, []).append(value)

    def median(self, key):
        values = self.samples.get(key)
        return statistics.median(values) if values else None

    def as_dict(self):
        return {"name": self.name, "label": self.label,
                "median": {key: self.median(key) for key in self.samples}, "samples": self.samples}


def measure_tunnel(topo, measurement, a_target, duration, runs, pids, stream_pids=None):
    for _ in range(runs):
        gbps, cpu = iperf(topo, "a", "b", a_target, duration, tunnel_pids=pids)
        measurement.add("gbps", gbps)
        measurement.add("cpu_s_per_gb", cpu)
        measurement.add("gbps_reverse", iperf(topo, "a", "b", a_target, duration, ["-R"], pids)[0])
        measurement.add("gbps_4_streams", iperf(topo, "a", "b", a_target, duration, ["-P", "4"], pids)[0])
        measurement.add("rtt_ms", ping_ms(topo, "a", a_target))


def bench_raw(topo, args):
    raw = Measurement("raw", "raw underlay a -> srv (no tunnel)")
    for _ in range(args.runs):
        raw.add("gbps", iperf(topo, "a", "srv", topo.server_ip, args.duration)[0])
        raw.add("gbps_reverse", iperf(topo, "a", "srv", topo.server_ip, args.duration, ["-R"])[0])
        raw.add("gbps_4_streams", iperf(topo, "a", "srv", topo.server_ip, args.duration, ["-P", "4"])[0])
        raw.add("rtt_ms", ping_ms(topo, "a", topo.server_ip))
    return raw


def bench_ipv6(topo, net, args, pids):
    """The same tunnel, a -> b over the network's IPv6 (b's ULA), beside IPv4."""
    ipv6 = Measurement("mnedc-ipv6", "MNEDC TUN a -> relay -> b over IPv6 (ULA), default settings (TLS)")
    target = net.client_status("b")["ipv6"][0].split("/")[0]
    measure_tunnel(topo, ipv6, target, args.duration, args.runs, pids)
    return ipv6


def bench_mnedc(topo, workdir, args, tls=True):
    name = "mnedc" if tls else "mnedc-plaintext"
    label = "MNEDC TUN a -> relay -> b, %s" % ("default settings (TLS)" if tls else "tls = no")
    os.makedirs(os.path.join(workdir, name))
    # run as install.sh runs the services: python3 -m, from bytecode
    net = RelayNetwork(topo, os.path.join(workdir, name), python=BOARD_PYTHON, as_module=True, tls=tls)
    net.start_server()
    for client in ("a", "b"):
        net.start_client(client)
    pids = [net.server.pid, net.clients["a"].pid, net.clients["b"].pid]
    measurement = Measurement(name, label)
    try:
        measure_tunnel(topo, measurement, net.vip["b"], args.duration, args.runs, pids)
        if tls:
            stream = bench_stream(topo, net, args)
            ipv6 = bench_ipv6(topo, net, args, pids)
        else:
            stream = ipv6 = None
        measurement.add("peak_rss_server_kb", peak_rss_kb(net.server.pid))
        measurement.add("peak_rss_client_kb", max(peak_rss_kb(net.clients[c].pid) for c in ("a", "b")))
    finally:
        for proc in [net.server] + list(net.clients.values()):
            proc.stop()
    return measurement, stream, ipv6


def bench_stream(topo, net, args):
    """iperf3 through a forwarded port: connect --forward on a, listen --forward on b."""
    stream = Measurement("stream", "MNEDC stream mode, forwarded port a -> b, default settings (TLS)")
    config_a = os.path.join(net.workdir, "client-a.ini")
    config_b = os.path.join(net.workdir, "client-b.ini")
    listener = topo.spawn("b", net.command(CLIENT) + ["-c", config_b, "listen", "--forward=%d" % IPERF_PORT, "5201"],
                          env=net.env())
    listener.wait_for(r"listening on virtual port 5201")
    forwarder = topo.spawn("a", net.command(CLIENT) + ["-c", config_a, "connect",
                                                       "--forward=%d" % STREAM_LOCAL_PORT, "device-b", "5201"],
                           env=net.env())
    forwarder.wait_for(r"listening on 127\.0\.0\.1:%d" % STREAM_LOCAL_PORT)
    pids = [net.server.pid, listener.pid, forwarder.pid]
    try:
        for _ in range(args.runs):
            gbps, cpu_per_gb = iperf(topo, "a", "b", "127.0.0.1", args.duration, tunnel_pids=pids,
                                     port=STREAM_LOCAL_PORT)
            stream.add("gbps", gbps)
            stream.add("cpu_s_per_gb", cpu_per_gb)
        stream.add("peak_rss_client_kb", max(peak_rss_kb(listener.pid), peak_rss_kb(forwarder.pid)))
    finally:
        listener.stop()
        forwarder.stop()
    return stream


FLOOR = os.path.join(ROOT, "bench", "floor.py")
FLOOR_PORTS = ("7100", "7101")
FLOOR_SUBNET = "198.19.255.%d/24"
FLOOR_LOCAL_PORT = 15301


def bench_floor(topo, args):
    """The least-work Python relay (bench/floor.py): ping RTT through its TUN pair, and iperf3
    through its stream chain (a's forwarded port -> relay -> b), as MNEDC's stream mode runs."""
    floor = Measurement("floor", "least-work Python relay (bench/floor.py): stream chain; RTT with threads")

    def spawn(namespace, argv, ready):
        proc = topo.spawn(namespace, [BOARD_PYTHON, FLOOR] + argv)
        procs.append(proc)
        proc.wait_for(ready, timeout=10)
        return proc

    procs = []
    try:
        for loop, key in (("threads", "rtt_ms"), ("selectors", "rtt_ms_selectors"), ("tls", "rtt_ms_tls")):
            spawn("srv", ["relay"] + list(FLOOR_PORTS) + [loop], "floor relay listening")
            for name, port in (("a", FLOOR_PORTS[0]), ("b", FLOOR_PORTS[1])):
                spawn(name, ["tun", FLOOR_SUBNET % (2 if name == "a" else 3), topo.server_ip, port, loop],
                      "floor tun")
            for _ in range(args.runs):
                floor.add(key, ping_ms(topo, "a", (FLOOR_SUBNET % 3).split("/")[0]))
            if loop == "tls":               # the TUN ends: the least a Python TLS client takes here
                floor.add("peak_rss_tls_client_kb", max(peak_rss_kb(proc.pid) for proc in procs[1:]))
            for proc in procs:
                proc.stop()
            procs = []
    finally:
        for proc in procs:
            proc.stop()
    for _ in range(args.runs):
        procs = []
        try:
            # iperf3 -P 1 makes two connections: its control connection, then the data stream;
            # exit joins each to the iperf3 server only when its first bytes arrive
            spawn("srv", ["relay"] + list(FLOOR_PORTS) + ["threads"], "floor relay listening")
            spawn("b", ["exit", topo.server_ip, FLOOR_PORTS[1], str(IPERF_PORT), "2"], "floor exit connected")
            spawn("a", ["entry", str(FLOOR_LOCAL_PORT), topo.server_ip, FLOOR_PORTS[0]], "floor entry listening")
            gbps, cpu_per_gb = iperf(topo, "a", "b", "127.0.0.1", args.duration,
                                     tunnel_pids=[proc.pid for proc in procs], port=FLOOR_LOCAL_PORT)
        finally:
            for proc in procs:
                proc.stop()
        floor.add("gbps", gbps)
        floor.add("cpu_s_per_gb", cpu_per_gb)
    return floor


def bench_openvpn(topo, workdir, args, variant):
    from bench.openvpn_peer import OpenVpnNetwork
    label = {"default": "OpenVPN TCP, default (AES-256-GCM, MTU 1500)",
             "plaintext": "OpenVPN TCP, no cipher, no auth, tun-mtu 48000"}[variant]
    measurement = Measurement("openvpn-" + variant, label)
    network = OpenVpnNetwork(topo, os.path.join(workdir, "openvpn-" + variant), variant).start(clients=("a", "b"))
    try:
        pids = [network.server_proc.pid] + [p.pid for p in network.client_procs.values()]
        measure_tunnel(topo, measurement, network.vip["b"], args.duration, args.runs, pids)
        measurement.add("peak_rss_server_kb", peak_rss_kb(network.server_proc.pid))
        measurement.add("peak_rss_client_kb", max(peak_rss_kb(p.pid) for p in network.client_procs.values()))
    finally:
        network.stop()
    return measurement


def bench_scale(workdir, args):
    from bench.scale import scale_run
    result = scale_run(workdir, clients=args.scale_clients, idle_s=args.scale_idle)
    measurement = Measurement("scale", "%d idle stream sessions on one server" % args.scale_clients)
    for key, value in result.items():
        measurement.add(key, value)
    return measurement


def bench_scale_tun(workdir, args):
    """TUN members (a lease each) joining one relay from cold, all at once, then idle: one
    Measurement per fleet size in --scale-tun."""
    from bench.scale import scale_run
    measurements = []
    for clients in args.scale_tun:
        fleet_dir = os.path.join(workdir, "fleet-%d" % clients)        # from cold: a state_dir of its own
        os.makedirs(fleet_dir)
        result = scale_run(fleet_dir, clients=clients, idle_s=args.scale_idle, tun=True)
        measurement = Measurement("scale-tun-%d" % clients, "%d TUN members on one server" % clients)
        for key, value in result.items():
            measurement.add(key, value)
        measurements.append(measurement)
    return measurements


def ratio(value, base):
    return value / base if value is not None and base else None


# Like with like: each MNEDC row is set beside the OpenVPN row that protects its data as much
# (TLS beside OpenVPN's default cipher and HMAC; tls = no beside no cipher and no auth).
PEER_OF = {"mnedc": "openvpn-default", "stream": "openvpn-default", "mnedc-ipv6": "openvpn-default", "mnedc-plaintext": "openvpn-plaintext",
           "openvpn-default": "openvpn-default", "openvpn-plaintext": "openvpn-plaintext"}


def report(measurements, args):
    by_name = {m.name: m for m in measurements}
    raw = by_name["raw"].median("gbps")
    openvpn_plain = by_name.get("openvpn-plaintext")
    openvpn_default = by_name.get("openvpn-default")
    rows = ["| path | Gbit/s | reverse | 4 streams | RTT ms | CPU s/GB | peak RSS server/client MB | vs raw "
            "| vs OpenVPN alike |", "|---|---|---|---|---|---|---|---|---|"]

    def cell(value, digits=2):
        return "-" if value is None else ("%.*f" % (digits, value))
    scale = by_name.get("scale")
    fleets = [m for m in measurements if m.name.startswith("scale-tun-")]
    for m in measurements:
        if m is scale or m in fleets:
            continue
        rss_server, rss_client = m.median("peak_rss_server_kb"), m.median("peak_rss_client_kb")
        rss = "%s / %s" % (cell(rss_server and rss_server / 1024.0, 1), cell(rss_client and rss_client / 1024.0, 1))
        peer = by_name.get(PEER_OF.get(m.name))
        rows.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            m.label, cell(m.median("gbps")), cell(m.median("gbps_reverse")), cell(m.median("gbps_4_streams")),
            cell(m.median("rtt_ms"), 3), cell(m.median("cpu_s_per_gb")), rss,
            cell(ratio(m.median("gbps"), raw)), cell(ratio(m.median("gbps"), peer and peer.median("gbps")))))
    goals = []
    mnedc, plain, stream = by_name.get("mnedc"), by_name.get("mnedc-plaintext"), by_name.get("stream")
    if mnedc:
        goals.append(("MNEDC default (TLS) >= 35 % of raw", ratio(mnedc.median("gbps"), raw), 0.35))
    if mnedc and openvpn_default:
        goals.append(("MNEDC default (TLS) / OpenVPN default, throughput",
                      ratio(mnedc.median("gbps"), openvpn_default.median("gbps")), 5.0))
        goals.append(("MNEDC default (TLS) / OpenVPN default, CPU s/GB",
                      ratio(mnedc.median("cpu_s_per_gb"), openvpn_default.median("cpu_s_per_gb")), ("<=", 0.2)))
        goals.append(("MNEDC default (TLS) / OpenVPN default, RTT",
                      ratio(mnedc.median("rtt_ms"), openvpn_default.median("rtt_ms")), ("<=", 1.3)))
    if plain and openvpn_plain:
        goals.append(("MNEDC tls = no / OpenVPN no cipher, no auth, throughput",
                      ratio(plain.median("gbps"), openvpn_plain.median("gbps")), 1.0))
        goals.append(("MNEDC tls = no / OpenVPN no cipher, no auth, RTT",
                      ratio(plain.median("rtt_ms"), openvpn_plain.median("rtt_ms")), ("<=", 1.0)))
    if stream:
        goals.append(("stream mode (TLS) >= 50 % of raw", ratio(stream.median("gbps"), raw), 0.5))
    ipv6 = by_name.get("mnedc-ipv6")
    if mnedc and ipv6:                      # context: IPv6 costs the relay what IPv4 does
        goals.append(("MNEDC over IPv6 / over IPv4 (TLS), throughput", ratio(ipv6.median("gbps"), mnedc.median("gbps")), None))
        goals.append(("MNEDC over IPv6 / over IPv4 (TLS), RTT", ratio(ipv6.median("rtt_ms"), mnedc.median("rtt_ms")), None))
    floor = by_name.get("floor")
    if floor:                               # context, not goals: what a least-work Python relay reaches
        goals.append(("(floor) least-work Python stream chain / raw", ratio(floor.median("gbps"), raw), None))
        if stream:
            goals.append(("(floor) MNEDC stream mode / least-work Python stream chain",
                          ratio(stream.median("gbps"), floor.median("gbps")), None))
        for loop, key in (("threads", "rtt_ms"), ("one selectors loop", "rtt_ms_selectors"),
                          ("one selectors loop, TLS", "rtt_ms_tls")):
            if mnedc:
                goals.append(("(floor) MNEDC RTT / least-work Python relay RTT, %s" % loop,
                              ratio(mnedc.median("rtt_ms"), floor.median(key)), None))
            if openvpn_default:
                goals.append(("(floor) least-work Python relay RTT, %s / OpenVPN RTT (its default)" % loop,
                              ratio(floor.median(key), openvpn_default.median("rtt_ms")), None))
    if mnedc:
        goals.append(("client peak RSS with TLS, MB", (mnedc.median("peak_rss_client_kb") or 0) / 1024.0, ("<=", 16)))
    if floor and floor.median("peak_rss_tls_client_kb"):
        goals.append(("(floor) least-work Python TLS client (a TUN end of the TLS floor relay) peak RSS, MB",
                      floor.median("peak_rss_tls_client_kb") / 1024.0, None))
    if scale:
        clients = int(scale.median("clients"))
        goals.append(("seconds for %d clients to join" % clients, scale.median("join_s"), ("<=", 10)))
        goals.append(("server CPU %% of a core, %d idle clients" % clients, scale.median("server_cpu_percent"), ("<=", 3)))
        goals.append(("server RSS MB, %d idle clients" % clients, scale.median("server_rss_mb"), ("<=", 60)))
    for fleet in fleets:                    # the goals are for 5,000; smaller fleets show the growth
        clients = int(fleet.median("clients"))
        goal = (lambda bound: ("<=", bound)) if clients >= 5000 else (lambda bound: None)
        goals.append(("%d TUN members: seconds to join from cold, all at once" % clients, fleet.median("join_s"), goal(10)))
        goals.append(("%d TUN members: slowest answer to a ping every 10 ms during the joins, ms" % clients,
                      fleet.median("stall_join_ms"), goal(50)))
        goals.append(("%d TUN members: slowest answer to that ping while idle, ms" % clients,
                      fleet.median("stall_idle_ms"), goal(50)))
        goals.append(("%d TUN members: server RSS MB" % clients, fleet.median("server_rss_mb"), goal(100)))
        goals.append(("%d TUN members: server CPU %% of a core while idle (their keepalives)" % clients,
                      fleet.median("server_cpu_percent"), goal(3)))
        goals.append(("%d TUN members: the same with the prober's 100 pings a second" % clients,
                      fleet.median("server_cpu_percent_probed"), None))
    lines = ["# MNEDC benchmark", "",
             "%s, %d run(s) of %d s each, medians; %s. MNEDC runs as install.sh runs it: %s -m, from "
             "bytecode (Python %s). %d CPU(s) here, shared by every tunnel process and both iperf3 "
             "ends, so throughput follows CPU per GB." % (
                 time.strftime("%Y-%m-%d %H:%M"), args.runs, args.duration,
                 "nested-NAT namespaces (tests/nettopo.py)", BOARD_PYTHON, PYTHON_VERSION, os.cpu_count() or 1),
             ""] + rows + [
        "", "| goal | measured | target | met |", "|---|---|---|---|"]
    for name, value, target in goals:
        if target is None or value is None:
            met = "-"
        elif isinstance(target, tuple):             # ("<=", bound): lower is better
            met = "yes" if value <= target[1] else "NO"
        else:
            met = "yes" if value >= target else "NO"
        shown = "-" if target is None else ("<= %s" % target[1] if isinstance(target, tuple) else ">= %s" % target)
        lines.append("| %s | %s | %s | %s |" % (name, cell(value), shown, met))
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per figure; the median is reported (default 3)")
    parser.add_argument("--duration", type=int, default=3, help="seconds per iperf3 run (default 3, to stay under 5 minutes)")
    parser.add_argument("--quick", action="store_true", help="1 run of 1 s: checks that the benchmark works")
    parser.add_argument("--no-openvpn", action="store_true", help="skip the OpenVPN comparison")
    parser.add_argument("--scale-clients", type=int, default=500, help="stream sessions in the scale run (500)")
    parser.add_argument("--scale-idle", type=float, default=60, help="seconds they stay idle (60)")
    parser.add_argument("--scale-tun", default="500,1000,5000",
                        help="fleet sizes of TUN members for the scale runs (500,1000,5000)")
    parser.add_argument("--output", default=RESULTS, help="directory for latest.md and latest.json")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.duration, args.scale_clients, args.scale_idle, args.scale_tun = 1, 1, 50, 2, "50"
    args.scale_tun = [int(count) for count in args.scale_tun.split(",") if count]
    ok, why = have_netns_support()
    if not ok:
        print("the benchmark needs root, ip netns, iptables and /dev/net/tun: %s" % why)
        return 2
    tools = ["ip", "ss", "iptables", "ping", "iperf3"] + ([] if args.no_openvpn else ["openvpn", "openssl"])
    if subprocess.run([os.path.join(ROOT, "tools", "ensure-deps.sh")] + tools).returncode != 0:
        print("missing tools: %s" % " ".join(tools))
        return 2
    started = time.monotonic()
    measurements = []
    with tempfile.TemporaryDirectory(prefix="mnedc-bench-") as workdir, Topology() as topo:
        measurements.append(bench_raw(topo, args))
        mnedc, stream, ipv6 = bench_mnedc(topo, workdir, args)
        measurements += [mnedc, stream, ipv6]
        measurements.append(bench_mnedc(topo, workdir, args, tls=False)[0])
        measurements.append(bench_floor(topo, args))
        if not args.no_openvpn:
            for variant in ("default", "plaintext"):
                measurements.append(bench_openvpn(topo, workdir, args, variant))
        measurements.append(bench_scale(workdir, args))
        measurements += bench_scale_tun(workdir, args)
    table = report(measurements, args)
    print(table)
    print("(took %.0f s)" % (time.monotonic() - started))
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "latest.md"), "w") as sink:
        sink.write(table)
    with open(os.path.join(args.output, "latest.json"), "w") as sink:
        json.dump({"when": time.time(), "runs": args.runs, "duration_s": args.duration,
                   "measurements": [m.as_dict() for m in measurements]}, sink, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
