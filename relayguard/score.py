"""Sliding-window scoring: Hits in, Offenses out.

Per address, the weights of the events inside each window add up; the first time a window's
sum reaches its threshold the address is an offender. Two windows by default: the short one
(10 minutes) catches bursts, the long one (hours) catches slow attackers who pace themselves
under the short window, fail2ban's blind spot.

How weights add up inside a window:
- events without a group add their weight;
- events of a group add up to no less than zero, so a credit (a negative weight, e.g. a message
  accepted from the client) offsets only its own group (unknown recipients), never AUTH failures;
- events with a distinct key (recipient, user name) weigh `repeat_weight` when the same key
  is already inside the window: many distinct names is the harvest signal, one name retried is not.

The scorer is in memory and time comes only from the hits (`hit.ts`), so the same code serves
`relayguard scan` (replaying a log on its own timestamps) and the daemon (which persists hits
through the store and replays the window into a new Scorer at start). Memory stays bounded:
addresses whose newest event has left the longest window are dropped as the clock advances,
and at most `max_tracked` addresses are kept (the least recently seen go first).
"""

from __future__ import annotations

from bisect import insort
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from relayguard.model import Hit, Offense


@dataclass(frozen=True, slots=True)
class Window:
    name: str
    seconds: int
    threshold: int


class _Sum:
    """Running score of one window over one address's sorted events."""

    __slots__ = ("groups", "keys", "plain", "rules", "start")

    def __init__(self) -> None:
        self.start = 0  # index of the oldest event inside the window
        self.plain = 0
        self.groups: dict[str, int] | None = None
        self.keys: dict[tuple[str, str], int] | None = None
        self.rules: dict[str, int] = {}

    def score(self) -> int:
        if not self.groups:
            return self.plain
        return self.plain + sum(v for v in self.groups.values() if v > 0)

    def add(self, ev: _Event) -> int:
        """Adds an event; returns the weight it counted with (its key may make it a repeat)."""
        hit = ev.hit
        w = hit.weight
        if hit.key is None and hit.group is None:  # the common case, kept short
            self.plain += w
            self.rules[hit.rule] = self.rules.get(hit.rule, 0) + 1
            return w
        if hit.key is not None:
            keys = self.keys if self.keys is not None else {}
            self.keys = keys
            k = (ev.hit.rule, ev.hit.key)
            n = keys.get(k, 0)
            if n and ev.hit.repeat_weight is not None:
                w = ev.hit.repeat_weight
            keys[k] = n + 1
        self._count(ev.hit, w, 1)
        return w

    def remove(self, ev: _Event, w: int) -> None:
        if ev.hit.key is not None and self.keys is not None:
            k = (ev.hit.rule, ev.hit.key)
            n = self.keys.get(k, 0) - 1
            if n > 0:
                self.keys[k] = n
            else:
                self.keys.pop(k, None)
        self._count(ev.hit, w, -1)

    def _count(self, hit: Hit, w: int, sign: int) -> None:
        if hit.group is None:
            self.plain += sign * w
        else:
            groups = self.groups if self.groups is not None else {}
            self.groups = groups
            groups[hit.group] = groups.get(hit.group, 0) + sign * w
        n = self.rules.get(hit.rule, 0) + sign
        if n:
            self.rules[hit.rule] = n
        else:
            del self.rules[hit.rule]


class _Event:
    __slots__ = ("hit", "ts", "weights")

    def __init__(self, hit: Hit) -> None:
        self.hit = hit
        self.ts = hit.ts
        self.weights: list[int] = []  # the weight it counted with, per window

    def __lt__(self, other: _Event) -> bool:
        return self.ts < other.ts


class _Track:
    """One address: its events inside the longest window, oldest first, and a running sum per window."""

    __slots__ = ("events", "sums")

    def __init__(self, n_windows: int) -> None:
        self.events: list[_Event] = []
        self.sums = [_Sum() for _ in range(n_windows)]


class Scorer:
    def __init__(self, windows: Iterable[Window], max_tracked: int = 1_000_000) -> None:
        self.windows = tuple(sorted(windows, key=lambda w: w.seconds))
        if not self.windows:
            raise ValueError("at least one window")
        self.span = self.windows[-1].seconds
        self.max_tracked = max_tracked
        self._tracks: OrderedDict[str, _Track] = OrderedDict()  # least recently seen first
        # Credits of addresses with nothing against them, parked cheaply: on a busy MX most
        # accepted messages come from clients that never earn a weight.
        self._credits: OrderedDict[str, list[Hit]] = OrderedDict()
        self.clock = float("-inf")  # newest event time seen
        self._swept = float("-inf")  # clock at the last sweep of stale addresses
        self.dropped = 0  # addresses forgotten to keep memory bounded

    def __len__(self) -> int:
        return len(self._tracks)

    def observe(self, hit: Hit) -> Offense | None:
        """Scores one hit; an Offense when it brings a window to its threshold.

        After an offense the address starts from zero: the decision stage bans it, and a
        repeat offence must be earned anew.
        """
        tracks = self._tracks
        tr = tracks.get(hit.addr)
        if tr is None:
            if hit.weight < 0:
                self._park(hit)
                return None
            tr = _Track(len(self.windows))
            tracks[hit.addr] = tr
            if len(tracks) > self.max_tracked:
                self._evict_one()
            parked = self._credits.pop(hit.addr, None)
            if parked:
                self._unpark(hit.addr, tr, parked, hit.ts)
        else:
            tracks.move_to_end(hit.addr)
        ev = _Event(hit)
        if not tr.events or hit.ts >= tr.events[-1].ts:
            tr.events.append(ev)
            offense = self._advance(hit.addr, tr, ev)
        else:  # out of order: insert and replay this address (rare: merged or late logs)
            insort(tr.events, ev)
            offense = self._replay(hit.addr, tr)
        if offense is not None:
            self.reset(hit.addr)
        if hit.ts > self.clock:
            self.clock = hit.ts
            if hit.ts - self._swept >= 60:
                self._sweep()
        return offense

    def score(self, addr: str, now: float | None = None) -> dict[str, int]:
        """Current score per window (for `why` and `top`), at `now` or the newest event."""
        tr = self._tracks.get(addr)
        if tr is None:
            return {w.name: 0 for w in self.windows}
        end = self.clock if now is None else now
        out = {}
        for w in self.windows:
            s = _Sum()
            for ev in tr.events:
                if end - w.seconds < ev.ts <= end:
                    s.add(ev)
            out[w.name] = s.score()
        return out

    def reset(self, addr: str) -> None:
        self._tracks.pop(addr, None)
        self._credits.pop(addr, None)

    def _park(self, hit: Hit) -> None:
        parked = self._credits.get(hit.addr)
        if parked is None:
            self._credits[hit.addr] = [hit]
            if len(self._credits) > self.max_tracked:
                self._credits.popitem(last=False)
        else:
            parked.append(hit)
            self._credits.move_to_end(hit.addr)
            if len(parked) > 4096:  # only their sum inside the window matters; keep the newest
                del parked[:2048]

    def _unpark(self, addr: str, tr: _Track, parked: list[Hit], now: float) -> None:
        """Feeds parked credits still inside the longest window into a new track, oldest first."""
        for credit in sorted(parked, key=lambda h: h.ts):
            if credit.ts > now - self.span:
                ev = _Event(credit)
                tr.events.append(ev)
                self._advance(addr, tr, ev)

    # -- internals

    def _advance(self, addr: str, tr: _Track, ev: _Event) -> Offense | None:
        """In-order arrival: slide each window's start past old events, add the new one."""
        events = tr.events
        offense = None
        for i, w in enumerate(self.windows):
            s = tr.sums[i]
            lo = ev.ts - w.seconds
            while s.start < len(events) - 1 and events[s.start].ts <= lo:
                old = events[s.start]
                s.remove(old, old.weights[i])
                s.start += 1
            ev.weights.append(s.add(ev))
            if offense is None and s.score() >= w.threshold:
                offense = self._offense(addr, tr, i, ev)
        self._trim(tr)
        return offense

    def _replay(self, addr: str, tr: _Track) -> Offense | None:
        events = tr.events
        tr.events = []
        tr.sums = [_Sum() for _ in self.windows]
        for ev in events:
            ev.weights = []
            tr.events.append(ev)
            offense = self._advance(addr, tr, ev)
            if offense is not None:
                return offense
        return None

    def _trim(self, tr: _Track) -> None:
        """Drops events that left every window, keeping the indexes right."""
        cut = min(s.start for s in tr.sums)
        if cut > 64 and cut * 2 > len(tr.events):
            del tr.events[:cut]
            for s in tr.sums:
                s.start -= cut

    def _offense(self, addr: str, tr: _Track, i: int, ev: _Event) -> Offense:
        w, s = self.windows[i], tr.sums[i]
        inside = tr.events[s.start:]
        return Offense(
            addr=addr, ts=ev.ts, score=s.score(), window=w.name, window_seconds=w.seconds,
            threshold=w.threshold, first=inside[0].ts, events=len(inside), rules=dict(s.rules),
        )

    def _sweep(self) -> None:
        """Forgets addresses whose newest event left the longest window (least recently seen first)."""
        self._swept = self.clock
        horizon = self.clock - self.span
        tracks = self._tracks
        while tracks:
            addr, tr = next(iter(tracks.items()))
            if tr.events and tr.events[-1].ts > horizon:
                break
            del tracks[addr]
        credits = self._credits
        while credits:
            addr, parked = next(iter(credits.items()))
            if parked[-1].ts > horizon:
                break
            del credits[addr]

    def _evict_one(self) -> None:
        self._tracks.popitem(last=False)
        self.dropped += 1
