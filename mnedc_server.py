#!/usr/bin/env python3
"""MNEDC relay server: one device in the main NAT that every MNEDC client connects to.

Each client keeps one TCP connection here, proves it knows the network secret, and gets a
sticky virtual IP from the subnet (the same one on every reconnect, also after a restart).
The server routes every IP packet (IPv4 and IPv6) it receives to the client that owns the
destination address. With a TUN interface of its own the server's host joins as the subnet's .1.

Configuration: an INI file with a [server] section (-c), then command-line flags.
  listen      HOST:PORT to accept clients on            (default 0.0.0.0:3334)
  subnet      virtual network, /16 to /29               (default 10.0.0.0/24)
  secret      the network secret, or secret_file = PATH (default: generated in state_dir)
  tun         yes, no or auto: join as .1 through TUN   (default auto)
  interface   TUN interface name                        (default mnedc0)
  mtu         TUN interface MTU, up to 65525                (default 65520)
  offload     yes or no: TSO and checksum offload on the TUN (default yes)
  state_dir   where leases.json, names.json and the secret live (default /var/lib/mnedc)
  keepalive   seconds without a frame before a client is presumed dead (default 30)
  keys_file   per-device secrets: DEVICE_ID SECRET, or DEVICE_ID revoked (SIGHUP reloads)
  network_secret  no: only devices in keys_file may join (default yes)
  policy_file who may reach whom: allow|deny FROM -> TO [port N] rules (default allow all),
              and who may offer which service names: name SERVICE[,...] by WHO
  max_clients, max_connections_per_source, max_handshakes, max_frame_bytes, max_queue_bytes,
  max_streams_per_client, max_new_leases_per_minute   limits (default 1024, 256, 256, 65535,
              1048576, 64, 60 per source address; README)
  reserve DEVICE_ID = ADDRESS   pins the device's address (its IPv6 follows), in the pool or
              outside it; one line each; conflicts are reported with the file and line
  route NETWORK = DEVICE_ID     grants the device the LAN behind it (IPv4 or IPv6): the relay
              routes it there, and every TUN member learns it (SIGHUP reloads both kinds)
  lease_trial seconds a new device must stay connected before its lease outlives it by days;
              one that leaves sooner loses it this long after it left (default 300)
  multicast_packets_per_second, multicast_bytes_per_second  what one member may broadcast:
              broadcasts, 224.0.0.0/24 (mDNS) and SSDP go to every other member (default 100, 131072)
  multicast_groups  more groups to relay to everyone, e.g. 239.1.2.3, ff05::1:3 (default none)
  ipv6        yes (default): the network also has a unique-local IPv6 /64 (state_dir/ipv6_prefix,
              drawn at the first start); each device's host number is its interface id
  dns, domain yes (default): answer DNS on the TUN's addresses for DEVICE_ID.DOMAIN (default mnedc)
  tls         yes (default): TLS with tls_cert and tls_key, or without them with the relay's own
              key and certificate, made in state_dir at the first start (clients pin it:
              server_pin); tls_client_ca requires client certificates whose commonName is the
              device_id. no (or --no-tls): plaintext, which clients must set too
  allow_plaintext  yes: a TLS relay also takes clients without TLS (a migration; default no)
  control_socket  the Unix socket for status, kick, forget and forget-name
              (default /var/run/mnedc/server.sock)
  on_join, on_leave  scripts (absolute paths) run when a device joins or leaves
  restart_window  seconds over which clients spread their return after a restart (default 10)
  log_level   debug, info, warning or error                  (default info)
SIGHUP re-reads the file and applies every key live except listen, subnet, tun, interface, mtu,
offload, state_dir, control_socket, dns and ipv6, and turning tls on or off, which take a restart. --check tests this Python and the
configuration without starting. Needs root for the TUN interface (tun = no does without).
"""

import argparse
import configparser
import collections
import errno
import fcntl
import heapq
import json
import os
import select
import selectors
import signal
import socket
import stat
import subprocess
import sys
import time
# struct and sha256 are imported by the wire protocol block below.

DEFAULT_PORT = 3334
DEFAULT_LISTEN = "0.0.0.0:%d" % DEFAULT_PORT
DEFAULT_SUBNET = "10.0.0.0/24"
DEFAULT_STATE_DIR = "/var/lib/mnedc"
DEFAULT_INTERFACE = "mnedc0"
DEFAULT_MTU = 65520             # TCP carries the frames: no path MTU binds the virtual one
DEFAULT_KEEPALIVE_S = 30
HANDSHAKE_TIMEOUT_S = 10
CLOSING_LINGER_S = 2            # how long a refused peer gets to read our ERROR frame
RECV_BYTES = 256 * 1024
ACCEPTS_PER_WAKEUP = 64
TUN_PACKETS_PER_WAKEUP = 64
MAX_QUEUE_BYTES = 1024 * 1024   # per client; beyond it packets are dropped, as a router would
MAX_STREAM_WINDOW_BYTES = 512 * 1024   # credit one stream end may hold: the server buffers no more
MAX_STREAMS_PER_SESSION = 64    # so one session's relayed bytes stay under 64 x 512 KiB = 32 MiB
MAX_NEW_LEASES_PER_MINUTE = 60  # new devices leased per source address and minute: minting stalls
AUTH_REFUSED = "wrong secret, or this device may not join this network (the relay's log says which)"
TLS_HANDSHAKE_RECORD = b"\x16"   # the first byte a TLS client sends (RFC 8446 5.1)
TOTAL_QUEUE_BYTES = 64 * 1024 * 1024   # all send queues together: past it the fullest is cut off
MAX_SERVICES_PER_SESSION = 16
MAX_SERVICES = 1024
MAX_NAMES_PER_DEVICE = 32       # service names one device may own (claims outlive its sessions) ...
MAX_CLAIMED_NAMES = 4096        # ... and all devices together: minted device_ids cannot fill the file
FRAMES_PER_WAKEUP = 256        # one connection's frames handled per turn of the loop: the rest wait
                                # for the next turn, after everyone else's (a flood holds nobody up)
SERVICES_PER_S = 2.0            # SERVICES answered per session and second (a burst of 4): past it,
SERVICES_BURST = 4.0            # ignored and counted, so no member makes the relay list all day
DIRECTORY_MAX_AGE_S = 1.0       # a cached listing serves until a member or a name changes, or this
NO_ADDRESS = b"\0\0\0\0"        # a stream session of a device that has no lease
MAX_PENDING_HANDSHAKES = 256    # beyond it the oldest unfinished handshake is dropped
MAX_CLIENTS = 1024              # connections in all; past it a new one is refused
MAX_CONNECTIONS_PER_SOURCE = 256   # from one address (a NAT fronts many devices)
ACCEPT_PAUSE_S = 0.2            # out of fds: stop accepting this long (else the loop spins)
LEASE_SAVE_INTERVAL_S = 60
JOURNAL_COMPACT_LINES = 256     # the lease journal is folded into leases.json past this many lines
                                # (or past as many as there are leases: O(1) per lease, amortized)
DEFAULT_CONTROL_SOCKET = "/var/run/mnedc/server.sock"
DEFAULT_RESTART_WINDOW_S = 10   # clients spread their reconnects over this after a restart
HOOK_TIMEOUT_S = 30             # an on_join/on_leave script running longer is killed
MAX_RUNNING_HOOKS = 4           # hook processes at once; the next ones wait in a queue ...
MAX_QUEUED_HOOKS = 64           # ... of this many, past which they are dropped and counted
HOOK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"   # all a hook inherits, with MNEDC_*
LEASE_RECLAIM_AFTER_S = 7 * 24 * 3600   # an offline device's address may go to a newcomer then
DEFAULT_LEASE_TRIAL_S = 300     # a new lease lasts for days only once its device stayed this long
IDLE_SHRINK_S = 5               # a connection quiet this long gives back its large receive buffer
MEMBER_LINES_PER_DEVICE = 6     # join and leave lines a minute of one device (a flapping one) ...
MEMBER_LINES_PER_MINUTE = 120   # ... and of all together (a storm); the rest are counted
MAX_REMEMBERED_LISTENERS = 4096 # stream-only devices that listened, known by name while offline
LISTEN_RETRY_S = 10             # a port another session of the device holds: the client asks again
MULTICAST_PACKETS_PER_S = 100   # broadcast and multicast one member may send a second (mDNS, SSDP
MULTICAST_BYTES_PER_S = 128 * 1024  # and ARP-less discovery are a few); a second's worth is the burst
MULTICAST_COPIES_PER_S = 20000  # copies the relay makes of them a second, all senders together
MULTICAST_QUEUE_SHARE = 4       # a copy joins a send queue only below 1/4 of max_queue_bytes:
                                # broadcasts can never crowd out a member's unicast
DEFAULT_DOMAIN = "mnedc"        # devices are DEVICE_ID.mnedc in the relay's DNS
DNS_PORT = 53
DNS_TTL_S = 60                  # addresses are sticky: a minute of caching is safe
DNS_NEGATIVE_TTL_S = 10         # a device that joins is found within seconds
DNS_QUERIES_PER_S = 20          # per member address (as many in a burst) ...
DNS_QUERIES_ALL_PER_S = 500     # ... and in all: the rest go unanswered and are counted
DNS_QUERIES_PER_WAKEUP = 64
DNS_TCP_CONNECTIONS = 16        # DNS over TCP at once; past it a new one is closed at once
DNS_TCP_IDLE_S = 10             # and one quiet this long is closed
MAX_DNS_MESSAGE_BYTES = 512     # a query larger than this is no question for us


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


# ==== STATE ====

def parse_subnet(text):
    """(network as int, prefix length) from 'A.B.C.D/N'; ValueError says what is wrong."""
    try:
        address, prefix_text = text.strip().split("/")
        network = struct.unpack("!I", socket.inet_aton(address))[0]
        prefix_length = int(prefix_text)
    except (ValueError, OSError):
        raise ValueError("%r is not a subnet like 10.0.0.0/24" % text)
    if address.count(".") != 3 or not 16 <= prefix_length <= 29:
        raise ValueError("%r: the prefix must be from /16 to /29" % text)
    host_bits = (1 << (32 - prefix_length)) - 1
    if network & host_bits:
        fixed = socket.inet_ntoa(struct.pack("!I", network & ~host_bits & 0xFFFFFFFF))
        raise ValueError("%r has host bits set; did you mean %s/%d?" % (text, fixed, prefix_length))
    return network, prefix_length


def packed_address(number):
    return struct.pack("!I", number)


class PoolExhausted(Exception):
    """Every client address of the subnet is leased to a device that may come back."""


class TooManyNewLeases(Exception):
    """One source address asked for more new leases within a minute than max_new_leases_per_minute."""


class NameTaken(Exception):
    """A device_id that is another device's service name."""


class ListenRefused(Exception):
    """One LISTEN cannot be had; code is an ERROR_* value. The session goes on."""

    def __init__(self, code, text):
        Exception.__init__(self, text)
        self.code = code


def is_address_shaped(name):
    """Whether a name could be read as an IPv4 address (one to four dotted numbers, as
    inet_aton takes them): such a service name would shadow a device's address."""
    parts = name.split(".")
    return len(parts) <= 4 and all(part.isdigit() or part[:2].lower() == "0x" for part in parts)


class ServiceNames:
    """Who owns which service name, kept in state_dir/names.json.

    A name is the device's that first offered it, and stays that device's while it is away and
    across restarts of the relay, until the operator frees it (forget-name NAME, or forget
    DEVICE_ID). So nobody can take over pi-ssh by offering it first while its device is off.
    The file also remembers the stream-only devices that listened (newest MAX_REMEMBERED_
    LISTENERS): their device_ids are known names while they are offline, so no service can
    take one. Written atomically: what the operator frees at once, new claims and listeners
    at the next tick (save_if_dirty), so a burst of them costs one fsync, not one each.
    """

    def __init__(self, path, log):
        self.path = path
        self.log = log
        self.owners = {}            # service name -> device_id
        self.counts = {}            # device_id -> how many names it owns
        self.listeners = {}         # stream-only device_id -> first time it listened (epoch s)
        self.dirty = False

    def load(self):
        try:
            with open(self.path) as source:
                stored = json.load(source)
            owners, listeners = dict(stored["names"]), dict(stored.get("listeners", {}))
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as error:
            aside = "%s.corrupt-%d" % (self.path, time.time())
            os.replace(self.path, aside)
            self.log.error("service name file %s is unreadable (%s); moved it to %s and starting "
                           "with no names claimed" % (self.path, error, aside))
            return
        for name, owner in owners.items():
            try:
                self.owners[check_device_id(name)] = check_device_id(owner)
            except (ValueError, TypeError):
                self.log.warning("ignoring malformed service name claim %r -> %r" % (name, owner))
                continue
            self.counts[owner] = self.counts.get(owner, 0) + 1
        for device_id, since in listeners.items():
            try:
                self.listeners[check_device_id(device_id)] = float(since)
            except (ValueError, TypeError):
                self.log.warning("ignoring malformed listener record %r" % device_id)

    def save(self):
        temporary = self.path + ".tmp"
        with open(temporary, "w") as sink:
            sink.write(json.dumps({"names": self.owners, "listeners": self.listeners}, sort_keys=True))
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(temporary, self.path)
        self.dirty = False

    def save_if_dirty(self):
        if self.dirty:
            self.save_or_log()

    def owner(self, name):
        return self.owners.get(name)

    def count_of(self, device_id):
        return self.counts.get(device_id, 0)

    def names_of(self, device_id):
        if not self.counts.get(device_id):
            return []
        return sorted(name for name, owner in self.owners.items() if owner == device_id)

    def claim(self, name, device_id):
        """Make name device_id's (it is free, the caller checked); True if that is new."""
        if self.owners.get(name) == device_id:
            return False
        self.owners[name] = device_id
        self.counts[device_id] = self.counts.get(device_id, 0) + 1
        self.dirty = True
        self.log.info("service name %s is now device %s's" % (name, device_id))
        return True

    def note_listener(self, device_id, now):
        if device_id in self.listeners:
            return
        if len(self.listeners) >= MAX_REMEMBERED_LISTENERS:
            owning = set(self.owners.values())
            oldest = min((since, d) for d, since in self.listeners.items() if d not in owning) \
                if len(owning) < len(self.listeners) else None
            if oldest is None:
                return
            del self.listeners[oldest[1]]
        self.listeners[device_id] = now
        self.dirty = True

    def release(self, name):
        owner = self.owners.pop(name)
        self.counts[owner] -= 1
        self.save_or_log()
        return owner

    def release_device(self, device_id):
        """Forget device_id's names and listener record; the names it held."""
        names = self.names_of(device_id)
        for name in names:
            del self.owners[name]
        self.counts.pop(device_id, None)
        if names or self.listeners.pop(device_id, None) is not None:
            self.save_or_log()
        return names

    def save_or_log(self):
        """A claim holds in memory when the disk fails, and the next tick tries again."""
        try:
            self.save()
        except OSError as error:
            self.dirty = True
            self.log.limited(("names", self.path), "error", "cannot save service names to %s: %s"
                             % (self.path, describe_error(error)))


class LeaseTable:
    """Sticky virtual addresses: device_id -> address, kept in state_dir/leases.json.

    The subnet's first address is the server's; clients get the rest but the broadcast
    address. A new lease (or one dropped) is one line appended to leases.json.journal before
    the device hears of it, so a device keeps its address across a crash, SIGKILL included;
    the journal is fsynced at the next tick and folded into leases.json (rewritten atomically)
    once it holds more lines than there are leases, so each lease costs O(1) however many there
    are (rewriting the table for each new lease took 100 ms at 30,000). Free addresses are
    found from a cursor, and those given back are taken first, lowest first. A new lease is on trial until its device has stayed
    connected trial_s in one go; a device that leaves sooner loses it trial_s after it left
    (expire_trials), and when the pool is full the oldest such lease goes first. So device_ids
    minted to fill the pool free their addresses within minutes, not days.
    """

    def __init__(self, subnet, path, log, trial_s=DEFAULT_LEASE_TRIAL_S):
        self.network, self.prefix_length = subnet
        self.path = path
        self.log = log
        self.server_address = packed_address(self.network + 1)
        self.first_host = self.network + 2
        self.last_host = self.network + (1 << (32 - self.prefix_length)) - 2
        self.leases = {}            # device_id -> {"address": "a.b.c.d", "last_seen": epoch s[, "trial": True]}
        self.owner_of = {}          # packed address -> device_id
        self.trial_s = trial_s
        self.on_trial = set()       # device_ids whose lease is still on trial
        self.journal_path = path + ".journal"
        self.journal = None         # its fd, open for appending
        self.journal_lines = 0
        self.unsynced = False       # lines written since the last fsync
        self.cursor = self.first_host
        self.given_back = []        # a heap of addresses (numbers) freed since
        self.reserved = {}          # device_id -> the address (number) the operator pinned for it
        self.reserved_numbers = {}  # ... and back: no other device gets these
        self.dirty = False
        self.save_failed = False    # a new lease is not on disk yet: save at the next tick

    def subnet_text(self):
        return "%s/%d" % (ipv4_text(packed_address(self.network)), self.prefix_length)

    def capacity(self):
        return self.last_host - self.first_host + 1

    def load(self):
        """Read the lease file, then the journal of the changes since."""
        self.load_table()
        self.replay_journal()

    def load_table(self):
        """A corrupt lease file, or one for another subnet (a server started with a default
        config after a reinstall), is kept aside and reported, never overwritten."""
        try:
            with open(self.path) as source:
                stored = json.load(source)
            entries = stored["leases"].items()
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as error:
            self.set_aside("corrupt", "is unreadable (%s)" % error)
            return
        if stored.get("subnet", self.subnet_text()) != self.subnet_text():
            self.set_aside("subnet-%s" % str(stored["subnet"]).replace("/", "_"),
                           "holds the leases of subnet %s, not of %s (is this the right config?); put "
                           "it back as %s with that subnet configured to keep those addresses"
                           % (stored["subnet"], self.subnet_text(), os.path.basename(self.path)))
            return
        for device_id, lease in entries:
            self._restore(device_id, lease)

    def replay_journal(self):
        """After load(): the changes since leases.json was written, then fold them into it. A
        line that repeats what the table holds (a crash between the two) changes nothing."""
        try:
            with open(self.journal_path) as source:
                lines = source.read().splitlines()
        except FileNotFoundError:
            return
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
                if "forget" in entry:
                    if entry["forget"] in self.leases:
                        self._drop(entry["forget"], journal=False)
                    continue
                device_id = entry.pop("lease")
            except (ValueError, KeyError, TypeError, AttributeError):
                self.log.warning("lease journal %s line %d is unreadable; skipped" % (self.journal_path, number))
                continue
            held = self.leases.get(device_id)
            if held is not None:            # a proven trial, or a line the table holds already
                self._drop(device_id, journal=False)
            self._restore(device_id, entry)
        self.journal_lines = len(lines)
        if lines:
            try:
                self.save()
            except OSError as error:
                self.log.error("cannot fold the lease journal into %s: %s" % (self.path, describe_error(error)))

    def set_aside(self, why, problem):
        aside = "%s.%s-%d" % (self.path, why, time.time())
        os.replace(self.path, aside)
        if why.startswith("subnet") and os.path.exists(self.journal_path):
            os.replace(self.journal_path, aside + ".journal")   # that subnet's changes go with it
        self.log.error("lease file %s %s; moved it to %s and starting empty" % (self.path, problem, aside))

    def _restore(self, device_id, lease):
        try:
            packed = socket.inet_aton(lease["address"])
            check_device_id(device_id)
            last_seen = float(lease.get("last_seen", 0))
            trial = lease.get("trial") is True      # a lease file from before trials: proven
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            self.log.warning("ignoring malformed lease for %r" % device_id)
            return
        number = struct.unpack("!I", packed)[0]
        if not self.first_host <= number <= self.last_host or packed in self.owner_of:
            self.log.warning("dropping lease %s -> %s: outside %s or taken"
                             % (device_id, lease["address"], self.subnet_text()))
            return
        self.leases[device_id] = {"address": lease["address"], "last_seen": last_seen}
        self.owner_of[packed] = device_id
        if trial:
            self.leases[device_id]["trial"] = True
            self.on_trial.add(device_id)

    def save(self):
        """Write the table atomically: a crash leaves the old file or the new one, never half.
        One line of JSON: indent= would take json's Python encoder, 3x slower (50 ms at 5,000
        leases, a stall of the loop)."""
        temporary = self.path + ".tmp"
        with open(temporary, "w") as sink:
            sink.write(json.dumps({"subnet": self.subnet_text(), "leases": self.leases}, sort_keys=True))
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(temporary, self.path)
        directory = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        self.dirty = self.save_failed = False
        if self.journal is not None:            # all of it is in the table now
            os.ftruncate(self.journal, 0)
        elif self.journal_lines:
            os.truncate(self.journal_path, 0)
        self.journal_lines, self.unsynced = 0, False

    def append(self, entry):
        """One change as one line at the end of the journal: in the kernel before the device
        hears of it, so a SIGKILL loses nothing; on disk at the next sync_journal()."""
        if self.journal is None:
            self.journal = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        line = (json.dumps(entry, sort_keys=True) + "\n").encode("ascii")
        if os.write(self.journal, line) != len(line):
            raise OSError(errno.ENOSPC, "short write to %s" % self.journal_path)
        self.journal_lines += 1
        self.unsynced = True

    def sync_journal(self):
        """Each tick: fsync what the journal got; fold it into the table once it is long. The
        fold is O(leases), once per as many new leases: O(1) each."""
        if self.unsynced:
            os.fsync(self.journal)
            self.unsynced = False
        if self.journal_lines > max(JOURNAL_COMPACT_LINES, len(self.leases)):
            self.save()

    def set_reservations(self, reservations):
        """reservations: [(device_id, number, where)]. The problems, one line each, of those that
        cannot hold yet (another device's lease has the address): they wait for it to go."""
        self.reserved = {device_id: number for device_id, number, _ in reservations}
        self.reserved_numbers = {number: device_id for device_id, number, _ in reservations}
        problems = []
        for device_id, number, where in reservations:
            owner = self.owner_of.get(packed_address(number))
            if owner is not None and owner != device_id:
                problems.append("%s: %s is leased to %s: %s keeps its own address until that lease is gone "
                                "(forget %s)" % (where, ipv4_text(packed_address(number)), owner, device_id, owner))
        return problems

    def lease_for(self, device_id, online, now):
        """The packed address of device_id, allocating and saving one if it has none, or its
        reserved one once that is free (a device with another lease moves there).

        online: device_ids connected now, whose addresses are never reclaimed. If the save
        fails (disk full, out of fds) the lease still holds and the table stays dirty, so the
        next housekeeping tick tries again: the device is not turned away for it.
        """
        lease = self.leases.get(device_id)
        reserved = self.reserved.get(device_id)
        if reserved is not None and packed_address(reserved) not in self.owner_of:
            if lease is not None:
                self.log.info("device %s moves from %s to %s, reserved for it" % (
                    device_id, lease["address"], ipv4_text(packed_address(reserved))))
                self._drop(device_id)
            lease = {"address": ipv4_text(packed_address(reserved)), "last_seen": now}
            self.leases[device_id] = lease
            self.owner_of[packed_address(reserved)] = device_id
            self.dirty = True
            self.record(dict(lease, lease=device_id))
        if lease is None:
            number = self._free_address(online, now)
            lease = {"address": ipv4_text(packed_address(number)), "last_seen": now}
            if self.trial_s:
                lease["trial"] = True
                self.on_trial.add(device_id)
            self.leases[device_id] = lease
            self.owner_of[packed_address(number)] = device_id
            self.dirty = True
            self.record(dict(lease, lease=device_id))
        return socket.inet_aton(lease["address"])

    def record(self, entry):
        """append(entry); if the disk fails, the lease still holds and the table stays dirty,
        so the next tick saves it whole: the device is not turned away for it."""
        try:
            self.append(entry)
        except OSError as error:
            self.save_failed = True
            self.log.error("cannot save leases to %s: %s; retrying" % (self.journal_path, describe_error(error)))

    def forget(self, device_id):
        """Drop device_id's lease, saved at once: its address is free again. The address."""
        address = self._drop(device_id)
        self.save()
        return address

    def _drop(self, device_id, journal=True):
        lease = self.leases.pop(device_id)
        packed = socket.inet_aton(lease["address"])
        self.owner_of.pop(packed, None)
        heapq.heappush(self.given_back, struct.unpack("!I", packed)[0])
        self.on_trial.discard(device_id)
        self.dirty = True
        if journal:
            self.record({"forget": device_id})
        return lease["address"]

    def expire_trials(self, members, now):
        """Prove the trial leases whose devices have stayed trial_s (members: device_id -> its
        connection, with connected_since), and drop those of devices gone for trial_s. The
        device_ids dropped; the caller saves."""
        dropped = []
        for device_id in list(self.on_trial):
            member = members.get(device_id)
            since = (member and member.connected_since) if self.trial_s else now   # 0: no trials any more
            if since is not None:
                if now - since >= self.trial_s:
                    lease = self.leases[device_id]
                    del lease["trial"]
                    self.on_trial.discard(device_id)
                    self.dirty = True
                    self.record(dict(lease, lease=device_id))
            elif now - self.leases[device_id]["last_seen"] >= self.trial_s:
                self._drop(device_id)
                dropped.append(device_id)
        return dropped

    def touch(self, device_id, now):
        if device_id in self.leases:
            self.leases[device_id]["last_seen"] = now
            self.dirty = True

    def _free_address(self, online, now):
        while self.given_back:
            number = heapq.heappop(self.given_back)
            if packed_address(number) not in self.owner_of and number not in self.reserved_numbers:
                return number
        for _ in range(self.capacity()):        # one lap from the cursor at most
            number = self.cursor
            self.cursor = number + 1 if number < self.last_host else self.first_host
            if packed_address(number) not in self.owner_of and number not in self.reserved_numbers:
                return number
        stale = [(self.leases[device_id]["last_seen"], device_id) for device_id in self.on_trial
                 if device_id not in online]       # on trial and gone: these go first, however fresh
        stale = stale or [(lease["last_seen"], device_id) for device_id, lease in self.leases.items()
                          if device_id not in online and now - lease["last_seen"] > LEASE_RECLAIM_AFTER_S
                          and device_id not in self.reserved]     # a reserved address stays its device's
        if not stale:
            raise PoolExhausted("address pool %s is full: all %d client addresses are leased"
                                % (self.subnet_text(), self.capacity()))
        _, evicted = min(stale)
        trial = evicted in self.on_trial
        packed = socket.inet_aton(self._drop(evicted))
        self.given_back.remove(struct.unpack("!I", packed)[0])     # it is the newcomer's now
        heapq.heapify(self.given_back)
        self.log.info("reclaimed %s from %s, %s" % (ipv4_text(packed), evicted, "whose lease was on trial"
                      if trial else "offline for more than %d days" % (LEASE_RECLAIM_AFTER_S // 86400)))
        return struct.unpack("!I", packed)[0]


class RateBudget:
    """A token bucket: rate units a second, holding at most one second's worth."""

    __slots__ = ("rate", "tokens", "stamp")

    def __init__(self, rate, now):
        self.rate = float(rate)
        self.tokens = self.rate
        self.stamp = now

    def take(self, amount, now):
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if amount > self.tokens:
            return False
        self.tokens -= amount
        return True


class MulticastBudget:
    """What one member may send to everyone: packets and bytes a second, both."""

    __slots__ = ("rates", "packets", "bytes")

    def __init__(self, rates, now):
        self.rates = rates
        self.packets = RateBudget(rates[0], now)
        self.bytes = RateBudget(rates[1], now)

    def take(self, size, now):
        if self.packets.take(1, now):
            if self.bytes.take(size, now):
                return True
            self.packets.tokens += 1
        return False


EVERYONE = object()     # RouteTable.decide's target for a broadcast or a relayed group


class RouteTable:
    """Which member of the virtual network owns which address: clients and the server's TUN."""

    def __init__(self, broadcast=None, groups=()):
        self.by_address = {}        # packed address -> member
        self.by_device = {}         # device_id -> member
        self.broadcasts = {LIMITED_BROADCAST, broadcast}
        self.groups = set(groups)   # operator's multicast_groups, beside the link-local ones
        self.prefixes = []          # granted routes: [(network number, prefix length, bits, device_id)]

    def add(self, member):
        for address in (member.address,) + member.addresses6:
            self.by_address[address] = member
        self.by_device[member.device_id] = member

    def remove(self, member):
        """Forget member, unless a newer member already took its address or device_id."""
        for address in (member.address,) + member.addresses6:
            if self.by_address.get(address) is member:
                del self.by_address[address]
        if self.by_device.get(member.device_id) is member:
            del self.by_device[member.device_id]

    def members(self):
        return self.by_device.values()

    def set_prefixes(self, routes):
        """routes: [(packed network, prefix length, gateway device_id, ...)]; longest first."""
        self.prefixes = sorted(((int.from_bytes(network, "big"), length, len(network) * 8, device_id)
                                for network, length, device_id, *_ in routes), key=lambda route: -route[1])

    def gateway_for(self, address):
        """The device_id of the gateway whose granted network holds the packed address, or None."""
        number, bits = int.from_bytes(address, "big"), len(address) * 8
        for network, length, width, device_id in self.prefixes:
            if width == bits and number >> (bits - length) == network >> (bits - length):
                return device_id
        return None

    def via_gateway(self, destination, sender):
        gateway = self.gateway_for(destination) if self.prefixes else None
        if gateway is None:
            return None, "unknown destination"
        target = self.by_device.get(gateway)
        if target is None:
            return None, "its gateway is offline"
        if target is sender:
            return None, "to its own routed network"
        return target, None

    def decide(self, packet, sender, offset=0):
        """(member to deliver to, None) or (None, drop reason) for a well-formed IP packet
        that starts at packet[offset]."""
        if packet[offset] >> 4 == 6:
            return self.decide6(packet, sender, offset)
        source, destination = packet[offset + 12:offset + 16], bytes(packet[offset + 16:offset + 20])
        if source != sender.address and not (self.prefixes and self.gateway_for(bytes(source)) == sender.device_id):
            return None, "spoofed source"
        target = self.by_address.get(destination)
        if target is None:
            if destination in self.broadcasts or is_local_group(destination) or destination in self.groups:
                return EVERYONE, None
            if is_ipv4_multicast(destination):
                return None, "multicast group not relayed (multicast_groups)"
            return self.via_gateway(destination, sender)
        return target, None

    def decide6(self, packet, sender, offset):
        """decide for IPv6: the sender's own two addresses only; to a member's, or to everyone."""
        if not sender.addresses6:
            return None, "IPv6 is off in this network (ipv6 = no)"
        source, destination = bytes(packet[offset + 8:offset + 24]), bytes(packet[offset + 24:offset + 40])
        if source not in sender.addresses6 and not (self.prefixes and self.gateway_for(source) == sender.device_id):
            return None, "spoofed source"
        target = self.by_address.get(destination)
        if target is None:
            if is_link_local_group6(destination) or destination in self.groups:
                return EVERYONE, None
            if destination[0] == 0xFF:
                return None, "multicast group not relayed (multicast_groups)"
            return self.via_gateway(destination, sender)
        return target, None


class StreamRefused(Exception):
    """A stream cannot be opened; code is a RESET_* value."""

    def __init__(self, code, text):
        Exception.__init__(self, text)
        self.code = code


class RelayedStream:
    """One stream between two stream sessions: two (session, stream id) ends.

    credit[i] is how many bytes end i may still send: what the other end granted (OPEN/ACCEPT
    windows, then WINDOW increments) minus what end i sent. Relayed bytes wait in the
    receiver's send queue, so credit is also what bounds the server's memory per stream.
    """

    def __init__(self, opener, opener_id, listener, listener_id, opener_window, label):
        self.ends = [(opener, opener_id), (listener, listener_id)]
        self.credit = [0, opener_window]    # the opener may send once the listener ACCEPTs
        self.accepted = False
        self.eof = [False, False]
        self.label = label

    def other(self, index):
        return self.ends[1 - index]


class StreamSwitch:
    """Virtual ports, service names and the streams between stream sessions."""

    def __init__(self, log, max_window_bytes, max_streams_per_session, device_of, online, permits,
                 names, name_problem, new_name_budget):
        """device_of(name): the device_id a virtual IP or device_id names, or None;
        online(device_id): whether any session of that device is connected;
        permits(from device, to device, port): whether the access policy lets a stream through;
        names: the ServiceNames claimed; name_problem(device_id, name): why that device may not
        offer a service by that name, or None; new_name_budget(source address): whether one more
        name or listener may be recorded for it this minute (and counts it)."""
        self.log = log
        self.device_of = device_of
        self.online = online
        self.permits = permits
        self.names = names
        self.name_problem = name_problem
        self.new_name_budget = new_name_budget
        self.max_window_bytes = max_window_bytes
        self.max_streams = max_streams_per_session
        self.listeners = {}         # (device_id, port) -> session
        self.services = {}          # service name -> (session, port)
        self.version = 0            # bumped when a name comes or goes: the directory is stale
        self.streams = {}           # (session, stream id) -> (RelayedStream, end index)
        self.open_counts = {}       # session -> streams it takes part in
        self.next_server_id = 2     # ids the server gives streams it opens towards listeners

    # -- ports and names --

    def listen(self, session, port, service):
        """Give session the port (and the service name), or ListenRefused: that LISTEN only."""
        key = (session.device_id, port)
        holder = self.listeners.get(key)
        if holder is not None and holder is not session:
            raise ListenRefused(ERROR_PORT_TAKEN, "virtual port %d of %s is taken by another listener (%s)"
                                % (port, session.device_id, holder.remote))
        if service:
            problem = self.name_problem(session.device_id, service)
            if problem:
                raise ListenRefused(ERROR_NAME_TAKEN, problem)
            taken = self.services.get(service)
            if taken is not None and taken[0] is not session:       # the same device, another session
                raise ListenRefused(ERROR_PORT_TAKEN, "service name %s is offered by another session of %s "
                                    "(%s, port %d)" % (service, session.device_id, taken[0].remote, taken[1]))
            renamed = [n for n, (holder, p) in self.services.items() if holder is session and p == port]
            own = sum(1 for holder, _ in self.services.values() if holder is session) - len(renamed)
            if own >= MAX_SERVICES_PER_SESSION or len(self.services) - len(renamed) >= MAX_SERVICES:
                raise ListenRefused(ERROR_LIMIT, "too many service names (%d per session, %d in all)"
                                    % (MAX_SERVICES_PER_SESSION, MAX_SERVICES))
            if self.names.owner(service) is None and not self.new_name_budget(session.remote_ip()):
                raise ListenRefused(ERROR_LIMIT, "more new service names from %s within a minute than "
                                    "max_new_leases_per_minute; try again later" % session.remote_ip())
            for name in renamed:
                del self.services[name]     # one name per port: a new LISTEN renames it
            self.names.claim(service, session.device_id)
            self.services[service] = (session, port)
            self.version += 1
        if session.address == NO_ADDRESS and session.device_id not in self.names.listeners \
                and self.new_name_budget(session.remote_ip()):     # minted ones cannot push real ones out
            self.names.note_listener(session.device_id, time.time())
        self.listeners[key] = session

    def forget_session(self, session, why):
        """session is gone: release its ports and names, reset its streams' other ends."""
        for key in [k for k, holder in self.listeners.items() if holder is session]:
            del self.listeners[key]
        for name in [n for n, (holder, _) in self.services.items() if holder is session]:
            del self.services[name]
            self.version += 1
        for (holder, stream_id), (stream, index) in list(self.streams.items()):
            if holder is session:
                self.reset_other_end(stream, index, RESET_RELAY_LOST, why)
                self.remove(stream)
        self.open_counts.pop(session, None)

    # -- streams --

    def open(self, opener, stream_id, port, window, target):
        """Pair a new stream from opener with the listener target names, or StreamRefused."""
        if stream_id % 2 == 0 or (opener, stream_id) in self.streams:
            raise ProtocolError("OPEN with stream id %d, which is not a free odd id" % stream_id)
        self.check_window(window)
        device_id, port = self.resolve(target, port)
        if not self.permits(opener.device_id, device_id, port):
            raise StreamRefused(RESET_DENIED, "the relay's policy does not let %s reach port %d of %s"
                                % (opener.device_id, port, device_id))
        listener = self.listeners.get((device_id, port))
        if listener is None:
            raise StreamRefused(RESET_REFUSED, "nothing listens on port %d of %s" % (port, device_id))
        for session in (opener, listener):
            if self.open_counts.get(session, 0) >= self.max_streams:
                raise StreamRefused(RESET_LIMIT, "%s has %d streams open already"
                                    % (session.device_id, self.max_streams))
        listener_id = self.next_server_id
        while (listener, listener_id) in self.streams:      # after a wrap-around
            listener_id = (listener_id + 2) % 0x100000000 or 2
        self.next_server_id = (listener_id + 2) % 0x100000000 or 2
        label = "%s:%d" % (device_id, port)
        stream = RelayedStream(opener, stream_id, listener, listener_id, window, label)
        self.streams[(opener, stream_id)] = (stream, 0)
        self.streams[(listener, listener_id)] = (stream, 1)
        for session in (opener, listener):
            self.open_counts[session] = self.open_counts.get(session, 0) + 1
        caller = opener.label()
        listener.send_frame(FRAME_OPEN, encode_open(listener_id, port, window, caller))
        self.log.debug("stream %s -> %s opened" % (caller, label))

    def resolve(self, target, port):
        """(device_id, port) that target names: a virtual IP, a device_id, a service name, or
        DEVICE/SERVICE: that service only if it is that device's."""
        pinned, _, service = target.rpartition("/")
        if pinned:
            owner = self.names.owner(service)
            if owner != pinned:
                raise StreamRefused(RESET_UNKNOWN_PEER, "%s has no service called %s%s" % (
                    pinned, service, " (that name is %s's)" % owner if owner else ""))
            entry = self.services.get(service)
            if entry is None:
                raise StreamRefused(RESET_UNREACHABLE, "%s does not offer %s now" % (pinned, service))
            device_id, port = owner, port or entry[1]
        else:
            device_id = self.device_of(target)
        if device_id is None:
            entry = self.services.get(target)
            if entry is None:
                raise StreamRefused(RESET_UNKNOWN_PEER, "no device, address or service is called %s" % target)
            device_id, port = entry[0].device_id, port or entry[1]
        if not port:
            raise StreamRefused(RESET_REFUSED, "no port given for %s" % target)
        if not self.online(device_id):
            raise StreamRefused(RESET_UNREACHABLE, "%s is not connected to the relay" % target)
        return device_id, port

    def accept(self, session, stream_id, window):
        stream, index = self.lookup(session, stream_id)
        if stream is None:
            return
        if index != 1 or stream.accepted:
            raise ProtocolError("ACCEPT for stream %d, which this side did not receive" % stream_id)
        self.check_window(window)
        stream.accepted = True
        stream.credit[0] = window
        opener, opener_id = stream.ends[0]
        opener.send_frame(FRAME_ACCEPT, encode_accept(opener_id, window, session.label()))

    def data(self, session, stream_id, data):
        stream, index = self.lookup(session, stream_id)
        if stream is None:
            return                      # the stream was reset while this was on its way
        if stream.eof[index]:
            raise ProtocolError("DATA on stream %d after its EOF" % stream_id)
        if len(data) > stream.credit[index]:
            raise ProtocolError("stream %d: %d bytes sent with only %d bytes of window"
                                % (stream_id, len(data), stream.credit[index]))
        stream.credit[index] -= len(data)
        receiver, receiver_id = stream.other(index)
        receiver.bytes_out += len(data)
        receiver.send_parts(FRAME_DATA, data_frame_head(receiver_id, data), data)

    def window(self, session, stream_id, increment):
        stream, index = self.lookup(session, stream_id)
        if stream is None:
            return
        credit = stream.credit[1 - index] + increment
        self.check_window(credit)
        stream.credit[1 - index] = credit
        sender, sender_id = stream.other(index)
        sender.send_frame(FRAME_WINDOW, encode_window(sender_id, increment))

    def eof(self, session, stream_id):
        stream, index = self.lookup(session, stream_id)
        if stream is None:
            return
        stream.eof[index] = True
        receiver, receiver_id = stream.other(index)
        receiver.send_frame(FRAME_EOF, encode_eof(receiver_id))
        if all(stream.eof):
            self.remove(stream)

    def reset(self, session, stream_id, code, text):
        stream, index = self.lookup(session, stream_id)
        if stream is not None:
            self.reset_other_end(stream, index, code, text)
            self.remove(stream)

    def reset_other_end(self, stream, index, code, text):
        receiver, receiver_id = stream.other(index)
        if receiver.stage == "established":
            receiver.send_frame(FRAME_RESET, encode_reset(receiver_id, code, text))

    def lookup(self, session, stream_id):
        return self.streams.get((session, stream_id), (None, None))

    def remove(self, stream):
        for end in stream.ends:
            if self.streams.pop(end, None) is not None:
                self.open_counts[end[0]] = self.open_counts.get(end[0], 1) - 1

    def check_window(self, window):
        if window > self.max_window_bytes:
            raise ProtocolError("a window of %d bytes exceeds the relay's %d"
                                % (window, self.max_window_bytes))


REVOKED = "revoked"


class DeviceKeys:
    """keys_file: a secret per device, so that one device can be revoked without re-keying all.

    One line per device, '#' starts a comment:
        DEVICE_ID  SECRET       the device proves this secret instead of the network secret
        DEVICE_ID  revoked      the device may not join at all
    """

    def __init__(self, path, cache=None):
        """Raises ValueError naming the line. cache: the key derivations of a previous load.
        derive(network_salt) then makes the keys."""
        self.path = path
        self.secrets = {}
        self.keys = {}
        self.cache = {} if cache is None else cache
        with open(path, encoding="utf-8") as source:
            for number, line in enumerate(source, 1):
                words = line.split("#", 1)[0].split()
                if not words:
                    continue
                if len(words) != 2:
                    raise ValueError("%s line %d: want DEVICE_ID SECRET or DEVICE_ID revoked" % (path, number))
                try:
                    device_id = check_device_id(words[0])
                    secret = words[1] if words[1] == REVOKED else check_secret(words[1])
                except ValueError as error:
                    raise ValueError("%s line %d: %s" % (path, number, error))
                if device_id in self.secrets:
                    raise ValueError("%s line %d: %s is listed twice" % (path, number, device_id))
                self.secrets[device_id] = secret

    def derive(self, network_salt):
        """Every device's key, now (PBKDF2), not while a client waits in the loop. The cache
        keeps only what this load uses, so reloads do not grow it."""
        used = {}
        for device_id, secret in self.secrets.items():
            if secret != REVOKED:
                known = self.cache.get((secret, network_salt))
                self.keys[device_id] = used[(secret, network_salt)] = known or network_key(secret, network_salt)
        self.cache.clear()
        self.cache.update(used)

    def __len__(self):
        return len(self.secrets)

    def revoked(self):
        return sorted(d for d, secret in self.secrets.items() if secret == REVOKED)


IPV6_EXTENSION_HEADERS = (0, 43, 60)   # hop-by-hop, routing, destination options: (n + 1) * 8 bytes
IPV6_FRAGMENT, IPV6_AUTHENTICATION = 44, 51


def ipv6_upper_layer(packet, offset):
    """(protocol, its offset) past the extension headers of an IPv6 packet, as the receiving
    stack finds it, so that no header in front hides a port from the policy; (None, None) for a
    fragment after the first (no port, as in IPv4) or headers that run past the packet."""
    next_header, at = packet[offset + 6], offset + IPV6_HEADER_BYTES
    for _ in range(8):
        if next_header not in IPV6_EXTENSION_HEADERS + (IPV6_FRAGMENT, IPV6_AUTHENTICATION):
            return next_header, at
        if len(packet) < at + 8:
            return None, None
        if next_header == IPV6_FRAGMENT:
            if struct.unpack_from("!H", packet, at + 2)[0] & 0xFFF8:
                return None, None
            length = 8
        elif next_header == IPV6_AUTHENTICATION:
            length = (packet[at + 1] + 2) * 4
        else:
            length = (packet[at + 1] + 1) * 8
        next_header, at = packet[at], at + length
    return None, None


def destination_port(packet, offset):
    """The TCP or UDP destination port of an IP packet, for port rules; None for other
    protocols and for fragments after the first, which carry no port header (IPv6: also when
    an extension header comes first)."""
    if packet[offset] >> 4 == 6:
        next_header, at = ipv6_upper_layer(packet, offset)
        if next_header not in (6, 17) or len(packet) < at + 4:
            return None
        return struct.unpack_from("!H", packet, at + 2)[0]
    if len(packet) < offset + 20 or packet[offset + 9] not in (6, 17):
        return None
    if struct.unpack_from("!H", packet, offset + 6)[0] & 0x1FFF:
        return None
    start = offset + (packet[offset] & 0x0F) * 4
    if len(packet) < start + 4:
        return None
    return struct.unpack_from("!H", packet, start + 2)[0]


ICMPV6 = 58
MLD_TYPES = (130, 131, 132, 143)        # listener query, report, done; MLDv2 report
NEIGHBOUR_DISCOVERY_TYPES = range(133, 138)     # router solicitation ... redirect


def link_chatter(packet, offset):
    """Why a packet to everyone is the link's own business, not the members', or None: IGMP
    and MLD (the relay copies every group to everyone, so nobody need join one), and IPv6
    neighbour discovery, which a point-to-point TUN does without (no link-layer addresses to
    resolve, no router to find: each device's address comes in WELCOME)."""
    if packet[offset] >> 4 != 6:
        if packet[offset + 9] == IGMP_PROTOCOL:
            return "IGMP (the relay copies groups to everyone: no membership needed)"
        return None
    next_header, at = ipv6_upper_layer(packet, offset)      # MLD comes after a hop-by-hop header
    if next_header == ICMPV6 and len(packet) > at:
        if packet[at] in MLD_TYPES:
            return "MLD (the relay copies groups to everyone: no membership needed)"
        if packet[at] in NEIGHBOUR_DISCOVERY_TYPES:
            return "neighbour discovery (not needed on a point-to-point link)"
    return None


class Policy:
    """policy_file: who may reach whom. Rules are read top down and the first that matches
    decides; with no rule matching, traffic is allowed.

        group NAME = DEVICE_ID ...              name a set of devices (use it as @NAME)
        allow|deny FROM -> TO [port N[,M...]]   FROM and TO: a device_id, @NAME, *, or a
                                                network (192.0.2.0/24: a packet's address)
        name SERVICE[,SERVICE...] by WHO        only WHO (a device_id, @NAME or *) may offer
                                                these service names; SERVICE * is every name

    A rule with ports governs streams to those virtual ports and TUN packets to those TCP or
    UDP destination ports; one without governs all streams and packets. Packets are judged one
    by one in the direction they travel, so a TCP conversation over TUN needs both directions
    allowed (the replies go to the caller's own port). The relay host's own TUN is (server).
    Service names no name rule covers go to the first device that offers one (ServiceNames).
    """

    def __init__(self, path):
        self.path = path
        self.groups = {}
        self.rules = []             # (allow?, from, to, ports or None)
        self.name_rules = []        # (service names or None for all, who)
        self.verdicts = {}          # (from, to, port) -> allowed, for the packet path
        self.port_rules = False
        self.networks = {}          # a FROM or TO that names a network -> (number, prefix length, bits)
        with open(path, encoding="utf-8") as source:
            for number, line in enumerate(source, 1):
                words = line.split("#", 1)[0].split()
                if words:
                    try:
                        self.parse(words)
                    except ValueError as error:
                        raise ValueError("%s line %d: %s" % (path, number, error))

    def parse(self, words):
        if words[0] == "group":
            if len(words) < 3 or words[2] != "=":
                raise ValueError("want: group NAME = DEVICE_ID ...")
            self.groups[words[1]] = set(check_device_id(word) for word in words[3:])
            return
        if words[0] == "name":
            if len(words) != 4 or words[2] != "by":
                raise ValueError("want: name SERVICE[,SERVICE...] by DEVICE_ID|@GROUP|*")
            names = None if words[1] == "*" else set(check_device_id(name) for name in words[1].split(","))
            self.check_pattern(words[3])
            self.name_rules.append((names, words[3]))
            return
        if words[0] not in ("allow", "deny") or len(words) not in (4, 6) or words[2] != "->":
            raise ValueError("want: allow|deny FROM -> TO [port N[,M...]] or group NAME = ...")
        ports = None
        if len(words) == 6:
            if words[4] != "port":
                raise ValueError("want 'port N' after the TO")
            ports = set(parse_int(port, 1, 65535) for port in words[5].split(","))
        for pattern in (words[1], words[3]):
            self.check_pattern(pattern)
        self.rules.append((words[0] == "allow", words[1], words[3], ports))
        self.port_rules = self.port_rules or ports is not None

    def check_pattern(self, pattern):
        if "/" in pattern:              # a network: judged by the packet's own addresses
            network, length = parse_prefix(pattern)
            self.networks[pattern] = (int.from_bytes(network, "big"), length, len(network) * 8)
            return
        if pattern.startswith("@") and pattern[1:] not in self.groups:
            raise ValueError("group %s is not defined above" % pattern[1:])
        if pattern != "*" and not pattern.startswith("@") and pattern != "(server)":
            check_device_id(pattern)

    def may_offer(self, device_id, name):
        """Whether device_id may offer the service name: the first name rule that covers it
        decides; with none, whoever offers it first."""
        for names, who in self.name_rules:
            if names is None or name in names:
                return self.matches(who, device_id)
        return True

    def named_devices(self):
        """Every device_id a rule names, itself or through a group."""
        names = set()
        patterns = [(from_pattern, to_pattern) for _, from_pattern, to_pattern, _ in self.rules]
        for pair in patterns + [(who,) for _, who in self.name_rules]:
            for pattern in pair:
                if pattern.startswith("@"):
                    names |= self.groups[pattern[1:]]
                elif pattern not in ("*", "(server)") and pattern not in self.networks:
                    names.add(pattern)
        return names

    def matches(self, pattern, device_id):
        if pattern in self.networks:    # a stream has no addresses to match a network
            return False
        if pattern.startswith("@"):
            return device_id in self.groups[pattern[1:]]
        return pattern == "*" or pattern == device_id

    def permits_packet(self, source, target, port, addresses):
        """permits for a packet, when rules name networks: FROM and TO may match its source and
        destination addresses (packed) as well as the devices. Not cached: addresses are many."""
        for allow, from_pattern, to_pattern, ports in self.rules:
            if ports is not None and port not in ports:
                continue
            if self.matches_address(from_pattern, source, addresses[0]) and \
                    self.matches_address(to_pattern, target, addresses[1]):
                return allow
        return True

    def matches_address(self, pattern, device_id, address):
        network = self.networks.get(pattern)
        if network is None:
            return self.matches(pattern, device_id)
        number, length, bits = network
        return len(address) * 8 == bits and int.from_bytes(address, "big") >> (bits - length) == number >> (bits - length)

    def permits(self, source, target, port=None):
        """Whether source may reach target (a stream or a TCP/UDP packet to port; port None: a
        packet without one)."""
        if not self.port_rules:
            port = None                 # every port decides alike: one cached verdict for all
        verdict = self.verdicts.get((source, target, port))
        if verdict is None:
            verdict = True
            for allow, from_pattern, to_pattern, ports in self.rules:
                if ports is not None and port not in ports:
                    continue
                if self.matches(from_pattern, source) and self.matches(to_pattern, target):
                    verdict = allow
                    break
            if len(self.verdicts) > 65536:
                self.verdicts.clear()
            self.verdicts[(source, target, port)] = verdict
        return verdict


class Hooks:
    """on_join / on_leave scripts, as OpenVPN's client-connect: run without waiting, reaped later.

    The script gets MNEDC_EVENT, MNEDC_DEVICE_ID, MNEDC_VIRTUAL_IP and MNEDC_REMOTE_ADDRESS in
    its environment, with HOOK_PATH and nothing else of the daemon's (which may hold secrets, or
    LD_PRELOAD and PYTHON* settings meant for the daemon only). One that runs longer than
    HOOK_TIMEOUT_S is killed. At most MAX_RUNNING_HOOKS run at once (253 joins once left 506
    running): the next wait in a bounded queue, where a device's leave cancels its join that
    has not run yet (a flapping device), and past the queue they are dropped and counted.
    """

    def __init__(self, config, log):
        self.config = config
        self.log = log
        self.running = []           # (process, deadline, description)
        self.queue = []             # (event, device_id, path, environment, description)
        self.dropped = self.coalesced = 0

    def run(self, event, member):
        path = getattr(self.config, "on_" + event)
        if not path:
            return
        environment = dict(PATH=HOOK_PATH, MNEDC_EVENT=event, MNEDC_DEVICE_ID=member.device_id,
                           MNEDC_VIRTUAL_IP=ipv4_text(member.address), MNEDC_REMOTE_ADDRESS=member.remote)
        description = "on_%s hook %s for %s" % (event, path, member.device_id)
        job = (event, member.device_id, path, environment, description)
        if len(self.running) < MAX_RUNNING_HOOKS and not self.queue:
            self.start(job)
            return
        opposite = [i for i, queued in enumerate(self.queue) if queued[1] == member.device_id]
        if opposite and event == "leave" and self.queue[opposite[-1]][0] == "join":
            del self.queue[opposite[-1]]            # joined and left before its hook ran: neither
            self.coalesced += 1
        elif len(self.queue) < MAX_QUEUED_HOOKS:
            self.queue.append(job)
        else:
            self.dropped += 1
            self.log.limited("hooks", "warning", "%d hooks running and %d waiting: dropped %s (%d dropped "
                             "so far)" % (len(self.running), len(self.queue), description, self.dropped))

    def start(self, job):
        event, device_id, path, environment, description = job
        try:
            process = subprocess.Popen([path], env=environment, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError as error:
            self.log.error("cannot run %s: %s" % (description, describe_error(error)))
            return
        self.running.append((process, time.monotonic() + HOOK_TIMEOUT_S, description))

    def reap(self):
        """Now and then: collect finished hooks, kill overdue ones, start the queue's next."""
        still = []
        for process, deadline, description in self.running:
            status = process.poll()
            if status is None and time.monotonic() > deadline:
                process.kill()
                process.wait()
                self.log.error("%s ran longer than %d s: killed" % (description, HOOK_TIMEOUT_S))
            elif status is None:
                still.append((process, deadline, description))
            elif status != 0:
                self.log.warning("%s exited with status %d" % (description, status))
        self.running = still
        while self.queue and len(self.running) < MAX_RUNNING_HOOKS:
            self.start(self.queue.pop(0))


# ==== CONNECTIONS ====
#
# A client connection moves through these stages:
#
#   stage        waits for         then
#   hello        HELLO             send CHALLENGE                         -> auth
#   auth         AUTH              check proof, lease, send WELCOME       -> established
#   established  PACKET/PING/...   route packets, answer pings
#   finishing    EOF or 2 s        after ERROR: let the peer read it      -> closed
#
# A handshake that takes longer than HANDSHAKE_TIMEOUT_S is refused with ERROR timeout.

class RelayListener:
    """The listening TCP socket: hands each accepted socket to the server."""

    def __init__(self, server, sock):
        self.server = server
        self.sock = sock

    def fileno(self):
        return self.sock.fileno()

    def on_readable(self):
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                sock, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:        # EMFILE and friends: make room, or pause
                self.server.log.limited("accept", "error", "accept failed: %s" % describe_error(error))
                if self.server.shed_oldest_handshake("out of file descriptors"):
                    continue
                self.server.loop.set_interest(self, 0)      # else the loop would spin on it
                self.server.loop.call_later(ACCEPT_PAUSE_S, self.resume)
                return
            self.server.accept(sock, address)

    def resume(self):
        if self.sock.fileno() >= 0:
            self.server.loop.set_interest(self, selectors.EVENT_READ)

    def on_writable(self):
        pass

    def close(self, reason):
        self.server.log.info("stopped listening: %s" % reason)
        self.server.loop.forget(self)
        self.sock.close()

    def __repr__(self):
        return "RelayListener(%s:%d)" % self.sock.getsockname()[:2]


class ClientConnection(FrameTransport):
    """One client's TCP connection, from HELLO to close; routes what it receives."""

    BATCHED = (FRAME_PACKET, FRAME_VNET_PACKET, FRAME_DATA)

    def __init__(self, server, sock, remote):
        self.server = server
        self.start_transport(sock, server.loop, server.batcher)
        self.remote = "%s:%d" % remote[:2]
        self.stage = "hello"
        self.certificate_names = None       # with client certificates: the names the client proved
        self.tls = server.config.tls_context is not None
        self.first_bytes_seen = False       # a TLS relay looks at them once: TLS or a plain HELLO?
        if self.tls:
            self.stage = "tls"              # wrapped once the first bytes say it is TLS
        self.device_id = None
        self.address = None
        self.addresses6 = ()                # a TUN member's IPv6 addresses (network /64, link-local)
        self.streams_session = False        # a listen/connect session rather than a TUN member
        self.reader = FrameReader(receive_bytes=RECV_BYTES)
        self.frames_waiting = False         # more than FRAMES_PER_WAKEUP came: the rest next turn
        self.client_nonce = self.server_nonce = self.key = None
        now = time.monotonic()
        self.deadline = now + HANDSHAKE_TIMEOUT_S
        self.last_received = self.last_ping = now
        self.keepalive_timer = None         # once established: keep_alive's
        self.connected_since = None
        self.packets_in = self.packets_out = self.bytes_in = self.bytes_out = 0
        self.drops = {}
        self.services_tokens, self.services_at = SERVICES_BURST, now      # SERVICES answered: a bucket
        self.multicast_budget = None        # a MulticastBudget, from its first broadcast on

    def __repr__(self):
        return "ClientConnection(%s from %s, %s)" % (self.device_id, self.remote, self.stage)

    def label(self):
        """How the other end of a stream is told who this is: "kitchen-pi (198.18.0.7)"."""
        return self.device_id if self.address == NO_ADDRESS else "%s (%s)" % (self.device_id, ipv4_text(self.address))

    def name(self):
        if self.address == NO_ADDRESS:
            return "device %s" % self.device_id
        if self.address is not None:
            return "device %s (%s)" % (self.device_id, ipv4_text(self.address))
        if self.device_id is not None:
            return "device %s from %s" % (self.device_id, self.remote)
        return "connection from %s" % self.remote

    # -- receiving, in the order a frame travels --

    def on_readable(self):
        if self.stage == "tls":
            self.continue_tls()
            return
        if self.stage == "hello" and not self.tls and not self.first_bytes_seen and self.speaks_tls():
            self.refuse(ERROR_PROTOCOL, "this relay does not speak TLS (tls = no here): on the client "
                        "remove server_pin and tls_ca, or set tls = yes on the relay")
            return
        if self.frames_waiting:
            return                          # the buffer's frames first (a writable event re-armed us)
        self.read_frames()
        while self.tls_pending() and not self.frames_waiting:
            self.read_frames()

    def read_frames(self):
        try:
            received = self.reader.receive(self.sock.recv_into)
        except BlockingIOError:             # a TLS record is not complete yet
            return
        if not received:
            self.close("closed by peer" if self.stage != "finishing" else self.finish_reason)
            return
        if self.stage == "finishing":
            self.reader.discard()           # the peer's last words after our ERROR: ignored
            return
        self.last_received = time.monotonic()
        self.handle_frames()

    def handle_frames(self):
        """Up to FRAMES_PER_WAKEUP of the frames received; more wait for the loop's next turn,
        and so does reading, so every other connection is served in between."""
        self.server.batcher.begin()
        try:
            frames = self.reader.take_frames(FRAMES_PER_WAKEUP)
            for frame_type, payload in frames:
                handlers = STREAM_HANDLERS if self.streams_session and self.stage == "established" \
                    else HANDLERS[self.stage]
                handlers.get(frame_type, ClientConnection.on_unexpected)(self, frame_type, payload)
                if self.stage in ("finishing", "closed"):
                    return
            if len(frames) == FRAMES_PER_WAKEUP:
                self.frames_waiting = True
                self.server.loop.set_interest(self, selectors.EVENT_WRITE if self.out else 0)
                self.server.loop.call_later(0, self.more_frames)
        except VersionMismatch as error:
            self.refuse(ERROR_VERSION, str(error))
        except ProtocolError as error:
            self.refuse(ERROR_PROTOCOL, str(error))
        finally:
            self.server.batcher.flush()

    def more_frames(self):
        if self.stage == "closed" or not self.frames_waiting:
            return
        self.frames_waiting = False
        self.server.loop.set_interest(self, selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0))
        if self.stage == "finishing":
            self.reader.discard()           # refused meanwhile: the rest goes unread, as in read_frames
            return
        self.handle_frames()
        if not self.frames_waiting and self.stage not in ("finishing", "closed") and self.tls_pending():
            self.on_readable()              # records OpenSSL holds: select would not wake us for them

    def speaks_tls(self):
        """Whether the first byte waiting is a TLS record's (22): a HELLO frame's is its length's
        high byte, 0."""
        try:
            first = self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        self.first_bytes_seen = True        # once: a HELLO split in two must not be judged twice
        return first == TLS_HANDSHAKE_RECORD

    def first_bytes_of_tls(self):
        """Before the handshake: whether the client's first bytes are a TLS record. True wraps
        the socket; False leaves it plaintext: answered in plaintext, the one language such a
        client understands, or served as it is with allow_plaintext. None: nothing came yet."""
        try:
            first = self.sock.recv(FRAME_HEADER.size, socket.MSG_PEEK)
        except BlockingIOError:
            return None
        self.first_bytes_seen = True
        if not first or first[:1] == TLS_HANDSHAKE_RECORD:
            self.sock = TlsTransport(self.server.config.tls_context, self.sock)
            return True
        return False

    def refuse_plaintext(self):
        try:
            self.sock.recv(RECV_BYTES)      # read it all, so close sends no RST
            self.sock.send(encode_frame(FRAME_ERROR, encode_error(
                ERROR_PROTOCOL, "the relay requires TLS: set server_pin = %s (or tls_ca) in [client]"
                % self.server.config.tls_pin)))
        except OSError:
            pass
        self.server.log.limited(("plain", self.remote_ip()), "warning", "refusing %s: a client without "
                                "TLS, and this relay requires it (told it so; allow_plaintext = yes "
                                "would take it)" % self.name())
        self.close("a client without TLS")

    def continue_tls(self):
        if not self.first_bytes_seen:
            speaks_tls = self.first_bytes_of_tls()
            if speaks_tls is None:
                return
            if not speaks_tls and not self.server.config.allow_plaintext:
                self.refuse_plaintext()
                return
            if not speaks_tls:              # allow_plaintext: this one goes without TLS
                self.tls, self.stage = False, "hello"
                self.server.log.debug("%s speaks plaintext (allow_plaintext = yes)" % self.name())
                self.on_readable()
                return
        try:
            events = self.sock.handshake()
        except OSError as error:
            self.server.log.limited(("tls", self.remote_ip()), "warning", "TLS handshake with %s failed: %s"
                                    % (self.remote, describe_error(error)))
            self.close("TLS handshake failed")
            return
        if events:
            self.server.loop.set_interest(self, events)
            return
        self.stage = "hello"
        if self.sock.verifies_peer():
            self.certificate_names = self.sock.peer_names()
        self.server.loop.set_interest(self, selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0))
        if self.sock.pending():             # the HELLO may have come with the handshake
            self.on_readable()

    def on_unexpected(self, frame_type, payload):
        name = FRAME_NAMES.get(frame_type, "unknown frame type %d" % frame_type)
        if self.stage == "established":
            raise ProtocolError("%s is not allowed after the handshake" % name)
        raise ProtocolError("%s before the handshake finished" % name)

    def on_hello(self, frame_type, payload):
        self.client_nonce, self.device_id, flags = decode_hello(payload)
        self.streams_session = bool(flags & HELLO_STREAMS)
        if self.certificate_names is not None and self.device_id not in self.certificate_names:
            self.refuse(ERROR_AUTH, "the client certificate is for %s, not for device %s"
                        % (" or ".join(self.certificate_names) or "no name", self.device_id))
            return
        self.key = self.server.key_for(self.device_id)[0]     # None: it may not join; said after AUTH
        self.server_nonce = os.urandom(NONCE_BYTES)
        self.send_frame(FRAME_CHALLENGE, encode_challenge(self.server_nonce, self.server.config.network_salt))
        self.stage = "auth"

    def on_auth(self, frame_type, payload):
        """The client's proof. Whatever is wrong, the client is told the same (AUTH_REFUSED):
        a stranger must not learn which device_ids the keys file lists or revokes; the log says
        what it was."""
        proof = decode_auth(payload)
        key, refusal = self.server.key_for(self.device_id)     # revoked while it answered?
        # the proof is checked whatever else is wrong, so a refusal takes as long either way
        matches = equal_digests(proof, client_proof(key or self.server.key, self.client_nonce, self.server_nonce,
                                                    self.device_id))
        if refusal is None and key != self.key:
            refusal = "the key of device %s changed during its handshake" % self.device_id
        if refusal is None and not matches:
            refusal = "wrong secret for %s (device %s)" % (
                "this device" if key is not self.server.key else "this network", self.device_id)
        if refusal:
            self.server.log.limited(("refuse", self.remote_ip()), "warning", "refusing %s: %s: %s"
                                    % (self.name(), ERROR_NAMES[ERROR_AUTH], refusal))
            self.refuse(ERROR_AUTH, AUTH_REFUSED, logged=True)
            return
        try:
            self.address = self.server.admit(self)
        except PoolExhausted as error:
            self.refuse(ERROR_POOL_FULL, str(error))
            return
        except TooManyNewLeases as error:
            self.refuse(ERROR_LIMIT, str(error))
            return
        except NameTaken as error:
            self.refuse(ERROR_NAME_TAKEN, str(error))
            return
        self.reader.max_payload = self.server.config.max_frame_bytes
        self.stage = "established"
        self.server.handshaking.pop(self, None)
        # each member's keepalive on a timer of its own, at a phase of its own: 5,000 members
        # that joined together are not all pinged, nor all scanned, in one tick
        phase = (hash((self.device_id, self.remote)) % 1000) / 1000.0
        self.last_ping -= phase * self.server.keepalive_s / 3.0
        self.keepalive_timer = self.server.loop.call_later(0.0, self.keep_alive)
        self.send_frame(FRAME_WELCOME, encode_welcome(
            (self.key, self.client_nonce, self.server_nonce), self.address, self.server.leases.prefix_length, self.server.leases.server_address,
            self.server.config.max_frame_bytes, self.server.ipv6_prefix))
        if not self.streams_session:        # none too: a relay restarted without its grants says so
            self.send_frame(FRAME_ROUTES, encode_routes(self.server.routes_for(self.device_id)))

    def on_packet(self, frame_type, payload):
        offloaded = frame_type == FRAME_VNET_PACKET
        problem = ip_problem(payload, VNET_HEADER.size if offloaded else 0)
        if problem:
            raise ProtocolError(problem)
        problem = offloaded and offload_problem(payload)
        if problem:                         # one odd packet is not worth the member's link
            self.server.count_drop(problem, self, frame_type, payload)
            return
        self.packets_in += 1
        self.bytes_in += len(payload)
        self.server.route_packet(frame_type, payload, self)

    def on_ping(self, frame_type, payload):
        check_ping(payload)
        if len(self.out) < self.server.max_queue_bytes:     # a peer that never reads gets no PONGs
            self.send_frame(FRAME_PONG, payload)

    def on_pong(self, frame_type, payload):
        check_ping(payload)

    def on_error(self, frame_type, payload):
        code, text = decode_error(payload)
        self.close("peer reported %s: %s" % (ERROR_NAMES.get(code, "error %d" % code), text))

    # -- stream sessions: the switch pairs streams and enforces their windows --

    def on_listen(self, frame_type, payload):
        port, service = decode_listen(payload)
        if not port:
            raise ProtocolError("LISTEN on port 0")
        try:
            self.server.switch.listen(self, port, service)
        except ListenRefused as refused:
            self.server.log.limited(("listen", self.device_id), "warning", "refused %s the LISTEN on port %d%s: %s"
                                    % (self.name(), port, " as %s" % service if service else "", refused))
            self.send_frame(FRAME_LISTEN_REFUSED, encode_listen_refused(port, refused.code, str(refused)))
            return
        self.send_frame(FRAME_LISTENING, payload)
        self.server.log.info("%s listens on virtual port %d%s"
                             % (self.name(), port, " as service %s" % service if service else ""))

    def on_open(self, frame_type, payload):
        stream_id, port, window, target = decode_open(payload)
        try:
            self.server.switch.open(self, stream_id, port, window, target)
        except StreamRefused as refused:
            self.server.log.info("stream from %s to %s port %d refused: %s"
                                 % (self.name(), target, port, refused))
            self.send_frame(FRAME_RESET, encode_reset(stream_id, refused.code, str(refused)))

    def on_accept(self, frame_type, payload):
        stream_id, window, _ = decode_accept(payload)     # the relay, not the listener, says who answered
        self.server.switch.accept(self, stream_id, window)

    def on_data(self, frame_type, payload):
        stream_id, data = decode_data(payload)
        self.bytes_in += len(data)
        self.server.switch.data(self, stream_id, data)

    def on_window(self, frame_type, payload):
        self.server.switch.window(self, *decode_window(payload))

    def on_eof(self, frame_type, payload):
        self.server.switch.eof(self, decode_eof(payload))

    def on_reset(self, frame_type, payload):
        self.server.switch.reset(self, *decode_reset(payload))

    def on_services(self, frame_type, payload):
        now = time.monotonic()
        self.services_tokens = min(SERVICES_BURST, self.services_tokens + (now - self.services_at) * SERVICES_PER_S)
        self.services_at = now
        if self.services_tokens < 1:
            self.drops["SERVICES over the rate"] = self.drops.get("SERVICES over the rate", 0) + 1
            return
        self.services_tokens -= 1
        self.send_frame(FRAME_SERVICE_LIST, self.server.directory_json())

    # -- sending --

    def send_packet(self, frame_type, packet):
        """Queue one packet for this client; drop it (as a router would) above the queue cap."""
        if self.stage != "established":
            self.server.count_drop("destination not ready", self, frame_type, packet, "for")
        elif len(self.out) + self.batch_bytes > self.server.max_queue_bytes:
            self.server.count_drop("queue full", self, frame_type, packet, "for")
        else:
            self.packets_out += 1
            self.bytes_out += len(packet)
            self.send_frame(frame_type, packet)

    def send_copy(self, frame_type, packet):
        """Queue one copy of a broadcast or multicast packet, if this queue is short enough."""
        if len(self.out) + self.batch_bytes > self.server.max_queue_bytes // MULTICAST_QUEUE_SHARE:
            self.server.count_drop("queue too full for broadcasts", self, frame_type, packet, "for")
        else:
            self.send_packet(frame_type, packet)

    def on_queued(self, count):
        """FrameTransport queued count bytes: past the hard limit this peer is not reading; past
        the relay's total, the slowest reader goes."""
        self.server.queued_bytes += count
        hard_limit = self.server.hard_queue_bytes()
        if len(self.out) > hard_limit:
            self.close("more than %d bytes queued: the peer is not reading" % hard_limit)
        elif self.server.queued_bytes > TOTAL_QUEUE_BYTES:
            self.server.cut_off_slowest_reader()

    def on_unqueued(self, count):
        self.server.queued_bytes -= count

    def on_writable(self):
        if self.stage == "tls":
            self.continue_tls()
            return
        self.flush_queue()

    # -- ending --

    def refuse(self, code, text, logged=False):
        """Tell the peer why in an ERROR frame, then close once it had a chance to read it.
        logged: the caller logged the reason already (in words the peer is not told)."""
        if self.stage in ("finishing", "closed"):
            return
        reason = "%s: %s" % (ERROR_NAMES[code], text)
        if self.stage == "tls":             # no channel to say it in yet
            self.close(reason)
            return
        if not logged and self.address is None:    # unauthenticated: anyone can cause these: limited
            self.server.log.limited(("refuse", self.remote_ip()), "warning", "refusing %s: %s" % (self.name(), reason))
        elif not logged:
            self.server.log.warning("refusing %s: %s" % (self.name(), reason))
        self.send_frame(FRAME_ERROR, encode_error(code, text))
        if self.stage == "closed":
            return
        self.server.withdraw(self)
        self.server.handshaking.pop(self, None)
        self.finish(CLOSING_LINGER_S, reason)
        self.server.finishing.add(self)

    def remote_ip(self):
        return self.remote.rpartition(":")[0]

    def check_timers(self, now):
        """Each tick, for connections that are not established (those keep_alive)."""
        if self.stage in ("tls", "hello", "auth") and now > self.deadline:
            self.refuse(ERROR_TIMEOUT, "handshake not completed within %d s" % HANDSHAKE_TIMEOUT_S)
        elif self.stage == "finishing" and now > self.deadline:
            self.close(self.finish_reason)

    def keep_alive(self):
        """Its own timer: a member silent for keepalive seconds is presumed dead; one silent
        for a third of it (and not pinged since) is pinged; a quiet one gives its large receive
        buffer back. Then the timer is set for the next of these that can be due."""
        if self.stage != "established":
            return
        now, keepalive = time.monotonic(), self.server.keepalive_s
        if now - self.last_received > keepalive:
            self.close("no frame for %d s: peer presumed dead" % keepalive)
            return
        if now - max(self.last_ping, self.last_received) >= keepalive / 3.0:   # a member that spoke needs none
            self.last_ping = now
            self.send_frame(FRAME_PING, struct.pack("!d", now))
        if now - self.last_received > IDLE_SHRINK_S:
            self.reader.shrink()
        due = min(max(self.last_ping, self.last_received) + keepalive / 3.0, self.last_received + keepalive + 0.01,
                  self.last_received + IDLE_SHRINK_S + 0.01 if self.reader.capacity() > FrameReader.SMALL_BYTES
                  else float("inf"))
        self.keepalive_timer = self.server.loop.call_later(max(0.05, due - now), self.keep_alive)

    def close(self, reason):
        """Never raises; safe to call twice."""
        if self.stage == "closed":
            return
        was_established, was_refused = self.stage == "established", self.stage == "finishing"
        self.stage = "closed"
        if self.keepalive_timer is not None:
            self.keepalive_timer.cancel()
        self.reader.discard()
        self.reader.shrink()                # its large buffer goes now, not when the last reference does
        self.server.withdraw(self)
        self.server.forget_connection(self)
        self.drop_queue()
        try:
            self.server.loop.forget(self)
        except (KeyError, ValueError, OSError):
            pass
        self.sock.close()
        if was_established and self.streams_session:
            self.server.log_member(self.device_id, "stream session of %s from %s closed: %s"
                                   % (self.name(), self.remote, reason))
        elif was_established:
            self.server.log_member(self.device_id, "%s from %s left: %s" % (self.name(), self.remote, reason))
        elif was_refused:
            self.server.log.debug("%s closed: %s" % (self.name(), reason))    # refuse() said why
        else:
            self.server.log.limited(("closed", self.remote_ip()), "info", "%s closed: %s" % (self.name(), reason))


HANDLERS = {
    "tls": {},
    "hello": {FRAME_HELLO: ClientConnection.on_hello},
    "auth": {FRAME_AUTH: ClientConnection.on_auth, FRAME_ERROR: ClientConnection.on_error},
    "established": {
        FRAME_PACKET: ClientConnection.on_packet, FRAME_VNET_PACKET: ClientConnection.on_packet,
        FRAME_PING: ClientConnection.on_ping,
        FRAME_PONG: ClientConnection.on_pong, FRAME_ERROR: ClientConnection.on_error,
    },
}
STREAM_HANDLERS = {
    FRAME_LISTEN: ClientConnection.on_listen, FRAME_OPEN: ClientConnection.on_open,
    FRAME_ACCEPT: ClientConnection.on_accept, FRAME_DATA: ClientConnection.on_data,
    FRAME_WINDOW: ClientConnection.on_window, FRAME_EOF: ClientConnection.on_eof,
    FRAME_RESET: ClientConnection.on_reset, FRAME_SERVICES: ClientConnection.on_services,
    FRAME_PING: ClientConnection.on_ping, FRAME_PONG: ClientConnection.on_pong,
    FRAME_ERROR: ClientConnection.on_error,
}


class ServerTun:
    """The server host's own TUN interface: makes this host the subnet's .1 member."""

    def __init__(self, server, fd, interface, offload):
        self.server = server
        self.fd = fd
        self.interface = interface
        self.offload = offload
        self.device_id = "(server)"
        self.address = server.leases.server_address
        self.addresses6 = server.ipv6_of(self.address) if server.config.mtu >= IPV6_MIN_MTU else ()
        self.closed = False
        self.drops = {}
        self.multicast_budget = None

    def fileno(self):
        return self.fd

    def __repr__(self):
        return "ServerTun(%s)" % self.interface

    def name(self):
        return "server interface %s" % self.interface

    def on_readable(self):
        self.server.batcher.begin()
        try:
            for _ in range(TUN_PACKETS_PER_WAKEUP):
                try:
                    frame_type, packet = read_tun_packet(self.fd, self.offload)
                except (BlockingIOError, InterruptedError):
                    return
                offset = VNET_HEADER.size if frame_type == FRAME_VNET_PACKET else 0
                if ip_problem(packet, offset):
                    self.server.count_drop("not IP", self, frame_type, packet)
                elif len(packet) > MAX_PAYLOAD_BYTES:
                    self.server.count_drop("larger than a frame", self, frame_type, packet)
                else:
                    self.server.route_packet(frame_type, packet, self)
        finally:
            self.server.batcher.flush()

    def send_packet(self, frame_type, packet):
        try:
            write_tun_packet(self.fd, self.offload, frame_type, packet)
        except OSError:
            self.server.count_drop("TUN write failed", self, frame_type, packet, "for")

    send_copy = send_packet

    def on_writable(self):
        pass

    def close(self, reason):
        """Closing the fd removes the interface. Never raises; safe to call twice.

        Called by the loop when the TUN fails (someone deleted the interface): then the server
        exits with status 1, so that its supervisor starts it again with a fresh interface.
        """
        if self.closed:
            return
        self.closed = True
        self.server.routes.remove(self)
        self.server.loop.forget(self)
        os.close(self.fd)
        self.server.log.info("removed interface %s: %s" % (self.interface, reason))
        if not self.server.stopping:
            self.server.fatal("interface %s failed: %s" % (self.interface, reason))


# ==== NAMES: DNS FOR THE VIRTUAL NETWORK ====
# The relay answers for its own domain only, from the lease table (RFC 1035): A for
# DEVICE_ID.DOMAIN, PTR for the network's addresses, NXDOMAIN for other names in the domain,
# REFUSED for the rest of the world. It is no recursive resolver: answers are one record, and
# nothing it sends is larger than the query by more than that record and an SOA.

DNS_HEADER = struct.Struct("!HHHHHH")   # id, flags, questions, answers, authority, additional
DNS_QUESTION_TAIL = struct.Struct("!HH")    # type, class
DNS_RECORD = struct.Struct("!HHIH")     # type, class, TTL, data length (after the owner name)
DNS_SOA_NUMBERS = struct.Struct("!IIIII")   # serial, refresh, retry, expire, minimum
TYPE_A, TYPE_NS, TYPE_SOA, TYPE_PTR, TYPE_AAAA, TYPE_ANY = 1, 2, 6, 12, 28, 255
CLASS_IN = 1
RCODE_NOERROR, RCODE_FORMERR, RCODE_NXDOMAIN, RCODE_NOTIMP, RCODE_REFUSED = 0, 1, 3, 4, 5
DNS_FLAG_RESPONSE, DNS_FLAG_AUTHORITATIVE, DNS_FLAG_RECURSION_WANTED = 0x8000, 0x0400, 0x0100
NAME_POINTER_TO_QUESTION = b"\xc0\x0c"     # the question's name starts at offset 12


def parse_dns_question(message):
    """(id, flags, labels in lower case, type, class, where the question ends); ValueError
    when message is no query with one question we can read."""
    if len(message) < DNS_HEADER.size + 5:
        raise ValueError("too short")
    ident, flags, questions = DNS_HEADER.unpack_from(message)[:3]
    if questions != 1:
        raise ValueError("%d questions" % questions)
    labels, at = [], DNS_HEADER.size
    while True:
        length = message[at]
        if length == 0:
            at += 1
            break
        if length > 63 or at + 1 + length > len(message):    # a pointer, or past the end
            raise ValueError("bad name")
        labels.append(bytes(message[at + 1:at + 1 + length]).lower())
        at += 1 + length
    if at + DNS_QUESTION_TAIL.size > len(message):
        raise ValueError("no type and class")
    qtype, qclass = DNS_QUESTION_TAIL.unpack_from(message, at)
    return ident, flags, labels, qtype, qclass, at + DNS_QUESTION_TAIL.size


def encode_dns_name(labels):
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\0"


class NameService:
    """The answers: DEVICE_ID.DOMAIN -> its leased address and back, whether it is online or
    not (its address is sticky)."""

    def __init__(self, server, domain):
        self.server = server
        self.set_domain(domain)
        self.queries = self.unanswered = 0
        self.per_source = {}            # member address -> RateBudget
        self.all_sources = RateBudget(DNS_QUERIES_ALL_PER_S, time.monotonic())

    def set_domain(self, domain):
        self.domain = domain
        self.domain_labels = [label.encode("ascii") for label in domain.split(".")]
        leases = self.server.leases
        network = packed_address(leases.network)
        # the in-addr.arpa names of the network: whole octets only (a /24 has three)
        whole = leases.prefix_length // 8
        self.reverse_zone = [str(octet).encode() for octet in reversed(network[:whole])] + [b"in-addr", b"arpa"]
        prefix = self.server.ipv6_prefix
        self.reverse_zone6 = [b"%x" % nibble for byte in reversed(prefix) for nibble in (byte & 0xF, byte >> 4)] \
            + [b"ip6", b"arpa"] if prefix else None

    def allowed(self, source, now):
        """Within this source's budget and everyone's: a flood gets no answers, and no loop."""
        budget = self.per_source.get(source)
        if budget is None:
            if len(self.per_source) >= 4096:
                self.per_source.clear()
            budget = self.per_source[source] = RateBudget(DNS_QUERIES_PER_S, now)
        if budget.take(1, now) and self.all_sources.take(1, now):
            return True
        self.unanswered += 1
        self.server.log.limited(("dns", source), "info", "not answering DNS queries from %s: more than %d a second"
                                % (source, DNS_QUERIES_PER_S))
        return False

    def answer(self, message):
        """The response to message, or None for one we must not answer (a response itself)."""
        try:
            ident, flags, labels, qtype, qclass, end = parse_dns_question(message)
        except (ValueError, IndexError):
            if len(message) >= DNS_HEADER.size and not message[2] & 0x80:
                ident, flags = DNS_HEADER.unpack_from(message)[:2]
                return DNS_HEADER.pack(ident, DNS_FLAG_RESPONSE | (flags & 0x7900) | RCODE_FORMERR, 0, 0, 0, 0)
            return None
        if flags & DNS_FLAG_RESPONSE:
            return None
        self.queries += 1
        question = bytes(message[DNS_HEADER.size:end])
        if (flags >> 11) & 0xF:                 # an opcode other than QUERY
            return self.response(ident, flags, question, RCODE_NOTIMP)
        if qclass not in (CLASS_IN, TYPE_ANY):
            return self.response(ident, flags, question, RCODE_REFUSED)
        suffix = len(self.domain_labels)
        if labels[-suffix:] == self.domain_labels:
            return self.answer_name(ident, flags, question, labels[:-suffix], qtype)
        if labels[len(labels) - len(self.reverse_zone):] == self.reverse_zone and len(labels) == 6:
            return self.answer_address(ident, flags, question, labels, qtype)
        if self.reverse_zone6 and len(labels) == 34 and labels[16:] == self.reverse_zone6:
            return self.answer_address6(ident, flags, question, labels, qtype)
        return self.response(ident, flags, question, RCODE_REFUSED)

    def answer_name(self, ident, flags, question, host, qtype):
        if not host:                            # the domain itself: it exists, and has an SOA
            if qtype in (TYPE_SOA, TYPE_ANY):
                return self.response(ident, flags, question, RCODE_NOERROR, [self.soa_record(NAME_POINTER_TO_QUESTION)])
            return self.response(ident, flags, question, RCODE_NOERROR, authority=self.soa_record())
        address = self.address_of(b".".join(host).decode("ascii", "replace"))
        if address is None:
            return self.response(ident, flags, question, RCODE_NXDOMAIN, authority=self.soa_record())
        records = []
        if qtype in (TYPE_A, TYPE_ANY):
            records.append(NAME_POINTER_TO_QUESTION + DNS_RECORD.pack(TYPE_A, CLASS_IN, DNS_TTL_S, 4) + address)
        if qtype in (TYPE_AAAA, TYPE_ANY) and self.server.ipv6_prefix:
            address6 = self.server.ipv6_of(address)[0]
            records.append(NAME_POINTER_TO_QUESTION + DNS_RECORD.pack(TYPE_AAAA, CLASS_IN, DNS_TTL_S, 16) + address6)
        if records:
            return self.response(ident, flags, question, RCODE_NOERROR, records)
        return self.response(ident, flags, question, RCODE_NOERROR, authority=self.soa_record())

    def answer_address(self, ident, flags, question, labels, qtype):
        if not all(label.isdigit() and int(label) < 256 for label in labels[:4]):
            return self.response(ident, flags, question, RCODE_NXDOMAIN, authority=self.soa_record())
        return self.answer_owner(ident, flags, question, bytes(int(label) for label in reversed(labels[:4])), qtype)

    def answer_address6(self, ident, flags, question, labels, qtype):
        """PTR for PREFIX::N: the device whose IPv4 host number is N."""
        nibbles = b"".join(reversed(labels[:16]))
        host = int(nibbles, 16) if len(nibbles) == 16 and set(nibbles) <= set(b"0123456789abcdef") else -1
        leases = self.server.leases
        if not 0 < host < (1 << (32 - leases.prefix_length)):
            return self.response(ident, flags, question, RCODE_NXDOMAIN, authority=self.soa_record())
        return self.answer_owner(ident, flags, question, packed_address(leases.network + host), qtype)

    def answer_owner(self, ident, flags, question, address, qtype):
        device_id = self.server.leases.owner_of.get(address)
        if device_id is None:
            return self.response(ident, flags, question, RCODE_NXDOMAIN, authority=self.soa_record())
        if qtype not in (TYPE_PTR, TYPE_ANY):
            return self.response(ident, flags, question, RCODE_NOERROR, authority=self.soa_record())
        target = encode_dns_name(device_id.encode("ascii").split(b".") + self.domain_labels)
        record = NAME_POINTER_TO_QUESTION + DNS_RECORD.pack(TYPE_PTR, CLASS_IN, DNS_TTL_S, len(target)) + target
        return self.response(ident, flags, question, RCODE_NOERROR, [record])

    def address_of(self, name):
        """The packed leased address of device_id name, matched without regard to case."""
        leases = self.server.leases.leases
        lease = leases.get(name)
        if lease is None:
            folded = name.lower()
            lease = next((entry for device_id, entry in leases.items() if device_id.lower() == folded), None)
        return socket.inet_aton(lease["address"]) if lease else None

    def soa_record(self, owner=None):
        apex = encode_dns_name(self.domain_labels)
        body = apex + encode_dns_name([b"hostmaster"] + self.domain_labels) + DNS_SOA_NUMBERS.pack(
            int(self.server.started) & 0xFFFFFFFF, 3600, 600, 86400, DNS_NEGATIVE_TTL_S)
        return (owner or apex) + DNS_RECORD.pack(TYPE_SOA, CLASS_IN, DNS_NEGATIVE_TTL_S, len(body)) + body

    def response(self, ident, flags, question, rcode, answers=(), authority=b""):
        flags = DNS_FLAG_RESPONSE | DNS_FLAG_AUTHORITATIVE | (flags & DNS_FLAG_RECURSION_WANTED) | rcode
        return DNS_HEADER.pack(ident, flags, 1, len(answers), 1 if authority else 0, 0) + question \
            + b"".join(answers) + authority


def dns_socket(kind, address, interface):
    """A socket on address:53 that hears only what arrives on interface: the virtual network's
    members reach it, the underlay cannot, even with a route to the address (SO_BINDTODEVICE)."""
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_BINDTODEVICE", 25), interface.encode("ascii"))
        sock.bind((address, DNS_PORT))
        if kind == socket.SOCK_STREAM:
            sock.listen(DNS_TCP_CONNECTIONS)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class DnsUdpResponder:
    """DNS over UDP on the relay's virtual address."""

    def __init__(self, server, sock):
        self.server = server
        self.sock = sock

    def fileno(self):
        return self.sock.fileno()

    def __repr__(self):
        return "DnsUdpResponder(%s:%d)" % self.sock.getsockname()[:2]

    def on_readable(self):
        names = self.server.dns
        for _ in range(DNS_QUERIES_PER_WAKEUP):
            try:
                message, source = self.sock.recvfrom(MAX_DNS_MESSAGE_BYTES + 1)
            except (BlockingIOError, InterruptedError):
                return
            if len(message) > MAX_DNS_MESSAGE_BYTES or not names.allowed(source[0], time.monotonic()):
                continue
            reply = names.answer(message)
            if reply is not None:
                try:
                    self.sock.sendto(reply, source)
                except (BlockingIOError, InterruptedError):
                    names.unanswered += 1       # the socket's buffer is full: as a lost datagram

    def on_writable(self):
        pass

    def close(self, reason):
        self.server.loop.forget(self)
        self.sock.close()


class DnsTcpListener:
    """DNS over TCP on the relay's virtual address (RFC 7766): a few connections, each short."""

    def __init__(self, server, sock):
        self.server = server
        self.sock = sock
        self.connections = set()

    def fileno(self):
        return self.sock.fileno()

    def __repr__(self):
        return "DnsTcpListener(%s:%d)" % self.sock.getsockname()[:2]

    def on_readable(self):
        try:
            sock, remote = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        if len(self.connections) >= DNS_TCP_CONNECTIONS:
            self.server.dns.unanswered += 1
            sock.close()
            return
        sock.setblocking(False)
        connection = DnsTcpConnection(self, sock, remote[0])
        self.connections.add(connection)
        self.server.loop.set_interest(connection, selectors.EVENT_READ)

    def on_writable(self):
        pass

    def close_idle(self, now):
        for connection in list(self.connections):
            if now - connection.last_active > DNS_TCP_IDLE_S:
                connection.close("idle")

    def close(self, reason):
        for connection in list(self.connections):
            connection.close(reason)
        self.server.loop.forget(self)
        self.sock.close()


class DnsTcpConnection:
    """One DNS-over-TCP peer: two-byte length, then the message; answered in order."""

    def __init__(self, listener, sock, source):
        self.listener = listener
        self.server = listener.server
        self.sock = sock
        self.source = source
        self.inbox = bytearray()
        self.out = bytearray()
        self.last_active = time.monotonic()

    def fileno(self):
        return self.sock.fileno()

    def on_readable(self):
        data = self.sock.recv(4096)
        if not data:
            self.close("closed by peer")
            return
        self.last_active = time.monotonic()
        self.inbox += data
        while len(self.inbox) >= 2:
            length = (self.inbox[0] << 8) | self.inbox[1]
            if length > MAX_DNS_MESSAGE_BYTES:
                self.close("a DNS message of %d bytes" % length)
                return
            if len(self.inbox) < 2 + length:
                break
            message, self.inbox = bytes(self.inbox[2:2 + length]), self.inbox[2 + length:]
            if not self.server.dns.allowed(self.source, self.last_active):
                continue
            reply = self.server.dns.answer(message)
            if reply is not None:
                self.out += struct.pack("!H", len(reply)) + reply
        if len(self.out) > 8 * MAX_DNS_MESSAGE_BYTES:
            self.close("not reading its answers")       # pipelined queries, answers never read
            return
        self.server.loop.set_interest(self, selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0))

    def on_writable(self):
        sent = self.sock.send(self.out)
        del self.out[:sent]
        if not self.out:
            self.server.loop.set_interest(self, selectors.EVENT_READ)

    def close(self, reason):
        if self in self.listener.connections:
            self.listener.connections.discard(self)
            self.server.loop.forget(self)
            self.sock.close()


# ==== THE RELAY ====

class RelayServer:
    """Owns the listener, the clients, the leases and the routes."""

    def __init__(self, config, log, reload_config=None):
        """reload_config() gives a fresh ServerConfig on SIGHUP (ConfigError if it is bad)."""
        self.config = config
        self.log = log
        self.reload_config = reload_config
        self.loop = EventLoop(log)
        self.hooks = Hooks(config, log)
        self.started = time.time()
        self.control = None
        self.key = network_key(config.secret, config.network_salt)
        self.keepalive_s = config.keepalive
        self.max_queue_bytes = config.max_queue_bytes
        self.per_source = {}            # remote IP -> its connections
        self.leases = LeaseTable(config.subnet, os.path.join(config.state_dir, "leases.json"), log,
                                 config.lease_trial)
        self.routes = RouteTable(subnet_broadcast(packed_address(self.leases.network), self.leases.prefix_length),
                                 config.multicast_groups)
        self.multicast_copies = RateBudget(MULTICAST_COPIES_PER_S, time.monotonic())
        self.multicast_packets = self.multicast_copied = 0
        self.ipv6_prefix = config.ipv6_prefix  # the network's /64 (8 bytes), or None: no IPv6
        self.dns = NameService(self, config.domain)
        self.dns_responders = []        # DnsUdpResponder and DnsTcpListener, with the TUN
        self.stream_sessions = {}       # device_id -> its connected stream sessions
        self.names = ServiceNames(os.path.join(config.state_dir, "names.json"), log)
        self.switch = StreamSwitch(log, MAX_STREAM_WINDOW_BYTES, config.max_streams_per_client,
                                   self.device_of, self.online, self.permits, self.names, self.name_problem,
                                   self.new_name_budget)
        self.connections = set()
        self.handshaking = {}           # connections not yet authenticated, oldest first
        self.finishing = set()          # refused ones, lingering until their deadline
        self.queued_bytes = 0           # in every connection's send queue together
        self.batcher = Batcher()        # one wakeup's PACKET/DATA frames leave together
        self.directory_version, self.directory_cache = 0, None     # SERVICES' listing, cached
        self.new_leases = {}            # source address -> times of its new leases this minute
        self.new_names = {}             # ... of its new service names and listener records
        self.drops = {}
        self.stopping = False
        self.exit_code = 0
        self.listener = self.tun = None
        self.last_lease_save = self.last_trial_sweep = time.monotonic()

    def start(self):
        """Load leases, bind, open TUN; raises OSError with a clear message if it cannot."""
        self.leases.load()
        self.apply_reservations(self.config.reservations)
        self.apply_routes(self.config.routes)
        self.names.load()
        self.log.info("subnet %s: %d client addresses, %d leased; %d service names claimed"
                      % (self.leases.subnet_text(), self.leases.capacity(), len(self.leases.leases),
                         len(self.names.owners)))
        self.listener = RelayListener(self, self._bind(self.config.listen))
        self.loop.set_interest(self.listener, selectors.EVENT_READ)
        host, port = self.listener.sock.getsockname()[:2]
        self.log.info("listening on %s:%d" % (host, port))
        if self.config.tun != "no":
            self._open_tun()
        if self.config.control_socket:
            self._open_control()
        self.loop.call_every(1.0, self.tick)
        self.loop.call_every(0.25, self.hooks.reap)     # finished hooks make room for queued ones
        self.loop.on_signals((signal.SIGTERM, signal.SIGINT), self.on_stop_signal)
        self.loop.on_signals((signal.SIGHUP,), self.on_reload_signal)

    def _open_control(self):
        try:
            self.control = ControlListener(self.loop, self.config.control_socket, self.on_control, self.log)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise OSError(error.errno, "%s: is another server running?" % describe_error(error))
            self.log.warning("no control socket at %s (%s): status and kick will not work"
                             % (self.config.control_socket, describe_error(error)))
            return
        self.loop.set_interest(self.control, selectors.EVENT_READ)

    def _bind(self, listen):
        host, port = listen
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            sock.close()
            raise OSError(error.errno, "cannot listen on %s:%d: %s" % (host, port, describe_error(error)))
        sock.listen(128)
        sock.setblocking(False)
        return sock

    def _open_tun(self):
        address = ipv4_text(self.leases.server_address)
        try:
            fd, interface, offload = open_tun(self.config.interface, self.config.offload)
        except OSError as error:
            if self.config.tun == "yes":
                raise OSError(error.errno, "cannot create TUN interface %s: %s (run as root with "
                              "/dev/net/tun, or set tun = no)" % (self.config.interface,
                                                                  describe_error(error)))
            self.log.warning("no TUN interface (%s): this host is not reachable as %s"
                             % (describe_error(error), address))
            return
        self.tun = ServerTun(self, fd, interface, offload)
        try:
            configure_interface(interface, address, self.leases.prefix_length, self.config.mtu, self.log,
                                self.tun.addresses6)
        except OSError:
            self.tun.close("configuration failed")
            raise
        self.routes.add(self.tun)
        self.loop.set_interest(self.tun, selectors.EVENT_READ)
        self.log.info("this host is %s/%d%s on interface %s (%s)" % (
            address, self.leases.prefix_length,
            " and %s/64" % ip_text(self.tun.addresses6[0]) if self.tun.addresses6 else "",
            interface, "offloads on" if offload else "no offloads"))
        if self.config.dns:
            self._open_dns([address] + [ip_text(self.tun.addresses6[0])] if self.tun.addresses6 else [address],
                           interface)

    def _open_dns(self, addresses, interface):
        """UDP and TCP port 53 on each of the relay's own virtual addresses (IPv4, and its
        address in the IPv6 /64)."""
        for address in addresses:
            pair = []
            try:
                pair.append(DnsUdpResponder(self, dns_socket(socket.SOCK_DGRAM, address, interface)))
                pair.append(DnsTcpListener(self, dns_socket(socket.SOCK_STREAM, address, interface)))
            except OSError as error:
                for responder in pair:
                    responder.close("DNS failed")
                self.log.warning("no DNS on %s port %d (%s): devices are not known by name there; set dns = no "
                                 "to say nothing" % (address, DNS_PORT, describe_error(error)))
                continue
            for responder in pair:
                self.loop.set_interest(responder, selectors.EVENT_READ)
            self.dns_responders += pair
            self.log.info("answering DNS for %s on %s port %d (UDP and TCP, from interface %s only)"
                          % (self.config.domain, address, DNS_PORT, interface))

    def run(self):
        self.loop.run()

    # -- membership --

    def accept(self, sock, remote):
        """Take a new connection, or turn it away at once (it never counts) past a limit."""
        ip = remote[0]
        limit = self.over_limit(ip)
        if limit:
            self.turn_away(sock, ip, limit)
            return
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            connection = ClientConnection(self, sock, remote)     # TLS: wraps it, which may fail
        except OSError as error:
            self.log.limited(("accept", ip), "info", "dropped a connection from %s at once: %s"
                             % (ip, describe_error(error)))
            sock.close()
            return
        self.connections.add(connection)
        self.per_source[ip] = self.per_source.get(ip, 0) + 1
        self.loop.set_interest(connection, selectors.EVENT_READ)
        self.log.debug("accepted connection from %s" % connection.remote)
        if len(self.handshaking) >= self.config.max_handshakes:
            self.shed_oldest_handshake("more than %d handshakes in progress (max_handshakes)"
                                       % self.config.max_handshakes)
        self.handshaking[connection] = None

    def over_limit(self, ip):
        """Why a new connection from ip is one too many (the reason it is refused with), or None."""
        config = self.config
        if self.per_source.get(ip, 0) >= config.max_connections_per_source:
            return "more than %d connections from %s (max_connections_per_source)" % (
                config.max_connections_per_source, ip)
        if len(self.connections) >= config.max_clients:
            return "more than %d connections (max_clients)" % config.max_clients
        return None

    def turn_away(self, sock, ip, why):
        """Refuse a connection past a limit: the ERROR frame if the socket takes it at once (not
        under TLS, whose handshake it would need), then close; it costs no more than that."""
        self.log.limited(("limit", ip), "warning", "refused a connection from %s: %s: %s"
                         % (ip, ERROR_NAMES[ERROR_LIMIT], why))
        try:
            if self.config.tls_context is None:
                sock.setblocking(False)
                sock.send(encode_frame(FRAME_ERROR, encode_error(ERROR_LIMIT, why)))
        except OSError:
            pass
        sock.close()

    def hard_queue_bytes(self):
        """A connection queued past this is cut off: its packets and all its streams' windows."""
        return self.max_queue_bytes + self.switch.max_streams * MAX_STREAM_WINDOW_BYTES + 65536

    def forget_connection(self, connection):
        self.connections.discard(connection)
        self.handshaking.pop(connection, None)
        self.finishing.discard(connection)
        ip = connection.remote_ip()
        count = self.per_source.get(ip, 0) - 1
        if count > 0:
            self.per_source[ip] = count
        else:
            self.per_source.pop(ip, None)

    # -- access: keys and policy --

    def key_for(self, device_id):
        """The key device_id must prove, or (None, why it may not join)."""
        keys = self.config.keys
        if keys is not None and device_id in keys.secrets:
            if device_id not in keys.keys:
                return None, "device %s is revoked" % device_id
            return keys.keys[device_id], None
        if not self.config.network_secret:
            return None, "device %s has no key of its own, and this network takes no other" % device_id
        return self.key, None

    def permits(self, source, target, port=None):
        policy = self.config.policy
        return policy is None or policy.permits(source, target, port)

    def cut_off_slowest_reader(self):
        """All queues together passed TOTAL_QUEUE_BYTES: close the connection with the most
        bytes waiting, which is the one that reads least. Readers that keep up never get here."""
        slowest = max(self.connections, key=lambda c: len(c.out))
        slowest.close("%d bytes queued while the relay holds %d in all: not reading fast enough"
                      % (len(slowest.out), self.queued_bytes))

    def shed_oldest_handshake(self, why):
        """Close the longest-waiting unauthenticated connection, to make room; False if none."""
        if not self.handshaking:
            return False
        next(iter(self.handshaking)).close(why)
        return True

    def admit(self, connection):
        """The packed address of an authenticated connection, which now owns it.

        A stream session takes no lease of its own (streams need none, and containers with
        fresh device_ids would fill the pool): it shows the device's lease if it has one.
        """
        device_id = connection.device_id
        owner = self.names.owner(device_id)
        if owner is not None and owner != device_id:
            raise NameTaken("device_id %s is a service name of device %s; give this device another "
                            "device_id, or the operator frees the name (forget-name %s)" % (device_id, owner, device_id))
        now = time.time()
        connection.connected_since = now
        self.directory_version += 1
        if connection.streams_session:
            lease = self.leases.leases.get(device_id)
            connection.address = socket.inet_aton(lease["address"]) if lease else NO_ADDRESS
            self.stream_sessions.setdefault(device_id, set()).add(connection)
            self.log_member(device_id, "%s opened a stream session from %s" % (connection.name(), connection.remote))
            return connection.address
        if device_id not in self.leases.leases:
            self.count_new_lease(connection.remote_ip())
        address = self.leases.lease_for(device_id, self.routes.by_device, now)   # online: a dict, not a copy
        self.leases.touch(device_id, now)
        connection.address = address
        previous = self.routes.by_device.get(device_id)
        if previous is not None:
            self.log_member(device_id, "device %s reconnected from %s; closing its old connection from %s"
                            % (device_id, connection.remote, previous.remote))
            previous.refuse(ERROR_REPLACED, "replaced by a new connection for %s from %s"
                            % (device_id, connection.remote))
        connection.addresses6 = self.ipv6_of(address)
        self.routes.add(connection)
        self.log_member(device_id, "device %s joined as %s from %s" % (device_id, ipv4_text(address), connection.remote))
        self.hooks.run("join", connection)
        return address

    def log_member(self, device_id, message):
        """A join or leave line: a few a minute per device and MEMBER_LINES_PER_MINUTE in all
        (253 minted joins once wrote 514 lines); the log counts the rest."""
        if self.log.limited(("member", device_id), "info", message, burst=MEMBER_LINES_PER_DEVICE, write=False):
            self.log.limited(("members",), "info", message, burst=MEMBER_LINES_PER_MINUTE,
                             summary="joins and leaves")

    def count_new_lease(self, source):
        """A new device from source takes a lease: refused past max_new_leases_per_minute, so one
        member minting device_ids cannot fill the pool (devices that have a lease always join)."""
        if not self.take_from_budget(self.new_leases, source):
            raise TooManyNewLeases("%d new devices from %s within a minute "
                                   "(max_new_leases_per_minute); try again later"
                                   % (self.config.max_new_leases_per_minute, source))

    def new_name_budget(self, source):
        """The same limit for service names and listener records that source makes new: minted
        device_ids cannot fill names.json, nor push the real listeners out of it."""
        return self.take_from_budget(self.new_names, source)

    def take_from_budget(self, table, source):
        """One more of max_new_leases_per_minute for source in table (source -> times): True if
        it had room, and counts it."""
        now = time.monotonic()
        times = table.setdefault(source, collections.deque())
        while times and now - times[0] >= 60:
            times.popleft()
        if len(times) >= self.config.max_new_leases_per_minute:
            return False
        times.append(now)
        if len(table) > 4096:               # forget quiet sources: the table stays small
            for ip in [ip for ip, ts in table.items() if not ts or now - ts[-1] >= 60]:
                del table[ip]
        return True

    def withdraw(self, connection):
        """Stop routing to connection (it is closing); safe to call twice."""
        if connection.address is None:
            return
        self.directory_version += 1
        if connection.streams_session:
            sessions = self.stream_sessions.get(connection.device_id, set())
            sessions.discard(connection)
            if not sessions:
                self.stream_sessions.pop(connection.device_id, None)
            self.switch.forget_session(connection, "the relay connection of %s was lost" % connection.device_id)
            return
        if self.routes.by_device.get(connection.device_id) is connection:
            self.leases.touch(connection.device_id, time.time())
            self.hooks.run("leave", connection)
        self.routes.remove(connection)

    # -- operations: status, kick, forget, reload --

    def on_control(self, request):
        command = request.get("command")
        if command == "status":
            return self.status()
        if command == "kick":
            return self.kick(str(request.get("device_id", "")))
        if command == "forget":
            return self.forget(str(request.get("device_id", "")))
        if command == "forget-name":
            return self.forget_name(str(request.get("name", "")))
        return {"error": "unknown command %r (status, kick, forget, forget-name)" % command}

    def status(self):
        config = self.config
        members = sorted((c for c in self.connections if c.stage == "established"),
                         key=lambda c: (c.device_id, c.streams_session, c.remote))
        devices = [{
            "device_id": c.device_id, "address": None if c.address == NO_ADDRESS else ipv4_text(c.address),
            "ipv6": [ip_text(address) for address in c.addresses6], "remote": c.remote,
            "routes": ["%s/%d" % (ip_text(network), length) for network, length, gateway, _ in config.routes
                       if gateway == c.device_id],
            "kind": "streams" if c.streams_session else "tun", "connected_since": c.connected_since,
            "bytes_in": c.bytes_in, "bytes_out": c.bytes_out, "packets_in": c.packets_in,
            "packets_out": c.packets_out, "drops": c.drops, "open_streams": self.switch.open_counts.get(c, 0),
            "receive_buffer_bytes": c.reader.capacity(),
            "tls": c.sock.summary() if isinstance(c.sock, TlsTransport) else None,
        } for c in members]
        online = set(device["device_id"] for device in devices)
        offline = [{"device_id": device_id, "address": lease["address"], "last_seen": lease["last_seen"]}
                   for device_id, lease in sorted(self.leases.leases.items()) if device_id not in online]
        totals = {"devices": len(self.routes.by_device) - (1 if self.tun else 0),
                  "stream_sessions": sum(len(s) for s in self.stream_sessions.values()),
                  "handshakes_in_progress": len(self.handshaking), "streams": len(self.switch.streams) // 2,
                  "leases": len(self.leases.leases), "drops": dict(self.drops),
                  "broadcasts": self.multicast_packets, "broadcast_copies": self.multicast_copied,
                  "dns_queries": self.dns.queries, "dns_unanswered": self.dns.unanswered}
        for counter in ("bytes_in", "bytes_out", "packets_in", "packets_out"):
            totals[counter] = sum(device[counter] for device in devices)
        return {"server": {
            "listen": "%s:%d" % self.listener.sock.getsockname()[:2], "subnet": self.leases.subnet_text(),
            "address": ipv4_text(self.leases.server_address), "protocol": PROTOCOL_VERSION,
            "ipv6_prefix": "%s/64" % ip_text(self.ipv6_prefix + bytes(8)) if self.ipv6_prefix else None,
            "interface": self.tun.interface if self.tun else None, "started": self.started,
            "uptime_s": int(time.time() - self.started), "pid": os.getpid(),
            "tls": "client certificates" if config.tls_client_ca else "yes" if config.tls else "no",
            "tls_pin": config.tls_pin,
            "device_keys": len(config.keys.keys) if config.keys else 0,
            "revoked": config.keys.revoked() if config.keys else [],
            "policy_rules": len(config.policy.rules) + len(config.policy.name_rules) if config.policy else 0,
            "routes": {"%s/%d" % (ip_text(network), length): gateway for network, length, gateway, _ in config.routes},
            "reservations": {device_id: ipv4_text(packed_address(number))
                             for device_id, number in sorted(self.leases.reserved.items())},
            "limits": {name: getattr(config, name) for name in LIMIT_KEYS},
        }, "devices": devices, "offline": offline, "totals": totals,
            "service_names": [{"name": name, "device_id": owner, "offered": name in self.switch.services}
                              for name, owner in sorted(self.names.owners.items())]}

    def kick(self, device_id):
        targets = [c for c in self.connections if c.device_id == device_id and c.stage == "established"]
        if not targets:
            return {"error": "device %s is not connected" % device_id}
        self.log.info("kicking device %s (%d connection(s)) on the operator's request" % (device_id, len(targets)))
        for connection in targets:
            connection.refuse(ERROR_KICKED, "disconnected by the operator; it may rejoin")
        return {"kicked": len(targets), "device_id": device_id}

    def forget(self, device_id):
        """The operator frees an offline device's lease and service names (a minting spree, a
        retired board)."""
        known = device_id in self.leases.leases or self.names.names_of(device_id) or device_id in self.names.listeners
        if not known:
            return {"error": "device %s has no lease and no service names" % device_id}
        if self.online(device_id):
            return {"error": "device %s is connected: it would take a new address at once; stop it "
                             "first (kick only disconnects it, and it rejoins)" % device_id}
        address = None
        if device_id in self.leases.leases:
            try:
                address = self.leases.forget(device_id)
            except OSError as error:
                self.leases.save_failed = True      # the tick retries; the lease is gone from memory already
                self.log.error("cannot save leases to %s: %s; retrying" % (self.leases.path, describe_error(error)))
                address = "(its address)"
        names = self.names.release_device(device_id)
        self.directory_version += 1
        self.log.info("forgot %s%s on the operator's request" % (
            "the lease of device %s (%s)" % (device_id, address) if address else "device %s" % device_id,
            " and its service names %s" % ", ".join(names) if names else ""))
        return {"forgot": device_id, "address": address, "names": names}

    def forget_name(self, name):
        """The operator frees a service name, for whichever device offers it next."""
        owner = self.names.owner(name)
        if owner is None:
            return {"error": "no device owns the service name %s" % name}
        entry = self.switch.services.get(name)
        if entry is not None:
            return {"error": "device %s offers %s now (port %d); stop that listener first, or "
                             "kick the device" % (owner, name, entry[1])}
        self.names.release(name)
        self.directory_version += 1
        self.log.info("freed the service name %s of device %s on the operator's request" % (name, owner))
        return {"forgot_name": name, "device_id": owner}

    def routes_for(self, device_id):
        return [(network, length, gateway == device_id) for network, length, gateway, _ in self.config.routes]

    def apply_routes(self, routes, previous=None):
        """Route granted networks to their gateways; tell every TUN member when they changed."""
        if self.ipv6_prefix:
            ula = (self.ipv6_prefix + bytes(8), 64)
            for route in [route for route in routes if prefixes_overlap(route[:2], ula)]:
                self.log.error("%s: route %s/%d overlaps the network's IPv6 %s/64: not routed"
                               % (route[3], ip_text(route[0]), route[1], ip_text(ula[0])))
                routes.remove(route)
        self.routes.set_prefixes(routes)
        if previous is None or [route[:3] for route in routes] == [route[:3] for route in previous]:
            return
        for connection in self.connections:
            if connection.stage == "established" and not connection.streams_session:
                connection.send_frame(FRAME_ROUTES, encode_routes(self.routes_for(connection.device_id)))
        self.log.info("granted routes now: %s" % (", ".join("%s/%d to %s" % (ip_text(network), length, gateway)
                                                           for network, length, gateway, _ in routes) or "none"))

    def apply_reservations(self, reservations):
        for problem in self.leases.set_reservations(reservations):
            self.log.warning("reservation waits: %s" % problem)
        for device_id, number, where in reservations:
            member = self.routes.by_device.get(device_id)
            if member is not None and member.address != packed_address(number) and \
                    packed_address(number) not in self.leases.owner_of:
                self.log.info("%s: device %s is online as %s: it moves to %s at its next join (kick it to "
                              "move it now)" % (where, device_id, ipv4_text(member.address),
                                                ipv4_text(packed_address(number))))

    def on_reload_signal(self, signum):
        """SIGHUP: take every key anew but RESTART_KEYS, which are only reported; keep every
        connection, but disconnect a device that may no longer join."""
        try:
            fresh = self.reload_config()
        except (ConfigError, OSError, ValueError) as error:
            self.log.error("reload failed, keeping the running configuration: %s" % error)
            return
        if fresh.tls != self.config.tls or fresh.tls_generate or fresh.state_dir != self.config.state_dir:
            if fresh.tls != self.config.tls:    # TLS turned on or off: a restart makes the identity
                self.log.warning("tls changed: takes effect at the next restart")
            for name in TLS_SETTINGS:
                setattr(fresh, name, getattr(self.config, name))
        for name in RESTART_KEYS:
            if getattr(fresh, name) != getattr(self.config, name):
                self.log.warning("%s changed: takes effect at the next restart" % name)
                setattr(fresh, name, getattr(self.config, name))
        if fresh.path:                  # reserve and route lines hold against the running subnet
            try:
                fresh.reservations = read_reservations(fresh.path, fresh.subnet)
                fresh.routes = read_routes(fresh.path, fresh.subnet)
            except (ConfigError, OSError) as error:
                self.log.error("reload failed, keeping the running configuration: %s" % error)
                return
        if fresh.secret is None:
            fresh.secret, fresh.secret_source = self.config.secret, self.config.secret_source
        self.key = network_key(fresh.secret, fresh.network_salt) if fresh.secret != self.config.secret else self.key
        self.keepalive_s = fresh.keepalive
        self.log.set_level(fresh.log_level)
        previous_routes = self.config.routes
        self.config = fresh
        self.hooks.config = fresh
        self.max_queue_bytes = fresh.max_queue_bytes
        self.switch.max_streams = fresh.max_streams_per_client
        self.leases.trial_s = fresh.lease_trial
        self.apply_reservations(fresh.reservations)
        self.apply_routes(fresh.routes, previous_routes)
        self.routes.groups = set(fresh.multicast_groups)
        self.dns.set_domain(fresh.domain)
        warn_of_unauthenticated_policy(fresh, self.log)
        self.log.info("reloaded the configuration (secret from %s, log level %s, keepalive %d s, %s, %s)"
                      % (fresh.secret_source or "config", fresh.log_level, fresh.keepalive,
                         "%d device keys" % len(fresh.keys) if fresh.keys else "no keys file",
                         "policy of %d rules" % (len(fresh.policy.rules) + len(fresh.policy.name_rules)) if fresh.policy else "no policy"))
        if not fresh.network_secret and not (fresh.keys and fresh.keys.keys):
            self.log.warning("network_secret = no and no device in the keys file may join: nobody can join now")
        self.drop_revoked()

    def drop_revoked(self):
        """After a reload: disconnect every device that may no longer join, so that revoking a
        device takes effect at once. A changed secret, like the network's, keeps its members."""
        for connection in list(self.connections):
            if connection.stage == "established":
                refusal = self.key_for(connection.device_id)[1]
                if refusal:
                    self.log.info("disconnecting %s: %s" % (connection.name(), refusal))
                    connection.refuse(ERROR_AUTH, refusal)

    # -- the directory: who is there, for streams and for `services` --

    def device_of(self, name):
        """The device_id that a virtual IP or a device_id names, or None."""
        if name.count(".") == 3 and all(part.isdigit() for part in name.split(".")):
            try:
                return self.leases.owner_of.get(socket.inet_aton(name))
            except OSError:
                return None
        return name if self.is_device_id(name) else None

    def is_device_id(self, name):
        """Whether name is a device the relay knows: leased, connected, listed in keys_file, or
        a stream-only device that listened before."""
        keys = self.config.keys
        return name in self.leases.leases or name in self.stream_sessions or name in self.routes.by_device \
            or name in self.names.listeners or (keys is not None and name in keys.secrets)

    def name_problem(self, device_id, name):
        """Why device_id may not offer a service called name, or None."""
        if is_address_shaped(name):
            return "service name %s reads as an address" % name
        if self.is_device_id(name):
            return "service name %s is a device_id" % name
        owner = self.names.owner(name)
        if owner is not None and owner != device_id:
            return ("service name %s is device %s's; the operator frees it with: mnedc_server.py "
                    "forget-name %s" % (name, owner, name))
        policy = self.config.policy
        if policy is not None and not policy.may_offer(device_id, name):
            return "the relay's policy does not let %s offer the service name %s" % (device_id, name)
        if owner is None and self.names.count_of(device_id) >= MAX_NAMES_PER_DEVICE:
            return ("device %s owns %d service names already; the operator frees one with: "
                    "mnedc_server.py forget-name NAME" % (device_id, MAX_NAMES_PER_DEVICE))
        if owner is None and len(self.names.owners) >= MAX_CLAIMED_NAMES:
            return "the relay holds %d service names, its most; the operator frees some with forget-name" % MAX_CLAIMED_NAMES
        return None

    def ipv6_of(self, address):
        """The IPv6 addresses that go with a packed virtual IPv4 address: the same host number."""
        if not self.ipv6_prefix:
            return ()
        return ipv6_addresses(self.ipv6_prefix, int.from_bytes(address, "big") - self.leases.network)

    def online(self, device_id):
        return device_id in self.routes.by_device or device_id in self.stream_sessions

    def directory_json(self):
        """The listing SERVICES gets, from the cache while no member or name changed (and it
        is under DIRECTORY_MAX_AGE_S old): built anew it costs milliseconds per 500 leases."""
        now = time.monotonic()
        version = (self.directory_version, self.switch.version)
        cached = self.directory_cache
        if cached is None or cached[0] != version or now - cached[1] > DIRECTORY_MAX_AGE_S:
            cached = self.directory_cache = (version, now, self.build_directory())
        return cached[2]

    def build_directory(self):
        """Devices, services and relay figures as JSON, trimmed to fit one frame."""
        known = sorted(set(self.leases.leases) | set(self.stream_sessions))
        devices = []
        for device_id in known:
            lease = self.leases.leases.get(device_id)
            devices.append({"device_id": device_id, "address": lease["address"] if lease else None,
                            "online": self.online(device_id), "tun": device_id in self.routes.by_device,
                            "stream_sessions": len(self.stream_sessions.get(device_id, ()))})
        services = [{"name": name, "device_id": session.device_id,
                     "address": None if session.address == NO_ADDRESS else ipv4_text(session.address),
                     "port": port} for name, (session, port) in sorted(self.switch.services.items())]
        relay = {"buffered_bytes": self.queued_bytes, "max_buffered_bytes": TOTAL_QUEUE_BYTES,
                 "streams": len(self.switch.streams) // 2, "max_window_bytes": MAX_STREAM_WINDOW_BYTES,
                 "max_streams_per_session": self.switch.max_streams, "domain": self.config.domain,
                 "dns": ipv4_text(self.leases.server_address) if self.dns_responders else None}
        while True:
            listing = json.dumps({"devices": devices, "services": services, "relay": relay,
                                  "truncated": len(devices) < len(known) or
                                  len(services) < len(self.switch.services)}).encode()
            if len(listing) <= MAX_PAYLOAD_BYTES:
                return listing
            if any(not d["online"] for d in devices):
                devices = [d for d in devices if d["online"]]
            elif len(devices) >= len(services):
                devices = devices[:len(devices) // 2]
            else:
                services = services[:len(services) // 2]

    # -- the data path --

    def route_packet(self, frame_type, packet, sender):
        offset = VNET_HEADER.size if frame_type == FRAME_VNET_PACKET else 0
        target, reason = self.routes.decide(packet, sender, offset)
        if target is not None and target is not EVERYONE and packet[offset] >> 4 == 6:
            reason = link_chatter(packet, offset)       # a unicast RA or redirect: not for members
            if reason:
                target = None
        if target is EVERYONE:
            self.fan_out(frame_type, packet, sender, offset)
        elif target is None:
            self.count_drop(reason, sender, frame_type, packet)
        elif self.config.policy is not None and not (self.config.policy.permits_packet(
                sender.device_id, target.device_id, destination_port(packet, offset), ip_addresses(packet, offset))
                if self.config.policy.networks else self.config.policy.permits(
                sender.device_id, target.device_id, destination_port(packet, offset))):
            self.count_drop("denied by policy", sender, frame_type, packet)
        else:
            target.send_packet(frame_type, packet)

    def fan_out(self, frame_type, packet, sender, offset):
        """A copy for every other member, as a LAN segment would: within the sender's budget and
        the relay's, and past the policy of each receiver."""
        chatter = link_chatter(packet, offset)
        if chatter:
            self.count_drop(chatter, sender, frame_type, packet)
            return
        now = time.monotonic()
        rates = (self.config.multicast_packets_per_second, self.config.multicast_bytes_per_second)
        if sender.multicast_budget is None or sender.multicast_budget.rates != rates:
            sender.multicast_budget = MulticastBudget(rates, now)
        if not sender.multicast_budget.take(len(packet), now):
            self.count_drop("over its broadcast budget", sender, frame_type, packet)
            return
        receivers = [member for member in self.routes.members() if member is not sender]
        if not self.multicast_copies.take(min(len(receivers), MULTICAST_COPIES_PER_S), now):
            self.count_drop("over the relay's broadcast budget", sender, frame_type, packet)
            return
        self.multicast_packets += 1
        policy = self.config.policy
        port = destination_port(packet, offset) if policy is not None else None
        for target in receivers:
            if policy is not None and not (policy.permits_packet(sender.device_id, target.device_id, port,
                                                                 ip_addresses(packet, offset))
                                           if policy.networks else policy.permits(sender.device_id, target.device_id, port)):
                self.count_drop("denied by policy", sender, frame_type, packet)
            else:
                self.multicast_copied += 1
                target.send_copy(frame_type, packet)

    def count_drop(self, reason, member, frame_type, packet, direction="from"):
        """Count a dropped packet; log it, rate-limited per reason and member."""
        self.drops[reason] = self.drops.get(reason, 0) + 1
        member.drops[reason] = member.drops.get(reason, 0) + 1
        offset = VNET_HEADER.size if frame_type == FRAME_VNET_PACKET else 0
        detail = ""
        if not ip_problem(packet, offset):
            detail = " %s -> %s" % tuple(ip_text(address) for address in ip_addresses(packet, offset))
        self.log.limited(("drop", reason, member.device_id), "info",
                         "dropped packet %s %s: %s%s (%d dropped for this reason so far)"
                         % (direction, member.name(), reason, detail, self.drops[reason]))

    # -- housekeeping --

    def tick(self):
        now = time.monotonic()
        for connection in list(self.handshaking) + list(self.finishing):    # the established keep_alive
            connection.check_timers(now)
        self.log.flush()
        if self.leases.on_trial and now - self.last_trial_sweep >= min(5.0, self.leases.trial_s / 2.0):
            self.last_trial_sweep = now
            self.expire_trial_leases()
        if self.leases.save_failed or (self.leases.dirty and now - self.last_lease_save > LEASE_SAVE_INTERVAL_S):
            self.save_leases()
        else:
            try:
                self.leases.sync_journal()
            except OSError as error:
                self.leases.save_failed = True
                self.log.error("cannot save leases to %s: %s; retrying" % (self.leases.path, describe_error(error)))
        self.names.save_if_dirty()
        for responder in self.dns_responders:
            if isinstance(responder, DnsTcpListener):
                responder.close_idle(now)

    def expire_trial_leases(self):
        dropped = self.leases.expire_trials(self.routes.by_device, time.time())
        if dropped:
            self.directory_version += 1
            self.log.limited(("trial",), "info", "freed the addresses of %d device(s) that left within %d s "
                             "of their first join (%s)" % (len(dropped), self.leases.trial_s, ", ".join(dropped[:8])
                                                           + (", ..." if len(dropped) > 8 else "")), burst=5)
            self.save_leases()

    def save_leases(self):
        self.last_lease_save = time.monotonic()
        try:
            self.leases.save()
        except OSError as error:
            self.log.error("cannot save leases to %s: %s" % (self.leases.path, describe_error(error)))

    def fatal(self, message):
        self.log.error(message)
        self.exit_code = 1
        self.on_stop_signal(None)

    def on_stop_signal(self, signum):
        if self.stopping:
            return
        self.stopping = True
        if signum is not None:
            self.log.info("received %s: shutting down; clients will come back within %d s"
                          % (signal.Signals(signum).name, self.config.restart_window))
        for connection in list(self.connections):
            if connection.stage == "established":
                connection.send_frame(FRAME_RESTARTING, encode_restarting(self.config.restart_window))
                connection.send_frame(FRAME_ERROR, encode_error(ERROR_SHUTDOWN, "the relay is restarting"))
            connection.close("server shutting down")
        if self.control is not None:
            self.control.close("server shutting down")
        for responder in self.dns_responders:
            responder.close("server shutting down")
        if self.tun is not None:
            self.tun.close("server shutting down")
        self.listener.close("server shutting down")
        self.save_leases()
        self.names.save_if_dirty()
        self.loop.stop()


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


# ==== TLS IDENTITY ====
# tls = yes without tls_cert/tls_key: at first start the server makes its own key and a
# self-signed certificate in state_dir, in Python, since a board may have no openssl command
# and the ssl module cannot make either. Ed25519 (RFC 8032), which OpenSSL 1.1.1 and newer
# (every supported board) accept for TLS 1.2 and 1.3. Clients trust it by its pin, the SHA-256
# of the certificate, instead of by a CA and a host name.

ED25519_P = 2 ** 255 - 19                   # the field
ED25519_L = 2 ** 252 + 27742317777372353535851937790883648493   # the order of the base point
ED25519_D = -121665 * pow(121666, ED25519_P - 2, ED25519_P) % ED25519_P
ED25519_SQRT_M1 = pow(2, (ED25519_P - 1) // 4, ED25519_P)
OID_ED25519 = bytes((0x06, 0x03, 0x2B, 0x65, 0x70))             # 1.3.101.112
OID_COMMON_NAME = bytes((0x06, 0x03, 0x55, 0x04, 0x03))         # 2.5.4.3
DER_SEQUENCE, DER_SET, DER_INTEGER, DER_BIT_STRING, DER_OCTET_STRING = 0x30, 0x31, 0x02, 0x03, 0x04
DER_UTF8, DER_UTC_TIME, DER_GENERALIZED_TIME, DER_EXPLICIT_0 = 0x0C, 0x17, 0x18, 0xA0
NO_EXPIRY = b"99991231235959Z"              # RFC 5280 4.1.2.5: a certificate without an end
TLS_CERT_NAME, TLS_KEY_NAME = "tls.pem", "tls.key"
NETWORK_SALT_NAME, NETWORK_SALT_BYTES = "salt", 16
IPV6_PREFIX_NAME = "ipv6_prefix"


def sha512(data):
    """The builtin SHA-512 (_sha512 to 3.11, _sha2 from 3.12): no OpenSSL needed for hashlib."""
    try:
        from _sha2 import sha512 as digest
    except ImportError:
        try:
            from _sha512 import sha512 as digest
        except ImportError:
            from hashlib import sha512 as digest
    return digest(data).digest()


def ed25519_add(p, q):
    """Two points in extended coordinates (X, Y, Z, T) added (RFC 8032 5.1.4)."""
    field = ED25519_P
    a = (p[1] - p[0]) * (q[1] - q[0]) % field
    b = (p[1] + p[0]) * (q[1] + q[0]) % field
    c = 2 * p[3] * q[3] * ED25519_D % field
    d = 2 * p[2] * q[2] % field
    e, f, g, h = b - a, d - c, d + c, b + a
    return e * f % field, g * h % field, f * g % field, e * h % field


def ed25519_multiply(scalar, point):
    result = (0, 1, 1, 0)
    while scalar:
        if scalar & 1:
            result = ed25519_add(result, point)
        point = ed25519_add(point, point)
        scalar >>= 1
    return result


def ed25519_base_point():
    field = ED25519_P
    y = 4 * pow(5, field - 2, field) % field
    xx = (y * y - 1) * pow(ED25519_D * y * y + 1, field - 2, field) % field
    x = pow(xx, (field + 3) // 8, field)
    if (x * x - xx) % field:
        x = x * ED25519_SQRT_M1 % field
    if x & 1:
        x = field - x
    return x, y, 1, x * y % field


def ed25519_encode(point):
    inverse = pow(point[2], ED25519_P - 2, ED25519_P)
    x, y = point[0] * inverse % ED25519_P, point[1] * inverse % ED25519_P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def ed25519_expand(seed):
    digest = sha512(seed)
    scalar = int.from_bytes(digest[:32], "little") & ((1 << 254) - 8) | (1 << 254)
    return scalar, digest[32:]


def ed25519_public_key(seed):
    return ed25519_encode(ed25519_multiply(ed25519_expand(seed)[0], ed25519_base_point()))


def ed25519_sign(seed, message):
    """The 64-byte signature of message by the private key seed (RFC 8032 5.1.6)."""
    scalar, prefix = ed25519_expand(seed)
    base = ed25519_base_point()
    public = ed25519_encode(ed25519_multiply(scalar, base))
    nonce = int.from_bytes(sha512(prefix + message), "little") % ED25519_L
    commitment = ed25519_encode(ed25519_multiply(nonce, base))
    challenge = int.from_bytes(sha512(commitment + public + message), "little") % ED25519_L
    return commitment + ((nonce + challenge * scalar) % ED25519_L).to_bytes(32, "little")


def der(tag, body):
    """One DER element: tag, length, body."""
    if len(body) < 0x80:
        return bytes((tag, len(body))) + body
    length = len(body).to_bytes((len(body).bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + body


def der_name(common_name):
    return der(DER_SEQUENCE, der(DER_SET, der(DER_SEQUENCE, OID_COMMON_NAME + der(DER_UTF8, common_name.encode()))))


def self_signed_certificate(seed, common_name, now):
    """A DER X.509 v3 certificate for the Ed25519 key seed, signed by itself, valid from now on."""
    serial = bytearray(os.urandom(16))
    serial[0] = serial[0] & 0x3F | 0x40         # positive, and always 16 bytes long
    algorithm = der(DER_SEQUENCE, OID_ED25519)
    validity = der(DER_SEQUENCE, der(DER_UTC_TIME, time.strftime("%y%m%d%H%M%SZ", time.gmtime(now)).encode())
                   + der(DER_GENERALIZED_TIME, NO_EXPIRY))
    public_key = der(DER_SEQUENCE, algorithm + der(DER_BIT_STRING, b"\0" + ed25519_public_key(seed)))
    unsigned = der(DER_SEQUENCE, der(DER_EXPLICIT_0, der(DER_INTEGER, b"\x02")) + der(DER_INTEGER, bytes(serial))
                   + algorithm + der_name(common_name) + validity + der_name(common_name) + public_key)
    return der(DER_SEQUENCE, unsigned + algorithm + der(DER_BIT_STRING, b"\0" + ed25519_sign(seed, unsigned)))


def ed25519_private_key_der(seed):
    """PKCS #8 for an Ed25519 key (RFC 8410 7)."""
    return der(DER_SEQUENCE, der(DER_INTEGER, b"\0") + der(DER_SEQUENCE, OID_ED25519)
               + der(DER_OCTET_STRING, der(DER_OCTET_STRING, seed)))


def pem(label, data):
    import base64
    text = base64.b64encode(data).decode("ascii")
    lines = [text[start:start + 64] for start in range(0, len(text), 64)]
    return "-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, "\n".join(lines), label)


def ensure_tls_identity(state_dir, common_name):
    """(certificate path, key path) in state_dir, made on the first call: True as a third value
    when they were made now. The key is written 0600 before the certificate that names it."""
    cert_path, key_path = os.path.join(state_dir, TLS_CERT_NAME), os.path.join(state_dir, TLS_KEY_NAME)
    if os.path.exists(cert_path) and os.path.exists(key_path):
        return cert_path, key_path, False
    seed = os.urandom(32)
    for path, text, mode in ((key_path, pem("PRIVATE KEY", ed25519_private_key_der(seed)), 0o600),
                             (cert_path, pem("CERTIFICATE", self_signed_certificate(seed, common_name, time.time())), 0o644)):
        temporary = path + ".tmp"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        with os.fdopen(descriptor, "w") as sink:
            sink.write(text)
        os.replace(temporary, path)
    return cert_path, key_path, True


def certificate_pin(path):
    """'sha256:HEX' of the PEM certificate at path: what clients pin."""
    import base64
    with open(path) as source:
        text = source.read()
    body = text.split("-----BEGIN CERTIFICATE-----", 1)[1].split("-----END CERTIFICATE-----", 1)[0]
    return "sha256:" + sha256(base64.b64decode("".join(body.split()))).hexdigest()


# ==== CONFIG ====

class ServerConfig:
    """Validated server settings: INI values first, command-line flags over them."""

    def __init__(self):
        self.listen = ("0.0.0.0", DEFAULT_PORT)
        self.subnet = parse_subnet(DEFAULT_SUBNET)
        self.secret = None
        self.secret_source = None
        self.tun = "auto"
        self.interface = DEFAULT_INTERFACE
        self.mtu = DEFAULT_MTU
        self.offload = True
        self.state_dir = DEFAULT_STATE_DIR
        self.keepalive = DEFAULT_KEEPALIVE_S
        self.control_socket = DEFAULT_CONTROL_SOCKET
        self.restart_window = DEFAULT_RESTART_WINDOW_S
        self.on_join = self.on_leave = None
        self.log_level = "info"
        self.keys_file = self.policy_file = None
        self.keys = self.policy = None          # DeviceKeys and Policy, loaded from those files
        self.network_secret = True              # no: only devices in keys_file may join
        self.max_clients = MAX_CLIENTS
        self.max_connections_per_source = MAX_CONNECTIONS_PER_SOURCE
        self.max_handshakes = MAX_PENDING_HANDSHAKES
        self.max_frame_bytes = MAX_PAYLOAD_BYTES
        self.max_queue_bytes = MAX_QUEUE_BYTES
        self.max_streams_per_client = MAX_STREAMS_PER_SESSION
        self.max_new_leases_per_minute = MAX_NEW_LEASES_PER_MINUTE
        self.lease_trial = DEFAULT_LEASE_TRIAL_S
        self.reservations = []                  # [(device_id, address number, "FILE line N")]
        self.routes = []                        # [(packed network, prefix length, gateway device_id, where)]
        self.path = None                        # the INI file these came from
        self.multicast_groups = ()              # packed groups relayed beside the link-local ones
        self.multicast_packets_per_second = MULTICAST_PACKETS_PER_S
        self.multicast_bytes_per_second = MULTICAST_BYTES_PER_S
        self.dns = True                         # answer DNS on the TUN's address
        self.ipv6 = True                        # the network has a unique-local IPv6 /64
        self.ipv6_prefix = None                 # ... which cmd_run reads from state_dir (8 bytes)
        self.domain = DEFAULT_DOMAIN
        self.tls = True                         # the default: tls = no is the operator's explicit choice
        self.allow_plaintext = False            # yes: a TLS relay also takes plaintext clients
        self.tls_cert = self.tls_key = self.tls_client_ca = None
        self.tls_context = None                 # built from those when tls = yes
        self.tls_generate = False               # tls = yes, no tls_cert: make our own at start
        self.tls_pin = None                     # "sha256:..." of the certificate in use
        self.network_salt = None                # state_dir/salt: the PBKDF2 salt of this network
        self.salt_generate = False              # no salt yet: cmd_run writes this new one


SERVER_KEYS = {
    "listen": lambda config, text: setattr(config, "listen", parse_listen(text)),
    "subnet": lambda config, text: setattr(config, "subnet", parse_subnet(text)),
    "secret": lambda config, text: setattr(config, "secret", check_secret(text.strip())),
    "secret_file": None,            # resolved relative to the INI file, below
    "tun": lambda config, text: setattr(config, "tun", parse_choice(text, ("yes", "no", "auto"))),
    "interface": lambda config, text: setattr(config, "interface", check_interface_name(text)),
    "mtu": lambda config, text: setattr(config, "mtu", parse_int(text, 576, MAX_MTU)),
    "offload": lambda config, text: setattr(config, "offload", parse_choice(text, ("yes", "no")) == "yes"),
    "state_dir": lambda config, text: setattr(config, "state_dir", text.strip()),
    "keepalive": lambda config, text: setattr(config, "keepalive", parse_int(text, 3, 3600)),
    "control_socket": lambda config, text: setattr(config, "control_socket", text.strip()),
    "restart_window": lambda config, text: setattr(config, "restart_window", parse_int(text, 1, 600)),
    "on_join": lambda config, text: setattr(config, "on_join", check_hook(text)),
    "on_leave": lambda config, text: setattr(config, "on_leave", check_hook(text)),
    "log_level": lambda config, text: setattr(config, "log_level", parse_choice(text, tuple(LOG_LEVELS))),
    "keys_file": lambda config, path: setattr(config, "keys_file", path),
    "network_secret": lambda config, text: setattr(config, "network_secret", parse_choice(text, ("yes", "no")) == "yes"),
    "policy_file": lambda config, path: setattr(config, "policy_file", path),
    "max_clients": lambda config, text: setattr(config, "max_clients", parse_int(text, 1, 1000000)),
    "max_connections_per_source": lambda config, text: setattr(
        config, "max_connections_per_source", parse_int(text, 1, 1000000)),
    "max_handshakes": lambda config, text: setattr(config, "max_handshakes", parse_int(text, 1, 100000)),
    "max_frame_bytes": lambda config, text: setattr(config, "max_frame_bytes", parse_int(text, MIN_FRAME_BYTES, MAX_PAYLOAD_BYTES)),
    "max_queue_bytes": lambda config, text: setattr(config, "max_queue_bytes", parse_int(text, 65536, 1 << 30)),
    "max_streams_per_client": lambda config, text: setattr(config, "max_streams_per_client", parse_int(text, 1, 4096)),
    "max_new_leases_per_minute": lambda config, text: setattr(
        config, "max_new_leases_per_minute", parse_int(text, 1, 1000000)),
    "lease_trial": lambda config, text: setattr(config, "lease_trial", parse_int(text, 0, 7 * 24 * 3600)),
    "dns": lambda config, text: setattr(config, "dns", parse_choice(text, ("yes", "no")) == "yes"),
    "domain": lambda config, text: setattr(config, "domain", check_domain(text)),
    "multicast_groups": lambda config, text: setattr(config, "multicast_groups", parse_groups(text)),
    "ipv6": lambda config, text: setattr(config, "ipv6", parse_choice(text, ("yes", "no")) == "yes"),
    "multicast_packets_per_second": lambda config, text: setattr(
        config, "multicast_packets_per_second", parse_int(text, 0, 1000000)),
    "multicast_bytes_per_second": lambda config, text: setattr(
        config, "multicast_bytes_per_second", parse_int(text, 0, 1 << 30)),
    "tls": lambda config, text: setattr(config, "tls", parse_choice(text, ("yes", "no")) == "yes"),
    "allow_plaintext": lambda config, text: setattr(config, "allow_plaintext", parse_choice(text, ("yes", "no")) == "yes"),
    "tls_cert": lambda config, path: setattr(config, "tls_cert", path),
    "tls_key": lambda config, path: setattr(config, "tls_key", path),
    "tls_client_ca": lambda config, path: setattr(config, "tls_client_ca", path),
}
TLS_SETTINGS = ("tls", "tls_cert", "tls_key", "tls_client_ca", "tls_context", "tls_pin", "tls_generate")
# SIGHUP applies every other key live
RESTART_KEYS = ("listen", "subnet", "tun", "interface", "mtu", "offload", "state_dir", "control_socket", "dns",
                "ipv6")
LIMIT_KEYS = ("max_clients", "max_connections_per_source", "max_handshakes", "max_frame_bytes",
              "max_queue_bytes", "max_streams_per_client", "max_new_leases_per_minute", "lease_trial",
              "multicast_packets_per_second", "multicast_bytes_per_second")
PATH_KEYS = ("secret_file", "keys_file", "policy_file", "tls_cert", "tls_key", "tls_client_ca")  # relative to the INI file


RESERVE_PREFIX, ROUTE_PREFIX = "reserve ", "route "


class ServerIniKeys(dict):
    """SERVER_KEYS, and the 'reserve DEVICE_ID' keys beside them, for read_ini."""

    def __contains__(self, key):
        return key.startswith((RESERVE_PREFIX, ROUTE_PREFIX)) or dict.__contains__(self, key)


def parse_prefix(text):
    """(packed network, prefix length) of "192.0.2.0/24" or "fd00:1::/64"; ValueError."""
    address, slash, length = text.partition("/")
    try:
        network = socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
    except (OSError, ValueError):
        raise ValueError("%r is not a network such as 192.0.2.0/24 or fd00:1::/64" % text)
    if not slash or not length.isdigit():
        raise ValueError("%r needs a prefix length, as in 192.0.2.0/24" % text)
    problem = prefix_problem(network, int(length))
    if problem:
        raise ValueError("%s: %s" % (text, problem))
    return network, int(length)


def prefixes_overlap(one, other):
    """Whether two (packed network, prefix length) of the same IP version share an address."""
    if len(one[0]) != len(other[0]):
        return False
    bits, shorter = len(one[0]) * 8, min(one[1], other[1])
    return int.from_bytes(one[0], "big") >> (bits - shorter) == int.from_bytes(other[0], "big") >> (bits - shorter)


def read_routes(path, subnet):
    """[(packed network, prefix length, gateway device_id, "FILE line N")] of the 'route
    NETWORK = DEVICE_ID' lines of [server]: the operator grants DEVICE_ID the network behind it.
    ConfigError for one that overlaps the virtual network or another route."""
    routes = []
    virtual = (packed_address(subnet[0]), subnet[1])
    for where, words, device_id in server_lines(path, "route", "route NETWORK = DEVICE_ID"):
        if len(words) != 2 or len(device_id.split()) != 1:
            raise ConfigError("%s: want: route NETWORK = DEVICE_ID" % where)
        try:
            network = parse_prefix(words[1])
            check_device_id(device_id)
        except ValueError as error:
            raise ConfigError("%s: route %s: %s" % (where, words[1], error))
        what = "%s: route %s = %s: " % (where, words[1], device_id)
        if prefixes_overlap(network, virtual):
            raise ConfigError(what + "overlaps the virtual network %s/%d" % (ipv4_text(virtual[0]), virtual[1]))
        for other in routes:
            if prefixes_overlap(network, other[:2]):
                raise ConfigError(what + "overlaps %s/%d, granted to %s (%s)" % (ip_text(other[0]), other[1], other[2], other[3]))
        routes.append(network + (device_id, where))
    return routes


def server_lines(path, word, form):
    """(where, the words before '=', what follows it) of each line of [server] in path that
    starts with word, read from the file itself: values keep their case (configparser folds
    keys) and each problem can name its line."""
    section = None
    with open(path) as source:
        lines = source.read().splitlines()
    for line_number, line in enumerate(lines, 1):
        text = line.strip()
        if text.startswith("["):
            section = text[1:].split("]", 1)[0].strip()
            continue
        if section != "server" or text.split()[:1] != [word]:
            continue
        where = "%s line %d" % (path, line_number)
        key, equals, value = text.partition("=")
        if not equals or not value.strip():
            raise ConfigError("%s: want: %s" % (where, form))
        yield where, key.split(), value.strip()


def read_reservations(path, subnet):
    """[(device_id, address number, "FILE line N")] of the 'reserve DEVICE_ID = ADDRESS' lines
    of [server] in path, read from the file itself: device_ids keep their case (configparser
    folds it) and each problem names its line. ConfigError for one that can never hold."""
    network, prefix_length = subnet
    last = network + (1 << (32 - prefix_length)) - 1
    reservations = []
    by_device, by_number = {}, {}
    for where, words, address in server_lines(path, "reserve", "reserve DEVICE_ID = ADDRESS"):
        if len(words) != 2 or len(address.split()) != 1:
            raise ConfigError("%s: want: reserve DEVICE_ID = ADDRESS" % where)
        device_id = words[1]
        try:
            check_device_id(device_id)
        except ValueError as error:
            raise ConfigError("%s: reserve %s: %s" % (where, device_id, error))
        what = "%s: reserve %s = %s: " % (where, device_id, address)
        if not is_ipv4_literal(address):
            raise ConfigError(what + "not an IPv4 address")
        number = struct.unpack("!I", socket.inet_aton(address))[0]
        if not network < number < last:
            raise ConfigError(what + "outside %s, or its network or broadcast address"
                              % "%s/%d" % (ipv4_text(packed_address(network)), prefix_length))
        if number == network + 1:
            raise ConfigError(what + "the relay's own address")
        if device_id in by_device:
            raise ConfigError(what + "%s is reserved already (%s)" % (device_id, by_device[device_id]))
        if number in by_number:
            raise ConfigError(what + "%s is reserved already for %s (%s)" % ((address,) + by_number[number]))
        by_device[device_id], by_number[number] = where, (device_id, where)
        reservations.append((device_id, number, where))
    return reservations


def parse_groups(text):
    """Packed multicast groups from "239.1.2.3, ff05::1:3"."""
    groups = []
    for word in text.replace(",", " ").split():
        if is_ipv4_literal(word) and is_ipv4_multicast(socket.inet_aton(word)):
            groups.append(socket.inet_aton(word))
            continue
        try:
            group = socket.inet_pton(socket.AF_INET6, word)
        except (OSError, ValueError):
            group = b""
        if group[:1] != b"\xff":
            raise ValueError("%r is not a multicast group (224.0.0.0 to 239.255.255.255, or ff00::/8)" % word)
        groups.append(group)
    return tuple(groups)


def ensure_ipv6_prefix(state_dir):
    """The network's unique-local /64 (8 packed bytes) from state_dir/ipv6_prefix; at the first
    start a random one (RFC 4193: fd, 40 random bits, subnet 0) is drawn and written there.
    An operator may write another /64 in fc00::/7 there before the first start."""
    path = os.path.join(state_dir, IPV6_PREFIX_NAME)
    try:
        with open(path) as source:
            text = source.read().strip()
    except FileNotFoundError:
        prefix = b"\xfd" + os.urandom(5) + bytes(2)
        temporary = path + ".tmp"
        with open(temporary, "w") as sink:
            sink.write("%s/64\n" % ip_text(prefix + bytes(8)))
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(temporary, path)
        return prefix
    address, _, length = text.partition("/")
    try:
        packed = socket.inet_pton(socket.AF_INET6, address)
    except (OSError, ValueError):
        packed = b""
    if length != "64" or not packed or packed[0] & 0xFE != 0xFC or any(packed[8:]):
        raise ValueError("%s holds %r, not a unique-local /64 such as fd12:3456:789a::/64: fix it, or "
                         "remove it to draw a new one (every device's IPv6 address changes)" % (path, text))
    return packed[:8]


def check_hook(text):
    path = text.strip()
    if not os.path.isabs(path) or not os.access(path, os.X_OK):
        raise ValueError("%r is not an executable file given by its absolute path" % path)
    return path


def parse_listen(text):
    """(host, port) with host an IPv4 address: a name is resolved once, at start."""
    host, port = parse_host_port(text, DEFAULT_PORT)
    try:
        return resolve_ipv4(host, port)
    except OSError as error:
        raise ValueError("cannot use %r: %s" % (host, describe_error(error)))


def load_server_config(args, key_cache=None, reloading=False, network_salt=None, derive_keys=True):
    """ServerConfig from -c FILE and the flags; ConfigError names what is wrong.

    key_cache keeps the keys_file's PBKDF2 derivations from one load to the next (SIGHUP).
    reloading: a keys file that admits nobody is then taken (it may revoke the last device).
    network_salt: the running one (a reload keeps it, whatever state_dir now says). derive_keys:
    False for status, kick and --check, which need no keys (PBKDF2 costs a board a second each)."""
    config = ServerConfig()
    config.path = args.config
    values = read_ini(args.config, "server", ServerIniKeys(SERVER_KEYS)) if args.config else {}
    where = "%s: [server] " % args.config if args.config else "[server] "
    values = {key: text for key, text in values.items() if not key.startswith((RESERVE_PREFIX, ROUTE_PREFIX))}
    if "secret" in values and "secret_file" in values:
        raise ConfigError(where + "secret_file: set secret or secret_file, not both")
    for key, text in values.items():
        try:
            if key in PATH_KEYS:
                text = os.path.join(os.path.dirname(os.path.abspath(args.config)), text.strip())
            if key == "secret_file":
                config.secret, config.secret_source = check_secret(read_secret_file(text)), text
            else:
                SERVER_KEYS[key](config, text)
            if key == "keys_file":
                config.keys = DeviceKeys(text, key_cache)
            elif key == "policy_file":
                config.policy = Policy(text)
        except (ValueError, OSError) as error:
            raise ConfigError(where + "%s: %s" % (key, describe_error(error)))
    flags = (("listen", args.listen), ("subnet", args.subnet), ("state_dir", args.state_dir),
             ("tun", "no" if args.no_tun else None), ("tls", "no" if args.no_tls else None),
             ("control_socket", args.control),
             ("log_level", "debug" if args.verbose else None))
    for key, text in flags:
        if text is not None:
            try:
                SERVER_KEYS[key](config, text)
            except ValueError as error:
                raise ConfigError("--%s: %s" % (key.replace("_", "-"), error))
    if args.config:
        config.reservations = read_reservations(args.config, config.subnet)
        config.routes = read_routes(args.config, config.subnet)
    if network_salt is not None:
        config.network_salt = network_salt
    elif derive_keys or getattr(args, "command", "run") == "check":
        try:
            config.network_salt, config.salt_generate = read_network_salt(config.state_dir)
        except (OSError, ValueError) as error:
            raise ConfigError("state_dir %s: %s" % (config.state_dir, describe_error(error)))
    if config.keys and derive_keys:
        config.keys.derive(config.network_salt)
    admitted = config.keys and [d for d, secret in config.keys.secrets.items() if secret != REVOKED]
    if not config.network_secret and not admitted and not reloading:
        raise ConfigError(where + "network_secret: 'no' needs a keys_file with a device that is not "
                          "revoked, or nobody could join")
    if getattr(args, "command", "run") not in CONTROL_COMMANDS:     # these only use the control socket
        check_tls_settings(config, where)
    return config


def read_network_salt(state_dir):
    """(salt, True when it is new): the network's, from state_dir/salt, or a fresh one that
    cmd_run writes there at the first start. Clients learn it from CHALLENGE."""
    path = os.path.join(state_dir, NETWORK_SALT_NAME)
    try:
        with open(path) as source:
            text = source.read().strip()
    except FileNotFoundError:
        return os.urandom(NETWORK_SALT_BYTES), True
    try:
        salt = bytes.fromhex(text)
    except ValueError:
        salt = b""
    if len(salt) != NETWORK_SALT_BYTES:
        raise ValueError("%s holds no salt of %d bytes: restore it, or remove it to draw a new one "
                         "(clients take it at their next join)" % (path, NETWORK_SALT_BYTES))
    return salt, False


def write_network_salt(config):
    """Atomically (a power cut at the first boot leaves no half file), readable by root only."""
    path = os.path.join(config.state_dir, NETWORK_SALT_NAME)
    temporary = path + ".tmp"
    try:
        os.unlink(temporary)
    except FileNotFoundError:
        pass
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w") as sink:
        sink.write(config.network_salt.hex() + "\n")
        sink.flush()
        os.fsync(sink.fileno())
    os.replace(temporary, path)


def check_tls_settings(config, where):
    """With tls = yes: the configured certificate and key, or, with neither, the server's own
    identity in state_dir (made at the first start: config.tls_generate). Builds the context."""
    tls_files = [(key, getattr(config, key)) for key in ("tls_cert", "tls_key", "tls_client_ca") if getattr(config, key)]
    if tls_files and not config.tls:
        raise ConfigError(where + "tls: %s set but tls is not yes: set tls = yes, or remove them"
                          % ", ".join(key for key, _ in tls_files))
    for key, path in tls_files:
        if not os.path.isfile(path):
            raise ConfigError(where + "%s: %s: no such file" % (key, path))
    if not config.tls:
        return
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError(where + "tls: give both tls_cert and tls_key, or neither (then the server "
                          "makes its own in state_dir)")
    if not config.tls_cert:
        try:
            load_ssl()
        except ValueError as error:
            raise ConfigError(where + "tls: %s" % error)
        config.tls_cert = os.path.join(config.state_dir, TLS_CERT_NAME)
        config.tls_key = os.path.join(config.state_dir, TLS_KEY_NAME)
        if not (os.path.exists(config.tls_cert) and os.path.exists(config.tls_key)):
            config.tls_generate = True          # cmd_run makes them once state_dir exists
            return
    build_tls_context(config, where)


def build_tls_context(config, where):
    try:
        config.tls_context = tls_context(True, config.tls_cert, config.tls_key, config.tls_client_ca)
        config.tls_pin = certificate_pin(config.tls_cert)
    except (ValueError, OSError, IndexError) as error:
        raise ConfigError(where + "tls: %s" % describe_error(error))


def unauthenticated_policy_names(config):
    """The device_ids the policy names whose name nobody proves: with the network secret a
    device may call itself anything, so a rule on such a name holds only among honest
    members. A name in keys_file (its own secret) or behind client certificates is proven."""
    if config.policy is None or not config.network_secret or config.tls_client_ca:
        return []
    listed = set(config.keys.secrets) if config.keys else set()
    return sorted(config.policy.named_devices() - listed)


def warn_of_unauthenticated_policy(config, log):
    names = unauthenticated_policy_names(config)
    if names:
        log.warning("policy_file names %s, which only the network secret authenticates: any member may "
                    "join under such a name and be judged as that device; give each its own secret in "
                    "keys_file (or use client certificates) for rules that hold" % ", ".join(names))


def ensure_secret(config):
    """Use the configured secret, or the one in state_dir, or generate one there.

    True when it generated one, which the operator must then hand to the clients.
    """
    if config.secret is not None:
        return False
    path = os.path.join(config.state_dir, "secret")
    if os.path.exists(path):
        config.secret, config.secret_source = check_secret(read_secret_file(path)), path
        return False
    secret = os.urandom(24).hex()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as sink:
        sink.write(secret + "\n")
    config.secret, config.secret_source = secret.encode("ascii"), path
    return True


def print_client_lines(config, port, log, with_secret):
    """What each client needs of what the server made at this start: the secret, the pin. The
    secret itself only to a terminal: a log ends up in syslog, logread, a journal."""
    made = ["a new network secret"] if with_secret else []
    made += ["a TLS certificate"] if config.tls_generate else []
    lines = ["server = %s:%d" % (reachable_address(config.listen[0]), port)]
    if with_secret and log.to_terminal():
        lines.append("secret = %s" % config.secret.decode("ascii"))
    elif with_secret:
        lines.append("secret = (the line in %s, readable by root only; it is not logged)" % config.secret_source)
    lines += ["server_pin = %s" % config.tls_pin] if config.tls_pin else []
    log.info("generated %s in %s. Add these lines at the end of each device's client-config.ini "
             "(its [client] section):\n\n%s\n" % (" and ".join(made), config.state_dir, "\n".join(lines)))


def reachable_address(listen_host):
    """The address clients should dial: the listen address, or this host's main address."""
    if listen_host not in ("0.0.0.0", ""):
        return listen_host
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))   # a route lookup only: UDP connect sends nothing
        return probe.getsockname()[0]
    except OSError:
        return "ADDRESS-OF-THIS-HOST"
    finally:
        probe.close()


# ==== CLI ====

def build_parser():
    plain = help_formatter(argparse.HelpFormatter)
    common = argparse.ArgumentParser(add_help=False, formatter_class=plain)
    common.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="INI file with a [server] section")
    common.add_argument("--control", metavar="SOCKET", default=argparse.SUPPRESS,
                        help="the control socket (default %s)" % DEFAULT_CONTROL_SOCKET)
    parser = argparse.ArgumentParser(
        prog="mnedc_server.py", description=__doc__, parents=[common],
        formatter_class=help_formatter(argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--listen", metavar="HOST:PORT", help="accept clients here (default %s)" % DEFAULT_LISTEN)
    parser.add_argument("--subnet", metavar="CIDR", help="virtual network (default %s)" % DEFAULT_SUBNET)
    parser.add_argument("--no-tun", action="store_true", help="do not join the network as .1 through TUN")
    parser.add_argument("--no-tls", action="store_true", help="plaintext links, as tls = no (clients set tls = no too)")
    parser.add_argument("--state-dir", metavar="DIR", help="leases and generated secret (default %s)" % DEFAULT_STATE_DIR)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug lines too")
    parser.add_argument("--syslog", action="store_true", help="log to syslog (daemon facility) instead of stderr")
    parser.add_argument("--pidfile", metavar="FILE", help="write the process id here")
    parser.add_argument("--heartbeat", metavar="FILE",
                        help="touch FILE every %d s from the event loop, for the watchdog" % HEARTBEAT_S)
    parser.add_argument("--check", action="store_true",
                        help="check that this Python and the configuration can run the server "
                             "(modules, config, listen address, state_dir), then exit: 0 ok, 1 a "
                             "missing module (with the package to install), 2 a bad configuration")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    status = commands.add_parser("status", parents=[common], formatter_class=plain, help="show the running server's devices and counters")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    kick = commands.add_parser("kick", parents=[common], formatter_class=plain, help="disconnect a device (it may rejoin)")
    kick.add_argument("device_id", metavar="DEVICE_ID")
    forget = commands.add_parser("forget", parents=[common], formatter_class=plain,
                                 help="free an offline device's lease, address and service names")
    forget.add_argument("device_id", metavar="DEVICE_ID")
    forget_name = commands.add_parser("forget-name", parents=[common], formatter_class=plain,
                                      help="free a service name for the next device that offers it")
    forget_name.add_argument("name", metavar="NAME")
    return parser


def cmd_check(args):
    """--check: what install.sh asks before it starts the service."""
    log = Log("info")
    missing = missing_modules(RUN_MODULES)
    if missing:
        log.error("this Python (%s) lacks %s: %s" % (sys.executable, ", ".join(missing), install_hint(missing)))
        return 1
    try:
        config = load_server_config(args, derive_keys=False)
    except ConfigError as error:
        log.error(str(error))
        return 2
    state = os.path.abspath(config.state_dir)
    if os.path.exists(state) and not os.path.isdir(state):
        log.error("state_dir %s: not a directory" % config.state_dir)
        return 2
    while not os.path.isdir(state) and os.path.dirname(state) != state:
        state = os.path.dirname(state)  # the daemon creates state_dir: its first parent must allow it
    if not os.access(state, os.W_OK | os.X_OK):
        log.error("state_dir %s: %s is not writable" % (config.state_dir, state))
        return 2
    sys.stdout.write("check passed: Python %d.%d, %s, listen %s:%d, subnet %s, state_dir %s%s\n" % (
        sys.version_info[0], sys.version_info[1], args.config or "no config file",
        config.listen[0], config.listen[1], "%s/%d" % (ipv4_text(packed_address(config.subnet[0])), config.subnet[1]), config.state_dir, ", TLS" if config.tls else ""))
    return 0


def cmd_run(args):
    log = Log("debug" if args.verbose else "info", syslog_ident="mnedc-server" if args.syslog else None)
    try:
        config = load_server_config(args)
    except ConfigError as error:
        log.error(str(error))
        return 2
    log.set_level(config.log_level)
    try:
        os.makedirs(config.state_dir, exist_ok=True)
        secret_made = ensure_secret(config)
        if config.salt_generate:
            write_network_salt(config)
        if config.ipv6:
            config.ipv6_prefix = ensure_ipv6_prefix(config.state_dir)
            ula = (config.ipv6_prefix + bytes(8), 64)
            for network, length, gateway, where in config.routes:
                if prefixes_overlap((network, length), ula):
                    raise ConfigError("%s: route %s/%d = %s: overlaps the network's IPv6 %s/64 (%s)" % (
                        where, ip_text(network), length, gateway, ip_text(ula[0]),
                        os.path.join(config.state_dir, IPV6_PREFIX_NAME)))
        certificate_made = config.tls_generate and ensure_tls_identity(config.state_dir, "mnedc-relay")[2]
        if config.tls_generate:
            build_tls_context(config, "%s: [server] " % args.config)
    except (OSError, ValueError, ConfigError) as error:
        log.error("state_dir %s: %s" % (config.state_dir, describe_error(error)))
        return 2
    key_cache = config.keys.cache if config.keys else {}
    server = RelayServer(config, log, reload_config=lambda: load_server_config(
        args, key_cache, reloading=True, network_salt=config.network_salt))
    try:
        server.start()
    except OSError as error:
        log.error(str(error))
        return 1
    if secret_made or certificate_made:
        print_client_lines(config, server.listener.sock.getsockname()[1], log, secret_made)
    files = DaemonFiles(args.pidfile, args.heartbeat)
    try:
        files.start(server.loop)
    except OSError as error:
        log.error(str(error) if error.filename is None else
                  "cannot write %s: %s" % (error.filename, describe_error(error)))
        return 1
    tls = "no TLS" if not config.tls else "TLS, client certificates required" if config.tls_client_ca else "TLS"
    if config.tls:
        tls += ", certificate pin %s" % config.tls_pin
    warn_of_unauthenticated_policy(config, log)
    if not config.tls:
        log.warning("tls = no: links to this relay are plaintext; anyone on their path can read and change "
                    "what crosses them")
    elif config.allow_plaintext:
        tls += ", plaintext clients allowed"
        log.warning("allow_plaintext = yes: clients without TLS are taken too, and their links are "
                    "plaintext; remove it once every client has server_pin or tls_ca")
    log.info("MNEDC server ready (protocol %d, secret from %s, %s)"
             % (PROTOCOL_VERSION, config.secret_source or "config", tls))
    try:
        server.run()
    finally:
        files.remove()
    log.info("stopped")
    return server.exit_code


def ask_server(args, request):
    """The running server's reply to request, or an exit status after saying why not."""
    try:
        config = load_server_config(args, derive_keys=False)
    except ConfigError as error:
        sys.stderr.write("mnedc_server.py: %s\n" % error)
        return 2
    try:
        reply = control_request(config.control_socket, request)
    except OSError as error:
        sys.stderr.write("mnedc_server.py: no running server answers on %s: %s\n"
                         % (config.control_socket, describe_error(error)))
        return 1
    if "error" in reply:
        sys.stderr.write("mnedc_server.py: %s\n" % reply["error"])
        return 1
    return reply


def cmd_status(args):
    reply = ask_server(args, {"command": "status"})
    if isinstance(reply, int):
        return reply
    sys.stdout.write(json.dumps(reply, indent=1, sort_keys=True) + "\n" if args.json else format_status(reply))
    return 0


def cmd_kick(args):
    reply = ask_server(args, {"command": "kick", "device_id": args.device_id})
    if isinstance(reply, int):
        return reply
    print("disconnected %s (%d connection(s)); it may rejoin" % (reply["device_id"], reply["kicked"]))
    return 0


def cmd_forget(args):
    reply = ask_server(args, {"command": "forget", "device_id": args.device_id})
    if isinstance(reply, int):
        return reply
    freed = ([reply["address"]] if reply["address"] else []) + reply.get("names", [])
    print("forgot %s%s" % (reply["forgot"], "; %s %s free again" % (", ".join(freed), "are" if len(freed) > 1 else "is")
                           if freed else ""))
    return 0


def cmd_forget_name(args):
    reply = ask_server(args, {"command": "forget-name", "name": args.name})
    if isinstance(reply, int):
        return reply
    print("freed the service name %s (it was %s's)" % (reply["forgot_name"], reply["device_id"]))
    return 0


def format_status(status):
    server, totals = status["server"], status["totals"]
    rows = ["MNEDC server on %s, subnet %s (this host %s%s), up %s" % (
        server["listen"], server["subnet"], server["address"],
        " on " + server["interface"] if server["interface"] else ", no TUN", format_duration(server["uptime_s"])),
        "%d device(s), %d stream session(s), %d stream(s), %d handshake(s) in progress" % (
            totals["devices"], totals["stream_sessions"], totals["streams"], totals["handshakes_in_progress"]),
        "TLS: %s%s; device keys: %d%s; policy: %s" % (
            server["tls"], " (certificate pin %s)" % server["tls_pin"] if server["tls_pin"] else "", server["device_keys"],
            " (revoked: %s)" % ", ".join(server["revoked"]) if server["revoked"] else "",
            "%d rules" % server["policy_rules"] if server["policy_rules"] else "allow all"),
        "limits: " + ", ".join("%s %d" % item for item in sorted(server["limits"].items())),
        "", "%-24s %-15s %-21s %-7s %-9s %12s %12s %-7s %s" % (
            "DEVICE", "ADDRESS", "REMOTE", "KIND", "SINCE", "BYTES IN", "BYTES OUT", "TLS", "DROPS")]
    now = time.time()
    for device in status["devices"]:
        drops = ", ".join("%s %d" % item for item in sorted(device["drops"].items())) or "-"
        rows.append("%-24s %-15s %-21s %-7s %-9s %12d %12d %-7s %s" % (
            device["device_id"], device["address"] or "-", device["remote"], device["kind"],
            format_duration(now - device["connected_since"]), device["bytes_in"], device["bytes_out"],
            describe_tls(device["tls"]), drops))
    if status["offline"]:
        rows += ["", "known, offline:", "%-24s %-15s %s" % ("DEVICE", "ADDRESS", "LAST SEEN")]
        rows += ["%-24s %-15s %s (%s ago)" % (
            device["device_id"], device["address"],
            time.strftime("%Y-%m-%d %H:%M", time.localtime(device["last_seen"])),
            format_duration(max(0, now - device["last_seen"]))) for device in status["offline"]]
    if status.get("service_names"):
        rows += ["", "service names:", "%-24s %-24s %s" % ("NAME", "DEVICE", "OFFERED")]
        rows += ["%-24s %-24s %s" % (entry["name"], entry["device_id"], "yes" if entry["offered"] else "no")
                 for entry in status["service_names"]]
    if totals.get("broadcasts"):
        rows += ["", "broadcast and multicast: %d packets, %d copies" % (totals["broadcasts"], totals["broadcast_copies"])]
    if totals["drops"]:
        rows += ["", "drops: " + ", ".join("%s %d" % item for item in sorted(totals["drops"].items()))]
    return "\n".join(rows) + "\n"


def describe_tls(tls):
    """'no', or the TLS version and the certificate the peer proved: 'TLSv1.3 cert kitchen-pi'."""
    if not tls:
        return "no"
    return tls["version"] + (" cert " + tls["peer_certificate"] if tls["peer_certificate"] else "")


def format_duration(seconds):
    seconds = int(seconds)
    if seconds < 3600:
        return "%dm%02ds" % (seconds // 60, seconds % 60)
    if seconds < 86400:
        return "%dh%02dm" % (seconds // 3600, seconds % 3600 // 60)
    return "%dd%02dh" % (seconds // 86400, seconds % 86400 // 3600)


COMMANDS = {"run": cmd_run, "check": cmd_check, "status": cmd_status, "kick": cmd_kick, "forget": cmd_forget,
            "forget-name": cmd_forget_name}
CONTROL_COMMANDS = ("status", "kick", "forget", "forget-name")


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.command = "check" if getattr(args, "check", False) else args.command or "run"
    for name, default in (("config", None), ("control", None), ("listen", None), ("subnet", None),
                          ("no_tun", False), ("no_tls", False), ("state_dir", None), ("verbose", False)):
        if not hasattr(args, name):     # options may stand before or after the command
            setattr(args, name, default)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
