"""Hardening (issue 7): hostile input, floods, faults and a hostile control socket, with figures.

Every test records what it tried and measured in a `figures` dict; with RELAYGUARD_FIGURES set
(scripts/reliability.sh does that) they are written as JSON and rendered into docs/reliability.md by
scripts/reliability.py. Assertions are on behaviour and on machine-independent quantities (counts,
growth ratios, memory bounds), never on wall-clock time.

What runs where: parsing and scoring in-process; everything about the daemon against the real
`relayguard run` process, with nftables inside network namespaces made and deleted here, a real
SQLite file, real log files, and a tmpfs in a private mount namespace for the full disk.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any

import netns
import pytest
import stress_control as sc
import stress_daemon as sd
import test_config
import test_injection as inj
from click.testing import CliRunner
from daemon_harness import cli_as, namespace, nft_bans, private_dir, system_group, system_user
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayguard import control
from relayguard import daemon as daemon_mod
from relayguard import parse as parse_mod
from relayguard.cli import main
from relayguard.model import canonical_addr
from relayguard.parse import MAX_LINE, Clock, split_header

pytestmark = pytest.mark.stress

# Bigger runs for scripts/reliability.sh; CI uses the defaults and stays within its time.
INJECTION_RANDOM = int(os.environ.get("RELAYGUARD_STRESS_INJECTION", "200"))
DAEMON_FLOOD = int(os.environ.get("RELAYGUARD_STRESS_DAEMON_FLOOD", "100000"))
FLOOD_RATE = int(os.environ.get("RELAYGUARD_STRESS_FLOOD_RATE", "10000"))  # lines per second
KILL_ROUNDS = int(os.environ.get("RELAYGUARD_STRESS_KILLS", "24"))
MIB = 1 << 20
Scratch = Callable[[str], Path]  # the `scratch` fixture: a private directory per tag, removed afterwards


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[sd.Figures]:
    fig = sd.Figures(request.node.name)
    started = time.monotonic()
    yield fig
    fig["seconds"] = round(time.monotonic() - started, 1)
    fig.save()


@pytest.fixture
def scratch() -> Iterator[Scratch]:
    """Private directories under /tmp (other users may traverse them), removed after the test: a flood
    leaves a 100 MB log and a 300 MB database behind."""
    made: list[Path] = []

    def make(tag: str) -> Path:
        made.append(private_dir(tag))
        return made[-1]

    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def root_namespace_untouched() -> Iterator[None]:
    before = netns.root_snapshot()
    yield
    assert netns.root_snapshot() == before


# ============================================================================================ log injection


def test_injection_random_examples_for_every_rule(figures: sd.Figures) -> None:
    """test_injection.py's property, again with fresh random examples (not the fixed CI sample):
    client-controlled fields full of other addresses in every notation, the server's address and
    #012-escaped fake lines; every hit must name the real client."""
    per_case: dict[str, int] = {}
    wrong_hits: list[tuple[str, str, str]] = []

    def property_for(rule: str, index: int) -> Callable[[], None]:
        matcher = inj.MATCHERS[rule.split("/", 1)[0]]
        key = f"{rule}#{index}"
        per_case[key] = 0

        @settings(max_examples=INJECTION_RANDOM, deadline=None, derandomize=False, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(real=st.sampled_from(inj.REAL), values=inj.field_values(rule, index))
        def check(real: str, values: dict[str, str]) -> None:
            line = inj.render(rule, index, real, values)
            want = canonical_addr(real)
            wrong = [(h.rule, h.addr, line) for h in inj.match_lines(matcher, line) if h.addr != want]
            wrong_hits.extend(wrong)
            assert not wrong, f"{wrong} from {line!r}"
            per_case[key] += 1

        return check

    try:
        for rule, index in inj.CASES:
            property_for(rule, index)()
    finally:
        figures["wrong_address_hits"] = len(wrong_hits)
        figures["first_wrong_hit"] = wrong_hits[0] if wrong_hits else None

    rules = {r for r, _ in inj.CASES}
    fixed = {f"{r}#{i}" for r, i in inj.CASES if not inj.client_fields(r, i)}
    fields = sum(len(inj.client_fields(r, i)) for r, i in inj.CASES)
    figures.update({
        "packs": len(inj.PACKS), "rules": len(rules), "templates": len(inj.CASES), "client_fields": fields,
        "session_rules": sum(1 for p in inj.PACKS.values() for r in p.rules if r.kind != "event"),
        "session_templates": sum(1 for r, i in inj.CASES if "\n" in inj.TEMPLATES[r][i]),
        "notations_ipv4": len(inj.notations(inj.FAKES[0])), "notations_ipv6": len(inj.notations(inj.FAKES[4])),
        "forged_address_spellings": len(inj.OTHER_ADDRS), "tokens": len(inj.TOKENS),
        "ci_examples_per_template": inj.EXAMPLES,
        "ci_lines": inj.EXAMPLES * (len(inj.CASES) - len(fixed)) + len(inj.REAL) * len(fixed),
        "ci_neutral_lines": len(inj.CASES) * len(inj.REAL), "real_addresses": len(inj.REAL),
        "random_examples_per_template": INJECTION_RANDOM, "random_lines": sum(per_case.values()),
        "templates_without_client_fields": len(fixed),
    })
    assert sorted(rules) == sorted(r.id for p in inj.PACKS.values() for r in p.rules if r.kind == "event")
    # hypothesis ran (near) the examples asked for; a template without client text has just its 2 addresses
    assert all(n >= INJECTION_RANDOM // 2 for k, n in per_case.items() if k not in fixed)
    assert all(per_case[k] == len(inj.REAL) for k in fixed)


# ============================================================================================ config


def test_invalid_configs_exit_2_with_one_line(tmp_path: Path, figures: sd.Figures) -> None:
    """Every row of test_config.INVALID through the real `relayguard config check`: exit 2, one line."""
    runner = CliRunner()
    keys = []
    for n, (text, key, fix) in enumerate(test_config.INVALID):
        f = tmp_path / f"bad{n}.toml"
        f.write_text(text)
        res = runner.invoke(main, ["config", "check", "--config", str(f)])
        assert res.exit_code == 2, (text, res.output)
        assert res.stdout == ""
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and str(f) in lines[0] and key in lines[0] and "fix:" in lines[0] and fix in lines[0]
        keys.append(key)
    figures.update({"invalid_configs": len(test_config.INVALID), "exit_2_one_line": len(keys),
                    "keys": sorted(set(keys))})


# ============================================================================================ ReDoS

# Pieces an attacker repeats to make a backtracking engine work: characters the rules repeat, nested
# brackets, separators the rules look for, and fragments that almost complete a match.
ATOMS = ["a", "0", "f", ".", ":", " ", "[", "]", "(", ")", "<", ">", ",", "=", '"', "\\", "@", "/", "-", "_",
         ": ", ", ", ">, ", "a: ", "[1.2.3.4]", "[1.2.3.4]:25 ", "(x) ", "(a)(b)", " from ", " from 1.2.3.4",
         " port 1", ", user=", "user=<", ">, rip=1.2.3.4, lip=1.2.3.4", "x@y [1.2.3.4]", "H=(x) [1.2.3.4] ",
         '"x" ', "#012", "1.1.", "::"]
NESTED = ["(", "[", "<"]
CLOSE = {"(": ")", "[": "]", "<": ">"}
SHORT_SIZES = (450, 900)  # message lengths for Python's re (messages up to 1024 chars use it)
LONG_SIZES = (32_000, 64_000)  # for RE2 (longer messages), still under MAX_LINE
SCREEN_LONG = 8_000


def _fill(piece: str, size: int) -> str:
    if piece in NESTED:  # nested brackets: (((( x ))))
        k = size // 2
        return piece * k + "x" + CLOSE[piece] * k
    return piece * max(1, size // len(piece))


class RedosCase:
    """One template of test_injection.py (a rule and a real line shape) and its adversarial lines."""

    def __init__(self, rule: str, index: int) -> None:
        self.rule, self.index = rule, index
        self.pack = rule.split("/", 1)[0]
        self.matcher = inj.MATCHERS[self.pack]
        self.normal = inj.render(rule, index, inj.REAL[0], {})  # a session template has several lines
        last = self.normal.rsplit("\n", 1)[-1]
        head = split_header(last, Clock())
        assert head is not None
        self.msg = last[head[2]:]
        cut = self.msg.find(inj.REAL[0])
        # almost-matching prefixes: up to the address, the message without its last character, all of it
        self.pieces = [*ATOMS, *NESTED, self.msg[:cut] if cut > 0 else self.msg[:20], self.msg[:-1], self.msg]
        self.places = [*inj.client_fields(rule, index), "<end>", "<addr>"]

    def line(self, piece: str, place: str, size: int) -> str:
        """The normal line with `piece` repeated to about `size` characters in `place` (a field that the
        template names twice gets half each time)."""
        tpl = inj.TEMPLATES[self.rule][self.index]
        names = ("{addr}", "{saddr}", "{oaddr}") if place == "<addr>" else (f"{{{place}}}",)
        fill = _fill(piece, size // max(1, sum(tpl.count(n) for n in names)))
        if place == "<end>":
            return self.normal + fill
        if place == "<addr>":
            return inj.render(self.rule, self.index, fill, {})
        return inj.render(self.rule, self.index, inj.REAL[0], {place: fill})

    def variants(self) -> list[tuple[str, str]]:
        return [(p, w) for p in self.pieces for w in self.places]

    def match(self, text: str) -> list[Any]:
        """Every line of `text` through Matcher.match, in order (as the daemon sees a session)."""
        return inj.match_lines(self.matcher, text)


class Runs:
    """How many times a line went through the matcher, for the figures."""

    count = 0


def _best(fn: Callable[[], object], repeats: int) -> float:
    """The least CPU time of this thread over `repeats` calls: time spent preempted by other work on a
    busy machine is not counted, and what noise remains (caches, interrupts) only ever adds."""
    best = math.inf
    for _ in range(repeats):
        t = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t)
    Runs.count += repeats
    return best


def _interleaved(fn_small: Callable[[], object], fn_big: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(time small, time big), each the minimum over interleaved repeats: noise only ever adds time."""
    small = big = math.inf
    for _ in range(repeats):
        small = min(small, _best(fn_small, 1))
        big = min(big, _best(fn_big, 1))
    return small, big


def _redos_case(case: RedosCase) -> dict[str, Any]:
    """Screens every variant of one template at a middle size, then measures the slowest: on RE2 (long
    lines, every place) from 32 to 64 KiB by match and by scan; on Python's re (short lines, the fields
    a client writes) from 450 to 900 characters."""
    m, match = case.matcher, case.match
    normal_t = _best(lambda: match(case.normal), 30)
    worst_long: tuple[float, str, str] = (0.0, "", "")
    worst_short: tuple[float, str, str] = (0.0, "", "")
    attacker = set(inj.client_fields(case.rule, case.index)) or {"<end>"}  # where a client writes (short lines)
    for piece, place in case.variants():
        mid = case.line(piece, place, SCREEN_LONG)
        worst_long = max(worst_long, (_best(lambda mid=mid: match(mid), 2) / len(mid), piece, place))
        if place in attacker:
            short = case.line(piece, place, SHORT_SIZES[1] - len(case.normal))
            worst_short = max(worst_short, (_best(lambda short=short: match(short), 3), piece, place))
    _, piece, place = worst_long
    a, b = (case.line(piece, place, n) for n in LONG_SIZES)
    assert max(len(x.encode()) for x in b.split("\n")) < MAX_LINE
    ab, bb = a.encode() + b"\n", b.encode() + b"\n"
    scale = len(b) / len(a)  # ~2: the growth of a linear engine
    # The line of twice the length against the short line twice in a row: the same work for a linear
    # engine, so both runs are equally long and equally exposed to whatever the machine does meanwhile.
    growth = math.inf
    for _ in range(5):  # a spoiled measurement is repeated; a superlinear rule fails every time
        ta2, tb = _interleaved(lambda: (match(a), match(a)), lambda: match(b), 7)
        sa2, sb = _interleaved(lambda: list(m.scan(ab + ab)), lambda: list(m.scan(bb)), 7)
        growth = min(growth, 2 * max(tb / ta2, sb / sa2) / scale * 2)
        if growth < 3:
            break
    _, spiece, splace = worst_short
    s1, s2 = (case.line(spiece, splace, n - len(case.normal)) for n in SHORT_SIZES)
    ts1x2, ts2 = _interleaved(lambda: (match(s1), match(s1)), lambda: match(s2), 9)
    return {"rule": case.rule, "pack": case.pack, "index": case.index, "long_piece": piece, "long_place": place,
            "long_growth": growth, "long_per_byte_x": max(tb, sb) / len(b) / (normal_t / len(case.normal)),
            "short_piece": spiece, "short_place": splace, "short_growth": 2 * ts2 / ts1x2, "short_s": ts2,
            "short_x": ts2 / normal_t, "short_example": s2}


def test_redos_every_rule_stays_linear_on_adversarial_lines(figures: sd.Figures) -> None:
    """Adversarial lines up to 64 KiB for every rule, through Matcher.match and Matcher.scan.

    Messages over 1024 characters go to RE2: there the time must grow linearly (doubling the line at
    most triples the time, measured against the shorter line run twice, min of repeats). Up to 1024
    characters Python's re runs; growth there is reported (a superlinear rule is named with its input),
    and the worst line may cost at most a bounded multiple of a normal line (exponential backtracking
    would be millions)."""
    Runs.count = 0
    cases = [RedosCase(r, i) for r, i in inj.CASES]
    results = [_redos_case(c) for c in cases]
    per_pack: dict[str, dict[str, Any]] = {}
    for r in results:
        pk = per_pack.setdefault(r["pack"], {"rules": set(), "templates": 0, "worst_long_per_byte_x": 0.0,
                                             "worst_long_rule": "", "worst_long_growth": 0.0,
                                             "worst_short_line_x": 0.0, "worst_short_rule": ""})
        pk["rules"].add(r["rule"])
        pk["templates"] += 1
        pk["worst_long_growth"] = max(pk["worst_long_growth"], round(r["long_growth"], 2))
        if r["long_per_byte_x"] > pk["worst_long_per_byte_x"]:
            pk["worst_long_per_byte_x"], pk["worst_long_rule"] = round(r["long_per_byte_x"], 2), r["rule"]
        if r["short_x"] > pk["worst_short_line_x"]:
            pk["worst_short_line_x"], pk["worst_short_rule"] = round(r["short_x"], 1), r["rule"]
    for pk in per_pack.values():
        pk["rules"] = len(pk["rules"])
    nonlinear_long = [{"rule": r["rule"], "piece": r["long_piece"][:40], "place": r["long_place"],
                       "growth": round(r["long_growth"], 2)} for r in results if r["long_growth"] >= 3]
    superlinear_short = [
        {"rule": r["rule"], "template": r["index"], "field": r["short_place"], "piece": r["short_piece"][:40],
         "growth_450_to_900": round(r["short_growth"], 2), "us_at_900": round(r["short_s"] * 1e6),
         "x_normal_line": round(r["short_x"]), "example": r["short_example"][:300]}
        for r in results if r["short_growth"] >= 3 and r["short_s"] > 50e-6]
    worst_short = max(r["short_x"] for r in results)
    figures.update({
        "templates": len(cases), "rules": sum(p["rules"] for p in per_pack.values()),
        "pieces": len(cases[0].pieces), "variants": sum(len(c.variants()) for c in cases),
        "matcher_runs": Runs.count, "long_sizes": list(LONG_SIZES), "short_sizes": list(SHORT_SIZES),
        "screen_sizes": [SCREEN_LONG, SHORT_SIZES[1]], "re_up_to": parse_mod._SHORT, "max_line": MAX_LINE,
        "worst_long_per_byte_x_normal": round(max(r["long_per_byte_x"] for r in results), 2),
        "worst_long_growth_2x_length": round(max(r["long_growth"] for r in results), 2),
        "worst_short_line_x_normal": round(worst_short, 1),
        "per_pack": per_pack, "superlinear_under_1024": superlinear_short, "nonlinear_over_1024": nonlinear_long,
    })
    # A linear engine measures ~2 here and a quadratic one ~4; the report above flags anything from 3.
    # The assertion leaves room for a machine shared with other jobs (4.5 was seen under load from a
    # linear RE2 rule) and still fails for anything that grows faster than quadratically.
    assert [r for r in nonlinear_long if r["growth"] >= 6] == []
    assert worst_short < 5000  # a bounded cost per short line: no exponential backtracking


# ============================================================================================ floods


def _scorer_flood(n: int, max_tracked: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("stress_flood.py")), str(n), str(max_tracked)],
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout)


def test_flood_of_a_million_addresses_through_the_scorer(figures: sd.Figures) -> None:
    """1,000,000 distinct addresses, one weak event each, within one window, with a real offender in the
    middle of it: memory stays under 400 bytes per address (and under the max_tracked cap when one
    is set), no flood address is banned, and the offender is caught at exactly the event that
    brings it to the threshold (every 4th event of weight 3 against 10), every time."""
    full = _scorer_flood(1_000_000, 1_000_000)
    capped = _scorer_flood(1_000_000, 100_000)
    starved = _scorer_flood(1_000_000, 20_000)  # the offender's events are 50,000 addresses apart
    expected = list(range(4, full["offender_events"] + 1, 4))
    figures.update({"default": full, "capped": capped, "cap_below_spacing": starved,
                    "bound_bytes_per_address": 400, "bound_capped_bytes": 60 * MIB})
    for run in (full, capped):
        assert run["flood_offences"] == 0
        assert run["offences_at"] == expected
    assert full["tracked"] == 1_000_000 and full["dropped"] == 0
    assert full["rss_growth"] < 400 * 1_000_000
    assert capped["tracked"] == 100_000 and capped["dropped"] == 900_000
    assert capped["rss_growth"] < 60 * MIB
    assert starved["tracked"] == 20_000


def helo_rejected(addr: str, when: float) -> str:
    """postfix/helo-rejected, weight 3 (no distinct key): the 4th inside the window bans."""
    return (f"{sd.stamp(when)} mx postfix/smtpd[77]: NOQUEUE: reject: RCPT from unknown[{addr}]: 504 5.5.2 <bot>: "
            f"Helo command rejected: need fully-qualified hostname; from=<a@example.org> to=<b@example.net> "
            f"proto=ESMTP helo=<bot>\n")


def _daemon_flood(root: Path, n: int, rate: int | None) -> dict[str, Any]:
    """`n` flood addresses (one weak event each) plus an offender's 20 events as log lines appended to a file
    the real daemon follows (dry-run firewall): `rate` lines per second, or all at once (a backlog)."""
    offender, spread = "203.0.113.66", 500.0  # seconds of log time the flood covers
    every = n // 20
    log = root / "mail.log"
    log.touch()
    d = sd.Daemon(sd.write_config(root, log))
    try:
        d.wait_ready()
        ready_rss = d.rss()
        base = time.time() - spread - 30
        offender_times: list[int] = []
        started = time.monotonic()
        batch = n if rate is None else max(1, rate // 10)
        with log.open("a") as fh:
            buf = []
            for i in range(n):
                when = base + i * spread / n
                buf.append(sd.no_commands(sd.flood_addr(i), when))
                if i % every == every // 2:
                    offender_times.append(int(when))
                    buf.append(helo_rejected(offender, when))
                if len(buf) >= batch:
                    fh.write("".join(buf))
                    fh.flush()
                    buf.clear()
                    if rate is not None:  # keep to the rate: sleep until this batch is due
                        time.sleep(max(0.0, started + (i + 1) / rate - time.monotonic()))
            fh.write("".join(buf))
        total = n + len(offender_times)

        def done() -> dict[str, Any] | None:
            st = d.request("status")
            return st if st["sources"][0]["lines"] >= total and st["database"]["events"] >= total else None

        st = sd.wait_until(done, timeout=900, what=f"{total} lines read and stored", every=0.5)
        took = time.monotonic() - started
        bans = d.request("list")
        history = d.request("why", addr=offender)["history"]
        peak, now_rss = d.status("VmHWM"), d.rss()
    finally:
        d.stop()
    offences = sorted(_epoch(h["banned_at"]) for h in history)
    expected = [offender_times[k - 1] for k in (4, 8, 12, 16, 20)]
    return {"lines": total, "addresses": n, "rate_lines_per_s": rate or "all at once",
            "seconds_to_read_and_store": round(took, 1), "lines_per_s": round(total / took),
            "rss_ready": ready_rss, "rss_after": now_rss, "rss_peak": peak, "tracked": st["tracked"],
            "stored_events": st["database"]["events"], "banned": [b["ip"] for b in bans],
            "offender_count": bans[0]["count"] if bans else 0, "offender_events": len(offender_times),
            "offences_at_event_times": offences == expected}


def _check_flood(run: dict[str, Any], n: int) -> None:
    assert run["banned"] == ["203.0.113.66"]  # the offender, and nobody from the flood
    assert run["offender_count"] == 5  # events 4, 8, 12, 16 and 20 each made an offence
    assert run["offences_at_event_times"]  # ... at the time of exactly those lines
    assert run["tracked"] >= n  # every flood address still scored (none evicted below the default cap)


def test_flood_through_the_daemon_streamed(figures: sd.Figures, scratch: Scratch) -> None:
    """The flood as log lines at a steady rate into a file the real daemon follows: every line read
    and stored, the offender banned at its 4th event and again at every 4th, nobody else banned,
    and the daemon's peak memory under 160 MiB + 400 bytes per flood address."""
    n = DAEMON_FLOOD
    run = _daemon_flood(scratch("flood"), n, FLOOD_RATE)
    bound = 160 * MIB + 400 * n
    figures.update({**run, "bound_peak": bound})
    _check_flood(run, n)
    assert run["rss_peak"] < bound


def test_flood_through_the_daemon_as_a_backlog(figures: sd.Figures, scratch: Scratch) -> None:
    """The same lines written all at once (a daemon catching up on a big log): same verdicts, and the
    same memory bound as the stream: hits read ahead of SQLite are flushed in batches, so the backlog
    itself does not pile up in memory."""
    n = DAEMON_FLOOD
    run = _daemon_flood(scratch("flood"), n, None)
    bound = 160 * MIB + 400 * n
    figures.update({**run, "bound_peak": bound})
    _check_flood(run, n)
    assert run["rss_peak"] < bound


def _epoch(iso_text: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso_text).timestamp())


_LATENCY = """
import socket, statistics, time
def handle(req):
    medians = []
    for _ in range(req["batches"]):
        times = []
        for _ in range(req["per_batch"]):
            t = time.perf_counter()
            with socket.create_connection((req["dst"], req["port"]), timeout=2, source_address=(req["src"], 0)):
                pass
            times.append(time.perf_counter() - t)
        medians.append(statistics.median(times) * 1e6)
    return medians
"""
PORT = 2526


def _latency(agent: netns.Agent, dst: str, src: str) -> dict[str, Any]:
    """Connect latency (µs) from the client namespace: the median of each batch of 50 connects; the
    smallest batch median stands for the path (noise on a busy machine only ever adds time)."""
    medians = agent.call(dst=dst, src=src, port=PORT, batches=6, per_batch=50)
    return {"batches": 6, "per_batch": 50, "batch_medians_us": [round(m) for m in medians],
            "best_median_us": round(min(medians))}


def _bulk(n: int) -> list[str]:
    """n documentation addresses: 2 x 254 IPv4 (198.51.100.0/24, 203.0.113.0/24), the rest IPv6."""
    v4 = [str(a) for net in ("198.51.100.0/24", "203.0.113.0/24") for a in ipaddress.ip_network(net).hosts()]
    base = int(ipaddress.IPv6Address("2001:db8:100::"))
    v6 = [str(ipaddress.IPv6Address(base + i * 65537)) for i in range(n - len(v4) - 1)]
    return [*v4, netns.OTHER6, *v6]


@pytest.mark.netns
def test_100000_bans_daemon_memory_and_set_lookup(figures: sd.Figures, scratch: Scratch) -> None:
    """100,000 active bans in nftables inside a namespace: the daemon's memory with them, and packets
    still meet four set lookups (the chain does not grow with the bans), so connecting from a client
    namespace costs the same with 0 and with 100,000 elements; banned addresses are dropped."""
    bulk = _bulk(100_000)
    assert len(set(bulk)) == 100_000 and netns.OTHER4 in bulk and netns.CLIENT4 not in bulk
    root = scratch("bans")
    cfg = sd.write_config(root, None, firewall="nftables")
    with netns.pair("bans") as p, netns.listener(p.server, PORT), netns.Agent(p.client, _LATENCY) as lat, \
            netns.Prober(p.client) as probe:
        d = sd.Daemon(cfg, p.server)
        try:
            d.wait_ready()
            empty = {"v4": _latency(lat, p.server4, p.client4), "v6": _latency(lat, p.server6, p.client6)}
            rss_empty = d.rss()
            t = time.monotonic()
            res = d.request("ban", addrs=bulk, seconds=86400, reason="stress: 100,000 bans")
            ban_s = time.monotonic() - t
            assert res["banned"] == 100_000
            rss_after_ban = d.rss()
            sizes = {name: sd.set_size(p.server, name) for name in ("banned4", "banned6", "nets4", "nets6")}
            rules = sd.chain_rules(p.server)
            full = {"v4": _latency(lat, p.server4, p.client4), "v6": _latency(lat, p.server6, p.client6)}
            dropped = [not probe.connect(p.server4, PORT, src=p.other4), not probe.connect(p.server6, PORT,
                                                                                            src=p.other6)]
            passed = [probe.connect(p.server4, PORT, src=p.client4), probe.connect(p.server6, PORT, src=p.client6)]
        finally:
            d.stop()
        # a restart with 100,000 bans in the database and the kernel: reconcile, then steady memory
        t = time.monotonic()
        d = sd.Daemon(cfg, p.server)
        try:
            d.wait_for("daemon_ready", timeout=300)
            restart_s = time.monotonic() - t
            rss_restarted = d.rss()
            reconciled = d.events("firewall_reconciled")[-1]
            kernel = nft_bans(p.server)
            listed = len(d.request("list"))
        finally:
            d.stop()
    ratio = {fam: full[fam]["best_median_us"] / max(1, empty[fam]["best_median_us"]) for fam in ("v4", "v6")}
    figures.update({"bans": len(bulk), "ban_request_s": round(ban_s, 2), "set_elements": sizes,
                    "chain_rules": rules, "rss_no_bans": rss_empty, "rss_after_bulk_ban": rss_after_ban,
                    "rss_after_restart_with_bans": rss_restarted, "restart_to_ready_s": round(restart_s, 2),
                    "reconciled": {k: reconciled[k] for k in ("added", "removed", "active")},
                    "latency_0_elements": empty, "latency_100000_elements": full,
                    "latency_ratio": {k: round(v, 2) for k, v in ratio.items()},
                    "banned_dropped": dropped, "others_pass": passed})
    assert sizes["banned4"] + sizes["banned6"] == 100_000 and sizes["nets4"] == sizes["nets6"] == 0
    assert len(rules) == 4 and all("saddr @" in r and r.endswith("drop") for r in rules)  # set lookups only
    assert dropped == [True, True] and passed == [True, True]
    assert kernel == set(bulk) and listed == 100_000
    assert reconciled["active"] == 100_000 and reconciled["removed"] == 0
    assert max(ratio.values()) < 10  # the same order of magnitude: a hash lookup, not a scan of 100,000


# ============================================================================================ faults


def _attacker(k: int) -> str:
    return f"203.0.113.{k + 1}" if k < 200 else f"2001:db8:a::{k:x}"


def _innocent(k: int) -> str:
    return f"2001:db8:b::{k:x}"


class Writer(threading.Thread):
    """Appends to the log non-stop (open, append, close, as syslog does): per attacker two relay-denied
    lines (5 + 5: banned) around a noise line and an innocent's single weak event."""

    def __init__(self, log: Path) -> None:
        super().__init__(daemon=True)
        self.log = log
        self.attackers = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            with self.log.open("a") as fh:
                for _ in range(3):
                    k = self.attackers
                    fh.write(sd.relay_denied(_attacker(k), 2 * k) + sd.noise(k) + sd.no_commands(_innocent(k))
                             + sd.relay_denied(_attacker(k), 2 * k + 1))
                    self.attackers += 1
            time.sleep(0.025)

    def stop(self) -> int:
        self.halt.set()
        self.join(10)
        return self.attackers


@pytest.mark.netns
def test_kill_9_at_random_points_loses_no_ban_and_counts_no_line_twice(figures: sd.Figures, scratch: Scratch) -> None:
    """The daemon (nftables, in a namespace) is killed with SIGKILL at random moments, from just after
    exec to well after start-up, while lines stream in. After a final start: every attacker is banned
    in the kernel and the database and nobody else is, kernel equals database, no (file, line) is
    stored twice, every innocent's single event is stored exactly once, and no ban was counted twice."""
    seed = int(os.environ.get("RELAYGUARD_STRESS_SEED", secrets.randbits(32)))
    rng = random.Random(seed)
    root = scratch("kill")
    log = root / "mail.log"
    log.touch()
    cfg = sd.write_config(root, log, firewall="nftables", socket=False)
    db = root / "state" / "relayguard.db"
    rounds: list[dict[str, Any]] = []
    with namespace("kill") as ns:
        writer = Writer(log)
        writer.start()
        try:
            for _ in range(KILL_ROUNDS):
                delay = rng.uniform(0.05, 1.5)
                d = sd.Daemon(cfg, ns)
                time.sleep(delay)
                ready = bool(d.events("daemon_ready"))
                d.kill()
                rounds.append({"after_s": round(delay, 2), "was_ready": ready, "exit": d.proc.returncode,
                               "bans_applied": len(d.events("ban_applied"))})
                time.sleep(rng.uniform(0, 0.3))  # down for a moment while lines keep coming
        finally:
            attackers = writer.stop()
        want = {_attacker(k) for k in range(attackers)}
        d = sd.Daemon(cfg, ns)
        try:
            d.wait_for("daemon_ready")
            sd.wait_until(lambda: nft_bans(ns) >= want, timeout=120, what=f"{len(want)} attackers banned")
            sd.wait_until(lambda: sd.db_query(db, "SELECT count(*) FROM hits WHERE addr LIKE '2001:db8:b::%'")[0][0]
                          >= attackers, timeout=60, what="every innocent event stored")
        finally:
            rc = d.stop()
        kernel = nft_bans(ns)
    stored = sd.db_active_bans(db)
    dup_lines = sd.db_query(db, "SELECT source, lineno, count(*) FROM hits GROUP BY source, lineno HAVING count(*) > 1")
    innocents = sd.db_query(db, "SELECT addr, count(*) FROM hits WHERE addr LIKE '2001:db8:b::%' GROUP BY addr")
    recounted = sd.db_query(db, "SELECT net, count FROM bans WHERE count != 1")
    history = sd.db_query(db, "SELECT count(*), count(DISTINCT net) FROM ban_history")[0]
    figures.update({"seed": seed, "kills": len(rounds), "killed_before_ready": sum(not r["was_ready"] for r in rounds),
                    "killed_after_ready": sum(r["was_ready"] for r in rounds), "rounds": rounds,
                    "lines_written": attackers * 4, "attackers": attackers, "innocents": attackers,
                    "kernel_bans": len(kernel), "database_bans": len(stored),
                    "kernel_equals_database": kernel == stored,
                    "duplicate_lines": len(dup_lines), "innocents_stored_once": sum(1 for _, c in innocents if c == 1),
                    "bans_counted_twice": len(recounted), "history_rows": history[0], "final_exit": rc})
    assert len(rounds) >= 20 and all(r["exit"] == -9 for r in rounds)
    assert rc == 0
    assert kernel == stored == want  # no ban lost, nobody else banned, kernel = database
    assert dup_lines == []
    assert len(innocents) == attackers and all(c == 1 for _, c in innocents)
    assert recounted == [] and history == (attackers, attackers)


class Holder:
    """A process that owns a private mount namespace (inside network namespace `ns`) with a small tmpfs on
    `mnt`, so daemons can come and go on the same filesystem; nothing is mounted on the host."""

    def __init__(self, ns: str, mnt: Path, size: str) -> None:
        self.mnt = mnt
        script = f"mount -t tmpfs -o size={size},mode=0700 tmpfs {mnt} && echo mounted && exec sleep 3600"
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private",
                                      "sh", "-c", script], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "mounted"
        self.prefix = ("nsenter", "-t", str(self.proc.pid), "-m", "-n", "--")

    def sh(self, script: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.prefix, "sh", "-c", script], capture_output=True, text=True, check=check,
                              timeout=120)

    def query(self, sql: str) -> list[Any]:
        """Read the database on the tmpfs (read-only, from inside the mount namespace)."""
        code = textwrap.dedent(f"""
            import json, sqlite3
            con = sqlite3.connect("file:{self.mnt}/relayguard.db?mode=ro", uri=True, timeout=10)
            print(json.dumps(con.execute({sql!r}).fetchall()))
        """)
        out = subprocess.run([*self.prefix, sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, timeout=60)
        return json.loads(out.stdout)

    def free_kib(self) -> int:
        return int(self.sh(f"df -k --output=avail {self.mnt} | tail -1", check=True).stdout)

    def close(self) -> None:
        self.proc.kill()  # our own child, by PID; the tmpfs goes with its mount namespace
        self.proc.wait(10)


@pytest.mark.netns
def test_full_state_filesystem_still_bans_says_so_and_recovers(figures: sd.Figures, scratch: Scratch) -> None:
    """The state directory on a 3 MiB tmpfs (a private mount namespace), filled up while the daemon runs:
    offenders are still banned in the kernel (automatic and manual bans), store_write_failed is logged
    as one clear line, the daemon keeps answering, and once space returns the events and the bans it
    held are stored. Then a restart: the bans decided while the disk was full are still there."""
    root = scratch("full")
    log = root / "mail.log"
    log.touch()
    state = root / "state"
    state.mkdir()
    cfg = sd.write_config(root, log, firewall="nftables", state_dir=state)
    before, during, after = "203.0.113.31", "203.0.113.32", "203.0.113.33"
    manual = "198.51.100.32"
    with namespace("full") as ns:
        holder = Holder(ns, state, "3m")
        try:
            d = sd.Daemon(cfg, prefix=holder.prefix)
            d.wait_ready()
            with log.open("a") as fh:
                fh.write("".join(sd.no_commands(_innocent(k)) for k in range(200)))
                fh.write(sd.relay_denied(before, 1) + sd.relay_denied(before, 2))
            sd.wait_until(lambda: d.request("status")["database"]["events"] >= 202, what="first events stored")
            filled = holder.sh(f"cat /dev/zero > {state}/filler")
            free_when_full = holder.free_kib()
            with log.open("a") as fh:
                fh.write("".join(sd.no_commands(_innocent(k)) for k in range(200, 3200)))
                fh.write(sd.relay_denied(during, 3) + sd.relay_denied(during, 4))
            d.wait_for("ban_applied", lambda e: e["addr"] == during)
            d.wait_for("store_write_failed")
            manual_reply = d.request("ban", addrs=[manual], seconds=3600, reason="banned on a full disk")
            kernel_full = nft_bans(ns)
            status_full = d.request("status")
            alive_full = d.proc.poll() is None
            holder.sh(f"rm -f {state}/filler", check=True)
            sd.wait_until(lambda: d.request("status")["database"]["events"] >= 3204, timeout=60,
                          what="the held events stored once space returned")
            with log.open("a") as fh:
                fh.write(sd.relay_denied(after, 5) + sd.relay_denied(after, 6))
            d.wait_for("ban_applied", lambda e: e["addr"] == after)

            def stored() -> set[str]:
                return {r[0] for r in holder.query("SELECT net FROM bans WHERE active = 1")}

            # the bans refused while full are written once the database takes writes again (asserted below,
            # after the figures are recorded)
            with suppress(AssertionError):
                sd.wait_until(lambda: {before, during, after, manual} <= stored(), timeout=20,
                              what="every ban in the database after recovery")
            stored_after_recovery = stored()
            events_after = d.request("status")["database"]["events"]
            errors = d.events("store_write_failed")
            assert d.stop() == 0
            d = sd.Daemon(cfg, prefix=holder.prefix)
            d.wait_for("daemon_ready")
            kernel_restarted = nft_bans(ns)
            d.stop()
        finally:
            holder.close()
    lost = sorted({during, manual} - kernel_restarted)
    figures.update({
        "tmpfs": "3 MiB", "filler_exit": filled.returncode, "free_kib_when_full": free_when_full,
        "store_write_failed_events": len(errors), "error": errors[0]["error"],
        "banned_in_kernel_while_full": sorted({during, manual} & kernel_full),
        "manual_ban_reply_while_full": manual_reply, "status_answered_while_full": bool(status_full),
        "events_stored_after_recovery": events_after, "in_database_after_recovery": sorted(stored_after_recovery),
        "kernel_after_restart": sorted(kernel_restarted), "lost_at_restart": lost,
    })
    assert filled.returncode != 0 and free_when_full == 0  # the filesystem really was full
    assert {during, manual} <= kernel_full  # still enforced
    assert alive_full and status_full["state"] == "running"
    assert all("\n" not in e["error"] and "database or disk is full" in e["error"] for e in errors)
    assert {before, during, after, manual} <= stored_after_recovery  # the refused bans were written later
    assert lost == [] and {before, after} <= kernel_restarted


@pytest.mark.netns
def test_corrupt_database_is_moved_aside_and_rebuilt_from_the_kernel(figures: sd.Figures, scratch: Scratch) -> None:
    """1,000 manual and 2 automatic bans, the daemon stopped, its database overwritten with garbage: the
    next start moves the file aside, rebuilds the bans from the kernel, and kernel equals database."""
    root = scratch("corrupt")
    log = root / "mail.log"
    log.touch()
    cfg = sd.write_config(root, log, firewall="nftables")
    db = root / "state" / "relayguard.db"
    manual = [f"2001:db8:c0::{i:x}" for i in range(1, 1001)]
    auto = ["203.0.113.41", "2001:db8:41::1"]
    with namespace("corrupt") as ns:
        d = sd.Daemon(cfg, ns)
        try:
            d.wait_ready()
            d.request("ban", addrs=manual, seconds=7200, reason="before the damage")
            with log.open("a") as fh:
                fh.write("".join(sd.relay_denied(a, n) for n in range(2) for a in auto))
            for a in auto:
                d.wait_for("ban_applied", lambda e, a=a: e["addr"] == a)
        finally:
            assert d.stop() == 0
        size = db.stat().st_size
        db.write_bytes(secrets.token_bytes(size))  # every page garbage, header included
        for extra in ("-wal", "-shm"):
            Path(f"{db}{extra}").unlink(missing_ok=True)
        d = sd.Daemon(cfg, ns)
        try:
            moved = d.wait_for("store_corrupt_moved")[0]
            rebuilt = d.wait_for("database_rebuilt_from_kernel")[0]
            d.wait_for("daemon_ready")
            listed = {b["ip"] for b in d.request("list")}
        finally:
            assert d.stop() == 0
        kernel = nft_bans(ns)
    stored = sd.db_active_bans(db)
    aside = list(db.parent.glob("relayguard.db.corrupt-*"))
    figures.update({"bans_before": len(manual) + len(auto), "database_bytes_overwritten": size,
                    "moved_to": Path(moved["moved_to"]).name, "rebuilt_from_kernel": rebuilt["bans"],
                    "kernel_bans": len(kernel), "database_bans": len(stored),
                    "kernel_equals_database": kernel == stored})
    assert len(aside) == 1
    assert rebuilt["bans"] == len(manual) + len(auto)
    assert kernel == stored == listed == set(manual) | set(auto)


TAMPERING = [
    ("table deleted", ("delete", "table", "inet", "relayguard")),
    ("ruleset flushed", ("flush", "ruleset")),
    ("table flushed", ("flush", "table", "inet", "relayguard")),
]


@pytest.mark.netns
def test_nft_table_deleted_or_flushed_is_restored(figures: sd.Figures, scratch: Scratch) -> None:
    """Someone deletes relayguard's table, flushes the whole ruleset, or flushes the table's rules inside
    the daemon's namespace: the daemon puts table, rules and every active ban back. (A flushed set, with
    table and rules intact, is reported as found: the watch looks at the table and rules only.)"""
    root = scratch("tamper")
    log = root / "mail.log"
    log.touch()
    cfg = sd.write_config(root, log, firewall="nftables")
    manual = [f"2001:db8:d0::{i:x}" for i in range(1, 501)] + ["198.51.100.0/24"]
    auto = "203.0.113.51"
    results: dict[str, dict[str, Any]] = {}
    with namespace("tamper") as ns:
        d = sd.Daemon(cfg, ns)
        try:
            d.wait_ready()
            d.request("ban", addrs=manual, seconds=7200, reason="before tampering")
            with log.open("a") as fh:
                fh.write(sd.relay_denied(auto, 1) + sd.relay_denied(auto, 2))
            d.wait_for("ban_applied", lambda e: e["addr"] == auto)
            want = nft_bans(ns)
            assert want == {*manual, auto}
            for what, argv in [*TAMPERING, ("set flushed", ("flush", "set", "inet", "relayguard", "banned6"))]:
                restored_before = len(d.events("firewall_restored"))
                sd.nft(ns, *argv)
                t = time.monotonic()
                try:
                    sd.wait_until(lambda: nft_bans(ns) == want and len(sd.chain_rules(ns)) == 4,
                                  timeout=12, what=f"restore after {what}", every=0.2)
                    took: float | None = round(time.monotonic() - t, 1)
                except AssertionError:
                    took = None
                results[what] = {"restored": took is not None, "seconds": took,
                                 "firewall_restored_logged": len(d.events("firewall_restored")) > restored_before}
        finally:
            d.stop()
    figures.update({"bans": len(want), "watch_every_s": daemon_mod.WATCH_EVERY, "cases": results})
    for what, _ in TAMPERING:
        assert results[what]["restored"] and results[what]["firewall_restored_logged"], what


def test_log_file_deleted_replaced_unreadable_with_the_daemon(figures: sd.Figures, scratch: Scratch) -> None:
    """The real daemon (dry-run, without CAP_DAC_OVERRIDE so file modes bind it) follows a log that is
    deleted, replaced by another file, and replaced by a file it may not read: each is warned about,
    and each time the daemon recovers by itself, proven by the offender written next being banned."""
    root = scratch("logfaults")
    log = root / "mail.log"
    log.touch()
    cfg = sd.write_config(root, log)
    offenders = {"following": "203.0.113.61", "deleted": "203.0.113.62", "replaced": "203.0.113.63",
                 "unreadable": "203.0.113.64"}
    steps: dict[str, dict[str, Any]] = {}

    def offend(path: Path, addr: str, mode: str = "a") -> None:
        with path.open(mode) as fh:
            fh.write(sd.noise(1) + sd.relay_denied(addr, 1) + sd.relay_denied(addr, 2))

    d = sd.Daemon(cfg, prefix=("setpriv", "--bounding-set=-dac_override,-dac_read_search"))
    try:
        d.wait_ready()
        offend(log, offenders["following"])
        d.wait_for("ban_applied", lambda e: e["addr"] == offenders["following"])

        log.unlink()
        warned = d.wait_for("source_missing")[-1]
        state = d.request("status")["sources"][0]["state"]
        offend(log, offenders["deleted"], "w")
        d.wait_for("ban_applied", lambda e: e["addr"] == offenders["deleted"])
        steps["deleted"] = {"warning": warned["event"], "state": state, "recovered": True}

        new = root / "mail.log.new"
        offend(new, offenders["replaced"], "w")
        os.replace(new, log)
        d.wait_for("ban_applied", lambda e: e["addr"] == offenders["replaced"])
        steps["replaced"] = {"warning": None, "state": d.request("status")["sources"][0]["state"], "recovered": True}

        fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o000)  # logrotate `create 0000`
        os.close(fd)
        offend(new, offenders["unreadable"])
        os.replace(new, log)
        warned = d.wait_for("source_unreadable")[-1]
        state = d.request("status")["sources"][0]["state"]
        assert not d.events("ban_applied", lambda e: e["addr"] == offenders["unreadable"])  # it really cannot read
        log.chmod(0o640)
        d.wait_for("ban_applied", lambda e: e["addr"] == offenders["unreadable"])
        back = d.wait_for("source_available", lambda e: e.get("was") == "unreadable")[-1]
        steps["unreadable"] = {"warning": warned["event"], "error": warned.get("error"), "state": state,
                               "recovered": back["event"]}
        bans = {b["ip"] for b in d.request("list")}
        hits = {a: len(d.request("why", addr=a)["events"]) for a in offenders.values()}
    finally:
        assert d.stop() == 0
    figures.update({"steps": steps, "bans": sorted(bans), "events_per_offender": hits})
    assert steps["deleted"]["state"] == "missing" and steps["unreadable"]["state"] == "unreadable"
    assert "Permission denied" in (steps["unreadable"]["error"] or "")
    assert bans == set(offenders.values())
    assert set(hits.values()) == {2}  # each line read once, none lost across the faults


# ============================================================================================ control socket


def _stall(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(60)
    s.connect(path)
    s.sendall(b'{"v": 1, "cmd": "sta')
    return s


def _stall_reply(s: socket.socket) -> bool:
    """Whether the daemon answered a stalled half request with 'incomplete request' and hung up."""
    with s:
        buf = b""
        while chunk := s.recv(4096):
            buf += chunk
    replies = [json.loads(line) for line in buf.splitlines()]
    return len(replies) == 1 and replies[0]["error"].startswith("incomplete request")


def test_control_socket_under_fuzz_and_slow_clients(figures: sd.Figures, scratch: Scratch) -> None:
    """10,000 fuzzed request lines (random bytes, partial JSON, wrong types, unknown commands, bad
    arguments, deep nesting, huge numbers, broken encodings) plus lines over the 16 MiB limit, while
    100 slow clients hold connections open with half-sent requests and a normal client pings every
    50 ms: every line gets exactly one one-line reply, no handler crashes, every ping is answered,
    the slow clients are served when they finish, memory stops growing once the first lines over the
    limit have been seen, and users outside the socket group are refused."""
    seed = int(os.environ.get("RELAYGUARD_STRESS_SEED", secrets.randbits(32)))
    rng = random.Random(seed)
    with system_group("stress") as (group, _gid), system_user("outsider") as (_, o_uid, o_gid):
        root = scratch("control")
        d = sd.Daemon(sd.write_config(root, None, socket_group=group))
        try:
            d.wait_ready()
            for _ in range(20):
                d.request("status")
            rss = {"start": d.rss()}
            slow = sc.SlowClients(d.socket, 100, every=2.0)
            pinger = sc.Pinger(d.socket)
            pinger.start()
            classes: Counter[str] = Counter()
            replies: Counter[str] = Counter()
            bad: list[Any] = []

            def connection(lines: list[tuple[str, bytes]]) -> None:
                got = sc.exchange(d.socket, [line for _, line in lines])
                if len(got) != len(lines):
                    bad.append(("replies", len(lines), len(got)))
                for (kind, line), r in zip(lines, got, strict=False):
                    classes[kind] += 1
                    ok = r.get("ok")
                    replies["ok" if ok else "error"] += 1
                    if r.get("v") != 1 or not isinstance(ok, bool) or (
                            not ok and ("\n" in r["error"] or "internal error" in r["error"])):
                        bad.append((kind, line[:200], r))

            stallers = [_stall(d.socket) for _ in range(20)]  # half a request, then silence
            started = time.monotonic()
            for quarter in range(4):  # paced over ~14 s: longer than the daemon's 10 s idle limit
                batches = [[sc.fuzz_line(rng) for _ in range(100)] for _ in range(25)]
                with ThreadPoolExecutor(8) as pool:
                    list(pool.map(connection, batches))
                huge = sc.exchange(d.socket, [b"x" * (control.MAX_REQUEST + 1), b'{"v": 1, "cmd": "ping"}'])
                classes["over_16_MiB"] += 1
                if [r.get("ok") for r in huge] != [False, True] or "too large" not in huge[0]["error"]:
                    bad.append(("huge", huge))
                rss[f"q{quarter + 1}"] = d.rss()
                time.sleep(max(0.0, started + 3.5 * (quarter + 1) - time.monotonic()))
            held_s = time.monotonic() - started
            stalled = [_stall_reply(s) for s in stallers]
            held = sum(slow.sent)
            served = slow.finish()
            pinger.stop()
            status = d.request("status")
            crashed = d.events("control_command_failed")
            # outside the socket group: the file mode stops it; with the mode loosened, the peer check does
            denied_by_mode = cli_as(o_uid, o_gid, "status", "--socket", d.socket)
            os.chmod(d.socket, 0o666)
            try:
                denied_by_peer = [cli_as(o_uid, o_gid, "status", "--socket", d.socket) for _ in range(3)]
            finally:
                os.chmod(d.socket, 0o660)
            refused = d.events("control_refused", lambda e: e["uid"] == o_uid)
            rss["end"] = d.rss()
            tracebacks = d.log_path.read_text(errors="replace").count("Traceback")
        finally:
            assert d.stop() == 0
    lat = sorted(pinger.latencies)
    figures.update({
        "seed": seed, "fuzzed_lines": sum(v for k, v in classes.items() if k != "over_16_MiB"),
        "lines_over_16_MiB": classes["over_16_MiB"], "by_class": dict(classes), "replies": dict(replies),
        "bad_replies": bad[:5], "handler_crashes": len(crashed), "tracebacks_logged": tracebacks,
        "slow_clients": len(slow.socks),
        "slow_bytes_trickled": held, "slow_held_s": round(held_s, 1), "slow_served": dict(served),
        "stalled_clients": len(stalled), "stalled_cut_after_idle": sum(stalled), "pings": len(lat),
        "ping_failures": len(pinger.failures), "ping_p50_ms": round(lat[len(lat) // 2] * 1000, 1) if lat else None,
        "ping_max_ms": round(lat[-1] * 1000, 1) if lat else None, "rss": rss,
        "rss_growth_last_half": rss["q4"] - rss["q2"], "ping_every_ms": round(pinger.every * 1000),
        "lines_per_connection": 100, "max_request_mib": control.MAX_REQUEST // MIB, "idle_limit_s": control.IDLE,
        "outsider_exit_by_mode": denied_by_mode.returncode, "outsider_exits_by_peer_check":
            [r.returncode for r in denied_by_peer], "control_refused_logged": len(refused),
    })
    assert sum(classes.values()) >= 10_000 and bad == [] and crashed == [] and tracebacks == 0
    assert len(lat) > 50 and pinger.failures == []
    assert served == {"ok": 100} and held_s > 10  # held open past the idle limit by trickling, then answered
    assert sum(stalled) == len(stalled)  # silent ones are cut after the idle limit, with a reply saying so
    assert status["state"] == "running"
    assert rss["q4"] - rss["q2"] < 16 * MIB  # once the allocator has seen a 16 MiB line, no more growth
    assert rss["end"] - rss["start"] < 96 * MIB
    assert denied_by_mode.returncode == 1 and "permission denied" in denied_by_mode.stderr
    assert [r.returncode for r in denied_by_peer] == [1, 1, 1]
    assert all("neither root nor in group" in r.stderr for r in denied_by_peer) and len(refused) == 3
