#!/usr/bin/env bash
# The newcomer's tour in one command (as root, on Debian 12): a real Postfix MX with postscreen and
# Dovecot SASL in network namespaces, bots and a legitimate client, relayguard banning the bots with
# nftables. Everything lives in namespaces it creates and deletes: this machine's own firewall, network
# and Postfix are never touched. Takes about a minute. See scripts/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "scripts/demo.sh: run as root: it creates network namespaces and runs a private Postfix" >&2
    exit 2
fi

APT_PACKAGES=(python3 python3-venv python3-nftables python3-pyinotify nftables iproute2 postfix dovecot-core)
# shellcheck source=scripts/apt.sh
. scripts/apt.sh
apt_install_missing scripts/demo.sh --private-postfix "${APT_PACKAGES[@]}"

# A Python that has relayguard: $RELAYGUARD_PYTHON, the dev venv (scripts/test.sh), or a new one.
PY="${RELAYGUARD_PYTHON:-}"
if [ -z "$PY" ]; then
    VENV="${RELAYGUARD_TEST_VENV:-.venv}"
    if [ ! -x "$VENV/bin/python" ]; then
        /usr/bin/python3 -m venv --system-site-packages "$VENV"
    fi
    if ! "$VENV/bin/python" -c "import relayguard" 2>/dev/null; then
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e .
    fi
    PY="$VENV/bin/python"
fi
export TZ=UTC  # Postfix's log and relayguard agree on the zone of classic syslog times
exec "$PY" scripts/demo.py
