"""Values that cross stage lines: Hit (parse -> score), Offense (score -> decide), Ban (decide -> enforce).

Plain frozen dataclasses with slots; nothing here imports another relayguard module.
Times are float seconds since the epoch (UTC): cheap to compare in the hot path, converted to
ISO 8601 only at the edges (CLI, JSON, logs).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache, partial
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import NamedTuple

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


class Hit(NamedTuple):
    """One log line turned into evidence against one client address.

    A NamedTuple rather than a frozen dataclass: it is built once per matching log line, and
    tuples are four times cheaper to make.
    """

    ts: float  # event time from the log line
    addr: str  # canonical client address (see canonical_addr)
    rule: str  # "pack/rule-id"
    service: str  # smtp, submission, imap, ssh, ...
    weight: int  # negative for credits (see group)
    source: str = ""  # file path or "journal"
    lineno: int = 0  # 1-based line number within source (0 when unknown)
    text: str = ""  # the log line, for `why`
    group: str | None = None  # a group's weights add up to no less than 0, so credits offset only it
    key: str | None = None  # distinct key (recipient, user name): repeats weigh repeat_weight
    repeat_weight: int | None = None


# A Hit from a tuple of all its fields, in declared order: the same object as Hit(...) without
# NamedTuple's generated Python __new__, for the hot paths that make one per log line.
make_hit = partial(tuple.__new__, Hit)


@dataclass(frozen=True, slots=True)
class Offense:
    """An address whose weights inside a window reached that window's threshold."""

    addr: str
    ts: float  # time of the event that crossed the threshold
    score: int
    window: str  # "short" or "long"
    window_seconds: int
    threshold: int
    first: float  # oldest event inside the window
    events: int  # events inside the window
    rules: dict[str, int] = field(default_factory=dict)  # rule -> events inside the window

    @property
    def rule(self) -> str:
        """The rule with most events: the ban's headline reason."""
        return max(self.rules.items(), key=lambda kv: kv[1])[0] if self.rules else ""


@dataclass(frozen=True, slots=True)
class Ban:
    """A decision to drop traffic from `net` until `expires` (None: permanent)."""

    net: Network
    expires: float | None
    reason: str
    source: str = "auto"  # "auto" (scored) or "manual" (admin)
    banned_at: float = 0.0
    count: int = 1  # how many times this network was banned within the memory period
    rule: str = ""


def canonical_addr(text: str) -> str | None:
    """Canonical text for a client address, or None when it is not one.

    IPv6 is compressed and lower case; IPv4-mapped IPv6 (::ffff:a.b.c.d) becomes plain IPv4,
    so the same client never counts twice under two spellings.
    """
    return _canonical(text)


@lru_cache(maxsize=1 << 13)  # the busy addresses; a flood of new ones must not grow it
def _canonical(text: str) -> str | None:
    if text.startswith("IPv6:") or text.startswith("ipv6:"):
        text = text[5:]
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def parse_net(text: str) -> Network:
    """An address or CIDR prefix as a network (a single address is a /32 or /128).

    Raises ValueError with a message fit for the admin.
    """
    raw = text.strip()
    try:
        if "/" in raw:
            net = ipaddress.ip_network(raw, strict=False)
        else:
            canon = canonical_addr(raw)
            if canon is None:
                raise ValueError
            net = ipaddress.ip_network(canon)
    except ValueError:
        raise ValueError(f"not an IP address or CIDR prefix: {text!r}") from None
    if isinstance(net, IPv6Network) and net.prefixlen == 128 and net.network_address.ipv4_mapped:
        net = ipaddress.ip_network(str(net.network_address.ipv4_mapped))
    return net


def net_of(text: str) -> Network:
    """A network from canonical text (as the store keeps it), without ipaddress's slow text parser:
    restoring 100,000 bans at start is five times faster this way."""
    if "/" not in text:
        try:
            if ":" in text:
                return IPv6Network((int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big"), 128))
            return IPv4Network((int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big"), 32))
        except OSError:
            pass
    return ipaddress.ip_network(text)


def addr_text(net: Network) -> str:
    """Text of a network's first address, by the C library (RFC 5952 for IPv6): fast for big batches."""
    if net.version == 6:
        return socket.inet_ntop(socket.AF_INET6, int(net.network_address).to_bytes(16, "big"))
    return socket.inet_ntop(socket.AF_INET, int(net.network_address).to_bytes(4, "big"))


def is_single(net: Network) -> bool:
    return net.prefixlen == net.max_prefixlen


def net_text(net: Network) -> str:
    """Canonical text: single addresses without their /32 or /128, as admins write them.

    The key of every ban in maps, the database and bulk lists of 100,000, so single addresses go
    through inet_ntop (C): the same RFC 5952 text as ipaddress's Python code, ten times faster.
    glibc writes some IPv6 addresses with a dotted IPv4 tail (::a.b.c.d) where ipaddress does not;
    those take ipaddress."""
    if net.prefixlen != net.max_prefixlen:
        return str(net)
    addr = net.network_address
    if net.version == 6:  # int().to_bytes: `.packed` is a slower Python function around the same
        text = socket.inet_ntop(socket.AF_INET6, int(addr).to_bytes(16, "big"))
        return str(addr) if "." in text else text
    return socket.inet_ntop(socket.AF_INET, int(addr).to_bytes(4, "big"))


def iso(ts: float | None) -> str | None:
    """ISO 8601 with offset, as the contract wants for JSON times."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: str | int | float) -> int:
    """Seconds from `30s`, `10m`, `1h`, `2d`, `1w` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"not a duration: {value!r} (must not be negative)")
        return int(value)
    m = _DURATION.match(value)
    if not m:
        raise ValueError(f"not a duration: {value!r} (use seconds or a number with s, m, h, d or w)")
    return int(float(m.group(1)) * _UNIT[m.group(2)])


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "permanent"
    s = int(seconds)
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size and s % size == 0:
            return f"{s // size}{unit}"
    return f"{s}s"
