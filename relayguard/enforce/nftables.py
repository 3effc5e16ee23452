"""nftables backend: owns table `inet relayguard` and nothing else.

Single addresses go into the plain timeout sets `banned4`/`banned6`; CIDR prefixes into the interval sets
`nets4`/`nets6`. Measured with nft 1.0.6 and 100,000 elements: in a plain set an add takes milliseconds
(listings take 0.6 s); in an interval set every nft command, even an add, loads all elements first
(0.9 s). Chain `input` (hook input, priority -10, policy accept) drops saddr matches of each set. The
kernel expires elements by their timeout.

Every change is one JSON transaction through libnftables (Debian python3-nftables), or `nft -j -f -`
when the module is missing: never one process per address.

Idempotence without a listing of the big sets: nft fails a whole transaction on "delete element" of a
missing element and does not refresh the timeout of an existing one on "add" (kernels before 6.10).
So for single addresses a removal is `add X; delete X`, and a ban of an address this backend knows is
in the set (it remembers what it listed and added) is `add X; delete X; add X timeout T`, which
succeed whether or not X is there. A ban of an address it does not know there is a plain add (an add
of an existing element is no error): twice as fast for bulk bans and restores, where nearly all
addresses are new. Interval sets cannot take that trick (nft 1.0.6 then reports
an overlap for a wider prefix added in the same batch), so for them apply() lists nets4/nets6 first and
deletes only what is there, as crowdsec's firewall bouncer does.

Overlapping prefixes cannot coexist in an interval set: a prefix inside a wider one already listed or
added is skipped as covered, and a wider prefix replaces the narrower ones it covers. If a skipped or
replaced narrower ban outlives the wider one, the daemon's reconcile (listed() vs wanted) re-adds it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from ipaddress import ip_network, summarize_address_range
from typing import Any, Protocol

import structlog

from relayguard.enforce import Batch, Firewall, FirewallError, normalize, timeout_for
from relayguard.model import Ban, Network, addr_text, is_single

log = structlog.get_logger(__name__)

FAMILY = "inet"
TABLE = "relayguard"
CHAIN = "input"
PRIORITY = -10
SINGLE_SETS = {4: "banned4", 6: "banned6"}
NET_SETS = {4: "nets4", 6: "nets6"}
_ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
_PROTO = {4: "ip", 6: "ip6"}
# nft's JSON parser and the kernel's jiffies conversion both accept this; ~68 years is "until removed".
MAX_TIMEOUT = 2**31 - 1
LIST_ATTEMPTS = 5
_T = {"family": FAMILY, "table": TABLE}

Json = dict[str, Any]


def _rule_expr(version: int, set_name: str) -> list[Json]:
    """`ip saddr @set drop` as nft prints it back, so present() can compare."""
    match = {"op": "==", "left": {"payload": {"protocol": _PROTO[version], "field": "saddr"}},
             "right": f"@{set_name}"}
    return [{"match": match}, {"drop": None}]


RULES: list[list[Json]] = [_rule_expr(v, sets[v]) for v in (4, 6) for sets in (SINGLE_SETS, NET_SETS)]


def set_for(net: Network) -> str:
    return (SINGLE_SETS if is_single(net) else NET_SETS)[net.version]


def _value(net: Network) -> str:
    """An element in nft's syntax: the address, or the prefix."""
    return addr_text(net) if is_single(net) else f"{addr_text(net)}/{net.prefixlen}"


def _element(net: Network, timeout: int | None) -> str:
    return _value(net) if timeout is None else f"{_value(net)} timeout {min(timeout, MAX_TIMEOUT)}s"


def _nets_of(val: Any) -> list[Network]:
    """Networks from one element value: "a.b.c.d", {"prefix": ...} or {"range": [lo, hi]}."""
    if isinstance(val, str):
        return [ip_network(val)]
    if "prefix" in val:
        p = val["prefix"]
        return [ip_network(f"{p['addr']}/{p['len']}")]
    if "range" in val:
        lo, hi = (ip_network(a).network_address for a in val["range"])
        return list(summarize_address_range(lo, hi))
    raise FirewallError(f"nftables: unexpected set element {val!r}")


def _elements(objects: Iterable[Json], names: Iterable[str]) -> dict[Network, float | None]:
    wanted = set(names)
    found: dict[Network, float | None] = {}
    for obj in objects:
        s = obj.get("set")
        if not s or s.get("table") != TABLE or s.get("name") not in wanted:
            continue
        for e in s.get("elem", ()):
            inner = e["elem"] if isinstance(e, dict) and "elem" in e else {"val": e}
            left = inner.get("expires")
            for net in _nets_of(inner["val"]):
                found[net] = None if left is None else float(left)
    return found


class _Runner(Protocol):
    def run(self, cmds: list[Json]) -> list[Json]: ...

    def run_text(self, text: str) -> None: ...


def _error(text: str) -> FirewallError:
    """The first meaningful line of nft's error output."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= {"^", "~"}]
    first = lines[0] if lines else "nft failed without a message"
    for prefix in ("internal:0:0-0: ", "Error: "):
        first = first.removeprefix(prefix)
    if "Operation not permitted" in first:
        return FirewallError(f"nftables: no CAP_NET_ADMIN ({first})")
    return FirewallError(f"nftables: {first}")


def _missing(e: FirewallError) -> bool:
    return "No such file or directory" in str(e)


class _Lib:
    """libnftables through Debian's python3-nftables bindings."""

    def __init__(self) -> None:
        import nftables  # type: ignore[import-untyped,import-not-found,unused-ignore]

        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)

    def run(self, cmds: list[Json]) -> list[Json]:
        rc, out, err = self._nft.json_cmd({"nftables": cmds})
        if rc != 0:
            raise _error(err)
        return out["nftables"] if out else []

    def run_text(self, text: str) -> None:
        rc, _, err = self._nft.cmd(text)
        if rc != 0:
            raise _error(err)


class _Cli:
    """`nft -j -f -`: one process per transaction, for hosts without the Python bindings."""

    def __init__(self, path: str) -> None:
        self._path = path

    def run(self, cmds: list[Json]) -> list[Json]:
        try:
            proc = subprocess.run([self._path, "-j", "-f", "-"], input=json.dumps({"nftables": cmds}),
                                  capture_output=True, text=True, check=False)
        except OSError as e:
            raise FirewallError(f"nftables: cannot run {self._path}: {e.strerror}") from None
        if proc.returncode != 0:
            raise _error(proc.stderr)
        return json.loads(proc.stdout)["nftables"] if proc.stdout.strip() else []

    def run_text(self, text: str) -> None:
        try:
            proc = subprocess.run([self._path, "-f", "-"], input=text, capture_output=True, text=True, check=False)
        except OSError as e:
            raise FirewallError(f"nftables: cannot run {self._path}: {e.strerror}") from None
        if proc.returncode != 0:
            raise _error(proc.stderr)


def _runner(kind: str, nft: str) -> _Runner:
    if kind in ("auto", "lib"):
        try:
            return _Lib()
        except (ImportError, OSError) as e:
            if kind == "lib":
                raise FirewallError(f"nftables: libnftables unavailable ({e})") from None
    if kind not in ("auto", "cli"):
        raise FirewallError(f"nftables: unknown runner {kind!r} (auto, lib or cli)")
    path = shutil.which(nft)
    if path is None:
        raise FirewallError("nftables: nft not found (install python3-nftables or nftables)")
    return _Cli(path)


def _covered(net: Network, pool: set[Network], lengths: set[tuple[int, int]]) -> bool:
    """Whether a strictly wider prefix of `net` is in `pool` (`lengths`: the pool's (version, len))."""
    return any(v == net.version and p < net.prefixlen and net.supernet(new_prefix=p) in pool
               for v, p in lengths)


def place_nets(new: dict[Network, float | None], live: Iterable[Network]
               ) -> tuple[dict[Network, float | None], set[Network]]:
    """Fit new prefixes into an interval set holding `live`: (prefixes to add, live ones to delete).

    Wider prefixes go first, so a narrower one later in the batch is seen as covered.
    """
    live = set(live)
    pool = set(live)
    lengths: set[tuple[int, int]] = {(n.version, n.prefixlen) for n in pool}
    accepted: dict[Network, float | None] = {}
    for net in sorted(new, key=lambda n: (n.version, n.prefixlen, n)):
        if _covered(net, pool, lengths):
            log.debug("ban_covered", net=str(net), backend="nftables")
            continue
        accepted[net] = new[net]
        pool.add(net)
        lengths.add((net.version, net.prefixlen))
    acc_lengths: set[tuple[int, int]] = {(n.version, n.prefixlen) for n in accepted}
    drop = {n for n in live if n in accepted or _covered(n, set(accepted), acc_lengths)}
    return accepted, drop


class NftSets:
    """Bans as elements of timeout sets in table `inet relayguard`."""

    name = "nftables"

    def __init__(self, runner: str = "auto", nft: str = "nft") -> None:
        self._nft = _runner(runner, nft)
        # single addresses we listed or added (as text: 100,000 ipaddress objects cost 30 MiB) -> expiry
        self._known: dict[str, float | None] = {}

    def _run(self, cmds: list[Json]) -> list[Json]:
        return self._nft.run(cmds)

    def setup(self) -> None:
        cmds: list[Json] = [{"add": {"table": {"family": FAMILY, "name": TABLE}}}]
        for v in (4, 6):
            cmds.append({"add": {"set": {**_T, "name": SINGLE_SETS[v], "type": _ADDR_TYPE[v],
                                         "flags": ["timeout"]}}})
            cmds.append({"add": {"set": {**_T, "name": NET_SETS[v], "type": _ADDR_TYPE[v],
                                         "flags": ["interval", "timeout"]}}})
        chain = {**_T, "name": CHAIN}
        cmds.append({"add": {"chain": {**chain, "type": "filter", "hook": "input", "prio": PRIORITY,
                                       "policy": "accept"}}})
        hook = self._hook()
        if hook is None or hook[1] != RULES:
            # Our own chain only: rewrite its rules in the same transaction, so none is ever duplicated.
            cmds.append({"flush": {"chain": chain}})
            cmds += [{"add": {"rule": {**_T, "chain": CHAIN, "expr": expr}}} for expr in RULES]
        self._run(cmds)
        log.info("firewall_ready", backend=self.name, table=f"{FAMILY} {TABLE}")

    def _hook(self) -> tuple[Json, list[list[Json]]] | None:
        """Our chain and its rule expressions, or None when the table or chain is gone."""
        try:
            out = self._run([{"list": {"chain": {**_T, "name": CHAIN}}}])
        except FirewallError as e:
            if _missing(e):
                return None
            raise
        chains = [o["chain"] for o in out if "chain" in o]
        rules = [o["rule"]["expr"] for o in out if "rule" in o]
        return (chains[0], rules) if chains else None

    def present(self) -> bool:
        hook = self._hook()
        if hook is None:
            return False
        chain, rules = hook
        return chain.get("hook") == "input" and all(r in rules for r in RULES)

    def listed(self) -> dict[Network, float | None]:
        """Elements of our four sets with the kernel's remaining time.

        A dump of a big hash set spans several netlink messages and resumes by element count; while the
        kernel resizes the hash table (after a bulk add or mass expiry) a resumed dump skips some
        elements. So list until two dumps agree (bounded), keeping the union of what was seen.
        """
        prev = self._list_once()
        seen = dict(prev)
        for _ in range(LIST_ATTEMPTS - 1):
            again = self._list_once()
            if again.keys() == prev.keys():
                seen = again
                break
            seen |= again
            prev = again
        else:
            log.warning("firewall_listing_unsettled", backend=self.name, elements=len(seen))
        now = time.time()
        self._known = {addr_text(n): None if left is None else now + left for n, left in seen.items() if is_single(n)}
        return seen

    def _list_once(self) -> dict[Network, float | None]:
        try:
            out = self._run([{"list": {"table": {"family": FAMILY, "name": TABLE}}}])
        except FirewallError as e:
            if _missing(e):
                return {}
            raise
        return _elements(out, [*SINGLE_SETS.values(), *NET_SETS.values()])

    def _live_nets(self) -> dict[Network, float | None]:
        found: dict[Network, float | None] = {}
        for name in NET_SETS.values():  # one list per command: libnftables rejects two in one batch
            found |= _elements(self._run([{"list": {"set": {**_T, "name": name}}}]), [name])
        return found

    def apply(self, add: Sequence[Ban], remove: Sequence[Network], now: float) -> None:
        batch = normalize(add, remove, now)
        if not batch.add and not batch.remove:
            return
        has_nets = any(not is_single(n) for n in batch.remove) or any(not is_single(n) for n in batch.add)
        for attempt in (1, 2):
            live = self._live_nets() if has_nets else {}
            try:
                text = _commands(batch, now, live, self._known)
                if text:
                    self._nft.run_text(text)
                break
            except FirewallError as e:
                if _missing(e) and not self.present():
                    raise FirewallError(f"nftables: table {FAMILY} {TABLE} is missing (run setup)") from None
                # A listed interval element can time out before the commit: list again, once.
                if attempt == 2 or not has_nets or "CAP_NET_ADMIN" in str(e):
                    raise
                log.warning("firewall_retried", backend=self.name, error=str(e))
        for net in batch.remove:
            if is_single(net):
                self._known.pop(addr_text(net), None)
        self._known.update((addr_text(n), e) for n, e in batch.add.items() if is_single(n))
        log.debug("firewall_applied", backend=self.name, added=len(batch.add), removed=len(batch.remove))

    def expired(self, now: float) -> list[Network]:
        """Always empty: the kernel removes elements whose timeout ran out."""
        return []

    def flush(self) -> None:
        # `add` first so the delete succeeds whether or not the table is there.
        table = {"table": {"family": FAMILY, "name": TABLE}}
        self._run([{"add": table}, {"delete": table}])
        self._known.clear()
        log.info("firewall_flushed", backend=self.name)

    def teardown(self) -> None:
        self.flush()


def _commands(batch: Batch, now: float, live: dict[Network, float | None],
              known: dict[str, float | None] | None = None) -> str:
    """One transaction: [add placeholders] + deletes + adds, each grouped per set.

    In nft's own syntax rather than JSON: libnftables reads 100,000 elements of text in 0.33 s, of
    JSON in 0.56 s (plus json.dumps, which holds the GIL the database thread wants meanwhile). Every
    value is an address or prefix written from a parsed network: nothing to quote.

    `known`: single addresses believed in the set (-> expiry); only those need the delete-and-add
    that refreshes a timeout, the rest are plain adds."""
    pre: dict[str, list[str]] = defaultdict(list)
    dels: dict[str, list[str]] = defaultdict(list)
    adds: dict[str, list[str]] = defaultdict(list)
    singles: dict[Network, float | None] = {}
    nets: dict[Network, float | None] = {}
    for n, e in batch.add.items():
        (singles if is_single(n) else nets)[n] = e
    for net in batch.remove:
        if is_single(net):
            pre[set_for(net)].append(_value(net))
            dels[set_for(net)].append(_value(net))
        elif net in live:
            dels[set_for(net)].append(_value(net))
    for net, expires in singles.items():
        s = SINGLE_SETS[net.version]
        text = addr_text(net)
        if known is None or (known and _believed_present(known, text, now)):
            pre[s].append(text)
            dels[s].append(text)
        timeout = timeout_for(expires, now)
        adds[s].append(text if timeout is None else f"{text} timeout {min(timeout, MAX_TIMEOUT)}s")
    removed = set(batch.remove)
    kept = [n for n in live if n not in removed]
    placed, drop = place_nets(nets, kept)
    for net in drop:
        dels[set_for(net)].append(_value(net))
    for net, expires in placed.items():
        adds[set_for(net)].append(_element(net, timeout_for(expires, now)))

    def group(verb: str, per_set: dict[str, list[str]]) -> list[str]:
        return [f"{verb} element {FAMILY} {TABLE} {s} {{ {', '.join(elems)} }}" for s, elems in per_set.items()
                if elems]

    return "\n".join(group("add", pre) + group("delete", dels) + group("add", adds))


def _believed_present(known: dict[str, float | None], text: str, now: float) -> bool:
    if text not in known:
        return False
    expires = known[text]
    return expires is None or expires > now - 1  # an element at its very end may still be there


_: type[Firewall] = NftSets  # the type checker proves the class fits the protocol
