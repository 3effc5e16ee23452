"""`relayguard top`: who is connected to the mail ports right now, and what relayguard thinks of them.

Connections come from /proc/net/tcp{,6} (audit.ports reads them), grouped by remote address with
their count, TCP states and the local ports hit. Reverse DNS is looked up with a short timeout and
cached for the life of the process (a live view refreshes every few seconds). When the daemon
runs, each address is joined with its current score (`why`) and whether a ban covers it (`list`,
so prefix bans count too); without a daemon those fields are null.
"""

from __future__ import annotations

import ipaddress
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TextIO

import dns.exception
import dns.resolver
import dns.reversename

from relayguard.audit.ports import LISTEN, TCP_STATES, sockets

DEFAULT_PORTS = (25, 465, 587)
MAX_WHY = 100  # score lookups per refresh: the busiest addresses first


@dataclass
class Remote:
    ip: str
    connections: int = 0
    ports: set[int] = field(default_factory=set)
    states: Counter[str] = field(default_factory=Counter)


def connections(ports: Iterable[int]) -> dict[str, Remote]:
    """Established and half-open connections to our `ports`, by remote address."""
    wanted = set(ports)
    out: dict[str, Remote] = {}
    for s in sockets(("tcp", "tcp6")):
        if s.state == LISTEN or s.lport not in wanted or s.rport == 0:
            continue
        r = out.setdefault(s.remote, Remote(s.remote))
        r.connections += 1
        r.ports.add(s.lport)
        r.states[TCP_STATES.get(s.state, str(s.state))] += 1
    return out


class ReverseDNS:
    """PTR lookups with a short timeout, cached (negative answers too) for `ttl` seconds."""

    def __init__(self, resolver: dns.resolver.Resolver | None, timeout: float = 1.0, ttl: float = 300.0) -> None:
        self.resolver = resolver
        self.timeout = timeout
        self.ttl = ttl
        self._cache: dict[str, tuple[float, str | None]] = {}

    def _one(self, ip: str) -> str | None:
        assert self.resolver is not None
        try:
            ans = self.resolver.resolve(dns.reversename.from_address(ip), "PTR", lifetime=self.timeout,
                                        raise_on_no_answer=False)
        except dns.exception.DNSException:
            return None
        return ans.rrset[0].to_text().rstrip(".") if ans.rrset else None

    def names(self, ips: Iterable[str]) -> dict[str, str | None]:
        now = time.monotonic()
        todo = [ip for ip in ips if ip not in self._cache or self._cache[ip][0] < now]
        if todo and self.resolver is not None:
            with ThreadPoolExecutor(max_workers=min(16, len(todo))) as pool:
                for ip, name in zip(todo, pool.map(self._one, todo), strict=True):
                    self._cache[ip] = (now + self.ttl, name)
        return {ip: self._cache.get(ip, (0.0, None))[1] for ip in ips}


Ask = Callable[..., Any]  # control.request bound to the socket path


def _covered(ip: str, bans: list[dict[str, Any]]) -> bool:
    addr = ipaddress.ip_address(ip)
    for b in bans:
        net = ipaddress.ip_network(b["ip"], strict=False)
        if net.version == addr.version and addr in net:
            return True
    return False


def daemon_view(ask: Ask | None, ips: list[str]) -> tuple[str | None, dict[str, tuple[int | None, bool | None]]]:
    """(why the daemon could not be asked, or None; ip -> (score, banned))."""
    from relayguard import control

    empty: dict[str, tuple[int | None, bool | None]] = {ip: (None, None) for ip in ips}
    if ask is None:
        return "no control socket", empty
    try:
        bans = ask("list")
    except control.ControlError as e:
        return str(e), empty
    out: dict[str, tuple[int | None, bool | None]] = {}
    for n, ip in enumerate(ips):
        score = None
        if n < MAX_WHY:
            try:
                score = int(ask("why", addr=ip)["score"].get("short", 0))
            except (control.ControlError, KeyError, TypeError, AttributeError):
                score = None
        out[ip] = (score, _covered(ip, bans))
    return None, out


def snapshot(ports: Iterable[int], rdns: ReverseDNS, ask: Ask | None) -> tuple[str | None, list[dict[str, Any]]]:
    """(daemon problem or None, one row per remote address, busiest first)."""
    remotes = sorted(connections(ports).values(), key=lambda r: (-r.connections, r.ip))
    ips = [r.ip for r in remotes]
    names = rdns.names(ips)
    problem, view = daemon_view(ask, ips)
    rows = []
    for r in remotes:
        score, banned = view[r.ip]
        rows.append({"ip": r.ip, "connections": r.connections, "ports": sorted(r.ports), "score": score,
                     "banned": banned, "states": dict(sorted(r.states.items())), "rdns": names.get(r.ip)})
    return problem, rows


def render(rows: list[dict[str, Any]], problem: str | None, ports: Iterable[int], limit: int | None = None) -> str:
    """The table people read."""
    head = f"connections to ports {','.join(map(str, ports))}: {sum(r['connections'] for r in rows)} " \
           f"from {len(rows)} addresses"
    lines = [head + (f"  (relayguard: {problem})" if problem else "")]
    if not rows:
        return "\n".join(lines)
    w = max(15, *(len(r["ip"]) for r in rows))
    lines.append(f"{'ADDRESS':<{w}}  {'CONN':>4}  {'PORTS':<11}  {'SCORE':>5}  {'BANNED':<6}  {'STATES':<24}  RDNS")
    shown = rows if limit is None else rows[:limit]
    for r in shown:
        score = "-" if r["score"] is None else str(r["score"])
        banned = "-" if r["banned"] is None else "yes" if r["banned"] else "no"
        states = " ".join(f"{k}:{v}" for k, v in r["states"].items())
        lines.append(f"{r['ip']:<{w}}  {r['connections']:>4}  {','.join(map(str, r['ports'])):<11}  {score:>5}  "
                     f"{banned:<6}  {states:<24}  {r['rdns'] or '-'}")
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more")
    return "\n".join(lines)


def live(ports: list[int], rdns: ReverseDNS, ask: Ask | None, interval: float = 2.0,
         out: TextIO = sys.stdout) -> None:
    """Redraw the table every `interval` seconds until Ctrl-C."""
    try:
        while True:
            problem, rows = snapshot(ports, rdns, ask)
            height = shutil.get_terminal_size().lines
            text = render(rows, problem, ports, limit=max(1, height - 4))
            out.write("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S  ") + text + "\n")
            out.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        out.write("\n")
