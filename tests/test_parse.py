"""parse: syslog headers in every format the daemons' logs really use, the literal prefilter,
block scanning with line numbers, and the skipped-and-counted treatment of garbage."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from relayguard.parse import MAX_LINE, Clock, Matcher, PackError, load_pack, required_literal, split_header

SASL = "warning: unknown[192.0.2.7]: SASL LOGIN authentication failed: UGFzc3dvcmQ6"


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


@pytest.fixture(scope="module")
def postfix() -> Matcher:
    return Matcher([load_pack("postfix")], Clock(ref=ts("2026-12-04T12:00:00+00:00")))


@pytest.mark.parametrize(
    ("line", "when", "prog"),
    [
        # classic BSD syslog (rsyslog traditional, journalctl -o short)
        (f"Dec  3 19:56:07 mx postfix/smtpd[2309]: {SASL}", "2026-12-03T19:56:07+00:00", "postfix/smtpd"),
        (f"Dec 13 19:56:07 mx postfix/submission/smtpd[2309]: {SASL}", "2026-12-13T19:56:07+00:00",
         "postfix/submission/smtpd"),
        # RFC 3339 high precision (Debian 12 rsyslog default)
        (f"2026-12-03T19:56:07.123456+01:00 mx postfix/smtpd[2309]: {SASL}", "2026-12-03T18:56:07.123456+00:00",
         "postfix/smtpd"),
        # journalctl -o short-iso
        (f"2026-12-03T19:56:07+0000 mx postfix/smtpd[2309]: {SASL}", "2026-12-03T19:56:07+00:00", "postfix/smtpd"),
        # RFC 5424
        (f"<22>1 2026-12-03T19:56:07.5Z mx postfix/smtpd 2309 - - {SASL}", "2026-12-03T19:56:07.5+00:00",
         "postfix/smtpd"),
        (f"<22>1 2026-12-03T19:56:07Z mx postfix/smtpd 2309 - [meta x=\"1\"] {SASL}", "2026-12-03T19:56:07+00:00",
         "postfix/smtpd"),
    ],
)
def test_header_formats(postfix: Matcher, line: str, when: str, prog: str) -> None:
    head = split_header(line, postfix.clock)
    assert head is not None
    assert head[0] == pytest.approx(ts(when))
    assert head[1] == prog
    assert line[head[2]:] == SASL
    hits = postfix.match(line)
    assert [(h.addr, h.rule) for h in hits] == [("192.0.2.7", "postfix/sasl-failed")]


def test_exim_mainlog_header() -> None:
    head = split_header("2026-12-03 19:56:07.123 +0100 [2309] H=(x) [192.0.2.7] F=<> rejected RCPT", Clock())
    assert head is not None and head[1] == "exim"
    assert head[0] == pytest.approx(ts("2026-12-03T18:56:07.123+00:00"))


def test_classic_year_rolls_back_for_later_months() -> None:
    clock = Clock(ref=ts("2027-01-02T00:00:00+00:00"))
    head = split_header(f"Dec 31 23:59:59 mx postfix/smtpd[1]: {SASL}", clock)
    assert head is not None and head[0] == ts("2026-12-31T23:59:59+00:00")


@pytest.mark.parametrize(
    "line", ["", "garbage", "Foo 99 99:99:99 mx x: y", "\x00\x01\x02", "2026-13-45T99:00:00Z x y: z"]
)
def test_garbage_headers_are_none(line: str) -> None:
    assert split_header(line, Clock()) is None


def test_required_literal() -> None:
    assert required_literal(r"^PREGREET \d+ after \S+ from \[(?P<addr>[^\]]+)\]:\d+")[0] == "PREGREET "
    assert required_literal(r"^(?:a|b)xyz(?P<addr>\d+) long literal here")[0] == " long literal here"
    assert required_literal(r"(?i)abcdef") == ("abcdef", True)


def test_pack_programs_keep_packs_apart(postfix: Matcher) -> None:
    # a line with Postfix's words but from another program is not Postfix's evidence
    assert postfix.match(f"Dec  3 19:56:07 mx sshd[1]: {SASL}") == []
    assert postfix.match(f"Dec  3 19:56:07 mx postfix/qmgr[1]: {SASL}") == []


def test_scan_block_numbers_lines_and_counts_garbage(postfix: Matcher) -> None:
    m = Matcher([load_pack("postfix")], postfix.clock)
    lines = [
        "Dec  3 19:56:00 mx postfix/smtpd[1]: connect from unknown[192.0.2.7]",
        f"Dec  3 19:56:01 mx postfix/smtpd[1]: {SASL}",
        f"not a log line at all but it says {SASL}",
        "x" * (MAX_LINE + 10),
        f"Dec  3 19:56:02 mx postfix/smtpd[1]: {SASL.replace('192.0.2.7', '2001:db8::7')}",
        f"Dec  3 19:56:03 mx postfix/smtpd[1]: {SASL.replace('192.0.2.7', '::ffff:198.51.100.9')}",
        "Dec  3 19:56:04 mx postfix/smtpd[1]: " + "y" * (MAX_LINE + 1) + SASL,
    ]
    block = ("\n".join(lines) + "\n").encode()
    hits = list(m.scan(block, "mail.log", first_lineno=10))
    assert [(h.lineno, h.addr) for h in hits] == [(11, "192.0.2.7"), (14, "2001:db8::7"), (15, "198.51.100.9")]
    assert all(h.source == "mail.log" for h in hits)
    assert m.counters.lines == 7
    assert m.counters.garbage == 3  # the headerless line and the two over-long ones


def test_undecodable_bytes_do_not_break_scan(postfix: Matcher) -> None:
    m = Matcher([load_pack("postfix")], postfix.clock)
    block = b"Dec  3 19:56:01 mx postfix/smtpd[1]: " + SASL.encode() + b"\xff\xfe\n\xff\xff SASL \n"
    assert [h.addr for h in m.scan(block)] == ["192.0.2.7"]


def test_bad_pack_is_a_clear_error(tmp_path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text('programs = "x"\n[[rule]]\nid = "a"\nservice = "s"\nweight = 1\nwhy = "w"\nregex = "no addr group"\n')
    with pytest.raises(PackError, match="named group"):
        load_pack(str(f))
    f.write_text('programs = "x"\n[[rule]]\nid = "a"\nservice = "s"\nweight = 1\nwhy = "w"\n'
                 'regex = "(?P<addr>x)"\n')
    with pytest.raises(PackError, match="literal"):
        load_pack(str(f))
    with pytest.raises(PackError, match="unknown rule pack"):
        load_pack("nosuchpack")


def test_classic_clock_is_local_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        clock = Clock(ref=ts("2026-12-04T12:00:00+00:00"))
        assert clock.classic("Dec  3 19:56:07") == ts("2026-12-03T18:56:07+00:00")
    finally:
        monkeypatch.setenv("TZ", "UTC")
        time.tzset()
    assert datetime.fromtimestamp(0, UTC).year == 1970


def test_a_rule_may_name_several_literals(tmp_path) -> None:
    """`literal` as a list: a line holding any one is a candidate; each must be selective."""
    f = tmp_path / "two.toml"
    f.write_text('programs = "^x$"\n[[rule]]\nid = "a"\nservice = "s"\nweight = 5\nwhy = "w"\n'
                 "regex = '^(?:bad login|login refused) from (?P<addr>\\S+)$'\n"
                 'literal = ["bad login", "login refused"]\n')
    m = Matcher([load_pack(str(f))])
    block = (b"Dec  3 19:56:01 mx x[1]: bad login from 192.0.2.1\n"
             b"Dec  3 19:56:02 mx x[1]: login refused from 192.0.2.2\n")
    assert [h.addr for h in m.scan(block)] == ["192.0.2.1", "192.0.2.2"]
    f.write_text(f.read_text().replace('"login refused"]', '"ref"]'))
    with pytest.raises(PackError, match="literal"):
        load_pack(str(f))


@pytest.mark.parametrize("name", ["postfix", "exim", "sendmail", "dovecot", "opensmtpd", "sshd"])
def test_packaged_packs_pass_the_checks_a_local_pack_gets(name: str) -> None:
    """Packaged packs compile their regexes on first use (start-up time); loaded by path, as a
    local pack, every regex is compiled and checked at load. Both must agree."""
    from importlib import resources

    packaged = load_pack(name)
    local = load_pack(str(resources.files("relayguard.rules").joinpath(f"{name}.toml")))
    assert [r.id for r in packaged.rules] == [r.id for r in local.rules]
    for p, loc in zip(packaged.rules, local.rules, strict=True):
        assert not p.compiled and loc.compiled
        assert p.regex.groupindex == loc.regex.groupindex and p.linear.pattern == loc.linear.pattern
        assert (p.session, p.literals, p.distinct) == (loc.session, loc.literals, loc.distinct)
