"""Read-only checks of the mail host itself: `relayguard audit` and `relayguard top`.

Each submodule owns one question and returns plain JSON-ready dicts (the contract's shapes, see
docs/audit.md); cli_audit renders them as text or JSON lines and turns severities into the exit
code. Nothing here changes the host: the relay probe stops before DATA, the DNS checks only
query, the socket listings only read /proc.

This module holds what several checks share: severities, running a helper program, the host's
own interface addresses.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterable
from ipaddress import IPv4Interface, IPv6Interface

Interface = IPv4Interface | IPv6Interface

SEVERITIES = ("ok", "warn", "fail")


class AuditError(Exception):
    """A check could not run at all; the message is one line for the admin."""


def worst(severities: Iterable[str]) -> str:
    """The most serious of the severities given ("ok" for none)."""
    return max(severities, key=SEVERITIES.index, default="ok")


def run(argv: list[str], timeout: float = 30.0) -> str:
    """stdout of a helper program; AuditError (one line) when it is missing or fails."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise AuditError(f"{argv[0]}: not found") from None
    except subprocess.TimeoutExpired:
        raise AuditError(f"{' '.join(argv)}: no answer within {timeout:g} s") from None
    if p.returncode != 0:
        err = " ".join((p.stderr or p.stdout).split()) or f"exit status {p.returncode}"
        raise AuditError(f"{' '.join(argv)}: {err}")
    return p.stdout


def host_interfaces() -> list[Interface]:
    """Every address configured on this host (network namespace), with its on-link prefix."""
    try:
        links = json.loads(run(["ip", "-j", "addr", "show"]) or "[]")
    except (AuditError, json.JSONDecodeError):
        return []
    out: list[Interface] = []
    for link in links:
        for a in link.get("addr_info", []):
            local = a.get("local")
            if not local or "prefixlen" not in a:
                continue
            try:
                out.append(ipaddress.ip_interface(f"{local.split('%')[0]}/{a['prefixlen']}"))
            except ValueError:
                continue
    return out


# Ranges blocklists never list (they are not reachable from the internet); documentation ranges
# stay in on purpose: a real host never has them, and the tests run on them.
_UNROUTED = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.168.0.0/16", "::1/128", "::/128", "fc00::/7", "fe80::/10",
))


def is_public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an address can be seen from the internet (for blocklists and reverse DNS)."""
    return not (addr.is_multicast or any(addr in n for n in _UNROUTED if n.version == addr.version))


def public_addresses() -> list[str]:
    """This host's own internet-facing addresses (what mail goes out from), in interface order."""
    seen: dict[str, None] = {}
    for i in host_interfaces():
        if is_public(i.ip):
            seen.setdefault(str(i.ip), None)
    return list(seen)
