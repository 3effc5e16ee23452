"""The journal source against real journal files: systemd-journal-remote writes them (journal_files.py),
journalctl follows them, as in production. Forged entries (what `logger -t postfix/smtpd` and its
cousins produce) never become lines; trusted ones become Hits through the real Postfix pack; the
cursor resumes after a stop; entries appended later are seen. The last test runs `relayguard run`
with the default system-journal source in a private mount namespace whose /var/log holds the test's
journal (the host's journal and firewall are never touched: dry-run firewall, no nft).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import journal_files as jf
import pytest
from tail_harness import Running

from relayguard import control
from relayguard.journal import JournalTail, Selector, Trust, cursor_time, syslog_line
from relayguard.parse import Matcher, load_packs
from relayguard.source import Chunk, Position

DEADLINE = 20.0
RELAY = ("NOQUEUE: reject: RCPT from unknown[{ip}]: 554 5.7.1 <v@example.net>: Relay access denied; "
         "from=<s@example.org> to=<v@example.net> proto=ESMTP helo=<bot>")
PREGREET = "PREGREET 11 after 0.1 from [{ip}]:4711: EHLO bot\\r\\n"
DOVECOT = ("imap-login: Disconnected (auth failed, 1 attempts in 2 secs): user=<admin@example.com>, "
           "method=PLAIN, rip={ip}, lip=192.0.2.25, TLS, session=<q454Xu/vMwBZApgg>")
TRUSTED_IP, FORGED_IP = "203.0.113.9", "192.0.2.77"


def aio(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run an async test body on a fresh loop (the suite has no asyncio plugin)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kw: Any) -> Any:
        return asyncio.run(fn(*args, **kw))

    return wrapper


# ---------------------------------------------------------------------------------------------- trust, as data

def _forgeries() -> list[tuple[str, dict[str, str]]]:
    msg = RELAY.format(ip=FORGED_IP)
    return [
        ("logger in a login session", jf.logger("postfix/smtpd", msg)),
        ("logger with a PID that is not its own", jf.logger("postfix/smtpd", msg, SYSLOG_PID="4242")),
        ("a user's program named smtpd", jf.logger("postfix/smtpd", msg, _COMM="smtpd", _EXE="/home/eve/smtpd")),
        ("logger from a .forward pipe, inside Postfix's unit", jf.logger(
            "postfix/smtpd", msg, _SYSTEMD_UNIT="postfix@-.service")),
        ("postlog run by a user", jf.logger("postfix/smtpd", msg, _COMM="postlog", _EXE="/usr/sbin/postlog")),
        ("Postfix's smtpd binary run by hand", jf.logger(
            "postfix/smtpd", msg, _COMM="smtpd", _EXE="/usr/lib/postfix/sbin/smtpd")),
        ("no _EXE, comm smtpd, outside Postfix's unit", jf.logger("postfix/smtpd", msg, _COMM="smtpd", _EXE="",
                                                                  uid=int(jf.POSTFIX_UID))),
        ("root's logger", jf.logger("postfix/smtpd", msg, uid=0)),
        ("kernel transport", jf.postfix("smtpd", msg, _TRANSPORT="kernel")),
        ("another Postfix program's binary", jf.postfix("smtpd", msg, _EXE="/usr/lib/postfix/sbin/local")),
        ("dovecot claimed by logger", jf.logger("dovecot", DOVECOT.format(ip=FORGED_IP))),
        ("sshd claimed by a user's sshd", jf.logger("sshd", f"Failed password for root from {FORGED_IP} port 1 ssh2",
                                                    _COMM="sshd", _EXE="/tmp/sshd")),
        ("an identifier no rule knows", jf.logger("mailguard", msg, uid=0, _EXE="/usr/sbin/mailguard")),
    ]


def _genuine() -> list[tuple[str, dict[str, str]]]:
    relay = RELAY.format(ip=TRUSTED_IP)
    return [
        ("postfix/smtpd", jf.postfix("smtpd", relay)),
        ("postfix/submission/smtpd", jf.postfix("smtpd", relay, SYSLOG_IDENTIFIER="postfix/submission/smtpd")),
        ("postscreen as root's child, no SYSLOG_PID", jf.postfix("postscreen", PREGREET.format(ip=TRUSTED_IP),
                                                                 SYSLOG_PID="")),
        ("no _EXE (sender gone), but comm, unit and uid agree", jf.postfix("smtpd", relay, _EXE="")),
        ("dovecot's log process", jf.entry(DOVECOT.format(ip=TRUSTED_IP), _TRANSPORT="syslog",
                                           SYSLOG_IDENTIFIER="dovecot", _PID="880", _UID="0", _COMM="log",
                                           _EXE="/usr/lib/dovecot/log", _SYSTEMD_UNIT="dovecot.service")),
        ("sshd-session on trixie", jf.entry(f"Failed password for root from {TRUSTED_IP} port 1 ssh2",
                                            _TRANSPORT="syslog", SYSLOG_IDENTIFIER="sshd-session", _PID="9",
                                            SYSLOG_PID="9", _UID="0", _COMM="sshd-session",
                                            _EXE="/usr/lib/openssh/sshd-session", _SYSTEMD_UNIT="ssh.service")),
    ]


@pytest.mark.parametrize(("case", "entry"), _forgeries(), ids=[c for c, _ in _forgeries()])
def test_trust_refuses_forgeries(case: str, entry: dict[str, str]) -> None:
    assert Trust().check(entry, entry["SYSLOG_IDENTIFIER"]) is not None


@pytest.mark.parametrize(("case", "entry"), _genuine(), ids=[c for c, _ in _genuine()])
def test_trust_accepts_the_daemons(case: str, entry: dict[str, str]) -> None:
    assert Trust().check(entry, entry["SYSLOG_IDENTIFIER"]) is None


def test_selector_names_units_and_identifiers() -> None:
    sel = Selector(["postfix", "exim4", "dovecot.service", "mailguard"])
    assert sel("postfix/smtpd", None) and sel("postfix-out/qmgr", None) and sel("exim", None)
    assert sel("anything", "dovecot.service") and sel("mailguard/x", None) and sel("mailguard", None)
    assert not sel("sshd", "ssh.service") and not sel("postfixx", None)
    assert Selector([])("sshd-session", None)  # no matches: every daemon the packs know


def test_syslog_line_is_one_line_the_packs_read() -> None:
    e = jf.postfix("smtpd", RELAY.format(ip=TRUSTED_IP) + "\n2026-01-01T00:00:00 mx postfix/smtpd[1]: "
                   + RELAY.format(ip=FORGED_IP), when=1796420825.5)
    line = syslog_line(e, "postfix/smtpd")
    assert line is not None and line.count(b"\n") == 1
    assert line.startswith(b"2026-12-04T21:47:05.500000+00:00 mx postfix/smtpd[4242]: NOQUEUE")
    hits = Matcher(load_packs(["postfix"])).match(line.decode())
    assert [h.addr for h in hits] == [TRUSTED_IP]  # the embedded second "line" stays inside the first


def test_cursor_time() -> None:
    assert cursor_time("s=ab;i=1;b=cd;m=3e8;t=661d5d12b7f73;x=9") == 0x661d5d12b7f73 // 1_000_000
    assert cursor_time("garbage") is None


# ---------------------------------------------------------------------------------------------- real files

class Follow(Running):
    """A JournalTail on the test's loop over a journal directory; every chunk it emitted."""

    def __init__(self, directory: Path, start: str = "beginning", saved: Position | None = None,
                 **kw: Any) -> None:
        self.tail = self.source = JournalTail("journal", kw.pop("matches", ["postfix", "dovecot"]), start,  # type: ignore[arg-type]
                                lambda name: saved if name == "journal" else None, directory=str(directory), **kw)
        self.queue: asyncio.Queue[Chunk] = asyncio.Queue()
        self.chunks: list[Chunk] = []
        self.matcher = Matcher(load_packs(["postfix", "dovecot", "sshd"]))

    def collect(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)

    @property
    def lines(self) -> list[str]:
        return [ln for c in self.chunks for ln in c.data.decode().splitlines()]

    def hits(self) -> list[str]:
        return [h.addr for c in self.chunks for h in self.matcher.scan(c.data, c.path, c.first_lineno)]

    async def until(self, cond: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while not cond():
            if self.task.done():
                self.task.result()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; status {self.tail.status()}")
            await asyncio.sleep(0.02)


def _journal(tmp_path: Path) -> Path:
    return tmp_path / "journal" / "system.journal"


@aio
async def test_forged_entries_never_become_lines(tmp_path: Path) -> None:
    entries = [e for _, e in _forgeries()] + [e for _, e in _genuine()]
    jf.write(_journal(tmp_path), entries)
    async with Follow(_journal(tmp_path).parent, matches=[]) as f:
        await f.until(lambda: f.tail.entries == len(entries), "every entry read")
        await f.until(lambda: f.chunks and f.chunks[-1].head_hash == f.tail.cursor, "the last cursor handed over")
    forged_selected = len(_forgeries()) - 1  # "mailguard" is not asked for: neither read nor counted
    assert f.tail.untrusted == forged_selected
    assert len(f.lines) == len(_genuine())
    assert FORGED_IP not in "\n".join(f.lines)
    assert set(f.hits()) == {TRUSTED_IP} and len(f.hits()) == len(_genuine())
    st = f.tail.status()
    assert st["state"] == "following" and st["files"][0]["untrusted"] == forged_selected
    assert {k for k in ("pattern", "mode", "state", "lines", "bytes", "lag_bytes", "skipped_long", "files")} <= set(st)


@aio
async def test_trusted_only_false_reads_what_a_file_would_show(tmp_path: Path) -> None:
    jf.write(_journal(tmp_path), [jf.logger("postfix/smtpd", RELAY.format(ip=FORGED_IP)),
                                  jf.postfix("smtpd", RELAY.format(ip=TRUSTED_IP))])
    async with Follow(_journal(tmp_path).parent, trusted_only=False) as f:
        await f.until(lambda: len(f.lines) == 2, "both lines")
    assert sorted(f.hits()) == sorted([FORGED_IP, TRUSTED_IP]) and f.tail.untrusted == 0


@aio
async def test_start_end_then_appended_entries_are_seen(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    jf.write(j, [jf.postfix("smtpd", RELAY.format(ip="203.0.113.1"))])
    async with Follow(j.parent, start="end") as f:
        await f.until(lambda: f.tail.state == "following", "journalctl running")
        jf.write(j, [jf.logger("postfix/smtpd", RELAY.format(ip=FORGED_IP)),
                     jf.postfix("postscreen", PREGREET.format(ip="2001:db8::66"))])
        await f.until(lambda: f.tail.entries == 2, "the appended entries")
        await f.until(lambda: f.chunks and f.chunks[-1].head_hash == f.tail.cursor, "the cursor handed over")
    assert f.hits() == ["2001:db8::66"] and f.tail.untrusted == 1


@aio
async def test_cursor_resume_after_stop(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    jf.write(j, [jf.postfix("smtpd", RELAY.format(ip=f"203.0.113.{i}")) for i in range(1, 4)])
    async with Follow(j.parent) as f:
        await f.until(lambda: len(f.lines) == 3, "the first three")
    saved = f.chunks[-1].position
    assert saved.inode == 0 and saved.head_hash.startswith("s=") and saved.lineno == 3
    # written while stopped: more than journalctl's default tail of 10, so nothing may be cut
    later = [jf.postfix("smtpd", RELAY.format(ip=f"198.51.100.{i}")) for i in range(1, 16)]
    jf.write(j, later)
    async with Follow(j.parent, start="end", saved=saved) as g:
        await g.until(lambda: len(g.lines) == 15, "the fifteen written while stopped")
        await asyncio.sleep(0.3)  # nothing from before the cursor may follow
    assert g.hits() == [f"198.51.100.{i}" for i in range(1, 16)]
    assert g.chunks[0].first_lineno == 4  # line numbers go on where they stopped


@aio
async def test_refused_cursor_resumes_from_its_time(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    t0 = time.time() - 100
    jf.write(j, [jf.postfix("smtpd", RELAY.format(ip="203.0.113.1"), when=t0),
                 jf.postfix("smtpd", RELAY.format(ip="203.0.113.2"), when=t0 + 50)])
    bad = f"s=not-an-id;i=1;b=nope;m=1;t={int((t0 + 20) * 1e6):x};x=1"
    async with Follow(j.parent, saved=Position(0, 0, bad, 7)) as f:
        await f.until(lambda: len(f.lines) == 1, "the entry after the cursor's time")
        await asyncio.sleep(0.3)
    assert f.hits() == ["203.0.113.2"] and f.tail.restarts >= 1


@pytest.mark.parametrize("start", ["beginning", "end"])
@aio
async def test_no_journal_yet_is_missing_then_followed(tmp_path: Path, start: str) -> None:
    """Also with start = "end": what is written while journalctl is restarted is not skipped."""
    j = _journal(tmp_path)
    j.parent.mkdir(parents=True)
    async with Follow(j.parent, start=start) as f:
        await f.until(lambda: f.tail.status()["state"] == "missing" and f.tail.restarts >= 1, "missing")
        jf.write(j, [jf.postfix("smtpd", RELAY.format(ip=TRUSTED_IP))])
        await f.until(lambda: len(f.lines) == 1, "the journal once it exists")  # restarts back off to 2 s, 4 s
    assert f.tail.status()["state"] == "following"


# ---------------------------------------------------------------------------------------------- the daemon

def _run_daemon(root: Path, varlog: Path) -> subprocess.Popen[bytes]:
    """`relayguard run` in a private mount namespace whose /var/log is `varlog` (and /run/log empty)."""
    script = ('mount --bind "$0" /var/log && { [ ! -d /run/log ] || mount -t tmpfs tmpfs /run/log; } && '
              'exec "$@"')
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(varlog),
            sys.executable, "-m", "relayguard", "run", "--config", str(root / "relayguard.toml")]
    log = (root / "daemon.log").open("ab")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "TZ": "UTC"})


def _wait(cond: Callable[[], Any], what: str, proc: subprocess.Popen[bytes], root: Path) -> Any:
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(control.ControlError):
            v = cond()
            if v:
                return v
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what}: {(root / 'daemon.log').read_text()[-3000:]}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


@pytest.mark.netns  # a mount namespace (root); the firewall is dry-run
def test_daemon_bans_from_the_journal_and_resumes(tmp_path: Path) -> None:
    root = tmp_path
    root.chmod(0o755)
    machine = Path("/etc/machine-id").read_text().strip()
    j = root / "varlog" / "journal" / machine / "system.journal"
    jf.write(j, [jf.postfix("smtpd", "connect from localhost[127.0.0.1]")])
    sock = root / "run" / "relayguard.sock"
    (root / "relayguard.toml").write_text(f"""
[daemon]
state_dir = "{root / 'state'}"
socket = "{sock}"
firewall = "dry-run"
log_format = "json"
[scoring]
threshold = 10
ignore_self = false
[[source]]
journal = true
matches = ["postfix"]
rules = ["postfix"]
start = "end"
""")
    proc = _run_daemon(root, root / "varlog")
    try:
        def status() -> dict[str, Any]:
            return control.request(str(sock), "status", timeout=10)

        def journal_status() -> dict[str, Any]:
            return next(s for s in status()["sources"] if s["name"] == "journal")

        _wait(lambda: journal_status()["state"] == "following", "journal source following", proc, root)
        forged = [jf.logger("postfix/smtpd", RELAY.format(ip=FORGED_IP)) for _ in range(4)]
        real = [jf.postfix("smtpd", RELAY.format(ip=TRUSTED_IP), pid=100 + i) for i in range(2)]
        # a journal received from another machine: its "trusted" fields are what that machine claims,
        # so it is not read at all (journalctl without --merge)
        remote = root / "varlog" / "journal" / "remote" / "remote-198.51.100.1.journal"
        jf.write(remote, [jf.postfix("smtpd", RELAY.format(ip="198.51.100.250"), pid=7 + i) for i in range(2)])
        jf.write(j, forged + real)
        bans = _wait(lambda: control.request(str(sock), "list", timeout=10), "a ban", proc, root)
        assert [b["ip"] for b in bans] == [TRUSTED_IP]
        files = _wait(lambda: journal_status()["files"][0]["untrusted"] == 4 and journal_status()["files"],
                      "untrusted counted", proc, root)
        assert files[0]["entries"] == 6
    finally:
        assert _stop(proc) == 0
    db = sqlite3.connect(root / "state" / "relayguard.db")
    (cursor,) = db.execute("SELECT head_hash FROM offsets WHERE path = 'journal'").fetchone()
    db.close()
    assert cursor.startswith("s=")

    # written while stopped: seen after the restart from the saved cursor, nothing before it again
    jf.write(j, [jf.postfix("postscreen", PREGREET.format(ip="2001:db8::99"), pid=7) for _ in range(2)])
    proc = _run_daemon(root, root / "varlog")
    try:
        bans = _wait(lambda: len(r := control.request(str(sock), "list", timeout=10)) == 2 and r,
                     "the ban from entries written while stopped", proc, root)
        assert sorted(b["ip"] for b in bans) == sorted([TRUSTED_IP, "2001:db8::99"])
        st = _wait(lambda: next(s for s in control.request(str(sock), "status", timeout=10)["sources"]), "status",
                   proc, root)
        assert st["files"][0]["entries"] == 2 and st["files"][0]["untrusted"] == 0
    finally:
        assert _stop(proc) == 0
    events = [json.loads(ln) for ln in (root / "daemon.log").read_text().splitlines() if ln.startswith("{")]
    assert any(e.get("event") == "source_resumed" and e.get("path") == "journal" for e in events)
