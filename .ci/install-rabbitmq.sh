#!/usr/bin/env bash
# Installs Debian's rabbitmq-server for the AMQP tests, the bench and `wsproxy demo`,
# when it is not there yet. Called by `python3 dev.py test` (the CI gate) and
# `python3 dev.py bench`; runs alone too:
#
#   bash .ci/install-rabbitmq.sh
#
# Only the package is installed: no node is left running. The tests start private
# nodes (wsproxy/rabbitmq_node.py: own directory, own name, free ports on 127.0.0.1),
# so if the package's postinst started the system's node (rabbit@<host>, where a service
# manager runs one), it is stopped here, and the script says so.
#
# When it cannot install (no apt-get, not root and no password-less sudo, no network,
# the package missing from the configured sources) it prints why and exits 0: the AMQP
# tests then skip, each with the reason "rabbitmq-server not found ...", so a machine
# without RabbitMQ shows skips, never silent passes. It exits non-zero only when bash
# itself fails.
#
# WSPROXY_RABBITMQ_BIN, when set, is where rabbitmq-server is looked for (as
# wsproxy/rabbitmq_node.py does), instead of PATH and the sbin directories.
set -uo pipefail

say() { printf '==> %s\n' "$*"; }
give_up() {
    say "rabbitmq-server not installed: $*"
    say "the AMQP tests will be skipped (rabbitmq-server not found)"
    exit 0
}

find_server() {
    if [[ -n "${WSPROXY_RABBITMQ_BIN:-}" ]]; then
        PATH="$WSPROXY_RABBITMQ_BIN" command -v rabbitmq-server
    else
        PATH="$PATH:/usr/sbin:/usr/local/sbin:/sbin" command -v rabbitmq-server
    fi
}

version() { dpkg-query -W -f='${Version}' rabbitmq-server 2>/dev/null || echo "version unknown"; }

if server=$(find_server); then
    say "rabbitmq-server already installed: $server ($(version))"
    exit 0
fi

command -v apt-get >/dev/null 2>&1 || give_up "no apt-get on this machine; install RabbitMQ by hand"
if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    give_up "not root and no password-less sudo to run apt-get"
fi
as_root() { ${SUDO[@]+"${SUDO[@]}"} "$@"; }

# The system node registers with epmd as "rabbit"; remember whether one ran before, so
# that only a node this install started is stopped.
system_node_port() { epmd -names 2>/dev/null | awk '$1 == "name" && $2 == "rabbit" { print $5 }'; }
before=$(system_node_port)

log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Waits for a dpkg lock held by another apt run (up to 2 min) instead of failing.
install() {
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        -o DPkg::Lock::Timeout=120 --no-install-recommends rabbitmq-server >>"$log" 2>&1
}
say "apt-get install --no-install-recommends rabbitmq-server"
if ! install; then
    # A fresh machine may have no package lists yet: fetch them, once.
    say "apt-get install failed; apt-get update, then again"
    as_root apt-get update -q -o DPkg::Lock::Timeout=120 >>"$log" 2>&1 ||
        give_up "apt-get update failed: $(tail -n 3 "$log" | tr '\n' ' ')"
    install || give_up "apt-get install failed: $(tail -n 3 "$log" | tr '\n' ' ')"
fi
server=$(find_server) || give_up "apt-get installed the package but rabbitmq-server is not on PATH"
say "installed rabbitmq-server $(version): $server"

# ---------------------------------------------------------------- no system node left

if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet rabbitmq-server 2>/dev/null; then
    if as_root systemctl stop rabbitmq-server; then
        say "stopped the rabbitmq-server service the package started (systemctl stop)"
    fi
fi
port=$(system_node_port)
if [[ -n "$port" && -z "$before" ]]; then
    # Debian's wrapper runs rabbitmqctl as user rabbitmq with the system cookie, and
    # talks to rabbit@<host> by default: the node the package started.
    if as_root timeout 60 rabbitmqctl stop >>"$log" 2>&1; then
        say "stopped the system node rabbit@$(hostname -s) the package started (rabbitmqctl stop)"
    else
        pid=$(ss -ltnpH "sport = :$port" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2)
        if [[ -n "$pid" ]] && as_root kill "$pid"; then
            say "killed the system node rabbit@$(hostname -s) the package started (beam.smp pid $pid)"
        else
            say "WARNING: the system node rabbit@$(hostname -s) the package started is still running"
        fi
    fi
fi
exit 0
