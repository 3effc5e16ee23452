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
through the store and replays the window into a new Scorer at start).

Memory stays bounded and small, because floods are what attackers send: an event is a plain
tuple without the log line; an address with a single event is just that tuple (most addresses
of a flood never get a second one); credits of addresses with nothing against them wait in a
cheap ledger; addresses whose newest event has left the longest window are dropped as the clock
advances; and at most `max_tracked` addresses are kept (the least recently seen go first).
"""

from __future__ import annotations

from bisect import insort
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from relayguard.model import Hit, Offense

# An event: (ts, weight, rule, group, key, repeat_weight, weights counted per window or None).
Event = tuple[float, int, str, "str | None", "str | None", "int | None", "tuple[int, ...] | None"]
TS, W, RULE, GROUP, KEY, RW, WS = range(7)


@dataclass(frozen=True, slots=True)
class Window:
    name: str
    seconds: int
    threshold: int


def _event(hit: Hit, ws: tuple[int, ...] | None = None) -> Event:
    return (hit.ts, hit.weight, hit.rule, hit.group, hit.key, hit.repeat_weight, ws)


class _Sum:
    """Running score of one window over one address's sorted events.

    `pos` is the sum of the groups that are above zero, kept as they change, so the score is
    two additions however many groups there are (it is read after every event).
    """

    __slots__ = ("groups", "keys", "plain", "pos", "start")

    def __init__(self) -> None:
        self.start = 0  # index of the oldest event inside the window
        self.plain = 0
        self.pos = 0
        self.groups: dict[str, int] | None = None
        self.keys: dict[tuple[str, str], int] | None = None

    def score(self) -> int:
        return self.plain + self.pos

    def weigh(self, ev: Event) -> int:
        """Adds an event; returns the weight it counts with (its key may make it a repeat)."""
        w = ev[W]
        key = ev[KEY]
        if key is not None:
            keys = self.keys
            if keys is None:
                keys = self.keys = {}
            k = (ev[RULE], key)
            n = keys.get(k, 0)
            if n and ev[RW] is not None:
                w = ev[RW]
            keys[k] = n + 1
        group = ev[GROUP]
        if group is None:
            self.plain += w
        else:  # inline rather than a call: this runs for nearly every event
            groups = self.groups
            if groups is None:
                groups = self.groups = {}
            old = groups.get(group, 0)
            new = groups[group] = old + w
            self.pos += (new if new > 0 else 0) - (old if old > 0 else 0)
        return w

    def drop(self, ev: Event, w: int) -> None:
        key = ev[KEY]
        if key is not None and self.keys is not None:
            k = (ev[RULE], key)
            n = self.keys.get(k, 0) - 1
            if n > 0:
                self.keys[k] = n
            else:
                self.keys.pop(k, None)
        group = ev[GROUP]
        if group is None:
            self.plain -= w
        elif self.groups is not None:
            old = self.groups.get(group, 0)
            new = self.groups[group] = old - w
            self.pos += (new if new > 0 else 0) - (old if old > 0 else 0)


class _Track:
    """An address with two or more events: oldest first, and a running sum per window."""

    __slots__ = ("events", "sums")

    def __init__(self, n_windows: int) -> None:
        self.events: list[Event] = []
        self.sums = [_Sum() for _ in range(n_windows)]


class Scorer:
    def __init__(self, windows: Iterable[Window], max_tracked: int = 1_000_000) -> None:
        self.windows = tuple(sorted(windows, key=lambda w: w.seconds))
        if not self.windows:
            raise ValueError("at least one window")
        self.span = self.windows[-1].seconds
        self.max_tracked = max_tracked
        # addr -> a lone Event, or a _Track; least recently seen first
        self._tracks: OrderedDict[str, Event | _Track] = OrderedDict()
        # Credits of addresses with nothing against them, parked cheaply: on a busy MX most
        # accepted messages come from clients that never earn a weight.
        self._credits: OrderedDict[str, list[Event]] = OrderedDict()
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
        addr = hit.addr
        tracks = self._tracks
        cur = tracks.get(addr)
        if cur is None:
            if hit.weight < 0:
                self._park(addr, _event(hit))
                return None
            parked = self._credits.pop(addr, None)
            if not parked:
                offense = self._lone(addr, _event(hit))
            else:
                tr = _Track(len(self.windows))
                tracks[addr] = tr
                self._unpark(addr, tr, parked, hit.ts)
                offense = self._add(addr, tr, _event(hit))
            if len(tracks) > self.max_tracked:
                self._evict_one()
        else:
            tracks.move_to_end(addr)
            if isinstance(cur, _Track):
                tr = cur
            else:  # a second event: the lone one becomes a track
                tr = _Track(len(self.windows))
                tracks[addr] = tr
                self._append(addr, tr, cur)
            offense = self._add(addr, tr, _event(hit))
        if offense is not None:
            self.reset(addr)
        if hit.ts > self.clock:
            self.clock = hit.ts
            if hit.ts - self._swept >= 60:
                self._sweep()
        return offense

    def score(self, addr: str, now: float | None = None) -> dict[str, int]:
        """Current score per window (for `why` and `top`), at `now` or the newest event."""
        cur = self._tracks.get(addr)
        events = [] if cur is None else (cur.events if isinstance(cur, _Track) else [cur])
        end = self.clock if now is None else now
        out = {}
        for w in self.windows:
            s = _Sum()
            for ev in events:
                if end - w.seconds < ev[TS] <= end:
                    s.weigh(ev)
            out[w.name] = s.score()
        return out

    def reset(self, addr: str) -> None:
        self._tracks.pop(addr, None)
        self._credits.pop(addr, None)

    # -- internals

    def _lone(self, addr: str, ev: Event) -> Offense | None:
        """First event of an address: kept as a bare tuple unless it alone reaches a threshold."""
        w = ev[W]  # first of its key, so no repeat; a lone group event counts as max(0, w) = w
        for win in self.windows:
            if w >= win.threshold:
                return Offense(addr=addr, ts=ev[TS], score=w, window=win.name, window_seconds=win.seconds,
                               threshold=win.threshold, first=ev[TS], events=1, rules={ev[RULE]: 1})
        self._tracks[addr] = ev
        return None

    def _add(self, addr: str, tr: _Track, ev: Event) -> Offense | None:
        if not tr.events or ev[TS] >= tr.events[-1][TS]:
            return self._append(addr, tr, ev)
        # out of order: insert and replay this address (rare: merged or late logs)
        events = tr.events
        insort(events, ev, key=lambda e: e[TS])
        tr.events = []
        tr.sums = [_Sum() for _ in self.windows]
        for e in events:
            offense = self._append(addr, tr, e)
            if offense is not None:
                return offense
        return None

    def _append(self, addr: str, tr: _Track, ev: Event) -> Offense | None:
        """In-order arrival: slide each window's start past old events, add the new one."""
        events = tr.events
        n = len(events)
        ts = ev[TS]
        ws = []
        crossed = -1
        for i, (win, s) in enumerate(zip(self.windows, tr.sums, strict=True)):
            lo = ts - win.seconds
            start = s.start
            while start < n and events[start][TS] <= lo:
                old = events[start]
                s.drop(old, old[WS][i])  # type: ignore[index]
                start += 1
            s.start = start
            ws.append(s.weigh(ev))
            if crossed < 0 and s.plain + s.pos >= win.threshold:
                crossed = i
        events.append((*ev[:WS], tuple(ws)))
        offense = self._offense(addr, tr, crossed) if crossed >= 0 else None
        if n > 64 and not n & 63:  # now and then: trimming is for memory, and it costs a pass
            self._trim(tr)
        return offense

    def _trim(self, tr: _Track) -> None:
        """Drops events that left every window, keeping the indexes right."""
        cut = min(s.start for s in tr.sums)
        if cut > 64 and cut * 2 > len(tr.events):
            del tr.events[:cut]
            for s in tr.sums:
                s.start -= cut

    def _offense(self, addr: str, tr: _Track, i: int) -> Offense:
        w, s = self.windows[i], tr.sums[i]
        inside = tr.events[s.start:]
        rules: dict[str, int] = {}
        for e in inside:
            if e[W] > 0:
                rules[e[RULE]] = rules.get(e[RULE], 0) + 1
        return Offense(addr=addr, ts=inside[-1][TS], score=s.score(), window=w.name, window_seconds=w.seconds,
                       threshold=w.threshold, first=inside[0][TS], events=len(inside), rules=rules)

    def _park(self, addr: str, ev: Event) -> None:
        parked = self._credits.get(addr)
        if parked is None:
            self._credits[addr] = [ev]
            if len(self._credits) > self.max_tracked:
                self._credits.popitem(last=False)
        else:
            parked.append(ev)
            self._credits.move_to_end(addr)
            if len(parked) > 4096:  # only their sum inside the window matters; keep the newest
                del parked[:2048]

    def _unpark(self, addr: str, tr: _Track, parked: list[Event], now: float) -> None:
        """Feeds parked credits still inside the longest window into a new track, oldest first."""
        for credit in sorted(parked, key=lambda e: e[TS]):
            if credit[TS] > now - self.span:
                self._append(addr, tr, credit)

    def _sweep(self) -> None:
        """Forgets addresses whose newest event left the longest window (least recently seen first)."""
        self._swept = self.clock
        horizon = self.clock - self.span
        tracks = self._tracks
        while tracks:
            addr, cur = next(iter(tracks.items()))
            newest = cur.events[-1][TS] if isinstance(cur, _Track) else cur[TS]
            if newest > horizon:
                break
            del tracks[addr]
        credits = self._credits
        while credits:
            addr, parked = next(iter(credits.items()))
            if parked[-1][TS] > horizon:
                break
            del credits[addr]

    def _evict_one(self) -> None:
        self._tracks.popitem(last=False)
        self.dropped += 1
