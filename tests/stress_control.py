"""Hostile control-socket clients for the stress suite: fuzzed request lines by class, slow clients that
trickle a request one byte at a time, and a raw exchange that sends lines and reads the replies.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections import Counter
from typing import Any

_CMDS = ["ping", "status", "list", "why", "ban", "unban", "ban ", "PING", "", "launch", "reload\u0000"]
_ARG_KEYS = ["addrs", "addr", "seconds", "reason", "x", "", "cmd"]


def _json_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63, -(2**70), 10**30, 3600])
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e-300, 3600.0])
    if kind == 4:
        return "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(0, 24)))
    if kind == 5:
        return rng.choice(["192.0.2.1", "2001:db8::1", "203.0.113.0/24", "::ffff:192.0.2.9", "300.1.1.1",
                           "192.0.2.1/33", "fe80::1%eth0", " 192.0.2.1", "", "-1", "127.0.0.1"])
    if kind in (6, 7):
        return [_json_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return {rng.choice(_ARG_KEYS): _json_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


def fuzz_line(rng: random.Random) -> tuple[str, bytes]:
    """(class, one request line without its newline)."""
    kind = rng.choice(["bytes", "partial", "wrong_types", "unknown_cmd", "bad_args", "nested", "numbers",
                       "encoding", "valid"])
    if kind == "bytes":
        return kind, bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300))).replace(b"\n", b" ")
    if kind == "partial":
        full = json.dumps({"v": 1, "cmd": rng.choice(_CMDS), "args": {"addrs": ["192.0.2.1", "2001:db8::1"]}})
        return kind, full[: rng.randrange(0, len(full))].encode()
    if kind == "wrong_types":
        req = {"v": _json_value(rng), "cmd": _json_value(rng), "args": _json_value(rng)}
        for key in list(req):
            if rng.random() < 0.3:
                del req[key]
        return kind, json.dumps(req).encode()
    if kind == "unknown_cmd":
        cmd = "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(1, 40)))
        return kind, json.dumps({"v": 1, "cmd": cmd}).encode()
    if kind == "bad_args":
        cmd = rng.choice(["ban", "unban", "why", "status", "list", "ping"])
        args: dict[str, Any] = {k: _json_value(rng) for k in rng.sample(_ARG_KEYS, rng.randrange(0, 4))}
        if cmd == "ban" and rng.random() < 0.5:
            args = {"addrs": [rng.choice(["192.0.2.7", "not-an-address", "0.0.0.0/0", "::/0", "198.51.100.0/24"])],
                    "seconds": rng.choice([-5, 0, 10**12, 3600, 1]), "reason": "x" * rng.choice([1, 600])}
        return kind, json.dumps({"v": 1, "cmd": cmd, "args": args}).encode()
    if kind == "nested":
        depth = rng.choice([100, 1000, 20_000])
        return kind, (b'{"v": 1, "cmd": "ping", "args": {"x": ' + b"[" * depth + b"]" * depth + b"}}")
    if kind == "numbers":
        return kind, rng.choice([b'{"v": 1e400, "cmd": "ping"}', b'{"v": 1, "cmd": "ban", "args": {"addrs": '
                                 b'["192.0.2.8"], "seconds": 1e400}}', b'{"v": 340282366920938463463374607431768211456,'
                                 b' "cmd": "ping"}', b'{"v": -0, "cmd": "ping"}', b'{"v": NaN, "cmd": "ping"}'])
    if kind == "encoding":
        return kind, rng.choice([b'{"v": 1, "cmd": "p\xffing"}', b'{"v": 1, "cmd": "ping\x00"}',
                                 b'\xef\xbb\xbf{"v": 1, "cmd": "ping"}', b'{"v": 1, "cmd": "\\ud800"}',
                                 '{"v": 1, "cmd": "ping"}'.encode("utf-16")])
    return kind, json.dumps({"v": 1, "cmd": rng.choice(["ping", "status", "list"])}).encode()


def exchange(path: str, lines: list[bytes], timeout: float = 120) -> list[dict[str, Any]]:
    """Send the lines on one connection, half-close, read every reply until the daemon closes."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(b"".join(line + b"\n" for line in lines))
        s.shutdown(socket.SHUT_WR)
        buf = bytearray()
        while chunk := s.recv(1 << 16):
            buf += chunk
    return [json.loads(line) for line in bytes(buf).splitlines()]


class SlowClients:
    """`n` connections that each trickle a status request one byte every `every` seconds (under the
    daemon's idle limit) until finish() sends the rest and reads the reply."""

    REQUEST = b'{"v": 1, "cmd": "status"}\n'

    def __init__(self, path: str, n: int, every: float) -> None:
        self.socks = []
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(60)
            s.connect(path)
            self.socks.append(s)
        self.sent = [0] * n
        self.every = every
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self) -> None:
        while not self.halt.wait(self.every):
            for i, s in enumerate(self.socks):
                if self.sent[i] < len(self.REQUEST) - 2:  # never the last bytes: the request stays open
                    s.sendall(self.REQUEST[self.sent[i]: self.sent[i] + 1])
                    self.sent[i] += 1

    def finish(self) -> Counter[str]:
        """Send the rest of each request; count the replies ("ok", "error", "none")."""
        self.halt.set()
        self.thread.join(30)
        got: Counter[str] = Counter()
        for i, s in enumerate(self.socks):
            try:
                s.sendall(self.REQUEST[self.sent[i]:])
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(1 << 16)
                    if not chunk:
                        break
                    buf += chunk
                reply = json.loads(buf) if buf else None
                got["ok" if reply and reply.get("ok") else "error" if reply else "none"] += 1
            except OSError:
                got["none"] += 1
            finally:
                s.close()
        return got


class Pinger(threading.Thread):
    """A normal client asking `ping` every `every` seconds; keeps every latency and every failure."""

    def __init__(self, path: str, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.every = every
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        from relayguard import control

        while not self.halt.wait(self.every):
            t = time.perf_counter()
            try:
                assert control.request(self.path, "ping", timeout=30) == "pong"
                self.latencies.append(time.perf_counter() - t)
            except (control.ControlError, AssertionError) as e:
                self.failures.append(str(e))

    def stop(self) -> None:
        self.halt.set()
        self.join(60)
