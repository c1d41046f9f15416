#!/bin/sh
# Install the Debian packages the real-peer test harness (tests/harness) needs, as root.
#
# Idempotent: when everything is installed this is one dpkg-query call.  Otherwise it
# preseeds Postfix's debconf question (no prompt, no /etc/postfix/main.cf), keeps the
# daemons from starting on the host with a temporary policy-rc.d, and installs only what
# is missing.  Either way it makes sure Debian's own unbound, nsd, nginx, postfix (and
# mta-sts-daemon) services are not left running on the host: the harness runs its own
# instances inside a network namespace.
set -eu

PKGS="postfix nsd unbound nginx swaks libnet-dns-perl libio-socket-ssl-perl
libnet-ssleay-perl libio-socket-inet6-perl bind9-utils bind9-dnsutils python3
python3-cryptography python3-venv openssl curl iproute2 ca-certificates nftables
postfix-mta-sts-resolver"
SERVICES="unbound nsd nginx postfix postfix-mta-sts-resolver"

if [ "$(id -u)" -ne 0 ]; then
    echo "install-harness-deps: must run as root (it uses apt-get and stops host services)" >&2
    exit 1
fi

# shellcheck disable=SC2086
installed=$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' $PKGS 2>/dev/null |
    awk '$2 == "installed" { print $1 }' | tr '\n' ' ')
missing=""
for p in $PKGS; do
    case " $installed " in
        *" $p "*) ;;
        *) missing="$missing $p" ;;
    esac
done

# The pid files Debian's own instances write (the harness keeps its pid files elsewhere).
pidfile_of() {
    case "$1" in
        unbound) echo /run/unbound.pid ;;
        nsd) echo /run/nsd/nsd.pid ;;
        nginx) echo /run/nginx.pid ;;
        postfix) echo /var/spool/postfix/pid/master.pid ;;
        *) echo "" ;;
    esac
}

pid_from() {
    [ -n "$1" ] && [ -s "$1" ] || return 1
    pid=$(tr -dc '0-9' < "$1" 2>/dev/null || true)
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# Is the host's (Debian-managed) instance of service $1 running?
service_running() {
    if [ -d /run/systemd/system ] && systemctl is-active --quiet "$1" 2>/dev/null; then
        return 0
    fi
    pid_from "$(pidfile_of "$1")" >/dev/null
}

host_daemons_running() {
    for s in $SERVICES; do
        service_running "$s" && return 0
    done
    return 1
}

stop_host_daemons() {
    for s in $SERVICES; do
        service_running "$s" || continue
        echo "install-harness-deps: stopping the host's $s service"
        if [ -d /run/systemd/system ]; then
            systemctl stop "$s" || true
        elif pid=$(pid_from "$(pidfile_of "$s")"); then
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    sleep 1
    if host_daemons_running; then
        echo "install-harness-deps: warning: a host unbound/nsd/nginx/postfix is still running" >&2
    fi
}

if [ -z "$missing" ]; then
    if host_daemons_running; then
        stop_host_daemons
    fi
    exit 0
fi

echo "install-harness-deps: installing:$missing"
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections

made_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
fi
cleanup() {
    if [ -n "$made_policy" ]; then
        rm -f /usr/sbin/policy-rc.d
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $missing

stop_host_daemons
echo "install-harness-deps: done"
