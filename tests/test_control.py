"""The control socket and the commands that use it, against the real daemon: `relayguard run` as a process
with a dry-run firewall, and with nftables inside a fresh network namespace. Clients are the real CLI
(in-process through click's runner, or as a process when another user or the wall time matters) and raw
sockets for hostile input.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from daemon_harness import (
    DaemonProc,
    cli_as,
    namespace,
    nft_values,
    scratch,
    system_group,
    system_user,
    table_exists,
    write_config,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netns import root_snapshot

from relayguard import control
from relayguard.cli import main
from relayguard.handlers import _net
from relayguard.model import net_text, parse_net
from relayguard.store import _key

EDGE_IDLE = 5  # seconds: the edge daemon's idle timeout (RELAYGUARD_CONTROL_IDLE)
EDGE_MAX_CONN = 8
CONTRACT_BAN_KEYS = {"ip", "reason", "source", "banned_at", "expires_at", "count"}


def rg(*args: str, input: str | None = None) -> Result:
    """The real CLI, in-process."""
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def relay_denied(addr: str, n: int) -> str:
    """A Postfix 3.7 smtpd reject line (weight 5 in the postfix pack), stamped now."""
    ts = time.strftime("%b %d %H:%M:%S", time.gmtime())
    return (f"{ts} mx postfix/smtpd[{2000 + n}]: NOQUEUE: reject: RCPT from unknown[{addr}]:{40000 + n}: "
            f"554 5.7.1 <victim{n}@example.net>: Relay access denied; from=<spam@example.org> "
            f"to=<victim{n}@example.net> proto=ESMTP helo=<bot>")


def wait_for(what: str, check: Any, within: float = 60.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def listed(d: DaemonProc) -> dict[str, dict[str, Any]]:
    res = rg("list", "--json", "--socket", d.socket)
    assert res.exit_code == 0, res.stderr
    return {b["ip"]: b for b in map(json.loads, res.stdout.splitlines())}


def why_of(d: DaemonProc, addr: str) -> dict[str, Any]:
    return d.request("why", addr=addr)


def iso_ok(text: str) -> bool:
    return datetime.fromisoformat(text).utcoffset() is not None


# ----------------------------------------------------------------------------- daemons


@pytest.fixture(scope="module", autouse=True)
def root_untouched() -> Iterator[None]:
    before = root_snapshot()
    yield
    after = root_snapshot()
    assert "relayguard" not in after["nft tables"]
    assert before["nft tables"] == after["nft tables"]


@pytest.fixture(scope="module")
def dry() -> Iterator[DaemonProc]:
    """Dry-run daemon following a Postfix log."""
    with scratch("ctl-dry") as root:
        log = root / "mail.log"
        log.touch()
        d = DaemonProc(write_config(root, log=log))
        try:
            yield d
        finally:
            d.stop()


@pytest.fixture(scope="module")
def nft() -> Iterator[DaemonProc]:
    """nftables daemon inside its own namespace, following a Postfix log."""
    with namespace("ctl") as ns, scratch("ctl-nft") as root:
        log = root / "mail.log"
        log.touch()
        d = DaemonProc(write_config(root, firewall="nftables", log=log), ns=ns)
        try:
            yield d
        finally:
            d.stop()


@pytest.fixture(scope="module")
def edge() -> Iterator[tuple[DaemonProc, dict[str, Any]]]:
    """Dry-run daemon for hostile clients: socket group of its own, short idle timeout, few connections;
    plus a member of that group and an outsider."""
    with system_group("sock") as (group, gid), system_user("in", (group,)) as member, \
            system_user("out") as outsider, scratch("ctl-edge") as root:
        d = DaemonProc(write_config(root, socket_group=group),
                       env={"RELAYGUARD_CONTROL_IDLE": str(EDGE_IDLE),
                            "RELAYGUARD_CONTROL_MAX_CONN": str(EDGE_MAX_CONN)})
        try:
            yield d, {"group": group, "gid": gid, "member": member, "outsider": outsider}
        finally:
            d.stop()


# ----------------------------------------------------------------------------- the socket itself


def test_socket_is_0660_root_group_in_a_0755_directory(dry: DaemonProc, edge: tuple[DaemonProc, dict]) -> None:
    for d, gid in ((dry, 0), (edge[0], edge[1]["gid"])):
        st_sock = os.stat(d.socket)
        assert stat.S_ISSOCK(st_sock.st_mode)
        assert stat.S_IMODE(st_sock.st_mode) == 0o660
        assert (st_sock.st_uid, st_sock.st_gid) == (0, gid)
        assert stat.S_IMODE(os.stat(os.path.dirname(d.socket)).st_mode) == 0o755  # created by the daemon


def test_not_running_is_one_line_and_exit_1(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.sock")
    res = rg("status", "--socket", missing)
    assert res.exit_code == 1
    assert res.stderr == f"relayguard is not running: no socket at {missing}\n"
    assert res.stdout == ""
    # a socket file nobody listens on (a killed daemon's) is "not running" too
    dead = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(dead))
    res = rg("list", "--json", "--socket", str(dead))
    assert res.exit_code == 1
    assert res.stderr.startswith(f"relayguard is not running: nothing accepts connections on {dead}")
    assert res.stderr.count("\n") == 1


def test_config_names_the_socket_and_config_errors_exit_2(dry: DaemonProc, tmp_path: Path) -> None:
    res = rg("status", "--config", str(dry.config))
    assert res.exit_code == 0, res.stderr
    assert "running since" in res.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nsockett = 1\n")
    res = rg("status", "--config", str(bad))
    assert res.exit_code == 2
    assert "sockett" in res.stderr and res.stderr.count("\n") == 1


def test_every_command_has_an_example_in_help() -> None:
    for cmd in ("status", "list", "ban", "unban", "why", "flush", "reload"):
        res = rg(cmd, "--help")
        assert res.exit_code == 0
        assert "Example" in res.stdout, cmd
        assert "--socket" in res.stdout and "--json" in res.stdout and "--config" in res.stdout


# ----------------------------------------------------------------------------- commands, dry-run daemon


def test_status_text_and_json(dry: DaemonProc) -> None:
    res = rg("status", "--json", "--socket", dry.socket)
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 1
    st_ = json.loads(lines[0])
    assert st_["state"] == "running" and st_["firewall"] == "dry-run" and iso_ok(st_["since"])
    assert st_["pid"] == dry.proc.pid
    assert set(st_["bans"]) >= {"total", "ipv4", "ipv6"}
    assert isinstance(st_["tracked"], int)
    assert st_["database"]["bytes"] > 0 and st_["database"]["path"].endswith("relayguard.db")
    (src,) = st_["sources"]
    assert src["name"].endswith("mail.log") and src["state"] == "following"
    assert {"lines", "events", "lag_bytes"} <= set(src)
    text = rg("status", "--socket", dry.socket).stdout
    assert "relayguard running since" in text and "firewall dry-run" in text and "mail.log: following" in text


def test_manual_ban_list_why_unban_shapes(dry: DaemonProc) -> None:
    res = rg("ban", "192.0.2.41", "2001:db8:41::/64", "--for", "2h", "--reason", "phishing run",
             "--socket", dry.socket, "--json")
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["banned"] == 2 and out["duration"] == "2h" and iso_ok(out["expires_at"])
    bans = listed(dry)
    for ip in ("192.0.2.41", "2001:db8:41::/64"):
        b = bans[ip]
        assert set(b) >= CONTRACT_BAN_KEYS
        assert b["source"] == "manual" and b["reason"] == "phishing run" and b["count"] == 1
        assert iso_ok(b["banned_at"]) and iso_ok(b["expires_at"])
        left = datetime.fromisoformat(b["expires_at"]).timestamp() - time.time()
        assert 7000 < left <= 7200
    # sorted by expiry, soonest first
    exp = [b["expires_at"] for b in bans.values()]
    assert exp == sorted(exp)
    text = rg("list", "--socket", dry.socket).stdout
    assert text.splitlines()[0].startswith("ADDRESS") and "phishing run" in text

    why = json.loads(rg("why", "192.0.2.41", "--json", "--socket", dry.socket).stdout)
    assert why["ip"] == "192.0.2.41" and why["ban"]["reason"] == "phishing run"
    assert [h["source"] for h in why["history"]] == ["manual"]
    assert why["ignored"] is None and why["events"] == []
    assert {w["name"] for w in why["windows"]} == {"short", "long"}
    assert all(w["score"] == 0 and w["threshold"] > 0 for w in why["windows"])

    res = rg("unban", "192.0.2.41", "2001:db8:41::/64", "--socket", dry.socket)
    assert res.exit_code == 0, res.stderr
    assert res.stdout == "unbanned 2 addresses\n"
    assert not {"192.0.2.41", "2001:db8:41::/64"} & set(listed(dry))


def test_unban_of_a_non_banned_address_exits_1(dry: DaemonProc) -> None:
    res = rg("unban", "192.0.2.99", "--socket", dry.socket)
    assert res.exit_code == 1
    assert res.stderr == "relayguard: 192.0.2.99 is not banned; nothing to unban\n"
    # mixed: the banned one goes, the other is reported, exit 1
    assert rg("ban", "192.0.2.98", "--socket", dry.socket).exit_code == 0
    res = rg("unban", "192.0.2.98", "192.0.2.99", "--socket", dry.socket, "--json")
    assert res.exit_code == 1
    assert json.loads(res.stdout) == {"unbanned": ["192.0.2.98"], "not_banned": ["192.0.2.99"]}
    assert res.stderr == "relayguard: not banned: 192.0.2.99\n"


def test_ignored_addresses_are_refused_and_nothing_is_banned(dry: DaemonProc) -> None:
    for args in (["127.0.0.1"], ["198.51.100.61", "127.0.0.1"], ["::1"], ["127.0.0.0/7"]):
        res = rg("ban", *args, "--socket", dry.socket)
        assert res.exit_code == 1, args
        assert "is on the ignore list" in res.stderr and "nothing was banned" in res.stderr
        assert res.stderr.count("\n") == 1
    assert "198.51.100.61" not in listed(dry)
    why = json.loads(rg("why", "127.0.0.1", "--json", "--socket", dry.socket).stdout)
    assert why["ignored"] == "127.0.0.0/8"
    assert "on the ignore list (127.0.0.0/8)" in rg("why", "127.0.0.1", "--socket", dry.socket).stdout


def test_usage_and_address_errors(dry: DaemonProc, tmp_path: Path) -> None:
    res = rg("ban", "--socket", dry.socket)
    assert res.exit_code == 2 and "no address given" in res.stderr
    res = rg("ban", "192.0.2.1", "--for", "soon", "--socket", dry.socket)
    assert res.exit_code == 2 and "not a duration" in res.stderr
    f = tmp_path / "list.txt"
    f.write_text("# blocklist\n192.0.2.51\n\n  198.51.100.51  # inline comment\nnot-an-address\n")
    res = rg("ban", "--file", str(f), "--socket", dry.socket)
    assert res.exit_code == 1
    assert res.stderr == f"relayguard: not an IP address or CIDR prefix: 'not-an-address' ({f} line 5)\n"
    assert "192.0.2.51" not in listed(dry)  # one request: all or nothing
    res = rg("why", "nonsense", "--socket", dry.socket)
    assert res.exit_code == 1 and "not an IP address" in res.stderr


def test_ban_file_and_stdin(dry: DaemonProc, tmp_path: Path) -> None:
    f = tmp_path / "list.txt"
    f.write_text("# blocklist\n192.0.2.52\n\n  198.51.100.52  # inline comment\n2001:db8:52::/48\n")
    res = rg("ban", "--file", str(f), "--socket", dry.socket, "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["banned"] == 3
    res = rg("ban", "--file", "-", "203.0.113.52", "--socket", dry.socket, input="2001:db8::52\n# x\n")
    assert res.exit_code == 0, res.stderr
    assert res.stdout.startswith("banned 2 addresses for 1h")
    assert {"192.0.2.52", "198.51.100.52", "2001:db8:52::/48", "2001:db8::52", "203.0.113.52"} <= set(listed(dry))
    res = rg("unban", "--file", "-", "--socket", dry.socket, input=f.read_text())
    assert res.exit_code == 0 and res.stdout == "unbanned 3 addresses\n"


def test_auto_ban_from_postfix_lines_shows_in_list_and_why(dry: DaemonProc) -> None:
    log = dry.config.parent / "mail.log"
    lines = [relay_denied("198.51.100.77", n) for n in range(2)]
    with open(log, "a") as fh:
        fh.write("".join(line + "\n" for line in lines))
    ban = wait_for("the auto ban", lambda: listed(dry).get("198.51.100.77"))
    assert ban["source"] == "auto" and "relay-denied" in ban["reason"] and ban["count"] == 1
    why = json.loads(rg("why", "198.51.100.77", "--json", "--socket", dry.socket).stdout)
    assert [e["text"] for e in why["events"]] == lines
    assert [(e["rule"], e["weight"]) for e in why["events"]] == [("postfix/relay-denied", 5)] * 2
    assert all(e["file"] == str(log) and e["line"] >= 1 and "short" in e["windows"] for e in why["events"])
    # the two events made the ban, and a ban resets the score: only later events count again
    assert all(e["judged"] for e in why["events"]) and iso_ok(why["judged_until"])
    short = next(w for w in why["windows"] if w["name"] == "short")
    assert short["score"] == 0 and short["threshold"] == 10
    assert why["ban"]["source"] == "auto" and len(why["history"]) == 1
    text = rg("why", "198.51.100.77", "--socket", dry.socket).stdout
    assert "score 0 of 10 in the last 10m (short window)" in text
    assert lines[0] in text and "postfix/relay-denied +5" in text and "judged by the ban at" in text
    # one more event after the ban counts (log times have whole seconds: one in the ban's second was judged)
    judged = datetime.fromisoformat(why["judged_until"]).timestamp()
    wait_for("the next second", lambda: time.time() >= judged + 1)
    with open(log, "a") as fh:
        fh.write(relay_denied("198.51.100.77", 2) + "\n")
    why = wait_for("the new event", lambda: (w := why_of(dry, "198.51.100.77"))["windows"][0]["score"] and w)
    assert [e["judged"] for e in why["events"]] == [True, True, False]
    assert why["windows"][0] == {"name": "short", "seconds": 600, "threshold": 10, "score": 5}


def test_reload(dry: DaemonProc) -> None:
    before = json.loads(rg("status", "--json", "--socket", dry.socket).stdout)["reloads"]
    res = rg("flush", "--json", "--socket", dry.socket)  # dry-run: pauses, and the reload below resumes
    assert res.exit_code == 0, res.stderr
    flushed = json.loads(res.stdout)
    assert flushed["flushed"] is True and isinstance(flushed["bans_kept_in_database"], int)
    assert json.loads(rg("status", "--json", "--socket", dry.socket).stdout)["state"] == "paused (flushed)"
    res = rg("reload", "--socket", dry.socket)
    assert res.exit_code == 0, res.stderr
    assert res.stdout == "reloaded: 1 source\n"
    after = json.loads(rg("status", "--json", "--socket", dry.socket).stdout)
    assert after["reloads"] == before + 1 and after["state"] == "running"
    assert json.loads(rg("reload", "--json", "--socket", dry.socket).stdout) == {
        "added": [], "removed": [], "sources": [str(dry.config.parent / "mail.log")]}


def test_50_concurrent_clients_all_get_their_answers(dry: DaemonProc) -> None:
    barrier = threading.Barrier(50)

    def client(i: int) -> tuple[str, Any, Any, Any]:
        addr = f"203.0.113.{100 + i}"
        barrier.wait(60)
        banned = control.request(dry.socket, "ban", addrs=[addr], seconds=3600 + i, reason=f"client {i}")
        why = control.request(dry.socket, "why", addr=addr)
        status = control.request(dry.socket, "status")
        return addr, banned, why, status

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(client, range(50)))
    for i, (addr, banned, why, status) in enumerate(results):
        assert banned["banned"] == 1
        assert why["ip"] == addr and why["ban"]["reason"] == f"client {i}"
        assert status["state"] == "running"
    bans = listed(dry)
    assert all(f"203.0.113.{100 + i}" in bans for i in range(50))


# ----------------------------------------------------------------------------- hostile clients


def talk(path: str, data: bytes, timeout: float = 60) -> list[dict[str, Any]]:
    """Send raw bytes, half-close, read replies to EOF."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon hung up (a line over the limit): its reply is still there to read
        buf = b""
        while chunk := s.recv(1 << 16):
            buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


def test_protocol_errors_get_error_replies_in_order(edge: tuple[DaemonProc, dict]) -> None:
    d = edge[0]
    lines = [
        b'{"v": 1, "cmd": "ping"}',
        b'{"v": 1, "cmd": "ping", "args": {}',  # partial JSON
        b"\xff\xfe garbage",
        b'{"v": 1, "cmd": "launch"}',
        b'{"v": 1, "cmd": "ban", "args": {"addrs": "192.0.2.1"}}',
        b'{"v": 1, "cmd": "ban", "args": {"addrs": ["192.0.2.1"], "seconds": "soon"}}',
        b'{"v": 1, "cmd": "why", "args": {"addr": "192.0.2.1", "extra": 1}}',
        b'{"v": 2, "cmd": "ping"}',
        b'["ping"]',
        b"",
        b'{"cmd": "ping"}',
    ]
    replies = talk(d.socket, b"\n".join(lines) + b"\n")
    assert len(replies) == len(lines)
    assert all(r["v"] == 1 for r in replies)
    assert [r["ok"] for r in replies] == [True] + [False] * 9 + [True]
    errors = [r["error"] for r in replies[1:10]]
    assert errors[0].startswith("malformed JSON") and errors[1].startswith("malformed JSON")
    assert errors[2].startswith("unknown command 'launch' (known: ban, flush")
    assert errors[3] == "invalid arguments for ban: Expected `array`, got `str` - at `$.addrs`"
    assert errors[4].startswith("invalid arguments for ban") and "$.seconds" in errors[4]
    assert errors[5].startswith("invalid arguments for why") and "extra" in errors[5]
    assert errors[6] == "unsupported protocol version 2 (this daemon speaks 1)"
    assert errors[7].startswith("invalid request")
    assert errors[8] == "empty request"
    assert d.request("ping") == "pong"


def test_lines_over_16_mib_are_refused_and_the_daemon_goes_on(edge: tuple[DaemonProc, dict]) -> None:
    d = edge[0]
    huge = b"a" * (control.MAX_REQUEST + 1024)
    addrs = json.dumps([f"2001:db8:ff::{i:x}" for i in range(900_000)]).encode()  # a real request, too big
    for data in (huge, huge + b"\n", b'{"v": 1, "cmd": "ban", "args": {"addrs": ' + addrs + b"}}\n"):
        (reply,) = talk(d.socket, data)
        assert reply == {"v": 1, "ok": False, "error": "request too large (limit 16 MiB per line)"}
    assert d.events("control_request_too_large")
    assert d.request("ping") == "pong"


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
_cmd = st.sampled_from(["ping", "status", "list", "why", "ban", "unban", "ban "]) | st.text(max_size=12) | _json
_args = _json | st.dictionaries(st.sampled_from(["addrs", "addr", "seconds", "reason", "x"]),
                                _json | st.lists(st.text(max_size=16), max_size=3), max_size=3)
_structured = st.fixed_dictionaries(
    {"cmd": _cmd}, optional={"v": st.sampled_from([1, 1, 1, 0, 2, "1", None, 1.5]), "args": _args,
                             "extra": _json})
_line = st.one_of(
    st.binary(max_size=300),  # random bytes
    _structured.map(lambda o: json.dumps(o).encode()),  # wrong types, unknown commands
    st.tuples(_structured, st.floats(0, 1)).map(  # partial JSON
        lambda t: json.dumps(t[0]).encode()[: int(len(json.dumps(t[0])) * t[1])]),
    st.text(max_size=200).map(str.encode),
)
SENT: list[int] = []


def test_10000_malformed_or_random_requests_then_status_still_answers(edge: tuple[DaemonProc, dict]) -> None:
    d = edge[0]
    SENT.clear()

    @settings(max_examples=100, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(batch=st.lists(_line, min_size=100, max_size=100))
    def one_connection(batch: list[bytes]) -> None:
        lines = [b.replace(b"\n", b" ") for b in batch]
        replies = talk(d.socket, b"".join(line + b"\n" for line in lines))
        assert len(replies) == len(lines)  # one reply per request line, in order, none lost
        for r in replies:
            assert r["v"] == 1 and isinstance(r["ok"], bool)
            if not r["ok"]:
                assert isinstance(r["error"], str) and r["error"] and "\n" not in r["error"]
                assert "internal error" not in r["error"]
        SENT.append(len(lines))

    one_connection()
    assert sum(SENT) >= 10_000
    assert d.proc.poll() is None
    assert d.request("status")["state"] == "running"
    assert not d.events("control_command_failed")


def test_a_stalled_half_line_is_cut_after_the_idle_timeout(edge: tuple[DaemonProc, dict]) -> None:
    d = edge[0]
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(EDGE_IDLE * 12)
        s.connect(d.socket)
        s.sendall(b'{"v": 1, "cmd": "sta')
        assert d.request("status")["state"] == "running"  # others are served meanwhile
        buf = b""
        while chunk := s.recv(4096):  # returns b"" once the daemon hangs up
            buf += chunk
    (reply,) = [json.loads(line) for line in buf.splitlines()]
    assert reply["ok"] is False and reply["error"].startswith("incomplete request: no newline after")
    assert d.events("control_idle_timeout")


def test_connections_over_the_limit_are_refused_with_a_reply(edge: tuple[DaemonProc, dict]) -> None:
    d = edge[0]
    held = [socket.socket(socket.AF_UNIX) for _ in range(EDGE_MAX_CONN)]
    try:
        for s in held:
            s.settimeout(30)
            s.connect(d.socket)
        for s in held:  # each one answered: all are counted (and their idle timers restart)
            s.sendall(b'{"v": 1, "cmd": "ping"}\n')
            assert json.loads(s.recv(4096))["result"] == "pong"
        with pytest.raises(control.ControlError, match=r"too many connections \(limit 8\)"):
            control.request(d.socket, "ping")
    finally:
        for s in held:
            s.close()
    wait_for("a free slot", lambda: _pings(d.socket))
    assert d.events("control_busy")


def _pings(path: str) -> bool:
    try:
        return control.request(path, "ping") == "pong"
    except control.ControlError:
        return False


def test_only_root_and_the_socket_group_may_talk(edge: tuple[DaemonProc, dict]) -> None:
    d, who = edge
    _, m_uid, m_gid = who["member"]
    _, o_uid, o_gid = who["outsider"]
    status = ("status", "--json", "--socket", d.socket)
    # a member (listed in /etc/group; its process carries the group as a supplementary one)
    res = cli_as(m_uid, m_gid, *status, init_groups=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["state"] == "running"
    # a process whose primary group is the socket group
    res = cli_as(o_uid, who["gid"], *status)
    assert res.returncode == 0, res.stderr
    # an outsider: the file mode stops it first ...
    res = cli_as(o_uid, o_gid, *status)
    assert res.returncode == 1
    assert res.stderr == (f"relayguard: cannot connect to {d.socket}: permission denied "
                          "(run as root or as a member of daemon.socket_group)\n")
    # ... and with the mode loosened by mistake, the peer check refuses it and says so in the log
    os.chmod(d.socket, 0o666)
    try:
        res = cli_as(o_uid, o_gid, *status)
    finally:
        os.chmod(d.socket, 0o660)
    assert res.returncode == 1
    assert res.stderr == f"relayguard: permission denied: uid {o_uid} is neither root nor in group {who['group']!r}\n"
    refused = [e for e in d.events("control_refused") if e["uid"] == o_uid]
    assert refused and refused[-1]["pid"] > 0 and refused[-1]["level"] == "warning"
    assert not [e for e in d.events("control_refused") if e["uid"] == m_uid]


def test_fast_address_paths_agree_with_model() -> None:
    """handlers._net, model.net_text and store._key skip ipaddress's slow parts (inet_pton/inet_ntop);
    they must give ipaddress's answers."""

    @settings(max_examples=3000, deadline=None, derandomize=True, database=None)
    @given(st.integers(0, 2**128 - 1) | st.sampled_from([0, 1, 0xFFFF_0102_0304, 0x0102_0304, 2**128 - 1,
                                                          0x2001_0DB8 << 96, 0x64_FF9B << 96 | 0x0102_0304]),
           st.integers(0, 2**32 - 1))
    def agree(i6: int, i4: int) -> None:
        v6 = ipaddress.IPv6Address(i6)
        for text in (str(v6), v6.exploded, str(ipaddress.IPv4Address(i4))):
            net = parse_net(text)
            assert _net(text) == net
            assert net_text(net) == _key(net) == (str(net.network_address) if net.prefixlen == net.max_prefixlen
                                                  else str(net))

    agree()


# ----------------------------------------------------------------------------- nftables in a namespace


def test_nft_manual_bans_single_cidr_and_v6_reach_the_kernel(nft: DaemonProc) -> None:
    ns = nft.ns
    assert ns is not None
    res = rg("ban", "198.51.100.7", "203.0.113.0/24", "2001:db8::/64", "--for", "2h", "--socket", nft.socket)
    assert res.exit_code == 0, res.stderr
    banned4, nets4, nets6 = (nft_values(ns, s) for s in ("banned4", "nets4", "nets6"))
    assert 7000 < banned4["198.51.100.7"] <= 7200  # element timeout = remaining ban time
    assert 7000 < nets4["203.0.113.0/24"] <= 7200
    assert 7000 < nets6["2001:db8::/64"] <= 7200
    bans = listed(nft)
    assert {"198.51.100.7", "203.0.113.0/24", "2001:db8::/64"} <= set(bans)


def test_nft_ban_again_extends_never_shortens(nft: DaemonProc) -> None:
    ns = nft.ns
    assert ns is not None
    assert rg("ban", "192.0.2.88", "--for", "1h", "--socket", nft.socket).exit_code == 0
    first = listed(nft)["192.0.2.88"]
    res = rg("ban", "192.0.2.88", "--for", "3h", "--socket", nft.socket, "--json")
    assert json.loads(res.stdout)["extended"] == 1
    second = listed(nft)["192.0.2.88"]
    assert second["expires_at"] > first["expires_at"] and second["count"] == 2
    assert 10_700 < nft_values(ns, "banned4")["192.0.2.88"] <= 10_800
    assert rg("ban", "192.0.2.88", "--for", "10m", "--socket", nft.socket).exit_code == 0
    third = listed(nft)["192.0.2.88"]
    assert third["expires_at"] == second["expires_at"] and third["count"] == 3
    assert nft_values(ns, "banned4")["192.0.2.88"] > 10_000


def test_nft_auto_ban_then_unban_clears_kernel_database_and_score(nft: DaemonProc) -> None:
    ns = nft.ns
    assert ns is not None
    addr = "192.0.2.77"
    log = nft.config.parent / "mail.log"
    lines = [relay_denied(addr, n) for n in range(2)]
    with open(log, "a") as fh:
        fh.write("".join(line + "\n" for line in lines))
    wait_for("the auto ban", lambda: listed(nft).get(addr))
    assert addr in nft_values(ns, "banned4")
    why = nft.request("why", addr=addr)
    assert [e["text"] for e in why["events"]] == lines and all(e["judged"] for e in why["events"])
    wait_for("the hits on disk", lambda: _db(nft, "SELECT count(*) FROM hits WHERE addr = ?", addr) == 2)

    res = rg("unban", addr, "--socket", nft.socket)
    assert res.exit_code == 0 and res.stdout == "unbanned 1 address\n"
    assert addr not in nft_values(ns, "banned4")
    assert addr not in listed(nft)
    assert _db(nft, "SELECT active FROM bans WHERE net = ?", addr) == 0
    assert _db(nft, "SELECT count(*) FROM hits WHERE addr = ?", addr) == 0
    why = nft.request("why", addr=addr)
    assert why["ban"] is None and why["events"] == [] and all(w["score"] == 0 for w in why["windows"])
    assert len(why["history"]) == 1  # the offence is remembered for repeat-offender escalation
    res = rg("unban", addr, "--socket", nft.socket)
    assert res.exit_code == 1 and res.stderr == f"relayguard: {addr} is not banned; nothing to unban\n"


def _db(d: DaemonProc, sql: str, *params: Any) -> Any:
    db = d.config.parent / "state" / "relayguard.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute(sql, params).fetchone()[0]
    finally:
        con.close()


def test_nft_flush_empties_the_kernel_keeps_the_database_and_reload_restores(nft: DaemonProc) -> None:
    ns = nft.ns
    assert ns is not None
    assert rg("ban", "192.0.2.201", "2001:db8:201::/48", "--socket", nft.socket).exit_code == 0
    res = rg("flush", "--socket", nft.socket)
    assert res.exit_code == 0, res.stderr
    assert res.stdout.startswith("flushed: relayguard's rules are out of the kernel")
    assert not table_exists(ns)
    assert {"192.0.2.201", "2001:db8:201::/48"} <= set(listed(nft))  # the database keeps them
    assert nft.request("status")["state"] == "paused (flushed)"
    res = rg("reload", "--socket", nft.socket)
    assert res.exit_code == 0, res.stderr
    assert "192.0.2.201" in nft_values(ns, "banned4")
    assert "2001:db8:201::/48" in nft_values(ns, "nets6")
    assert nft.request("status")["state"] == "running"


def test_nft_bulk_ban_of_100000_addresses_lands_in_the_kernel(nft: DaemonProc, tmp_path: Path,
                                                               record_property: Any) -> None:
    ns = nft.ns
    assert ns is not None
    v4 = [str(a) for net in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
          for a in ipaddress.ip_network(net).hosts()]
    base = int(ipaddress.IPv6Address("2001:db8:100::"))
    v6 = [str(ipaddress.IPv6Address(base + i * 65537)) for i in range(100_000 - len(v4))]
    bulk = v4 + v6
    f = tmp_path / "bulk.txt"
    f.write_text("# 100,000 documentation addresses\n" + "\n".join(bulk) + "\n")
    argv = [sys.executable, "-m", "relayguard", "ban", "--file", str(f), "--for", "1d", "--reason", "bulk",
            "--config", str(nft.config)]
    t0 = time.monotonic()
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    ban_s = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("banned 100000 addresses for 1d")
    kernel = nft_values(ns, "banned4") | nft_values(ns, "banned6")
    assert set(bulk) <= set(kernel)
    bans = listed(nft)
    assert all(bans[a]["reason"] == "bulk" for a in bulk[:: 997])
    assert sum(1 for b in bans.values() if b["reason"] == "bulk") == 100_000

    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "relayguard", "unban", "--file", str(f), "--socket", nft.socket],
                         capture_output=True, text=True, timeout=600)
    unban_s = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    kernel = nft_values(ns, "banned4") | nft_values(ns, "banned6")
    assert not set(bulk) & set(kernel)
    record_property("bulk_ban_seconds", round(ban_s, 2))
    record_property("bulk_unban_seconds", round(unban_s, 2))
    print(f"\nbulk ban of 100,000 addresses, end to end: {ban_s:.2f} s; bulk unban: {unban_s:.2f} s")


# ----------------------------------------------------------------------------- without a daemon


def test_flush_without_a_daemon_and_a_stale_socket(tmp_path: Path) -> None:
    with namespace("ctl-stop") as ns, scratch("ctl-stop") as root:
        config = write_config(root, firewall="nftables")
        d = DaemonProc(config, ns=ns)
        try:
            assert d.request("ban", addrs=["192.0.2.9"])["banned"] == 1
            assert d.stop(signal.SIGKILL) != 0  # a crash leaves the socket file behind
            assert os.path.exists(d.socket)
            res = rg("status", "--config", str(config))
            assert res.exit_code == 1
            assert res.stderr == f"relayguard is not running: nothing accepts connections on {d.socket}\n"

            d = DaemonProc(config, ns=ns)  # the stale file is replaced
            assert d.events("control_stale_socket_removed")
            second = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "relayguard", "run",
                                     "--config", str(config)], capture_output=True, text=True, timeout=120,
                                    env={**os.environ, "TZ": "UTC"})
            assert second.returncode != 0  # a live socket is never taken over
            assert "another relayguard is answering there" in second.stderr
            assert d.request("ping") == "pong"
            assert d.stop() == 0
            assert not os.path.exists(d.socket)  # removed on a clean stop

            res = rg("status", "--config", str(config))
            assert res.exit_code == 1
            assert res.stderr == f"relayguard is not running: no socket at {d.socket}\n"
            assert "192.0.2.9" in nft_values(ns, "banned4")  # bans stay in the kernel after a stop
            res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "relayguard", "flush",
                                  "--config", str(config)], capture_output=True, text=True, timeout=120)
            assert res.returncode == 0, res.stderr
            assert res.stdout == "flushed: no daemon running; removed relayguard's nftables rules\n"
            assert not table_exists(ns)
        finally:
            d.stop()
