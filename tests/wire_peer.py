"""A blocking, scriptable MNEDC peer for tests: speaks the wire protocol over a real socket.

It uses the wire protocol block of mnedc_client.py, so a test can do what a client does, or do
it wrong on purpose (bad secret, garbage, oversized frames, silence).
"""

import os
import re
import socket
import struct
import sys
import time

from tests.conftest import ROOT
from tests.nettopo import Proc
import mnedc_client as wire

SERVER = os.path.join(ROOT, "mnedc_server.py")
CLIENT = os.path.join(ROOT, "mnedc_client.py")


class Refused(Exception):
    """The server answered with an ERROR frame."""

    def __init__(self, code, text):
        Exception.__init__(self, "%s: %s" % (wire.ERROR_NAMES.get(code, code), text))
        self.code, self.text = code, text


class WirePeer:
    def __init__(self, port, host="127.0.0.1", timeout=5.0, rcvbuf=None, pin=None, source=None):
        """pin: speak TLS, as the relay's default wants, to the certificate with this pin.
        source: the local address to connect from (another member behind another NAT)."""
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if source:
            self.sock.bind((source, 0))
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        if pin:
            import hashlib
            import ssl
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE     # the pin decides
            self.sock = context.wrap_socket(self.sock)
            served = "sha256:" + hashlib.sha256(self.sock.getpeercert(True)).hexdigest()
            assert served == pin, "the relay served %s, not the pinned %s" % (served, pin)
        self.reader = wire.FrameReader(max_payload=wire.MAX_PAYLOAD_BYTES)
        self.pending = []
        self.address = None

    def close(self):
        self.sock.close()

    def send_raw(self, data):
        self.sock.sendall(data)

    def send_frame(self, frame_type, payload=b""):
        self.sock.sendall(wire.encode_frame(frame_type, payload))

    def recv_frame(self, timeout=5.0, skip_pings=True):
        """The next frame; EOFError when the server closed; socket.timeout past the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            while self.pending:
                frame_type, payload = self.pending.pop(0)
                if skip_pings and frame_type == wire.FRAME_PING:
                    self.send_frame(wire.FRAME_PONG, payload)
                    continue
                return frame_type, payload
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("no frame within %.1f s" % timeout)
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except ConnectionError:
                raise
            except OSError as error:    # TLS: a close without close_notify
                if isinstance(error, socket.timeout):
                    raise
                data = b""
            if not data:
                raise EOFError("server closed the connection")
            self.reader.feed(data)
            self.pending.extend((frame_type, bytes(payload))   # views live until the next feed
                                for frame_type, payload in self.reader.take_frames())

    def expect_error(self, timeout=5.0):
        """(code, text) of the ERROR frame the server sends before closing."""
        frame_type, payload = self.recv_frame(timeout)
        assert frame_type == wire.FRAME_ERROR, "expected ERROR, got %s" % wire.FRAME_NAMES.get(frame_type)
        return wire.decode_error(payload)

    def closed_within(self, timeout):
        """True once the server closed (EOF or reset) within timeout; frames are discarded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                if not self.sock.recv(65536):
                    return True
            except socket.timeout:
                return False
            except OSError:                 # a reset, or TLS ended without close_notify
                return True
        return False

    def handshake(self, secret, device_id, flags=0, key=None):
        """Join; the packed virtual address. Refused if the server sends ERROR instead.
        key: the network key already derived (state_key), which saves a PBKDF2 per join."""
        nonce = os.urandom(wire.NONCE_BYTES)
        self.send_frame(wire.FRAME_HELLO, wire.encode_hello(nonce, device_id, flags))
        frame_type, payload = self.recv_frame()
        if frame_type == wire.FRAME_ERROR:
            raise Refused(*wire.decode_error(payload))
        server_nonce, salt = wire.decode_challenge(payload)
        key = key or wire.network_key(secret, salt)
        self.send_frame(wire.FRAME_AUTH, wire.client_proof(key, nonce, server_nonce, device_id))
        frame_type, payload = self.recv_frame()
        if frame_type == wire.FRAME_ERROR:
            raise Refused(*wire.decode_error(payload))
        assert frame_type == wire.FRAME_WELCOME
        self.address = wire.decode_welcome((key, nonce, server_nonce), payload)[0]
        if not flags & wire.HELLO_STREAMS:      # a TUN member hears the granted routes, none too
            frame_type, payload = self.recv_frame()
            assert frame_type == wire.FRAME_ROUTES, wire.FRAME_NAMES.get(frame_type, frame_type)
            self.routes = wire.decode_routes(payload)
        return self.address

    def send_packet(self, packet):
        self.send_frame(wire.FRAME_PACKET, packet)

    def recv_packet(self, timeout=5.0):
        frame_type, payload = self.recv_frame(timeout)
        assert frame_type == wire.FRAME_PACKET, "expected PACKET, got %s" % wire.FRAME_NAMES.get(frame_type)
        return payload


def ipv4_packet(source, destination, payload=b"", protocol=17):
    """A minimal IPv4 packet; source and destination packed or dotted."""
    if isinstance(source, str):
        source = socket.inet_aton(source)
    if isinstance(destination, str):
        destination = socket.inet_aton(destination)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, protocol, 0,
                         source, destination)
    return header + payload


def state_key(state_dir, secret):
    """The network key of a relay's secret under the salt in its state_dir."""
    with open(os.path.join(str(state_dir), "salt")) as source:
        return wire.network_key(secret, bytes.fromhex(source.read().strip()))


def leases_on_disk(state_dir):
    """device_id -> address, as a relay started now would read them: leases.json, then the
    journal of the changes since."""
    import json
    leases = {}
    table = os.path.join(str(state_dir), "leases.json")
    if os.path.exists(table):
        leases = {device_id: lease["address"] for device_id, lease in json.load(open(table))["leases"].items()}
    journal = table + ".journal"
    if os.path.exists(journal):
        for line in open(journal).read().splitlines():
            entry = json.loads(line)
            if "forget" in entry:
                leases.pop(entry["forget"], None)
            else:
                leases[entry["lease"]] = entry["address"]
    return leases


def state_pin(state_dir):
    """The pin of the certificate a relay made itself in state_dir (what it prints)."""
    import hashlib
    import ssl
    with open(os.path.join(str(state_dir), "tls.pem")) as source:
        return "sha256:" + hashlib.sha256(ssl.PEM_cert_to_DER_cert(source.read())).hexdigest()


def start_server(state_dir, *extra, **kw):
    """(Proc, port, secret) of a --no-tun server on loopback with an ephemeral port.

    secret is the one the server generated, or None when extra configures one. Plaintext
    (--no-tls), which a WirePeer speaks, unless tls=True: then the relay's default, TLS, and
    proc.pin is the pin its ready line gives.
    """
    python = kw.get("python", sys.executable)
    control = os.path.join(os.path.dirname(str(state_dir)), "server.sock")
    argv = list(kw.get("prefix", [])) + [python, "-u", SERVER, "--no-tun", "--listen", "127.0.0.1:0",
            "--subnet", kw.get("subnet", "198.18.0.0/24"), "--state-dir", str(state_dir),
            "--control", control] + ([] if kw.get("tls") else ["--no-tls"]) + list(extra)
    proc = Proc.start(argv, env=kw.get("env"))
    try:
        port = int(proc.wait_for(r"listening on 127\.0\.0\.1:(\d+)", timeout=15).group(1))
        ready = proc.wait_for(r"MNEDC server ready", timeout=10)
        pin = re.search(r"certificate pin (sha256:[0-9a-f]{64})", ready.string)
        proc.pin = pin.group(1) if pin else None
        generated = os.path.join(str(state_dir), "secret")
        secret = open(generated).read().strip().encode() if os.path.exists(generated) else None
    except BaseException:
        proc.stop()
        raise
    return proc, port, secret


def first_start_on_a_terminal(state_dir, *extra, **kw):
    """The output of a --no-tun server started with a terminal on stdout and stderr (as an
    operator starts it by hand) until it is ready, then stopped: (text, port, secret)."""
    import pty
    import re
    import select
    import signal
    import subprocess
    control = os.path.join(os.path.dirname(str(state_dir)), "terminal.sock")
    argv = [sys.executable, "-u", SERVER, "--no-tun", "--listen", "127.0.0.1:0", "--subnet", "198.18.0.0/24",
            "--state-dir", str(state_dir), "--control", control] + list(extra)
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    text, deadline = "", time.monotonic() + kw.get("timeout", 15)
    try:
        while "MNEDC server ready" not in text and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    text += os.read(master, 65536).decode("utf-8", "replace")
                except OSError:             # EIO: the server exited
                    break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        os.close(master)
    text = text.replace("\r\n", "\n")
    port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", text).group(1))
    return text, port, open(os.path.join(str(state_dir), "secret")).read().strip().encode()
