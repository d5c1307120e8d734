"""Someone on the path who knows no secret (a proxy in a lower NAT) cannot change what the relay
tells a client, nor inject (issue #13): WELCOME carries a MAC under the session's key, and by
default every link is TLS to the pinned certificate."""

import socket
import threading
import time

import mnedc_client as wire
from tests.streamnet import StreamNet, TcpServer, free_port, sink_digest

HEADER = wire.FRAME_HEADER


class PathProxy:
    """A TCP proxy on 127.0.0.1 between members and the relay, as an attacker in a lower NAT
    runs one: it passes what comes through, and its subclasses tamper on the way."""

    def __init__(self, relay_port):
        self.relay_port = relay_port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.listener.settimeout(30)
        self.port = self.listener.getsockname()[1]
        self.to_relay = []                      # the proxy's connections to the relay
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        for _ in range(4):                      # bounded: a few connections at most
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            relay = socket.create_connection(("127.0.0.1", self.relay_port), timeout=30)
            client.settimeout(30)
            self.to_relay.append(relay)
            threading.Thread(target=self.pump, args=(client, relay, False), daemon=True).start()
            threading.Thread(target=self.pump, args=(relay, client, True), daemon=True).start()

    def pump(self, source, sink, to_client):
        try:
            for _ in range(100000):
                data = source.recv(65536)
                if not data:
                    break
                self.forward(data, sink, to_client)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def forward(self, data, sink, to_client):
        sink.sendall(data)

    def close(self):
        self.listener.close()


class RewritingProxy(PathProxy):
    """Passes frames through, changing WELCOME's prefix length (byte 4 of its payload) on the
    way to the client: what the attack in issue #13 did."""

    def __init__(self, relay_port):
        self.rewritten = 0
        self.pending = {}                       # per direction of each connection: a partial frame
        PathProxy.__init__(self, relay_port)

    def forward(self, data, sink, to_client):
        pending = self.pending.setdefault(sink, bytearray())
        pending += data
        while len(pending) >= HEADER.size:
            length, frame_type, _ = HEADER.unpack_from(pending)
            if len(pending) < HEADER.size + length:
                break
            frame = pending[:HEADER.size + length]
            del pending[:HEADER.size + length]
            if to_client and frame_type == wire.FRAME_WELCOME:
                frame[HEADER.size + 4] = 16         # /24 becomes /16: a bigger network
                self.rewritten += 1
            sink.sendall(bytes(frame))


def test_a_proxy_without_the_secret_cannot_change_welcome(tmp_path):
    """With tls = no on both ends, where the proxy can parse every frame: WELCOME's own MAC is
    all that stops it (under the default, TLS, it sees only records: tests/test_e2e_nat.py)."""
    net = StreamNet(tmp_path, tls=False)
    proxy = RewritingProxy(net.port)
    try:
        honest = net.run("dev-a", "services", timeout=30)
        assert honest.returncode == 0, honest.stderr
        net.port, relay_port = proxy.port, net.port       # the clients now dial the proxy
        attacked = net.run("dev-a", "services", timeout=30)
        assert proxy.rewritten == 1
        assert attacked.returncode == 1
        assert "WELCOME's MAC is wrong: it was changed on the way to this client" in attacked.stderr, attacked.stderr
        net.port = relay_port
    finally:
        proxy.close()
        net.stop()


class InjectingProxy(PathProxy):
    """Passes bytes through untouched until told to inject its own frame towards the relay, as
    the proxy of issue #13 injected packets."""

    def inject(self, data):
        self.to_relay[0].sendall(data)


def test_under_the_default_tls_what_a_proxy_injects_ends_the_link_and_reaches_nobody(tmp_path):
    """The default: TLS, pinned. The proxy injects a frame that opens a stream to another
    device's service; the relay reads it as a broken TLS record, drops the link and delivers
    nothing; the client comes back on its own."""
    net = StreamNet(tmp_path)
    target = TcpServer(sink_digest)
    proxy = InjectingProxy(net.port)
    try:
        assert net.pin
        net.listen("dev-b", "--forward=%d" % target.port, "7")
        net.port, relay_port = proxy.port, net.port           # dev-a's session goes through the proxy
        victim = net.listen("dev-a", "--forward=%d" % free_port(), "8")
        net.port = relay_port
        mark = len(net.server.lines())
        proxy.inject(wire.encode_frame(wire.FRAME_OPEN, wire.encode_open(1, 7, 65536, "dev-b")))
        net.server.wait_for(r"stream session of device dev-a .* closed: .*(record|SSL|version|decrypt)", start=mark)
        victim.wait_for(r"relay connection lost", timeout=15)
        time.sleep(0.5)
        assert target.count == 0, "the injected OPEN reached dev-b's service"
        assert "Traceback" not in net.server.output() + victim.output()
    finally:
        proxy.close()
        target.close()
        net.stop()
