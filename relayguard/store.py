"""The state database: hits, bans and their history, log resume points, journal cursors.

This is the only module that imports SQLAlchemy (2.x Core). All SQL lives in `Store`, one transaction
per public method, and every method takes and returns `relayguard.model` values, never rows.

SQLite runs in WAL mode with `synchronous=NORMAL`: a committed transaction survives a killed process
(kill -9, OOM); only a power cut may lose the last few commits. The schema is created and versioned
here (table `meta`, `MIGRATIONS`). A database that SQLite reports as corrupt at open is moved aside
and replaced by an empty one (`Store.recovered`), so the daemon can refill its bans from the kernel.

Not thread-safe by design: the daemon calls the store from one worker (asyncio.to_thread, one call at
a time), so there is one connection (StaticPool, check_same_thread=False) and no lock.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import operator
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import (
    REAL,
    CheckConstraint,
    Column,
    Connection,
    Engine,
    Index,
    Integer,
    MetaData,
    RowMapping,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

from relayguard.model import Ban, Hit, Network, net_of, net_text, parse_net

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1
# MIGRATIONS[n] upgrades a version-n database to n+1; it runs inside the opening transaction.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {}

BUSY_TIMEOUT_MS = 5000
WAL_LIMIT_BYTES = 64 << 20  # WAL is truncated to this after checkpoints
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26

md = MetaData()
meta_t = Table("meta", md, Column("key", Text, primary_key=True), Column("value", Text, nullable=False))
hits_t = Table(
    "hits",
    md,
    Column("id", Integer, primary_key=True),
    Column("ts", REAL, nullable=False),
    Column("addr", Text, nullable=False),
    Column("rule", Text, nullable=False),
    Column("service", Text, nullable=False),
    Column("weight", Integer, nullable=False),
    Column("grp", Text),
    Column("key", Text),
    Column("repeat_weight", Integer),
    Column("source", Text, nullable=False),
    Column("lineno", Integer, nullable=False),
    Column("text", Text, nullable=False),
    Index("hits_addr_ts", "addr", "ts"),
    Index("hits_ts", "ts"),
)
bans_t = Table(
    "bans",
    md,
    Column("id", Integer, primary_key=True),
    Column("net", Text, nullable=False, unique=True),  # canonical text: model.net_text
    Column("reason", Text, nullable=False),
    Column("rule", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("banned_at", REAL, nullable=False),
    Column("expires_at", REAL),  # NULL: permanent
    Column("count", Integer, nullable=False),  # offences while this row lived
    Column("active", Integer, nullable=False),
    CheckConstraint("source IN ('auto', 'manual')", name="bans_source"),
    CheckConstraint("active IN (0, 1)", name="bans_active"),
    Index("bans_active_expires", "active", "expires_at"),
)
history_t = Table(
    "ban_history",
    md,
    Column("id", Integer, primary_key=True),
    Column("net", Text, nullable=False),
    Column("banned_at", REAL, nullable=False),
    Column("expires_at", REAL),
    Column("reason", Text, nullable=False),
    Column("rule", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("count", Integer, nullable=False),
    UniqueConstraint("net", "banned_at", name="history_net_banned_at"),  # one row per offence
    Index("history_banned_at", "banned_at"),
)
offsets_t = Table(
    "offsets",
    md,
    Column("path", Text, primary_key=True),
    Column("inode", Integer, nullable=False),
    Column("offset", Integer, nullable=False),
    Column("head_hash", Text, nullable=False),
    Column("lineno", Integer, nullable=False, server_default="0"),  # lines before offset
    Column("updated", REAL, nullable=False),
)
cursor_t = Table(
    "journal_cursor",
    md,
    Column("name", Text, primary_key=True),
    Column("cursor", Text, nullable=False),
)


# Bulk statements: every key travels as ONE JSON array parameter (json_each), so 100,000 keys are
# one statement, not 200 chunks. `+active` keeps SQLite on the unique index of `net` (the planner
# would otherwise scan bans_active_expires, i.e. every active ban, once per statement).
_BAN_COLS = ("net", "reason", "rule", "source", "banned_at", "expires_at", "count", "active")
_SELECT_BANS = "SELECT * FROM bans WHERE net IN (SELECT value FROM json_each(?))"
_SELECT_OFFENCES = "SELECT net, banned_at FROM ban_history WHERE net IN (SELECT value FROM json_each(?))"
_INSERT_BANS = f"INSERT INTO bans ({', '.join(_BAN_COLS)}) VALUES ({', '.join('?' * len(_BAN_COLS))})"
_UPDATE_BANS = f"UPDATE bans SET {', '.join(f'{c} = ?' for c in _BAN_COLS[1:])} WHERE id = ?"
_ban_values = operator.itemgetter(*_BAN_COLS)  # a bans row dict -> INSERT parameters
_update_values = operator.itemgetter(*_BAN_COLS[1:], "id")  # -> UPDATE parameters
_HISTORY_COLS = ("net", "banned_at", "expires_at", "reason", "rule", "source", "count")
_INSERT_HISTORY = (f"INSERT INTO ban_history ({', '.join(_HISTORY_COLS)}) "
                   f"VALUES ({', '.join('?' * len(_HISTORY_COLS))})")
_END_BANS = ("UPDATE bans SET active = 0 WHERE net IN (SELECT value FROM json_each(?)) AND +active = 1 "
             "RETURNING net")
_FORGET = "DELETE FROM hits WHERE addr IN (SELECT value FROM json_each(?))"


class StoreError(Exception):
    """A database operation failed; the message is one line. `corrupt`: SQLite reported corruption."""

    def __init__(self, message: str, *, corrupt: bool = False) -> None:
        super().__init__(message)
        self.corrupt = corrupt


class Store:
    """All reads and writes of relayguard's state; see the module docstring for the threading rule."""

    def __init__(self, engine: Engine, path: Path | None, *, recovered: bool = False) -> None:
        self._engine = engine
        # Writers take the write lock at BEGIN, so a read-then-write never fails on lock upgrade.
        self._writer = engine.execution_options(rg_begin="BEGIN IMMEDIATE")
        self.path = path  # None for an in-memory database
        self.recovered = recovered  # True when a corrupt file was moved aside at open

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(cls, path_or_url: str) -> Store:
        """Open (creating or migrating) the database; "sqlite://" is a private in-memory one."""
        path = _file_path(path_or_url)
        if path is None:
            return cls._open(None)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        try:
            _probe(path)
            return cls._open(path)
        except StoreError as e:
            if not e.corrupt:
                raise
            moved = _move_aside(path)
            log.error("store_corrupt_moved", path=str(path), moved_to=str(moved), error=str(e))
            store = cls._open(path)
            store.recovered = True
            return store

    @classmethod
    def _open(cls, path: Path | None) -> Store:
        store = cls(_make_engine(path), path)
        try:
            store._prepare()
        except BaseException:
            store.close()
            raise
        return store

    def _prepare(self) -> None:
        """Create or migrate the schema, in one write transaction."""
        with self._tx(write=True) as c:
            names = set(c.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='table'").scalars())
            if not names:
                md.create_all(c)
                _set_meta(c, "schema_version", str(SCHEMA_VERSION))
                return
            if "meta" not in names:
                raise StoreError(f"{self._where()}: not a relayguard database (no meta table)")
            version = int(c.execute(select(meta_t.c.value).where(meta_t.c.key == "schema_version")).scalar_one())
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self._where()}: schema version {version} is newer than this relayguard "
                    f"understands ({SCHEMA_VERSION}); upgrade relayguard"
                )
            for n in range(version, SCHEMA_VERSION):
                if n not in MIGRATIONS:
                    raise StoreError(f"{self._where()}: no migration from schema version {n}")
                MIGRATIONS[n](c)
                log.info("store_migrated", path=self._where(), version=n + 1)
            _set_meta(c, "schema_version", str(SCHEMA_VERSION))

    def close(self) -> None:
        """Close the connection; SQLite checkpoints the WAL into the main file."""
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self, *, write: bool = False) -> Iterator[Connection]:
        """One transaction; database errors leave as a one-line StoreError (already rolled back)."""
        try:
            with (self._writer if write else self._engine).begin() as c:
                yield c
        except sa_exc.SQLAlchemyError as e:
            raise _store_error(e, self._where()) from e

    def _where(self) -> str:
        return str(self.path) if self.path else "in-memory store"

    # -- hits --------------------------------------------------------------------------------

    def add_hits(self, hits: Sequence[Hit]) -> None:
        if not hits:
            return
        with self._tx(write=True) as c:
            c.execute(insert(hits_t), _hit_rows(hits))

    def hits_since(self, ts: float) -> list[Hit]:
        """Hits at or after `ts`, oldest first: refills the scorer's window at start."""
        q = select(hits_t).where(hits_t.c.ts >= ts).order_by(hits_t.c.ts, hits_t.c.id)
        with self._tx() as c:
            return [_hit(r) for r in c.execute(q).mappings()]

    def hits_for(self, addr: str, since: float) -> list[Hit]:
        q = select(hits_t).where(hits_t.c.addr == addr, hits_t.c.ts >= since).order_by(hits_t.c.ts, hits_t.c.id)
        with self._tx() as c:
            return [_hit(r) for r in c.execute(q).mappings()]

    def forget(self, addr: str) -> int:
        """Delete an address's hits (an admin unban resets its score); returns how many."""
        with self._tx(write=True) as c:
            return c.execute(delete(hits_t).where(hits_t.c.addr == addr)).rowcount

    def forget_many(self, addrs: Iterable[str]) -> int:
        """forget() for many addresses in one transaction (a bulk unban); returns how many hits."""
        with self._tx(write=True) as c:
            return c.exec_driver_sql(_FORGET, (_json_keys(addrs),)).rowcount

    # -- bans --------------------------------------------------------------------------------

    def record_bans(self, bans: Sequence[Ban]) -> None:
        """Upsert active bans and append one history row per new offence.

        Banning an active network again extends it (expires = max, permanent wins) and counts one
        more offence; a manual ban stays manual while active. An offence is identified by
        (net, banned_at): recording it again only extends, and never revives an ended ban.

        Bulk-sized (a 100,000-address manual ban is one call): the lookups take every key as one
        JSON array parameter, and the writes are plain DBAPI executemany, without per-row
        SQLAlchemy parameter processing.
        """
        if not bans:
            return
        keyed = [(_key(b.net), b) for b in bans]
        unique = dict.fromkeys(k for k, _ in keyed)
        keys = _json_keys(unique)
        with self._tx(write=True) as c:
            found = c.exec_driver_sql(_SELECT_BANS, (keys,))
            cols = list(found.keys())
            rows: dict[str, dict[str, Any]] = {r["net"]: r for r in (dict(zip(cols, t, strict=True))
                                                                    for t in found.all())}
            seen: set[tuple[str, float]] = {(r[0], r[1]) for r in c.exec_driver_sql(_SELECT_OFFENCES, (keys,)).all()}
            if not rows and not seen and len(unique) == len(keyed):
                # The bulk case (a list of new addresses): no row, no history, each network once,
                # so every ban is a new row and a new offence, exactly as _merge would make them.
                fresh = [(k, b.reason, b.rule, b.source, b.banned_at, b.expires, b.count, 1) for k, b in keyed]
                history = [_history_values(k, b, b.count) for k, b in keyed]
                known = []
            else:
                fresh, known, history = self._merged(keyed, rows, seen)
            # Rows in key order: each index B-tree then fills page by page instead of at random
            # (100,000 new bans: 0.6 -> 0.4 s of SQLite).
            if fresh:
                c.exec_driver_sql(_INSERT_BANS, sorted(fresh, key=operator.itemgetter(0)))
            if known:
                c.exec_driver_sql(_UPDATE_BANS, known)
            if history:
                c.exec_driver_sql(_INSERT_HISTORY, sorted(history, key=operator.itemgetter(0)))

    @staticmethod
    def _merged(keyed: list[tuple[str, Ban]], rows: dict[str, dict[str, Any]], seen: set[tuple[str, float]]
                ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """(rows to insert, rows to update, history rows) for bans over existing rows and offences."""
        dirty: set[str] = set()
        history: list[tuple[Any, ...]] = []
        for key, b in keyed:
            new = (key, b.banned_at) not in seen
            old = rows.get(key)
            if not new and old is not None and not old["active"]:
                continue  # a replay of an offence that already ended
            rows[key] = row = _merge(old, key, b, new_offence=new)
            dirty.add(key)
            if new:
                seen.add((key, b.banned_at))
                history.append(_history_values(key, b, row["count"]))
        changed = [rows[k] for k in dirty]
        fresh = [_ban_values(r) for r in changed if r.get("id") is None]
        known = [_update_values(r) for r in changed if r.get("id") is not None]
        return fresh, known, history

    def active_bans(self, now: float) -> list[Ban]:
        """Bans in force at `now`, soonest expiry first, permanent ones last."""
        q = (
            select(bans_t)
            .where(bans_t.c.active == 1, _not_expired(now))
            .order_by(bans_t.c.expires_at.is_(None), bans_t.c.expires_at, bans_t.c.net)
        )
        with self._tx() as c:
            rows = c.execute(q).all()
        cols = [col.name for col in bans_t.columns]
        i = {k: cols.index(k) for k in ("net", "expires_at", "reason", "source", "banned_at", "count", "rule")}
        return [Ban(net_of(r[i["net"]]), r[i["expires_at"]], r[i["reason"]], r[i["source"]], r[i["banned_at"]],
                    r[i["count"]], r[i["rule"]]) for r in rows]

    def active_expiries(self, now: float) -> dict[str, float | None]:
        """Canonical network text -> expiry of every ban in force at `now` (what the daemon keeps)."""
        q = select(bans_t.c.net, bans_t.c.expires_at).where(bans_t.c.active == 1, _not_expired(now))
        with self._tx() as c:
            return {r[0]: r[1] for r in c.execute(q)}

    def get_ban(self, net: Network | str) -> Ban | None:
        """The active ban of exactly this network (the caller compares `expires` with now)."""
        q = select(bans_t).where(bans_t.c.net == _key(net), bans_t.c.active == 1)
        with self._tx() as c:
            row = c.execute(q).mappings().one_or_none()
        return _ban(row) if row else None

    def history(self, net: Network | str) -> list[Ban]:
        """Every remembered offence of this network, oldest first (count = offences so far)."""
        q = select(history_t).where(history_t.c.net == _key(net)).order_by(history_t.c.banned_at)
        with self._tx() as c:
            return [_ban(r) for r in c.execute(q).mappings()]

    def ban_count(self, net: Network | str, since: float) -> int:
        """Offences of this network at or after `since` (the memory period), for escalation."""
        q = select(func.count()).where(history_t.c.net == _key(net), history_t.c.banned_at >= since)
        with self._tx() as c:
            return int(c.execute(q).scalar_one())

    def remove_bans(self, nets: Sequence[Network]) -> list[Network]:
        """End these bans (history stays); returns those that were active, in the order given."""
        given = {_key(n): n for n in nets}
        with self._tx(write=True) as c:
            active = set(c.exec_driver_sql(_END_BANS, (_json_keys(given),)).scalars())
        return [_canonical_net(k, n) for k, n in given.items() if k in active]

    def expire(self, now: float) -> list[Ban]:
        """Mark bans whose time is up as ended and return them (for unban logging)."""
        due = (bans_t.c.active == 1, bans_t.c.expires_at.is_not(None), bans_t.c.expires_at <= now)
        with self._tx(write=True) as c:
            rows = c.execute(select(bans_t).where(*due).order_by(bans_t.c.expires_at)).mappings().all()
            c.execute(update(bans_t).where(*due).values(active=0))
        return [_ban(r) for r in rows]

    # -- housekeeping ------------------------------------------------------------------------

    def purge(self, now: float, hits_before: float, history_before: float) -> dict[str, int]:
        """Delete hits older than `hits_before`, ended bans and history older than `history_before`,
        then give the freed pages back to the file system so the file stays bounded."""
        ended = bans_t.c.active == 0
        ended_at = func.coalesce(bans_t.c.expires_at, bans_t.c.banned_at)
        with self._tx(write=True) as c:
            counts = {
                "hits": c.execute(delete(hits_t).where(hits_t.c.ts < hits_before)).rowcount,
                "bans": c.execute(delete(bans_t).where(ended, ended_at < history_before)).rowcount,
                "history": c.execute(delete(history_t).where(history_t.c.banned_at < history_before)).rowcount,
            }
            _set_meta(c, "last_purge", repr(now))
        self._compact()
        counts["db_bytes"] = self._size()
        return counts

    def _compact(self) -> None:
        """Free the pages DELETE left behind, then truncate the WAL (outside any transaction)."""
        try:
            with self._engine.connect() as c:
                raw = c.connection.dbapi_connection
                assert raw is not None
                # Frees one page per step; execute() steps once, executescript() to the end.
                raw.executescript("PRAGMA incremental_vacuum;")
                raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except (sa_exc.SQLAlchemyError, sqlite3.Error) as e:
            raise _store_error(e, self._where()) from e

    # -- resume points -----------------------------------------------------------------------

    def get_offset(self, path: str) -> tuple[int, int, str, int] | None:
        """(inode, offset, head_hash, lineno) saved for a log file, or None."""
        t = offsets_t.c
        q = select(t.inode, t.offset, t.head_hash, t.lineno).where(t.path == path)
        with self._tx() as c:
            row = c.execute(q).one_or_none()
        return None if row is None else (row[0], row[1], row[2], row[3])

    def save_offsets(self, offsets: Iterable[tuple[str, int, int, str] | tuple[str, int, int, str, int]],
                     now: float | None = None) -> None:
        """Upsert (path, inode, offset, head_hash[, lineno]) resume points."""
        with self._tx(write=True) as c:
            self._save_offsets(c, offsets, now)

    def commit(self, hits: Sequence[Hit], offsets: Iterable[tuple[str, int, int, str, int]],
               now: float | None = None) -> None:
        """Hits and the read positions just after their lines, in ONE transaction: after a crash
        either both are there or neither, so no line is ever counted twice or lost between them."""
        rows = _hit_rows(hits)
        with self._tx(write=True) as c:
            if rows:
                c.execute(insert(hits_t), rows)
            self._save_offsets(c, offsets, now)

    @staticmethod
    def _save_offsets(c: Connection, offsets: Iterable[tuple], now: float | None) -> None:
        updated = time.time() if now is None else now
        rows = [{"path": o[0], "inode": o[1], "offset": o[2], "head_hash": o[3],
                 "lineno": o[4] if len(o) > 4 else 0, "updated": updated} for o in offsets]
        if not rows:
            return
        stmt = sqlite_insert(offsets_t)
        stmt = stmt.on_conflict_do_update(
            index_elements=[offsets_t.c.path],
            set_={k: stmt.excluded[k] for k in ("inode", "offset", "head_hash", "lineno", "updated")},
        )
        c.execute(stmt, rows)

    def ban_counts(self, since: float) -> dict[str, int]:
        """Network text -> number of its bans at or after `since` (escalation)."""
        h = history_t.c
        q = select(h.net, func.count()).where(h.banned_at >= since).group_by(h.net)
        with self._tx() as c:
            return {r[0]: r[1] for r in c.execute(q)}

    def offset_paths(self, pattern: str) -> list[str]:
        """Saved log paths equal to, or matching the glob, `pattern`."""
        with self._tx() as c:
            paths = list(c.execute(select(offsets_t.c.path)).scalars())
        return [p for p in paths if p == pattern or fnmatch.fnmatchcase(p, pattern)]

    def last_bans(self, since: float) -> dict[str, float]:
        """Network text -> time of its latest automatic ban at or after `since`: the events before it
        were judged by it. (A manual ban judged no events.)"""
        h = history_t.c
        q = select(h.net, func.max(h.banned_at)).where(h.banned_at >= since, h.source == "auto").group_by(h.net)
        with self._tx() as c:
            return {r[0]: r[1] for r in c.execute(q)}

    def get_cursor(self, name: str) -> str | None:
        with self._tx() as c:
            return c.execute(select(cursor_t.c.cursor).where(cursor_t.c.name == name)).scalar_one_or_none()

    def save_cursor(self, name: str, cursor: str) -> None:
        stmt = sqlite_insert(cursor_t).values(name=name, cursor=cursor)
        stmt = stmt.on_conflict_do_update(index_elements=[cursor_t.c.name], set_={"cursor": cursor})
        with self._tx(write=True) as c:
            c.execute(stmt)

    # -- reporting ---------------------------------------------------------------------------

    def stats(self, now: float | None = None) -> dict[str, int]:
        """Counts for `status`: active bans per family (not yet expired at `now`, when given),
        stored hits, tracked addresses, file size in bytes (database plus WAL)."""
        v6 = func.instr(bans_t.c.net, ":") > 0  # canonical IPv6 text always has a colon, IPv4 never
        where = [bans_t.c.active == 1] + ([] if now is None else [_not_expired(now)])
        with self._tx() as c:
            total, six = c.execute(
                select(func.count(), func.sum(v6, type_=Integer)).select_from(bans_t).where(*where)
            ).one()
            six = six or 0  # SUM of no rows is NULL
            hits = c.execute(select(func.count()).select_from(hits_t)).scalar_one()
            addrs = c.execute(select(func.count(hits_t.c.addr.distinct()))).scalar_one()
            version = c.execute(select(meta_t.c.value).where(meta_t.c.key == "schema_version")).scalar_one()
        return {
            "bans_v4": total - six,
            "bans_v6": six,
            "hits": hits,
            "addresses": addrs,
            "db_bytes": self._size(),
            "schema_version": int(version),
        }

    def pragmas(self) -> dict[str, int | str]:
        """The effective SQLite settings of this connection (for `status` and tests)."""
        names = ("journal_mode", "synchronous", "busy_timeout", "foreign_keys", "auto_vacuum")
        with self._tx() as c:
            return {n: c.exec_driver_sql(f"PRAGMA {n}").scalar_one() for n in names}

    def _size(self) -> int:
        if self.path is None:
            with self._tx() as c:
                pages = c.exec_driver_sql("PRAGMA page_count").scalar_one()
                return int(pages * c.exec_driver_sql("PRAGMA page_size").scalar_one())
        return sum(_file_size(Path(f"{self.path}{suffix}")) for suffix in ("", "-wal"))


# -- engine and error plumbing -------------------------------------------------------------


def _file_path(path_or_url: str) -> Path | None:
    """The database file named by a path or sqlite URL; None means in-memory."""
    if path_or_url.startswith("sqlite:"):
        db = make_url(path_or_url).database
        return None if not db or db == ":memory:" else Path(db)
    return None if path_or_url == ":memory:" else Path(path_or_url)


def _make_engine(path: Path | None) -> Engine:
    url = f"sqlite:///{path}" if path else "sqlite://"
    engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: object) -> None:
        # Autocommit at the driver level; the "begin" hook emits BEGIN itself (SQLAlchemy's recipe).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect only before the first table
        mode = cur.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if path is not None and mode != "wal":
            log.warning("store_wal_unavailable", path=str(path), journal_mode=mode)
        cur.execute("PRAGMA synchronous=NORMAL")  # durable against process crashes in WAL mode
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get("rg_begin", "BEGIN"))

    return engine


def _probe(path: Path) -> None:
    """Integrity check over a read-only connection, so a corrupt file is moved aside untouched
    (a read-write connection would checkpoint its WAL into it on close)."""
    if _file_size(path) == 0:
        return
    try:
        raw = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            problems = [row[0] for row in raw.execute("PRAGMA quick_check(3)")]
        finally:
            raw.close()
    except sqlite3.Error as e:
        raise _store_error(e, str(path)) from e
    if problems != ["ok"]:
        lines = (line.strip() for problem in problems for line in problem.splitlines())
        raise StoreError(f"{path}: {'; '.join(line for line in lines if line)}", corrupt=True)


def _is_corrupt(err: BaseException) -> bool:
    orig = getattr(err, "orig", err)
    if getattr(orig, "sqlite_errorcode", None) in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return True
    text = str(orig).lower()
    return "malformed" in text or "not a database" in text


def _store_error(err: BaseException, where: str) -> StoreError:
    orig = getattr(err, "orig", None) or err
    first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    return StoreError(f"{where}: {first}", corrupt=_is_corrupt(err))


def _move_aside(path: Path) -> Path:
    """Rename a corrupt database (and its WAL/SHM, which belong to it) out of the way."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    for suffix in ("-wal", "-shm", ""):  # main file last: a stray WAL must never meet a new file
        src = Path(f"{path}{suffix}")
        if src.exists():
            os.replace(src, f"{target}{suffix}")
    return target


def _file_size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


def _set_meta(c: Connection, key: str, value: str) -> None:
    stmt = sqlite_insert(meta_t).values(key=key, value=value)
    c.execute(stmt.on_conflict_do_update(index_elements=[meta_t.c.key], set_={"value": value}))


# -- row <-> value -------------------------------------------------------------------------


def _key(net: Network | str) -> str:
    """Canonical text of a network: what the `net` columns hold."""
    return net_text(parse_net(net) if isinstance(net, str) else net)


def _canonical_net(key: str, given: Network) -> Network:
    """The network object for a canonical key, reusing the caller's when it is the same network."""
    return given if not isinstance(given, str) and net_text(given) == key else ipaddress.ip_network(key)


def _json_keys(keys: Iterable[str]) -> str:
    """Keys as one JSON array text (they are canonical addresses and plain words: no escaping needed,
    but json.dumps costs little and keeps it correct for any text)."""
    return json.dumps(list(dict.fromkeys(keys)))


def _not_expired(now: float) -> Any:
    return or_(bans_t.c.expires_at.is_(None), bans_t.c.expires_at > now)


def _merge(old: dict[str, Any] | None, key: str, b: Ban, *, new_offence: bool) -> dict[str, Any]:
    """The bans row after recording `b` over `old` (None when the network has no row)."""
    if old is None or not old["active"]:
        count = max(b.count, old["count"] + 1) if old else b.count
        return {
            "id": old["id"] if old else None,
            "net": key,
            "reason": b.reason,
            "rule": b.rule,
            "source": b.source,
            "banned_at": b.banned_at,
            "expires_at": b.expires,
            "count": count,
            "active": 1,
        }
    expires = None if old["expires_at"] is None or b.expires is None else max(old["expires_at"], b.expires)
    if not new_offence:
        return {**old, "expires_at": expires}
    return {
        **old,
        "reason": b.reason,
        "rule": b.rule,
        "source": "manual" if old["source"] == "manual" else b.source,
        "expires_at": expires,
        "count": max(b.count, old["count"] + 1),
    }


def _history_values(key: str, b: Ban, count: int) -> tuple[Any, ...]:
    """One ban_history row, in _HISTORY_COLS order."""
    return (key, b.banned_at, b.expires, b.reason, b.rule, b.source, count)


def _ban(r: RowMapping) -> Ban:
    return Ban(
        net=ipaddress.ip_network(r["net"]),
        expires=r["expires_at"],
        reason=r["reason"],
        source=r["source"],
        banned_at=r["banned_at"],
        count=r["count"],
        rule=r["rule"],
    )


def _hit_rows(hits: Sequence[Hit]) -> list[dict[str, Any]]:
    return [
        {"ts": h.ts, "addr": h.addr, "rule": h.rule, "service": h.service, "weight": h.weight, "grp": h.group,
         "key": h.key, "repeat_weight": h.repeat_weight, "source": h.source, "lineno": h.lineno, "text": h.text}
        for h in hits
    ]


def _hit(r: RowMapping) -> Hit:
    return Hit(
        ts=r["ts"],
        addr=r["addr"],
        rule=r["rule"],
        service=r["service"],
        weight=r["weight"],
        source=r["source"],
        lineno=r["lineno"],
        text=r["text"],
        group=r["grp"],
        key=r["key"],
        repeat_weight=r["repeat_weight"],
    )
