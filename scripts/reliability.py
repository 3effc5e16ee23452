"""Renders docs/reliability.md from one run of the stress suite (scripts/reliability.sh).

    python scripts/reliability.py RUN_DIR > docs/reliability.md

RUN_DIR holds `figures/<test>.json` (each stress test's measured figures, written when RELAYGUARD_FIGURES
is set), `junit.xml` (every test's outcome) and `pytest.txt` (the run's output, for its summary line).
Every number in the document comes from those files; this script only formats them. Exits 1 when a
test failed or a figures file is missing, after writing the document anyway (it says so at the top).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

COMMAND = "scripts/reliability.sh"
MIB = 1 << 20

# The stress tests whose figures this document shows, in its order.
SECTIONS = [
    "test_injection_random_examples_for_every_rule",
    "test_redos_every_rule_stays_linear_on_adversarial_lines",
    "test_flood_of_a_million_addresses_through_the_scorer",
    "test_flood_through_the_daemon_streamed",
    "test_flood_through_the_daemon_as_a_backlog",
    "test_100000_bans_daemon_memory_and_set_lookup",
    "test_kill_9_at_random_points_loses_no_ban_and_counts_no_line_twice",
    "test_full_state_filesystem_still_bans_says_so_and_recovers",
    "test_corrupt_database_is_moved_aside_and_rebuilt_from_the_kernel",
    "test_nft_table_deleted_or_flushed_is_restored",
    "test_log_file_deleted_replaced_unreadable_with_the_daemon",
    "test_control_socket_under_fuzz_and_slow_clients",
    "test_invalid_configs_exit_2_with_one_line",
]


# ----------------------------------------------------------------------------------------- reading a run


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """test name -> (passed|failed|error|xfailed|skipped, message) from pytest's JUnit XML."""
    out: dict[str, tuple[str, str]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        state, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                state, message = ("failed" if child.tag == "failure" else "error"), child.get("message", "")
            elif child.tag == "skipped":
                xfail = child.get("type") == "pytest.xfail"
                state, message = ("xfailed" if xfail else "skipped"), child.get("message", "")
        out[name] = (state, message)
    return out


def summary_line(text: str) -> str:
    lines = [ln.strip("= ").strip() for ln in text.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    return lines[-1] if lines else "(no pytest summary line found)"


# ----------------------------------------------------------------------------------------- formatting


def n(x: float | int) -> str:
    """Thousands with commas; floats with up to 2 decimals."""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.2f}".rstrip("0").rstrip(".")


def mib(b: int) -> str:
    return f"{b / MIB:,.0f} MiB"


def table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class Doc:
    def __init__(self, figures: dict[str, dict[str, Any]], results: dict[str, tuple[str, str]]) -> None:
        self.figures = figures
        self.results = results
        self.parts: list[str] = []
        self.missing: list[str] = []

    def fig(self, test: str) -> dict[str, Any] | None:
        f = self.figures.get(test)
        if f is None:
            self.missing.append(test)
        return f

    def outcome(self, test: str) -> str:
        hits = [v for k, v in self.results.items() if k.endswith("::" + test)]
        if not hits:
            return "not run"
        state, message = hits[0]
        return state if state == "passed" else f"**{state}**: {message.splitlines()[0][:300] if message else ''}"

    def add(self, text: str) -> None:
        self.parts.append(text.strip("\n") + "\n")

    def section(self, title: str, test: str) -> dict[str, Any] | None:
        f = self.fig(test)
        self.add(f"## {title}\n\n`tests/test_stress.py::{test}`: {self.outcome(test)}"
                 + (f", {n(f['seconds'])} s" if f and "seconds" in f else ""))
        return f


# ----------------------------------------------------------------------------------------- sections


def injection(doc: Doc) -> None:
    f = doc.section("Log injection", SECTIONS[0])
    if not f:
        return
    doc.add(f"""
Every rule of every pack ({n(f['rules'])} rules in {n(f['packs'])} packs) has a template of the real line its
daemon writes ({n(f['templates'])} templates, {n(f['client_fields'])} client-controlled fields: HELO, MAIL FROM,
RCPT TO, SASL and ssh user names, client versions, reverse-DNS names, ...). Hypothesis fills those fields
with arbitrary text, {n(f['forged_address_spellings'])} spellings of other addresses and the server's own
({n(f['notations_ipv4'])} notations per IPv4 address, {n(f['notations_ipv6'])} per IPv6: bracketed, with ports,
`::ffff:a.b.c.d`, `IPv6:`, zone ids, upper case, ...), {n(f['tokens'])} separator tokens, `#012`-escaped fake
log lines and slices of the same line written for another client. The property: every event names the real
client, or there is no event. {n(f.get('session_templates', 0))} templates are two-line sessions (OpenSMTPD 6.4+
names the client only on the connect line; {n(f.get('session_rules', 0))} more rules only open and close such
sessions and make no event themselves).

| run | lines per template | lines |
|---|---|---|
| CI, fixed sample (`tests/test_injection.py`) | {n(f['ci_examples_per_template'])} | {n(f['ci_lines'])} |
| CI, neutral values must still match | {n(f['real_addresses'])} addresses | {n(f['ci_neutral_lines'])} |
| this run, fresh random examples | {n(f['random_examples_per_template'])} | {n(f['random_lines'])} |

Events naming another address than the real client: **{n(f['wrong_address_hits'])}**.
({n(f['templates_without_client_fields'])} templates have no client-controlled text: they run with the
{n(f['real_addresses'])} real addresses only.)
""")


def redos(doc: Doc) -> None:
    f = doc.section("ReDoS: adversarial lines up to 64 KiB", SECTIONS[1])
    if not f:
        return
    rows = [[pack, n(p["rules"]), n(p["templates"]), f"{n(p['worst_long_per_byte_x'])}x ({p['worst_long_rule']})",
             n(p["worst_long_growth"]), f"{n(p['worst_short_line_x'])}x ({p['worst_short_rule']})"]
            for pack, p in f["per_pack"].items()]
    doc.add(f"""
For each of the {n(f['templates'])} templates ({n(f['rules'])} rules), {n(f['pieces'])} pieces an attacker can
repeat (characters the regexes repeat, nested brackets, `: ` and `, ` separators, fragments such as
`, user=` or `[1.2.3.4]:25 `, and prefixes of the real line that almost match) go into every client field,
after the message and in place of the address: {n(f['variants'])} variants, {n(f['matcher_runs'])} runs
through `Matcher.match` and `Matcher.scan`. Every variant is screened at {n(f['screen_sizes'][0])} characters
(RE2), and every variant in a field the client writes at {n(f['screen_sizes'][1])} (Python's `re`); the
slowest of each template is then timed at
{n(f['long_sizes'][0])} and {n(f['long_sizes'][1])} characters, and at {n(f['short_sizes'][0])} and
{n(f['short_sizes'][1])}.
Times are the thread's CPU time, the minimum of interleaved repeats, so load on the machine cannot make a
rule look worse.

Messages over {n(f['re_up_to'])} characters go to RE2, whose time is linear in the input: doubling the line
must at most triple the time (asserted, machine-independent: the long line is timed against the short
one run twice, the same work for a linear engine). Up to {n(f['re_up_to'])} characters Python's `re`
runs (cheaper to call); there the cost of one line is bounded by the length cap. Lines over
{n(f['max_line'])} bytes are skipped and counted, never matched.

""" + table(["pack", "rules", "templates", "worst time per byte, long line vs normal line",
             "worst growth when the long line doubles", "worst short line vs normal line"], rows) + f"""

Overall: the worst long line costs **{n(f['worst_long_per_byte_x_normal'])}x** a normal line per byte; doubling a
long line multiplied the time by at most **{n(f['worst_long_growth_2x_length'])}** (linear: 2). The worst line
of up to {n(f['re_up_to'])} characters costs **{n(f['worst_short_line_x_normal'])}x** a normal line (asserted < 5,000:
no exponential backtracking). Rules whose long-line time grew faster than linear: {len(f['nonlinear_over_1024'])}.
""")
    sl = f["superlinear_under_1024"]
    if sl:
        doc.add(f"Superlinear under Python's `re` (messages up to {n(f['re_up_to'])} characters), bounded by that "
                "cap:\n\n" + table(
            ["rule", "field", "repeated piece", "time x when the line doubles",
             f"µs at {n(f['short_sizes'][1])} chars",
             "x normal line"],
            [[s["rule"], s["field"], f"`{s['piece']}`", n(s["growth_450_to_900"]), n(s["us_at_900"]),
              n(s["x_normal_line"])] for s in sl]) + "\n\nExample input (first 300 characters):\n\n"
                + "\n".join(f"    {s['example']}" for s in sl))
    else:
        doc.add("No rule grew faster than linear under Python's `re` either.")


def floods(doc: Doc) -> None:
    f = doc.section("Flood: 1,000,000 addresses through the scorer", SECTIONS[2])
    if f:
        rows = []
        for key, label in (("default", "default cap (max_tracked 1,000,000)"), ("capped", "max_tracked 100,000"),
                           ("cap_below_spacing", "max_tracked 20,000 (below the offender's spacing)")):
            r = f[key]
            rows.append([label, n(r["addresses"]), n(r["tracked"]), n(r["dropped"]), mib(r["rss_growth"]),
                         n(r["bytes_per_tracked"]), n(r["events_per_cpu_s"]), n(r["flood_offences"]),
                         ", ".join(map(str, r["offences_at"])) or "none"])
        d = f["default"]
        doc.add(f"""
{n(d['addresses'])} distinct IPv6 addresses with one weak event each (weight {d['weak_weight']}, threshold
{d['threshold']}) within one window, and one offender (weight {d['offender_weight']}) sending
{d['offender_events']} events spread through the flood. The scorer runs in a fresh process; memory is its RSS
growth. Bound asserted: under {n(f['bound_bytes_per_address'])} bytes per address with the default cap, under
{mib(f['bound_capped_bytes'])} with max_tracked 100,000; the offender must be caught at exactly its 4th, 8th, ...
event.

""" + table(["run", "addresses", "tracked", "dropped", "memory", "bytes/address", "events per CPU second",
             "flood addresses banned", "offences at offender event #"], rows) + f"""

With a cap, the least recently seen addresses are forgotten first: an offender stays tracked as long as
fewer than max_tracked other addresses arrive between two of its events (last row: the offender's events are
{n(d['addresses'] // d['offender_events'])} addresses apart, so it is
{'still caught' if f['cap_below_spacing']['offences_at'] else 'forgotten each time and never caught'}).
""")
    for test, title in ((SECTIONS[3], "Flood through the daemon, streamed"),
                        (SECTIONS[4], "Flood through the daemon, as a backlog")):
        f = doc.section(title, test)
        if not f:
            continue
        rate = f["rate_lines_per_s"]
        pace = f"at {n(rate)} lines per second" if isinstance(rate, int) else "all at once"
        doc.add(f"""
{n(f['lines'])} log lines ({n(f['addresses'])} flood addresses and the offender's {f['offender_events']} events)
appended to a file the real daemon follows (dry-run firewall), {pace}. All read and stored in
{n(f['seconds_to_read_and_store'])} s ({n(f['lines_per_s'])} lines/s);
events stored: {n(f['stored_events'])}; addresses tracked: {n(f['tracked'])}. Banned: {', '.join(f['banned'])}
(offences: {f['offender_count']}, each at the time of its 4th, 8th, ... line:
{n(f['offences_at_event_times'])}).

| daemon RSS | ready | after | peak | bound (asserted) |
|---|---|---|---|---|
| | {mib(f['rss_ready'])} | {mib(f['rss_after'])} | {mib(f['rss_peak'])} | {mib(f['bound_peak'])} |
""")
    f = doc.section("100,000 active bans in nftables", SECTIONS[5])
    if f:
        lat0, lat1 = f["latency_0_elements"], f["latency_100000_elements"]
        doc.add(f"""
{n(f['bans'])} addresses banned through the control socket in one request ({n(f['ban_request_s'])} s), inside a
network namespace. Set elements: {', '.join(f'{k} {n(v)}' for k, v in f['set_elements'].items())}. The input
chain holds {len(f['chain_rules'])} rules whatever the number of bans, each one set lookup:
{'; '.join(f'`{r}`' for r in f['chain_rules'])}.

| daemon RSS | no bans | after the 100,000-address ban | after a restart with them |
|---|---|---|---|
| | {mib(f['rss_no_bans'])} | {mib(f['rss_after_bulk_ban'])} | {mib(f['rss_after_restart_with_bans'])} |

Restart with 100,000 bans to ready: {n(f['restart_to_ready_s'])} s (reconcile: {f['reconciled']['active']:,} active,
{f['reconciled']['added']} added, {f['reconciled']['removed']} removed).

TCP connect latency from a client namespace (best median of {lat0['v4']['batches']} batches of
{lat0['v4']['per_batch']} connects):

| | 0 elements | 100,000 elements | ratio |
|---|---|---|---|
| IPv4 | {lat0['v4']['best_median_us']} µs | {lat1['v4']['best_median_us']} µs | {n(f['latency_ratio']['v4'])} |
| IPv6 | {lat0['v6']['best_median_us']} µs | {lat1['v6']['best_median_us']} µs | {n(f['latency_ratio']['v6'])} |

Banned client addresses dropped: {', '.join(n(x) for x in f['banned_dropped'])}; others still connect:
{', '.join(n(x) for x in f['others_pass'])}.
""")


def faults(doc: Doc) -> None:
    f = doc.section("kill -9 at random points", SECTIONS[6])
    if f:
        doc.add(f"""
The daemon (nftables, in a namespace) was killed with SIGKILL **{n(f['kills'])} times** at random moments
({n(f['killed_before_ready'])} before it was ready, {n(f['killed_after_ready'])} after; seed {f['seed']}) while a
writer appended {n(f['lines_written'])} lines: {n(f['attackers'])} attackers (two relay-denied lines each) and as many
innocents (one weak event each). After a final start:

| check | result |
|---|---|
| attackers banned in the kernel | {n(f['kernel_bans'])} of {n(f['attackers'])} |
| attackers banned in the database | {n(f['database_bans'])} of {n(f['attackers'])} |
| kernel equals database | {n(f['kernel_equals_database'])} |
| (file, line) stored twice | {n(f['duplicate_lines'])} |
| innocent events stored exactly once | {n(f['innocents_stored_once'])} of {n(f['innocents'])} |
| bans counted twice (a line scored again) | {n(f['bans_counted_twice'])} |
| final daemon exit on SIGTERM | {f['final_exit']} |
""")
    f = doc.section("State filesystem full", SECTIONS[7])
    if f:
        lost = f["lost_at_restart"]
        doc.add(f"""
The state directory on a {f['tmpfs']} tmpfs in a private mount namespace, filled to {n(f['free_kib_when_full'])} KiB
free while the daemon ran. Banned in the kernel while full: {', '.join(f['banned_in_kernel_while_full'])} (one
automatic, one manual ban; the manual ban's reply: `{json.dumps(f['manual_ban_reply_while_full'])}`). Logged:
{n(f['store_write_failed_events'])} x `store_write_failed` with `{f['error']}`. Status answered while full:
{n(f['status_answered_while_full'])}. After the filler was removed, the database held all
{n(f['events_stored_after_recovery'])} events, those kept in memory while the disk was full included. Active
bans in the database after recovery:
{', '.join(f['in_database_after_recovery'])}. Kernel after a restart: {', '.join(f['kernel_after_restart'])}.
""" + (f"**Lost at the restart: {', '.join(lost)}** (a ban decided while the disk was full is never written to the "
       "database later, so the restart's reconcile removes it; automatic bans come back from their stored "
       "events while those are inside the window)." if lost else "No ban was lost at the restart."))
    f = doc.section("Corrupted database", SECTIONS[8])
    if f:
        doc.add(f"""
{n(f['bans_before'])} active bans; daemon stopped; all {n(f['database_bytes_overwritten'])} bytes of the database
overwritten with random bytes. Next start: moved aside to `{f['moved_to']}`, {n(f['rebuilt_from_kernel'])} bans
rebuilt from the kernel; kernel {n(f['kernel_bans'])}, database {n(f['database_bans'])}, equal:
{n(f['kernel_equals_database'])}.
""")
    f = doc.section("nft table deleted or flushed", SECTIONS[9])
    if f:
        rows = [[what, n(c["restored"]), "-" if c["seconds"] is None else f"{n(c['seconds'])} s",
                 n(c["firewall_restored_logged"])] for what, c in f["cases"].items()]
        doc.add(f"\n{n(f['bans'])} active bans; the daemon checks its table every {f['watch_every_s']} s.\n\n"
                + table(["done by someone else inside the namespace", "every ban back", "after", "logged"], rows))
    f = doc.section("Log file deleted, replaced, unreadable", SECTIONS[10])
    if f:
        rows = [[what, s["warning"] or "-", s["state"], n(s["recovered"]) if isinstance(s["recovered"], bool)
                 else s["recovered"]] for what, s in f["steps"].items()]
        doc.add("\nThe real daemon without CAP_DAC_OVERRIDE; after each fault an offender's lines are written and must "
                "be banned.\n\n" + table(["fault", "warning", "state", "recovered"], rows)
                + f"\n\nBanned: {', '.join(f['bans'])}; events per offender: "
                + ", ".join(str(v) for v in f["events_per_offender"].values()) + ".")


def control(doc: Doc) -> None:
    f = doc.section("Control socket", SECTIONS[11])
    if not f:
        return
    classes = ", ".join(f"{k} {n(v)}" for k, v in sorted(f["by_class"].items()) if k != "over_16_MiB")
    doc.add(f"""
{n(f['fuzzed_lines'])} fuzzed request lines on {n(f['lines_per_connection'])}-line connections ({classes}) and
{n(f['lines_over_16_MiB'])} lines over the {n(f['max_request_mib'])} MiB limit (seed {f['seed']}), while
{n(f['slow_clients'])} slow clients held connections open for {n(f['slow_held_s'])} s (longer than the daemon's
{n(f['idle_limit_s'])} s idle limit) by trickling a request one byte at a time, while {n(f['stalled_clients'])}
clients sent half a request and went silent, and while a normal client pinged every {n(f['ping_every_ms'])} ms.

""")
    rows = [
        ["replies", ", ".join(f"{k} {n(v)}" for k, v in f["replies"].items())],
        ["lines without exactly one well-formed reply", len(f["bad_replies"])],
        ["handler crashes / tracebacks in the log", f"{n(f['handler_crashes'])} / {n(f['tracebacks_logged'])}"],
        ["pings answered (failures)", f"{n(f['pings'])} ({n(f['ping_failures'])}); median {f['ping_p50_ms']} ms, "
                                      f"max {f['ping_max_ms']} ms"],
        ["slow clients answered when they finished", ", ".join(f"{k} {n(v)}" for k, v in f["slow_served"].items())],
        ["silent clients cut after the idle limit, with a reply",
         f"{n(f['stalled_cut_after_idle'])} of {n(f['stalled_clients'])}"],
        ["daemon RSS: start, after each quarter, end", ", ".join(mib(v) for v in f["rss"].values())],
        ["RSS growth over the last half", mib(f["rss_growth_last_half"])],
        ["outsider, socket mode 0660", f"exit {f['outsider_exit_by_mode']} (permission denied)"],
        ["outsider, socket mode loosened to 0666",
         f"exits {', '.join(map(str, f['outsider_exits_by_peer_check']))} (peer check); `control_refused` logged "
         f"{n(f['control_refused_logged'])} times"],
    ]
    doc.add(table(["check", "result"], rows))


def config(doc: Doc) -> None:
    f = doc.section("Invalid configurations", SECTIONS[12])
    if f:
        doc.add(f"\nEvery row of `tests/test_config.py::INVALID` ({n(f['invalid_configs'])} configs) through "
                f"`relayguard config check`: exit 2 with one line naming the file, the key and the fix: "
                f"{n(f['exit_2_one_line'])} of {n(f['invalid_configs'])}. Keys: "
                + ", ".join(f"`{k}`" for k in f["keys"]) + ".")


def findings(figures: dict[str, dict[str, Any]], results: dict[str, tuple[str, str]]) -> str:
    """What did not hold in this run, or what it found worth a fix, from the figures and outcomes."""
    out = []
    for name, (state, message) in sorted(results.items()):
        if state != "passed":
            out.append(f"- `{name}` {state}: {message.splitlines()[0] if message else ''}")
    for s in figures.get(SECTIONS[1], {}).get("superlinear_under_1024", []):
        out.append(f"- `{s['rule']}` backtracks quadratically under Python's `re` on lines where `{s['piece']}` "
                   f"repeats in `{s['field']}`: {n(s['us_at_900'])} µs for a 900-character line, "
                   f"{n(s['x_normal_line'])}x a normal one (bounded by the length cap; the fix belongs in the pack).")
    for what, c in figures.get(SECTIONS[9], {}).get("cases", {}).items():
        if not c["restored"]:
            out.append(f"- nft: {what} (table and rules intact) is not noticed; the bans come back at the next "
                       "restart (reconcile).")
    streamed, backlog = figures.get(SECTIONS[3]), figures.get(SECTIONS[4])
    if streamed and backlog and backlog["rss_peak"] > 1.5 * streamed["rss_peak"]:
        out.append(f"- Memory follows the backlog, not only the addresses: the same {n(backlog['lines'])} lines cost "
                   f"a peak of {mib(backlog['rss_peak'])} written at once against {mib(streamed['rss_peak'])} "
                   "streamed (read hits wait in memory until SQLite has stored them).")
    return "## Findings of this run\n\n" + ("\n".join(out) if out else "Everything held.") + "\n"


def render(run: Path) -> tuple[str, bool]:
    figures = {}
    for p in sorted((run / "figures").glob("*.json")):
        data = json.loads(p.read_text())
        figures[data["test"]] = data["figures"]
    results = outcomes(run / "junit.xml")
    suite = ET.parse(run / "junit.xml").getroot()
    if suite.tag != "testsuite" and (inner := suite.find("testsuite")) is not None:
        suite = inner
    summary = summary_line((run / "pytest.txt").read_text(errors="replace"))
    doc = Doc(figures, results)
    for part in (injection, redos, floods, faults, control, config):
        part(doc)
    bad = {k: v for k, v in results.items() if v[0] in ("failed", "error")}
    head = [
        "# Reliability: how relayguard holds under hostile input, floods and faults",
        "",
        f"Every number below comes from one run of `{COMMAND}` (the stress suite, `pytest -m stress`, with",
        "larger runs than CI; each test writes what it measured, `scripts/reliability.py` renders it). Rerun",
        "that command to regenerate this file; do not edit it by hand.",
        "",
        f"Run: {suite.get('timestamp', '?')[:16].replace('T', ' ')} on {suite.get('hostname', '?')}: Linux "
        f"{platform.release()}, Python {platform.python_version()}, {_cpus()} CPUs. Pytest: **{summary}**.",
    ]
    if bad or doc.missing:
        head += ["", "**This run is incomplete:** " + "; ".join(
            [f"{k} {v[0]}" for k, v in bad.items()] + [f"no figures from {m}" for m in doc.missing])]
    body = "\n".join([findings(figures, results), *doc.parts])
    stress = sorted(results.items())
    tail = ["## Every stress test of this run", "", table(["test", "outcome"], [
        [f"`{k}`", v[0] if v[0] == "passed" else f"**{v[0]}** {v[1].splitlines()[0][:200] if v[1] else ''}"]
        for k, v in stress])]
    text = "\n".join(head) + "\n\n" + body + "\n" + "\n".join(tail) + "\n"
    return text, not bad and not doc.missing


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="directory with figures/, junit.xml and pytest.txt")
    args = ap.parse_args()
    text, complete = render(args.run)
    sys.stdout.write(text)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
