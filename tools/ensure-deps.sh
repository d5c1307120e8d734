#!/bin/sh
# Install what the demo and the tests need, only where it is missing.
# Usage: tools/ensure-deps.sh [--pytest] COMMAND...
# System commands come from Debian packages (apt-get, as root); pytest from pip, or Debian.
set -u

package_for() {
    case "$1" in
        ip|ss) echo iproute2 ;;
        iptables) echo iptables ;;
        ping) echo iputils-ping ;;
        nc) echo netcat-openbsd ;;
        iperf3) echo iperf3 ;;
        openvpn) echo openvpn ;;
        openssl) echo openssl ;;
        sshd) echo openssh-server ;;
        ssh) echo openssh-client ;;
        setpriv|unshare) echo util-linux ;;
        avahi-browse|avahi-publish|avahi-resolve) echo avahi-utils ;;
        dbus-daemon) echo dbus ;;
        dig) echo dnsutils ;;
        dnsmasq) echo dnsmasq-base ;;
        *) echo "$1" ;;
    esac
}

want_pytest=no
missing=""
for command in "$@"; do
    if [ "$command" = "--pytest" ]; then
        want_pytest=yes
    elif ! command -v "$command" >/dev/null 2>&1; then
        missing="$missing $(package_for "$command")"
    fi
done

apt_install() {
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "ensure-deps: missing:$1 -- install as root (apt-get install$1)" >&2
        return 1
    fi
    echo "ensure-deps: installing$1" >&2
    # shellcheck disable=SC2086 # $1 is a list of package names: split it on purpose
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $1 >/dev/null
}

status=0
if [ -n "$missing" ]; then
    apt_install "$missing" || status=1
fi
if [ "$want_pytest" = yes ] && ! python3 -c "import pytest" >/dev/null 2>&1; then
    echo "ensure-deps: installing pytest" >&2
    python3 -m pip install -q pytest >/dev/null 2>&1 || apt_install " python3-pytest" || status=1
fi
exit $status
