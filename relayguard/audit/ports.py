"""`relayguard audit ports`: what listens on this host, which process owns it, what should close.

Reads /proc/net/{tcp,tcp6,udp,udp6} (this network namespace's sockets) and maps socket inodes to
processes through /proc/PID/fd, so it needs neither ss nor netstat. Mail ports are marked; any
other socket on a non-loopback address is flagged "close if unused" unless allowed. Also owns the
/proc socket table reader that `relayguard top` uses for live connections.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAIL_PORTS = {25: "smtp", 465: "submissions", 587: "submission", 110: "pop3", 143: "imap", 993: "imaps",
              995: "pop3s", 4190: "sieve"}
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
              7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV"}
LISTEN, UDP_UNCONNECTED = 10, 7


@dataclass(frozen=True, slots=True)
class Sock:
    """One line of /proc/net/{tcp,udp}{,6}."""

    proto: str  # tcp, tcp6, udp, udp6 (the file it came from)
    local: str
    lport: int
    remote: str
    rport: int
    state: int
    inode: int


def _addr(hexaddr: str) -> str:
    """The kernel prints addresses as 32-bit words in host byte order."""
    raw = bytes.fromhex(hexaddr)
    words = struct.unpack(f"={len(raw) // 4}I", raw)
    packed = struct.pack(f"!{len(words)}I", *words)
    ip = ipaddress.ip_address(packed)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)


def read_table(proto: str, root: Path = Path("/proc/net")) -> Iterator[Sock]:
    try:
        lines = (root / proto).read_text().splitlines()[1:]
    except FileNotFoundError:  # no IPv6 in this kernel
        return
    for line in lines:
        f = line.split()
        if len(f) < 10:
            continue
        (la, lp), (ra, rp) = f[1].split(":"), f[2].split(":")
        yield Sock(proto, _addr(la), int(lp, 16), _addr(ra), int(rp, 16), int(f[3], 16), int(f[9]))


def sockets(protos: Iterable[str] = ("tcp", "tcp6", "udp", "udp6")) -> list[Sock]:
    return [s for p in protos for s in read_table(p)]


def socket_owners() -> dict[int, tuple[int, str]]:
    """Socket inode -> (lowest PID holding it, process name); only what we may read (all, as root)."""
    owners: dict[int, tuple[int, str]] = {}
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        pid = int(pid_dir.name)
        try:
            fds = os.listdir(pid_dir / "fd")
        except OSError:  # gone, or not ours
            continue
        comm = None
        for fd in fds:
            with contextlib.suppress(OSError):
                target = os.readlink(pid_dir / "fd" / fd)
                if target.startswith("socket:["):
                    inode = int(target[8:-1])
                    if inode not in owners or pid < owners[inode][0]:
                        if comm is None:
                            comm = _comm(pid_dir)
                        owners[inode] = (pid, comm)
    return owners


def _comm(pid_dir: Path) -> str:
    try:
        return (pid_dir / "comm").read_text().strip()
    except OSError:
        return "?"


def is_public(address: str) -> bool:
    """Reachable from other hosts: anything but loopback (a wildcard address included)."""
    return not ipaddress.ip_address(address).is_loopback


def listening(allow: Iterable[int] = ()) -> list[dict[str, Any]]:
    """Every listening TCP socket and bound, unconnected UDP socket, as contract lines."""
    allowed = set(allow)
    owners = socket_owners()
    out = []
    seen = set()
    for s in sockets():
        tcp = s.proto.startswith("tcp")
        if (tcp and s.state != LISTEN) or (not tcp and (s.state != UDP_UNCONNECTED or s.rport != 0)):
            continue
        proto = s.proto.rstrip("6")
        key = (proto, s.local, s.lport, s.inode)
        if key in seen:
            continue
        seen.add(key)
        pid, comm = owners.get(s.inode, (None, None))
        mail = s.lport in MAIL_PORTS and tcp
        public = is_public(s.local)
        line: dict[str, Any] = {"check": "port", "proto": proto, "address": s.local, "port": s.lport,
                                "process": comm, "pid": pid, "mail": mail, "public": public}
        if mail:
            line.update(severity="ok", note=f"mail port ({MAIL_PORTS[s.lport]})")
        elif not public:
            line.update(severity="ok", note="loopback only")
        elif s.lport in allowed:
            line.update(severity="ok", note="allowed (--allow)")
        else:
            line.update(severity="warn", note="close if unused")
        out.append(line)
    out.sort(key=lambda x: (x["proto"], x["port"], x["address"]))
    return out


def service_name(port: int, proto: str) -> str | None:
    with contextlib.suppress(OSError):
        return socket.getservbyport(port, proto)
    return MAIL_PORTS.get(port)


def submission_lines(pc: Any) -> list[dict[str, Any]]:
    """For each Postfix submission service (587/465): does it require AUTH, and TLS before AUTH?

    `pc` is a relay.Postconf (None: Postfix's configuration could not be read, nothing to say).
    """
    from relayguard.audit.relay import submission_policy

    if pc is None:
        return []
    out = []
    for svc, port in pc.smtpd_services():
        if port not in (587, 465):
            continue
        p = submission_policy(pc, svc)
        if p["auth"] == "no":
            sev, msg = "warn", "no AUTH offered: your users cannot authenticate to send"
        elif not p["auth_over_tls_only"]:
            sev, msg = "fail", "AUTH without TLS: passwords travel in clear text"
        elif p["auth"] != "required":
            sev, msg = "ok", ("AUTH over TLS; strangers may still deliver to local domains here "
                              "(-o smtpd_client_restrictions=permit_sasl_authenticated,reject makes AUTH required)")
        else:
            sev, msg = "ok", "AUTH required, over TLS"
        out.append({"check": "submission", "service": svc.key, "port": port, "auth": p["auth"], "tls": p["tls"],
                    "severity": sev, "message": msg})
    return out
