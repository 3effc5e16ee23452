"""FileTail on real files with real inotify: rotation, truncation, deletion, resume, partial and long lines.

Every wait is for a condition (a line received, a state reached, a file held open) with a 5 s deadline.
Unreadable files: root ignores chmod 000, so that test runs the tail in a child process started with
setpriv without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: still uid 0 (the file is root's, mode 000),
but the kernel now refuses the open with EACCES, as it would for the daemon running as another user.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from tail_harness import Running

from relayguard.source import HEAD_BYTES, LONG_LINE, Chunk, FileTail, Position, _Gen, head_hash

DEADLINE = 5.0
POLL = 0.02


class Tail(Running):
    """A FileTail running on the test's loop, and every line it emitted as (path, lineno, text)."""

    def __init__(self, pattern: Path | str, start: str = "beginning",
                 saved: Callable[[str], Position | None] | None = None, **kw: Any) -> None:
        kw.setdefault("poll_interval", POLL)
        self.ft = self.source = FileTail(str(pattern), start, saved or (lambda _p: None), **kw)  # type: ignore[arg-type]
        self.queue: asyncio.Queue[Chunk] = asyncio.Queue()
        self.chunks: list[Chunk] = []
        self.lines: list[tuple[str, int, str]] = []
        self._arrived = asyncio.Event()

    def collect(self, c: Chunk) -> None:
        assert c.data.endswith(b"\n") and c.first_lineno >= 1 and c.offset > 0
        for i, line in enumerate(c.data.split(b"\n")[:-1]):
            self.lines.append((c.path, c.first_lineno + i, line.decode()))
        self.chunks.append(c)
        self._arrived.set()

    @property
    def texts(self) -> list[str]:
        return [t for _, _, t in self.lines]

    async def until(self, cond: Callable[[], bool], what: str = "condition") -> None:
        """Wait for cond(): re-checked on each chunk and every 10 ms (for status changes)."""
        try:
            async with asyncio.timeout(DEADLINE):
                while not cond():
                    if self.task.done():
                        self.task.result()  # the tail died: show why
                        raise AssertionError("tail stopped")
                    self._arrived.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.01):
                            await self._arrived.wait()
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}; got {self.lines[-5:]} {self.ft.status()}") from None

    def file(self, path: Path | str) -> dict[str, Any]:
        """One file's status ({} until the tail has looked at it)."""
        return next((f for f in self.ft.status()["files"] if f["path"] == str(path)), {})


class Log:
    """The writer's side: every line is unique and remembers its number within the file it went to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.n = 0  # lines in the current file
        self.seq = 0
        self.written: list[tuple[str, int]] = []
        self.first_of_file: str | None = None  # first line written since the last rotation

    def _next(self) -> str:
        self.seq += 1
        self.n += 1
        text = f"line {self.seq:05d} " + "x" * (self.seq % 37)
        self.written.append((text, self.n))
        self.first_of_file = self.first_of_file or text
        return text

    def write(self, count: int = 1) -> None:
        with self.path.open("ab") as f:
            f.write(b"".join(f"{self._next()}\n".encode() for _ in range(count)))

    async def write_in_two(self) -> None:
        """One line in two writes, letting the tail run in between (it must hold the first half back)."""
        raw = f"{self._next()}\n".encode()
        with self.path.open("ab") as f:
            f.write(raw[:7])
        await asyncio.sleep(0)
        with self.path.open("ab") as f:
            f.write(raw[7:])

    def _new_file(self) -> None:
        self.n, self.first_of_file = 0, None

    def rename(self) -> None:  # logrotate's default: rename, the writer creates the next file
        os.replace(self.path, f"{self.path}.1")
        self._new_file()

    def copytruncate(self) -> None:
        shutil.copyfile(self.path, f"{self.path}.1")
        os.truncate(self.path, 0)
        self._new_file()

    def delete(self) -> None:
        self.path.unlink()
        self._new_file()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def open_inodes() -> set[int]:
    """Inodes this process holds open: how a test sees that the tail has grabbed a file."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out.add(os.stat(f"/proc/self/fd/{fd}").st_ino)
    return out


# -- the line splitter, as data


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[bytes], bytes, list[int], bytes]:
    """Lines (some too long), an unterminated tail, the points where reads cut the stream, the stream."""
    lengths = draw(st.lists(st.one_of(st.integers(0, 40), st.sampled_from(
        [LONG_LINE - 1, LONG_LINE, LONG_LINE + 1, 100_000])), max_size=12))
    lines = [bytes([97 + i % 26]) * n for i, n in enumerate(lengths)]
    tail = b"t" * draw(st.sampled_from([0, 5, LONG_LINE + 3]))
    stream = b"".join(line + b"\n" for line in lines) + tail
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    return lines, tail, [0, *cuts, len(stream)], stream


@settings(max_examples=60, deadline=None)
@given(streams())
def test_lines_are_split_whole_long_ones_skipped_memory_bounded(case: Any) -> None:
    lines, tail, cuts, stream = case
    g = _Gen(fd=-1, dev=0, ino=1)
    got: list[tuple[int, bytes]] = []
    skipped = 0
    for a, b in itertools.pairwise(cuts):
        runs, n = g.feed(stream[a:b])
        skipped += n
        for data, first, count, end in runs:
            assert stream[end - len(data):end] == data and data.count(b"\n") == count
            got += [(first + i, line) for i, line in enumerate(data.split(b"\n")[:-1])]
        assert len(g.pending) <= LONG_LINE
    want = [(i, line) for i, line in enumerate(lines, 1) if len(line) <= LONG_LINE]
    assert got == want
    assert skipped == sum(len(line) > LONG_LINE for line in lines) + (len(tail) > LONG_LINE)
    assert g.head == stream[:HEAD_BYTES]
    assert g.pending == (tail if len(tail) <= LONG_LINE else b"")


# -- following


@pytest.mark.parametrize("inotify", [True, False], ids=["inotify", "poll"])
def test_rotation_copytruncate_delete_lose_nothing_count_nothing_twice(tmp_path: Path, inotify: bool) -> None:
    log = Log(tmp_path / "mail.log")
    log.write(3)
    ops = ["rename", "rename", "copytruncate", "delete", "rename", "copytruncate", "delete", "rename"]

    async def scenario() -> None:
        async with Tail(log.path, inotify=inotify) as tail:
            lock, done = asyncio.Lock(), asyncio.Event()

            async def writer() -> None:
                while not done.is_set():
                    async with lock:
                        if log.seq % 5:
                            log.write()
                        else:
                            await log.write_in_two()
                    await asyncio.sleep(0.001)

            w = asyncio.create_task(writer())
            for op in ops:
                # rotate only once the tail has read into the current file (logrotate runs daily, not per line)
                await tail.until(lambda: log.first_of_file in tail.texts, f"a line before {op}")
                async with lock:
                    getattr(log, op)()
            await tail.until(lambda: log.first_of_file in tail.texts, "a line after the last rotation")
            done.set()
            await w
            await tail.until(lambda: len(tail.lines) >= len(log.written), "every line")
            assert Counter((t, n) for _, n, t in tail.lines) == Counter(log.written)
            assert tail.ft.status()["files"][0]["state"] == "following"
            assert tail.ft.status()["mode"] == ("inotify" if inotify else "poll")

    run(scenario())


def test_two_rotations_before_the_first_new_file_was_read(tmp_path: Path) -> None:
    """Once the tail holds the file a rotation created, a second rotation cannot hide its lines."""
    log = Log(tmp_path / "mail.log")
    log.write(2)

    async def scenario() -> None:
        async with Tail(log.path) as tail:
            await tail.until(lambda: len(tail.lines) == 2)
            log.rename()
            log.write(3)
            ino = log.path.stat().st_ino
            await tail.until(lambda: ino in open_inodes(), "the new file held open")
            os.replace(f"{log.path}.1", f"{log.path}.2")  # what logrotate does with rotate 2+
            log.rename()
            log.write(2)
            await tail.until(lambda: len(tail.lines) == 7)
            assert [(t, n) for _, n, t in tail.lines] == log.written

    run(scenario())


def test_copytruncate_reads_unread_lines_from_the_copy(tmp_path: Path) -> None:
    log = Log(tmp_path / "mail.log")
    log.write(3)

    async def scenario() -> None:
        async with Tail(log.path) as tail:
            await tail.until(lambda: len(tail.lines) == 3)
            with structlog.testing.capture_logs() as logs:
                log.write(4)  # no await before the truncation: the tail cannot have read these
                log.copytruncate()
                log.write(2)
                await tail.until(lambda: len(tail.lines) == 9)
            assert [(t, n) for _, n, t in tail.lines] == log.written
            assert any(e["event"] == "source_truncated" and e["copy"] for e in logs)

    run(scenario())


def test_truncation_without_copy_restarts_at_zero(tmp_path: Path) -> None:
    path = tmp_path / "mail.log"
    path.write_bytes(b"old one\nold two\n")

    async def scenario() -> None:
        async with Tail(path) as tail:
            await tail.until(lambda: len(tail.lines) == 2)
            path.write_bytes(b"new one with a longer text\n")  # same inode, new head, longer than before
            await tail.until(lambda: len(tail.lines) == 3)
            assert tail.lines[-1] == (str(path), 1, "new one with a longer text")
            assert tail.chunks[-1].head_hash == head_hash(path.read_bytes())

    run(scenario())


def test_deleted_file_goes_missing_then_is_picked_up_again(tmp_path: Path) -> None:
    path = tmp_path / "mail.log"
    path.write_bytes(b"one\n")

    async def scenario() -> None:
        async with Tail(path) as tail:
            await tail.until(lambda: tail.texts == ["one"])
            with structlog.testing.capture_logs() as logs:
                path.unlink()
                await tail.until(lambda: tail.file(path).get("state") == "missing", "missing")
                assert {"event": "source_missing", "path": str(path), "log_level": "warning"} in logs
                path.write_bytes(b"two\n")
                await tail.until(lambda: tail.texts == ["one", "two"])
            assert tail.lines[-1][1] == 1
            assert tail.file(path)["state"] == "following"

    run(scenario())


@pytest.mark.parametrize("where", ["file", "directory"])
def test_missing_at_start_is_read_from_its_first_line_when_it_appears(tmp_path: Path, where: str) -> None:
    path = tmp_path / "var" / "mail.log" if where == "directory" else tmp_path / "mail.log"

    async def scenario() -> None:
        async with Tail(path, start="end") as tail:
            await tail.until(lambda: tail.file(path).get("state") == "missing", "the path missing")
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(b"first\nsecond\n")  # a new file: from its start, even with start="end"
            await tail.until(lambda: len(tail.lines) == 2)
            assert tail.lines == [(str(path), 1, "first"), (str(path), 2, "second")]

    run(scenario())


def test_glob_matches_that_appear_later_are_followed(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_bytes(b"a old\n")
    (tmp_path / "other.txt").write_bytes(b"not matched\n")

    async def scenario() -> None:
        async with Tail(tmp_path / "*.log", start="end") as tail:
            await tail.until(lambda: tail.file(tmp_path / "a.log").get("state") == "following")
            with (tmp_path / "a.log").open("ab") as f:
                f.write(b"a new\n")
            (tmp_path / "b.log").write_bytes(b"b one\nb two\n")
            (tmp_path / "other.txt").write_bytes(b"not matched either\n")
            await tail.until(lambda: len(tail.lines) == 3)
            assert sorted(tail.lines) == [(str(tmp_path / "a.log"), 2, "a new"),
                                          (str(tmp_path / "b.log"), 1, "b one"),
                                          (str(tmp_path / "b.log"), 2, "b two")]
            assert tail.ft.status()["lines"] == 3

    run(scenario())


def test_a_directory_in_place_of_the_file_is_unreadable_and_others_go_on(tmp_path: Path) -> None:
    """In-process variant of 'unreadable': a path that cannot be read as a file (here a directory)."""
    bad, good = tmp_path / "bad.log", tmp_path / "good.log"
    bad.mkdir()
    good.write_bytes(b"")

    async def scenario() -> None:
        with structlog.testing.capture_logs() as logs:
            async with Tail(bad) as t_bad, Tail(good) as t_good:
                await t_bad.until(lambda: t_bad.ft.status()["state"] == "unreadable", "unreadable")
                good.write_bytes(b"still flowing\n")
                await t_good.until(lambda: t_good.texts == ["still flowing"])
                bad.rmdir()
                bad.write_bytes(b"readable now\n")
                await t_bad.until(lambda: t_bad.texts == ["readable now"])
                assert t_bad.ft.status()["state"] == "following"
        assert any(e["event"] == "source_unreadable" and e["log_level"] == "warning" for e in logs)

    run(scenario())


def test_a_new_file_at_the_path_is_only_switched_to_once_it_has_data(tmp_path: Path) -> None:
    """rsyslog writes to the renamed file until its HUP: those lines must not be lost."""
    log = Log(tmp_path / "mail.log")
    log.write(1)

    async def scenario() -> None:
        async with Tail(log.path) as tail:
            await tail.until(lambda: len(tail.lines) == 1)
            old = log.path.open("ab")  # the writer's descriptor survives the rename
            log.rename()
            log.path.write_bytes(b"")  # logrotate's create
            await tail.until(lambda: log.path.stat().st_ino in open_inodes(), "the new file held open")
            old.write(b"late line in the old file\n")
            old.close()
            await tail.until(lambda: len(tail.lines) == 2)
            log.write(1)
            await tail.until(lambda: len(tail.lines) == 3)
            assert tail.lines[1:] == [(str(log.path), 2, "late line in the old file"),
                                      (str(log.path), 1, log.written[-1][0])]

    run(scenario())


def test_changes_no_event_reports_are_found_by_the_safety_poll(tmp_path: Path) -> None:
    """Writes through a hard link in another directory raise no event in the watched directory."""
    path, elsewhere = tmp_path / "mail.log", tmp_path / "other"
    path.write_bytes(b"")
    elsewhere.mkdir()
    os.link(path, elsewhere / "link")

    async def scenario() -> None:
        async with Tail(path, poll_interval=0.05) as tail:
            await tail.until(lambda: tail.ft.status()["mode"] == "inotify" and tail.ft.status()["files"])
            with (elsewhere / "link").open("ab") as f:
                f.write(b"seen anyway\n")
            await tail.until(lambda: tail.texts == ["seen anyway"])

    run(scenario())


# -- partial and long lines


def test_partial_line_is_held_back_until_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "mail.log"
    path.write_bytes(b"whole\npart")

    async def scenario() -> None:
        async with Tail(path) as tail:
            await tail.until(lambda: tail.ft.status()["bytes"] == 10, "the partial line read")
            assert tail.texts == ["whole"] and tail.file(path)["buffered"] == 4
            with path.open("ab") as f:
                f.write(b"ial\nnext")
            await tail.until(lambda: len(tail.lines) == 2)
            assert tail.lines[1] == (str(path), 2, "partial")
            assert tail.chunks[-1].offset == 14  # the resume point excludes the pending "next"

    run(scenario())


def test_the_unterminated_last_line_of_a_rotated_file_is_emitted(tmp_path: Path) -> None:
    """Its writer has moved on to the new file, so the line is complete; it gets a newline."""
    path = tmp_path / "mail.log"
    path.write_bytes(b"one\nlast without newline")

    async def scenario() -> None:
        async with Tail(path) as tail:
            await tail.until(lambda: tail.ft.status()["bytes"] == 24, "everything read")
            os.replace(path, f"{path}.1")
            path.write_bytes(b"new\n")
            await tail.until(lambda: len(tail.lines) == 3)
            assert tail.lines[1:] == [(str(path), 2, "last without newline"), (str(path), 1, "new")]

    run(scenario())


@pytest.mark.parametrize("max_chunk", [4096, 1 << 20])
def test_a_100k_line_is_skipped_without_buffering_it(tmp_path: Path, max_chunk: int) -> None:
    path = tmp_path / "mail.log"
    path.write_bytes(b"before\n")

    async def scenario() -> None:
        async with Tail(path, max_chunk=max_chunk) as tail:
            await tail.until(lambda: tail.texts == ["before"])
            for i in range(1, 11):  # the long line arrives in ten 10 KiB writes
                with path.open("ab") as f:
                    f.write(b"y" * 10240)
                await tail.until(lambda i=i: tail.ft.status()["bytes"] == 7 + i * 10240, "the piece read")
                assert tail.file(path)["buffered"] <= LONG_LINE
            with path.open("ab") as f:
                f.write(b"\n" + b"z" * LONG_LINE + b"\nafter\n")
            await tail.until(lambda: len(tail.lines) == 3)
            assert tail.lines == [(str(path), 1, "before"), (str(path), 3, "z" * LONG_LINE),
                                  (str(path), 4, "after")]
            assert tail.ft.status()["skipped_long"] == 1

    run(scenario())


# -- where reading starts


def test_start_end_skips_old_lines_but_counts_them(tmp_path: Path) -> None:
    path = tmp_path / "mail.log"
    path.write_bytes(b"old 1\nold 2\nhalf")

    async def scenario() -> None:
        async with Tail(path, start="end") as tail:
            await tail.until(lambda: tail.ft.status()["bytes"] == 4, "the partial tail read")
            with path.open("ab") as f:
                f.write(b" done\nnew\n")
            await tail.until(lambda: len(tail.lines) == 2)
            assert tail.lines == [(str(path), 3, "half done"), (str(path), 4, "new")]

    run(scenario())


def _first_run(path: Path) -> Position:
    """Read everything once, stop, and return the position a caller would have saved."""
    async def scenario() -> Position:
        async with Tail(path) as tail:
            await tail.until(lambda: tail.ft.status()["lag_bytes"] == 0 and tail.lines)
            return tail.chunks[-1].position
    return run(scenario())


def _second_run(path: Path, saved: Position | None, want: int, start: str = "end") -> Tail:
    async def scenario() -> Tail:
        async with Tail(path, start=start, saved=lambda p: saved if p == str(path) else None) as tail:
            await tail.until(lambda: len(tail.lines) >= want)
            await tail.until(lambda: tail.ft.status()["lag_bytes"] == 0)
        return tail
    return run(scenario())


def test_resume_continues_at_the_saved_offset(tmp_path: Path) -> None:
    log = Log(tmp_path / "mail.log")
    log.write(4)
    pos = _first_run(log.path)
    assert pos == Position(log.path.stat().st_ino, log.path.stat().st_size,
                           head_hash(log.path.read_bytes()[:HEAD_BYTES]), 4)
    log.write(3)  # written while the daemon was down
    tail = _second_run(log.path, pos, 3)
    assert [(t, n) for _, n, t in tail.lines] == log.written[4:]


def test_resume_after_a_rotation_while_down_reads_the_rest_of_the_rotated_file(tmp_path: Path) -> None:
    log = Log(tmp_path / "mail.log")
    log.write(20)  # past HEAD_BYTES: the hash covers the full head
    pos = _first_run(log.path)
    log.write(2)
    log.rename()
    log.write(3)
    with structlog.testing.capture_logs() as logs:
        tail = _second_run(log.path, pos, 5)
    assert [(t, n) for _, n, t in tail.lines] == log.written[20:]
    assert {c.inode for c in tail.chunks[:1]} == {pos.inode}
    assert any(e["event"] == "source_resumed" and e.get("rotated") for e in logs)


def test_resume_of_a_file_rewritten_in_place_starts_at_zero(tmp_path: Path) -> None:
    path = tmp_path / "mail.log"
    path.write_bytes(b"a\nb\nc\n")
    pos = _first_run(path)
    with path.open("r+b") as f:  # same inode, other content (copytruncate while down, then regrown)
        f.write(b"X\nY\nZ\nW\n")
    tail = _second_run(path, pos, 4)
    assert tail.texts == ["X", "Y", "Z", "W"] and tail.lines[0][1] == 1


def test_resume_whose_file_is_gone_reads_the_new_file_from_zero(tmp_path: Path) -> None:
    path = tmp_path / "mail.log"
    path.write_bytes(b"a\n")
    pos = _first_run(path)
    (tmp_path / "new").write_bytes(b"fresh\n")  # created while the old file still exists: another inode
    os.replace(tmp_path / "new", path)  # the old file is gone (rotated and compressed away while down)
    with structlog.testing.capture_logs() as logs:
        tail = _second_run(path, pos, 1)
    assert tail.lines == [(str(path), 1, "fresh")]
    assert any(e["event"] == "source_resume_lost" for e in logs)


# -- a child process: permissions that bind root, and inotify that fails


CHILD = r"""
import asyncio, json, sys
import structlog
from relayguard.source import FileTail

def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()

def to_stdout(_, level, ev):
    emit({"log": ev.pop("event"), "level": level, "fields": {k: str(v) for k, v in ev.items()}})
    raise structlog.DropEvent

structlog.configure(processors=[to_stdout])

async def main():
    q = asyncio.Queue()
    tails = [FileTail(p, "beginning", lambda _: None, poll_interval=0.02) for p in sys.argv[1:]]
    for t in tails:
        asyncio.create_task(t.run(q))
    async def chunks():
        while True:
            c = await q.get()
            emit({"file": c.path, "first": c.first_lineno, "text": c.data.decode().splitlines()})
    asyncio.create_task(chunks())
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.readline():
        emit({"status": [t.status() for t in tails]})

asyncio.run(main())
"""


class Child:
    """The tail in another process; talks JSON lines (chunks, log events, status on request)."""

    def __init__(self, prefix: list[str], *paths: Path) -> None:
        self.argv = [*prefix, sys.executable, "-c", CHILD, *map(str, paths)]
        self.seen: list[dict[str, Any]] = []

    async def __aenter__(self) -> Child:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()

    def lines(self, path: Path) -> list[tuple[int, str]]:
        return [(m["first"] + i, t) for m in self.seen if m.get("file") == str(path)
                for i, t in enumerate(m["text"])]

    async def expect(self, cond: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """The first message (from now on) that satisfies cond."""
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(DEADLINE):
                while True:
                    raw = await self.proc.stdout.readline()
                    if not raw:
                        assert self.proc.stderr is not None
                        raise AssertionError(f"child ended: {(await self.proc.stderr.read()).decode()}")
                    msg = json.loads(raw)
                    self.seen.append(msg)
                    if cond(msg):
                        return msg
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}; seen {self.seen[-5:]}") from None

    async def status(self, cond: Callable[[list[dict[str, Any]]], bool], what: str) -> list[dict[str, Any]]:
        """Ask for status until cond holds for it."""
        assert self.proc.stdin is not None
        async with asyncio.timeout(DEADLINE):
            while True:
                self.proc.stdin.write(b"status\n")
                msg = await self.expect(lambda m: "status" in m, what)
                if cond(msg["status"]):
                    return msg["status"]
                await asyncio.sleep(0.02)


def test_permission_denied_is_unreadable_until_readable_again(tmp_path: Path) -> None:
    bad, good = tmp_path / "bad.log", tmp_path / "good.log"
    bad.write_bytes(b"before\n")
    good.write_bytes(b"")
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []

    async def scenario() -> None:
        async with Child(prefix, bad, good) as child:
            await child.expect(lambda m: m.get("text") == ["before"], "the first line")
            # logrotate's create with a mode the daemon's user cannot read
            os.replace(bad, f"{bad}.1")
            fd = os.open(bad, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o000)
            os.write(fd, b"after rotation\n")
            await child.expect(lambda m: m.get("log") == "source_unreadable", "source_unreadable")
            st = await child.status(lambda s: s[0]["state"] == "unreadable", "state unreadable")
            assert "Permission denied" in st[0]["files"][0]["error"]
            good.write_bytes(b"others go on\n")
            await child.expect(lambda m: m.get("text") == ["others go on"], "the other source")
            os.write(fd, b"more\n")
            os.close(fd)
            os.chmod(bad, 0o644)
            await child.expect(lambda m: "more" in m.get("text", []), "the readable file")
            assert child.lines(bad) == [(1, "before"), (1, "after rotation"), (2, "more")]
            st = await child.status(lambda s: s[0]["state"] == "following", "following")

    run(scenario())


@pytest.mark.parametrize("limit", ["max_inotify_instances", "max_inotify_watches"])
def test_without_inotify_it_polls(tmp_path: Path, limit: str) -> None:
    """inotify made to fail for real: a user namespace whose inotify limit is 0 (the host's stays as is)."""
    log = Log(tmp_path / "mail.log")
    log.write(2)
    prefix = ["unshare", "--user", "--map-root-user", "sh", "-c",
              f'echo 0 > /proc/sys/user/{limit} && exec "$@"', "sh"]

    async def scenario() -> None:
        async with Child(prefix, log.path) as child:
            warning = "source_inotify_unavailable" if limit == "max_inotify_instances" else "source_watch_failed"
            await child.expect(lambda m: m.get("log") == warning, warning)
            await child.expect(lambda m: m.get("text"), "the first lines")
            for op in ("rename", "copytruncate", "delete"):
                log.write(2)
                await child.expect(lambda m: m.get("text") and m["text"][-1] == log.written[-1][0], "lines")
                getattr(log, op)()
                log.write(1)
            await child.expect(lambda m: m.get("text") and m["text"][-1] == log.written[-1][0], "last line")
            assert Counter((t, n) for n, t in child.lines(log.path)) == Counter(log.written)

    run(scenario())
