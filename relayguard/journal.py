"""Following the systemd journal: JournalTail turns journal entries into Chunks of syslog lines.

Owns which entries a `journal = true` source reads (its `matches`), which of them it trusts, how an
entry becomes a line the rule packs read unchanged, and where reading resumes. It has FileTail's
interface (`async run(out)`, `status()`), so the daemon treats the journal like one more file.

Reading: `journalctl --follow --output=json` as a child process, read on the asyncio loop (no
libsystemd binding to build or load). journalctl handles journald's file rotation; if it exits, it
is started again after a pause, from the last entry seen.

Lines: `TIMESTAMP HOST IDENT[PID]: MESSAGE`, with the RFC 3339 time journald stamped on arrival
(`__REALTIME_TIMESTAMP`, not the sender's), the sender's `_PID`, and newlines in MESSAGE written as
`#012` the way rsyslog does, so one entry is always exactly one line.

Trust (`trusted_only`, on by default): SYSLOG_IDENTIFIER and SYSLOG_PID are whatever the sender
wrote (`logger -t postfix/smtpd` writes them too); `_EXE`, `_COMM`, `_UID`, `_PID` and
`_SYSTEMD_UNIT` are added by journald from the kernel's view of the sending process. An entry counts
only when the daemon its identifier names (SENDERS) really sent it: the executable is one of that
daemon's, the user is one of its users, and the PID it wrote is its own. Anything else is counted as
`untrusted` in status and never reaches the rule packs. docs/sources.md explains the choice.

Resume point: the daemon persists `Chunk.position` per `Chunk.path` with the hits of that chunk, in
one transaction (Store.commit). A journal chunk carries `path` = the source's name, `inode` = 0,
`offset` = bytes of lines produced so far, and the journal cursor of its last entry in `head_hash`;
`saved(name)` hands that Position back at start, and reading resumes with `--after-cursor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import pwd
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
import structlog

from relayguard.source import Chunk, Position

log = structlog.get_logger(__name__)

JOURNALCTL = "journalctl"
FIELDS = ("MESSAGE", "SYSLOG_IDENTIFIER", "SYSLOG_PID", "_PID", "_UID", "_COMM", "_EXE", "_SYSTEMD_UNIT",
          "_HOSTNAME", "_TRANSPORT")  # journalctl adds __CURSOR and __REALTIME_TIMESTAMP itself
MAX_ENTRY = 1 << 20  # JSON lines longer than this are skipped and counted, never buffered
TRANSPORTS = frozenset({"syslog", "journal", "stdout"})  # how daemons log; not kernel, audit, driver
RESTART_MIN, RESTART_MAX = 1.0, 30.0  # pause before journalctl is started again (doubling)
ALIVE_AFTER = 0.5  # seconds journalctl must run before the source counts as following
UNTRUSTED_LOG_EVERY = 60.0  # seconds between warnings about untrusted entries (a local user may flood)
_UNIT = re.compile(r"\.(service|socket|scope|slice|mount|timer|path|target)$")
_GLOB = re.compile(r"[*?\[]")

State = Literal["following", "missing", "unreadable"]


@dataclass(frozen=True, slots=True)
class Sender:
    """A daemon the packs read, and what journald records about it when it really is that daemon.

    Patterns are fnmatch globs; `{prog}` stands for the identifier's last `/` component (Postfix
    writes `postfix/smtpd` from /usr/lib/postfix/sbin/smtpd, `postfix/submission/smtpd` too).
    """

    name: str
    idents: re.Pattern[str]  # SYSLOG_IDENTIFIER values it writes
    exes: tuple[str, ...]  # _EXE: the executable the kernel ran (cannot be faked without root)
    comms: tuple[str, ...]  # _COMM, only consulted when _EXE is missing (the sender exited first)
    units: tuple[str, ...]  # _SYSTEMD_UNIT, idem
    users: tuple[str, ...]  # _UID must be one of these users' (root always is)


SENDERS: tuple[Sender, ...] = (
    Sender("postfix", re.compile(r"^postfix(?:-[\w.-]+)?(?:/[\w.-]+)+$"),
           ("/usr/lib/postfix/sbin/{prog}", "/usr/libexec/postfix/{prog}"), ("{prog}",),
           ("postfix.service", "postfix@*.service"), ("postfix",)),
    Sender("dovecot", re.compile(r"^dovecot$"),
           ("/usr/sbin/dovecot", "/usr/lib/dovecot/*", "/usr/libexec/dovecot/*"), ("dovecot", "log", "auth"),
           ("dovecot.service",), ("dovecot", "dovenull")),
    Sender("exim", re.compile(r"^exim4?$"),
           ("/usr/sbin/exim4", "/usr/sbin/exim", "/usr/bin/exim"), ("exim4", "exim"),
           ("exim4.service", "exim.service"), ("Debian-exim", "exim", "mail")),
    Sender("sshd", re.compile(r"^sshd(?:-session|-auth)?$"),
           ("/usr/sbin/sshd", "/usr/lib/openssh/sshd-*", "/usr/libexec/openssh/sshd-*", "/usr/libexec/sshd-*"),
           ("sshd", "sshd-session", "sshd-auth"),
           ("ssh.service", "sshd.service", "ssh@*.service", "sshd@*.service"), ("sshd",)),
    Sender("opensmtpd", re.compile(r"^smtpd$"),
           ("/usr/sbin/smtpd", "/usr/lib/opensmtpd/*", "/usr/libexec/opensmtpd/*"), ("smtpd",),
           ("opensmtpd.service",), ("opensmtpd", "opensmtpq", "_smtpd", "_smtpq")),
    Sender("sendmail", re.compile(r"^(?:sendmail|sm-mta|sm-acceptingconnections|sm-msp-queue)$"),
           ("/usr/lib/sm.bin/sendmail", "/usr/libexec/sendmail/*", "/usr/sbin/sendmail.sendmail"),
           ("sendmail", "sendmail-mta", "sm-mta"), ("sendmail.service",), ("smmta", "smmsp")),
)
ALIASES = {"exim4": "exim", "ssh": "sshd", "smtpd": "opensmtpd", "sm-mta": "sendmail"}


def sender_for(ident: str) -> Sender | None:
    return next((s for s in SENDERS if s.idents.match(ident)), None)


# ----------------------------------------------------------------------------- entries


Entry = Mapping[str, Any]


def field_text(entry: Entry, key: str) -> str | None:
    """One field as text: journalctl writes binary values as byte arrays and repeated fields as
    lists of values; a repeated field is None here (journald itself writes its fields once)."""
    v = entry.get(key)
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v and all(isinstance(b, int) and 0 <= b < 256 for b in v):
        return bytes(v).decode("utf-8", "replace")
    return None


class Selector:
    """Which entries a source reads: `matches` are daemon names (postfix, dovecot, exim4, sshd,
    opensmtpd, sendmail), units (`postfix@-.service`, globs allowed) or other syslog identifiers
    (exact, or as the first `/` component). No matches: every daemon in SENDERS."""

    def __init__(self, matches: Sequence[str]) -> None:
        self.senders: list[Sender] = []
        self.units: list[str] = []
        self.idents: set[str] = set()
        for m in matches or [s.name for s in SENDERS]:
            name = ALIASES.get(m, m)
            sender = next((s for s in SENDERS if s.name == name), None)
            if sender is not None:
                self.senders.append(sender)
            elif _UNIT.search(m) or "@" in m:
                self.units.append(m)
            else:
                self.idents.add(m)

    def __call__(self, ident: str, unit: str | None) -> bool:
        if any(s.idents.match(ident) for s in self.senders):
            return True
        if ident in self.idents or ident.split("/", 1)[0] in self.idents:
            return True
        return unit is not None and any(fnmatch.fnmatchcase(unit, u) for u in self.units)


def _uids(names: Iterable[str]) -> frozenset[int]:
    out = {0}
    for n in names:
        with contextlib.suppress(KeyError):
            out.add(pwd.getpwnam(n).pw_uid)
    return frozenset(out)


class Trust:
    """Decides whether an entry was sent by the daemon its identifier names (see the module doc)."""

    def __init__(self) -> None:
        self._uids = {s.name: _uids(s.users) for s in SENDERS}  # users absent on this host are skipped

    def check(self, entry: Entry, ident: str) -> str | None:
        """None when trusted, else why not (for the log)."""
        transport = field_text(entry, "_TRANSPORT")
        if transport not in TRANSPORTS:
            return f"transport {transport!r} is not a daemon's"
        sender = sender_for(ident)
        if sender is None:
            return f"no rule says which program may log as {ident!r}"
        pid, claimed = field_text(entry, "_PID"), field_text(entry, "SYSLOG_PID")
        if pid is None:
            return "no _PID"
        if claimed is not None and claimed != pid:
            return f"claims PID {claimed} but was sent by PID {pid}"
        uid = field_text(entry, "_UID")
        if uid is None or not uid.isdigit() or int(uid) not in self._uids[sender.name]:
            return f"sent by uid {uid}, not by a {sender.name} user"
        prog = ident.rsplit("/", 1)[-1]
        if _GLOB.search(prog):
            return f"identifier {ident!r} holds glob characters"
        exe = field_text(entry, "_EXE")
        if exe is not None:
            if _any(exe, sender.exes, prog):
                return None
            return f"sent by {exe}, not by {sender.name}"
        comm, unit = field_text(entry, "_COMM"), field_text(entry, "_SYSTEMD_UNIT")
        if comm is not None and unit is not None and _any(comm, sender.comms, prog[:15]) and \
                _any(unit, sender.units, prog):
            return None
        return f"no _EXE, and _COMM {comm!r} with unit {unit!r} is not {sender.name}"


def _any(value: str, patterns: Iterable[str], prog: str) -> bool:
    return any(fnmatch.fnmatchcase(value, p.replace("{prog}", prog)) for p in patterns)


_BAD_TAG = re.compile(r"[\s\[\]:]")
_BAD_HOST = re.compile(r"\s")


def syslog_line(entry: Entry, ident: str) -> bytes | None:
    """`2026-12-04T19:25:44.123456+00:00 HOST IDENT[PID]: MESSAGE\\n`, or None without a message/time."""
    msg = field_text(entry, "MESSAGE")
    us = entry.get("__REALTIME_TIMESTAMP")
    if msg is None or not isinstance(us, str) or not us.isdigit():
        return None
    ts = datetime.fromtimestamp(int(us) / 1e6, UTC).isoformat(timespec="microseconds")
    host = _BAD_HOST.sub("_", field_text(entry, "_HOSTNAME") or "localhost")
    pid = field_text(entry, "_PID") or field_text(entry, "SYSLOG_PID")
    tag = _BAD_TAG.sub("_", ident) + (f"[{pid}]" if pid and pid.isdigit() else "")
    msg = msg.replace("\n", "#012").replace("\r", "#015")  # one entry, one line (as rsyslog escapes)
    return f"{ts} {host} {tag}: {msg}\n".encode()


def cursor_time(cursor: str) -> int | None:
    """The entry's realtime in seconds from a cursor's `t=` (hex microseconds), if present."""
    m = re.search(r"(?:^|;)t=([0-9a-f]+)(?:;|$)", cursor)
    return int(m.group(1), 16) // 1_000_000 if m else None


# ----------------------------------------------------------------------------- the tail


class JournalTail:
    """Follows the journal with journalctl and puts Chunks of syslog lines on a queue."""

    def __init__(
        self,
        name: str,
        matches: Sequence[str],
        start: Literal["end", "beginning"],
        saved: Callable[[str], Position | None],
        *,
        trusted_only: bool = True,
        directory: str | None = None,  # journal files of another tree (tests); None: the system journal
        max_chunk: int = 1 << 20,
        journalctl: str = JOURNALCTL,
    ) -> None:
        self.name = name
        self.matches = tuple(matches)
        self.start = start
        self.saved = saved
        self.trusted_only = trusted_only
        self.directory = directory
        self.max_chunk = max(1, max_chunk)
        self.journalctl = journalctl
        self.select = Selector(self.matches)
        self.trust = Trust()
        self.cursor: str | None = None
        self._since: int | None = None  # resume by time when a saved cursor is refused
        self.lineno = 0
        self.bytes = 0
        self.entries = 0
        self.lines = 0
        self.untrusted = 0
        self.skipped_long = 0
        self.restarts = 0
        self.state: State | None = None
        self.error = ""
        self._stderr: deque[str] = deque(maxlen=20)
        self._buffered = 0
        self._untrusted_logged = 0.0
        self._untrusted_since_log = 0

    # -- the loop
    async def run(self, out: asyncio.Queue[Chunk]) -> None:
        """Follow until cancelled; journalctl is restarted whenever it exits."""
        self._resume_point()
        pause = RESTART_MIN
        while True:
            launched = int(time.time())
            got = await self._follow_once(out)
            if self.cursor is None and self._since is None and self.start == "end":
                self._since = launched  # no entry seen yet: a restart must not skip what came meanwhile
            pause = RESTART_MIN if got else min(RESTART_MAX, pause * 2)
            self.restarts += 1
            await asyncio.sleep(pause)

    def _resume_point(self) -> None:
        pos = self.saved(self.name)
        if pos is None:
            return
        if pos.inode != 0 or not pos.head_hash.startswith("s="):
            log.warning("source_resume_lost", path=self.name, detail="the saved position is not a journal cursor")
            return
        self.cursor, self.lineno, self.bytes = pos.head_hash, pos.lineno, pos.offset
        log.info("source_resumed", path=self.name, cursor=self.cursor, lineno=self.lineno)

    def argv(self) -> list[str]:
        argv = [self.journalctl, "--follow", "--output=json", "--all", "--no-pager",
                "--output-fields=" + ",".join(FIELDS)]
        if self.directory is not None:
            argv += ["--directory", self.directory]
        if self.cursor is not None:
            argv += ["--after-cursor", self.cursor, "--no-tail"]
        elif self._since is not None:
            argv += ["--since", f"@{self._since}", "--no-tail"]
        elif self.start == "beginning":
            argv += ["--no-tail"]
        else:
            argv += ["--lines=0"]
        return argv

    async def _follow_once(self, out: asyncio.Queue[Chunk]) -> bool:
        """Run journalctl until it exits; True when it delivered entries."""
        before = self.entries
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv(), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
        except OSError as e:
            self._set_state("missing", f"cannot run {self.journalctl}: {e}")
            return False
        self._stderr.clear()
        # "following" once journalctl has stayed up a moment: one that exits at once (no journal
        # files yet) must not flap the state, and the log, at every restart
        alive = asyncio.get_running_loop().call_later(ALIVE_AFTER, self._alive, proc)
        err_task = asyncio.create_task(self._read_stderr(proc))
        try:
            assert proc.stdout is not None
            await self._pump(proc.stdout, out)
            rc = await proc.wait()
            await err_task
        finally:
            if proc.returncode is None:  # cancelled: end our child, by its PID
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 5)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            err_task.cancel()
            alive.cancel()
        self._exited(rc)
        return self.entries > before

    def _alive(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None and self.state != "unreadable":
            self._set_state("following", "")

    async def _read_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            text = raw.decode("utf-8", "replace").strip()
            if not text:
                continue
            self._stderr.append(text)
            if "not seeing messages from other users" in text:
                self._set_state("unreadable", "this user may not read the system journal "
                                "(run as root or in group systemd-journal or adm)")

    def _exited(self, rc: int) -> None:
        text = " ".join(self._stderr) or f"journalctl exited with status {rc}"
        if "cursor" in text.lower() and self.cursor is not None:
            # a cursor journalctl refuses: go on from its time instead of losing the gap or re-reading all
            self._since = cursor_time(self.cursor)
            log.warning("source_resume_lost", path=self.name, cursor=self.cursor, since=self._since, error=text)
            self.cursor = None
            return
        state: State = "unreadable" if "ermission denied" in text else "missing"
        self._set_state(state, text)

    async def _pump(self, stdout: asyncio.StreamReader, out: asyncio.Queue[Chunk]) -> None:
        """JSON lines in, Chunks out: one Chunk per read (bounded by max_chunk), so a burst is one block."""
        pending = b""
        skipping = False
        while True:
            data = await stdout.read(1 << 16)
            if not data:
                return
            if self.state is None or self.state == "missing":
                self._set_state("following", "")
            if skipping:
                cut = data.find(b"\n")
                if cut < 0:
                    continue
                data, skipping = data[cut + 1:], False
            pending += data
            end = pending.rfind(b"\n")
            if end < 0:
                if len(pending) > MAX_ENTRY:
                    self.skipped_long += 1
                    pending, skipping = b"", True
                self._buffered = len(pending)
                continue
            block, pending = pending[: end + 1], pending[end + 1:]
            self._buffered = len(pending)
            await self._emit(block.splitlines(), out)

    async def _emit(self, raws: list[bytes], out: asyncio.Queue[Chunk]) -> None:
        lines: list[bytes] = []
        size = 0
        moved = False
        for raw in raws:
            if len(raw) > MAX_ENTRY:
                self.skipped_long += 1
                continue
            line = self._entry(raw)
            moved = True
            if line is None:
                continue
            lines.append(line)
            size += len(line)
            if size >= self.max_chunk:
                await self._put(lines, out)
                lines, size, moved = [], 0, False
        if lines or moved:  # a cursor past filtered entries is worth saving too
            await self._put(lines, out)

    async def _put(self, lines: list[bytes], out: asyncio.Queue[Chunk]) -> None:
        data = b"".join(lines)
        first = self.lineno + 1
        self.lineno += len(lines)
        self.lines += len(lines)
        self.bytes += len(data)
        await out.put(Chunk(self.name, data, first, self.bytes, 0, self.cursor or ""))

    def _entry(self, raw: bytes) -> bytes | None:
        """One JSON entry: advance the cursor; the syslog line when it is selected and trusted."""
        try:
            entry = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return None
        if not isinstance(entry, dict):
            return None
        cursor = entry.get("__CURSOR")
        if isinstance(cursor, str):
            self.cursor = cursor
            self._since = None
        self.entries += 1
        ident = field_text(entry, "SYSLOG_IDENTIFIER") or field_text(entry, "_COMM")
        if not ident or not self.select(ident, field_text(entry, "_SYSTEMD_UNIT")):
            return None
        if self.trusted_only:
            why = self.trust.check(entry, ident)
            if why is not None:
                self._note_untrusted(entry, ident, why)
                return None
        return syslog_line(entry, ident)

    def _note_untrusted(self, entry: Entry, ident: str, why: str) -> None:
        self.untrusted += 1
        self._untrusted_since_log += 1
        now = time.monotonic()
        if now - self._untrusted_logged < UNTRUSTED_LOG_EVERY and self._untrusted_logged:
            return
        log.warning("journal_entry_untrusted", source=self.name, ident=ident, reason=why,
                    exe=field_text(entry, "_EXE"), comm=field_text(entry, "_COMM"),
                    unit=field_text(entry, "_SYSTEMD_UNIT"), uid=field_text(entry, "_UID"),
                    pid=field_text(entry, "_PID"), since_last_warning=self._untrusted_since_log,
                    total=self.untrusted)
        self._untrusted_logged = now
        self._untrusted_since_log = 0

    def _set_state(self, new: State, error: str) -> None:
        self.error = error
        if new == self.state:
            return
        if new == "missing":
            log.warning("source_missing", path=self.name, error=error)
        elif new == "unreadable":
            log.warning("source_unreadable", path=self.name, error=error)
        elif self.state is not None:
            log.info("source_available", path=self.name, was=self.state)
        self.state = new

    # -- reporting
    def status(self) -> dict[str, Any]:
        """FileTail's keys, with one `files` entry for the journal plus entries, untrusted and cursor."""
        where = self.directory or "system journal"
        extra = {"entries": self.entries, "untrusted": self.untrusted, "cursor": self.cursor,
                 "matches": list(self.matches), "trusted_only": self.trusted_only, "restarts": self.restarts}
        state = self.state or "missing"
        f = {"path": where, "state": state, "lines": self.lines, "bytes": self.bytes, "lag_bytes": 0,
             "skipped_long": self.skipped_long, "inode": None, "offset": None, "buffered": self._buffered,
             "error": self.error, **extra}
        return {"pattern": self.name, "mode": "journal", "state": state, "lines": self.lines, "bytes": self.bytes,
                "lag_bytes": 0, "skipped_long": self.skipped_long, **extra, "files": [f]}
