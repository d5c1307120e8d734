"""Configuration is validated at start: a bad value exits 2 naming file, section, key and why."""

import os
import re
import subprocess
import sys

import pytest

import mnedc_client
import mnedc_server
from tests.conftest import ROOT
from tests.wire_peer import CLIENT, SERVER


def run(script, *args, **kw):
    return subprocess.run([sys.executable, script] + list(args), capture_output=True, text=True,
                          timeout=20, cwd=kw.get("cwd"))


@pytest.mark.parametrize("body, complaint", [
    ("[server]\nsubnet = 198.18.0.1/24\n", r"\[server\] subnet: '198.18.0.1/24' has host bits set"),
    ("[server]\nlisten = 0.0.0.0:99999\n", r"\[server\] listen: .*port must be"),
    ("[server]\nkeepalive = soon\n", r"\[server\] keepalive: 'soon' is not a whole number"),
    ("[server]\ntun = maybe\n", r"\[server\] tun: 'maybe' is not one of yes, no, auto"),
    ("[server]\nsecret = short\n", r"\[server\] secret: the secret is too weak \(5 characters\): use at least 16"),
    ("[server]\nsecret = sunshine12345678\n", r"secret: the secret is too weak \(about 51 bits, in runs"),
    ("[server]\nsecret = xxxxxxxxxxxxxxxxxxxxxxxx\n", r"secret: the secret is too weak \(only 1 different characters\)"),
    ("[server]\nsecret = paste-the-secret-here\n", r"secret: the secret is too weak \(the template's placeholder\)"),
    ("[server]\nsecret_file = missing.txt\n", r"\[server\] secret_file: no such file"),
    ("[server]\ncolour = blue\n", r"\[server\] colour: unknown key"),
    ("[server]\nsecret = 9f2c4e81b7d03a65c1e8\nsecret_file = s\n", r"set secret or secret_file, not both"),
    ("[client]\nserver = x\n", r"no \[server\] section"),
    ("not an ini file\n", r"not a valid INI file"),
])
def test_server_refuses_bad_configuration(tmp_path, body, complaint):
    config = tmp_path / "server.ini"
    config.write_text(body)
    result = run(SERVER, "-c", str(config), "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 2, result.stderr
    assert str(config) in result.stderr
    assert re.search(complaint, result.stderr), result.stderr
    assert "Traceback" not in result.stderr


def test_an_unresolvable_listen_host_is_a_config_error(tmp_path):
    result = run(SERVER, "--listen", "no-such-host.invalid:3334", "--state-dir", str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert "--listen: cannot use 'no-such-host.invalid'" in result.stderr and "Traceback" not in result.stderr


def test_server_refuses_bad_flags(tmp_path):
    result = run(SERVER, "--subnet", "198.18.0.0/8", "--state-dir", str(tmp_path))
    assert result.returncode == 2 and "--subnet: '198.18.0.0/8': the prefix must be from /16 to /29" in result.stderr


def test_missing_config_file_is_named(tmp_path):
    result = run(SERVER, "-c", str(tmp_path / "nope.ini"))
    assert result.returncode == 2 and "nope.ini: cannot read: no such file" in result.stderr


@pytest.mark.parametrize("body, complaint", [
    ("[client]\nsecret = 9f2c4e81b7d03a65c1e8\n", "no server configured"),
    ("[client]\nserver = 192.0.2.1\n", "no secret configured"),
    ("[client]\nserver = 192.0.2.1\nsecret = abcdefghijklmnopqrstuvwx\n", "[client] secret: the secret is too weak (about"),
    ("[client]\nserver = 192.0.2.1:0\nsecret = 9f2c4e81b7d03a65c1e8\n", "[client] server: '192.0.2.1:0': give the server's address"),
    ("[client]\nserver = 192.0.2.1\nsecret = 9f2c4e81b7d03a65c1e8\nmtu = 70000\n", "[client] mtu: 70000 is outside 576..65525"),
    ("[client]\nserver = 192.0.2.1\nsecret = 9f2c4e81b7d03a65c1e8\ndevice_id = my pi\n", "[client] device_id: device_id 'my pi' may only hold"),
    ("[client]\nserver = 192.0.2.1\nsecret = 9f2c4e81b7d03a65c1e8\ninterface = much-too-long-name\n", "[client] interface: 'much-too-long-name' is not an interface name"),
])
def test_client_refuses_bad_configuration(tmp_path, body, complaint):
    config = tmp_path / "client.ini"
    config.write_text(body)
    result = run(CLIENT, "-c", str(config))
    assert result.returncode == 2, result.stderr
    assert complaint in result.stderr and "Traceback" not in result.stderr


def test_client_secret_file_is_relative_to_its_config(tmp_path):
    (tmp_path / "net.secret").write_text("short\n")
    config = tmp_path / "client.ini"
    config.write_text("[client]\nserver = 192.0.2.1\nsecret_file = net.secret\n")
    result = run(CLIENT, "-c", str(config), cwd="/")
    assert result.returncode == 2 and "secret_file: the secret is too weak (5 characters)" in result.stderr


def test_the_shipped_client_config_is_valid_but_asks_for_a_server(tmp_path):
    result = run(CLIENT, "-c", os.path.join(ROOT, "client-config.ini"))
    assert result.returncode == 2 and "no server configured" in result.stderr


# ---- the docs say what the code does (issue #12, part 3) ----------------------------------------

README = os.path.join(ROOT, "README.md")


@pytest.mark.parametrize("module, keys", [(mnedc_server, mnedc_server.SERVER_KEYS),
                                          (mnedc_client, mnedc_client.CLIENT_KEYS)])
def test_help_and_readme_document_every_key(module, keys):
    result = subprocess.run([sys.executable, module.__file__, "--help"], capture_output=True, text=True, timeout=30)
    readme = open(README).read()
    assert not [key for key in keys if not re.search(r"\b%s\b" % key, result.stdout)], result.stdout
    assert not [key for key in keys if "`%s`" % key not in readme]


def test_the_readme_names_exactly_the_keys_sighup_cannot_change():
    readme = " ".join(open(README).read().split())
    server = re.search(r"`SIGHUP` re-reads the configuration file and applies every key at once except (.*?) \(", readme)
    client = re.search(r"every key from its next connection on, except (.*?); it never", readme)
    named = [re.findall(r"`(\w+)`", match.group(1)) for match in (server, client)]
    assert named == [list(mnedc_server.RESTART_KEYS), list(mnedc_client.RESTART_KEYS)]
    assert "TLS is planned" not in readme and "2,700" not in readme


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_routes_are_read_in_the_hosts_byte_order(tmp_path, byteorder):
    """/proc/net/route prints addresses as host-order hex: reversed on x86 and ARM, as they are
    on big-endian MIPS (ath79), where a little-endian reading found no overlap at all."""
    def hex_of(dotted):
        return "%08X" % int.from_bytes(bytes(int(part) for part in dotted.split(".")), byteorder)
    routes = tmp_path / "route"
    routes.write_text("Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n"
                      "eth0\t%s\t00000000\t0001\t0\t0\t0\t%s\n" % (hex_of("192.0.2.0"), hex_of("255.255.255.0"))
                      + "eth0\t00000000\t%s\t0003\t0\t0\t0\t00000000\n" % hex_of("192.0.2.1")
                      + "mnedc0\t%s\t00000000\t0001\t0\t0\t0\t%s\n" % (hex_of("198.18.0.0"), hex_of("255.255.255.0")))
    found = mnedc_client.routes_other_than("mnedc0", str(routes), byteorder)
    assert found == [("eth0", (bytes([192, 0, 2, 0]), 24))]       # not the default, not our own


@pytest.mark.parametrize("name", [".bad", "a..b", "two words", ""])
def test_a_bad_tls_server_name_is_refused_at_start(tmp_path, name):
    config = tmp_path / "client.ini"
    config.write_text("[client]\nserver = 192.0.2.1\nsecret = %s\ntls = yes\ntls_ca = %s\ntls_server_name = %s\n"
                      % ("k3y-" * 5, config, name))
    result = run(CLIENT, "-c", str(config), "--check")
    assert result.returncode == 2 and "tls_server_name" in result.stderr, result.stderr


def test_check_of_a_relative_state_dir_ends(tmp_path):
    config = tmp_path / "server.ini"
    config.write_text("[server]\nstate_dir = relative-state\ntun = no\n")
    result = run(SERVER, "-c", str(config), "--check", cwd="/")
    assert result.returncode in (0, 2), result        # the point: it ends (it looped forever)
    (tmp_path / "file-state").write_text("x")
    config.write_text("[server]\nstate_dir = %s\n" % (tmp_path / "file-state"))
    result = run(SERVER, "-c", str(config), "--check")
    assert result.returncode == 2 and "not a directory" in result.stderr


# ---- no shutil in a running script: argparse and which() cost a board 0.4 MB (issue #13) -------

@pytest.mark.parametrize("script", [SERVER, CLIENT])
def test_help_wraps_to_the_terminal_without_importing_shutil(script):
    """-X importtime lists every module the real process imported, so a later use of shutil
    (or argparse's own width lookup, which imports it) shows here. -S: without site, since a
    .pth file in some interpreters' site-packages imports shutil before the script runs."""
    env = dict(os.environ, COLUMNS="60")
    result = subprocess.run([sys.executable, "-S", "-X", "importtime", script, "--help"], capture_output=True,
                            text=True, timeout=30, env=env)
    assert result.returncode == 0, result.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line]
    assert "argparse" in imported and not [name for name in imported if name in ("shutil", "bz2", "lzma")]
    options = result.stdout[result.stdout.index("options:" if "options:" in result.stdout else "arguments:"):]
    assert 40 < max(len(line) for line in options.splitlines()) <= 58, result.stdout
    wide = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, COLUMNS="150"))
    wide_options = wide.stdout[wide.stdout.index("options:" if "options:" in wide.stdout else "arguments:"):]
    assert max(len(line) for line in wide_options.splitlines()) > 60


@pytest.mark.parametrize("module", [mnedc_server, mnedc_client])
def test_find_program_takes_the_first_executable_file_on_path(tmp_path, monkeypatch, module):
    first, second, third = (tmp_path / name for name in ("first", "second", "third"))
    for directory in (first, second, third):
        directory.mkdir()
    (first / "tool").mkdir()                               # a directory is not a program
    (second / "tool").write_text("#!/bin/sh\n")             # nor a file without the x bit
    (third / "tool").write_text("#!/bin/sh\n")
    (third / "tool").chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join(str(d) for d in (first, second, third)))
    assert module.find_program("tool") == str(third / "tool")
    assert module.find_program("absent-tool") is None
    (second / "tool").chmod(0o755)
    assert module.find_program("tool") == str(second / "tool")
