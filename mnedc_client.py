#!/usr/bin/env python3
"""MNEDC client: joins this device to the MNEDC virtual network through the relay server.

It keeps one TCP connection to the server (which sits in the main NAT, reachable from here),
proves it knows the network secret, receives this device's virtual IP, and carries IP packets
between a TUN interface with that address and the relay. Any other device is then reachable
by its virtual IP, whichever NAT it sits behind. On a lost connection it reconnects forever
(1 s to 30 s backoff) and keeps the interface and its address, so open sockets survive.

Configuration: an INI file with a [client] section (-c; default /etc/mnedc/client-config.ini,
else ./client-config.ini), then command-line flags.
  server      HOST or HOST:PORT of the relay server          (required; port 3334)
  secret      the network secret, or secret_file = PATH      (required)
  device_id   this device's name; it keeps its address by it (default /etc/machine-id, else hostname)
  interface   TUN interface name                             (default mnedc0)
  mtu         TUN interface MTU                              (default 1500)
  keepalive   seconds without a frame before the server is presumed dead (default 30)
Needs root (or CAP_NET_ADMIN) and /dev/net/tun.
"""

import argparse
import configparser
import errno
import fcntl
import heapq
import os
import random
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
# hashlib, hmac and struct are imported by the wire protocol block below.

DEFAULT_PORT = 3334
DEFAULT_CONFIG_PATHS = ("/etc/mnedc/client-config.ini", "client-config.ini")
DEFAULT_INTERFACE = "mnedc0"
DEFAULT_MTU = 1500
DEFAULT_KEEPALIVE_S = 30
CONNECT_TIMEOUT_S = 10
HANDSHAKE_TIMEOUT_S = 10
MIN_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
RECV_BYTES = 256 * 1024
TUN_PACKETS_PER_WAKEUP = 64
HIGH_WATER_BYTES = 512 * 1024   # relay queue above this: stop reading the TUN (backpressure)
LOW_WATER_BYTES = 128 * 1024    # ... and read it again once the queue drained below this


# ==== BEGIN MNEDC WIRE PROTOCOL ====
# This block is byte-identical in mnedc_server.py and mnedc_client.py (tests/test_shared_blocks.py
# proves it). Pure code: no sockets, no logging, no globals that change.
#
# A relay connection is one TCP stream of frames, each a 4-byte header and a payload:
#
#     0       2       3       4
#     +-------+-------+-------+--------------------------+
#     |length | type  | flags | payload (length bytes)   |
#     +-------+-------+-------+--------------------------+
#     length: payload bytes, u16 big-endian; flags: 0 (reserved)
#
# Handshake (client C, server S, network secret K, fresh 16-byte nonces Nc and Ns):
#     C -> S  HELLO      "MNEDC", version, Nc, device_id
#     S -> C  CHALLENGE  version, Ns, HMAC-SHA256(K, "mnedc server" | Nc | Ns | device_id)
#     C -> S  AUTH       HMAC-SHA256(K, "mnedc client" | Ns | Nc | device_id)
#     S -> C  WELCOME    virtual address, prefix length, the server's virtual address
# Each side proves it knows K without sending it; fresh nonces make a recorded proof useless.
# Instead of the next step either side may send ERROR (code, text) and close.
# After WELCOME: PACKET (one IPv4 packet) both ways; PING, answered by PONG with the same payload.
# The header, the first 7 bytes of HELLO and the ERROR layout never change between versions, so
# any two versions can tell each other why they refuse.

import hashlib                      # the block imports what it uses, so it runs on its own
import hmac
import struct

PROTOCOL_VERSION = 1
HELLO_MAGIC = b"MNEDC"

FRAME_HEADER = struct.Struct("!HBB")
MAX_PAYLOAD_BYTES = 65535
HANDSHAKE_MAX_PAYLOAD_BYTES = 512

FRAME_HELLO = 1
FRAME_CHALLENGE = 2
FRAME_AUTH = 3
FRAME_WELCOME = 4
FRAME_ERROR = 5
FRAME_PACKET = 6
FRAME_PING = 7
FRAME_PONG = 8
FRAME_NAMES = {
    FRAME_HELLO: "HELLO", FRAME_CHALLENGE: "CHALLENGE", FRAME_AUTH: "AUTH",
    FRAME_WELCOME: "WELCOME", FRAME_ERROR: "ERROR", FRAME_PACKET: "PACKET",
    FRAME_PING: "PING", FRAME_PONG: "PONG",
}

ERROR_VERSION = 1
ERROR_AUTH = 2
ERROR_POOL_FULL = 3
ERROR_REPLACED = 4
ERROR_PROTOCOL = 5
ERROR_SHUTDOWN = 6
ERROR_TIMEOUT = 7
ERROR_NAMES = {
    ERROR_VERSION: "version mismatch", ERROR_AUTH: "authentication failed",
    ERROR_POOL_FULL: "address pool full", ERROR_REPLACED: "replaced",
    ERROR_PROTOCOL: "protocol error", ERROR_SHUTDOWN: "server shutting down",
    ERROR_TIMEOUT: "timeout",
}

NONCE_BYTES = 16
MAC_BYTES = 32
MAX_DEVICE_ID_BYTES = 64
MAX_ERROR_TEXT_BYTES = 400
MAX_PING_BYTES = 64
DEVICE_ID_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-:@")

HELLO = struct.Struct("!5sHH16sB")       # magic, version, reserved, nonce, device_id length
CHALLENGE = struct.Struct("!H16s32s")    # version, server nonce, server proof
AUTH = struct.Struct("!32s")             # client proof
WELCOME = struct.Struct("!4sB4s")        # virtual address, prefix length, server virtual address
ERROR = struct.Struct("!B")              # code, then UTF-8 text


class ProtocolError(Exception):
    """The peer sent something the protocol does not allow: close that connection."""


class VersionMismatch(ProtocolError):
    """The peer speaks another protocol version; peer_version says which."""

    def __init__(self, peer_version):
        ProtocolError.__init__(
            self, "protocol version mismatch: peer speaks version %d, this side speaks "
                  "version %d (update mnedc_server.py and mnedc_client.py together)"
                  % (peer_version, PROTOCOL_VERSION))
        self.peer_version = peer_version


def encode_frame(frame_type, payload=b""):
    """One frame as bytes; raises ValueError for a payload the header cannot describe."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError("payload of %d bytes exceeds %d" % (len(payload), MAX_PAYLOAD_BYTES))
    return FRAME_HEADER.pack(len(payload), frame_type, 0) + payload


class FrameReader:
    """Cuts a TCP byte stream into frames, however recv() happened to split it.

    feed() whatever arrived, then take_frames() for the complete ones as (type, payload).
    max_payload starts at the handshake limit: nobody unauthenticated can make us buffer 64 KB.
    """

    def __init__(self, max_payload=HANDSHAKE_MAX_PAYLOAD_BYTES):
        self.max_payload = max_payload
        self._buffer = bytearray()

    def feed(self, data):
        self._buffer += data

    def buffered_bytes(self):
        return len(self._buffer)

    def take_frames(self, limit=1000):
        """Complete frames in arrival order (at most limit); raises ProtocolError on a bad header."""
        buffer, offset, frames = self._buffer, 0, []
        header_size = FRAME_HEADER.size
        while len(buffer) - offset >= header_size and len(frames) < limit:
            length, frame_type, flags = FRAME_HEADER.unpack_from(buffer, offset)
            if length > self.max_payload:
                raise ProtocolError("frame of %d bytes exceeds the limit of %d"
                                    % (length, self.max_payload))
            if flags:
                raise ProtocolError("frame flags 0x%02x are reserved" % flags)
            end = offset + header_size + length
            if end > len(buffer):
                break
            frames.append((frame_type, bytes(buffer[offset + header_size:end])))
            offset = end
        del buffer[:offset]
        return frames


def check_device_id(device_id):
    """The device_id itself if it is usable on the wire, in logs and in file names; else ValueError."""
    if not 1 <= len(device_id) <= MAX_DEVICE_ID_BYTES:
        raise ValueError("device_id must be 1 to %d characters" % MAX_DEVICE_ID_BYTES)
    if not set(device_id) <= DEVICE_ID_CHARS:
        raise ValueError("device_id %r may only hold letters, digits and . _ - : @" % device_id)
    return device_id


def encode_hello(nonce, device_id):
    raw_id = check_device_id(device_id).encode("ascii")
    return HELLO.pack(HELLO_MAGIC, PROTOCOL_VERSION, 0, nonce, len(raw_id)) + raw_id


def decode_hello(payload):
    """(client nonce, device_id); VersionMismatch for another version, ProtocolError for junk."""
    if len(payload) < 7 or payload[:5] != HELLO_MAGIC:
        raise ProtocolError("not an MNEDC client (bad HELLO magic)")
    version = struct.unpack_from("!H", payload, 5)[0]
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(version)
    if len(payload) < HELLO.size:
        raise ProtocolError("HELLO of %d bytes is truncated" % len(payload))
    _, _, _, nonce, id_length = HELLO.unpack_from(payload)
    raw_id = payload[HELLO.size:]
    if len(raw_id) != id_length:
        raise ProtocolError("HELLO device_id length %d does not match its %d bytes"
                            % (id_length, len(raw_id)))
    try:
        return nonce, check_device_id(raw_id.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ProtocolError("bad device_id in HELLO: %s" % error)


def server_proof(secret, client_nonce, server_nonce, device_id):
    message = b"mnedc server" + client_nonce + server_nonce + device_id.encode("ascii")
    return hmac.new(secret, message, hashlib.sha256).digest()


def client_proof(secret, client_nonce, server_nonce, device_id):
    message = b"mnedc client" + server_nonce + client_nonce + device_id.encode("ascii")
    return hmac.new(secret, message, hashlib.sha256).digest()


def encode_challenge(server_nonce, proof):
    return CHALLENGE.pack(PROTOCOL_VERSION, server_nonce, proof)


def decode_challenge(payload):
    """(server nonce, server proof)."""
    if len(payload) >= 2 and struct.unpack_from("!H", payload)[0] != PROTOCOL_VERSION:
        raise VersionMismatch(struct.unpack_from("!H", payload)[0])
    if len(payload) != CHALLENGE.size:
        raise ProtocolError("CHALLENGE of %d bytes, expected %d" % (len(payload), CHALLENGE.size))
    _, server_nonce, proof = CHALLENGE.unpack(payload)
    return server_nonce, proof


def decode_auth(payload):
    if len(payload) != AUTH.size:
        raise ProtocolError("AUTH of %d bytes, expected %d" % (len(payload), AUTH.size))
    return payload


def encode_welcome(address, prefix_length, server_address):
    """Addresses are 4 packed bytes (socket.inet_aton)."""
    return WELCOME.pack(address, prefix_length, server_address)


def decode_welcome(payload):
    """(address, prefix length, server address), addresses as 4 packed bytes."""
    if len(payload) != WELCOME.size:
        raise ProtocolError("WELCOME of %d bytes, expected %d" % (len(payload), WELCOME.size))
    address, prefix_length, server_address = WELCOME.unpack(payload)
    if not 1 <= prefix_length <= 30:
        raise ProtocolError("WELCOME prefix length /%d is not usable" % prefix_length)
    return address, prefix_length, server_address


def encode_error(code, text):
    return ERROR.pack(code) + text.encode("utf-8")[:MAX_ERROR_TEXT_BYTES]


def decode_error(payload):
    """(code, text); never fails on odd text, since it only goes into a log line."""
    if len(payload) < ERROR.size:
        raise ProtocolError("empty ERROR frame")
    text = payload[ERROR.size:ERROR.size + MAX_ERROR_TEXT_BYTES].decode("utf-8", "replace")
    return payload[0], "".join(c if c.isprintable() else "?" for c in text)


def check_ping(payload):
    if len(payload) > MAX_PING_BYTES:
        raise ProtocolError("PING/PONG of %d bytes exceeds %d" % (len(payload), MAX_PING_BYTES))
    return payload


def ipv4_problem(packet):
    """Why packet is not a well-formed IPv4 packet, or None when it is."""
    if len(packet) < 20:
        return "packet of %d bytes is too short for IPv4" % len(packet)
    if packet[0] >> 4 != 4:
        return "not an IPv4 packet (version %d)" % (packet[0] >> 4)
    if (packet[0] & 0x0F) < 5:
        return "IPv4 header length %d is too short" % (packet[0] & 0x0F)
    total_length = (packet[2] << 8) | packet[3]
    if total_length != len(packet):
        return "IPv4 total length %d but %d bytes arrived" % (total_length, len(packet))
    return None
# ==== END MNEDC WIRE PROTOCOL ====


# ==== CONNECTIONS ====
#
# One RelayLink is one attempt to reach the server; TunClient makes a new one after a loss.
#
#   stage        waits for        then
#   connecting   TCP connect      send HELLO                               -> challenge
#   challenge    CHALLENGE        check the server's proof, send AUTH      -> welcome
#   welcome      WELCOME          give the TUN interface its address       -> established
#   established  PACKET/PING/...  packets to the TUN, answer pings, send keepalives
#
# Each stage before established must finish within its timeout, or the attempt is closed.

FATAL_SERVER_ERRORS = (ERROR_AUTH, ERROR_VERSION)


class RelayLink:
    """The TCP connection to the relay server, from connect() to close."""

    def __init__(self, client, sock, server_label):
        self.client = client
        self.sock = sock
        self.server_label = server_label
        self.stage = "connecting"
        self.reader = FrameReader()
        self.out = bytearray()
        self.client_nonce = os.urandom(NONCE_BYTES)
        now = time.monotonic()
        self.deadline = now + CONNECT_TIMEOUT_S
        self.last_received = self.last_ping = now
        self.rtt_ms = None

    def fileno(self):
        return self.sock.fileno()

    def __repr__(self):
        return "RelayLink(%s, %s)" % (self.server_label, self.stage)

    # -- receiving, in the order a frame travels --

    def on_readable(self):
        data = self.sock.recv(RECV_BYTES)
        if not data:
            self.close("the server closed the connection")
            return
        self.last_received = time.monotonic()
        self.reader.feed(data)
        try:
            for frame_type, payload in self.reader.take_frames():
                handler = LINK_HANDLERS[self.stage].get(frame_type, RelayLink.on_unexpected)
                handler(self, frame_type, payload)
                if self.stage == "closed":
                    return
        except ProtocolError as error:
            self.send_frame(FRAME_ERROR, encode_error(ERROR_PROTOCOL, str(error)))
            self.close("protocol error from the server: %s" % error)

    def on_unexpected(self, frame_type, payload):
        name = FRAME_NAMES.get(frame_type, "unknown frame type %d" % frame_type)
        raise ProtocolError("%s while in stage %s" % (name, self.stage))

    def on_challenge(self, frame_type, payload):
        server_nonce, proof = decode_challenge(payload)
        config = self.client.config
        expected = server_proof(config.secret, self.client_nonce, server_nonce, config.device_id)
        if not hmac.compare_digest(proof, expected):
            self.send_frame(FRAME_ERROR, encode_error(ERROR_AUTH, "the server's proof is wrong"))
            self.client.fatal("authentication failed: the server at %s does not know this "
                              "network's secret (check secret in the client config)" % self.server_label)
            self.close("authentication failed")
            return
        self.send_frame(FRAME_AUTH, client_proof(config.secret, self.client_nonce, server_nonce,
                                                 config.device_id))
        self.stage = "welcome"

    def on_welcome(self, frame_type, payload):
        address, prefix_length, server_address = decode_welcome(payload)
        self.reader.max_payload = MAX_PAYLOAD_BYTES
        self.stage = "established"
        self.client.on_welcome(self, address, prefix_length, server_address)

    def on_error(self, frame_type, payload):
        code, text = decode_error(payload)
        self.client.on_server_error(code, text)
        self.close("the server refused: %s: %s" % (ERROR_NAMES.get(code, "error %d" % code), text))

    def on_packet(self, frame_type, payload):
        problem = ipv4_problem(payload)
        if problem:
            raise ProtocolError(problem)
        self.client.tun.send_packet(payload)

    def on_ping(self, frame_type, payload):
        self.send_frame(FRAME_PONG, check_ping(payload))

    def on_pong(self, frame_type, payload):
        if len(check_ping(payload)) == 8:
            self.rtt_ms = (time.monotonic() - struct.unpack("!d", payload)[0]) * 1000.0

    # -- sending --

    def on_connected(self):
        """The TCP connect finished (or failed: then OSError names why)."""
        failure = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if failure:
            raise OSError(failure, os.strerror(failure))
        self.stage = "challenge"
        self.deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        self.client.loop.set_interest(self, selectors.EVENT_READ)
        self.send_frame(FRAME_HELLO, encode_hello(self.client_nonce, self.client.config.device_id))

    def send_packet(self, packet):
        """Queue one packet; True while the queue is below the high-water mark."""
        self.send_frame(FRAME_PACKET, packet)
        return len(self.out) < HIGH_WATER_BYTES

    def send_frame(self, frame_type, payload):
        """Send at once; queue only what the kernel did not take. Failures close the link."""
        frame = encode_frame(frame_type, payload)
        if not self.out:
            try:
                sent = self.sock.send(frame)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as error:
                self.close(describe_error(error))
                return
            if sent == len(frame):
                return
            frame = frame[sent:]
        self.out += frame
        self.client.loop.set_interest(self, selectors.EVENT_READ | selectors.EVENT_WRITE)

    def on_writable(self):
        if self.stage == "connecting":
            self.on_connected()
            return
        if self.out:
            sent = self.sock.send(self.out)
            del self.out[:sent]
        if not self.out:
            self.client.loop.set_interest(self, selectors.EVENT_READ)
        if len(self.out) < LOW_WATER_BYTES:
            self.client.tun.resume()

    # -- ending --

    def check_timers(self, now):
        if self.stage != "established":
            if now > self.deadline:
                self.close("no answer from the server within %d s (stage %s)"
                           % (CONNECT_TIMEOUT_S if self.stage == "connecting" else HANDSHAKE_TIMEOUT_S,
                              self.stage))
            return
        keepalive = self.client.config.keepalive
        if now - self.last_received > keepalive:
            self.close("no frame from the server for %d s: relay presumed dead" % keepalive)
        elif now - self.last_ping >= keepalive / 3.0:
            self.last_ping = now
            self.send_frame(FRAME_PING, struct.pack("!d", now))

    def close(self, reason):
        """Never raises; safe to call twice."""
        if self.stage == "closed":
            return
        was_established = self.stage == "established"
        self.stage = "closed"
        try:
            self.client.loop.forget(self)
        except (KeyError, ValueError, OSError):
            pass
        self.sock.close()
        self.client.on_link_closed(self, reason, was_established)


LINK_HANDLERS = {
    "connecting": {},
    "challenge": {FRAME_CHALLENGE: RelayLink.on_challenge, FRAME_ERROR: RelayLink.on_error},
    "welcome": {FRAME_WELCOME: RelayLink.on_welcome, FRAME_ERROR: RelayLink.on_error},
    "established": {
        FRAME_PACKET: RelayLink.on_packet, FRAME_PING: RelayLink.on_ping,
        FRAME_PONG: RelayLink.on_pong, FRAME_ERROR: RelayLink.on_error,
    },
}


class ClientTun:
    """This device's TUN interface: packets the kernel routes into the virtual network."""

    def __init__(self, client, fd, interface):
        self.client = client
        self.fd = fd
        self.interface = interface
        self.paused = False
        self.closed = False

    def fileno(self):
        return self.fd

    def __repr__(self):
        return "ClientTun(%s)" % self.interface

    def on_readable(self):
        for _ in range(TUN_PACKETS_PER_WAKEUP):
            try:
                packet = os.read(self.fd, TUN_READ_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            if not self.client.forward_from_tun(packet):
                self.pause()
                return

    def send_packet(self, packet):
        try:
            os.write(self.fd, packet)
        except OSError as error:
            self.client.count_drop("TUN write failed: %s" % describe_error(error))

    def pause(self):
        """Stop reading: the kernel's TUN queue fills and drops, as a congested link would."""
        if not self.paused and not self.closed:
            self.paused = True
            self.client.loop.set_interest(self, 0)

    def resume(self):
        if self.paused and not self.closed:
            self.paused = False
            self.client.loop.set_interest(self, selectors.EVENT_READ)

    def on_writable(self):
        pass

    def close(self, reason):
        """Closing the fd removes the interface. Never raises; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self.client.loop.forget(self)
        os.close(self.fd)
        self.client.log.info("removed interface %s: %s" % (self.interface, reason))


# ==== THE CLIENT ====

class TunClient:
    """Keeps this device on the virtual network: one TUN interface, one relay link at a time."""

    def __init__(self, config, log):
        self.config = config
        self.log = log
        self.loop = EventLoop(log)
        self.tun = None
        self.link = None
        self.configured = None          # (address, prefix length) the interface has
        self.failures = 0               # attempts since the last WELCOME, for the backoff
        self.drops = {}
        self.exit_code = 0
        self.stopping = False

    def start(self):
        """Create the TUN interface (it lives until we stop) and start connecting."""
        try:
            fd, interface = open_tun(self.config.interface)
        except OSError as error:
            raise OSError(error.errno, "cannot create TUN interface %s: %s (TUN mode needs root "
                          "and /dev/net/tun)" % (self.config.interface, describe_error(error)))
        self.tun = ClientTun(self, fd, interface)
        self.loop.set_interest(self.tun, selectors.EVENT_READ)
        self.loop.call_every(1.0, self.tick)
        self.loop.on_signals((signal.SIGTERM, signal.SIGINT), self.on_stop_signal)
        self.log.info("created interface %s; device %s connecting to %s:%d"
                      % (interface, self.config.device_id, self.config.server[0], self.config.server[1]))
        self.connect()

    def run(self):
        self.loop.run()
        return self.exit_code

    # -- the relay link --

    def connect(self):
        host, port = self.config.server
        label = "%s:%d" % (host, port)
        try:
            address = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
        except (socket.gaierror, OSError) as error:
            self.retry_later("cannot resolve %s: %s" % (host, error))
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        failure = sock.connect_ex(address)
        if failure not in (0, errno.EINPROGRESS):
            sock.close()
            self.retry_later("cannot connect to %s: %s" % (label, os.strerror(failure).lower()))
            return
        self.link = RelayLink(self, sock, label)
        self.loop.set_interest(self.link, selectors.EVENT_WRITE)

    def on_welcome(self, link, address, prefix_length, server_address):
        wanted = (ipv4_text(address), prefix_length)
        if wanted != self.configured:
            if self.configured is not None:
                self.log.warning("the server moved this device from %s/%d to %s/%d" % (self.configured + wanted))
            try:
                configure_interface(self.tun.interface, wanted[0], prefix_length, self.config.mtu, self.log)
            except OSError as error:
                self.fatal(str(error))
                return
            self.configured = wanted
        self.failures = 0
        self.log.info("connected to relay %s as %s/%d on %s (device %s); the server is %s"
                      % (link.server_label, wanted[0], prefix_length, self.tun.interface,
                         self.config.device_id, ipv4_text(server_address)))

    def on_server_error(self, code, text):
        if code in FATAL_SERVER_ERRORS:
            self.fatal("the server refused this device: %s: %s" % (ERROR_NAMES[code], text))
        elif code == ERROR_SHUTDOWN:
            self.failures = 0           # a restart is not a failure of ours: come back quickly

    def on_link_closed(self, link, reason, was_established):
        if link is self.link:
            self.link = None
        self.tun.resume()
        if self.stopping:
            return
        if was_established:
            self.log.warning("relay connection lost: %s" % reason)
        self.retry_later(reason if not was_established else None)

    def retry_later(self, reason):
        delay = self.next_backoff_s()
        self.log.debug("attempt %d failed; next in %.1f s" % (self.failures, delay))
        if reason:
            self.log.limited("retry", "warning", "cannot join the relay: %s; retrying in %.1f s" % (reason, delay))
        else:
            self.log.info("reconnecting in %.1f s" % delay)
        self.loop.call_later(delay, self.connect)

    def next_backoff_s(self):
        """Exponential from 1 s to 30 s, with jitter so devices do not retry in lockstep."""
        ceiling = min(MAX_BACKOFF_S, MIN_BACKOFF_S * (2 ** min(self.failures, 10)))
        self.failures += 1
        return max(MIN_BACKOFF_S, ceiling * random.uniform(0.5, 1.0))

    # -- the data path --

    def forward_from_tun(self, packet):
        """Send one packet the kernel routed into the TUN; False asks the TUN to pause."""
        problem = ipv4_problem(packet)
        if problem:
            self.count_drop(problem)
            return True
        link = self.link
        if link is None or link.stage != "established":
            self.count_drop("no relay connection")
            return True
        return link.send_packet(packet)

    def count_drop(self, reason):
        self.drops[reason] = self.drops.get(reason, 0) + 1
        self.log.limited(("drop", reason), "debug", "dropped a packet: %s" % reason)

    # -- housekeeping --

    def tick(self):
        if self.link is not None:
            self.link.check_timers(time.monotonic())

    def fatal(self, message):
        self.log.error(message)
        self.exit_code = 1
        self.stop("fatal error")

    def on_stop_signal(self, signum):
        self.log.info("received %s: shutting down" % signal.Signals(signum).name)
        self.stop("client shutting down")

    def stop(self, reason):
        self.stopping = True
        if self.link is not None:
            self.link.close(reason)
        if self.tun is not None:
            self.tun.close(reason)
        self.loop.stop()


# ==== BEGIN MNEDC RUNTIME ====
# The log, the event loop and the TUN glue. Byte-identical in both scripts, like the wire
# protocol block, because each script is copied alone onto a board.

LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
LOG_REPEAT_WINDOW_S = 60.0


class Log:
    """Timestamped lines on stderr; limited() keeps a flapping peer from flooding a board's flash."""

    def __init__(self, level="info", stream=None):
        self.threshold = LOG_LEVELS[level]
        self.stream = stream or sys.stderr
        self._windows = {}          # key -> [window start, lines suppressed]

    def write(self, level, message):
        if LOG_LEVELS[level] < self.threshold:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            self.stream.write("%s %s %s\n" % (stamp, level.upper(), message))
            self.stream.flush()
        except (OSError, ValueError):
            pass                    # a closed stderr must not take the relay down

    def debug(self, message):
        self.write("debug", message)

    def info(self, message):
        self.write("info", message)

    def warning(self, message):
        self.write("warning", message)

    def error(self, message):
        self.write("error", message)

    def limited(self, key, level, message):
        """Log message at most once per window per key; the next line says how many were held back."""
        now = time.monotonic()
        window = self._windows.get(key)
        if window is not None and now - window[0] < LOG_REPEAT_WINDOW_S:
            window[1] += 1
            return
        if window is not None and window[1]:
            message += " (%d more in the last %d s)" % (window[1], now - window[0])
        self._windows[key] = [now, 0]
        self.write(level, message)


class Timer:
    """A callback due at a monotonic deadline; cancel() is safe at any time."""

    def __init__(self, deadline, callback):
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self):
        self.cancelled = True

    def __lt__(self, other):
        return self.deadline < other.deadline


class EventLoop:
    """One selectors loop for every socket and TUN fd, with timers in a heap.

    Handlers offer fileno(), on_readable(), on_writable() and close(reason). An OSError or
    ProtocolError raised by a handler closes that handler with the reason; anything else is
    logged with a traceback and closes only that handler.
    """

    def __init__(self, log):
        self.log = log
        self.selector = selectors.DefaultSelector()
        self._interest = {}         # handler -> events it is registered for
        self._timers = []
        self._running = False
        self._signal_handlers = {}
        self._pending_signals = []
        self._wakeup_reader, self._wakeup_writer = socket.socketpair()
        self._wakeup_reader.setblocking(False)
        self._wakeup_writer.setblocking(False)
        self.selector.register(self._wakeup_reader, selectors.EVENT_READ, None)

    def set_interest(self, handler, events):
        """Watch handler for events (0 = not at all); touches the kernel only on a change."""
        current = self._interest.get(handler, 0)
        if events == current:
            return
        if not events:
            self.selector.unregister(handler)
            del self._interest[handler]
        elif not current:
            self.selector.register(handler, events, handler)
            self._interest[handler] = events
        else:
            self.selector.modify(handler, events, handler)
            self._interest[handler] = events

    def forget(self, handler):
        """Stop watching handler; call before closing its fd."""
        self.set_interest(handler, 0)

    def call_later(self, delay_s, callback):
        timer = Timer(time.monotonic() + delay_s, callback)
        heapq.heappush(self._timers, timer)
        return timer

    def call_every(self, interval_s, callback):
        """callback() every interval_s until the loop stops."""
        def tick():
            self.call_later(interval_s, tick)
            callback()
        return self.call_later(interval_s, tick)

    def on_signals(self, signums, callback):
        """callback(signum) runs inside the loop, never inside the signal handler."""
        signal.set_wakeup_fd(self._wakeup_writer.fileno())
        for signum in signums:
            self._signal_handlers[signum] = callback
            signal.signal(signum, self._note_signal)

    def _note_signal(self, signum, frame):
        self._pending_signals.append(signum)

    def stop(self):
        self._running = False

    def run(self):
        self._running = True
        while self._running:
            for key, events in self.selector.select(self._seconds_to_next_timer()):
                if key.data is None:
                    self._drain_wakeups()
                else:
                    self._dispatch(key.data, events)
            self._run_due_timers()
            self._run_signal_handlers()

    def _seconds_to_next_timer(self):
        while self._timers and self._timers[0].cancelled:
            heapq.heappop(self._timers)
        if not self._timers:
            return None
        return max(0.0, self._timers[0].deadline - time.monotonic())

    def _run_due_timers(self):
        now = time.monotonic()
        while self._timers and self._timers[0].deadline <= now:
            timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self._guarded(None, timer.callback)

    def _run_signal_handlers(self):
        while self._pending_signals:
            signum = self._pending_signals.pop(0)
            self._guarded(None, self._signal_handlers[signum], signum)

    def _drain_wakeups(self):
        try:
            while self._wakeup_reader.recv(512):
                pass
        except OSError:
            pass

    def _dispatch(self, handler, events):
        if events & selectors.EVENT_READ:
            self._guarded(handler, handler.on_readable)
        if events & selectors.EVENT_WRITE and handler in self._interest:
            self._guarded(handler, handler.on_writable)

    def _guarded(self, handler, function, *args):
        """Run function; a failure closes handler (if any) and never stops the loop."""
        try:
            function(*args)
        except (OSError, ProtocolError) as error:
            if handler is None:
                self.log.error("%s failed: %s" % (getattr(function, "__name__", function), error))
            else:
                handler.close(describe_error(error))
        except Exception:
            self.log.error("internal error in %r:\n%s" % (handler or function, traceback.format_exc()))
            if handler is not None:
                handler.close("internal error")


def describe_error(error):
    """One readable phrase for an exception, e.g. 'connection refused'."""
    if isinstance(error, OSError) and error.errno is not None:
        return os.strerror(error.errno).lower()
    return str(error) or error.__class__.__name__


# Platform glue: TUN devices (linux/if_tun.h) and interface setup (linux/sockios.h).
# The ioctl encoding differs by architecture (../shared/PLATFORMS.md); every ifreq we pass is the
# full 40 bytes, since Python 3.14 refuses to let the kernel write past a shorter buffer.
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_UP = 0x1
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCSIFMTU = 0x8922
TUNSETIFF_WRITE_HIGH = 0x800454CA    # _IOW where the "write" direction bit is the high one
TUNSETIFF_WRITE_LOW = 0x400454CA     # _IOW on x86, arm, aarch64, riscv64, s390x
HIGH_WRITE_BIT_MACHINES = ("mips", "ppc", "powerpc", "sparc", "alpha", "parisc")
IFNAMSIZ = 16
TUN_READ_BYTES = 65536


def tunsetiff_numbers():
    """This machine's TUNSETIFF number first, the other encoding second."""
    if os.uname().machine.startswith(HIGH_WRITE_BIT_MACHINES):
        return TUNSETIFF_WRITE_HIGH, TUNSETIFF_WRITE_LOW
    return TUNSETIFF_WRITE_LOW, TUNSETIFF_WRITE_HIGH


def open_tun(name):
    """(non-blocking fd, interface name) of a new TUN interface carrying bare IP packets."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        request = struct.pack("16sH22x", name.encode("ascii"), IFF_TUN | IFF_NO_PI)
        reply = None
        for number in tunsetiff_numbers():
            try:
                reply = fcntl.ioctl(fd, number, request)
                break
            except OSError as error:
                if error.errno != errno.EBADFD:   # EBADFD: the other encoding; anything else is real
                    raise
        if reply is None:
            raise OSError(errno.EBADFD, "TUNSETIFF refused in both ioctl encodings")
        os.set_blocking(fd, False)
        return fd, reply[:IFNAMSIZ].rstrip(b"\0").decode("ascii")
    except BaseException:
        os.close(fd)
        raise


def configure_interface(name, address, prefix_length, mtu, log):
    """Give interface name address/prefix_length and mtu, and bring it up.

    ioctls first (no tools needed); `ip` where the ioctls are refused, as in some containers.
    """
    disable_ipv6(name)
    try:
        configure_with_ioctls(name, address, prefix_length, mtu)
        return "ioctl"
    except OSError as ioctl_error:
        log.debug("interface ioctls failed (%s); trying ip" % describe_error(ioctl_error))
        try:
            configure_with_ip(name, address, prefix_length, mtu)
            return "ip"
        except (OSError, subprocess.CalledProcessError) as ip_error:
            raise OSError(errno.EPERM, "cannot configure %s: ioctl: %s; ip: %s" % (
                name, describe_error(ioctl_error), ip_error))


def configure_with_ioctls(name, address, prefix_length, mtu):
    raw_name = name.encode("ascii")
    netmask = struct.pack("!I", (0xFFFFFFFF << (32 - prefix_length)) & 0xFFFFFFFF)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as control:
        fd = control.fileno()
        fcntl.ioctl(fd, SIOCSIFADDR, struct.pack("16sH2x4s16x", raw_name, socket.AF_INET,
                                                 socket.inet_aton(address)))
        fcntl.ioctl(fd, SIOCSIFNETMASK, struct.pack("16sH2x4s16x", raw_name, socket.AF_INET,
                                                    netmask))
        fcntl.ioctl(fd, SIOCSIFMTU, struct.pack("16si20x", raw_name, mtu))
        reply = fcntl.ioctl(fd, SIOCGIFFLAGS, struct.pack("16sh22x", raw_name, 0))
        flags = struct.unpack("16sh22x", reply)[1]
        fcntl.ioctl(fd, SIOCSIFFLAGS, struct.pack("16sh22x", raw_name, flags | IFF_UP))


def configure_with_ip(name, address, prefix_length, mtu):
    ip = shutil.which("ip") or "/sbin/ip"
    commands = (
        [ip, "addr", "flush", "dev", name],
        [ip, "addr", "add", "%s/%d" % (address, prefix_length), "dev", name],
        [ip, "link", "set", "dev", name, "mtu", str(mtu), "up"],
    )
    for command in commands:
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       timeout=10)


def disable_ipv6(name):
    """The relay carries IPv4 only: stop the kernel sending IPv6 chatter into the tunnel."""
    try:
        with open("/proc/sys/net/ipv6/conf/%s/disable_ipv6" % name, "w") as switch:
            switch.write("1")
    except OSError:
        pass


def ipv4_text(packed):
    return socket.inet_ntoa(packed)


# Configuration helpers: each raises ValueError with a phrase fit for 'FILE: [section] key: ...'.
MIN_SECRET_CHARS = 12


class ConfigError(Exception):
    """A configuration value that cannot work; the text names the file, section and key."""


def parse_host_port(text, default_port):
    """(host, port) from HOST, HOST:PORT or :PORT."""
    host, _, port_text = text.strip().rpartition(":") if ":" in text else (text.strip(), "", "")
    if not port_text:
        return host or "0.0.0.0", default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError("%r: the port must be a number from 0 to 65535" % text)
    return host or "0.0.0.0", int(port_text)


def parse_int(text, low, high):
    try:
        value = int(text)
    except ValueError:
        raise ValueError("%r is not a whole number" % text)
    if not low <= value <= high:
        raise ValueError("%d is outside %d..%d" % (value, low, high))
    return value


def parse_choice(text, choices):
    value = text.strip().lower()
    aliases = {"true": "yes", "on": "yes", "1": "yes", "false": "no", "off": "no", "0": "no"}
    value = aliases.get(value, value)
    if value not in choices:
        raise ValueError("%r is not one of %s" % (text, ", ".join(choices)))
    return value


def read_secret_file(path):
    with open(path) as source:
        secret = source.read().strip()
    if not secret:
        raise ValueError("%s is empty" % path)
    return secret


def check_secret(secret):
    if len(secret) < MIN_SECRET_CHARS:
        raise ValueError("the secret must have at least %d characters" % MIN_SECRET_CHARS)
    return secret.encode("utf-8")


def check_interface_name(text):
    name = text.strip()
    if not 1 <= len(name) < IFNAMSIZ or not all(c.isalnum() or c in "_-." for c in name):
        raise ValueError("%r is not an interface name (1 to 15 letters, digits, _ - .)" % text)
    return name


def read_ini(path, section, known_keys):
    """{key: (value, where)} of section in path; unknown keys and a missing file are errors."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path) as source:
            parser.read_file(source)
    except OSError as error:
        raise ConfigError("%s: cannot read: %s" % (path, describe_error(error)))
    except configparser.Error as error:
        raise ConfigError("%s: not a valid INI file: %s" % (path, " ".join(str(error).split())))
    if not parser.has_section(section):
        raise ConfigError("%s: no [%s] section" % (path, section))
    values = {}
    for key, value in parser.items(section):
        if key not in known_keys:
            raise ConfigError("%s: [%s] %s: unknown key (known: %s)"
                              % (path, section, key, ", ".join(sorted(known_keys))))
        values[key] = value
    return values
# ==== END MNEDC RUNTIME ====


# ==== CONFIG ====

class ClientConfig:
    """Validated client settings: INI values first, command-line flags over them."""

    def __init__(self):
        self.source = None
        self.server = None
        self.secret = None
        self.device_id = None
        self.interface = DEFAULT_INTERFACE
        self.mtu = DEFAULT_MTU
        self.keepalive = DEFAULT_KEEPALIVE_S


CLIENT_KEYS = {
    "server": lambda config, text: setattr(config, "server", parse_server(text)),
    "secret": lambda config, text: setattr(config, "secret", check_secret(text.strip())),
    "secret_file": lambda config, text: setattr(config, "secret", check_secret(read_secret_file(text))),
    "device_id": lambda config, text: setattr(config, "device_id", check_device_id(text.strip())),
    "interface": lambda config, text: setattr(config, "interface", check_interface_name(text)),
    "mtu": lambda config, text: setattr(config, "mtu", parse_int(text, 576, 65535)),
    "keepalive": lambda config, text: setattr(config, "keepalive", parse_int(text, 3, 3600)),
}


def parse_server(text):
    host, port = parse_host_port(text, DEFAULT_PORT)
    if host == "0.0.0.0" or port == 0:
        raise ValueError("%r: give the server's address, as HOST or HOST:PORT" % text)
    return host, port


def default_device_id():
    """/etc/machine-id, which survives hostname changes; the hostname where there is none."""
    try:
        with open("/etc/machine-id") as source:
            return check_device_id(source.read().strip())
    except (OSError, ValueError):
        name = "".join(c if c in DEVICE_ID_CHARS else "-" for c in socket.gethostname())
        return check_device_id(name[:MAX_DEVICE_ID_BYTES] or "device")


def find_config(path):
    """The config file to read: the -c one, else the first default that exists, else None."""
    if path:
        return path
    for candidate in DEFAULT_CONFIG_PATHS:
        if os.path.exists(candidate):
            return candidate
    return None


def load_client_config(args):
    """ClientConfig from the INI file and the flags; ConfigError names what is wrong."""
    config = ClientConfig()
    config.source = find_config(args.config)
    values = read_ini(config.source, "client", CLIENT_KEYS) if config.source else {}
    where = "%s: [client] " % config.source
    if "secret" in values and "secret_file" in values:
        raise ConfigError(where + "secret_file: set secret or secret_file, not both")
    base = os.path.dirname(os.path.abspath(config.source or "."))
    for key, text in values.items():
        if key == "secret_file":
            text = os.path.join(base, text.strip())
        try:
            CLIENT_KEYS[key](config, text)
        except (ValueError, OSError) as error:
            raise ConfigError(where + "%s: %s" % (key, describe_error(error)))
    flags = (("server", args.server), ("secret_file", args.secret_file),
             ("device_id", args.device_id), ("interface", args.interface))
    for key, text in flags:
        if text is not None:
            try:
                CLIENT_KEYS[key](config, text)
            except (ValueError, OSError) as error:
                raise ConfigError("--%s: %s" % (key.replace("_", "-"), describe_error(error)))
    if config.server is None:
        raise ConfigError("no server configured: set server in the [client] section of %s or pass "
                          "--server" % (config.source or "client-config.ini (none found)"))
    if config.secret is None:
        raise ConfigError("no secret configured: set secret or secret_file in the [client] section "
                          "of %s (the server prints it at its first start)"
                          % (config.source or "client-config.ini"))
    if config.device_id is None:
        config.device_id = default_device_id()
    return config


# ==== CLI ====

def build_parser():
    parser = argparse.ArgumentParser(
        prog="mnedc_client.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", metavar="FILE", help="INI file with a [client] section")
    parser.add_argument("--server", metavar="HOST[:PORT]", help="relay server (overrides the file)")
    parser.add_argument("--secret-file", metavar="FILE", help="file holding the network secret")
    parser.add_argument("--device-id", metavar="ID", help="this device's name on the network")
    parser.add_argument("--interface", metavar="NAME", help="TUN interface name (default %s)" % DEFAULT_INTERFACE)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug lines too")
    return parser


def cmd_tun(args):
    log = Log("debug" if args.verbose else "info")
    try:
        config = load_client_config(args)
    except ConfigError as error:
        log.error(str(error))
        return 2
    client = TunClient(config, log)
    try:
        client.start()
    except OSError as error:
        log.error(str(error))
        return 1
    return client.run()


def main(argv=None):
    args = build_parser().parse_args(argv)
    return cmd_tun(args)


if __name__ == "__main__":
    sys.exit(main())
