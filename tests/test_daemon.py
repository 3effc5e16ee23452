"""The daemon with real parts: `relayguard run` as a process, real log files, a real SQLite file, and
nftables/iptables inside network namespaces made (and deleted) by each test, with real TCP traffic.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import netns
import pytest
from daemon_harness import nft_bans

from relayguard.model import parse_net
from relayguard.store import Store

PORT = 2525


def pregreet(addr: str, when: float | None = None) -> str:
    ts = time.strftime("%b %d %H:%M:%S", time.gmtime(when or time.time()))
    return f"{ts} mx postfix/postscreen[99]: PREGREET 11 after 0.1 from [{addr}]:4711: EHLO x\\r\\n\n"


def noise(i: int) -> str:
    ts = time.strftime("%b %d %H:%M:%S", time.gmtime())
    return f"{ts} mx postfix/qmgr[7]: {i:010X}: removed\n"


class DaemonProc:
    """`relayguard run` in a namespace (or not), its JSON log events collected as they come."""

    def __init__(self, config: Path, ns: str | None = None, prefix: tuple[str, ...] = ()) -> None:
        argv = [*prefix, sys.executable, "-m", "relayguard", "run", "--config", str(config)]
        if ns is not None:
            argv = ["ip", "netns", "exec", ns, *argv]
        env = {**os.environ, "TZ": "UTC", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cv:
                self.raw.append(line)
                with suppress(json.JSONDecodeError):
                    self.events.append(json.loads(line))
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def wait_for(self, event: str, pred: Callable[[dict[str, Any]], bool] = lambda e: True,
                 timeout: float = 20.0, count: int = 1) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                found = [e for e in self.events if e.get("event") == event and pred(e)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no {count}x {event} within {timeout}s; log:\n{''.join(self.raw[-40:])}")
                self._cv.wait(min(left, 0.5))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(30)
        self._reader.join(10)
        return rc


@contextmanager
def daemon(config: Path, ns: str | None = None) -> Iterator[DaemonProc]:
    d = DaemonProc(config, ns)
    try:
        d.wait_for("daemon_ready", timeout=60)
        yield d
    finally:
        d.stop()


def write_config(tmp: Path, log: Path, firewall: str, **scoring: Any) -> Path:
    tmp.chmod(0o755)
    sc = {"ban": "1h", **scoring}
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in sc.items())
    cfg = tmp / "relayguard.toml"
    cfg.write_text(f"""[daemon]
state_dir = "{tmp / 'state'}"
socket = ""
firewall = "{firewall}"
log_format = "json"
log_level = "info"
[scoring]
{body}
ignore_self = false
[[source]]
path = "{log}"
rules = ["postfix"]
start = "beginning"
""")
    return cfg


def kernel_bans(ns: str, firewall: str) -> set[str]:
    """What relayguard's sets/chain in `ns` block now, as canonical text."""
    if firewall == "nftables":
        return nft_bans(ns)
    found = set()
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        out = netns.run(ns, tool, "-w", "-S", "RELAYGUARD", check=False).stdout
        for line in out.splitlines():
            parts = line.split()
            if "-s" in parts:
                found.add(str(parse_net(parts[parts.index("-s") + 1])).removesuffix("/32").removesuffix("/128"))
    return found


def wait_until(cond: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module", autouse=True)
def root_namespace_untouched() -> Iterator[None]:
    before = netns.root_snapshot()
    yield
    assert netns.root_snapshot() == before


# ---------------------------------------------------------------------------------------------- firewall


@pytest.mark.netns
@pytest.mark.parametrize("firewall", ["nftables", "iptables"])
@pytest.mark.parametrize("family", [4, 6])
def test_ban_drops_then_expires(tmp_path: Path, firewall: str, family: int) -> None:
    log = tmp_path / "mail.log"
    log.write_text("")
    cfg = write_config(tmp_path, log, firewall, ban="4s")
    with netns.pair("dm") as p, netns.listener(p.server, PORT), netns.Prober(p.client) as probe:
        server, client = (p.server4, p.client4) if family == 4 else (p.server6, p.client6)
        assert probe.connect(server, PORT)
        with daemon(cfg, p.server) as d:
            with log.open("a") as fh:
                fh.write(pregreet(client) + pregreet(client))
            d.wait_for("ban_applied", lambda e: e["addr"] == client)
            assert client in kernel_bans(p.server, firewall)
            assert not probe.connect(server, PORT)
            d.wait_for("ban_expired", lambda e: e["addr"] == client, timeout=20)
            wait_until(lambda: probe.connect(server, PORT), what="connection accepted after expiry")
            assert client not in kernel_bans(p.server, firewall)


@pytest.mark.netns
def test_reconcile_table_restore_and_restart(tmp_path: Path) -> None:
    """At start the kernel is made equal to the database; a deleted table comes back; bans survive restarts."""
    log = tmp_path / "mail.log"
    log.write_text("")
    cfg = write_config(tmp_path, log, "nftables")
    now = time.time()
    with Store.open(str(tmp_path / "state" / "relayguard.db")) as st:
        from relayguard.model import Ban

        st.record_bans([Ban(parse_net("203.0.113.5"), now + 600, "old", "manual", now),
                        Ban(parse_net("198.51.100.0/24"), now + 600, "old", "manual", now),
                        Ban(parse_net("2001:db8:dead::/48"), now + 600, "old", "manual", now)])
    with netns.pair("rc") as p:
        # a stray element nobody recorded: reconcile must remove it, and keep other tables alone
        netns.run(p.server, "nft", "-f", "-", input="""
table inet relayguard {
    set banned4 { type ipv4_addr; flags timeout; elements = { 192.0.2.200 }; }
}
table inet other {
    chain c { type filter hook input priority 0; }
}
""")
        with daemon(cfg, p.server) as d:
            want = {"203.0.113.5", "198.51.100.0/24", "2001:db8:dead::/48"}
            assert kernel_bans(p.server, "nftables") == want
            netns.run(p.server, "nft", "delete", "table", "inet", "relayguard")
            d.wait_for("firewall_restored", timeout=20)
            assert kernel_bans(p.server, "nftables") == want
            with log.open("a") as fh:
                fh.write(pregreet("192.0.2.77") + pregreet("192.0.2.77"))
            d.wait_for("ban_applied", lambda e: e["addr"] == "192.0.2.77")
        assert "inet other" in netns.run(p.server, "nft", "list", "tables").stdout
        # stopped: bans stay in the kernel; a new start finds the same
        assert kernel_bans(p.server, "nftables") == want | {"192.0.2.77"}
        with daemon(cfg, p.server):
            assert kernel_bans(p.server, "nftables") == want | {"192.0.2.77"}


@pytest.mark.netns
def test_kill9_mid_stream_loses_no_ban_and_counts_no_line_twice(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_text("")
    cfg = write_config(tmp_path, log, "nftables")
    rng = random.Random(7)
    attackers = [f"198.51.100.{i}" for i in range(1, 121)] + [f"2001:db8:77::{i:x}" for i in range(1, 41)]
    with netns.pair("k9") as p:
        written = 0
        for round_ in range(3):
            d = DaemonProc(cfg, p.server)
            d.wait_for("daemon_ready", timeout=60)
            batch = attackers[round_ * 50:(round_ + 1) * 50 + 10]
            kill_at = rng.randrange(20, 100)
            with log.open("a") as fh:
                for k, addr in enumerate(batch):
                    fh.write(pregreet(addr) + noise(written) + pregreet(addr))
                    fh.flush()
                    written += 3
                    if k * 3 >= kill_at and d.proc.poll() is None:
                        d.stop(signal.SIGKILL)
            if d.proc.poll() is None:
                d.stop(signal.SIGKILL)
        d = DaemonProc(cfg, p.server)
        d.wait_for("daemon_ready", timeout=60)
        banned_all = set(attackers[: 3 * 50 + 10])
        wait_until(lambda: kernel_bans(p.server, "nftables") >= banned_all, timeout=30, what="every attacker banned")
        assert d.stop() == 0
        kernel = kernel_bans(p.server, "nftables")
    with Store.open(str(tmp_path / "state" / "relayguard.db")) as st:
        db = {str(b.net.network_address) if b.net.prefixlen == b.net.max_prefixlen else str(b.net)
              for b in st.active_bans(time.time())}
    assert db == kernel == banned_all
    con = sqlite3.connect(tmp_path / "state" / "relayguard.db")
    dup = con.execute("select source, lineno, count(*) from hits group by source, lineno having count(*) > 1")
    assert dup.fetchall() == []


@pytest.mark.netns
def test_without_cap_net_admin_one_clear_error(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_text("")
    cfg = write_config(tmp_path, log, "nftables")
    with netns.pair("nc") as p:
        d = DaemonProc(cfg, p.server, prefix=("setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-all"))
        rc = d.stop() if d.proc.wait(60) is None else d.proc.returncode
        d._reader.join(10)
        assert rc == 1
        errors = [e for e in d.events if e.get("level") == "error"]
        assert len(errors) == 1 and errors[0]["event"] == "firewall_unavailable"
        assert "\n" not in errors[0]["error"]


# ---------------------------------------------------------------------------------------------- sources


def test_rotation_while_writing_no_line_lost_or_twice(tmp_path: Path) -> None:
    """A writer appends event lines non-stop (open, append, close, as syslog daemons reopen after a HUP)
    while the log is rotated every half second, alternately rename-and-create and copytruncate.
    Every line lands in the database exactly once. The writer pauses only between copy and truncate,
    the window in which copytruncate itself loses lines (logrotate(8) says so)."""
    log = tmp_path / "mail.log"
    log.write_text("")
    cfg = write_config(tmp_path, log, "dry-run", threshold=1000, long_threshold=100000)
    lock = threading.Lock()
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        while not stop.is_set():
            with lock, log.open("a") as fh:
                for _ in range(20):
                    written[0] += 1
                    fh.write(pregreet(f"2001:db8:{written[0] // 65536:x}::{written[0] % 65536:x}"))
            time.sleep(0.005)

    with daemon(cfg):
        t = threading.Thread(target=writer)
        t.start()
        try:
            for step in range(8):
                time.sleep(0.5)
                if step % 2 == 0:
                    os.rename(log, tmp_path / f"mail.log.{step}")
                    log.touch()
                else:
                    with lock, log.open("r+") as fh:
                        (tmp_path / f"mail.log.{step}").write_text(fh.read())
                        fh.truncate(0)
        finally:
            stop.set()
            t.join()
        wait_until(lambda: _hits(tmp_path) >= written[0], timeout=30,
                   what=f"{written[0]} events stored, have {_hits(tmp_path)}")
    assert written[0] > 1000
    assert _hits(tmp_path) == written[0]
    con = sqlite3.connect(tmp_path / "state" / "relayguard.db")
    assert con.execute("select count(distinct addr) from hits").fetchone()[0] == written[0]


def _hits(tmp: Path) -> int:
    try:
        con = sqlite3.connect(tmp / "state" / "relayguard.db", timeout=5)
        return int(con.execute("select count(*) from hits").fetchone()[0])
    except sqlite3.Error:
        return 0


def test_sighup_reloads_sources_without_losing_state(tmp_path: Path) -> None:
    log, other = tmp_path / "mail.log", tmp_path / "other.log"
    log.write_text("")
    cfg = write_config(tmp_path, log, "dry-run")
    with daemon(cfg) as d:
        with log.open("a") as fh:
            fh.write(pregreet("192.0.2.31"))
        wait_until(lambda: _hits(tmp_path) >= 1, what="first event stored")
        cfg.write_text(cfg.read_text() + f'[[source]]\npath = "{other}"\nrules = ["postfix"]\nstart = "beginning"\n')
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for("config_reloaded")
        other.write_text(pregreet("192.0.2.31"))  # the second event, from the new source, completes the ban
        d.wait_for("ban_applied", lambda e: e["addr"] == "192.0.2.31")
        cfg.write_text("[scoring]\nthresold = 1\n")  # a broken config is refused and the old one stays
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for("config_reload_failed")
        assert d.proc.poll() is None


@pytest.mark.netns
def test_corrupt_database_is_moved_aside_and_refilled_from_kernel(tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_text(pregreet("192.0.2.44") + pregreet("192.0.2.44"))
    cfg = write_config(tmp_path, log, "nftables")
    with netns.pair("cd") as p:
        with daemon(cfg, p.server) as d:
            d.wait_for("ban_applied", lambda e: e["addr"] == "192.0.2.44")
        db = tmp_path / "state" / "relayguard.db"
        db.write_bytes(b"this is not a database" * 100)
        for extra in ("-wal", "-shm"):
            Path(f"{db}{extra}").unlink(missing_ok=True)
        with daemon(cfg, p.server) as d:
            d.wait_for("store_corrupt_moved")
            d.wait_for("database_rebuilt_from_kernel")
            assert kernel_bans(p.server, "nftables") == {"192.0.2.44"}
    assert list((tmp_path / "state").glob("relayguard.db.corrupt-*"))
    with Store.open(str(db)) as st:
        assert [str(b.net) for b in st.active_bans(time.time())] == ["192.0.2.44/32"]
