"""Network namespaces for tests that need a real firewall or real traffic, never the machine's own.

`pair()` makes a server and a client namespace joined by a veth pair (documentation addresses only)
and always deletes both; `run()`/`python()` run a command inside one; `Agent` keeps a Python process
inside one and talks JSON lines to it; `listener()` accepts TCP in a namespace and `Prober` connects
from one. `root_snapshot()` records the root namespace's firewall and links so a test module can
prove it left them alone.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

SERVER4, CLIENT4, OTHER4 = "192.0.2.1", "192.0.2.2", "198.51.100.7"
SERVER6, CLIENT6, OTHER6 = "2001:db8:1::1", "2001:db8:1::2", "2001:db8:2::7"


def run(ns: str, *argv: str, input: str | None = None, check: bool = True,
        timeout: float = 120, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run argv inside namespace `ns` (`prefix` goes between `ip netns exec NS` and argv, e.g. setpriv)."""
    return subprocess.run(["ip", "netns", "exec", ns, *prefix, *argv], input=input, text=True,
                          capture_output=True, check=check, timeout=timeout)


def python(ns: str, code: str, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run Python code inside `ns` with the interpreter running the tests (same venv)."""
    return run(ns, sys.executable, "-c", code, *args, **kw)


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True, timeout=30)


@dataclass(frozen=True)
class Pair:
    server: str  # namespace names
    client: str
    server4: str = SERVER4
    server6: str = SERVER6
    client4: str = CLIENT4
    client6: str = CLIENT6
    other4: str = OTHER4  # a second client address outside the veth subnet, routed on-link
    other6: str = OTHER6


def _kill_inside(ns: str) -> None:
    """End processes a test left in its namespace (ours by construction), by PID."""
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
    for pid in out.stdout.split():
        with suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


@contextmanager
def pair(tag: str = "t") -> Iterator[Pair]:
    """Two fresh namespaces `rg-<tag>-s-<random>`/`rg-<tag>-c-<random>` with a veth pair between them.

    Server: 192.0.2.1/24, 2001:db8:1::1/64 on veth0. Client: 192.0.2.2/24, 2001:db8:1::2/64 plus
    198.51.100.7/32 and 2001:db8:2::7/128 on veth1 (the server routes those on-link). The veth is created
    inside the server namespace, so nothing ever appears in the root namespace.
    """
    suffix = secrets.token_hex(3)
    server, client = f"rg-{tag}-s-{suffix}", f"rg-{tag}-c-{suffix}"
    made: list[str] = []
    try:
        for ns in (server, client):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("-n", server, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", client)
        for ns, dev in ((server, "veth0"), (client, "veth1")):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", server, "addr", "add", f"{SERVER4}/24", "dev", "veth0")
        _ip("-n", server, "-6", "addr", "add", f"{SERVER6}/64", "dev", "veth0", "nodad")
        _ip("-n", client, "addr", "add", f"{CLIENT4}/24", "dev", "veth1")
        _ip("-n", client, "-6", "addr", "add", f"{CLIENT6}/64", "dev", "veth1", "nodad")
        _ip("-n", client, "addr", "add", f"{OTHER4}/32", "dev", "veth1")
        _ip("-n", client, "-6", "addr", "add", f"{OTHER6}/128", "dev", "veth1", "nodad")
        _ip("-n", server, "route", "add", f"{OTHER4}/32", "dev", "veth0")
        _ip("-n", server, "-6", "route", "add", f"{OTHER6}/128", "dev", "veth0")
        yield Pair(server, client)
    finally:
        for ns in made:
            _kill_inside(ns)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        left = [ns for ns in made if Path("/run/netns", ns).exists()]
        if left:
            raise RuntimeError(f"namespaces not deleted: {left}")


class AgentError(Exception):
    """The agent's handler raised; the message is "ExceptionType: text"."""


# The answers get their own copy of stdout; fd 1 then goes to stderr, so prints and logs cannot mix in.
_HEAD = """
import json as _json, os as _os, sys as _sys
_answers = _os.fdopen(_os.dup(1), "w", buffering=1)
_os.dup2(2, 1)
"""
_LOOP = """
print(_json.dumps({"ready": True}), file=_answers, flush=True)
for _line in _sys.stdin:
    try:
        _out = {"ok": True, "result": handle(_json.loads(_line))}
    except Exception as _e:
        _out = {"ok": False, "error": f"{type(_e).__name__}: {_e}"}
    print(_json.dumps(_out), file=_answers, flush=True)
"""


class Agent:
    """A Python process inside `ns` running `code`, which defines `handle(request: dict) -> JSON`.

    call() sends one JSON line and waits (bounded) for the one-line answer.
    """

    def __init__(self, ns: str, code: str, prefix: tuple[str, ...] = ()) -> None:
        # A file, not a pipe, so a chatty agent never blocks; closed in __exit__.
        self._stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *prefix, sys.executable, "-u", "-c", _HEAD + code + _LOOP],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self._read(60)  # the ready line: the process is up and imported

    def stderr(self) -> str:
        """What the agent printed or logged so far."""
        self._stderr.seek(0)
        return self._stderr.read()

    def _read(self, timeout: float) -> Any:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise AgentError(f"agent gave no answer within {timeout}s: {self.stderr().strip()[-2000:]}")
        return json.loads(line)

    def call(self, wait: float = 300, **request: Any) -> Any:
        """Send `request` as one JSON line; wait up to `wait` seconds for the answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self._read(wait)
        if not answer["ok"]:
            raise AgentError(answer["error"])
        return answer["result"]

    def close(self) -> None:
        if self.proc.poll() is None:
            if self.proc.stdin:
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        self._stderr.close()


_LISTENER = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
s.listen(64)
print("ready", flush=True)
while True:
    conn, _ = s.accept()
    conn.close()
"""


@contextmanager
def listener(ns: str, port: int) -> Iterator[subprocess.Popen[str]]:
    """A dual-stack TCP server in `ns` that accepts and closes every connection."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-u", "-c", _LISTENER, str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        if not ready or proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"listener in {ns} did not start")
        yield proc
    finally:
        proc.kill()  # our own child, by PID
        proc.wait(10)


_PROBE = """
import socket
def handle(req):
    try:
        with socket.create_connection((req["dst"], req["port"]), timeout=req["timeout"],
                                      source_address=(req["src"], 0) if req.get("src") else None):
            return True
    except OSError:
        return False
"""


class Prober(Agent):
    """Connects from inside `ns`: connect() is True when the TCP handshake completes in time."""

    def __init__(self, ns: str) -> None:
        super().__init__(ns, _PROBE)

    def connect(self, dst: str, port: int, src: str | None = None, timeout: float = 1.0) -> bool:
        return bool(self.call(dst=dst, port=port, src=src, timeout=timeout))


def root_snapshot() -> dict[str, str]:
    """What the root namespace has in nftables, legacy xtables and links; read-only.

    Legacy tables are listed only if they already exist: `iptables-legacy -S` would otherwise
    instantiate an (empty) table in the root namespace.
    """
    def out(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60).stdout

    snap = {"nft tables": out("nft", "list", "tables"),
            "links": out("ip", "-o", "link", "show")}
    for cmd, names in (("iptables-legacy", "/proc/net/ip_tables_names"),
                       ("ip6tables-legacy", "/proc/net/ip6_tables_names")):
        tables = Path(names).read_text().split() if Path(names).exists() else []
        snap[names] = " ".join(sorted(tables))
        if "filter" in tables:
            snap[cmd] = out(cmd, "-w", "-S")
    # Link counters and states change on their own; names are what a test could leave behind.
    snap["links"] = "\n".join(sorted(ln.split(":")[1].strip() for ln in snap["links"].splitlines()))
    return snap
