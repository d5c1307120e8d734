#!/usr/bin/env python3
"""MNEDC client: joins this device to the MNEDC virtual network through the relay server.

It keeps one TCP connection to the server (which sits in the main NAT, reachable from here),
proves it knows the network secret, receives this device's virtual IP, and carries IP packets
between a TUN interface with that address and the relay. Any other device is then reachable
by its virtual IP, whichever NAT it sits behind. On a lost connection it reconnects forever
(every 1 to 3 s for a minute after losing a link that was up for 10 s or more; else a backoff
from 1 s to 30 s, with jitter) and keeps the interface and its address, so open sockets survive.

Configuration: an INI file with a [client] section (-c; default /etc/mnedc/client-config.ini,
else ./client-config.ini), then command-line flags.
  server      HOST or HOST:PORT of the relay server, or several (required; port 3334)
  secret      the network secret, or secret_file = PATH      (required)
  device_id   this device's name; it keeps its address by it (default /etc/machine-id, else hostname)
  interface   TUN interface name                             (default mnedc0)
  mtu         TUN interface MTU, up to 65525                 (default 65520)
  offload     yes or no: TSO and checksum offload on the TUN (default yes)
  keepalive   seconds without a frame before the server is presumed dead (default 30)
  server_pin  sha256:HEX of the relay's certificate (it prints it), or several: TLS, and only
              that certificate is accepted (no CA or host name needed)
  tls         yes (default): TLS to the server, verified by server_pin or against tls_ca (one of
              them is required); tls_cert and tls_key for a client certificate (mutual TLS);
              tls_server_name if it differs. no (or --no-tls): plaintext, to a tls = no relay
  control_socket  where `status` finds the TUN client (default /var/run/mnedc/client.sock)
  dns, domain auto (default): where systemd-resolved runs, send names in DOMAIN (default mnedc)
              to the relay's DNS on the TUN (per link, undone at stop); where a dnsmasq reads
              dnsmasq_servers (default /etc/mnedc/dnsmasq.servers, its --servers-file), write
              server=/DOMAIN/RELAY there and SIGHUP it (emptied at stop); no: leave the resolver be
  ipv6        yes (default): take the network's IPv6 addresses on the TUN, when it has them
  accept_routes  yes (default): route the networks the relay's operator granted to gateways
              (devices with a LAN behind them) into the TUN; no: only the virtual network
  gateway_nat yes: on a gateway, masquerade the virtual network onto its granted IPv4 LANs
              (iptables), so their hosts need no route back; removed at stop (default no)
  log_level   debug, info, warning or error                  (default info)
server may list several addresses of the same relay (its LAN and its public address), tried
in order: server = 192.0.2.10:3334, relay.example.org:3334.
SIGHUP re-reads the file and applies every key live (from the next connection on) except
device_id, interface, mtu, offload and control_socket, which take a restart. --check tests this
Python and the configuration without starting.
TUN mode needs root (or CAP_NET_ADMIN) and /dev/net/tun; stream mode (listen, connect,
services) needs neither. The user it runs as must be able to read the secret and TLS files.
"""

import argparse
import configparser
import errno
import fcntl
import heapq
import os
import select
import selectors
import signal
import socket
import stat
import sys
import time
# struct and sha256 are imported by the wire protocol block below; json, syslog, traceback and
# subprocess where they are used, since a client's RSS matters on a small board.

DEFAULT_PORT = 3334
DEFAULT_CONFIG_PATHS = ("/etc/mnedc/client-config.ini", "client-config.ini")
DEFAULT_INTERFACE = "mnedc0"
DEFAULT_MTU = 65520             # TCP carries the frames: no path MTU binds the virtual one
DEFAULT_KEEPALIVE_S = 30
CONNECT_TIMEOUT_S = 10
HANDSHAKE_TIMEOUT_S = 10
MIN_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0            # the longest wait between two attempts, jitter included
HEALTHY_LINK_S = 10             # a link up this long, then lost without a refusal, ...
QUICK_RETRY_WINDOW_S = 60       # ... is retried every QUICK_RETRY_S for this long after the loss,
QUICK_RETRY_S = (1.0, 3.0)      # at a random moment in this range: a relay that crashed comes
                                # back fast, while one that stays down sees the normal backoff after
RESOLVE_TIMEOUT_S = 10          # a host name lookup that takes longer fails this attempt
MIN_PREFIX_LENGTH, MAX_PREFIX_LENGTH = 16, 29   # the subnets a relay may offer (its subnet key)
IPV4_SOURCE_AT, IPV4_DESTINATION_AT = 12, 16    # offsets in the IPv4 header (RFC 791)
ROUTES_FILE = "/proc/net/route"
IPV6_ROUTES_FILE = "/proc/net/ipv6_route"
MIN_ROUTE_V4, MIN_ROUTE_V6 = 8, 16      # a granted network no shorter: no relay pulls half the Internet in
REPLACED_BACKOFF_STEPS = 5      # after losing our device_id to another connection: wait ~30 s
LISTEN_RETRY_S = 10             # a taken virtual port may be a stale session: ask again this late
RECV_BYTES = 256 * 1024
TUN_PACKETS_PER_WAKEUP = 64
HIGH_WATER_BYTES = 512 * 1024   # relay queue above this: stop reading the TUN (backpressure)
LOW_WATER_BYTES = 128 * 1024    # ... and read it again once the queue drained below this
STREAM_WINDOW_BYTES = 256 * 1024   # credit we grant each stream: the most we buffer for it
PENDING_LOCAL_S = 20            # how long a local connection may wait for the relay
OPEN_TIMEOUT_S = 15             # a stream the peer neither accepts nor refuses by then fails
LINK_LINGER_S = 2               # at a planned stop: let the server take our last frames
ACCEPT_PAUSE_S = 0.2            # out of fds: stop accepting local connections this long
DEFAULT_CONTROL_SOCKET = "/var/run/mnedc/client.sock"
DEFAULT_DOMAIN = "mnedc"        # the relay's DNS calls devices DEVICE_ID.mnedc
RESOLVED_DIR = "/run/systemd/resolve"     # there while systemd-resolved runs
RESOLVECTL_TIMEOUT_S = 5
DEFAULT_DNSMASQ_SERVERS = "/etc/mnedc/dnsmasq.servers"   # a dnsmasq --servers-file (install.sh makes it)


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
#     S -> C  CHALLENGE  version, Ns, the network's salt (K = PBKDF2(secret, label | salt))
#     C -> S  AUTH       HMAC-SHA256(K, "mnedc client" | Ns | Nc | device_id)
#     S -> C  WELCOME    virtual address, prefix length, the server's virtual address, largest
#                        frame, the network's IPv6 /64 (zeros: no IPv6), then
#                        HMAC-SHA256(K, "mnedc welcome" | Nc | Ns | those fields)
# Each side proves it knows K without sending it; fresh nonces make a recorded proof useless.
# The client proves first: the server proves itself (WELCOME's MAC) only to a client that did,
# so a stranger who sends HELLO gets nothing to test guesses of the secret against, and every
# refusal before that proof reads the same, whatever the keys file lists or revokes.
# K is PBKDF2 of the configured secret (network_key), so guessing a secret offline is slow.
# Instead of the next step either side may send ERROR (code, text) and close.
# After WELCOME: PACKET (one IPv4 or IPv6 packet) both ways; PING, answered by PONG with the same
# payload. A device's IPv6 addresses are the network's /64 and fe80::/64, each with the device's
# host number in the IPv4 network as interface id (198.18.0.7/24: PREFIX::7 and fe80::7).
# VNET_PACKET is a PACKET with the kernel's 10-byte virtio_net_hdr in front (little-endian on the
# wire): a TCP segment of up to 64 KB whose checksum is still to finish, as a TUN with
# IFF_VNET_HDR and TSO hands it over; a TUN without offload finishes it (finished_packet).
# Before a planned restart the server sends RESTARTING (a window in seconds): clients come back
# at a random moment within it, so that a restart brings no storm of reconnects.
# ROUTES (relay -> TUN member, after every WELCOME, an empty one too, and whenever the operator
# changes them): the networks granted to gateways (devices with a LAN behind them), each flagged
# when this device is its gateway; the member sends those it is not the gateway for into the tunnel.
# HELLO's flags say what the session is for: a TUN member (0) or a stream session (HELLO_STREAMS),
# which never takes over the device's address, so one device may run many of them.
#
# Streams (TCP carried over the relay; the server pairs the two ends and relays the frames):
#     LISTEN     port, service name       a session offers a virtual port (LISTENING confirms,
#                                         LISTEN_REFUSED says why not: that one LISTEN only)
#     OPEN       id, port, window, name   opener -> server: name is the PEER wanted (a device,
#                                         address or service, or DEVICE/SERVICE to pin whose);
#                                         server -> listener: name says who is calling
#     ACCEPT     id, window[, name]       the listener took the stream; server -> opener: name
#                                         says which device answered
#     DATA       id, bytes                at most the credit the receiver granted
#     WINDOW     id, increment            the receiver consumed bytes: more credit
#     EOF        id                       no more DATA this way (half-close)
#     RESET      id, code, text           the stream is over, abnormally
#     SERVICES / SERVICE_LIST             who is online and which services exist (JSON)
# Each side numbers the streams it opens: clients odd ids, the server even ones. A sender that
# exceeds its window is cut off, so every byte in flight is one the receiver has room for.
# Device_ids and service names are one namespace: a service name is its first device's (the
# relay keeps it), never shaped like an address or equal to a device_id.
# The header, the first 7 bytes of HELLO and the ERROR layout never change between versions, so
# any two versions can tell each other why they refuse.

import struct                       # the block imports what it uses, so it runs on its own
try:                                # CPython's builtin SHA-256, part of the standard library under
    from _sha2 import sha256        # this name from 3.12 on; hashlib would load OpenSSL (4 MB RSS)
except ImportError:
    try:
        from _sha256 import sha256  # the same module in Python 3.7 to 3.11
    except ImportError:
        from hashlib import sha256
try:
    from _operator import _compare_digest as equal_digests   # what hmac.compare_digest falls back to
except ImportError:
    def equal_digests(a, b):
        return len(a) == len(b) and not sum(x ^ y for x, y in zip(a, b))

PROTOCOL_VERSION = 6             # 6: WELCOME carries the IPv6 /64; 5: LISTEN_REFUSED, ACCEPT
                                 # names who answered; 4: the client proves first
HELLO_MAGIC = b"MNEDC"

FRAME_HEADER = struct.Struct("!HBB")
MAX_PAYLOAD_BYTES = 65535
HANDSHAKE_MAX_PAYLOAD_BYTES = 512
MIN_FRAME_BYTES = 1024              # the smallest frame limit a server may set (max_frame_bytes)

FRAME_HELLO = 1
FRAME_CHALLENGE = 2
FRAME_AUTH = 3
FRAME_WELCOME = 4
FRAME_ERROR = 5
FRAME_PACKET = 6
FRAME_PING = 7
FRAME_PONG = 8
FRAME_LISTEN = 9
FRAME_LISTENING = 10
FRAME_OPEN = 11
FRAME_ACCEPT = 12
FRAME_DATA = 13
FRAME_WINDOW = 14
FRAME_EOF = 15
FRAME_RESET = 16
FRAME_SERVICES = 17
FRAME_SERVICE_LIST = 18
FRAME_RESTARTING = 19
FRAME_VNET_PACKET = 20
FRAME_LISTEN_REFUSED = 21
FRAME_ROUTES = 22
FRAME_NAMES = {
    FRAME_HELLO: "HELLO", FRAME_CHALLENGE: "CHALLENGE", FRAME_AUTH: "AUTH",
    FRAME_WELCOME: "WELCOME", FRAME_ERROR: "ERROR", FRAME_PACKET: "PACKET",
    FRAME_PING: "PING", FRAME_PONG: "PONG", FRAME_LISTEN: "LISTEN",
    FRAME_LISTENING: "LISTENING", FRAME_OPEN: "OPEN", FRAME_ACCEPT: "ACCEPT",
    FRAME_DATA: "DATA", FRAME_WINDOW: "WINDOW", FRAME_EOF: "EOF", FRAME_RESET: "RESET",
    FRAME_SERVICES: "SERVICES", FRAME_SERVICE_LIST: "SERVICE_LIST", FRAME_RESTARTING: "RESTARTING",
    FRAME_VNET_PACKET: "VNET_PACKET", FRAME_LISTEN_REFUSED: "LISTEN_REFUSED", FRAME_ROUTES: "ROUTES",
}
HELLO_STREAMS = 0x0001

ERROR_VERSION = 1
ERROR_AUTH = 2
ERROR_POOL_FULL = 3
ERROR_REPLACED = 4
ERROR_PROTOCOL = 5
ERROR_SHUTDOWN = 6
ERROR_TIMEOUT = 7
ERROR_PORT_TAKEN = 8
ERROR_KICKED = 9
ERROR_LIMIT = 10
ERROR_NAME_TAKEN = 11       # a service name or device_id that is another device's, or not allowed
ERROR_NAMES = {
    ERROR_VERSION: "version mismatch", ERROR_AUTH: "authentication failed",
    ERROR_POOL_FULL: "address pool full", ERROR_REPLACED: "replaced",
    ERROR_PROTOCOL: "protocol error", ERROR_SHUTDOWN: "server shutting down",
    ERROR_TIMEOUT: "timeout", ERROR_PORT_TAKEN: "port taken", ERROR_KICKED: "disconnected by the operator",
    ERROR_LIMIT: "limit reached", ERROR_NAME_TAKEN: "name taken",
}

RESET_REFUSED = 1           # nothing listens there, or the forward target refused
RESET_UNKNOWN_PEER = 2      # no device, address or service by that name
RESET_UNREACHABLE = 3       # the peer is known but not connected
RESET_ABORTED = 4           # one end failed or was killed mid-stream
RESET_RELAY_LOST = 5        # the relay connection of one end went down
RESET_LIMIT = 6             # too many streams
RESET_DENIED = 7            # the relay's access policy forbids it
RESET_NAMES = {
    RESET_REFUSED: "connection refused", RESET_UNKNOWN_PEER: "unknown peer",
    RESET_UNREACHABLE: "peer unreachable", RESET_ABORTED: "aborted",
    RESET_RELAY_LOST: "relay connection lost", RESET_LIMIT: "too many streams",
    RESET_DENIED: "denied by policy",
}

NONCE_BYTES = 16
MAC_BYTES = 32
MAX_DEVICE_ID_BYTES = 64
MAX_ERROR_TEXT_BYTES = 400
MAX_PING_BYTES = 64
DEVICE_ID_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-:@")
PEER_NAME_CHARS = DEVICE_ID_CHARS | frozenset(" ()/")  # "dev (198.18.0.2)", "dev/service"

KEY_SALT = b"MNEDC network key"
KEY_ROUNDS = 20000
MAX_NAME_BYTES = 64
MAX_DATA_BYTES = MAX_PAYLOAD_BYTES - 4

HELLO = struct.Struct("!5sHH16sB")       # magic, version, flags, nonce, device_id length
CHALLENGE = struct.Struct("!H16s16s")    # version, server nonce, the network's salt
AUTH = struct.Struct("!32s")             # client proof
WELCOME = struct.Struct("!4sB4sH8s")     # virtual address, prefix length, server's, largest frame, IPv6 /64
WELCOME_MAC_BYTES = 32                   # then HMAC-SHA256 of it under the key, bound to both nonces
ERROR = struct.Struct("!B")              # code, then UTF-8 text
LISTEN = struct.Struct("!H")             # port, then service name (may be empty)
OPEN = struct.Struct("!IHI")             # stream id, port, window, then a peer name
ACCEPT = struct.Struct("!II")            # stream id, window, then who answered (may be empty)
LISTEN_REFUSED = struct.Struct("!HB")    # port, code, then UTF-8 text
STREAM_ID = struct.Struct("!I")          # DATA and EOF: stream id (DATA: then the bytes)
WINDOW = struct.Struct("!II")            # stream id, increment
RESET = struct.Struct("!IB")             # stream id, code, then UTF-8 text
VNET_HEADER = struct.Struct("<BBHHHH")   # flags, gso type, header length, gso size, csum start, offset
VNET_NEEDS_CSUM = 0x01                   # linux/virtio_net.h: the checksum is still to compute
VNET_GSO_TCPV4, VNET_GSO_TCPV6, VNET_GSO_ECN = 1, 4, 0x80     # segmentation offload types
RESTARTING = struct.Struct("!H")         # seconds within which to reconnect
ROUTE = struct.Struct("!BBB")            # IP version, prefix length, 1 if this device is the gateway
MAX_ROUTES = 256


class ProtocolError(Exception):
    """The peer sent something the protocol does not allow: close that connection."""


class WelcomeForged(ProtocolError):
    """A WELCOME whose MAC is wrong: the server does not know the key, or someone changed it."""


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
    return frame_header(frame_type, payload) + payload


def frame_header(frame_type, payload):
    """The 4 header bytes for payload: send them and payload together without joining them."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError("payload of %d bytes exceeds %d" % (len(payload), MAX_PAYLOAD_BYTES))
    return FRAME_HEADER.pack(len(payload), frame_type, 0)


def receive_buffer(size):
    """A FrameReader buffer. A large one is an anonymous mapping of its own, which goes back to
    the kernel once dropped, and costs only the pages a frame touched: a freed large bytearray
    stays in the heap (glibc's threshold for mapping grows with every large block freed), so
    150 members that once sent one 60 KB frame kept 48 MB of the relay resident after it shrank
    their buffers."""
    if size > FrameReader.SMALL_BYTES:
        try:
            import mmap
            return mmap.mmap(-1, size)
        except (ImportError, OSError):      # no mmap module, or no memory to map: the heap then
            pass
    return bytearray(size)


class FrameReader:
    """Cuts a TCP byte stream into frames, however recv() happened to split it.

    receive(sock.recv_into) or feed(data), then take_frames() for the complete frames as
    (type, payload). The bytes land in one buffer and are not copied again: PACKET, VNET_PACKET
    and DATA payloads come out as memoryviews into it, valid until the next receive or feed (who
    keeps one longer copies it); other payloads come out as bytes. The buffer starts small and
    grows only for a frame that does not fit or a peer that keeps filling it, so idle connections
    cost little. max_payload starts at the handshake limit: nobody unauthenticated can make us
    buffer 64 KB.
    """

    VIEW_FRAMES = frozenset((FRAME_PACKET, FRAME_VNET_PACKET, FRAME_DATA))
    SMALL_BYTES = 4096

    def __init__(self, max_payload=HANDSHAKE_MAX_PAYLOAD_BYTES, receive_bytes=256 * 1024):
        self.max_payload = max_payload
        self.large_bytes = receive_bytes + FRAME_HEADER.size + MAX_PAYLOAD_BYTES
        self._buffer = bytearray(self.SMALL_BYTES)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0         # the unparsed bytes are _buffer[_start:_end]
        self._grow = False

    def buffered_bytes(self):
        return self._end - self._start

    def capacity(self):
        return len(self._buffer)

    def receive(self, recv_into):
        """Read once with recv_into(a memoryview of the free space); its count (0: end of stream)."""
        self._make_room()
        free = len(self._buffer) - self._end
        count = recv_into(self._view[self._end:])
        self._end += count
        if count == free and self.max_payload > HANDSHAKE_MAX_PAYLOAD_BYTES:
            self._grow = True               # a busy member: read more per wakeup from now on
        return count

    def discard(self):
        """Forget what arrived and was not taken."""
        self._start = self._end = 0

    def shrink(self):
        """Back to the small buffer, once the connection is quiet: a member that sent one large
        frame must not keep 320 KB for life. Call between wakeups (payload views of the old
        buffer keep it alive while they last). True if it shrank."""
        leftover = self._end - self._start
        if len(self._buffer) <= self.SMALL_BYTES or leftover > self.SMALL_BYTES:
            return False
        buffer = bytearray(self.SMALL_BYTES)
        buffer[:leftover] = self._view[self._start:self._end]
        self._buffer, self._view, self._grow = buffer, memoryview(buffer), False
        self._start, self._end = 0, leftover
        return True

    def feed(self, data):
        self._make_room(len(data))
        self._buffer[self._end:self._end + len(data)] = data
        self._end += len(data)

    def _make_room(self, needed=1):
        """Move the unparsed tail to the front; grow the buffer when a frame or a peer needs it."""
        leftover = self._end - self._start
        size = len(self._buffer)
        if self._grow or leftover + needed > size:
            size = max(size, leftover + needed, self.large_bytes if self._grow else 0)
        if size != len(self._buffer):
            buffer = receive_buffer(size)   # old payload views keep the old buffer alive
            buffer[:leftover] = self._view[self._start:self._end]
            self._buffer, self._view, self._grow = buffer, memoryview(buffer), False
        elif self._start and leftover:
            tail = self._view[self._start:self._end]
            self._buffer[:leftover] = tail if leftover <= self._start else bytes(tail)  # no overlap
        self._start, self._end = 0, leftover

    def take_frames(self, limit=None):
        """Every complete frame, in arrival order, or the first limit of them; raises
        ProtocolError on a bad header.

        Taking them all matters: a frame left behind would wait for the peer's next bytes. A
        caller that gives a limit takes the rest itself (before it receives again: payload views
        live until then), when exactly limit frames came out.
        """
        buffer, view, offset, end, frames = self._buffer, self._view, self._start, self._end, []
        header_size, view_frames = FRAME_HEADER.size, self.VIEW_FRAMES
        while end - offset >= header_size and (limit is None or len(frames) < limit):
            length, frame_type, flags = FRAME_HEADER.unpack_from(buffer, offset)
            if length > self.max_payload:
                raise ProtocolError("frame of %d bytes exceeds the limit of %d" % (length, self.max_payload))
            if flags:
                raise ProtocolError("frame flags 0x%02x are reserved" % flags)
            stop = offset + header_size + length
            if stop > end:
                if stop - offset > len(buffer):
                    self._grow = True       # this frame (within max_payload) needs the large buffer
                break
            payload = view[offset + header_size:stop]
            frames.append((frame_type, payload if frame_type in view_frames else bytes(payload)))
            offset = stop
        self._start = offset
        return frames


def check_device_id(device_id):
    """The device_id itself if it is usable on the wire, in logs and in file names; else ValueError."""
    if not 1 <= len(device_id) <= MAX_DEVICE_ID_BYTES:
        raise ValueError("device_id must be 1 to %d characters" % MAX_DEVICE_ID_BYTES)
    if not set(device_id) <= DEVICE_ID_CHARS:
        raise ValueError("device_id %r may only hold letters, digits and . _ - : @" % device_id)
    return device_id


def encode_hello(nonce, device_id, flags=0):
    raw_id = check_device_id(device_id).encode("ascii")
    return HELLO.pack(HELLO_MAGIC, PROTOCOL_VERSION, flags, nonce, len(raw_id)) + raw_id


def decode_hello(payload):
    """(client nonce, device_id, flags); VersionMismatch for another version, ProtocolError for junk."""
    if len(payload) < 7 or payload[:5] != HELLO_MAGIC:
        raise ProtocolError("not an MNEDC client (bad HELLO magic)")
    version = struct.unpack_from("!H", payload, 5)[0]
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(version)
    if len(payload) < HELLO.size:
        raise ProtocolError("HELLO of %d bytes is truncated" % len(payload))
    _, _, flags, nonce, id_length = HELLO.unpack_from(payload)
    if flags & ~HELLO_STREAMS:
        raise ProtocolError("HELLO flags 0x%04x are not defined" % flags)
    raw_id = payload[HELLO.size:]
    if len(raw_id) != id_length:
        raise ProtocolError("HELLO device_id length %d does not match its %d bytes"
                            % (id_length, len(raw_id)))
    try:
        return nonce, check_device_id(raw_id.decode("ascii")), flags
    except (UnicodeDecodeError, ValueError) as error:
        raise ProtocolError("bad device_id in HELLO: %s" % error)


def network_key(secret, network_salt):
    """The key the proofs use: PBKDF2-HMAC-SHA256 of the secret, salted by the network.

    A fake relay can collect a client proof, so each guess at a weak secret must cost an
    attacker KEY_ROUNDS HMACs, and the salt each network draws at its first start keeps a table
    made for one network useless for another. Computed once per secret and salt (some 0.1 s).
    """
    return pbkdf2_sha256(secret, KEY_SALT + network_salt, KEY_ROUNDS)


def hmac_pads(key):
    """RFC 2104: the inner and outer SHA-256 states of an HMAC key, ready to copy."""
    if len(key) > 64:
        key = sha256(key).digest()
    key = key.ljust(64, b"\0")
    return sha256(bytes(b ^ 0x36 for b in key)), sha256(bytes(b ^ 0x5C for b in key))


def hmac_sha256(key, message, pads=None):
    inner, outer = pads or hmac_pads(key)
    inner, outer = inner.copy(), outer.copy()
    inner.update(message)
    outer.update(inner.digest())
    return outer.digest()


def pbkdf2_sha256(secret, salt, rounds):
    """RFC 8018 PBKDF2 with HMAC-SHA256, one 32-byte block."""
    pads = hmac_pads(secret)
    u = hmac_sha256(secret, salt + b"\x00\x00\x00\x01", pads)
    result = int.from_bytes(u, "big")
    for _ in range(rounds - 1):
        u = hmac_sha256(secret, u, pads)
        result ^= int.from_bytes(u, "big")
    return result.to_bytes(32, "big")


def client_proof(secret, client_nonce, server_nonce, device_id):
    message = b"mnedc client" + server_nonce + client_nonce + device_id.encode("ascii")
    return hmac_sha256(secret, message)


def encode_challenge(server_nonce, network_salt):
    return CHALLENGE.pack(PROTOCOL_VERSION, server_nonce, network_salt)


def decode_challenge(payload):
    """(server nonce, network salt)."""
    if len(payload) >= 2 and struct.unpack_from("!H", payload)[0] != PROTOCOL_VERSION:
        raise VersionMismatch(struct.unpack_from("!H", payload)[0])
    if len(payload) != CHALLENGE.size:
        raise ProtocolError("CHALLENGE of %d bytes, expected %d" % (len(payload), CHALLENGE.size))
    return CHALLENGE.unpack(payload)[1:]


def decode_auth(payload):
    if len(payload) != AUTH.size:
        raise ProtocolError("AUTH of %d bytes, expected %d" % (len(payload), AUTH.size))
    return payload


def welcome_mac(session, body):
    """The MAC that keeps anyone on the path without the key from changing WELCOME (the address,
    the network, the limits). session: (key, client nonce, server nonce) of this handshake."""
    key, client_nonce, server_nonce = session
    return hmac_sha256(key, b"mnedc welcome" + client_nonce + server_nonce + bytes(body))


def encode_welcome(session, address, prefix_length, server_address, max_frame_bytes=MAX_PAYLOAD_BYTES,
                   ipv6_prefix=None):
    """Addresses are 4 packed bytes (socket.inet_aton); max_frame_bytes is the largest payload
    the server takes from this client (its max_frame_bytes); ipv6_prefix the network's /64
    (8 packed bytes), or None."""
    body = WELCOME.pack(address, prefix_length, server_address, max_frame_bytes, ipv6_prefix or bytes(8))
    return body + welcome_mac(session, body)


def decode_welcome(session, payload):
    """(address, prefix length, server address, largest frame payload the server takes, IPv6
    /64 or None), once its MAC under session proves that the server sent it as it is."""
    if len(payload) != WELCOME.size + WELCOME_MAC_BYTES:
        raise ProtocolError("WELCOME of %d bytes, expected %d" % (len(payload), WELCOME.size + WELCOME_MAC_BYTES))
    body = payload[:WELCOME.size]
    if not equal_digests(bytes(payload[WELCOME.size:]), welcome_mac(session, body)):
        raise WelcomeForged("WELCOME's MAC is wrong: it was changed on the way to this client")
    address, prefix_length, server_address, max_frame_bytes, ipv6_prefix = WELCOME.unpack(body)
    if not 1 <= prefix_length <= 30:
        raise ProtocolError("WELCOME prefix length /%d is not usable" % prefix_length)
    if max_frame_bytes < MIN_FRAME_BYTES:
        raise ProtocolError("WELCOME frame limit %d is below %d" % (max_frame_bytes, MIN_FRAME_BYTES))
    return address, prefix_length, server_address, max_frame_bytes, (ipv6_prefix if any(ipv6_prefix) else None)


def encode_error(code, text):
    return ERROR.pack(code) + text.encode("utf-8")[:MAX_ERROR_TEXT_BYTES]


def decode_error(payload):
    """(code, text); never fails on odd text, since it only goes into a log line."""
    if len(payload) < ERROR.size:
        raise ProtocolError("empty ERROR frame")
    return payload[0], log_safe_text(payload[ERROR.size:])


def log_safe_text(raw):
    """A peer's words for a log line: UTF-8 as far as it goes, no control characters (a terminal
    escape), at most MAX_ERROR_TEXT_BYTES."""
    text = bytes(raw[:MAX_ERROR_TEXT_BYTES]).decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in text)


def check_ping(payload):
    if len(payload) > MAX_PING_BYTES:
        raise ProtocolError("PING/PONG of %d bytes exceeds %d" % (len(payload), MAX_PING_BYTES))
    return payload


def decode_name(raw, what):
    """A device_id, service or peer name from the wire, or ProtocolError."""
    try:
        return check_device_id(raw.decode("ascii")) if raw else ""
    except (UnicodeDecodeError, ValueError) as error:
        raise ProtocolError("bad %s: %s" % (what, error))


def encode_listen(port, service=""):
    return LISTEN.pack(port) + (check_device_id(service).encode("ascii") if service else b"")


def decode_listen(payload):
    """(port, service name or '')."""
    if len(payload) < LISTEN.size or len(payload) > LISTEN.size + MAX_NAME_BYTES:
        raise ProtocolError("LISTEN of %d bytes" % len(payload))
    return LISTEN.unpack_from(payload)[0], decode_name(payload[LISTEN.size:], "service name")


def encode_open(stream_id, port, window, name):
    return OPEN.pack(stream_id, port, window) + name.encode("ascii")


def decode_open(payload):
    """(stream id, port, window, peer name)."""
    if len(payload) < OPEN.size or len(payload) > OPEN.size + 2 * MAX_NAME_BYTES + 3:
        raise ProtocolError("OPEN of %d bytes" % len(payload))
    stream_id, port, window = OPEN.unpack_from(payload)
    raw = payload[OPEN.size:]
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("OPEN peer name is not ASCII")
    if not name or not set(name) <= PEER_NAME_CHARS:
        raise ProtocolError("OPEN peer name %r is not usable" % name)
    return stream_id, port, window, name


def encode_accept(stream_id, window, answered_by=""):
    return ACCEPT.pack(stream_id, window) + answered_by.encode("ascii")


def decode_accept(payload):
    """(stream id, window, who answered or '')."""
    if len(payload) < ACCEPT.size or len(payload) > ACCEPT.size + MAX_NAME_BYTES + 18:
        raise ProtocolError("ACCEPT of %d bytes" % len(payload))
    try:
        answered_by = payload[ACCEPT.size:].decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("ACCEPT names a device that is not ASCII")
    if not set(answered_by) <= PEER_NAME_CHARS:
        raise ProtocolError("ACCEPT names an unusable device %r" % answered_by)
    return ACCEPT.unpack_from(payload) + (answered_by,)


def encode_listen_refused(port, code, text):
    return LISTEN_REFUSED.pack(port, code) + text.encode("utf-8")[:MAX_ERROR_TEXT_BYTES]


def decode_listen_refused(payload):
    """(port, code, text): the relay refused the LISTEN for port; the session goes on."""
    if len(payload) < LISTEN_REFUSED.size:
        raise ProtocolError("LISTEN_REFUSED of %d bytes" % len(payload))
    port, code = LISTEN_REFUSED.unpack_from(payload)
    return port, code, log_safe_text(payload[LISTEN_REFUSED.size:])


def data_frame_head(stream_id, data):
    """The bytes before data in its DATA frame: send both together and data is never copied."""
    if len(data) > MAX_DATA_BYTES:
        raise ValueError("DATA of %d bytes exceeds %d" % (len(data), MAX_DATA_BYTES))
    return FRAME_HEADER.pack(STREAM_ID.size + len(data), FRAME_DATA, 0) + STREAM_ID.pack(stream_id)


def encode_data(stream_id, data):
    return STREAM_ID.pack(stream_id) + data


def decode_data(payload):
    """(stream id, bytes)."""
    if len(payload) < STREAM_ID.size:
        raise ProtocolError("DATA of %d bytes" % len(payload))
    return STREAM_ID.unpack_from(payload)[0], payload[STREAM_ID.size:]


def encode_window(stream_id, increment):
    return WINDOW.pack(stream_id, increment)


def decode_window(payload):
    """(stream id, increment)."""
    if len(payload) != WINDOW.size:
        raise ProtocolError("WINDOW of %d bytes" % len(payload))
    return WINDOW.unpack(payload)


def encode_eof(stream_id):
    return STREAM_ID.pack(stream_id)


def decode_eof(payload):
    if len(payload) != STREAM_ID.size:
        raise ProtocolError("EOF of %d bytes" % len(payload))
    return STREAM_ID.unpack(payload)[0]


def encode_reset(stream_id, code, text):
    return RESET.pack(stream_id, code) + text.encode("utf-8")[:MAX_ERROR_TEXT_BYTES]


def decode_reset(payload):
    """(stream id, code, text)."""
    if len(payload) < RESET.size:
        raise ProtocolError("RESET of %d bytes" % len(payload))
    stream_id, code = RESET.unpack_from(payload)
    return stream_id, code, log_safe_text(payload[RESET.size:])


def prefix_problem(network, prefix_length):
    """Why a packed network/prefix length is not a network (host bits set), or None."""
    bits = len(network) * 8
    if not 0 < prefix_length <= bits:
        return "prefix length /%d is not usable for IPv%d" % (prefix_length, 4 if bits == 32 else 6)
    if int.from_bytes(network, "big") & ((1 << (bits - prefix_length)) - 1):
        return "host bits are set"
    return None


def encode_routes(routes):
    """routes: [(packed network, prefix length, whether this device is its gateway)]."""
    return b"".join(ROUTE.pack(4 if len(network) == 4 else 6, prefix_length, 1 if ours else 0) + bytes(network)
                    for network, prefix_length, ours in routes)


def decode_routes(payload):
    routes, at = [], 0
    while at < len(payload):
        if len(payload) < at + ROUTE.size or len(routes) >= MAX_ROUTES:
            raise ProtocolError("ROUTES of %d bytes is malformed" % len(payload))
        version, prefix_length, ours = ROUTE.unpack_from(payload, at)
        size = {4: 4, 6: 16}.get(version)
        if size is None or len(payload) < at + ROUTE.size + size or ours > 1:
            raise ProtocolError("ROUTES holds a route of IP version %d" % version)
        network = bytes(payload[at + ROUTE.size:at + ROUTE.size + size])
        problem = prefix_problem(network, prefix_length)
        if problem:
            raise ProtocolError("ROUTES holds a bad network: %s" % problem)
        routes.append((network, prefix_length, bool(ours)))
        at += ROUTE.size + size
    return routes


def encode_restarting(window_s):
    return RESTARTING.pack(window_s)


def decode_restarting(payload):
    if len(payload) != RESTARTING.size:
        raise ProtocolError("RESTARTING of %d bytes" % len(payload))
    return RESTARTING.unpack(payload)[0]


def ipv4_problem(packet, offset=0):
    """Why packet[offset:] is not a well-formed IPv4 packet, or None when it is."""
    length = len(packet) - offset
    if length < 20:
        return "packet of %d bytes is too short for IPv4" % length
    first = packet[offset]
    if first >> 4 != 4:
        return "not an IPv4 packet (version %d)" % (first >> 4)
    if (first & 0x0F) < 5:
        return "IPv4 header length %d is too short" % (first & 0x0F)
    total_length = (packet[offset + 2] << 8) | packet[offset + 3]
    if total_length != length:
        return "IPv4 total length %d but %d bytes arrived" % (total_length, length)
    return None


IPV6_HEADER_BYTES = 40
LINK_LOCAL_PREFIX = b"\xfe\x80" + bytes(6)      # fe80::/64


def ip_problem(packet, offset=0):
    """Why packet[offset:] is not a well-formed IPv4 or IPv6 packet, or None when it is."""
    length = len(packet) - offset
    if length < 1 or packet[offset] >> 4 != 6:
        problem = ipv4_problem(packet, offset)
        return problem and problem.replace("not an IPv4 packet", "not an IP packet")
    if length < IPV6_HEADER_BYTES:
        return "packet of %d bytes is too short for IPv6" % length
    payload_length = (packet[offset + 4] << 8) | packet[offset + 5]
    if payload_length + IPV6_HEADER_BYTES != length:
        return "IPv6 payload length %d but %d bytes arrived" % (payload_length, length)
    return None


def is_ipv6(packet, offset=0):
    return packet[offset] >> 4 == 6


def ip_addresses(packet, offset=0):
    """(source, destination) of a well-formed IPv4 or IPv6 packet, packed."""
    if packet[offset] >> 4 == 6:
        return bytes(packet[offset + 8:offset + 24]), bytes(packet[offset + 24:offset + 40])
    return bytes(packet[offset + 12:offset + 16]), bytes(packet[offset + 16:offset + 20])


def ipv6_addresses(ipv6_prefix, host_number):
    """(address in the network's /64, link-local address) of the device with host_number."""
    interface_id = host_number.to_bytes(8, "big")
    return ipv6_prefix + interface_id, LINK_LOCAL_PREFIX + interface_id


def is_link_local_group6(address):
    """ff02::/16 (mDNS ff02::fb, SSDP ff02::c, all nodes ff02::1 ...), transient ones too."""
    return address[0] == 0xFF and address[1] & 0x0F == 2


# Destinations every member of the virtual network hears, as on one LAN segment: the limited
# and the subnet's broadcast, the link-local groups (224.0.0.0/24: mDNS 224.0.0.251, LLMNR ...)
# and SSDP's. The relay copies them to every other member; a client takes any multicast
# (the kernel keeps only the groups something on the host joined).
LIMITED_BROADCAST = b"\xff\xff\xff\xff"
LINK_LOCAL_GROUPS = b"\xe0\x00\x00"        # 224.0.0.0/24, by its first three bytes
SSDP_GROUP = b"\xef\xff\xff\xfa"          # 239.255.255.250
IGMP_PROTOCOL = 2


def is_ipv4_multicast(address):
    return 224 <= address[0] <= 239


def is_local_group(address):
    return address[:3] == LINK_LOCAL_GROUPS or address == SSDP_GROUP


def subnet_broadcast(network, prefix_length):
    """The packed broadcast address of the subnet of a packed address."""
    return (int.from_bytes(network, "big") | ((1 << (32 - prefix_length)) - 1)).to_bytes(4, "big")


def vnet_packet_problem(payload):
    """Why a VNET_PACKET payload is malformed, or None: its IP packet, then its offload fields."""
    return ip_problem(payload, VNET_HEADER.size) or offload_problem(payload)


def offload_problem(payload):
    """Why the offload fields of a VNET_PACKET with a well-formed IP packet are unusable.

    The checksum the sender left open must lie past the IP header (it may sit deeper, e.g. the
    inner TCP checksum of a VXLAN tunnel carried over the network), and segmentation is for TCP
    only. Else the receiver's checksum (finished_packet) could write into the IP header, over
    the source address the relay checked.
    """
    flags, gso_type, _, _, csum_start, csum_offset = VNET_HEADER.unpack_from(payload)
    if is_ipv6(payload, VNET_HEADER.size):
        header_length, protocol, tcp_gso = IPV6_HEADER_BYTES, payload[VNET_HEADER.size + 6], VNET_GSO_TCPV6
    else:
        header_length, protocol, tcp_gso = (payload[VNET_HEADER.size] & 0x0F) * 4, payload[VNET_HEADER.size + 9], VNET_GSO_TCPV4
    if flags & ~VNET_NEEDS_CSUM:
        return "offload flags 0x%02x are not allowed" % flags
    if gso_type and gso_type & ~VNET_GSO_ECN != tcp_gso:
        return "segmentation offload type %d is not TCP over this packet's IP version" % gso_type
    if gso_type and protocol != 6:
        return "TCP segmentation offload on protocol %d" % protocol
    if flags & VNET_NEEDS_CSUM:
        if csum_start < header_length:
            return "checksum from offset %d would cover the IP header" % csum_start
        if csum_start + csum_offset + 2 > len(payload) - VNET_HEADER.size:
            return "checksum offset %d+%d is outside the packet" % (csum_start, csum_offset)
    return None


def finished_packet(payload):
    """The bare IP packet of a VNET_PACKET, with the checksum the sender left to the NIC done.

    A segment larger than the MTU stays whole: the receiving stack takes it as it takes a GRO'd
    one. The one's-complement sum of 16-bit words is the number modulo 0xFFFF (2**16 = 1 mod 0xFFFF).
    """
    flags, _, _, _, csum_start, csum_offset = VNET_HEADER.unpack_from(payload)
    packet = bytearray(memoryview(payload)[VNET_HEADER.size:])
    if flags & VNET_NEEDS_CSUM:
        covered = packet[csum_start:] + b"\0" * ((len(packet) - csum_start) & 1)
        total = int.from_bytes(covered, "big") % 0xFFFF or (0xFFFF if any(covered) else 0)
        checksum = ~total & 0xFFFF
        packet[csum_start + csum_offset:csum_start + csum_offset + 2] = (checksum or 0xFFFF).to_bytes(2, "big")
    return bytes(packet)
# ==== END MNEDC WIRE PROTOCOL ====


# ==== BEGIN MNEDC TRANSPORT ====
# Identical in mnedc_server.py and mnedc_client.py (tests/test_shared_blocks.py checks it), and
# tested alone over socketpairs (tests/test_transport.py). It needs the wire block above and
# the stdlib; TlsTransport and describe_error (runtime block) only when it runs.

import selectors
import socket
import time

MAX_BATCH_BUFFERS = 512         # header + payload buffers in one sendmsg (IOV_MAX is 1024)
MAX_BATCH_BYTES = 256 * 1024    # ... and bytes: a wakeup of 64 KB packets must not hold 4 MB


class Batcher:
    """While the loop handles one wakeup, the data frames sent to each connection wait and
    leave together at its end, in one sendmsg per connection: one syscall for a whole recv()
    worth of small packets instead of one each."""

    def __init__(self):
        self.active = False
        self.waiting = []               # transports holding a batch

    def begin(self):
        self.active = True

    def flush(self):
        self.active = False
        waiting, self.waiting = self.waiting, []
        for transport in waiting:
            transport.send_batch()


class FrameTransport:
    """Carries frames on one connection's socket (plain or TlsTransport).

    A frame goes to the socket at once; only what the kernel does not take is queued (out)
    until the socket is writable, so order is kept. Frame types in BATCHED wait in a batch
    while the Batcher is active. finish() lingers: it sends what is queued, half-closes, and
    leaves the close to the peer or to the subclass's timer at self.deadline.

    A subclass calls start_transport() and sets self.stage, of which "finishing" and
    "closed" are this class's; it defines close(reason), and on_queued/on_unqueued if it
    accounts for queued bytes. A send that fails closes the connection; nothing raises.
    """

    BATCHED = ()

    def start_transport(self, sock, loop, batcher):
        self.sock, self.loop, self.batcher = sock, loop, batcher
        self.out = bytearray()
        self.batch, self.batch_bytes = [], 0
        self.finish_reason = None

    def fileno(self):
        return self.sock.fileno()

    def tls_pending(self):
        """Whether OpenSSL holds decrypted bytes, which select() cannot see: read them now."""
        return isinstance(self.sock, TlsTransport) and self.stage not in ("finishing", "closed") \
            and self.sock.pending() > 0

    def send_frame(self, frame_type, payload):
        self.send_parts(frame_type, frame_header(frame_type, payload), payload)

    def send_parts(self, frame_type, header, payload):
        """send_frame with the header given: the frame header and any fields before payload."""
        if not self.out and self.batcher.active and frame_type in self.BATCHED:
            if not self.batch:
                self.batcher.waiting.append(self)
            self.batch += (header, payload)
            self.batch_bytes += len(header) + len(payload)
            if len(self.batch) >= MAX_BATCH_BUFFERS or self.batch_bytes >= MAX_BATCH_BYTES:
                self.send_batch()
            return
        if self.batch:
            self.send_batch()
        if self.stage != "closed":
            self.send_buffers([header, payload])

    def send_batch(self):
        buffers, self.batch, self.batch_bytes = self.batch, [], 0
        if self.stage != "closed" and buffers:
            self.send_buffers(buffers)

    def send_buffers(self, buffers):
        """Write buffers in order: straight to the socket if nothing waits, else to out."""
        if not self.out:
            try:
                sent = self.sock.sendmsg(buffers)              # no copy to join them
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as error:
                self.close(describe_error(error))
                return
            if sent == sum(len(buffer) for buffer in buffers):
                return
            rest = b"".join(buffers)[sent:]
        else:
            rest = b"".join(buffers)
        self.out += rest
        self.loop.set_interest(self, selectors.EVENT_READ | selectors.EVENT_WRITE)
        self.on_queued(len(rest))

    def flush_queue(self):
        """The socket is writable: send what is queued. Once all is out, wait to read only,
        and a finishing connection half-closes."""
        if self.out:
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):         # TLS: not yet
                return
            except OSError as error:
                self.close(describe_error(error))
                return
            del self.out[:sent]
            self.on_unqueued(sent)
        if not self.out:
            self.loop.set_interest(self, selectors.EVENT_READ)
            if self.stage == "finishing":
                self.half_close()

    def finish(self, linger_s, reason):
        """Say no more: send what is queued, then half-close; reason is the close's if the
        peer is gone before that. The subclass closes at self.deadline at the latest."""
        self.stage, self.finish_reason = "finishing", reason
        self.deadline = time.monotonic() + linger_s
        self.loop.set_interest(self, selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0))
        if not self.out:
            self.half_close()

    def half_close(self):
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:                 # the peer is gone already: nothing left to say
            self.close(self.finish_reason)

    def drop_queue(self):
        """At close: forget what is queued."""
        self.on_unqueued(len(self.out))
        self.out = bytearray()
        self.batch, self.batch_bytes = [], 0

    def on_queued(self, count):
        pass

    def on_unqueued(self, count):
        pass

# ==== END MNEDC TRANSPORT ====


# ==== CONNECTIONS ====
#
# One RelayLink is one attempt to reach the server; TunClient makes a new one after a loss.
#
#   stage        waits for        then
#   connecting   TCP connect      send HELLO                               -> challenge
#   challenge    CHALLENGE        send AUTH, our proof                     -> welcome
#   welcome      WELCOME          check its MAC (the server's proof), then
#                                 give the TUN interface its address       -> established
#   established  PACKET/PING/...  packets to the TUN, answer pings, send keepalives
#
# Each stage before established must finish within its timeout, or the attempt is closed.

FATAL_SERVER_ERRORS = (ERROR_AUTH, ERROR_VERSION, ERROR_NAME_TAKEN)


class RelayLink(FrameTransport):
    """The TCP connection to the relay server, from connect() to close.

    It runs the handshake and the keepalive itself and hands every other frame to its owner
    (a TunClient or a StreamClient) through owner.on_frame().
    """

    BATCHED = (FRAME_PACKET, FRAME_VNET_PACKET)

    def __init__(self, client, sock, server_label):
        self.client = client
        self.config = client.config     # this attempt's settings, whatever a SIGHUP does meanwhile
        self.start_transport(sock, client.loop, client.batcher)
        self.server_label = server_label
        self.stage = "connecting"
        self.reader = FrameReader(receive_bytes=RECV_BYTES)
        self.client_nonce = os.urandom(NONCE_BYTES)
        now = time.monotonic()
        self.deadline = now + CONNECT_TIMEOUT_S
        self.last_received = self.last_ping = now
        self.rtt_ms = None
        self.established_at = None
        self.refused = False            # the server ended it with an ERROR (kick, takeover, ...)

    def __repr__(self):
        return "RelayLink(%s, %s)" % (self.server_label, self.stage)

    # -- receiving, in the order a frame travels --

    def on_readable(self):
        if self.stage == "tls":
            self.continue_tls()
            return
        self.read_frames()
        while self.tls_pending():
            self.read_frames()

    def read_frames(self):
        try:
            received = self.reader.receive(self.sock.recv_into)
        except BlockingIOError:         # a TLS record is not complete yet
            return
        if not received:
            self.close("the server closed the connection")
            return
        if self.stage == "finishing":
            self.reader.discard()       # we said all we had to; the server's words can wait
            return
        self.last_received = time.monotonic()
        try:
            for frame_type, payload in self.reader.take_frames():
                handler = LINK_HANDLERS[self.stage].get(frame_type)
                if handler is None and self.stage == "established":
                    self.client.on_frame(frame_type, payload)
                else:
                    (handler or RelayLink.on_unexpected)(self, frame_type, payload)
                if self.stage == "closed":
                    return
        except ProtocolError as error:
            self.send_frame(FRAME_ERROR, encode_error(ERROR_PROTOCOL, str(error)))
            self.close("protocol error from the server: %s" % error)

    def on_unexpected(self, frame_type, payload):
        name = FRAME_NAMES.get(frame_type, "unknown frame type %d" % frame_type)
        raise ProtocolError("%s while in stage %s" % (name, self.stage))

    def on_challenge(self, frame_type, payload):
        server_nonce, network_salt = decode_challenge(payload)
        config, key = self.config, self.client.network_key(network_salt)
        self.send_frame(FRAME_AUTH, client_proof(key, self.client_nonce, server_nonce, config.device_id))
        self.session = (key, self.client_nonce, server_nonce)      # what WELCOME's MAC is under
        self.stage = "welcome"

    def on_welcome(self, frame_type, payload):
        try:
            address, prefix_length, server_address, max_frame_bytes, ipv6_prefix = decode_welcome(self.session, payload)
        except WelcomeForged as error:
            self.send_frame(FRAME_ERROR, encode_error(ERROR_AUTH, "the server's proof is wrong"))
            self.client.fatal("authentication failed: %s: the server at %s does not know this network's "
                              "secret, or something on the path changed it" % (error, self.server_label))
            self.close("authentication failed")
            return
        self.reader.max_payload = MAX_PAYLOAD_BYTES
        self.stage = "established"
        self.established_at = time.monotonic()
        self.client.max_frame_bytes = max_frame_bytes       # what we send stays within it
        self.client.on_welcome(self, address, prefix_length, server_address, ipv6_prefix)

    def on_error(self, frame_type, payload):
        code, text = decode_error(payload)
        self.refused = True
        self.client.on_server_error(code, text)
        self.close("the server refused: %s: %s" % (ERROR_NAMES.get(code, "error %d" % code), text))

    def on_ping(self, frame_type, payload):
        self.send_frame(FRAME_PONG, check_ping(payload))

    def on_restarting(self, frame_type, payload):
        self.client.restart_window_s = decode_restarting(payload)

    def on_pong(self, frame_type, payload):
        if len(check_ping(payload)) == 8:
            self.rtt_ms = (time.monotonic() - struct.unpack("!d", payload)[0]) * 1000.0

    # -- sending --

    def on_connected(self):
        """The TCP connect finished (or failed: then OSError names why)."""
        failure = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if failure:
            raise OSError(failure, os.strerror(failure))
        self.deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        config = self.config
        if config.tls_context is not None:
            name = config.tls_server_name or self.server_label.rpartition(":")[0]
            try:
                self.sock = TlsTransport(config.tls_context, self.sock, ascii_host(name))
            except ValueError as error:         # a name ssl will not check a certificate against
                self.close("TLS to %s cannot start: %s" % (self.server_label, error))
                return
            self.stage = "tls"
            self.continue_tls()
            return
        self.send_hello()

    def continue_tls(self):
        try:
            events = self.sock.handshake()
        except OSError as error:        # the verification failure says what is wrong
            hint = ""
            if isinstance(error, ConnectionError) or type(error).__name__ == "SSLEOFError":
                hint = " (a server at a connection limit closes TLS connections at once; its log says why)"
            elif "wrong version number" in describe_error(error):
                hint = " (the relay answered without TLS: it has tls = no, or it is not an MNEDC relay)"
            self.close("TLS handshake with %s failed: %s%s" % (self.server_label, describe_error(error), hint))
            return
        if events:
            self.client.loop.set_interest(self, events)
            return
        pins = self.config.server_pins
        problem = pins and pin_problem(self.sock, pins)
        if problem:
            self.client.fatal("%s (a new certificate, or someone on the path): check server_pin" % problem)
            self.close("certificate not pinned")
            return
        self.send_hello()

    def send_hello(self):
        self.stage = "challenge"
        self.client.loop.set_interest(self, selectors.EVENT_READ)
        self.send_frame(FRAME_HELLO, encode_hello(self.client_nonce, self.config.device_id,
                                                  self.client.hello_flags))

    def send_packet(self, frame_type, packet):
        """Queue one PACKET or VNET_PACKET; True while the queue is below the high-water mark.

        Only self.out counts: a batch always leaves at the end of the wakeup, and pausing the
        TUN for it would wait for a writable event that an emptied queue never brings.
        """
        self.send_frame(frame_type, packet)
        return len(self.out) < HIGH_WATER_BYTES

    def on_writable(self):
        if self.stage == "connecting":
            self.on_connected()
            return
        if self.stage == "tls":
            self.continue_tls()
            return
        self.flush_queue()
        if self.stage not in ("finishing", "closed") and len(self.out) < LOW_WATER_BYTES:
            self.client.on_link_drained()

    # -- ending --

    def check_timers(self, now):
        if self.stage == "finishing":
            if now > self.deadline:
                self.close("linger over")
            return
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

    def finish_then(self, then):
        """Send what is queued, half-close, and wait (at most LINK_LINGER_S) for the server to
        close too; then close and call then()."""
        self.on_finished = then
        self.finish(LINK_LINGER_S, "the server is gone")

    def close(self, reason):
        """Never raises; safe to call twice."""
        if self.stage == "closed":
            return
        if self.stage == "finishing":
            self.stage = "closed"
            self.client.loop.forget(self)
            self.sock.close()
            self.on_finished()
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
    "tls": {},
    "challenge": {FRAME_CHALLENGE: RelayLink.on_challenge, FRAME_ERROR: RelayLink.on_error},
    "welcome": {FRAME_WELCOME: RelayLink.on_welcome, FRAME_ERROR: RelayLink.on_error},
    "established": {
        FRAME_PING: RelayLink.on_ping, FRAME_PONG: RelayLink.on_pong, FRAME_ERROR: RelayLink.on_error,
        FRAME_RESTARTING: RelayLink.on_restarting,
    },
}


class ClientTun:
    """This device's TUN interface: packets the kernel routes into the virtual network."""

    def __init__(self, client, fd, interface, offload):
        self.client = client
        self.fd = fd
        self.interface = interface
        self.offload = offload
        self.tso = offload              # TSO on; off under a server's small frame limit
        self.paused = False
        self.closed = False

    def fileno(self):
        return self.fd

    def __repr__(self):
        return "ClientTun(%s)" % self.interface

    def on_readable(self):
        self.client.batcher.begin()     # this wakeup's packets leave in one sendmsg
        try:
            for _ in range(TUN_PACKETS_PER_WAKEUP):
                try:
                    frame_type, packet = read_tun_packet(self.fd, self.offload)
                except (BlockingIOError, InterruptedError):
                    return
                if not self.client.forward_from_tun(frame_type, packet):
                    self.pause()
                    return
        finally:
            self.client.batcher.flush()

    def send_packet(self, frame_type, packet):
        try:
            write_tun_packet(self.fd, self.offload, frame_type, packet)
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
        """Closing the fd removes the interface. Never raises; safe to call twice.

        Called by the loop when the TUN fails (someone deleted the interface): then the client
        exits with status 1, so that its supervisor starts it again with a fresh interface.
        """
        if self.closed:
            return
        self.closed = True
        self.client.loop.forget(self)
        os.close(self.fd)
        self.client.log.info("removed interface %s: %s" % (self.interface, reason))
        if not self.client.stopping:
            self.client.fatal("interface %s failed: %s" % (self.interface, reason))


# Stream mode. A Stream joins a local byte stream (a TCP socket, or stdin and stdout) to its far
# end over the relay. Flow control is end to end: we send DATA only within the credit the far end
# granted, and grant credit back (WINDOW) only for bytes our local side has taken. So a slow
# local reader stops its own stream and nothing else.
#
#   local readable  -> DATA (within credit); local EOF -> EOF frame        (half-close)
#   DATA            -> local write, then WINDOW; EOF frame -> shutdown(SHUT_WR) locally
#   both directions ended -> "closed gracefully"; RESET or a local error -> "closed suddenly"

class LocalFd:
    """One local fd of a stream (socket, pipe, tty or regular file) for the event loop.

    Regular files cannot be watched by epoll, but never block either: for those a wish to read
    or write becomes a timer that fires at once.
    """

    def __init__(self, loop, fd, on_readable, on_writable, on_failure, is_socket=False):
        self.loop = loop
        self.fd = fd
        self.on_readable = on_readable
        self.on_writable = on_writable
        self.close = on_failure          # the loop calls close(reason) when a callback fails
        self.is_file = not is_socket and not _pollable(fd)
        self.reading = self.writing = False
        self._timer = None

    def fileno(self):
        return self.fd

    def __repr__(self):
        return "LocalFd(%d)" % self.fd

    def want(self, reading=None, writing=None):
        if reading is not None:
            self.reading = reading
        if writing is not None:
            self.writing = writing
        if self.is_file:
            if (self.reading or self.writing) and self._timer is None:
                self._timer = self.loop.call_later(0, self._fire)
            return
        events = (selectors.EVENT_READ if self.reading else 0) | (selectors.EVENT_WRITE if self.writing else 0)
        self.loop.set_interest(self, events)

    def _fire(self):
        self._timer = None
        try:
            if self.reading:
                self.on_readable()
            if self.writing:
                self.on_writable()
        except OSError as error:
            self.close(describe_error(error))
        if self.reading or self.writing:
            self.want()

    def forget(self):
        self.reading = self.writing = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.is_file:
            self.loop.forget(self)


def _pollable(fd):
    probe = selectors.DefaultSelector()
    try:
        probe.register(fd, selectors.EVENT_READ)
        return True
    except (OSError, ValueError):
        return False
    finally:
        probe.close()


class Stream:
    """One end of a stream: a local socket or stdin/stdout, and the far end over the relay."""

    def __init__(self, client, stream_id, peer, sock=None, stdio=None):
        self.client = client
        self.stream_id = stream_id
        self.peer = peer
        self.sock = sock
        if sock is not None:
            fd = sock.fileno()
            self.reader = self.writer = LocalFd(client.loop, fd, self.on_local_readable,
                                                self.on_local_writable, self.fail, is_socket=True)
        else:
            self.reader = LocalFd(client.loop, stdio[0], self.on_local_readable, None, self.fail)
            self.writer = LocalFd(client.loop, stdio[1], None, self.on_local_writable, self.fail)
        self.send_credit = 0
        self.to_local = bytearray()
        self.consumed = 0               # bytes written locally and not yet granted back
        self.local_eof = False          # our local side will send no more (EOF sent)
        self.remote_eof = False         # the far end will send no more
        self.local_shut = False         # we passed the far end's EOF on to our local side
        self.started = False
        self.opened_by_us, self.opened_at = False, time.monotonic()
        self.state = "open"

    def __repr__(self):
        return "Stream(%d with %s, %s)" % (self.stream_id, self.peer, self.state)

    def start(self, credit):
        """The far end accepted: data may flow both ways."""
        self.started = True
        self.send_credit = credit
        self.reader.want(reading=True)

    # -- local -> relay --

    def on_local_readable(self):
        if self.local_eof or self.send_credit <= 0 or self.state != "open":
            self.reader.want(reading=False)
            return
        size = min(self.send_credit, self.client.max_frame_bytes - STREAM_ID.size)
        try:
            data = self.sock.recv(size) if self.sock is not None else os.read(self.reader.fd, size)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            self.local_eof = True
            self.reader.want(reading=False)
            self.client.send_frame(FRAME_EOF, encode_eof(self.stream_id))
            self.finish_if_done()
            return
        self.send_credit -= len(data)
        self.client.send_data(self.stream_id, data)
        if self.send_credit <= 0:
            self.reader.want(reading=False)

    def on_window(self, increment):
        self.send_credit += increment
        if self.started and not self.local_eof and self.state == "open":
            self.reader.want(reading=True)

    # -- relay -> local --

    def on_data(self, data):
        if self.remote_eof:
            raise ProtocolError("DATA on stream %d after its EOF" % self.stream_id)
        if len(self.to_local) + len(data) > STREAM_WINDOW_BYTES:
            raise ProtocolError("stream %d overran its window" % self.stream_id)
        self.write_local(data)

    def on_eof(self):
        self.remote_eof = True
        self.write_local()

    def write_local(self, fresh=b""):
        """Called from the relay's frames: a local failure ends this stream, never the relay link."""
        try:
            self.on_local_writable(fresh)
        except OSError as error:
            self.fail(describe_error(error))

    def on_local_writable(self, fresh=b""):
        """Write what waits, then fresh (a view into the relay's receive buffer): straight to the
        local end when nothing waits, so that only what it does not take is copied."""
        if fresh and not self.to_local and self.state == "open":
            try:
                written = self.sock.send(fresh) if self.sock is not None else os.write(self.writer.fd, fresh)
            except (BlockingIOError, InterruptedError):
                written = 0
            self.consumed += written
            fresh = fresh[written:]
        self.to_local += fresh
        while self.to_local and self.state == "open":
            try:
                if self.sock is not None:
                    written = self.sock.send(self.to_local)
                else:
                    written = os.write(self.writer.fd, self.to_local)
            except (BlockingIOError, InterruptedError):
                self.writer.want(writing=True)
                return
            del self.to_local[:written]
            self.consumed += written
        self.writer.want(writing=False)
        if self.consumed >= STREAM_WINDOW_BYTES // 4 or (self.consumed and not self.to_local):
            self.client.send_frame(FRAME_WINDOW, encode_window(self.stream_id, self.consumed))
            self.consumed = 0
        if self.remote_eof and not self.to_local and not self.local_shut and self.state == "open":
            self.local_shut = True
            if self.sock is not None:
                self.sock.shutdown(socket.SHUT_WR)
            else:
                close_for_eof(self.writer.fd)   # EOF for whoever reads our stdout
                self.writer.fd = -1
            self.finish_if_done()

    # -- ending --

    def finish_if_done(self):
        if self.local_eof and self.local_shut:
            self.end(True, "closed gracefully")

    def on_reset(self, code, text):
        self.end(False, "closed suddenly: %s: %s" % (RESET_NAMES.get(code, "reset %d" % code), text))

    def fail(self, reason):
        """The local side failed (or was killed): abort the far end too."""
        if self.state == "open":
            self.client.send_frame(FRAME_RESET, encode_reset(self.stream_id, RESET_ABORTED,
                                                             "%s on %s" % (reason, self.client.config.device_id)))
            self.end(False, "closed suddenly: %s" % reason)

    def end(self, graceful, how):
        """Log how the stream ended, release the local side; never raises, safe to call twice."""
        if self.state != "open":
            return
        self.state = "closed"
        self.client.log.info("Connection with %s %s" % (self.peer, how))
        for local in {self.reader, self.writer}:
            local.forget()
        if self.sock is not None:
            if graceful:
                self.sock.close()
            else:                       # RST, so the local peer sees the abort, not a clean EOF
                abort_socket(self.sock)
        self.client.on_stream_end(self, graceful)


def abort_socket(sock):
    """Close with a RST: the other side sees a failure, never a clean end of data."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def close_for_eof(fd):
    """Close fd so that its reader sees EOF, also when fd is a socket shared with stdin (inetd,
    socat EXEC:), where close() alone sends no FIN."""
    if stat.S_ISSOCK(os.fstat(fd).st_mode):
        duplicate = socket.socket(fileno=os.dup(fd))
        try:
            duplicate.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        duplicate.close()
    os.close(fd)


class LocalListener:
    """connect --forward: a TCP port on 127.0.0.1 whose every connection becomes a stream."""

    def __init__(self, client, sock):
        self.client = client
        self.sock = sock

    def fileno(self):
        return self.sock.fileno()

    def __repr__(self):
        return "LocalListener(127.0.0.1:%d)" % self.sock.getsockname()[1]

    def on_readable(self):
        try:
            sock, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:        # EMFILE and friends: pause, never give the port up
            self.client.log.limited("accept", "error", "accepting a local connection failed: %s"
                                    % describe_error(error))
            self.client.loop.set_interest(self, 0)
            self.client.loop.call_later(ACCEPT_PAUSE_S, self.resume)
            return
        sock.setblocking(False)
        try:
            self.client.on_local_connection(sock)
        except OSError as error:        # that one connection failed, not the port
            self.client.log.limited("local", "error", "a local connection failed: %s" % describe_error(error))
            abort_socket(sock)

    def resume(self):
        if self.sock.fileno() >= 0:
            self.client.loop.set_interest(self, selectors.EVENT_READ)

    def on_writable(self):
        pass

    def close(self, reason):
        if not self.client.stopping:
            self.client.log.error("stopped listening on 127.0.0.1:%d: %s" % (self.sock.getsockname()[1], reason))
        self.client.loop.forget(self)
        self.sock.close()


# ==== THE CLIENTS ====

def uniform(low, high):
    """A random float in [low, high] for backoff jitter; os.urandom spares importing random."""
    return low + (high - low) * int.from_bytes(os.urandom(4), "big") / 0xFFFFFFFF


class NameLookup:
    """One getaddrinfo off the event loop, so that a slow or dead resolver never holds it
    (signals, keepalives, streams): the lookup runs in a daemon thread and hands its answer back
    through a pipe the loop watches. Past RESOLVE_TIMEOUT_S the attempt fails; the thread is left
    to end by itself, and busy() stays true until it has."""

    def __init__(self, loop, host, port, on_done):
        import threading
        self.loop, self.host, self.on_done = loop, host, on_done
        self.answer = None
        self.reader, writer = os.pipe()
        self.timer = loop.call_later(RESOLVE_TIMEOUT_S, self.on_timeout)
        self.thread = threading.Thread(target=self.resolve, args=(port, writer), daemon=True)
        self.thread.start()
        loop.set_interest(self, selectors.EVENT_READ)

    def busy(self):
        """Whether its thread still waits in the resolver (after a timeout, too)."""
        return self.answer is None and self.thread.is_alive()

    def fileno(self):
        return self.reader

    def __repr__(self):
        return "NameLookup(%s)" % self.host

    def resolve(self, port, writer):
        """In the thread: the only code here that does not run in the loop."""
        try:
            self.answer = resolve_ipv4(self.host, port)
        except Exception as error:      # noqa: BLE001 - any failure is this lookup's answer
            self.answer = error
        finally:
            try:
                os.write(writer, b"!")
            except OSError:
                pass                    # the loop gave up on us and closed its end
            os.close(writer)

    def on_readable(self):
        answer = self.answer
        self.close("answered")
        self.on_done(answer)

    def on_writable(self):
        pass

    def on_timeout(self):
        self.close("timed out")
        self.on_done(OSError("the resolver did not answer within %d s" % RESOLVE_TIMEOUT_S))

    def close(self, reason):
        """Never raises; safe to call twice."""
        if self.reader is None:
            return
        self.timer.cancel()
        self.loop.forget(self)
        os.close(self.reader)
        self.reader = None


class RelayClient:
    """What both modes share: one relay link at a time, the backoff, the timers, the signals."""

    hello_flags = 0
    retry_forever = True

    def __init__(self, config, log):
        self.config = config
        self.log = log
        self.keys = {}                  # network salt -> PBKDF2 key of config.secret (some 0.1 s each)
        self.loop = EventLoop(log)
        self.link = None
        self.lookup = None              # a NameLookup under way for the relay's host name
        self.last_lookup = None         # the newest one, whose thread may outlive its timeout
        self.server_index = 0           # which of config.servers this attempt dials
        self.round_tries = 0            # addresses tried since the last success or backoff
        self.failures = 0               # attempts since the last WELCOME, for the backoff
        self.quick_retry_until = 0.0    # after losing a healthy link: retry quickly until then
        self.reload_config = None       # SIGHUP: a callable that loads the configuration again
        self.restart_window_s = None    # set by RESTARTING: come back within it, not by backoff
        self.retry_timer = None
        self.batcher = Batcher()        # a TUN wakeup's packets leave in one sendmsg
        self.exit_code = 0
        self.stopping = False
        self.state, self.state_since = "connecting", time.time()
        self.reconnects = 0
        self.max_frame_bytes = MAX_PAYLOAD_BYTES    # the server's limit, from its WELCOME

    def start_link(self):
        self.loop.call_every(1.0, self.tick)
        self.loop.on_signals((signal.SIGTERM, signal.SIGINT), self.on_stop_signal)
        self.loop.on_signals((signal.SIGHUP,), self.on_reload_signal)
        self.connect()

    def run(self):
        self.loop.run()
        return self.exit_code

    def server_label(self):
        return "%s:%d" % self.config.servers[self.server_index]

    def network_key(self, network_salt):
        """The key of our secret under the salt the relay names: derived once, at the first join."""
        if network_salt not in self.keys:
            self.keys = {network_salt: network_key(self.config.secret, network_salt)}
        return self.keys[network_salt]

    def connect(self):
        """One attempt at the current relay address: an address is dialled at once, a name is
        looked up first, off the loop."""
        self.retry_timer = None
        if self.stopping or self.link is not None or self.lookup is not None:
            return
        host, port = self.config.servers[self.server_index]
        if is_ipv4_literal(host):
            self.dial((host, port))
        elif self.last_lookup is not None and self.last_lookup.busy():     # one thread at a time
            self.attempt_failed("cannot resolve %s: the resolver has not answered the last lookup yet" % host)
        else:
            self.lookup = self.last_lookup = NameLookup(self.loop, host, port, self.on_resolved)

    def on_resolved(self, answer):
        self.lookup = None
        if self.stopping or self.link is not None:
            return
        if isinstance(answer, Exception):
            host = self.config.servers[self.server_index][0]
            self.attempt_failed("cannot resolve %s: %s" % (host, describe_error(answer)))
        else:
            self.dial(answer)

    def dial(self, address):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        failure = sock.connect_ex(address)
        if failure not in (0, errno.EINPROGRESS):
            sock.close()
            self.attempt_failed("cannot connect to %s: %s" % (self.server_label(), os.strerror(failure).lower()))
            return
        self.link = RelayLink(self, sock, self.server_label())
        self.link.relay_ip = socket.inet_aton(address[0])      # no granted route may cover it
        self.loop.set_interest(self.link, selectors.EVENT_WRITE)

    def attempt_failed(self, reason):
        """This address did not work: the next one of config.servers at once, or, once each was
        tried, the first one again after the backoff."""
        self.round_tries += 1
        if self.round_tries < len(self.config.servers):
            self.server_index = (self.server_index + 1) % len(self.config.servers)
            self.log.info("%s; trying %s" % (reason, self.server_label()))
            self.retry_timer = self.loop.call_later(0, self.connect)
            return
        self.round_tries = self.server_index = 0
        self.retry_later(reason)

    def established_link(self):
        link = self.link
        return link if link is not None and link.stage == "established" else None

    def send_frame(self, frame_type, payload):
        link = self.established_link()
        if link is not None:
            link.send_frame(frame_type, payload)

    def send_data(self, stream_id, data):
        link = self.established_link()
        if link is not None:
            link.send_parts(FRAME_DATA, data_frame_head(stream_id, data), data)

    def on_server_error(self, code, text):
        self.quick_retry_until = 0.0
        if code in FATAL_SERVER_ERRORS:
            self.fatal("the server refused this device: %s: %s" % (ERROR_NAMES[code], text))
        elif code == ERROR_SHUTDOWN:
            self.failures = 0           # a restart is not a failure of ours: come back quickly
        elif code == ERROR_KICKED:
            self.log.warning("the operator disconnected this device: %s" % text)
        elif code == ERROR_REPLACED:    # two devices share a device_id: do not fight every second
            self.failures = max(self.failures, REPLACED_BACKOFF_STEPS)
            self.log.error("another connection took over device_id %s (%s): if that is another "
                           "device, give each device its own device_id" % (self.config.device_id, text))

    def on_link_closed(self, link, reason, was_established):
        if link is self.link:
            self.link = None
        if was_established:
            self.set_state("reconnecting")
        self.on_link_lost(reason)
        if self.stopping:
            return
        if not was_established:
            self.attempt_failed("cannot reach the relay at %s: %s" % (link.server_label, reason))
            return
        if not self.retry_forever:
            self.fatal("relay connection to %s lost: %s" % (link.server_label, reason))
            return
        self.log.warning("relay connection lost: %s" % reason)
        self.round_tries = 0
        now = time.monotonic()
        if not link.refused and now - link.established_at >= HEALTHY_LINK_S:
            self.quick_retry_until = now + QUICK_RETRY_WINDOW_S
        self.retry_later(None)

    def retry_later(self, reason):
        if not self.retry_forever:
            self.fatal(reason)
            return
        if self.restart_window_s:       # a planned restart: a random moment in its window
            delay = uniform(min(1.0, self.restart_window_s), self.restart_window_s)
            self.restart_window_s = None
            self.log.info("the relay is restarting: reconnecting in %.1f s" % delay)
            self.retry_timer = self.loop.call_later(delay, self.connect)
            return
        delay = self.next_backoff_s()
        self.log.debug("attempt %d failed; next in %.1f s" % (self.failures, delay))
        if reason:
            self.log.limited("retry", "warning", "%s; retrying in %.1f s" % (reason, delay))
        else:
            self.log.info("reconnecting in %.1f s" % delay)
        self.retry_timer = self.loop.call_later(delay, self.connect)

    def connect_now(self):
        """Try at once instead of at the next backoff step."""
        if self.retry_timer is not None:
            self.retry_timer.cancel()
        self.connect()

    def next_backoff_s(self):
        """1 s, 2 s, 4 s ... each up to 50 % longer at random, so that devices that lost the relay
        together do not come back in lockstep, and never over MAX_BACKOFF_S (20 to 30 s there).
        Within QUICK_RETRY_WINDOW_S of losing a healthy link: every QUICK_RETRY_S instead, since a
        relay that crashed is usually back in seconds and the tunnel's own TCP sessions are
        waiting on it."""
        if time.monotonic() < self.quick_retry_until:
            return uniform(*QUICK_RETRY_S)
        base = min(MAX_BACKOFF_S / 1.5, MIN_BACKOFF_S * (2 ** min(self.failures, 10)))
        self.failures += 1
        return base * uniform(1.0, 1.5)

    def tick(self):
        if self.link is not None:
            self.link.check_timers(time.monotonic())
        self.log.flush()

    def set_state(self, state):
        if state != self.state:
            self.state, self.state_since = state, time.time()

    def fatal(self, message):
        self.log.error(message)
        self.exit_code = self.exit_code or 1
        self.stop("fatal error")

    def on_stop_signal(self, signum):
        self.log.info("received %s: shutting down" % signal.Signals(signum).name)
        self.stop("client shutting down")

    def on_reload_signal(self, signum):
        """SIGHUP: read the configuration again and take what can change live (servers, secret,
        keepalive, log_level, TLS files: from the next connection on); what cannot (device_id,
        the interface, MTU, offload, control_socket) is kept, and the log says so."""
        if self.reload_config is None:
            self.log.info("received SIGHUP: nothing to reload")
            return
        try:
            config = self.reload_config()
        except (ConfigError, OSError, ValueError) as error:   # ValueError: a file that is not UTF-8
            self.log.error("received SIGHUP, but the configuration is not usable, so the running "
                           "one stays: %s" % error)
            return
        kept = [key for key in RESTART_KEYS if getattr(config, key) != getattr(self.config, key)]
        for key in kept:
            setattr(config, key, getattr(self.config, key))
        if config.secret != self.config.secret:
            self.keys = {}
        if config.servers != self.config.servers:
            self.server_index = self.round_tries = 0
        self.config = config
        self.log.set_level(config.log_level)
        self.log.info("received SIGHUP: reloaded %s%s" % (
            config.source, "; %s changed, which takes a restart" % ", ".join(kept) if kept else ""))

    def stop(self, reason, linger=False):
        """Stop the loop. linger: first let the server take every frame we queued (the last
        WINDOWs and EOFs of a finished stream): closing at once would make the kernel reset
        the connection and the server drop what it had not yet relayed."""
        if self.stopping:
            return
        self.stopping = True
        if self.lookup is not None:
            self.lookup.close(reason)
        self.release(reason)
        link = self.established_link()
        if linger and link is not None:
            link.finish_then(lambda: self.loop.stop())
            return
        if self.link is not None:
            self.link.close(reason)
        self.loop.stop()

    # what each mode adds
    def on_link_lost(self, reason):
        pass

    def on_link_drained(self):
        pass

    def release(self, reason):
        pass


class TunClient(RelayClient):
    """TUN mode: keeps this device on the virtual network through one TUN interface."""

    def __init__(self, config, log):
        RelayClient.__init__(self, config, log)
        self.tun = None
        self.configured = None          # (address, prefix length, IPv6 /64) the interface has
        self.own_address = None         # the same address, packed: what packets to us carry
        self.network = None             # (packed network, prefix length) of the virtual network
        self.broadcast = None           # and its packed broadcast address
        self.ipv6_prefix = None         # the network's IPv6 /64 (8 bytes), when it has one
        self.own_addresses6 = ()        # ours in it and our link-local one, packed
        self.mtu = None                 # and its MTU
        self.server_address = None
        self.resolver_set = None        # (DNS address, domain) systemd-resolved has for our link
        self.dnsmasq_set = None         # (DNS address, domain) in the dnsmasq servers file
        self.own_networks = []          # granted networks this device is the gateway for
        self.routed = []                # others' granted networks routed into our TUN
        self.masqueraded = []           # iptables rules we added (gateway_nat), to take out at stop
        self.control = None
        self.packets_in = self.packets_out = self.bytes_in = self.bytes_out = 0
        self.drops = {}

    def start(self):
        """Create the TUN interface (it lives until we stop) and start connecting."""
        try:
            fd, interface, offload = open_tun(self.config.interface, self.config.offload)
        except OSError as error:
            raise OSError(error.errno, "cannot create TUN interface %s: %s (TUN mode needs root "
                          "and /dev/net/tun; stream mode, `listen` and `connect`, needs neither)"
                          % (self.config.interface, describe_error(error)))
        self.tun = ClientTun(self, fd, interface, offload)
        self.loop.set_interest(self.tun, selectors.EVENT_READ)
        self.log.info("created interface %s (%s); device %s connecting to %s"
                      % (interface, "offloads on" if offload else "no offloads", self.config.device_id,
                         format_servers(self.config.servers)))
        if self.config.control_socket:
            self.open_control()
        self.start_link()

    def open_control(self):
        try:
            self.control = ControlListener(self.loop, self.config.control_socket, self.on_control, self.log)
        except OSError as error:
            self.log.warning("no control socket at %s (%s): status will not work"
                             % (self.config.control_socket, describe_error(error)))
            return
        self.loop.set_interest(self.control, selectors.EVENT_READ)

    def on_control(self, request):
        if request.get("command") != "status":
            return {"error": "unknown command %r (status)" % request.get("command")}
        link = self.established_link()
        return {"device_id": self.config.device_id, "server": self.server_label(),
                "servers": format_servers(self.config.servers),
                "interface": self.tun.interface, "mtu": self.mtu or self.config.mtu, "offload": self.tun.offload, "tso": self.tun.tso,
                "address": "%s/%d" % self.configured[:2] if self.configured else None,
                "ipv6": ["%s/64" % ip_text(address) for address in self.own_addresses6],
                "routes": ["%s/%d" % (ip_text(network), length) for network, length in self.routed],
                "gateway_for": ["%s/%d" % (ip_text(network), length) for network, length in self.own_networks],
                "server_address": self.server_address, "state": self.state, "since": self.state_since,
                "rtt_ms": link.rtt_ms if link else None, "reconnects": self.reconnects,
                "tls": link.sock.summary() if link and isinstance(link.sock, TlsTransport) else None,
                "packets_in": self.packets_in, "packets_out": self.packets_out,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "drops": dict(self.drops),
                "pid": os.getpid()}

    def on_welcome(self, link, address, prefix_length, server_address, ipv6_prefix):
        if not self.config.ipv6:
            ipv6_prefix = None
        problem = self.welcome_problem(address, prefix_length) or self.ipv6_problem(ipv6_prefix)
        if problem:
            raise ProtocolError(problem)
        wanted = (ipv4_text(address), prefix_length, ipv6_prefix)
        self.own_address = bytes(address)
        self.network = prefix_of(address, prefix_length)
        self.broadcast = subnet_broadcast(self.network[0], prefix_length)
        host_number = int.from_bytes(address, "big") - int.from_bytes(self.network[0], "big")
        mtu = self.fit_frame_limit()
        if wanted != self.configured or mtu != self.mtu:
            if self.configured and self.configured[:2] != wanted[:2]:
                self.log.warning("the server moved this device from %s/%d to %s/%d" % (self.configured[:2] + wanted[:2]))
            addresses6 = ipv6_addresses(ipv6_prefix, host_number) if ipv6_prefix else ()
            try:
                configure_interface(self.tun.interface, wanted[0], prefix_length, mtu, self.log, addresses6)
            except OSError as error:
                self.fatal(str(error))
                return
            self.configured, self.mtu = wanted, mtu
            self.routed = []            # a new address takes the kernel's routes on the TUN with it
            self.ipv6_prefix = ipv6_prefix
            self.own_addresses6 = addresses6 if mtu >= IPV6_MIN_MTU else ()
        self.failures = 0
        if self.state == "reconnecting":
            self.reconnects += 1
        self.set_state("connected")
        self.server_address = ipv4_text(server_address)
        self.log.info("connected to relay %s as %s/%d%s on %s (device %s); the server is %s"
                      % (link.server_label, wanted[0], prefix_length,
                         " and %s/64" % ip_text(self.own_addresses6[0]) if self.own_addresses6 else "",
                         self.tun.interface, self.config.device_id, ipv4_text(server_address)))
        if self.config.dns == "auto" and self.resolver_set != (self.server_address, self.config.domain):
            self.set_link_dns()
        if self.config.dns == "auto" and self.dnsmasq_set != (self.server_address, self.config.domain):
            self.set_dnsmasq_servers("server=/%s/%s\n" % (self.config.domain, self.server_address))

    def set_link_dns(self):
        """Where systemd-resolved runs: names in the domain go to the relay's DNS over this
        link, and only those (a ~domain is a routing domain, not a search domain)."""
        resolvectl = find_program("resolvectl")
        if resolvectl is None or not os.path.isdir(RESOLVED_DIR):
            return
        commands = ([resolvectl, "dns", self.tun.interface, self.server_address],
                    [resolvectl, "domain", self.tun.interface, "~" + self.config.domain])
        if run_quietly(commands, self.log):
            self.resolver_set = (self.server_address, self.config.domain)
            self.log.info("systemd-resolved sends *.%s to %s on %s" % (self.config.domain, self.server_address,
                                                                    self.tun.interface))

    def set_dnsmasq_servers(self, text):
        """Where a dnsmasq takes dnsmasq_servers as its --servers-file (OpenWrt, or any host
        with dnsmasq: install.sh sets it), names in the domain go to the relay: dnsmasq re-reads
        that file, and only that file, at SIGHUP."""
        path = self.config.dnsmasq_servers
        readers = dnsmasq_readers(path)
        if not readers:
            return
        try:
            # in place, not by rename: OpenWrt's jailed dnsmasq sees this one file, bind-mounted
            with open(path, "w") as sink:
                sink.write(text)
            for pid in readers:
                os.kill(pid, signal.SIGHUP)
        except OSError as error:
            self.log.warning("cannot update %s for dnsmasq: %s" % (path, describe_error(error)))
            return
        self.dnsmasq_set = (self.server_address, self.config.domain) if text else None
        self.log.info("dnsmasq (pid %s) %s" % (", ".join(str(pid) for pid in readers),
                                               "sends *.%s to %s" % self.dnsmasq_set[::-1] if text
                                               else "no longer asks the relay (%s emptied)" % path))

    def revert_link_dns(self):
        if self.resolver_set is not None:
            run_quietly([[find_program("resolvectl") or "resolvectl", "revert", self.tun.interface]], self.log)
            self.resolver_set = None

    def welcome_problem(self, address, prefix_length):
        """Why this client takes no address from this WELCOME, or None. A relay (or whoever
        speaks for it) must not make this device send a whole LAN's traffic into the tunnel."""
        if not MIN_PREFIX_LENGTH <= prefix_length <= MAX_PREFIX_LENGTH:
            return "WELCOME offers a /%d; an MNEDC network is /%d to /%d" % (
                prefix_length, MIN_PREFIX_LENGTH, MAX_PREFIX_LENGTH)
        offered = prefix_of(address, prefix_length)
        host_bits = int.from_bytes(address, "big") & ((1 << (32 - prefix_length)) - 1)
        if host_bits in (0, (1 << (32 - prefix_length)) - 1):
            return "WELCOME offers %s, the network's own or broadcast address" % ipv4_text(address)
        if address[0] in (0, 127) or address[0] >= 224:
            return "WELCOME offers %s, which is no unicast address a network can use" % ipv4_text(address)
        if self.network is not None and offered != self.network:
            return ("the relay moved this device to another network, %s/%d (it was %s/%d): restart the "
                    "client if that is right" % (ipv4_text(offered[0]), offered[1],
                                                 ipv4_text(self.network[0]), self.network[1]))
        if self.network is None:
            for interface, route in routes_other_than(self.tun.interface):
                if networks_overlap(offered, route):
                    return ("WELCOME offers %s/%d, which overlaps %s/%d on %s: refused, so that traffic "
                            "for that network does not go into the tunnel"
                            % (ipv4_text(offered[0]), offered[1], ipv4_text(route[0]), route[1], interface))
        return None

    def ipv6_problem(self, prefix):
        """Why this client takes no IPv6 addresses from this WELCOME's /64, or None: only a
        unique-local one (fc00::/7, never a public prefix), the same on every connection, and
        none that overlaps a route of this host's."""
        if prefix is None:
            return None
        text = "%s/64" % ip_text(bytes(prefix) + bytes(8))
        if prefix[0] & 0xFE != 0xFC:
            return "WELCOME offers the IPv6 network %s, which is not unique-local (fc00::/7): refused" % text
        if self.ipv6_prefix is not None and prefix != self.ipv6_prefix:
            return ("the relay moved this device to another IPv6 network, %s (it was %s/64): restart the "
                    "client if that is right" % (text, ip_text(self.ipv6_prefix + bytes(8))))
        if self.ipv6_prefix is None:
            for interface, route, length in ipv6_routes_other_than(self.tun.interface):
                shorter = min(length, 64)
                if int.from_bytes(route[:8], "big") >> (64 - shorter) == int.from_bytes(prefix, "big") >> (64 - shorter):
                    return ("WELCOME offers the IPv6 network %s, which overlaps %s/%d on %s: refused"
                            % (text, ip_text(route), length, interface))
        return None

    def fit_frame_limit(self):
        """The MTU to use under the server's frame limit. Below 64 KB TSO goes off as well, since
        it hands over segments of 64 KB whatever the MTU; a later server without the limit gets
        it back."""
        limit = self.max_frame_bytes
        if self.tun.offload:
            self.set_tso(limit >= MAX_PAYLOAD_BYTES)
            limit -= VNET_HEADER.size
        if limit >= self.config.mtu:
            return self.config.mtu
        self.log.info("the server takes frames of at most %d bytes: MTU %d" % (self.max_frame_bytes, limit))
        return limit

    def set_tso(self, wanted):
        if wanted == self.tun.tso:
            return
        try:
            set_tun_offload(self.tun.fd, TUN_OFFLOADS if wanted else TUN_F_CSUM)
            self.tun.tso = wanted
        except OSError as error:
            self.log.error("cannot turn TSO %s: %s%s" % ("on" if wanted else "off", describe_error(error),
                           "" if wanted else "; segments larger than the server's frames will be dropped"))

    def on_routes(self, routes):
        """The relay's granted networks: ours to forward to, others' into the TUN (unless
        accept_routes = no, or one overlaps a route of this host's: the relay may not pull a LAN
        of ours into the tunnel)."""
        self.own_networks = []
        for network, length, ours in routes:
            behind = ours and local_route_containing(self.tun.interface, network, length)
            if behind:
                self.own_networks.append((network, length))
            elif ours:
                self.log.warning("not serving %s/%d as its gateway: no LAN of this host's (a route on another "
                                 "interface than %s) holds it" % (ip_text(network), length, self.tun.interface))
        wanted = []
        relay = getattr(self.link, "relay_ip", None)
        for network, length, ours in routes:
            if ours or not self.config.accept_routes:
                continue
            shortest = MIN_ROUTE_V4 if len(network) == 4 else MIN_ROUTE_V6
            clash = local_route_overlapping(self.tun.interface, network, length)
            if length < shortest:
                clash = "it is wider than a /%d" % shortest
            elif relay and len(relay) == len(network) and in_networks(relay, [(network, length)]):
                clash = "it holds the relay's own address %s" % ip_text(relay)
            elif clash:
                clash = "it overlaps " + clash
            if clash:
                self.log.warning("not routing %s/%d into %s: %s" % (ip_text(network), length, self.tun.interface, clash))
                continue
            wanted.append((network, length))
        for network, length in [route for route in self.routed if route not in wanted]:
            run_quietly([ip_route_command("del", network, length, self.tun.interface)], self.log)
        for network, length in [route for route in wanted if route not in self.routed]:
            if run_quietly([ip_route_command("replace", network, length, self.tun.interface)], self.log):
                self.log.info("routing %s/%d into %s (granted to a gateway by the relay)"
                              % (ip_text(network), length, self.tun.interface))
        self.routed = wanted
        self.set_gateway_nat()
        for network, length in self.own_networks:
            switch = "/proc/sys/net/ipv4/ip_forward" if len(network) == 4 else "/proc/sys/net/ipv6/conf/all/forwarding"
            try:
                with open(switch) as source:
                    forwarding = source.read().strip() == "1"
            except OSError:
                forwarding = False
            self.log.info("this device is the gateway for %s/%d%s" % (
                ip_text(network), length, "" if forwarding else ": turn forwarding on (sysctl -w %s=1) so that it "
                "passes the traffic on" % switch[len("/proc/sys/"):].replace("/", ".")))

    def set_gateway_nat(self):
        """gateway_nat = yes: what comes from the virtual network into our granted IPv4 LANs
        leaves with this device's LAN address (iptables MASQUERADE), so LAN hosts answer
        without a route back. Each rule carries a comment naming us; stale ones go."""
        wanted = []
        if self.config.gateway_nat and self.network:
            source = "%s/%d" % (ipv4_text(self.network[0]), self.network[1])
            wanted = [["-s", source, "-d", "%s/%d" % (ipv4_text(network), length), "-j", "MASQUERADE",
                       "-m", "comment", "--comment", "mnedc %s" % self.tun.interface]
                      for network, length in self.own_networks if len(network) == 4]
        iptables = find_program("iptables") or "iptables"
        for rule in [rule for rule in self.masqueraded if rule not in wanted]:
            run_quietly([[iptables, "-t", "nat", "-D", "POSTROUTING"] + rule], self.log)
        for rule in [rule for rule in wanted if rule not in self.masqueraded]:
            import subprocess
            try:                        # there already: left by a client that was killed
                there = subprocess.run([iptables, "-t", "nat", "-C", "POSTROUTING"] + rule, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       timeout=RESOLVECTL_TIMEOUT_S).returncode == 0
            except (OSError, subprocess.SubprocessError):
                there = False
            if there or run_quietly([[iptables, "-t", "nat", "-A", "POSTROUTING"] + rule], self.log):
                self.log.info("masquerading %s onto %s (gateway_nat)" % (rule[1], rule[3]))
            else:
                wanted.remove(rule)
        self.masqueraded = wanted

    def on_frame(self, frame_type, payload):
        if frame_type == FRAME_ROUTES:
            self.on_routes(decode_routes(payload))
            return
        if frame_type not in (FRAME_PACKET, FRAME_VNET_PACKET):
            raise ProtocolError("%s is not for a TUN member" % FRAME_NAMES.get(frame_type, frame_type))
        offloaded = frame_type == FRAME_VNET_PACKET
        problem = ip_problem(payload, VNET_HEADER.size if offloaded else 0)
        if problem:
            raise ProtocolError(problem)
        problem = offloaded and offload_problem(payload) or \
            self.foreign_packet(payload, VNET_HEADER.size if offloaded else 0)
        if problem:
            self.count_drop(problem)
            return
        self.packets_in += 1
        self.bytes_in += len(payload)
        self.tun.send_packet(frame_type, payload)

    def foreign_packet(self, payload, offset):
        """Why a packet from the relay must not reach this host, or None: only packets to this
        device (or to everyone: a broadcast or a group) from inside the virtual network go to the
        TUN, whatever the relay says."""
        if payload[offset] >> 4 == 6:
            return self.foreign_packet6(payload, offset)
        destination = payload[offset + IPV4_DESTINATION_AT:offset + IPV4_DESTINATION_AT + 4]
        if destination != self.own_address and destination != self.broadcast and \
                destination != LIMITED_BROADCAST and not is_ipv4_multicast(destination) and \
                not in_networks(destination, self.own_networks):
            return "not addressed to this device"
        source = payload[offset + IPV4_SOURCE_AT:offset + IPV4_SOURCE_AT + 4]
        if prefix_of(source, self.network[1]) != self.network and not in_networks(source, self.routed):
            return "source outside the virtual network"
        return None

    def foreign_packet6(self, payload, offset):
        """foreign_packet for IPv6: to one of our two addresses or a group, from the network's
        /64 or a link-local address (the relay lets each member use only its own)."""
        source, destination = ip_addresses(payload, offset)
        if destination not in self.own_addresses6 and (destination[0] != 0xFF or not self.own_addresses6) and \
                not in_networks(destination, self.own_networks):
            return "not addressed to this device"
        if source[:8] != self.ipv6_prefix and source[:8] != LINK_LOCAL_PREFIX and not in_networks(source, self.routed):
            return "source outside the virtual network"
        return None

    def forward_from_tun(self, frame_type, packet):
        """Send one packet the kernel routed into the TUN; False asks the TUN to pause."""
        problem = ip_problem(packet, VNET_HEADER.size if frame_type == FRAME_VNET_PACKET else 0)
        if problem or len(packet) > self.max_frame_bytes:
            self.count_drop(problem or "larger than a frame")
            return True
        link = self.established_link()
        if link is None:
            self.count_drop("no relay connection")
            return True
        self.packets_out += 1
        self.bytes_out += len(packet)
        return link.send_packet(frame_type, packet)

    def count_drop(self, reason):
        self.drops[reason] = self.drops.get(reason, 0) + 1
        self.log.limited(("drop", reason), "debug", "dropped a packet: %s" % reason)

    def on_link_lost(self, reason):
        self.tun.resume()

    def on_link_drained(self):
        self.tun.resume()

    def release(self, reason):
        if self.control is not None:
            self.control.close(reason)
        if self.tun is not None:
            self.revert_link_dns()
            self.own_networks = []
            self.set_gateway_nat()              # our iptables rules go with us
            if self.dnsmasq_set is not None:
                self.set_dnsmasq_servers("")
            self.tun.close(reason)


class StreamClient(RelayClient):
    """Stream mode: `listen`, `connect` and `services`, with no TUN and no root.

    listen offers a virtual port (and maybe a service name) and joins each arriving stream to
    127.0.0.1:forward, or to stdin/stdout; connect opens streams to a peer's port, from local
    TCP connections on 127.0.0.1:forward, or from stdin/stdout.
    """

    hello_flags = HELLO_STREAMS

    def __init__(self, config, log, command, port=0, peer=None, forward=None, once=False,
                 service="", as_json=False):
        RelayClient.__init__(self, config, log)
        self.command = command
        self.port = port
        self.peer = peer
        self.forward = forward
        self.once = once or forward is None     # stdin/stdout carries one stream only
        self.service = service
        self.as_json = as_json
        self.streams = {}
        self.next_stream_id = 1
        self.served = 0                 # streams that have started
        self.pending_locals = []        # (socket, deadline) waiting for the relay
        self.local_listener = None
        self.stdio_flags = {}
        self.listen_retry = None        # a timer to ask for a port that was taken
        # one-shot commands fail rather than wait for a relay that is not there
        self.retry_forever = command == "listen" or (command == "connect" and forward is not None)

    def start(self):
        if self.command in ("listen", "connect") and self.forward is None:
            for fd in (0, 1):           # restored in release(): the shell shares these
                if _pollable(fd):
                    self.stdio_flags[fd] = os.get_blocking(fd)
                    os.set_blocking(fd, False)
        if self.command == "connect" and self.forward is not None:
            self.local_listener = LocalListener(self, self._bind_local(self.forward))
            self.loop.set_interest(self.local_listener, selectors.EVENT_READ)
            self.log.info("listening on 127.0.0.1:%d for connections to %s port %s"
                          % (self.local_listener.sock.getsockname()[1], self.peer, self.port or "(service)"))
        self.start_link()

    def _bind_local(self, port):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as error:
            sock.close()
            raise OSError(error.errno, "cannot listen on 127.0.0.1:%d: %s" % (port, describe_error(error)))
        sock.listen(16)
        sock.setblocking(False)
        return sock

    # -- the relay link --

    def on_welcome(self, link, address, prefix_length, server_address, ipv6_prefix):
        if self.command != "listen":
            self.failures = 0           # listen: only once its port is confirmed (LISTENING)
        self.log.debug("stream session with relay %s" % link.server_label)
        if self.command in ("services", "hosts"):
            self.send_frame(FRAME_SERVICES, b"")
        elif self.command == "listen":
            self.cancel_listen_retry()
            self.ask_to_listen()
        elif self.forward is None:
            self.open_stream(stdio=(0, 1))
        else:
            for sock, _ in self.pending_locals:
                self.open_stream(sock=sock)
            self.pending_locals = []

    def on_frame(self, frame_type, payload):
        handler = STREAM_CLIENT_HANDLERS.get(frame_type)
        if handler is None:
            raise ProtocolError("%s is not for a stream session" % FRAME_NAMES.get(frame_type, frame_type))
        handler(self, payload)

    def on_listening(self, payload):
        self.failures = 0
        port, service = decode_listen(payload)
        self.log.info("listening on virtual port %d%s of device %s" % (
            port, " as service %s" % service if service else "", self.config.device_id))

    def on_listen_refused(self, payload):
        """The relay refused our LISTEN (the session goes on): a port that another session of
        this device holds may be a stale one, so ask again; a name that is not ours is final."""
        port, code, text = decode_listen_refused(payload)
        what = "virtual port %d%s" % (port, " as service %s" % self.service if self.service else "")
        if code == ERROR_PORT_TAKEN:
            self.log.warning("the relay refused %s: %s: %s; asking again in %d s"
                             % (what, ERROR_NAMES[code], text, LISTEN_RETRY_S))
            self.cancel_listen_retry()
            self.listen_retry = self.loop.call_later(LISTEN_RETRY_S, self.ask_to_listen)
            return
        self.fatal("the relay refused %s: %s: %s" % (what, ERROR_NAMES.get(code, "error %d" % code), text))

    def ask_to_listen(self):
        self.listen_retry = None
        self.send_frame(FRAME_LISTEN, encode_listen(self.port, self.service))

    def cancel_listen_retry(self):
        if self.listen_retry is not None:
            self.listen_retry.cancel()
            self.listen_retry = None

    def on_service_list(self, payload):
        import json
        try:
            listing = json.loads(payload.decode("utf-8"))
        except ValueError as error:
            raise ProtocolError("SERVICE_LIST is not JSON: %s" % error)
        if self.command == "hosts":
            sys.stdout.write(format_hosts(listing, self.config.domain))
        else:
            sys.stdout.write(json.dumps(listing, indent=1, sort_keys=True) + "\n" if self.as_json
                             else format_services(listing))
        sys.stdout.flush()
        self.stop("done", linger=True)

    def on_link_lost(self, reason):
        self.cancel_listen_retry()
        for stream in list(self.streams.values()):
            stream.on_reset(RESET_RELAY_LOST, reason)

    # -- streams --

    def open_stream(self, sock=None, stdio=None):
        stream_id = self.next_stream_id
        self.next_stream_id += 2
        stream = Stream(self, stream_id, "%s:%s" % (self.peer, self.port or "service"), sock=sock, stdio=stdio)
        stream.opened_by_us, stream.opened_at = True, time.monotonic()
        self.streams[stream_id] = stream
        self.send_frame(FRAME_OPEN, encode_open(stream_id, self.port, STREAM_WINDOW_BYTES, self.peer))

    def on_open(self, payload):
        stream_id, port, window, caller = decode_open(payload)
        if stream_id in self.streams:
            raise ProtocolError("OPEN for stream %d, which is open already" % stream_id)
        if self.once and self.served:
            self.send_frame(FRAME_RESET, encode_reset(stream_id, RESET_REFUSED, "busy with another stream"))
            return
        self.served += 1
        try:
            self.start_serving(stream_id, window, caller)
        except OSError as error:        # e.g. out of fds: refuse this stream, keep the link
            self.log.info("Connection with %s closed suddenly: %s" % (caller, describe_error(error)))
            self.streams.pop(stream_id, None)
            self.send_frame(FRAME_RESET, encode_reset(stream_id, RESET_LIMIT, "%s on %s" % (
                describe_error(error), self.config.device_id)))

    def start_serving(self, stream_id, window, caller):
        if self.forward is None:
            stream = Stream(self, stream_id, caller, stdio=(0, 1))
            self.streams[stream_id] = stream
            self.accept_stream(stream, window)
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        failure = sock.connect_ex(("127.0.0.1", self.forward))
        stream = Stream(self, stream_id, caller, sock=sock)
        self.streams[stream_id] = stream
        if failure == 0:
            self.accept_stream(stream, window)
        elif failure in (errno.EINPROGRESS, errno.EAGAIN):
            stream.writer.on_writable = lambda: self.on_forward_connected(stream, window)
            stream.writer.want(writing=True)
        else:
            self.refuse_stream(stream, failure)

    def on_forward_connected(self, stream, window):
        stream.writer.on_writable = stream.on_local_writable
        stream.writer.want(writing=False)
        failure = stream.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if failure:
            self.refuse_stream(stream, failure)
        else:
            self.accept_stream(stream, window)

    def accept_stream(self, stream, window):
        self.send_frame(FRAME_ACCEPT, encode_accept(stream.stream_id, STREAM_WINDOW_BYTES))
        self.log.info("Connection with %s accepted" % stream.peer)
        stream.start(window)

    def refuse_stream(self, stream, failure):
        text = "%s by 127.0.0.1:%d on %s" % (os.strerror(failure).lower(), self.forward, self.config.device_id)
        self.send_frame(FRAME_RESET, encode_reset(stream.stream_id, RESET_REFUSED, text))
        stream.end(False, "closed suddenly: %s" % text)

    def on_accept(self, payload):
        stream_id, window, answered_by = decode_accept(payload)
        stream = self.streams.get(stream_id)
        if stream is not None and not stream.started:
            self.log.info("Connection with %s established%s" % (
                stream.peer, ", answered by %s" % answered_by if answered_by else ""))
            stream.start(window)

    def on_data(self, payload):
        stream_id, data = decode_data(payload)
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.on_data(data)

    def on_window(self, payload):
        stream_id, increment = decode_window(payload)
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.on_window(increment)

    def on_eof(self, payload):
        stream = self.streams.get(decode_eof(payload))
        if stream is not None:
            stream.on_eof()

    def on_reset(self, payload):
        stream_id, code, text = decode_reset(payload)
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.on_reset(code, text)

    def on_stream_end(self, stream, graceful):
        self.streams.pop(stream.stream_id, None)
        if not graceful:
            self.exit_code = 1
        if self.once and not self.streams:
            self.stop("the stream ended", linger=True)

    def on_local_connection(self, sock):
        if self.once and self.served:
            sock.close()
            return
        self.served += 1
        if self.established_link() is not None:
            self.open_stream(sock=sock)
            return
        self.pending_locals.append((sock, time.monotonic() + PENDING_LOCAL_S))
        if self.link is None:
            self.connect_now()          # someone is waiting: do not sit out the backoff

    def tick(self):
        RelayClient.tick(self)
        now = time.monotonic()
        for sock, deadline in [p for p in self.pending_locals if p[1] < now]:
            self.log.info("Connection with %s:%s closed suddenly: no relay connection within %d s"
                          % (self.peer, self.port or "service", PENDING_LOCAL_S))
            abort_socket(sock)
            self.pending_locals.remove((sock, deadline))
        for stream in [s for s in self.streams.values() if not s.started and s.opened_by_us
                       and now - s.opened_at > OPEN_TIMEOUT_S]:
            self.send_frame(FRAME_RESET, encode_reset(stream.stream_id, RESET_ABORTED, "no answer"))
            stream.end(False, "closed suddenly: the peer did not answer within %d s" % OPEN_TIMEOUT_S)

    def release(self, reason):
        for stream in list(self.streams.values()):
            stream.fail(reason)
        for sock, _ in self.pending_locals:
            sock.close()
        if self.local_listener is not None:
            self.local_listener.close(reason)
        for fd, blocking in self.stdio_flags.items():
            try:
                os.set_blocking(fd, blocking)
            except OSError:
                pass                    # already closed: stdout after the far end's EOF


STREAM_CLIENT_HANDLERS = {
    FRAME_LISTENING: StreamClient.on_listening, FRAME_OPEN: StreamClient.on_open,
    FRAME_ACCEPT: StreamClient.on_accept, FRAME_DATA: StreamClient.on_data,
    FRAME_WINDOW: StreamClient.on_window, FRAME_EOF: StreamClient.on_eof,
    FRAME_RESET: StreamClient.on_reset, FRAME_SERVICE_LIST: StreamClient.on_service_list,
    FRAME_LISTEN_REFUSED: StreamClient.on_listen_refused,
}


def dnsmasq_readers(path, proc="/proc"):
    """PIDs of the dnsmasq processes whose command line or configuration files name path:
    those that take it as their servers file. Their files: -C/--conf-file (else
    /etc/dnsmasq.conf), the directories of -7/--conf-dir (Debian: /etc/dnsmasq.d), and the
    conf-file and conf-dir lines in those."""
    readers = []
    try:
        pids = [name for name in os.listdir(proc) if name.isdigit()]
    except OSError:
        return readers
    for pid in pids:
        try:
            with open(os.path.join(proc, pid, "comm")) as source:
                if source.read().strip() != "dnsmasq":
                    continue
            with open(os.path.join(proc, pid, "cmdline"), "rb") as source:
                words = source.read().decode("utf-8", "replace").split("\0")
        except OSError:
            continue
        options = option_values(words, ("-C", "--conf-file"))
        files = options or ["/etc/dnsmasq.conf"]
        files += conf_dir_files(option_values(words, ("-7", "--conf-dir")))
        if any(path in word for word in words) or any(mentions(name, path) for name in files):
            readers.append(int(pid))
    return readers


def option_values(words, names):
    """The values of a command line's options called names ("-C X", "-CX", "--conf-file=X")."""
    values = []
    for before, word in zip([""] + words, words):
        for name in names:
            if before == name:
                values.append(word)
            elif word.startswith(name + "=") or (len(name) == 2 and word.startswith(name) and len(word) > 2):
                values.append(word[len(name) + (1 if word.startswith(name + "=") else 0):])
    return values


def conf_dir_files(specs):
    """The files a dnsmasq conf-dir takes: "DIR[,.ext-to-skip ...][,*.ext-to-take ...]"."""
    files = []
    for spec in specs:
        directory, *filters = spec.split(",")
        take = [pattern[1:] for pattern in filters if pattern.startswith("*")]
        skip = [pattern for pattern in filters if not pattern.startswith("*")]
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        files += [os.path.join(directory, name) for name in names
                  if not name.startswith(".") and not name.endswith("~") and not any(name.endswith(s) for s in skip)
                  and (not take or any(name.endswith(t) for t in take))][:64]
    return files


def mentions(config, text):
    """Whether the file config (its first 64 KB), or a conf-file or conf-dir it names, mentions text."""
    try:
        with open(config, errors="replace") as source:
            content = source.read(65536)
    except OSError:
        return False
    if text in content:
        return True
    lines = [line.strip() for line in content.splitlines()]
    nested = [line.split("=", 1)[1] for line in lines if line.startswith("conf-file=")]
    nested += conf_dir_files([line.split("=", 1)[1] for line in lines if line.startswith("conf-dir=")])
    for name in nested[:64]:
        try:
            with open(name, errors="replace") as source:
                if text in source.read(65536):
                    return True
        except OSError:
            pass
    return False


def run_quietly(commands, log):
    """Run each command, bounded in time; False (logged) at the first that fails."""
    import subprocess
    for command in commands:
        try:
            subprocess.run(command, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, timeout=RESOLVECTL_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", None)
            log.warning("%s failed: %s" % (" ".join(command), (detail or b"").decode("utf-8", "replace").strip()
                                           or describe_error(error) if isinstance(error, OSError) else str(error)))
            return False
    return True


def prefix_of(address, prefix_length):
    """(packed network, prefix length) of a packed IPv4 address."""
    mask = (0xFFFFFFFF << (32 - prefix_length)) & 0xFFFFFFFF
    return (int.from_bytes(address, "big") & mask).to_bytes(4, "big"), prefix_length


def networks_overlap(one, other):
    shorter = min(one[1], other[1])
    return prefix_of(one[0], shorter) == prefix_of(other[0], shorter)


def routes_other_than(interface, path=ROUTES_FILE, byteorder=sys.byteorder):
    """[(interface, (packed network, prefix length))] of this host's IPv4 routes but the default
    ones and those on interface, from /proc/net/route, which prints each address in the host's
    byte order (reversed on x86 and ARM, as it is on big-endian MIPS)."""
    try:
        with open(path) as source:
            rows = [line.split() for line in source.read().splitlines()[1:]]
    except OSError:
        return []
    routes = []
    for row in rows:
        if len(row) < 8 or row[0] == interface:
            continue
        network, mask = (int(field, 16).to_bytes(4, byteorder) for field in (row[1], row[7]))
        prefix_length = bin(int.from_bytes(mask, "big")).count("1")
        if prefix_length:
            routes.append((row[0], (network, prefix_length)))
    return routes


def in_networks(address, networks):
    """Whether the packed address lies in one of [(packed network, prefix length)]."""
    if not networks:
        return False
    number, bits = int.from_bytes(address, "big"), len(address) * 8
    return any(len(network) * 8 == bits and number >> (bits - length) == int.from_bytes(network, "big") >> (bits - length)
               for network, length in networks)


def local_route_containing(interface, network, length):
    """A route of this host's on another interface than ours that holds all of network/length
    (the LAN a gateway serves), as text, or None. Default routes do not count."""
    if len(network) == 4:
        for other, route in routes_other_than(interface):
            if route[1] <= length and networks_overlap((network, length), route):
                return "%s/%d on %s" % (ipv4_text(route[0]), route[1], other)
        return None
    for other, route, route_length in ipv6_routes_other_than(interface, unique_local_only=False):
        if route_length <= length and in_networks(network, [(route, route_length)]):
            return "%s/%d on %s" % (ip_text(route), route_length, other)
    return None


def local_route_overlapping(interface, network, length):
    """A description of a route of this host's (on another interface than ours) that overlaps
    the packed network/length, or None. IPv4: every route but the default ones; IPv6: the
    unique-local ones and any other the network falls in."""
    if len(network) == 4:
        for other, route in routes_other_than(interface):
            if networks_overlap((network, length), route):
                return "%s/%d on %s" % (ipv4_text(route[0]), route[1], other)
        return None
    for other, route, route_length in ipv6_routes_other_than(interface):
        if in_networks(route, [(network, length)]) or in_networks(network, [(route, route_length)]):
            return "%s/%d on %s" % (ip_text(route), route_length, other)
    return None


def ip_route_command(verb, network, length, interface):
    return [find_program("ip") or "/sbin/ip"] + (["-6"] if len(network) == 16 else []) + [
        "route", verb, "%s/%d" % (ip_text(network), length), "dev", interface]


def ipv6_routes_other_than(interface, path=IPV6_ROUTES_FILE, unique_local_only=True):
    """[(interface, packed network, prefix length)] of this host's unique-local IPv6 routes
    (fc00::/7; all but the default and link-local ones with unique_local_only False) on other
    interfaces, from /proc/net/ipv6_route."""
    try:
        with open(path) as source:
            rows = [line.split() for line in source]
    except OSError:
        return []
    routes = []
    for row in rows:
        if len(row) >= 10 and row[9] != interface and row[9] != "lo":
            network, length = bytes.fromhex(row[0]), int(row[1], 16)
            if length and (network[0] & 0xFE == 0xFC or not unique_local_only and network[:2] != b"\xfe\x80"
                           and network[0] != 0xFF):
                routes.append((row[9], network, length))
    return routes


def format_hosts(listing, domain):
    """/etc/hosts lines for every device with a virtual address: "ADDRESS ID.DOMAIN ID"."""
    domain = listing.get("relay", {}).get("domain") or domain
    rows = ["# MNEDC devices (mnedc_client.py hosts)%s" % (": more than fit in one listing, some are missing"
                                                            if listing.get("truncated") else "")]
    for device in sorted(listing.get("devices", []), key=lambda device: device["device_id"]):
        if device["address"]:
            rows.append("%-15s %s.%s %s" % (device["address"], device["device_id"], domain, device["device_id"]))
    return "\n".join(rows) + "\n"


def format_services(listing):
    """The `services` table for people."""
    rows = ["%-20s %-24s %-15s %s" % ("SERVICE", "DEVICE", "ADDRESS", "PORT")]
    for service in listing.get("services", []):
        rows.append("%-20s %-24s %-15s %d" % (service["name"], service["device_id"], service["address"] or "-",
                                              service["port"]))
    rows += ["", "%-44s %-15s %s" % ("DEVICE", "ADDRESS", "STATE")]
    for device in listing.get("devices", []):
        ways = (["tun"] if device["tun"] else []) + (
            ["%d stream session(s)" % device["stream_sessions"]] if device["stream_sessions"] else [])
        state = "online (%s)" % ", ".join(ways) if device["online"] else "offline"
        rows.append("%-44s %-15s %s" % (device["device_id"], device["address"] or "-", state))
    return "\n".join(rows) + "\n"


# ==== BEGIN MNEDC RUNTIME ====
# The log, the event loop and the TUN glue. Byte-identical in both scripts, like the wire
# protocol block, because each script is copied alone onto a board. Modules that only some runs
# need (json, syslog, traceback, subprocess) are imported where they are used: each costs
# a board 0.3 to 2.6 MB of RSS. Not shutil at all: find_program does its which().

LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
SYSLOG_PRIORITIES = {"debug": "LOG_DEBUG", "info": "LOG_INFO", "warning": "LOG_WARNING", "error": "LOG_ERR"}
LOG_REPEAT_WINDOW_S = 60.0
LOG_BACKLOG_BYTES = 32 * 1024   # lines held while the log's reader is slow; past it, dropped and counted
PIPE_BUF = 4096                 # a write this small to a pipe that polls writable never blocks
HEARTBEAT_S = 5                 # the watchdog takes an older heartbeat file for a hung loop
CONTROL_TIMEOUT_S = 5


class Log:
    """Timestamped lines on stderr, or syslog; limited() keeps a flapping peer from flooding a
    board's flash or its small log ring buffer.

    A write to stderr never blocks: a pipe whose reader is stuck would freeze the event loop.
    Lines wait in a bounded backlog, written as the descriptor takes them (here and at each
    flush()); past the bound they are dropped, and a line says how many."""

    def __init__(self, level="info", stream=None, syslog_ident=None):
        self.threshold = LOG_LEVELS[level]
        self.stream = stream or sys.stderr
        self.to_syslog = None
        if syslog_ident:
            import syslog
            syslog.openlog(syslog_ident, syslog.LOG_PID, syslog.LOG_DAEMON)
            self.to_syslog = syslog
        self._windows = {}          # key -> [window start, lines held back, last one, level, written, summary]
        self.backlog, self.dropped = bytearray(), 0
        try:
            self.fd = self.stream.fileno()
        except (AttributeError, ValueError, OSError):
            self.fd = None          # a stream with no descriptor (a test's StringIO): written as is

    def set_level(self, level):
        self.threshold = LOG_LEVELS[level]

    def to_terminal(self):
        """Whether the lines go to a person's terminal, not to a file or syslog that keeps them."""
        try:
            return self.to_syslog is None and self.stream.isatty()
        except (AttributeError, ValueError):
            return False

    def write(self, level, message):
        if LOG_LEVELS[level] < self.threshold:
            return
        if self.to_syslog:
            for line in message.splitlines() or [""]:
                self.to_syslog.syslog(getattr(self.to_syslog, SYSLOG_PRIORITIES[level]), line)
            return
        line = "%s %s %s\n" % (time.strftime("%Y-%m-%d %H:%M:%S"), level.upper(), message)
        if self.fd is None:
            try:
                self.stream.write(line)
                self.stream.flush()
            except (OSError, ValueError):
                pass                # a closed stderr must not take the relay down
            return
        if len(self.backlog) + len(line) > LOG_BACKLOG_BYTES:
            self.dropped += 1
        else:
            self.backlog += line.encode("utf-8", "replace")
        self.drain()

    def drain(self):
        """Write the backlog as far as the descriptor takes it without blocking."""
        for _ in range(LOG_BACKLOG_BYTES // PIPE_BUF + 2):
            if self.dropped and len(self.backlog) < LOG_BACKLOG_BYTES // 2:
                self.backlog += ("%s WARNING %d log lines dropped: whatever reads this log did not keep "
                                 "up\n" % (time.strftime("%Y-%m-%d %H:%M:%S"), self.dropped)).encode()
                self.dropped = 0
            if not self.backlog:
                return
            try:
                if not select.select([], [self.fd], [], 0)[1]:
                    return
                written = os.write(self.fd, self.backlog[:PIPE_BUF])
            except (BlockingIOError, InterruptedError):
                return
            except (OSError, ValueError):
                self.backlog = bytearray()      # a closed stderr must not take the relay down
                return
            del self.backlog[:written]

    def debug(self, message):
        self.write("debug", message)

    def info(self, message):
        self.write("info", message)

    def warning(self, message):
        self.write("warning", message)

    def error(self, message):
        self.write("error", message)

    def limited(self, key, level, message, burst=1, summary=None, write=True):
        """Log message, but at most burst lines per window per key; flush() reports what was
        held back, after the last such message or, given a summary ("joins and leaves"), as a
        count of those. True if it was written (write=False: if it may be, by another key)."""
        now = time.monotonic()
        window = self._windows.get(key)
        if window is not None and now - window[0] < LOG_REPEAT_WINDOW_S:
            if window[4] >= burst:
                window[1] += 1
                window[2] = message
                return False
            window[4] += 1
        else:
            self._windows.pop(key, None)    # a new window goes last: the table stays in start order
            self._windows[key] = [now, 0, message, level, 1, summary]
        if write:
            self.write(level, message)
        return True

    def flush(self):
        """Call now and then: '... (532 more in the last 60 s)' for each window that ended, and
        what the log's reader could not take yet."""
        self.drain()
        now = time.monotonic()
        while self._windows:                # oldest first: only the windows that ended are touched
            key = next(iter(self._windows))
            start, held, message, level, _, summary = self._windows[key]
            if now - start < LOG_REPEAT_WINDOW_S:
                break
            del self._windows[key]          # forget quiet keys: the table stays small
            if held:
                self.write(level, "%d more %s in the last %d s, not logged one by one" % (held, summary, now - start)
                           if summary else "%s (%d more in the last %d s)" % (message, held, now - start))
                self._windows[key] = [now, 0, message, level, 0, summary]


class Timer:
    """A callback due at a monotonic deadline; cancel() is safe at any time."""

    def __init__(self, deadline, callback):
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self):
        self.cancelled = True
        self.callback = None        # what it would have called (a closed connection) can go now


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
        self._timers = []           # (deadline, sequence, Timer)
        self._timer_count = 0
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
        self._timer_count += 1      # heap entries are tuples: compared in C, not by a method
        heapq.heappush(self._timers, (timer.deadline, self._timer_count, timer))
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
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if not self._timers:
            return None
        return max(0.0, self._timers[0][0] - time.monotonic())

    def _run_due_timers(self):
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            timer = heapq.heappop(self._timers)[2]
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
            import traceback
            self.log.error("internal error in %r:\n%s" % (handler or function, traceback.format_exc()))
            if handler is not None:
                handler.close("internal error")


def check_shared_directory(path):
    """OSError unless path's directory is safe for root to write path in: writable by others
    only with the sticky bit (as /tmp), which keeps them from replacing what root made."""
    if os.geteuid() != 0:
        return                          # a user's own daemon risks only that user's files
    directory = os.path.dirname(os.path.abspath(path))
    mode = os.stat(directory).st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
        raise OSError("refusing to write %s: its directory %s is writable by others (mode %o) "
                      "without the sticky bit" % (path, directory, mode & 0o7777))


class DaemonFiles:
    """The pidfile and the heartbeat file that the init scripts and the cron watchdog read.

    The heartbeat is touched from the event loop itself, so a hung loop shows as a stale file,
    which a plain "is the process there" check never catches.
    """

    def __init__(self, pidfile, heartbeat):
        self.pidfile = pidfile
        self.heartbeat = heartbeat

    def start(self, loop):
        """Write the pidfile and start beating; OSError if a file cannot be written. Both are
        written as root into directories others may share: no symlink is followed (one planted
        at the pidfile's temporary name would have had root truncate its target), and a
        directory others can write without the sticky bit is refused."""
        for path in filter(None, (self.pidfile, self.heartbeat)):
            check_shared_directory(path)
        if self.pidfile:
            temporary = self.pidfile + ".tmp"
            try:
                os.unlink(temporary)        # a stale one, or a planted link: gone, not followed
            except FileNotFoundError:
                pass
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(descriptor, "w") as sink:
                sink.write("%d\n" % os.getpid())
            os.replace(temporary, self.pidfile)
        if self.heartbeat:
            self.beat()
            loop.call_every(HEARTBEAT_S, self.beat)

    def beat(self):
        """Touch the heartbeat; O_NONBLOCK, so that a FIFO planted at its name cannot hold the loop."""
        descriptor = os.open(self.heartbeat, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        try:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                raise OSError("refusing to use %s as the heartbeat: not a regular file" % self.heartbeat)
            os.utime(descriptor)
        finally:
            os.close(descriptor)

    def remove(self):
        """Remove both files, the pidfile only while it still names this process."""
        try:
            with open(self.pidfile or "") as source:
                if source.read().strip() == str(os.getpid()):
                    os.unlink(self.pidfile)
        except (OSError, ValueError):
            pass
        try:
            if self.heartbeat:
                os.unlink(self.heartbeat)
        except OSError:
            pass


class ControlListener:
    """A Unix socket only root can use, for `status` and `kick`: one JSON request per connection.

    handler(request dict) returns the reply dict; the loop serves it like any other socket.
    """

    def __init__(self, loop, path, handler, log):
        self.loop = loop
        self.path = path
        self.handler = handler
        self.log = log
        self.sock = bind_control_socket(path)

    def fileno(self):
        return self.sock.fileno()

    def __repr__(self):
        return "ControlListener(%s)" % self.path

    def on_readable(self):
        try:
            sock, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        self.loop.set_interest(ControlConnection(self, sock), selectors.EVENT_READ)

    def on_writable(self):
        pass

    def close(self, reason):
        self.loop.forget(self)
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def bind_control_socket(path):
    """A listening Unix socket at path, mode 0600; OSError if another daemon answers there."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, 0o700)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            raise OSError(errno.EADDRINUSE, "another daemon answers on %s" % path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)                 # left behind by a crash
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)             # no window in which others could connect
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    sock.listen(8)
    sock.setblocking(False)
    return sock


class ControlConnection:
    """One control request: read a JSON line, answer with a JSON line, close."""

    def __init__(self, listener, sock):
        self.listener = listener
        self.sock = sock
        self.inbox = bytearray()
        self.out = b""

    def fileno(self):
        return self.sock.fileno()

    def on_readable(self):
        data = self.sock.recv(4096)
        self.inbox += data
        if data and b"\n" not in self.inbox and len(self.inbox) < 4096:
            return
        import json
        try:
            request = json.loads(self.inbox.decode("utf-8"))
            if not isinstance(request, dict):
                raise ValueError("not an object")
            reply = self.listener.handler(request)
        except ValueError as error:
            reply = {"error": "bad request: %s" % error}
        self.out = json.dumps(reply, sort_keys=True).encode("utf-8") + b"\n"
        self.listener.loop.set_interest(self, selectors.EVENT_WRITE)

    def on_writable(self):
        sent = self.sock.send(self.out)
        self.out = self.out[sent:]
        if not self.out:
            self.close("answered")

    def close(self, reason):
        self.listener.loop.forget(self)
        self.sock.close()


def control_request(path, request, timeout_s=CONTROL_TIMEOUT_S):
    """Ask the daemon listening on path; its reply dict. OSError when nobody answers."""
    import json
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode("utf-8") + b"\n")
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    try:
        return json.loads(b"".join(chunks).decode("utf-8"))
    except ValueError:
        raise OSError(errno.EPROTO, "the daemon on %s gave no valid answer" % path)


# --check: what the daemon will import, checked before install.sh starts it. OpenWrt splits
# these out of python3-light (../shared/PLATFORMS.md); Debian's python3-minimal lacks several,
# which its python3 package brings.
RUN_MODULES = ("json", "syslog", "traceback", "subprocess", "threading")
OPKG_PACKAGES = {"ssl": "python3-openssl", "logging": "python3-logging", "unicodedata": "python3-codecs"}


def missing_modules(names):
    """The names of names that this Python cannot import."""
    missing = []
    for name in names:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    return missing


def install_hint(modules):
    packages = sorted(set(OPKG_PACKAGES.get(name, "python3-light") for name in modules))
    return "OpenWrt: opkg install %s; Debian: apt-get install python3" % " ".join(packages)


# TLS (the default; tls = no goes without): the stdlib ssl module, imported only then, since OpenWrt ships it
# apart (python3-openssl) and it costs a board some 4 MB.

def load_ssl():
    """The ssl module, or ValueError saying why tls = yes cannot work here."""
    try:
        import ssl
    except ImportError:
        raise ValueError("TLS (tls = yes, the default) needs Python's ssl module, which this Python "
                         "lacks: on OpenWrt run opkg install python3-openssl; or set tls = no on both "
                         "ends, for plaintext")
    return ssl


def tls_context(server_side, cert=None, key=None, ca=None):
    """A TLS 1.2+ context. Server: its cert and key; ca set means client certs are required.
    Client: ca verifies the server, else its pin does (pin_problem); cert and key for mutual TLS."""
    ssl = load_ssl()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)  # a send never waits for a read
    if not server_side and not ca:      # the client checks the server's pin after the handshake
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        if cert:
            context.load_cert_chain(cert, key)
        if ca:
            context.load_verify_locations(ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except ssl.SSLError as error:
        raise ValueError("%s (check the certificate, key and CA files)" % describe_error(error))
    return context


class TlsTransport:
    """A non-blocking TLS socket that the connection classes use like a plain one.

    handshake() advances the handshake; SSLWantRead/WantWrite come out as BlockingIOError;
    sendmsg joins its buffers, as TLS has no scatter write; recv_into reads on while records
    come full (bulk traffic), and stops after a short one that leaves OpenSSL holding nothing:
    the read after it would only meet SSLWantRead, and that exception costs more than the
    record (one 100-byte record written and read after 20 ms idle: 185 us with that read, 142
    without). More records in
    the kernel's buffer wake select() again; what OpenSSL holds, select() cannot see, hence
    tls_pending().
    """

    BULK_RECORD_BYTES = 8192        # a record this long was cut from a longer write: read on

    def __init__(self, context, sock, server_hostname=None):
        import ssl
        self.ssl = ssl
        self.want = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
        self.sock = context.wrap_socket(sock, server_side=server_hostname is None,
                                        server_hostname=server_hostname, do_handshake_on_connect=False)

    def __getattr__(self, name):
        return getattr(self.sock, name)

    def handshake(self):
        """0 once the handshake is done, else the selector events it waits for; OSError
        (ssl.SSLError, with the verification failure) if it fails."""
        try:
            self.sock.do_handshake()
            return 0
        except self.want[0]:
            return selectors.EVENT_READ
        except self.want[1]:
            return selectors.EVENT_READ | selectors.EVENT_WRITE

    def verifies_peer(self):
        return self.sock.context.verify_mode != self.ssl.CERT_NONE

    def peer_names(self):
        """The names of the peer's verified certificate: its commonName and DNS subjectAltNames."""
        certificate = self.sock.getpeercert() or {}
        names = [value for field in certificate.get("subject", ()) for name, value in field if name == "commonName"]
        return names + [value for kind, value in certificate.get("subjectAltName", ()) if kind == "DNS"]

    def summary(self):
        """What `status` shows of this link: the TLS version and the peer's certificate."""
        der = self.sock.getpeercert(True)
        return {"version": self.sock.version(), "peer_certificate": ", ".join(self.peer_names()) or None,
                "peer_sha256": sha256(der).hexdigest() if der else None}

    def recv_into(self, view):
        total = 0
        while total < len(view):
            try:
                count = self.sock.recv_into(view[total:])
            except self.want:
                if total:
                    break
                raise BlockingIOError(errno.EAGAIN, "TLS record incomplete")
            if not count:
                break
            total += count
            if count < self.BULK_RECORD_BYTES and not self.sock.pending():
                break                   # a short record: its sender had no more just now
        return total

    def send(self, data):
        try:
            return self.sock.send(data)
        except self.want:
            raise BlockingIOError(errno.EAGAIN, "TLS wants to wait")

    def sendmsg(self, buffers):
        return self.send(b"".join(buffers))


def pin_problem(transport, pins):
    """Why the certificate on the TLS link transport is none of pins ("sha256:HEX"), or None."""
    got = "sha256:" + (transport.summary()["peer_sha256"] or "no certificate")
    if got in pins:
        return None
    return "the relay's certificate is not the pinned one: got %s, server_pin is %s" % (got, ", ".join(pins))


def describe_error(error):
    """One readable phrase for an exception, e.g. 'connection refused'."""
    if isinstance(error, socket.gaierror):
        return (error.strerror or str(error)).lower()
    if hasattr(error, "reason") and hasattr(error, "library"):     # ssl.SSLError: its own words
        reason = (error.reason or "").replace("_", " ").lower() or str(error)
        verify = getattr(error, "verify_message", None)
        return "%s (%s)" % (reason, verify) if verify else reason
    if isinstance(error, OSError) and error.errno is not None:
        return os.strerror(error.errno).lower()
    return str(error) or error.__class__.__name__


# Platform glue: TUN devices (linux/if_tun.h) and interface setup (linux/sockios.h).
# The ioctl encoding differs by architecture (../shared/PLATFORMS.md); every ifreq we pass is the
# full 40 bytes, since Python 3.14 refuses to let the kernel write past a shorter buffer.
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000      # each read and write starts with a virtio_net_hdr: offloads possible
IFF_UP = 0x1
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
TUN_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCSIFMTU = 0x8922
SIOCDIFADDR = 0x8936
IN6_IFREQ = struct.Struct("16sIi")      # struct in6_ifreq: address, prefix length, ifindex
IPV6_PREFIX_LENGTH = 64
IPV6_MIN_MTU = 1280
TUNSETIFF_WRITE_HIGH = 0x800454CA    # _IOW where the "write" direction bit is the high one
TUNSETIFF_WRITE_LOW = 0x400454CA     # _IOW on x86, arm, aarch64, riscv64, s390x
TUNSETOFFLOAD_OFFSET = 0xD0 - 0xCA   # TUNSETOFFLOAD is _IOW('T', 208), TUNSETIFF _IOW('T', 202)
HIGH_WRITE_BIT_MACHINES = ("mips", "ppc", "powerpc", "sparc", "alpha", "parisc")
IFNAMSIZ = 16
TUN_READ_BYTES = 65536 + VNET_HEADER.size
NO_OFFLOAD = bytes(VNET_HEADER.size)    # the header in front of a packet that needs nothing done
NATIVE_VNET_HEADER = struct.Struct("=BBHHHH")   # the kernel's byte order; the wire's is little
BIG_ENDIAN = sys.byteorder == "big"
MAX_MTU = MAX_PAYLOAD_BYTES - VNET_HEADER.size    # a packet and its offload header fit one frame


def tunsetiff_numbers():
    """This machine's TUNSETIFF number first, the other encoding second."""
    if os.uname().machine.startswith(HIGH_WRITE_BIT_MACHINES):
        return TUNSETIFF_WRITE_HIGH, TUNSETIFF_WRITE_LOW
    return TUNSETIFF_WRITE_LOW, TUNSETIFF_WRITE_HIGH


def open_tun(name, offload=True):
    """(non-blocking fd, interface name, offload) of a new TUN interface carrying IP packets.

    With offload, reads and writes carry a virtio_net_hdr and the kernel hands over TCP segments
    of up to 64 KB with their checksums unfinished (TSO), whatever the MTU: far fewer packets for
    Python to move. Kernels or containers that refuse it get a plain TUN.
    """
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
        request = struct.pack("16sH22x", name.encode("ascii"), flags)
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
        if offload:
            fcntl.ioctl(fd, number + TUNSETOFFLOAD_OFFSET, TUN_OFFLOADS)
        os.set_blocking(fd, False)
        return fd, reply[:IFNAMSIZ].rstrip(b"\0").decode("ascii"), offload
    except OSError:
        os.close(fd)
        if offload:
            return open_tun(name, offload=False)
        raise
    except BaseException:
        os.close(fd)
        raise


def set_tun_offload(fd, flags):
    """Change what the kernel may hand over (TUN_F_*), e.g. TSO off under a small frame limit;
    in this machine's ioctl encoding, else the other one, as open_tun does."""
    first, second = tunsetiff_numbers()
    try:
        fcntl.ioctl(fd, first + TUNSETOFFLOAD_OFFSET, flags)
    except OSError as error:
        if error.errno not in (errno.EBADFD, errno.EINVAL, errno.ENOTTY):
            raise
        fcntl.ioctl(fd, second + TUNSETOFFLOAD_OFFSET, flags)


def read_tun_packet(fd, offload):
    """(frame type, payload) of the next packet from a TUN; BlockingIOError when none waits.

    A packet that needs nothing done leaves as a PACKET, so that any peer takes it as it is.
    """
    data = os.read(fd, TUN_READ_BYTES)
    if not offload:
        return FRAME_PACKET, data
    if data[0] & VNET_NEEDS_CSUM or data[1]:            # flags, gso_type
        if BIG_ENDIAN:
            data = VNET_HEADER.pack(*NATIVE_VNET_HEADER.unpack_from(data)) + data[VNET_HEADER.size:]
        if data[0] & ~VNET_NEEDS_CSUM:                  # DATA_VALID is for this host alone
            data = bytes([data[0] & VNET_NEEDS_CSUM]) + data[1:]
        return FRAME_VNET_PACKET, data
    return FRAME_PACKET, memoryview(data)[VNET_HEADER.size:]


def write_tun_packet(fd, offload, frame_type, payload):
    """Hand a PACKET or VNET_PACKET payload to the kernel in the form this TUN takes."""
    if frame_type == FRAME_VNET_PACKET:
        if not offload:
            os.write(fd, finished_packet(payload))
            return
        if BIG_ENDIAN:
            payload = NATIVE_VNET_HEADER.pack(*VNET_HEADER.unpack_from(payload)) + payload[VNET_HEADER.size:]
        os.write(fd, payload)
    elif offload:
        os.writev(fd, (NO_OFFLOAD, payload))
    else:
        os.write(fd, payload)


def configure_interface(name, address, prefix_length, mtu, log, ipv6=()):
    """Give interface name address/prefix_length and mtu, bring it up, and give it the packed
    IPv6 addresses in ipv6 (each a /64; none: IPv6 stays off on it). A kernel without IPv6, or
    an MTU below IPv6's 1280, leaves it IPv4 only, logged.

    ioctls first (no tools needed); `ip` where the ioctls are refused, as in some containers.
    """
    if ipv6 and mtu < IPV6_MIN_MTU:
        log.warning("no IPv6 on %s: its MTU %d is below IPv6's %d" % (name, mtu, IPV6_MIN_MTU))
        ipv6 = ()
    prepare_ipv6(name, bool(ipv6))
    try:
        configure_with_ioctls(name, address, prefix_length, mtu)
        how = "ioctl"
    except OSError as ioctl_error:
        log.debug("interface ioctls failed (%s); trying ip" % describe_error(ioctl_error))
        try:
            configure_with_ip(name, address, prefix_length, mtu)
            how = "ip"
        except OSError as ip_error:
            raise OSError(errno.EPERM, "cannot configure %s: ioctl: %s; ip: %s" % (
                name, describe_error(ioctl_error), ip_error))
    if ipv6:
        try:
            set_ipv6_addresses(name, ipv6, log)
        except OSError as error:
            log.warning("no IPv6 on %s: %s" % (name, describe_error(error)))
    return how


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


def help_formatter(formatter_class):
    """argparse's formatter_class, as wide as the terminal: argparse would ask shutil, whose
    import pulls in bz2 and lzma (0.4 MB of a board's RSS, for a daemon that prints no help)."""
    def sized(prog):
        try:
            columns = int(os.environ.get("COLUMNS") or os.get_terminal_size(sys.__stdout__.fileno()).columns)
        except (AttributeError, ValueError, OSError):
            columns = 80
        return formatter_class(prog, width=max(columns, 40) - 2)
    return sized


def find_program(name):
    """The path of the program name on PATH, or None: shutil.which without shutil, whose
    import pulls in bz2 and lzma (0.3 MB of a board's RSS, for one lookup)."""
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(directory or os.curdir, name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def configure_with_ip(name, address, prefix_length, mtu):
    import subprocess
    ip = find_program("ip") or "/sbin/ip"
    commands = (
        [ip, "addr", "flush", "dev", name],
        [ip, "addr", "add", "%s/%d" % (address, prefix_length), "dev", name],
        [ip, "link", "set", "dev", name, "mtu", str(mtu), "up"],
    )
    for command in commands:
        try:
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           timeout=10)
        except subprocess.SubprocessError as error:        # failed, or hung past the timeout
            raise OSError(errno.EIO, str(error))


def prepare_ipv6(name, enabled):
    """IPv6 on the TUN only as the network gives it: no address the kernel makes up (the relay
    knows each device's by its host number), and none of the router solicitation and duplicate
    address detection a point-to-point link does without. Off when the network has no IPv6."""
    settings = (("addr_gen_mode", "1"), ("accept_dad", "0"), ("accept_ra", "0"), ("router_solicitations", "0"),
                ("disable_ipv6", "0")) if enabled else (("disable_ipv6", "1"),)
    for key, value in settings:
        try:
            with open("/proc/sys/net/ipv6/conf/%s/%s" % (name, key), "w") as switch:
                switch.write(value)
        except OSError:
            pass                        # a kernel without IPv6: set_ipv6_addresses says so


def interface_ipv6_addresses(name, path="/proc/net/if_inet6"):
    """{packed address: prefix length} of interface name."""
    found = {}
    with open(path) as rows:
        for row in rows:
            fields = row.split()
            if len(fields) >= 6 and fields[5] == name:
                found[bytes.fromhex(fields[0])] = int(fields[2], 16)
    return found


def set_ipv6_addresses(name, wanted, log):
    """Make the IPv6 addresses of interface name exactly wanted (packed, each a /64):
    SIOCSIFADDR/SIOCDIFADDR on an AF_INET6 socket (struct in6_ifreq), else `ip -6`."""
    have = interface_ipv6_addresses(name)
    changes = [(SIOCDIFADDR, address, length) for address, length in have.items() if address not in wanted]
    changes += [(SIOCSIFADDR, address, IPV6_PREFIX_LENGTH) for address in wanted if address not in have]
    if not changes:
        return
    index = socket.if_nametoindex(name)
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as control:
            for request, address, length in changes:
                fcntl.ioctl(control.fileno(), request, IN6_IFREQ.pack(address, length, index))
        return
    except OSError as error:
        log.debug("IPv6 address ioctls failed (%s); trying ip" % describe_error(error))
    import subprocess
    ip = find_program("ip") or "/sbin/ip"
    for request, address, length in changes:
        verb = ["del"] if request == SIOCDIFADDR else ["add"]
        command = [ip, "-6", "addr"] + verb + ["%s/%d" % (socket.inet_ntop(socket.AF_INET6, address), length),
                                               "dev", name] + (["nodad"] if verb == ["add"] else [])
        try:
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=10)
        except subprocess.CalledProcessError as error:
            raise OSError(errno.EIO, "%s: %s" % (" ".join(command), error.stderr.decode("utf-8", "replace").strip()))
        except subprocess.SubprocessError as error:
            raise OSError(errno.EIO, str(error))


def ip_text(packed):
    """A packed IPv4 or IPv6 address as text."""
    return socket.inet_ntop(socket.AF_INET6 if len(packed) == 16 else socket.AF_INET, bytes(packed))


def ipv4_text(packed):
    return socket.inet_ntoa(packed)


# Configuration helpers: each raises ValueError with a phrase fit for 'FILE: [section] key: ...'.
MIN_SECRET_CHARS = 16
MIN_SECRET_DISTINCT = 8
MIN_SECRET_BITS = 72             # estimated: a guess per PBKDF2 costs little on a GPU


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


def is_ipv4_literal(host):
    try:
        socket.inet_pton(socket.AF_INET, host)
    except (OSError, ValueError):
        return False
    return True


def ascii_host(host):
    """host as bytes for getaddrinfo and TLS: a str host goes through the idna codec, which
    imports unicodedata, which OpenWrt's python3-light lacks (even for "127.0.0.1"). ASCII
    skips the codec; a non-ASCII name gets a clear ValueError where the codec is missing."""
    try:
        return host.encode("ascii")
    except UnicodeEncodeError:
        pass
    try:
        return host.encode("idna")
    except LookupError:
        raise ValueError("%r: a non-ASCII host name needs the idna codec, which this Python lacks "
                         "(OpenWrt: opkg install python3-codecs), or give an address" % host)
    except UnicodeError as error:
        raise ValueError("%r is not a valid host name: %s" % (host, error))


def resolve_ipv4(host, port):
    """(address, port) for an IPv4 literal at once, or for a name through the resolver (which
    may block). Raises OSError (socket.gaierror) or ValueError."""
    if is_ipv4_literal(host):
        return host, port
    return socket.getaddrinfo(ascii_host(host), port, socket.AF_INET, socket.SOCK_STREAM)[0][4]


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
    """The secret as bytes, or ValueError when it is weak: from one recorded handshake (or a
    member's config) a guess can be tested offline, so it must not be guessable."""
    weakness = secret_weakness(secret)
    if weakness:
        raise ValueError("the secret is too weak (%s): use at least %d unpredictable characters, e.g. "
                         "the output of openssl rand -hex 24, or let the relay generate one (no secret "
                         "line: it writes state_dir/secret)" % (weakness, MIN_SECRET_CHARS))
    return secret.encode("utf-8")


def secret_weakness(secret):
    """Why the secret is weak, or None. An estimate of its entropy: the characters that do not
    continue a run (aaaa, 1234, dcba) times log2 of the alphabet its character classes span."""
    if len(secret) < MIN_SECRET_CHARS:
        return "%d characters" % len(secret)
    if "paste-the-secret-here" in secret.lower():
        return "the template's placeholder"
    if len(set(secret)) < MIN_SECRET_DISTINCT:
        return "only %d different characters" % len(set(secret))
    alphabet = sum(size for size, present in (
        (26, any(c.islower() for c in secret)), (26, any(c.isupper() for c in secret)),
        (10, any(c.isdigit() for c in secret)), (33, any(not c.isalnum() for c in secret))) if present)
    steps = [ord(b) - ord(a) for a, b in zip(secret, secret[1:])]
    fresh = 2 + sum(1 for before, step in zip(steps, steps[1:]) if not (step == before and abs(step) <= 1))
    guesses = alphabet ** fresh             # integers: no math module needed (python3-light)
    if guesses < 1 << MIN_SECRET_BITS:
        return "about %d bits, in runs and few kinds of character" % (guesses.bit_length() - 1)
    return None


def check_interface_name(text):
    name = text.strip()
    if not 1 <= len(name) < IFNAMSIZ or not all(c.isalnum() or c in "_-." for c in name):
        raise ValueError("%r is not an interface name (1 to 15 letters, digits, _ - .)" % text)
    return name


def check_domain(text):
    """A lowercase DNS domain of letters, digits and hyphens, as "mnedc" or "home.arpa"."""
    domain = text.strip().lower().rstrip(".")
    labels = domain.split(".")
    if not domain or len(domain) > 200 or not all(
            0 < len(label) <= 63 and not label.startswith("-") and set(label) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
            for label in labels):
        raise ValueError("%r is not a domain name (letters, digits and hyphens, labels of 1 to 63)" % text)
    return domain


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
        self.servers = None             # [(host, port), ...]: addresses of one relay, tried in order
        self.secret = None
        self.device_id = None
        self.interface = DEFAULT_INTERFACE
        self.mtu = DEFAULT_MTU
        self.offload = True
        self.keepalive = DEFAULT_KEEPALIVE_S
        self.control_socket = DEFAULT_CONTROL_SOCKET
        self.log_level = "info"
        self.tls = None                         # None: not set, and TLS is the default
        self.tls_ca = self.tls_cert = self.tls_key = self.tls_server_name = None
        self.server_pins = []                   # ["sha256:HEX", ...]: certificates we accept
        self.tls_context = None                 # built from those when tls = yes
        self.dns = "auto"                       # auto: per-link DNS through systemd-resolved
        self.domain = DEFAULT_DOMAIN
        self.ipv6 = True                        # take the network's IPv6 addresses, if it has some
        self.accept_routes = True               # route gateways' granted networks into the TUN
        self.gateway_nat = False                # masquerade the virtual network onto our granted LANs
        self.dnsmasq_servers = DEFAULT_DNSMASQ_SERVERS


CLIENT_KEYS = {
    "server": lambda config, text: setattr(config, "servers", parse_servers(text)),
    "secret": lambda config, text: setattr(config, "secret", check_secret(text.strip())),
    "secret_file": lambda config, text: setattr(config, "secret", check_secret(read_secret_file(text))),
    "device_id": lambda config, text: setattr(config, "device_id", check_device_id(text.strip())),
    "interface": lambda config, text: setattr(config, "interface", check_interface_name(text)),
    "mtu": lambda config, text: setattr(config, "mtu", parse_int(text, 576, MAX_MTU)),
    "offload": lambda config, text: setattr(config, "offload", parse_choice(text, ("yes", "no")) == "yes"),
    "keepalive": lambda config, text: setattr(config, "keepalive", parse_int(text, 3, 3600)),
    "control_socket": lambda config, text: setattr(config, "control_socket", text.strip()),
    "log_level": lambda config, text: setattr(config, "log_level", parse_choice(text, tuple(LOG_LEVELS))),
    "tls": lambda config, text: setattr(config, "tls", parse_choice(text, ("yes", "no")) == "yes"),
    "tls_ca": lambda config, path: setattr(config, "tls_ca", path),
    "tls_cert": lambda config, path: setattr(config, "tls_cert", path),
    "tls_key": lambda config, path: setattr(config, "tls_key", path),
    "tls_server_name": lambda config, text: setattr(config, "tls_server_name", check_server_name(text)),
    "server_pin": lambda config, text: setattr(config, "server_pins", parse_pins(text)),
    "dns": lambda config, text: setattr(config, "dns", parse_choice(text, ("auto", "no"))),
    "dnsmasq_servers": lambda config, path: setattr(config, "dnsmasq_servers", path),
    "domain": lambda config, text: setattr(config, "domain", check_domain(text)),
    "ipv6": lambda config, text: setattr(config, "ipv6", parse_choice(text, ("yes", "no")) == "yes"),
    "accept_routes": lambda config, text: setattr(config, "accept_routes", parse_choice(text, ("yes", "no")) == "yes"),
    "gateway_nat": lambda config, text: setattr(config, "gateway_nat", parse_choice(text, ("yes", "no")) == "yes"),
}
PATH_KEYS = ("secret_file", "tls_ca", "tls_cert", "tls_key")      # relative to the INI file


def parse_servers(text):
    """[(host, port), ...] from 'HOST[:PORT], HOST[:PORT] ...': addresses of the same relay
    (its LAN and its public address, say), tried in this order."""
    servers = []
    for item in text.replace(",", " ").split():
        host, port = parse_host_port(item, DEFAULT_PORT)
        if host == "0.0.0.0" or port == 0:
            raise ValueError("%r: give the server's address, as HOST or HOST:PORT" % item)
        ascii_host(host)                # a non-ASCII name this Python cannot look up: say so now
        servers.append((host, port))
    if not servers:
        raise ValueError("give the server's address, as HOST or HOST:PORT")
    return servers


def check_server_name(text):
    """A name the relay's certificate holds (a DNS name or an address), checked now, since ssl
    refuses bad ones only at each connection."""
    name = text.strip()
    ascii_host(name)
    if not name or name.startswith(".") or ".." in name or not all(c.isalnum() or c in ".-:" for c in name):
        raise ValueError("%r is not a host name or address" % text)
    return name


def parse_pins(text):
    """["sha256:HEX", ...] from one pin or several (separated by commas or blanks): the relay's
    certificate must be one of them, so a new certificate can be added before the old goes."""
    pins = [word.lower() for word in text.replace(",", " ").split()]
    for pin in pins:
        digest = pin[len("sha256:"):]
        if not pin.startswith("sha256:") or len(digest) != 64 or digest.strip("0123456789abcdef"):
            raise ValueError("%r is not a pin like sha256:<64 hex digits> (the relay prints it)" % pin)
    if not pins:
        raise ValueError("give the relay's pin, sha256:<64 hex digits>")
    return pins


def format_servers(servers):
    return ", ".join("%s:%d" % server for server in servers)


# SIGHUP takes every other key live; these are fixed while the client runs
RESTART_KEYS = ("device_id", "interface", "mtu", "offload", "control_socket")


def default_device_id():
    """/etc/machine-id, which survives hostname changes; else hostname and MAC address.

    OpenWrt has no machine-id and names every router "OpenWrt": the MAC keeps them apart.
    """
    try:
        with open("/etc/machine-id") as source:
            return check_device_id(source.read().strip())
    except (OSError, ValueError):
        pass
    name = "".join(c if c in DEVICE_ID_CHARS else "-" for c in socket.gethostname())[:40] or "device"
    mac = first_mac_address()
    return check_device_id(name + ("-" + mac if mac else ""))


def first_mac_address():
    """The first real MAC address in /sys/class/net, as 12 hex digits, or ''."""
    try:
        names = sorted(os.listdir("/sys/class/net"))
    except OSError:
        return ""
    for name in names:
        try:
            with open("/sys/class/net/%s/address" % name) as source:
                mac = source.read().strip().replace(":", "")
        except OSError:
            continue
        if len(mac) == 12 and mac != "000000000000":
            return mac
    return ""


def unreadable(path):
    """Why this process cannot read the file path, or None. A key in a 0700 directory of root's
    shows to a stream client run as another user as 'permission denied', not 'no such file'."""
    try:
        with open(path, "rb"):
            return None
    except OSError as error:
        if error.errno != errno.EACCES:
            return describe_error(error)
        return "permission denied: this process runs as uid %d, which must be able to read the file " \
               "and enter every directory above it" % os.getuid()


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
        if key in PATH_KEYS:
            text = os.path.join(base, text.strip())
        try:
            CLIENT_KEYS[key](config, text)
        except (ValueError, OSError) as error:
            raise ConfigError(where + "%s: %s" % (key, describe_error(error)))
    flags = (("server", args.server), ("secret_file", args.secret_file), ("device_id", args.device_id),
             ("interface", args.interface), ("control_socket", args.control),
             ("log_level", "debug" if args.verbose else None))
    for key, text in flags:
        if text is not None:
            try:
                CLIENT_KEYS[key](config, text)
            except (ValueError, OSError) as error:
                raise ConfigError("--%s: %s" % (key.replace("_", "-"), describe_error(error)))
    if getattr(args, "command", None) == "status":
        return config                   # status only needs the control socket
    if config.servers is None:
        raise ConfigError("no server configured: set server in the [client] section of %s or pass "
                          "--server" % (config.source or "client-config.ini (none found)"))
    if config.secret is None:
        raise ConfigError("no secret configured: set secret or secret_file in the [client] section "
                          "of %s (the server prints it at its first start)"
                          % (config.source or "client-config.ini"))
    if config.device_id is None:
        config.device_id = default_device_id()
    if getattr(args, "no_tls", False):
        config.tls = False
    tls_files = [(key, getattr(config, key)) for key in ("tls_ca", "tls_cert", "tls_key") if getattr(config, key)]
    if config.tls is None and not config.server_pins and not config.tls_ca:
        raise ConfigError((where if config.source else "") + "server_pin: the link to the relay is TLS by "
                          "default, and nothing says which certificate to trust: set server_pin = sha256:... (the "
                          "relay prints it at its first start, and `mnedc_server.py status` shows it), "
                          "or tls_ca for a relay with a CA-signed certificate, or tls = no if the relay "
                          "runs with tls = no (plaintext)")
    if config.tls is None:
        config.tls = True                       # TLS, the default
    if (tls_files or config.server_pins) and not config.tls:
        raise ConfigError(where + "tls: %s set but tls is not yes: set tls = yes, or remove them"
                          % ", ".join([key for key, _ in tls_files] + (["server_pin"] if config.server_pins else [])))
    config.tls = bool(config.tls)
    for key, path in tls_files:
        problem = unreadable(path)
        if problem:
            raise ConfigError(where + "%s: %s: %s" % (key, path, problem))
    if config.tls:
        if not config.tls_ca and not config.server_pins:
            raise ConfigError(where + "tls: tls = yes needs server_pin, the relay's certificate pin (it "
                              "prints it at its first start and in status), or tls_ca, the CA that "
                              "signed its certificate (install.sh certs makes it)")
        if bool(config.tls_cert) != bool(config.tls_key):
            raise ConfigError(where + "tls_key: a client certificate needs both tls_cert and tls_key")
        try:
            config.tls_context = tls_context(False, config.tls_cert, config.tls_key, config.tls_ca)
        except (ValueError, OSError) as error:
            raise ConfigError(where + "tls: %s" % describe_error(error))
    return config


# ==== CLI ====

def build_parser():
    plain = help_formatter(argparse.HelpFormatter)
    common = argparse.ArgumentParser(add_help=False, formatter_class=plain)
    common.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="INI file with a [client] section")
    common.add_argument("--server", metavar="HOST[:PORT]", default=argparse.SUPPRESS,
                        help="relay server (overrides the file)")
    common.add_argument("--secret-file", metavar="FILE", default=argparse.SUPPRESS,
                        help="file holding the network secret")
    common.add_argument("--device-id", metavar="ID", default=argparse.SUPPRESS,
                        help="this device's name on the network")
    common.add_argument("--no-tls", action="store_true", default=argparse.SUPPRESS,
                        help="plaintext, as tls = no, to a relay that runs with tls = no")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log debug lines too")
    common.add_argument("--syslog", action="store_true", default=argparse.SUPPRESS,
                        help="log to syslog (daemon facility) instead of stderr")
    common.add_argument("--pidfile", metavar="FILE", default=argparse.SUPPRESS, help="write the process id here")
    common.add_argument("--heartbeat", metavar="FILE", default=argparse.SUPPRESS,
                        help="touch FILE every %d s from the event loop, for the watchdog" % HEARTBEAT_S)
    common.add_argument("--control", metavar="SOCKET", default=argparse.SUPPRESS,
                        help="the TUN client's control socket (default %s)" % DEFAULT_CONTROL_SOCKET)
    parser = argparse.ArgumentParser(
        prog="mnedc_client.py", description=__doc__, parents=[common],
        formatter_class=help_formatter(argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--interface", metavar="NAME", help="TUN interface name (default %s)" % DEFAULT_INTERFACE)
    parser.add_argument("--check", action="store_true",
                        help="check that this Python and the configuration can run the client "
                             "(modules, config, relay addresses), then exit: 0 ok, 1 a missing "
                             "module (with the package to install), 2 a bad configuration")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    listen = commands.add_parser(
        "listen", parents=[common], formatter_class=plain, help="offer a virtual port (stream mode, no root)",
        description="Offer virtual PORT of this device. Each stream that arrives is joined to "
                    "127.0.0.1:TCPPORT (--forward), or, without --forward, one stream is joined "
                    "to stdin/stdout.")
    listen.add_argument("--once", action="store_true", help="serve one stream, then exit")
    listen.add_argument("--forward", metavar="TCPPORT", type=port_number, help="local TCP port to join streams to")
    listen.add_argument("--service", metavar="NAME", type=service_name,
                        help="register NAME so peers can find this port")
    listen.add_argument("port", metavar="PORT", type=port_number, help="the virtual port to offer")
    connect = commands.add_parser(
        "connect", parents=[common], formatter_class=plain, help="reach a peer's virtual port (stream mode, no root)",
        description="Reach PORT of PEER (a virtual IP, a device_id, or a service NAME; PORT may be "
                    "omitted for a service). With --forward, each connection to 127.0.0.1:TCPPORT "
                    "becomes a stream; without, one stream is joined to stdin/stdout, e.g. "
                    "ssh -o ProxyCommand='mnedc_client.py connect %%h 22' DEVICE")
    connect.add_argument("--once", action="store_true", help="serve one local connection, then exit")
    connect.add_argument("--forward", metavar="TCPPORT", type=port_number, help="local TCP port to listen on")
    connect.add_argument("peer", metavar="PEER", type=peer_name,
                         help="virtual IP, device_id or service name; DEVICE/SERVICE takes that service only "
                              "if it is that device's")
    connect.add_argument("port", metavar="PORT", type=port_number, nargs="?", default=0, help="the peer's virtual port")
    services = commands.add_parser("services", parents=[common], formatter_class=plain, help="list devices and named services")
    services.add_argument("--json", action="store_true", help="machine-readable output")
    commands.add_parser("hosts", parents=[common], formatter_class=plain, help="print /etc/hosts lines for every device (ID.DOMAIN)",
                        description="Print one /etc/hosts line per device with a virtual address: "
                                    "ADDRESS DEVICE_ID.DOMAIN DEVICE_ID, from the relay's listing. "
                                    "For scripts, and for hosts whose resolver cannot ask the relay.")
    status = commands.add_parser("status", parents=[common], formatter_class=plain, help="show the running TUN client's state")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def port_number(text):
    try:
        return parse_int(text, 1, 65535)
    except ValueError as error:
        raise argparse.ArgumentTypeError("port %s" % error)


def service_name(text):
    try:
        return check_device_id(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).replace("device_id", "service name"))


def peer_name(text):
    """A virtual IP (four numbers), a device_id or service name, or DEVICE/SERVICE."""
    parts = text.split(".")
    if len(parts) == 4 and all(part.isdigit() and int(part) < 256 for part in parts):
        return text
    if "/" in text:
        device_id, _, service = text.partition("/")
        try:
            check_device_id(device_id)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error))
        return "%s/%s" % (device_id, service_name(service))
    return service_name(text)


def cmd_check(args, log):
    """--check: what install.sh asks before it starts the service."""
    missing = missing_modules(RUN_MODULES)
    if missing:
        log.error("this Python (%s) lacks %s: %s" % (sys.executable, ", ".join(missing), install_hint(missing)))
        return 1
    config = load_or_exit(args, log)
    if config is None:
        return 2
    for host, port in config.servers:
        answer = resolve_within(host, port, RESOLVE_TIMEOUT_S)
        if isinstance(answer, Exception):   # a device may be installed before its network is up
            log.warning("cannot resolve the relay %s now (%s): the client will keep trying"
                        % (host, describe_error(answer)))
    sys.stdout.write("check passed: Python %d.%d, %s, relay %s, device %s%s\n" % (
        sys.version_info[0], sys.version_info[1], config.source or "no config file",
        format_servers(config.servers), config.device_id, ", TLS" if config.tls else ""))
    return 0


def resolve_within(host, port, timeout_s):
    """resolve_ipv4 in a thread, waited for at most timeout_s: (address, port) or the error."""
    import threading
    answers = []

    def resolve():
        try:
            answers.append(resolve_ipv4(host, port))
        except (OSError, ValueError) as error:
            answers.append(error)
    thread = threading.Thread(target=resolve, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return answers[0] if answers else OSError(errno.ETIMEDOUT, "no answer within %d s" % timeout_s)


def cmd_tun(args, log):
    config = load_or_exit(args, log)
    if config is None:
        return 2
    return run_client(TunClient(config, log), args, log)


def run_client(client, args, log):
    """Start client, keep the pidfile and heartbeat while it runs; its exit status."""
    files = DaemonFiles(args.pidfile, args.heartbeat)
    client.reload_config = lambda: load_client_config(args)
    try:
        client.start()
        files.start(client.loop)
    except OSError as error:
        log.error(str(error) if error.filename is None else
                  "cannot write %s: %s" % (error.filename, describe_error(error)))
        return 1
    try:
        return client.run()
    finally:
        files.remove()


def cmd_streams(args, log):
    """listen, connect, services and hosts."""
    config = load_or_exit(args, log)
    if config is None:
        return 2
    client = StreamClient(config, log, args.command, port=getattr(args, "port", 0),
                          peer=getattr(args, "peer", None), forward=getattr(args, "forward", None),
                          once=getattr(args, "once", False), service=getattr(args, "service", None) or "",
                          as_json=getattr(args, "json", False))
    return run_client(client, args, log)


def cmd_status(args, log):
    config = load_or_exit(args, log)
    if config is None:
        return 2
    try:
        status = control_request(config.control_socket, {"command": "status"})
    except OSError as error:
        log.error("no running TUN client answers on %s: %s" % (config.control_socket, describe_error(error)))
        return 1
    if "error" in status:
        log.error(status["error"])
        return 1
    if args.json:
        import json
        sys.stdout.write(json.dumps(status, indent=1, sort_keys=True) + "\n")
        return 0
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status["since"]))
    rtt = "%.1f ms" % status["rtt_ms"] if status["rtt_ms"] is not None else "-"
    drops = ", ".join("%s %d" % item for item in sorted(status["drops"].items())) or "none"
    tls = status["tls"]
    tls = "no" if not tls else "%s, server certificate %s (sha256:%s)" % (
        tls["version"], tls["peer_certificate"] or "without names", tls["peer_sha256"])
    sys.stdout.write(
        "device %s: %s on %s, server %s (%s)\n%s since %s, round trip %s, %d reconnect(s)\n"
        "TLS: %s\nin: %d packets, %d bytes; out: %d packets, %d bytes; drops: %s\n" % (
            status["device_id"], status["address"] or "no address yet", status["interface"],
            status["server"], status["server_address"] or "-", status["state"], since, rtt,
            status["reconnects"], tls, status["packets_in"], status["bytes_in"], status["packets_out"],
            status["bytes_out"], drops))
    return 0


COMMANDS = {"tun": cmd_tun, "check": cmd_check, "listen": cmd_streams, "connect": cmd_streams, "services": cmd_streams, "hosts": cmd_streams,
            "status": cmd_status}


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.command = "check" if getattr(args, "check", False) else args.command or "tun"
    for name, default in (("config", None), ("server", None), ("secret_file", None), ("device_id", None),
                          ("verbose", False), ("syslog", False), ("pidfile", None), ("heartbeat", None),
                          ("control", None), ("no_tls", False)):
        if not hasattr(args, name):     # options may stand before or after the command
            setattr(args, name, default)
    log = Log("debug" if args.verbose else "info", syslog_ident="mnedc-client" if args.syslog else None)
    return COMMANDS[args.command](args, log)


def load_or_exit(args, log):
    try:
        config = load_client_config(args)
    except ConfigError as error:
        log.error(str(error))
        return None
    log.set_level(config.log_level)
    return config


if __name__ == "__main__":
    sys.exit(main())
