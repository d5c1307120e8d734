#!/bin/sh
# install.sh: install the MNEDC relay server or a TUN client as a service, with a cron watchdog.
#
#   ./install.sh server|client [--config FILE] [--prefix DIR] [--root DIR]
#                              [--init procd|sysv|systemd] [--no-start] [--start]
#   ./install.sh uninstall [--root DIR] [--purge]
#   ./install.sh certs --dir DIR [--server-name NAME]... [--client DEVICE_ID]... [--days N]
#
# What it installs (paths for --prefix /usr/local, the default):
#   /usr/local/sbin/mnedc_server.py or mnedc_client.py   the script, copied from beside install.sh
#   /usr/local/sbin/__pycache__/mnedc_*.cpython-3NN.pyc  its bytecode, compiled by the python3
#                                                        the service runs (3NN: its version)
#   /etc/mnedc/server.ini or client-config.ini           --config FILE; else kept if present; else
#                                                        a minimal server.ini / the client template
#   /var/lib/mnedc (0700)                                state: leases, generated secret
#                                                        (OpenWrt: /etc/mnedc/state; /var is RAM)
#   /var/run/mnedc/NAME.pid, NAME.heartbeat              written by the daemon itself, like its
#                                                        control socket (server.sock, client.sock)
#   the service NAME (mnedc-server, mnedc-client)        procd or LSB script in /etc/init.d, or a
#                                                        systemd unit in /etc/systemd/system
#   /usr/local/sbin/mnedc-watchdog, run every minute     Debian: /etc/cron.d/mnedc;
#                                                        OpenWrt: /etc/crontabs/root
#   /etc/mnedc/install.manifest                          what to remove again (uninstall)
#   /etc/avahi/avahi-daemon.conf, where avahi is there:  allow-point-to-point=yes, so that avahi
#                                                        serves mDNS on the TUN (uninstall undoes it)
#   client, where dnsmasq is there: OpenWrt's uci        its servers file, where the client names
#   dhcp.@dnsmasq[0].serversfile, else /etc/dnsmasq.d/mnedc   the relay for the domain (undone too)
#
# The service runs the script as a module, python3 -u -m mnedc_server (or mnedc_client), with
# PYTHONPATH=/usr/local/sbin for that process only, so that Python loads the bytecode instead of
# compiling the whole script at every start: 5 to 7 MB less peak memory (VmHWM), which
# small boards feel. Python checks the bytecode against the script's mtime and size at each start
# and compiles afresh (writing a new .pyc) when the script changed or python3 was upgraded.
#
# --root DIR installs into DIR as if it were /: every path written into the generated files points
# inside DIR, nothing outside DIR is touched, and nothing is enabled or started (implies
# --no-start, unless --start: then the service is started through DIR's init script, as on a real
# install); the installed tree runs for real (tests use it). MNEDC_TUN_DEV overrides the TUN
# device checked for a client (default /dev/net/tun), MNEDC_START_WAIT_S how long the LSB init
# script waits for the daemon to come up (30 s). A new --config that does not start is replaced
# by the previous one, which is started again. Re-running is safe; uninstall keeps the state
# directory (and the configuration) unless --purge.
#
# certs makes the certificates for TLS with the openssl command (Debian: openssl; OpenWrt:
# openssl-util), needs no root and writes only in DIR (created 0700):
#   ca.pem, ca.key                  the CA (EC P-256, self-signed), made unless it is there
#   server.pem, server.key          the server's, for every --server-name: IP addresses and DNS
#                                   names in subjectAltName, CN the first (default: this host's
#                                   name); extendedKeyUsage serverAuth
#   client-DEVICE_ID.pem, .key      one per --client, CN = DEVICE_ID (the server checks it against
#                                   the device_id the client presents); extendedKeyUsage clientAuth
# Keys are 0600, certificates 0644 and valid for --days (3650). An existing file is never
# replaced: running it again only adds what is missing. It ends with the lines for the configs:
# [server] tls, tls_cert, tls_key, tls_client_ca; [client] tls, tls_ca, tls_cert, tls_key.
set -u
umask 022

SRC_DIR=$(cd "$(dirname "$0")" && pwd) || exit 1
PYTHON_MIN_MAJOR=3
PYTHON_MIN_MINOR=7
TUN_DEV=${MNEDC_TUN_DEV:-/dev/net/tun}
CERTS_USAGE="install.sh certs --dir DIR [--server-name NAME]... [--client DEVICE_ID]... [--days N]"
USAGE="usage: install.sh server|client [--config FILE] [--prefix DIR] [--root DIR [--start]] [--init procd|sysv|systemd] [--no-start]
       install.sh uninstall [--root DIR] [--purge]
       $CERTS_USAGE"

ROOT=''             # '' is the real /
KEPT_CONFIG='kept-config'   # in the state directory: the configuration a plain uninstall kept
PREFIX=/usr/local
INIT=''
CONFIG_SRC=''
START=yes
PURGE=no
CHANGED=no          # did this run change an installed file? then a running service restarts
NEW_MANIFEST=''     # manifest lines this run adds, one per line
TEMP_FILES=''
MANIFEST=''         # set_paths sets it: ETC_DIR/install.manifest
PREVIOUS_CONFIG=''  # a copy of the config this run replaced, put back if the new one does not start
JOURNALED=no        # yes once remember() writes straight to the manifest on disk; off in uninstall
CERT_DIR=''         # certs --dir
CERT_DAYS=3650
SERVER_NAMES=''     # certs --server-name, blank-separated (each checked: no blanks, no globs)
CLIENT_IDS=''       # certs --client, likewise

die() {
	echo "install.sh: $*" >&2
	exit 1
}

note() {
	echo "install.sh: $*"
}

cleanup() {
	for temp in $TEMP_FILES; do
		rm -f "$temp"
	done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Shell-quote one value for the generated scripts: it is pasted between single quotes.
shquote() {
	printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"
}

# ---- checks: refuse early, in one line that says what to do -------------------------------

check_root() {
	[ "$(id -u)" = 0 ] || die "must run as root (uid 0): run it with sudo, or as root on the router"
}

# Run PYTHON as root safely: from / and isolated (-I: no PYTHON* variables, no user site, and
# neither the current directory nor a script's own directory first on sys.path), so that no
# module another user left there (a configparser.py) is imported.
py() {
	(cd / && "$PYTHON" -I "$@")
}

# Sets PYTHON to the absolute interpreter path the service will run (boot has no user PATH).
check_python() {
	found=$(command -v python3) ||
		die "python3 is missing: install it (Debian: apt-get install python3; OpenWrt: opkg update && opkg install python3-light)"
	version=$(cd / && "$found" -I -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
	major=${version%%.*}
	minor=${version#*.}
	case $major.$minor in
	[0-9]*.[0-9]*) ;;
	*) die "$found does not run (it printed '$version' for its version): install python3 3.7 or newer" ;;
	esac
	if [ "$major" -lt "$PYTHON_MIN_MAJOR" ] ||
		{ [ "$major" -eq "$PYTHON_MIN_MAJOR" ] && [ "$minor" -lt "$PYTHON_MIN_MINOR" ]; }; then
		die "$found is Python $version; MNEDC needs 3.7 or newer: upgrade python3 or put a newer one first on PATH"
	fi
	PYTHON=$(cd / && "$found" -I -c 'import sys; print(sys.executable)' 2>/dev/null)
	[ -n "$PYTHON" ] || PYTHON=$found
}

# Import the script (importing has no side effects) to catch a python3 without the modules it
# needs, e.g. Debian's python3-minimal has no hmac.
check_modules() {
	output=$(py -B -c 'import sys; sys.path.insert(0, sys.argv[1]); __import__(sys.argv[2])' \
		"$SRC_DIR" "$MODULE" 2>&1) ||
		die "$PYTHON cannot load $SCRIPT ($(printf '%s\n' "$output" | tail -n 1)): install the full python3 (Debian: apt-get install python3; OpenWrt: opkg install python3-light)"
}

check_tun() {
	[ -c "$TUN_DEV" ] ||
		die "$TUN_DEV is missing, and the client needs TUN: load it (modprobe tun; OpenWrt: opkg install kmod-tun), or use stream mode, which needs no TUN: python3 mnedc_client.py -c CONF listen|connect (README)"
}

# ---- paths -----------------------------------------------------------------------------------

detect_init() {
	if [ -f "$ROOT/etc/openwrt_release" ] && [ -f "$ROOT/etc/rc.common" ]; then
		echo procd
	elif [ -d "$ROOT/run/systemd/system" ]; then
		echo systemd
	else
		echo sysv
	fi
}

set_paths() {
	SBIN_DIR=$ROOT$PREFIX/sbin
	ETC_DIR=$ROOT/etc/mnedc
	INIT_DIR=$ROOT/etc/init.d
	UNIT_DIR=$ROOT/etc/systemd/system
	RUN_DIR=$ROOT/var/run/mnedc
	MANIFEST=$ETC_DIR/install.manifest
	WATCHDOG=$SBIN_DIR/mnedc-watchdog
	SYSUPGRADE=$ROOT/etc/sysupgrade.conf
	if [ "$INIT" = procd ]; then
		STATE_DIR=$ETC_DIR/state                # OpenWrt's /var is in RAM: keep state on flash
		CRON_FILE=$ROOT/etc/crontabs/root
	else
		STATE_DIR=$ROOT/var/lib/mnedc
		CRON_FILE=$ROOT/etc/cron.d/mnedc
	fi
	if [ -n "${NAME:-}" ]; then
		CONFIG=$ETC_DIR/$CONFIG_NAME
		PIDFILE=$RUN_DIR/$NAME.pid
		HEARTBEAT=$RUN_DIR/$NAME.heartbeat
	fi
}

set_service() {
	case $1 in
	server)
		NAME=mnedc-server SCRIPT=mnedc_server.py MODULE=mnedc_server CONFIG_NAME=server.ini
		TITLE="MNEDC relay server"
		;;
	client)
		NAME=mnedc-client SCRIPT=mnedc_client.py MODULE=mnedc_client CONFIG_NAME=client-config.ini
		TITLE="MNEDC client (TUN)"
		;;
	esac
}

# ---- the manifest: what install added, so that uninstall removes exactly that ----------------
# Lines: "service NAME INIT PREFIX", "file PATH", "dir PATH" (created by install, removed when
# empty), "bytecode PATH" (the script's __pycache__/NAME.*.pyc, of any Python version), "state
# PATH", "cron PATH", "sysupgrade PATH", "avahi PATH" (our allow-point-to-point line). PATH is
# relative to --root.

# Record $1 ("file /etc/...", "dir ...", "temp ...") for uninstall, in memory and at once in the
# manifest on disk: callers remember a path before they place it, so an install killed half-way
# (kill -9, a power cut) leaves nothing uninstall cannot see. Until ETC_DIR exists the lines
# wait in NEW_MANIFEST and go out with the first one that can be written.
remember() {
	NEW_MANIFEST="$NEW_MANIFEST$1
"
	case $JOURNALED in
	yes) printf '%s\n' "$1" >>"$MANIFEST" || die "cannot write $MANIFEST" ;;
	no)
		if [ -n "$MANIFEST" ] && [ -d "$ETC_DIR" ]; then
			printf '%s' "$NEW_MANIFEST" >>"$MANIFEST" || die "cannot write $MANIFEST"
			JOURNALED=yes
		fi
		;;
	esac                                # off: uninstall, which removes the manifest
}

rel() {
	printf '%s' "${1#"$ROOT"}"
}

write_manifest() {
	new_temp "$MANIFEST"
	{
		[ -f "$MANIFEST" ] && grep -v "^service $NAME " "$MANIFEST"
		printf '%s' "$NEW_MANIFEST"
	} | awk 'NF && $1 != "temp" && !seen[$0]++' >"$TEMP"
	{ chmod 644 "$TEMP" && mv -f "$TEMP" "$MANIFEST"; } || die "cannot write $MANIFEST"
}

# TEMP: a new temporary file beside TARGET, removed on exit unless it was moved into place.
new_temp() {
	TEMP=$(mktemp "$(dirname "$1")/.mnedc.XXXXXX") || die "cannot write in $(dirname "$1")"
	TEMP_FILES="$TEMP_FILES $TEMP"
	remember "temp $(rel "$TEMP")"
}

# mkdir -p that remembers each directory it created.
make_dir() {
	[ -d "$1" ] && return 0
	make_dir "$(dirname "$1")"
	remember "dir $(rel "$1")"
	mkdir "$1" || die "cannot create $1"
}

# Put SOURCE at TARGET with MODE, atomically; CHANGED=yes if the content differs.
place_file() {
	make_dir "$(dirname "$2")"
	if ! cmp -s "$1" "$2" 2>/dev/null; then
		new_temp "$2"
		{ cp "$1" "$TEMP" && chmod "$3" "$TEMP" && mv -f "$TEMP" "$2"; } || die "cannot write $2"
		CHANGED=yes
	fi
	chmod "$3" "$2" || die "cannot chmod $2"
}

# place_file, and uninstall removes TARGET.
put_file() {
	remember "file $(rel "$2")"
	place_file "$@"
}

# Write the output of the function GENERATOR to TARGET with MODE (through put_file).
put_generated() {
	make_dir "$(dirname "$2")"
	new_temp "$2"
	"$1" >"$TEMP" || die "cannot write $2"
	put_file "$TEMP" "$2" "$3"
}

# ---- generated files ---------------------------------------------------------------------------

server_ini() {
	cat <<EOF
# MNEDC relay server, written by install.sh. Every key: python3 mnedc_server.py --help
# At its first start the server generates the network secret in state_dir/secret and its TLS
# certificate (every link is TLS by default), and prints the lines each client needs
# (server = ..., secret = ..., server_pin = ...).
[server]
listen = 0.0.0.0:3334
subnet = 10.0.0.0/24
state_dir = $STATE_DIR
EOF
}

# The control socket (status, kick) lives in the run directory, which is where the daemons put
# it by default, and inside DIR with --root. @CONTROL@ in a command line becomes the flag.
detect_control() {
	CONTROL=$RUN_DIR/${NAME#mnedc-}.sock
}

fill_control() {
	if [ "${1:-}" = literal ]; then
		sed "s%@CONTROL@% --control $CONTROL%"
	else
		# shellcheck disable=SC2016 # "$CONTROL" is expanded by the generated script
		sed 's%@CONTROL@% --control "$CONTROL"%'
	fi
}

# The pid check of the generated scripts (install.sh has its own, pid_runs). The daemon's
# /proc/PID/cmdline, one argument a line, must run "-m MODULE" (or SBIN_DIR/MODULE.py: that is how
# install.sh started it before it ran modules, so a daemon from then is stopped on an upgrade) with
# our pidfile, which tells this installation's daemon from another one (--root) and from whatever
# process got the pid of a dead daemon.
runs_daemon_function() {
	cat <<'EOF'
# True if process $1 is this daemon: /proc says so, not just kill -0 (pids get reused). Its
# owner too: any user can start a process with the daemon's command line after a crash.
runs_daemon() {
	awk '$1 == "Uid:" { exit $2 != 0 }' "/proc/$1/status" 2>/dev/null || return 1
	tr '\000' '\n' <"/proc/$1/cmdline" 2>/dev/null |
		awk -v module="$MODULE" -v script="$SBIN_DIR/$MODULE.py" -v pidfile="$PIDFILE" '
			(previous == "-m" && $0 == module) || $0 == script { runs = 1 }
			previous == "--pidfile" && $0 == pidfile { ours = 1 }
			{ previous = $0 }
			END { exit !(runs && ours) }'
}
EOF
}

# The variables every generated script starts with. The daemon runs as "$PYTHON -u -m $MODULE"
# with PYTHONPATH=$SBIN_DIR (see the top of this file).
script_settings() {
	echo "NAME=$NAME"
	echo "PYTHON=$(shquote "$PYTHON")"
	echo "SBIN_DIR=$(shquote "$SBIN_DIR")"
	echo "MODULE=$MODULE"
	echo "CONFIG=$(shquote "$CONFIG")"
	echo "RUN_DIR=$(shquote "$RUN_DIR")"
	echo "CONTROL=$(shquote "$CONTROL")"
	cat <<'EOF'
PIDFILE=$RUN_DIR/$NAME.pid
HEARTBEAT=$RUN_DIR/$NAME.heartbeat
EOF
}

sysv_script() {
	{
		cat <<EOF
#!/bin/sh
### BEGIN INIT INFO
# Provides:          $NAME
# Required-Start:    \$network \$remote_fs \$syslog
# Required-Stop:     \$network \$remote_fs \$syslog
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: $TITLE
### END INIT INFO
EOF
		cat <<'EOF'
# Written by install.sh. The daemon runs as the module MODULE with PYTHONPATH=SBIN_DIR, so that
# Python loads the bytecode install.sh compiled into SBIN_DIR/__pycache__ (and refreshes it if the
# script or python3 changed) instead of compiling the script at every start, which costs memory.
# It writes its own pidfile and touches its heartbeat file every 5 s; the cron watchdog
# (mnedc-watchdog) reads both. stop leaves the marker NAME.stopped so that the watchdog does not
# undo it; start removes it. Logs: syslog, ident mnedc-server/-client.
set -u
EOF
		script_settings
		cat <<'EOF'
STOPPED=$RUN_DIR/$NAME.stopped
START_WAIT_S=${MNEDC_START_WAIT_S:-30}
STOP_WAIT_S=10

EOF
		runs_daemon_function
		cat <<'EOF'

# Print the daemon's pid, if the pidfile names a live daemon.
running_pid() {
	pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
	case $pid in '' | *[!0-9]*) return 1 ;; esac
	runs_daemon "$pid" && echo "$pid"
}

nap() {
	sleep 0.2 2>/dev/null || sleep 1
}

do_start() {
	if pid=$(running_pid); then
		echo "$NAME is already running (pid $pid)"
		return 0
	fi
	mkdir -p "$RUN_DIR" && rm -f "$PIDFILE" "$STOPPED" || return 1
	# From /: python3 -m puts the current directory first on sys.path, and nothing there may
	# stand in for the module or the standard library. start-stop-daemon passes PYTHONPATH on.
	cd / || return 1
	PYTHONPATH=$SBIN_DIR
	export PYTHONPATH
	set -- -u -m "$MODULE" -c "$CONFIG" --syslog --pidfile "$PIDFILE" --heartbeat "$HEARTBEAT"@CONTROL@
	if command -v start-stop-daemon >/dev/null 2>&1; then
		# No -m: the daemon writes the pidfile itself. -x names the interpreter, never the script.
		start-stop-daemon -S -b -p "$PIDFILE" -x "$PYTHON" -- "$@" </dev/null || return 1
	else
		(
			trap '' HUP
			exec "$PYTHON" "$@" </dev/null >/dev/null 2>&1
		) &
	fi
	waited=0
	while [ "$waited" -lt $((START_WAIT_S * 5)) ]; do
		if pid=$(running_pid); then
			echo "$NAME started (pid $pid)"
			return 0
		fi
		nap
		waited=$((waited + 1))
	done
	echo "$NAME did not start within $START_WAIT_S s: see the system log (logread, journalctl or /var/log/syslog)" >&2
	return 1
}

# Wait until process $1 is no longer the daemon; false if it still is after $2 s.
wait_gone() {
	waited=0
	while runs_daemon "$1"; do
		[ "$waited" -lt $(($2 * 5)) ] || return 1
		nap
		waited=$((waited + 1))
	done
}

do_stop() {
	mkdir -p "$RUN_DIR" && : >"$STOPPED"
	if ! pid=$(running_pid); then
		rm -f "$PIDFILE"
		echo "$NAME is not running"
		return 0
	fi
	kill -TERM "$pid" 2>/dev/null
	kill -CONT "$pid" 2>/dev/null   # a stopped (SIGSTOP) process acts on TERM only once continued
	if ! wait_gone "$pid" "$STOP_WAIT_S"; then
		echo "$NAME (pid $pid) ignored SIGTERM for $STOP_WAIT_S s: killing it" >&2
		kill -KILL "$pid" 2>/dev/null
		wait_gone "$pid" "$STOP_WAIT_S" || return 1
	fi
	rm -f "$PIDFILE" "$HEARTBEAT"
	echo "$NAME stopped"
}

# LSB exit codes: 0 running, 1 dead but the pidfile exists, 3 not running.
do_status() {
	if pid=$(running_pid); then
		echo "$NAME is running (pid $pid)"
		return 0
	elif [ -f "$PIDFILE" ]; then
		echo "$NAME is not running, but its pidfile $PIDFILE exists"
		return 1
	fi
	echo "$NAME is not running"
	return 3
}

case ${1:-} in
start) do_start ;;
stop) do_stop ;;
restart | force-reload) do_stop && do_start ;;
status) do_status ;;
*)
	echo "usage: $0 start|stop|restart|force-reload|status" >&2
	exit 2
	;;
esac
EOF
	} | fill_control
}

procd_script() {
	{
		cat <<EOF
#!/bin/sh /etc/rc.common
# shellcheck shell=sh disable=SC2034
# $TITLE under procd, written by install.sh. procd restarts the daemon whenever it exits
# (respawn, never giving up) and logs its output (logread -e $NAME); the cron watchdog
# (mnedc-watchdog) restarts it when it hangs. stop leaves the marker NAME.stopped so that the
# watchdog does not undo it; start removes it. It runs as the module MODULE with
# PYTHONPATH=SBIN_DIR, from the bytecode install.sh compiled into SBIN_DIR/__pycache__, which
# Python refreshes when the script or python3 changed (after a sysupgrade, at the first start).
USE_PROCD=1
START=90
STOP=10
EOF
		script_settings
		cat <<'EOF'

start_service() {
	mkdir -p "$RUN_DIR"
	rm -f "$RUN_DIR/$NAME.stopped"
	procd_open_instance
	procd_set_param command "$PYTHON" -u -m "$MODULE" -c "$CONFIG" --pidfile "$PIDFILE" --heartbeat "$HEARTBEAT"@CONTROL@
	procd_set_param env PYTHONPATH="$SBIN_DIR"
	procd_set_param respawn 3600 5 0
	procd_set_param stdout 1
	procd_set_param stderr 1
	procd_set_param pidfile "$PIDFILE"
	procd_set_param file "$CONFIG"
	procd_close_instance
}

stop_service() {
	mkdir -p "$RUN_DIR" && : >"$RUN_DIR/$NAME.stopped"
}
EOF
	} | fill_control
}

systemd_unit() {
	{
		cat <<EOF
# $TITLE, written by install.sh. Logs: journalctl -u $NAME
[Unit]
Description=$TITLE
Wants=network-online.target
After=network-online.target
StartLimitIntervalSec=0

[Service]
Type=simple
ExecStartPre=/bin/mkdir -p $RUN_DIR
# The script runs as a module, from the bytecode install.sh compiled into $SBIN_DIR/__pycache__
# (Python refreshes it when the script or python3 changed): less memory than compiling it.
Environment=PYTHONPATH=$SBIN_DIR
ExecStart=$PYTHON -u -m $MODULE -c $CONFIG --syslog --pidfile $PIDFILE --heartbeat $HEARTBEAT@CONTROL@
Restart=always
RestartSec=5

[Install]
WantedBy=multi-user.target
EOF
	} | fill_control literal
}

watchdog_script() {
	cat <<'EOF'
#!/bin/sh
# mnedc-watchdog NAME (mnedc-server or mnedc-client), written by install.sh and run every minute
# by cron. It restarts the service NAME through its init script (or systemctl) when
#   - its process is gone (no pidfile, or the pid in it is dead),
#   - its pidfile is stale: the pid now belongs to another program (/proc/PID/cmdline shows
#     no "-m mnedc_server" or "-m mnedc_client" with this pidfile),
#   - it hangs: the heartbeat file its event loop touches every 5 s is older than
#     MNEDC_HEARTBEAT_MAX_S seconds (default 60); the hung (maybe SIGSTOPped) process is
#     killed with SIGKILL first.
# A service stopped on purpose (init script stop, install.sh --no-start; systemd: not active) is
# left alone. Runs never overlap: one that finds the lock taken exits at once. Each restart is
# logged with logger -t mnedc-watchdog and on stderr.
set -u
EOF
	echo "SBIN_DIR=$(shquote "$SBIN_DIR")"
	echo "RUN_DIR=$(shquote "$RUN_DIR")"
	echo "INIT_DIR=$(shquote "$INIT_DIR")"
	echo "UNIT_DIR=$(shquote "$UNIT_DIR")"
	cat <<'EOF'
HEARTBEAT_MAX_S=${MNEDC_HEARTBEAT_MAX_S:-60}
PATH=${PATH:+$PATH:}/usr/sbin:/usr/bin:/sbin:/bin

case ${1:-} in
mnedc-server) MODULE=mnedc_server ;;
mnedc-client) MODULE=mnedc_client ;;
*)
	echo "usage: $0 mnedc-server|mnedc-client" >&2
	exit 2
	;;
esac
NAME=$1
PIDFILE=$RUN_DIR/$NAME.pid
HEARTBEAT=$RUN_DIR/$NAME.heartbeat
case $HEARTBEAT_MAX_S in '' | *[!0-9]*) HEARTBEAT_MAX_S=60 ;; esac

say() {
	echo "mnedc-watchdog: $*" >&2
	logger -t mnedc-watchdog -p daemon.warning "$*" 2>/dev/null
}

EOF
	runs_daemon_function
	cat <<'EOF'

nap() {
	sleep 0.2 2>/dev/null || sleep 1
}

if [ -x "$INIT_DIR/$NAME" ]; then
	[ -e "$RUN_DIR/$NAME.stopped" ] && exit 0
	restart_command() { "$INIT_DIR/$NAME" restart; }
elif [ -f "$UNIT_DIR/$NAME.service" ]; then
	systemctl is-active --quiet "$NAME" || exit 0   # stopped, or systemd is restarting it
	restart_command() { systemctl restart "$NAME"; }
else
	echo "mnedc-watchdog: $NAME is not installed (no $INIT_DIR/$NAME)" >&2
	exit 1
fi

mkdir -p "$RUN_DIR" || exit 1
exec 9>"$RUN_DIR/$NAME.lock" || exit 1
flock -n 9 || exit 0

restart() {
	say "$NAME $1: restarting it"
	restart_command 9>&- >&2   # fd 9 closed: the new daemon must not hold our lock
	status=$?
	pid=$(cat "$PIDFILE" 2>/dev/null)
	if [ "$status" -ne 0 ]; then
		say "$NAME: restart failed (status $status)"
		exit 1
	fi
	say "$NAME restarted (pid ${pid:-unknown})"
	exit 0
}

pid=$(cat "$PIDFILE" 2>/dev/null)
case $pid in
'') restart "is not running (no pidfile)" ;;
*[!0-9]*) restart "has a bad pidfile $PIDFILE" ;;
esac
if ! runs_daemon "$pid"; then
	other=$(tr '\000' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c 1-60 | sed 's/ *$//')
	[ -z "$other" ] || restart "is not running: its stale pidfile names pid $pid, which is another program ($other)"
	restart "is not running: process $pid is gone"
fi
beat=$(date -r "$HEARTBEAT" +%s 2>/dev/null) || exit 0   # starting, or no heartbeat: trust it
age=$(($(date +%s) - beat))
if [ "$age" -gt "$HEARTBEAT_MAX_S" ]; then
	kill -KILL "$pid" 2>/dev/null
	waited=0
	while runs_daemon "$pid" && [ "$waited" -lt 50 ]; do
		nap
		waited=$((waited + 1))
	done
	restart "hangs: no heartbeat for $age s (more than $HEARTBEAT_MAX_S); killed pid $pid with SIGKILL"
fi
exit 0
EOF
}

# ---- install -----------------------------------------------------------------------------------

# Before anything is placed: the configuration this install will use, copied beside its place
# (so relative paths in it mean the same) and checked with the script's own --check. Sets
# CANDIDATE (a temporary file to place, or '' to keep the one there) and CONFIG_ORIGIN.
check_config() {
	kept="$STATE_DIR/$KEPT_CONFIG/${CONFIG##*/}"
	CANDIDATE='' CONFIG_ORIGIN=''
	if [ -n "$CONFIG_SRC" ]; then
		CONFIG_ORIGIN=$CONFIG_SRC
	elif [ -f "$CONFIG" ]; then
		self_check "$CONFIG" "$CONFIG"
		return 0
	elif [ -f "$kept" ]; then
		CONFIG_ORIGIN=$kept
	fi
	new_temp "$CONFIG"
	CANDIDATE=$TEMP
	if [ -n "$CONFIG_ORIGIN" ]; then
		cp "$CONFIG_ORIGIN" "$CANDIDATE" || die "cannot read $CONFIG_ORIGIN"
	elif [ "$NAME" = mnedc-server ]; then
		server_ini >"$CANDIDATE" || die "cannot write $CANDIDATE"
		CONFIG_ORIGIN="the generated server.ini"
	else
		cp "$SRC_DIR/client-config.ini" "$CANDIDATE" || die "cannot read $SRC_DIR/client-config.ini"
		CONFIG_ORIGIN="the client template"
	fi
	self_check "$CANDIDATE" "$CONFIG_ORIGIN"
}

# Place the configuration check_config chose, keeping a copy of the one it replaces in case the
# new one does not start.
install_config() {
	if [ -z "$CANDIDATE" ]; then
		chmod 600 "$CONFIG"
		remember "file $(rel "$CONFIG")"
		note "keeping $CONFIG"
		return 0
	fi
	if [ -f "$CONFIG" ] && ! cmp -s "$CANDIDATE" "$CONFIG"; then
		new_temp "$CONFIG"
		cp -p "$CONFIG" "$TEMP" || die "cannot copy $CONFIG"
		PREVIOUS_CONFIG=$TEMP
	fi
	put_file "$CANDIDATE" "$CONFIG" 600
	if [ "$CONFIG_ORIGIN" = "$STATE_DIR/$KEPT_CONFIG/${CONFIG##*/}" ]; then
		rm -f "$CONFIG_ORIGIN"
		rmdir "$STATE_DIR/$KEPT_CONFIG" 2>/dev/null
		note "restored $CONFIG, which the last uninstall kept with the state"
	fi
}

# Ask the script itself, with the interpreter the service will run, whether it can run with the
# configuration FILE ($1, known to the user as $2): it imports what that configuration needs and
# parses and resolves what the daemon will (mnedc_*.py --check). Run from / in isolated mode, so
# nothing in the current directory or the environment is imported as root. A client config that
# still lacks server or secret is let through: it is installed but not enabled.
self_check() {
	output=$(py -B "$SRC_DIR/$SCRIPT" -c "$1" --check 2>&1)
	status=$?
	last=$(printf '%s\n' "$output" | grep -v '^$' | tail -n 1 | sed 's/^[0-9-]* [0-9:]* [A-Z]* //')
	case $status in
	0) return 0 ;;
	1) die "$PYTHON cannot run $SCRIPT: $last" ;;
	2)
		case $NAME:$last in
		"mnedc-client:no server configured"* | "mnedc-client:no secret configured"*) return 0 ;;
		esac
		die "$2 is not a configuration $SCRIPT can run, so nothing was changed: $(printf '%s' "$last" | sed "s|$1|$2|g")"
		;;
	*) die "$PYTHON $SCRIPT --check failed (exit $status): $last" ;;
	esac
}

install_service() {
	case $INIT in
	procd) put_generated procd_script "$INIT_DIR/$NAME" 755 ;;
	sysv) put_generated sysv_script "$INIT_DIR/$NAME" 755 ;;
	systemd) put_generated systemd_unit "$UNIT_DIR/$NAME.service" 644 ;;
	esac
}

# Print the value of KEY in [SECTION] of the INI file FILE, or nothing.
ini_get() {
	py - "$@" <<'EOF'
import configparser, sys
parser = configparser.ConfigParser(interpolation=None)
try:
    parser.read(sys.argv[1])
    print(parser.get(sys.argv[2], sys.argv[3], fallback="").strip())
except configparser.Error:
    print("")
EOF
}

# What the client config still lacks ("server", "secret", "server_pin"), or nothing when it can
# run. The link is TLS unless the config says tls = no, and TLS needs a pin or a CA.
client_config_missing() {
	missing=''
	[ -n "$(ini_get "$CONFIG" client server)" ] || missing='server'
	if [ -z "$(ini_get "$CONFIG" client secret)$(ini_get "$CONFIG" client secret_file)" ]; then
		missing="${missing:+$missing, }secret"
	fi
	if [ "$(ini_get "$CONFIG" client tls)" != no ] &&
		[ -z "$(ini_get "$CONFIG" client server_pin)$(ini_get "$CONFIG" client tls_ca)" ]; then
		missing="${missing:+$missing, }server_pin"
	fi
	echo "$missing"
}

# OpenWrt keeps /var in RAM: a state_dir there loses the secret and the leases at every reboot.
warn_volatile_state() {
	state=$(ini_get "$CONFIG" server state_dir)
	state=${state:-/var/lib/mnedc}
	case ${state#"$ROOT"} in
	/var/* | /tmp/*)
		note "warning: state_dir $state is in RAM on OpenWrt: set state_dir = $STATE_DIR in $CONFIG, or the secret and leases are lost at every reboot"
		;;
	esac
}

# Print the permission bits of FILE $1 in octal, from ls (OpenWrt has no stat).
mode_of() {
	# shellcheck disable=SC2012 # one file's mode string, no names parsed
	ls -ldn "$1" | awk '{
		m = 0; special = 0
		for (i = 2; i <= 10; i++) { c = substr($1, i, 1); m = m * 2 + (c != "-" && c != "S" && c != "T") }
		if (substr($1, 4, 1) ~ /[sS]/) special += 4
		if (substr($1, 7, 1) ~ /[sS]/) special += 2
		if (substr($1, 10, 1) ~ /[tT]/) special += 1
		printf "%o\n", special * 512 + m }'
}

# Put the cron file $1 at $2. Root's crontab on OpenWrt keeps its mode and owner (its other jobs
# may not be for everyone's eyes; a new one is 0600); our /etc/cron.d/mnedc is root's, 0644, as
# Debian's cron requires.
place_cron_file() {
	mode=644 owner=0:0
	case $2 in
	*/crontabs/*)
		mode=600
		if [ -f "$2" ]; then
			mode=$(mode_of "$2")
			# shellcheck disable=SC2012 # one file's numeric owner and group
			owner=$(ls -ldn "$2" | awk '{ print $3 ":" $4 }')
		fi
		;;
	esac
	place_file "$1" "$2" "$mode"
	chown "$owner" "$2" || die "cannot chown $2"
}

# One watchdog line per service in the cron file; other lines are kept. No % in crontab lines.
install_cron_line() {
	make_dir "$(dirname "$CRON_FILE")"
	new_temp "$CRON_FILE"
	temp=$TEMP
	if [ "$INIT" = procd ]; then
		{
			[ -f "$CRON_FILE" ] && grep -v "/mnedc-watchdog $NAME\$" "$CRON_FILE"
			echo "* * * * * $WATCHDOG $NAME"
		} >"$temp"
	else
		{
			echo "# MNEDC watchdog, written by install.sh: restarts a dead or hung MNEDC daemon."
			echo "SHELL=/bin/sh"
			echo "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
			[ -f "$CRON_FILE" ] && grep '/mnedc-watchdog ' "$CRON_FILE" | grep -v "/mnedc-watchdog $NAME\$"
			echo "* * * * * root $WATCHDOG $NAME"
		} >"$temp"
	fi
	remember "cron $(rel "$CRON_FILE")"
	place_cron_file "$temp" "$CRON_FILE"
	if [ -n "$ROOT" ]; then
		return 0
	elif [ "$INIT" = procd ]; then
		{ /etc/init.d/cron enable && /etc/init.d/cron restart; } >/dev/null 2>&1 ||
			note "warning: could not enable cron, so the watchdog will not run: /etc/init.d/cron enable; /etc/init.d/cron start"
	elif ! command -v cron >/dev/null 2>&1 && ! command -v crond >/dev/null 2>&1; then
		note "warning: no cron daemon found, so the watchdog will not run: install cron (apt-get install cron)"
	fi
}

# Remove the watchdog line of service $1 from cron file $2. Our /etc/cron.d/mnedc goes when no
# watchdog line is left; a shared crontab only when nothing is left in it.
remove_cron_line() {
	[ -f "$2" ] || return 0
	new_temp "$2"
	temp=$TEMP
	grep -v "/mnedc-watchdog $1\$" "$2" >"$temp"
	case $2 in
	*/cron.d/mnedc) keep='/mnedc-watchdog ' ;;
	*) keep='[^[:space:]]' ;;
	esac
	if grep -q "$keep" "$temp"; then
		place_cron_file "$temp" "$2"
	else
		rm -f "$2"
	fi
	rm -f "$temp"
}

# Print the bytecode file of the script $1 (__pycache__/NAME.cpython-3NN.pyc beside it), compiled
# by PYTHON if $2 is yes (the script was just written) or the bytecode is not intact and up to
# date: a re-install that changes nothing rewrites nothing. "Up to date" is what the import system
# checks at the daemon's every start: the header holds the magic number of this Python version and
# the script's mtime (in whole seconds) and size. -I (py): no PYTHON* variable (PYTHONPYCACHEPREFIX,
# PYTHONOPTIMIZE) may put the bytecode where the daemon does not look, and SOURCE_DATE_EPOCH must
# not make it a hash-checked one, hence the explicit TIMESTAMP.
compiled_bytecode() {
	py - "$1" "$2" <<'EOF'
import importlib.util, marshal, os, py_compile, sys
source, force = sys.argv[1], sys.argv[2] == "yes"
cache = importlib.util.cache_from_source(source)
info = os.stat(source)
header = importlib.util.MAGIC_NUMBER + bytes(4) + b"".join(
    (int(number) & 0xFFFFFFFF).to_bytes(4, "little") for number in (info.st_mtime, info.st_size))
try:
    with open(cache, "rb") as pyc:
        intact = pyc.read(16) == header and marshal.loads(pyc.read()) is not None
except (OSError, EOFError, ValueError, TypeError):
    intact = False
if force or not intact:
    py_compile.compile(source, cache, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
print(cache)
EOF
}

# Install the script and byte-compile it, so that the service (python3 -m) loads the bytecode
# instead of compiling the script at every start; a new script is always compiled anew. uninstall
# removes every .pyc of it, also one that a newer python3 wrote at a start, and __pycache__ if that
# leaves it empty.
install_script() {
	new_script=yes
	cmp -s "$SRC_DIR/$SCRIPT" "$SBIN_DIR/$SCRIPT" 2>/dev/null && new_script=no
	put_file "$SRC_DIR/$SCRIPT" "$SBIN_DIR/$SCRIPT" 755
	make_dir "$SBIN_DIR/__pycache__"
	remember "bytecode $(rel "$SBIN_DIR/$SCRIPT")"
	output=$(compiled_bytecode "$SBIN_DIR/$SCRIPT" "$new_script" 2>&1) ||
		die "$PYTHON cannot byte-compile $SBIN_DIR/$SCRIPT ($(printf '%s\n' "$output" | tail -n 1)): is $SBIN_DIR writable, and is $SCRIPT intact?"
	BYTECODE=$output
}

# OpenWrt's sysupgrade keeps only the files listed in /etc/sysupgrade.conf (and package files).
install_sysupgrade() {
	for keep in "$ETC_DIR/" "$SBIN_DIR/$SCRIPT" "$WATCHDOG" "$INIT_DIR/$NAME"; do
		remember "sysupgrade $(rel "$keep")"
		if ! { [ -f "$SYSUPGRADE" ] && grep -qxF "$keep" "$SYSUPGRADE"; }; then
			make_dir "$(dirname "$SYSUPGRADE")"
			echo "$keep" >>"$SYSUPGRADE" || die "cannot write $SYSUPGRADE"
		fi
	done
}

# mDNS across the relay: avahi-daemon skips point-to-point interfaces, and a TUN is one, unless
# its [server] section says allow-point-to-point=yes. Set it where avahi is installed, so that a
# stock avahi sees the network; uninstall puts back exactly what was there (the marked lines).
AVAHI_MARK='# MNEDC install.sh: mDNS on its TUN, which is point-to-point (uninstall removes these two lines)'
AVAHI_SECTION='# MNEDC install.sh: a [server] section for the line below (uninstall removes both)'
AVAHI_WAS='#mnedc-was# '

configure_avahi() {
	conf=$ROOT/etc/avahi/avahi-daemon.conf
	[ -f "$conf" ] || return 0
	remember "avahi $(rel "$conf")"
	if grep -qxF "$AVAHI_MARK" "$conf"; then
		return 0
	fi
	if awk '/^\[/ { server = ($0 ~ /^\[server\]/) } server && /^[ \t]*allow-point-to-point[ \t]*=[ \t]*yes[ \t]*$/ { found = 1 } END { exit !found }' "$conf"; then
		note "avahi-daemon already allows point-to-point interfaces ($(rel "$conf"))"
		return 0
	fi
	new_temp "$conf"
	{
		awk -v mark="$AVAHI_MARK" -v section="$AVAHI_SECTION" -v was="$AVAHI_WAS" '
			/^[ \t]*allow-point-to-point[ \t]*=/ { print was $0; next }
			{ print }
			/^\[server\][ \t]*$/ && !done { print mark; print "allow-point-to-point=yes"; done = 1 }
			END { if (!done) { print section; print "[server]"; print mark; print "allow-point-to-point=yes" } }' "$conf" >"$TEMP" &&
			chmod 644 "$TEMP" && mv -f "$TEMP" "$conf"
	} || die "cannot write $conf"
	note "set allow-point-to-point=yes in $(rel "$conf"), so that avahi-daemon serves mDNS on the MNEDC interface"
	restart_avahi
}

# Undo configure_avahi in the file $1: drop our two lines, give back the lines we disabled.
restore_avahi() {
	[ -f "$1" ] && grep -qxF "$AVAHI_MARK" "$1" || return 0
	new_temp "$1"
	{
		awk -v mark="$AVAHI_MARK" -v section="$AVAHI_SECTION" -v was="$AVAHI_WAS" '
			skip { skip = 0; next }
			$0 == mark || $0 == section { skip = 1; next }
			index($0, was) == 1 { print substr($0, length(was) + 1); next }
			{ print }' "$1" >"$TEMP" && chmod 644 "$TEMP" && mv -f "$TEMP" "$1"
	} || die "cannot write $1"
	note "removed allow-point-to-point=yes from $(rel "$1")"
	restart_avahi
}

restart_avahi() {
	[ -z "$ROOT" ] || return 0
	if [ -d /run/systemd/system ]; then
		systemctl try-restart avahi-daemon 2>/dev/null
	elif [ -x /etc/init.d/avahi-daemon ] && pidof avahi-daemon >/dev/null 2>&1; then
		/etc/init.d/avahi-daemon restart >/dev/null 2>&1
	fi || note "warning: could not restart avahi-daemon: restart it to apply the change"
}

# Names across the relay where dnsmasq resolves for this host (OpenWrt always; Debian with the
# dnsmasq package): dnsmasq reads DNSMASQ_SERVERS as its servers file, in which the client writes
# server=/DOMAIN/RELAY once it knows the relay's address, and SIGHUPs dnsmasq (emptied at stop).
# On flash, made here: OpenWrt's jailed dnsmasq mounts that one file when it starts, at boot
# before the client, so it must be there already (the client rewrites it in place).
DNSMASQ_SERVERS=/etc/mnedc/dnsmasq.servers
DNSMASQ_DROPIN='# MNEDC install.sh: mnedc_client.py names its relay for the domain here (uninstall removes this file)'

configure_dnsmasq() {
	[ "$NAME" = mnedc-client ] || return 0
	[ -f "$ROOT/etc/config/dhcp" ] || [ -d "$ROOT/etc/dnsmasq.d" ] || return 0
	remember "file $DNSMASQ_SERVERS"
	[ -f "$ROOT$DNSMASQ_SERVERS" ] || { : >"$ROOT$DNSMASQ_SERVERS" && chmod 644 "$ROOT$DNSMASQ_SERVERS"; } ||
		die "cannot create $ROOT$DNSMASQ_SERVERS"
	if [ -f "$ROOT/etc/config/dhcp" ] && command -v uci >/dev/null 2>&1; then
		current=$(uci -q -c "$ROOT/etc/config" get 'dhcp.@dnsmasq[0].serversfile')
		if [ "$current" = "$DNSMASQ_SERVERS" ]; then
			remember "uci-serversfile $DNSMASQ_SERVERS"
		elif [ -n "$current" ]; then
			note "dnsmasq already reads its servers from $current: add server=/mnedc/RELAY_VIRTUAL_IP there for names across the relay"
		else
			remember "uci-serversfile $DNSMASQ_SERVERS"
			{ uci -c "$ROOT/etc/config" set "dhcp.@dnsmasq[0].serversfile=$DNSMASQ_SERVERS" &&
				uci -c "$ROOT/etc/config" commit dhcp; } || die "uci cannot set dhcp.@dnsmasq[0].serversfile"
			note "dnsmasq reads $DNSMASQ_SERVERS, where the client names its relay for the domain (uci dhcp.@dnsmasq[0].serversfile)"
			restart_dnsmasq
		fi
	elif [ -d "$ROOT/etc/dnsmasq.d" ]; then
		dropin=$ROOT/etc/dnsmasq.d/mnedc
		remember "file $(rel "$dropin")"
		[ -f "$dropin" ] && grep -qxF "$DNSMASQ_DROPIN" "$dropin" && return 0
		{ printf '%s\nservers-file=%s\n' "$DNSMASQ_DROPIN" "$DNSMASQ_SERVERS" >"$dropin" && chmod 644 "$dropin"; } ||
			die "cannot write $dropin"
		note "dnsmasq reads $DNSMASQ_SERVERS ($(rel "$dropin")), where the client names its relay for the domain"
		restart_dnsmasq
	fi
}

# Undo configure_dnsmasq's uci option $1, unless someone changed it since.
restore_dnsmasq_uci() {
	command -v uci >/dev/null 2>&1 || return 0
	[ "$(uci -q -c "$ROOT/etc/config" get 'dhcp.@dnsmasq[0].serversfile')" = "$1" ] || return 0
	if uci -c "$ROOT/etc/config" delete 'dhcp.@dnsmasq[0].serversfile' && uci -c "$ROOT/etc/config" commit dhcp; then
		note "removed dhcp.@dnsmasq[0].serversfile"
	else
		note "warning: uci cannot remove dhcp.@dnsmasq[0].serversfile"
	fi
	restart_dnsmasq
}

restart_dnsmasq() {
	[ -z "$ROOT" ] || return 0
	if [ -d /run/systemd/system ]; then
		systemctl try-restart dnsmasq 2>/dev/null
	elif [ -x /etc/init.d/dnsmasq ] && pidof dnsmasq >/dev/null 2>&1; then
		/etc/init.d/dnsmasq restart >/dev/null 2>&1
	fi || note "warning: could not restart dnsmasq: restart it to apply the change"
}

# Tell the watchdog to leave the service alone (until it is started), unless it runs already.
mark_stopped() {
	daemon_pid "$PIDFILE" "$MODULE" "$SBIN_DIR" >/dev/null || : >"$RUN_DIR/$NAME.stopped"
}

control_hint() {
	if [ "$INIT" = systemd ]; then
		echo "systemctl start|stop|restart|status $NAME"
	else
		echo "$INIT_DIR/$NAME start|stop|restart|status"
	fi
}

# Enable at boot and (re)start, as the init system does it. Never under --root.
activate() {
	if [ -n "$ROOT" ] && [ "$START" != always ]; then
		mark_stopped
		note "$NAME is neither enabled nor started (--root); run it with: $(control_hint)"
		return 0
	fi
	[ -n "$ROOT" ] || enable_service
	if [ "$START" = no ]; then
		[ "$INIT" = systemd ] || mark_stopped
		note "$NAME is not started (--no-start); start it with: $(control_hint)"
		return 0
	fi
	action=start
	[ "$CHANGED" = yes ] && action=restart
	run_service "$action" && return 0
	[ -n "$PREVIOUS_CONFIG" ] || die "$NAME did not start: $(log_hint)"
	place_file "$PREVIOUS_CONFIG" "$CONFIG" 600
	run_service restart ||
		die "$NAME did not start with the new configuration, nor with the previous one put back in $CONFIG: $(log_hint)"
	die "$NAME did not start with the new configuration, so the previous one is back in $CONFIG and running: $(log_hint)"
}

# start or restart ($1) the service and wait until its daemon runs (its pidfile names a live
# root process with its command line; after a restart, another one than before): procd's
# restart and systemd's return at once, before a daemon with a bad config has died.
run_service() {
	before=$(daemon_pid "$PIDFILE" "$MODULE" "$SBIN_DIR") || before=''
	[ "$1" = restart ] || before=''
	if [ "$INIT" = systemd ]; then
		systemctl "$1" "$NAME" || return 1
	else
		"$INIT_DIR/$NAME" "$1" || return 1
	fi
	waited=0
	while [ "$waited" -lt $((${MNEDC_START_WAIT_S:-30} * 5)) ]; do
		now=$(daemon_pid "$PIDFILE" "$MODULE" "$SBIN_DIR") && [ "$now" != "$before" ] && return 0
		sleep 0.2 2>/dev/null || sleep 1
		waited=$((waited + 1))
	done
	return 1
}

log_hint() {
	if [ "$INIT" = systemd ]; then
		echo "see journalctl -u $NAME"
	else
		echo "see the system log (logread or /var/log/syslog)"
	fi
}

enable_service() {
	case $INIT in
	procd) "$INIT_DIR/$NAME" enable ;;
	systemd) systemctl daemon-reload && systemctl enable "$NAME" 2>/dev/null ;;
	sysv)
		if command -v update-rc.d >/dev/null 2>&1; then
			update-rc.d "$NAME" defaults >/dev/null
		else
			note "no update-rc.d here: have $INIT_DIR/$NAME start run at boot (e.g. from /etc/rc.local)"
		fi
		;;
	esac || note "warning: could not enable $NAME at boot"
}

# Refuse to install over an installation with another init system or prefix.
check_previous() {
	[ -f "$MANIFEST" ] || return 0
	previous=$(grep "^service $NAME " "$MANIFEST") || return 0
	[ "$previous" = "service $NAME $INIT $PREFIX" ] ||
		die "$NAME is installed already as '${previous#service }' (init, prefix): run install.sh uninstall first"
}

cmd_install() {
	set_service "$1"
	check_python
	check_modules
	[ "$NAME" = mnedc-client ] && check_tun
	if [ -n "$CONFIG_SRC" ]; then
		[ -f "$CONFIG_SRC" ] || die "--config $CONFIG_SRC: no such file"
	fi
	[ -n "$INIT" ] || INIT=$(detect_init)
	if [ -n "$ROOT" ] && [ "$START" = always ] && [ "$INIT" != sysv ]; then
		die "--root --start needs --init sysv: procd and systemd would start the service outside $ROOT"
	fi
	set_paths
	detect_control
	check_previous
	if [ -f "$STATE_DIR/install.manifest" ]; then
		NEW_MANIFEST=$(cat "$STATE_DIR/install.manifest")
		NEW_MANIFEST="$NEW_MANIFEST
"
	fi

	make_dir "$ETC_DIR"
	remember "service $NAME $INIT $PREFIX"   # first, so that uninstall also stops a half install
	make_dir "$(dirname "$STATE_DIR")"   # the state dir itself is a "state" line, not a "dir"
	remember "state $(rel "$STATE_DIR")"
	[ -d "$STATE_DIR" ] || mkdir "$STATE_DIR" || die "cannot create $STATE_DIR"
	chmod 700 "$STATE_DIR" || die "cannot chmod $STATE_DIR"
	make_dir "$RUN_DIR"
	check_config                        # before the script: a refused config changes nothing
	install_script
	put_generated watchdog_script "$WATCHDOG" 755
	install_config
	install_service
	configure_avahi
	configure_dnsmasq
	[ "$INIT" = procd ] && install_sysupgrade

	missing=''
	[ "$NAME" = mnedc-client ] && missing=$(client_config_missing)
	[ "$NAME" = mnedc-server ] && [ "$INIT" = procd ] && warn_volatile_state
	if [ -z "$missing" ]; then
		install_cron_line
	else
		remove_cron_line "$NAME" "$CRON_FILE"
	fi
	write_manifest
	rm -f "$STATE_DIR/install.manifest"

	note "installed $NAME ($INIT): $SBIN_DIR/$SCRIPT, config $CONFIG, state $STATE_DIR"
	note "bytecode: $BYTECODE (the service runs python3 -u -m $MODULE, which loads it instead of compiling the script: 5 to 7 MB less memory)"
	if [ -n "$missing" ]; then
		note "$NAME is not enabled: set $missing in $CONFIG (the server prints them at its first start), then run install.sh client again"
		return 0
	fi
	note "watchdog: $WATCHDOG $NAME, every minute from $CRON_FILE"
	activate
	if [ "$NAME" = mnedc-server ]; then
		note "clients need: server = THIS-HOST:3334, the secret from $STATE_DIR/secret and server_pin (both made at the first start; the server prints them, and $SCRIPT status shows the pin)"
	fi
}

# ---- uninstall ---------------------------------------------------------------------------------

# True if process $1 is the daemon of module $2 installed in $3 with pidfile $4: its owner (root)
# and /proc/PID/cmdline (pids get reused), as runs_daemon in the generated scripts checks them.
pid_runs() {
	awk '$1 == "Uid:" { exit $2 != 0 }' "/proc/$1/status" 2>/dev/null || return 1
	tr '\000' '\n' <"/proc/$1/cmdline" 2>/dev/null |
		awk -v module="$2" -v script="$3/$2.py" -v pidfile="$4" '
			(previous == "-m" && $0 == module) || $0 == script { runs = 1 }
			previous == "--pidfile" && $0 == pidfile { ours = 1 }
			{ previous = $0 }
			END { exit !(runs && ours) }'
}

# Print the pid in pidfile $1 if that process is the daemon of module $2 installed in $3.
daemon_pid() {
	pid=$(cat "$1" 2>/dev/null) || return 1
	case $pid in '' | *[!0-9]*) return 1 ;; esac
	pid_runs "$pid" "$2" "$3" "$1" && echo "$pid"
}

# Stop the daemon named in pidfile $1 if it is that of module $2 installed in $3 (covers --root,
# where no init runs).
kill_by_pidfile() {
	pid=$(daemon_pid "$1" "$2" "$3") || return 0
	for signal in TERM KILL; do
		kill -"$signal" "$pid" 2>/dev/null
		kill -CONT "$pid" 2>/dev/null
		waited=0
		while pid_runs "$pid" "$2" "$3" "$1"; do
			[ "$waited" -lt 50 ] || break
			sleep 0.2 2>/dev/null || sleep 1
			waited=$((waited + 1))
		done
		pid_runs "$pid" "$2" "$3" "$1" || return 0
	done
}

# Stop and disable service $1 (init $2, prefix $3).
remove_service() {
	case $1 in
	mnedc-server) module=mnedc_server ;;
	mnedc-client) module=mnedc_client ;;
	*) return 0 ;;
	esac
	if [ -z "$ROOT" ]; then
		case $2 in
		procd) [ ! -x "$INIT_DIR/$1" ] || { "$INIT_DIR/$1" stop && "$INIT_DIR/$1" disable; } ;;
		systemd) systemctl disable --now "$1" 2>/dev/null ;;
		sysv)
			[ ! -x "$INIT_DIR/$1" ] || "$INIT_DIR/$1" stop
			if command -v update-rc.d >/dev/null 2>&1; then
				update-rc.d -f "$1" remove >/dev/null
			fi
			;;
		esac
	fi
	kill_by_pidfile "$RUN_DIR/$1.pid" "$module" "$ROOT$3/sbin"
	for suffix in pid heartbeat lock stopped; do
		rm -f "$RUN_DIR/$1.$suffix"
	done
	rm -f "$RUN_DIR/${1#mnedc-}.sock"   # the control socket, if a killed daemon left it
	note "removed the service $1"
}

remove_sysupgrade_line() {
	[ -f "$SYSUPGRADE" ] || return 0
	new_temp "$SYSUPGRADE"
	temp=$TEMP
	grep -vxF "$1" "$SYSUPGRADE" >"$temp"
	if grep -q '[^[:space:]]' "$temp"; then
		place_file "$temp" "$SYSUPGRADE" 644
	else
		rm -f "$SYSUPGRADE"
	fi
	rm -f "$temp"
}

# Remove the bytecode of the script $1: __pycache__/NAME.*.pyc beside it, of every Python version
# and optimization level. Other files in __pycache__ stay, and so does the directory then.
remove_bytecode() {
	module=${1##*/}
	rm -f "${1%/*}/__pycache__/${module%.py}".*.pyc
}

# The manifest, and what a plain uninstall left in a state directory (its "state" and "dir" lines).
read_manifest() {
	[ -f "$MANIFEST" ] && cat "$MANIFEST"
	for kept in "$ROOT/var/lib/mnedc" "$ETC_DIR/state"; do
		[ -f "$kept/install.manifest" ] && cat "$kept/install.manifest"
	done
}

# Move the configurations $2 into the kept state directory $1, since the leases only make sense
# with the subnet they came from: the next install puts them back. Without a state directory
# (--purge, or none) they are removed.
keep_configs() {
	for path in $2; do
		if [ -n "$1" ] && [ -f "$ROOT$path" ]; then
			{ mkdir -p "$ROOT$1/$KEPT_CONFIG" && mv -f "$ROOT$path" "$ROOT$1/$KEPT_CONFIG/"; } ||
				die "cannot keep $ROOT$path in $ROOT$1/$KEPT_CONFIG"
			note "kept $ROOT$path in $ROOT$1/$KEPT_CONFIG: the next install puts it back"
		else
			rm -f "$ROOT$path"
		fi
	done
}

cmd_uninstall() {
	JOURNALED=off
	set_paths
	manifest=$(read_manifest)
	if [ -z "$manifest" ]; then
		note "nothing to uninstall: no $MANIFEST"
		return 0
	elif [ ! -f "$MANIFEST" ] && [ "$PURGE" = no ]; then
		note "nothing to uninstall but the state (install.sh uninstall --purge removes it)"
		return 0
	fi
	while read -r kind name init prefix; do
		[ "$kind" = service ] && remove_service "$name" "$init" "$prefix"
	done <<EOF
$manifest
EOF
	kept='' configs=''
	while read -r kind path; do
		case $kind in
		cron)
			remove_cron_line mnedc-server "$ROOT$path"
			remove_cron_line mnedc-client "$ROOT$path"
			;;
		sysupgrade) remove_sysupgrade_line "$ROOT$path" ;;
		avahi) restore_avahi "$ROOT$path" ;;
		uci-serversfile) restore_dnsmasq_uci "$path" ;;
		file)
			case $PURGE:$path in
			no:*/server.ini | no:*/client-config.ini) configs="$configs $path" ;;   # kept with the state
			*) rm -f "$ROOT$path" ;;
			esac
			;;
		bytecode) remove_bytecode "$ROOT$path" ;;
		temp) rm -f "$ROOT$path" ;;     # left by an install that was killed
		state)
			rm -f "$ROOT$path/install.manifest"
			if [ "$PURGE" = yes ]; then
				rm -rf "$ROOT$path"
			elif [ -d "$ROOT$path" ]; then
				kept=$path
			fi
			;;
		esac
	done <<EOF
$manifest
EOF
	keep_configs "$kept" "$configs"
	rm -f "$MANIFEST"
	if [ -z "$ROOT" ]; then
		[ -d /run/systemd/system ] && systemctl daemon-reload
		[ -x /etc/init.d/cron ] && [ -f /etc/openwrt_release ] && /etc/init.d/cron restart >/dev/null 2>&1
	fi
	# Directories last, deepest first (reverse order of creation); only empty ones go.
	while read -r kind path; do
		[ "$kind" = dir ] && rmdir "$ROOT$path" 2>/dev/null
	done <<EOF
$(printf '%s\n' "$manifest" | sed -n '1!G;h;$p')
EOF
	if [ -z "$kept" ]; then
		note "uninstalled MNEDC"
		return 0
	fi
	# Remember the kept state and the directories around it, for a later uninstall --purge.
	while read -r kind path; do
		[ "$kind" = state ] || [ "$kind" = dir ] || continue
		[ -d "$ROOT$path" ] && echo "$kind $path"
	done >"$ROOT$kept/install.manifest" <<EOF
$manifest
EOF
	note "uninstalled MNEDC; kept the state (secret, salt, leases, TLS identity) in $ROOT$kept: install.sh uninstall --purge removes it"
}

# ---- certs: a CA, a server and client certificates for TLS, with the openssl command ----------
# Works with OpenSSL 1.1.1 (Debian Buster) to 3.x: every extension comes from a config file
# written here (nothing 3.x-only such as -copy_extensions), keys are EC P-256, serials random.
# The extensions pass OpenSSL's X509_STRICT checks (which Python 3.13 turns on by default): the
# CA has a critical basicConstraints, a keyUsage and a subjectKeyIdentifier, and every
# certificate it signs an authorityKeyIdentifier.

check_openssl() {
	command -v openssl >/dev/null 2>&1 ||
		die "openssl is missing, and certs needs it: install it (Debian: apt-get install openssl; OpenWrt: opkg update && opkg install openssl-util)"
}

# Run openssl with the arguments after $1; if it fails, die saying it could not $1, with the
# last line it printed.
run_openssl() {
	doing=$1
	shift
	output=$(openssl "$@" </dev/null 2>&1) ||
		die "openssl could not $doing: $(printf '%s\n' "$output" | tail -n 1)"
}

# True if $1 is a dotted-quad IPv4 address.
is_ipv4() {
	rest=$1.
	octets=0
	while [ -n "$rest" ]; do
		octet=${rest%%.*}
		rest=${rest#*.}
		case $octet in '' | *[!0-9]* | ????*) return 1 ;; esac
		[ "$octet" -le 255 ] || return 1
		octets=$((octets + 1))
	done
	[ "$octets" -eq 4 ]
}

# True if $1 is an IPv4 or IPv6 address or a DNS name (no wildcards). These characters are all a
# name may hold, so that lists of names split on blanks and the openssl config takes them as-is.
is_server_name() {
	case $1 in
	*:*) case $1 in *[!0-9A-Fa-f:.]*) return 1 ;; esac ;;
	*[!0-9.]*)
		case $1 in -* | .* | *. | *..* | *[!A-Za-z0-9._-]*) return 1 ;; esac
		[ ${#1} -le 253 ]
		;;
	*) is_ipv4 "$1" ;;
	esac
}

# True if $1 can be a client certificate's CN, which the server checks against the device_id
# the client presents (and a file name: client-ID.pem).
is_cert_device_id() {
	case $1 in '' | *[!A-Za-z0-9._-]*) return 1 ;; esac
	[ ${#1} -le 64 ]
}

# The subjectAltName value for the names in SERVER_NAMES: IP:... for addresses, DNS:... else.
subject_alt_names() {
	separator=''
	for name in $SERVER_NAMES; do
		case $name in
		*:*) kind=IP ;;
		*[!0-9.]*) kind=DNS ;;
		*) kind=IP ;;
		esac
		printf '%s%s:%s' "$separator" "$kind" "$name"
		separator=', '
	done
}

# The openssl config for a certificate of KIND (ca, server, client) whose CN is $2: req reads
# [req] and [dn], and the extensions come from [ext] (req -x509 for the CA, x509 -req else).
cert_config() {
	cat <<CONF
# written by install.sh certs; read by openssl req and openssl x509 (OpenSSL 1.1.1 and 3.x)
[req]
prompt = no
distinguished_name = dn
[dn]
CN = $2
[ext]
CONF
	case $1 in
	ca)
		echo "basicConstraints = critical, CA:TRUE, pathlen:0"
		echo "keyUsage = critical, keyCertSign, cRLSign"
		echo "subjectKeyIdentifier = hash"
		;;
	server | client)
		echo "basicConstraints = critical, CA:FALSE"
		echo "keyUsage = critical, digitalSignature"
		echo "subjectKeyIdentifier = hash"
		echo "authorityKeyIdentifier = keyid, issuer"
		;;
	esac
	case $1 in
	server)
		echo "extendedKeyUsage = serverAuth"
		echo "subjectAltName = $(subject_alt_names)"
		;;
	client) echo "extendedKeyUsage = clientAuth" ;;
	esac
}

# True if the pair BASE.pem + BASE.key (in CERT_DIR) is missing and is to be made; false if it
# is there. Half a pair is left alone: certs never replaces a file.
pair_missing() {
	if [ -e "$CERT_DIR/$1.pem" ] && [ -e "$CERT_DIR/$1.key" ]; then
		return 1
	elif [ -e "$CERT_DIR/$1.pem" ] || [ -e "$CERT_DIR/$1.key" ]; then
		die "$CERT_DIR has only one of $1.pem and $1.key: restore the other, or remove it to make a new pair"
	fi
}

# Make the CA (ca.key, ca.pem) unless it is there. A ca.pem without its ca.key is kept (the key
# may live elsewhere) as long as nothing is to be signed; cmd_certs checks that.
ensure_ca() {
	if [ -e "$CERT_DIR/ca.pem" ] && [ ! -e "$CERT_DIR/ca.key" ]; then
		note "keeping the CA $CERT_DIR/ca.pem (its ca.key is not here)"
	elif pair_missing ca; then
		ca_name="MNEDC CA $(uname -n | tr -cd 'A-Za-z0-9.-' | cut -c 1-24) $(date -u +%Y-%m-%dT%H:%M:%SZ)"
		make_pair ca ca "$ca_name"
		note "made the CA $CERT_DIR/ca.pem ($ca_name); ca.key signs every certificate: keep it secret"
	else
		note "keeping the CA $CERT_DIR/ca.pem and ca.key"
	fi
}

# Make the key BASE.key (0600) and the certificate BASE.pem (0644) of KIND with CN $3, signed by
# the CA (the CA itself: self-signed). Both are written to temporary files, then moved in place.
make_pair() {
	new_temp "$CERT_DIR/$1"
	config=$TEMP
	cert_config "$2" "$3" >"$config" || die "cannot write $config"
	new_temp "$CERT_DIR/$1"
	key=$TEMP
	new_temp "$CERT_DIR/$1"
	cert=$TEMP
	run_openssl "make the key $1.key" genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$key"
	if [ "$2" = ca ]; then
		run_openssl "make the CA certificate" req -new -x509 -config "$config" -extensions ext \
			-key "$key" -sha256 -days "$CERT_DAYS" -out "$cert"
	else
		new_temp "$CERT_DIR/$1"
		request=$TEMP
		run_openssl "make the request for $1.pem" req -new -config "$config" -key "$key" -out "$request"
		serial=$(openssl rand -hex 16) || die "openssl could not make a serial number"
		run_openssl "sign $1.pem with the CA" x509 -req -in "$request" -CA "$CERT_DIR/ca.pem" \
			-CAkey "$CERT_DIR/ca.key" -set_serial "0x$serial" -sha256 -days "$CERT_DAYS" \
			-extfile "$config" -extensions ext -out "$cert"
	fi
	{ chmod 600 "$key" && chmod 644 "$cert" && mv "$key" "$CERT_DIR/$1.key" && mv "$cert" "$CERT_DIR/$1.pem"; } ||
		die "cannot write $CERT_DIR/$1.pem and $1.key"
}

# The names in the server certificate $1: "127.0.0.1, localhost".
cert_names() {
	openssl x509 -in "$1" -noout -text 2>/dev/null |
		sed -n '/X509v3 Subject Alternative Name/{n;s/^ *//;s/IP Address://g;s/DNS://g;p;}'
}

# The device_ids to show client settings for: those of this run, else every client-ID.pem here.
client_ids() {
	if [ -n "$CLIENT_IDS" ]; then
		echo "$CLIENT_IDS"
		return 0
	fi
	for pem in "$CERT_DIR"/client-*.pem; do
		[ -f "$pem" ] || continue
		pem=${pem##*/client-}
		printf '%s ' "${pem%.pem}"
	done
}

# What to put in the configs, ready to paste.
print_cert_settings() {
	cat <<TEXT

Server: add these lines at the end of its config (/etc/mnedc/server.ini, in its [server]
section). With tls_client_ca (mutual TLS) it admits only clients with a certificate from this
CA whose CN is their device_id; leave that line out for TLS without client certificates.
tls = yes
tls_cert = $CERT_DIR/server.pem
tls_key = $CERT_DIR/server.key
tls_client_ca = $CERT_DIR/ca.pem
TEXT
	ids=$(client_ids)
	names=$(cert_names "$CERT_DIR/server.pem")
	for id in ${ids:-DEVICE_ID}; do
		cat <<TEXT

Client $id: copy ca.pem, client-$id.pem and client-$id.key to it, readable by the user the
client runs as (root for TUN mode), then add these lines at the end of its config
(/etc/mnedc/client-config.ini, in its [client] section; replace a device_id line it has), with
the paths the files have there. Its server must be one of the names in the server
certificate: $names.
device_id = $id
tls = yes
tls_ca = $CERT_DIR/ca.pem
tls_cert = $CERT_DIR/client-$id.pem
tls_key = $CERT_DIR/client-$id.key
TEXT
	done
	[ -n "$ids" ] || echo "(make a certificate for each client: install.sh certs --dir $CERT_DIR --client DEVICE_ID)"
}

# The blank-separated list $1 with the word $2 added, unless it holds it already.
with_word() {
	case " $1 " in
	*" $2 "*) printf '%s' "$1" ;;
	*) printf '%s' "${1:+$1 }$2" ;;
	esac
}

# Options of certs, all checked before anything is written. It needs no root: it writes only
# in --dir.
parse_certs_options() {
	while [ $# -gt 0 ]; do
		case $1 in
		--dir) CERT_DIR=$(need_value "$@") || exit 1; shift ;;
		--server-name)
			value=$(need_value "$@") || exit 1
			shift
			is_server_name "$value" ||
				die "--server-name '$value': give an IPv4 or IPv6 address or a DNS name (letters, digits, . - _)"
			SERVER_NAMES=$(with_word "$SERVER_NAMES" "$value")
			;;
		--client)
			value=$(need_value "$@") || exit 1
			shift
			is_cert_device_id "$value" ||
				die "--client '$value': a device_id for a certificate is 1 to 64 of the characters A-Z a-z 0-9 . _ -"
			CLIENT_IDS=$(with_word "$CLIENT_IDS" "$value")
			;;
		--days) CERT_DAYS=$(need_value "$@") || exit 1; shift ;;
		*) die "unknown option $1 for certs; usage: $CERTS_USAGE" ;;
		esac
		shift
	done
	[ -n "$CERT_DIR" ] || die "certs needs --dir DIR, the directory for the CA and the certificates; usage: $CERTS_USAGE"
	case $CERT_DIR in /*) ;; *) CERT_DIR=$(pwd)/$CERT_DIR ;; esac
	case $CERT_DAYS in
	0* | *[!0-9]* | ??????*) die "--days $CERT_DAYS: give a number of days, 1 to 99999" ;;
	esac
	if [ -z "$SERVER_NAMES" ] && [ ! -e "$CERT_DIR/server.pem" ]; then
		SERVER_NAMES=$(uname -n)
		is_server_name "$SERVER_NAMES" ||
			die "this host's name '$SERVER_NAMES' cannot name the server certificate: give --server-name ADDRESS-OR-NAME"
	fi
	first_name=${SERVER_NAMES%% *}
	[ ${#first_name} -le 64 ] ||
		die "--server-name $first_name: the first name is the certificate's CN, at most 64 characters: give a shorter one first"
}

# Refuse a directory that another user owns or may write in: its CA key would sign our server
# certificate, and a planted ca.pem would be trusted. ls -ldn, since OpenWrt has no stat.
check_own_dir() {
	dir=$(cd -P "$1" && pwd -P) || die "cannot enter $1"      # the real directory, not a link to it
	# shellcheck disable=SC2012,SC2046 # one directory's mode and numeric owner, split on purpose
	set -- "$dir" $(ls -ldn "$dir")
	case $2 in
	?????w* | ????????w*) die "$1 is writable by others ($2): use a directory only you can write" ;;
	esac
	[ "$4" = "$(id -u)" ] || die "$1 belongs to uid $4, not to you (uid $(id -u)): use a directory of your own"
	# Above it, a directory another user may write (without the sticky bit) or owns could have
	# it renamed away and replaced.
	parent=$dir
	while [ "$parent" != / ]; do
		parent=$(dirname "$parent")
		# shellcheck disable=SC2012,SC2046
		set -- "$parent" $(ls -ldn "$parent")
		case $2 in
		?????w???[!tT]* | ????????w[!tT]*) die "$dir lies in $1, which others may write ($2): use a directory in one only you (or root) can write" ;;
		esac
		[ "$4" = 0 ] || [ "$4" = "$(id -u)" ] || die "$dir lies in $1, which belongs to uid $4: use a directory in one of your own or root's"
	done
}

cmd_certs() {
	check_openssl
	if [ ! -d "$CERT_DIR" ]; then
		{ mkdir -p "$(dirname "$CERT_DIR")" && mkdir -m 700 "$CERT_DIR"; } || die "cannot create $CERT_DIR"
	fi
	CERT_DIR=$(cd "$CERT_DIR" && pwd) || die "cannot enter $CERT_DIR"
	check_own_dir "$CERT_DIR"
	to_sign=''
	pair_missing server && to_sign=' server.pem'
	for id in $CLIENT_IDS; do
		pair_missing "client-$id" && to_sign="$to_sign client-$id.pem"
	done
	if [ -n "$to_sign" ] && [ -e "$CERT_DIR/ca.pem" ] && [ ! -e "$CERT_DIR/ca.key" ]; then
		die "$CERT_DIR/ca.key is missing, so$to_sign cannot be signed: put ca.key back, or make a new CA in another --dir"
	fi
	ensure_ca
	if pair_missing server; then
		make_pair server server "${SERVER_NAMES%% *}"
		note "made $CERT_DIR/server.pem and server.key for $(subject_alt_names)"
	else
		note "keeping $CERT_DIR/server.pem and server.key, for $(cert_names "$CERT_DIR/server.pem")${SERVER_NAMES:+ (remove both to make one for $SERVER_NAMES)}"
	fi
	for id in $CLIENT_IDS; do
		if pair_missing "client-$id"; then
			make_pair "client-$id" client "$id"
			note "made $CERT_DIR/client-$id.pem and client-$id.key for device_id $id"
		else
			note "keeping $CERT_DIR/client-$id.pem and client-$id.key"
		fi
	done
	print_cert_settings
}

# ---- command line ------------------------------------------------------------------------------

# The header comment of this file, then the usage.
help_text() {
	sed -n '/^set -u$/q; 2,$s/^# \{0,1\}//p' "$0" 2>/dev/null
	echo
	echo "$USAGE"
}

# Print the value of an option ($1) taken from its next argument ($2); fail if there is none.
need_value() {
	if [ $# -lt 2 ] || [ -z "$2" ]; then
		die "$1 needs a value"
	fi
	printf '%s' "$2"
}

main() {
	action=${1:-}
	install_option=''
	[ $# -gt 0 ] && shift
	case $action in
	server | client | uninstall) ;;
	certs)
		LC_ALL=C                 # [A-Za-z] in the checks means ASCII letters, in every shell
		export LC_ALL
		parse_certs_options "$@"
		cmd_certs
		return
		;;
	-h | --help)
		help_text
		return 0
		;;
	*) die "$USAGE" ;;
	esac
	check_root
	while [ $# -gt 0 ]; do
		case $1 in
		--config) install_option=$1 CONFIG_SRC=$(need_value "$@") || exit 1; shift ;;
		--prefix) install_option=$1 PREFIX=$(need_value "$@") || exit 1; shift ;;
		--root) ROOT=$(need_value "$@") || exit 1; shift ;;
		--init) install_option=$1 INIT=$(need_value "$@") || exit 1; shift ;;
		--no-start) install_option=$1 START=no ;;
		--start) install_option=$1 START=always ;;
		--purge) PURGE=yes ;;
		*) die "unknown option $1; $USAGE" ;;
		esac
		shift
	done
	if [ "$action" = uninstall ] && [ -n "$install_option" ]; then
		die "uninstall takes only --root and --purge, not $install_option"
	fi
	[ "$PURGE" = no ] || [ "$action" = uninstall ] || die "--purge is for uninstall"
	case $INIT in
	'' | procd | sysv | systemd) ;;
	*) die "--init $INIT: must be procd, sysv or systemd" ;;
	esac
	case $PREFIX in
	/*) PREFIX=${PREFIX%/} ;;
	*) die "--prefix $PREFIX: must be an absolute path" ;;
	esac
	if [ -n "$ROOT" ]; then
		[ -d "$ROOT" ] || die "--root $ROOT: no such directory"
		ROOT=$(cd "$ROOT" && pwd) || exit 1
		[ "$ROOT" = / ] && ROOT=''
	fi
	case $ROOT$PREFIX in
	*[![:alnum:]._/+@:,-]*) die "--root and --prefix may hold only letters, digits and . _ / + @ : , - (cron lines, init scripts and units carry them)" ;;
	esac
	case $CONFIG_SRC in
	'' | /*) ;;
	*) CONFIG_SRC=$(pwd)/$CONFIG_SRC ;;
	esac
	if [ "$action" = uninstall ]; then
		cmd_uninstall
	else
		cmd_install "$action"
	fi
}

main "$@"
