"""Following log files: FileTail turns a path or a glob into Chunks of whole lines for the daemon.

Owns which files match, where reading starts or resumes, and surviving what happens to log files:
rename-and-create rotation, copytruncate, delete and recreate, files missing or unreadable for a
while, lines too long to buffer. Modelled on fail2ban's FileContainer (a new inode, a shrinking file
or a changed head means a new file; resume from a stored position), but event-driven: one inotify
watch per parent directory (pyinotify, read on the asyncio loop) says when to look, a stat poll
stands in where inotify is unavailable, and a slow safety poll catches whatever an event missed.
The events are only hints: every look compares the path with the open file descriptors.

A file is a chain of generations (inodes). The oldest open one is read to its end before the next:
a renamed file stays open and is drained until the new file at the path has data (its writer has
switched); a new file seen in an inotify event is opened at once, so a quick second rotation does
not hide it. After copytruncate, the rest of the old content is read from the copy next to the file
(a sibling whose head matches) before the truncated file is read from 0.

The caller persists positions from the Chunks (Chunk.position); this module never touches storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import glob
import hashlib
import os
import re
import stat
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import structlog

with warnings.catch_warnings():  # pyinotify 0.9.6 imports asyncore (deprecated in 3.11, pyasyncore on 3.12+)
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import pyinotify
    except ImportError:  # polling only
        pyinotify = None

log = structlog.get_logger(__name__)

LONG_LINE = 64 * 1024  # as parse.MAX_LINE: longer lines are skipped here and counted, never buffered
HEAD_BYTES = 256  # how much of a file's head identifies it
INLINE_READ = 64 * 1024  # reads up to this size run on the loop (fresh appends, page cache); bigger in a thread
SAFETY_POLLS = 10  # every file is looked at every SAFETY_POLLS * poll_interval, events or not
SIBLING_LIMIT = 10_000  # directory entries examined when looking for a rotated file or a copy
_MAGIC = re.compile(r"[*?[]")

if pyinotify is not None:
    _IN_NEW = pyinotify.IN_CREATE | pyinotify.IN_MOVED_TO
    _IN_GONE = pyinotify.IN_DELETE_SELF | pyinotify.IN_MOVE_SELF | pyinotify.IN_IGNORED
    _DIR_MASK = (pyinotify.IN_MODIFY | pyinotify.IN_ATTRIB | pyinotify.IN_DELETE | pyinotify.IN_MOVED_FROM
                 | pyinotify.IN_DELETE_SELF | pyinotify.IN_MOVE_SELF | _IN_NEW)

State = Literal["following", "missing", "unreadable"]


class Position(NamedTuple):
    """Where reading of a file stopped: resume there if the file at the path still has this inode and head."""

    inode: int
    offset: int
    head_hash: str
    lineno: int  # number of the last line before offset (0 at the start of a file)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One or more whole lines of one file."""

    path: str  # the configured path or glob match
    data: bytes  # complete lines, each ending with b"\n"
    first_lineno: int  # 1-based number of the first line within that file (since created or rotated)
    offset: int  # byte offset just after data in that file: the resume point
    inode: int
    head_hash: str  # head_hash() of the first min(256, offset) bytes of that file

    @property
    def last_lineno(self) -> int:
        return self.first_lineno + self.data.count(b"\n") - 1

    @property
    def position(self) -> Position:
        """What to persist so that a restart resumes just after this chunk."""
        return Position(self.inode, self.offset, self.head_hash, self.last_lineno)


def head_hash(head: bytes) -> str:
    return hashlib.blake2b(head, digest_size=16).hexdigest()


class _NotRegular(OSError):
    pass


@dataclass(eq=False, slots=True)
class _Gen:
    """One open generation (inode) of a file and how far it has been read."""

    fd: int
    dev: int
    ino: int
    pos: int = 0  # bytes read so far
    lineno: int = 0  # lines completed before the pending bytes
    head: bytes = b""  # always the first min(HEAD_BYTES, pos) bytes
    pending: bytes = b""  # the partial last line, at most LONG_LINE bytes
    skipping: bool = False  # inside a line longer than LONG_LINE: dropping bytes until its newline
    final: bool = False  # a copy left by copytruncate: retire it at its end
    _full_hash: str = ""

    def same(self, st: os.stat_result) -> bool:
        return (self.dev, self.ino) == (st.st_dev, st.st_ino)

    def hash_at(self, offset: int) -> str:
        if offset < HEAD_BYTES:
            return head_hash(self.head[:offset])
        if not self._full_hash:
            self._full_hash = head_hash(self.head)
        return self._full_hash

    def reset(self) -> None:
        self.pos = self.lineno = 0
        self.head = self.pending = b""
        self._full_hash = ""
        self.skipping = False

    def take_state(self, other: _Gen) -> None:
        """Continue where `other` stopped (a copy of its content)."""
        self.pos, self.lineno, self.head = other.pos, other.lineno, other.head
        self.pending, self.skipping = other.pending, other.skipping

    def feed(self, data: bytes) -> tuple[list[tuple[bytes, int, int, int]], int]:
        """Runs of whole lines in data as (bytes, first_lineno, lines, end_offset); and long lines skipped.

        Memory stays bounded: a partial line longer than LONG_LINE is dropped, not kept.
        """
        start = self.pos
        self.pos += len(data)
        if start < HEAD_BYTES:  # len(head) == start here: sequential reads from the head
            self.head += data[: HEAD_BYTES - start]
        i = skipped = 0
        if self.skipping:
            i = data.find(b"\n") + 1
            if i == 0:
                return [], 0
            self.skipping = False
            self.lineno += 1
        buf = self.pending + data[i:] if self.pending else data[i:]
        base = start + i - len(self.pending)
        runs: list[tuple[bytes, int, int, int]] = []
        seg = p = 0
        while True:
            j = buf.rfind(b"\n", p, p + LONG_LINE + 1)  # every line up to j is short
            if j >= 0:
                p = j + 1
                continue
            if len(buf) - p <= LONG_LINE:
                break  # a partial line that may still end in time
            self._run(runs, buf, seg, p, base)
            skipped += 1
            e = buf.find(b"\n", p + LONG_LINE + 1)
            if e < 0:
                self.skipping = True
                seg = p = len(buf)
                break
            self.lineno += 1
            seg = p = e + 1
        self._run(runs, buf, seg, p, base)
        self.pending = buf[p:]
        return runs, skipped

    def _run(self, runs: list[tuple[bytes, int, int, int]], buf: bytes, s: int, e: int, base: int) -> None:
        if e > s:
            data = buf[s:e]
            n = data.count(b"\n")
            runs.append((data, self.lineno + 1, n, base + e))
            self.lineno += n

    def flush(self) -> tuple[bytes, int, int, int] | None:
        """The unterminated last line of a finished generation, given a newline; None when there is none."""
        self.skipping = False
        if not self.pending:
            return None
        run = (self.pending + b"\n", self.lineno + 1, 1, self.pos)
        self.lineno += 1
        self.pending = b""
        return run


@dataclass(eq=False, slots=True)
class _Track:
    """One path (the configured one or a glob match) and the generations of it that are open."""

    path: str
    abspath: str
    dir: str
    base: str
    plan: Position | Literal["end", "zero"] = "zero"  # where the first generation opened starts
    cur: _Gen | None = None  # being read
    next: list[_Gen] = field(default_factory=list)  # newer generations, oldest first, not read yet
    seen: Literal["ok", "missing", "unreadable"] = "missing"  # what the path showed at the last look
    state: State | None = None
    error: str = ""
    detached: bool = False  # the path no longer names cur: any event in the directory may concern it
    lines: int = 0
    bytes: int = 0
    skipped_long: int = 0

    def known(self, st: os.stat_result) -> bool:
        return any(g.same(st) for g in ([self.cur] if self.cur else []) + self.next)


class FileTail:
    """Follows the files matching one path or glob and puts Chunks of whole lines on a queue."""

    def __init__(
        self,
        pattern: str,
        start: Literal["end", "beginning"],
        saved: Callable[[str], Position | None],
        max_chunk: int = 1 << 20,
        poll_interval: float = 1.0,
        *,
        inotify: bool = True,  # False: stat polling only (what happens anyway where inotify fails)
    ) -> None:
        self.pattern = pattern
        self.start = start
        self.saved = saved
        self.max_chunk = max(1, max_chunk)
        self.poll_interval = max(0.01, poll_interval)
        self.use_inotify = inotify and pyinotify is not None
        self._abs = os.path.abspath(pattern)
        self._glob = bool(_MAGIC.search(pattern))
        self._base_glob = os.path.basename(self._abs)
        self._tracks: dict[str, _Track] = {}
        self._dirty: set[_Track] = set()
        self._rescan = False
        self._wake = asyncio.Event()
        # set once every file present at start has its starting position (the end, for start="end"):
        # the daemon says READY only then, so no line written after READY is skipped
        self.started = asyncio.Event()
        self._out: asyncio.Queue[Chunk] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._wm: Any = None
        self._notifier: Any = None
        self._wd_dir: dict[int, str] = {}
        self._watch_failed: set[str] = set()

    # -- the loop
    async def run(self, out: asyncio.Queue[Chunk]) -> None:
        """Follow until cancelled."""
        loop = asyncio.get_running_loop()
        self._out = out
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="relayguard-tail")
        try:
            self._start_inotify(loop)
            self._watch_dirs()
            self._dirty.update(self._scan(initial=True))
            next_poll = loop.time() + self.poll_interval
            next_safety = loop.time() + self.poll_interval * SAFETY_POLLS
            while True:
                now = loop.time()
                if now >= next_poll:
                    self._poll()
                    next_poll = now + self.poll_interval
                if now >= next_safety:
                    self._dirty.update(self._tracks.values())
                    self._rescan = True
                    next_safety = now + self.poll_interval * SAFETY_POLLS
                if self._rescan:
                    self._rescan = False
                    self._watch_dirs()
                    self._dirty.update(self._scan(initial=False))
                await self._round()
                self.started.set()
                if self._dirty:
                    await asyncio.sleep(0)  # let events, other sources and the consumer in
                    continue
                self._wake.clear()
                until = next_poll if self._needs_poll() else next_safety
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, until - loop.time())):
                        await self._wake.wait()
        finally:
            self._stop_inotify(loop)
            self._executor.shutdown(wait=True)  # no read in flight when the fds close
            for t in self._tracks.values():
                for g in ([t.cur] if t.cur else []) + t.next:
                    os.close(g.fd)
            self._tracks.clear()
            self._dirty.clear()

    async def _round(self) -> None:
        """Give every dirty file one read of at most max_chunk, so one big backlog cannot starve the rest."""
        dirty, self._dirty = self._dirty, set()
        for t in sorted(dirty, key=lambda t: t.path):
            if t.path not in self._tracks:
                continue
            try:
                more = await self._sync(t)
            except OSError as e:  # EIO and the like: say so, look again at the next poll
                log.warning("source_read_failed", path=t.path, error=str(e))
                more = False
            if more:
                self._dirty.add(t)

    def _needs_poll(self) -> bool:
        if self._wm is None or self._watch_failed or (self._glob and _MAGIC.search(os.path.dirname(self._abs))):
            return True
        return any(t.seen != "ok" or t.dir not in self._wd_dir.values() for t in self._tracks.values())

    def _poll(self) -> None:
        if not self._needs_poll():
            return
        if self._wm is None:
            self._dirty.update(self._tracks.values())
        else:
            watched = set(self._wd_dir.values())
            self._dirty.update(t for t in self._tracks.values() if t.seen != "ok" or t.dir not in watched)
        self._rescan = True

    # -- matching files
    def _scan(self, initial: bool) -> list[_Track]:
        paths = [self.pattern]
        if self._glob:
            paths = sorted(p for p in glob.glob(self.pattern) if not os.path.isdir(p))
            # forget matches gone for good (no file, nothing open): over months they may be many
            for p in {p for p, t in self._tracks.items() if t.cur is None and t.seen == "missing"} - set(paths):
                del self._tracks[p]
        new = []
        for p in paths:
            if p not in self._tracks:
                ab = os.path.abspath(p)
                t = _Track(p, ab, os.path.dirname(ab), os.path.basename(ab))
                self._plan(t, initial)
                self._tracks[p] = t
                new.append(t)
        return new

    def _plan(self, t: _Track, initial: bool) -> None:
        """Decide where the first generation starts: saved position, rotated sibling, end, or 0."""
        pos = self.saved(t.path)
        try:
            st: os.stat_result | None = os.stat(t.abspath)
        except OSError:
            st = None
        if pos is None:
            t.plan = "end" if initial and st is not None and self.start == "end" else "zero"
            return
        if st is not None and st.st_ino == pos.inode:
            t.plan = pos
            return
        g = self._rotated_sibling(t, pos)
        if g is not None:
            t.cur, t.detached = g, True
            log.info("source_resumed", path=t.path, inode=g.ino, offset=g.pos, lineno=g.lineno, rotated=True)
        else:
            log.warning("source_resume_lost", path=t.path, inode=pos.inode, offset=pos.offset)

    def _rotated_sibling(self, t: _Track, pos: Position) -> _Gen | None:
        """The file the saved position points into, renamed next to the path meanwhile, opened there."""
        for entry in _siblings(t.dir):
            try:
                # stat, not DirEntry.inode(): on overlayfs d_ino can differ from st_ino
                if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_ino == pos.inode:
                    g = _open(entry.path)
                    if g.ino == pos.inode and _place(g, pos):
                        return g
                    os.close(g.fd)
            except OSError:
                continue
        return None

    def _copy_of(self, t: _Track, g: _Gen) -> _Gen | None:
        """After copytruncate: the newest sibling named like the file that starts as g did and reaches g.pos."""
        if not g.head:
            return None
        best: tuple[float, str] | None = None
        for entry in _siblings(t.dir):
            if entry.name == t.base or not entry.name.startswith(t.base):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_size >= g.pos and not g.same(st):
                    with open(entry.path, "rb") as f:
                        if f.read(len(g.head)) == g.head and (best is None or st.st_mtime > best[0]):
                            best = (st.st_mtime, entry.path)
            except OSError:
                continue
        if best is None:
            return None
        try:
            copy = _open(best[1])
        except OSError:
            return None
        copy.take_state(g)
        copy.final = True
        return copy

    # -- inotify
    def _start_inotify(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.use_inotify:
            return
        try:
            wm = pyinotify.WatchManager()
        except (OSError, pyinotify.InotifyBindingNotFoundError) as e:
            log.warning("source_inotify_unavailable", pattern=self.pattern, error=str(e), poll=self.poll_interval)
            return
        self._wm = wm
        self._notifier = pyinotify.Notifier(wm, self._on_event)
        loop.add_reader(wm.get_fd(), self._on_readable)

    def _stop_inotify(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._wm is not None:
            loop.remove_reader(self._wm.get_fd())
            self._wm.close()
        self._wm = self._notifier = None
        self._wd_dir.clear()
        self._watch_failed.clear()

    def _watch_dirs(self) -> None:
        """Watch the parent directory of every file that may match; those that cannot be watched are polled."""
        if self._wm is None:
            return
        d = os.path.dirname(self._abs)
        dirs = {os.path.abspath(x) for x in glob.glob(d)} if self._glob and _MAGIC.search(d) else {d}
        watched = set(self._wd_dir.values())
        for d in sorted(dirs - watched):
            if not os.path.isdir(d):
                continue  # polled until it exists
            try:
                wd = self._wm.add_watch(d, _DIR_MASK, quiet=False)[d]
            except pyinotify.WatchManagerError as e:  # the watch limit, most likely
                if d not in self._watch_failed:
                    log.warning("source_watch_failed", dir=d, error=str(e), poll=self.poll_interval)
                self._watch_failed.add(d)
                continue
            self._watch_failed.discard(d)
            self._wd_dir[wd] = d
            self._dirty.update(t for t in self._tracks.values() if t.dir == d)  # may have changed unseen

    def _on_readable(self) -> None:
        try:
            self._notifier.read_events()
            self._notifier.process_events()
        except Exception as e:  # e.g. a file name that is not UTF-8: look at everything instead
            log.warning("source_inotify_error", error=repr(e))
            self._dirty.update(self._tracks.values())
            self._rescan = True
        self._wake.set()

    def _on_event(self, ev: Any) -> None:
        if ev.mask & pyinotify.IN_Q_OVERFLOW:
            self._dirty.update(self._tracks.values())
            self._rescan = True
            return
        d = self._wd_dir.get(ev.wd)
        if d is None:
            return
        if ev.mask & _IN_GONE:  # the directory went away: poll until it is back
            del self._wd_dir[ev.wd]
            if not ev.mask & pyinotify.IN_IGNORED:
                self._wm.rm_watch(ev.wd, quiet=True)
            self._dirty.update(t for t in self._tracks.values() if t.dir == d)
            return
        name = getattr(ev, "name", "")
        for t in self._tracks.values():
            if t.dir != d or not (name == t.base or t.detached):
                continue
            self._dirty.add(t)
            if name == t.base and ev.mask & _IN_NEW:
                self._capture(t)
        if self._glob and ev.mask & _IN_NEW and fnmatch.fnmatchcase(name, self._base_glob):
            self._rescan = True

    def _capture(self, t: _Track) -> None:
        """Open a new file at the path right away, so that a second quick rotation cannot hide it."""
        try:
            g = _open(t.abspath)
        except OSError:
            return  # _check() will say why
        if t.known(os.fstat(g.fd)):
            os.close(g.fd)
        else:
            t.next.append(g)

    # -- one file
    async def _sync(self, t: _Track) -> bool:
        """Look at the path, then read once or move to the next generation. True: call again soon."""
        await self._check(t)
        g = t.cur
        if g is None:
            return False
        st = os.fstat(g.fd)
        if st.st_size > g.pos:
            data = await self._read(g.fd, min(self.max_chunk, st.st_size - g.pos), g.pos)
            if not data:
                return False
            t.bytes += len(data)
            runs, skipped = g.feed(data)
            if skipped:
                t.skipped_long += skipped
                log.debug("source_long_line_skipped", path=t.path, count=skipped, limit=LONG_LINE)
            await self._emit(t, g, runs)
            return True
        if g.final or st.st_nlink == 0 or (t.detached and any(os.fstat(n.fd).st_size for n in t.next)):
            await self._retire(t)
            return t.cur is not None
        return False

    async def _check(self, t: _Track) -> None:
        """Compare the path with what is open: new file, truncation, missing, unreadable."""
        try:
            st = os.stat(t.abspath)
            if not stat.S_ISREG(st.st_mode):
                raise _NotRegular(f"not a regular file: {t.path}")
            if t.cur is not None and t.cur.same(st):
                self._truncated(t, t.cur, st.st_size)
            elif not t.known(st):
                t.next.append(_open(t.abspath))
            t.seen, t.error = "ok", ""
        except (FileNotFoundError, NotADirectoryError):
            t.seen, t.error = "missing", ""
        except OSError as e:  # permissions, not a regular file, a symlink loop, ...
            t.seen, t.error = "unreadable", e.strerror or str(e)
        if t.cur is None and t.next:
            await self._advance(t)
        t.detached = t.cur is not None and (t.seen != "ok" or not t.cur.same(st))
        self._set_state(t)

    def _truncated(self, t: _Track, g: _Gen, size: int) -> None:
        """A file shorter than what was read, or with another head, has new content: read it from 0."""
        if size >= g.pos and (not g.head or os.pread(g.fd, len(g.head), 0) == g.head):
            return
        copy = self._copy_of(t, g)
        log.info("source_truncated", path=t.path, inode=g.ino, offset=g.pos, size=size,
                 copy=copy is not None)
        if copy is None:
            g.reset()  # what was written after the last read and before the truncation is gone
            return
        t.cur = copy
        t.next.insert(0, _Gen(g.fd, g.dev, g.ino))

    async def _advance(self, t: _Track) -> None:
        """Start reading the oldest unread generation, placed by the plan the first time."""
        g = t.cur = t.next.pop(0)
        plan, t.plan = t.plan, "zero"
        if isinstance(plan, Position):
            if g.ino == plan.inode and _place(g, plan):
                log.info("source_resumed", path=t.path, inode=g.ino, offset=g.pos, lineno=g.lineno)
                return
            log.info("source_resume_reset", path=t.path, inode=g.ino, saved_inode=plan.inode)
        elif plan == "end":
            await self._seek_end(t, g)
        log.info("source_opened", path=t.path, inode=g.ino, offset=g.pos, lineno=g.lineno)

    async def _seek_end(self, t: _Track, g: _Gen) -> None:
        """Start after the last whole line (a partial last line is read once it ends), counting lines."""
        size = os.fstat(g.fd).st_size
        lo = max(0, size - LONG_LINE - 1)
        tail = os.pread(g.fd, size - lo, lo)
        cut = lo + tail.rfind(b"\n") + 1
        if cut == lo and lo > 0:  # the partial last line is already too long: skip it
            cut, g.skipping = size, True
            t.skipped_long += 1
        loop = asyncio.get_running_loop()
        g.lineno = await loop.run_in_executor(self._executor, _count_lines, g.fd, cut)
        g.pos, g.head = cut, os.pread(g.fd, min(HEAD_BYTES, cut), 0)

    async def _retire(self, t: _Track) -> None:
        """Finish a generation: emit its unterminated last line, close it, go on with the next."""
        g = t.cur
        assert g is not None
        run = g.flush()
        if run:
            await self._emit(t, g, [run])
        os.close(g.fd)
        t.cur = None
        log.info("source_rotated", path=t.path, inode=g.ino, lines=g.lineno, offset=g.pos)
        if t.next:
            await self._advance(t)
        self._set_state(t)

    async def _read(self, fd: int, n: int, pos: int) -> bytes:
        if n <= INLINE_READ:
            return os.pread(fd, n, pos)
        return await asyncio.get_running_loop().run_in_executor(self._executor, os.pread, fd, n, pos)

    async def _emit(self, t: _Track, g: _Gen, runs: list[tuple[bytes, int, int, int]]) -> None:
        assert self._out is not None
        for data, first, n, end in runs:
            t.lines += n
            await self._out.put(Chunk(t.path, data, first, end, g.ino, g.hash_at(end)))

    def _set_state(self, t: _Track) -> None:
        """following while anything is open (a renamed file is drained), else what the path shows."""
        new: State = "unreadable" if t.seen == "unreadable" else (
            "missing" if t.seen == "missing" and t.cur is None else "following")
        if new == t.state:
            return
        if new == "missing":
            log.warning("source_missing", path=t.path)
        elif new == "unreadable":
            log.warning("source_unreadable", path=t.path, error=t.error)
        elif t.state is not None:
            log.info("source_available", path=t.path, was=t.state)
        t.state = new

    # -- reporting
    def status(self) -> dict[str, Any]:
        """Totals and one entry per file: path, state, lines, bytes, lag_bytes, skipped_long, ..."""
        files = [_file_status(t) for t in sorted(self._tracks.values(), key=lambda t: t.path)]
        states = {f["state"] for f in files}
        state = next((s for s in ("following", "unreadable") if s in states), "missing")
        total = {k: sum(f[k] for f in files) for k in ("lines", "bytes", "lag_bytes", "skipped_long")}
        mode = "inotify" if self._wm is not None and not self._watch_failed else "poll"
        return {"pattern": self.pattern, "mode": mode, "state": state, **total, "files": files}


def _file_status(t: _Track) -> dict[str, Any]:
    lag = 0
    with contextlib.suppress(OSError):
        if t.cur is not None:
            lag = max(0, os.fstat(t.cur.fd).st_size - t.cur.pos)
        lag += sum(os.fstat(g.fd).st_size for g in t.next)
    return {
        "path": t.path,
        "state": t.state or "missing",
        "lines": t.lines,
        "bytes": t.bytes,
        "lag_bytes": lag,
        "skipped_long": t.skipped_long,
        "inode": t.cur.ino if t.cur else None,
        "offset": t.cur.pos if t.cur else None,
        "buffered": len(t.cur.pending) if t.cur else 0,
        "error": t.error,
    }


def _open(path: str) -> _Gen:
    # O_NONBLOCK: opening a FIFO put where a log was expected must not hang the loop
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _NotRegular(f"not a regular file: {path}")
    return _Gen(fd, st.st_dev, st.st_ino)


def _place(g: _Gen, pos: Position) -> bool:
    """Put g at a saved position if its content up to there is still what was read."""
    if os.fstat(g.fd).st_size < pos.offset:
        return False
    head = os.pread(g.fd, min(HEAD_BYTES, pos.offset), 0)
    if head_hash(head) != pos.head_hash:
        return False
    g.pos, g.lineno, g.head = pos.offset, pos.lineno, head
    return True


def _siblings(d: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(d) as it:
            return [e for _, e in zip(range(SIBLING_LIMIT), it, strict=False)]
    except OSError:
        return []


def _count_lines(fd: int, end: int) -> int:
    n = pos = 0
    while pos < end:
        block = os.pread(fd, min(1 << 20, end - pos), pos)
        if not block:
            break
        n += block.count(b"\n")
        pos += len(block)
    return n
