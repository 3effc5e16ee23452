"""`relayguard scan`: replay log files offline through parse -> score -> decide.

No daemon, no database, no firewall: the same Matcher, Scorer and decide() as the daemon, on
the logs' own timestamps. A simulated ban hides the offender's later lines until it would have
expired (a real ban would have dropped them), so repeat offences escalate as they would live.
"""

from __future__ import annotations

import gzip
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from relayguard.decide import Allowlist, History, Policy, decide
from relayguard.model import Hit
from relayguard.parse import Clock, Counters, Matcher, RulePack
from relayguard.score import Scorer, Window

BLOCK = 8 << 20


@dataclass(slots=True)
class Offender:
    ip: str
    score: int = 0  # highest score at an offence
    events: int = 0  # evidence events (positive weight) in the whole replay
    first: float = 0.0
    last: float = 0.0
    rules: dict[str, int] = field(default_factory=dict)
    bans: list[tuple[float, int, str]] = field(default_factory=list)  # (at, seconds, window)

    @property
    def slow(self) -> bool:
        """Caught only by the long window: an attacker pacing itself under the short one."""
        return bool(self.bans) and all(w != "short" for _, _, w in self.bans)


@dataclass(slots=True)
class ScanResult:
    offenders: list[Offender]
    lines: int
    hits: int
    garbage: int
    by_rule: dict[str, int]
    files: list[str]


def open_log(path: str) -> BinaryIO:
    """Plain or gzip, told apart by the magic bytes rather than the name."""
    fh = open(path, "rb")  # noqa: SIM115 - returned to the caller
    if fh.read(2) == b"\x1f\x8b":
        fh.close()
        return gzip.open(path, "rb")  # type: ignore[return-value]
    fh.seek(0)
    return fh


def blocks(fh: BinaryIO, size: int = BLOCK) -> Iterator[tuple[bytes, int]]:
    """(block of whole lines, 1-based number of its first line)."""
    lineno, rest = 1, b""
    while True:
        data = fh.read(size)
        if not data:
            break
        data = rest + data if rest else data
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            rest = data
            continue
        rest = data[cut:]
        yield data[:cut], lineno
        lineno += data.count(b"\n", 0, cut)
    if rest:
        yield rest + b"\n", lineno


PARALLEL_MIN = 32 << 20  # below this a second process costs more than it saves
HEAD_SHARE = 0.42  # the parent also scores, so the child parses the larger part


def _split_point(path: str) -> int | None:
    """Where to cut a big plain log between two processes (at a line start), or None."""
    if (os.cpu_count() or 1) < 2 or not hasattr(os, "fork"):
        return None
    size = os.path.getsize(path)
    if size < PARALLEL_MIN:
        return None
    with open(path, "rb") as fh:
        if fh.read(2) == b"\x1f\x8b":
            return None
        fh.seek(int(size * HEAD_SHARE))
        fh.readline()
        return fh.tell()


class _Limited:
    """A binary file read only up to `end`."""

    def __init__(self, fh: BinaryIO, end: int) -> None:
        self.fh, self.left = fh, end - fh.tell()

    def read(self, n: int) -> bytes:
        data = self.fh.read(min(n, self.left)) if self.left > 0 else b""
        self.left -= len(data)
        return data


class _TailParser:
    """Parses [split, EOF) of a file in a forked child. Hits come back pickled in batches through an
    unlinked temporary file: the child never blocks on a full pipe, and the parent holds one batch
    at a time, not the whole tail."""

    BATCH = 8192

    def __init__(self, packs: Sequence[RulePack], clock: Clock, path: str, split: int, numbered: bool) -> None:
        self.args = (packs, clock, path, split, numbered)
        self.counters = Counters()
        self.pid = 0
        self.spool: BinaryIO | None = None

    def __enter__(self) -> _TailParser:
        self.spool = tempfile.TemporaryFile()  # closed in __exit__
        self.pid = os.fork()
        if self.pid == 0:  # child: never returns
            code = 0
            try:
                self._child(self.spool)
            except BaseException:  # reported through the exit status
                code = 1
            os._exit(code)
        return self

    def _child(self, out: BinaryIO) -> None:
        packs, clock, path, split, numbered = self.args
        matcher = Matcher(packs, clock, keep_text=False)
        dump = pickle.dump
        with open(path, "rb") as fh:
            first = 1 + (_count_lines(fh, split) if numbered else 0)
            fh.seek(split)
            batch: list[tuple] = []
            for block, n in blocks(fh):
                for hit in matcher.scan(block, path, first + n - 1, numbered):
                    batch.append(tuple(hit))
                    if len(batch) >= self.BATCH:
                        dump(batch, out, pickle.HIGHEST_PROTOCOL)
                        batch = []
        dump(batch, out, pickle.HIGHEST_PROTOCOL)
        dump(matcher.counters, out, pickle.HIGHEST_PROTOCOL)
        out.flush()

    def hits(self) -> Iterator[Hit]:
        assert self.spool is not None
        _, status = os.waitpid(self.pid, 0)
        self.pid = 0
        if status != 0:
            raise OSError(f"parser process failed (status {status})")
        self.spool.seek(0)
        make = Hit._make
        while True:
            batch = pickle.load(self.spool)
            if isinstance(batch, Counters):
                self.counters = batch
                return
            for t in batch:
                yield make(t)

    def __exit__(self, *exc: object) -> None:
        if self.pid:
            os.waitpid(self.pid, 0)
        if self.spool is not None:
            self.spool.close()


def _count_lines(fh: BinaryIO, end: int) -> int:
    n, left = 0, end
    while left > 0:
        data = fh.read(min(BLOCK, left))
        if not data:
            break
        n += data.count(b"\n")
        left -= len(data)
    return n


class Replay:
    """parse -> score -> decide over files, on event time."""

    def __init__(self, packs: Sequence[RulePack], windows: Sequence[Window], policy: Policy,
                 allow: Allowlist, on_hit: Callable[[Hit], None] | None = None) -> None:
        self.packs = packs
        self.scorer = Scorer(windows)
        self.policy = policy
        self.allow = allow
        self.on_hit = on_hit
        self.offenders: dict[str, Offender] = {}
        self._stats: dict[str, Offender] = {}
        self._banned_until: dict[str, float] = {}
        self.lines = self.hits = self.garbage = 0
        self.by_rule: dict[str, int] = {}

    def run(self, path: str) -> None:
        clock = Clock(ref=os.stat(path).st_mtime)
        numbered = self.on_hit is not None  # only event listings show line numbers
        feed = self.feed
        split = _split_point(path)
        if split is None:
            matcher = Matcher(self.packs, clock, keep_text=False)
            with open_log(path) as fh:
                for block, first in blocks(fh):
                    for hit in matcher.scan(block, path, first, numbered):
                        feed(hit)
            self._count(matcher.counters)
            return
        # Big plain file: a child parses the tail while we parse and score the head, then we
        # score the child's hits. Scoring stays in one process and in file order.
        with _TailParser(self.packs, clock, path, split, numbered) as tail:
            matcher = Matcher(self.packs, clock, keep_text=False)
            with open(path, "rb") as fh:
                for block, first in blocks(_Limited(fh, split)):
                    for hit in matcher.scan(block, path, first, numbered):
                        feed(hit)
            self._count(matcher.counters)
            for hit in tail.hits():
                feed(hit)
            self._count(tail.counters)

    def _count(self, c: Counters) -> None:
        self.lines += c.lines
        self.hits += c.hits
        self.garbage += c.garbage
        for k, v in c.by_rule.items():
            self.by_rule[k] = self.by_rule.get(k, 0) + v

    def feed(self, hit: Hit) -> None:
        if self.on_hit is not None:
            self.on_hit(hit)
        addr = hit.addr
        if addr in self.allow:
            return
        if hit.weight > 0:
            st = self._stats.get(addr)
            if st is None:
                st = self._stats[addr] = Offender(addr, first=hit.ts, last=hit.ts)
            st.events += 1
            st.rules[hit.rule] = st.rules.get(hit.rule, 0) + 1
            if hit.ts < st.first:
                st.first = hit.ts
            elif hit.ts > st.last:
                st.last = hit.ts
        until = self._banned_until.get(addr)
        if until is not None and hit.ts < until:
            return  # a real ban would have dropped this client
        offense = self.scorer.observe(hit)
        if offense is None:
            return
        off = self.offenders.get(addr)
        prior = len(off.bans) if off else 0
        ban = decide(offense, History(bans=prior), self.policy, self.allow)
        if ban is None or ban.expires is None:
            return
        if off is None:
            off = self.offenders[addr] = self._stats[addr]
        off.score = max(off.score, offense.score)
        secs = int(ban.expires - offense.ts)
        off.bans.append((offense.ts, secs, offense.window))
        self._banned_until[addr] = ban.expires

    def result(self, files: list[str]) -> ScanResult:
        offenders = sorted(self.offenders.values(), key=lambda o: (-o.score, -o.events, o.ip))
        return ScanResult(offenders, self.lines, self.hits, self.garbage, dict(self.by_rule), files)
