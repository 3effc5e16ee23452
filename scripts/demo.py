"""The newcomer's tour (run by scripts/demo.sh): a real Postfix MX under real attack, relayguard banning.

Builds network namespaces with a real Postfix (postscreen on 25, Dovecot SASL on 587), bots and a
legitimate client (tests/e2e_harness.py, the machinery of tests/test_e2e.py), starts `relayguard run`
with nftables inside the MX namespace, runs four attacks, shows the bans (`relayguard list`, `why`),
the bots' next connections dropped, the client's mail delivered; then tears everything down. Nothing
touches this machine's own network namespace or its Postfix.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))  # the lab lives with the tests, which use the same machinery

from e2e_harness import Guarded  # noqa: E402


def say(text: str = "") -> None:
    print(text, flush=True)


def indent(text: str, by: str = "    ") -> str:
    return "\n".join(by + ln for ln in text.rstrip("\n").splitlines())


def short(line: str) -> str:
    """A maillog line without its timestamp and host, cut to one terminal line; deliveries in brief."""
    parts = line.split(" ", 4)
    text = parts[4] if len(parts) == 5 else line
    sent = re.search(r"^(\S+) (\w+): (to=<[^>]*>).*?(status=\w+ \([^)]*\))", text)
    if sent:
        text = " ".join(sent.groups())
    return text if len(text) <= 130 else text[:127] + "..."


def attack(g: Guarded, title: str, bot: str, run: Callable[[str], list[str]], shown: int = 2) -> None:
    say(f"\n== {title} from {bot}")
    lines = [ln for ln in run(bot) if bot in ln]
    for line in lines[-shown:]:
        say(f"    postfix: {short(line)}")
    ban = g.wait_banned(bot)
    secs = datetime.fromisoformat(ban["expires_at"]) - datetime.fromisoformat(ban["banned_at"])
    say(f"    relayguard: banned at {ban['banned_at'][11:19]} (the attempt above was logged at {lines[-1][7:15]}) "
        f"for {secs}: {ban['reason']}")


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="relayguard-demo-"))
    say("relayguard demo: a real Postfix MX under attack, in network namespaces of its own")
    with Guarded(base) as g:
        lab = g.lab
        say(f"\n== the lab\n    MX {lab.mx_addr4} / {lab.mx_addr6} (namespace {lab.server_ns}): Postfix with "
            f"postscreen on 25,\n    Dovecot SASL on 587; bots in {lab.attacker_ns}; a legitimate client "
            f"{lab.client_addr4} / {lab.client_addr6} in {lab.client_ns}")
        say("\n== relayguard run (nftables, in the MX namespace, reading Postfix's log)")
        say(indent(g.cli("status")))

        attack(g, "relay attempts on port 25 (554 Relay access denied)", g.bots["relay"][0], g.relay_burst)
        attack(g, "recipient harvest on port 587 (550 User unknown)", g.bots["harvest"][1], g.harvest)
        attack(g, "AUTH brute force against Dovecot SASL on 587", g.bots["auth"][0], g.auth_brute_force)
        attack(g, "pregreeting bot on port 25 (talks before postscreen's greeting)", g.bots["pregreet"][1],
               lambda bot: [ln for ln in g.pregreet(bot) if "PREGREET" in ln])

        say("\n== relayguard list")
        say(indent(g.cli("list")))
        say(f"\n== relayguard why {g.bots['auth'][0]}")
        say(indent(g.cli("why", g.bots["auth"][0])))

        say("\n== the bots' next connections: dropped by the kernel")
        for bot in (g.bots["relay"][0], g.bots["harvest"][1], g.bots["auth"][0], g.bots["pregreet"][1]):
            verdict = "answered (NOT blocked)" if g.reachable(bot, 25, timeout=3) else "no answer within 3 s: dropped"
            say(f"    {bot} -> port 25: {verdict}")

        say("\n== the legitimate client: mail on 25, a typo'd recipient, AUTH + mail on 587")
        for client in (lab.client_addr4, lab.client_addr6):
            for line in g.legit_mail(client):
                say(f"    postfix: {short(line)}")
        bans = g.bans()
        for client in (lab.client_addr4, lab.client_addr6):
            say(f"    {client}: {'BANNED' if client in bans else 'not banned'}, SMTP "
                f"{'works' if g.smtp_works(client) else 'FAILS'}")
        say(f"\n== relayguard why {lab.client_addr4}")
        say(indent(g.cli("why", lab.client_addr4)))

        say("\n== relayguard status")
        say(indent(g.cli("status")))
        say("\n== tearing down: relayguard flush, relayguard stopped, Postfix and Dovecot stopped, namespaces deleted")
    shutil.rmtree(base, ignore_errors=True)
    say("done.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
