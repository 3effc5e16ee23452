"""The TOML configuration: schema, defaults and every validation, in one place.

`load(path)` returns a frozen `Settings` or raises `ConfigError`, whose message is one line naming
the file, the key and the fix. Types are msgspec Structs: msgspec does the type checking and names
the key path; the checks it cannot know (durations, CIDRs, pack names) run in `dec_hook` and
`_check`, so their errors carry the key path too.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import msgspec

from relayguard.model import Network, format_duration, parse_duration, parse_net

DEFAULT_PATH = "/etc/relayguard/relayguard.toml"
PACKS = ("postfix", "exim", "sendmail", "dovecot", "opensmtpd", "sshd")


class ConfigError(Exception):
    """A config problem, already phrased as one line: file, key, fix."""


class Seconds(int):
    """A duration in seconds; TOML may spell it `600`, `"10m"`, `"1h"`, ..."""


class Cidr(str):
    """An address or CIDR prefix, kept as text and checked on load."""


class Daemon(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    state_dir: str = "/var/lib/relayguard"
    socket: str = "/run/relayguard/relayguard.sock"
    socket_group: str = "root"
    firewall: Literal["nftables", "iptables", "dry-run"] = "nftables"
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class Scoring(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    window: Seconds = Seconds(600)
    threshold: int = 10
    # The long window catches slow attackers who pace themselves under `window`.
    long_window: Seconds = Seconds(6 * 3600)
    long_threshold: int = 24
    ban: Seconds = Seconds(3600)
    multiplier: float = 4.0
    max_ban: Seconds = Seconds(30 * 86400)
    remember: Seconds = Seconds(30 * 86400)
    ignore: tuple[Cidr, ...] = (Cidr("127.0.0.0/8"), Cidr("::1"))
    ignore_self: bool = True
    max_tracked: int = 1_000_000


class Source(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    path: str | None = None
    journal: bool = False
    matches: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()
    start: Literal["end", "beginning"] = "end"
    trusted_only: bool = True
    window: Seconds | None = None
    threshold: int | None = None
    ban: Seconds | None = None

    @property
    def name(self) -> str:
        return self.path or "journal"


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    daemon: Daemon = Daemon()
    scoring: Scoring = Scoring()
    source: tuple[Source, ...] = ()
    path: str = ""  # where this was loaded from (not a TOML key)

    def ignore_nets(self) -> list[Network]:
        return [parse_net(c) for c in self.scoring.ignore]

    def describe(self) -> list[str]:
        """What this config would do, for `relayguard config check`."""
        s = self.scoring
        out = [
            f"config {self.path or '(defaults)'}",
            f"firewall {self.daemon.firewall}; state in {self.daemon.state_dir}; socket {self.daemon.socket}",
            f"ban at {s.threshold} within {format_duration(s.window)}, or {s.long_threshold} within "
            f"{format_duration(s.long_window)}; first ban {format_duration(s.ban)}, x{s.multiplier:g} per repeat "
            f"within {format_duration(s.remember)}, at most {format_duration(s.max_ban)}",
            f"never banned: {', '.join(s.ignore) or '-'}{' plus this host' if s.ignore_self else ''}",
        ]
        for src in self.source:
            packs = ", ".join(src.rules) or "all packs, by program name"
            if src.journal:
                where = f"journal matching {', '.join(src.matches) or 'all'}"
            else:
                where = f"{src.path} ({_exists(src.path or '')})"
            extra = []
            if src.window is not None:
                extra.append(f"window {format_duration(src.window)}")
            if src.threshold is not None:
                extra.append(f"threshold {src.threshold}")
            if src.ban is not None:
                extra.append(f"ban {format_duration(src.ban)}")
            out.append(f"source {where}: {packs}{'; ' + ', '.join(extra) if extra else ''}")
        if not self.source:
            out.append("no [[source]]: nothing will be read")
        return out


def _exists(pattern: str) -> str:
    if any(ch in pattern for ch in "*?["):
        n = len(list(Path("/").glob(pattern.lstrip("/"))))
        return f"glob, {n} match{'es' if n != 1 else ''} now"
    return "exists" if os.path.exists(pattern) else "missing now; followed once it appears"


def _dec_hook(typ: type, obj: object) -> object:
    if typ is Seconds:
        if not isinstance(obj, str | int | float) or isinstance(obj, bool):
            raise ValueError(f"expected a duration like 600, \"10m\" or \"1h\", got {obj!r}")
        return Seconds(parse_duration(obj))
    if typ is Cidr:
        if not isinstance(obj, str):
            raise ValueError(f"expected an address or CIDR as a string, got {obj!r}")
        parse_net(obj)
        return Cidr(obj)
    raise NotImplementedError


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")
_FIXES = {
    "unknown field": "remove it or correct its spelling",
    "Expected `int`": "write a whole number",
    "Expected `bool`": "write true or false",
    "Expected `str`": "write a quoted string",
    "Expected `array`": "write a list, e.g. [\"a\", \"b\"]",
    "Expected `object`": "write a table",
    "Expected `float`": "write a number",
    "Expected `str` matching": "use one of the values listed",
    "Invalid enum value": "use one of the values listed",
    "not a duration": 'write a duration like 600, "10m", "1h" or "2d"',
    "not an IP address": 'write an address or prefix like "192.0.2.7" or "2001:db8::/32"',
}


def _explain(file: str, err: msgspec.ValidationError) -> ConfigError:
    m = _AT.match(str(err))
    msg = m.group("msg") if m else str(err)
    path = (m.group("path") or "") if m else ""
    key = re.sub(r"\[(\d+)\]", lambda g: f"[{int(g.group(1)) + 1}]", path.lstrip(".")) or "(top level)"
    field = re.search(r"unknown field `([^`]+)`", msg)
    fix = next((f for k, f in _FIXES.items() if k in msg), "see etc/relayguard.toml for the accepted values")
    if field:
        name = field.group(1)
        known = _known_keys(key)
        key = f"{key}.{name}" if key != "(top level)" else name
        msg = "unknown key"
        close = difflib.get_close_matches(name, known, n=1)
        fix = f"did you mean {close[0]!r}?" if close else f"remove it; known keys here: {', '.join(known)}"
    if "Invalid enum value" in msg:
        msg = msg + " (allowed: " + _allowed(key) + ")"
    return ConfigError(f"{file}: {key}: {msg}; fix: {fix}")


def _known_keys(section: str) -> list[str]:
    struct = {"daemon": Daemon, "scoring": Scoring}.get(section.split("[")[0], Source if "source" in section
                                                          else Settings)
    return [f for f in struct.__struct_fields__ if f != "path" or struct is not Settings]


def _allowed(key: str) -> str:
    options = {
        "daemon.firewall": "nftables, iptables, dry-run",
        "daemon.log_format": "auto, console, json",
        "daemon.log_level": "debug, info, warning, error",
    }
    if key.endswith(".start"):
        return "end, beginning"
    return options.get(key, "see etc/relayguard.toml")


def _check_pack(path: str, key: str, bad: Callable[[str, str, str], ConfigError]) -> None:
    from relayguard.parse import PackError, load_pack  # here: the regex engines load only when needed

    try:
        load_pack(path)
    except OSError as e:
        raise bad(key, f"cannot read rule pack {path}: {e.strerror}", "give the path of a readable pack file") from None
    except (PackError, ValueError) as e:  # ValueError: TOML that does not parse
        raise bad(key, f"rule pack {e}", "correct the pack (docs/rules.md)") from None


def _check(file: str, s: Settings) -> None:
    def bad(key: str, msg: str, fix: str) -> ConfigError:
        return ConfigError(f"{file}: {key}: {msg}; fix: {fix}")

    sc = s.scoring
    for key, val in (("threshold", sc.threshold), ("long_threshold", sc.long_threshold)):
        if val < 1:
            raise bad(f"scoring.{key}", f"must be at least 1, got {val}", f"set {key} = 10 or more")
    for key, secs in (("window", sc.window), ("long_window", sc.long_window), ("ban", sc.ban)):
        if secs < 1:
            raise bad(f"scoring.{key}", "must be at least 1 second", f'set {key} = "10m" or similar')
    if sc.long_window < sc.window:
        raise bad("scoring.long_window", "is shorter than scoring.window", "make long_window at least window")
    if sc.multiplier < 1:
        raise bad("scoring.multiplier", f"must be at least 1, got {sc.multiplier}", "set multiplier = 2")
    if sc.max_ban < sc.ban:
        raise bad("scoring.max_ban", "is shorter than scoring.ban", "make max_ban at least ban")
    for i, src in enumerate(s.source, 1):
        key = f"source[{i}]"
        if src.journal == bool(src.path):
            raise bad(key, "needs either path = \"...\" or journal = true", "set exactly one of them")
        for pack in src.rules:
            if "/" in pack or pack.endswith(".toml"):  # a local pack: it must load, checked now
                _check_pack(pack, f"{key}.rules", bad)
            elif pack not in PACKS:
                raise bad(f"{key}.rules", f"unknown rule pack {pack!r}",
                          f"use some of: {', '.join(PACKS)}, or the path of a pack file (docs/rules.md)")
        if src.threshold is not None and src.threshold < 1:
            raise bad(f"{key}.threshold", f"must be at least 1, got {src.threshold}", "set threshold = 10")
        if src.window is not None and src.window < 1:
            raise bad(f"{key}.window", "must be at least 1 second", 'set window = "10m"')


def loads(text: str, file: str = "<string>") -> Settings:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{file}: not valid TOML: {e}; fix: correct the syntax at that line") from None
    try:
        settings = msgspec.convert(raw, Settings, dec_hook=_dec_hook)
    except msgspec.ValidationError as e:
        raise _explain(file, e) from None
    settings = msgspec.structs.replace(settings, path=file)
    _check(file, settings)
    return settings


def load(path: str | os.PathLike[str] | None = None) -> Settings:
    """Load `path`, else $RELAYGUARD_CONFIG, else the default path."""
    file = str(path or os.environ.get("RELAYGUARD_CONFIG") or DEFAULT_PATH)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file; fix: create it (see etc/relayguard.toml) or pass --config") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: cannot read: {e}; fix: check its permissions and encoding") from None
    return loads(text, file)


def packs_for(sources: Sequence[Source]) -> tuple[str, ...]:
    """Every pack the sources need (an empty `rules` means all packs)."""
    names: list[str] = []
    for src in sources:
        for p in src.rules or PACKS:
            if p not in names:
                names.append(p)
    return tuple(names)
