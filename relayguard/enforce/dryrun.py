"""Dry-run backend: touches no kernel state. It logs what it would do through structlog and keeps the
would-be set in memory, expiring elements like the kernel would, so listed() and reconcile work in tests
and under `run --dry-run`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import structlog

from relayguard.enforce import Firewall, normalize, timeout_for
from relayguard.model import Ban, Network, iso, net_text

log = structlog.get_logger(__name__)


class DryRun:
    """An in-memory stand-in for the kernel's sets."""

    name = "dry-run"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock  # tests with a fixed clock pass theirs, so expiry follows it
        self._deadline: dict[Network, float | None] = {}
        self._ready = False

    def setup(self) -> None:
        self._ready = True
        log.info("firewall_ready", backend=self.name)

    def present(self) -> bool:
        return self._ready

    def _expire(self) -> None:
        now = self._clock()
        for net in [n for n, d in self._deadline.items() if d is not None and d <= now]:
            del self._deadline[net]

    def listed(self) -> dict[Network, float | None]:
        self._expire()
        now = self._clock()
        return {net: None if d is None else d - now for net, d in self._deadline.items()}

    def expired(self, now: float) -> list[Network]:
        """Always empty: like nftables, elements time out by themselves."""
        return []

    def apply(self, add: Sequence[Ban], remove: Sequence[Network], now: float) -> None:
        batch = normalize(add, remove, now)
        for net in batch.remove:
            if self._deadline.pop(net, False) is not False:
                log.info("dry_run_unbanned", net=net_text(net), backend=self.name)
        for net, expires in batch.add.items():
            timeout = timeout_for(expires, now)
            self._deadline[net] = None if timeout is None else now + timeout
            log.info("dry_run_banned", net=net_text(net), timeout=timeout, expires=iso(expires),
                     backend=self.name)

    def flush(self) -> None:
        self._deadline.clear()
        self._ready = False
        log.info("firewall_flushed", backend=self.name)

    def teardown(self) -> None:
        self.flush()


_: type[Firewall] = DryRun  # the type checker proves the class fits the protocol
