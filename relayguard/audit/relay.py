"""`relayguard audit relay`: can strangers relay mail through this server, or abuse its submission?

Two halves:
- config findings from Postfix's own view of its configuration (`postconf -x`, `postconf -M`,
  `postconf -Px`: main.cf with defaults, the services of master.cf and their `-o` overrides), so
  defaults and `$name` references count exactly as Postfix counts them;
- a live SMTP probe (smtplib) that tries the relay tricks spammers use and stops before DATA
  (RSET between tests, QUIT at the end): no mail is ever sent.

Each finding is a dict: config `{"check": "config", "setting", "severity", "message", "fix"}`,
probe `{"check": "probe", "test", "mail_from", "rcpt_to", "reply", "verdict", "severity"}`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import smtplib
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from relayguard.audit import AuditError, Interface, host_interfaces, run

# Restrictions that end the relay decision for a stranger (Postfix's smtpd_check.c accepts the
# same set as "working instances" of relay control).
CLOSERS = {"reject_unauth_destination", "defer_unauth_destination", "reject", "defer", "defer_if_permit",
           "check_relay_domains"}
# An OK from these tables comes from what the client *says*: anyone can forge it.
FORGEABLE = {"check_sender_access", "check_helo_access", "check_recipient_access", "check_sender_mx_access",
             "check_sender_ns_access", "check_sender_a_access", "check_helo_mx_access", "check_helo_ns_access",
             "check_helo_a_access", "check_recipient_mx_access", "check_recipient_ns_access",
             "check_recipient_a_access"}
# Permits that let more than the server's own users through.
WIDE_PERMITS = {
    "permit_mx_backup": "relays for every domain whose MX records name this host (anyone can publish those)",
    "permit_tls_all_clientcerts": "relays for anyone with any certificate a CA ever signed",
}
SERVICE_PORTS = {"smtp": 25, "submission": 587, "smtps": 465, "submissions": 465}
MAIL_PORTS_SUBMIT = (587, 465)

OUTSIDE_FROM = "relayguard-probe@example.com"
OUTSIDE_RCPT = "relay-test@example.net"
OUTSIDE_LITERAL = "198.51.100.1"  # an IP literal no real server owns
ACCEPTED_NOTE = "accepted at RCPT (may still be discarded later)"


# ----------------------------------------------------------------------------- postconf


@dataclass
class Service:
    """One master.cf entry (as `postconf -M` prints it) with its `-o` overrides."""

    name: str
    type: str
    command: str
    overrides: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.name}/{self.type}"

    @property
    def host(self) -> str | None:
        host, sep, _ = self.name.rpartition(":")
        return host.strip("[]") if sep else None

    @property
    def port(self) -> int | None:
        if self.type != "inet":
            return None
        port = self.name.rpartition(":")[2]
        if port.isdigit():
            return int(port)
        with contextlib.suppress(OSError):
            return socket.getservbyname(port, "tcp")
        return SERVICE_PORTS.get(port)


@dataclass
class Postconf:
    """Postfix's configuration as Postfix itself resolves it."""

    main: dict[str, str]  # every main.cf parameter, defaults included, $names expanded
    explicit: set[str]  # parameters set in main.cf (postconf -n)
    services: list[Service]

    def param(self, name: str, service: Service | None = None) -> str:
        if service is not None and name in service.overrides:
            return service.overrides[name]
        return self.main.get(name, "")

    def where(self, name: str, service: Service | None = None) -> str:
        """How a finding names a setting: `submission/inet: x` for a master.cf override."""
        return f"{service.key}: {name}" if service is not None and name in service.overrides else name

    def smtpd_services(self) -> list[tuple[Service, int | None]]:
        """(service, port it answers) for every smtpd that takes mail from the network.

        Behind postscreen, port 25's sessions go to the `smtpd pass` service.
        """
        out: list[tuple[Service, int | None]] = []
        screens = [s for s in self.services if s.type == "inet" and s.command == "postscreen"]
        for s in self.services:
            if s.command != "smtpd":
                continue
            if s.type == "inet":
                out.append((s, s.port))
            elif s.type == "pass" and screens:
                out.append((s, screens[0].port))
        return out


def _conf(config_dir: str | None) -> list[str]:
    return ["postconf", *(("-c", config_dir) if config_dir else ())]


def _pairs(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        name, sep, value = line.partition(" = ")
        if sep:
            out[name.strip()] = value.strip()
        elif line.rstrip().endswith(" ="):
            out[line.rstrip()[:-2].strip()] = ""
    return out


def read_postconf(config_dir: str | None = None) -> Postconf:
    """Ask postconf (main.cf expanded, explicit names, services and their overrides)."""
    base = _conf(config_dir)
    main = _pairs(run([*base, "-x"]))
    explicit = set(_pairs(run([*base, "-n"])))
    services = []
    for line in run([*base, "-M"]).splitlines():
        f = line.split()
        if len(f) >= 8 and not line.startswith("#"):
            services.append(Service(f[0], f[1], f[7]))
    by_key = {s.key: s for s in services}
    for name, value in _pairs(run([*base, "-Px"])).items():
        svc, typ, param = name.split("/", 2)
        if f"{svc}/{typ}" in by_key:
            by_key[f"{svc}/{typ}"].overrides[param] = value
    return Postconf(main, explicit, services)


# ----------------------------------------------------------------------------- restriction lists


def restriction_items(value: str) -> list[str]:
    """The restriction names in a list; table names and `{...}` inline tables are skipped."""
    out, depth, word = [], 0, ""
    for ch in value + " ":
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        elif depth == 0 and (ch.isspace() or ch == ","):
            if word and ":" not in word and not word.startswith("/"):
                out.append(word.lower())
            word = ""
            continue
        if depth == 0 and ch != "}":
            word += ch
    return out


@dataclass
class ListVerdict:
    """How one restriction list treats a stranger sending to a foreign domain."""

    state: str  # "closed", "risky" (a forgeable/wide permit comes first), "open"
    closer: str | None = None
    culprits: list[str] = field(default_factory=list)


def judge_list(value: str, mynetworks_open: bool = False) -> ListVerdict:
    """Walk a list as Postfix does for an unauthenticated stranger; `mynetworks_open`: mynetworks
    holds 0/0, so permit_mynetworks permits everyone."""
    culprits: list[str] = []
    items = restriction_items(value)
    skip = False
    for item in items:
        if skip:  # the restriction after warn_if_reject only warns
            skip = False
            continue
        if item == "warn_if_reject":
            skip = True
        elif item == "permit" or (item == "permit_mynetworks" and mynetworks_open):
            return ListVerdict("open", culprits=[*culprits, item])
        elif item in CLOSERS:
            return ListVerdict("risky" if culprits else "closed", item, culprits)
        elif item in FORGEABLE or item in WIDE_PERMITS:
            culprits.append(item)
    return ListVerdict("open", culprits=culprits)  # the end of a list permits


# ----------------------------------------------------------------------------- config findings


def finding(setting: str, severity: str, message: str, fix: str = "") -> dict[str, Any]:
    return {"check": "config", "setting": setting, "severity": severity, "message": message, "fix": fix}


def _loopback(host: str | None) -> bool:
    with contextlib.suppress(ValueError):
        return host is not None and ipaddress.ip_address(host).is_loopback
    return host == "localhost"


def _relay_finding(pc: Postconf, svc: Service, port: int | None) -> dict[str, Any]:
    label = f"{svc.key}" + (f" (port {port})" if port else "")
    nets, _ = parse_mynetworks(pc.param("mynetworks", svc))
    wide = any(n.prefixlen == 0 for n in nets)
    relay, rcpt = (judge_list(pc.param(n, svc), wide)
                   for n in ("smtpd_relay_restrictions", "smtpd_recipient_restrictions"))
    settings = {"smtpd_relay_restrictions": relay, "smtpd_recipient_restrictions": rcpt}
    # Mail passes only if every list permits: one that turns strangers away closes relaying too.
    for name in ("smtpd_client_restrictions", "smtpd_helo_restrictions", "smtpd_sender_restrictions"):
        settings[name] = judge_list(pc.param(name, svc), wide)
    clean = [n for n, v in settings.items() if v.state == "closed"]
    if clean:
        name = clean[0]
        return finding(pc.where(name, svc), "ok",
                       f"{label}: relaying closed for strangers ({settings[name].closer} in {name})")
    if relay.state == rcpt.state == "open" and _loopback(svc.host):
        return finding(pc.where("smtpd_relay_restrictions", svc), "ok",
                       f"{label}: relays whatever it gets, but listens on loopback only (local programs)")
    if wide and relay.state == rcpt.state == "open" and "permit_mynetworks" in relay.culprits + rcpt.culprits:
        return finding(pc.where("mynetworks", svc), "fail",
                       f"{label}: open relay: mynetworks holds 0/0 and permit_mynetworks comes before "
                       f"reject_unauth_destination, so anyone may send mail anywhere through this server",
                       "mynetworks = 127.0.0.0/8 [::1]/128 (plus your own networks)")
    if relay.state == rcpt.state == "open" and "permit" in relay.culprits + rcpt.culprits:
        name = "smtpd_relay_restrictions" if "permit" in relay.culprits else "smtpd_recipient_restrictions"
        return finding(pc.where(name, svc), "fail",
                       f"{label}: open relay: `permit` comes before any reject_unauth_destination, so "
                       f"anyone may send mail anywhere through this server",
                       f"put reject_unauth_destination before permit: {name} = permit_mynetworks, "
                       f"permit_sasl_authenticated, reject_unauth_destination")
    if relay.state == rcpt.state == "open":
        return finding(pc.where("smtpd_relay_restrictions", svc), "fail",
                       f"{label}: neither smtpd_relay_restrictions nor smtpd_recipient_restrictions has "
                       f"reject_unauth_destination (Postfix refuses mail then, or relays what a table allows)",
                       "smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, "
                       "reject_unauth_destination")
    culprits = sorted(set(relay.culprits + rcpt.culprits))
    why = "; ".join(WIDE_PERMITS.get(c, f"{c}: an OK there comes from what the client claims, which anyone "
                                          f"can forge") for c in culprits)
    name = "smtpd_relay_restrictions" if relay.culprits else "smtpd_recipient_restrictions"
    return finding(pc.where(name, svc), "warn",
                   f"{label}: {', '.join(culprits)} can permit before reject_unauth_destination: {why}",
                   f"move {', '.join(culprits)} after reject_unauth_destination")


def parse_mynetworks(value: str) -> tuple[list[ipaddress.IPv4Network | ipaddress.IPv6Network], list[str]]:
    """(networks, entries that are not literal networks: hostnames, files, tables)."""
    nets, other = [], []
    for entry in re.split(r"[\s,]+", value.strip()):
        if not entry or entry.startswith("!"):
            continue
        text = re.sub(r"^\[([^\]]+)\]", r"\1", entry)
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            other.append(entry)
    return nets, other


def _mynetworks_findings(pc: Postconf, own: list[Interface]) -> list[dict[str, Any]]:
    nets, other = parse_mynetworks(pc.param("mynetworks"))
    own_nets = [i.network for i in own] + [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"),
                                          ipaddress.ip_network("::ffff:127.0.0.0/104")]
    out = []
    for net in nets:
        if net.prefixlen == 0:
            out.append(finding("mynetworks", "fail",
                               f"mynetworks contains {net}: the whole internet is trusted, an open relay",
                               "list only this host's own networks, e.g. mynetworks = 127.0.0.0/8 [::1]/128"))
        elif not any(net.version == o.version and net.subnet_of(o) for o in own_nets):  # type: ignore[arg-type]
            out.append(finding("mynetworks", "warn",
                               f"mynetworks contains {net}, wider than this host's own networks: every host "
                               f"there may relay without a password",
                               "trust only your own networks; let other senders authenticate on 587"))
    for entry in other:
        out.append(finding("mynetworks", "warn", f"mynetworks entry {entry} is a name or table this audit "
                                                 f"cannot check", "review what it lists"))
    if not out:
        shown = " ".join(str(n) for n in nets) or "(empty)"
        out.append(finding("mynetworks", "ok", f"mynetworks stays within this host's networks: {shown}"))
    return out


def tls_level(pc: Postconf, svc: Service) -> str:
    """none / may / encrypt / wrapper: what TLS the service offers or demands."""
    if pc.param("smtpd_tls_wrappermode", svc) == "yes":
        return "wrapper"
    level = pc.param("smtpd_tls_security_level", svc)
    if not level:  # the legacy switches decide when the level is empty
        level = ("encrypt" if pc.param("smtpd_enforce_tls", svc) == "yes"
                 else "may" if pc.param("smtpd_use_tls", svc) == "yes" else "none")
    return level


def submission_policy(pc: Postconf, svc: Service) -> dict[str, Any]:
    """Whether a service offers/requires AUTH and TLS for it."""
    sasl = pc.param("smtpd_sasl_auth_enable", svc) == "yes"
    level = tls_level(pc, svc)
    auth_only = pc.param("smtpd_tls_auth_only", svc) == "yes"
    tls_for_auth = level in ("encrypt", "wrapper") or (auth_only and level == "may")
    auth_required = False
    for name in ("smtpd_client_restrictions", "smtpd_helo_restrictions", "smtpd_sender_restrictions",
                 "smtpd_relay_restrictions", "smtpd_recipient_restrictions"):
        items = restriction_items(pc.param(name, svc))
        if items[:2] == ["permit_sasl_authenticated", "reject"]:
            auth_required = True
    return {"auth": "required" if auth_required and sasl else "offered" if sasl else "no",
            "tls": "required" if level in ("encrypt", "wrapper") else "before auth" if tls_for_auth
            else "offered" if level == "may" else "no",
            "auth_over_tls_only": sasl and tls_for_auth, "auth_never_offered": sasl and auth_only and level == "none"}


def _submission_findings(pc: Postconf) -> list[dict[str, Any]]:
    out = []
    smtpds = pc.smtpd_services()
    for svc, port in smtpds:
        p = submission_policy(pc, svc)
        label = f"{svc.key}" + (f" (port {port})" if port else "")
        if p["auth"] == "no":
            continue
        if port == 25:
            out.append(finding(pc.where("smtpd_sasl_auth_enable", svc), "warn",
                               f"{label}: AUTH is offered on port 25, where every bot on the internet "
                               f"knocks: it invites password guessing",
                               "smtpd_sasl_auth_enable = no in main.cf; offer AUTH on 587/465 (master.cf -o)"))
        if p["auth_never_offered"]:
            out.append(finding(pc.where("smtpd_tls_auth_only", svc), "warn",
                               f"{label}: smtpd_tls_auth_only = yes but TLS is off: AUTH is never offered",
                               "set smtpd_tls_security_level = may (or encrypt) with a certificate"))
        elif not p["auth_over_tls_only"]:
            out.append(finding(pc.where("smtpd_tls_security_level", svc), "fail",
                               f"{label}: permit_sasl_authenticated without TLS required: passwords cross "
                               f"the network in clear text",
                               "-o smtpd_tls_security_level=encrypt on 587 (or smtpd_tls_auth_only = yes), "
                               "-o smtpd_tls_wrappermode=yes on 465"))
        else:
            out.append(finding(pc.where("smtpd_sasl_auth_enable", svc), "ok",
                               f"{label}: AUTH {p['auth']}, only over TLS"))
    ports = {port for _, port in smtpds}
    if not ports & set(MAIL_PORTS_SUBMIT):
        out.append(finding("master.cf", "warn",
                           "no submission service on 587 or 465: users must send through port 25, where "
                           "AUTH does not belong and many networks block outgoing connections",
                           "enable `submission inet ... smtpd` (587) with -o smtpd_tls_security_level=encrypt "
                           "-o smtpd_sasl_auth_enable=yes"))
    return out


def config_findings(pc: Postconf, own: list[Interface] | None = None) -> list[dict[str, Any]]:
    """Everything the configuration says about relaying and submission."""
    own = host_interfaces() if own is None else own
    out = [_relay_finding(pc, svc, port) for svc, port in pc.smtpd_services()]
    if not out:
        out.append(finding("master.cf", "warn", "no smtpd service in master.cf: this Postfix takes no mail from "
                                                "the network"))
    out += _mynetworks_findings(pc, own)
    out += _submission_findings(pc)
    return out


def audit_config(config_dir: str | None = None) -> tuple[Postconf | None, list[dict[str, Any]]]:
    """(Postfix's configuration, findings); a host without postconf gets one warning instead."""
    try:
        pc = read_postconf(config_dir)
    except AuditError as e:
        return None, [finding("postconf", "warn", f"cannot read the Postfix configuration: {e}; config checks "
                                                  f"skipped (only Postfix is read)",
                              "install Postfix's postconf, or pass --postfix-config DIR")]
    return pc, config_findings(pc)


# ----------------------------------------------------------------------------- live probe


@dataclass(frozen=True)
class ProbeTest:
    name: str
    mail_from: str
    rcpt_to: str


def probe_tests(domain: str, mail_from: str = OUTSIDE_FROM, rcpt_to: str = OUTSIDE_RCPT) -> list[ProbeTest]:
    """The relay tricks, each aimed at `domain` (the server's own) with a foreign final recipient."""
    local, _, foreign = rcpt_to.rpartition("@")
    return [
        ProbeTest("outside-to-outside", mail_from, rcpt_to),
        ProbeTest("percent-hack", mail_from, f"{local}%{foreign}@{domain}"),
        ProbeTest("bang-path", mail_from, f"{foreign}!{local}@{domain}"),
        ProbeTest("quoted-local-part", mail_from, f'"{rcpt_to}"@{domain}'),
        ProbeTest("source-route", mail_from, f"@{domain}:{rcpt_to}"),
        ProbeTest("null-sender", "", rcpt_to),
        ProbeTest("own-domain-sender", f"{mail_from.partition('@')[0]}@{domain}", rcpt_to),
        ProbeTest("ip-literal", mail_from, f"{local}@[{OUTSIDE_LITERAL}]"),
    ]


def verdict(code: int) -> str:
    if 200 <= code < 300:
        return "accepted"
    if 400 <= code < 500:
        return "deferred"
    if 500 <= code < 600:
        return "refused"
    return "error"


def _severity(v: str, reply: str) -> str:
    if v == "refused":
        return "ok"
    if v == "accepted":
        return "fail"
    if v == "deferred" and "relay access denied" in reply.lower():
        return "ok"  # defer_unauth_destination: a 4xx refusal of relaying
    return "warn"


def _reply_text(code: int, msg: bytes | str) -> str:
    text = msg.decode("utf-8", "replace") if isinstance(msg, bytes) else msg
    return f"{code} {' '.join(text.split())}".strip()


def _postscreen_defer(code: int, text: str) -> bool:
    """postscreen's deep protocol tests answer a new client's RCPT with 450 4.3.2, once."""
    return code == 450 and "4.3.2" in text


@dataclass
class ProbeResult:
    target: str
    port: int
    source: str | None = None  # our address as the server saw it
    server_name: str | None = None  # from the EHLO reply
    domain: str | None = None
    retried: bool = False  # postscreen deferred the first session
    lines: list[dict[str, Any]] = field(default_factory=list)


class _Session:
    """One SMTP session from `source_addr` (smtplib), EHLO done."""

    def __init__(self, target: str, port: int, source_addr: str | None, helo: str, timeout: float) -> None:
        src = (source_addr, 0) if source_addr else None
        self.smtp = smtplib.SMTP(local_hostname=helo, timeout=timeout, source_address=src)
        code, msg = self.smtp.connect(target, port)
        if code != 220:
            self.close()
            raise smtplib.SMTPConnectError(code, msg)
        code, msg = self.smtp.ehlo()
        if code != 250:
            code, msg = self.smtp.helo()
        self.ehlo = _reply_text(code, msg)
        self.source = self.smtp.sock.getsockname()[0] if self.smtp.sock else None

    def try_one(self, t: ProbeTest) -> tuple[int, str]:
        code, msg = self.smtp.docmd("MAIL", f"FROM:<{t.mail_from}>")
        if 200 <= code < 300:
            code, msg = self.smtp.docmd("RCPT", f"TO:<{t.rcpt_to}>")
        reply = _reply_text(code, msg)
        with contextlib.suppress(smtplib.SMTPException, OSError):
            self.smtp.rset()
        return code, reply

    def close(self) -> None:
        try:
            self.smtp.quit()
        except (smtplib.SMTPException, OSError):
            self.smtp.close()


def _server_domain(ehlo: str) -> str | None:
    """example.org from "250 mx.example.org ..." (the EHLO reply's first word is the host name)."""
    words = ehlo.split()
    name = words[1].rstrip(".").lower() if len(words) > 1 else ""
    labels = name.split(".")
    if len(labels) >= 3:
        return ".".join(labels[1:])
    return name if len(labels) == 2 else None


def probe(target: str, port: int = 25, *, source_addr: str | None = None, helo: str = "relayguard-probe.example.com",
          domain: str | None = None, timeout: float = 15.0, mail_from: str = OUTSIDE_FROM,
          rcpt_to: str = OUTSIDE_RCPT) -> ProbeResult:
    """Run every relay test; one session (RSET between tests), a new one when the server hangs up."""
    res = ProbeResult(target, port)
    session: _Session | None = None
    tests: list[ProbeTest] | None = None
    sessions = 0
    i = 0
    try:
        while tests is None or i < len(tests):
            if session is None:
                if sessions >= 4:  # bounded: a server that hangs up on every session
                    raise smtplib.SMTPServerDisconnected("the server keeps closing the connection")
                sessions += 1
                session = _Session(target, port, source_addr, helo, timeout)
                res.source = session.source
                res.server_name = session.ehlo.split()[1] if len(session.ehlo.split()) > 1 else None
                if tests is None:
                    res.domain = domain or _server_domain(session.ehlo) or "example.org"
                    tests = probe_tests(res.domain, mail_from, rcpt_to)
            t = tests[i]
            try:
                code, reply = session.try_one(t)
            except smtplib.SMTPServerDisconnected:
                session = None  # try this test again on a new session
                continue
            if i == 0 and not res.retried and _postscreen_defer(code, reply):
                res.retried = True  # postscreen admits us on the next connection
                session.close()
                session = None
                continue
            v = verdict(code)
            line = {"check": "probe", "test": t.name, "mail_from": t.mail_from, "rcpt_to": t.rcpt_to,
                    "reply": reply, "verdict": v, "severity": _severity(v, reply)}
            if v == "accepted":
                line["note"] = ACCEPTED_NOTE
            res.lines.append(line)
            i += 1
    except (OSError, smtplib.SMTPException) as e:
        reply = _reply_text(e.smtp_code, e.smtp_error) if isinstance(e, smtplib.SMTPResponseException) \
            else str(e) or type(e).__name__
        res.lines.append({"check": "probe", "test": "connect" if tests is None else tests[i].name,
                          "mail_from": None if tests is None else tests[i].mail_from,
                          "rcpt_to": None if tests is None else tests[i].rcpt_to,
                          "reply": f"{target} port {port}: {reply}", "verdict": "error", "severity": "warn"})
    finally:
        if session is not None:
            session.close()
    return res


def default_target(pc: Postconf | None) -> str:
    """This host's public name (what strangers connect to), else its first address, else loopback."""
    names = [pc.main.get("myhostname", "") if pc else "", socket.getfqdn()]
    for name in names:
        if "." not in name or name.startswith("localhost"):
            continue
        with contextlib.suppress(OSError):
            socket.getaddrinfo(name, 25, type=socket.SOCK_STREAM)
            return name
    own = [i.ip for i in host_interfaces() if not i.ip.is_loopback and not i.ip.is_link_local]
    return str(own[0]) if own else "127.0.0.1"


def _addresses(host: str) -> set[str]:
    try:
        return {str(ipaddress.ip_address(host.strip("[]")))}
    except ValueError:
        pass
    with contextlib.suppress(OSError):
        return {ai[4][0].split("%")[0] for ai in socket.getaddrinfo(host, None)}
    return set()


def trusted_source(pc: Postconf | None, res: ProbeResult, own: Iterable[Interface]) -> dict[str, Any] | None:
    """A warning when the probe came from inside this server's mynetworks (its results mean little)."""
    if pc is None or res.source is None:
        return None
    src = ipaddress.ip_address(res.source.removeprefix("::ffff:") if "." in res.source else res.source)
    local = {str(i.ip) for i in own} | {"127.0.0.1", "::1"}
    if not (_addresses(res.target) & local):
        return None  # another server: our mynetworks says nothing about it
    nets, _ = parse_mynetworks(pc.param("mynetworks"))
    inside = [n for n in nets if n.version == src.version and src in n]
    if not inside:
        return None
    return finding("mynetworks", "warn",
                   f"the probe connected from {src}, inside mynetworks ({inside[0]}): Postfix trusts it "
                   f"(permit_mynetworks), so an \"accepted\" below says nothing about strangers",
                   "probe from outside: --source-addr ADDR with an address of this host that is not in "
                   "mynetworks, or run `relayguard audit relay --target THIS-HOST` on another machine")
