"""OpenVPN 2.6 (TCP) on a tests.nettopo Topology, as the benchmark's reference VPN.

The benchmark compares MNEDC with OpenVPN on the *same* namespace topology in
the same run.  As issue #5 fixes it, OpenVPN runs in TCP mode (MNEDC's relay
is TCP too): the server in ``srv`` (``topo.server_ip``, port 1194), one client
in each client namespace, ``topology subnet`` in 198.19.0.0/24 (never clashes
with MNEDC's 198.18.0.0/24), ``client-to-client`` so a -> b goes through the
server, ``tcp-nodelay``.  There is no PKI: every host gets a self-signed EC
certificate from the openssl CLI, and both ends pin each other with
``peer-fingerprint`` (the "Small OpenVPN setup with peer-fingerprint" recipe of
``man openvpn-examples``); ``dh none`` (ECDHE only).

Variants:

``default``
    OpenVPN's defaults for the data channel: the negotiated cipher is
    AES-256-GCM (first of the default ``data-ciphers``), tun-mtu 1500.
``plaintext``
    OpenVPN's fastest TCP configuration here, to set beside MNEDC with
    ``tls = no`` (like with like: neither encrypts nor authenticates the
    data): no data cipher (``data-ciphers none`` on both sides; 2.6 accepts
    "none" in the list and logs a cleartext warning), no data-channel HMAC
    (``auth none``), ``tun-mtu 48000`` so a tunnelled TCP segment is ~48 kB
    instead of ~1.4 kB, and ``mssfix 0`` (nothing may clamp the inner MSS
    back to ~1400).

Both variants use ``disable-dco``: the kernel data-channel offload module
(ovpn-dco) is out of tree, cannot do cipher "none" and would make the
"default" figures depend on the host; the comparison is with OpenVPN's
userspace data path on every machine.

Every process runs in the foreground (``verb 3``) through ``topo.spawn``, so
the Topology's teardown stops it and ``Proc`` collects its log; readiness is
the "Initialization Sequence Completed" line.  Standard library only.
"""

import os
import re
import shutil
import subprocess
import time

__all__ = ["OpenVpnNetwork", "openvpn_available", "VARIANTS", "SUBNET", "PORT", "READY"]

VARIANTS = ("default", "plaintext")
SUBNET = "198.19.0.0"
NETMASK = "255.255.255.0"
SERVER_VIP = "198.19.0.1"
PORT = 1194
READY = r"Initialization Sequence Completed"
START_TIMEOUT = 30  # seconds for the whole start(); every wait shares this budget
MIN_VERSION = (2, 6)

# The client learns its address from the server's PUSH_REPLY
# ("..., ifconfig 198.19.0.2 255.255.255.0, ...").
_PUSHED_IFCONFIG = re.compile(r"PUSH_REPLY.*[,']ifconfig (198\.19\.\d+\.\d+) ")
# Once the tunnel is up, 2.6 logs the data channel it negotiated, e.g.
#   "Data Channel: cipher 'AES-256-GCM', peer-id: 0"
#   "Data Channel: cipher '[null-cipher]', auth '[null-digest]', peer-id: 0"
DATA_CHANNEL = re.compile(r"Data Channel: cipher '([^']*)'(?:, auth '([^']*)')?")
NULL_CIPHERS = ("[null-cipher]", "none")
# ...and, when "none" was negotiated, warns (each client, after the PUSH_REPLY):
#   "******* WARNING *******: '--cipher none' was specified. This means NO
#    encryption will be performed and tunnelled data WILL be transmitted in
#    clear text over the network! PLEASE DO RECONSIDER THIS SETTING!"
CLEARTEXT_WARNING = re.compile(r"'--cipher none' was specified\. This means NO encryption")
# Every side also warns at start-up that "none" is allowed in --data-ciphers:
#   "WARNING: cipher 'none' specified for --data-ciphers. This allows negotiation
#    of NO encryption ..."
NONE_ALLOWED_WARNING = re.compile(r"cipher 'none' specified for --data-ciphers")

# Options common to the server and every client.
_COMMON = [
    "dev tun",
    "topology subnet",
    "disable-dco",
    "verb 3",
]
_VARIANT_OPTIONS = {
    # Nothing about the data channel: AES-256-GCM gets negotiated, tun-mtu 1500.
    "default": [],
    "plaintext": [
        # "none" in the list is how 2.6 negotiates a cleartext data channel in
        # client/server mode (--cipher is ignored in TLS mode since 2.6); the
        # server pushes "cipher none" and both sides warn loudly.
        "data-ciphers none",
        # and no HMAC on the data channel either: MNEDC with tls = no has none
        "auth none",
        # OpenVPN treats the null cipher as a 64-bit-block cipher (SWEET32)
        # and lowers reneg-bytes to 64 MB, i.e. a TLS renegotiation every
        # 64 MB of traffic; 0 restores "never by byte count".
        "reneg-bytes 0",
        # Over TCP nothing else is needed for jumbo tun packets: the TCP
        # stream carries 16-bit length-prefixed packets (48000 < 65535), so
        # no --fragment; mssfix is UDP-only in effect, 0 just says so; the
        # socket buffers are left to the kernel's autotuning (no sndbuf/rcvbuf,
        # setting them would switch autotuning off).
        "tun-mtu 48000",
        "mssfix 0",
    ],
}


def openvpn_available():
    """Return ``(ok, reason)``: are openvpn >= 2.6 and openssl installed?"""
    for tool in ("openvpn", "openssl"):
        if shutil.which(tool) is None:
            return False, "%r not found in PATH (apt-get install openvpn openssl)" % tool
    try:
        res = subprocess.run(["openvpn", "--version"], stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return False, "openvpn --version failed: %s" % e
    # openvpn --version exits 1 by design; only its first line matters.
    m = re.search(r"OpenVPN (\d+)\.(\d+)", res.stdout + res.stderr)
    if not m:
        return False, "cannot read the OpenVPN version from %r" % (res.stdout[:200],)
    version = (int(m.group(1)), int(m.group(2)))
    if version < MIN_VERSION:
        return False, "OpenVPN %d.%d found, need 2.6 or newer" % version
    return True, "OpenVPN %d.%d" % version


def _openssl(argv, cwd):
    res = subprocess.run(["openssl"] + argv, cwd=cwd, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=20)
    if res.returncode != 0:
        raise RuntimeError("openssl %s failed (exit %d): %s" % (
            " ".join(argv), res.returncode, res.stderr.strip()))
    return res.stdout


def make_identity(directory, name):
    """A self-signed P-256 certificate for ``name``; returns (cert, key, sha256 fingerprint)."""
    cert = os.path.join(directory, name + ".crt")
    key = os.path.join(directory, name + ".key")
    _openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
              "-nodes", "-sha256", "-days", "3650", "-subj", "/CN=%s" % name,
              "-keyout", key, "-out", cert], directory)
    os.chmod(key, 0o600)
    out = _openssl(["x509", "-in", cert, "-noout", "-fingerprint", "-sha256"], directory)
    # "SHA256 Fingerprint=AB:CD:..." (older openssl: "sha256 Fingerprint=")
    fingerprint = out.strip().split("=", 1)[1]
    return cert, key, fingerprint


class OpenVpnNetwork(object):
    """OpenVPN 2.6 in TCP mode on a Topology: server in srv, clients in the given client namespaces."""

    def __init__(self, topo, workdir, variant="default"):
        if variant not in VARIANTS:
            raise ValueError("unknown OpenVPN variant %r (choose from %s)" % (variant, VARIANTS))
        self.topo = topo
        self.variant = variant
        self.workdir = os.path.join(str(workdir), "openvpn-%s" % variant)
        self.server_vip = SERVER_VIP
        self.vip = {}           # client name -> tunnel address
        self.server_proc = None
        self.client_procs = {}  # client name -> Proc
        self.data_channel = {}  # client name -> (cipher, auth or None) from the client's log

    def __repr__(self):
        return "<OpenVpnNetwork %s clients=%s>" % (self.variant, sorted(self.client_procs))

    @property
    def procs(self):
        """Every OpenVPN process, server first (for CPU/RSS measurement)."""
        return [p for p in [self.server_proc] + list(self.client_procs.values()) if p]

    # -- configuration -------------------------------------------------------

    def options(self, role):
        """The config lines of ``role`` ("server" or "client") without identity lines."""
        if role == "server":
            lines = [
                "proto tcp-server",
                "local %s" % self.topo.server_ip,
                "port %d" % PORT,
                "server %s %s" % (SUBNET, NETMASK),
                "client-to-client",
                "tcp-nodelay",
                "keepalive 10 60",
                "dh none",
            ]
        elif role == "client":
            lines = [
                "client",
                "proto tcp-client",
                "remote %s %d" % (self.topo.server_ip, PORT),
                "nobind",
                "connect-retry 1 1",
                "connect-timeout 5",
            ]
        else:
            raise ValueError(role)
        return lines + _COMMON + _VARIANT_OPTIONS[self.variant]

    def _write_configs(self, clients):
        os.makedirs(self.workdir, exist_ok=True)
        ids = {name: make_identity(self.workdir, name) for name in ["server"] + list(clients)}
        server_cert, server_key, server_fp = ids["server"]
        server_conf = self.options("server") + [
            "cert %s" % server_cert,
            "key %s" % server_key,
            "<peer-fingerprint>",
        ] + [ids[name][2] for name in clients] + ["</peer-fingerprint>"]
        paths = {"server": os.path.join(self.workdir, "server.conf")}
        _write_lines(paths["server"], server_conf)
        for name in clients:
            cert, key, _ = ids[name]
            conf = self.options("client") + [
                "cert %s" % cert,
                "key %s" % key,
                "peer-fingerprint %s" % server_fp,
            ]
            paths[name] = os.path.join(self.workdir, "client-%s.conf" % name)
            _write_lines(paths[name], conf)
        return paths

    # -- lifecycle -----------------------------------------------------------

    def start(self, clients=("a", "b"), timeout=START_TIMEOUT):
        """Start the server and ``clients``; return once every tunnel is up.

        Raises RuntimeError with the log tails if anything is not up within
        ``timeout`` seconds.
        """
        clients = list(clients)
        for name in clients:
            if name not in self.topo.clients:
                raise KeyError("%r is not a client namespace of %r" % (name, self.topo))
        deadline = time.monotonic() + timeout
        left = lambda: max(0.5, deadline - time.monotonic())  # noqa: E731
        paths = self._write_configs(clients)
        try:
            self.server_proc = self.topo.spawn(
                "srv", ["openvpn", "--config", paths["server"]], cwd=self.workdir)
            self.server_proc.wait_for(READY, timeout=left())
            for name in clients:
                self.client_procs[name] = self.topo.spawn(
                    name, ["openvpn", "--config", paths[name]], cwd=self.workdir)
            for name in clients:
                proc = self.client_procs[name]
                proc.wait_for(READY, timeout=left())
                m = proc.wait_for(_PUSHED_IFCONFIG, timeout=1)
                self.vip[name] = m.group(1)
                d = proc.wait_for(DATA_CHANNEL, timeout=1)
                self.data_channel[name] = (d.group(1), d.group(2))
        except AssertionError as e:
            tails = self.log_tails()
            self.stop()
            raise RuntimeError("OpenVPN (%s) did not come up within %g s: %s\n%s" % (
                self.variant, timeout, e, tails))
        return self

    def log_tails(self, n=25):
        """The last ``n`` log lines of every OpenVPN process, for error messages."""
        out = []
        for proc in self.procs:
            out.append("--- %s (pid %d, rc %r) ---\n%s" % (
                proc.label, proc.pid, proc.returncode, proc.tail(n)))
        return "\n".join(out)

    def cipher_lines(self):
        """Every log line (server and clients) that says what the data channel does."""
        hits = []
        for proc in self.procs:
            for line in proc.lines():
                if (DATA_CHANNEL.search(line) or CLEARTEXT_WARNING.search(line)
                        or NONE_ALLOWED_WARNING.search(line)):
                    hits.append("%s: %s" % (proc.label, line))
        return hits

    def data_channel_in_clear(self):
        """True if every client's log shows a data channel with no cipher.

        Both signs are required: the negotiated "Data Channel: cipher
        '[null-cipher]'" line and the "'--cipher none' was specified" warning.
        """
        if not self.client_procs:
            return False
        for name, proc in self.client_procs.items():
            cipher = self.data_channel.get(name, (None, None))[0]
            if cipher not in NULL_CIPHERS:
                return False
            if not any(CLEARTEXT_WARNING.search(line) for line in proc.lines()):
                return False
        return True

    def stop(self):
        """Stop the clients, then the server.  Safe to call repeatedly."""
        for proc in list(self.client_procs.values()):
            proc.stop()
        if self.server_proc is not None:
            self.server_proc.stop()


def _write_lines(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
