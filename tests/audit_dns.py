"""A small authoritative DNS server (dnspython over real UDP) for the audit tests.

`serve(ns, addr, records)` runs it as a process inside network namespace `ns`, bound to addr:53,
and stops it (by PID) afterwards. `records` maps a name to {"A": [...], "AAAA": [...], "PTR": [...]}
or to one of the behaviours "silent" (never answered: the client times out) and "servfail".
Names not in `records` get NXDOMAIN; a known name without the asked type gets NOERROR/no data.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_SERVER = r"""
import json, socket, sys
import dns.flags, dns.message, dns.rcode, dns.rdatatype, dns.rrset

addr, records = sys.argv[1], {k.lower().rstrip(".") + ".": v for k, v in json.loads(sys.argv[2]).items()}
sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((addr, 53))
print("ready", flush=True)
while True:
    data, peer = sock.recvfrom(4096)
    try:
        q = dns.message.from_wire(data)
        qname, qtype = q.question[0].name, dns.rdatatype.to_text(q.question[0].rdtype)
    except Exception:
        continue
    entry = records.get(qname.to_text().lower())
    print(f"query {qname} {qtype} -> {entry if isinstance(entry, str) else 'data' if entry else 'nx'}", flush=True)
    if entry == "silent":
        continue
    r = dns.message.make_response(q)
    r.flags |= dns.flags.AA
    if entry == "servfail":
        r.set_rcode(dns.rcode.SERVFAIL)
    elif entry is None:
        r.set_rcode(dns.rcode.NXDOMAIN)
    elif entry.get(qtype):
        r.answer.append(dns.rrset.from_text_list(qname, 60, "IN", qtype, entry[qtype]))
    sock.sendto(r.to_wire(), peer)
"""


@contextmanager
def serve(ns: str, addr: str, records: dict[str, Any]) -> Iterator[subprocess.Popen[str]]:
    """The server running in `ns` on addr:53 (UDP); its stdout logs one line per query."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-u", "-c", _SERVER, addr,
                             json.dumps(records)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        if not ready or proc.stdout.readline().strip() != "ready":
            proc.kill()
            raise RuntimeError(f"DNS server in {ns} did not start: {proc.stderr.read() if proc.stderr else ''}")
        yield proc
    finally:
        proc.kill()  # our own child, by PID
        proc.wait(10)
