"""Real journal files for tests: entries in journald's export format, written by systemd-journal-remote.

journald is not running here (systemd is not PID 1), but systemd-journal-remote writes genuine
journal files from the export format, with every field as given, the ones journald itself adds
(`_EXE`, `_COMM`, `_UID`, `_PID`, `_SYSTEMD_UNIT`, ...) included. That is exactly what the trust
checks read, so a test can write what a real daemon would have logged next to what a local user's
`logger` would have, and follow the file with journalctl like the daemon does. Writing to an
existing file appends, and a running `journalctl --follow` sees the new entries.
"""

from __future__ import annotations

import itertools
import pwd
import struct
import subprocess
import time
from pathlib import Path

JOURNAL_REMOTE = "/lib/systemd/systemd-journal-remote"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")
_PF = pwd.getpwnam("postfix")  # tests run where Postfix is installed (scripts/test.sh)
POSTFIX_UID, POSTFIX_GID = str(_PF.pw_uid), str(_PF.pw_gid)
_mono = itertools.count(1_000_000, 1000)


def export(fields: dict[str, str]) -> bytes:
    """One entry in the export format (binary form for values with newlines)."""
    out = b""
    for k, v in fields.items():
        b = v.encode()
        if b"\n" in b:
            out += k.encode() + b"\n" + struct.pack("<Q", len(b)) + b + b"\n"
        else:
            out += k.encode() + b"=" + b + b"\n"
    return out + b"\n"


def entry(message: str, *, when: float | None = None, **fields: str) -> dict[str, str]:
    """Address fields first, then what the caller gives (the sender's identity), then MESSAGE."""
    return {"__REALTIME_TIMESTAMP": str(int((when or time.time()) * 1e6)),
            "__MONOTONIC_TIMESTAMP": str(next(_mono)), "_BOOT_ID": BOOT_ID, "_HOSTNAME": "mx",
            "PRIORITY": "6", "SYSLOG_FACILITY": "2", **fields, "MESSAGE": message}


def postfix(prog: str, message: str, pid: int = 4242, **over: str) -> dict[str, str]:
    """What journald records when Postfix's `prog` logs through syslog(3) on Debian 12."""
    f = {"_TRANSPORT": "syslog", "SYSLOG_IDENTIFIER": f"postfix/{prog}", "SYSLOG_PID": str(pid), "_PID": str(pid),
         "_UID": POSTFIX_UID, "_GID": POSTFIX_GID, "_COMM": prog[:15], "_EXE": f"/usr/lib/postfix/sbin/{prog}",
         "_CMDLINE": f"{prog} -n smtp -t inet -u -c", "_SYSTEMD_UNIT": "postfix@-.service"}
    f.update(over)
    return entry(message, **{k: v for k, v in f.items() if v != ""})


def logger(ident: str, message: str, pid: int = 31337, uid: int = 1000, **over: str) -> dict[str, str]:
    """What journald records for `logger -t IDENT MESSAGE` run by a local user in a login session."""
    f = {"_TRANSPORT": "syslog", "SYSLOG_IDENTIFIER": ident, "_PID": str(pid), "_UID": str(uid),
         "_GID": str(uid), "_COMM": "logger", "_EXE": "/usr/bin/logger", "_CMDLINE": f"logger -t {ident}",
         "_SYSTEMD_UNIT": "session-3.scope"}
    f.update(over)
    return entry(message, **{k: v for k, v in f.items() if v != ""})


def write(journal: Path, entries: list[dict[str, str]]) -> None:
    """Append entries to a journal file (created with its directory if missing)."""
    journal.parent.mkdir(parents=True, exist_ok=True)
    src = journal.with_suffix(".export")
    src.write_bytes(b"".join(export(e) for e in entries))
    p = subprocess.run([JOURNAL_REMOTE, "-o", str(journal), str(src)], capture_output=True, text=True,
                       timeout=60, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"systemd-journal-remote failed ({p.returncode}): {p.stderr.strip()}")
    src.unlink()
