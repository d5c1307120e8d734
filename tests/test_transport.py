"""FrameTransport, the one class that carries frames on a connection in both scripts (issue #13),
tested on its own over real socketpairs: send now or queue in order, batches, linger, TLS."""

import os
import select
import socket
import time

import pytest

import mnedc_client
import mnedc_server

MODULES = {"client": mnedc_client, "server": mnedc_server}


class RecordingLoop:
    """The part of EventLoop a transport uses: which events it asks for."""

    def __init__(self):
        self.interest = None

    def set_interest(self, handler, events):
        self.interest = events


def transport_on(module, sock, batched=None):
    """A FrameTransport subclass as the connection classes make one: stage, close, accounting."""

    class Connection(module.FrameTransport):
        BATCHED = batched or (module.FRAME_PACKET,)

        def __init__(self):
            sock.setblocking(False)
            self.start_transport(sock, RecordingLoop(), module.Batcher())
            self.stage = "established"
            self.closed_with, self.queued, self.unqueued = None, 0, 0

        def close(self, reason):
            self.stage, self.closed_with = "closed", reason
            self.sock.close()

        def on_queued(self, count):
            self.queued += count

        def on_unqueued(self, count):
            self.unqueued += count

    return Connection()


class CountingSocket:
    """A socket that counts the sendmsg calls made on it."""

    def __init__(self, sock):
        self.sock, self.sendmsg_calls = sock, 0

    def __getattr__(self, name):
        return getattr(self.sock, name)

    def sendmsg(self, buffers):
        self.sendmsg_calls += 1
        return self.sock.sendmsg(buffers)


def frames_in(module, data):
    reader = module.FrameReader(max_payload=module.MAX_PAYLOAD_BYTES)
    reader.feed(data)
    return [(frame_type, bytes(payload)) for frame_type, payload in reader.take_frames()]


def received_now(sock):
    """What the peer can read at once, without waiting."""
    data = b""
    sock.setblocking(False)
    for _ in range(10000):
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture(params=sorted(MODULES))
def module(request):
    return MODULES[request.param]


def test_a_frame_the_kernel_takes_goes_out_at_once_and_nothing_is_queued(module):
    ours, peer = socket.socketpair()
    with peer:
        link = transport_on(module, ours)
        link.send_frame(module.FRAME_PING, b"12345678")
        assert not link.out and link.queued == 0 and link.loop.interest is None
        assert frames_in(module, received_now(peer)) == [(module.FRAME_PING, b"12345678")]
        link.close("done")


def test_what_the_kernel_cannot_take_is_queued_in_order_and_sent_when_writable(module):
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payloads = [os.urandom(60000) for _ in range(40)]
    with peer:
        link = transport_on(module, ours)
        for payload in payloads:
            link.send_frame(module.FRAME_PACKET, payload)
        assert link.out and link.queued == len(link.out)             # the peer is not reading
        assert link.loop.interest == module.selectors.EVENT_READ | module.selectors.EVENT_WRITE
        received = bytearray()
        deadline = time.monotonic() + 10
        while link.out and time.monotonic() < deadline:              # the loop's writable events
            received += received_now(peer)
            select.select([], [ours], [], 0.1)
            link.flush_queue()
        received += received_now(peer)
        assert not link.out and link.loop.interest == module.selectors.EVENT_READ
        assert link.unqueued == link.queued
        assert frames_in(module, bytes(received)) == [(module.FRAME_PACKET, p) for p in payloads]
        link.close("done")


def test_one_wakeups_data_frames_leave_in_one_sendmsg_and_other_frames_keep_their_place(module):
    ours, peer = socket.socketpair()
    with peer:
        link = transport_on(module, ours)
        link.sock = counting = CountingSocket(ours)
        link.batcher.begin()
        for number in range(10):
            link.send_frame(module.FRAME_PACKET, b"first-%d" % number)
        assert received_now(peer) == b"" and counting.sendmsg_calls == 0      # held back
        link.send_frame(module.FRAME_PING, b"87654321")          # not batched: the batch goes first
        for number in range(5):
            link.send_frame(module.FRAME_PACKET, b"second-%d" % number)
        link.batcher.flush()
        assert counting.sendmsg_calls == 3 and not link.batcher.active
        expected = [(module.FRAME_PACKET, b"first-%d" % n) for n in range(10)] + [(module.FRAME_PING, b"87654321")] \
            + [(module.FRAME_PACKET, b"second-%d" % n) for n in range(5)]
        assert frames_in(module, received_now(peer)) == expected
        link.close("done")


def test_a_batch_leaves_early_once_it_holds_its_byte_limit(module):
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    with peer:
        link = transport_on(module, ours)
        link.batcher.begin()
        big = os.urandom(60000)
        count = module.MAX_BATCH_BYTES // len(big) + 1
        for _ in range(count):
            link.send_frame(module.FRAME_PACKET, big)
        early = received_now(peer)                              # before the wakeup ends
        assert early and len(frames_in(module, early)) == count
        link.batcher.flush()
        link.close("done")


def test_finish_sends_everything_queued_then_half_closes(module):
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = os.urandom(500000)
    with peer:
        link = transport_on(module, ours)
        link.send_frame(module.FRAME_DATA, payload[:60000])
        link.send_frame(module.FRAME_ERROR, module.encode_error(module.ERROR_PROTOCOL, "bye"))
        link.finish(5, "gone")
        assert link.stage == "finishing" and link.out                # nothing cut short
        received, eof = bytearray(), False
        deadline = time.monotonic() + 10
        peer.settimeout(0.1)
        while not eof and time.monotonic() < deadline:
            link.flush_queue()
            try:
                chunk = peer.recv(1 << 20)
            except socket.timeout:
                continue
            eof = chunk == b""
            received += chunk
        assert eof, "no half-close after the queue drained"
        frames = frames_in(module, bytes(received))
        assert [frame_type for frame_type, _ in frames] == [module.FRAME_DATA, module.FRAME_ERROR]
        peer.sendall(b"still heard")                                # a half-close: we can still read
        assert ours.recv(100) == b"still heard"
        assert link.stage == "finishing" and link.closed_with is None
        link.close("done")


def test_a_send_to_a_peer_that_is_gone_closes_the_connection_and_raises_nothing(module):
    ours, peer = socket.socketpair()
    peer.close()
    link = transport_on(module, ours)
    link.send_frame(module.FRAME_PING, b"12345678")
    assert link.stage == "closed" and "broken pipe" in link.closed_with
    link.send_frame(module.FRAME_PING, b"12345678")                  # after close: nothing at all


def tls_pair(module, tmp_path):
    """Two ends of a socketpair speaking TLS: the relay's own generated identity, and a client
    that pins it. Handshaken (non-blocking, both sides driven here)."""
    pytest.importorskip("ssl")
    cert, key, _ = mnedc_server.ensure_tls_identity(str(tmp_path), "transport-test")
    server_sock, client_sock = socket.socketpair()
    for sock in (server_sock, client_sock):
        sock.setblocking(False)
    server = module.TlsTransport(module.tls_context(True, cert, key), server_sock)
    client = module.TlsTransport(module.tls_context(False), client_sock, "relay")
    pending = {"server": server, "client": client}
    deadline = time.monotonic() + 10
    while pending and time.monotonic() < deadline:
        for name, end in list(pending.items()):
            if end.handshake() == 0:
                del pending[name]
        select.select([server.sock, client.sock], [], [], 0.05)
    assert not pending, "TLS handshake over the socketpair did not finish"
    assert module.pin_problem(client, [mnedc_server.certificate_pin(cert)]) is None
    return server, client


def test_over_tls_the_bytes_openssl_holds_are_seen_though_select_is_not(module, tmp_path):
    server, client = tls_pair(module, tmp_path)
    sender = transport_on(module, client)
    sender.sock = client
    payloads = [os.urandom(9000)]                                     # one TLS record (< 16 KB)
    sender.send_frame(module.FRAME_PACKET, payloads[0])
    receiver = transport_on(module, server.sock)
    receiver.sock = server
    assert select.select([server.sock], [], [], 5)[0]
    first = bytearray(100)
    assert server.recv_into(memoryview(first)) == 100                 # a small read: the rest waits
    assert receiver.tls_pending()
    assert not select.select([server.sock], [], [], 0.2)[0]          # ... where select cannot see it
    rest = bytearray(1 << 20)
    count = server.recv_into(memoryview(rest))
    while receiver.tls_pending():
        count += server.recv_into(memoryview(rest)[count:])
    frames = frames_in(module, bytes(first) + bytes(rest[:count]))
    assert frames == [(module.FRAME_PACKET, p) for p in payloads]
    assert not receiver.tls_pending()
    for end in (server, client):
        end.close()


def test_each_script_carries_frames_with_this_class_and_no_copy_of_its_own():
    for connection, module in ((mnedc_server.ClientConnection, mnedc_server), (mnedc_client.RelayLink, mnedc_client)):
        assert issubclass(connection, module.FrameTransport)
        mine = set(vars(connection)) & {"send_frame", "send_parts", "send_batch", "send_buffers", "flush_queue",
                                        "finish", "half_close", "fileno"}
        assert not mine, "%s writes its own %s" % (connection.__name__, ", ".join(sorted(mine)))


class CountingTls:
    """The SSLSocket under a TlsTransport, counting reads and the reads that met SSLWantRead."""

    def __init__(self, sock):
        self.sock, self.reads, self.want_reads = sock, 0, 0

    def __getattr__(self, name):
        return getattr(self.sock, name)

    def recv_into(self, view):
        self.reads += 1
        try:
            return self.sock.recv_into(view)
        except Exception as error:
            if "WantRead" in type(error).__name__:
                self.want_reads += 1
            raise


def test_over_tls_a_short_record_comes_up_at_once_and_bulk_records_in_one_read(module, tmp_path):
    """A small packet's record is handed up without the read after it that could only meet
    SSLWantRead (an exception that costs more than the record); the records of a bulk write
    all come up in one call; nothing is lost or reordered either way."""
    server, client = tls_pair(module, tmp_path)
    counted = CountingTls(server.sock)
    server.sock = counted
    view = memoryview(bytearray(1 << 20))
    small = [os.urandom(100) for _ in range(3)]
    for payload in small:                               # three records, as three pings make
        client.send(payload)
    got = b""
    for _ in range(10):
        if len(got) == 300 or not select.select([counted.sock], [], [], 2)[0]:
            break
        count = server.recv_into(view)
        assert count == 100 and counted.want_reads == 0
        got += bytes(view[:count])
    assert got == b"".join(small) and counted.want_reads == 0
    bulk = os.urandom(120 * 1024)                       # one write: 8 records of up to 16 KB
    client.sock.setblocking(True)
    client.sock.sendall(bulk)                           # all of it in the receiver's socket now
    reads_before = counted.reads
    count = server.recv_into(view)
    assert count == len(bulk) and bytes(view[:count]) == bulk
    assert counted.reads - reads_before == 9            # 8 records and the SSLWantRead that ends them
    for end in (server, client):
        end.close()
