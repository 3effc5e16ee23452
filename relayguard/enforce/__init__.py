"""The enforce stage's contract: the Firewall protocol every backend implements, the backend registry
(name -> "module:Class", imported only when chosen, so iptc loads only for iptables), the one error type
backends raise, and the batch normalisation all backends share (duplicates, expired bans, timeouts).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from relayguard.model import Ban, Network

__all__ = ["BACKENDS", "Batch", "Firewall", "FirewallError", "load_backend", "normalize", "timeout_for"]


class FirewallError(Exception):
    """A backend failure as one line fit for an admin, e.g. "nftables: nft not found"."""


class Firewall(Protocol):
    """What the kernel is told. Methods block (libnftables, libiptc): callers run them in a thread,
    one at a time."""

    name: str

    def setup(self) -> None:
        """Idempotent: create table/chains/sets atomically; never touch anyone else's tables."""
        ...

    def listed(self) -> dict[Network, float | None]:
        """What the kernel blocks now -> seconds left (None: no timeout)."""
        ...

    def apply(self, add: Sequence[Ban], remove: Sequence[Network], now: float) -> None:
        """One batch: deletes before adds; "already there"/"already gone" are success."""
        ...

    def present(self) -> bool:
        """Our table/chain still exists and is hooked (someone may have flushed the ruleset)."""
        ...

    def flush(self) -> None:
        """Remove everything relayguard put in the kernel."""
        ...

    def teardown(self) -> None:
        """Same as flush for now."""
        ...


BACKENDS: dict[str, str] = {
    "nftables": "relayguard.enforce.nftables:NftSets",
    "iptables": "relayguard.enforce.iptables:IptChain",
    "dry-run": "relayguard.enforce.dryrun:DryRun",
}


def load_backend(name: str, **kw: object) -> Firewall:
    """Instantiate the backend registered under `name`; its dependency is imported only now."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise FirewallError(f"unknown firewall {name!r} (choose one of {', '.join(BACKENDS)})") from None
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise FirewallError(f"{name}: cannot import {e.name or module_name}: {e}") from None
    fw: Firewall = getattr(module, attr)(**kw)
    return fw


@dataclass(frozen=True, slots=True)
class Batch:
    """One apply() call reduced to what the kernel must do."""

    add: dict[Network, float | None]  # net -> expires (epoch seconds; None: permanent)
    remove: list[Network]  # never contains a net that is also in `add`


def normalize(add: Sequence[Ban], remove: Sequence[Network], now: float) -> Batch:
    """Collapse duplicate bans to the longest expiry, drop bans already expired at `now`, and drop
    removals of nets that are (re-)added in the same batch: deletes run first, so the add wins."""
    wanted: dict[Network, float | None] = {}
    missing = object()
    for ban in add:
        exp = ban.expires
        if exp is not None and exp <= now:
            continue
        old = wanted.get(ban.net, missing)  # one hash per ban: 100,000-ban batches are common
        if old is missing:
            wanted[ban.net] = exp
        else:
            wanted[ban.net] = None if old is None or exp is None else max(old, exp)  # type: ignore[call-overload]
    gone = [net for net in dict.fromkeys(remove) if net not in wanted]
    return Batch(wanted, gone)


def timeout_for(expires: float | None, now: float) -> int | None:
    """Element timeout: the remaining ban time rounded up, at least 1 s; None for permanent bans."""
    if expires is None:
        return None
    return max(1, math.ceil(expires - now))
