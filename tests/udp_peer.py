"""A small UDP peer for the LAN tests, run inside a namespace as its own process.

    udp_peer.py listen PORT [--join GROUP --on ADDRESS] [--answer TEXT] [--seconds S]
        print one line per datagram: "got SOURCE_IP SOURCE_PORT DESTINATION LENGTH FIRST_LINE";
        with --answer, reply to each with TEXT (unicast, as an SSDP responder answers an M-SEARCH)
    udp_peer.py send ADDRESS PORT TEXT [--count N] [--rate PPS] [--on ADDRESS] [--device IF]
                                      [--size BYTES] [--replies S]
        send N datagrams (to a broadcast or a group too), then print the replies heard for S s

Bounded in time: listen stops after --seconds (default 60), send after its count and --replies.
"""

import argparse
import socket
import struct
import sys
import time

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)      # linux/in.h; named in socket from 3.13 on


def listen(args):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    sock.bind(("0.0.0.0", args.port))
    if args.join:
        membership = socket.inet_aton(args.join) + socket.inet_aton(args.on)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
    print("listening on %d" % args.port, flush=True)
    deadline = time.monotonic() + args.seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        sock.settimeout(left)
        try:
            data, ancillary, _, source = sock.recvmsg(65535, 256)
        except socket.timeout:
            return
        destination = "?"
        for level, kind, value in ancillary:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                destination = socket.inet_ntoa(value[8:12])     # struct in_pktinfo: ipi_addr
        first = data.split(b"\r\n", 1)[0].decode("ascii", "replace")
        print("got %s %d %s %d %s" % (source[0], source[1], destination, len(data), first), flush=True)
        if args.answer:
            sock.sendto(args.answer.replace("\\r\\n", "\r\n").encode(), source)


def send(args):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    if args.device:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, args.device.encode())
    if args.on:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(args.on))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, struct.pack("B", 2))
        sock.bind((args.on, 0))
    payload = args.text.replace("\\r\\n", "\r\n").encode()
    payload += b"." * max(0, args.size - len(payload))
    started = time.monotonic()
    for number in range(args.count):
        if args.rate:
            delay = started + number / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        sock.sendto(payload, (args.address, args.port))
    print("sent %d in %.2f s" % (args.count, time.monotonic() - started), flush=True)
    deadline = time.monotonic() + args.replies
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data, source = sock.recvfrom(65535)
        except socket.timeout:
            break
        print("reply %s %d %s" % (source[0], source[1], data.decode("ascii", "replace").replace("\r\n", " | ")), flush=True)


def main():
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command")
    listener = commands.add_parser("listen")
    listener.add_argument("port", type=int)
    listener.add_argument("--join")
    listener.add_argument("--on")
    listener.add_argument("--answer")
    listener.add_argument("--seconds", type=float, default=60)
    sender = commands.add_parser("send")
    sender.add_argument("address")
    sender.add_argument("port", type=int)
    sender.add_argument("text")
    sender.add_argument("--count", type=int, default=1)
    sender.add_argument("--rate", type=float, default=0)
    sender.add_argument("--on")
    sender.add_argument("--device")
    sender.add_argument("--size", type=int, default=0)
    sender.add_argument("--replies", type=float, default=0)
    args = parser.parse_args()
    if args.command == "listen":
        listen(args)
    elif args.command == "send":
        send(args)
    else:
        parser.error("listen or send")


if __name__ == "__main__":
    sys.exit(main())
