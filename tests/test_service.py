"""The systemd side: the unit file passes `systemd-analyze verify`, and `relayguard run` speaks the
sd_notify protocol to a REAL notify socket (an AF_UNIX datagram socket bound by the test, as systemd
binds one), from its main PID (the unit says NotifyAccess=main): READY=1 with STATUS= once serving,
RELOADING=1 then READY=1 around SIGHUP, STOPPING=1 at SIGTERM. And the daemon runs within the unit's
capability bounding set: nftables bans inside a namespace with only those capabilities.

systemd is not PID 1 here, so the unit is not started by systemd; what systemd would check is checked.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from relayguard import control

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "relayguard.service"
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _config(tmp: Path, firewall: str = "dry-run", log: Path | None = None, ban: str = "1h") -> Path:
    tmp.chmod(0o755)
    log = log or tmp / "mail.log"
    log.touch()
    cfg = tmp / "relayguard.toml"
    cfg.write_text(f"""
[daemon]
state_dir = "{tmp / 'state'}"
socket = "{tmp / 'run' / 'relayguard.sock'}"
firewall = "{firewall}"
log_format = "json"
[scoring]
ignore_self = false
ban = "{ban}"
[[source]]
path = "{log}"
rules = ["postfix"]
start = "beginning"
""")
    return cfg


class NotifySocket:
    """What systemd does for Type=notify: a datagram socket, credentials of each sender attached."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(path)
        self.messages: list[tuple[int, list[str]]] = []  # (sender pid, lines)

    def receive(self, want: str, timeout: float = 60.0) -> list[str]:
        """Messages until one holds the line (or line prefix) `want`; returns that message's lines."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {want!r} within {timeout}s; got {self.messages}")
            self.sock.settimeout(left)
            data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(_CRED.size))
            pid = next(_CRED.unpack(d[: _CRED.size])[0] for lvl, typ, d in anc
                       if lvl == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS)
            lines = data.decode().split("\n")
            self.messages.append((pid, lines))
            if any(ln == want or (want.endswith("=") and ln.startswith(want)) for ln in lines):
                return lines

    def close(self) -> None:
        self.sock.close()


@contextmanager
def notify_socket(tmp: Path, abstract: bool) -> Iterator[tuple[NotifySocket, str]]:
    if abstract:
        name = f"relayguard-test-{secrets.token_hex(4)}"
        ns, env = NotifySocket("\0" + name), "@" + name
    else:
        path = str(tmp / "notify.sock")
        ns, env = NotifySocket(path), path
    try:
        yield ns, env
    finally:
        ns.close()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify_ready_reload_stopping(tmp_path: Path, abstract: bool) -> None:
    cfg = _config(tmp_path)
    with notify_socket(tmp_path, abstract) as (ns, addr):
        proc = subprocess.Popen([sys.executable, "-m", "relayguard", "run", "--config", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=(tmp_path / "daemon.log").open("ab"),
                                env={**os.environ, "NOTIFY_SOCKET": addr})
        try:
            ready = ns.receive("READY=1")
            status = next(ln for ln in ready if ln.startswith("STATUS="))
            assert "0 bans" in status and "1 sources" in status
            # READY=1 means serving: the control socket answers at once, no retry
            assert control.request(str(tmp_path / "run" / "relayguard.sock"), "ping", timeout=10) == "pong"
            proc.send_signal(signal.SIGHUP)
            reloading = ns.receive("RELOADING=1")
            assert any(ln.startswith("MONOTONIC_USEC=") and ln[15:].isdigit() for ln in reloading)
            after = len(ns.messages)
            ns.receive("READY=1")
            assert any("READY=1" in m for _, m in ns.messages[after:])
            proc.send_signal(signal.SIGTERM)
            ns.receive("STOPPING=1")
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert {pid for pid, _ in ns.messages} == {proc.pid}  # NotifyAccess=main: only the main PID speaks
    order = [ln for _, m in ns.messages for ln in m if ln in ("READY=1", "RELOADING=1", "STOPPING=1")]
    assert order == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """verify checks that ExecStart= exists: a private mount namespace gets /usr/local/bin/relayguard."""
    before = sorted(os.listdir("/usr/local/bin"))
    script = (f'mount -t tmpfs tmpfs /usr/local/bin && ln -s "{Path(sys.executable).parent / "relayguard"}" '
              f'/usr/local/bin/relayguard && exec systemd-analyze verify "{UNIT}"')
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    assert "relayguard" not in p.stderr, p.stderr  # no warning about our unit either
    assert sorted(os.listdir("/usr/local/bin")) == before  # the host's directory never saw the link


def test_unit_security_exposure_is_recorded(tmp_path: Path) -> None:
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    score = out.strip().splitlines()[-1].split("relayguard.service:")[1].split()[0]
    assert float(score) <= 2.5
    assert f"exposure level {score}" in (ROOT / "docs" / "service.md").read_text()


def _unit_caps() -> list[str]:
    line = next(ln for ln in UNIT.read_text().splitlines() if ln.startswith("CapabilityBoundingSet="))
    return [c.removeprefix("CAP_").lower() for c in line.split("=", 1)[1].split()]


@pytest.mark.netns
def test_daemon_works_within_the_units_capabilities(tmp_path: Path) -> None:
    """Root with only the unit's bounding set: the nftables table is made and a ban lands (in a namespace)."""
    log = tmp_path / "mail.log"
    cfg = _config(tmp_path, "nftables", log)
    ns = f"rg-caps-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    proc = None
    try:
        caps = ",".join(["-all", *(f"+{c}" for c in _unit_caps())])
        argv = ["ip", "netns", "exec", ns, "setpriv", f"--bounding-set={caps}", "--no-new-privs",
                sys.executable, "-m", "relayguard", "run", "--config", str(cfg)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=(tmp_path / "daemon.log").open("ab"))
        sock = str(tmp_path / "run" / "relayguard.sock")
        deadline = time.monotonic() + 60
        while True:
            try:
                if control.request(sock, "ping", timeout=5) == "pong":
                    break
            except control.ControlError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
            time.sleep(0.1)
        eff = Path(f"/proc/{proc.pid}/status").read_text()
        bnd = int(next(ln for ln in eff.splitlines() if ln.startswith("CapBnd:")).split()[1], 16)
        assert bin(bnd).count("1") == len(_unit_caps())
        ts = time.strftime("%b %d %H:%M:%S", time.gmtime())
        with log.open("a") as f:
            for _ in range(2):
                f.write(f"{ts} mx postfix/postscreen[9]: PREGREET 11 after 0.1 from [203.0.113.50]:4711: EHLO x\n")
        deadline = time.monotonic() + 30
        while not control.request(sock, "list", timeout=10):
            assert time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
            time.sleep(0.1)
        out = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "set", "inet", "relayguard", "banned4"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
        assert "203.0.113.50" in out
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        subprocess.run(["ip", "netns", "del", ns], check=False, timeout=30)
    assert proc.returncode == 0
