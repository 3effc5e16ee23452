"""The enforce stage against real kernels: nftables and iptables backends run inside a private server
namespace while a client namespace connects over a veth pair; the dry-run backend and the batch rules
run in-process. The root namespace is snapshotted before and compared after the module.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from ipaddress import ip_network
from typing import Any

import pytest
import structlog
from netns import Agent, AgentError, Pair, Prober, listener, pair, root_snapshot, run

from relayguard.enforce import BACKENDS, FirewallError, load_backend, normalize, timeout_for
from relayguard.enforce.dryrun import DryRun
from relayguard.enforce.nftables import RULES, place_nets
from relayguard.model import Ban, parse_net

PORT = 2525

# Runs inside the server namespace: one Firewall instance, driven by JSON requests.
FW_AGENT = """
import time
from relayguard.enforce import load_backend
from relayguard.model import Ban, net_text, parse_net
fw = None

def handle(req):
    global fw
    op = req["op"]
    if op == "load":
        fw = load_backend(req["backend"], **req.get("kw", {}))
        return fw.name
    if op == "apply":
        now = req.get("now") or time.time()
        add = [Ban(parse_net(n), None if ttl is None else now + ttl, "test") for n, ttl in req["add"]]
        t0 = time.monotonic()
        fw.apply(add, [parse_net(n) for n in req["remove"]], now)
        return time.monotonic() - t0
    if op == "listed":
        t0 = time.monotonic()
        found = {net_text(n): left for n, left in fw.listed().items()}
        return {"found": found, "seconds": time.monotonic() - t0} if req.get("timed") else found
    if op == "expired":
        return [net_text(n) for n in fw.expired(time.time())]
    return getattr(fw, op)()
"""


class Fw:
    """A firewall backend living in the server namespace (same method names as the Firewall protocol,
    with text addresses and (net, seconds-from-now) bans)."""

    def __init__(self, agent: Agent, backend: str, **kw: object) -> None:
        self.backend = backend
        self.agent = agent
        agent.call(op="load", backend=backend, kw=kw)

    def setup(self) -> None:
        self.agent.call(op="setup")

    def present(self) -> bool:
        return bool(self.agent.call(op="present"))

    def flush(self) -> None:
        self.agent.call(op="flush")

    def teardown(self) -> None:
        self.agent.call(op="teardown")

    def apply(self, add: Sequence[tuple[str, float | None]] = (), remove: Sequence[str] = (),
              now: float | None = None) -> float:
        """Bans expire `ttl` seconds after `now` (default: the agent's clock); returns seconds taken."""
        return float(self.agent.call(op="apply", add=list(add), remove=list(remove), now=now))

    def listed(self) -> dict[str, float | None]:
        return dict(self.agent.call(op="listed"))

    def expired(self) -> list[str]:
        return list(self.agent.call(op="expired"))


@pytest.fixture(scope="module", autouse=True)
def root_untouched() -> Iterator[None]:
    before = root_snapshot()
    yield
    after = root_snapshot()
    assert "relayguard" not in after["nft tables"]
    assert "RELAYGUARD" not in after.get("iptables-legacy", "") + after.get("ip6tables-legacy", "")
    assert after == before, "the root network namespace changed"


@pytest.fixture
def lab() -> Iterator[tuple[Pair, Prober]]:
    with pair("enf") as p, listener(p.server, PORT), Prober(p.client) as probe:
        yield p, probe


@pytest.fixture
def fw(request: pytest.FixtureRequest, lab: tuple[Pair, Prober]) -> Iterator[Fw]:
    backend, kw = request.param
    with Agent(lab[0].server, FW_AGENT) as agent:
        yield Fw(agent, backend, **kw)


KERNEL = [pytest.param(("nftables", {}), id="nftables"),
          pytest.param(("nftables", {"runner": "cli"}), id="nft-cli"),
          pytest.param(("iptables", {}), id="iptables")]


def _nft(p: Pair, *argv: str) -> dict[str, Any]:
    return json.loads(run(p.server, "nft", "-j", *argv).stdout)


def _baseline(p: Pair, probe: Prober) -> None:
    """Every client address gets through before any ban. This also settles the client's IPv6 neighbour
    entry for the server while no source is banned: a ban drops the banned source's neighbour
    solicitations too, which would otherwise stall the next connection from an allowed address."""
    for src, dst in ((p.client4, p.server4), (p.other4, p.server4), (p.client6, p.server6),
                     (p.other6, p.server6)):
        assert probe.connect(dst, PORT, src=src), f"{src} -> {dst} refused before any ban"


def _wait_until(cond: Callable[[], bool], seconds: float = 30.0, step: float = 0.25) -> bool:
    """Poll a condition with a generous bound (the machine is noisy; we assert behaviour, not speed)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())


# ---------------------------------------------------------------- traffic through the real kernel

@pytest.mark.netns
@pytest.mark.parametrize("fw", KERNEL, indirect=True)
def test_ban_drops_then_expires(lab: tuple[Pair, Prober], fw: Fw) -> None:
    p, probe = lab
    fw.setup()
    _baseline(p, probe)

    ttl = 6
    fw.apply(add=[(p.client4, ttl), (p.client6, ttl)])
    assert not probe.connect(p.server4, PORT)
    assert not probe.connect(p.server6, PORT)
    # Only the banned source is dropped: the client's other addresses still get through.
    assert probe.connect(p.server4, PORT, src=p.other4)
    assert probe.connect(p.server6, PORT, src=p.other6)
    listed = fw.listed()
    assert set(listed) == {p.client4, p.client6}
    assert all(left is not None and 0 <= left <= ttl + 1 for left in listed.values())

    if fw.backend == "iptables":
        # No kernel timeouts: the rule stays until the daemon removes what expired().
        assert _wait_until(lambda: set(fw.expired()) == {p.client4, p.client6})
        assert not probe.connect(p.server4, PORT)
        fw.apply(remove=fw.expired())
    assert _wait_until(lambda: probe.connect(p.server4, PORT) and probe.connect(p.server6, PORT))
    assert fw.listed() == {}


@pytest.mark.netns
@pytest.mark.parametrize("fw", KERNEL, indirect=True)
def test_cidr_bans(lab: tuple[Pair, Prober], fw: Fw) -> None:
    p, probe = lab
    fw.setup()
    _baseline(p, probe)
    fw.apply(add=[("198.51.100.0/24", None), ("2001:db8:2::/64", 600)])
    assert not probe.connect(p.server4, PORT, src=p.other4)
    assert not probe.connect(p.server6, PORT, src=p.other6)
    assert probe.connect(p.server4, PORT, src=p.client4)
    assert probe.connect(p.server6, PORT, src=p.client6)
    listed = fw.listed()
    assert listed["198.51.100.0/24"] is None
    assert 590 <= listed["2001:db8:2::/64"] <= 601
    fw.apply(remove=["198.51.100.0/24", "2001:db8:2::/64"])
    assert probe.connect(p.server4, PORT, src=p.other4)
    assert probe.connect(p.server6, PORT, src=p.other6)
    assert fw.listed() == {}


@pytest.mark.netns
@pytest.mark.parametrize("fw", KERNEL[:1], indirect=True)
def test_nft_layout(lab: tuple[Pair, Prober], fw: Fw) -> None:
    p, _ = lab
    fw.setup()
    fw.apply(add=[(p.client4, 59.2), (p.client6, None), ("198.51.100.0/24", 60), ("2001:db8:2::/64", 60)])
    sets = {o["set"]["name"]: o["set"] for o in _nft(p, "list", "table", "inet", "relayguard")["nftables"]
            if "set" in o}
    assert sets["banned4"]["flags"] == ["timeout"] and sets["banned6"]["type"] == "ipv6_addr"
    assert sets["nets4"]["flags"] == ["interval", "timeout"] and sets["nets6"]["type"] == "ipv6_addr"
    [elem] = sets["banned4"]["elem"]
    assert elem["elem"]["val"] == p.client4 and elem["elem"]["timeout"] == 60  # 59.2 s rounded up
    assert sets["banned6"]["elem"] == [p.client6]  # permanent: a bare value, no timeout
    assert sets["nets4"]["elem"][0]["elem"]["val"] == {"prefix": {"addr": "198.51.100.0", "len": 24}}
    assert sets["nets6"]["elem"][0]["elem"]["val"] == {"prefix": {"addr": "2001:db8:2::", "len": 64}}
    chain = _nft(p, "list", "chain", "inet", "relayguard", "input")["nftables"]
    [c] = [o["chain"] for o in chain if "chain" in o]
    assert (c["type"], c["hook"], c["prio"], c["policy"]) == ("filter", "input", -10, "accept")
    assert [o["rule"]["expr"] for o in chain if "rule" in o] == RULES


@pytest.mark.netns
@pytest.mark.parametrize("fw", KERNEL[:1], indirect=True)
def test_hundred_thousand_elements(lab: tuple[Pair, Prober], fw: Fw) -> None:
    p, probe = lab
    fw.setup()
    _baseline(p, probe)
    # Documentation ranges only: 99,000 single IPv6, 500 single IPv4 (the clients among them), 500 /48s.
    single6 = [f"2001:db8:ff::{i // 65536:x}:{i % 65536:x}" for i in range(98_999)] + [p.client6]
    single4 = [f"203.0.113.{i}" for i in range(256)] + [f"198.51.100.{i}" for i in range(8, 251)] + [p.client4]
    nets6 = [f"2001:db8:{0x1000 + i:x}::/48" for i in range(500)]
    bans = [(n, 3600) for n in (*single6, *single4, *nets6)]
    assert len(set(bans)) == 100_000
    seconds = fw.apply(add=bans)
    timed = fw.agent.call(op="listed", timed=True)
    print(f"nftables: apply of 100,000 elements took {seconds:.2f}s, listed() {timed['seconds']:.2f}s")
    assert len(timed["found"]) == 100_000
    assert not probe.connect(p.server4, PORT) and not probe.connect(p.server6, PORT)
    assert probe.connect(p.server4, PORT, src=p.other4) and probe.connect(p.server6, PORT, src=p.other6)
    fw.apply(remove=[n for n, _ in bans])
    assert fw.listed() == {}
    assert probe.connect(p.server4, PORT)


# ---------------------------------------------------------------- lifecycle: setup, present, flush

def _nft_rules(p: Pair) -> list[tuple[int, str]]:
    """(handle, rule) of our chain: unchanged handles prove setup() did not rewrite the rules."""
    chain = _nft(p, "-a", "list", "chain", "inet", "relayguard", "input")["nftables"]
    return [(o["rule"]["handle"], json.dumps(o["rule"]["expr"])) for o in chain if "rule" in o]


def _jumps(p: Pair) -> list[str]:
    return [ln for ln in run(p.server, "iptables-legacy", "-S", "INPUT").stdout.splitlines() if "-A" in ln]


@pytest.mark.netns
@pytest.mark.parametrize("fw", KERNEL, indirect=True)
def test_setup_idempotent_present_flush(lab: tuple[Pair, Prober], fw: Fw) -> None:
    p, probe = lab
    nft = fw.backend == "nftables"
    assert not fw.present()
    fw.setup()
    before = _nft_rules(p) if nft else _jumps(p)
    fw.apply(add=[(p.client4, 600), ("2001:db8:2::/64", None)])
    fw.setup()  # a second setup changes nothing and keeps what is banned
    assert (_nft_rules(p) if nft else _jumps(p)) == before
    assert set(fw.listed()) == {p.client4, "2001:db8:2::/64"}
    assert fw.present()
    if nft:
        assert len(before) == 4
        run(p.server, "nft", "flush", "chain", "inet", "relayguard", "input")  # someone else's flush
        assert not fw.present()
        assert probe.connect(p.server4, PORT)
        fw.setup()
        assert fw.present() and not probe.connect(p.server4, PORT)
        run(p.server, "nft", "delete", "table", "inet", "relayguard")
        assert not fw.present() and fw.listed() == {}
        with pytest.raises(AgentError, match=r"table inet relayguard is missing \(run setup\)"):
            fw.apply(add=[(p.client4, 600)])
        fw.setup()
        assert fw.present() and fw.listed() == {}
    else:
        assert _jumps(p) == ["-A INPUT -j RELAYGUARD"]
        run(p.server, "iptables-legacy", "-D", "INPUT", "-j", "RELAYGUARD")  # unhooked by someone
        run(p.server, "iptables-legacy", "-I", "INPUT", "-j", "ACCEPT")
        assert not fw.present()
        assert probe.connect(p.server4, PORT)
        fw.setup()
        assert fw.present() and not probe.connect(p.server4, PORT)
        assert _jumps(p) == ["-A INPUT -j RELAYGUARD", "-A INPUT -j ACCEPT"]
        rules = run(p.server, "iptables-legacy", "-S", "RELAYGUARD").stdout
        assert f'-A RELAYGUARD -s {p.client4}/32 -m comment --comment "relayguard:' in rules
        assert "-A RELAYGUARD -s 2001:db8:2::/64 -m comment --comment \"relayguard:0\" -j DROP" in run(
            p.server, "ip6tables-legacy", "-S", "RELAYGUARD").stdout
        for cmd in (("-D", "INPUT", "-j", "RELAYGUARD"), ("-F", "RELAYGUARD"), ("-X", "RELAYGUARD")):
            run(p.server, "iptables-legacy", *cmd)  # the whole chain deleted by someone
        assert not fw.present() and set(fw.listed()) == {"2001:db8:2::/64"}
        with pytest.raises(AgentError, match=r"chain RELAYGUARD is missing \(run setup\)"):
            fw.apply(add=[(p.client4, 600)])
        fw.setup()
        assert fw.present() and set(fw.listed()) == {"2001:db8:2::/64"}
    fw.flush()
    assert not fw.present() and fw.listed() == {}
    assert probe.connect(p.server4, PORT)
    if nft:
        assert "relayguard" not in run(p.server, "nft", "list", "tables").stdout
    else:
        assert "RELAYGUARD" not in run(p.server, "iptables-legacy", "-S").stdout
        assert "RELAYGUARD" not in run(p.server, "ip6tables-legacy", "-S").stdout
    fw.flush()  # flushing nothing is fine
    fw.teardown()


# ---------------------------------------------------------------- apply semantics on the real kernel

@pytest.mark.netns
@pytest.mark.parametrize("fw", KERNEL, indirect=True)
def test_apply_semantics(fw: Fw) -> None:
    fw.setup()
    now = time.time()
    # Already gone: removing what is not there (single and prefix) succeeds.
    fw.apply(remove=["203.0.113.9", "203.0.113.0/24", "2001:db8:9::/64", "2001:db8:9::9"])
    # Duplicates collapse to the longest; a ban already expired at `now` is skipped.
    fw.apply(add=[("203.0.113.1", 100), ("203.0.113.1", 1000), ("203.0.113.2", -5),
                  ("2001:db8:3::1", 1000), ("2001:db8:3::1", None)], now=now)
    listed = fw.listed()
    assert set(listed) == {"203.0.113.1", "2001:db8:3::1"}
    assert 100 < listed["203.0.113.1"] <= 1001
    assert listed["2001:db8:3::1"] is None
    # Already there: banning again succeeds and the new expiry replaces the old (shorter or longer).
    fw.apply(add=[("203.0.113.1", 50)])
    assert 0 < fw.listed()["203.0.113.1"] <= 51
    fw.apply(add=[("203.0.113.1", 5000), ("2001:db8:3::1", 70)])
    listed = fw.listed()
    assert 1001 < listed["203.0.113.1"] <= 5001 and 0 < listed["2001:db8:3::1"] <= 71
    # Deletes run before adds: a net both removed and added in one batch ends up banned.
    fw.apply(add=[("203.0.113.1", 300)], remove=["203.0.113.1", "2001:db8:3::1"])
    assert set(fw.listed()) == {"203.0.113.1"}
    # (Bounds above allow +1 s: timeouts round up, and iptables keeps whole epoch seconds.)


@pytest.mark.netns
@pytest.mark.parametrize("fw", KERNEL[:2], indirect=True)
def test_nft_overlapping_prefixes(fw: Fw) -> None:
    fw.setup()
    fw.apply(add=[("198.51.100.0/25", 600)])
    # A wider prefix replaces the narrower one it covers (an interval set cannot hold both).
    fw.apply(add=[("198.51.100.0/24", 900)])
    assert set(fw.listed()) == {"198.51.100.0/24"}
    # A narrower one inside a listed wider one is covered: skipped, and the batch still succeeds.
    fw.apply(add=[("198.51.100.128/26", 60), ("203.0.113.0/24", 60), ("203.0.113.64/26", 60)])
    assert set(fw.listed()) == {"198.51.100.0/24", "203.0.113.0/24"}
    # Replacing the same prefix with a new timeout works although it is listed.
    fw.apply(add=[("198.51.100.0/24", 30)])
    assert fw.listed()["198.51.100.0/24"] <= 31


# ---------------------------------------------------------------- errors as one line

@pytest.mark.netns
@pytest.mark.parametrize("backend,kw", [("nftables", {}), ("nftables", {"runner": "cli"}), ("iptables", {})])
def test_without_cap_net_admin(backend: str, kw: dict[str, str]) -> None:
    with pair("cap") as p:
        drop = ("setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin")
        with Agent(p.server, FW_AGENT, prefix=drop) as agent, pytest.raises(AgentError) as err:
            agent.call(op="load", backend=backend, kw=kw)
            agent.call(op="setup")
    message = str(err.value)
    assert message.startswith(f"FirewallError: {backend}: no CAP_NET_ADMIN (")
    assert "\n" not in message and "b'" not in message


def test_nft_missing_is_one_line() -> None:
    with pytest.raises(FirewallError, match=r"^nftables: nft not found"):
        load_backend("nftables", runner="cli", nft="/nonexistent/nft")


def test_unknown_backend() -> None:
    with pytest.raises(FirewallError, match="unknown firewall 'pf'"):
        load_backend("pf")


def test_registry_names() -> None:
    assert set(BACKENDS) == {"nftables", "iptables", "dry-run"}
    assert load_backend("dry-run").name == "dry-run"


# ---------------------------------------------------------------- batch rules and dry-run

def _ban(net: str, expires: float | None) -> Ban:
    return Ban(parse_net(net), expires, "test")


def test_normalize() -> None:
    now = 1000.0
    b = normalize([_ban("192.0.2.7", 1100), _ban("192.0.2.7", 1500), _ban("192.0.2.8", 1000),
                   _ban("192.0.2.9", 2000), _ban("192.0.2.9", None), _ban("2001:db8::/64", 1001)],
                  [parse_net("192.0.2.7"), parse_net("198.51.100.1"), parse_net("198.51.100.1")], now)
    assert b.add == {parse_net("192.0.2.7"): 1500, parse_net("192.0.2.9"): None,
                     parse_net("2001:db8::/64"): 1001}
    assert b.remove == [parse_net("198.51.100.1")]
    assert timeout_for(1000.2, now) == 1 and timeout_for(1000.0001, now) == 1
    assert timeout_for(1060.5, now) == 61 and timeout_for(None, now) is None


def test_place_nets() -> None:
    n = ip_network
    added, dropped = place_nets({n("192.0.2.0/24"): 5.0, n("192.0.2.128/25"): 9.0, n("2001:db8::/48"): None},
                                [n("192.0.2.0/26"), n("198.51.100.0/24"), n("2001:db8::/32")])
    assert added == {n("192.0.2.0/24"): 5.0}  # the /25 inside the new /24; the /48 inside a live /32
    assert dropped == {n("192.0.2.0/26")}  # covered by the new /24


def test_dry_run_logs_and_lists() -> None:
    clock = [1000.0]
    fw = DryRun(clock=lambda: clock[0])
    assert not fw.present()
    fw.setup()
    assert fw.present()
    with structlog.testing.capture_logs() as logs:
        fw.apply([_ban("192.0.2.7", 1010), _ban("2001:db8::/64", None), _ban("192.0.2.8", 990)],
                 [parse_net("198.51.100.1")], now=1000.0)
        fw.apply([], [parse_net("2001:db8::/64")], now=1000.0)
    assert [(e["event"], e["net"]) for e in logs] == [
        ("dry_run_banned", "192.0.2.7"), ("dry_run_banned", "2001:db8::/64"),
        ("dry_run_unbanned", "2001:db8::/64")]
    assert logs[0]["timeout"] == 10 and logs[1]["timeout"] is None
    assert fw.listed() == {parse_net("192.0.2.7"): 10.0}
    clock[0] = 1010.0  # its timeout ran out, as the kernel would see it
    assert fw.listed() == {}
    assert fw.expired(clock[0]) == []
    fw.apply([_ban("192.0.2.9", None)], [], now=1010.0)
    fw.flush()
    assert fw.listed() == {} and not fw.present()
