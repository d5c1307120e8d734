"""Scale run: many members (one device_id each) on one relay server, joining at once, then idle.

One load-generating process speaks the real wire protocol for every member (5,000 Python
processes would measure the machine, not the server): each handshakes with its own device_id
and then keeps its link alive as MNEDC's clients do: a PING every 10 s (keepalive 30 s) and a
PONG for each of the server's. Members are stream sessions, or TUN
members (tun=True), which take a lease each: the relay's lease path at fleet scale. Meanwhile
a prober, a member in a process of its own, pings the relay every 10 ms: its slowest answer is
how long the relay's loop stalled. Reported: the time until every member was welcomed, the
prober's slowest answer during the joins and during the idle period, the server's CPU % of one
core over the idle period and over 20 s more with the prober stopped (the fleet's keepalives
alone), and its RSS.

    python3 bench/scale.py [CLIENTS [IDLE_S [tun]]]
    python3 bench/scale.py probe PORT STATE_DIR      (the prober; prints its figures at SIGTERM)
"""

import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mnedc_client as wire  # noqa: E402
from tests.nettopo import Proc  # noqa: E402
from tests.streamnet import free_port  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
IN_FLIGHT = 64
PING_EVERY_S = 10.0         # what a client with the default keepalive (30 s) does
QUIET_S = 20.0              # the members alone, the prober stopped (under the server's 30 s keepalive)


class Session:
    """One scripted stream session: HELLO -> CHALLENGE -> AUTH -> WELCOME, then PONGs."""

    def __init__(self, port, device_id, key, flags=wire.HELLO_STREAMS):
        self.port, self.device_id, self.key, self.flags = port, device_id, key, flags
        self.sock = None

    def start(self):
        self.sock = socket.socket()
        self.sock.setblocking(False)
        self.sock.connect_ex(("127.0.0.1", self.port))
        self.reader = wire.FrameReader(max_payload=wire.MAX_PAYLOAD_BYTES)
        self.nonce = os.urandom(wire.NONCE_BYTES)
        self.stage = "connecting"
        self.welcomed_at = None

    def fileno(self):
        return self.sock.fileno()

    def send(self, frame_type, payload):
        self.sock.sendall(wire.encode_frame(frame_type, payload))   # tiny frames: never blocks long

    def on_writable(self):
        self.send(wire.FRAME_HELLO, wire.encode_hello(self.nonce, self.device_id, self.flags))
        self.stage = "challenge"

    def on_readable(self):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("%s: the server closed the session" % self.device_id)
        self.reader.feed(data)
        for frame_type, payload in self.reader.take_frames():
            if frame_type == wire.FRAME_PONG:
                continue
            if frame_type == wire.FRAME_CHALLENGE:
                server_nonce, salt = wire.decode_challenge(payload)
                self.send(wire.FRAME_AUTH, wire.client_proof(self.key, self.nonce, server_nonce, self.device_id))
            elif frame_type == wire.FRAME_WELCOME:
                self.stage, self.welcomed_at = "established", time.monotonic()
                self.next_ping = self.welcomed_at + PING_EVERY_S
            elif frame_type == wire.FRAME_PING:
                self.send(wire.FRAME_PONG, payload)
            elif frame_type == wire.FRAME_ERROR:
                raise ConnectionError("%s refused: %s" % (self.device_id, wire.decode_error(payload)))


def server_cpu_s(pid):
    fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / float(CLOCK_TICKS)


def rss_kb(pid, field="VmRSS"):
    return int([l for l in open("/proc/%d/status" % pid) if l.startswith(field + ":")][0].split()[1])


def drive(sessions, selector, until, want_all_welcomed=False, waiting=()):
    """Serve the sessions until the deadline (or until every one is welcomed). Sessions in
    waiting start while fewer than IN_FLIGHT handshakes run: clients that arrive together still
    finish their handshakes in a round trip, and the server sheds handshakes past 256 pending."""
    waiting = list(waiting)
    while time.monotonic() < until:
        in_flight = sum(1 for s in sessions if not s.welcomed_at)
        while waiting and in_flight < IN_FLIGHT:
            session = waiting.pop(0)
            session.start()
            sessions.append(session)
            selector.register(session, selectors.EVENT_WRITE, session)
            in_flight += 1
        if want_all_welcomed and not waiting and all(s.welcomed_at for s in sessions):
            return True
        now = time.monotonic()
        for session in sessions:
            if session.welcomed_at and now >= session.next_ping:
                session.send(wire.FRAME_PING, struct.pack("!d", now))
                session.next_ping = now + PING_EVERY_S
        for key, events in selector.select(0.2):
            session = key.data
            if events & selectors.EVENT_WRITE and session.stage == "connecting":
                session.on_writable()
                selector.modify(session, selectors.EVENT_READ, session)
            elif events & selectors.EVENT_READ:
                session.on_readable()
    return all(s.welcomed_at for s in sessions)


def network_key_of(state):
    salt = bytes.fromhex(open(os.path.join(state, "salt")).read().strip())
    return wire.network_key(open(os.path.join(state, "secret")).read().strip().encode(), salt)


def scale_run(workdir, clients=500, idle_s=60, python=sys.executable, tun=False):
    """{'clients', 'tun', 'join_s', 'idle_s', 'stall_join_ms', 'stall_idle_ms', 'server_cpu_percent',
    'server_rss_mb', 'server_peak_rss_mb'}."""
    port = free_port()
    name = "scale-tun" if tun else "scale"
    state = os.path.join(workdir, name + "-state")
    config = os.path.join(workdir, name + ".ini")
    with open(config, "w") as sink:         # every member comes from 127.0.0.1: lift those limits
        sink.write("[server]\nmax_connections_per_source = %d\nmax_clients = %d\nmax_new_leases_per_minute = %d\n"
                   % (clients + 16, clients + 16, clients + 16))
    server = Proc.start([python, "-u", os.path.join(ROOT, "mnedc_server.py"), "-c", config, "--no-tun", "--listen",
                         "127.0.0.1:%d" % port, "--subnet", "198.18.0.0/17", "--state-dir", state,
                         "--control", os.path.join(workdir, name + ".sock"),
                         "--no-tls"])      # plaintext sessions: this measures the relay's bookkeeping
    selector = selectors.DefaultSelector()
    sessions = []
    prober = None
    try:
        server.wait_for(r"MNEDC server ready", timeout=20)
        key = network_key_of(state)
        prober = subprocess.Popen([python, os.path.abspath(__file__), "probe", str(port), state],
                                  stdout=subprocess.PIPE, text=True)
        if prober.stdout.readline().strip() != "probing":
            raise RuntimeError("the prober did not join")
        flags = 0 if tun else wire.HELLO_STREAMS
        started = time.monotonic()
        waiting = [Session(port, "scale-%05d" % n, key, flags) for n in range(clients)]
        if not drive(sessions, selector, started + 120, want_all_welcomed=True, waiting=waiting):
            raise RuntimeError("only %d of %d members joined within 120 s"
                               % (sum(1 for s in sessions if s.welcomed_at), clients))
        join_s = max(s.welcomed_at for s in sessions) - started
        stall_join_ms = probe_mark(prober)
        cpu_before, idle_started = server_cpu_s(server.pid), time.monotonic()
        drive(sessions, selector, idle_started + idle_s)
        cpu = server_cpu_s(server.pid) - cpu_before
        cpu_percent_probed = 100.0 * cpu / (time.monotonic() - idle_started)
        stall_idle_ms = probe_mark(prober)
        # then the members alone: the prober's 100 pings a second are not the fleet's keepalives
        prober.send_signal(signal.SIGSTOP)
        cpu_before, quiet_started = server_cpu_s(server.pid), time.monotonic()
        drive(sessions, selector, quiet_started + min(QUIET_S, idle_s))
        cpu = server_cpu_s(server.pid) - cpu_before
        prober.send_signal(signal.SIGCONT)
        return {"clients": clients, "tun": tun, "join_s": join_s, "idle_s": idle_s,
                "stall_join_ms": stall_join_ms, "stall_idle_ms": stall_idle_ms,
                "server_cpu_percent_probed": cpu_percent_probed,
                "server_cpu_percent": 100.0 * cpu / (time.monotonic() - quiet_started),
                "server_rss_mb": rss_kb(server.pid) / 1024.0,
                "server_peak_rss_mb": rss_kb(server.pid, "VmHWM") / 1024.0}
    finally:
        if prober is not None:
            prober.kill()
            prober.wait()
        for session in sessions:
            if session.sock is not None:
                session.sock.close()
        selector.close()
        server.stop()


def probe_mark(prober):
    """The prober's slowest answer since the last mark (ms); it starts a new period."""
    prober.send_signal(signal.SIGUSR1)
    line = prober.stdout.readline()
    if not line:
        raise RuntimeError("the prober died")
    return json.loads(line)["slowest_ms"]


def cmd_probe(port, state):
    """A TUN member that pings the relay every 10 ms and, at each SIGUSR1, prints the slowest
    answer since the last one. A ping unanswered still counts, for as long as it waited."""
    key = network_key_of(state)
    sock = socket.create_connection(("127.0.0.1", int(port)), timeout=10)
    reader = wire.FrameReader(max_payload=wire.MAX_PAYLOAD_BYTES)
    nonce = os.urandom(wire.NONCE_BYTES)

    def frames():
        while True:
            data = sock.recv(65536)
            if not data:
                raise SystemExit("the relay closed the prober's connection")
            reader.feed(data)
            for frame in reader.take_frames():
                yield frame

    incoming = frames()
    sock.sendall(wire.encode_frame(wire.FRAME_HELLO, wire.encode_hello(nonce, "prober", 0)))
    server_nonce, _ = wire.decode_challenge(next(incoming)[1])
    sock.sendall(wire.encode_frame(wire.FRAME_AUTH, wire.client_proof(key, nonce, server_nonce, "prober")))
    if next(incoming)[0] != wire.FRAME_WELCOME:
        raise SystemExit("the prober was refused")
    marks = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: marks.append(1))
    print("probing", flush=True)
    slowest = 0.0
    while True:
        sent = time.monotonic()
        sock.sendall(wire.encode_frame(wire.FRAME_PING, struct.pack("!d", sent)))
        for frame_type, payload in incoming:
            if frame_type == wire.FRAME_PONG:
                break
            if frame_type == wire.FRAME_PING:
                sock.sendall(wire.encode_frame(wire.FRAME_PONG, payload))
        slowest = max(slowest, time.monotonic() - sent)
        if marks:
            del marks[:]
            print(json.dumps({"slowest_ms": slowest * 1000.0}), flush=True)
            slowest = 0.0
        time.sleep(max(0.0, 0.01 - (time.monotonic() - sent)))


if __name__ == "__main__":
    if sys.argv[1:2] == ["probe"]:
        cmd_probe(*sys.argv[2:4])
        sys.exit(0)
    import tempfile
    with tempfile.TemporaryDirectory() as work:
        print(scale_run(work, clients=int(sys.argv[1]) if len(sys.argv) > 1 else 500,
                        idle_s=float(sys.argv[2]) if len(sys.argv) > 2 else 60, tun=sys.argv[3:4] == ["tun"]))
