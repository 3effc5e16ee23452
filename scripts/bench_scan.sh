#!/usr/bin/env bash
# Side-by-side: relayguard scan vs fail2ban-regex (Debian's fail2ban 1.0.2, postfix[mode=aggressive]) on a
# generated 1,000,000-line Postfix log with ground truth. Prints lines/s, peak RSS, the ratios and the
# detection checks; writes the figures as Markdown to $BENCH_DIR/benchmarks-scan.md for docs/benchmarks.md.
#   scripts/bench_scan.sh [LINES]       (default 1000000)
set -euo pipefail
cd "$(dirname "$0")/.."
LINES="${1:-1000000}"
PY="${RELAYGUARD_PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || { echo "bench_scan.sh: run scripts/test.sh once first (it creates .venv)" >&2; exit 2; }
command -v fail2ban-regex >/dev/null || { echo "bench_scan.sh: apt-get install fail2ban" >&2; exit 2; }
GENLOG="$(cd .. && pwd)/shared/bench/genlog.py"
WORK="${BENCH_DIR:-/tmp/relayguard-bench}"
mkdir -p "$WORK"
LOG="$WORK/mail-$LINES.log"
[ -s "$LOG.truth.json" ] || python3 "$GENLOG" --lines "$LINES" --seed 1 --out "$LOG"
exec "$PY" scripts/bench_scan.py "$LOG" --out "$WORK/benchmarks-scan.md"
