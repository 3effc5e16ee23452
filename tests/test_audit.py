"""`relayguard audit` (relay, dnsbl, ports, all) and `relayguard top`, against real parts.

- Config findings come from the real `postconf` reading small main.cf/master.cf pairs.
- The relay probe runs as the CLI inside an attacker namespace against real Postfix instances
  (tests/postfix_harness.py): one closed, one open relay (mynetworks 0/0) that accepts at RCPT and
  would discard later (the lab's default_transport is discard), and one that trusts a forgeable
  sender domain. The maillog proves no message was ever queued for delivery.
- Blocklists, reverse DNS and HELO go to a real authoritative DNS server (tests/audit_dns.py,
  dnspython over UDP) in a namespace, serving listed, clean, refused (127.255.255.x), SERVFAIL and
  never-answered names.
- `audit ports` and `top` read the real socket tables of namespaces holding real listeners and
  connections; `top` joins them with a real daemon's scores and bans over its control socket.
Documentation addresses only; every namespace is deleted afterwards.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import dns.reversename
import pytest
from audit_dns import serve
from daemon_harness import DaemonProc, scratch, write_config
from netns import Agent, Pair, pair
from postfix_harness import PostfixLab

from relayguard.audit import dnsbl, relay

pytestmark = pytest.mark.netns

MAIN = Path(__file__).with_name("audit_main.py")
TESTS = [t.name for t in relay.probe_tests("example.org")]


def rg(ns: str | None, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`relayguard ARGS` as a process, inside namespace `ns` when given."""
    argv = [sys.executable, str(MAIN), *args]
    if ns is not None:
        argv = ["ip", "netns", "exec", ns, *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def jlines(p: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert p.returncode in (0, 1), f"exit {p.returncode}: {p.stderr}"
    return [json.loads(line) for line in p.stdout.splitlines()]


def has(x: dict[str, Any], want: dict[str, Any]) -> bool:
    """x holds every key of want with that value (it may hold more)."""
    return {k: x.get(k) for k in want} == want


def one_error_line(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("relayguard: "), p.stderr
    return lines[0]


# ----------------------------------------------------------------------------- config findings, real postconf


def postconf_dir(tmp_path: Path, main: dict[str, str], master: str = "") -> str:
    """A config directory for `postconf -c` (main.cf + master.cf)."""
    d = tmp_path / f"pf{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    head = "compatibility_level = 3.6\nmyhostname = mx.example.org\n"
    (d / "main.cf").write_text(head + "".join(f"{k} = {v}\n" for k, v in main.items()))
    (d / "master.cf").write_text(master or MASTER)
    for f in d.iterdir():  # Postfix waits for files modified within the last second to settle
        os.utime(f, (time.time() - 60, time.time() - 60))
    return str(d)


MASTER = """\
smtp       inet  n - n - 1 postscreen
smtpd      pass  - - n - - smtpd
submission inet  n - n - - smtpd
  -o smtpd_tls_security_level=encrypt
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_client_restrictions=permit_sasl_authenticated,reject
127.0.0.1:10025 inet n - n - - smtpd
  -o smtpd_relay_restrictions=permit_mynetworks,reject
"""
CLOSED = {"mynetworks": "127.0.0.0/8 [::ffff:127.0.0.0]/104 [::1]/128",
          "smtpd_relay_restrictions": "permit_mynetworks permit_sasl_authenticated defer_unauth_destination"}


def findings(config_dir: str) -> list[dict[str, Any]]:
    pc = relay.read_postconf(config_dir)
    return relay.config_findings(pc, own=[])


def test_closed_config_is_all_ok(tmp_path: Path) -> None:
    out = findings(postconf_dir(tmp_path, CLOSED))
    assert [f["severity"] for f in out] == ["ok"] * len(out), out
    by_msg = " | ".join(f["message"] for f in out)
    assert "smtpd/pass (port 25): relaying closed for strangers (defer_unauth_destination" in by_msg
    assert "submission/inet (port 587): AUTH required, only over TLS" in by_msg
    assert "127.0.0.1:10025/inet (port 10025): relaying closed" in by_msg


def test_open_relay_configs_fail(tmp_path: Path) -> None:
    wide = findings(postconf_dir(tmp_path, {**CLOSED, "mynetworks": "127.0.0.0/8 0.0.0.0/0"}))
    bad = [f for f in wide if f["severity"] == "fail"]
    assert {f["setting"] for f in bad} == {"mynetworks"}
    assert any("smtpd/pass (port 25): open relay: mynetworks holds 0/0" in f["message"] for f in bad)
    assert any("the whole internet is trusted" in f["message"] and f["fix"] for f in bad)

    # `permit` before any reject_unauth_destination, in both lists (Postfix 2.x style relay control).
    permit = findings(postconf_dir(tmp_path, {**CLOSED, "smtpd_relay_restrictions": "",
                                              "smtpd_recipient_restrictions": "permit_mynetworks, permit"}))
    relay_f = [f for f in permit if f["setting"] == "smtpd_recipient_restrictions"]
    assert relay_f and relay_f[0]["severity"] == "fail" and "open relay: `permit`" in relay_f[0]["message"]

    # Relay control in smtpd_recipient_restrictions alone is fine.
    old = findings(postconf_dir(tmp_path, {**CLOSED, "smtpd_relay_restrictions": "",
                                           "smtpd_recipient_restrictions": "permit_mynetworks, "
                                                                           "reject_unauth_destination"}))
    assert all(f["severity"] == "ok" for f in old), old


def test_risky_configs_warn(tmp_path: Path) -> None:
    forged = findings(postconf_dir(tmp_path, {**CLOSED, "smtpd_relay_restrictions":
                                              "permit_mynetworks, check_sender_access hash:/etc/postfix/senders, "
                                              "reject_unauth_destination"}))
    w = [f for f in forged if f["severity"] != "ok"]
    assert len(w) == 1 and w[0]["severity"] == "warn" and w[0]["setting"] == "smtpd_relay_restrictions"
    assert "check_sender_access" in w[0]["message"] and "forge" in w[0]["message"]

    # A check_sender_access *after* reject_unauth_destination cannot open the relay.
    after = findings(postconf_dir(tmp_path, {**CLOSED, "smtpd_relay_restrictions":
                                             "permit_mynetworks, reject_unauth_destination, "
                                             "check_sender_access hash:/etc/postfix/senders"}))
    assert all(f["severity"] == "ok" for f in after), after

    mynet = findings(postconf_dir(tmp_path, {**CLOSED, "mynetworks": "127.0.0.0/8 198.51.100.0/24"}))
    assert [f["severity"] for f in mynet if f["setting"] == "mynetworks"] == ["warn"]


def test_submission_findings(tmp_path: Path) -> None:
    plain = MASTER.replace("smtpd_tls_security_level=encrypt", "smtpd_tls_security_level=none")
    out = findings(postconf_dir(tmp_path, CLOSED, plain))
    clear = [f for f in out if f["severity"] == "fail"]
    assert len(clear) == 1 and "clear text" in clear[0]["message"]
    assert clear[0]["setting"] == "submission/inet: smtpd_tls_security_level"

    # AUTH on port 25 (main.cf), and no 587/465 at all.
    no_sub = "smtp inet n - n - - smtpd\n"
    out = findings(postconf_dir(tmp_path, {**CLOSED, "smtpd_sasl_auth_enable": "yes",
                                           "smtpd_tls_security_level": "may", "smtpd_tls_auth_only": "yes"}, no_sub))
    warns = {f["setting"]: f["message"] for f in out if f["severity"] == "warn"}
    assert "port 25" in warns["smtpd_sasl_auth_enable"] and "password guessing" in warns["smtpd_sasl_auth_enable"]
    assert "no submission service on 587 or 465" in warns["master.cf"]


def test_restriction_lists_as_postfix_reads_them() -> None:
    items = relay.restriction_items("permit_mynetworks,check_client_access inline:{ 192.0.2.1=OK, x=y },"
                                    " warn_if_reject reject_unknown_helo_hostname  reject_unauth_destination")
    assert items == ["permit_mynetworks", "check_client_access", "warn_if_reject", "reject_unknown_helo_hostname",
                     "reject_unauth_destination"]
    assert relay.judge_list("permit_sasl_authenticated, reject").state == "closed"
    assert relay.judge_list("warn_if_reject reject, permit").state == "open"  # the warn_if_reject'ed one only warns
    assert relay.judge_list("permit_mx_backup, reject_unauth_destination").culprits == ["permit_mx_backup"]
    assert relay.judge_list("").state == "open"


# ----------------------------------------------------------------------------- relay probe, real Postfix


def self_signed(where: Path) -> tuple[Path, Path]:
    cert, key = where / "mx.crt", where / "mx.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=mx.example.org", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    cert.chmod(0o644)
    return cert, key


@pytest.fixture(scope="module")
def labs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("audit-labs")


@pytest.fixture(scope="module")
def closed_lab(labs_dir: Path) -> Iterator[PostfixLab]:
    """Closed relay; submission with Dovecot SASL offered only after STARTTLS."""
    certs = labs_dir / "certs"
    certs.mkdir()
    certs.chmod(0o755)
    cert, key = self_signed(certs)
    with PostfixLab(labs_dir, main_cf={"smtpd_tls_security_level": "may", "smtpd_tls_auth_only": "yes",
                                       "smtpd_tls_cert_file": str(cert), "smtpd_tls_key_file": str(key)}) as lab:
        yield lab


@pytest.fixture(scope="module")
def open_lab(labs_dir: Path) -> Iterator[PostfixLab]:
    """The classic open relay: mynetworks trusts the whole internet. Accepted mail would be discarded."""
    with PostfixLab(labs_dir, sasl=False, main_cf={"mynetworks": "127.0.0.0/8 [::1]/128 0.0.0.0/0 [::]/0"}) as lab:
        yield lab


@pytest.fixture(scope="module")
def sender_lab(labs_dir: Path) -> Iterator[PostfixLab]:
    """Relays for anyone who claims a sender in its own domain; trusts its own subnet."""
    with PostfixLab(labs_dir, sasl=False, main_cf={
        "mynetworks": "127.0.0.0/8 [::1]/128 192.0.2.0/24",
        "smtpd_relay_restrictions": "permit_mynetworks, check_sender_access inline:{ example.org=OK }, "
                                    "reject_unauth_destination"}) as lab:
        lab.ns_exec(lab.server_ns, ["ip", "addr", "add", "203.0.113.25/32", "dev", "lo"])
        yield lab


def probe_json(lab: PostfixLab, ns: str, *extra: str) -> tuple[int, list[dict[str, Any]], list[dict[str, Any]]]:
    p = rg(ns, "audit", "relay", "--target", lab.mx_addr4, "--postfix-config", str(lab.config_dir), "--json", *extra)
    lines = jlines(p)
    assert all(set(x) >= {"check", "severity"} for x in lines)
    config = [x for x in lines if x["check"] == "config"]
    probes = [x for x in lines if x["check"] == "probe"]
    for x in config:
        assert set(x) >= {"setting", "severity", "message"} and x["severity"] in ("ok", "warn", "fail")
    for x in probes:
        assert set(x) >= {"test", "mail_from", "rcpt_to", "reply", "verdict"}
    return p.returncode, config, probes


def verdicts(probes: list[dict[str, Any]]) -> dict[str, str]:
    return {x["test"]: x["verdict"] for x in probes}


def never_queued(lab: PostfixLab) -> None:
    """No message reached a delivery agent: the probe stopped before DATA (nothing left cleanup)."""
    log = "\n".join(lab.log_lines())
    assert "status=" not in log and "message-id=" not in log, log[-3000:]


def test_probe_closed_relay_from_outside(closed_lab: PostfixLab) -> None:
    lab = closed_lab
    rc, config, probes = probe_json(lab, lab.attacker_ns)
    assert verdicts(probes) == dict.fromkeys(TESTS, "refused")
    assert all("Relay access denied" in x["reply"] and x["reply"].startswith("554") for x in probes)
    assert all(x["severity"] == "ok" for x in config), config
    assert any("submission/inet (port 587): AUTH offered, only over TLS" in x["message"] for x in config)
    assert rc == 0
    # The tricks went out as written (Postfix logs each RCPT as sent, minus a source route).
    log = "\n".join(lab.log_lines())
    for rcpt in ("relay-test%example.net@example.org", "example.net!relay-test@example.org",
                 '"relay-test@example.net"@example.org', "relay-test@[198.51.100.1]"):
        assert f"to=<{rcpt}>" in log, rcpt
    assert "from=<> to=<relay-test@example.net>" in log
    never_queued(lab)


def test_probe_open_relay_from_outside(open_lab: PostfixLab) -> None:
    lab = open_lab
    rc, config, probes = probe_json(lab, lab.attacker_ns)
    assert rc == 1
    assert verdicts(probes) == dict.fromkeys(TESTS, "accepted")
    for x in probes:
        assert x["reply"].startswith("250") and x["severity"] == "fail"
        assert x["note"] == "accepted at RCPT (may still be discarded later)"
    fails = [x for x in config if x["severity"] == "fail"]
    assert {x["setting"] for x in fails} == {"mynetworks"}
    assert any("open relay" in x["message"] for x in fails)
    never_queued(lab)

    text = rg(lab.attacker_ns, "audit", "relay", "--target", lab.mx_addr4, "--postfix-config", str(lab.config_dir))
    assert text.returncode == 1
    assert "accepted at RCPT (may still be discarded later): 250 2.1.5 Ok" in text.stdout
    assert f"relay probe: {lab.mx_addr4} port 25 from {lab.attacker_addr4} (mx.example.org" in text.stdout


def test_probe_forgeable_sender_and_trusted_source(sender_lab: PostfixLab) -> None:
    lab = sender_lab
    rc, config, probes = probe_json(lab, lab.attacker_ns)
    want = dict.fromkeys(TESTS, "refused") | {"own-domain-sender": "accepted"}
    assert verdicts(probes) == want and rc == 1
    risky = [x for x in config if x["setting"] == "smtpd_relay_restrictions" and x["severity"] == "warn"]
    assert risky and all("check_sender_access" in x["message"] for x in risky)
    assert not [x for x in config if x["severity"] == "fail"]

    # From the server itself: inside mynetworks, so everything passes, and the report says why.
    rc, config, probes = probe_json(lab, lab.server_ns)
    assert verdicts(probes) == dict.fromkeys(TESTS, "accepted")
    assert all(x.get("trusted_source") for x in probes)
    note = [x for x in config if "inside mynetworks" in x["message"]]
    assert len(note) == 1 and note[0]["severity"] == "warn" and "--source-addr" in note[0]["fix"]
    assert f"connected from {lab.mx_addr4}, inside mynetworks (192.0.2.0/24)" in note[0]["message"]
    # On the server, 192.0.2.0/24 is the host's own network: mynetworks itself is fine there.
    assert any(x["setting"] == "mynetworks" and x["severity"] == "ok" for x in config)

    # --source-addr: an address of this host outside mynetworks gives the stranger's view.
    rc, config, probes = probe_json(lab, lab.server_ns, "--source-addr", "203.0.113.25")
    assert verdicts(probes) == want
    assert not any("inside mynetworks" in x["message"] for x in config)
    assert "unknown[203.0.113.25]" in "\n".join(lab.log_lines())
    never_queued(lab)


def test_probe_errors_and_usage(closed_lab: PostfixLab) -> None:
    lab = closed_lab
    p = rg(lab.attacker_ns, "audit", "relay", "--target", lab.mx_addr4, "--port", "2525", "--json",
           "--postfix-config", str(lab.config_dir))
    probes = [x for x in jlines(p) if x["check"] == "probe"]
    assert p.returncode == 1 and len(probes) == 1
    assert probes[0]["verdict"] == "error" and probes[0]["test"] == "connect" and "refused" in probes[0]["reply"]
    assert "--port" in one_error_line(rg(None, "audit", "relay", "--port", "70000"))
    assert "--source-addr" in one_error_line(rg(None, "audit", "relay", "--source-addr", "nonsense"))
    assert "No such command" in one_error_line(rg(None, "audit", "nonsense"))


# ----------------------------------------------------------------------------- DNS: blocklists, rDNS, HELO


def bl_name(ip: str, zone: str) -> str:
    return dnsbl.query_name(ip, zone)


def ptr(ip: str) -> str:
    return dns.reversename.from_address(ip).to_text()


@pytest.fixture(scope="module")
def dns_pair() -> Iterator[Pair]:
    """Server namespace answers DNS on 192.0.2.1:53; the client (192.0.2.2, 198.51.100.7, 2001:db8:1::2,
    2001:db8:2::7) runs the audit. mx.example.org (the HELO name) also points to 203.0.113.9."""
    records: dict[str, Any] = {
        bl_name("192.0.2.2", "zen.spamhaus.org"): {"A": ["127.0.0.4", "127.0.0.10"]},
        bl_name("198.51.100.7", "zen.spamhaus.org"): {"A": ["127.255.255.254"]},
        bl_name("2001:db8:2::7", "zen.spamhaus.org"): "silent",
        bl_name("192.0.2.2", "bl.test"): {"A": ["127.0.0.2"]},
        bl_name("2001:db8:1::2", "bl.test"): {"A": ["127.0.0.2"]},
        bl_name("2001:db8:2::7", "bl.test"): "servfail",
        bl_name("203.0.113.9", "bl.test"): {"A": ["127.255.255.252", "127.255.255.254"]},
        bl_name("198.51.100.7", "bl.test"): {"A": ["127.255.255.254", "127.0.0.3"]},  # a listing wins
        ptr("192.0.2.2"): {"PTR": ["mx.example.org."]},
        ptr("198.51.100.7"): {"PTR": ["other.example.net."]},
        ptr("2001:db8:2::7"): "silent",
        "mx.example.org": {"A": ["192.0.2.2", "203.0.113.9"], "AAAA": ["2001:db8:1::2"]},
        "other.example.net": {"A": ["198.51.100.99"]},
    }
    with pair("aud") as p, serve(p.server, p.server4, records):
        yield p


def dnsbl_run(p: Pair, *args: str) -> subprocess.CompletedProcess[str]:
    return rg(p.client, "audit", "dnsbl", "--resolver", p.server4, "--helo-name", "mx.example.org",
              "--dns-timeout", "1", *args)


def test_dnsbl_statuses(dns_pair: Pair) -> None:
    addrs = ("192.0.2.2", "198.51.100.7", "2001:db8:1::2", "2001:db8:2::7", "203.0.113.9")
    p = dnsbl_run(dns_pair, "--json", "--rdns", "--list", "zen.spamhaus.org", "--list", "bl.test", *addrs)
    assert p.returncode == 1
    lines = jlines(p)
    # The contract's shape on every line: one per address and list.
    assert len(lines) == 10 and all(x["check"] == "dnsbl" for x in lines)
    got = {(x["ip"], x["list"]): x for x in lines}
    assert set(got) == {(a, z) for a in addrs for z in ("zen.spamhaus.org", "bl.test")}
    for x in got.values():
        assert set(x) >= {"ip", "list", "status", "codes"} and x["status"] in ("listed", "clean", "refused", "unknown")
    zen = got[("192.0.2.2", "zen.spamhaus.org")]
    assert zen["status"] == "listed" and zen["codes"] == ["127.0.0.4", "127.0.0.10"]
    assert zen["meaning"] == ["XBL: exploited or infected host (CBL)",
                              "PBL (ISP): end-user range that should not send mail directly"]
    assert got[("198.51.100.7", "zen.spamhaus.org")]["status"] == "refused"  # never "listed"
    assert got[("198.51.100.7", "zen.spamhaus.org")]["codes"] == ["127.255.255.254"]
    assert got[("203.0.113.9", "bl.test")]["status"] == "refused"  # 127.255.255.0/24 for any list
    assert got[("198.51.100.7", "bl.test")]["status"] == "listed"
    assert got[("198.51.100.7", "bl.test")]["codes"] == ["127.0.0.3", "127.255.255.254"]
    assert got[("2001:db8:1::2", "bl.test")]["status"] == "listed"  # IPv6: nibble query
    assert got[("2001:db8:1::2", "zen.spamhaus.org")]["status"] == "clean"
    assert got[("192.0.2.2", "bl.test")]["status"] == "listed"
    assert got[("2001:db8:2::7", "zen.spamhaus.org")]["status"] == "unknown"  # timed out
    assert got[("2001:db8:2::7", "bl.test")]["status"] == "unknown"  # SERVFAIL
    assert got[("2001:db8:1::2", "bl.test")]["severity"] == "fail"
    assert got[("2001:db8:1::2", "zen.spamhaus.org")]["severity"] == "fail"  # its FCrDNS failed

    # Reverse DNS and HELO ride along on each address's lines.
    fcr = {x["ip"]: x["fcrdns"] for x in lines}
    assert fcr["192.0.2.2"]["status"] == "ok" and fcr["192.0.2.2"]["ptr"] == ["mx.example.org"]
    assert fcr["198.51.100.7"]["status"] == "fail" and "no such name resolves back" in fcr["198.51.100.7"]["message"]
    assert fcr["2001:db8:1::2"]["status"] == "fail" and "no reverse DNS" in fcr["2001:db8:1::2"]["message"]
    assert fcr["2001:db8:2::7"]["status"] == "unknown"
    helo = {x["ip"]: x["helo"]["status"] for x in lines}
    assert helo == {"192.0.2.2": "ok", "203.0.113.9": "ok", "2001:db8:1::2": "ok", "198.51.100.7": "fail",
                    "2001:db8:2::7": "fail"}


def test_dnsbl_defaults_and_clean_exit(dns_pair: Pair) -> None:
    # No ADDR: the host's public addresses plus the HELO name's A/AAAA (203.0.113.9 is not on the host).
    p = dnsbl_run(dns_pair, "--json", "--list", "bl.test")
    ips = {x["ip"] for x in jlines(p)}
    assert ips == {"192.0.2.2", "198.51.100.7", "2001:db8:1::2", "2001:db8:2::7", "203.0.113.9"}
    assert all("fcrdns" in x and "helo" in x for x in jlines(p))  # this host's own addresses: DNS checked too

    clean = dnsbl_run(dns_pair, "--rdns", "--list", "clean.test", "192.0.2.2")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "192.0.2.2            clean.test               clean" in clean.stdout
    assert "192.0.2.2            reverse DNS              mx.example.org, forward-confirmed" in clean.stdout
    assert "192.0.2.2            HELO mx.example.org      resolves here" in clean.stdout

    # Addresses given on the command line are about blocklists only: no PTR needed for exit 0.
    bare = dnsbl_run(dns_pair, "--json", "--list", "clean.test", "203.0.113.9")
    assert bare.returncode == 0 and [x["status"] for x in jlines(bare)] == ["clean"]
    assert "fcrdns" not in jlines(bare)[0]
    assert dnsbl_run(dns_pair, "--rdns", "--list", "clean.test", "203.0.113.9").returncode == 1  # no PTR

    prefix = dnsbl_run(dns_pair, "--json", "--list", "clean.test", "203.0.113.8/31")
    assert {x["ip"] for x in jlines(prefix) if x["check"] == "dnsbl"} == {"203.0.113.8", "203.0.113.9"}

    assert "--resolver" in one_error_line(rg(dns_pair.client, "audit", "dnsbl", "--resolver", "dns.example"))
    assert "not an IP address" in one_error_line(rg(dns_pair.client, "audit", "dnsbl", "mx.example.org"))


def test_dnsbl_refusal_codes_are_never_listings() -> None:
    zen, other = dnsbl.blocklist("zen.spamhaus.org"), dnsbl.blocklist("dnsbl.example.net")
    for bl in (zen, other):
        for code in ("127.255.255.252", "127.255.255.254", "127.255.255.255", "127.255.255.1"):
            assert dnsbl.judge(bl, "192.0.2.9", ("ok", [code]))["status"] == "refused"
    assert dnsbl.judge(other, "192.0.2.9", ("ok", ["127.0.0.5"]))["status"] == "listed"
    assert dnsbl.judge(other, "192.0.2.9", ("ok", ["198.51.100.1"]))["status"] == "unknown"  # hijacked NXDOMAIN
    assert dnsbl.judge(other, "192.0.2.9", ("nodata", []))["status"] == "clean"
    assert dnsbl.query_name("192.0.2.9", "bl.test") == "9.2.0.192.bl.test"
    assert dnsbl.query_name("2001:db8::1", "bl.test") == "1.0.0.0." + "0." * 20 + "8.b.d.0.1.0.0.2.bl.test"


# ----------------------------------------------------------------------------- ports


SOCKETS = """
import socket
socks = []
def handle(req):
    fam = socket.AF_INET6 if ":" in req["addr"] else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM if req["proto"] == "tcp" else socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((req["addr"], req["port"]))
    if req["proto"] == "tcp":
        s.listen(16)
    socks.append(s)
    return __import__("os").getpid()
"""


def test_audit_ports_lists_real_sockets() -> None:
    with pair("aport") as p, Agent(p.server, SOCKETS) as agent:
        for proto, addr, port in (("tcp", "0.0.0.0", 25), ("tcp", "::", 587), ("tcp", "127.0.0.1", 10025),
                                  ("tcp", "192.0.2.1", 22), ("tcp", "::", 8080), ("udp", "0.0.0.0", 5353),
                                  ("udp", "::1", 8125)):
            pid = agent.call(proto=proto, addr=addr, port=port)
        res = rg(p.server, "audit", "ports", "--json", "--allow", "22", "--postfix-config", "/nonexistent")
        assert res.returncode == 1
        lines = jlines(res)
        assert all(set(x) >= {"proto", "address", "port", "process", "mail", "public"} for x in lines)
        got = {(x["proto"], x["address"], x["port"]): x for x in lines}
        assert set(got) == {("tcp", "0.0.0.0", 25), ("tcp", "::", 587), ("tcp", "127.0.0.1", 10025),
                            ("tcp", "192.0.2.1", 22), ("tcp", "::", 8080), ("udp", "0.0.0.0", 5353),
                            ("udp", "::1", 8125)}
        for x in got.values():
            assert x["pid"] == pid and x["process"].startswith("python")
        assert has(got[("tcp", "0.0.0.0", 25)], {"mail": True, "public": True, "severity": "ok"})
        assert got[("tcp", "::", 587)]["mail"] is True
        assert has(got[("tcp", "127.0.0.1", 10025)], {"mail": False, "public": False, "severity": "ok"})
        assert got[("tcp", "192.0.2.1", 22)]["severity"] == "ok"  # --allow 22
        for key in (("tcp", "::", 8080), ("udp", "0.0.0.0", 5353)):
            assert got[key]["public"] is True and got[key]["severity"] == "warn"
            assert got[key]["note"] == "close if unused"
        assert got[("udp", "::1", 8125)]["public"] is False

        text = rg(p.server, "audit", "ports", "--allow", "22,5353,8080", "--postfix-config", "/nonexistent")
        assert text.returncode == 0, text.stdout
        assert "tcp 0.0.0.0:25" in text.stdout and f"[{pid}]" in text.stdout and "mail port (smtp)" in text.stdout


def test_audit_ports_on_postfix(closed_lab: PostfixLab) -> None:
    lab = closed_lab
    lines = jlines(rg(lab.server_ns, "audit", "ports", "--json", "--postfix-config", str(lab.config_dir)))
    assert all(x["check"] == "port" for x in lines)  # one object per listening socket
    ports = {(x["address"], x["port"]): x for x in lines}
    assert set(ports) == {(a, p) for a in (lab.mx_addr4, lab.mx_addr6) for p in (25, 587)}
    assert ports[(lab.mx_addr4, 25)]["process"] == "master" and ports[(lab.mx_addr4, 25)]["mail"] is True
    assert ports[(lab.mx_addr6, 587)]["process"] == "master"
    for addr in (lab.mx_addr4, lab.mx_addr6):
        assert has(ports[(addr, 587)]["submission"], {"auth": "offered", "tls": "before auth", "severity": "ok"})
    text = rg(lab.server_ns, "audit", "ports", "--postfix-config", str(lab.config_dir))
    assert text.returncode == 0 and "submission/inet (port 587): AUTH offered, TLS before auth" in text.stdout


# ----------------------------------------------------------------------------- the whole audit


def test_full_audit_on_closed_lab(closed_lab: PostfixLab) -> None:
    lab = closed_lab
    records = {ptr(lab.mx_addr4): {"PTR": ["mx.example.org."]}, ptr(lab.mx_addr6): {"PTR": ["mx.example.org."]},
               "mx.example.org": {"A": [lab.mx_addr4], "AAAA": [lab.mx_addr6]}}
    with serve(lab.server_ns, lab.mx_addr4, records):
        args = ("audit", "--postfix-config", str(lab.config_dir), "--target", lab.mx_addr4, "--resolver",
                lab.mx_addr4, "--list", "bl.test", "--dns-timeout", "2", "--allow", "53")
        text = rg(lab.server_ns, *args)
        res = rg(lab.server_ns, *args, "--json")
    assert text.returncode == 0, text.stdout + text.stderr
    assert "audit: " in text.stdout and " 0 warn, 0 fail" in text.stdout
    lines = jlines(res)
    assert res.returncode == 0 and lines and all(x["severity"] == "ok" for x in lines)
    kinds = {x["check"] for x in lines}
    assert kinds == {"config", "probe", "dnsbl", "fcrdns", "helo", "port", "submission"}
    assert {x["ip"] for x in lines if x["check"] == "dnsbl"} == {lab.mx_addr4, lab.mx_addr6}


# ----------------------------------------------------------------------------- top


HOLD = """
import socket
held = []
def handle(req):
    if req["op"] == "listen":
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", req["port"]))
        s.listen(64)
        held.append(s)
        return True
    if req["op"] == "accept":  # take every pending connection and keep it open
        held[0].settimeout(5)
        for _ in range(req["n"]):
            held.append(held[0].accept()[0])
        return True
    s = socket.create_connection((req["dst"], req["port"]), timeout=5, source_address=(req["src"], 0))
    held.append(s)
    return s.getsockname()[1]
"""


def stamped(addr: str, n: int) -> str:
    """A Postfix relay-denied line stamped now (weight 5 in the postfix pack)."""
    ts = time.strftime("%b %d %H:%M:%S", time.gmtime())
    return (f"{ts} mx postfix/smtpd[{3000 + n}]: NOQUEUE: reject: RCPT from unknown[{addr}]:{41000 + n}: "
            f"554 5.7.1 <victim{n}@example.net>: Relay access denied; from=<spam@example.org> "
            f"to=<victim{n}@example.net> proto=ESMTP helo=<bot>")


def test_top_once_json(tmp_path: Path) -> None:
    with ExitStack() as stack, pair("atop") as p, Agent(p.server, HOLD) as srv, Agent(p.client, HOLD) as cli:
        srv.call(op="listen", port=25)
        srv.call(op="listen", port=8080)  # not a mail port: not shown
        conns = [(p.client4, 25)] * 3 + [(p.other4, 25)] * 2 + [(p.client6, 25)] + [(p.client4, 8080)]
        for src, port in conns:
            cli.call(op="connect", dst=p.server6 if ":" in src else p.server4, port=port, src=src)
        srv.call(op="accept", n=6)

        root = stack.enter_context(scratch("atop"))
        log = root / "mail.log"
        log.touch()
        d = DaemonProc(write_config(root, log=log, scoring="threshold = 1000\nlong_threshold = 1000"), ns=p.server)
        records = {ptr(p.client4): {"PTR": ["client.example.net."]}, ptr(p.other4): "silent"}
        try:
            with serve(p.server, p.server4, records):
                d.request("ban", addrs=[f"{p.other4}/31"], seconds=600)  # a prefix ban covers the address
                with log.open("a") as f:
                    f.write("".join(stamped(p.client4, n) + "\n" for n in range(3)))
                deadline = time.monotonic() + 60
                while d.request("why", addr=p.client4)["score"].get("short", 0) < 15:
                    assert time.monotonic() < deadline, d.log_tail()
                    time.sleep(0.1)
                res = rg(p.server, "top", "--once", "--json", "--socket", d.socket, "--resolver", p.server4)
                text = rg(p.server, "top", "--once", "--socket", d.socket, "--no-dns")
        finally:
            d.stop()
        no_daemon = rg(p.server, "top", "--once", "--json", "--no-dns", "--socket", str(root / "gone.sock"))
        screens = live_top(p.server, root / "gone.sock")

    assert res.returncode == 0, res.stderr
    rows = {x["ip"]: x for x in jlines(res)}
    assert set(rows) == {p.client4, p.other4, p.client6}
    for x in rows.values():
        assert set(x) >= {"ip", "connections", "ports", "score", "banned"}
    assert has(rows[p.client4], {"connections": 3, "ports": [25], "score": 15, "banned": False,
                                "rdns": "client.example.net", "states": {"ESTABLISHED": 3}})
    assert has(rows[p.other4], {"connections": 2, "banned": True, "score": 0, "rdns": None})
    assert rows[p.client6]["connections"] == 1 and rows[p.client6]["banned"] is False
    assert list(rows) == [p.client4, p.other4, p.client6]  # busiest first

    assert text.returncode == 0 and "connections to ports 25,465,587: 6 from 3 addresses" in text.stdout
    assert any(line.startswith(p.client4) and " 15 " in line and " no " in line for line in text.stdout.splitlines())

    # Without a daemon: the connections still, score and ban unknown (null).
    assert no_daemon.returncode == 0
    assert {(x["ip"], x["score"], x["banned"]) for x in jlines(no_daemon)} == {
        (p.client4, None, None), (p.other4, None, None), (p.client6, None, None)}


    # The live view: redrawn in place until Ctrl-C (SIGINT), which ends it cleanly.
    assert len(screens) >= 2
    assert all("connections to ports 25,465,587: 6 from 3 addresses" in x for x in screens[:2])


def live_top(ns: str, sock: Path) -> list[str]:
    """Run `top` (live) until it has drawn twice, then SIGINT; the screens it drew."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(MAIN), "top", "--interval", "0.2",
                             "--no-dns", "--socket", str(sock)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    out = b""
    deadline = time.monotonic() + 60
    try:
        while out.count(CLEAR) < 3 and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if ready:
                out += os.read(proc.stdout.fileno(), 65536)
    finally:
        proc.send_signal(signal.SIGINT)  # our own child (ip netns exec execs python), by PID
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return [x.decode() for x in out.split(CLEAR)[1:]]


CLEAR = b"\x1b[H\x1b[2J"


def test_top_usage() -> None:
    assert "--ports" in one_error_line(rg(None, "top", "--once", "--ports", "25,x"))
    assert "--once" in one_error_line(rg(None, "top", "--json"))


def test_own_addresses_are_read_from_the_kernel() -> None:
    """`ip -j addr` inside a namespace: what the defaults of dnsbl and mynetworks checks build on."""
    with pair("aaddr") as p:
        code = "from relayguard.audit import public_addresses; print(' '.join(public_addresses()))"
        out = subprocess.run(["ip", "netns", "exec", p.client, sys.executable, "-c", code],
                             capture_output=True, text=True, check=True, timeout=60).stdout.split()
    assert set(out) == {"192.0.2.2", "198.51.100.7", "2001:db8:1::2", "2001:db8:2::7"}
