"""The floor under MNEDC's figures: the least work a Python relay can do, on the same topology.

    python3 bench/floor.py relay PORT_A PORT_B LOOP     (in srv; LOOP: threads, selectors or tls)
    python3 bench/floor.py tun CIDR HOST PORT LOOP      (in a device: a TUN over the relay;
                                                         LOOP: threads, selectors or tls)
    python3 bench/floor.py entry LOCAL_PORT HOST PORT   (in a device: a forwarded local port)
    python3 bench/floor.py exit HOST PORT TARGET_PORT COUNT   (in the other device)

A relay that only moves bytes. No handshake, no routing and no multiplexing: the relay pairs the
k-th connection on PORT_A with the k-th on PORT_B and pumps each one's bytes to the other as
they come. No flow control, no limits, no logs. One blocking thread per direction, so a wakeup
costs one recv and one send, not even a select(). TUN packets cross as a 2-byte length and the
packet; streams cross the relay as one TCP connection each, which needs no framing at all.
The TUN ends and the relay can also run as MNEDC must (its design card): one thread, one
selectors loop (the relay then serves one pair: the TUN pair); "tls" is that loop with each
link in TLS, as MNEDC's default is (the relay's certificate is made as MNEDC's relay makes its
own; the TUN ends take it unverified, which costs nothing per packet), and the TUN end then
imports nothing it does not use, so its peak RSS is the least a Python TLS client here takes.

Every relay built from Python processes and kernel TCP pays at least what this one pays, so its
figures, measured in the same run, tell what of MNEDC's cost is MNEDC's and what is the
platform's. It is a yardstick for bench/run.py, never a product: nothing here authenticates.

Standard library only; the certificate is MNEDC's own (ensure_tls_identity).
"""

import fcntl
import os
import selectors
import socket
import struct
import sys

PUMP_BYTES = 256 * 1024
TUN_MTU = 1500
PACKET_LENGTH = struct.Struct("!H")
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000     # x86 and ARM, where the bench runs
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_DATA_YET = [BlockingIOError]         # and ssl.SSLWantReadError once TLS is on


def tls_on():
    import ssl
    NO_DATA_YET.append(ssl.SSLWantReadError)
    return ssl


def tls_server_context():
    import tempfile
    ssl = tls_on()
    sys.path.insert(0, ROOT)
    from mnedc_server import ensure_tls_identity
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory(prefix="mnedc-floor-") as state_dir:    # the context keeps the key
        cert, key, _ = ensure_tls_identity(state_dir, "floor-relay")
        context.load_cert_chain(cert, key)
    return context


def tls_client(sock):
    ssl = tls_on()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context.wrap_socket(sock)


def read_all_records(sock, view):
    """One recv_into, and more while OpenSSL holds decrypted bytes (select() cannot see them);
    None if a TLS socket has no data for us yet (half a record, or TLS 1.3's session tickets)."""
    try:
        count = sock.recv_into(view)
        while count and count < len(view) and getattr(sock, "pending", int)():
            count += sock.recv_into(view[count:])
    except tuple(NO_DATA_YET):
        return None
    return count


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
    import threading
    for source, sink in ((one, other), (other, one)):
        threading.Thread(target=pump, args=(source, sink), daemon=True).start()


def cmd_relay(port_a, port_b, loop):
    side_a, side_b = listener("0.0.0.0", int(port_a)), listener("0.0.0.0", int(port_b))
    print("floor relay listening on %s and %s" % (port_a, port_b), flush=True)
    if loop == "threads":
        while True:
            pump_both_ways(accepted(side_a), accepted(side_b))
    if loop == "tls":                   # each handshakes as it comes: a waits for no b
        context = tls_server_context()
        one, other = (context.wrap_socket(accepted(side), server_side=True) for side in (side_a, side_b))
        for sock in (one, other):
            sock.setblocking(False)
    else:
        one, other = accepted(side_a), accepted(side_b)
    buffer = bytearray(PUMP_BYTES)
    view = memoryview(buffer)
    selector = selectors.DefaultSelector()
    selector.register(one, selectors.EVENT_READ, other)
    selector.register(other, selectors.EVENT_READ, one)
    while True:
        for key, _ in selector.select():
            count = read_all_records(key.fileobj, view)
            if count is None:
                continue
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
    import threading
    relayed = [connect(host, int(port)) for _ in range(int(count))]
    print("floor exit connected %d" % len(relayed), flush=True)
    threads = [threading.Thread(target=exit_one, args=(sock, int(target_port))) for sock in relayed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def exit_one(relayed, target_port):
    import threading
    first = relayed.recv(PUMP_BYTES)
    if not first:
        return
    target = connect("127.0.0.1", target_port)
    target.sendall(first)
    back = threading.Thread(target=pump, args=(target, relayed), daemon=True)
    back.start()
    pump(relayed, target)
    back.join()


def open_tun(name):
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    os.set_blocking(fd, False)
    return fd


def cmd_tun(cidr, host, port, loop):
    name = "floor%d" % (os.getpid() % 100000)
    fd = open_tun(name)
    for argv in (["ip", "addr", "add", cidr, "dev", name], ["ip", "link", "set", name, "mtu", str(TUN_MTU), "up"]):
        if os.spawnvp(os.P_WAIT, "ip", argv):     # not subprocess: the TUN end imports no more than it uses
            raise SystemExit("%s failed" % " ".join(argv))
    relay = connect(host, int(port))
    if loop == "tls":
        relay = tls_client(relay)
    print("floor tun %s up as %s" % (name, cidr), flush=True)
    from_tun, from_relay = TunToRelay(fd, relay), RelayToTun(relay, fd)
    if loop == "threads":
        import threading
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
        count = read_all_records(self.relay, self.view[self.end:])
        if count is None:
            return True
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
