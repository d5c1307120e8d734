"""Fault soak, as root (issue #6): about two minutes of faults under continuous traffic.

Three TUN clients across the nested NATs ping each other all the time while the test, on a
schedule drawn from random.Random(SEED), kills the relay server with SIGKILL and starts it again,
cuts a client's link (iptables DROP of the relay port in its NAT) and restores it, and stops a
client (SIGKILL or SIGTERM) and starts it again. After each fault it measures the recovery time:
from the end of the fault (restart or restore) until the devices it touched ping each other by
virtual IP again. A stream-mode transfer (`connect` on c to `listen --forward` on a) is running
when the first server kill hits; it is retried until it arrives byte-exact.

At the end every device must be back on the virtual IP it got at its first join, every pair must
ping, and each recovery must be within RECOVERY_BOUND_S. The counts of faults and the recovery
times (max, median) are printed in the terminal summary (tests/conftest.py).

    srv (relay)  <-  natA  <-  a
                 <-  natB  <-  b
                           <-  natC  <-  c

MNEDC_SOAK_SEED=N runs another schedule; the default one is what CI runs.
"""

import collections
import hashlib
import json
import math
import os
import random
import re
import signal
import statistics
import threading
import time

import pytest

from tests.conftest import SUMMARY
from tests.nettopo import Topology, have_netns_support
from tests.relaynet import CLIENT, JOINED, SERVER, RelayNetwork

SUPPORTED, WHY_NOT = have_netns_support()
pytestmark = pytest.mark.skipif(not SUPPORTED, reason="needs root, ip netns, iptables and /dev/net/tun: %s" % WHY_NOT)

SEED = int(os.environ.get("MNEDC_SOAK_SEED", "6"))
KEEPALIVE_S = 4
# Detection takes at most one keepalive; then a connect may hang CONNECT_TIMEOUT_S (10 s) behind a
# dropped SYN, and the backoff adds 1..30 s with jitter (RelayClient.next_backoff_s).
RECOVERY_BOUND_S = KEEPALIVE_S * 3 + 20
CLIENTS = ("a", "b", "c")
PAIRS = (("a", "b"), ("b", "c"), ("c", "a"))
BEHIND = {"natA": {"a"}, "natB": {"b", "c"}, "natC": {"c"}}     # who loses the relay when a NAT drops
RELAY_PORT = 3334
STREAM_PORT = 9                 # the virtual port device-a offers
SINK_PORT = 7009                # the TCP sink behind it, on 127.0.0.1 in namespace a
STREAM_BYTES = 8 * 1000 * 1000
PACED_BYTES_PER_S = 1000 * 1000  # the first attempt is slow, so that the server kill meets it
MAX_ATTEMPTS = 5
FAULT_COUNTS = {"server": 4, "cut": 5, "client": 5}
KIND_NAMES = {"server": "server kill", "cut": "link cut", "client": "client restart"}

Fault = collections.namedtuple("Fault", "kind target how hold_s pause_s")

# A TCP sink in namespace a: one line per connection when it opens and when it ends.
SINK = r"""
import hashlib, socket, sys, threading
lock = threading.Lock()
def say(line):
    with lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
def serve(conn, n):
    digest, total, how = hashlib.sha256(), 0, "eof"
    try:
        while True:
            data = conn.recv(262144)
            if not data:
                break
            digest.update(data)
            total += len(data)
    except OSError as error:
        how = "error:" + type(error).__name__
    conn.close()
    say("conn %d %s %d %s" % (n, how, total, digest.hexdigest()))
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen(8)
say("sink ready")
n = 0
while True:
    conn, _ = server.accept()
    n += 1
    say("conn %d open" % n)
    threading.Thread(target=serve, args=(conn, n), daemon=True).start()
"""

# Writes a file to stdout, at most RATE bytes/s (0: as fast as the pipe takes it).
PACER = r"""
import os, sys, time
path, rate = sys.argv[1], float(sys.argv[2])
started, sent = time.monotonic(), 0
with open(path, "rb") as source:
    while True:
        chunk = source.read(65536)
        if not chunk:
            break
        try:
            while chunk:
                done = os.write(1, chunk)
                chunk, sent = chunk[done:], sent + done
        except BrokenPipeError:
            sys.exit(1)
        if rate:
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
"""


def fault_schedule(seed):
    """The faults in a fixed, seeded order: every NAT, every client, both signals, and link cuts
    both shorter and longer than the keepalive appear at least once."""
    rng = random.Random(seed)
    kinds = ["server"] * FAULT_COUNTS["server"] + ["cut"] * FAULT_COUNTS["cut"] + ["client"] * FAULT_COUNTS["client"]
    rng.shuffle(kinds)

    def covering(values, count, draw):
        chosen = list(values) + [draw() for _ in range(count - len(values))]
        rng.shuffle(chosen)
        return chosen
    nats = covering(sorted(BEHIND), FAULT_COUNTS["cut"], lambda: rng.choice(sorted(BEHIND)))
    cut_holds = covering([rng.uniform(2.0, KEEPALIVE_S - 1.0), rng.uniform(KEEPALIVE_S + 2.0, 2.0 * KEEPALIVE_S)],
                         FAULT_COUNTS["cut"], lambda: rng.uniform(2.0, 2.0 * KEEPALIVE_S))
    victims = covering(CLIENTS, FAULT_COUNTS["client"], lambda: rng.choice(CLIENTS))
    signals = covering(["SIGKILL", "SIGTERM"], FAULT_COUNTS["client"], lambda: rng.choice(["SIGKILL", "SIGTERM"]))
    schedule = []
    for kind in kinds:
        pause_s = rng.uniform(2.0, 4.5)
        if kind == "server":
            schedule.append(Fault(kind, "srv", "SIGKILL", rng.uniform(0.5, 3.0), pause_s))
        elif kind == "cut":
            schedule.append(Fault(kind, nats.pop(), "DROP", cut_holds.pop(), pause_s))
        else:
            schedule.append(Fault(kind, victims.pop(), signals.pop(), rng.uniform(0.5, 2.0), pause_s))
    return schedule


def affected_pairs(fault):
    if fault.kind == "server":
        return list(PAIRS)
    touched = BEHIND[fault.target] if fault.kind == "cut" else {fault.target}
    return [pair for pair in PAIRS if touched & set(pair)]


def ping_until_answered(topo, source, address, deadline):
    """True once address answers a ping from source before deadline (monotonic).

    One ping sends every 0.2 s until the first reply (-c 1 with -w), so the moment it returns is
    the moment the path works again, to 0.2 s. It fails at once while source has no route (its
    TUN interface is gone): then it is started again.
    """
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        started = time.monotonic()
        if topo.run(source, ["ping", "-n", "-q", "-c", "1", "-i", "0.2", "-w", str(int(math.ceil(remaining))),
                             address], timeout=remaining + 10, check=False).returncode == 0:
            return True
        time.sleep(max(0.0, 0.2 - (time.monotonic() - started)))     # paces the restarts; bounded by deadline


class Soak:
    """The network under test, every process it ever ran, and what the faults did to it."""

    def __init__(self, topo, workdir):
        self.topo = topo
        self.workdir = str(workdir)
        self.net = RelayNetwork(topo, workdir, keepalive=KEEPALIVE_S).start()
        self.first_vip = dict(self.net.vip)
        self.history = {name: [self.net.clients[name]] for name in CLIENTS}
        self.servers = [self.net.server]
        self.results = []           # (fault, recovery seconds, note)
        self.attempts = []          # (proc, sink record or None, seconds)
        self.pingers = {}
        self.started = time.monotonic()

    # -- traffic --

    def start_traffic(self):
        for source, target in PAIRS:
            self.pingers[(source, target)] = self.topo.spawn(
                source, ["ping", "-n", "-q", "-i", "0.2", "-w", "600", self.first_vip[target]])

    def stop_traffic(self):
        """SIGINT, so that each ping prints its statistics: {pair: (sent, received)}."""
        counts = {}
        for pair, proc in self.pingers.items():
            assert proc.alive(), "%s: ping ended early:\n%s" % (pair, proc.tail())
            proc.send_signal(signal.SIGINT)
            proc.wait(10)
            found = re.search(r"(\d+) packets transmitted, (\d+) received", proc.output())
            assert found, proc.output()
            counts[pair] = (int(found.group(1)), int(found.group(2)))
        return counts

    def stop_processes(self):
        """Stop what the soak started beside the relay (traffic, sink, stream ends), each by its PID."""
        for proc in list(self.pingers.values()) + [proc for proc, _, _ in self.attempts] + [
                getattr(self, "listener", None), getattr(self, "sink", None)]:
            if proc is not None:
                proc.stop()

    # -- faults --

    def inject(self, fault):
        """Do the fault; return (the moment it ended, a note on what it did)."""
        return getattr(self, "inject_" + fault.kind)(fault)

    def inject_server(self, fault):
        self.net.server.send_signal(signal.SIGKILL)
        self.net.server.wait(10)
        time.sleep(fault.hold_s)            # the relay stays down this long: the fault itself
        ended = time.monotonic()
        self.servers.append(self.net.start_server())
        return ended, "down %.1f s" % fault.hold_s

    def inject_cut(self, fault):
        clients = sorted(BEHIND[fault.target])
        marks = {name: len(self.net.clients[name].lines()) for name in clients}
        rules = [["FORWARD", "-p", "tcp", "--dport", str(RELAY_PORT), "-j", "DROP"],
                 ["FORWARD", "-p", "tcp", "--sport", str(RELAY_PORT), "-j", "DROP"]]
        try:
            for rule in rules:
                self.topo.run(fault.target, ["iptables", "-w", "10", "-I"] + rule, timeout=20)
            time.sleep(fault.hold_s)        # the link stays cut this long: the fault itself
        finally:
            for rule in rules:
                self.topo.run(fault.target, ["iptables", "-w", "10", "-D"] + rule, timeout=20, check=False)
        ended = time.monotonic()
        lost = [name for name in clients if any("relay connection lost" in line for line in
                                                self.net.clients[name].lines()[marks[name]:])]
        return ended, "%.1f s, %s" % (fault.hold_s, "lost by " + ",".join(lost) if lost else "link survived")

    def inject_client(self, fault):
        old = self.net.clients[fault.target]
        old.send_signal(getattr(signal, fault.how))
        code = old.wait(10)
        if fault.how == "SIGTERM":
            assert code == 0, "client %s exited %r on SIGTERM:\n%s" % (fault.target, code, old.tail())
        time.sleep(fault.hold_s)            # the device stays off this long: the fault itself
        ended = time.monotonic()
        self.history[fault.target].append(self.net.start_client(fault.target, wait=False))
        return ended, "%s, off %.1f s" % (fault.how, fault.hold_s)

    def recovery_s(self, pairs, since, limit_s=RECOVERY_BOUND_S):
        """Seconds from since until each pair pinged once, polled in parallel; missing: not within limit_s."""
        done = {}

        def poll(source, target):
            if ping_until_answered(self.topo, source, self.first_vip[target], since + limit_s):
                done[(source, target)] = time.monotonic() - since
        threads = [threading.Thread(target=poll, args=pair, daemon=True) for pair in pairs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(limit_s + 10)
        return done

    def logs_tail(self, n=15):
        parts = ["--- server ---\n" + self.net.server.tail(n)]
        parts += ["--- client %s ---\n%s" % (name, self.net.clients[name].tail(n)) for name in CLIENTS]
        return "\n".join(parts)

    # -- the stream transfer --

    def start_stream_side(self):
        self.payload = os.path.join(self.workdir, "payload.bin")
        with open(self.payload, "wb") as sink:
            sink.write(os.urandom(STREAM_BYTES))
        with open(self.payload, "rb") as source:
            self.digest = hashlib.sha256(source.read()).hexdigest()
        self.sink = self.topo.spawn("a", [self.net.python, "-u", "-c", SINK, str(SINK_PORT)])
        self.sink.wait_for(r"sink ready", timeout=15)
        self.configs = {name: self.net.write_config("stream-" + name, "client", {
            "server": self.topo.server_ip, "secret_file": self.net.secret_path,
            "device_id": "device-" + name, "keepalive": KEEPALIVE_S, "server_pin": self.net.pin})
            for name in ("a", "c")}
        self.listener = self.topo.spawn("a", [self.net.python, "-u", CLIENT, "-c", self.configs["a"], "listen",
                                              "--forward=%d" % SINK_PORT, str(STREAM_PORT)])
        self.listener.wait_for(r"listening on virtual port %d" % STREAM_PORT, timeout=30)

    def start_attempt(self, rate):
        """`connect device-a 9` on c, fed from the payload at rate bytes/s (0: at full speed)."""
        self.sink_mark = len(self.sink.lines())
        script = '"$0" -c "$1" "$2" "$3" | "$0" -u "$4" -c "$5" connect device-a %d' % STREAM_PORT
        proc = self.topo.spawn("c", ["sh", "-c", script, self.net.python, PACER, self.payload, str(rate),
                                     CLIENT, self.configs["c"]])
        return proc, time.monotonic()

    def finish_attempt(self, proc, started, timeout=90):
        proc.wait(timeout)
        ended = re.compile(r"conn (\d+) (eof|error:\S+) (\d+) (\w+)")
        record = None
        if any("open" in line for line in self.sink.lines()[self.sink_mark:]):
            found = self.sink.wait_for(ended, timeout=15, start=self.sink_mark)
            record = (found.group(2), int(found.group(3)), found.group(4))
        self.attempts.append((proc, record, time.monotonic() - started))
        return record == ("eof", STREAM_BYTES, self.digest) and proc.returncode == 0

    def retry_transfer(self, listener_mark):
        """After the fault: wait until device-a listens again, then try until one attempt is byte-exact."""
        self.listener.wait_for(r"listening on virtual port %d" % STREAM_PORT, timeout=RECOVERY_BOUND_S,
                               start=listener_mark)
        while len(self.attempts) < MAX_ATTEMPTS:
            if self.finish_attempt(*self.start_attempt(0)):
                return True
            time.sleep(2.0)                 # the next attempt, not synchronisation: bounded by MAX_ATTEMPTS
        return False

    # -- the report --

    def report(self, traffic=None):
        lines = []
        recoveries = [seconds for _, seconds, _ in self.results if seconds is not None]
        counts = collections.Counter(fault.kind for fault, _, _ in self.results)
        lines.append("seed %d, keepalive %d s, %d faults in %.0f s: %s" % (
            SEED, KEEPALIVE_S, len(self.results), time.monotonic() - self.started,
            ", ".join("%s %d" % (KIND_NAMES[kind], counts[kind]) for kind in KIND_NAMES)))
        if recoveries:
            per_kind = []
            for kind in KIND_NAMES:
                times = [s for fault, s, _ in self.results if fault.kind == kind and s is not None]
                if times:
                    per_kind.append("%s %.1f/%.1f" % (KIND_NAMES[kind], max(times), statistics.median(times)))
            lines.append("recovery max %.1f s, median %.1f s (bound %d s); max/median by kind: %s" % (
                max(recoveries), statistics.median(recoveries), RECOVERY_BOUND_S, ", ".join(per_kind)))
        for index, (fault, seconds, note) in enumerate(self.results, 1):
            lines.append("  %2d %-14s %-5s %-26s recovered in %s" % (
                index, KIND_NAMES[fault.kind], fault.target, note,
                "%.1f s" % seconds if seconds is not None else "NOT within %d s" % RECOVERY_BOUND_S))
        if self.attempts:
            described = []
            for number, (proc, record, seconds) in enumerate(self.attempts, 1):
                if record is None:
                    described.append("#%d exit %s, no stream" % (number, proc.returncode))
                else:
                    exact = record == ("eof", STREAM_BYTES, self.digest)
                    described.append("#%d exit %s, %.1f MB byte-exact in %.1f s" % (
                        number, proc.returncode, record[1] / 1e6, seconds) if exact else
                        "#%d exit %s after %.1f MB (sink: %s)" % (number, proc.returncode, record[1] / 1e6, record[0]))
            lines.append("stream %d MB c -> a: %s" % (STREAM_BYTES // 1000000, "; ".join(described)))
        if traffic:
            lines.append("ping traffic (received/sent): " + ", ".join(
                "%s->%s %d/%d" % (pair[0], pair[1], got, sent) for pair, (sent, got) in traffic.items()))
        lines.append("addresses at first join: " + ", ".join("%s %s" % (n, self.first_vip[n]) for n in CLIENTS))
        return lines


def test_fault_soak_every_device_recovers_on_its_address_and_a_retried_transfer_is_exact(tmp_path):
    schedule = fault_schedule(SEED)
    with Topology() as topo:
        soak = Soak(topo, tmp_path)
        traffic = None
        try:
            soak.start_traffic()
            soak.start_stream_side()
            run_faults(soak, schedule)
            check_everyone_pings(soak)
            traffic = soak.stop_traffic()
            check_addresses(soak)
            check_logs(soak)
        finally:
            soak.stop_processes()
            lines = soak.report(traffic)
            SUMMARY.append(("MNEDC fault soak (issue #6)", lines))
            print("\n".join(lines))
    assert not topo.teardown_errors, topo.teardown_errors
    for pair, (sent, got) in traffic.items():
        assert got >= sent * 0.15, "%s->%s: only %d of %d pings came back during the soak" % (
            pair[0], pair[1], got, sent)
    stream_ok = [record == ("eof", STREAM_BYTES, soak.digest) and proc.returncode == 0
                 for proc, record, _ in soak.attempts]
    assert stream_ok and stream_ok[-1], "no stream attempt was byte-exact: %s" % soak.report()[-3:]
    assert len(stream_ok) >= 2 and not stream_ok[0], "the first attempt should have been interrupted"
    first = soak.attempts[0][0]
    assert first.returncode != 0 and "closed suddenly" in first.output(), first.output()
    recoveries = [seconds for _, seconds, _ in soak.results]
    assert len(recoveries) == len(schedule)
    assert max(recoveries) < RECOVERY_BOUND_S


def run_faults(soak, schedule):
    """Each fault after a pause of steady traffic; the first server kill meets the stream transfer."""
    for fault in schedule:
        time.sleep(fault.pause_s)           # steady traffic between faults, as scheduled
        interrupting = fault.kind == "server" and not soak.attempts
        if interrupting:
            proc, started = soak.start_attempt(PACED_BYTES_PER_S)
            soak.sink.wait_for(r"conn \d+ open", timeout=30, start=soak.sink_mark)
            time.sleep(1.5)                 # a part of it arrives first: the fault lands mid-stream
            listener_mark = len(soak.listener.lines())
        ended, note = soak.inject(fault)
        pairs = affected_pairs(fault)
        done = soak.recovery_s(pairs, ended)
        seconds = max(done.values()) if len(done) == len(pairs) else None
        soak.results.append((fault, seconds, note))
        assert seconds is not None, "%s of %s: %s did not ping again within %d s (only %s)\n%s" % (
            KIND_NAMES[fault.kind], fault.target, pairs, RECOVERY_BOUND_S, sorted(done), soak.logs_tail())
        if interrupting:
            soak.finish_attempt(proc, started)
            soak.retry_transfer(listener_mark)


def check_everyone_pings(soak):
    """After the last fault: every pair, and every device to the relay's own .1."""
    started = time.monotonic()
    done = soak.recovery_s(list(PAIRS), started)
    assert sorted(done) == sorted(PAIRS), "after the soak only %s ping:\n%s" % (sorted(done), soak.logs_tail())
    for name in CLIENTS:
        assert ping_until_answered(soak.topo, name, soak.net.server_vip, started + RECOVERY_BOUND_S), name


def check_addresses(soak):
    """The first address everywhere: every join in every client log, the clients' and the server's status."""
    for name in CLIENTS:
        joins = [m.group(1) for proc in soak.history[name] for m in map(re.compile(JOINED).search, proc.lines()) if m]
        assert joins and set(joins) == {soak.first_vip[name]}, "device %s joined as %s" % (name, joins)
        config = os.path.join(soak.net.workdir, "client-%s.ini" % name)
        status = json.loads(soak.topo.run(name, [soak.net.python, CLIENT, "-c", config, "status", "--json"],
                                          timeout=20).stdout)
        assert status["address"] == "%s/24" % soak.first_vip[name], status
        assert status["state"] == "connected", status
    server = json.loads(soak.topo.run("srv", [soak.net.python, SERVER, "--control", soak.net.control_socket,
                                              "status", "--json"], timeout=20).stdout)
    addresses = {d["device_id"]: d["address"] for d in server["devices"] if d["kind"] == "tun"}
    assert addresses == {"device-" + n: soak.first_vip[n] for n in CLIENTS}, server["devices"]


def check_logs(soak):
    """No traceback and no moved address in any log of the relay's processes."""
    procs = soak.servers + [p for name in CLIENTS for p in soak.history[name]] + [soak.listener]
    procs += [proc for proc, _, _ in soak.attempts]
    for proc in procs:
        bad = [line for line in proc.lines()
               if "Traceback" in line or "internal error" in line or "moved this device" in line]
        assert not bad, "%s:\n%s" % (proc.label, "\n".join(bad[:20]))
