"""A relay that knows the secret and lies: what a compromised relay, or one impersonated by
someone with the secret, can send a TUN client. Run as a script inside a test's namespace:

    hostile_relay.py PORT SECRET_FILE WELCOME_CIDR SERVER_ADDRESS PACKETS_FILE [IPV6_PREFIX]

It accepts one client at a time, completes the real handshake, sends WELCOME with WELCOME_CIDR
(the client's address and prefix, whatever they are; IPV6_PREFIX, e.g. fd00:0:0:1::, as the
network's IPv6 /64), then every packet in PACKETS_FILE (one hex
string a line; "vnet:" before it sends it as a VNET_PACKET, with a header asking for nothing;
"routes:" before a ROUTES payload sends that), answers pings, and prints what it did, for the test to wait on.
Bounded: it serves at most 5 clients and exits after 60 s.
"""

import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mnedc_client as wire      # noqa: E402 - the wire protocol block, as the client has it


def frames(sock, reader):
    data = sock.recv(65536)
    if not data:
        raise EOFError("client gone")
    reader.feed(data)
    return [(frame_type, bytes(payload)) for frame_type, payload in reader.take_frames()]


def next_frame(sock, reader, pending):
    while not pending:
        pending.extend(frames(sock, reader))
    return pending.pop(0)


def serve(sock, key, salt, welcome, server_address, packets, deadline, ipv6_prefix=None):
    reader, pending = wire.FrameReader(max_payload=wire.MAX_PAYLOAD_BYTES), []
    frame_type, payload = next_frame(sock, reader, pending)
    client_nonce, device_id, _ = wire.decode_hello(payload)
    server_nonce = os.urandom(wire.NONCE_BYTES)
    sock.sendall(wire.encode_frame(wire.FRAME_CHALLENGE, wire.encode_challenge(server_nonce, salt)))
    next_frame(sock, reader, pending)                   # AUTH: a liar need not check it
    address, prefix = welcome.split("/")
    sock.sendall(wire.encode_frame(wire.FRAME_WELCOME, wire.encode_welcome(
        (key, client_nonce, server_nonce), socket.inet_aton(address), int(prefix), socket.inet_aton(server_address),
        wire.MAX_PAYLOAD_BYTES, ipv6_prefix)))
    print("welcomed %s as %s" % (device_id, welcome), flush=True)
    time.sleep(0.5)                                     # the client configures its interface
    for packet in packets:
        if packet.startswith(b"vnet:"):
            sock.sendall(wire.encode_frame(wire.FRAME_VNET_PACKET, bytes(wire.VNET_HEADER.size) + packet[5:]))
        elif packet.startswith(b"routes:"):
            sock.sendall(wire.encode_frame(wire.FRAME_ROUTES, packet[7:]))
        else:
            sock.sendall(wire.encode_frame(wire.FRAME_PACKET, packet))
    print("sent %d packets" % len(packets), flush=True)
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        for frame_type, payload in frames(sock, reader):
            if frame_type == wire.FRAME_PING:
                sock.sendall(wire.encode_frame(wire.FRAME_PONG, payload))


def main():
    port, secret_file, welcome, server_address, packets_file = sys.argv[1:6]
    ipv6_prefix = socket.inet_pton(socket.AF_INET6, sys.argv[6])[:8] if len(sys.argv) > 6 else None
    salt = os.urandom(16)                               # a liar picks its own
    key = wire.network_key(open(secret_file).read().strip().encode(), salt)
    packets = [line.split(":")[0].encode() + b":" + bytes.fromhex(line.split(":", 1)[1]) if ":" in line
               else bytes.fromhex(line) for line in open(packets_file).read().split()]
    deadline = time.monotonic() + 60
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", int(port)))
    listener.listen(4)
    listener.settimeout(60)
    print("hostile relay ready", flush=True)
    for _ in range(5):
        sock, _ = listener.accept()
        try:
            serve(sock, key, salt, welcome, server_address, packets, deadline, ipv6_prefix)
        except (OSError, EOFError, wire.ProtocolError) as error:
            print("client ended: %s" % error, flush=True)
        finally:
            sock.close()
        if time.monotonic() > deadline:
            break


if __name__ == "__main__":
    main()
