#!/usr/bin/env bash
# Installs relayguard on Debian 12 (as root) and starts it with the default configuration.
#   scripts/install.sh                 install or upgrade, then start (or restart)
#   scripts/install.sh --uninstall     stop it and remove everything but the database (/var/lib/relayguard)
#   scripts/install.sh --purge         the same, database too
#   scripts/install.sh --print-config  print the config a new install would get, change nothing
# What it puts where: apt packages; a venv in /opt/relayguard; /usr/local/bin/relayguard; the config in
# /etc/relayguard (an admin's edited file is never overwritten: the new default lands beside it as
# relayguard.toml.dist); the unit in /etc/systemd/system. Where systemd runs: `systemctl enable --now`.
# Elsewhere (containers): `relayguard run` in the background, PID in /run/relayguard/relayguard.pid,
# log in /var/log/relayguard.log. Idempotent: a second run upgrades the code and restarts the daemon.
# RELAYGUARD_SOURCE=file|journal overrides the choice of log source for a new config (default: auto).
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=/opt/relayguard
ETC=/etc/relayguard
CONF=$ETC/relayguard.toml
SHIPPED=$PREFIX/share/relayguard.toml  # the default this script installed last time: unedited if equal
STATE=/var/lib/relayguard
UNIT=/etc/systemd/system/relayguard.service
BIN=/usr/local/bin/relayguard
RUN=/run/relayguard
PIDFILE=$RUN/relayguard.pid
LOG=/var/log/relayguard.log
APT_PACKAGES=(python3 python3-venv python3-nftables python3-pyinotify nftables iptables)

die() { echo "install.sh: $*" >&2; exit 1; }
has_systemd() { [ -d /run/systemd/system ]; }
bg_pid() {  # the PID of a background daemon started by this script, if it still runs
    local pid
    pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q relayguard "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
}

# The shipped config with the log source for this host: the mail log when rsyslog writes one, else the
# journal when journald runs, else the mail log (the daemon waits for it to appear).
default_config() {
    local source=${RELAYGUARD_SOURCE:-auto}
    if [ "$source" = auto ]; then
        source=file
        if [ ! -e /var/log/mail.log ] && [ -S /run/systemd/journal/socket ]; then source=journal; fi
    fi
    case "$source" in
        file) cat etc/relayguard.toml ;;
        journal) awk '
            /^# --- mail log source/ { blk = "file"; print; next }
            /^# --- journal source/ { blk = "journal"; print; next }
            /^# --- end/ { blk = ""; print; next }
            blk == "file" && !/^#/ { print "# " $0; next }
            blk == "journal" && /^# / { print substr($0, 3); next }
            { print }' etc/relayguard.toml ;;
        *) die "RELAYGUARD_SOURCE must be file, journal or auto, not $source" ;;
    esac
}

stop_daemon() {
    if has_systemd && [ -e "$UNIT" ]; then
        systemctl disable --now relayguard.service 2>/dev/null || true
    fi
    local pid i
    if pid=$(bg_pid); then
        kill "$pid"
        for i in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && die "relayguard (PID $pid) did not stop within 30 s"
    fi
    rm -f "$PIDFILE"
}

uninstall() {
    stop_daemon
    # the bans leave the kernel with the program; the database keeps them for a reinstall
    if [ -x "$BIN" ]; then "$BIN" flush --config "$CONF" >/dev/null 2>&1 || true; fi
    rm -f "$UNIT" "$BIN" "$LOG"
    if has_systemd; then systemctl daemon-reload || true; fi
    if [ -e "$CONF" ] && ! cmp -s "$CONF" "$SHIPPED"; then
        install -d -m 0700 "$STATE"
        cp -p "$CONF" "$STATE/relayguard.toml.saved"
        echo "your edited $CONF is saved as $STATE/relayguard.toml.saved"
    fi
    rm -rf "$PREFIX" "$ETC" "$RUN"
    echo "relayguard removed (database kept in $STATE; --purge removes it)"
}

wait_ready() {  # until `relayguard status` answers, or the daemon died
    local i
    for i in $(seq 1 120); do
        "$BIN" status --config "$CONF" >/dev/null 2>&1 && return 0
        if ! has_systemd && ! bg_pid >/dev/null; then break; fi
        sleep 0.5
    done
    if has_systemd; then systemctl --no-pager status relayguard.service >&2 || true; else tail -n 20 "$LOG" >&2; fi
    die "relayguard did not come up"
}

case "${1:-}" in
    --print-config) default_config; exit 0 ;;
    --uninstall|--purge|"") ;;
    *) die "unknown option $1 (use --uninstall, --purge or --print-config)" ;;
esac
[ "$(id -u)" = 0 ] || die "run as root"
case "${1:-}" in
    --uninstall) uninstall; exit 0 ;;
    --purge) uninstall; rm -rf "$STATE"; echo "database removed"; exit 0 ;;
esac

# shellcheck source=scripts/apt.sh
. scripts/apt.sh
apt_install_missing scripts/install.sh "${APT_PACKAGES[@]}"

# The code: a venv that sees Debian's python3-nftables; built from a copy so the tree stays clean.
[ -x "$PREFIX/bin/python" ] || /usr/bin/python3 -m venv --system-site-packages "$PREFIX"
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
cp -r pyproject.toml README.md relayguard "$src/"
"$PREFIX/bin/python" -m pip install -q --disable-pip-version-check --upgrade "$src"
install -d -m 0755 "$PREFIX/share" "$(dirname "$BIN")"
install -m 0644 README.md "$PREFIX/README.md"
ln -sfn "$PREFIX/bin/relayguard" "$BIN"

# The config: new, or replaced only while nobody edited it (it equals what we shipped last time).
install -d -m 0755 "$ETC" "$ETC/rules.d"
install -d -m 0700 "$STATE"
new=$(mktemp)
default_config > "$new"
if [ ! -e "$CONF" ]; then
    install -m 0644 "$new" "$CONF"
    echo "installed $CONF"
elif cmp -s "$CONF" "$SHIPPED"; then
    install -m 0644 "$new" "$CONF"
    echo "updated $CONF (it was the unedited default)"
elif ! cmp -s "$CONF" "$new"; then
    install -m 0644 "$new" "$CONF.dist"
    echo "kept your $CONF; the new default is $CONF.dist"
fi
install -m 0644 "$new" "$SHIPPED"
rm -f "$new"
"$BIN" config check --config "$CONF"

# The service: the unit always (for when systemd runs); started by systemd, or in the background.
install -d -m 0755 "$(dirname "$UNIT")"
install -m 0644 systemd/relayguard.service "$UNIT"
if has_systemd; then
    systemctl daemon-reload
    systemctl enable --quiet relayguard.service
    systemctl restart relayguard.service
    wait_ready
    echo "relayguard is running under systemd: systemctl status relayguard; stop: systemctl stop relayguard"
else
    stop_daemon
    install -d -m 0755 "$RUN"
    # setsid: its own session, so the terminal closing sends it no SIGHUP (which would mean "reload");
    # cd /: it must not keep this directory busy. exec all the way: $! is the daemon's PID.
    (cd / && exec setsid "$BIN" run --config "$CONF" </dev/null >>"$LOG" 2>&1) &
    echo $! > "$PIDFILE"
    wait_ready
    echo "relayguard is running in the background (no systemd here): PID $(cat "$PIDFILE"), log $LOG"
    echo "stop it with: kill \$(cat $PIDFILE)   or remove it with: scripts/install.sh --uninstall"
fi
"$BIN" status --config "$CONF"
