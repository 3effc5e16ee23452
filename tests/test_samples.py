"""Sample logs with expectations, one file per rule pack (tests/samples/<pack>.log).

Each log line may be preceded by `# expect: {"rule": "<pack>/<id>", "addr": "..."}` (the one hit
the line must produce), `# expect: [{...}, ...]` (several hits) or `# expect: null` (no hit).
Every line is checked twice: one at a time with `Matcher.match` (the daemon's and `why`'s path)
and as one block with `Matcher.scan` (the prefilter path `scan` and the tailer use), so a rule
whose prefilter literal is wrong fails here too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest

from relayguard import parse
from relayguard.model import canonical_addr
from relayguard.parse import PACK_NAMES, Matcher, load_pack

SAMPLES = Path(__file__).parent / "samples"
EXPECT = "# expect:"


@dataclass(frozen=True, slots=True)
class Sample:
    lineno: int  # 1-based, in the sample file
    text: str
    hits: tuple[tuple[str, str], ...]  # (rule, canonical addr)


def packaged_packs() -> list[str]:
    names = sorted(p.name.removesuffix(".toml") for p in resources.files("relayguard.rules").iterdir()
                   if p.name.endswith(".toml"))
    return names


def read_samples(path: Path) -> list[Sample]:
    """The annotated lines of a sample file; a log line without `# expect:` above it is an error."""
    samples: list[Sample] = []
    pending: tuple[tuple[str, str], ...] | None = None
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if raw.startswith(EXPECT):
            assert pending is None, f"{path.name}:{lineno}: two expectations in a row"
            pending = _parse_expect(json.loads(raw[len(EXPECT):]), f"{path.name}:{lineno}")
            continue
        if not raw.strip() or raw.startswith("#"):
            continue
        assert pending is not None, f"{path.name}:{lineno}: log line without '# expect:' above it"
        samples.append(Sample(lineno, raw, pending))
        pending = None
    assert pending is None, f"{path.name}: expectation at the end without a log line"
    return samples


def _parse_expect(value: object, where: str) -> tuple[tuple[str, str], ...]:
    items = [] if value is None else value if isinstance(value, list) else [value]
    out = []
    for item in items:
        assert isinstance(item, dict) and set(item) == {"rule", "addr"}, f"{where}: bad expectation {item!r}"
        addr = canonical_addr(item["addr"])
        assert addr is not None, f"{where}: not an address: {item['addr']!r}"
        out.append((item["rule"], addr))
    return tuple(sorted(out))


def test_every_pack_has_samples() -> None:
    assert packaged_packs() == sorted(PACK_NAMES)
    for name in PACK_NAMES:
        assert (SAMPLES / f"{name}.log").is_file(), f"missing tests/samples/{name}.log"


@pytest.mark.parametrize("name", PACK_NAMES)
def test_samples_line_by_line(name: str) -> None:
    samples = read_samples(SAMPLES / f"{name}.log")
    matcher = Matcher([load_pack(name)])
    failures = []
    for s in samples:
        got = tuple(sorted((h.rule, h.addr) for h in matcher.match(s.text)))
        if got != s.hits:
            failures.append(f"{name}.log:{s.lineno}: expected {list(s.hits)}, got {list(got)}\n    {s.text}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("prefilter", ["hyperscan", "re2"])
@pytest.mark.parametrize("name", PACK_NAMES)
def test_samples_as_one_block(name: str, prefilter: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The block path: the prefilter (Hyperscan, or RE2 where Hyperscan has no wheel), then each
    line matched in place on its bytes (ASCII lines) or as text (the others)."""
    if prefilter == "re2":
        monkeypatch.setattr(parse, "hyperscan", None)
    path = SAMPLES / f"{name}.log"
    expected = {(s.lineno, rule, addr) for s in read_samples(path) for rule, addr in s.hits}
    matcher = Matcher([load_pack(name)])
    assert (matcher._prefilter._db is None) == (prefilter == "re2")
    got = {(h.lineno, h.rule, h.addr) for h in matcher.scan(path.read_bytes(), str(path))}
    assert got == expected, f"missing: {sorted(expected - got)}; unexpected: {sorted(got - expected)}"


@pytest.mark.parametrize("name", PACK_NAMES)
def test_every_rule_has_a_positive_sample(name: str) -> None:
    pack = load_pack(name)
    seen = {rule for s in read_samples(SAMPLES / f"{name}.log") for rule, _ in s.hits}
    missing = sorted(r.id for r in pack.rules if r.kind == "event" and r.id not in seen)
    assert not missing, f"rules without a positive sample line in {name}.log: {missing}"
    unknown = sorted(seen - {r.id for r in pack.rules})
    assert not unknown, f"{name}.log expects rules the pack does not have: {unknown}"


@pytest.mark.parametrize("name", PACK_NAMES)
def test_samples_have_negatives_and_several_time_formats(name: str) -> None:
    samples = read_samples(SAMPLES / f"{name}.log")
    assert any(not s.hits for s in samples), f"{name}.log has no negative (expect: null) line"
    kinds = {_time_format(s.text) for s in samples}
    assert {"classic", "rfc3339"} <= kinds, f"{name}.log covers only {sorted(kinds)}"


def _time_format(line: str) -> str:
    if line.startswith("<"):
        return "rfc5424"
    if line[:1].isalpha():
        return "classic"
    if line[10:11] == "T":
        return "rfc3339"
    return "exim"


# ----------------------------------------------------------------------------- weights with meaning
# What each daemon writes when a user mistypes a password twice (both attempts inside the
# default 10-minute window) must stay under the default threshold of 10; what it writes for a
# password bot trying a handful of user names must reach it. `{n}` numbers the attempts.

TYPO = "203.0.113.200"
BOT = "203.0.113.201"

TWO_TYPOS: dict[str, list[str]] = {
    "postfix": [
        "Dec  3 10:00:0{n} mx postfix/submission/smtpd[91]: warning: unknown[{a}]: SASL LOGIN authentication "
        "failed: UGFzc3dvcmQ6, sasl_username=alice@example.com",
        "Dec  3 10:00:0{n} mx postfix/submission/smtpd[91]: disconnect from unknown[{a}] ehlo=1 auth=0/1 quit=1 "
        "commands=2/3",
    ],
    "exim": ["2026-12-03 10:00:0{n} dovecot_plain authenticator failed for (laptop) [{a}]:5{n}000 "
             "I=[198.51.100.25]:587: 535 Incorrect authentication data (set_id=alice@example.com)"],
    "sendmail": ["Dec  3 10:00:0{n} mx sm-mta[9{n}]: 5B3A00{n}abc00009{n}: AUTH failure (PLAIN): authentication "
                 "failure (-13) SASL(-13): authentication failure: Password verification failed, "
                 "user=alice@example.com, relay=laptop.example.net [{a}]"],
    "dovecot": [
        "Dec  3 10:00:0{n} mx dovecot: auth-worker(9{n}): pam(alice,{a},<sessA{n}>): pam_authenticate() failed: "
        "Authentication failure (password mismatch?)",
        "Dec  3 10:00:0{n} mx dovecot: imap-login: Disconnected (auth failed, 1 attempts in 2 secs): user=<alice>, "
        "method=PLAIN, rip={a}, lip=198.51.100.25, TLS, session=<sessA{n}>",
    ],
    "opensmtpd": ["Dec  3 10:00:0{n} mx smtpd[91]: 00000000000000a{n} smtp event=authentication user=alice "
                  "address={a} host=laptop.example.net result=permfail"],
    "sshd": [
        "Dec  3 10:00:0{n} host sshd[9{n}]: pam_unix(sshd:auth): authentication failure; logname= uid=0 euid=0 "
        "tty=ssh ruser= rhost={a}  user=alice",
        "Dec  3 10:00:0{n} host sshd[9{n}]: Failed password for alice from {a} port 5{n}000 ssh2",
    ],
}

BOT_USERS: dict[str, list[str]] = {
    "postfix": [
        "Dec  3 10:00:0{n} mx postfix/submission/smtpd[9{n}]: warning: unknown[{a}]: SASL LOGIN authentication "
        "failed: UGFzc3dvcmQ6, sasl_username=user{n}@example.com",
        "Dec  3 10:00:0{n} mx postfix/submission/smtpd[9{n}]: disconnect from unknown[{a}] ehlo=1 auth=0/1 "
        "commands=1/2",
    ],
    "exim": ["2026-12-03 10:00:0{n} dovecot_login authenticator failed for (User) [{a}]:5{n}000 "
             "I=[198.51.100.25]:587: 535 Incorrect authentication data (set_id=user{n})"],
    "sendmail": ["Dec  3 10:00:0{n} mx sm-mta[9{n}]: 5B3A00{n}abc00009{n}: AUTH failure (LOGIN): authentication "
                 "failure (-13) SASL(-13): authentication failure: checkpass failed, user=user{n}, relay=[{a}]"],
    "dovecot": ["Dec  3 10:00:0{n} mx dovecot: pop3-login: Aborted login (auth failed, 1 attempts in 2 secs): "
                "user=<user{n}>, method=PLAIN, rip={a}, lip=198.51.100.25, session=<sessB{n}>"],
    "opensmtpd": ["Dec  3 10:00:0{n} mx smtpd[91]: 00000000000000b{n} smtp event=authentication user=user{n} "
                  "address={a} host=<unknown> result=permfail"],
    "sshd": [
        "Dec  3 10:00:0{n} host sshd[9{n}]: Invalid user user{n} from {a} port 5{n}000",
        "Dec  3 10:00:0{n} host sshd[9{n}]: pam_unix(sshd:auth): authentication failure; logname= uid=0 euid=0 "
        "tty=ssh ruser= rhost={a}",
        "Dec  3 10:00:0{n} host sshd[9{n}]: Failed password for invalid user user{n} from {a} port 5{n}000 ssh2",
    ],
}


def _offenses(name: str, lines: list[str], attempts: int, addr: str) -> tuple[int, int]:
    """(offenses, final score) after `attempts` rounds of `lines` against the default window."""
    from relayguard.score import Scorer, Window

    matcher = Matcher([load_pack(name)])
    scorer = Scorer([Window("short", 600, 10)])
    offenses = 0
    for n in range(1, attempts + 1):
        for tpl in lines:
            hits = matcher.match(tpl.format(n=n, a=addr))
            assert hits, f"scenario line does not match: {tpl}"
            offenses += sum(scorer.observe(h) is not None for h in hits)
    return offenses, scorer.score(addr).get("short", 0)


@pytest.mark.parametrize("name", PACK_NAMES)
def test_two_typos_stay_under_the_threshold(name: str) -> None:
    offenses, score = _offenses(name, TWO_TYPOS[name], 2, TYPO)
    assert offenses == 0 and 0 < score < 10, f"{name}: two typos scored {score}"


@pytest.mark.parametrize("name", PACK_NAMES)
def test_a_password_bot_trying_user_names_is_an_offender(name: str) -> None:
    offenses, _ = _offenses(name, BOT_USERS[name], 4, BOT)
    assert offenses >= 1, f"{name}: four guessed user names did not reach the threshold"
