"""IPv6 peers for tests/test_ipv6.py, run inside a namespace as their own processes.

    ip6_peer.py sink PORT [--seconds S]
        accept one TCP connection on [::]:PORT; print "got BYTES SHA256" when it ends
    ip6_peer.py source ADDRESS PORT BYTES
        send BYTES random bytes over TCP; print "sent BYTES SHA256"
    ip6_peer.py listen GROUP INTERFACE PORT [--seconds S]
        join the group on INTERFACE; print "got SOURCE TEXT" per datagram
    ip6_peer.py send GROUP INTERFACE PORT TEXT
        send one datagram to the group out of INTERFACE

ADDRESS may be link-local with a scope: fe80::2%mnedc0. Bounded in time (default 30 s).
"""

import argparse
import hashlib
import os
import socket
import struct
import sys
import time


def sink(args):
    server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("::", args.port))
    server.listen(1)
    server.settimeout(args.seconds)
    print("listening on %d" % args.port, flush=True)
    connection, _ = server.accept()
    connection.settimeout(args.seconds)
    digest, total = hashlib.sha256(), 0
    while True:
        data = connection.recv(1 << 16)
        if not data:
            break
        digest.update(data)
        total += len(data)
    print("got %d %s" % (total, digest.hexdigest()), flush=True)


def source(args):
    data = os.urandom(args.bytes)
    with socket.create_connection((args.address, args.port), timeout=args.seconds) as connection:
        connection.sendall(data)
    print("sent %d %s" % (len(data), hashlib.sha256(data).hexdigest()), flush=True)


def listen(args):
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::", args.port))
    index = socket.if_nametoindex(args.interface)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                    socket.inet_pton(socket.AF_INET6, args.group) + struct.pack("@I", index))
    print("listening on %d" % args.port, flush=True)
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data, sender = sock.recvfrom(65535)
        except socket.timeout:
            return
        print("got %s %s" % (sender[0].split("%")[0], data.decode("ascii", "replace")), flush=True)


def send(args):
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    index = socket.if_nametoindex(args.interface)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
    sock.sendto(args.text.encode(), (args.group, args.port, 0, index))
    print("sent", flush=True)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("sink")
    command.add_argument("port", type=int)
    command = commands.add_parser("source")
    command.add_argument("address")
    command.add_argument("port", type=int)
    command.add_argument("bytes", type=int)
    command = commands.add_parser("listen")
    command.add_argument("group")
    command.add_argument("interface")
    command.add_argument("port", type=int)
    command = commands.add_parser("send")
    command.add_argument("group")
    command.add_argument("interface")
    command.add_argument("port", type=int)
    command.add_argument("text")
    for sub in commands.choices.values():
        sub.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args(argv)
    {"sink": sink, "source": source, "listen": listen, "send": send}[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])
