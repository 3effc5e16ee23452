"""Log injection: text a client controls must never make a rule name another address.

For every rule of every pack there is a template of a real line the daemon writes, with the
client address fixed and a placeholder for every field the client controls (HELO, sender,
recipient, user names, commands, version strings, reverse-DNS names where the daemon does not
validate them). Hypothesis fills the placeholders with arbitrary text, other addresses in every
notation, the server's own address, pieces of the same line written for another client, and
`#012`-escaped fake log lines (how rsyslog writes an embedded newline). The property: every Hit
the pack produces names the real client, or there is no Hit ("the real client or no event").
A second test renders each template with neutral values and requires the rule's hit, so the
property cannot pass because a template stopped matching.
"""

from __future__ import annotations

import ipaddress
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayguard.model import canonical_addr
from relayguard.parse import PACK_NAMES, Matcher, load_pack

# CI runs a fixed, repeatable sample; set RELAYGUARD_INJECTION_RANDOM=1 and a larger
# RELAYGUARD_INJECTION_EXAMPLES to hunt for new counterexamples.
EXAMPLES = int(os.environ.get("RELAYGUARD_INJECTION_EXAMPLES", "150"))
DERANDOMIZE = os.environ.get("RELAYGUARD_INJECTION_RANDOM") != "1"

REAL = ("203.0.113.77", "2001:db8:77::7")
SERVER = ("198.51.100.25", "2001:db8:1::25")  # our own address, written in I=, lip= ...
FAKES = ("192.0.2.1", "198.51.100.7", "203.0.113.200", "203.0.113.78", "2001:db8::bad", "2001:db8:77::8")

SYSLOG = "Dec  3 00:00:06 mx {prog}[4242]: "
MAINLOG = "2026-12-03 00:00:06 [4242] "

# Neutral values: what a well-behaved client sends.
NEUTRAL = {
    "helo": "mail.example.org",
    "ptr": "host.example.net",
    "name": "host.example.net",
    "ident": "root",
    "sender": "a@example.org",
    "rcpt": "b@example.net",
    "user": "alice",
    "text": "QUIT",
    "text2": "RSET",
    "dn": "CN=client.example.org,O=Example",  # TLS client certificate subject
    "sni": "mx.example.com",  # TLS server name the client asked for
}

# Postfix replaces a reverse-DNS name that fails valid_hostname() with "unknown" (smtpd_peer.c),
# so its `name` field can only hold host-name characters; everywhere else `ptr` is free text.
HOSTNAME = st.from_regex(r"\A[A-Za-z0-9]([A-Za-z0-9.-]{0,20}[A-Za-z0-9])?\Z")

PF = "Dec  3 00:00:06 mx postfix/smtpd[4242]: "
PS = "Dec  3 00:00:06 mx postfix/postscreen[4242]: "
PFROM = "{name}[{addr}]"

TEMPLATES: dict[str, list[str]] = {
    # ------------------------------------------------------------------ postfix
    "postfix/relay-denied": [PF + "NOQUEUE: reject: RCPT from " + PFROM + ":52314: 554 5.7.1 <{rcpt}>: Relay access "
                             "denied; from=<{sender}> to=<{rcpt}> proto=ESMTP helo=<{helo}>"],
    "postfix/user-unknown": [PF + "NOQUEUE: reject: RCPT from " + PFROM + ": 550 5.1.1 <{rcpt}>: Recipient address "
                             "rejected: User unknown in local recipient table; from=<{sender}> to=<{rcpt}> "
                             "proto=ESMTP helo=<{helo}>"],
    "postfix/message-accepted": [PF + "4QxYz12AbCdE: client=" + PFROM + ", sasl_method=PLAIN, sasl_username={user}"],
    "postfix/rbl-listed": [PF + "NOQUEUE: reject: RCPT from " + PFROM + ": 554 5.7.1 Service unavailable; Client host "
                           "[{addr}] blocked using zen.spamhaus.org; from=<{sender}> to=<{rcpt}> proto=ESMTP "
                           "helo=<{helo}>"],
    "postfix/helo-rejected": [PF + "NOQUEUE: reject: RCPT from " + PFROM + ": 504 5.5.2 <{helo}>: Helo command "
                              "rejected: need fully-qualified hostname; from=<{sender}> to=<{rcpt}> proto=ESMTP "
                              "helo=<{helo}>"],
    "postfix/sender-rejected": [PF + "NOQUEUE: reject: RCPT from " + PFROM + ": 450 4.1.8 <{sender}>: Sender address "
                                "rejected: Domain not found; from=<{sender}> to=<{rcpt}> proto=ESMTP helo=<{helo}>"],
    "postfix/client-rejected": [PF + "NOQUEUE: reject: RCPT from " + PFROM + ": 450 4.7.25 Client host rejected: "
                                "cannot find your hostname, [{addr}]; from=<{sender}> to=<{rcpt}> proto=ESMTP "
                                "helo=<{helo}>"],
    "postfix/too-many-errors": [PF + "too many errors after RCPT from " + PFROM],
    "postfix/improper-pipelining": [PF + "improper command pipelining after EHLO from " + PFROM + ": {text}"],
    "postfix/non-smtp-command": [PF + "warning: non-SMTP command from " + PFROM + ": {text}"],
    "postfix/rate-limit": [PF + "warning: Connection rate limit exceeded: 61 from " + PFROM + " for service smtp"],
    "postfix/lost-connection": [PF + "lost connection after AUTH from " + PFROM],
    "postfix/auth-failed-disconnect": [PF + "disconnect from " + PFROM + " ehlo=1 auth=0/1 quit=1 commands=2/3"],
    "postfix/no-commands-disconnect": [PF + "disconnect from " + PFROM + " commands=0/0"],
    "postfix/sasl-failed": [PF + "warning: " + PFROM + ": SASL LOGIN authentication failed: UGFzc3dvcmQ6, "
                            "sasl_username={user}"],
    "postfix/sasl-server-failure": [PF + "warning: " + PFROM + ": SASL PLAIN authentication failed: Connection lost "
                                    "to authentication server"],
    "postfix/pregreet": [PS + "PREGREET 11 after 0.09 from [{addr}]:54321: {text}"],
    "postfix/postscreen-hangup": [PS + "HANGUP after 2.1 from [{addr}]:54322 in tests after SMTP handshake"],
    "postfix/postscreen-dnsbl": [PS + "DNSBL rank 3 for [{addr}]:54323"],
    "postfix/postscreen-non-smtp": [PS + "NON-SMTP COMMAND from [{addr}]:54324 after CONNECT: {text}"],
    "postfix/postscreen-bare-newline": [PS + "BARE NEWLINE from [{addr}]:54325 after DATA"],
    "postfix/postscreen-pipelining": [PS + "COMMAND PIPELINING from [{addr}]:54326 after EHLO: {text}"],
    "postfix/postscreen-command-limit": [PS + "COMMAND COUNT LIMIT from [{addr}]:54327 after RSET"],
    "postfix/postscreen-rbl-reject": [PS + "NOQUEUE: reject: RCPT from [{addr}]:54328: 550 5.7.1 Service "
                                      "unavailable; client [{addr}] blocked using zen.spamhaus.org; from=<{sender}>, "
                                      "to=<{rcpt}>, proto=ESMTP, helo=<{helo}>"],
    "postfix/postscreen-protocol-error": [PS + "NOQUEUE: reject: RCPT from [{addr}]:54329: 550 5.5.1 Protocol error; "
                                          "from=<{sender}>, to=<{rcpt}>, proto=ESMTP, helo=<{helo}>"],
    # ------------------------------------------------------------------ exim (mainlog)
    "exim/relay-denied": [
        MAINLOG + "H={ptr} ({helo}) [{addr}]:52314 I=[198.51.100.25]:25 F=<{sender}> rejected RCPT <{rcpt}>: relay "
        "not permitted",
        MAINLOG + 'H={ptr} ({helo}) [{addr}]:52314 I=[198.51.100.25]:25 U={ident} X=TLS1.3:TLS_AES_256_GCM_SHA384:256 '
        'CV=yes DN="{dn}" SNI={sni} F=<{sender}> rejected RCPT <{rcpt}>: relay not permitted',
    ],
    "exim/user-unknown": [MAINLOG + "H={ptr} ({helo}) [{addr}]:52314 I=[198.51.100.25]:25 F=<{sender}> rejected "
                          "RCPT <{rcpt}>: Unrouteable address"],
    "exim/auth-failed": [
        MAINLOG + "dovecot_login authenticator failed for {ptr} ({helo}) [{addr}]:52314 I=[198.51.100.25]:587: 535 "
        "Incorrect authentication data (set_id={user})",
        MAINLOG + "plain authenticator failed for ({helo}) [{addr}]:52314 I=[198.51.100.25]:587 U={ident}: 535 "
        "Incorrect authentication data (set_id={user})",
    ],
    "exim/helo-invalid": [MAINLOG + "rejected EHLO from {ptr} ({helo}) [{addr}]:52314 I=[198.51.100.25]:25: "
                          "syntactically invalid argument(s): {text}"],
    "exim/sync-error": [
        MAINLOG + 'SMTP protocol synchronization error (next input sent too soon: pipelining was not advertised): '
        'rejected "{text}" H={ptr} ({helo}) [{addr}]:52314 I=[198.51.100.25]:25 next input="{text2}"',
        MAINLOG + 'SMTP protocol synchronization error (input sent without waiting for greeting): rejected '
        'connection from H={ptr} [{addr}]:52314 I=[198.51.100.25]:25 input="{text}"',
    ],
    "exim/too-many-errors": [MAINLOG + 'SMTP call from {ptr} ({helo}) [{addr}]:52314 I=[198.51.100.25]:25 dropped: '
                             'too many syntax or protocol errors (last command was "{text}",  C=EHLO,AUTH)'],
    "exim/nonmail-commands": [MAINLOG + 'SMTP call from {ptr} ({helo}) [{addr}]:52314 I=[198.51.100.25]:25 '
                              'dropped: too many nonmail commands (last was "{text}")'],
    "exim/command-timeout": [MAINLOG + "SMTP command timeout on TLS connection from {ptr} ({helo}) [{addr}]:52314 "
                             "I=[198.51.100.25]:465"],
    "exim/no-mail-after-auth": [MAINLOG + "no MAIL in SMTP connection from {ptr} ({helo}) [{addr}]:52314 "
                                "I=[198.51.100.25]:587 D=3s C=EHLO,AUTH,QUIT"],
    "exim/auth-not-advertised": [MAINLOG + 'SMTP protocol error in "{text}" H={ptr} ({helo}) [{addr}]:52314 '
                                 "I=[198.51.100.25]:25 AUTH command used when not advertised"],
    # ------------------------------------------------------------------ sendmail
    "sendmail/relay-denied": [SYSLOG + "5B3006Bd003002: ruleset=check_rcpt, arg1=<{rcpt}>, relay={ident}@{ptr} "
                              "[{saddr}] (may be forged), reject=550 5.7.1 <{rcpt}>... Relaying denied. Proper "
                              "authentication required."],
    "sendmail/user-unknown": [SYSLOG + "5B3006Df088377: ruleset=check_rcpt, arg1=<{rcpt}>, relay={ptr} [{saddr}], "
                              "reject=550 5.1.1 <{rcpt}>... User unknown"],
    "sendmail/rcpt-rejected": [SYSLOG + "5B3006Fh030972: ruleset=check_rcpt, arg1=<{rcpt}>, relay={ptr} [{saddr}], "
                               "reject=553 5.1.8 <{rcpt}>... Domain of sender address {sender} does not exist"],
    "sendmail/auth-failed": [SYSLOG + "5B3006Hj016664: AUTH failure (LOGIN): authentication failure (-13) "
                             "SASL(-13): authentication failure: checkpass failed, user={user}, relay={ptr} "
                             "[{saddr}] (may be forged)"],
    "sendmail/smtp-attack": [SYSLOG + "5B3006Ln005133: {ident}@{ptr} [{saddr}]: possible SMTP attack: "
                             "command=AUTH, count=5"],
    "sendmail/no-mail-command": [SYSLOG + "5B3006Np020949: {ptr} [{saddr}] did not issue MAIL/EXPN/VRFY/ETRN "
                                 "during connection to MTA"],
    "sendmail/lost-input": [SYSLOG + "5B3006Qs050440: lost input channel from {ptr} [{saddr}] to MTA after rcpt"],
    "sendmail/pregreet": [SYSLOG + "5B3006Rt044307: rejecting commands from {ptr} [{saddr}] due to pre-greeting "
                          "traffic after 0 seconds"],
    "sendmail/conn-rate-limit": [SYSLOG + "ruleset=check_relay, arg1={ptr}, arg2={saddr}, relay={ptr} [{saddr}], "
                                 "reject=421 4.3.2 Connection rate limit exceeded."],
    "sendmail/vrfy-expn-rejected": [SYSLOG + "5B3006Tv004030: {ptr} [{saddr}]: EXPN {text} [rejected]"],
    # ------------------------------------------------------------------ dovecot
    "dovecot/login-auth-failed": [
        SYSLOG + "imap-login: Disconnected (auth failed, 1 attempts in 2 secs): user=<{user}>, method=PLAIN, "
        "rip={addr}, lip=198.51.100.25, TLS, session=<q454Xu/vMwBZApgg>",
        SYSLOG + "imap-login: Login aborted: Connection closed (auth failed, 1 attempts in 2 secs) (auth_failed): "
        "user=<{user}>, method=PLAIN, rip={addr}, lip=198.51.100.25, TLS: Connection closed, "
        "session=<7Hq4P0YyR9HLAHF0>",
        SYSLOG + "pop3-login: Disconnected: Connection closed (auth failed, 1 attempts in 0 secs): user=<{user}>, "
        "rip={addr}, lip=198.51.100.25, session=<Lsz0Oo7WXti3b7xe>",
    ],
    "dovecot/too-many-invalid-commands": [SYSLOG + "imap-login: Disconnected: Too many invalid commands (tried to use "
                                          "disallowed plaintext auth): user=<{user}>, rip={addr}, "
                                          "lip=198.51.100.25, session=<S5dIdTFCDKUWWMbU>"],
    "dovecot/unknown-user": [SYSLOG + "auth-worker(31326): conn unix:auth-worker (pid=27359,uid=97): "
                             "auth-worker<55>: pam({user},{addr},<n4JLdHNVngZGpV2j>): unknown user "
                             "(given password: {text})"],
    "dovecot/password-mismatch": [SYSLOG + "auth: passwd-file({user},{addr},<LZmGp6mZaMrAqLIZ>): Password mismatch "
                                  "(given password: {text})"],
    # ------------------------------------------------------------------ opensmtpd (6.0-6.3 event= format)
    "opensmtpd/rcpt-rejected": [SYSLOG + '3a5f0c8e91b2d4f7 smtp event=failed-command address={oaddr} host={ptr} '
                                'command="RCPT TO:<{rcpt}>" result="550 Invalid recipient"'],
    "opensmtpd/auth-failed": [SYSLOG + "45addba89269aeaa smtp event=authentication user={user} address={oaddr} "
                              "host={ptr} result=permfail"],
    "opensmtpd/auth-refused": [SYSLOG + '38dd06274cde1fd7 smtp event=failed-command address={oaddr} host={ptr} '
                               'command="AUTH {text}" result="503 5.5.1 Invalid command: Command not supported"'],
    "opensmtpd/bad-input": [SYSLOG + '0c1d2e3f4a5b6c7d smtp event=bad-input address={oaddr} host={ptr} '
                            'result="500 5.5.1 Invalid command: Pipelining not supported"'],
    # OpenSMTPD 6.4+: the client from the session's connect line (two lines per template)
    "opensmtpd/session-rcpt-rejected": [SYSLOG + "9f8e7d6c5b4a3f2e smtp connected address={oaddr} host={ptr}\n" + SYSLOG
                                        + '9f8e7d6c5b4a3f2e smtp failed-command command="RCPT TO:<{rcpt}>" '
                                        'result="550 Invalid recipient: <{rcpt}>"'],
    "opensmtpd/session-auth-failed": [SYSLOG + "1122334455667788 smtp connected address={oaddr} host={ptr}\n"
                                      + SYSLOG + "1122334455667788 smtp authentication user={user} result=permfail"],
    "opensmtpd/session-bad-input": [SYSLOG + "0a0b0c0d0e0f1011 smtp connected address={oaddr} host={ptr}\n" + SYSLOG
                                    + '0a0b0c0d0e0f1011 smtp bad-input '
                                    'result="500 5.5.1 Invalid command: Line too long"'],
    "opensmtpd/helo-rejected": [SYSLOG + '1d2e3f4a5b6c7d8e smtp event=failed-command address={oaddr} host={ptr} '
                                'command="EHLO {helo}" result="501 5.5.4 Invalid command arguments: Invalid domain '
                                'name"'],
    # ------------------------------------------------------------------ sshd
    "sshd/failed-password": [
        SYSLOG + "Failed password for {user} from {addr} port 50122 ssh2",
        SYSLOG + "Failed password for invalid user {user} from {addr} port 50122 ssh2",
    ],
    "sshd/failed-publickey": [SYSLOG + "Failed publickey for {user} from {addr} port 51515 ssh2: ED25519 "
                              "SHA256:0123456789abcdefABCDEF+/0123456789abcdefABCDE"],
    "sshd/invalid-user": [SYSLOG + "Invalid user {user} from {addr} port 32836"],
    "sshd/pam-auth-failure": [
        SYSLOG + "pam_unix(sshd:auth): authentication failure; logname= uid=0 euid=0 tty=ssh ruser= rhost={addr}  "
        "user={user}",
        SYSLOG + "error: PAM: Authentication failure for illegal user {user} from {addr}",
    ],
    "sshd/closed-preauth": [SYSLOG + "Connection closed by invalid user {user} {addr} port 42728 [preauth]"],
    "sshd/max-auth-attempts": [
        SYSLOG + "error: maximum authentication attempts exceeded for invalid user {user} from {addr} port 4919 "
        "ssh2 [preauth]",
        SYSLOG + "Disconnecting authenticating user {user} {addr} port 4920: Too many authentication failures "
        "[preauth]",
    ],
    "sshd/no-identification": [SYSLOG + "Did not receive identification string from {addr} port 55555"],
    "sshd/banner-exchange": [SYSLOG + "banner exchange: Connection from {addr} port 44444: invalid format"],
    "sshd/bad-protocol-version": [SYSLOG + "Bad protocol version identification '{text}' from {addr} port 33333"],
    "sshd/kex-no-match": [SYSLOG + "Unable to negotiate with {addr} port 2222: no matching key exchange method "
                          "found. Their offer: {text} [preauth]"],
}

PROGRAM = {"exim": "exim", "sendmail": "sm-mta", "dovecot": "dovecot", "opensmtpd": "smtpd", "sshd": "sshd"}
FIELD = re.compile(r"\{(\w+)\}")
ADDR_FIELDS = {"addr", "saddr", "oaddr", "prog"}

PACKS = {name: load_pack(name) for name in PACK_NAMES}
MATCHERS = {name: Matcher([pack]) for name, pack in PACKS.items()}
CASES = [(rule, i) for rule, tpls in TEMPLATES.items() for i in range(len(tpls))]


def addr_fields(addr: str) -> dict[str, str]:
    """The client address as each daemon writes it (sendmail and OpenSMTPD prefix IPv6 with IPv6:)."""
    v6 = ":" in addr
    return {"addr": addr, "saddr": f"IPv6:{addr}" if v6 else addr, "oaddr": f"IPv6:{addr}" if v6 else addr}


def render(rule: str, index: int, addr: str, values: dict[str, str]) -> str:
    pack = rule.split("/", 1)[0]
    fields = {**NEUTRAL, **values, **addr_fields(addr), "prog": PROGRAM.get(pack, "")}
    return FIELD.sub(lambda m: fields[m.group(1)], TEMPLATES[rule][index])


def client_fields(rule: str, index: int) -> list[str]:
    return sorted(set(FIELD.findall(TEMPLATES[rule][index])) - ADDR_FIELDS)


def notations(addr: str) -> list[str]:
    """An address the way logs, clients and attackers may spell it."""
    ip = ipaddress.ip_address(addr)
    out = [addr, f"[{addr}]", f"[{addr}]:25", f"{addr}:25", f"rip={addr}", f"address={addr}", f"from {addr} port 22",
           f" {addr} port 22 [preauth]", f"[{addr}]:", f"({addr})", f"relay=[{addr}]", f"H=[{addr}]"]
    if ip.version == 6:
        out += [ip.exploded, f"IPv6:{addr}", f"[IPv6:{addr}]", f"{addr}%eth0", ip.exploded.upper()]
    else:
        out += [f"::ffff:{addr}", f"[::ffff:{addr}]", f"IPv6:::ffff:{addr}"]
    return out


OTHER_ADDRS = [n for a in FAKES + SERVER for n in notations(a)]
TOKENS = [" ", ") ", " (", "[", "]", "]:25", "<", ">", ">, ", ", ", '"', "'", ":", ": ", "=", " port 22", " ssh2",
          " [preauth]", " (may be forged)", "#012", "\\r\\n", ",<x>)", "): ", " I=[198.51.100.25]:25", "@"]
# Printable text without control characters (the daemons escape those, and rsyslog writes #NNN).
TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=12)


@st.composite
def fake_piece(draw: st.DrawFn, rule: str, index: int) -> str:
    """A slice of the same line written for another client: the most useful forgery material."""
    fake = draw(st.sampled_from(FAKES))
    line = render(rule, index, fake, {}).replace("\n", "#012")  # daemons escape newlines in fields
    kind = draw(st.sampled_from(["slice", "suffix", "prefix", "line"]))
    if kind == "line":
        return "#012" + line
    cut = draw(st.integers(0, len(line)))
    if kind == "suffix":
        return line[cut:]
    if kind == "prefix":
        return line[:cut]
    end = draw(st.integers(cut, len(line)))
    return line[cut:end]


def field_value(rule: str, index: int) -> st.SearchStrategy[str]:
    piece = st.one_of(TEXT, st.sampled_from(OTHER_ADDRS), st.sampled_from(TOKENS), fake_piece(rule, index))
    return st.lists(piece, max_size=5).map("".join)


def field_values(rule: str, index: int) -> st.SearchStrategy[dict[str, str]]:
    fields = client_fields(rule, index)
    return st.fixed_dictionaries({f: HOSTNAME if f == "name" else field_value(rule, index) for f in fields})


def match_lines(matcher: Matcher, text: str) -> list:
    """A template may be a session: its lines go through one matcher in order. Both paths: one
    line at a time as text (`match`), and the block path of the tailer and `scan` (prefilter,
    then the line's bytes matched in place when it is ASCII), on a fresh matcher of the pack."""
    by_line = [h for line in text.split("\n") for h in matcher.match(line)]
    block = Matcher(matcher.packs).scan(text.encode("utf-8", "surrogateescape") + b"\n")
    return by_line + block


def test_every_rule_has_a_template() -> None:
    rules = {r.id for pack in PACKS.values() for r in pack.rules if r.kind == "event"}
    assert sorted(rules - set(TEMPLATES)) == [], "rules without an injection template"
    assert sorted(set(TEMPLATES) - rules) == [], "templates for rules that do not exist"


@pytest.mark.parametrize(("rule", "index"), CASES, ids=[f"{r}#{i}" for r, i in CASES])
@pytest.mark.parametrize("real", REAL)
def test_neutral_template_hits(rule: str, index: int, real: str) -> None:
    line = render(rule, index, real, {})
    hits = match_lines(MATCHERS[rule.split("/", 1)[0]], line)
    assert [(h.rule, h.addr) for h in hits] == [(rule, canonical_addr(real))] * 2, line  # both paths


@pytest.mark.parametrize(("rule", "index"), CASES, ids=[f"{r}#{i}" for r, i in CASES])
def test_client_text_never_names_another_address(rule: str, index: int) -> None:
    matcher = MATCHERS[rule.split("/", 1)[0]]

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=DERANDOMIZE, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(real=st.sampled_from(REAL), values=field_values(rule, index))
    def check(real: str, values: dict[str, str]) -> None:
        line = render(rule, index, real, values)
        want = canonical_addr(real)
        wrong = [(h.rule, h.addr) for h in match_lines(matcher, line) if h.addr != want]
        assert not wrong, f"{wrong} from {line!r}"

    check()

