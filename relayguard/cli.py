"""The `relayguard` command line (click). Text for people, `--json` (one object per line) for scripts.

Exit codes (contract): 0 success, 1 failed operation, 2 usage or config error; errors are one
line on stderr.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

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
    from relayguard.scan import Replay
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
    for f in files:
        try:
            replay.run(f)
        except (OSError, EOFError) as e:
            fail(f"{f}: {e}")
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
