"""Someone on the path who knows no secret (a proxy in a lower NAT) cannot change what the relay
tells a client (issue #13): WELCOME carries a MAC under the session's key."""

import socket
import threading

import mnedc_client as wire
from tests.streamnet import StreamNet

HEADER = wire.FRAME_HEADER


class RewritingProxy:
    """A TCP proxy on 127.0.0.1 that passes frames through, changing WELCOME's prefix length
    (byte 4 of its payload) on the way to the client: what the attack in issue #13 did."""

    def __init__(self, relay_port):
        self.relay_port = relay_port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.listener.settimeout(30)
        self.port = self.listener.getsockname()[1]
        self.rewritten = 0
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
            threading.Thread(target=self.pump, args=(client, relay, False), daemon=True).start()
            threading.Thread(target=self.pump, args=(relay, client, True), daemon=True).start()

    def pump(self, source, sink, to_client):
        pending = bytearray()
        try:
            for _ in range(100000):
                data = source.recv(65536)
                if not data:
                    break
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
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


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
