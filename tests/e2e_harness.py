"""The whole chain under real attack, shared by tests/test_e2e.py and scripts/demo.py.

`Guarded` owns, for a `with` block: a PostfixLab (real Postfix MX with postscreen on 25 and Dovecot
SASL on 587, an attacker and a legitimate client namespace; tests/postfix_harness.py) and
`relayguard run` inside the MX namespace with nftables, reading Postfix's log. The attacker
namespace gets one address pair (IPv4, IPv6) per attack, so every bot is a separate client that
relayguard must find and ban on its own:

    with Guarded(tmp) as g:
        g.relay_burst(g.bots["relay"][0])          # 2 RCPTs to foreign domains: 554 Relay access denied
        g.wait_banned(g.bots["relay"][0])
        g.reachable(g.bots["relay"][0])            # False: the kernel drops everything from it now
        print(g.cli("why", g.bots["relay"][0]))

The attacks speak SMTP from their own source address inside the attacker namespace (smtplib or raw
bytes) and wait for the line Postfix logs about them, as PostfixLab's helpers do. A ban may land in
the middle of a bot's session (that is the point), so after the last counted command a bot does not
wait for more than a short read timeout. Everything started here is stopped here.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from daemon_harness import DaemonProc, private_dir, write_config
from postfix_harness import HELO_NAME, MX_DOMAIN, PostfixLab, RawSMTP, in_netns

# One (IPv4, IPv6) pair per bot, on the attacker's link (203.0.113.0/24, 2001:db8:66::/64).
BOTS = {
    "relay": ("203.0.113.70", "2001:db8:66::70"),
    "harvest": ("203.0.113.71", "2001:db8:66::71"),
    "auth": ("203.0.113.72", "2001:db8:66::72"),
    "pregreet": ("203.0.113.73", "2001:db8:66::73"),
    "expiry": ("203.0.113.74", "2001:db8:66::74"),
}
HARVEST = ["info", "sales", "admin", "office", "contact"]  # 5 distinct unknown recipients: 5 x 2
# 3 user names x 3, and the session's auth=0/3 disconnect 2. More in one session do not add up: Dovecot's
# failure penalty (2 s, 4 s, 8 s, ...) soon outlasts Postfix's wait for it ("Connection lost to authentication
# server", which counts for nobody).
PASSWORDS = [("admin", "123456"), ("test", "password"), ("info", "qwerty")]
BOT_TIMEOUT = 5.0  # how long a bot waits for a reply once it may already be banned
PROBE_PORT = 9  # closed on the MX: a reset says "reachable" without a word to Postfix


class SrcSMTP(smtplib.SMTP):
    """smtplib.SMTP connecting from `src` inside network namespace `ns`."""

    def __init__(self, ns: str, src: str, host: str, port: int, timeout: float = 30.0) -> None:
        self._ns, self._src = ns, src
        super().__init__(host, port, local_hostname=HELO_NAME, timeout=timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return in_netns(self._ns, lambda: socket.create_connection((host, port), timeout, (self._src, 0)))


class Guarded:
    """PostfixLab + relayguard (nftables) in the MX namespace; see the module docstring."""

    def __init__(self, base: Path, ban: str = "1h", greet_wait: int = 2) -> None:
        # A ban cuts bots off mid-session: their last packets never arrive, and Postfix would wait for
        # them 300 s by default, outliving the lab's stop. Real servers lower these too.
        self.lab = PostfixLab(base, sasl=True, greet_wait=greet_wait,
                              main_cf={"smtpd_timeout": "10s", "postscreen_command_time_limit": "10s"})
        self.ban = ban
        self.bots = BOTS
        self.root: Path | None = None
        self.daemon: DaemonProc | None = None

    # -- lifecycle
    def __enter__(self) -> Self:
        self.lab.__enter__()
        try:
            for v4, v6 in BOTS.values():
                self.lab.ns_exec(self.lab.attacker_ns, ["ip", "addr", "add", f"{v4}/24", "dev", "eth0"])
                self.lab.ns_exec(self.lab.attacker_ns, ["ip", "addr", "add", f"{v6}/64", "dev", "eth0", "nodad"])
            self.root = private_dir("e2e")
            self.config = write_config(self.root, firewall="nftables", log=self.lab.maillog,
                                       scoring=f'ban = "{self.ban}"\n')
            self.daemon = DaemonProc(self.config, ns=self.lab.server_ns)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if self.daemon is not None:
                # Bans outlive the daemon by design. Lift them first: a bot's session cut by a ban
                # leaves an smtpd waiting for packets the kernel drops, and Postfix's stop waits for it.
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    self.cli("flush")
                self.daemon.stop()
                with contextlib.suppress(Exception):  # gone already after the flush, normally
                    self.lab.ns_exec(self.lab.server_ns, ["nft", "delete", "table", "inet", "relayguard"])
        finally:
            try:
                self.lab.__exit__(et, ev, tb)
            finally:
                if self.root is not None:
                    shutil.rmtree(self.root, ignore_errors=True)

    @property
    def socket(self) -> str:
        assert self.daemon is not None
        return self.daemon.socket

    # -- who is who
    def ns_of(self, addr: str) -> str:
        if addr in (self.lab.client_addr4, self.lab.client_addr6):
            return self.lab.client_ns
        return self.lab.attacker_ns

    def mx(self, addr: str) -> str:
        return self.lab.mx_addr6 if ":" in addr else self.lab.mx_addr4

    def connect(self, src: str, port: int = 25, timeout: float = 10.0) -> socket.socket:
        return in_netns(self.ns_of(src), lambda: socket.create_connection((self.mx(src), port), timeout, (src, 0)))

    def smtp(self, src: str, port: int, timeout: float = 30.0) -> SrcSMTP:
        return SrcSMTP(self.ns_of(src), src, self.mx(src), port, timeout)

    def reachable(self, src: str, port: int = PROBE_PORT, timeout: float = 2.0) -> bool:
        """Whether the MX answers src at all (False once the firewall drops it).

        By default on a closed port: an answer is a TCP reset, Postfix never sees the probe, and
        so the probe is no event against src (a connection to 25 that hangs up is one).
        """
        try:
            self.connect(src, port, timeout).close()
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
        return True

    def smtp_works(self, src: str) -> bool:
        """A full SMTP session from src on 587 (EHLO, QUIT): Postfix counts nothing against it."""
        try:
            with self.smtp(src, 587, timeout=BOT_TIMEOUT) as s:
                return s.ehlo()[0] == 250
        except (OSError, smtplib.SMTPException):
            return False

    # -- what Postfix logs about a client
    @staticmethod
    def _smtpd(src: str) -> str:
        return rf"unknown\[{re.escape(src)}\]"

    @staticmethod
    def _ps(src: str) -> str:
        return rf"\[{re.escape(src)}\]:\d+"

    # -- the bots
    def pass_postscreen(self, src: str) -> None:
        """Behave once, so postscreen hands this client to smtpd from now on (PASS NEW)."""
        mark = self.lab.log_size()
        with RawSMTP(self.connect(src, 25), 30.0) as c:
            c.reply()
            c.command(f"EHLO {HELO_NAME}")
            c.command("MAIL FROM:<probe@example.net>")
            code, text = c.command(f"RCPT TO:<alice@{MX_DOMAIN}>")
            if code != 450:
                raise RuntimeError(f"postscreen should defer a new client at RCPT, said {code} {text}")
            c.command("QUIT")
        self.lab.wait_for(rf"postscreen\[\d+\]: PASS NEW {self._ps(src)}", since=mark)

    def relay_burst(self, src: str, rcpts: tuple[str, ...] = ("a@victim.test", "b@victim.test")) -> list[str]:
        """Port 25 past postscreen, then RCPT to foreign domains without AUTH: 554 Relay access denied."""
        self.pass_postscreen(src)
        mark = self.lab.log_size()
        with RawSMTP(self.connect(src, 25), 30.0) as c:
            c.reply()
            c.command("EHLO spam.example")
            c.command("MAIL FROM:<spam@spam.example>")
            for i, rcpt in enumerate(rcpts):
                if i == len(rcpts) - 1:
                    c.sock.settimeout(BOT_TIMEOUT)
                with contextlib.suppress(OSError):
                    c.command(f"RCPT TO:<{rcpt}>")
        return self.lab.wait_for(rf"reject: RCPT from {self._smtpd(src)}: 554 .*Relay access denied",
                                 since=mark, count=len(rcpts))

    def harvest(self, src: str, names: list[str] = HARVEST, port: int = 587) -> list[str]:
        """RCPT to local parts that do not exist (directory harvest): 550 User unknown."""
        mark = self.lab.log_size()
        with contextlib.suppress(OSError, smtplib.SMTPException), self.smtp(src, port) as s:
            s.ehlo()
            s.mail("harvest@spam.example")
            for i, name in enumerate(names):
                if i == len(names) - 1:
                    s.sock.settimeout(BOT_TIMEOUT)
                s.rcpt(f"{name}@{MX_DOMAIN}")
        return self.lab.wait_for(rf"reject: RCPT from {self._smtpd(src)}: 550 .*User unknown",
                                 since=mark, count=len(names))

    def auth_brute_force(self, src: str, attempts: list[tuple[str, str]] = PASSWORDS) -> list[str]:
        """AUTH PLAIN against Dovecot SASL on 587, one session; every attempt fails (535)."""
        mark = self.lab.log_size()
        with contextlib.suppress(OSError, smtplib.SMTPException), self.smtp(src, 587, timeout=30.0) as s:
            s.ehlo()
            for i, (user, password) in enumerate(attempts):
                if i == len(attempts) - 1:
                    s.sock.settimeout(BOT_TIMEOUT + 15)  # Dovecot's failure penalty comes first
                s.user, s.password = user, password
                with contextlib.suppress(smtplib.SMTPAuthenticationError):
                    s.auth("PLAIN", s.auth_plain)
        return self.lab.wait_for(rf"warning: {self._smtpd(src)}: SASL PLAIN authentication failed",
                                 since=mark, count=len(attempts))

    def pregreet(self, src: str, times: int = 2) -> list[str]:
        """Talk before postscreen's greeting is complete, as bots do: PREGREET."""
        mark = self.lab.log_size()
        for _ in range(times):
            try:
                sock = self.connect(src, 25, BOT_TIMEOUT)
            except OSError:
                break  # banned already
            with RawSMTP(sock, BOT_TIMEOUT) as c:
                c.send(b"EHLO pregreet.example\r\n")
                self.lab.wait_for(rf"postscreen\[\d+\]: PREGREET \d+ after \S+ from {self._ps(src)}", since=mark)
            mark = self.lab.log_size()
        return self.lab.log_lines()

    def legit_mail(self, src: str) -> list[str]:
        """What a real user does: mail to a local user on 25, one typo'd recipient, then submission
        with AUTH (Dovecot) to an outside address. Returns the `status=sent` lines."""
        self.pass_postscreen(src)
        mark = self.lab.log_size()
        with self.smtp(src, 25) as s:
            local = _send(s, "bob@example.net", f"alice@{MX_DOMAIN}")
        with self.smtp(src, 25) as s:
            s.ehlo()
            s.mail("bob@example.net")
            code, _ = s.rcpt(f"alcie@{MX_DOMAIN}")  # a typo: one unknown recipient
            if code != 550:
                raise RuntimeError(f"typo recipient: expected 550, got {code}")
        with self.smtp(src, 587) as s:
            s.ehlo()
            s.login(self.lab.sasl_user, self.lab.sasl_password)
            relayed = _send(s, f"{self.lab.sasl_user}@{MX_DOMAIN}", "friend@elsewhere.test")
        return [self.lab.wait_for(rf"\b{qid}: to=<.*status=sent", since=mark)[0] for qid in (local, relayed)]

    # -- relayguard
    def cli(self, *args: str, check: bool = True) -> str:
        argv = [sys.executable, "-m", "relayguard", *args, "--socket", self.socket]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if check and p.returncode != 0:
            raise RuntimeError(f"relayguard {' '.join(args)} exited {p.returncode}: {p.stderr.strip()}")
        return p.stdout

    def bans(self) -> dict[str, dict[str, Any]]:
        return {b["ip"]: b for b in (json.loads(ln) for ln in self.cli("list", "--json").splitlines() if ln)}

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("status", "--json"))

    def wait_banned(self, addr: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (ban := self.bans().get(addr)) is None:
            if time.monotonic() > deadline:
                assert self.daemon is not None
                raise AssertionError(f"{addr} not banned within {timeout}s; bans {list(self.bans())}; "
                                     f"daemon log:\n{self.daemon.log_tail()}")
            time.sleep(0.1)
        return ban

    def wait_unbanned(self, addr: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while addr in self.bans() or self._in_kernel(addr):
            if time.monotonic() > deadline:
                raise AssertionError(f"{addr} still banned after {timeout}s")
            time.sleep(0.2)

    def _in_kernel(self, addr: str) -> bool:
        out = self.lab.ns_exec(self.lab.server_ns, ["nft", "-j", "list", "set", "inet", "relayguard",
                                                    "banned6" if ":" in addr else "banned4"])
        return addr in out

    def reload(self, **scoring: str) -> None:
        """New [scoring] values, then `relayguard reload`."""
        assert self.root is not None
        body = "".join(f'{k} = "{v}"\n' for k, v in scoring.items())
        write_config(self.root, firewall="nftables", log=self.lab.maillog, scoring=body)
        self.cli("reload")


def _send(s: smtplib.SMTP, sender: str, rcpt: str) -> str:
    """One message, step by step so that the queue ID in the reply to DATA can be followed in the log."""
    s.ehlo_or_helo_if_needed()
    for code, text in (s.mail(sender), s.rcpt(rcpt)):
        if code != 250:
            raise RuntimeError(f"{sender} -> {rcpt}: {code} {text!r}")
    code, text = s.data(f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: hello\r\n\r\nLunch?\r\n".encode())
    m = re.search(rb"queued as (\w+)", text)
    if code != 250 or m is None:
        raise RuntimeError(f"{sender} -> {rcpt}: DATA said {code} {text!r}")
    return m.group(1).decode()
