"""Helpers for the stress suite (tests/test_stress.py): the real daemon as a process, log lines, kernel state,
memory, and the figures each stress test records for docs/reliability.md.

`Figures` collects what a test measured; when RELAYGUARD_FIGURES names a directory (scripts/reliability.sh
sets it) they are written there as `<test>.json` for scripts/reliability.py to render. `Daemon` runs
`relayguard run` (optionally inside a network namespace and behind a prefix such as `unshare --mount ...`)
with its JSON log events in a file, read incrementally, so a test can wait on an event without sleeping.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any

from daemon_harness import nft_elements

from relayguard import control
from relayguard.model import parse_net

FIGURES_ENV = "RELAYGUARD_FIGURES"


class Figures(dict[str, Any]):
    """One test's measured figures; `save()` writes them when RELAYGUARD_FIGURES is set."""

    def __init__(self, test: str) -> None:
        super().__init__()
        self.test = test

    def save(self) -> Path | None:
        """Written whatever the outcome (JUnit XML says that); a failed test leaves what it measured so far."""
        where = os.environ.get(FIGURES_ENV)
        if not where:
            return None
        path = Path(where) / f"{self.test}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"test": self.test, "figures": dict(self)}, indent=1, default=str))
        return path


# ----------------------------------------------------------------------------------------- log lines


def stamp(when: float | None = None) -> str:
    """Classic syslog time (the daemon runs with TZ=UTC)."""
    return time.strftime("%b %d %H:%M:%S", time.gmtime(time.time() if when is None else when))


def relay_denied(addr: str, n: int, when: float | None = None) -> str:
    """postfix/relay-denied, weight 5: two of them ban (threshold 10)."""
    return (f"{stamp(when)} mx postfix/smtpd[{2000 + n % 1000}]: NOQUEUE: reject: RCPT from unknown[{addr}]:"
            f"{40000 + n % 20000}: 554 5.7.1 <v{n}@example.net>: Relay access denied; from=<s@example.org> "
            f"to=<v{n}@example.net> proto=ESMTP helo=<bot>\n")


def no_commands(addr: str, when: float | None = None) -> str:
    """postfix/no-commands-disconnect, weight 1: the weakest event there is."""
    return f"{stamp(when)} mx postfix/smtpd[42]: disconnect from unknown[{addr}] commands=0/0\n"


def noise(i: int, when: float | None = None) -> str:
    return f"{stamp(when)} mx postfix/qmgr[7]: {i:010X}: removed\n"


def flood_addr(i: int) -> str:
    """The i-th distinct address of a flood (2001:db8::/32, documentation space)."""
    return f"2001:db8:{i >> 16:x}::{i & 0xFFFF:x}"


# ----------------------------------------------------------------------------------------- config


def write_config(root: Path, log: Path | None, *, firewall: str = "dry-run", socket: bool = True,
                 state_dir: Path | None = None, scoring: dict[str, Any] | None = None,
                 start: str = "beginning", socket_group: str = "root") -> Path:
    sc = {"ignore_self": False, **(scoring or {})}
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in sc.items())
    sock = f"{root}/run/relayguard.sock" if socket else ""
    text = f"""[daemon]
state_dir = "{state_dir or root / 'state'}"
socket = "{sock}"
socket_group = "{socket_group}"
firewall = "{firewall}"
log_format = "json"
log_level = "info"
[scoring]
{body}
"""
    if log is not None:
        text += f'[[source]]\npath = "{log}"\nrules = ["postfix"]\nstart = "{start}"\n'
    cfg = root / "relayguard.toml"
    cfg.write_text(text)
    return cfg


# ----------------------------------------------------------------------------------------- the daemon


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies, so a killed test run (a CI timeout)
    leaves no daemon behind. prctl(PR_SET_PDEATHSIG) survives the exec of ip, unshare, nsenter, setpriv."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


class Daemon:
    """`relayguard run --config F` as a process; stderr (JSON events) goes to a file read incrementally."""

    def __init__(self, config: Path, ns: str | None = None, prefix: Iterable[str] = (),
                 log_path: Path | None = None) -> None:
        self.config = config
        self.ns = ns
        self.socket = str(config.parent / "run" / "relayguard.sock")
        self.log_path = log_path or config.parent / "daemon.log"
        argv = [*prefix, sys.executable, "-m", "relayguard", "run", "--config", str(config)]
        if ns is not None:
            argv = ["ip", "netns", "exec", ns, *argv]  # ip, unshare and sh all exec: the PID is the daemon's
        self._out = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()/kill()
        self._read_at = self.log_path.stat().st_size
        self._events: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self._out, preexec_fn=_die_with_parent,
                                     env={**os.environ, "TZ": "UTC", "PYTHONUNBUFFERED": "1"})
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _refresh(self) -> list[dict[str, Any]]:
        with open(self.log_path, "rb") as fh:
            fh.seek(self._read_at)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        self._read_at += end
        for line in data[:end].splitlines():
            with suppress(ValueError):
                ev = json.loads(line)
                if isinstance(ev, dict):
                    self._events.append(ev)
        return self._events

    def events(self, name: str, pred: Callable[[dict[str, Any]], bool] = lambda e: True) -> list[dict[str, Any]]:
        return [e for e in self._refresh() if e.get("event") == name and pred(e)]

    def wait_ready(self) -> None:
        """READY logged and the control socket there: the daemon takes requests."""
        self.wait_for("daemon_ready")
        wait_until(lambda: os.path.exists(self.socket), what="control socket")

    def wait_for(self, name: str, pred: Callable[[dict[str, Any]], bool] = lambda e: True,
                 timeout: float = 60.0, count: int = 1) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(name, pred)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"no {count}x {name} within {timeout}s (exit {self.proc.poll()}); log:\n"
                                     f"{self.tail()}")
            time.sleep(0.05)

    def tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def request(self, cmd: str, timeout: float = 120, **args: Any) -> Any:
        return control.request(self.socket, cmd, timeout=timeout, **args)

    def status(self, key: str) -> int:
        """A field of /proc/PID/status in bytes (VmRSS now, VmHWM the peak)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def rss(self) -> int:
        return self.status("VmRSS")

    def kill(self) -> None:
        """SIGKILL, by PID (our own child)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._out.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()
        return self.proc.returncode


def wait_until(cond: Callable[[], Any], timeout: float = 60.0, what: str = "condition", every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


# ----------------------------------------------------------------------------------------- kernel state


def set_size(ns: str, name: str) -> int:
    return len(nft_elements(ns, name))


def chain_rules(ns: str) -> list[str]:
    """The rules of relayguard's input chain as nft prints them."""
    out = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "chain", "inet", "relayguard", "input"],
                         capture_output=True, text=True, check=False, timeout=60).stdout
    return [ln.strip() for ln in out.splitlines() if "saddr" in ln]


def nft(ns: str, *argv: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", *argv], check=True, capture_output=True, text=True, timeout=60)


def db_active_bans(db: Path) -> set[str]:
    """Active bans in the database file, as canonical text, read with plain sqlite3 (read-only)."""
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = con.execute("SELECT net FROM bans WHERE active = 1 AND (expires_at IS NULL OR expires_at > ?)",
                           (time.time(),)).fetchall()
    finally:
        con.close()
    return {str(parse_net(r[0])).removesuffix("/32").removesuffix("/128") for r in rows}


def db_query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()
