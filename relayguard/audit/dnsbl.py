"""`relayguard audit dnsbl`: is this server's outbound address on a DNS blocklist, and does its DNS
look like a mail server's (forward-confirmed reverse DNS, a HELO name that resolves to it)?

Blocklist answers are read per list (`LISTS`): any answer in 127.255.255.0/24 is the list refusing
or erring ("refused": cannot tell, never "listed"; Spamhaus sends .254 to queries that come
through public resolvers), other answers in 127.0.0.0/8 are listings, anything else (an ISP
resolver's NXDOMAIN hijack, say) cannot be trusted ("unknown"), as are timeouts and SERVFAIL.
All DNS goes through dnspython, to `--resolver` when given.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import dns.reversename

from relayguard.audit import AuditError, public_addresses

SPAMHAUS_ZEN = {
    "127.0.0.2": "SBL: a spam source or spam operation",
    "127.0.0.3": "SBL CSS: snowshoe spam or low-reputation sending",
    "127.0.0.4": "XBL: exploited or infected host (CBL)",
    "127.0.0.5": "XBL: exploited or infected host",
    "127.0.0.6": "XBL: exploited or infected host",
    "127.0.0.7": "XBL: exploited or infected host",
    "127.0.0.9": "SBL DROP/EDROP: hijacked or rogue network",
    "127.0.0.10": "PBL (ISP): end-user range that should not send mail directly",
    "127.0.0.11": "PBL (Spamhaus): end-user range that should not send mail directly",
}
REFUSALS = {
    "127.255.255.252": "refused: typing error in the blocklist name",
    "127.255.255.254": "refused: query came through a public or open resolver",
    "127.255.255.255": "refused: too many queries from this resolver",
}
REFUSED_NET = ipaddress.ip_network("127.255.255.0/24")
LOOPBACK_NET = ipaddress.ip_network("127.0.0.0/8")


@dataclass(frozen=True)
class Blocklist:
    zone: str
    name: str
    codes: dict[str, str]  # answer -> meaning; answers not listed here are still listings
    info: str  # where an admin looks up or delists an address


LISTS = {
    "zen.spamhaus.org": Blocklist("zen.spamhaus.org", "Spamhaus ZEN", SPAMHAUS_ZEN,
                                  "https://check.spamhaus.org/"),
    "bl.spamcop.net": Blocklist("bl.spamcop.net", "SpamCop", {"127.0.0.2": "reported as a spam source"},
                                "https://www.spamcop.net/bl.shtml"),
    "b.barracudacentral.org": Blocklist("b.barracudacentral.org", "Barracuda",
                                        {"127.0.0.2": "poor sending reputation"},
                                        "https://www.barracudacentral.org/lookups"),
    "psbl.surriel.com": Blocklist("psbl.surriel.com", "PSBL", {"127.0.0.2": "sent mail to spam traps"},
                                  "https://psbl.org/"),
    "dnsbl-1.uceprotect.net": Blocklist("dnsbl-1.uceprotect.net", "UCEPROTECT level 1",
                                        {"127.0.0.2": "this address hit spam traps"},
                                        "https://www.uceprotect.net/en/rblcheck.php"),
}
DEFAULT_LISTS = tuple(LISTS)


def blocklist(zone: str) -> Blocklist:
    zone = zone.strip().strip(".").lower()
    return LISTS.get(zone) or Blocklist(zone, zone, {}, "")


# ----------------------------------------------------------------------------- resolver


def resolver(addr: str | None = None, timeout: float = 5.0) -> dns.resolver.Resolver:
    """dnspython resolver: `addr` (IP, IP:PORT, [IPv6]:PORT) or the system's resolv.conf."""
    if addr is None:
        try:
            r = dns.resolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            raise AuditError("no system resolver (/etc/resolv.conf); pass --resolver ADDR") from None
    else:
        host, port = split_hostport(addr)
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [host]
        r.port = port
    r.timeout = timeout
    r.lifetime = timeout
    r.cache = None
    return r


def split_hostport(text: str, default: int = 53) -> tuple[str, int]:
    """("192.0.2.53", 53) from 192.0.2.53, 192.0.2.53:5353, 2001:db8::53 or [2001:db8::53]:5353."""
    host, port = text.strip(), default
    if host.startswith("["):
        host, _, rest = host[1:].partition("]")
        if rest:
            port = int(rest.removeprefix(":"))
    elif host.count(":") == 1:
        host, p = host.split(":")
        port = int(p)
    ipaddress.ip_address(host)  # ValueError for a name: the resolver must be an address
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {port}")
    return host, port


def query_name(ip: str, zone: str) -> str:
    """1.2.0.192.zone for 192.0.2.1; 32 reversed nibbles for IPv6."""
    rev = dns.reversename.from_address(ip)
    labels = rev.relativize(dns.name.from_text("in-addr.arpa" if ":" not in ip else "ip6.arpa"))
    return f"{labels.to_text()}.{zone}"


Lookup = tuple[str, list[str]]  # (status: ok/nx/nodata/timeout/servfail, answers)


def lookup(r: dns.resolver.Resolver, name: str, rdtype: str) -> Lookup:
    try:
        ans = r.resolve(name, rdtype, search=False, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return "nx", []
    except dns.resolver.LifetimeTimeout:
        return "timeout", []
    except (dns.resolver.NoNameservers, dns.exception.DNSException):
        return "servfail", []
    if ans.rrset is None:
        return "nodata", []
    return "ok", [rd.to_text().rstrip(".") if rdtype == "PTR" else rd.to_text().strip('"') for rd in ans.rrset]


# ----------------------------------------------------------------------------- blocklists


def judge(bl: Blocklist, ip: str, res: Lookup) -> dict[str, Any]:
    """One address against one list, as a contract line."""
    status, answers = res
    codes = sorted(answers, key=lambda a: ipaddress.ip_address(a) if _is_ip(a) else ipaddress.ip_address(0))
    meanings: list[str] = []
    if status in ("nx", "nodata"):
        verdict = "clean"
    elif status == "ok":
        ips = [ipaddress.ip_address(a) for a in codes if _is_ip(a)]
        listing = [a for a in ips if a in LOOPBACK_NET and a not in REFUSED_NET]
        if listing:
            verdict = "listed"
            # Lists without a table of meanings (custom zones) give none; known lists name undocumented codes.
            meanings = [bl.codes.get(str(a), "code not documented by the list" if bl.codes else "") for a in listing]
        elif ips and all(a in REFUSED_NET for a in ips):
            verdict = "refused"
            spamhaus = "spamhaus" in bl.zone
            meanings = [REFUSALS.get(str(a), "") if spamhaus else "" for a in ips]
            meanings = [m or "refused: the list answered with an error code, not a listing" for m in meanings]
        else:
            verdict = "unknown"
            meanings = ["answer outside 127.0.0.0/8: the resolver rewrites answers (NXDOMAIN hijack?)"]
    else:
        verdict = "unknown"
        meanings = ["no answer in time" if status == "timeout" else "SERVFAIL or no usable name server"]
    severity = {"clean": "ok", "listed": "fail"}.get(verdict, "warn")
    line = {"check": "dnsbl", "ip": ip, "list": bl.zone, "status": verdict, "codes": codes, "severity": severity,
            "meaning": meanings}
    if verdict == "listed" and bl.info:
        line["info"] = bl.info
    return line


def _is_ip(text: str) -> bool:
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(text)
        return True
    return False


# ----------------------------------------------------------------------------- reverse DNS, HELO


def forward(r: dns.resolver.Resolver, name: str) -> tuple[list[str], bool]:
    """(A and AAAA of name, whether both lookups got an answer rather than a timeout/SERVFAIL)."""
    out, answered = [], True
    for rdtype in ("A", "AAAA"):
        status, answers = lookup(r, name, rdtype)
        answered = answered and status in ("ok", "nx", "nodata")
        out += [str(ipaddress.ip_address(a)) for a in answers if _is_ip(a)]
    return out, answered


def fcrdns(r: dns.resolver.Resolver, ip: str) -> dict[str, Any]:
    """PTR of ip, then A/AAAA of each name: confirmed when one of them points back to ip."""
    status, names = lookup(r, dns.reversename.from_address(ip).to_text(), "PTR")
    line: dict[str, Any] = {"check": "fcrdns", "ip": ip, "ptr": names, "status": "fail", "severity": "fail"}
    if status in ("timeout", "servfail"):
        line.update(status="unknown", severity="warn",
                    message=f"reverse DNS of {ip}: {'no answer in time' if status == 'timeout' else 'SERVFAIL'}")
        return line
    if not names:
        line["message"] = (f"{ip} has no reverse DNS (PTR): many receivers reject or junk mail from it; "
                           f"ask whoever owns the address (hosting provider) to set a PTR to your HELO name")
        return line
    for name in names:
        addrs, _ = forward(r, name)
        if ipaddress.ip_address(ip) in [ipaddress.ip_address(a) for a in addrs]:
            line.update(status="ok", severity="ok", name=name,
                        message=f"{ip} -> {name} -> {ip}: forward-confirmed reverse DNS")
            return line
    line["message"] = (f"{ip} -> {', '.join(names)}, but no such name resolves back to {ip}: "
                       f"add an A/AAAA record for it, or change the PTR")
    return line


def helo_check(r: dns.resolver.Resolver, name: str, ip: str) -> dict[str, Any]:
    line: dict[str, Any] = {"check": "helo", "ip": ip, "name": name, "addresses": []}
    if "." not in name.strip("."):
        line.update(status="fail", severity="fail",
                    message=f"HELO name {name!r} is not a fully-qualified domain name: many receivers refuse "
                            f"it; set myhostname to the name your PTR record points to")
        return line
    addrs, answered = forward(r, name)
    line["addresses"] = addrs
    if ipaddress.ip_address(ip) in [ipaddress.ip_address(a) for a in addrs]:
        line.update(status="ok", severity="ok", message=f"HELO name {name} resolves to {ip}")
    elif not addrs and not answered:
        line.update(status="unknown", severity="warn", message=f"HELO name {name}: no answer from DNS")
    elif not addrs:
        line.update(status="fail", severity="fail",
                    message=f"HELO name {name} does not resolve: receivers with reject_unknown_helo_hostname "
                            f"refuse the mail; publish an A/AAAA record for it")
    else:
        line.update(status="fail", severity="warn",
                    message=f"HELO name {name} resolves to {', '.join(addrs)}, not to {ip}: mail from {ip} "
                            f"looks forged to strict receivers")
    return line


# ----------------------------------------------------------------------------- the whole check


def default_addresses(r: dns.resolver.Resolver, helo: str) -> list[str]:
    """The host's own public addresses plus the A/AAAA of its HELO name."""
    seen = dict.fromkeys(public_addresses())
    for a in forward(r, helo)[0]:
        seen.setdefault(a, None)
    return list(seen)


def audit(addrs: Iterable[str], zones: Iterable[str], r: dns.resolver.Resolver, helo: str | None,
          rdns: bool = True, workers: int = 16) -> list[dict[str, Any]]:
    """Every address against every list, then (rdns) FCrDNS and (helo given) the HELO name per address;
    lines in a stable order."""
    addrs, lists = list(addrs), [blocklist(z) for z in zones]
    jobs: list[Callable[[], dict[str, Any]]] = []
    for ip in addrs:
        for bl in lists:
            jobs.append(lambda ip=ip, bl=bl: judge(bl, ip, lookup(r, query_name(ip, bl.zone), "A")))
        if rdns:
            jobs.append(lambda ip=ip: fcrdns(r, ip))
        if helo:
            jobs.append(lambda ip=ip: helo_check(r, helo, ip))
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs)))) as pool:
        return list(pool.map(lambda job: job(), jobs))
