"""The `relayguard` command line (click). Text for people, `--json` (one object per line) for scripts.

Exit codes (contract): 0 success, 1 failed operation, 2 usage or config error; errors are one
line on stderr.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import click

from relayguard import __version__
from relayguard.config import ConfigError, Settings, load
from relayguard.model import Hit, format_duration, iso, parse_duration
from relayguard.parse import PACK_NAMES, PackError, load_pack

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def fail(msg: str, code: int = 1) -> NoReturn:
    click.echo(f"relayguard: {msg}", err=True)
    sys.exit(code)


def emit_json(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, separators=(", ", ": ")) + "\n")


def _settings(path: str | None, required: bool = False) -> Settings:
    """The config from --config/$RELAYGUARD_CONFIG/default; defaults if none exists and none was asked for."""
    explicit = path or os.environ.get("RELAYGUARD_CONFIG")
    try:
        if explicit or required or os.path.exists("/etc/relayguard/relayguard.toml"):
            return load(explicit)
        return Settings()
    except ConfigError as e:
        fail(str(e), 2)


class Duration(click.ParamType):
    name = "duration"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


DURATION = Duration()


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="relayguard")
def main() -> None:
    """Blocks the bots that hammer your mail server.

    \b
    relayguard scan /var/log/mail.log       who would be banned, and why
    relayguard config check                 validate the configuration
    relayguard status                       what the running daemon is doing
    relayguard why 192.0.2.7                why an address is banned, or not
    """


# ----------------------------------------------------------------------------- scan


def _packs(rules: str | None) -> list:
    names = [r.strip() for r in rules.split(",") if r.strip()] if rules else list(PACK_NAMES)
    try:
        return [load_pack(n) for n in names]
    except (PackError, OSError) as e:
        fail(str(e), 2)


@main.command(context_settings=CONTEXT)
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Take [scoring] from this config.")
@click.option("--rules", help="Comma-separated packs (default: every pack, each on its own programs' lines).")
@click.option("--threshold", type=click.IntRange(min=1), help="Score that makes an offender (short window).")
@click.option("--window", type=DURATION, help="Short sliding window, e.g. 10m.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--events", is_flag=True, help="List every detected event instead of offenders.")
def scan(files: Sequence[str], config_path: str | None, rules: str | None, threshold: int | None,
         window: int | None, as_json: bool, events: bool) -> None:
    """Replay log files offline: who would be banned, and why.

    Uses the logs' own timestamps; needs no root, daemon or firewall. Reads plain and .gz files.

    \b
    Examples:
      relayguard scan /var/log/mail.log
      relayguard scan --json /var/log/mail.log.1 /var/log/mail.log.2.gz
      relayguard scan --events --json --rules postfix /var/log/mail.log
    """
    from relayguard.decide import Policy, allowlist
    from relayguard.scan import Replay, ScanError
    from relayguard.score import Window

    settings = _settings(config_path)
    for f in files:
        if not os.path.exists(f):
            fail(f"{f}: no such file")
        if not os.access(f, os.R_OK):
            fail(f"{f}: not readable (permission denied)")
    packs = _packs(rules)
    sc = settings.scoring
    windows = [Window("short", window or sc.window, threshold or sc.threshold),
               Window("long", max(sc.long_window, window or 0), sc.long_threshold)]
    nets = settings.ignore_nets()
    policy = Policy(sc.ban, sc.multiplier, sc.max_ban, sc.remember, tuple(nets))
    # Offline we judge someone else's log too: "this host" means nothing there, so only the list.
    allow = allowlist(nets, ignore_self=False)
    on_hit = _event_printer(as_json) if events else None
    replay = Replay(packs, windows, policy, allow, on_hit)
    try:
        replay.run_all(files)
    except ScanError as e:
        fail(str(e))
    result = replay.result(list(files))
    if events:
        if not as_json:
            _print_rule_summary(result.by_rule)
    elif as_json:
        for o in result.offenders:
            emit_json({"ip": o.ip, "score": o.score, "events": o.events, "first": iso(o.first),
                       "last": iso(o.last), "rules": sorted(o.rules), "counts": o.rules,
                       "bans": len(o.bans), "ban": format_duration(o.bans[0][1]), "slow": o.slow})
    else:
        _print_offenders(result)
    click.echo(f"{result.lines} lines, {result.hits} events, {len(result.offenders)} offenders, "
               f"{result.garbage} malformed lines skipped", err=True)


def _event_printer(as_json: bool) -> Callable[[Hit], None]:
    if as_json:
        def show(h: Hit) -> None:
            emit_json({"file": h.source, "line": h.lineno, "time": iso(h.ts), "ip": h.addr,
                       "rule": h.rule, "service": h.service, "weight": h.weight})
    else:
        def show(h: Hit) -> None:
            sys.stdout.write(f"{h.source}:{h.lineno} {iso(h.ts)} {h.addr} {h.rule} {h.weight:+d}\n")
    return show


def _print_rule_summary(by_rule: dict[str, int]) -> None:
    click.echo("\nevents per rule:")
    for rule, n in sorted(by_rule.items(), key=lambda kv: -kv[1]):
        click.echo(f"  {n:8d}  {rule}")


def _print_offenders(result) -> None:
    if not result.offenders:
        click.echo("no offenders")
        return
    w = max(len(o.ip) for o in result.offenders)
    click.echo(f"{'ADDRESS':<{w}}  SCORE  EVENTS  FIRST                      LAST                       BAN    RULES")
    for o in result.offenders:
        rules = ", ".join(f"{r.split('/', 1)[1]}={n}" for r, n in sorted(o.rules.items(), key=lambda kv: -kv[1]))
        ban = format_duration(o.bans[0][1]) + (f" (x{len(o.bans)})" if len(o.bans) > 1 else "")
        if o.slow:
            ban += " slow"
        click.echo(f"{o.ip:<{w}}  {o.score:5d}  {o.events:6d}  {iso(o.first)}  {iso(o.last)}  {ban:<6} {rules}")


# ----------------------------------------------------------------------------- the daemon


@main.command(context_settings=CONTEXT)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Config file.")
def run(config_path: str | None) -> None:
    """Run the daemon in the foreground (what the systemd unit starts).

    SIGHUP reloads the config, SIGTERM stops cleanly; bans stay in the kernel and the database.

    \b
    Example:
      relayguard run --config /etc/relayguard/relayguard.toml
    """
    from relayguard import daemon, log

    settings = _settings(config_path, required=True)
    log.configure(settings.daemon.log_format, settings.daemon.log_level)
    sys.exit(daemon.run(settings, config_path))


# ----------------------------------------------------------------------------- config


@main.group(context_settings=CONTEXT)
def config() -> None:
    """Check the configuration."""


@config.command("check", context_settings=CONTEXT)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Config file to check.")
def config_check(config_path: str | None) -> None:
    """Validate a config file and print what it would do.

    \b
    Example:
      relayguard config check --config /etc/relayguard/relayguard.toml
    """
    settings = _settings(config_path, required=True)
    for line in settings.describe():
        click.echo(line)


# ----------------------------------------------------------------------------- talking to the daemon
# These commands speak to the running daemon over its control socket (relayguard.control); only
# `flush` acts on its own, and only when no daemon runs.


def _daemon_options(fn: Callable) -> Callable:
    fn = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(fn)
    fn = click.option("--socket", "socket_path", metavar="PATH",  # a plain str: the daemon says who may connect
                      help="Control socket (default: daemon.socket from the config).")(fn)
    return click.option("--config", "config_path", type=click.Path(dir_okay=False),
                        help="Config file naming the socket.")(fn)


def _socket(socket_path: str | None, config_path: str | None) -> str:
    return socket_path or _settings(config_path).daemon.socket


def _ask(path: str, cmd: str, timeout: float = 30.0, **args: object) -> Any:
    """One request; a failure is one line on stderr and exit 1."""
    from relayguard import control

    try:
        return control.request(path, cmd, timeout=timeout, **args)
    except control.NotRunning as e:
        click.echo(str(e), err=True)
        sys.exit(1)
    except control.ControlError as e:
        fail(str(e))


def _read_addrs(addrs: Sequence[str], file: str | None) -> tuple[list[str], list[str]]:
    """Addresses from the arguments and from FILE (`-`: stdin); returns (addresses, where each came from).
    In the file: one address or CIDR per line, blank lines and `#` comments ignored."""
    out, where = list(addrs), [f"argument {i}" for i in range(1, len(addrs) + 1)]
    if file is not None:
        try:
            text = sys.stdin.read() if file == "-" else open(file, encoding="utf-8").read()  # noqa: SIM115
        except (OSError, UnicodeDecodeError) as e:
            fail(f"{file}: cannot read: {getattr(e, 'strerror', None) or e}")
        name = "stdin" if file == "-" else file
        for n, line in enumerate(text.splitlines(), 1):
            addr = line.split("#", 1)[0].strip()
            if addr:
                out.append(addr)
                where.append(f"{name} line {n}")
    if not out:
        fail("no address given (pass ADDR... or --file FILE)", 2)
    return out, where


def _located(msg: str, addrs: list[str], where: list[str]) -> str:
    """Point a "not an IP address: 'x'" reply at the line it came from."""
    for a, w in zip(addrs, where, strict=True):
        if repr(a) in msg:
            return f"{msg} ({w})"
    return msg


def _send_addrs(path: str, cmd: str, addrs: list[str], where: list[str], **args: object) -> Any:
    from relayguard import control

    try:  # a 100,000-address batch takes a few seconds on a busy host: allow for it
        return control.request(path, cmd, timeout=30.0 + len(addrs) / 1000, addrs=addrs, **args)
    except control.NotRunning as e:
        click.echo(str(e), err=True)
        sys.exit(1)
    except control.ControlError as e:
        fail(_located(str(e), addrs, where))


def _ago(ts: str | None) -> str:
    """ "in 59m" / "12m ago" for an ISO time from the daemon."""
    import time
    from datetime import datetime

    if ts is None:
        return "never"
    left = datetime.fromisoformat(ts).timestamp() - time.time()
    text = _short_duration(abs(left))
    return f"in {text}" if left >= 0 else f"{text} ago"


def _short_duration(secs: float) -> str:
    """The two largest units: 1d3h, 59m12s, 40s."""
    s, out = int(secs), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size or (unit == "s" and not out):
            out.append(f"{s // size}{unit}")
            s %= size
        if len(out) == 2:
            break
    return "".join(out)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


@main.command(context_settings=CONTEXT)
@_daemon_options
def status(config_path: str | None, socket_path: str | None, as_json: bool) -> None:
    """Daemon state: sources with lines read and lag, bans, tracked addresses.

    \b
    Examples:
      relayguard status
      relayguard status --json | jq .bans
    """
    st = _ask(_socket(socket_path, config_path), "status")
    if as_json:
        emit_json(st)
        return
    click.echo(f"relayguard {st['state']} since {st['since']} (up {_short_duration(st['uptime_s'])}), "
               f"pid {st['pid']}, firewall {st['firewall']}")
    b = st["bans"]
    click.echo(f"bans: {b['total']} active ({b['ipv4']} IPv4, {b['ipv6']} IPv6); "
               f"{st['tracked']} addresses tracked")
    db = st["database"]
    click.echo(f"database: {db['path'] or 'in memory'}, {_size(db['bytes'])}, {db['events']} events stored")
    if not st["sources"]:
        click.echo("sources: none")
    for s in st["sources"]:
        click.echo(f"source {s['name']}: {s['state']} ({s['mode']}), {s['lines']} lines read, "
                   f"{s['events']} events, lag {_size(s['lag_bytes'])}, last event {_ago(s['last_event'])}")


@main.command("list", context_settings=CONTEXT)
@_daemon_options
def list_(config_path: str | None, socket_path: str | None, as_json: bool) -> None:
    """Active bans, the soonest to expire first.

    `--json` gives one object per line:
    {"ip", "reason", "source", "banned_at", "expires_at", "count"}.

    \b
    Examples:
      relayguard list
      relayguard list --json | jq -r 'select(.source == "manual") | .ip'
    """
    bans = _ask(_socket(socket_path, config_path), "list", timeout=120.0)
    if as_json:
        out = sys.stdout
        for b in bans:
            out.write(json.dumps(b, separators=(", ", ": ")) + "\n")
        return
    if not bans:
        click.echo("no active bans")
        return
    w = max(len(b["ip"]) for b in bans)
    lines = [f"{'ADDRESS':<{w}}  {'EXPIRES':<25}  {'LEFT':>8}  SOURCE  COUNT  REASON"]
    for b in bans:
        left = "-" if b["expires_at"] is None else _ago(b["expires_at"]).removeprefix("in ")
        lines.append(f"{b['ip']:<{w}}  {b['expires_at'] or 'permanent':<25}  {left:>8}  {b['source']:<6}  "
                     f"{b['count']:5d}  {b['reason']}")
    click.echo("\n".join(lines))


@main.command(context_settings=CONTEXT)
@click.argument("addrs", nargs=-1)
@click.option("--for", "duration", type=DURATION, help="Ban length, e.g. 2d (default: scoring.ban).")
@click.option("--reason", default="manual ban", show_default=True, help="Why, shown by list and why.")
@click.option("--file", "file", type=click.Path(dir_okay=False, allow_dash=True),
              help="Read addresses from FILE (- for stdin): one per line, # comments.")
@_daemon_options
def ban(addrs: Sequence[str], duration: int | None, reason: str, file: str | None, config_path: str | None,
        socket_path: str | None, as_json: bool) -> None:
    """Ban addresses or CIDR prefixes now, in one batch.

    Banning an address again extends its ban (never shortens it). Addresses on the ignore list
    are refused, and then nothing is banned.

    \b
    Examples:
      relayguard ban 192.0.2.7 --for 2d --reason "phishing run"
      relayguard ban 203.0.113.0/24 2001:db8::/64
      relayguard ban --file blocklist.txt
      grep -h offender *.txt | relayguard ban --file -
    """
    if duration is not None and duration <= 0:
        fail("--for must be a positive duration", 2)
    items, where = _read_addrs(addrs, file)
    args: dict[str, object] = {"reason": reason}
    if duration is not None:
        args["seconds"] = duration
    res = _send_addrs(_socket(socket_path, config_path), "ban", items, where, **args)
    if as_json:
        emit_json(res)
        return
    n = res["banned"]
    click.echo(f"banned {n} address{'es' if n != 1 else ''} for {res['duration']} (until {res['expires_at']})")


@main.command(context_settings=CONTEXT)
@click.argument("addrs", nargs=-1)
@click.option("--file", "file", type=click.Path(dir_okay=False, allow_dash=True),
              help="Read addresses from FILE (- for stdin): one per line, # comments.")
@_daemon_options
def unban(addrs: Sequence[str], file: str | None, config_path: str | None, socket_path: str | None,
          as_json: bool) -> None:
    """Lift bans: out of the kernel and the database, and the address's score starts from zero.

    Exits 1 when an address given was not banned (the others are still unbanned).

    \b
    Examples:
      relayguard unban 192.0.2.7
      relayguard unban --file allowlist.txt
    """
    items, where = _read_addrs(addrs, file)
    res = _send_addrs(_socket(socket_path, config_path), "unban", items, where)
    if as_json:
        emit_json(res)
    else:
        n = len(res["unbanned"])
        click.echo(f"unbanned {n} address{'es' if n != 1 else ''}")
    missing = res["not_banned"]
    if missing:
        fail(f"not banned: {', '.join(missing[:10])}{f' and {len(missing) - 10} more' if len(missing) > 10 else ''}")


@main.command(context_settings=CONTEXT)
@click.argument("addr")
@_daemon_options
def why(addr: str, config_path: str | None, socket_path: str | None, as_json: bool) -> None:
    """Why an address is (or is not) banned: its scores, its events, its bans.

    \b
    Examples:
      relayguard why 192.0.2.7
      relayguard why --json 2001:db8::25 | jq '.events[].rule'
    """
    w = _ask(_socket(socket_path, config_path), "why", addr=addr)
    if as_json:
        emit_json(w)
        return
    click.echo(w["ip"])
    if w["ignored"]:
        click.echo(f"  on the ignore list ({w['ignored']}): never banned")
    for win in w["windows"]:
        click.echo(f"  score {win['score']} of {win['threshold']} in the last {format_duration(win['seconds'])} "
                   f"({win['name']} window)")
    ban = w["ban"]
    if ban is None:
        click.echo("  not banned")
    else:
        until = "permanently" if ban["expires_at"] is None else f"until {ban['expires_at']} ({_ago(ban['expires_at'])})"
        click.echo(f"  banned {until}: {ban['reason']} ({ban['source']}, offence {ban['count']})")
    if w["history"]:
        click.echo(f"  ban history ({len(w['history'])}):")
        for h in w["history"]:
            length = "permanent" if h["expires_at"] is None else f"until {h['expires_at']}"
            click.echo(f"    {h['banned_at']}  {length}  {h['source']}  {h['reason']}")
    if not w["events"]:
        click.echo("  no events inside the window")
        return
    click.echo(f"  events inside the {format_duration(w['span'])} window ({len(w['events'])}):")
    for e in w["events"]:
        mark = "*" if e["judged"] else " "
        click.echo(f"   {mark}{e['time']}  {e['rule']} {e['weight']:+d}  {e['file']}:{e['line']}")
        if e["text"]:
            click.echo(f"      {e['text']}")
    if any(e["judged"] for e in w["events"]):
        click.echo(f"  * judged by the ban at {w['judged_until']}: a ban resets the score, only later events count")


@main.command(context_settings=CONTEXT)
@_daemon_options
def flush(config_path: str | None, socket_path: str | None, as_json: bool) -> None:
    """Remove everything relayguard put in the kernel; the database keeps the bans.

    With a daemon running, it pauses enforcing until `relayguard reload` or a restart puts the
    bans back. Without one, it removes the firewall table or chain directly (needs root).

    \b
    Examples:
      relayguard flush
      relayguard flush --config /etc/relayguard/relayguard.toml
    """
    from relayguard import control

    settings = _settings(config_path)
    path = socket_path or settings.daemon.socket
    try:
        res = control.request(path, "flush")
    except control.NotRunning:
        res = _flush_directly(settings.daemon.firewall)
    except control.ControlError as e:
        fail(str(e))
    if as_json:
        emit_json(res)
    elif res.get("daemon", True):
        click.echo(f"flushed: relayguard's rules are out of the kernel; {res['bans_kept_in_database']} bans kept "
                   f"in the database ({res['resume']})")
    else:
        click.echo(f"flushed: no daemon running; removed relayguard's {res['firewall']} rules")


def _flush_directly(firewall: str) -> dict[str, object]:
    from relayguard import log
    from relayguard.enforce import FirewallError, load_backend

    log.configure("console", "warning")  # the backend logs its steps; here only trouble is news

    if os.geteuid() != 0:
        fail("no daemon running, and flushing the firewall directly needs root")
    try:
        load_backend(firewall).flush()
    except FirewallError as e:
        fail(str(e))
    return {"flushed": True, "daemon": False, "firewall": firewall}


@main.command(context_settings=CONTEXT)
@_daemon_options
def reload(config_path: str | None, socket_path: str | None, as_json: bool) -> None:
    """Ask the daemon to re-read its config file (as SIGHUP does); state is kept.

    \b
    Example:
      relayguard reload
    """
    res = _ask(_socket(socket_path, config_path), "reload")
    if as_json:
        emit_json(res)
        return
    added = f"; added {', '.join(res['added'])}" if res["added"] else ""
    removed = f"; removed {', '.join(res['removed'])}" if res["removed"] else ""
    n = len(res["sources"])
    click.echo(f"reloaded: {n} source{'s' if n != 1 else ''}{added}{removed}")


def _register_audit() -> None:
    from relayguard.cli_audit import register

    register(main)


_register_audit()
