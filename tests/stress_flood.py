"""A flood through the Scorer in a fresh process, so its memory can be measured as the process's own.

    python tests/stress_flood.py ADDRESSES MAX_TRACKED

feeds ADDRESSES distinct addresses with one weak event each (postfix/no-commands-disconnect, weight 1)
over 500 s of log time, with one real offender (postfix/helo-rejected, weight 3) sending an event every
ADDRESSES/20 lines, and prints JSON: the RSS growth, what was tracked and dropped, and at which of the
offender's events each offence came.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from relayguard.model import Hit
from relayguard.parse import load_pack
from relayguard.score import Scorer, Window

OFFENDER = "203.0.113.66"
OFFENDER_EVENTS = 20


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise KeyError("VmRSS")


def main(n: int, max_tracked: int) -> dict[str, object]:
    rules = {r.id: r for r in load_pack("postfix").rules}
    weak, bad = rules["postfix/no-commands-disconnect"], rules["postfix/helo-rejected"]
    assert bad.distinct is None and bad.group is None  # plain weights: the expected event is arithmetic
    scorer = Scorer([Window("short", 600, 10), Window("long", 6 * 3600, 24)], max_tracked)
    every = n // OFFENDER_EVENTS
    base = 1_700_000_000.0
    before = rss()
    started = time.process_time()
    offences: list[int] = []  # which offender event (1-based) completed an offence
    flood_offences = 0
    sent = 0
    for i in range(n):
        ts = base + i * 500 / n
        addr = f"2001:db8:{i >> 16:x}::{i & 0xFFFF:x}"
        if scorer.observe(Hit(ts, addr, weak.id, weak.service, weak.weight)) is not None:
            flood_offences += 1
        if i % every == every // 2:
            sent += 1
            if scorer.observe(Hit(ts, OFFENDER, bad.id, bad.service, bad.weight)) is not None:
                offences.append(sent)
    cpu = time.process_time() - started
    grown = rss() - before
    return {"addresses": n, "max_tracked": max_tracked, "weak_weight": weak.weight, "offender_weight": bad.weight,
            "threshold": 10, "offender_events": sent, "offences_at": offences, "flood_offences": flood_offences,
            "tracked": len(scorer), "dropped": scorer.dropped, "rss_growth": grown,
            "bytes_per_tracked": round(grown / max(1, len(scorer))), "cpu_s": round(cpu, 2),
            "events_per_cpu_s": round((n + sent) / cpu)}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]))))
