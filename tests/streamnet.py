"""Stream-mode test kit: a loopback relay, client configs per device, and real TCP ends."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

from tests.nettopo import Proc
from tests.wire_peer import CLIENT, WirePeer, start_server


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class StreamNet:
    """A --no-tun relay on loopback and `mnedc_client.py` stream commands against it."""

    def __init__(self, workdir, keepalive=None, python=sys.executable, server_lines=(), client_lines=(),
                 env=None, relay_host="127.0.0.1", tls=True):
        """server_lines, client_lines: more lines for the [server] and every [client] section;
        %(device_id)s in a client line becomes the client's device_id. env: every process's
        environment (tests/light.py's simulation); relay_host: how clients name the relay.
        tls: the default setup, the relay's own certificate and clients that pin it; False:
        tls = no on both sides. Lines that set TLS keys themselves replace these."""
        self.workdir = str(workdir)
        self.keepalive = keepalive
        self.python = python
        self.env = env
        self.relay_host = relay_host
        self.server_lines = list(server_lines)
        self.client_lines = list(client_lines)
        self.tls = tls
        self.pin = None
        self.procs = []
        self.port = free_port()
        self.start_server()

    def start_server(self):
        extra = ["--listen", "%s:%d" % (self.relay_host, self.port)]
        lines = (["keepalive = %d" % self.keepalive] if self.keepalive else []) + self.server_lines
        if lines:
            config = os.path.join(self.workdir, "server.ini")
            with open(config, "w") as sink:
                sink.write("[server]\n" + "".join(line + "\n" for line in lines))
            extra += ["-c", config]
        self.server, _, self.secret = start_server(os.path.join(self.workdir, "state"), *extra,
                                                   python=self.python, env=self.env,
                                                   tls=self.tls or sets_tls(self.server_lines))
        self.pin = self.server.pin
        self.procs.append(self.server)
        return self.server

    def config(self, device_id):
        path = os.path.join(self.workdir, "%s.ini" % device_id)
        with open(path, "w") as sink:
            sink.write("[client]\nserver = %s:%d\nsecret = %s\ndevice_id = %s\n"
                       % (self.relay_host, self.port, self.secret.decode(), device_id))
            if self.keepalive:
                sink.write("keepalive = %d\n" % self.keepalive)
            if not sets_tls(self.client_lines):
                sink.write("server_pin = %s\n" % self.pin if self.pin else "tls = no\n")
            sink.write("".join(line % {"device_id": device_id} + "\n" for line in self.client_lines))
        return path

    def peer(self, **kw):
        """A WirePeer at this relay, speaking what its clients speak (TLS with the pin, or not)."""
        return WirePeer(self.port, host=self.relay_host, pin=self.pin, **kw)

    def argv(self, device_id, *command):
        return [self.python, "-u", CLIENT, "-c", self.config(device_id)] + list(command)

    def spawn(self, device_id, *command, **kw):
        proc = Proc.start(self.argv(device_id, *command), stdin=kw.get("stdin", subprocess.DEVNULL), env=self.env)
        self.procs.append(proc)
        return proc

    def listen(self, device_id, *command):
        """A long-running `listen`, returned once it is registered."""
        proc = self.spawn(device_id, "listen", *command)
        proc.wait_for(r"listening on virtual port", timeout=15)
        return proc

    def forward(self, device_id, peer, port=None):
        """A `connect --forward` process and the local port to dial."""
        local = free_port()
        proc = self.spawn(device_id, "connect", "--forward=%d" % local, peer, *([str(port)] if port else []))
        proc.wait_for(r"listening on 127\.0\.0\.1:%d" % local, timeout=15)
        return proc, local

    def send_through(self, sender, listener, port, data, timeout=60):
        """`connect` from sender sends data to a `listen --forward` of listener's port; asserts it
        left cleanly and reached the real TCP end byte-exact. The connect's CompletedProcess."""
        target = TcpServer(sink_digest)
        try:
            self.listen(listener, "--forward=%d" % target.port, str(port))
            sent = self.run(sender, "connect", listener, str(port), input=data, timeout=timeout)
            assert sent.returncode == 0, sent.stderr
            assert target.wait_results(1)[0] == (len(data), hashlib.sha256(data).hexdigest())
            return sent
        finally:
            target.close()

    def run(self, device_id, *command, **kw):
        """A one-shot command to completion: CompletedProcess with bytes stdout, text stderr."""
        result = subprocess.run(self.argv(device_id, *command), input=kw.get("input", b""),
                                capture_output=True, timeout=kw.get("timeout", 60), env=self.env)
        result.stderr = result.stderr.decode("utf-8", "replace")
        return result

    def services(self, device_id="observer"):
        result = self.run(device_id, "services", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.decode())

    def stop(self):
        for proc in reversed(self.procs):
            proc.stop()


def sets_tls(lines):
    """Whether these config lines choose TLS or plaintext themselves."""
    return any(line.split("=")[0].strip() in ("tls", "server_pin", "tls_ca") for line in lines)


class TcpServer:
    """A real TCP server on 127.0.0.1 whose per-connection behaviour a test chooses.

    handler(sock, index) runs in a thread per connection; results[index] holds what it returns.
    """

    def __init__(self, handler):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.results = {}
        self.errors = []
        self.count = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def _accept_loop(self):
        while not self.stopping:
            try:
                sock, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            index, self.count = self.count, self.count + 1
            threading.Thread(target=self._serve, args=(sock, index), daemon=True).start()

    def _serve(self, sock, index):
        try:
            sock.settimeout(60)
            self.results[index] = self.handler(sock, index)
        except Exception as error:          # reported by the test through .errors
            self.errors.append((index, repr(error)))
        finally:
            sock.close()

    def wait_results(self, count, timeout=60):
        deadline = time.monotonic() + timeout
        while len(self.results) + len(self.errors) < count:
            assert time.monotonic() < deadline, "only %d of %d connections done: %r" % (
                len(self.results), count, self.errors)
            time.sleep(0.02)
        assert not self.errors, self.errors
        return self.results

    def close(self):
        self.stopping = True
        self.sock.close()
        self.thread.join(5)


def echo(sock, index):
    total = 0
    while True:
        data = sock.recv(65536)
        if not data:
            sock.shutdown(socket.SHUT_WR)
            return total
        sock.sendall(data)
        total += len(data)


def sink_digest(sock, index):
    """Read to EOF without sending: (bytes, sha256)."""
    digest, total = hashlib.sha256(), 0
    while True:
        data = sock.recv(262144)
        if not data:
            return total, digest.hexdigest()
        digest.update(data)
        total += len(data)


def recv_all(sock, limit=None):
    chunks, total = [], 0
    while limit is None or total < limit:
        data = sock.recv(262144)
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)
