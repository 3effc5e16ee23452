"""What the control socket's commands do inside the daemon: ping, status, list, ban, unban, why, flush.

Each command has a request type (msgspec Struct: the control module turns the request's `args`
into it, so wrong types become error replies, never exceptions) and an async function of the
daemon and that request returning plain JSON data. Manual bans go through the same allowlist
as automatic ones and the same enforcer (database first, then kernel, in one batch).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec

from relayguard.model import Ban, Network, format_duration, iso, net_text, parse_net

if TYPE_CHECKING:
    from relayguard.daemon import Daemon

MAX_ADDRS = 1_000_000


class CommandError(Exception):
    """A request that cannot be done, phrased for the admin (becomes {"ok": false, "error": ...})."""


class Empty(msgspec.Struct, forbid_unknown_fields=True):
    pass


class BanReq(msgspec.Struct, forbid_unknown_fields=True):
    addrs: list[str]
    seconds: int | None = None  # default: scoring.ban
    reason: str = "manual ban"


class UnbanReq(msgspec.Struct, forbid_unknown_fields=True):
    addrs: list[str]


class WhyReq(msgspec.Struct, forbid_unknown_fields=True):
    addr: str


Handler = tuple[type, Callable[["Daemon", Any], Awaitable[Any]]]


def table(d: Daemon) -> dict[str, Handler]:
    del d  # the functions take the daemon per call; the table itself is static
    return dict(HANDLERS)


def ban_json(b: Ban) -> dict[str, Any]:
    return {"ip": net_text(b.net), "reason": b.reason, "source": b.source, "banned_at": iso(b.banned_at),
            "expires_at": iso(b.expires), "count": b.count, "rule": b.rule}


async def ping(d: Daemon, _: Empty) -> str:
    return "pong"


async def status(d: Daemon, _: Empty) -> dict[str, Any]:
    assert d.store is not None and d.fw is not None
    stats = await d._dbcall(d.store.stats, d.now())
    bans = d.active_bans()
    v6 = sum(1 for b in bans if b.net.version == 6)
    return {
        "state": "paused (flushed)" if d.paused else "running",
        "pid": os.getpid(),
        "since": iso(d.started),
        "uptime_s": int(d.now() - d.started),
        "firewall": d.fw.name,
        "config": d.settings.path,
        "reloads": d.reloads,
        "sources": [s.status() for s in d.sources.values()],
        "bans": {"total": len(bans), "ipv4": len(bans) - v6, "ipv6": v6},
        "tracked": d.tracked(),
        "database": {"path": str(d.store.path) if d.store.path else None, "bytes": stats.get("db_bytes", 0),
                     "events": stats.get("hits", 0)},
    }


async def list_bans(d: Daemon, _: Empty) -> list[dict[str, Any]]:
    return [ban_json(b) for b in d.active_bans()]


def _parse_all(addrs: list[str]) -> list[Network]:
    if not addrs:
        raise CommandError("no address given")
    if len(addrs) > MAX_ADDRS:
        raise CommandError(f"too many addresses in one request ({len(addrs)} > {MAX_ADDRS})")
    nets = []
    for a in addrs:
        try:
            nets.append(parse_net(a))
        except ValueError as e:
            raise CommandError(str(e)) from None
    return list(dict.fromkeys(nets))


async def ban(d: Daemon, req: BanReq) -> dict[str, Any]:
    nets = await asyncio.to_thread(_parse_all, req.addrs)  # 100,000 parses would stall the loop
    for net in nets:
        covered = d.ignored(net)
        if covered is not None:
            raise CommandError(f"{net_text(net)} is on the ignore list ({covered}); not banned")
    secs = d.settings.scoring.ban if req.seconds is None else req.seconds
    if secs <= 0:
        raise CommandError("the ban duration must be positive")
    now = d.now()
    bans = []
    for net in nets:
        old = d._bans.get(net)
        expires = now + secs
        if old is not None and (old.expires is None or old.expires > expires):
            expires = old.expires  # banning again extends, never shortens
        bans.append(Ban(net, expires, req.reason, "manual", now, d.history_len(net) + 1, "manual"))
        d.note_manual_ban(net, now)
    await d.enforce(add=bans)
    return {"banned": len(bans), "duration": format_duration(secs),
            "expires_at": iso(now + secs)}


async def unban(d: Daemon, req: UnbanReq) -> dict[str, Any]:
    nets = await asyncio.to_thread(_parse_all, req.addrs)
    known = [n for n in nets if n in d._bans]
    missing = [net_text(n) for n in nets if n not in d._bans]
    if known:
        await d.enforce(remove=known)
        assert d.store is not None
        for n in known:  # an unbanned address starts from a clean slate
            if n.prefixlen == n.max_prefixlen:
                addr = net_text(n)
                d.reset_score(addr)
                await d._dbcall(d.store.forget, addr)
    if missing and not known:
        raise CommandError(f"not banned: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    return {"unbanned": [net_text(n) for n in known], "not_banned": missing}


async def why(d: Daemon, req: WhyReq) -> dict[str, Any]:
    try:
        net = parse_net(req.addr)
    except ValueError as e:
        raise CommandError(str(e)) from None
    assert d.store is not None
    addr = net_text(net)
    span = max((s.span for s in d._scorers.values()), default=d.settings.scoring.long_window)
    since = d.now() - span
    stored = await d._dbcall(d.store.hits_for, addr, since)
    pending = [h for h in d._pending_hits if h.addr == addr and h.ts >= since]
    events = sorted(stored + pending, key=lambda h: h.ts)
    active = d._bans.get(net)
    history = await d._dbcall(d.store.history, net)
    return {
        "ip": addr,
        "score": d.scores(addr),
        "thresholds": {"short": d.settings.scoring.threshold, "long": d.settings.scoring.long_threshold},
        "ignored": str(d.ignored(net)) if d.ignored(net) is not None else None,
        "events": [{"time": iso(h.ts), "rule": h.rule, "weight": h.weight, "service": h.service,
                    "file": h.source, "line": h.lineno, "text": h.text} for h in events],
        "ban": ban_json(active) if active is not None else None,
        "history": [ban_json(b) for b in history],
    }


async def flush(d: Daemon, _: Empty) -> dict[str, Any]:
    """Everything relayguard put in the kernel goes; the database stays. Enforcement pauses until
    the next reload or restart, or the watch would put it all back within seconds."""
    assert d.fw is not None
    d.paused = True
    await d._fwcall(d.fw.flush)
    return {"flushed": True, "bans_kept_in_database": len(d.active_bans()),
            "resume": "relayguard reload (SIGHUP) or a restart puts them back"}


async def reload(d: Daemon, _: Empty) -> dict[str, Any]:
    from relayguard import config

    try:
        settings = config.load(d.settings.path or None)
    except config.ConfigError as e:
        raise CommandError(str(e)) from None
    return await d.reload(settings)


HANDLERS: dict[str, Handler] = {
    "ping": (Empty, ping),
    "status": (Empty, status),
    "list": (Empty, list_bans),
    "ban": (BanReq, ban),
    "unban": (UnbanReq, unban),
    "why": (WhyReq, why),
    "flush": (Empty, flush),
    "reload": (Empty, reload),
}
