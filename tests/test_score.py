"""Scoring and deciding as data in, data out: tests/cases/*.toml list hits and the bans they must give.

Each case runs through the same Replay (score -> decide) as `relayguard scan`, with event time
only, so every expectation is exact.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from relayguard.decide import Policy, allowlist
from relayguard.model import Hit, parse_net
from relayguard.scan import Replay
from relayguard.score import Scorer, Window

CASES = sorted((Path(__file__).parent / "cases").glob("*.toml"))
T0 = 1_796_256_000.0
WINDOWS = [Window("short", 600, 10), Window("long", 21600, 24)]  # the defaults


def hits_of(case: dict) -> list[Hit]:
    out = []
    for h in case["hit"]:
        keys = h.get("keys")
        n = len(keys) if keys else h.get("repeat", 1)
        for i in range(n):
            out.append(Hit(T0 + h["t"] + i * h.get("every", 0), h["addr"], h["rule"], "smtp", h["weight"],
                           group=h.get("group"), key=keys[i] if keys else None,
                           repeat_weight=h.get("repeat_weight")))
    return sorted(out, key=lambda x: x.ts) if case.get("sorted", True) else out


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_case(path: Path) -> None:
    case = tomllib.loads(path.read_text())
    nets = tuple(parse_net(n) for n in case.get("ignore", []))
    replay = Replay([], WINDOWS, Policy(ignore=nets), allowlist(nets, ignore_self=False))
    for hit in hits_of(case):
        replay.feed(hit)
    got = sorted((o.ip, at - T0, w, secs) for o in replay.offenders.values() for at, secs, w in o.bans)
    want = sorted((e["addr"], e["at"], e["window"], e["ban"]) for e in case.get("expect", []))
    assert got == want, case["description"]


def test_there_are_cases() -> None:
    assert len(CASES) >= 10


def test_memory_stays_bounded_under_a_flood_of_distinct_addresses() -> None:
    s = Scorer(WINDOWS, max_tracked=5000)
    for i in range(20000):
        s.observe(Hit(T0 + i * 0.01, f"2001:db8::{i:x}", "r", "smtp", 1))
    assert len(s) == 5000 and s.dropped == 15000
    # a real offender among the flood is still caught
    assert s.observe(Hit(T0 + 300, "192.0.2.1", "r", "smtp", 6)) is None
    off = s.observe(Hit(T0 + 301, "192.0.2.1", "r", "smtp", 6))
    assert off is not None and off.score == 12 and off.window == "short"


def test_stale_addresses_are_forgotten_as_time_passes() -> None:
    s = Scorer(WINDOWS)
    for i in range(1000):
        s.observe(Hit(T0, f"198.51.100.{i % 250}", "r", "smtp", 1))
    assert len(s) == 250
    s.observe(Hit(T0 + 21600 + 61, "192.0.2.1", "r", "smtp", 1))
    assert len(s) == 1


def test_score_reports_current_windows() -> None:
    s = Scorer(WINDOWS)
    s.observe(Hit(T0, "192.0.2.1", "a", "smtp", 4))
    s.observe(Hit(T0 + 700, "192.0.2.1", "a", "smtp", 3))
    assert s.score("192.0.2.1") == {"short": 3, "long": 7}
    assert s.score("192.0.2.99") == {"short": 0, "long": 0}


def test_offense_lists_rules_inside_window() -> None:
    s = Scorer(WINDOWS)
    s.observe(Hit(T0, "192.0.2.1", "postfix/relay-denied", "smtp", 5))
    off = s.observe(Hit(T0 + 1, "192.0.2.1", "postfix/pregreet", "smtp", 6))
    assert off is not None
    assert off.rules == {"postfix/relay-denied": 1, "postfix/pregreet": 1}
    assert off.first == T0 and off.events == 2 and off.threshold == 10
    assert len(s) == 0  # the offender starts from zero
