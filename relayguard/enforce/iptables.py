"""iptables backend: owns chain RELAYGUARD in the filter table (and its ip6tables twin), jumped to by the
first rule of INPUT; one `-s NET -j DROP` rule per banned network.

It drives the kernel through python-iptables (`iptc`), which wraps libiptc: the *legacy* xtables
interface (the ip_tables/ip6_tables kernel modules, what `iptables-legacy` shows). On a host whose
`iptables` is iptables-nft (Debian since 10) that means two stacks are active side by side: packets pass
both the nf_tables hooks and the legacy tables, so our DROP rules take effect, but they are invisible to
`iptables -S` / `iptables-nft -S` and `nft list ruleset` (iptables-nft only warns "iptables-legacy tables
present"); use `iptables-legacy -S RELAYGUARD` to see them. Kernels built without
CONFIG_IP_NF_IPTABLES_LEGACY cannot run this backend at all; use nftables there. libiptc takes no
xtables lock, so an admin's concurrent `iptables-legacy` command can make a commit fail (it is atomic:
then nothing changed, and the error is raised).

Rules have no timeouts: each carries the comment `relayguard:<expiry epoch, 0 = permanent>`, listed()
reports the remaining time from it and expired(now) names the rules the daemon must remove. A linear
chain costs the kernel per packet and rule, so this backend is meant for a few thousand bans; beyond
that use nftables sets.
"""

from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from ipaddress import ip_network
from typing import Any

import structlog

from relayguard.enforce import Firewall, FirewallError, normalize
from relayguard.model import Ban, Network

try:
    import iptc  # type: ignore[import-untyped]
except ImportError:
    raise
except Exception as e:  # libxtables missing or mismatched: iptc raises its own errors at import
    raise FirewallError(f"iptables: python-iptables unusable: {e}") from None

log = structlog.get_logger(__name__)

CHAIN = "RELAYGUARD"
TAG = "relayguard:"


def _error(e: Exception) -> FirewallError:
    text = re.sub(r"b'([^']*)'", r"\1", str(e))  # iptc formats libiptc's bytes messages with repr
    if "Permission denied" in text or "Operation not permitted" in text:
        return FirewallError(f"iptables: no CAP_NET_ADMIN ({text})")
    if "Table does not exist" in text or "insmod" in text:
        return FirewallError(f"iptables: legacy xtables unavailable in this kernel ({text})")
    return FirewallError(f"iptables: {text}")


def comment_for(expires: float | None) -> str:
    return f"{TAG}{0 if expires is None else math.ceil(expires)}"


def expiry_of(comment: str) -> float | None:
    """Expiry epoch from our rule comment; None for permanent (0)."""
    value = int(comment.removeprefix(TAG))
    return None if value == 0 else float(value)


def _ours(rule: Any) -> tuple[Network, float | None] | None:
    """(net, expiry) of one of our DROP rules, or None for anything else in the chain."""
    for m in rule.matches:
        if m.name == "comment" and (m.comment or "").startswith(TAG) and not rule.src.startswith("!"):
            try:
                return ip_network(rule.src), expiry_of(m.comment)
            except ValueError:  # a hand-written look-alike comment: not ours
                return None
    return None


class IptChain:
    """Bans as DROP rules in chain RELAYGUARD (filter table, IPv4 and IPv6)."""

    name = "iptables"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        try:
            # Table objects are process-wide singletons in iptc; without autocommit every change waits
            # for our commit, so one apply() is one atomic table replacement per family.
            self._tables = {4: iptc.Table(iptc.Table.FILTER, autocommit=False),
                            6: iptc.Table6(iptc.Table6.FILTER, autocommit=False)}
        except iptc.IPTCError as e:
            raise _error(e) from None

    @contextmanager
    def _edit(self, version: int) -> Iterator[Any]:
        """Fresh view of one table (refresh also drops changes a failed edit left pending), committed
        on success; libiptc skips the commit when nothing changed."""
        table = self._tables[version]
        try:
            table.refresh()
            yield table
            table.commit()
        except iptc.IPTCError as e:
            raise _error(e) from None

    def setup(self) -> None:
        for v in (4, 6):
            with self._edit(v) as table:
                if not table.is_chain(CHAIN):
                    table.create_chain(CHAIN)
                inp = iptc.Chain(table, "INPUT")
                rules = inp.rules
                jumps = [r for r in rules if r.target.name == CHAIN]
                if len(jumps) == 1 and rules[0].target.name == CHAIN:
                    continue
                for r in jumps:
                    inp.delete_rule(r)
                jump = iptc.Rule() if v == 4 else iptc.Rule6()
                jump.create_target(CHAIN)
                inp.insert_rule(jump, 0)
        log.info("firewall_ready", backend=self.name, chain=CHAIN)

    def present(self) -> bool:
        for v in (4, 6):
            with self._edit(v) as table:
                if not table.is_chain(CHAIN):
                    return False
                if not any(r.target.name == CHAIN for r in iptc.Chain(table, "INPUT").rules):
                    return False
        return True

    def _rules(self) -> dict[Network, float | None]:
        found: dict[Network, float | None] = {}
        for v in (4, 6):
            with self._edit(v) as table:
                if not table.is_chain(CHAIN):
                    continue
                for rule in iptc.Chain(table, CHAIN).rules:
                    if (mine := _ours(rule)) is not None:
                        found[mine[0]] = mine[1]
        return found

    def listed(self) -> dict[Network, float | None]:
        """Seconds left from the rule comments; 0.0 for rules past their expiry that still drop."""
        now = self._clock()
        return {net: None if exp is None else max(0.0, exp - now) for net, exp in self._rules().items()}

    def expired(self, now: float) -> list[Network]:
        """Nets whose rules outlived their ban: pass them to apply(remove=...)."""
        return [net for net, exp in self._rules().items() if exp is not None and exp <= now]

    def apply(self, add: Sequence[Ban], remove: Sequence[Network], now: float) -> None:
        batch = normalize(add, remove, now)
        for v in (4, 6):
            adds = {n: e for n, e in batch.add.items() if n.version == v}
            gone = [n for n in batch.remove if n.version == v]
            if adds or gone:
                self._apply_family(v, adds, gone)
        log.debug("firewall_applied", backend=self.name, added=len(batch.add), removed=len(batch.remove))

    def _apply_family(self, v: int, adds: dict[Network, float | None], gone: list[Network]) -> None:
        with self._edit(v) as table:
            if not table.is_chain(CHAIN):
                raise FirewallError(f"iptables: chain {CHAIN} is missing (run setup)")
            chain = iptc.Chain(table, CHAIN)
            current: dict[Network, list[Any]] = defaultdict(list)
            for rule in chain.rules:
                if (mine := _ours(rule)) is not None:
                    current[mine[0]].append(rule)
            # A re-ban replaces the rule, so its comment carries the new expiry.
            for net in (*gone, *adds):
                for rule in current.get(net, ()):
                    chain.delete_rule(rule)
            for net, expires in adds.items():
                chain.append_rule(_drop_rule(v, net, expires))

    def flush(self) -> None:
        for v in (4, 6):
            with self._edit(v) as table:
                inp = iptc.Chain(table, "INPUT")
                for r in [r for r in inp.rules if r.target.name == CHAIN]:
                    inp.delete_rule(r)
                if table.is_chain(CHAIN):
                    table.flush_entries(CHAIN)
                    table.delete_chain(CHAIN)
        log.info("firewall_flushed", backend=self.name)

    def teardown(self) -> None:
        self.flush()


def _drop_rule(version: int, net: Network, expires: float | None) -> Any:
    rule = iptc.Rule() if version == 4 else iptc.Rule6()
    rule.src = str(net)
    rule.create_match("comment").comment = comment_for(expires)
    rule.create_target("DROP")
    return rule


_: type[Firewall] = IptChain  # the type checker proves the class fits the protocol
