"""`relayguard scan` end to end on generated Postfix logs with ground truth (../shared/bench/genlog.py)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

ISO_KEYS = ("first", "last")


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "relayguard", *args], capture_output=True, text=True,
                       env={"TZ": "UTC", "PATH": "/usr/bin:/bin"})
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory, genlog_path: Path) -> Path:
    out = tmp_path_factory.mktemp("scan") / "mail.log"
    subprocess.run([sys.executable, str(genlog_path), "--lines", "150000", "--seed", "3", "--attackers", "80",
                    "--out", str(out)], check=True, capture_output=True)
    return out


def five_in_ten_minutes(stamps: list[str]) -> bool:
    t = sorted(datetime.fromisoformat(s).timestamp() for s in stamps)
    j = 0
    for i in range(len(t)):
        while t[i] - t[j] > 600:
            j += 1
        if i - j + 1 >= 5:
            return True
    return False


def test_offenders_match_ground_truth(log: Path) -> None:
    truth = json.loads(Path(f"{log}.truth.json").read_text())
    found = {o["ip"]: o for o in map(json.loads, run("scan", "--json", str(log)).stdout.splitlines())}
    must = [ip for ip, a in truth["attackers"].items() if five_in_ten_minutes(a["timestamps"])]
    slow = [ip for ip, a in truth["attackers"].items() if a["slow"]]
    assert must and slow
    assert [ip for ip in must if ip not in found] == []
    assert [ip for ip in slow if ip not in found] == []
    assert [ip for ip in truth["never_ban"] if ip in found] == []


def test_json_shape_follows_the_contract(log: Path) -> None:
    rows = [json.loads(x) for x in run("scan", "--json", str(log)).stdout.splitlines()]
    assert rows
    for o in rows:
        assert {"ip", "score", "events", "first", "last", "rules"} <= set(o)
        assert isinstance(o["score"], int) and o["score"] >= 10
        assert isinstance(o["rules"], list) and all("/" in r for r in o["rules"])
        for k in ISO_KEYS:
            assert datetime.fromisoformat(o[k]).utcoffset() is not None


def test_events_carry_file_and_one_based_line(log: Path) -> None:
    r = run("scan", "--events", "--json", "--rules", "postfix", str(log))
    events = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(events) > 1000
    lines = log.read_text().splitlines()
    for e in events[:: max(1, len(events) // 300)]:
        assert {"file", "line", "time", "ip", "rule", "service", "weight"} <= set(e)
        assert e["file"] == str(log)
        assert f"[{e['ip']}]" in lines[e["line"] - 1] or e["ip"] in lines[e["line"] - 1]
        assert datetime.fromisoformat(e["time"]).utcoffset() is not None


def test_gzip_and_plain_give_the_same_offenders(log: Path, tmp_path: Path) -> None:
    gz = tmp_path / "mail.log.1.gz"
    with gzip.open(gz, "wb") as fh:
        fh.write(log.read_bytes())
    a = run("scan", "--json", str(log)).stdout
    b = run("scan", "--json", str(gz)).stdout
    assert a == b


def test_text_table(log: Path) -> None:
    out = run("scan", str(log)).stdout
    head, first = out.splitlines()[:2]
    assert head.split()[:4] == ["ADDRESS", "SCORE", "EVENTS", "FIRST"]
    assert "=" in first  # per-rule counts


def test_events_text_has_rule_summary(tmp_path: Path) -> None:
    f = tmp_path / "m.log"
    f.write_text("Dec  3 19:56:07 mx postfix/postscreen[1]: PREGREET 11 after 0.1 from [192.0.2.7]:4711: EHLO x\\r\\n\n"
                 "junk\n")
    out = run("scan", "--events", str(f)).stdout
    assert f"{f}:1 " in out and "postfix/pregreet" in out and "events per rule:" in out


def test_threshold_and_window_flags(tmp_path: Path) -> None:
    f = tmp_path / "m.log"
    f.write_text("".join(
        f"Dec  3 19:5{i}:07 mx postfix/smtpd[1]: NOQUEUE: reject: RCPT from unknown[192.0.2.7]: 554 5.7.1 "
        f"<a@b.test>: Relay access denied; from=<x@y.test> to=<a@b.test> proto=ESMTP helo=<x>\n" for i in range(3)))
    assert run("scan", "--json", str(f)).stdout.count("192.0.2.7") == 1
    assert run("scan", "--json", "--threshold", "20", str(f)).stdout == ""
    assert run("scan", "--json", "--window", "30s", str(f)).stdout == ""


def test_missing_file_is_one_line_exit_1(tmp_path: Path) -> None:
    r = run("scan", str(tmp_path / "nope.log"), check=False)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no such file" in r.stderr


@pytest.mark.parametrize("args", [["--bogus"], ["--threshold", "x"], ["--window", "10y"], ["--rules", "nope"], []])
def test_usage_errors_exit_2(args: list[str], log: Path) -> None:
    r = run("scan", *args, *([str(log)] if args else []), check=False)
    assert r.returncode == 2, r.stderr


def _replay_offenders(paths: list[str], min_parallel: int, ignore: tuple[str, ...] = ()) -> tuple[list[tuple], tuple]:
    from relayguard.decide import Policy, allowlist
    from relayguard.model import parse_net
    from relayguard.parse import PACK_NAMES, load_packs
    from relayguard.scan import Replay
    from relayguard.score import Window

    nets = [parse_net(n) for n in ignore]
    replay = Replay(load_packs(PACK_NAMES), [Window("short", 600, 10), Window("long", 6 * 3600, 24)],
                    Policy(ignore=tuple(nets)), allowlist(nets, ignore_self=False))
    replay.run_all(paths, min_parallel=min_parallel)
    r = replay.result(paths)
    offenders = [(o.ip, o.score, o.events, o.first, o.last, sorted(o.rules.items()), o.bans) for o in r.offenders]
    return offenders, (r.lines, r.hits, r.garbage, sorted(r.by_rule.items()))


def test_every_core_finds_what_one_process_finds(log: Path, tmp_path: Path) -> None:
    """The parallel path (each core parses a share, each scores the addresses it owns) gives
    exactly the single-process result: one file cut in shares, and two files cut across."""
    import os

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: scan never forks here")
    one = _replay_offenders([str(log)], min_parallel=1 << 62)
    assert one[0] and one[1][1] > 1000
    assert _replay_offenders([str(log)], min_parallel=0) == one
    data = log.read_bytes()
    cut = data.index(b"\n", len(data) // 3) + 1
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_bytes(data[:cut])
    b.write_bytes(data[cut:])
    assert _replay_offenders([str(a), str(b)], min_parallel=0) == one
    # an ignore list: applied once per address on the parallel path, per hit on the other
    first = one[0][0][0]
    ignore = (f"{first}/{24 if '.' in first else 64}",)
    kept = _replay_offenders([str(log)], min_parallel=1 << 62, ignore=ignore)
    assert first not in {o[0] for o in kept[0]} and len(kept[0]) < len(one[0])
    assert _replay_offenders([str(log)], min_parallel=0, ignore=ignore) == kept


def test_a_failing_worker_is_one_clear_error_and_nothing_hangs(log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that dies mid-parse (here: an exception in the forked child) ends the scan with a
    ScanError carrying its message; the parent neither hangs on the pipes nor leaves a child behind."""
    import os

    from relayguard import scan as scan_mod
    from relayguard.scan import ScanError

    parent = os.getpid()

    class Failing(scan_mod.Matcher):
        def scan(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if os.getpid() != parent:
                raise OSError("disk gone")
            return super().scan(*args, **kwargs)

    def children() -> set[str]:
        return {c for t in Path("/proc/self/task").iterdir() for c in (t / "children").read_text().split()}

    before = children()
    monkeypatch.setattr(scan_mod, "Matcher", Failing)
    with pytest.raises(ScanError, match="disk gone"):
        _replay_offenders([str(log)], min_parallel=0)
    assert children() == before  # the worker was reaped, not left behind
