#!/usr/bin/env bash
# Installs relayguard on Debian 12 (as root) and starts it with the default configuration.
#   scripts/install.sh              install or upgrade, then start
#   scripts/install.sh --uninstall  remove everything but the database (/var/lib/relayguard)
#   scripts/install.sh --purge      remove everything, database too
# Idempotent: running it again upgrades the package and never overwrites an edited config.
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=/opt/relayguard
ETC=/etc/relayguard
STATE=/var/lib/relayguard
UNIT=/etc/systemd/system/relayguard.service
BIN=/usr/local/bin/relayguard

die() { echo "install.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"

has_systemd() { [ -d /run/systemd/system ]; }

uninstall() {
    if has_systemd && systemctl list-unit-files relayguard.service >/dev/null 2>&1; then
        systemctl disable --now relayguard.service 2>/dev/null || true
    elif [ -f /run/relayguard/relayguard.pid ]; then
        kill "$(cat /run/relayguard/relayguard.pid)" 2>/dev/null || true
    fi
    [ -x "$BIN" ] && "$BIN" flush 2>/dev/null || true
    rm -f "$UNIT" "$BIN"
    has_systemd && systemctl daemon-reload || true
    rm -rf "$PREFIX" "$ETC" /run/relayguard
    echo "relayguard removed (database kept in $STATE)"
}

case "${1:-}" in
    --uninstall) uninstall; exit 0 ;;
    --purge) uninstall; rm -rf "$STATE"; echo "database removed"; exit 0 ;;
    "") ;;
    *) die "unknown option $1 (use --uninstall or --purge)" ;;
esac

APT_PACKAGES=(python3 python3-venv python3-pip python3-nftables nftables iptables iproute2)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x "$PREFIX/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$PREFIX"
"$PREFIX/bin/python" -m pip install -q --disable-pip-version-check --upgrade .
ln -sf "$PREFIX/bin/relayguard" "$BIN"

install -d -m 0755 "$ETC" "$ETC/rules.d"
install -d -m 0700 "$STATE"
if [ ! -e "$ETC/relayguard.toml" ]; then
    install -m 0644 etc/relayguard.toml "$ETC/relayguard.toml"
    echo "installed $ETC/relayguard.toml"
else
    install -m 0644 etc/relayguard.toml "$ETC/relayguard.toml.dist"
    echo "kept your $ETC/relayguard.toml (the shipped default is $ETC/relayguard.toml.dist)"
fi
"$BIN" config check --config "$ETC/relayguard.toml"
echo "relayguard $("$BIN" --version | awk '{print $NF}') installed: $BIN"
