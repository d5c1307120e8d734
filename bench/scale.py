"""Scale run: many stream-mode sessions (one device_id each) on one relay server, idle.

One load-generating process speaks the real wire protocol for every session (500 Python
processes would measure the machine, not the server): each session handshakes with its own
device_id and then only answers the server's keepalive PINGs. Reported: the time until every
session was welcomed, and over the idle period the server's CPU % of one core and its RSS.
"""

import os
import selectors
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mnedc_client as wire  # noqa: E402
from tests.nettopo import Proc  # noqa: E402
from tests.streamnet import free_port  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
IN_FLIGHT = 64


class Session:
    """One scripted stream session: HELLO -> CHALLENGE -> AUTH -> WELCOME, then PONGs."""

    def __init__(self, port, device_id, key):
        self.port, self.device_id, self.key = port, device_id, key
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
        self.send(wire.FRAME_HELLO, wire.encode_hello(self.nonce, self.device_id, wire.HELLO_STREAMS))
        self.stage = "challenge"

    def on_readable(self):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("%s: the server closed the session" % self.device_id)
        self.reader.feed(data)
        for frame_type, payload in self.reader.take_frames():
            if frame_type == wire.FRAME_CHALLENGE:
                server_nonce, salt = wire.decode_challenge(payload)
                self.send(wire.FRAME_AUTH, wire.client_proof(self.key, self.nonce, server_nonce, self.device_id))
            elif frame_type == wire.FRAME_WELCOME:
                self.stage, self.welcomed_at = "established", time.monotonic()
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
        for key, events in selector.select(0.2):
            session = key.data
            if events & selectors.EVENT_WRITE and session.stage == "connecting":
                session.on_writable()
                selector.modify(session, selectors.EVENT_READ, session)
            elif events & selectors.EVENT_READ:
                session.on_readable()
    return all(s.welcomed_at for s in sessions)


def scale_run(workdir, clients=500, idle_s=60, python=sys.executable):
    """{'clients', 'join_s', 'idle_s', 'server_cpu_percent', 'server_rss_mb', 'server_peak_rss_mb'}."""
    port = free_port()
    state = os.path.join(workdir, "scale-state")
    config = os.path.join(workdir, "scale.ini")
    with open(config, "w") as sink:         # every session comes from 127.0.0.1: lift that limit
        sink.write("[server]\nmax_connections_per_source = %d\nmax_clients = %d\n" % (clients + 16, clients + 16))
    server = Proc.start([python, "-u", os.path.join(ROOT, "mnedc_server.py"), "-c", config, "--no-tun", "--listen",
                         "127.0.0.1:%d" % port, "--subnet", "198.18.0.0/24", "--state-dir", state,
                         "--control", os.path.join(workdir, "scale.sock"),
                         "--no-tls"])      # plaintext sessions: this measures the relay's bookkeeping
    selector = selectors.DefaultSelector()
    sessions = []
    try:
        server.wait_for(r"MNEDC server ready", timeout=20)
        salt = bytes.fromhex(open(os.path.join(state, "salt")).read().strip())
        key = wire.network_key(open(os.path.join(state, "secret")).read().strip().encode(), salt)
        started = time.monotonic()
        waiting = [Session(port, "scale-%04d" % n, key) for n in range(clients)]
        if not drive(sessions, selector, started + 60, want_all_welcomed=True, waiting=waiting):
            raise RuntimeError("only %d of %d sessions joined within 60 s"
                               % (sum(1 for s in sessions if s.welcomed_at), clients))
        join_s = max(s.welcomed_at for s in sessions) - started
        cpu_before, idle_started = server_cpu_s(server.pid), time.monotonic()
        drive(sessions, selector, idle_started + idle_s)
        cpu = server_cpu_s(server.pid) - cpu_before
        return {"clients": clients, "join_s": join_s, "idle_s": idle_s,
                "server_cpu_percent": 100.0 * cpu / (time.monotonic() - idle_started),
                "server_rss_mb": rss_kb(server.pid) / 1024.0,
                "server_peak_rss_mb": rss_kb(server.pid, "VmHWM") / 1024.0}
    finally:
        for session in sessions:
            if session.sock is not None:
                session.sock.close()
        selector.close()
        server.stop()


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as work:
        print(scale_run(work, clients=int(sys.argv[1]) if len(sys.argv) > 1 else 500,
                        idle_s=float(sys.argv[2]) if len(sys.argv) > 2 else 60))
