"""The real daemon for control-socket tests: `relayguard run` as a process (optionally inside a fresh
network namespace, with nftables), a config in a private directory, readiness by polling `ping` on the
socket against a deadline, its JSON log events, plus throw-away system users for the peer checks.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from netns import _kill_inside

from relayguard import control
from relayguard.model import parse_net

READY_WITHIN = 60.0  # seconds; a cold start on a busy 2-core machine takes 1-3


def private_dir(tag: str) -> Path:
    """A fresh directory under /tmp that other users can traverse (pytest's tmp_path is 0700, which
    would stop an unprivileged client before the daemon's peer check). See scratch() for one that is
    removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix=f"rg-{tag}-", dir="/tmp"))
    d.chmod(0o755)
    return d


@contextmanager
def scratch(tag: str) -> Iterator[Path]:
    """private_dir(), removed on exit."""
    d = private_dir(tag)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def write_config(root: Path, *, firewall: str = "dry-run", socket_group: str = "root", log: Path | None = None,
                 scoring: str = "") -> Path:
    """Config with state and socket under `root` (the socket's directory does not exist yet)."""
    text = f"""
[daemon]
state_dir = "{root}/state"
socket = "{root}/run/relayguard.sock"
socket_group = "{socket_group}"
firewall = "{firewall}"
log_format = "json"
log_level = "info"

[scoring]
ignore_self = false   # the host's own addresses vary by machine; tests use documentation ranges
{scoring}
"""
    if log is not None:
        text += f'\n[[source]]\npath = "{log}"\nrules = ["postfix"]\n'
    path = root / "relayguard.toml"
    path.write_text(text)
    return path


class DaemonProc:
    """`relayguard run --config F`, inside namespace `ns` when given; stderr (JSON events) to a file."""

    def __init__(self, config: Path, ns: str | None = None, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.ns = ns
        self.socket = str(config.parent / "run" / "relayguard.sock")
        self.log_path = config.parent / "daemon.log"
        argv = [sys.executable, "-m", "relayguard", "run", "--config", str(config)]
        if ns is not None:
            argv = ["ip", "netns", "exec", ns, *argv]  # ip execs the daemon: the PID is the daemon's
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self._log,
                                     env={**os.environ, "TZ": "UTC", **(env or {})})
        try:
            self.wait_ready()
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def wait_ready(self, within: float = READY_WITHIN) -> None:
        deadline = time.monotonic() + within
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if control.request(self.socket, "ping", timeout=5) == "pong":
                    return
            except control.ControlError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon not answering on {self.socket} after {within}s: {self.log_tail()}")
            time.sleep(0.05)

    def request(self, cmd: str, **args: Any) -> Any:
        return control.request(self.socket, cmd, timeout=120, **args)

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with suppress(json.JSONDecodeError):
                ev = json.loads(line)
                if isinstance(ev, dict) and ev.get("event") == name:
                    out.append(ev)
        return out

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)  # our own child, by PID
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


@contextmanager
def namespace(tag: str) -> Iterator[str]:
    """A fresh network namespace `rg-<tag>-<random>` with loopback up; always deleted."""
    name = f"rg-{tag}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True, timeout=30)
        yield name
    finally:
        _kill_inside(name)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False, timeout=30)
        if Path("/run/netns", name).exists():
            raise RuntimeError(f"namespace {name} not deleted")


def nft_elements(ns: str, set_name: str) -> list[Any]:
    """Elements of `inet relayguard <set_name>` inside `ns` (values as nft's JSON gives them)."""
    out = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "set", "inet", "relayguard", set_name],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    for obj in json.loads(out)["nftables"]:
        if "set" in obj:
            return [e["elem"] if isinstance(e, dict) and "elem" in e else {"val": e}
                    for e in obj["set"].get("elem", [])]
    return []


def nft_values(ns: str, set_name: str) -> dict[str, int | None]:
    """Element text ("192.0.2.7", "203.0.113.0/24") -> seconds left (None: no timeout)."""
    out: dict[str, int | None] = {}
    for e in nft_elements(ns, set_name):
        v = e["val"]
        text = v if isinstance(v, str) else f"{v['prefix']['addr']}/{v['prefix']['len']}"
        out[text] = e.get("expires")
    return out


def nft_bans(ns: str) -> set[str]:
    """Every element of relayguard's four nft sets in `ns`, as canonical text (no /32, /128)."""
    out = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "table", "inet", "relayguard"],
                         capture_output=True, text=True, check=False, timeout=120).stdout
    found: set[str] = set()
    if not out:
        return found
    for item in json.loads(out)["nftables"]:
        for elem in item.get("set", {}).get("elem", []):
            val = elem["elem"]["val"] if isinstance(elem, dict) and "elem" in elem else elem
            if isinstance(val, dict) and "prefix" in val:
                val = f"{val['prefix']['addr']}/{val['prefix']['len']}"
            found.add(str(parse_net(str(val))).removesuffix("/32").removesuffix("/128"))
    return found


def table_exists(ns: str) -> bool:
    res = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "inet", "relayguard"],
                         capture_output=True, text=True, check=False, timeout=60)
    return res.returncode == 0


@contextmanager
def system_user(tag: str, groups: tuple[str, ...] = ()) -> Iterator[tuple[str, int, int]]:
    """A throw-away system user (name, uid, primary gid) with its own group; always deleted."""
    name = f"rgtest-{tag}-{secrets.token_hex(3)}"
    argv = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group"]
    if groups:
        argv += ["--groups", ",".join(groups)]
    subprocess.run([*argv, name], check=True, capture_output=True, timeout=30)
    try:
        ids = subprocess.run(["id", "-u", name], check=True, capture_output=True, text=True).stdout.strip()
        gid = subprocess.run(["id", "-g", name], check=True, capture_output=True, text=True).stdout.strip()
        yield name, int(ids), int(gid)
    finally:
        subprocess.run(["userdel", name], capture_output=True, check=False, timeout=30)
        subprocess.run(["groupdel", name], capture_output=True, check=False, timeout=30)  # if userdel left it


@contextmanager
def system_group(tag: str) -> Iterator[tuple[str, int]]:
    name = f"rgtest-{tag}-{secrets.token_hex(3)}"
    subprocess.run(["groupadd", "--system", name], check=True, capture_output=True, timeout=30)
    try:
        gid = subprocess.run(["getent", "group", name], check=True, capture_output=True, text=True).stdout
        yield name, int(gid.split(":")[2])
    finally:
        subprocess.run(["groupdel", name], capture_output=True, check=False, timeout=30)


def cli_as(uid: int, gid: int, *argv: str, init_groups: bool = False) -> subprocess.CompletedProcess[str]:
    """`relayguard ARGV` as another user (setpriv), without root's supplementary groups."""
    groups = ["--init-groups"] if init_groups else ["--clear-groups"]
    return subprocess.run(["setpriv", "--reuid", str(uid), "--regid", str(gid), *groups,
                           sys.executable, "-m", "relayguard", *argv],
                          capture_output=True, text=True, timeout=60, cwd="/",
                          env={**os.environ, "HOME": "/", "PYTHONDONTWRITEBYTECODE": "1"})
