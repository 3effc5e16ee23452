"""End to end, as on a real mail server: a real Postfix MX (postscreen on 25, Dovecot SASL on 587) in
a namespace, relayguard running beside it with nftables, bots attacking from another namespace over
IPv4 and IPv6, and a legitimate client sending mail (tests/e2e_harness.py, the demo's machinery).

Every bot is banned, by the kernel, after its own attack; the legitimate client's mail is delivered
and it is never banned; a short ban expires and the bot's connections work again; `relayguard
status`, `list` and `why` report all of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e_harness import Guarded

pytestmark = [pytest.mark.netns, pytest.mark.postfix]

ATTACKS = ("relay", "harvest", "auth", "pregreet")
RULES = {"relay": "postfix/relay-denied", "harvest": "postfix/user-unknown", "auth": "postfix/sasl-failed",
         "pregreet": "postfix/pregreet"}


def test_bots_banned_client_served_ban_expires(tmp_path: Path) -> None:
    with Guarded(tmp_path) as g:
        run = {"relay": g.relay_burst, "harvest": g.harvest, "auth": g.auth_brute_force, "pregreet": g.pregreet}
        for family in (0, 1):
            for name in ATTACKS:
                bot = g.bots[name][family]
                assert g.reachable(bot)
                run[name](bot)
                ban = g.wait_banned(bot)
                assert ban["source"] == "auto" and ban["expires_at"] is not None
                assert not g.reachable(bot) and not g.reachable(bot, 25)  # dropped, SMTP included
                why = json.loads(g.cli("why", bot, "--json"))
                assert why["ban"] is not None and RULES[name] in {e["rule"] for e in why["events"]}

        sent = [line for c in (g.lab.client_addr4, g.lab.client_addr6) for line in g.legit_mail(c)]
        assert len(sent) == 4
        bans = g.bans()
        assert set(bans) == {g.bots[n][f] for n in ATTACKS for f in (0, 1)}
        for client in (g.lab.client_addr4, g.lab.client_addr6):
            assert client not in bans and g.reachable(client) and g.smtp_works(client)
            assert json.loads(g.cli("why", client, "--json"))["ban"] is None

        st = g.status()
        assert st["bans"]["total"] == 8 and st["bans"]["ipv4"] == 4 and st["bans"]["ipv6"] == 4
        src = st["sources"][0]
        assert src["state"] == "following" and src["lines"] > 0 and src["events"] >= 8 * 2

        # a short ban ends by itself: the kernel lets the bot in again, status counts it gone
        g.reload(ban="5s")
        for bot in g.bots["expiry"]:
            g.pregreet(bot)
            ban = g.wait_banned(bot)
            assert ban["expires_at"] is not None
        for bot in g.bots["expiry"]:
            g.wait_unbanned(bot)
            assert g.reachable(bot) and g.smtp_works(bot)
        assert g.status()["bans"]["total"] == 8
        assert g.daemon is not None
        expired = {e["addr"] for e in g.daemon.events("ban_expired")}
        assert set(g.bots["expiry"]) <= expired
