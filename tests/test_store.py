"""relayguard.store against real SQLite: in memory ("sqlite://") and as a file in tmp_path."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from relayguard import store as store_mod
from relayguard.model import Ban, Hit, parse_net
from relayguard.store import SCHEMA_VERSION, Store, StoreError

T0 = 1_800_000_000.0


def hit(ts: float, addr: str = "192.0.2.7", **kw: object) -> Hit:
    args: dict[str, object] = {"rule": "postfix/sasl-auth-failed", "service": "smtp", "weight": 10}
    args.update(kw)
    return Hit(ts=ts, addr=addr, **args)  # type: ignore[arg-type]


def ban(net: str, at: float, expires: float | None, **kw: object) -> Ban:
    return Ban(net=parse_net(net), expires=expires, reason="sasl-auth-failed", banned_at=at, **kw)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    target = "sqlite://" if request.param == "memory" else str(tmp_path / "state" / "relayguard.db")
    s = Store.open(target)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "relayguard.db"


# -- opening and settings ------------------------------------------------------------------


def test_file_store_settings(db: Path) -> None:
    with Store.open(str(db)) as s:
        assert db.is_file()  # parent directory created
        assert s.recovered is False
        assert s.pragmas() == {
            "journal_mode": "wal",
            "synchronous": 1,  # NORMAL, never OFF
            "busy_timeout": store_mod.BUSY_TIMEOUT_MS,
            "foreign_keys": 1,
            "auto_vacuum": 2,  # INCREMENTAL, set before the first table
        }
        assert s.stats()["schema_version"] == SCHEMA_VERSION
    raw = sqlite3.connect(db)
    try:
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = raw.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
    finally:
        raw.close()
    assert {"meta", "hits", "bans", "ban_history", "offsets", "journal_cursor"} <= tables
    assert int(version) == SCHEMA_VERSION


def test_sqlite_url_names_a_file(tmp_path: Path) -> None:
    path = tmp_path / "url.db"
    with Store.open(f"sqlite:///{path}") as s:
        s.save_cursor("journal", "c1")
    with Store.open(str(path)) as s:
        assert s.get_cursor("journal") == "c1"


def test_memory_store_is_one_database_across_threads() -> None:
    # The daemon calls the store through asyncio.to_thread: any pool thread must see the same data.
    async def main(s: Store) -> list[Hit]:
        await asyncio.to_thread(s.add_hits, [hit(T0)])
        return await asyncio.to_thread(s.hits_since, 0.0)

    with Store.open("sqlite://") as s:
        assert asyncio.run(main(s)) == [hit(T0)]


def test_reopen_keeps_state(db: Path) -> None:
    with Store.open(str(db)) as s:
        s.record_bans([ban("192.0.2.7", T0, T0 + 3600)])
        s.add_hits([hit(T0)])
    with Store.open(str(db)) as s:
        assert [b.net for b in s.active_bans(T0)] == [parse_net("192.0.2.7")]
        assert s.hits_since(0.0) == [hit(T0)]


# -- hits ----------------------------------------------------------------------------------


def test_hits_round_trip(store: Store) -> None:
    full = Hit(
        ts=T0 + 0.25,
        addr="2001:db8::5",
        rule="postfix/rcpt-unknown",
        service="smtp",
        weight=-2,
        source="/var/log/mail.log",
        lineno=42,
        text="Dec  4 19:25:44 mx postfix/smtpd[1]: NOQUEUE: reject: RCPT from unknown[2001:db8::5]",
        group="rcpt",
        key="nobody@example.org",
        repeat_weight=1,
    )
    store.add_hits([hit(T0 + 2), full, hit(T0 - 100), hit(T0 + 1, "198.51.100.3")])
    assert store.hits_since(T0) == [full, hit(T0 + 1, "198.51.100.3"), hit(T0 + 2)]
    assert store.hits_for("2001:db8::5", T0) == [full]
    assert store.hits_for("192.0.2.7", T0 - 1000) == [hit(T0 - 100), hit(T0 + 2)]
    assert store.hits_for("192.0.2.7", T0 + 3) == []


def test_forget_deletes_one_address(store: Store) -> None:
    store.add_hits([hit(T0), hit(T0 + 1), hit(T0, "203.0.113.9")])
    assert store.forget("192.0.2.7") == 2
    assert store.forget("192.0.2.7") == 0
    assert store.hits_since(0.0) == [hit(T0, "203.0.113.9")]


def test_ten_thousand_hits_in_one_call(store: Store) -> None:
    hits = [hit(T0 + i, f"192.0.2.{i % 200}", lineno=i + 1) for i in range(10_000)]
    store.add_hits(hits)
    assert store.hits_since(0.0) == hits
    stats = store.stats()
    assert stats["hits"] == 10_000
    assert stats["addresses"] == 200


def test_empty_batches_are_no_ops(store: Store) -> None:
    store.add_hits([])
    store.record_bans([])
    store.save_offsets([])
    assert store.remove_bans([]) == []
    assert store.stats()["hits"] == 0


# -- bans ----------------------------------------------------------------------------------


def test_ban_round_trip_and_canonical_networks(store: Store) -> None:
    store.record_bans(
        [
            ban("192.0.2.7", T0, T0 + 3600, rule="postfix/sasl-auth-failed"),
            Ban(parse_net("2001:DB8:0::1"), None, "manual ban", source="manual", banned_at=T0),
            ban("198.51.100.77/24", T0, T0 + 60),
        ]
    )
    got = store.get_ban("2001:db8::1")
    assert got == Ban(parse_net("2001:db8::1"), None, "manual ban", source="manual", banned_at=T0, count=1)
    # Any spelling of a network finds the same row: IPv4-mapped IPv6, host bits in a prefix, a Network.
    assert store.get_ban("::ffff:192.0.2.7") == ban("192.0.2.7", T0, T0 + 3600, rule="postfix/sasl-auth-failed")
    assert store.get_ban("198.51.100.0/24") is not None
    assert store.get_ban(parse_net("198.51.100.1/24")) is not None
    assert store.get_ban("192.0.2.8") is None
    assert store.history("192.0.2.7") == [ban("192.0.2.7", T0, T0 + 3600, rule="postfix/sasl-auth-failed")]


def test_active_bans_sorted_by_expiry_permanent_last(store: Store) -> None:
    store.record_bans(
        [
            ban("192.0.2.1", T0, None),
            ban("192.0.2.2", T0, T0 + 300),
            ban("2001:db8::2", T0, T0 + 100),
            ban("192.0.2.3", T0, T0 + 50),  # already over at T0 + 60
        ]
    )
    assert [str(b.net) for b in store.active_bans(T0 + 60)] == [
        "2001:db8::2/128",
        "192.0.2.2/32",
        "192.0.2.1/32",
    ]
    assert len(store.active_bans(T0)) == 4


def test_reban_extends_and_counts(store: Store) -> None:
    store.record_bans([ban("192.0.2.7", T0, T0 + 3600, rule="a")])
    store.record_bans([ban("192.0.2.7", T0 + 10, T0 + 600, rule="b")])  # shorter: never shortens
    got = store.get_ban("192.0.2.7")
    assert got is not None
    assert (got.expires, got.count, got.banned_at, got.rule) == (T0 + 3600, 2, T0, "b")
    store.record_bans([ban("192.0.2.7", T0 + 20, T0 + 7200)])
    got = store.get_ban("192.0.2.7")
    assert got is not None
    assert (got.expires, got.count) == (T0 + 7200, 3)
    store.record_bans([ban("192.0.2.7", T0 + 30, None)])  # permanent wins over any expiry
    store.record_bans([ban("192.0.2.7", T0 + 40, T0 + 9999)])
    got = store.get_ban("192.0.2.7")
    assert got is not None
    assert (got.expires, got.count) == (None, 5)
    assert [(b.banned_at, b.expires, b.count) for b in store.history("192.0.2.7")] == [
        (T0, T0 + 3600, 1),
        (T0 + 10, T0 + 600, 2),
        (T0 + 20, T0 + 7200, 3),
        (T0 + 30, None, 4),
        (T0 + 40, T0 + 9999, 5),
    ]


def test_ban_count_for_escalation(store: Store) -> None:
    store.record_bans([ban("192.0.2.7", T0 + 100 * i, T0 + 100 * i + 10) for i in range(4)])
    store.record_bans([ban("192.0.2.8", T0, T0 + 10)])
    assert store.ban_count("192.0.2.7", 0.0) == 4
    assert store.ban_count("192.0.2.7", T0 + 150) == 2  # only offences inside the memory period
    assert store.ban_count(parse_net("192.0.2.8"), T0) == 1
    assert store.ban_count("203.0.113.1", 0.0) == 0


def test_same_batch_reban_and_caller_count(store: Store) -> None:
    # Two offences of one network in one batch apply in order; a caller's higher count is kept.
    store.record_bans([ban("192.0.2.7", T0, T0 + 10), ban("192.0.2.7", T0 + 5, T0 + 50, count=7)])
    got = store.get_ban("192.0.2.7")
    assert got is not None
    assert (got.expires, got.count) == (T0 + 50, 7)
    assert store.ban_count("192.0.2.7", 0.0) == 2


def test_recording_an_offence_twice_is_idempotent(store: Store) -> None:
    store.record_bans([ban("192.0.2.7", T0, T0 + 60)])
    store.record_bans([ban("192.0.2.7", T0, T0 + 60)])
    got = store.get_ban("192.0.2.7")
    assert got is not None
    assert got.count == 1
    assert len(store.history("192.0.2.7")) == 1
    store.record_bans([ban("192.0.2.7", T0, T0 + 120)])  # same offence, longer: extends only
    got = store.get_ban("192.0.2.7")
    assert got is not None
    assert (got.expires, got.count) == (T0 + 120, 1)


def test_manual_ban_stays_manual_while_active(store: Store) -> None:
    store.record_bans([Ban(parse_net("192.0.2.7"), T0 + 60, "admin", source="manual", banned_at=T0)])
    store.record_bans([ban("192.0.2.7", T0 + 1, T0 + 3600)])
    got = store.get_ban("192.0.2.7")
    assert got is not None
    assert (got.source, got.expires, got.count) == ("manual", T0 + 3600, 2)
    assert [b.source for b in store.history("192.0.2.7")] == ["manual", "auto"]


def test_remove_bans(store: Store) -> None:
    store.record_bans([ban("192.0.2.7", T0, T0 + 60), ban("2001:db8::/64", T0, None)])
    nets = [parse_net("2001:db8::/64"), parse_net("192.0.2.9"), parse_net("192.0.2.7")]
    assert store.remove_bans(nets) == [parse_net("2001:db8::/64"), parse_net("192.0.2.7")]
    assert store.remove_bans(nets) == []
    assert store.active_bans(T0) == []
    assert store.get_ban("192.0.2.7") is None
    assert len(store.history("192.0.2.7")) == 1  # unbanning keeps the record of the offence
    store.record_bans([ban("192.0.2.7", T0 + 100, T0 + 200)])  # a new offence revives the row
    got = store.get_ban("192.0.2.7")
    assert got is not None
    assert (got.banned_at, got.expires, got.count) == (T0 + 100, T0 + 200, 2)


def test_expire(store: Store) -> None:
    store.record_bans([ban("192.0.2.1", T0, T0 + 10), ban("192.0.2.2", T0, T0 + 20), ban("192.0.2.3", T0, None)])
    assert store.expire(T0 + 5) == []
    gone = store.expire(T0 + 10)  # expires_at <= now
    assert [str(b.net) for b in gone] == ["192.0.2.1/32"]
    assert gone[0].expires == T0 + 10
    assert store.get_ban("192.0.2.1") is None
    assert store.expire(T0 + 10) == []
    assert [str(b.net) for b in store.expire(T0 + 10**9)] == ["192.0.2.2/32"]  # never the permanent one
    assert [str(b.net) for b in store.active_bans(T0 + 10**9)] == ["192.0.2.3/32"]


def test_replayed_offence_does_not_revive_an_ended_ban(store: Store) -> None:
    store.record_bans([ban("192.0.2.7", T0, T0 + 10)])
    assert len(store.expire(T0 + 10)) == 1
    store.record_bans([ban("192.0.2.7", T0, T0 + 10)])
    assert store.get_ban("192.0.2.7") is None
    assert store.ban_count("192.0.2.7", 0.0) == 1


# -- housekeeping --------------------------------------------------------------------------


def test_purge_deletes_old_rows_only(store: Store) -> None:
    store.add_hits([hit(T0 - 1000), hit(T0 - 10), hit(T0 + 5)])
    store.record_bans(
        [
            ban("192.0.2.1", T0 - 5000, T0 - 4000),  # ended long ago: purged with its history
            ban("192.0.2.2", T0 - 5000, None),  # permanent and active: row stays, old history goes
            ban("192.0.2.3", T0 - 100, T0 - 50),  # ended recently: stays
        ]
    )
    store.expire(T0)
    result = store.purge(T0, hits_before=T0 - 100, history_before=T0 - 1000)
    assert (result["hits"], result["bans"], result["history"]) == (1, 1, 2)
    assert result["db_bytes"] > 0
    assert store.hits_since(0.0) == [hit(T0 - 10), hit(T0 + 5)]
    assert [str(b.net) for b in store.active_bans(T0)] == ["192.0.2.2/32"]
    assert store.history("192.0.2.1") == []
    assert store.history("192.0.2.2") == []
    assert len(store.history("192.0.2.3")) == 1
    assert store.purge(T0, T0 - 100, T0 - 1000)["hits"] == 0


def _fill(s: Store, n: int, start: float) -> None:
    text = "Dec  4 19:25:44 mx postfix/smtpd[2309]: warning: unknown[192.0.2.7]: SASL LOGIN authentication"
    for base in range(0, n, 50_000):
        s.add_hits(
            [
                hit(start + i, f"198.51.100.{i % 250}", source="/var/log/mail.log", lineno=i, text=text)
                for i in range(base, min(n, base + 50_000))
            ]
        )


def test_purge_gives_space_back(db: Path) -> None:
    with Store.open(str(db)) as s:
        _fill(s, 200_000, T0)
        peak = s.stats()["db_bytes"]
        assert peak > 20_000_000  # 200k hits really landed on disk
        result = s.purge(T0 + 200_000, hits_before=T0 + 199_000, history_before=0.0)
        assert result["hits"] == 199_000
        assert result["db_bytes"] < peak // 10
        assert db.stat().st_size < peak // 10  # the file itself shrank, not only the page count
        assert Path(f"{db}-wal").stat().st_size == 0  # checkpoint(TRUNCATE) emptied the WAL
        # Repeated fill/purge cycles stay bounded by one cycle's worth of data.
        for cycle in range(3):
            start = T0 + 300_000 * (cycle + 1)
            _fill(s, 60_000, start)
            s.purge(start + 60_000, hits_before=start + 60_000, history_before=0.0)
            assert db.stat().st_size < peak // 10
        assert s.stats()["hits"] == 0


def test_offsets_round_trip(store: Store) -> None:
    assert store.get_offset("/var/log/mail.log") is None
    store.save_offsets([("/var/log/mail.log", 1234, 100, "abc"), ("/var/log/auth.log", 7, 0, "")], now=T0)
    store.save_offsets([("/var/log/mail.log", 1235, 5, "def")])
    assert store.get_offset("/var/log/mail.log") == (1235, 5, "def", 0)
    assert store.get_offset("/var/log/auth.log") == (7, 0, "", 0)
    store.commit([], [("/var/log/mail.log", 1235, 50, "def", 3)])
    assert store.get_offset("/var/log/mail.log") == (1235, 50, "def", 3)


def test_journal_cursor_round_trip(store: Store) -> None:
    assert store.get_cursor("journal") is None
    store.save_cursor("journal", "s=abc;i=1")
    store.save_cursor("journal", "s=abc;i=2")
    store.save_cursor("other", "x")
    assert store.get_cursor("journal") == "s=abc;i=2"
    assert store.get_cursor("other") == "x"


def test_stats(store: Store) -> None:
    store.record_bans(
        [
            ban("192.0.2.1", T0, T0 + 10),
            ban("203.0.113.0/24", T0, None),
            ban("2001:db8::1", T0, T0 + 100),
        ]
    )
    store.add_hits([hit(T0), hit(T0 + 1), hit(T0, "2001:db8::9")])
    stats = store.stats()
    assert {k: stats[k] for k in ("bans_v4", "bans_v6", "hits", "addresses")} == {
        "bans_v4": 2,
        "bans_v6": 1,
        "hits": 3,
        "addresses": 2,
    }
    assert stats["db_bytes"] > 0
    later = store.stats(now=T0 + 50)  # the v4 /32 is over, though expire() has not run yet
    assert (later["bans_v4"], later["bans_v6"]) == (1, 1)


# -- failures ------------------------------------------------------------------------------


def _corrupt_pages(db: Path) -> None:
    """Overwrite every page after the first two with garbage: header and schema intact, tables not."""
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    assert len(data) > 4 * page
    data[2 * page :] = bytes((i * 151 + 7) % 256 for i in range(len(data) - 2 * page))
    db.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["garbage", "malformed"])
def test_corrupt_file_is_moved_aside(db: Path, damage: str) -> None:
    if damage == "garbage":
        db.parent.mkdir(parents=True)
        db.write_bytes(b"this is not an SQLite database\n" * 200)
        Path(f"{db}-wal").write_bytes(b"stray wal")  # a WAL belongs to its database: it moves too
    else:
        with Store.open(str(db)) as s:
            _fill(s, 5_000, T0)
            s.record_bans([ban("192.0.2.7", T0, None)])
        _corrupt_pages(db)
    before = db.read_bytes()
    with capture_logs() as logs, Store.open(str(db)) as s:
        assert s.recovered is True
        assert s.active_bans(T0) == []
        s.record_bans([ban("192.0.2.7", T0, None)])  # the new database works
        assert len(s.active_bans(T0)) == 1
    moved = [p for p in db.parent.iterdir() if p.name.startswith("relayguard.db.corrupt-")]
    main = [p for p in moved if not p.name.endswith(("-wal", "-shm"))]
    assert len(main) == 1
    assert main[0].read_bytes() == before
    if damage == "garbage":
        assert Path(f"{main[0]}-wal").read_bytes() == b"stray wal"
    events = [e for e in logs if e["event"] == "store_corrupt_moved"]
    assert len(events) == 1
    assert events[0]["log_level"] == "error"
    assert events[0]["path"] == str(db)
    assert events[0]["moved_to"] == str(main[0])
    assert "\n" not in events[0]["error"]
    with Store.open(str(db)) as s:  # and it stays healthy
        assert s.recovered is False
        assert len(s.active_bans(T0)) == 1


def test_kill_9_loses_no_committed_ban(db: Path) -> None:
    child = textwrap.dedent(
        f"""
        import os, signal
        from relayguard.model import Ban, parse_net
        from relayguard.store import Store
        s = Store.open({str(db)!r})
        nets = [parse_net("192.0.2.%d" % i) for i in range(1, 101)]
        s.record_bans([Ban(net, {T0} + 3600, "r", banned_at={T0}) for net in nets])
        s.record_bans([Ban(parse_net("2001:db8::1"), None, "r", source="manual", banned_at={T0})])
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert Path(f"{db}-wal").stat().st_size > 0  # the bans were still only in the WAL
    with Store.open(str(db)) as s:
        assert s.recovered is False
        bans = s.active_bans(T0)
    assert len(bans) == 101
    assert bans[-1] == Ban(parse_net("2001:db8::1"), None, "r", source="manual", banned_at=T0)


def test_full_database_raises_store_error(store: Store) -> None:
    store.record_bans([ban("192.0.2.7", T0, None)])
    # SQLite's own page limit gives the same SQLITE_FULL error as a full file system.
    with store._engine.connect() as c:
        pages = c.exec_driver_sql("PRAGMA page_count").scalar_one()
        c.exec_driver_sql(f"PRAGMA max_page_count={pages + 2}")
    with pytest.raises(StoreError) as err:
        store.add_hits([hit(T0 + i, text="x" * 500) for i in range(5_000)])
    message = str(err.value)
    assert "database or disk is full" in message
    assert "\n" not in message
    assert err.value.corrupt is False
    assert store.hits_since(0.0) == []  # the failed batch rolled back as a whole
    assert len(store.active_bans(T0)) == 1
    with store._engine.connect() as c:
        c.exec_driver_sql("PRAGMA max_page_count=1073741823")
    store.add_hits([hit(T0)])  # usable again once there is room
    assert store.hits_since(0.0) == [hit(T0)]


@pytest.mark.stress
def test_full_file_system_raises_store_error(tmp_path: Path) -> None:
    # A real ENOSPC: a 2 MiB tmpfs mounted in a private mount namespace that dies with the child.
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    child = textwrap.dedent(
        f"""
        import json
        from relayguard.model import Ban, Hit, parse_net
        from relayguard.store import Store, StoreError
        s = Store.open({str(mnt / "state" / "relayguard.db")!r})
        s.record_bans([Ban(parse_net("192.0.2.1"), None, "r", banned_at=1.0)])
        error = None
        for i in range(100):  # 100 x 2000 hits x ~250 bytes: far more than 2 MiB
            try:
                s.add_hits([Hit(float(i), "192.0.2.9", "p/r", "smtp", 1, text="x" * 200)] * 2000)
            except StoreError as e:
                error = {{"message": str(e), "corrupt": e.corrupt}}
                break
        s.record_bans([Ban(parse_net("192.0.2.2"), None, "r", banned_at=2.0)])
        bans = [str(b.net) for b in s.active_bans(0.0)]
        s.close()
        print(json.dumps({{"error": error, "bans": bans}}))
        """
    )
    mount = f'mount -t tmpfs -o size=2m tmpfs {mnt} && exec {sys.executable} -c "$0"'
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, child],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["error"] is not None
    assert result["error"]["message"].endswith("relayguard.db: database or disk is full")
    assert result["error"]["corrupt"] is False
    assert result["bans"] == ["192.0.2.1/32", "192.0.2.2/32"]  # small writes still fit afterwards
    assert list(mnt.iterdir()) == []  # the mount never reached the host


# -- schema versions -----------------------------------------------------------------------


def _set_version(db: Path, version: int) -> None:
    raw = sqlite3.connect(db)
    try:
        with raw:
            raw.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
    finally:
        raw.close()


def test_newer_schema_is_refused_and_left_alone(db: Path) -> None:
    Store.open(str(db)).close()
    _set_version(db, SCHEMA_VERSION + 1)
    with pytest.raises(StoreError, match=r"schema version \d+ is newer") as err:
        Store.open(str(db))
    assert err.value.corrupt is False
    assert [p.name for p in db.parent.iterdir() if "corrupt" in p.name] == []


def test_migration_hook_runs_in_order(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Store.open(str(db)) as s:
        s.record_bans([ban("192.0.2.7", T0, None)])
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setitem(
        store_mod.MIGRATIONS,
        SCHEMA_VERSION,
        lambda c: c.exec_driver_sql("ALTER TABLE bans ADD COLUMN note TEXT"),
    )
    with capture_logs() as logs, Store.open(str(db)) as s:
        assert s.stats()["schema_version"] == SCHEMA_VERSION + 1
        assert len(s.active_bans(T0)) == 1
    assert [e["version"] for e in logs if e["event"] == "store_migrated"] == [SCHEMA_VERSION + 1]
    raw = sqlite3.connect(db)
    try:
        assert "note" in [r[1] for r in raw.execute("PRAGMA table_info(bans)")]
    finally:
        raw.close()


def test_missing_migration_is_an_error(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Store.open(str(db)).close()
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(StoreError, match="no migration from schema version"):
        Store.open(str(db))


def test_foreign_database_is_refused(db: Path) -> None:
    db.parent.mkdir(parents=True)
    raw = sqlite3.connect(db)
    raw.execute("CREATE TABLE something (x)")
    raw.close()
    with pytest.raises(StoreError, match="not a relayguard database"):
        Store.open(str(db))
    assert db.exists()


def test_store_logs_nothing_on_a_normal_open(db: Path) -> None:
    with capture_logs() as logs:
        Store.open(str(db)).close()
        Store.open(str(db)).close()
    assert logs == []
