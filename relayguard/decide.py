"""Offense -> Ban: what to do about an offender. Pure; no I/O.

Scoring answers "too much?"; this answers "what now?" (CrowdSec's scenario vs profile split).
First offence: `ban`. A repeat offender (banned before within `remember`) gets
`ban * multiplier ** previous_bans`, capped by `max_ban`. Addresses on the ignore list (plus
loopback, always, and the host's own addresses when `ignore_self`) are never banned, and
manual bans go through the same check.
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from relayguard.model import Ban, Network, Offense, parse_net

LOOPBACK: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@dataclass(frozen=True, slots=True)
class Policy:
    ban_seconds: int = 3600
    multiplier: float = 4.0
    max_ban_seconds: int = 30 * 86400
    remember_seconds: int = 30 * 86400
    ignore: tuple[Network, ...] = LOOPBACK


@dataclass(frozen=True, slots=True)
class History:
    """What the store remembers about an address: bans within the memory period."""

    bans: int = 0


@dataclass(slots=True)
class Allowlist:
    """Never-ban networks, with a per-address cache because the hot path asks for every hit."""

    nets: tuple[Network, ...]
    _cache: dict[str, bool] = field(default_factory=dict)

    def __contains__(self, addr: str) -> bool:
        hit = self._cache.get(addr)
        if hit is None:
            ip = ipaddress.ip_address(addr)
            hit = any(ip.version == n.version and ip in n for n in self.nets)
            if len(self._cache) > 16_384:  # bounded: floods bring millions of one-time addresses
                self._cache.clear()
            self._cache[addr] = hit
        return hit

    def covers(self, net: Network) -> Network | None:
        """The allowlisted network a ban of `net` would touch, if any."""
        for n in self.nets:
            if n.version == net.version and (net.subnet_of(n) or n.subnet_of(net)):  # type: ignore[arg-type]
                return n
        return None


def ban_seconds(policy: Policy, history: History) -> int:
    secs = policy.ban_seconds * policy.multiplier ** history.bans
    return int(min(secs, policy.max_ban_seconds))


def decide(offense: Offense, history: History, policy: Policy, allow: Allowlist | None = None) -> Ban | None:
    allow = allow or Allowlist(policy.ignore)
    if offense.addr in allow:
        return None
    secs = ban_seconds(policy, history)
    return Ban(
        net=parse_net(offense.addr),
        expires=offense.ts + secs,
        reason=f"{offense.rule}: score {offense.score} in {offense.window} window",
        source="auto",
        banned_at=offense.ts,
        count=history.bans + 1,
        rule=offense.rule,
    )


def own_addresses() -> list[Network]:
    """This host's addresses (ignore_self): from the kernel's interface list, no DNS needed."""
    return list(_own_addresses())


@lru_cache(maxsize=1)
def _own_addresses() -> tuple[Network, ...]:
    nets: list[Network] = []
    try:
        for family, path in ((4, "/proc/net/fib_trie"), (6, "/proc/net/if_inet6")):
            nets.extend(_read_own(family, path))
    except OSError:
        pass
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            nets.append(parse_net(str(info[4][0])))
    except (OSError, ValueError):
        pass
    return tuple(dict.fromkeys(nets))


def _read_own(family: int, path: str) -> Iterable[Network]:
    with open(path, encoding="ascii") as fh:
        lines = fh.read().splitlines()
    if family == 6:
        for ln in lines:
            hexaddr = ln.split()[0]
            yield parse_net(str(ipaddress.IPv6Address(int(hexaddr, 16))))
        return
    # fib_trie: a "/32 host LOCAL" line follows each local address
    for prev, ln in itertools.pairwise(lines):
        if "/32 host LOCAL" in ln:
            addr = prev.strip().split()[-1]
            yield parse_net(addr)


def allowlist(ignore: Sequence[Network], ignore_self: bool) -> Allowlist:
    nets = list(LOOPBACK) + list(ignore)
    if ignore_self:
        nets += own_addresses()
    return Allowlist(tuple(dict.fromkeys(nets)))
