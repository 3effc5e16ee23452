#!/usr/bin/env bash
# Sets up everything the relayguard test suite needs on a fresh Debian 12 machine (as root) and runs it:
# Debian packages (nftables, iptables, Postfix, Dovecot, fail2ban for side-by-side figures, ...), a venv
# with the package and its test tools, ruff, then pytest. Idempotent: a second run installs nothing new.
# Extra arguments go to pytest, e.g. `scripts/test.sh -k scan`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "scripts/test.sh: run as root: the tests create network namespaces and a real Postfix" >&2
    exit 2
fi

APT_PACKAGES=(
    python3 python3-venv python3-pip python3-nftables python3-pyinotify
    nftables iptables iproute2 procps util-linux passwd openssl systemd
    postfix dovecot-core swaks fail2ban systemd-journal-remote
)
# shellcheck source=scripts/apt.sh
. scripts/apt.sh
apt_install_missing scripts/test.sh --private-postfix "${APT_PACKAGES[@]}"

VENV="${RELAYGUARD_TEST_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    # Debian's python3 with its site packages: python3-nftables (libnftables' JSON API) lives there.
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'

"$VENV/bin/ruff" check relayguard tests scripts
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
