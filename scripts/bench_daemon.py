"""The daemon side by side with fail2ban 1.0.2, in one run, inside network namespaces made here.

fail2ban is set up the same way: pyinotify backend, nftables action, postfix[mode=aggressive],
maxretry 2 in 10 minutes, following the same log file. Measures:
  latency     offending line appended -> address in the kernel set, seen by `nft monitor` (both
              daemons follow the same file, so every sample is taken for both at once)
  restore     bans in the database put into an empty kernel at start (relayguard: 100,000)
  memory      daemon RSS with 100,000 bans and 100,000 tracked addresses (fail2ban with its bans)
  throughput  20,000 lines/s for 60 s, 5% attack lines: does each keep up (read lag), on one core
Writes a Markdown report (--out) and prints JSON. Never touches the machine's own firewall.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def sh(*argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, text=True, capture_output=True, check=kw.pop("check", True), **kw)


@contextmanager
def namespace() -> Any:
    ns = f"rg-bench-{secrets.token_hex(3)}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns
    finally:
        out = sh("ip", "netns", "pids", ns, check=False).stdout.split()
        for pid in out:  # only what this script started runs in its namespace
            with suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        sh("ip", "netns", "del", ns, check=False)


def now_syslog() -> str:
    return time.strftime("%b %d %H:%M:%S", time.gmtime())


def pregreet(addr: str) -> str:
    return f"{now_syslog()} mx1 postfix/postscreen[99]: PREGREET 11 after 0.1 from [{addr}]:4711: EHLO x\\r\\n\n"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def tree_rss_kib(pid: int) -> int:
    """RSS of a process and its children (fail2ban-server is one process; `ip netns exec` execs)."""
    total = rss_kib(pid)
    for child in Path("/proc").glob("[0-9]*"):
        try:
            if Path(child / "stat").read_text().split()[3] == str(pid):
                total += tree_rss_kib(int(child.name))
        except OSError:
            continue
    return total


# --------------------------------------------------------------------------------------------- daemons


class Relayguard:
    def __init__(self, ns: str, work: Path, log: Path, firewall: str = "nftables", cpu: str | None = None) -> None:
        self.work = work
        self.cfg = work / "relayguard.toml"
        self.sock = work / "rg.sock"
        self.cfg.write_text(f"""[daemon]
state_dir = "{work / 'state'}"
socket = "{self.sock}"
firewall = "{firewall}"
log_format = "json"
[scoring]
ignore_self = false
max_tracked = 2000000
[[source]]
path = "{log}"
rules = ["postfix"]
start = "end"
""")
        argv = ["ip", "netns", "exec", ns, *(["taskset", "-c", cpu] if cpu else []),
                PY, "-m", "relayguard", "run", "--config", str(self.cfg)]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "TZ": "UTC"})
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            with self._cv:
                self.events.append((time.monotonic(), ev))
                self._cv.notify_all()

    def wait(self, name: str, timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for t, ev in self.events:
                    if ev.get("event") == name:
                        return t
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"relayguard: no {name}; last: {self.events[-3:]}")
                self._cv.wait(0.5)

    def status(self) -> dict[str, Any]:
        out = sh(PY, "-m", "relayguard", "status", "--json", "--socket", str(self.sock), check=False).stdout
        return json.loads(out) if out.strip() else {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


class Fail2ban:
    def __init__(self, ns: str, work: Path, log: Path, cpu: str | None = None, bantime: int = 3600) -> None:
        etc = work / "f2b-etc"
        if not etc.exists():
            shutil.copytree("/etc/fail2ban", etc)
            for d in ("jail.d", "fail2ban.d"):
                shutil.rmtree(etc / d, ignore_errors=True)
                (etc / d).mkdir()
        self.sock, self.pidfile = work / "f2b.sock", work / "f2b.pid"
        (etc / "fail2ban.local").write_text(f"""[Definition]
logtarget = {work / 'f2b.log'}
socket = {self.sock}
pidfile = {self.pidfile}
dbfile = {work / 'f2b.sqlite3'}
dbpurgeage = 30d
""")
        (etc / "jail.local").write_text(f"""[DEFAULT]
backend = pyinotify
banaction = nftables[type=allports]
banaction_allports = nftables[type=allports]
bantime = {bantime}
[postfix]
enabled = true
filter = postfix[mode=aggressive]
logpath = {log}
maxretry = 2
findtime = 600
port = smtp
""")
        self.etc = etc
        argv = ["ip", "netns", "exec", ns, *(["taskset", "-c", cpu] if cpu else []),
                "fail2ban-server", "-f", "-x", "-c", str(etc), "-s", str(self.sock), "-p", str(self.pidfile)]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ns = ns

    def client(self, *args: str, check: bool = True) -> str:
        return sh("fail2ban-client", "-c", str(self.etc), "-s", str(self.sock), *args, check=check).stdout

    def wait_ready(self, timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "pong" in self.client("ping", check=False):
                return time.monotonic()
            time.sleep(0.1)
        raise RuntimeError("fail2ban did not start")

    def stop(self) -> None:
        self.client("stop", check=False)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Monitor:
    """`nft monitor` inside the namespace: when each address first appears in any set."""

    def __init__(self, ns: str) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "nft", "monitor", "elements"],
                                     stdout=subprocess.PIPE, text=True)
        self.seen: dict[tuple[str, str], float] = {}
        self._cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        time.sleep(0.3)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            t = time.monotonic()
            if not line.startswith("add element"):
                continue
            table = line.split()[3]
            inside = line[line.find("{") + 1:line.rfind("}")]
            with self._cv:
                for part in inside.split(","):
                    addr = part.split()[0] if part.split() else ""
                    self.seen.setdefault((table, addr), t)
                self._cv.notify_all()

    def wait(self, table: str, addr: str, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        with self._cv:
            while (table, addr) not in self.seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cv.wait(left)
            return self.seen[(table, addr)]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


# --------------------------------------------------------------------------------------------- phases


def latency(work: Path, samples: int) -> dict[str, Any]:
    log = work / "lat.log"
    log.write_text("")
    with namespace() as ns:
        (work / "rg-lat").mkdir()
        rg = Relayguard(ns, work / "rg-lat", log)
        f2b = Fail2ban(ns, work, log)
        rg.wait("daemon_ready")
        f2b.wait_ready()
        time.sleep(1.0)
        mon = Monitor(ns)
        rg_ms, f2b_ms, missed = [], [], {"relayguard": 0, "fail2ban": 0}
        try:
            for i in range(samples):
                addr = f"203.0.113.{i + 1}"
                with log.open("a") as fh:
                    t0 = time.monotonic()
                    fh.write(pregreet(addr) + pregreet(addr))
                a = mon.wait("relayguard", addr, 5)
                b = mon.wait("f2b-table", addr, 10)
                for name, t, out in (("relayguard", a, rg_ms), ("fail2ban", b, f2b_ms)):
                    if t is None:
                        missed[name] += 1
                    else:
                        out.append((t - t0) * 1000)
                time.sleep(0.2)
        finally:
            mon.stop()
            rg.stop()
            f2b.stop()

    def summary(xs: list[float]) -> dict[str, Any]:
        return {"n": len(xs), "p50_ms": round(statistics.median(xs), 1) if xs else None,
                "max_ms": round(max(xs), 1) if xs else None}

    return {"relayguard": summary(rg_ms), "fail2ban": summary(f2b_ms), "missed": missed}


def seed_bans(db: Path, n: int) -> list[str]:
    """n active bans straight into relayguard's database (through its Store)."""
    from relayguard.model import Ban, parse_net
    from relayguard.store import Store

    base = int(ipaddress.IPv6Address("2001:db8:100::"))
    addrs = [str(ipaddress.IPv6Address(base + i)) for i in range(n)]
    now = time.time()
    with Store.open(str(db)) as st:
        st.record_bans([Ban(parse_net(a), now + 86400, "bench", "manual", now) for a in addrs])
    return addrs


def restore_and_memory(work: Path, n: int, tracked: int) -> dict[str, Any]:
    rdir = work / "rg-restore"
    (rdir / "state").mkdir(parents=True)
    seed_bans(rdir / "state" / "relayguard.db", n)
    log = work / "restore.log"
    log.write_text("")
    res: dict[str, Any] = {}
    with namespace() as ns:
        rg = Relayguard(ns, rdir, log)
        t_ready = rg.wait("firewall_reconciled", timeout=300)
        res["relayguard_restore_s"] = round(t_ready - rg.t0, 2)
        rg.wait("daemon_ready")
        count = sh("ip", "netns", "exec", ns, "nft", "-j", "list", "set", "inet", "relayguard", "banned6").stdout
        res["relayguard_restored_in_kernel"] = sum(
            len(o["set"].get("elem", [])) for o in json.loads(count)["nftables"] if "set" in o)
        # tracked addresses: one weak event each (a lost connection weighs 2, far below 10)
        with log.open("a") as fh:
            ts = now_syslog()
            base = int(ipaddress.IPv6Address("2001:db8:400::"))
            for i in range(tracked):
                a = ipaddress.IPv6Address(base + i)
                fh.write(f"{ts} mx1 postfix/smtpd[5]: lost connection after CONNECT from unknown[{a}]\n")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            st = rg.status()
            if st.get("tracked", 0) >= tracked:
                break
            time.sleep(0.5)
        res["relayguard_tracked"] = rg.status().get("tracked")
        res["relayguard_rss_mib"] = round(tree_rss_kib(rg.proc.pid) / 1024, 1)
        res["relayguard_bans"] = n
        rg.stop()
    return res


def fail2ban_restore(work: Path, n: int) -> dict[str, Any]:
    """fail2ban restores its bans one `nft` process per address: time n of them at start."""
    log = work / "f2b-restore.log"
    log.write_text("")
    fwork = work / "f2b-restore"
    fwork.mkdir()
    res: dict[str, Any] = {}
    with namespace() as ns:
        f2b = Fail2ban(ns, fwork, log, bantime=86400)
        f2b.wait_ready()
        base = int(ipaddress.IPv6Address("2001:db8:300::"))
        addrs = [str(ipaddress.IPv6Address(base + i)) for i in range(n)]
        t0 = time.monotonic()
        for i in range(0, n, 500):
            f2b.client("set", "postfix", "banip", *addrs[i:i + 500])
        res["fail2ban_banip_per_s"] = round(n / (time.monotonic() - t0), 1)
        f2b.stop()
    with namespace() as ns:  # a new, empty kernel: fail2ban puts its database back
        f2b = Fail2ban(ns, fwork, log, bantime=86400)
        f2b.wait_ready()
        t0 = f2b.t0
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            out = sh("ip", "netns", "exec", ns, "nft", "-j", "list", "set", "inet", "f2b-table",
                     "addr6-set-postfix", check=False).stdout
            got = sum(len(o["set"].get("elem", [])) for o in json.loads(out)["nftables"] if "set" in o) if out else 0
            if got >= n:
                break
            time.sleep(0.5)
        res["fail2ban_restore_s"] = round(time.monotonic() - t0, 2)
        res["fail2ban_restored"] = got
        res["fail2ban_bans"] = n
        res["fail2ban_rss_mib"] = round(tree_rss_kib(f2b.proc.pid) / 1024, 1)
        f2b.stop()
    return res


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _write_stream(log: Path, lines: list[bytes], rate: int, seconds: int,
                  sample: Any = None) -> tuple[int, float]:
    """Appends lines at `rate` per second for `seconds`; calls sample() every second. (lines, wall s)"""
    t0 = time.monotonic()
    step = 0.05
    per = max(1, int(rate * step))
    i = 0
    next_sample = t0 + 1
    with log.open("ab") as fh:
        while time.monotonic() - t0 < seconds:
            # today's time on every line, so both daemons judge them as live (fail2ban skips old lines)
            ts = time.strftime("%b %d %H:%M:%S", time.gmtime()).encode()
            fh.write(b"".join(ts + lines[(i + k) % len(lines)][15:] for k in range(per)))
            fh.flush()
            i += per
            if sample is not None and time.monotonic() >= next_sample:
                sample()
                next_sample += 1
            time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
    return i, time.monotonic() - t0


def _settle(pid: int, limit: float = 300) -> float:
    """Seconds until the process stops using CPU (it has read everything), at most `limit`."""
    t0 = time.monotonic()
    last = cpu_seconds(pid)
    quiet_since = None
    while time.monotonic() - t0 < limit:
        time.sleep(0.25)
        now = cpu_seconds(pid)
        if now - last < 0.02:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= 1.0:
                return round(quiet_since - t0, 2)
        else:
            quiet_since = None
        last = now
    return float("inf")


def throughput(work: Path, source: Path, rate: int, seconds: int) -> dict[str, Any]:
    """Each daemon alone on core 1 (the writer on core 0), the same stream, one after the other."""
    lines = source.read_bytes().splitlines(keepends=True)
    res: dict[str, Any] = {"rate_lines_per_s": rate, "seconds": seconds}
    os.sched_setaffinity(0, {0})
    log = work / "tp-rg.log"
    log.write_text("")
    with namespace() as ns:
        (work / "rg-tp").mkdir()
        rg = Relayguard(ns, work / "rg-tp", log, cpu="1")
        rg.wait("daemon_ready")
        lags: list[int] = []

        def sample() -> None:
            st = rg.status()
            lags.append(sum(s.get("lag_bytes", 0) for s in st.get("sources", [])))

        cpu0 = cpu_seconds(rg.proc.pid)
        n, wall = _write_stream(log, lines, rate, seconds, sample)
        res["relayguard_catch_up_s"] = _settle(rg.proc.pid)
        bps = log.stat().st_size / wall
        res["written_lines"] = n
        res["relayguard_max_lag_s"] = round(max(lags, default=0) / bps, 3)
        res["relayguard_cpu_share"] = round((cpu_seconds(rg.proc.pid) - cpu0) / wall, 2)
        res["relayguard_rss_mib"] = round(tree_rss_kib(rg.proc.pid) / 1024, 1)
        rg.stop()
    log = work / "tp-f2b.log"
    log.write_text("")
    with namespace() as ns:
        fwork = work / "f2b-tp"
        fwork.mkdir()
        f2b = Fail2ban(ns, fwork, log, cpu="1")
        f2b.wait_ready()
        pid = int(f2b.pidfile.read_text()) if f2b.pidfile.exists() else f2b.proc.pid
        cpu0 = cpu_seconds(pid)
        n, wall = _write_stream(log, lines, rate, seconds)
        res["fail2ban_catch_up_s"] = _settle(pid)
        res["fail2ban_cpu_share"] = round((cpu_seconds(pid) - cpu0) / wall, 2)
        res["fail2ban_rss_mib"] = round(tree_rss_kib(pid) / 1024, 1)
        f2b.stop()
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--bans", type=int, default=100_000)
    ap.add_argument("--tracked", type=int, default=100_000)
    ap.add_argument("--f2b-bans", type=int, default=2000)
    ap.add_argument("--rate", type=int, default=20_000)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--source", help="log lines for the throughput phase (default: genlog.py, 5%% attack lines)")
    ap.add_argument("--only", default="latency,restore,f2b_restore,throughput")
    ap.add_argument("--out", help="write the JSON result here")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_daemon: run as root (network namespaces)", file=sys.stderr)
        return 2
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rg-bench-") as d:
        work = Path(d)
        work.chmod(0o755)
        only = a.only.split(",")
        if "latency" in only:
            out["latency"] = latency(work, a.samples)
        if "restore" in only:
            out["restore_memory"] = restore_and_memory(work, a.bans, a.tracked)
        if "f2b_restore" in only:
            out["fail2ban_restore"] = fail2ban_restore(work, a.f2b_bans)
        if "throughput" in only:
            source = Path(a.source) if a.source else work / "tp-source.log"
            if not a.source:  # a realistic stream with 5% attack lines, from the shared generator
                sh(sys.executable, str(ROOT.parent / "shared" / "bench" / "genlog.py"), "--lines", "300000",
                   "--seed", "2", "--attack-frac", "0.05", "--out", str(source))
            out["throughput"] = throughput(work, source, a.rate, a.seconds)
    print(json.dumps(out, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
