"""Log lines -> Hits. Pure: no I/O but reading the packaged rule files; shared by `scan` and the daemon.

Speed comes from not looking at most lines. Every rule names (or has derived from its regex) a
literal that must occur in a matching line; all literals go into one multi-pattern scan over a
whole block of bytes (Hyperscan where available, RE2 otherwise), and only the lines they hit are
decoded, split into syslog header and message, and matched with that rule's RE2 regex. RE2 runs
in linear time, so no log line can make a rule backtrack for seconds.

A rule's regex is matched against the *message* (what follows `program[pid]: `), only for the
programs its pack owns, and must take the client address from a named group `addr` anchored at
a place the server writes itself: attacker text (HELO, MAIL FROM, user names) never reaches it.
"""

from __future__ import annotations

import re
import time
import tomllib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from operator import itemgetter
from pathlib import Path
from typing import Any

import re2

from relayguard.model import Hit, canonical_addr, make_hit

try:  # Hyperscan has wheels for x86_64 only; RE2 alone is slower but equivalent.
    import hyperscan
except ImportError:  # pragma: no cover - depends on the platform
    hyperscan = None

MAX_LINE = 64 * 1024  # longer lines are skipped and counted, never matched
# Messages up to this length go through Python's re (fast to call); longer ones through RE2,
# whose run time is linear in the input whatever the regex, so no line can make a rule backtrack.
_SHORT = 1024
MAX_SESSIONS = 100_000  # open sessions remembered for packs that name the client once per session
PACK_NAMES = ("postfix", "exim", "sendmail", "dovecot", "opensmtpd", "sshd")

_RE2_OPTS = re2.Options()
_RE2_OPTS.max_mem = 64 << 20


class PackError(ValueError):
    """A rule pack that cannot be used, phrased for the admin: file, rule, problem."""


@dataclass(frozen=True, slots=True, eq=False)  # identity hash: rules live in sets on the hot path
class Rule:
    id: str  # "pack/rule"
    service: str
    weight: int
    why: str
    pattern: str  # the regex, on the message; has a named group `addr`
    literals: tuple[str, ...]  # one of them occurs in every line the regex matches: the prefilter keys
    caseless: bool = False
    group: str | None = None
    distinct: str | None = None  # named group whose distinct values count (repeats weigh less)
    repeat_weight: int | None = None
    program: re.Pattern[str] | None = None  # narrows the pack's programs
    # "event" (a Hit), or for daemons that name the client once per session (OpenSMTPD 6.4+):
    # "session-start" (remembers session -> addr), "session-end" (forgets it). An event rule
    # whose regex has a `session` group instead of `addr` takes the client from that session.
    kind: str = "event"
    session: bool = False  # an event rule that takes its client from a session-start rule
    # (re, RE2) compiled: at load for a local pack (its errors are the admin's to see at start), on
    # first use for a packaged one (the test suite compiles every one; most never see a line).
    compiled: list = field(default_factory=list, compare=False, repr=False)
    planned: list = field(default_factory=list, compare=False, repr=False)  # [_plan(self)], once made

    @property
    def regex(self) -> re.Pattern[str]:
        return (self.compiled or _compile(self))[0]

    @property
    def linear(self) -> re2._Regexp:
        """The same regex in RE2, for long lines where backtracking could bite."""
        return (self.compiled or _compile(self))[1]

    @property
    def plan(self) -> tuple:
        """What the in-place path needs (see _plan), made once per rule for every Matcher."""
        if not self.planned:
            self.planned.append(_plan(self))
        return self.planned[0]


def _compile(rule: Rule) -> list:
    rule.compiled[:] = [re.compile(rule.pattern), re2.compile(rule.pattern, options=_RE2_OPTS)]
    return rule.compiled


@dataclass(frozen=True, slots=True)
class RulePack:
    name: str
    description: str
    programs: re.Pattern[str]  # syslog program names (tag before [pid]) this pack reads
    rules: tuple[Rule, ...]


# ----------------------------------------------------------------------------- loading packs


def load_pack(name_or_path: str) -> RulePack:
    """A packaged pack by name (`postfix`) or a pack file by path (`/etc/relayguard/rules.d/x.toml`)."""
    if "/" in name_or_path or name_or_path.endswith(".toml"):
        file = Path(name_or_path)
        return _build_pack(file.name, tomllib.loads(file.read_text(encoding="utf-8")))
    if name_or_path not in PACK_NAMES:
        raise PackError(f"unknown rule pack {name_or_path!r}; known: {', '.join(PACK_NAMES)}")
    res = resources.files("relayguard.rules").joinpath(f"{name_or_path}.toml")
    return _build_pack(f"{name_or_path}.toml", tomllib.loads(res.read_text(encoding="utf-8")), packaged=True)


def _build_pack(file: str, data: dict, packaged: bool = False) -> RulePack:
    name = data.get("name") or file.removesuffix(".toml")
    try:
        programs = re.compile(data["programs"])
    except (KeyError, re.error) as e:
        raise PackError(f"{file}: `programs` must be a regex of syslog program names ({e})") from None
    rules = []
    seen = set()
    for raw in data.get("rule", []):
        rule = _build_rule(file, name, raw, packaged)
        if rule.id in seen:
            raise PackError(f"{file}: rule id {rule.id!r} appears twice")
        seen.add(rule.id)
        rules.append(rule)
    if not rules:
        raise PackError(f"{file}: no [[rule]] entries")
    return RulePack(name=name, description=data.get("description", ""), programs=programs, rules=tuple(rules))


_GROUP_NAME = re.compile(r"\(\?P<(\w+)>")


def _build_rule(file: str, pack: str, raw: dict, packaged: bool = False) -> Rule:
    rid = raw.get("id", "?")
    where = f"{file}: rule {rid!r}"
    kind = raw.get("kind", "event")
    if kind not in ("event", "session-start", "session-end"):
        raise PackError(f"{where}: kind must be event, session-start or session-end, not {kind!r}")
    for key in ("id", "service", "weight", "why", "regex") if kind == "event" else ("id", "regex"):
        if key not in raw:
            raise PackError(f"{where}: missing key {key!r}")
    pattern = raw["regex"]
    compiled = []
    if packaged:
        groups = set(_GROUP_NAME.findall(pattern))
    else:
        try:
            compiled = [re.compile(pattern), re2.compile(pattern, options=_RE2_OPTS)]
        except (re.error, re2.error) as e:
            raise PackError(f"{where}: regex does not compile (it must be valid for both re and RE2): {e}") from None
        groups = set(compiled[0].groupindex)
    if kind == "session-start" and not ("addr" in groups and "session" in groups):
        raise PackError(f"{where}: a session-start regex needs the groups (?P<session>...) and (?P<addr>...)")
    if kind == "session-end" and "session" not in groups:
        raise PackError(f"{where}: a session-end regex needs a group (?P<session>...)")
    if kind == "event" and "addr" not in groups and "session" not in groups:
        raise PackError(f"{where}: regex needs a named group (?P<addr>...) for the client address "
                        "(or (?P<session>...) in a pack with a session-start rule)")
    distinct = raw.get("distinct")
    if distinct and distinct not in groups:
        raise PackError(f"{where}: distinct = {distinct!r} names no group of the regex")
    literal, caseless = raw.get("literal"), False
    if literal is None:
        literal, caseless = required_literal(pattern)
    # A list when the regex has alternatives with no common literal: each must be selective,
    # since every line holding one of them costs a full match (a short one like "nown" hits
    # every "unknown[addr]" of a mail log).
    literals = (literal,) if isinstance(literal, str) else tuple(literal)
    if not literals or not all(isinstance(lit, str) and len(lit) >= 4 for lit in literals):
        raise PackError(f"{where}: no literal of 4+ characters that every match contains; add `literal = \"...\"` "
                        "(or a list of them, one of which every match contains)")
    program = raw.get("program")
    return Rule(
        id=f"{pack}/{rid}",
        service=raw.get("service", ""),
        weight=int(raw.get("weight", 0)),
        why=raw.get("why", ""),
        pattern=pattern,
        literals=literals,
        caseless=caseless,
        group=raw.get("group"),
        distinct=distinct,
        repeat_weight=raw.get("repeat_weight"),
        program=re.compile(program) if program else None,
        kind=kind,
        session=kind == "event" and "addr" not in groups,
        compiled=compiled,
    )


_OTHER: Any = object()  # plans.get default: a rule that is not for this program


def _plan(rule: Rule) -> tuple:
    """What the in-place path needs of a rule, in one tuple: (match at an offset, id, service,
    weight, group, distinct, repeat weight); () when the rule needs the text path."""
    fast, anchored = _in_place(rule.pattern)
    if fast is None or rule.kind != "event" or rule.session:
        return ()
    return (fast.match if anchored else fast.search, rule.id, rule.service, rule.weight, rule.group, rule.distinct,
            rule.repeat_weight)


def _in_place(pattern: str) -> tuple[re.Pattern[bytes] | None, bool]:
    """The bytes regex that matches a message where it stands inside its line, or (None, False).

    `regex.search(message)` and `fast.match/search(line_bytes, offset, end)` agree on ASCII text
    when the pattern is ASCII, has no ^ or \\A but a leading one (dropped: `match` anchors at the
    offset), and no lookbehind (which could see the header). \\b at the offset sees the ": "
    that ends every header, the same as the start of a string.
    """
    from re import _constants as c  # type: ignore[attr-defined]
    from re import _parser as p  # type: ignore[attr-defined]

    if not pattern.isascii():
        return None, False
    anchored = pattern.startswith("^")
    body = pattern[1:] if anchored else pattern
    starts = (c.AT_BEGINNING, c.AT_BEGINNING_STRING, c.AT_BEGINNING_LINE)

    def parts(op: object, av: object) -> list:
        """The sub-sequences of one parsed node."""
        if op is c.SUBPATTERN:
            return [av[3]]  # type: ignore[index]
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
            return [av[2]]  # type: ignore[index]
        if op is c.BRANCH:
            return list(av[1])  # type: ignore[index]
        if op is c.GROUPREF_EXISTS:
            return [b for b in av[1:] if b is not None]  # type: ignore[index]
        if op in (c.ASSERT, c.ASSERT_NOT):
            return [av[1]]  # type: ignore[index]
        return [av] if op is c.ATOMIC_GROUP else []

    def unsafe(seq: Iterable) -> bool:
        for op, av in seq:
            if op is c.AT and av in starts:
                return True
            if op in (c.ASSERT, c.ASSERT_NOT) and av[0] < 0:  # direction -1: a lookbehind
                return True
            if any(unsafe(sub) for sub in parts(op, av)):
                return True
        return False

    try:
        if unsafe(p.parse(body)):
            return None, False
        return re.compile(body.encode("ascii")), anchored
    except re.error:  # e.g. a flag only str patterns take
        return None, False


def required_literal(pattern: str) -> tuple[str, bool]:
    """The longest run of literal characters that every match of `pattern` must contain.

    Walks Python's own parse of the regex: only top-level sequences (and groups or repeats of
    at least one) are required; alternations and optional parts are not.
    """
    from re import _constants as c  # type: ignore[attr-defined]
    from re import _parser as p  # type: ignore[attr-defined]

    parsed = p.parse(pattern)
    caseless = bool(parsed.state.flags & re.IGNORECASE)
    best, run = "", []

    def flush() -> None:
        nonlocal best
        s = "".join(run)
        if len(s) > len(best):
            best = s
        run.clear()

    def walk(seq: Iterable) -> None:
        for op, av in seq:
            if op is c.LITERAL:
                run.append(chr(av))
            elif op is c.SUBPATTERN:
                walk(av[3])
            elif op in (c.MAX_REPEAT, c.MIN_REPEAT) and av[0] >= 1:
                flush()
                walk(av[2])
                flush()
            else:
                flush()

    walk(parsed)
    flush()
    return best, caseless


# ----------------------------------------------------------------------------- syslog headers

_MONTHS = {m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep",
                                       "Oct", "Nov", "Dec"), 1)}
_TAG = r"(?P<prog>[^\s\[\]:]+)(?:\[(?P<pid>\d+)\])?: "
# Classic BSD syslog (rsyslog's traditional format, journalctl's "short").
_CLASSIC = re.compile(r"(?P<ts>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d)(?:\.\d+)? (?P<host>\S+) " + _TAG)
# RFC 3339: rsyslog's high-precision default on Debian 12, journalctl short-iso(-precise).
_ISO = re.compile(r"(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?) (?P<host>\S+) " + _TAG)
# RFC 5424: <PRI>1 TIMESTAMP HOST APP PROCID MSGID [SD]|- MSG
_5424 = re.compile(r"<\d{1,3}>1 (?P<ts>\S+) (?P<host>\S+) (?P<prog>\S+) (?P<pid>\S+) \S+ "
                   r"(?:-|(?:\[(?:[^\]\\]|\\.)*\])+)(?: \ufeff?|$)")
# Exim's own mainlog: 2026-12-03 00:00:01[.mmm] [+0000] [[pid]] message
_EXIM = re.compile(r"(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(?:\.\d+)?(?: (?P<tz>[+-]\d{4}))?(?: \[(?P<pid>\d+)\])? ")
# The two headers of nearly every line, as one regex on bytes for the in-place path (see
# Matcher._match_in_place): groups classic time, RFC 3339 time, program. It matches exactly
# where _CLASSIC or _ISO does on ASCII text; anything else takes split_header.
_HEAD = re.compile(
    rb"(?:([A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d)(?:\.\d+)?"
    rb"|(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?))"
    rb" \S+ ([^\s\[\]:]+)(?:\[\d+\])?: "
)


@dataclass(slots=True)
class Clock:
    """Turns header timestamps into epoch seconds.

    Classic syslog has neither year nor zone: the zone is the local one (as rsyslog wrote it),
    and the year is the reference year, minus one for months after the reference month (a
    December line read in January).
    """

    ref: float = field(default_factory=time.time)
    _ref_year: int = 0
    _ref_mon: int = 0
    _cache: dict[str | bytes, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.refresh(self.ref)

    def refresh(self, ref: float) -> None:
        """A new reference time (the daemon calls this as the days pass, so New Year works)."""
        self.ref = ref
        t = time.localtime(ref)
        if (t.tm_year, t.tm_mon) != (self._ref_year, self._ref_mon):
            self._ref_year, self._ref_mon = t.tm_year, t.tm_mon
            self._cache.clear()

    def classic(self, ts: str | bytes) -> float:
        """`Dec  3 00:00:06` (text, or its ASCII bytes) -> epoch seconds, cached per second and minute."""
        v = self._cache.get(ts)
        if v is None:
            minute = ts[:12]
            base = self._cache.get(minute)
            if base is None:
                text = ts if isinstance(ts, str) else ts.decode("ascii")
                mon = _MONTHS[text[:3]]
                year = self._ref_year - 1 if mon > self._ref_mon else self._ref_year
                # Zones change on whole minutes, so a minute's base plus its seconds is exact.
                base = time.mktime((year, mon, int(text[4:6]), int(text[7:9]), int(text[10:12]), 0, 0, 0, -1))
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[minute] = base
            v = self._cache[ts] = base + int(ts[13:15])
        return v

    @staticmethod
    def iso(ts: str) -> float:
        d = datetime.fromisoformat(ts)
        return d.timestamp()  # naive (no offset) means local time, as written

    def exim(self, ts: str, tz: str | None) -> float:
        return datetime.fromisoformat(ts.replace(" ", "T") + (tz or "")).timestamp()


def split_header(line: str, clock: Clock) -> tuple[float, str, int] | None:
    """(time, program, offset of the message) of a syslog or Exim mainlog line, or None."""
    c0 = line[:1]
    if c0.isalpha():
        m = _CLASSIC.match(line)
        if m:
            try:
                ts, prog = m.group("ts", "prog")
                return clock.classic(ts), prog, m.end()
            except (KeyError, ValueError, OverflowError):
                return None
        return None
    if c0.isdigit():
        m = _ISO.match(line)
        if m:
            try:
                ts, prog = m.group("ts", "prog")
                return Clock.iso(ts), prog, m.end()
            except ValueError:
                return None
        m = _EXIM.match(line)
        if m:
            try:
                return clock.exim(m.group("ts"), m.group("tz")), "exim", m.end()
            except ValueError:
                return None
        return None
    if c0 == "<":
        m = _5424.match(line)
        if m:
            try:
                return Clock.iso(m.group("ts")), m.group("prog"), m.end()
            except ValueError:
                return None
    return None


# ----------------------------------------------------------------------------- matching


@dataclass(slots=True)
class Counters:
    lines: int = 0  # lines seen
    candidates: int = 0  # lines the prefilter picked
    hits: int = 0
    garbage: int = 0  # candidate lines that are not log lines, or over MAX_LINE
    by_rule: dict[str, int] = field(default_factory=dict)


class Matcher:
    """Matches lines against a set of packs; each pack only sees lines of its own programs."""

    def __init__(self, packs: Sequence[RulePack], clock: Clock | None = None, keep_text: bool = True) -> None:
        self.packs = tuple(packs)
        self.clock = clock or Clock()
        self.keep_text = keep_text  # `scan` does not need the line in every Hit; `why` does
        self.rules: list[Rule] = [r for p in self.packs for r in p.rules]
        self._pack_of = {r.id: p for p in self.packs for r in p.rules}
        self._by_program: dict[str, frozenset[Rule]] = {}
        self._allowed: dict[bytes, dict[Rule, tuple | None]] = {}  # the same by the program's bytes, with plans
        self._addrs: dict[bytes, str] = {}  # address as written -> canonical_addr of it
        self.counters = Counters()
        self._prefilter = _Prefilter(self.rules)
        self._sessions: dict[tuple[str, str], str] = {}  # (pack, session id) -> client address

    # -- one line (the daemon, tests, `why`)
    def match(self, line: str, source: str = "", lineno: int = 0) -> list[Hit]:
        hits = self._match_text(line, source, lineno, self.rules)
        self._count_hits(hits)
        return hits

    def rules_for(self, program: str) -> frozenset[Rule]:
        rules = self._by_program.get(program)
        if rules is None:
            rules = frozenset(
                r for r in self.rules
                if self._pack_of[r.id].programs.search(program) and (r.program is None or r.program.search(program))
            )
            if len(self._by_program) < 4096 and len(program) <= 64:  # a bounded cache, whatever the log holds
                self._by_program[program] = rules
        return rules

    def _match_text(self, line: str, source: str, lineno: int, candidates: Iterable[Rule]) -> list[Hit]:
        head = split_header(line, self.clock)
        if head is None:
            self.counters.garbage += 1
            return []
        ts, prog, start = head
        msg = line[start:]
        allowed = self.rules_for(prog)
        long_line = len(msg) > _SHORT
        hits = []
        for rule in candidates:
            if rule not in allowed:
                continue
            m = (rule.linear if long_line else rule.regex).search(msg)
            if m is None:
                continue
            if rule.kind != "event" or rule.session:
                addr = self._session(rule, m)
                if addr is None:
                    continue
            else:
                raw = m.group("addr")  # None when a local pack made the group optional
                addr = canonical_addr(raw) if raw else None
                if addr is None:
                    continue
            key = (m.group(rule.distinct) or "") if rule.distinct else None
            hits.append(Hit(ts, addr, rule.id, rule.service, rule.weight, source, lineno,
                            line if self.keep_text else "", rule.group, key, rule.repeat_weight))
        return hits

    def _match_in_place(self, block: bytes, start: int, end: int, source: str, lineno: int,
                        candidates: Iterable[Rule], out: list[Hit]) -> bool:
        """_match_text for an ASCII line inside `block`, without slicing or decoding it: header and
        rules matched in place on the bytes, hits appended to `out`. False when the line needs
        _match_text (another header format, a long message, a session rule, a time that does not
        parse); the caller then drops what this appended for the line."""
        head = _HEAD.match(block, start, end)
        if head is None:
            return False
        mstart = head.end()
        if end - mstart > _SHORT:
            return False
        classic, iso, prog = head.groups()
        ts = self.clock._cache.get(classic) if classic is not None else None  # the clock's own cache, uncalled
        if ts is None:
            try:
                ts = self.clock.classic(classic) if classic is not None else Clock.iso(iso.decode())
            except (KeyError, ValueError, OverflowError):
                return False
        plans = self._allowed.get(prog)  # this program's rules -> their plans (None: not made yet)
        if plans is None:
            plans = dict.fromkeys(self.rules_for(prog.decode()))
            if len(self._allowed) < 4096 and len(prog) <= 64:
                self._allowed[prog] = plans
        addrs = self._addrs
        for rule in candidates:
            plan = plans.get(rule, _OTHER)
            if plan is _OTHER:  # a rule of another program
                continue
            if plan is None:
                plan = plans[rule] = rule.plan
            if not plan:
                return False
            m = plan[0](block, mstart, end)
            if m is None:
                continue
            raw = m.group("addr")
            addr = addrs.get(raw)
            if addr is None:
                addr = canonical_addr(raw.decode()) if raw else None
                if addr is None:
                    continue
                if len(addrs) >= 8192:  # bounded: a flood brings millions of one-time addresses
                    addrs.clear()
                addrs[raw] = addr
            key = (m.group(plan[5]) or b"").decode() if plan[5] else None
            text = block[start:end].decode() if self.keep_text else ""
            out.append(make_hit((ts, addr, plan[1], plan[2], plan[3], source, lineno, text, plan[4], key, plan[6])))
        return True

    def _count_hits(self, hits: list[Hit]) -> None:
        self.counters.hits += len(hits)
        by_rule = self.counters.by_rule
        for rule, n in Counter(map(itemgetter(2), hits)).items():
            by_rule[rule] = by_rule.get(rule, 0) + n

    def _session(self, rule: Rule, m: re.Match[str]) -> str | None:
        """Session bookkeeping; for an event rule, the client of its session (None: unknown)."""
        key = (rule.id.split("/", 1)[0], m.group("session"))
        if rule.kind == "session-start":
            addr = canonical_addr(m.group("addr") or "")
            if addr is not None:
                if len(self._sessions) >= MAX_SESSIONS:  # sessions whose end we never saw
                    self._sessions.clear()
                self._sessions[key] = addr
            return None
        if rule.kind == "session-end":
            self._sessions.pop(key, None)
            return None
        return self._sessions.get(key)

    # -- whole blocks (scan, the daemon's tailer)
    def scan(self, block: bytes, source: str = "", first_lineno: int = 1, numbered: bool = True) -> list[Hit]:
        """Hits in `block`, which holds whole lines (a final line without its newline counts too).

        Line numbers count from `first_lineno` for the first line of the block; with
        numbered=False they are left 0, which saves a count over the block per candidate.
        This loop runs once per candidate line of every log, so it is written flat: the
        prefilter's line ends, the header and each rule matched in place on the bytes.
        """
        if block and not block.endswith(b"\n"):
            block += b"\n"
        counters = self.counters
        counters.lines += block.count(b"\n")
        long_spans = _long_lines(block)
        counters.garbage += len(long_spans)
        ascii_block = block.isascii()  # nearly always: then no line needs its own check
        hits: list[Hit] = []
        pos_line, lineno = 0, first_lineno if numbered else 0
        lines = self._prefilter.lines(block)
        counters.candidates += len(lines)
        in_place, as_text = self._match_in_place, self._match_text
        for start, end, rules in lines:
            if numbered:
                lineno += block.count(b"\n", pos_line, start)
                pos_line = start
            if long_spans and _inside(long_spans, start):
                continue  # counted above
            if ascii_block or block[start:end].isascii():
                n = len(hits)
                if in_place(block, start, end, source, lineno, rules, hits):
                    continue
                del hits[n:]
            hits += as_text(block[start:end].decode("utf-8", "replace"), source, lineno, rules)
        self._count_hits(hits)
        return hits


def _long_lines(block: bytes) -> list[tuple[int, int]]:
    """Spans of lines longer than MAX_LINE; cheap (one rfind per 64 KiB) when there are none."""
    spans: list[tuple[int, int]] = []
    i, n = 0, len(block)
    while i + MAX_LINE < n:
        # The last newline within reach: the line starting at i is short, and so is every one
        # up to there (a forward find would step one line at a time: a million calls per block).
        j = block.rfind(b"\n", i, i + MAX_LINE + 1)
        if j >= 0:
            i = j + 1
            continue
        s = block.rfind(b"\n", 0, i) + 1
        e = block.find(b"\n", i)
        e = n if e < 0 else e
        spans.append((s, e))
        i = e + 1
    return spans


def _inside(spans: list[tuple[int, int]], pos: int) -> bool:
    return any(s <= pos <= e for s, e in spans)


class _Prefilter:
    """One pass over a block for every rule's literal; yields candidate lines with the rules hit."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = list(rules)
        lits: dict[tuple[str, bool], list[Rule]] = {}
        for r in self.rules:
            for lit in r.literals:
                lits.setdefault((lit, r.caseless), []).append(r)
        self.keys = list(lits)
        self.rules_of = [tuple(lits[k]) for k in self.keys]
        self._db = None
        if hyperscan is not None and self.keys:
            db = hyperscan.Database()
            db.compile(
                expressions=[re.escape(lit).encode() for lit, _ in self.keys],
                ids=list(range(len(self.keys))),
                elements=len(self.keys),
                flags=[hyperscan.HS_FLAG_CASELESS if ci else 0 for _, ci in self.keys],
            )
            self._db = db
            self._scratch = hyperscan.Scratch(db)
        else:
            alt = "|".join(
                f"(?i:{re.escape(lit)})" if ci else re.escape(lit) for lit, ci in self.keys
            ) or "(?!)"
            self._rx = re2.compile(alt.encode("latin-1", "backslashreplace"), options=_RE2_OPTS)
            # each literal as bytes, lower-cased where it is caseless (lines are folded to match)
            self._bytes_keys = [(lit.encode("utf-8").lower() if ci else lit.encode("utf-8"), ci)
                                for lit, ci in self.keys]

    def _ends(self, block: bytes) -> list[tuple[int, int]]:
        """(end offset, literal index) of every literal occurrence, in order."""
        if self._db is not None:
            found: list[tuple[int, int]] = []
            add = found.append

            def on_match(idx: int, _from: int, to: int, _flags: int, _ctx: object) -> None:
                add((to, idx))

            self._db.scan(block, match_event_handler=on_match, scratch=self._scratch)
            return found
        # RE2 finds a line holding some literal; which literals it holds (they may overlap, which
        # one scan for the alternation would miss) is then asked of the line itself.
        out = []
        keys = self._bytes_keys
        pos = 0
        while (m := self._rx.search(block, pos)) is not None:
            start = block.rfind(b"\n", 0, m.start()) + 1
            end = block.find(b"\n", m.end())
            end = len(block) if end < 0 else end
            line = block[start:end]
            folded = line.lower()
            found = []
            for i, (lit, ci) in enumerate(keys):
                j = folded.find(lit) if ci else line.find(lit)
                if j >= 0:
                    found.append((start + j + len(lit), i))
            out += sorted(found)
            pos = end + 1
        return out

    def lines(self, block: bytes) -> list[tuple[int, int, tuple[Rule, ...]]]:
        """(line start, line end, rules whose literal occurs in it) per candidate line, in order.

        `block` ends with a newline; literal occurrences arrive in order of their end.
        """
        out: list[tuple[int, int, tuple[Rule, ...]]] = []
        rules_of = self.rules_of
        rfind, find = block.rfind, block.find
        end = -1
        for to, idx in self._ends(block):
            if to > end:  # the first literal of a new line
                end = find(b"\n", to - 1)
                out.append((rfind(b"\n", 0, to) + 1, end, rules_of[idx]))
            else:  # another literal on the same line
                start, end, cur = out[-1]
                if rules_of[idx] is not cur:
                    out[-1] = (start, end, tuple(dict.fromkeys(cur + rules_of[idx])))
        return out


def load_packs(names: Iterable[str]) -> list[RulePack]:
    return [load_pack(n) for n in names]


def match(pack: RulePack, line: str) -> Hit | None:
    """The first hit of `pack` on one line (the shape tests and `relayguard why` want)."""
    hits = Matcher([pack]).match(line)
    return hits[0] if hits else None
