"""The wire protocol block: framing, handshake messages, proofs, and fuzzed decoders."""

import os
import random
import struct

import pytest

import mnedc_client as wire


def taken(reader):
    """The frames ready now, their payloads copied: views are valid only until the next feed."""
    return [(frame_type, bytes(payload)) for frame_type, payload in reader.take_frames()]


def test_data_payloads_are_views_into_one_buffer_that_grows_only_when_needed():
    import socket
    left, right = socket.socketpair()
    with left, right:
        reader = wire.FrameReader(max_payload=wire.MAX_PAYLOAD_BYTES, receive_bytes=128 * 1024)
        left.sendall(wire.encode_frame(wire.FRAME_PING, b"12345678") + wire.encode_frame(wire.FRAME_PACKET, b"p" * 100))
        assert reader.receive(right.recv_into) == 4 + 8 + 4 + 100
        (ping_type, ping), (packet_type, packet) = reader.take_frames()
        assert type(ping) is bytes and ping == b"12345678"            # control frames: copies
        assert type(packet) is memoryview and packet == b"p" * 100    # data frames: no copy
        assert reader.capacity() == wire.FrameReader.SMALL_BYTES      # an idle peer costs 4 KB
        big = os.urandom(60000)                 # a frame larger than the buffer makes it grow
        left.sendall(wire.encode_frame(wire.FRAME_PACKET, big))
        got = []
        for _ in range(100):
            if reader.receive(right.recv_into) and not got:
                got = taken(reader)
            if got:
                break
        assert got == [(wire.FRAME_PACKET, big)]
        assert reader.capacity() >= 128 * 1024 and reader.buffered_bytes() == 0
        left.close()
        assert reader.receive(right.recv_into) == 0                    # end of stream


def test_frames_survive_any_split_of_the_stream():
    frames = [(wire.FRAME_PING, b""), (wire.FRAME_PACKET, bytes(range(256)) * 3),
              (wire.FRAME_PONG, b"12345678")]
    stream = b"".join(wire.encode_frame(t, p) for t, p in frames)
    for cut in range(len(stream) + 1):
        reader = wire.FrameReader(max_payload=wire.MAX_PAYLOAD_BYTES)
        reader.feed(stream[:cut])
        got = taken(reader)
        reader.feed(stream[cut:])
        got += taken(reader)
        assert got == frames
        assert reader.buffered_bytes() == 0


def test_byte_by_byte_feeding_gives_the_same_frames():
    payload = os.urandom(1000)
    reader = wire.FrameReader(max_payload=wire.MAX_PAYLOAD_BYTES)
    got = []
    for byte in wire.encode_frame(wire.FRAME_PACKET, payload):
        reader.feed(bytes([byte]))
        got += taken(reader)
    assert got == [(wire.FRAME_PACKET, payload)]


def test_oversized_frame_is_refused_before_it_is_buffered():
    reader = wire.FrameReader()           # handshake limit
    reader.feed(struct.pack("!HBB", wire.HANDSHAKE_MAX_PAYLOAD_BYTES + 1, wire.FRAME_HELLO, 0))
    with pytest.raises(wire.ProtocolError, match="exceeds the limit"):
        reader.take_frames()


def test_reserved_flags_are_refused():
    reader = wire.FrameReader()
    reader.feed(struct.pack("!HBB", 0, wire.FRAME_PING, 1))
    with pytest.raises(wire.ProtocolError, match="reserved"):
        reader.take_frames()


def test_payload_too_big_for_the_header_cannot_be_encoded():
    with pytest.raises(ValueError):
        wire.encode_frame(wire.FRAME_PACKET, bytes(wire.MAX_PAYLOAD_BYTES + 1))


def test_hello_round_trip_and_version_mismatch():
    nonce = os.urandom(wire.NONCE_BYTES)
    assert wire.decode_hello(wire.encode_hello(nonce, "pi-kitchen.1")) == (nonce, "pi-kitchen.1", 0)
    assert wire.decode_hello(wire.encode_hello(nonce, "x", wire.HELLO_STREAMS))[2] == wire.HELLO_STREAMS
    future = bytearray(wire.encode_hello(nonce, "x"))
    future[5:7] = struct.pack("!H", 99)
    with pytest.raises(wire.VersionMismatch) as raised:
        wire.decode_hello(bytes(future))
    assert raised.value.peer_version == 99
    assert "version 99" in str(raised.value) and "version %d" % wire.PROTOCOL_VERSION in str(raised.value)


@pytest.mark.parametrize("bad_id", ["", "a b", "x" * 65, "tab\t", "caf\u00e9", "semi;colon"])
def test_unusable_device_ids_are_refused(bad_id):
    with pytest.raises(ValueError):
        wire.check_device_id(bad_id)


def test_hello_with_lying_id_length_is_a_protocol_error():
    hello = bytearray(wire.encode_hello(bytes(16), "abc"))
    hello[wire.HELLO.size - 1] = 10
    with pytest.raises(wire.ProtocolError, match="length"):
        wire.decode_hello(bytes(hello))


def test_proofs_bind_secret_nonces_device_and_direction():
    secret, nc, ns = b"s" * 16, os.urandom(16), os.urandom(16)
    client = wire.client_proof(secret, nc, ns, "dev")
    body = wire.WELCOME.pack(bytes(4), 24, bytes(4), 1500, bytes(8))
    server = wire.welcome_mac((secret, nc, ns), body)     # the server's proof: WELCOME's MAC
    assert server != client                         # a proof from one side never fits the other
    assert wire.client_proof(b"t" * 16, nc, ns, "dev") != client
    assert wire.client_proof(secret, nc, os.urandom(16), "dev") != client
    assert wire.client_proof(secret, ns, nc, "dev") != client       # the nonces' order counts
    assert wire.client_proof(secret, nc, ns, "other") != client
    assert len(client) == len(server) == wire.MAC_BYTES


def test_the_network_key_is_pbkdf2_and_the_fallback_agrees():
    import hashlib
    secret = b"correct horse battery"
    salt = os.urandom(16)
    assert wire.network_key(secret, salt) == hashlib.pbkdf2_hmac("sha256", secret, wire.KEY_SALT + salt, wire.KEY_ROUNDS)
    assert wire.network_key(secret, os.urandom(16)) != wire.network_key(secret, salt)   # one network's, not all
    assert wire.pbkdf2_sha256(secret, wire.KEY_SALT, 1000) == hashlib.pbkdf2_hmac("sha256", secret, wire.KEY_SALT, 1000)


def test_stream_frames_round_trip():
    assert wire.decode_listen(wire.encode_listen(22, "ssh")) == (22, "ssh")
    assert wire.decode_listen(wire.encode_listen(22)) == (22, "")
    assert wire.decode_open(wire.encode_open(7, 80, 4096, "web")) == (7, 80, 4096, "web")
    assert wire.decode_open(wire.encode_open(8, 80, 1, "pi (198.18.0.2)"))[3] == "pi (198.18.0.2)"
    assert wire.decode_accept(wire.encode_accept(9, 123)) == (9, 123, "")
    assert wire.decode_accept(wire.encode_accept(9, 123, "pi (198.18.0.2)")) == (9, 123, "pi (198.18.0.2)")
    assert wire.decode_open(wire.encode_open(7, 0, 4096, "kitchen-pi/pi-ssh"))[3] == "kitchen-pi/pi-ssh"
    assert wire.decode_listen_refused(wire.encode_listen_refused(22, wire.ERROR_NAME_TAKEN, "pi-ssh is b's")) == \
        (22, wire.ERROR_NAME_TAKEN, "pi-ssh is b's")
    for bad in (wire.ACCEPT.pack(9, 1) + b"\xff", wire.ACCEPT.pack(9, 1) + b"a\nb", b"\x00" * 7,
                wire.ACCEPT.pack(9, 1) + b"x" * 90):
        with pytest.raises(wire.ProtocolError):
            wire.decode_accept(bad)
    with pytest.raises(wire.ProtocolError):
        wire.decode_listen_refused(b"\x00\x16")
    assert wire.decode_listen_refused(wire.LISTEN_REFUSED.pack(1, 8) + b"a\x1bb")[2] == "a?b"   # no terminal escapes
    assert wire.decode_data(wire.encode_data(5, b"abc")) == (5, b"abc")
    assert wire.decode_window(wire.encode_window(5, 999)) == (5, 999)
    assert wire.decode_eof(wire.encode_eof(5)) == 5
    assert wire.decode_reset(wire.encode_reset(5, wire.RESET_REFUSED, "no")) == (5, wire.RESET_REFUSED, "no")
    with pytest.raises(wire.ProtocolError):
        wire.decode_open(wire.encode_open(1, 80, 1, "bad;name"))
    with pytest.raises(wire.ProtocolError):
        wire.decode_hello(wire.HELLO.pack(wire.HELLO_MAGIC, wire.PROTOCOL_VERSION, 0x80, bytes(16), 1) + b"x")


def test_challenge_welcome_error_round_trips():
    ns = os.urandom(16)
    salt = os.urandom(16)
    assert wire.decode_challenge(wire.encode_challenge(ns, salt)) == (ns, salt)
    assert len(wire.encode_challenge(ns, salt)) == 2 + 16 + 16     # no proof to guess against
    session = (os.urandom(32), os.urandom(16), os.urandom(16))
    assert wire.decode_welcome(session, wire.encode_welcome(session, bytes([198, 18, 0, 7]), 24, bytes([198, 18, 0, 1]))) \
        == (bytes([198, 18, 0, 7]), 24, bytes([198, 18, 0, 1]), wire.MAX_PAYLOAD_BYTES, None), "no IPv6: no prefix"
    ula = bytes.fromhex("fd00000000000001")
    welcome = wire.encode_welcome(session, bytes([198, 18, 0, 7]), 24, bytes([198, 18, 0, 1]), 4096, ula)
    assert wire.decode_welcome(session, welcome) == (bytes([198, 18, 0, 7]), 24, bytes([198, 18, 0, 1]), 4096, ula)
    for changed in (session[:2] + (os.urandom(16),), (os.urandom(32),) + session[1:]):   # another handshake, another key
        with pytest.raises(wire.ProtocolError, match="MAC is wrong"):
            wire.decode_welcome(changed, welcome)
    for position in range(len(welcome)):        # any byte changed on the way: refused
        forged = bytearray(welcome)
        forged[position] ^= 0x20
        with pytest.raises(wire.ProtocolError):
            wire.decode_welcome(session, bytes(forged))
    code, text = wire.decode_error(wire.encode_error(wire.ERROR_AUTH, "wrong secret"))
    assert (code, text) == (wire.ERROR_AUTH, "wrong secret")
    assert wire.decode_error(bytes([9]) + b"\x1b[31mred\xff")[1] == "?[31mred\ufffd"


def test_routes_round_trip_and_bad_ones_are_refused():
    routes = [(bytes([192, 0, 2, 0]), 24, True), (bytes.fromhex("fd000000000000010000000000000000"), 64, False)]
    assert wire.decode_routes(wire.encode_routes(routes)) == routes
    assert wire.decode_routes(b"") == []
    for bad in (wire.ROUTE.pack(4, 24, 0) + bytes([192, 0, 2, 1]),     # host bits
                wire.ROUTE.pack(5, 24, 0) + bytes(4), wire.ROUTE.pack(4, 33, 0) + bytes(4),
                wire.ROUTE.pack(4, 24, 2) + bytes(4), wire.ROUTE.pack(6, 64, 0) + bytes(8)):
        with pytest.raises(wire.ProtocolError):
            wire.decode_routes(bad)


def test_ipv4_problem_accepts_real_packets_only():
    header = bytearray(20)
    header[0], header[2:4] = 0x45, struct.pack("!H", 20)
    assert wire.ipv4_problem(bytes(header)) is None
    assert "too short" in wire.ipv4_problem(b"\x45" * 10)
    assert "version 6" in wire.ipv4_problem(b"\x60" + bytes(39))
    assert "total length" in wire.ipv4_problem(bytes(header) + b"extra")


def test_ip_problem_takes_ipv6_and_ipv4_and_offload_matches_the_version():
    header6 = bytearray(40 + 20)
    header6[0], header6[4:6], header6[6] = 0x60, struct.pack("!H", 20), 6      # TCP
    assert wire.ip_problem(bytes(header6)) is None
    assert "payload length" in wire.ip_problem(bytes(header6) + b"x")
    assert "too short for IPv6" in wire.ip_problem(b"\x60" + bytes(30))
    header4 = bytearray(40)
    header4[0], header4[2:4], header4[9] = 0x45, struct.pack("!H", 40), 6
    assert wire.ip_problem(bytes(header4)) is None and "too short" in wire.ip_problem(b"\x45" * 10)
    for packet, good, bad in ((header6, wire.VNET_GSO_TCPV6, wire.VNET_GSO_TCPV4), (header4, wire.VNET_GSO_TCPV4, wire.VNET_GSO_TCPV6)):
        offset = 40 if packet is header6 else 20
        for gso in (good, good | wire.VNET_GSO_ECN):
            assert wire.vnet_packet_problem(wire.VNET_HEADER.pack(1, gso, offset + 20, 1400, offset, 16) + packet) is None
        assert "not TCP over this packet's IP version" in wire.vnet_packet_problem(
            wire.VNET_HEADER.pack(1, bad, offset + 20, 1400, offset, 16) + packet)
        assert "would cover the IP header" in wire.vnet_packet_problem(
            wire.VNET_HEADER.pack(1, 0, 0, 0, offset - 4, 2) + packet)
    assert wire.ipv6_addresses(bytes.fromhex("fd00000000000001"), 7) == (
        bytes.fromhex("fd000000000000010000000000000007"), bytes.fromhex("fe800000000000000000000000000007"))
    assert wire.is_link_local_group6(bytes.fromhex("ff0200000000000000000000000000fb"))
    assert not wire.is_link_local_group6(bytes.fromhex("ff0500000000000000000000000000fb"))


FUZZ_SESSION = (bytes(32), bytes(16), bytes(16))
DECODERS = (wire.decode_hello, wire.decode_challenge, wire.decode_auth,
            lambda payload: wire.decode_welcome(FUZZ_SESSION, payload),
            wire.decode_error, wire.check_ping, wire.decode_listen, wire.decode_open,
            wire.decode_accept, wire.decode_data, wire.decode_window, wire.decode_eof,
            wire.decode_reset, wire.decode_routes)


def test_fuzzed_decoders_only_ever_raise_protocol_error():
    rng = random.Random(20261123)
    valid = [wire.encode_hello(bytes(16), "dev"), wire.encode_challenge(bytes(16), bytes(16)),
             bytes(32), wire.encode_welcome(FUZZ_SESSION, bytes(4), 24, bytes(4)), wire.encode_error(1, "x"),
             wire.encode_listen(22, "ssh"), wire.encode_open(1, 22, 100, "peer"), wire.encode_accept(1, 5),
             wire.encode_window(1, 5), wire.encode_reset(1, 2, "why")]
    for _ in range(5000):
        if rng.random() < 0.5:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80)))
        else:
            data = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 4)):
                if data:
                    data[rng.randrange(len(data))] = rng.getrandbits(8)
            data = bytes(data[:rng.randrange(len(data) + 1)])
        for decode in DECODERS:
            try:
                result = decode(data)
            except wire.ProtocolError:
                continue
            assert result is not None


def test_fuzzed_stream_never_breaks_the_frame_reader():
    rng = random.Random(7)
    for _ in range(300):
        reader = wire.FrameReader()
        try:
            for _ in range(20):
                reader.feed(bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64))))
                for frame_type, payload in reader.take_frames():
                    assert len(payload) <= wire.HANDSHAKE_MAX_PAYLOAD_BYTES
        except wire.ProtocolError:
            pass
        assert reader.buffered_bytes() < 4 + wire.HANDSHAKE_MAX_PAYLOAD_BYTES + 64


def internet_checksum(data):
    """RFC 1071, word by word: the reference finished_packet must agree with."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@pytest.mark.parametrize("protocol, checksum_at", [(6, 16), (17, 6)])
def test_finished_packet_completes_the_checksum_a_tso_sender_left_open(protocol, checksum_at):
    rng = random.Random(protocol)
    for size in (0, 1, 2, 3, 1000, 1461, 65000):
        body = bytearray(rng.getrandbits(8) for _ in range(20)) + bytes(rng.getrandbits(8) for _ in range(size))
        body[checksum_at:checksum_at + 2] = b"\0\0"
        source, destination = bytes([198, 18, 0, 2]), bytes([198, 18, 0, 3])
        packet = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0, 64, protocol, 0,
                                       source, destination) + body)
        pseudo = source + destination + struct.pack("!BBH", 0, protocol, len(body))
        complete = bytearray(packet)
        complete[20 + checksum_at:22 + checksum_at] = struct.pack("!H", internet_checksum(pseudo + bytes(body)) or 0xFFFF)
        # what the kernel hands over: the pseudo-header sum, folded and not inverted
        packet[20 + checksum_at:22 + checksum_at] = struct.pack("!H", ~internet_checksum(pseudo) & 0xFFFF)
        header = wire.VNET_HEADER.pack(wire.VNET_NEEDS_CSUM, 1 if protocol == 6 else 0, 40, 1448, 20, checksum_at)
        assert wire.vnet_packet_problem(header + packet) is None
        assert wire.finished_packet(memoryview(header + packet)) == bytes(complete), size
        assert internet_checksum(pseudo + bytes(complete[20:])) in (0, 0xFFFF)   # it verifies


def test_vnet_packet_problems_are_named():
    tcp = bytes([0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6]) + bytes(30)        # 20-byte IP + 20-byte TCP
    udp = bytes([0x45, 0, 0, 40, 0, 0, 0, 0, 64, 17]) + bytes(30)
    vnet = wire.VNET_HEADER.pack
    assert wire.vnet_packet_problem(vnet(0, 0, 0, 0, 0, 0) + tcp) is None
    assert wire.vnet_packet_problem(vnet(1, 1, 40, 1448, 20, 16) + tcp) is None
    assert wire.vnet_packet_problem(vnet(1, 0, 0, 0, 20, 6) + udp) is None
    assert "too short" in wire.vnet_packet_problem(b"\x01" * 12)
    assert "offload type 7" in wire.vnet_packet_problem(vnet(0, 7, 0, 0, 0, 0) + tcp)
    assert "offload type 4" in wire.vnet_packet_problem(vnet(0, 4, 0, 0, 0, 0) + tcp)     # TCPv6
    assert "on protocol 17" in wire.vnet_packet_problem(vnet(1, 1, 0, 0, 20, 6) + udp)
    assert "flags 0x02" in wire.vnet_packet_problem(vnet(2, 0, 0, 0, 0, 0) + tcp)
    # a checksum that starts inside the IP header could rewrite the source address the relay checked
    assert "would cover the IP header" in wire.vnet_packet_problem(vnet(1, 0, 0, 0, 0, 14) + tcp)
    assert "would cover the IP header" in wire.vnet_packet_problem(vnet(1, 0, 0, 0, 19, 16) + tcp)
    # deeper is fine: the inner TCP checksum of a tunnel carried over the network
    assert wire.vnet_packet_problem(vnet(1, 0, 0, 0, 24, 14) + tcp) is None
    short = bytes([0x45, 0, 0, 30, 0, 0, 0, 0, 64, 6]) + bytes(20)      # TCP header cut short
    assert "outside the packet" in wire.vnet_packet_problem(vnet(1, 0, 0, 0, 20, 16) + short)


def test_hmac_sha256_matches_the_hmac_module():
    import hashlib
    import hmac
    rng = random.Random(3)
    for size in (0, 1, 31, 32, 63, 64, 65, 200):         # keys around the 64-byte block
        key, message = bytes(rng.getrandbits(8) for _ in range(size)), os.urandom(size * 3)
        assert wire.hmac_sha256(key, message) == hmac.new(key, message, hashlib.sha256).digest()
    # RFC 4231 test case 2
    assert wire.hmac_sha256(b"Jefe", b"what do ya want for nothing?").hex() == \
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    assert wire.equal_digests(b"abc", b"abc") and not wire.equal_digests(b"abc", b"abd")


def test_a_data_frame_sent_in_parts_is_the_same_bytes():
    data = os.urandom(3000)
    assert wire.data_frame_head(7, data) + data == wire.encode_frame(wire.FRAME_DATA, wire.encode_data(7, data))
    with pytest.raises(ValueError):
        wire.data_frame_head(7, bytes(wire.MAX_DATA_BYTES + 1))
