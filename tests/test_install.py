"""install.sh, end to end: install into a temporary root (--root), then run what it installed.

The LSB init script starts, reports and stops a real server, run as a module (python3 -m) from
the bytecode install.sh compiled, with a lower peak RSS than the same server run as a script; the
cron watchdog, run the way cron runs it, brings back a killed daemon, replaces a hung
(SIGSTOPped) one, distrusts a pidfile whose pid now belongs to another program (even another
installation's daemon), and never runs twice at once. Re-installing changes nothing; an upgrade
recompiles; uninstall removes everything but the state. The procd script runs under a stub
rc.common, the systemd unit is read, the refusals are provoked without harming the machine, and
shellcheck, dash and busybox sh check the shell. Every daemon a test starts is killed by pid at
teardown, found by the temporary root in its command line.

`install.sh certs` (no root needed) is checked with openssl itself (verify, names, usages, modes)
and by a real mutual-TLS handshake with Python's ssl module: the server learns the client's
device_id from its certificate, and a client certificate from another CA is refused.
"""

import fcntl
import functools
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import ssl
import sys
import threading
import time

import pytest

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL_SH = os.path.join(PROJECT, "install.sh")
WAIT_S = 15                     # the bound of every wait for a condition
SECRET = "install-test-secret-0123"


# ---- helpers -------------------------------------------------------------------------------

def wait_for(condition, what, timeout=WAIT_S):
    """Poll condition() until it returns something true; fail naming `what` after timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("still waiting after %s s for %s" % (timeout, what))
        time.sleep(0.05)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as source:
            return [part.decode(errors="replace") for part in source.read().split(b"\0") if part]
    except OSError:
        return []


def alive(pid):
    """True while pid is a live process (a zombie counts as gone: nobody may reap it here)."""
    try:
        with open("/proc/%d/stat" % pid) as source:
            return source.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def process_state(pid):
    with open("/proc/%d/stat" % pid) as source:
        return source.read().rsplit(")", 1)[1].split()[0]


def run(argv, env=None, timeout=WAIT_S * 2, cwd=None):
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=env, timeout=timeout, cwd=cwd)


def read_text(path):
    try:
        with open(path) as source:
            return source.read()
    except OSError:
        return ""


def runs_module(argv, module):
    """True if the command line argv runs `python -m module`."""
    return any(flag == "-m" and name == module for flag, name in zip(argv, argv[1:]))


def environ(pid):
    with open("/proc/%d/environ" % pid, "rb") as source:
        return dict(entry.decode(errors="replace").split("=", 1)
                    for entry in source.read().split(b"\0") if b"=" in entry)


def vm_hwm_kb(pid):
    """The peak resident set size of process pid, in kB (/proc/PID/status VmHWM)."""
    with open("/proc/%d/status" % pid) as source:
        for line in source:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/%d/status" % pid)


@functools.lru_cache(maxsize=None)
def installed_python():
    """The interpreter install.sh picks (python3 on PATH, resolved) and its bytecode tag."""
    output = run(["python3", "-c", "import sys; print(sys.executable); print(sys.implementation.cache_tag)"])
    python, tag = output.stdout.split()
    return python, tag


def tree(root):
    """{relative path: (mode, content)} of every file and directory below root."""
    found = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(directory, name)
            mode = os.lstat(path).st_mode
            content = None
            if stat.S_ISREG(mode):
                with open(path, "rb") as source:
                    content = source.read()
            found[os.path.relpath(path, root)] = (oct(mode), content)
    return found


def job_lines(cron_file):
    with open(cron_file) as source:
        return [line for line in source.read().splitlines()
                if line.strip() and not line.startswith("#") and "=" not in line.split()[0]]


@functools.lru_cache(maxsize=None)
def has_control_socket(name):
    script = os.path.join(PROJECT, "mnedc_%s.py" % name)
    return "--control" in run([sys.executable, script, "--help"]).stdout


def control_args(root, name="server"):
    """The --control flag install.sh adds when the daemon has a control socket (newer ones do)."""
    return ["--control", root + "/var/run/mnedc/%s.sock" % name] if has_control_socket(name) else []


class Box:
    """One test's world: a temporary root to install into, a fake logger, and the daemon."""

    def __init__(self, tmp_path):
        self.tmp = str(tmp_path)
        self.root = os.path.join(self.tmp, "root")
        os.mkdir(self.root)
        self.port = free_port()
        self.bin = os.path.join(self.tmp, "bin")
        os.mkdir(self.bin)
        self.logger_log = os.path.join(self.tmp, "logger.log")
        self.logger_hold = os.path.join(self.tmp, "logger.hold")
        self.write_script("logger", """#!/bin/sh
printf '%%s\\n' "$*" >>'%s'
i=0
while [ -e '%s' ] && [ "$i" -lt 300 ]; do sleep 0.05; i=$((i + 1)); done
""" % (self.logger_log, self.logger_hold))
        self.config = os.path.join(self.tmp, "test-server.ini")
        with open(self.config, "w") as sink:
            sink.write("[server]\nlisten = 127.0.0.1:%d\nsubnet = 198.18.0.0/24\ntun = no\nsecret = %s\nstate_dir = %s\n"
                       % (self.port, SECRET, self.path("/var/lib/mnedc")))
        self.others = []                # processes the test started itself, e.g. sleep
        # The init script and the watchdog run from here: python3 -m puts the current directory
        # first on sys.path, so a daemon started from here would run this decoy, and fail.
        self.decoy = os.path.join(self.tmp, "decoy")
        os.mkdir(self.decoy)
        with open(os.path.join(self.decoy, "mnedc_server.py"), "w") as sink:
            sink.write("raise SystemExit('the decoy mnedc_server.py in the current directory ran')\n")

    def path(self, absolute):
        return self.root + absolute

    def write_script(self, name, text):
        path = os.path.join(self.bin, name)
        with open(path, "w") as sink:
            sink.write(text)
        os.chmod(path, 0o755)
        return path

    @property
    def init_script(self):
        return self.path("/etc/init.d/mnedc-server")

    @property
    def pidfile(self):
        return self.path("/var/run/mnedc/mnedc-server.pid")

    @property
    def heartbeat(self):
        return self.path("/var/run/mnedc/mnedc-server.heartbeat")

    @property
    def script(self):
        return self.path("/usr/local/sbin/mnedc_server.py")

    @property
    def bytecode(self):
        return self.path("/usr/local/sbin/__pycache__/mnedc_server.%s.pyc" % installed_python()[1])

    def install(self, *args, shell="/bin/sh", env=None, check=True):
        result = run([shell, INSTALL_SH] + list(args) + ["--root", self.root], env=env)
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    def install_server(self, *args, **kwargs):
        return self.install("server", "--init", "sysv", "--config", self.config, *args, **kwargs)

    def init(self, action, env=None):
        return run([self.init_script, action], env=env, cwd=self.decoy)

    def daemon_pid(self):
        """The pid in the pidfile if it names a live server, else None."""
        try:
            with open(self.pidfile) as source:
                pid = int(source.read())
        except (OSError, ValueError):
            return None
        argv = cmdline(pid)
        return pid if alive(pid) and runs_module(argv, "mnedc_server") and self.pidfile in argv else None

    def start(self):
        result = self.init("start")
        assert result.returncode == 0, result.stdout + result.stderr
        return wait_for(self.daemon_pid, "the server's pidfile")

    def accepts(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def cron_env(self, **extra):
        """The environment cron gives the job: its PATH line, our fake logger first."""
        path = "/usr/bin:/bin"
        with open(self.path("/etc/cron.d/mnedc")) as source:
            for line in source:
                if line.startswith("PATH="):
                    path = line.strip()[len("PATH="):]
        env = {"PATH": self.bin + ":" + path, "HOME": "/root", "LOGNAME": "root", "SHELL": "/bin/sh"}
        env.update(extra)
        return env

    def watchdog_argv(self):
        """The command of the cron line, as cron runs it (sh -c)."""
        (line,) = job_lines(self.path("/etc/cron.d/mnedc"))
        fields = line.split(None, 6)
        assert fields[:6] == ["*", "*", "*", "*", "*", "root"], line
        return ["/bin/sh", "-c", fields[6]]

    def watchdog(self, **extra):
        return run(self.watchdog_argv(), env=self.cron_env(**extra), cwd=self.decoy)

    def logged(self):
        return read_text(self.logger_log)

    def stop_everything(self):
        """SIGKILL, by pid, every process whose command line names our temporary directory."""
        victims = [p.pid for p in self.others]
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) != os.getpid():
                if any(self.tmp in part for part in cmdline(int(name))):
                    victims.append(int(name))
        for pid in victims:
            for signum in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, signum)
                except OSError:
                    pass
        for process in self.others:
            process.wait(timeout=WAIT_S)
        wait_for(lambda: not any(alive(pid) for pid in victims), "the test's processes to die")


@pytest.fixture
def box(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("install.sh installs services and refuses to run without root")
    world = Box(tmp_path)
    try:
        yield world
    finally:
        world.stop_everything()


@pytest.fixture
def running(box):
    """An installed server, started through its init script."""
    box.install_server()
    box.start()
    return box


# ---- 1. what install puts where --------------------------------------------------------------

def test_install_server_files(box):
    result = box.install_server()
    assert "neither enabled nor started (--root)" in result.stdout

    assert open(box.script, "rb").read() == open(os.path.join(PROJECT, "mnedc_server.py"), "rb").read()
    assert os.stat(box.script).st_mode & 0o777 == 0o755
    assert_fresh_bytecode(box)
    assert "bytecode: %s (the service runs python3 -u -m mnedc_server" % box.bytecode in result.stdout
    manifest = open(box.path("/etc/mnedc/install.manifest")).read().splitlines()
    assert "bytecode /usr/local/sbin/mnedc_server.py" in manifest
    assert "dir /usr/local/sbin/__pycache__" in manifest
    config = box.path("/etc/mnedc/server.ini")
    assert open(config).read() == open(box.config).read()
    assert os.stat(config).st_mode & 0o777 == 0o600

    init = open(box.init_script).read()
    assert os.stat(box.init_script).st_mode & 0o777 == 0o755
    assert init.startswith("#!/bin/sh\n### BEGIN INIT INFO\n# Provides:          mnedc-server\n")
    assert "# Required-Start:    $network $remote_fs $syslog" in init
    assert "-x \"$PYTHON\"" in init and "-m" not in init.split("start-stop-daemon -S")[1].split("\n")[0]
    assert "MODULE=mnedc_server\n" in init and "SBIN_DIR='%s'\n" % box.path("/usr/local/sbin") in init
    assert 'set -- -u -m "$MODULE" -c "$CONFIG"' in init and "\tPYTHONPATH=$SBIN_DIR\n" in init

    cron_file = box.path("/etc/cron.d/mnedc")
    info = os.stat(cron_file)
    assert (info.st_mode & 0o777, info.st_uid, info.st_gid) == (0o644, 0, 0)
    cron = open(cron_file).read()
    assert "%" not in cron
    path_line = [line for line in cron.splitlines() if line.startswith("PATH=")]
    assert path_line and "/sbin" in path_line[0].split("=", 1)[1].split(":")
    assert job_lines(cron_file) == [
        "* * * * * root %s mnedc-server" % box.path("/usr/local/sbin/mnedc-watchdog")]

    watchdog = box.path("/usr/local/sbin/mnedc-watchdog")
    assert os.stat(watchdog).st_mode & 0o777 == 0o755
    assert "flock -n" in open(watchdog).read()
    state = box.path("/var/lib/mnedc")
    assert os.path.isdir(state) and os.stat(state).st_mode & 0o777 == 0o700
    assert os.path.isdir(box.path("/var/run/mnedc"))
    assert not os.path.exists(box.pidfile)


def assert_fresh_bytecode(box):
    """box.bytecode is the bytecode of the installed script that the installed python3 loads:
    its header holds that interpreter's magic number and the script's mtime and size."""
    python, _ = installed_python()
    magic = run([python, "-c", "import importlib.util; print(importlib.util.MAGIC_NUMBER.hex())"]).stdout.strip()
    with open(box.bytecode, "rb") as source:
        header = source.read(16)
    info = os.stat(box.script)
    assert header[:4].hex() == magic
    assert struct.unpack("<III", header[4:]) == (0, int(info.st_mtime) & 0xFFFFFFFF, info.st_size)
    assert os.stat(box.bytecode).st_mode & 0o777 == 0o644


# ---- 2. the LSB init script, for real ----------------------------------------------------------

def test_init_script_start_status_stop(running):
    box = running
    pid = box.daemon_pid()
    argv = cmdline(pid)
    assert argv[0] == installed_python()[0]
    assert argv[1:] == ["-u", "-m", "mnedc_server", "-c", box.path("/etc/mnedc/server.ini"), "--syslog",
                        "--pidfile", box.pidfile, "--heartbeat", box.heartbeat] + control_args(box.root)
    assert environ(pid)["PYTHONPATH"] == box.path("/usr/local/sbin")
    assert os.readlink("/proc/%d/cwd" % pid) == "/"          # not the decoy's directory
    wait_for(box.accepts, "the server to accept TCP on port %d" % box.port)

    again = box.init("start")
    assert again.returncode == 0 and "already running (pid %d)" % pid in again.stdout
    status = box.init("status")
    assert status.returncode == 0 and "running (pid %d)" % pid in status.stdout

    stop = box.init("stop")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert not alive(pid)
    assert not os.path.exists(box.pidfile)
    status = box.init("status")
    assert status.returncode == 3 and "not running" in status.stdout
    assert box.init("stop").returncode == 0          # stopping a stopped service is fine (LSB)
    assert box.init("bogus").returncode == 2


def test_init_script_status_dead_with_pidfile(running):
    box = running
    pid = box.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), "the killed server to die")
    status = box.init("status")
    assert status.returncode == 1 and "pidfile" in status.stdout


MIN_SAVING_KB = 2048            # measured: 5 to 7 MB less with python3 3.11


def test_module_from_bytecode_peaks_lower_than_the_script(running):
    """The daemon the init script started loads the bytecode (python3 -m) and peaks lower than the
    same server started the way install.sh did before, as a script that Python compiles. The init
    script also recognizes and stops such a daemon from before, so that an upgrade replaces it."""
    box = running
    pid = box.daemon_pid()
    argv = cmdline(pid)
    assert argv[1:4] == ["-u", "-m", "mnedc_server"]
    bytecode_mtime = os.stat(box.bytecode).st_mtime_ns
    wait_for(box.accepts, "the server to accept TCP on port %d" % box.port)
    module_kb = vm_hwm_kb(pid)
    assert os.stat(box.bytecode).st_mtime_ns == bytecode_mtime, "the daemon found the bytecode stale"
    assert box.init("stop").returncode == 0

    as_script = [argv[0], "-u", box.script] + argv[4:]       # same interpreter, same arguments
    old = subprocess.Popen(as_script, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, cwd="/")
    box.others.append(old)
    wait_for(lambda: cmdline(old.pid) == as_script and box.accepts(), "the script server to accept TCP")
    wait_for(lambda: read_text(box.pidfile).strip() == str(old.pid), "the script server's pidfile")
    script_kb = vm_hwm_kb(old.pid)
    print("\nVmHWM of the server: %d kB as python3 -m mnedc_server (bytecode), %d kB as a script, "
          "%d kB less" % (module_kb, script_kb, script_kb - module_kb))
    assert script_kb - module_kb >= MIN_SAVING_KB, (module_kb, script_kb)

    status = box.init("status")
    assert status.returncode == 0 and "running (pid %d)" % old.pid in status.stdout
    stop = box.init("stop")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert old.wait(timeout=WAIT_S) is not None


# ---- 3.-6. the watchdog --------------------------------------------------------------------------

def test_watchdog_leaves_a_healthy_daemon_alone(running):
    box = running
    pid = box.daemon_pid()
    result = box.watchdog()
    assert result.returncode == 0 and result.stderr == ""
    assert box.daemon_pid() == pid and box.logged() == ""


def test_the_heartbeat_keeps_beating_while_the_loop_runs(running):
    """Not only the beat at start: a daemon whose loop stopped touching it would be killed by
    the watchdog every minute, so two beats after the first are waited for (HEARTBEAT_S is 5)."""
    box = running
    first = os.stat(box.heartbeat).st_mtime
    second = wait_for(lambda: os.stat(box.heartbeat).st_mtime > first and os.stat(box.heartbeat).st_mtime,
                      "a second heartbeat", timeout=12)
    wait_for(lambda: os.stat(box.heartbeat).st_mtime > second, "a third heartbeat", timeout=12)
    result = box.watchdog(MNEDC_HEARTBEAT_MAX_S="8")
    assert result.returncode == 0 and result.stderr == "" and box.logged() == ""


def test_watchdog_restarts_a_killed_daemon(running):
    box = running
    old = box.daemon_pid()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not alive(old), "the killed server to die")

    result = box.watchdog()
    assert result.returncode == 0, result.stderr
    new = box.daemon_pid()
    assert new and new != old
    wait_for(box.accepts, "the restarted server to accept TCP")
    assert "process %d is gone: restarting it" % old in result.stderr
    assert "restarted (pid %d)" % new in result.stderr
    assert "-t mnedc-watchdog" in box.logged() and "process %d is gone" % old in box.logged()

    # The new daemon must not inherit the watchdog's lock, or no later run could act.
    lock = box.path("/var/run/mnedc/mnedc-server.lock")
    for fd in os.listdir("/proc/%d/fd" % new):
        assert os.readlink("/proc/%d/fd/%s" % (new, fd)) != lock
    with open(lock) as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_watchdog_kills_and_replaces_a_hung_daemon(running):
    box = running
    old = box.daemon_pid()
    os.kill(old, signal.SIGSTOP)
    wait_for(lambda: process_state(old) == "T", "the server to stop")
    bound_s = 2
    wait_for(lambda: time.time() - os.stat(box.heartbeat).st_mtime > bound_s + 1.5,
             "the stopped server's heartbeat to go stale")
    assert box.watchdog().returncode == 0                   # 60 s by default: not hung yet
    assert box.daemon_pid() == old

    result = box.watchdog(MNEDC_HEARTBEAT_MAX_S=str(bound_s))
    assert result.returncode == 0, result.stderr
    assert not alive(old)
    new = box.daemon_pid()
    assert new and new != old
    assert "hangs: no heartbeat for" in result.stderr and "SIGKILL" in result.stderr
    assert "hangs" in box.logged()
    wait_for(box.accepts, "the replacement server to accept TCP")


def test_watchdog_distrusts_a_pidfile_naming_another_program(running):
    box = running
    old = box.daemon_pid()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not alive(old), "the killed server to die")
    sleeper = subprocess.Popen(["sleep", "300"])
    box.others.append(sleeper)
    with open(box.pidfile, "w") as sink:
        sink.write("%d\n" % sleeper.pid)
    assert box.init("status").returncode == 1

    result = box.watchdog()
    assert result.returncode == 0, result.stderr
    assert "names pid %d, which is another program (sleep 300)" % sleeper.pid in result.stderr
    new = box.daemon_pid()
    assert new and new not in (old, sleeper.pid)
    assert sleeper.poll() is None, "the watchdog must not touch the unrelated process"


@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv (util-linux) to drop root")
def test_a_copy_of_the_daemons_command_line_run_by_another_user_is_not_the_daemon(running):
    """After a crash, a user's process with the daemon's very command line takes the dead pid's
    place: neither start nor the watchdog may take it for the daemon (it is not root's)."""
    box = running
    old = box.daemon_pid()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not alive(old), "the killed server to die")
    impostor = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                 sys.executable, "-c", "import time; time.sleep(300)",
                                 "-m", "mnedc_server", "--pidfile", box.pidfile], cwd="/")
    box.others.append(impostor)
    wait_for(lambda: runs_module(cmdline(impostor.pid), "mnedc_server"), "the impostor to run")
    with open(box.pidfile, "w") as sink:
        sink.write("%d\n" % impostor.pid)
    assert box.init("status").returncode != 0
    assert box.init("start").returncode == 0
    new = wait_for(box.daemon_pid, "a real server")
    assert new != impostor.pid and alive(impostor.pid)
    assert os.stat("/proc/%d" % new).st_uid == 0


def test_watchdog_distrusts_a_pidfile_naming_another_installations_daemon(running):
    """The pid now belongs to a process that runs "-m mnedc_server", but with another pidfile: not
    ours. The watchdog starts ours; neither it, the init script nor uninstall touches that one."""
    box = running
    old = box.daemon_pid()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not alive(old), "the killed server to die")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "-m", "mnedc_server",
                              "--pidfile", "/elsewhere/mnedc-server.pid"])
    box.others.append(other)
    wait_for(lambda: runs_module(cmdline(other.pid), "mnedc_server"), "the other process to run")
    with open(box.pidfile, "w") as sink:
        sink.write("%d\n" % other.pid)
    assert box.init("status").returncode == 1

    result = box.watchdog()
    assert result.returncode == 0, result.stderr
    assert "names pid %d, which is another program" % other.pid in result.stderr
    new = box.daemon_pid()
    assert new and new not in (old, other.pid)

    assert box.init("stop").returncode == 0 and not alive(new)
    with open(box.pidfile, "w") as sink:
        sink.write("%d\n" % other.pid)
    assert "is not running" in box.init("stop").stdout
    box.install("uninstall", "--purge")
    assert other.poll() is None, "nothing may touch the other installation's process"


def test_watchdog_runs_never_overlap(running):
    box = running
    old = box.daemon_pid()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not alive(old), "the killed server to die")
    open(box.logger_hold, "w").close()        # the fake logger now blocks the first run, locked
    first = subprocess.Popen(box.watchdog_argv(), env=box.cron_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True)
    try:
        wait_for(lambda: "is gone" in box.logged(), "the first watchdog run to hold the lock")
        began = time.monotonic()
        second = box.watchdog()
        assert second.returncode == 0 and second.stdout == second.stderr == ""
        assert time.monotonic() - began < 5
        assert box.logged().count("\n") == 1 and box.daemon_pid() is None
    finally:
        os.unlink(box.logger_hold)
        out, err = first.communicate(timeout=WAIT_S * 2)
    assert first.returncode == 0, err
    assert box.daemon_pid() not in (None, old)


def test_watchdog_respects_a_deliberate_stop(running):
    box = running
    assert box.init("stop").returncode == 0
    result = box.watchdog()
    assert result.returncode == 0 and result.stderr == ""
    assert box.daemon_pid() is None


# ---- 7. idempotency and uninstall ----------------------------------------------------------------

def test_reinstall_changes_nothing_and_uninstall_removes_all_but_state(box):
    box.install_server()
    first = tree(box.root)
    box.install_server()
    assert tree(box.root) == first
    assert len(job_lines(box.path("/etc/cron.d/mnedc"))) == 1

    pid = box.start()
    result = box.install("uninstall")
    assert not alive(pid), "uninstall must stop the daemon"
    assert not os.path.exists(os.path.dirname(box.bytecode)), "uninstall must remove the bytecode"
    left = set(tree(box.root)) - {"var", "var/lib"}
    assert all(path.startswith("var/lib/mnedc") for path in left), left
    assert "leases.json" in os.listdir(box.path("/var/lib/mnedc"))
    assert "kept the state" in result.stdout

    box.install("uninstall", "--purge")
    assert os.listdir(box.root) == []


AVAHI_STOCK = """# See avahi-daemon.conf(5) for more information on this configuration file!

[server]
#host-name=foo
use-ipv4=yes
use-ipv6=yes
allow-point-to-point=no
ratelimit-burst=1000

[publish]
publish-hinfo=no
"""


@pytest.mark.parametrize("stock", [AVAHI_STOCK, "[publish]\npublish-hinfo=no\n"], ids=["server-section", "no-server-section"])
def test_avahi_is_set_to_serve_the_tun_and_uninstall_gives_its_file_back(box, stock):
    """Issue #15: avahi-daemon skips point-to-point interfaces (a TUN) unless allowed; install
    allows it in the [server] section, a reinstall changes nothing, uninstall restores the file
    byte for byte. tests/test_lan.py runs the real avahi-daemon on a file install.sh wrote."""
    conf = box.path("/etc/avahi/avahi-daemon.conf")
    os.makedirs(os.path.dirname(conf))
    with open(conf, "w") as sink:
        sink.write(stock)
    result = box.install_server()
    assert "set allow-point-to-point=yes in /etc/avahi/avahi-daemon.conf" in result.stdout
    text = open(conf).read()
    lines = text.splitlines()
    server = lines.index("[server]")
    following = lines[server + 1:]
    section = following[:next((n for n, line in enumerate(following) if line.startswith("[")), len(following))]
    active = [line for line in section if line.startswith("allow-point-to-point")]
    assert active == ["allow-point-to-point=yes"], text
    assert not [line for line in lines if line.startswith("allow-point-to-point") and line not in section], text
    assert "avahi /etc/avahi/avahi-daemon.conf" in open(box.path("/etc/mnedc/install.manifest")).read()
    box.install_server()
    assert open(conf).read() == text, "a reinstall must not touch the file again"
    box.install("uninstall", "--purge")
    assert open(conf).read() == stock


def test_avahi_already_allowing_point_to_point_is_left_alone(box):
    conf = box.path("/etc/avahi/avahi-daemon.conf")
    os.makedirs(os.path.dirname(conf))
    stock = AVAHI_STOCK.replace("allow-point-to-point=no", "allow-point-to-point=yes")
    with open(conf, "w") as sink:
        sink.write(stock)
    assert "already allows point-to-point" in box.install_server().stdout
    box.install("uninstall", "--purge")
    assert open(conf).read() == stock


def client_ini(box):
    path = os.path.join(box.tmp, "client.ini")
    with open(path, "w") as sink:
        sink.write("[client]\nserver = 127.0.0.1:%d\nsecret = %s\nserver_pin = sha256:%s\n" % (box.port, SECRET, "0" * 64))
    return path


def test_dnsmasq_reads_the_clients_servers_file_and_uninstall_takes_the_dropin_away(box):
    """Issue #15: where dnsmasq keeps /etc/dnsmasq.d (Debian's package), a client install makes it
    read the file the client names its relay in (tests/test_lan.py runs dnsmasq and the client on
    such a file); the real dnsmasq accepts the drop-in; uninstall removes it."""
    os.makedirs(box.path("/etc/dnsmasq.d"))
    env = dict(os.environ, MNEDC_TUN_DEV="/dev/null")
    result = box.install("client", "--init", "sysv", "--config", client_ini(box), env=env)
    assert "dnsmasq reads /etc/mnedc/dnsmasq.servers (/etc/dnsmasq.d/mnedc)" in result.stdout, result.stdout
    dropin = box.path("/etc/dnsmasq.d/mnedc")
    assert read_text(dropin).splitlines()[1:] == ["servers-file=/etc/mnedc/dnsmasq.servers"]
    checked = run(["dnsmasq", "--test", "-C", "/dev/null", "--conf-dir=" + box.path("/etc/dnsmasq.d")])
    assert "syntax check OK" in checked.stdout + checked.stderr, checked.stdout + checked.stderr
    assert read_text(box.path("/etc/mnedc/dnsmasq.servers")) == "" and os.path.isfile(box.path("/etc/mnedc/dnsmasq.servers"))
    box.install("uninstall", "--purge")
    assert not os.path.exists(dropin) and os.path.isdir(box.path("/etc/dnsmasq.d"))
    assert not os.path.exists(box.path("/etc/mnedc/dnsmasq.servers"))


UCI = """#!/bin/sh
# A stand-in for OpenWrt's uci (not packaged off OpenWrt): one option, kept in a file; every call recorded.
printf '%%s\\n' "$*" >>'%(calls)s'
while [ "${1#-}" != "$1" ]; do [ "$1" = -c ] && shift; shift; done
case $1 in
get) [ -s '%(value)s' ] && cat '%(value)s' || exit 1 ;;
set) printf '%%s\\n' "${2#*=}" >'%(value)s' ;;
delete) : >'%(value)s' ;;
esac
"""


@pytest.mark.parametrize("before", ["", "/tmp/someone-elses.servers"], ids=["unset", "set-by-the-owner"])
def test_on_openwrt_uci_points_dnsmasq_at_the_servers_file_and_uninstall_takes_it_back(box, before):
    """OpenWrt's dnsmasq takes its servers file from uci (dhcp.@dnsmasq[0].serversfile); uci is
    OpenWrt's own, so a stand-in on PATH records what install.sh asks of it. One set by the owner
    is left alone, with the line to add instead."""
    calls, value = os.path.join(box.tmp, "uci.calls"), os.path.join(box.tmp, "uci.value")
    with open(value, "w") as sink:
        sink.write(before + "\n" if before else "")
    box.write_script("uci", UCI % {"calls": calls, "value": value})
    os.makedirs(box.path("/etc/config"))
    with open(box.path("/etc/config/dhcp"), "w") as sink:
        sink.write("config dnsmasq\n")
    env = dict(os.environ, MNEDC_TUN_DEV="/dev/null", PATH=box.bin + os.pathsep + os.environ["PATH"])
    result = box.install("client", "--init", "sysv", "--config", client_ini(box), env=env)
    box.install("client", "--init", "sysv", "--config", client_ini(box), env=env)     # again: no second set
    config_dir = "-c %s " % box.path("/etc/config")
    sets = [line for line in read_text(calls).splitlines() if " set " in line]
    if before:
        assert "dnsmasq already reads its servers from %s: add server=/mnedc/RELAY_VIRTUAL_IP there" % before in result.stdout
        assert sets == [] and read_text(value).strip() == before
    else:
        assert sets == [config_dir + "set dhcp.@dnsmasq[0].serversfile=/etc/mnedc/dnsmasq.servers"], read_text(calls)
        assert config_dir + "commit dhcp" in read_text(calls).splitlines()
        assert read_text(value).strip() == "/etc/mnedc/dnsmasq.servers"
    box.install("uninstall", "--purge", env=env)
    assert read_text(value).strip() == before, "uninstall gives back what was there"


def test_a_plain_uninstall_keeps_the_config_and_the_next_install_restores_it(box):
    """Reinstalling after a plain uninstall gives every device its old address: the config (its
    subnet) comes back with the leases, instead of a default one that would re-address all."""
    from tests.wire_peer import WirePeer, state_pin
    box.install_server()
    config = read_text(box.path("/etc/mnedc/server.ini"))
    box.start()
    peer = WirePeer(wait_for(box.accepts, "the relay to accept") and box.port,
                    pin=state_pin(box.path("/var/lib/mnedc")))     # installed with the default: TLS
    first = peer.handshake(SECRET.encode(), "sticky-device")
    peer.close()
    result = box.install("uninstall")
    assert "kept %s in %s" % (box.path("/etc/mnedc/server.ini"), box.path("/var/lib/mnedc/kept-config")) in result.stdout
    assert not os.path.exists(box.path("/etc/mnedc/server.ini"))
    os.makedirs(box.path("/etc/mnedc"), exist_ok=True)
    with open(box.path("/etc/mnedc/network.secret"), "w") as sink:     # the operator's own file
        sink.write(SECRET + "\n")
    config = config.replace("secret = %s\n" % SECRET, "secret_file = network.secret\n")
    with open(box.path("/var/lib/mnedc/kept-config/server.ini"), "w") as sink:
        sink.write(config)                          # relative to /etc/mnedc, where it goes back
    result = box.install("server", "--init", "sysv")                # no --config this time
    assert "restored %s" % box.path("/etc/mnedc/server.ini") in result.stdout
    assert read_text(box.path("/etc/mnedc/server.ini")) == config
    assert not os.path.exists(box.path("/var/lib/mnedc/kept-config"))
    box.start()
    peer = WirePeer(wait_for(box.accepts, "the relay to accept again") and box.port,
                    pin=state_pin(box.path("/var/lib/mnedc")))     # the same certificate, kept
    assert peer.handshake(SECRET.encode(), "sticky-device") == first
    peer.close()
    box.install("uninstall", "--purge")
    os.unlink(box.path("/etc/mnedc/network.secret"))
    os.rmdir(box.path("/etc/mnedc"))
    os.rmdir(box.path("/etc"))
    assert os.listdir(box.root) == []


@pytest.mark.parametrize("killed_after", ["/etc/init.d/mnedc-server", "/etc/cron.d/mnedc"])
def test_an_install_killed_half_way_is_uninstalled_whole(box, killed_after):
    """kill -9 right after the init script or the root cron job was placed, before the install
    finished: uninstall --purge must still find and remove every file, temporary ones too."""
    mv = shutil.which("mv")
    box.write_script("mv", "#!/bin/sh\n%s \"$@\" || exit 1\n"
                           "case \"$*\" in *%s) kill -9 $PPID ;; esac\n" % (mv, box.path(killed_after)))
    env = dict(os.environ, PATH=box.bin + ":" + os.environ["PATH"])
    result = box.install_server(env=env, check=False)
    assert result.returncode == -signal.SIGKILL or result.returncode == 128 + signal.SIGKILL, result
    assert os.path.exists(box.path(killed_after))
    box.install("uninstall", "--purge")
    assert os.listdir(box.root) == [], tree(box.root)


def test_upgrade_recompiles_the_bytecode(box):
    """A re-install with another script compiles it again, even within the same second and at the
    same size (the header alone would not tell): the bytecode always matches the script."""
    source = os.path.join(box.tmp, "source")
    os.mkdir(source)
    for name in ("install.sh", "mnedc_server.py"):
        shutil.copy(os.path.join(PROJECT, name), source)
    script = os.path.join(source, "mnedc_server.py")
    with open(script, "a") as sink:
        sink.write("UPGRADE_MARK = 'mnedc-mark-one'\n")
    argv = ["/bin/sh", os.path.join(source, "install.sh"), "server", "--init", "sysv", "--root", box.root]
    assert run(argv).returncode == 0
    assert b"mnedc-mark-one" in open(box.bytecode, "rb").read()
    with open(script, "r+") as sink:
        sink.seek(0, os.SEEK_END)
        sink.seek(sink.tell() - len("one'\n"))
        sink.write("two'\n")
    assert run(argv).returncode == 0
    assert open(box.script).read().endswith("UPGRADE_MARK = 'mnedc-mark-two'\n")
    assert_fresh_bytecode(box)
    bytecode = open(box.bytecode, "rb").read()
    assert b"mnedc-mark-two" in bytecode and b"mnedc-mark-one" not in bytecode


def test_uninstall_removes_the_bytecode_of_any_python_and_keeps_other_files(box):
    box.install_server()
    cache = os.path.dirname(box.bytecode)
    assert os.listdir(cache) == [os.path.basename(box.bytecode)]
    for name in ("mnedc_server.cpython-399.pyc", "mnedc_server.cpython-399.opt-1.pyc"):
        open(os.path.join(cache, name), "wb").close()     # as a newer python3 writes at a start
    box.install("uninstall", "--purge")
    assert os.listdir(box.root) == []

    box.install_server()
    open(os.path.join(cache, "other_tool.cpython-311.pyc"), "wb").close()
    box.install("uninstall", "--purge")
    assert os.listdir(cache) == ["other_tool.cpython-311.pyc"], "a __pycache__ in use must stay"


def test_install_dies_when_it_cannot_byte_compile(box):
    os.makedirs(box.bytecode)                             # a directory where the .pyc goes
    result = box.install_server(check=False)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("install.sh: "), result.stderr
    assert "%s cannot byte-compile %s (" % (installed_python()[0], box.script) in lines[0]
    assert box.bytecode + " is a non-regular file" in lines[0]        # what py_compile said
    assert not os.path.exists(box.init_script)


def test_server_and_client_share_the_cron_file(box):
    client_config = os.path.join(box.tmp, "client.ini")
    with open(client_config, "w") as sink:
        sink.write("[client]\nserver = 127.0.0.1:%d\nsecret = %s\nserver_pin = sha256:%s\n"
                   % (box.port, SECRET, "0" * 64))
    box.install_server()
    env = dict(os.environ, MNEDC_TUN_DEV="/dev/null")   # a character device: the check passes
    box.install("client", "--init", "sysv", "--config", client_config, env=env)
    box.install("client", "--init", "sysv", "--config", client_config, env=env)
    watchdog = box.path("/usr/local/sbin/mnedc-watchdog")
    assert job_lines(box.path("/etc/cron.d/mnedc")) == [
        "* * * * * root %s mnedc-server" % watchdog, "* * * * * root %s mnedc-client" % watchdog]
    assert os.path.exists(box.path("/etc/init.d/mnedc-client"))
    box.install("uninstall", "--purge")
    assert os.listdir(box.root) == []


def test_client_with_the_template_is_installed_but_not_enabled(box):
    env = dict(os.environ, MNEDC_TUN_DEV="/dev/null")
    result = box.install("client", "--init", "sysv", env=env)
    config = box.path("/etc/mnedc/client-config.ini")
    assert open(config).read() == open(os.path.join(PROJECT, "client-config.ini")).read()
    assert "set server, secret, server_pin in %s" % config in result.stdout
    assert not os.path.exists(box.path("/etc/cron.d/mnedc"))
    assert not os.path.exists(box.path("/var/run/mnedc/mnedc-client.pid"))


def test_reinstall_with_another_init_is_refused(box):
    box.install_server()
    result = box.install("server", "--init", "procd", check=False)
    assert result.returncode != 0 and "uninstall first" in result.stderr


# ---- 8.-9. procd and systemd -------------------------------------------------------------------

PROCD_STUB = r"""
record() { for arg in "$@"; do printf '[%s]' "$arg"; done; echo; }
procd_open_instance() { record open_instance "$@"; }
procd_set_param() { record set_param "$@"; }
procd_append_param() { record append_param "$@"; }
procd_close_instance() { record close_instance "$@"; }
. "$1"
start_service
"""


def test_procd_script(box):
    box.install("server", "--init", "procd")
    init = box.path("/etc/init.d/mnedc-server")
    text = open(init).read()
    assert text.startswith("#!/bin/sh /etc/rc.common\n")
    for line in ("USE_PROCD=1", "START=90", "STOP=10"):
        assert line + "\n" in text
    python = installed_python()[0]
    conf = box.path("/etc/mnedc/server.ini")
    pidfile = box.path("/var/run/mnedc/mnedc-server.pid")
    expected = [
        "[open_instance]",
        "[set_param][command][%s][-u][-m][mnedc_server][-c][%s][--pidfile][%s][--heartbeat][%s]"
        % (python, conf, pidfile, box.path("/var/run/mnedc/mnedc-server.heartbeat"))
        + "".join("[%s]" % arg for arg in control_args(box.root)),
        "[set_param][env][PYTHONPATH=%s]" % box.path("/usr/local/sbin"),
        "[set_param][respawn][3600][5][0]",
        "[set_param][stdout][1]",
        "[set_param][stderr][1]",
        "[set_param][pidfile][%s]" % pidfile,
        "[set_param][file][%s]" % conf,
        "[close_instance]",
    ]
    shells = [["/bin/sh"], ["dash"]] + ([["busybox", "sh"]] if shutil.which("busybox") else [])
    for shell in shells:
        assert run(shell + ["-n", init]).returncode == 0
        result = run(shell + ["-c", PROCD_STUB, "stub", init])
        assert result.returncode == 0 and result.stdout.splitlines() == expected, (shell, result)

    assert "state_dir = %s" % box.path("/etc/mnedc/state") in open(conf).read()
    assert os.stat(box.path("/etc/mnedc/state")).st_mode & 0o777 == 0o700
    assert job_lines(box.path("/etc/crontabs/root")) == [
        "* * * * * %s mnedc-server" % box.path("/usr/local/sbin/mnedc-watchdog")]
    kept = open(box.path("/etc/sysupgrade.conf")).read().splitlines()
    for path in ("/etc/mnedc/", "/usr/local/sbin/mnedc_server.py", "/usr/local/sbin/mnedc-watchdog",
                 "/etc/init.d/mnedc-server"):
        assert box.path(path) in kept
    box.install("server", "--init", "procd")
    assert len(open(box.path("/etc/sysupgrade.conf")).read().splitlines()) == len(kept)
    assert len(job_lines(box.path("/etc/crontabs/root"))) == 1
    box.install("uninstall", "--purge")
    assert os.listdir(box.root) == []


def test_procd_crontab_keeps_other_jobs(box):
    os.makedirs(box.path("/etc/crontabs"))
    with open(box.path("/etc/crontabs/root"), "w") as sink:
        sink.write("0 3 * * * /sbin/reboot\n")
    os.chmod(box.path("/etc/crontabs/root"), 0o600)
    os.chown(box.path("/etc/crontabs/root"), 0, 65534)
    box.install("server", "--init", "procd")
    assert len(job_lines(box.path("/etc/crontabs/root"))) == 2
    for _ in ("installed", "uninstalled"):      # root's other jobs stay for root's eyes only
        info = os.stat(box.path("/etc/crontabs/root"))
        assert (info.st_mode & 0o777, info.st_uid, info.st_gid) == (0o600, 0, 65534)
        box.install("uninstall", "--purge")
    assert open(box.path("/etc/crontabs/root")).read() == "0 3 * * * /sbin/reboot\n"


def test_a_new_openwrt_crontab_is_root_only(box):
    box.install("server", "--init", "procd")
    assert os.stat(box.path("/etc/crontabs/root")).st_mode & 0o777 == 0o600


def test_systemd_unit(box):
    box.install("server", "--init", "systemd", "--prefix", "/opt/mnedc")
    unit = open(box.path("/etc/systemd/system/mnedc-server.service")).read()
    lines = unit.splitlines()
    for line in ("Restart=always", "RestartSec=5", "StartLimitIntervalSec=0",
                 "After=network-online.target", "Wants=network-online.target",
                 "WantedBy=multi-user.target"):
        assert line in lines
    assert lines.index("StartLimitIntervalSec=0") < lines.index("[Service]")   # a [Unit] key
    (exec_start,) = [line for line in lines if line.startswith("ExecStart=")]
    assert exec_start.split()[0] == "ExecStart=" + installed_python()[0]
    assert "Environment=PYTHONPATH=%s" % box.path("/opt/mnedc/sbin") in lines
    assert os.path.exists(box.path("/opt/mnedc/sbin/__pycache__/mnedc_server.%s.pyc" % installed_python()[1]))
    assert exec_start.split()[1:] == [
        "-u", "-m", "mnedc_server", "-c", box.path("/etc/mnedc/server.ini"),
        "--syslog", "--pidfile", box.path("/var/run/mnedc/mnedc-server.pid"),
        "--heartbeat", box.path("/var/run/mnedc/mnedc-server.heartbeat")] + control_args(box.root)
    assert not os.path.exists(box.path("/etc/init.d"))
    assert len(job_lines(box.path("/etc/cron.d/mnedc"))) == 1


# ---- 10. refusals --------------------------------------------------------------------------------

def assert_refused(box, result, *phrases):
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("install.sh: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0]
    assert os.listdir(box.root) == [], "a refused install must not write anything"


@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv (util-linux) to drop root")
def test_refuses_without_root(box):
    result = run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                  "/bin/sh", INSTALL_SH, "server", "--root", box.root])
    assert_refused(box, result, "must run as root")


def test_refuses_without_python3(box):
    for tool in ("id", "dirname"):
        os.symlink(shutil.which(tool), os.path.join(box.bin, tool))
    result = box.install("server", env={"PATH": box.bin}, check=False)
    assert_refused(box, result, "python3 is missing", "apt-get install python3", "opkg")


def test_refuses_an_old_python3(box):
    box.write_script("python3", "#!/bin/sh\necho 3.6\n")
    env = dict(os.environ, PATH=box.bin + ":" + os.environ["PATH"])
    result = box.install("server", env=env, check=False)
    assert_refused(box, result, "Python 3.6", "3.7 or newer")


def test_client_refuses_without_tun(box):
    env = dict(os.environ, MNEDC_TUN_DEV=os.path.join(box.tmp, "no-tun"))
    result = box.install("client", env=env, check=False)
    assert_refused(box, result, "no-tun is missing", "kmod-tun", "stream mode", "listen", "connect")


def light_python(box):
    """A python3 that is OpenWrt's python3-light, also under -I: a venv of this interpreter whose
    site-packages installs the simulation's import hook through a .pth line."""
    import venv
    from tests.light import SIMULATION
    home = os.path.join(box.tmp, "light")
    venv.EnvBuilder(with_pip=False, symlinks=True).create(home)
    site = subprocess.run([os.path.join(home, "bin", "python3"), "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "mnedc-light.pth"), "w") as sink:
        sink.write("import sys; sys.path.insert(0, %r); import sitecustomize\n" % SIMULATION)
    return dict(os.environ, PATH=os.path.join(home, "bin") + ":" + os.environ["PATH"])


def test_install_runs_the_scripts_own_check_on_python3_light(box):
    env = light_python(box)
    plain = read_text(box.config)
    with open(box.config, "a") as sink:
        sink.write("tls = no\n")
    box.install_server(env=env)                         # the plaintext relay needs nothing more
    assert os.path.exists(box.script)
    with open(box.config, "w") as sink:
        sink.write(plain)                               # the default, TLS, needs python3-openssl
    before = read_text(box.path("/etc/mnedc/server.ini"))
    result = box.install_server(env=env, check=False)
    assert result.returncode != 0, result.stdout
    assert "opkg install python3-openssl" in result.stderr, result.stderr
    assert read_text(box.path("/etc/mnedc/server.ini")) == before      # the working config stays


def test_an_upgrade_whose_script_refuses_the_config_changes_nothing(running):
    """The check runs before the script is placed: a new script that would not start with the
    config there must not be left beside a daemon still running the old one."""
    box = running
    script_before = read_text(box.script)
    newer = os.path.join(box.tmp, "newer")
    shutil.copytree(PROJECT, newer, ignore=shutil.ignore_patterns(".git", "__pycache__", "tests", "bench"))
    with open(os.path.join(newer, "mnedc_server.py")) as source:     # a release that dropped a key
        text = source.read().replace('    "restart_window":', '    "restart_window_gone":')
    with open(os.path.join(newer, "mnedc_server.py"), "w") as sink:
        sink.write(text)
    with open(box.path("/etc/mnedc/server.ini"), "a") as sink:
        sink.write("restart_window = 5\n")
    result = run(["/bin/sh", os.path.join(newer, "install.sh"), "server", "--init", "sysv", "--root", box.root])
    assert result.returncode != 0 and "is not a configuration mnedc_server.py can run" in result.stderr, result.stderr
    assert read_text(box.script) == script_before


def test_root_start_is_only_for_the_lsb_init_script(box):
    result = box.install("server", "--init", "procd", "--config", box.config, "--start", check=False)
    assert result.returncode != 0 and "--root --start needs --init sysv" in result.stderr
    assert not os.path.exists(box.path("/etc/init.d/mnedc-server"))


def test_install_refuses_a_broken_config_and_keeps_the_working_one(running):
    pid = running.daemon_pid()
    before = read_text(running.path("/etc/mnedc/server.ini"))
    broken = os.path.join(running.tmp, "typo.ini")
    with open(broken, "w") as sink:
        sink.write(before.replace("subnet = 198.18.0.0/24", "subnet = 198.18.0.1/24"))
    result = running.install("server", "--init", "sysv", "--config", broken, check=False)
    assert result.returncode != 0
    assert "%s is not a configuration mnedc_server.py can run" % broken in result.stderr, result.stderr
    assert "has host bits set" in result.stderr
    assert read_text(running.path("/etc/mnedc/server.ini")) == before
    assert running.daemon_pid() == pid and running.accepts()        # never stopped
    assert not [name for name in os.listdir(running.path("/etc/mnedc")) if name.startswith(".mnedc.")]


def test_install_imports_nothing_from_the_current_directory(box):
    """A configparser.py (or any module) that another user left in the directory install.sh is
    run from must not run as root."""
    marker = os.path.join(box.tmp, "planted-module-ran")
    for module in ("configparser", "importlib", "py_compile", "marshal", "argparse", "mnedc_server"):
        with open(os.path.join(box.decoy, module + ".py"), "w") as sink:
            sink.write("open(%r, 'a').write(%r)\n" % (marker, module + "\n"))
    env = dict(os.environ, PYTHONPATH=box.decoy, PYTHONSTARTUP=os.path.join(box.decoy, "argparse.py"))
    result = run(["/bin/sh", INSTALL_SH, "server", "--init", "sysv", "--config", box.config, "--root", box.root],
                 env=env, cwd=box.decoy)
    assert result.returncode == 0, result.stderr
    assert not os.path.exists(marker), open(marker).read()


@pytest.mark.parametrize("value", ["/opt/a;touch /tmp/mnedc-pwned", "/opt/$(id)", "/opt/`id`", "/opt/a|b",
                                   "/opt/a&b", "/opt/a>b", "/opt/a*", "/opt/a\nb"])
def test_refuses_a_prefix_the_shell_would_read(box, value):
    result = box.install("server", "--init", "sysv", "--prefix", value.replace("\\n", "\n"), check=False)
    assert_refused(box, result, "--root and --prefix may hold only")
    assert not os.path.exists("/tmp/mnedc-pwned")


def test_a_new_config_that_does_not_start_is_replaced_by_the_working_one(running):
    """It passes --check (its port is a number) but the daemon cannot bind it: install.sh puts
    the previous config back, starts the relay again with it, and says so."""
    box = running
    before = read_text(box.path("/etc/mnedc/server.ini"))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        new = os.path.join(box.tmp, "new.ini")
        with open(new, "w") as sink:
            sink.write(before.replace("127.0.0.1:%d" % box.port, "127.0.0.1:%d" % taken.getsockname()[1]))
        env = dict(os.environ, MNEDC_START_WAIT_S="3")
        result = box.install("server", "--init", "sysv", "--config", new, "--start", env=env, check=False)
    finally:
        taken.close()
    assert result.returncode != 0
    assert "did not start with the new configuration, so the previous one is back in %s and running" \
        % box.path("/etc/mnedc/server.ini") in result.stderr, result.stderr
    assert read_text(box.path("/etc/mnedc/server.ini")) == before
    wait_for(box.daemon_pid, "the relay, running again")
    assert wait_for(box.accepts, "the relay to accept on its old port")


def test_refuses_bad_options(box):
    for args in (["server", "--init", "upstart"], ["uninstall", "--prefix", "/opt"],
                 ["server", "--purge"], ["bogus"]):
        result = box.install(*args, check=False)
        assert result.returncode != 0 and result.stderr.startswith("install.sh: "), args
    assert os.listdir(box.root) == []


# ---- 11.-12. shellcheck, dash, busybox -----------------------------------------------------------

@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck is not installed (CI installs it)")
def test_shellcheck(box):
    box.install_server()
    procd_root = os.path.join(box.tmp, "procd-root")
    os.mkdir(procd_root)
    run(["/bin/sh", INSTALL_SH, "server", "--init", "procd", "--root", procd_root])
    scripts = [INSTALL_SH, box.init_script, box.path("/usr/local/sbin/mnedc-watchdog"),
               os.path.join(procd_root, "etc/init.d/mnedc-server")]
    result = run(["shellcheck", "--shell=sh"] + scripts)
    assert result.returncode == 0, result.stdout + result.stderr


def normalized(root):
    """tree(root) without root's name; bytecode holds the script's path and mtime: only its name."""
    return {path: (mode, b"bytecode" if path.endswith(".pyc") else
                   content.replace(root.encode(), b"ROOT") if content else content)
            for path, (mode, content) in tree(root).items()}


@pytest.mark.parametrize("init", ["sysv", "procd"])
def test_install_sh_runs_under_dash_and_busybox(box, init):
    shells = {"dash": ["dash"]}
    if shutil.which("busybox"):
        shells["busybox"] = ["busybox", "sh"]
    trees = {}
    for name, shell in shells.items():
        root = os.path.join(box.tmp, name)
        os.mkdir(root)
        result = run(shell + [INSTALL_SH, "server", "--init", init, "--root", root])
        assert result.returncode == 0, (name, result.stderr)
        trees[name] = normalized(root)
        result = run(shell + [INSTALL_SH, "uninstall", "--purge", "--root", root])
        assert result.returncode == 0 and os.listdir(root) == [], (name, result.stderr)
    assert len(set(map(repr, trees.values()))) == 1, "dash and busybox sh installed different files"
    if "busybox" not in shells:
        pytest.skip("busybox is not installed (CI installs it): checked dash only")


@pytest.mark.skipif(not shutil.which("busybox"), reason="busybox is not installed (CI installs it)")
@pytest.mark.parametrize("start_stop_daemon", [True, False], ids=["busybox-ssd", "no-ssd"])
def test_busybox_only_board(box, start_stop_daemon):
    """Busybox tools alone, as on OpenWrt: its start-stop-daemon, or none (the sh fallback)."""
    busybox = shutil.which("busybox")
    board = os.path.join(box.tmp, "busybox-bin")
    os.mkdir(board)
    applets = run([busybox, "--list"]).stdout.split()
    for applet in applets:
        if applet != "start-stop-daemon" or start_stop_daemon:
            os.symlink(busybox, os.path.join(board, applet))
    if "flock" not in applets:            # Debian's busybox lacks it; OpenWrt's has it
        os.symlink(shutil.which("flock"), os.path.join(board, "flock"))
    os.symlink(sys.executable, os.path.join(box.bin, "python3"))
    env = {"PATH": box.bin + ":" + board}

    result = run([busybox, "sh", INSTALL_SH, "server", "--init", "sysv", "--config", box.config,
                  "--root", box.root], env=env)
    assert result.returncode == 0, result.stderr
    start = run([busybox, "sh", box.init_script, "start"], env=env, cwd=box.decoy)
    assert start.returncode == 0, start.stdout + start.stderr
    old = wait_for(box.daemon_pid, "the server started without start-stop-daemon")
    wait_for(box.accepts, "the server to accept TCP")
    assert environ(old)["PYTHONPATH"] == box.path("/usr/local/sbin")

    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not alive(old), "the killed server to die")
    watchdog = box.path("/usr/local/sbin/mnedc-watchdog")
    result = run([busybox, "sh", watchdog, "mnedc-server"], env=env, cwd=box.decoy)
    assert result.returncode == 0, result.stderr
    new = box.daemon_pid()
    assert new and new != old and "is gone" in box.logged()

    assert run([busybox, "sh", box.init_script, "stop"], env=env).returncode == 0
    assert not alive(new)
    assert run([busybox, "sh", box.init_script, "status"], env=env).returncode == 3
    result = run([busybox, "sh", INSTALL_SH, "uninstall", "--purge", "--root", box.root], env=env)
    assert result.returncode == 0 and os.listdir(box.root) == [], result.stderr


# ---- 13. certs: a CA, a server and client certificates (openssl; no root needed) --------------

def make_certs(directory, *args, shell=("dash",), env=None):
    return run(list(shell) + [INSTALL_SH, "certs", "--dir", directory] + list(args), env=env)


def openssl(*args):
    result = run(["openssl"] + list(args))
    assert result.returncode == 0, result.stderr
    return result.stdout


def cert_text(path):
    return openssl("x509", "-in", path, "-noout", "-text")


def extension(text, name):
    """The value of the X509v3 extension `name` in openssl's text form, flags and value."""
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if line.strip().startswith("X509v3 %s:" % name):
            return line.split(":", 1)[1].strip(), lines[number + 1].strip()
    return None


def subject_cn(path):
    subject = openssl("x509", "-in", path, "-noout", "-subject", "-nameopt", "RFC2253").strip()
    assert subject.startswith("subject=CN="), subject
    return subject[len("subject=CN="):]


def validity_days(path):
    dates = dict(line.split("=", 1) for line in openssl("x509", "-in", path, "-noout", "-dates").splitlines())
    return (ssl.cert_time_to_seconds(dates["notAfter"]) - ssl.cert_time_to_seconds(dates["notBefore"])) / 86400


def assert_certs_refused(result, *phrases):
    assert result.returncode == 1, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("install.sh: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and localhost, and clients dev-a and dev.b_2."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed (test.sh installs it)")
    directory = os.path.join(str(tmp_path_factory.mktemp("certs")), "new", "pki")
    result = make_certs(directory, "--server-name", "127.0.0.1", "--server-name", "localhost",
                        "--client", "dev-a", "--client", "dev.b_2")
    assert result.returncode == 0, result.stderr
    return directory, result.stdout


def test_certs_files_and_modes(pki):
    directory, _ = pki
    assert sorted(os.listdir(directory)) == [
        "ca.key", "ca.pem", "client-dev-a.key", "client-dev-a.pem", "client-dev.b_2.key",
        "client-dev.b_2.pem", "server.key", "server.pem"]          # and no temporary file left
    assert os.stat(directory).st_mode & 0o777 == 0o700
    for name in os.listdir(directory):
        expected = 0o600 if name.endswith(".key") else 0o644
        assert os.stat(os.path.join(directory, name)).st_mode & 0o777 == expected, name


def test_certs_verify_against_their_ca(pki):
    directory, _ = pki
    ca = os.path.join(directory, "ca.pem")
    for name, purpose in [("server", "sslserver"), ("client-dev-a", "sslclient"), ("client-dev.b_2", "sslclient")]:
        path = os.path.join(directory, name + ".pem")
        output = openssl("verify", "-x509_strict", "-purpose", purpose, "-CAfile", ca, path)
        assert output.strip() == path + ": OK"
    wrong = run(["openssl", "verify", "-purpose", "sslserver", "-CAfile", ca, os.path.join(directory, "client-dev-a.pem")])
    assert wrong.returncode != 0, "a client certificate must not serve as a server's"


def test_certs_names_and_usages(pki):
    directory, stdout = pki
    ca = cert_text(os.path.join(directory, "ca.pem"))
    assert subject_cn(os.path.join(directory, "ca.pem")).startswith("MNEDC CA ")
    assert extension(ca, "Basic Constraints") == ("critical", "CA:TRUE, pathlen:0")
    assert extension(ca, "Key Usage") == ("critical", "Certificate Sign, CRL Sign")
    assert "prime256v1" in ca and "ecdsa-with-SHA256" in ca

    server = cert_text(os.path.join(directory, "server.pem"))
    assert subject_cn(os.path.join(directory, "server.pem")) == "127.0.0.1"      # the first name
    assert extension(server, "Subject Alternative Name") == ("", "IP Address:127.0.0.1, DNS:localhost")
    assert extension(server, "Extended Key Usage") == ("", "TLS Web Server Authentication")
    assert extension(server, "Basic Constraints") == ("critical", "CA:FALSE")
    assert extension(server, "Authority Key Identifier") is not None
    assert "prime256v1" in server

    for device_id in ("dev-a", "dev.b_2"):
        path = os.path.join(directory, "client-%s.pem" % device_id)
        client = cert_text(path)
        assert subject_cn(path) == device_id
        assert extension(client, "Extended Key Usage") == ("", "TLS Web Client Authentication")
        assert extension(client, "Subject Alternative Name") is None
        assert round(validity_days(path)) == 3650

    for line in ["tls = yes", "tls_cert = %s/server.pem" % directory, "tls_key = %s/server.key" % directory,
                 "tls_client_ca = %s/ca.pem" % directory, "tls_ca = %s/ca.pem" % directory,
                 "device_id = dev-a", "tls_cert = %s/client-dev-a.pem" % directory,
                 "tls_key = %s/client-dev.b_2.key" % directory]:
        assert "\n%s\n" % line in stdout, line
    assert "\n[client]\n" not in stdout and "\n[server]\n" not in stdout   # a second header breaks the INI


def pasted_block(text, heading):
    """The key = value lines that follow the paragraph starting with heading, as a user copies them."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if " = " in line and not line.startswith(" "))
    block = []
    for line in lines[start:]:
        if not line.strip():
            break
        block.append(line)
    return "\n".join(block) + "\n"


def test_the_printed_config_lines_paste_into_the_shipped_configs(pki, tmp_path):
    """Both the server's first-start lines and those of install.sh certs, appended as they are to
    the shipped client-config.ini (and to a server.ini), give configs the daemons accept."""
    directory, stdout = pki
    from tests.wire_peer import first_start_on_a_terminal
    printed, port, _ = first_start_on_a_terminal(tmp_path / "state")     # as an operator sees it
    shipped = open(os.path.join(PROJECT, "client-config.ini")).read()
    client = tmp_path / "client-config.ini"
    client.write_text(shipped + pasted_block(printed, "generated a new network secret")
                      + pasted_block(stdout, "Client dev-a:"))
    check = run([sys.executable, os.path.join(PROJECT, "mnedc_client.py"), "-c", str(client), "--check"])
    assert check.returncode == 0, check.stderr
    assert "relay 127.0.0.1:%d, device dev-a, TLS" % port in check.stdout, check.stdout
    server = tmp_path / "server.ini"
    server.write_text("[server]\nstate_dir = %s\n" % (tmp_path / "state") + pasted_block(stdout, "Server: add"))
    check = run([sys.executable, os.path.join(PROJECT, "mnedc_server.py"), "-c", str(server), "--check"])
    assert check.returncode == 0 and ", TLS" in check.stdout, check.stderr


def common_name(certificate):
    return dict(pair[0] for pair in certificate["subject"])["commonName"]


def tls_handshake(server_dir, trusted_dir, client_dir, device_id, hostname="127.0.0.1"):
    """One mutual-TLS handshake over 127.0.0.1, and what each side made of it: the peer's CN, or
    the error it met. The server uses server_dir's certificate and requires a client certificate
    from server_dir's CA; the client trusts trusted_dir's CA and presents client_dir's
    certificate of device_id."""
    def pem(directory, name):
        return os.path.join(directory, name)

    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(pem(server_dir, "server.pem"), pem(server_dir, "server.key"))
    server_context.verify_mode = ssl.CERT_REQUIRED
    server_context.load_verify_locations(pem(server_dir, "ca.pem"))
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)      # verifies the name, requires a cert
    client_context.load_verify_locations(pem(trusted_dir, "ca.pem"))
    client_context.load_cert_chain(pem(client_dir, "client-%s.pem" % device_id),
                                   pem(client_dir, "client-%s.key" % device_id))
    for context in (server_context, client_context):
        context.verify_flags |= ssl.VERIFY_X509_STRICT              # as Python 3.13's defaults do

    outcome = {}
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(WAIT_S)

    def serve():
        try:
            connection, _ = listener.accept()
            connection.settimeout(WAIT_S)
            with server_context.wrap_socket(connection, server_side=True) as tls:
                outcome["server"] = common_name(tls.getpeercert())
                tls.sendall(b"ok")
        except OSError as error:                  # ssl.SSLError is an OSError
            outcome["server"] = error

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=WAIT_S) as raw:
            with client_context.wrap_socket(raw, server_hostname=hostname) as tls:
                reply = tls.recv(2)               # TLS 1.3: a refused client certificate shows here
                outcome["client"] = common_name(tls.getpeercert()) if reply == b"ok" else EOFError(reply)
    except OSError as error:
        outcome["client"] = error
    finally:
        thread.join(WAIT_S)
        listener.close()
    assert not thread.is_alive()
    return outcome


def test_certs_mutual_tls_handshake(pki):
    directory, _ = pki
    for hostname in ("127.0.0.1", "localhost"):
        for device_id in ("dev-a", "dev.b_2"):
            outcome = tls_handshake(directory, directory, directory, device_id, hostname)
            assert outcome == {"server": device_id, "client": "127.0.0.1"}, (hostname, outcome)
    outcome = tls_handshake(directory, directory, directory, "dev-a", "not-in-the-cert.example")
    assert isinstance(outcome["client"], ssl.SSLError), outcome


def test_certs_of_another_ca_are_refused(pki, tmp_path):
    directory, _ = pki
    other = str(tmp_path / "other")
    result = make_certs(other, "--server-name", "127.0.0.1", "--client", "dev-a")
    assert result.returncode == 0, result.stderr
    assert open(os.path.join(other, "ca.pem")).read() != open(os.path.join(directory, "ca.pem")).read()

    outcome = tls_handshake(directory, directory, other, "dev-a")      # a stranger's client cert
    assert isinstance(outcome["server"], ssl.SSLError), outcome
    assert "certificate verify failed" in str(outcome["server"])
    assert isinstance(outcome["client"], (OSError, EOFError)), outcome

    outcome = tls_handshake(directory, other, other, "dev-a")          # a stranger's server cert
    assert isinstance(outcome["client"], ssl.SSLError), outcome
    assert "certificate verify failed" in str(outcome["client"])


def test_certs_rerun_keeps_every_file_and_adds_what_is_missing(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed (test.sh installs it)")
    directory = str(tmp_path / "pki")
    assert make_certs(directory, "--server-name", "127.0.0.1", "--client", "one").returncode == 0
    first = tree(directory)

    result = make_certs(directory, "--server-name", "other.example", "--client", "one", "--client", "two")
    assert result.returncode == 0, result.stderr
    second = tree(directory)
    assert {path: second[path] for path in first} == first, "an existing file changed"
    assert sorted(set(second) - set(first)) == ["client-two.key", "client-two.pem"]
    assert "keeping the CA %s/ca.pem" % directory in result.stdout
    assert "keeping %s/server.pem and server.key, for 127.0.0.1 (remove both" % directory in result.stdout
    assert "keeping %s/client-one.pem" % directory in result.stdout
    assert "made %s/client-two.pem" % directory in result.stdout
    assert "made the CA" not in result.stdout
    assert openssl("verify", "-CAfile", os.path.join(directory, "ca.pem"),
                   os.path.join(directory, "client-two.pem")).strip().endswith(": OK")

    result = make_certs(directory)                    # nothing to add: settings for every client
    assert result.returncode == 0, result.stderr
    assert tree(directory) == second
    assert "device_id = one\n" in result.stdout and "device_id = two\n" in result.stdout


def test_certs_days_and_the_default_server_name(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed (test.sh installs it)")
    directory = str(tmp_path / "pki")
    result = make_certs(directory, "--days", "30")
    assert result.returncode == 0, result.stderr
    hostname = os.uname().nodename
    server = os.path.join(directory, "server.pem")
    assert subject_cn(server) == hostname
    assert extension(cert_text(server), "Subject Alternative Name")[1] == "DNS:" + hostname
    assert round(validity_days(server)) == 30
    assert "install.sh certs --dir %s --client DEVICE_ID" % directory in result.stdout


def test_certs_refusals(tmp_path):
    directory = str(tmp_path / "pki")
    for args, phrases in [
            (["--client", "bad/id"], ["--client 'bad/id'", "device_id", "1 to 64", "A-Z a-z 0-9 . _ -"]),
            (["--client", "x" * 65], ["device_id", "1 to 64"]),
            (["--client", "two words"], ["device_id"]),
            (["--client", "caf\u00e9"], ["device_id"]),
            (["--client"], ["--client needs a value"]),
            (["--server-name", "300.1.2.3"], ["--server-name '300.1.2.3'"]),
            (["--server-name", "*.example.com"], ["DNS name"]),
            (["--server-name", "a b"], ["DNS name"]),
            (["--server-name", "a" * 70 + ".example"], ["CN, at most 64 characters"]),
            (["--days", "0"], ["--days 0"]),
            (["--days", "ten"], ["--days ten"]),
            (["--root", "/"], ["unknown option --root for certs"])]:
        result = make_certs(directory, *args)
        assert_certs_refused(result, *phrases)
        assert not os.path.exists(directory), "a refused certs must not write anything"
    assert_certs_refused(run(["dash", INSTALL_SH, "certs", "--client", "a"]), "certs needs --dir DIR")


@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl is not installed (test.sh installs it)")
def test_certs_refuse_a_directory_another_user_owns_or_may_write(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directories other owners")
    for name, mode, owner, phrase in [("shared", 0o777, 0, "is writable by others"),
                                      ("group", 0o770, 0, "is writable by others"),
                                      ("theirs", 0o700, 65534, "belongs to uid 65534")]:
        directory = str(tmp_path / name)
        os.mkdir(directory)
        os.chmod(directory, mode)
        os.chown(directory, owner, 0)
        result = make_certs(directory, "--server-name", "127.0.0.1")
        assert_certs_refused(result, directory, phrase)
        assert os.listdir(directory) == [], "nothing may be written there, CA key included"
    # through a symlink of one's own to such a directory, and below a parent others may write
    os.symlink(str(tmp_path / "shared"), str(tmp_path / "mine"))
    assert_certs_refused(make_certs(str(tmp_path / "mine"), "--server-name", "127.0.0.1"),
                         str(tmp_path / "shared"), "is writable by others")
    os.makedirs(str(tmp_path / "shared" / "pki"), mode=0o700)
    assert_certs_refused(make_certs(str(tmp_path / "shared" / "pki"), "--server-name", "127.0.0.1"),
                         "lies in %s, which others may write" % (tmp_path / "shared"))
    assert os.listdir(str(tmp_path / "shared" / "pki")) == []


@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl is not installed (test.sh installs it)")
def test_certs_never_replace_half_a_pair(tmp_path):
    directory = str(tmp_path / "pki")
    os.mkdir(directory)
    with open(os.path.join(directory, "client-x.key"), "w") as sink:
        sink.write("mine\n")
    result = make_certs(directory, "--server-name", "127.0.0.1", "--client", "x")
    assert_certs_refused(result, "only one of client-x.pem and client-x.key")
    assert os.listdir(directory) == ["client-x.key"]
    assert open(os.path.join(directory, "client-x.key")).read() == "mine\n"

    os.unlink(os.path.join(directory, "client-x.key"))
    assert make_certs(directory, "--server-name", "127.0.0.1").returncode == 0
    os.rename(os.path.join(directory, "ca.key"), os.path.join(str(tmp_path), "ca.key"))
    before = tree(directory)
    result = make_certs(directory, "--client", "x")                 # the CA key is kept offline
    assert_certs_refused(result, "ca.key is missing", "client-x.pem cannot be signed")
    assert tree(directory) == before
    result = make_certs(directory)                                  # nothing to sign: fine
    assert result.returncode == 0 and "its ca.key is not here" in result.stdout, result.stderr


def shells():
    found = [["dash"]]
    if shutil.which("busybox"):
        found.append(["busybox", "sh"])
    return found


@pytest.mark.parametrize("shell", shells(), ids=lambda shell: shell[0])
def test_certs_without_openssl_names_the_package(tmp_path, shell):
    bin_dir = str(tmp_path / "bin")
    os.mkdir(bin_dir)
    for tool in ("dirname", "uname", "mkdir", "chmod", "mktemp", "mv", "rm", "cat", "sed", "tail",
                 "tr", "cut", "date"):
        os.symlink(shutil.which(tool), os.path.join(bin_dir, tool))
    directory = str(tmp_path / "pki")
    result = run([shutil.which(shell[0])] + shell[1:] + [INSTALL_SH, "certs", "--dir", directory,
                                                         "--client", "dev-a"], env={"PATH": bin_dir})
    assert_certs_refused(result, "openssl is missing", "apt-get install openssl", "opkg install openssl-util")
    assert not os.path.exists(directory)


@pytest.mark.skipif(not shutil.which("busybox"), reason="busybox is not installed (CI installs it)")
@pytest.mark.skipif(not shutil.which("openssl"), reason="openssl is not installed (test.sh installs it)")
def test_certs_on_a_busybox_board(tmp_path):
    """Busybox sh and applets alone, plus openssl, as on OpenWrt with openssl-util."""
    busybox = shutil.which("busybox")
    board = str(tmp_path / "busybox-bin")
    os.mkdir(board)
    for applet in run([busybox, "--list"]).stdout.split():
        os.symlink(busybox, os.path.join(board, applet))
    os.symlink(shutil.which("openssl"), os.path.join(board, "openssl"))
    directory = str(tmp_path / "pki")
    argv = [busybox, "sh", INSTALL_SH, "certs", "--dir", directory, "--server-name", "10.0.0.1",
            "--server-name", "router.lan", "--client", "dev-a"]
    result = run(argv, env={"PATH": board})
    assert result.returncode == 0, result.stderr
    assert extension(cert_text(os.path.join(directory, "server.pem")), "Subject Alternative Name")[1] == \
        "IP Address:10.0.0.1, DNS:router.lan"
    for name in ("server", "client-dev-a"):
        path = os.path.join(directory, name + ".pem")
        assert openssl("verify", "-x509_strict", "-CAfile", os.path.join(directory, "ca.pem"), path).strip() == path + ": OK"
    assert sorted(os.listdir(directory)) == ["ca.key", "ca.pem", "client-dev-a.key", "client-dev-a.pem",
                                             "server.key", "server.pem"]
    again = run(argv + ["--client", "dev-b"], env={"PATH": board})
    assert again.returncode == 0 and "keeping" in again.stdout, again.stderr
