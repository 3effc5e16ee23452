#!/usr/bin/env bash
# Regenerates docs/reliability.md: runs the stress suite (`pytest -m stress`) through scripts/test.sh (which
# installs what the tests need on a fresh Debian 12, as root) with larger runs than CI, every stress test
# writing its measured figures as JSON into a run directory, then renders that run with scripts/reliability.py.
#   scripts/reliability.sh [PYTEST ARGS...]
# Larger-than-CI sizes (override through the environment): 1,000 random injection examples per template, a
# 1,000,000-address flood through the daemon. Exits non-zero when a test failed; the document says so too.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN="$(mktemp -d /tmp/rg-reliability-XXXXXX)"
export RELAYGUARD_FIGURES="$RUN/figures"
export RELAYGUARD_STRESS_INJECTION="${RELAYGUARD_STRESS_INJECTION:-1000}"
export RELAYGUARD_STRESS_DAEMON_FLOOD="${RELAYGUARD_STRESS_DAEMON_FLOOD:-1000000}"
export RELAYGUARD_STRESS_FLOOD_RATE="${RELAYGUARD_STRESS_FLOOD_RATE:-10000}"
export RELAYGUARD_STRESS_KILLS="${RELAYGUARD_STRESS_KILLS:-24}"

status=0
scripts/test.sh -m stress -rxX --junitxml="$RUN/junit.xml" "$@" 2>&1 | tee "$RUN/pytest.txt" || status=$?

PY="${RELAYGUARD_TEST_VENV:-.venv}/bin/python"
render=0
"$PY" scripts/reliability.py "$RUN" > "$RUN/reliability.md" || render=$?
if [ -s "$RUN/reliability.md" ]; then
    cp "$RUN/reliability.md" docs/reliability.md
    echo "scripts/reliability.sh: wrote docs/reliability.md (run kept in $RUN)"
fi
[ "$status" -ne 0 ] && exit "$status"
exit "$render"
