"""The `relayguard audit` group (relay, dnsbl, ports; alone it runs them all) and `relayguard top`.

Kept apart from cli.py; `register(main)` adds both to the main group. Every check returns JSON
lines with a "check" kind and a "severity" (docs/audit.md); here they become text or `--json`
lines, and the worst severity the exit code: 0 when every finding is ok, 1 when something is
wrong, 2 on usage errors (one line on stderr, as everywhere in relayguard).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import sys
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

import click

from relayguard.audit import AuditError, worst

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
MAX_EXPAND = 256  # addresses one CIDR argument of `audit dnsbl` may stand for


def _fail(msg: str, code: int = 1) -> NoReturn:
    click.echo(f"relayguard: {msg}", err=True)
    sys.exit(code)


def _path(ctx: click.Context) -> str:
    """"audit relay" from "relayguard audit relay" (the program name is already in front)."""
    return " ".join(ctx.command_path.split()[1:]) or ctx.command_path


class _OneLine:
    """Usage errors as one line on stderr with exit 2, as the contract wants (click prints three)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)  # type: ignore[misc]
        except click.UsageError as e:
            _fail(f"{_path(ctx)}: {e.format_message()}", 2)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)  # type: ignore[misc]
        except click.UsageError as e:
            _fail(f"{_path(ctx)}: {e.format_message()}", 2)


class Command(_OneLine, click.Command):
    pass


class Group(_OneLine, click.Group):
    command_class = Command


# ----------------------------------------------------------------------------- output


def _emit(lines: Iterable[dict[str, Any]]) -> None:
    out = sys.stdout
    for line in lines:
        out.write(json.dumps(line, separators=(", ", ": ")) + "\n")
    out.flush()


def _mark(sev: str) -> str:
    return {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}.get(sev, sev)


def _text(line: dict[str, Any]) -> list[str]:
    """A finding as the lines people read."""
    sev = _mark(line.get("severity", "ok"))
    kind = line.get("check")
    if kind == "config":
        out = [f"  {sev}  {line['message']}"]
        if line.get("fix") and line["severity"] != "ok":
            out.append(f"        setting: {line['setting']}; fix: {line['fix']}")
        return out
    if kind == "probe":
        if line["mail_from"] is None:
            return [f"  {sev}  {line['test']}: {line['verdict']}: {line['reply']}"]
        what = line.get("note") or line["verdict"]  # accepted: "accepted at RCPT (may still be discarded later)"
        reply = re.sub(r"<[^>]*>: ", "", line["reply"])  # Postfix echoes the address; it is on the line already
        return [f"  {sev}  {line['test']:<18} <{line['mail_from']}> -> <{line['rcpt_to']}>: {what}: {reply}"]
    if kind == "dnsbl":
        codes = f" {', '.join(line['codes'])}" if line["codes"] else ""
        meaning = f" ({'; '.join(m for m in line['meaning'] if m)})" if any(line.get("meaning") or ()) else ""
        info = f" see {line['info']}" if line.get("info") else ""
        return [f"  {sev}  {line['ip']:<20} {line['list']:<24} {line['status']}{codes}{meaning}{info}"]
    if kind == "fcrdns":
        detail = f"{line['name']}, forward-confirmed" if line["status"] == "ok" else line["message"]
        return [f"  {sev}  {line['ip']:<20} {'reverse DNS':<24} {detail}"]
    if kind == "helo":
        detail = "resolves here" if line["status"] == "ok" else line["message"]
        return [f"  {sev}  {line['ip']:<20} {'HELO ' + line['name']:<24} {detail}"]
    if kind == "submission":
        return [f"  {sev}  {line['service']} (port {line['port']}): AUTH {line['auth']}, TLS {line['tls']}: "
                f"{line['message']}"]
    if kind == "port":
        proc = f"{line['process']}[{line['pid']}]" if line["process"] else "?"
        addr = f"[{line['address']}]" if ":" in line["address"] else line["address"]
        return [f"  {sev}  {line['proto']:<3} {addr + ':' + str(line['port']):<28} {proc:<22} {line['note']}"]
    return [f"  {sev}  {line}"]


def _print(title: str, lines: list[dict[str, Any]]) -> None:
    click.echo(title)
    for line in lines:
        for text in _text(line):
            click.echo(text)


def _print_probe(head: str, lines: list[dict[str, Any]]) -> None:
    """Every test when something is off; one line when all were refused (the JSON has them all)."""
    if len(lines) > 1 and all(x["verdict"] == "refused" for x in lines):
        click.echo(head)
        click.echo(f"  {_mark('ok')}  all {len(lines)} relay tests refused ({', '.join(x['test'] for x in lines)}): "
                   f"{re.sub(r'<[^>]*>: ', '', lines[0]['reply'])}")
        return
    _print(head, lines)


def _exit_for(lines: Iterable[dict[str, Any]]) -> NoReturn:
    sys.exit(0 if worst(line.get("severity", "ok") for line in lines) == "ok" else 1)


def _summary(lines: list[dict[str, Any]]) -> str:
    counts = {s: sum(1 for x in lines if x.get("severity") == s) for s in ("ok", "warn", "fail")}
    return f"{counts['ok']} ok, {counts['warn']} warn, {counts['fail']} fail"


# ----------------------------------------------------------------------------- argument checks


def _address(value: str, what: str) -> str:
    """One address (a CIDR prefix is accepted when it holds exactly one)."""
    try:
        net = ipaddress.ip_network(value.strip().strip("[]"), strict=False)
    except ValueError:
        _fail(f"{what}: not an IP address: {value!r}", 2)
    if net.num_addresses != 1:
        _fail(f"{what}: give one address, not the prefix {net}", 2)
    return str(net.network_address)


def _addresses(values: Iterable[str]) -> list[str]:
    """Addresses and CIDR prefixes (up to MAX_EXPAND addresses each) as a list of addresses."""
    out: dict[str, None] = {}
    for v in values:
        try:
            net = ipaddress.ip_network(v.strip(), strict=False)
        except ValueError:
            _fail(f"not an IP address or prefix: {v!r}", 2)
        if net.num_addresses > MAX_EXPAND:
            _fail(f"{v}: {net.num_addresses} addresses; give at most {MAX_EXPAND} per prefix", 2)
        hosts = [net.network_address] if net.num_addresses == 1 else list(net)
        for a in hosts:
            mapped = getattr(a, "ipv4_mapped", None)
            out.setdefault(str(mapped or a), None)
    return list(out)


def _port_list(value: str | None, what: str) -> list[int]:
    if not value:
        return []
    try:
        ports = [int(p) for p in value.replace(" ", "").split(",") if p]
    except ValueError:
        _fail(f"{what}: not a comma-separated list of ports: {value!r}", 2)
    bad = [p for p in ports if not 0 < p < 65536]
    if bad:
        _fail(f"{what}: port out of range: {bad[0]}", 2)
    return ports


def _resolver(addr: str | None, timeout: float) -> Any:
    from relayguard.audit import dnsbl

    if addr is not None:
        try:
            dnsbl.split_hostport(addr)
        except ValueError:
            _fail(f"--resolver: not an address (IP, IP:PORT or [IPv6]:PORT): {addr!r}", 2)
    try:
        return dnsbl.resolver(addr, timeout)
    except AuditError as e:
        _fail(str(e), 2)


def _merged(ctx: click.Context, **mine: Any) -> dict[str, Any]:
    """A subcommand's options, falling back to what was given to `audit` itself."""
    parent: dict[str, Any] = ctx.obj or {}
    out = {}
    for k, v in mine.items():
        out[k] = v if v not in (None, False, ()) else parent.get(k, v)
    return out


# ----------------------------------------------------------------------------- the checks


def relay_lines(*, postfix_config: str | None, target: str | None, port: int, source_addr: str | None,
                domain: str | None, helo: str | None, timeout: float, no_probe: bool) -> tuple[list, list, str]:
    """(config lines, probe lines, probe heading)."""
    from relayguard.audit import host_interfaces, relay

    pc, config = relay.audit_config(postfix_config)
    if no_probe:
        return config, [], "probe: skipped (--no-probe)"
    host = target.strip().strip("[]") if target else relay.default_target(pc)
    res = relay.probe(host, port, source_addr=source_addr, helo=helo or "relayguard-probe.example.com",
                      domain=domain, timeout=timeout)
    note = relay.trusted_source(pc, res, host_interfaces())
    if note is not None:
        config.append(note)
        for line in res.lines:
            line["trusted_source"] = True
    who = f" from {res.source}" if res.source else ""
    server = f" ({res.server_name}, own domain {res.domain})" if res.server_name else ""
    retried = "; postscreen deferred the first session, retried" if res.retried else ""
    head = f"relay probe: {host} port {port}{who}{server}{retried}; stops before DATA, sends no mail"
    return config, res.lines, head


def _helo_name(postfix_config: str | None) -> str:
    from relayguard.audit import run

    try:
        name = run(["postconf", *(("-c", postfix_config) if postfix_config else ()), "-h", "-x", "myhostname"])
    except AuditError:
        name = ""
    return name.strip() or socket.getfqdn()


def dnsbl_lines(*, addrs: list[str], lists: list[str], resolver_addr: str | None, helo_name: str | None,
                postfix_config: str | None, timeout: float, dns_checks: bool) -> tuple[list, str]:
    """(blocklist lines, plus reverse DNS and HELO lines when dns_checks; heading)."""
    from relayguard.audit import dnsbl

    r = _resolver(resolver_addr, timeout)
    helo = helo_name or _helo_name(postfix_config)
    targets = addrs or dnsbl.default_addresses(r, helo)
    zones = lists or list(dnsbl.DEFAULT_LISTS)
    via = f"resolver {resolver_addr}" if resolver_addr else "the system resolver"
    head = f"blocklists: {len(targets)} address(es) x {len(zones)} list(s) via {via}"
    head += f"; HELO name {helo}" if dns_checks else ""
    if not targets:
        raise AuditError(f"no address to check: this host has no public address and its HELO name {helo} "
                         f"does not resolve; pass ADDR")
    return dnsbl.audit(targets, zones, r, helo if dns_checks else None, rdns=dns_checks), head


def _fold(lines: list[dict[str, Any]], into: str, kinds: tuple[str, ...], key: str) -> list[dict[str, Any]]:
    """The contract's lines of kind `into` only, each carrying the `kinds` lines that share its `key`
    as extra fields (scripts rely on one shape per line); the worst severity wins."""
    from relayguard.audit import worst

    extra = [x for x in lines if x.get("check") in kinds]
    out = []
    for line in lines:
        if line.get("check") != into:
            continue
        line = dict(line)
        for x in extra:
            if x.get(key) == line.get(key):
                line[x["check"]] = {k: v for k, v in x.items() if k not in ("check", key)}
                line["severity"] = worst((line["severity"], x["severity"]))
        out.append(line)
    return out


def ports_lines(*, allow: list[int], postfix_config: str | None) -> list[dict[str, Any]]:
    from relayguard.audit import ports, relay

    try:
        pc = relay.read_postconf(postfix_config)
    except AuditError:
        pc = None
    return ports.listening(allow) + ports.submission_lines(pc)


# ----------------------------------------------------------------------------- commands

_json = click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
_pfconf = click.option("--postfix-config", type=click.Path(file_okay=False),
                       help="Postfix config directory (postconf -c; default: Postfix's own, /etc/postfix).")
_smtp_timeout = click.option("--smtp-timeout", type=click.FloatRange(min=0.5),
                             help="Seconds to wait for each SMTP reply (default 15; postscreen may pause 6).")
_dns_timeout = click.option("--dns-timeout", type=click.FloatRange(min=0.1),
                            help="Seconds to wait for each DNS answer (default 5).")


def _relay_options(fn: Callable) -> Callable:
    for opt in reversed([
        click.option("--target", help="Server to probe (default: this host's myhostname, else its address)."),
        click.option("--port", type=click.IntRange(1, 65535), help="SMTP port to probe (default 25)."),
        click.option("--source-addr", help="Probe from this local address (one outside mynetworks)."),
        click.option("--domain", help="The server's own domain for the tricks (default: from its EHLO name)."),
        click.option("--helo", help="Name the probe gives in EHLO (default relayguard-probe.example.com)."),
        click.option("--no-probe", is_flag=True, help="Only read the configuration."),
    ]):
        fn = opt(fn)
    return fn


def _dnsbl_options(fn: Callable) -> Callable:
    for opt in reversed([
        click.option("--list", "lists", multiple=True, metavar="ZONE",
                     help="Blocklist zone; repeat for more; replaces the default lists."),
        click.option("--resolver", help="DNS server to ask (IP, IP:PORT); default: the system's."),
        click.option("--helo-name", help="The name this server sends in HELO (default: postconf myhostname)."),
    ]):
        fn = opt(fn)
    return fn


_allow = click.option("--allow", metavar="PORTS", help="Ports that may stay open to the world, e.g. 22,80,443.")


@click.group("audit", cls=Group, invoke_without_command=True, context_settings=CONTEXT)
@_json
@_pfconf
@_smtp_timeout
@_dns_timeout
@_relay_options
@_dnsbl_options
@_allow
@click.pass_context
def audit(ctx: click.Context, as_json: bool, postfix_config: str | None, smtp_timeout: float | None,
          dns_timeout: float | None, target: str | None,
          port: int | None, source_addr: str | None, domain: str | None, helo: str | None, no_probe: bool,
          lists: tuple[str, ...], resolver: str | None, helo_name: str | None, allow: str | None) -> None:
    """Check this mail host: open relay, blocklists, open ports. Alone: every check, one report.

    Exit status: 0 when every finding is ok, 1 when something is wrong, 2 on usage errors.
    Options given here also apply to the subcommand that follows.

    \b
    Examples:
      relayguard audit
      relayguard audit --json | jq -c 'select(.severity != "ok")'
      relayguard audit relay --target mx.example.org --source-addr 203.0.113.5
      relayguard audit dnsbl 192.0.2.25 2001:db8::25
      relayguard audit ports --allow 22
    """
    ctx.obj = {"as_json": as_json, "postfix_config": postfix_config, "smtp_timeout": smtp_timeout,
               "dns_timeout": dns_timeout, "target": target,
               "port": port, "source_addr": source_addr, "domain": domain, "helo": helo, "no_probe": no_probe,
               "lists": lists, "resolver": resolver, "helo_name": helo_name, "allow": allow}
    if ctx.invoked_subcommand is not None:
        return
    if source_addr:
        source_addr = _address(source_addr, "--source-addr")
    config, probe, probe_head = relay_lines(postfix_config=postfix_config, target=target, port=port or 25,
                                            source_addr=source_addr, domain=domain, helo=helo,
                                            timeout=smtp_timeout or 15.0, no_probe=no_probe)
    try:
        bl, bl_head = dnsbl_lines(addrs=[], lists=list(lists), resolver_addr=resolver, helo_name=helo_name,
                                  postfix_config=postfix_config, timeout=dns_timeout or 5.0, dns_checks=True)
    except AuditError as e:
        bl, bl_head = [{"check": "dnsbl", "ip": None, "list": None, "status": "unknown", "codes": [],
                        "severity": "warn", "meaning": [str(e)]}], "blocklists"
    pl = ports_lines(allow=_port_list(allow, "--allow"), postfix_config=postfix_config)
    everything = config + probe + bl + pl
    if as_json:
        _emit(everything)
    else:
        _print("relay: Postfix configuration", config)
        _print_probe(probe_head, probe)
        _print(bl_head, bl)
        _print("listening sockets", pl)
        click.echo(f"audit: {_summary(everything)}")
    _exit_for(everything)


@audit.command("relay", context_settings=CONTEXT)
@_json
@_pfconf
@_smtp_timeout
@_relay_options
@click.pass_context
def audit_relay(ctx: click.Context, as_json: bool, postfix_config: str | None, smtp_timeout: float | None,
                target: str | None, port: int | None, source_addr: str | None, domain: str | None,
                helo: str | None, no_probe: bool) -> None:
    """Can strangers relay through this server? Postfix config findings plus a live SMTP probe.

    The probe tries outside sender to outside recipient and the classic tricks (percent hack,
    bang path, quoted local part, source route, null sender, own domain as sender, IP literal).
    It stops before DATA (RSET, QUIT) and never sends mail. An accepted RCPT may still be
    discarded later; it is reported as accepted. From the server itself the probe is usually
    inside mynetworks: then use --source-addr, or run it from another host.

    \b
    --json lines: {"check": "config", "setting", "severity", "message", "fix"}
                  {"check": "probe", "test", "mail_from", "rcpt_to", "reply", "verdict", "severity"}
    \b
    Examples:
      relayguard audit relay
      relayguard audit relay --target mx.example.org --port 587
      relayguard audit relay --target 192.0.2.25 --source-addr 198.51.100.5 --json
    """
    o = _merged(ctx, as_json=as_json, postfix_config=postfix_config, smtp_timeout=smtp_timeout, target=target,
                port=port,
                source_addr=source_addr, domain=domain, helo=helo, no_probe=no_probe)
    src = _address(o["source_addr"], "--source-addr") if o["source_addr"] else None
    config, probe, head = relay_lines(postfix_config=o["postfix_config"], target=o["target"], port=o["port"] or 25,
                                      source_addr=src, domain=o["domain"], helo=o["helo"],
                                      timeout=o["smtp_timeout"] or 15.0, no_probe=o["no_probe"])
    if o["as_json"]:
        _emit(config + probe)
    else:
        _print("relay: Postfix configuration", config)
        _print_probe(head, probe)
        click.echo(f"relay: {_summary(config + probe)}")
    _exit_for(config + probe)


@audit.command("dnsbl", context_settings=CONTEXT)
@click.argument("addrs", nargs=-1, metavar="[ADDR]...")
@click.option("--rdns/--no-rdns", default=None,
              help="Also check reverse DNS and the HELO name (default: only for this host's own addresses).")
@_json
@_pfconf
@_dns_timeout
@_dnsbl_options
@click.pass_context
def audit_dnsbl(ctx: click.Context, addrs: tuple[str, ...], as_json: bool, postfix_config: str | None,
                dns_timeout: float | None, lists: tuple[str, ...], resolver: str | None, helo_name: str | None,
                rdns: bool | None) -> None:
    """Are this server's addresses on DNS blocklists? Plus reverse DNS and HELO name checks.

    Default addresses: the host's public addresses and the A/AAAA of its HELO name. Default
    lists: Spamhaus ZEN, SpamCop, Barracuda, PSBL, UCEPROTECT level 1. An answer in
    127.255.255.0/24 is the list refusing the query ("refused": cannot tell, e.g. through a
    public resolver), never a listing; timeouts and SERVFAIL are "unknown".

    \b
    --json lines: {"check": "dnsbl", "ip", "list", "status", "codes": [...], "meaning", "severity"}
                  {"check": "fcrdns" | "helo", "ip", "status", "severity", "message", ...}
    \b
    Examples:
      relayguard audit dnsbl
      relayguard audit dnsbl 192.0.2.25 2001:db8::25
      relayguard audit dnsbl --list zen.spamhaus.org --resolver 127.0.0.1 192.0.2.25
    """
    o = _merged(ctx, as_json=as_json, postfix_config=postfix_config, dns_timeout=dns_timeout, lists=lists,
                resolver=resolver, helo_name=helo_name)
    checks = not addrs if rdns is None else rdns
    try:
        lines, head = dnsbl_lines(addrs=_addresses(addrs), lists=list(o["lists"]), resolver_addr=o["resolver"],
                                  helo_name=o["helo_name"], postfix_config=o["postfix_config"],
                                  timeout=o["dns_timeout"] or 5.0, dns_checks=checks)
    except AuditError as e:
        _fail(str(e))
    if o["as_json"]:
        lines = _fold(lines, "dnsbl", ("fcrdns", "helo"), "ip")
        _emit(lines)
    else:
        _print(head, lines)
        click.echo(f"dnsbl: {_summary(lines)}")
    _exit_for(lines)


@audit.command("ports", context_settings=CONTEXT)
@_json
@_pfconf
@_allow
@click.pass_context
def audit_ports(ctx: click.Context, as_json: bool, postfix_config: str | None, allow: str | None) -> None:
    """Listening TCP and UDP sockets with their process; what to close; how submission is guarded.

    Mail ports (25, 465, 587, 110, 143, 993, 995, 4190) are marked; anything else listening on a
    non-loopback address is flagged "close if unused" unless --allow lists it. Needs root to name
    other users' processes.

    \b
    --json lines: {"check": "port", "proto", "address", "port", "process", "pid", "mail", "public", "severity"}
                  {"check": "submission", "service", "port", "auth", "tls", "severity", "message"}
    \b
    Examples:
      relayguard audit ports
      relayguard audit ports --allow 22,443 --json | jq -c 'select(.public)'
    """
    o = _merged(ctx, as_json=as_json, postfix_config=postfix_config, allow=allow)
    lines = ports_lines(allow=_port_list(o["allow"], "--allow"), postfix_config=o["postfix_config"])
    if o["as_json"]:
        lines = _fold(lines, "port", ("submission",), "port")
        _emit(lines)
    else:
        _print("listening sockets", lines)
        click.echo(f"ports: {_summary(lines)}")
    _exit_for(lines)


@click.command("top", cls=Command, context_settings=CONTEXT)
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@click.option("--ports", "ports_opt", default="25,465,587", show_default=True, help="Local ports to watch.")
@click.option("--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("--no-dns", is_flag=True, help="Skip reverse DNS.")
@click.option("--resolver", help="DNS server for reverse lookups (IP, IP:PORT); default: the system's.")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False),
              help="Control socket (default: daemon.socket from the config).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Config file naming the socket.")
@_json
def top(once: bool, ports_opt: str, interval: float, no_dns: bool, resolver: str | None, socket_path: str | None,
        config_path: str | None, as_json: bool) -> None:
    """Who is connected to the mail ports now: per remote address the connections, TCP states,
    reverse DNS, and relayguard's current score and ban (when the daemon runs).

    A live view refreshing every 2 s (Ctrl-C ends it); --once prints one snapshot.

    \b
    --once --json: one object per remote address:
      {"ip", "connections", "ports", "score", "banned", "states", "rdns"}
    \b
    Examples:
      relayguard top
      relayguard top --once --json | jq -c 'select(.connections > 5 and (.banned | not))'
    """
    from relayguard import control
    from relayguard.audit import top as top_mod

    ports = _port_list(ports_opt, "--ports")
    if not ports:
        _fail("--ports: give at least one port", 2)
    rdns = top_mod.ReverseDNS(None if no_dns else _resolver_or_none(resolver))
    path = socket_path or _socket_from_config(config_path)

    def ask(cmd: str, **args: Any) -> Any:
        return control.request(path, cmd, timeout=10.0, **args)

    if not once:
        if as_json:
            _fail("--json needs --once", 2)
        top_mod.live(ports, rdns, ask, interval)
        return
    try:
        problem, rows = top_mod.snapshot(ports, rdns, ask)
    except OSError as e:
        _fail(f"cannot read the connection table: {e}")
    if as_json:
        _emit(rows)
    else:
        click.echo(top_mod.render(rows, problem, ports))


def _resolver_or_none(addr: str | None) -> Any:
    """A resolver for reverse DNS; without a system resolver, none (names then show as -)."""
    from relayguard.audit import dnsbl

    if addr is not None:
        return _resolver(addr, 1.0)
    try:
        return dnsbl.resolver(None, 1.0)
    except AuditError:
        return None


def _socket_from_config(config_path: str | None) -> str:
    from relayguard.config import ConfigError, Settings, load

    explicit = config_path or os.environ.get("RELAYGUARD_CONFIG")
    try:
        if explicit or os.path.exists("/etc/relayguard/relayguard.toml"):
            return load(explicit).daemon.socket
        return Settings().daemon.socket
    except ConfigError as e:
        _fail(str(e), 2)


def register(main: click.Group) -> None:
    """Add `audit` and `top` to the relayguard command group."""
    main.add_command(audit)
    main.add_command(top)
