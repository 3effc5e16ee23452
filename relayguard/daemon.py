"""`relayguard run`: wiring and lifecycle. The only module that imports every stage.

    FileTail -Chunk-> Matcher.scan -Hit-> Scorer.observe -Offense-> decide -Ban-> enforce queue
                                     \\-> pending hits + read positions -> Store.commit (every second)

startup():  open the store, set up the firewall and reconcile it with the database, refill the
            scorers from the hits still inside the window, bind the control socket, READY=1.
serve():    a TaskGroup of the sources, the enforcer, the flusher, expiry, the firewall watch,
            purging and the control socket, until SIGTERM.
shutdown(): stop reading, apply what is queued, save hits and positions, close. Bans stay in
            the kernel (nftables expires them itself) and in the database.

Nothing blocks the loop: the store and the firewall each get one worker thread, so their calls
run in order, off the loop. The ban path does not wait for the database: it keeps in memory what
decide() needs (previous bans per address) and writes the ban before it goes into the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import structlog

from relayguard import config as cfg
from relayguard import control
from relayguard.control import ControlError
from relayguard.decide import Allowlist, History, Policy, allowlist, decide
from relayguard.enforce import Firewall, FirewallError, load_backend
from relayguard.journal import JournalTail
from relayguard.memory import release_memory
from relayguard.model import Ban, Hit, Network, format_duration, iso, net_text, parse_net
from relayguard.parse import Clock, Matcher, load_packs
from relayguard.score import Scorer, Window
from relayguard.source import Chunk, FileTail, Position
from relayguard.store import Store, StoreError

log = structlog.get_logger("relayguard")
T = TypeVar("T")

FLUSH_EVERY = 1.0  # seconds of events a kill -9 may lose, at most
FLUSH_BATCH = 5000  # or this many hits, whichever comes first
WATCH_EVERY = 5.0  # how soon a deleted or flushed nft table comes back (a check costs 0.4 s at 100k bans)
PURGE_EVERY = 3600.0
EXPIRE_MAX_SLEEP = 30.0
ENFORCE_BATCH = 20_000
BULK_LOG = 100  # batches larger than this are logged as one summary event


class Stopping(Exception):
    """Raised inside the TaskGroup to end serve() cleanly."""


@dataclass
class _Source:
    conf: cfg.Source
    tail: FileTail | JournalTail
    matcher: Matcher
    scorer: Scorer
    policy: Policy
    queue: asyncio.Queue[Chunk]
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    events: int = 0
    last_event: float | None = None

    def status(self) -> dict[str, Any]:
        st = self.tail.status()
        return {"name": self.conf.name, "rules": list(self.conf.rules) or "all", "state": st["state"],
                "mode": st["mode"], "lines": self.matcher.counters.lines, "events": self.events,
                "malformed": self.matcher.counters.garbage, "lag_bytes": st["lag_bytes"],
                "queued_chunks": self.queue.qsize(), "last_event": iso(self.last_event), "files": st["files"]}


@dataclass
class _Op:
    """One request to the enforcer; `done` resolves once database and kernel have it."""

    add: list[Ban] = field(default_factory=list)
    remove: list[Network] = field(default_factory=list)
    done: asyncio.Future[None] | None = None


class Daemon:
    def __init__(self, settings: cfg.Settings, *, now: Callable[[], float] = time.time,
                 firewall: Firewall | None = None) -> None:
        self.settings = settings
        self.now = now
        self.fw: Firewall | None = firewall
        self.store: Store | None = None
        self.started = now()
        self.ready = asyncio.Event()
        self.stopping = asyncio.Event()
        self.sources: dict[str, _Source] = {}
        self._scorers: dict[tuple[int, int], Scorer] = {}
        self._allow = Allowlist(())
        self._db = ThreadPoolExecutor(1, thread_name_prefix="relayguard-db")
        self._fwx = ThreadPoolExecutor(1, thread_name_prefix="relayguard-fw")
        self._ops: asyncio.Queue[_Op] = asyncio.Queue()
        self._pending_hits: list[Hit] = []
        self._pending_pos: dict[str, Position] = {}
        self._positions: dict[str, Position] = {}
        # active bans as in the database, net -> expiry (None: permanent); the rest stays on disk
        # keyed by canonical text: 100,000 ipaddress objects would cost 30 MiB more
        self._bans: dict[str, float | None] = {}
        self._history: dict[str, int] = {}  # net text -> bans within `remember` (escalation)
        self._last_ban: dict[str, float] = {}  # addr -> latest ban: older events were judged
        self._tg: asyncio.TaskGroup | None = None
        self._control: Any = None
        self.reloads = 0
        self.paused = False  # after `relayguard flush`: bans go to the database only, until reload
        self._bans_changed = asyncio.Event()  # wakes the expiry loop when a sooner expiry may exist
        self._flush_soon = asyncio.Event()  # a flood filled a batch: write it now
        self._unsaved_bans: list[Ban] = []  # enforced, but the database refused them (full disk)
        self._unsaved_unbans: list[Network] = []
        self._floods = 0

    # ------------------------------------------------------------------------- lifecycle

    async def serve(self) -> None:
        await self.startup()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for src in self.sources.values():
                    self._start_source(src)
                for job in (self._enforce_loop(), self._flush_loop(), self._expire_loop(), self._watch_loop(),
                            self._purge_loop(), self._until_stopped()):
                    tg.create_task(job)
                if self._control is not None:
                    tg.create_task(self._control.serve_forever())
                await self._sources_started()
                self.ready.set()
                notify("READY=1", f"STATUS={self._summary()}")
                log.info("daemon_ready", **self._facts())
        except* Stopping:
            pass
        finally:
            await self.shutdown()

    def stop(self) -> None:
        self.stopping.set()

    async def _until_stopped(self) -> None:
        await self.stopping.wait()
        raise Stopping

    async def startup(self) -> None:
        s = self.settings
        self._allow = allowlist(s.ignore_nets(), s.scoring.ignore_self)
        state = Path(s.daemon.state_dir)
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = await self._dbcall(Store.open, str(state / "relayguard.db"))
        if self.fw is None:
            self.fw = load_backend(s.daemon.firewall)
        await self._fwcall(self.fw.setup)
        await self._reconcile()
        await self._load_memory()
        self._build_sources(s)
        await self._refill_scorers()
        await self._open_control()
        await asyncio.to_thread(release_memory)

    async def shutdown(self) -> None:
        notify("STOPPING=1")
        for src in self.sources.values():
            for t in src.tasks:
                t.cancel()
        if self._control is not None:
            with contextlib.suppress(Exception):
                await self._control.close()
        await self._drain_ops()
        with contextlib.suppress(StoreError):
            await self._flush()
        if self.store is not None:
            await self._dbcall(self.store.close)
        self._db.shutdown(wait=True)
        self._fwx.shutdown(wait=True)
        log.info("daemon_stopped", bans_left_in_kernel=len(self._bans))

    # ------------------------------------------------------------------------- off-loop calls

    async def _dbcall(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db, partial(fn, *args))

    async def _fwcall(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._fwx, partial(fn, *args))

    # ------------------------------------------------------------------------- start-up state

    async def _reconcile(self) -> None:
        """Kernel := database: unexpired bans in, elements of our sets the database does not know out.
        A database rebuilt after corruption is refilled from the kernel instead."""
        assert self.store is not None and self.fw is not None
        now = self.now()
        present = await self._fwcall(self.fw.listed)
        if self.store.recovered:
            restored = [Ban(net, None if left is None else now + left, "restored from kernel after database loss",
                            "auto", now) for net, left in present.items()]
            await self._dbcall(self.store.record_bans, restored)
            self.store.recovered = False
            log.error("database_rebuilt_from_kernel", bans=len(restored))
        wanted = await self._dbcall(self.store.active_bans, now)
        want = {b.net: b for b in wanted}
        add = [b for net, b in want.items() if net not in present or _needs_refresh(b, present[net], now)]
        remove = [net for net in present if net not in want]
        if add or remove:
            await self._fwcall(self.fw.apply, add, remove, now)
        self._bans = {}
        log.info("firewall_reconciled", backend=self.fw.name, added=len(add), removed=len(remove),
                 active=len(want))
        del want, wanted, add, present
        # Read the expiries afresh, after the big batch is gone: kept objects scattered among freed
        # ones would pin the whole batch's memory.
        await asyncio.to_thread(release_memory)
        self._bans = await self._dbcall(self.store.active_expiries, now)

    async def _load_memory(self) -> None:
        assert self.store is not None
        now, sc = self.now(), self.settings.scoring
        # Events before a ban were judged by it; only the windows' span can replay them.
        self._last_ban = await self._dbcall(self.store.last_bans, now - max(sc.long_window, sc.window))
        self._history = await self._dbcall(self.store.ban_counts, now - sc.remember)

    def _scorer_for(self, src: cfg.Source) -> Scorer:
        sc = self.settings.scoring
        key = (src.window or sc.window, src.threshold or sc.threshold)
        scorer = self._scorers.get(key)
        if scorer is None:
            scorer = Scorer([Window("short", key[0], key[1]),
                             Window("long", max(sc.long_window, key[0]), sc.long_threshold)], sc.max_tracked)
            self._scorers[key] = scorer
        return scorer

    def _policy_for(self, src: cfg.Source) -> Policy:
        sc = self.settings.scoring
        return Policy(src.ban or sc.ban, sc.multiplier, max(sc.max_ban, src.ban or 0), sc.remember,
                      self._allow.nets)

    def _build_sources(self, s: cfg.Settings) -> None:
        for conf in s.source:
            packs = load_packs(conf.rules or cfg.PACKS)
            queue: asyncio.Queue[Chunk] = asyncio.Queue(maxsize=64)
            tail: FileTail | JournalTail
            if conf.journal:  # its chunks carry Chunk.path = conf.name and the cursor as head_hash
                tail = JournalTail(conf.name, conf.matches, conf.start, self._saved_position,
                                   trusted_only=conf.trusted_only)
            else:
                assert conf.path is not None
                tail = FileTail(conf.path, conf.start, self._saved_position)
            self.sources[conf.name] = _Source(conf, tail, Matcher(packs, Clock()), self._scorer_for(conf),
                                              self._policy_for(conf), queue)

    def _saved_position(self, path: str) -> Position | None:
        return self._positions.get(path)

    async def _refill_scorers(self) -> None:
        """The scorers restart where they were: hits still inside the longest window, minus those a
        ban already judged. Offences found now (hits saved, ban not, at a crash) are acted on."""
        assert self.store is not None
        for src in self.sources.values():
            for path in await self._dbcall(self._known_paths, src.conf.path or src.conf.name):
                saved = await self._dbcall(self.store.get_offset, path)
                if saved is not None:
                    self._positions[path] = Position(*saved)
        if not self._scorers:
            return
        span = max(s.span for s in self._scorers.values())
        hits = await self._dbcall(self.store.hits_since, self.now() - span)
        first = next(iter(self.sources.values()), None)
        by_name = {s.conf.name: s for s in self.sources.values()}
        for hit in hits:
            src = _source_of(hit.source, by_name) or first
            if src is not None:
                self._score(src, hit, persist=False)
        log.info("scores_restored", hits=len(hits), tracked=sum(len(s) for s in self._scorers.values()))

    def _known_paths(self, pattern: str) -> list[str]:
        assert self.store is not None
        return self.store.offset_paths(pattern)

    async def _open_control(self) -> None:
        sock = self.settings.daemon.socket
        if not sock:
            return
        self._control = await control.serve(sock, self.handlers(), self.settings.daemon.socket_group, self)

    # ------------------------------------------------------------------------- the pipeline

    async def _sources_started(self, timeout: float = 10.0) -> None:
        """Waits (boundedly) until every source knows where it starts reading."""
        events = [e for src in self.sources.values() if (e := getattr(src.tail, "started", None)) is not None]
        if events:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), timeout)

    def _start_source(self, src: _Source) -> None:
        assert self._tg is not None
        src.tasks = [self._tg.create_task(src.tail.run(src.queue)), self._tg.create_task(self._consume(src))]

    async def _consume(self, src: _Source) -> None:
        while True:
            chunk = await src.queue.get()
            for hit in src.matcher.scan(chunk.data, chunk.path, chunk.first_lineno):
                self._score(src, hit)
            self._pending_pos[chunk.path] = chunk.position
            self._positions[chunk.path] = chunk.position
            if len(self._pending_hits) >= FLUSH_BATCH:
                # A backlog arrives faster than a timer flushes: write now, so memory follows the
                # batch size and not the backlog (reading waits meanwhile: backpressure).
                try:
                    await self._flush()
                except StoreError as e:
                    log.error("store_write_failed", error=str(e), pending_hits=len(self._pending_hits))

    def _score(self, src: _Source, hit: Hit, persist: bool = True) -> None:
        if hit.addr in self._allow:
            return
        last = self._last_ban.get(hit.addr)
        if last is not None and hit.ts <= last:
            return  # this event was part of (or before) a ban already decided
        src.events += 1
        src.last_event = hit.ts
        if persist:
            self._pending_hits.append(hit)
            if len(self._pending_hits) >= FLUSH_BATCH:
                self._flush_soon.set()
        log.debug("event_seen", addr=hit.addr, rule=hit.rule, weight=hit.weight, source=hit.source, line=hit.lineno)
        offense = src.scorer.observe(hit)
        if offense is None:
            return
        net = parse_net(offense.addr)
        key = net_text(net)
        history = History(bans=self._history.get(key, 0))
        ban = decide(offense, history, src.policy, self._allow)
        if ban is None:
            return
        self._last_ban[hit.addr] = offense.ts
        self._history[key] = self._history.get(key, 0) + 1
        self._ops.put_nowait(_Op(add=[ban]))
        log.info("ban_decided", addr=key, score=offense.score, window=offense.window, rules=offense.rules,
                 rule=offense.rule, duration=format_duration(ban.expires - offense.ts if ban.expires else None),
                 offence=ban.count)

    # ------------------------------------------------------------------------- enforcing

    async def _enforce_loop(self) -> None:
        while True:
            ops = [await self._ops.get()]
            while len(ops) < ENFORCE_BATCH and not self._ops.empty():
                ops.append(self._ops.get_nowait())
            await self._apply(ops)

    async def _drain_ops(self) -> None:
        ops = []
        while not self._ops.empty():
            ops.append(self._ops.get_nowait())
        if ops:
            with contextlib.suppress(Exception):
                await self._apply(ops)

    async def _apply(self, ops: Sequence[_Op]) -> None:
        """Database first, then kernel: a crash between leaves a ban the next start puts back.

        An admin's request (every op awaited by a client) writes both at once instead: its
        answer waits for both, so a crash in between leaves an unanswered request (the next
        start reconciles the kernel with the database), never a ban the admin was told about;
        and a bulk list of 100,000 lands in about half the time."""
        assert self.store is not None and self.fw is not None
        add = [b for op in ops for b in op.add]
        remove = [n for op in ops for n in op.remove]
        now = self.now()
        if all(op.done is not None for op in ops):
            _, error = await asyncio.gather(self._store_bans(add, remove), self._kernel_bans(add, remove, now))
        else:
            await self._store_bans(add, remove)
            error = await self._kernel_bans(add, remove, now)
        bans = self._bans
        for n in remove:
            bans.pop(net_text(n), None)
        for b in add:
            key = net_text(b.net)
            if key not in bans or _later(b.expires, bans[key]):
                bans[key] = b.expires
        self._log_changes(add, remove)
        if add:
            self._bans_changed.set()
        for op in ops:
            if op.done is not None and not op.done.done():
                if error is None:
                    op.done.set_result(None)
                else:
                    op.done.set_exception(error)
        if len(add) + len(remove) > BULK_LOG:  # after the answers: nobody waits for this
            await asyncio.to_thread(release_memory)

    async def _store_bans(self, add: Sequence[Ban], remove: Sequence[Network]) -> None:
        assert self.store is not None
        try:
            if add:
                await self._dbcall(self.store.record_bans, add)
            if remove:
                await self._dbcall(self.store.remove_bans, remove)
        except StoreError as e:  # full disk or broken database: still enforce, say so loudly,
            # and keep the changes to write once the database takes writes again
            log.error("store_write_failed", error=str(e), bans=len(add), unbans=len(remove))
            self._unsaved_bans.extend(add)
            self._unsaved_unbans.extend(remove)

    async def _kernel_bans(self, add: Sequence[Ban], remove: Sequence[Network], now: float) -> FirewallError | None:
        assert self.fw is not None
        try:
            if not self.paused:
                await self._fwcall(self.fw.apply, add, remove, now)
        except FirewallError as e:
            log.error("firewall_apply_failed", error=str(e), backend=self.fw.name)
            return e
        return None

    def _log_changes(self, add: Sequence[Ban], remove: Sequence[Network]) -> None:
        """One event per ban and unban; an admin's bulk list is one summary event, since 100,000 log
        lines would hold the loop for seconds and say nothing the database does not. Automatic bans
        are always logged one by one."""
        assert self.fw is not None
        if len(add) > BULK_LOG and all(b.source == "manual" for b in add):
            log.info("bans_applied", count=len(add), first=[net_text(b.net) for b in add[:10]],
                     reason=add[0].reason, source=add[0].source, backend=self.fw.name)
        else:
            for b in add:
                log.info("ban_applied", addr=net_text(b.net), reason=b.reason, rule=b.rule, source=b.source,
                         duration=format_duration(None if b.expires is None else b.expires - b.banned_at),
                         expires=iso(b.expires), offence=b.count, backend=self.fw.name)
        if len(remove) > BULK_LOG:
            log.info("bans_removed", count=len(remove), first=[net_text(n) for n in remove[:10]],
                     backend=self.fw.name)
        else:
            for n in remove:
                log.info("ban_removed", addr=net_text(n), backend=self.fw.name)

    async def enforce(self, add: Sequence[Ban] = (), remove: Sequence[Network] = ()) -> None:
        """Queue a change and wait until database and kernel have it (manual bans, unbans)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ops.put_nowait(_Op(list(add), list(remove), done))
        await done

    # ------------------------------------------------------------------------- housekeeping

    async def _flush_loop(self) -> None:
        """Every second, or as soon as a flood has queued FLUSH_BATCH hits: small batches keep memory flat."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_soon.wait(), FLUSH_EVERY)
            self._flush_soon.clear()
            big = len(self._pending_hits) >= FLUSH_BATCH
            try:
                await self._flush()
            except StoreError as e:
                log.error("store_write_failed", error=str(e), pending_hits=len(self._pending_hits))
            if big:
                self._floods += 1
                if self._floods % 20 == 0:  # now and then during a flood, hand freed memory back
                    await asyncio.to_thread(release_memory)

    async def _save_unsaved(self) -> None:
        """Bans and unbans a full disk kept from the database: retried with every flush."""
        if not self._unsaved_bans and not self._unsaved_unbans:
            return
        assert self.store is not None
        bans, unbans = self._unsaved_bans, self._unsaved_unbans
        await self._dbcall(self.store.record_bans, bans)
        await self._dbcall(self.store.remove_bans, unbans)
        self._unsaved_bans, self._unsaved_unbans = [], []
        log.info("store_recovered", bans=len(bans), unbans=len(unbans))

    async def _flush(self) -> None:
        """Hits and read positions in one transaction (see Store.commit)."""
        await self._save_unsaved()
        if not self._pending_hits and not self._pending_pos:
            return
        assert self.store is not None
        hits, self._pending_hits = self._pending_hits, []
        pos, self._pending_pos = self._pending_pos, {}
        rows = [(p, q.inode, q.offset, q.head_hash, q.lineno) for p, q in pos.items()]
        try:
            await self._dbcall(self.store.commit, hits, rows)
        except StoreError:
            # keep them for the next try, bounded: a full disk must not eat all memory
            self._pending_hits = (hits + self._pending_hits)[-200_000:]
            self._pending_pos = {**pos, **self._pending_pos}
            raise
        notify(f"STATUS={self._summary()}")

    async def _expire_loop(self) -> None:
        """Marks ended bans in the database (the kernel drops nft elements itself) and logs them;
        backends without kernel timeouts get the removal."""
        assert self.store is not None and self.fw is not None
        while True:
            now = self.now()
            nxt = min((e for e in self._bans.values() if e is not None), default=None)
            self._bans_changed.clear()
            with contextlib.suppress(TimeoutError):
                wait = EXPIRE_MAX_SLEEP if nxt is None else min(EXPIRE_MAX_SLEEP, max(0.05, nxt - now))
                await asyncio.wait_for(self._bans_changed.wait(), wait)
                continue  # a new ban: look again at the soonest expiry
            now = self.now()
            try:
                ended = await self._dbcall(self.store.expire, now)
            except StoreError as e:
                log.error("store_write_failed", error=str(e))
                ended = [Ban(parse_net(n), e, "expired") for n, e in self._bans.items() if e is not None and e <= now]
            if not ended:
                continue
            nets = [b.net for b in ended]
            for n in nets:
                self._bans.pop(net_text(n), None)
            with contextlib.suppress(FirewallError):
                await self._fwcall(self.fw.apply, [], nets, now)
            for b in ended:
                log.info("ban_expired", addr=net_text(b.net), reason=b.reason, rule=b.rule, offence=b.count,
                         banned_at=iso(b.banned_at))

    async def _watch_loop(self) -> None:
        """Someone flushed the ruleset or deleted our table: put it back, with every active ban."""
        assert self.fw is not None
        while True:
            await asyncio.sleep(WATCH_EVERY)
            try:
                if self.paused or await self._fwcall(self.fw.present):
                    continue
                log.warning("firewall_missing", backend=self.fw.name)
                await self._fwcall(self.fw.setup)
                now = self.now()
                assert self.store is not None
                live = await self._dbcall(self.store.active_bans, now)
                await self._fwcall(self.fw.apply, live, [], now)
                log.info("firewall_restored", backend=self.fw.name, bans=len(live))
            except FirewallError as e:
                log.error("firewall_watch_failed", error=str(e))

    async def _purge_loop(self) -> None:
        assert self.store is not None
        sc = self.settings.scoring
        while True:
            await asyncio.sleep(PURGE_EVERY)
            now = self.now()
            for src in self.sources.values():
                src.matcher.clock.refresh(now)
            try:
                res = await self._dbcall(self.store.purge, now, now - max(sc.long_window, sc.window), now - sc.remember)
                log.info("store_purged", **res)
            except StoreError as e:
                log.error("store_purge_failed", error=str(e))
            try:  # bans older than `remember` stop counting; recount from the database
                self._history = await self._dbcall(self.store.ban_counts, now - sc.remember)
            except StoreError as e:
                log.error("store_read_failed", error=str(e))
            cutoff = now - max(sc.long_window, sc.window)
            self._last_ban = {k: t for k, t in self._last_ban.items() if t > cutoff}
            await asyncio.to_thread(release_memory)

    # ------------------------------------------------------------------------- reload

    async def reload(self, settings: cfg.Settings) -> dict[str, Any]:
        """New config without losing state: sources added/removed, thresholds changed."""
        old = self.settings
        self.settings = settings
        self._allow = allowlist(settings.ignore_nets(), settings.scoring.ignore_self)
        if settings.scoring != old.scoring or any(
            (a.window, a.threshold) != (b.window, b.threshold)
            for a in settings.source for b in old.source if a.name == b.name
        ):
            self._scorers.clear()
            for src in self.sources.values():
                src.scorer = self._scorer_for(src.conf)
            await self._flush()
            await self._refill_scorers()
        new_names = {c.name for c in settings.source}
        removed = [n for n in self.sources if n not in new_names]
        for name in removed:
            for t in self.sources.pop(name).tasks:
                t.cancel()
        added = [c for c in settings.source if c.name not in self.sources]
        for conf in settings.source:
            src = self.sources.get(conf.name)
            if src is not None:
                src.conf, src.policy = conf, self._policy_for(conf)
                src.scorer = self._scorer_for(conf)
        self._build_sources(cfg.Settings(settings.daemon, settings.scoring, tuple(added), settings.path))
        for conf in added:
            self._start_source(self.sources[conf.name])
        if self.paused:  # a reload ends the pause of `relayguard flush`
            self.paused = False
            assert self.fw is not None
            await self._fwcall(self.fw.setup)
            await self._reconcile()
        self.reloads += 1
        facts = {"added": [c.name for c in added], "removed": removed, "sources": list(self.sources)}
        log.info("config_reloaded", path=settings.path, **facts)
        return facts

    # ------------------------------------------------------------------------- reporting

    def _facts(self) -> dict[str, Any]:
        v4, v6 = self.ban_counts()
        return {"backend": self.fw.name if self.fw else None, "sources": len(self.sources),
                "bans_v4": v4, "bans_v6": v6}

    def _summary(self) -> str:
        f = self._facts()
        tracked = sum(len(s) for s in self._scorers.values())
        return f"{f['bans_v4'] + f['bans_v6']} bans, {tracked} tracked, {f['sources']} sources"

    def handlers(self) -> dict[str, Callable[..., Awaitable[Any]]]:
        """Control socket commands; issue 4's control module calls these."""
        from relayguard import handlers

        return handlers.table(self)

    async def active_bans(self) -> list[Ban]:
        """Active bans with all they say, from the database, soonest expiry first."""
        assert self.store is not None
        return await self._dbcall(self.store.active_bans, self.now())

    def ban_counts(self) -> tuple[int, int]:
        """(IPv4, IPv6) bans in force now, from memory."""
        now = self.now()
        v4 = v6 = 0
        for n, e in self._bans.items():
            if e is None or e > now:
                if ":" in n:
                    v6 += 1
                else:
                    v4 += 1
        return v4, v6

    def ban_expiry(self, net: Network | str) -> tuple[bool, float | None]:
        """(banned now, its expiry), of a network or its canonical text."""
        key = net if isinstance(net, str) else net_text(net)
        if key not in self._bans:
            return False, None
        e = self._bans[key]
        return (e is None or e > self.now()), e

    def tracked(self) -> int:
        return sum(len(s) for s in self._scorers.values())

    def scores(self, addr: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for scorer in self._scorers.values():
            for k, v in scorer.score(addr, self.now()).items():
                out[k] = max(out.get(k, 0), v)
        return out

    def reset_score(self, addr: str) -> None:
        for scorer in self._scorers.values():
            scorer.reset(addr)

    def ignored(self, net: Network) -> Network | None:
        return self._allow.covers(net)

    def history_len(self, net: Network) -> int:
        return self._history.get(net_text(net), 0)

    def note_manual_ban(self, net: Network, at: float) -> None:
        key = net_text(net)
        self._history[key] = self._history.get(key, 0) + 1


def _needs_refresh(b: Ban, left: float | None, now: float) -> bool:
    """Re-add when the kernel's timeout is clearly shorter than the database's (e.g. extended bans)."""
    if b.expires is None:
        return left is not None
    return left is not None and (b.expires - now) - left > 5


def _later(a: float | None, b: float | None) -> bool:
    """Expiry a is at least as late as b (None: permanent)."""
    return a is None or (b is not None and a >= b)


def _source_of(path: str, by_name: dict[str, _Source]) -> _Source | None:
    src = by_name.get(path)
    if src is not None:
        return src
    for s in by_name.values():
        if s.conf.path and Path(path).match(s.conf.path):
            return s
    return None


def notify(*lines: str) -> None:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET, silently nothing elsewhere."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendto("\n".join(lines).encode(), addr)


def run(settings: cfg.Settings, config_path: str | None) -> int:
    """Foreground daemon: SIGTERM/SIGINT stop, SIGHUP reloads the config file."""

    async def main() -> None:
        d = Daemon(settings)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, d.stop)
        loop.add_signal_handler(signal.SIGINT, d.stop)

        reloading: set[asyncio.Task[None]] = set()

        def on_hup() -> None:
            notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

            async def go() -> None:
                try:
                    await d.reload(cfg.load(config_path or settings.path or None))
                except cfg.ConfigError as e:
                    log.error("config_reload_failed", error=str(e))
                finally:
                    notify("READY=1")

            task = loop.create_task(go())
            reloading.add(task)
            task.add_done_callback(reloading.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        await d.serve()

    try:
        asyncio.run(main())
    except FirewallError as e:
        log.error("firewall_unavailable", error=str(e))
        return 1
    except StoreError as e:
        log.error("store_unavailable", error=str(e))
        return 1
    except ControlError as e:
        log.error("control_socket_unavailable", error=str(e))
        return 1
    return 0
