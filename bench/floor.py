"""The floor under MNEDC's figures: the least work a Python relay can do, on the same topology.

    python3 bench/floor.py relay PORT_A PORT_B LOOP     (in srv; LOOP: threads or selectors)
    python3 bench/floor.py tun CIDR HOST PORT LOOP      (in a device: a TUN over the relay;
                                                         LOOP: threads or selectors)
    python3 bench/floor.py entry LOCAL_PORT HOST PORT   (in a device: a forwarded local port)
    python3 bench/floor.py exit HOST PORT TARGET_PORT COUNT   (in the other device)

A relay that only moves bytes. No handshake, no routing and no multiplexing: the relay pairs the
k-th connection on PORT_A with the k-th on PORT_B and pumps each one's bytes to the other as
they come. No flow control, no limits, no logs. One blocking thread per direction, so a wakeup
costs one recv and one send, not even a select(). TUN packets cross as a 2-byte length and the
packet; streams cross the relay as one TCP connection each, which needs no framing at all.
The TUN ends and the relay can also run as MNEDC must (its design card): one thread, one
selectors loop (the relay then serves one pair: the TUN pair).

Every relay built from Python processes and kernel TCP pays at least what this one pays, so its
figures, measured in the same run, tell what of MNEDC's cost is MNEDC's and what is the
platform's. It is a yardstick for bench/run.py, never a product: nothing here authenticates.

Standard library only; the TUN glue is MNEDC's own (open_tun).
"""

import os
import selectors
import socket
import struct
import subprocess
import sys
import threading

PUMP_BYTES = 256 * 1024
TUN_MTU = 1500
PACKET_LENGTH = struct.Struct("!H")


def connect(host, port):
    sock = socket.create_connection((host, port), timeout=10)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def listener(host, port):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(16)
    return sock


def accepted(sock):
    connection = sock.accept()[0]
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def pump(source, sink):
    """Copy source's bytes to sink until EOF, then pass the EOF on."""
    buffer = bytearray(PUMP_BYTES)
    view = memoryview(buffer)
    try:
        while True:
            count = source.recv_into(buffer)
            if not count:
                break
            sink.sendall(view[:count])
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def pump_both_ways(one, other):
    for source, sink in ((one, other), (other, one)):
        threading.Thread(target=pump, args=(source, sink), daemon=True).start()


def cmd_relay(port_a, port_b, loop):
    side_a, side_b = listener("0.0.0.0", int(port_a)), listener("0.0.0.0", int(port_b))
    print("floor relay listening on %s and %s" % (port_a, port_b), flush=True)
    if loop == "threads":
        while True:
            pump_both_ways(accepted(side_a), accepted(side_b))
    one, other = accepted(side_a), accepted(side_b)
    buffer = bytearray(PUMP_BYTES)
    view = memoryview(buffer)
    selector = selectors.DefaultSelector()
    selector.register(one, selectors.EVENT_READ, other)
    selector.register(other, selectors.EVENT_READ, one)
    while True:
        for key, _ in selector.select():
            count = key.fileobj.recv_into(buffer)
            if not count:
                return
            key.data.sendall(view[:count])


def cmd_entry(local_port, host, port):
    local = listener("127.0.0.1", int(local_port))
    print("floor entry listening on 127.0.0.1:%s" % local_port, flush=True)
    while True:
        connection = accepted(local)
        pump_both_ways(connection, connect(host, int(port)))


def cmd_exit(host, port, target_port, count):
    """COUNT connections to the relay, each joined to a new connection to TARGET_PORT once its
    first bytes arrive (so the target sees connections in the order the entry side made them)."""
    relayed = [connect(host, int(port)) for _ in range(int(count))]
    print("floor exit connected %d" % len(relayed), flush=True)
    threads = [threading.Thread(target=exit_one, args=(sock, int(target_port))) for sock in relayed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def exit_one(relayed, target_port):
    first = relayed.recv(PUMP_BYTES)
    if not first:
        return
    target = connect("127.0.0.1", target_port)
    target.sendall(first)
    back = threading.Thread(target=pump, args=(target, relayed), daemon=True)
    back.start()
    pump(relayed, target)
    back.join()


def cmd_tun(cidr, host, port, loop):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mnedc_client import open_tun
    fd, name, _ = open_tun("floor%d" % (os.getpid() % 100000), offload=False)
    subprocess.run(["ip", "addr", "add", cidr, "dev", name], check=True)
    subprocess.run(["ip", "link", "set", name, "mtu", str(TUN_MTU), "up"], check=True)
    relay = connect(host, int(port))
    print("floor tun %s up as %s" % (name, cidr), flush=True)
    from_tun, from_relay = TunToRelay(fd, relay), RelayToTun(relay, fd)
    if loop == "threads":
        os.set_blocking(fd, True)
        threading.Thread(target=forever, args=(from_tun,), daemon=True).start()
        forever(from_relay)
        return
    relay.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(fd, selectors.EVENT_READ, from_tun)
    selector.register(relay, selectors.EVENT_READ, from_relay)
    while True:
        for key, _ in selector.select():
            if not key.data.move():
                return


def forever(mover):
    while mover.move():
        pass


class TunToRelay:
    """One packet from the TUN to the relay, read into a buffer allocated once."""

    def __init__(self, fd, relay):
        self.fd, self.relay = fd, relay
        self.buffer = bytearray(PACKET_LENGTH.size + TUN_MTU + 100)
        self.view = memoryview(self.buffer)

    def move(self):
        length = os.readv(self.fd, [self.view[PACKET_LENGTH.size:]])
        PACKET_LENGTH.pack_into(self.buffer, 0, length)
        self.relay.sendall(self.view[:PACKET_LENGTH.size + length])
        return True


class RelayToTun:
    """What the relay sent, cut into packets for the TUN; False at the end of the stream."""

    def __init__(self, relay, fd):
        self.relay, self.fd = relay, fd
        self.buffer = bytearray(PUMP_BYTES)
        self.view = memoryview(self.buffer)
        self.end = 0

    def move(self):
        count = self.relay.recv_into(self.view[self.end:])
        if not count:
            return False
        self.end += count
        start = 0
        while self.end - start >= PACKET_LENGTH.size:
            stop = start + PACKET_LENGTH.size + PACKET_LENGTH.unpack_from(self.buffer, start)[0]
            if stop > self.end:
                break
            os.write(self.fd, self.view[start + PACKET_LENGTH.size:stop])
            start = stop
        self.buffer[:self.end - start] = bytes(self.view[start:self.end])
        self.end -= start
        return True


COMMANDS = {"relay": (cmd_relay, 3), "entry": (cmd_entry, 3), "exit": (cmd_exit, 4), "tun": (cmd_tun, 4)}


def main(argv):
    if not argv or argv[0] not in COMMANDS or len(argv) - 1 != COMMANDS[argv[0]][1]:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, _ = COMMANDS[argv[0]]
    try:
        command(*argv[1:])
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
