"""A real Postfix mail server in network namespaces, for tests and demos.

`PostfixLab` owns, for the length of a `with` block:
- three network namespaces with random names: the server (MX), an attacker and a legitimate
  client, joined by a bridge inside the server namespace (documentation addresses only);
- a private Postfix instance run as `postfix -c CONFIG start` inside the server namespace, with its
  own config, queue and data directories and its own `maillog_file` (written by postlogd, no
  syslog), postscreen with deep protocol tests on port 25 and a submission smtpd on port 587;
- optionally a private Dovecot (`dovecot -c CONF`) that serves SASL to Postfix (passwd-file, one user);
- helpers to speak SMTP from inside a namespace (smtplib or raw bytes), the attacks bots make, and
  a bounded wait for log lines.

It never touches the system's /etc/postfix or /etc/dovecot instances. Everything it starts it
stops, by the program's own stop command, then by the PIDs still inside its server namespace, and
the namespaces go away also when startup fails halfway.

    with PostfixLab(tmp_path) as lab:
        lab.pass_postscreen(lab.client_ns, 4)       # postscreen admits the client to smtpd
        lab.send_mail(lab.client_ns, 4, "alice@example.org")
        lab.relay_attempt(lab.attacker_ns, 6)       # waits for "Relay access denied" in lab.maillog

Every helper that provokes a log line waits for it (20 s deadline) and returns it, so a caller
never sleeps. Needs root (namespaces, Postfix's master), iproute2, postfix >= 3.4 (postlogd) and,
for SASL, dovecot-core.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

MX_HOSTNAME = "mx.example.org"
MX_DOMAIN = "example.org"
HELO_NAME = "client.example.net"  # what the helpers say in EHLO unless told otherwise
WAIT = 20.0  # seconds any one expected log line may take


@dataclass(frozen=True, slots=True)
class Host:
    """One namespace's addresses and the on-link prefixes they sit in."""

    role: str
    addr4: str
    addr6: str
    prefix4: str
    prefix6: str


SERVER = Host("server", "192.0.2.25", "2001:db8:25::25", "192.0.2.0/24", "2001:db8:25::/64")
ATTACKER = Host("attacker", "203.0.113.66", "2001:db8:66::66", "203.0.113.0/24", "2001:db8:66::/64")
CLIENT = Host("client", "198.51.100.10", "2001:db8:10::10", "198.51.100.0/24", "2001:db8:10::/64")


class LabError(RuntimeError):
    """The lab could not be built or torn down, or a bounded wait ran out; the message says which."""


# ----------------------------------------------------------------------------- namespaces, sockets


def _run(argv: list[str], timeout: float = 30.0, output: Path | None = None) -> str:
    """Run a command, return stdout; a failure raises LabError with the command and its output.

    Commands that leave a daemon behind must write to a file (`output`): the daemon inherits
    stdout, and a pipe would stay open until it exits.
    """
    if output is None:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        out, err = p.stdout, p.stderr
    else:
        with output.open("ab") as f:
            start = f.tell()
            p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                               timeout=timeout, check=False)
        out = err = output.read_bytes()[start:].decode("utf-8", "replace")
    if p.returncode != 0:
        raise LabError(f"{' '.join(argv)} exited {p.returncode}: {err.strip() or out.strip()}")
    return out


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """fn() called in a fresh thread that has joined network namespace `ns`.

    The network namespace is per thread, so the caller's thread never moves; sockets made by fn
    stay in `ns` for their whole life and can be used from any thread afterwards.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, f"setns({ns}): {os.strerror(e)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as e:  # handed over to the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def ns_connect(ns: str, addr: str, port: int, timeout: float = 10.0) -> socket.socket:
    """A TCP socket connected from inside `ns` to addr:port."""
    return in_netns(ns, lambda: socket.create_connection((addr, port), timeout=timeout))


class NsSMTP(smtplib.SMTP):
    """smtplib.SMTP whose socket is made inside a network namespace."""

    def __init__(self, ns: str, host: str, port: int, timeout: float, local_hostname: str) -> None:
        self._ns = ns
        # local_hostname given, so smtplib never calls socket.getfqdn() (a DNS lookup).
        super().__init__(host, port, local_hostname=local_hostname, timeout=timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return ns_connect(self._ns, host, port, timeout)


class RawSMTP:
    """Bytes-level SMTP client for what smtplib will not do: talk early, pipeline, hang up."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self._buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: str) -> tuple[int, str]:
        """Send one command line (CRLF added) and read its reply."""
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def reply(self) -> tuple[int, str]:
        """Read one complete (possibly multi-line) reply: (code, text of all lines)."""
        lines = []
        while True:
            line = self._line()
            lines.append(line[4:])
            if len(line) < 4 or line[3:4] != "-":
                return int(line[:3]), "\n".join(lines)

    def _line(self) -> str:
        while b"\r\n" not in self._buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"server closed the connection; pending {self._buf!r}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\r\n", 1)
        return line.decode("utf-8", "replace")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- the lab


class PostfixLab:
    """Namespaces + private Postfix (+ Dovecot SASL); a context manager that always cleans up.

    Once entered: server_ns, attacker_ns, client_ns (namespace names); mx_addr4/6,
    attacker_addr4/6, client_addr4/6; maillog (Postfix's own log file); config_dir, queue_dir,
    dovecot_log; local_users (recipients that exist in example.org); sasl_user and
    sasl_password (the one account Dovecot knows, when sasl=True).

    `base` holds the lab's files (`base/postfix-lab-TAG`, TAG as in the namespace names);
    `main_cf` overrides or adds main.cf parameters; `greet_wait` is postscreen's greeting pause
    in seconds (every new client on port 25 waits that long once).
    """

    def __init__(
        self,
        base: Path,
        *,
        sasl: bool = True,
        greet_wait: int = 2,
        local_users: tuple[str, ...] = ("alice", "bob"),
        sasl_user: tuple[str, str] = ("carol", "correct horse battery staple"),
        main_cf: dict[str, str] | None = None,
    ) -> None:
        tag = secrets.token_hex(3)
        self.base = Path(base)
        self.name = f"postfix-lab-{tag}"
        self.root = self.base / self.name  # may run from /tmp meanwhile, see _make_root
        self._relocated = False
        self.sasl = sasl
        self.greet_wait = greet_wait
        self.local_users = local_users
        self.sasl_user, self.sasl_password = sasl_user
        self.extra_main_cf = dict(main_cf or {})
        self.server_ns = f"rg-pf-mx-{tag}"
        self.attacker_ns = f"rg-pf-bad-{tag}"
        self.client_ns = f"rg-pf-ok-{tag}"
        self.hosts = {self.server_ns: SERVER, self.attacker_ns: ATTACKER, self.client_ns: CLIENT}
        self.mx_addr4, self.mx_addr6 = SERVER.addr4, SERVER.addr6
        self.attacker_addr4, self.attacker_addr6 = ATTACKER.addr4, ATTACKER.addr6
        self.client_addr4, self.client_addr6 = CLIENT.addr4, CLIENT.addr6
        self._made_ns: list[str] = []
        self._postfix_started = False
        self._dovecot: subprocess.Popen[bytes] | None = None

    # -- lifecycle

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException as e:
            try:
                self.stop()
            except LabError as te:
                e.add_note(str(te))
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        self._make_root()
        self._make_namespaces()
        self._write_postfix_config()
        self._postfix("check")  # creates the queue and data directories with Postfix's owners
        if self.sasl:
            self._start_dovecot()
        self._start_postfix()

    def stop(self) -> None:
        """Stop Postfix and Dovecot, delete the namespaces. Safe to call twice or after a failed start."""
        errors: list[str] = []
        steps = (self._stop_postfix, self._stop_dovecot, self._end_leftovers, self._delete_namespaces,
                 self._move_root_back)
        for step in steps:
            try:
                step()
            except Exception as e:  # keep tearing down; report everything at the end
                errors.append(f"{step.__name__}: {e}")
        if errors:
            raise LabError("teardown: " + "; ".join(errors))

    # -- where things live

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.root / "spool"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def maillog(self) -> Path:
        """Postfix's own log file (maillog_file), written by postlogd."""
        return self.log_dir / "maillog"

    @property
    def dovecot_dir(self) -> Path:
        return self.root / "dovecot"

    @property
    def dovecot_log(self) -> Path:
        return self.dovecot_dir / "dovecot.log"

    def _make_root(self) -> None:
        """Create the lab directory where the postfix and dovecot users can reach it.

        Postfix's master opens its lock file as mail_owner and Dovecot's auth reads its
        passwd-file unprivileged, so every directory above the lab must be searchable by others.
        pytest's tmp_path sits under a 0700 directory: then the lab runs from a directory in /tmp,
        `base/postfix-lab-TAG` is a symlink to it, and stop() moves the files back there.
        """
        self.base.mkdir(parents=True, exist_ok=True)
        real = self.base.resolve()
        if all(p.stat().st_mode & 0o001 for p in (real, *real.parents)):
            self.root.mkdir()
        else:
            self.root = Path(tempfile.mkdtemp(prefix=f"rg-{self.name}-", dir="/tmp"))
            self._relocated = True
            (self.base / self.name).symlink_to(self.root)
        self.root.chmod(0o755)

    def _move_root_back(self) -> None:
        if not self._relocated:
            return
        self._relocated = False
        want = self.base / self.name
        want.unlink()
        os.rename(self.root, want)  # same file system as /tmp; the spool holds sockets and fifos
        self.root = want

    # -- addresses

    def addr(self, ns: str, family: int) -> str:
        """The IPv4 (family 4) or IPv6 (family 6) address of namespace `ns`."""
        h = self.hosts[ns]
        return h.addr4 if family == 4 else h.addr6

    def mx_addr(self, family: int) -> str:
        return self.mx_addr4 if family == 4 else self.mx_addr6

    # -- talking to the server

    def connect(self, ns: str, family: int = 4, port: int = 25, timeout: float = 10.0) -> socket.socket:
        return ns_connect(ns, self.mx_addr(family), port, timeout)

    def raw(self, ns: str, family: int = 4, port: int = 25, timeout: float = 10.0) -> RawSMTP:
        """A RawSMTP connected from `ns`; nothing read yet (so the caller can talk first)."""
        return RawSMTP(self.connect(ns, family, port, timeout), timeout)

    def smtp(
        self, ns: str, family: int = 4, port: int = 25, timeout: float = 15.0, helo: str = HELO_NAME
    ) -> NsSMTP:
        """An smtplib client connected from `ns` (greeting read); use it as a context manager.

        smtplib's mail()/rcpt() do not send EHLO by themselves: call ehlo() first.
        """
        return NsSMTP(ns, self.mx_addr(family), port, timeout, helo)

    def reachable(self, ns: str, family: int = 4, port: int = 25, timeout: float = 2.0) -> bool:
        """Whether a TCP connection from `ns` gets through (False once a firewall drops it).

        The connection is closed at once, so Postfix logs a hang-up for that client.
        """
        try:
            self.connect(ns, family, port, timeout).close()
        except OSError:
            return False
        return True

    def pass_postscreen(self, ns: str, family: int) -> str:
        """Make postscreen admit this client to smtpd on port 25 from now on; the PASS NEW line.

        With deep protocol tests on, a new client that behaves is told 450 at RCPT and must come
        back; postscreen remembers it, and later connections go straight to smtpd (PASS OLD).
        Costs greet_wait seconds.
        """
        mark = self.log_size()
        with self.raw(ns, family, 25) as c:
            code, text = c.reply()
            if code != 220:
                raise LabError(f"postscreen greeting: {code} {text}")
            c.command(f"EHLO {HELO_NAME}")
            c.command("MAIL FROM:<probe@example.net>")
            code, text = c.command(f"RCPT TO:<{self.local_users[0]}@{MX_DOMAIN}>")
            if code != 450:
                raise LabError(f"postscreen should defer a new client at RCPT, said {code} {text}")
            c.command("QUIT")
        return self.wait_for(rf"postscreen\[\d+\]: PASS NEW {self._ps(ns, family)}", since=mark)[0]

    # -- attacks: each waits for the line Postfix logs about it and returns that line

    def pregreet(self, ns: str, family: int) -> str:
        """Talk before postscreen's greeting is complete (what bots do): PREGREET."""
        mark = self.log_size()
        with self.raw(ns, family, 25) as c:
            c.send(b"EHLO pregreet.example\r\n")
            return self.wait_for(rf"postscreen\[\d+\]: PREGREET \d+ after \S+ from {self._ps(ns, family)}",
                                 since=mark)[0]

    def postscreen_non_smtp(self, ns: str, family: int, command: str = "GET / HTTP/1.0") -> str:
        """An HTTP request to postscreen's port 25: NON-SMTP COMMAND (deep protocol test)."""
        return self._postscreen_after_greeting(
            ns, family, [command.encode() + b"\r\n"], r"NON-SMTP COMMAND from {who}")

    def postscreen_pipelining(self, ns: str, family: int) -> str:
        """MAIL and RCPT in one write though postscreen announced no PIPELINING: COMMAND PIPELINING."""
        return self._postscreen_after_greeting(
            ns, family,
            [b"EHLO pipeline.example\r\n", b"MAIL FROM:<a@pipeline.example>\r\nRCPT TO:<x@example.org>\r\n"],
            r"COMMAND PIPELINING from {who}")

    def postscreen_bare_newline(self, ns: str, family: int) -> str:
        """A command ended by LF alone: BARE NEWLINE (deep protocol test)."""
        return self._postscreen_after_greeting(
            ns, family, [b"EHLO newline.example\n"], r"BARE NEWLINE from {who}")

    def _postscreen_after_greeting(self, ns: str, family: int, writes: list[bytes], expect: str) -> str:
        mark = self.log_size()
        pattern = r"postscreen\[\d+\]: " + expect.format(who=self._ps(ns, family))
        with self.raw(ns, family, 25) as c:
            c.reply()  # the whole greeting, after greet_wait
            for i, data in enumerate(writes):
                c.send(data)
                if i < len(writes) - 1:
                    c.reply()
            return self.wait_for(pattern, since=mark)[0]

    def relay_attempt(
        self, ns: str, family: int, port: int = 25, helo: str = HELO_NAME,
        sender: str = "spam@outside.test", rcpt: str = "victim@elsewhere.test",
    ) -> str:
        """RCPT to a foreign domain without AUTH: 554 Relay access denied.

        Port 25 needs pass_postscreen() first. helo/sender/rcpt are sent verbatim (quote a local
        part that holds spaces), so they can carry injection attempts.
        """
        mark = self.log_size()
        with self.raw(ns, family, port) as c:
            c.reply()
            c.command(f"EHLO {helo}")
            c.command(f"MAIL FROM:<{sender}>")
            code, text = c.command(f"RCPT TO:<{rcpt}>")
            if code != 554:
                raise LabError(f"relay attempt should get 554, got {code} {text}")
            c.command("QUIT")
        return self.wait_for(rf"\[\d+\]: \w+: reject: RCPT from {self._smtpd(ns, family)}: 554 .*Relay access denied",
                             since=mark)[0]

    def unknown_recipients(self, ns: str, family: int, names: list[str], port: int = 25) -> list[str]:
        """RCPT to local parts that do not exist (directory harvest): one 550 line each."""
        mark = self.log_size()
        with self.smtp(ns, family, port) as s:
            s.ehlo()
            s.mail("harvest@outside.test")
            for name in names:
                code, text = s.rcpt(f"{name}@{MX_DOMAIN}")
                if code != 550:
                    raise LabError(f"RCPT {name}: expected 550, got {code} {text!r}")
        return self.wait_for(rf"reject: RCPT from {self._smtpd(ns, family)}: 550 .*User unknown",
                             since=mark, count=len(names))

    def lost_connection(self, ns: str, family: int, after: str = "CONNECT", port: int = 25) -> str:
        """Connect, optionally EHLO (after="EHLO"), then hang up: "lost connection after ..."."""
        mark = self.log_size()
        with self.raw(ns, family, port) as c:
            c.reply()
            if after == "EHLO":
                c.command("EHLO lost.example")
        return self.wait_for(rf"smtpd\[\d+\]: lost connection after {after} from {self._smtpd(ns, family)}",
                             since=mark)[0]

    def smtpd_pipelining(self, ns: str, family: int, port: int = 587) -> str:
        """Commands sent before smtpd's greeting: "improper command pipelining after CONNECT".

        Port 587 has smtpd without postscreen in front (on 25, postscreen would see a PREGREET).
        """
        mark = self.log_size()
        with self.raw(ns, family, port) as c:
            c.send(b"EHLO early.example\r\nMAIL FROM:<a@early.example>\r\nRCPT TO:<x@elsewhere.test>\r\n")
            # Greeting, EHLO, MAIL, RCPT replies; Postfix 3.9 (smtpd_forbid_unauth_pipelining=yes)
            # hangs up after the greeting instead.
            with contextlib.suppress(ConnectionError):
                for _ in range(4):
                    c.reply()
        return self.wait_for(rf"smtpd\[\d+\]: improper command pipelining after CONNECT from "
                             rf"{self._smtpd(ns, family)}", since=mark)[0]

    def auth_failures(self, ns: str, family: int, attempts: list[tuple[str, str]], port: int = 587) -> list[str]:
        """AUTH PLAIN with each (user, password) in one session; every one must fail (535).

        Returns the "SASL ... authentication failed" lines. Dovecot adds a per-address delay
        after the first failure (a few seconds), so keep the list short.
        """
        mark = self.log_size()
        with self.smtp(ns, family, port, timeout=30.0) as s:  # outlasts Dovecot's penalty (<= 15 s)
            s.ehlo()
            for user, password in attempts:
                s.user, s.password = user, password
                try:
                    s.auth("PLAIN", s.auth_plain)
                except smtplib.SMTPAuthenticationError as e:
                    if e.smtp_code != 535:
                        raise
                else:
                    raise LabError(f"AUTH as {user!r} should have failed")
        return self.wait_for(rf"warning: {self._smtpd(ns, family)}: SASL PLAIN authentication failed",
                             since=mark, count=len(attempts))

    def send_mail(
        self, ns: str, family: int, rcpt: str, port: int = 25, login: tuple[str, str] | None = None,
        sender: str = "someone@example.net",
    ) -> str:
        """Deliver one message (port 25 needs pass_postscreen() first); the smtpd `client=` line."""
        mark = self.log_size()
        msg = f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: lab\r\n\r\nHello from the lab.\r\n"
        with self.smtp(ns, family, port) as s:
            if login:
                s.ehlo()
                s.login(*login)
            refused = s.sendmail(sender, [rcpt], msg.encode())
            if refused:
                raise LabError(f"message to {rcpt} refused: {refused}")
        return self.wait_for(rf"smtpd\[\d+\]: \w+: client={self._smtpd(ns, family)}", since=mark)[0]

    def _ps(self, ns: str, family: int) -> str:
        """How postscreen writes this client: [addr]:port."""
        return rf"\[{re.escape(self.addr(ns, family))}\]:\d+"

    def _smtpd(self, ns: str, family: int) -> str:
        """How smtpd writes this client without reverse DNS: unknown[addr]."""
        return rf"unknown\[{re.escape(self.addr(ns, family))}\]"

    # -- the log

    def log_size(self) -> int:
        """A mark for wait_for(since=...): the maillog's current size in bytes."""
        try:
            return self.maillog.stat().st_size
        except FileNotFoundError:
            return 0

    def log_lines(self, since: int = 0) -> list[str]:
        """The maillog's lines from byte offset `since` on."""
        try:
            with self.maillog.open("rb") as f:
                f.seek(since)
                return f.read().decode("utf-8", "replace").splitlines()
        except FileNotFoundError:
            return []

    def wait_for(self, pattern: str, timeout: float = WAIT, since: int = 0, count: int = 1) -> list[str]:
        """The first `count` maillog lines (after byte offset `since`) that match regex `pattern`.

        Polls until they are there or `timeout` seconds pass (then LabError with the log's tail).
        """
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = [ln for ln in self.log_lines(since) if rx.search(ln)]
            if len(found) >= count:
                return found[:count]
            if time.monotonic() > deadline:
                tail = "\n".join(self.log_lines()[-15:])
                raise LabError(f"{len(found)} of {count} maillog line(s) matching {pattern!r} after "
                               f"{timeout}s; log tail:\n{tail}")
            time.sleep(0.05)

    def ns_exec(self, ns: str, argv: list[str], timeout: float = 30.0, output: Path | None = None) -> str:
        """Run a command inside a namespace (e.g. nft for a ban); stdout, or LabError.

        Pass `output` (a file) for commands that start a daemon; see _run.
        """
        return _run(["ip", "netns", "exec", ns, *argv], timeout, output)

    # -- namespaces

    def _make_namespaces(self) -> None:
        for ns in (self.server_ns, self.attacker_ns, self.client_ns):
            _run(["ip", "netns", "add", ns])
            self._made_ns.append(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        s = self.server_ns
        _run(["ip", "-n", s, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"])
        _run(["ip", "-n", s, "addr", "add", f"{SERVER.addr4}/24", "dev", "br0"])
        # nodad: usable at once (no tentative phase), so Postfix can bind it right away.
        _run(["ip", "-n", s, "addr", "add", f"{SERVER.addr6}/64", "dev", "br0", "nodad"])
        _run(["ip", "-n", s, "link", "set", "br0", "up"])
        for ns, port in ((self.attacker_ns, "v-bad"), (self.client_ns, "v-ok")):
            h = self.hosts[ns]
            _run(["ip", "-n", s, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns])
            _run(["ip", "-n", s, "link", "set", port, "master", "br0", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{h.addr4}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "addr", "add", f"{h.addr6}/64", "dev", "eth0", "nodad"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            # All prefixes share the one bridge: on-link routes both ways, no router needed.
            _run(["ip", "-n", ns, "route", "add", SERVER.prefix4, "dev", "eth0"])
            _run(["ip", "-n", ns, "-6", "route", "add", SERVER.prefix6, "dev", "eth0"])
            _run(["ip", "-n", s, "route", "add", h.prefix4, "dev", "br0"])
            _run(["ip", "-n", s, "-6", "route", "add", h.prefix6, "dev", "br0"])

    def _end_leftovers(self) -> None:
        """Wait for every process in the server namespace to exit; SIGKILL the stragglers by PID.

        Only Postfix and Dovecot, which this lab started, ever run in that namespace.
        """
        if self.server_ns not in self._made_ns:
            return
        deadline = time.monotonic() + 10
        while pids := self._ns_pids(self.server_ns):
            if time.monotonic() > deadline:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                raise LabError(f"killed processes left in {self.server_ns}: {pids}")
            time.sleep(0.05)

    @staticmethod
    def _ns_pids(ns: str) -> list[int]:
        return [int(p) for p in _run(["ip", "netns", "pids", ns]).split() if _alive(int(p))]

    def _delete_namespaces(self) -> None:
        while self._made_ns:
            _run(["ip", "netns", "del", self._made_ns[-1]])
            self._made_ns.pop()

    # -- Postfix

    def _main_cf(self) -> dict[str, str]:
        cf = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.log_dir),
            "myhostname": MX_HOSTNAME,
            "mydomain": MX_DOMAIN,
            "myorigin": "$mydomain",
            "mydestination": f"{MX_DOMAIN}, $myhostname",
            "inet_interfaces": f"{SERVER.addr4}, [{SERVER.addr6}]",
            "inet_protocols": "ipv4, ipv6",
            "mynetworks": "127.0.0.0/8 [::1]/128",
            "local_recipient_maps": f"hash:{self.config_dir}/users",
            "alias_maps": "",
            "alias_database": "",
            # Accepted mail is thrown away: nothing leaves the lab or lands in /var/mail.
            "local_transport": "discard:local",
            "default_transport": "discard:remote",
            "relayhost": "",
            "biff": "no",
            "smtpd_banner": "$myhostname ESMTP",
            "smtpd_peername_lookup": "no",  # documentation addresses have no PTR: "unknown[addr]"
            "smtpd_relay_restrictions":
                "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination",
            "smtpd_error_sleep_time": "0",
            "smtpd_tls_security_level": "none",
            "smtpd_tls_auth_only": "no",
            "smtpd_sasl_auth_enable": "no",  # only on submission (master.cf)
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": "private/auth",
            "postscreen_greet_wait": f"{self.greet_wait}s",
            "postscreen_greet_action": "enforce",
            "postscreen_dnsbl_sites": "",
            "postscreen_pipelining_enable": "yes",
            "postscreen_pipelining_action": "enforce",
            "postscreen_non_smtp_command_enable": "yes",
            "postscreen_non_smtp_command_action": "enforce",
            "postscreen_bare_newline_enable": "yes",
            "postscreen_bare_newline_action": "enforce",
        }
        cf.update(self.extra_main_cf)
        return cf

    def _master_cf(self) -> str:
        # chroot column "n": a private instance has no chroot tree to keep in sync.
        sasl = "yes" if self.sasl else "no"
        return f"""\
smtp       inet  n - n - 1 postscreen
smtpd      pass  - - n - - smtpd
dnsblog    unix  - - n - 0 dnsblog
tlsproxy   unix  - - n - 0 tlsproxy
submission inet  n - n - - smtpd
  -o syslog_name=postfix/submission
  -o smtpd_sasl_auth_enable={sasl}
  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject_unauth_destination
pickup     unix  n - n 60 1 pickup
cleanup    unix  n - n - 0 cleanup
qmgr       unix  n - n 300 1 qmgr
rewrite    unix  - - n - - trivial-rewrite
bounce     unix  - - n - 0 bounce
defer      unix  - - n - 0 bounce
trace      unix  - - n - 0 bounce
verify     unix  - - n - 1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n - - proxymap
smtp       unix  - - n - - smtp
relay      unix  - - n - - smtp
showq      unix  n - n - - showq
error      unix  - - n - - error
retry      unix  - - n - - error
discard    unix  - - n - - discard
local      unix  - n n - - local
anvil      unix  - - n - 1 anvil
scache     unix  - - n - 1 scache
postlog    unix-dgram n - n - 1 postlogd
"""

    def _write_postfix_config(self) -> None:
        for d in (self.config_dir, self.log_dir, self.queue_dir):  # Postfix makes the rest
            d.mkdir(parents=True, exist_ok=True)
        (self.config_dir / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in self._main_cf().items()))
        (self.config_dir / "master.cf").write_text(self._master_cf())
        users = self.config_dir / "users"
        users.write_text("".join(f"{u}@{MX_DOMAIN} ok\n" for u in self.local_users))
        # Inside the namespace: Postfix commands check that inet_interfaces are local addresses.
        self.ns_exec(self.server_ns, ["postmap", "-c", str(self.config_dir), f"hash:{users}"])

    def _postfix(self, *args: str, timeout: float = 60.0) -> str:
        argv = ["postfix", "-c", str(self.config_dir), *args]
        return self.ns_exec(self.server_ns, argv, timeout, self.log_dir / "postfix-command.out")

    def _start_postfix(self) -> None:
        self._postfix_started = True  # before the command: a failed start may leave a master behind
        # `start` waits for master's initialisation (master -w): listeners are bound when it returns.
        self._postfix("start")
        self.wait_for(r"postfix/master\[\d+\]: daemon started")

    def master_pid(self) -> int | None:
        return _read_pid(self.queue_dir / "pid" / "master.pid")

    def _stop_postfix(self) -> None:
        if not self._postfix_started:
            return
        self._postfix_started = False
        pid = self.master_pid()
        if pid is None or not _alive(pid):
            return
        try:
            self._postfix("stop")  # SIGTERM to master, which ends its children; waits up to 5 s
        finally:
            _wait_gone(pid, 10.0)

    # -- Dovecot (SASL for Postfix)

    def _dovecot_config(self) -> str:
        d = self.dovecot_dir
        return f"""\
protocols =
base_dir = {d}/run
state_dir = {d}/state
log_path = {self.dovecot_log}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
auth_verbose = yes
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/passwd
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}}
service auth {{
  unix_listener {self.queue_dir}/private/auth {{
    mode = 0660
    user = postfix
    group = postfix
  }}
}}
"""

    def _start_dovecot(self) -> None:
        d = self.dovecot_dir
        (d / "run").mkdir(parents=True, exist_ok=True)
        (d / "state").mkdir(exist_ok=True)
        passwd = d / "passwd"
        passwd.write_text(f"{self.sasl_user}:{{PLAIN}}{self.sasl_password}\n")
        shutil.chown(passwd, "dovecot", "dovecot")  # read by the unprivileged auth process
        passwd.chmod(0o640)
        conf = d / "dovecot.conf"
        conf.write_text(self._dovecot_config())
        # In the foreground (-F) as our own child: we hold its PID and reap it; `ip netns exec`
        # execs dovecot, so the child's PID is Dovecot's master.
        with (d / "dovecot.out").open("ab") as out:
            self._dovecot = subprocess.Popen(
                ["ip", "netns", "exec", self.server_ns, "dovecot", "-F", "-c", str(conf)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        sock = self.queue_dir / "private" / "auth"
        deadline = time.monotonic() + WAIT
        while not sock.exists():
            if self._dovecot.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"dovecot made no {sock} (exit status {self._dovecot.returncode}); "
                               f"log:\n{_tail(self.dovecot_log)}\n{_tail(d / 'dovecot.out')}")
            time.sleep(0.05)

    def dovecot_pid(self) -> int | None:
        return self._dovecot.pid if self._dovecot and self._dovecot.poll() is None else None

    def _stop_dovecot(self) -> None:
        proc, self._dovecot = self._dovecot, None
        if proc is None:
            return
        proc.terminate()  # SIGTERM: Dovecot's documented stop; its master ends its children
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def _tail(path: Path, n: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no file)"


def _wait_gone(pid: int, timeout: float) -> None:
    """Wait for process `pid` to exit; past the deadline SIGKILL it."""
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie: daemons are re-parented to PID 1, which may reap late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(") ", 1)[1][:1] != "Z"


@contextlib.contextmanager
def postfix_lab(base: Path, **kwargs: Any) -> Iterator[PostfixLab]:
    """Function form of `with PostfixLab(base, ...) as lab` (handy in pytest fixtures)."""
    with PostfixLab(base, **kwargs) as lab:
        yield lab
