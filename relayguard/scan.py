"""`relayguard scan`: replay log files offline through parse -> score -> decide.

No daemon, no database, no firewall: the same Matcher, Scorer and decide() as the daemon, on
the logs' own timestamps. A simulated ban hides the offender's later lines until it would have
expired (a real ban would have dropped them), so repeat offences escalate as they would live.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from relayguard.decide import Allowlist, History, Policy, decide
from relayguard.memory import without_gc
from relayguard.model import Hit, make_hit
from relayguard.parse import Clock, Counters, Matcher, RulePack
from relayguard.score import Scorer, Window

BLOCK = 1 << 20  # read size: a block and its lines stay in the core's cache while they are parsed


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


def blocks(fh: BinaryIO, size: int = BLOCK, count: bool = True) -> Iterator[tuple[bytes, int]]:
    """(block of whole lines, 1-based number of its first line; 0 with count=False, which
    saves a pass over every block). The last block may lack its final newline."""
    lineno = 1 if count else 0
    while True:
        data = fh.read(size)
        if not data:
            break
        if not data.endswith(b"\n"):
            data += fh.readline()  # the rest of the last line: one copy, nothing carried over
        yield data, lineno
        if count:
            lineno += data.count(b"\n")


PARALLEL_MIN = 32 << 20  # below this, more processes cost more than they save
_BATCH = 8192  # hits per pickled batch in a spool


class ScanError(Exception):
    """A file that cannot be read as a log: its name and why, for a one-line error."""


@dataclass(frozen=True, slots=True)
class _Segment:
    """Bytes [start, end) of a plain log file, cut at line starts."""

    path: str
    start: int
    end: int
    ref: float  # the file's mtime: the reference year of its classic timestamps


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _line_start(path: str, pos: int) -> int:
    """The first line start at or after `pos`."""
    if pos == 0:
        return 0
    with open(path, "rb") as fh:
        fh.seek(pos - 1)
        fh.readline()
        return fh.tell()


def _shares(paths: Sequence[str], n: int) -> list[list[_Segment]]:
    """The files, in order, as `n` runs of segments of about equal size."""
    sizes = [(p, st.st_size, st.st_mtime) for p in paths for st in (os.stat(p),)]
    total = sum(size for _, size, _ in sizes)
    shares: list[list[_Segment]] = [[] for _ in range(n)]
    base = 0
    for path, size, ref in sizes:
        for k in range(n):
            lo = max(0, total * k // n - base)
            hi = min(size, total * (k + 1) // n - base) if k < n - 1 else size
            if lo < hi:
                start, end = _line_start(path, lo), _line_start(path, hi) if hi < size else size
                if start < end:
                    shares[k].append(_Segment(path, start, end, ref))
        base += size
    return shares


def _workers(paths: Sequence[str], min_size: int) -> int:
    """How many processes to scan with: one per core, for big plain files only."""
    n = min(os.cpu_count() or 1, 8)
    if n < 2 or not hasattr(os, "fork"):
        return 1
    if any(_is_gzip(p) for p in paths) or sum(os.path.getsize(p) for p in paths) < min_size:
        return 1
    return n


class _Limited:
    """A binary file read only up to `end`."""

    def __init__(self, fh: BinaryIO, end: int) -> None:
        self.fh, self.left = fh, end - fh.tell()

    def read(self, n: int) -> bytes:
        data = self.fh.read(min(n, self.left)) if self.left > 0 else b""
        self.left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self.fh.readline(self.left) if self.left > 0 else b""
        self.left -= len(line)
        return line


class _Shuffle:
    """Map -> shuffle -> reduce over forked workers, for big plain logs without an event listing.

    Worker k parses share k of the files and sends each hit to the worker that owns its address
    (hash(addr) mod n); then every worker scores the addresses it owns, in file order (the hits
    of share 0, then of share 1, ...), so the result is exactly that of one process. Scoring is
    per address and needs nothing from other addresses, which is what makes the split exact.
    Hits travel as pickled batches through unlinked temporary files, one per (share, owner); a
    worker signals "share parsed" by closing its pipe. Worker 0 is this process; the others
    send back their offenders and counters. Matchers start fresh at a share boundary, so an
    OpenSMTPD session cut in two loses the events after the cut (one session, at most).
    """

    OWN_MAX = 1 << 18  # own hits kept in memory; beyond this they go through the spool too

    def __init__(self, replay: Replay, shares: list[list[_Segment]]) -> None:
        self.replay = replay
        self.shares = shares
        self.n = len(shares)

    def run(self) -> None:
        n = self.n
        with contextlib.ExitStack() as files:
            def spool() -> BinaryIO:
                return files.enter_context(tempfile.TemporaryFile())

            # spools[j][k]: hits of share j for owner k; results[k]: what worker k >= 1 sends back
            self.spools = [[spool() for _ in range(n)] for _ in range(n)]
            # marks[j][k]: share j's evidence weight per address that worker k owns (see _score)
            self.marks = [[spool() for _ in range(n)] for _ in range(n)]
            self.weights: list[dict[str, int]] = [{} for _ in range(n)]
            self.results = [spool() for _ in range(n)]
            self.pipes = [os.pipe() for _ in range(n)]
            pids: list[int] = []
            try:
                for k in range(1, n):
                    pid = os.fork()
                    if pid == 0:  # a worker: never returns
                        self._child(k)
                    pids.append(pid)
                self._signals_for(0)
                try:
                    self.replay._count(self._work(0))
                except (EOFError, pickle.UnpicklingError):
                    # A worker died before its spools were whole: its own report says why.
                    self._collect_all(pids)
                    raise
                self._collect_all(pids)
            finally:
                for r, w in self.pipes:  # first: a worker waiting for our share must see EOF
                    for fd in (r, w):
                        if fd >= 0:
                            os.close(fd)
                for pid in pids:
                    if pid:
                        os.waitpid(pid, 0)

    def _signals_for(self, k: int) -> None:
        """Keep only our own pipe's write end: the others must see EOF when their writer ends."""
        for j in range(self.n):
            if j != k:
                self._close_write(j)

    def _close_write(self, j: int) -> None:
        os.close(self.pipes[j][1])
        self.pipes[j] = (self.pipes[j][0], -1)

    def _child(self, k: int) -> None:
        code = 0
        out = self.results[k]
        try:
            self._signals_for(k)
            counters = self._work(k)
            replay = self.replay
            pickle.dump((counters, replay.offenders), out, pickle.HIGHEST_PROTOCOL)
        except BaseException as e:  # reported to the parent, which raises it
            code = 1
            with contextlib.suppress(BaseException):
                out.seek(0)
                out.truncate()
                pickle.dump(ScanError(str(e) or type(e).__name__), out, pickle.HIGHEST_PROTOCOL)
        with contextlib.suppress(BaseException):
            out.flush()
        os._exit(code)

    def _collect_all(self, pids: list[int]) -> None:
        for k in range(1, self.n):
            pid, pids[k - 1] = pids[k - 1], 0  # reaped here, whatever _collect raises
            self._collect(k, pid)

    def _collect(self, k: int, pid: int) -> None:
        _, status = os.waitpid(pid, 0)
        fh = self.results[k]
        fh.seek(0)
        try:
            got = pickle.load(fh)
        except (EOFError, pickle.UnpicklingError):
            raise ScanError(f"scan worker {k} failed (status {status})") from None
        if isinstance(got, BaseException):
            raise got
        counters, offenders = got
        self.replay._count(counters)
        self.replay.offenders.update(offenders)

    # -- one worker

    def _work(self, k: int) -> Counters:
        own, counters = self._parse(k)
        self._close_write(k)  # share k is parsed: owners may read its spools
        self._score(k, own)
        return counters

    def _parse(self, k: int) -> tuple[list[Hit], Counters]:
        n = self.n
        out: list[list[Hit]] = [[] for _ in range(n)]
        total = Counters()
        for seg in self.shares[k]:
            matcher = Matcher(self.replay.packs, Clock(ref=seg.ref), keep_text=False)
            with open(seg.path, "rb") as fh:
                fh.seek(seg.start)
                for block, _ in blocks(_Limited(fh, seg.end), count=False):
                    for hit in matcher.scan(block, seg.path, 0, False):
                        out[hash(hit.addr) % n].append(hit)
                    for owner in range(n):
                        if len(out[owner]) >= (self.OWN_MAX if owner == k else _BATCH):
                            self._spill(k, owner, out[owner])  # own hits too: memory stays bounded
            _add_counters(total, matcher.counters)
        _add_weights(self.weights[k], out[k])  # our own hits stay in memory
        for owner in range(n):
            if owner != k:  # the rest of its hits, and what share k holds against its addresses
                self._spill(k, owner, out[owner])
                pickle.dump(self.weights[owner], self.marks[k][owner], pickle.HIGHEST_PROTOCOL)
                self.marks[k][owner].flush()
            self.spools[k][owner].flush()
        return out[k], total

    def _spill(self, k: int, owner: int, hits: list[Hit]) -> None:
        """Hits of share k for `owner` into their spool, as plain tuples (pickled in C)."""
        if hits:
            _add_weights(self.weights[owner], hits)
            pickle.dump(list(map(tuple, hits)), self.spools[k][owner], pickle.HIGHEST_PROTOCOL)
            hits.clear()

    def _score(self, k: int, own: list[Hit]) -> None:
        """Scores the addresses we own, share by share, once every share is parsed.

        An address whose evidence in the whole replay weighs less than the lowest threshold can
        reach no threshold in any window (credits only lower a window's sum), so its hits are
        skipped unscored: on a mail server that is nearly every legitimate sender and all the
        credits their accepted messages earn, a third of the scoring."""
        weights = self.weights[k]
        for j in range(self.n):
            if j != k:
                r, _ = self.pipes[j]
                while os.read(r, 4096):  # until share j is parsed (EOF: its worker closed the pipe)
                    pass
                fh = self.marks[j][k]
                fh.seek(0)
                for addr, w in pickle.load(fh).items():
                    weights[addr] = weights.get(addr, 0) + w
        floor = min(w.threshold for w in self.replay.scorer.windows)
        allow = self.replay.allow
        suspects = {addr for addr, w in weights.items() if w >= floor and addr not in allow}
        feed = self.replay.count  # the ignore list is applied to the suspects once, above
        for j in range(self.n):
            for hit in self._spooled(self.spools[j][k], suspects):  # for our own share: what spilled first
                feed(hit)
            if j == k:
                for hit in own:
                    if hit.addr in suspects:
                        feed(hit)

    @staticmethod
    def _spooled(fh: BinaryIO, suspects: set[str]) -> Iterator[Hit]:
        """The spooled hits of these addresses, in order (the others are never made into Hits)."""
        fh.seek(0)
        while True:
            try:
                batch = pickle.load(fh)
            except EOFError:
                return
            yield from map(make_hit, [t for t in batch if t[1] in suspects])


def _add_weights(weights: dict[str, int], hits: list[Hit]) -> None:
    """Adds each hit's largest possible weight (a repeat may weigh more, in a local pack) to its address."""
    for h in hits:
        w = h.weight if h.repeat_weight is None or h.repeat_weight < h.weight else h.repeat_weight
        if w > 0:
            weights[h.addr] = weights.get(h.addr, 0) + w


def _add_counters(total: Counters, c: Counters) -> None:
    total.lines += c.lines
    total.candidates += c.candidates
    total.hits += c.hits
    total.garbage += c.garbage
    for rule, v in c.by_rule.items():
        total.by_rule[rule] = total.by_rule.get(rule, 0) + v


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

    def run_all(self, paths: Sequence[str], min_parallel: int = PARALLEL_MIN) -> None:
        """Every file, in order, as one log. Big plain logs are parsed and scored on every core
        (see _Shuffle) unless events are listed, which must come out in file order."""
        with without_gc():
            self._run_all(paths, min_parallel)

    def _run_all(self, paths: Sequence[str], min_parallel: int) -> None:
        n = 1 if self.on_hit is not None else _workers(paths, min_parallel)
        if n > 1:
            try:
                _Shuffle(self, _shares(paths, n)).run()
            except (OSError, EOFError) as e:
                raise ScanError(f"{e.filename if isinstance(e, OSError) and e.filename else paths[0]}: {e}") from e
            return
        for path in paths:
            try:
                self.run(path)
            except (OSError, EOFError) as e:
                raise ScanError(f"{path}: {e}") from e

    def run(self, path: str) -> None:
        """One file, in this process."""
        matcher = Matcher(self.packs, Clock(ref=os.stat(path).st_mtime), keep_text=False)
        numbered = self.on_hit is not None  # only event listings show line numbers
        feed = self.feed
        with open_log(path) as fh:
            for block, first in blocks(fh, count=numbered):
                for hit in matcher.scan(block, path, first, numbered):
                    feed(hit)
        self._count(matcher.counters)

    def _count(self, c: Counters) -> None:
        self.lines += c.lines
        self.hits += c.hits
        self.garbage += c.garbage
        for k, v in c.by_rule.items():
            self.by_rule[k] = self.by_rule.get(k, 0) + v

    def feed(self, hit: Hit) -> None:
        if self.on_hit is not None:
            self.on_hit(hit)
        if hit.addr not in self.allow:
            self.count(hit)

    def count(self, hit: Hit) -> None:
        """feed() for a hit already known to be off the ignore list and not to be listed."""
        addr = hit.addr
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
