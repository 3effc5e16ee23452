# Sourced by install.sh, test.sh and demo.sh (from the repository root): Debian packages on demand.
#   apt_install_missing NAME [--private-postfix] PACKAGE...
# Installs those of the packages that are not installed yet, saying so under NAME. With
# --private-postfix, Postfix is preseeded not to configure or start the system's own instance:
# tests and the demo run private ones (never preseed for a real install: the answer would stay).
apt_install_missing() {
    local name=$1 preseed=0 pkg
    shift
    if [ "${1:-}" = --private-postfix ]; then
        preseed=1
        shift
    fi
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ "${#missing[@]}" -gt 0 ] || return 0
    echo "$name: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if [ "$preseed" = 1 ]; then
        echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
