"""The Postfix pack against a real Postfix: real attacks from a namespace, real log lines, real Hits.

One PostfixLab (tests/postfix_harness.py) per module: postscreen on 25, submission with Dovecot
SASL on 587. An attacker (IPv4 and IPv6) runs the attacks bots run, a legitimate client sends mail;
then Postfix's own maillog goes through `Matcher([load_pack("postfix")])` and each attack must
give its rule for the attacker's address, while the client's and the server's addresses, and every
address an attacker slipped into HELO, MAIL FROM, RCPT TO or a SASL user name, are never blamed.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from postfix_harness import PostfixLab

from relayguard.model import Hit
from relayguard.parse import Matcher, load_pack

pytestmark = pytest.mark.postfix

FAMILIES = (4, 6)
# Addresses an attacker writes into client-controlled text; no Hit may ever name them.
INJECTED = {4: ("192.0.2.99", "198.51.100.99"), 6: ("2001:db8:bad::99", "2001:db8:10::99")}
HARVEST = ["nobody1", "webmaster2", "sales3"]
CREDIT = "postfix/message-accepted"


@dataclass
class Run:
    """What the attacks left: the lines each step waited for, the whole log, and its Hits."""

    lab: PostfixLab
    steps: dict[tuple[str, int], list[str]] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    hits: list[Hit] = field(default_factory=list)

    def hits_on(self, line: str) -> list[Hit]:
        return [h for h in self.hits if h.text == line]


def _injections(lab: PostfixLab, family: int) -> dict[str, str]:
    """HELO/sender/recipient text that imitates Postfix's own "name[addr]" fields."""
    fake, legit = INJECTED[family][0], lab.addr(lab.client_ns, family)
    return {
        # The legitimate client's address as HELO: framing it must not work.
        "helo": f"[{legit}]" if family == 4 else f"[IPv6:{legit}]",
        "sender": f'"unknown[{fake}]: 554 5.7.1 x"@outside.test',
        "rcpt": f'"x]: Relay access denied; unknown[{INJECTED[family][1]}]"@elsewhere.test',
    }


def _attacker(lab: PostfixLab, family: int) -> dict[tuple[str, int], list[str]]:
    """Port 25: postscreen's tests first (failing them keeps postscreen testing), then smtpd."""
    ns, out = lab.attacker_ns, {}
    out["pregreet", family] = [lab.pregreet(ns, family)]
    out["non-smtp", family] = [lab.postscreen_non_smtp(ns, family)]
    out["ps-pipelining", family] = [lab.postscreen_pipelining(ns, family)]
    out["bare-newline", family] = [lab.postscreen_bare_newline(ns, family)]
    lab.pass_postscreen(ns, family)  # from now on port 25 reaches smtpd
    out["relay", family] = [lab.relay_attempt(ns, family, **_injections(lab, family))]
    out["unknown-user", family] = lab.unknown_recipients(ns, family, HARVEST)
    out["lost-ehlo", family] = [lab.lost_connection(ns, family, after="EHLO")]
    out["lost-connect", family] = [lab.lost_connection(ns, family, after="CONNECT")]
    return out


def _submission_attacker(lab: PostfixLab, family: int) -> dict[tuple[str, int], list[str]]:
    """Port 587 (no postscreen): pipelining before the greeting, then password guessing."""
    ns, fake = lab.attacker_ns, INJECTED[family][0]
    out = {("smtpd-pipelining", family): [lab.smtpd_pipelining(ns, family)]}
    out["sasl", family] = lab.auth_failures(ns, family, [
        (lab.sasl_user, "wrong password"),
        # A user name built like Postfix's own warning, naming another address.
        (f"x unknown[{fake}]: SASL PLAIN authentication failed: x", "guess"),
    ])
    return out


def _client(lab: PostfixLab, family: int) -> dict[tuple[str, int], list[str]]:
    """The legitimate client: passes postscreen, delivers to a local user, and sends via 587."""
    ns = lab.client_ns
    lab.pass_postscreen(ns, family)
    mx = lab.send_mail(ns, family, f"{lab.local_users[family == 6]}@example.org")
    sub = lab.send_mail(ns, family, "friend@elsewhere.test", port=587,
                        login=(lab.sasl_user, lab.sasl_password), sender="carol@example.org")
    return {("client", family): [mx, sub]}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostfixLab]:
    with PostfixLab(tmp_path_factory.mktemp("postfix")) as lab:
        yield lab


@pytest.fixture(scope="module")
def run(lab: PostfixLab) -> Run:
    """All attacks and the client's mail, concurrently per family and port (each step waits for its line)."""
    r = Run(lab)
    jobs = [(f, lab, fam) for fam in FAMILIES for f in (_attacker, _submission_attacker, _client)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        for steps in pool.map(lambda j: j[0](j[1], j[2]), jobs):
            r.steps.update(steps)
    # Postfix logs the session's end ("disconnect ...") after the lines the steps waited for.
    for fam in FAMILIES:
        lab.wait_for(rf"disconnect from unknown\[{re.escape(lab.addr(lab.attacker_ns, fam))}\] .*auth=0/2")
    r.lines = lab.log_lines()
    matcher = Matcher([load_pack("postfix")])
    r.hits = list(matcher.scan("".join(f"{ln}\n" for ln in r.lines).encode(), source=str(lab.maillog)))
    return r


# (step, rule the step's line must give)
EXPECTED = [
    ("pregreet", "postfix/pregreet"),
    ("non-smtp", "postfix/postscreen-non-smtp"),
    ("ps-pipelining", "postfix/postscreen-pipelining"),
    ("bare-newline", "postfix/postscreen-bare-newline"),
    ("relay", "postfix/relay-denied"),
    ("unknown-user", "postfix/user-unknown"),
    ("lost-ehlo", "postfix/lost-connection"),
    ("lost-connect", "postfix/lost-connection"),
    ("smtpd-pipelining", "postfix/improper-pipelining"),
    ("sasl", "postfix/sasl-failed"),
]


@pytest.mark.parametrize("family", FAMILIES, ids=["ipv4", "ipv6"])
@pytest.mark.parametrize(("step", "rule"), EXPECTED, ids=[s for s, _ in EXPECTED])
def test_attack_line_gives_rule_for_attacker(run: Run, step: str, rule: str, family: int) -> None:
    attacker = run.lab.addr(run.lab.attacker_ns, family)
    for line in run.steps[step, family]:
        got = [(h.rule, h.addr) for h in run.hits_on(line)]
        assert (rule, attacker) in got, f"real line not matched as {rule} for {attacker}:\n{line}\ngot {got}"


@pytest.mark.parametrize("family", FAMILIES, ids=["ipv4", "ipv6"])
def test_harvest_counts_each_recipient(run: Run, family: int) -> None:
    attacker = run.lab.addr(run.lab.attacker_ns, family)
    keys = {h.key for h in run.hits if h.rule == "postfix/user-unknown" and h.addr == attacker
            and "smtpd[" in h.text and "/submission/" not in h.text}
    assert keys == {f"{n}@example.org" for n in HARVEST}


@pytest.mark.parametrize("family", FAMILIES, ids=["ipv4", "ipv6"])
def test_sasl_failures_key_on_user_and_blame_attacker(run: Run, family: int) -> None:
    attacker = run.lab.addr(run.lab.attacker_ns, family)
    sasl = [h for h in run.hits if h.rule == "postfix/sasl-failed" and h.addr == attacker]
    assert len(sasl) == 2
    assert sasl[0].key == run.lab.sasl_user
    assert INJECTED[family][0] in (sasl[1].key or "")  # the forged name is the user key, nothing more
    ends = [h for h in run.hits if h.rule == "postfix/auth-failed-disconnect" and h.addr == attacker]
    assert len(ends) == 1


@pytest.mark.parametrize("family", FAMILIES, ids=["ipv4", "ipv6"])
def test_legitimate_client_gets_only_credit(run: Run, family: int) -> None:
    client = run.lab.addr(run.lab.client_ns, family)
    mine = [h for h in run.hits if h.addr == client]
    assert [(h.rule, h.weight) for h in mine] == [(CREDIT, -4), (CREDIT, -4)]
    assert {h.text for h in mine} == set(run.steps["client", family])


def test_server_address_never_blamed(run: Run) -> None:
    server = {run.lab.mx_addr4, run.lab.mx_addr6}
    assert not [h.text for h in run.hits if h.addr in server]


def test_injected_addresses_never_blamed(run: Run) -> None:
    injected = {a for pair in INJECTED.values() for a in pair}
    # The injections did reach the log (in HELO, MAIL FROM, RCPT TO and SASL user names) ...
    logged = {a for a in injected if any(a in ln for ln in run.lines)}
    assert logged == injected
    # ... and no Hit names them (the legitimate address used as HELO is covered above).
    assert not [h.text for h in run.hits if h.addr in injected]


def test_scan_and_match_agree(run: Run) -> None:
    """The prefilter of Matcher.scan drops no real line that Matcher.match would hit."""
    m = Matcher([load_pack("postfix")])
    by_line = [(h.rule, h.addr, h.text) for ln in run.lines for h in m.match(ln)]
    assert by_line == [(h.rule, h.addr, h.text) for h in run.hits]


def test_every_reject_and_warning_is_understood(run: Run) -> None:
    """Each smtpd/postscreen reject, warning or protocol complaint about the attacker gives a Hit.

    Catches format drift between the pack and the running Postfix beyond the lines the steps waited for.
    """
    attackers = {run.lab.attacker_addr4, run.lab.attacker_addr6}
    loud = re.compile(r"postfix/(?:submission/)?(?:smtpd|postscreen)\[\d+\]: (?:\w+: reject: |warning: |"
                      r"PREGREET|NON-SMTP|BARE NEWLINE|COMMAND PIPELINING|HANGUP|improper|lost connection)")
    # postscreen's 450 to a client that passed its tests means "come back", not an offence.
    come_back = "450 4.3.2 Service currently unavailable"
    missed = [ln for ln in run.lines
              if loud.search(ln) and come_back not in ln and any(f"[{a}]" in ln for a in attackers)
              and not run.hits_on(ln)]
    assert not missed, "\n".join(missed)


def test_lab_cleans_up_when_the_body_fails(tmp_path: Path) -> None:
    """Postfix, Dovecot and the namespaces are gone after the block; the files stay under base."""
    with pytest.raises(RuntimeError, match="boom"), PostfixLab(tmp_path, greet_wait=1) as other:
        pids = [other.master_pid(), other.dovecot_pid()]
        names = [other.server_ns, other.attacker_ns, other.client_ns]
        assert None not in pids and all(Path(f"/proc/{p}").exists() for p in pids)
        raise RuntimeError("boom")
    assert not [p for p in pids if _running(p)]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not [n for n in names if n in listed]
    assert other.root == tmp_path / other.name
    assert "daemon started" in other.maillog.read_text()


def _running(pid: int | None) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1] != "Z"
    except FileNotFoundError:
        return False
