"""The control socket, both ends: `serve()` inside the daemon, `request()` for the command line.

Protocol (docs/protocol.md): newline-delimited JSON over a Unix stream socket, one request and one
reply per line, in order, any number per connection:

    {"v": 1, "cmd": "ban", "args": {"addrs": ["192.0.2.7"], "seconds": 3600}}
    {"v": 1, "ok": true, "result": {...}}    or    {"v": 1, "ok": false, "error": "one line"}

Who may talk: the socket file is 0660 root:`socket_group`, and every connection's peer credentials
(SO_PEERCRED) are checked again, so a loosened file mode does not open it up: root, the daemon's own
user and members of the group (primary or listed in /etc/group) are served; anyone else gets a
refusal reply, and the attempt is logged as `control_refused`.

Hostile or broken input never stops the daemon: a line over MAX_REQUEST, bad JSON, an unknown
command or wrong argument types get an error reply; a handler's crash becomes "internal error: ..."
(logged with its traceback). Each connection is its own task; one that sends nothing for IDLE
seconds (a half line and a stall, say) is closed, and past MAX_CONNECTIONS new ones are refused.
Requests are never unpickled or evaluated: msgspec decodes them into typed Structs.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog

from relayguard.handlers import CommandError

log = structlog.get_logger("relayguard.control")

VERSION = 1
MAX_REQUEST = 16 << 20  # one line; a 100,000-address bulk ban is about 3 MiB
IDLE = float(os.environ.get("RELAYGUARD_CONTROL_IDLE", "10"))  # seconds without a byte before we hang up
MAX_CONNECTIONS = int(os.environ.get("RELAYGUARD_CONTROL_MAX_CONN", "256"))
READ_SIZE = 256 << 10
DISCARD_LIMIT = 4 * MAX_REQUEST  # an over-long line is skipped this far looking for its end
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Handler = tuple[type, Callable[[Any, Any], Awaitable[Any]]]


class ControlError(Exception):
    """A failed request or a failed connection; the message is one line for the admin."""


class NotRunning(ControlError):
    """No daemon behind the socket path (no file, or nothing accepting on it)."""


class Request(msgspec.Struct, forbid_unknown_fields=True):
    cmd: str
    v: int = VERSION
    args: dict[str, Any] = msgspec.field(default_factory=dict)


def _plain(obj: Any) -> Any:
    """Subclasses of plain types (config's Seconds, Cidr) and paths, as JSON would show them."""
    for base in (bool, int, float, str):
        if isinstance(obj, base):
            return base(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot send {type(obj).__name__} as JSON")


_decode = msgspec.json.Decoder(Request).decode
_encode = msgspec.json.Encoder(enc_hook=_plain).encode


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "error"


def reply_ok(result: Any) -> bytes:
    return _encode({"v": VERSION, "ok": True, "result": result}) + b"\n"


def reply_error(message: str) -> bytes:
    return _encode({"v": VERSION, "ok": False, "error": _one_line(message)}) + b"\n"


# ----------------------------------------------------------------------------- server


class Server:
    """A bound control socket; `serve_forever()` runs in the daemon's TaskGroup until cancelled."""

    def __init__(self, path: str, handlers: dict[str, Handler], gid: int, group: str, daemon: Any) -> None:
        self.path = path
        self._handlers = handlers
        self._gid = gid
        self._group = group
        self._daemon = daemon
        self._server: asyncio.base_events.Server | None = None
        self._inode: int | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self.refused = 0

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._connection, self.path, limit=READ_SIZE)
        os.chmod(self.path, 0o660)
        try:
            os.chown(self.path, 0 if os.geteuid() == 0 else -1, self._gid)
        except PermissionError:  # a daemon run unprivileged (tests, trials): its own user still may talk
            log.warning("control_group_not_set", path=self.path, group=self._group)
        self._inode = os.stat(self.path).st_ino
        log.info("control_listening", path=self.path, group=self._group, mode="0660")

    async def serve_forever(self) -> None:
        await asyncio.get_running_loop().create_future()  # accepting already; wait for cancellation

    async def close(self) -> None:
        """Stop accepting, end open connections, remove the socket file if it is still ours."""
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.wait(self._conns, timeout=5)
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    # -- one connection ----------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            await self._talk(reader, writer)
            await _hang_up(reader, writer)
        except (OSError, TimeoutError):
            pass  # the client went away or stopped reading; nothing more to say
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _talk(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._conns) > MAX_CONNECTIONS:
            self.refused += 1
            log.warning("control_busy", connections=len(self._conns) - 1, limit=MAX_CONNECTIONS)
            await _send(writer, reply_error(f"too many connections (limit {MAX_CONNECTIONS}); try again"))
            return
        pid, uid, gid = _peer(writer)
        if not await self._allowed(uid, gid):
            self.refused += 1
            log.warning("control_refused", uid=uid, gid=gid, pid=pid, group=self._group)
            await _send(writer, reply_error(
                f"permission denied: uid {uid} is neither root nor in group {self._group!r}"))
            return
        lines = _Lines(reader)
        while True:
            try:
                line = await lines.next()
            except TimeoutError:
                if lines.pending:
                    log.info("control_idle_timeout", pending_bytes=lines.pending, idle_s=IDLE, pid=pid)
                    await _send(writer, reply_error(f"incomplete request: no newline after {IDLE:g} s idle"))
                return
            if line is None:
                return
            if line is _TOO_LARGE:
                log.warning("control_request_too_large", limit=MAX_REQUEST, uid=uid, pid=pid)
                await _send(writer, reply_error(f"request too large (limit {MAX_REQUEST >> 20} MiB per line)"))
                if lines.broken:
                    return
                continue
            await _send(writer, await self.dispatch(line, uid, pid))

    async def dispatch(self, line: bytes, uid: int = 0, pid: int = 0) -> bytes:
        """One request line -> one reply line; never raises."""
        try:
            req = _decode(line)
        except msgspec.ValidationError as e:
            return reply_error(f"invalid request: {e}")
        except (msgspec.DecodeError, RecursionError) as e:  # RecursionError: JSON nested ~1000 deep
            return reply_error(f"malformed JSON: {e}" if line.strip() else "empty request")
        if req.v != VERSION:
            return reply_error(f"unsupported protocol version {req.v} (this daemon speaks {VERSION})")
        entry = self._handlers.get(req.cmd)
        if entry is None:
            return reply_error(f"unknown command {req.cmd[:64]!r} (known: {', '.join(sorted(self._handlers))})")
        req_type, fn = entry
        try:
            args = msgspec.convert(req.args, req_type)
        except msgspec.ValidationError as e:
            return reply_error(f"invalid arguments for {req.cmd}: {e}")
        started = time.monotonic()
        try:
            result = await fn(self._daemon, args)
            out = reply_ok(result)
        except asyncio.CancelledError:
            raise
        except CommandError as e:
            return reply_error(str(e))
        except Exception as e:
            log.exception("control_command_failed", cmd=req.cmd, uid=uid, pid=pid)
            return reply_error(f"internal error: {type(e).__name__}: {e}")
        if req.cmd not in ("ping", "status", "list", "why"):
            log.info("control_command", cmd=req.cmd, uid=uid, pid=pid, ms=round((time.monotonic() - started) * 1000))
        return out

    async def _allowed(self, uid: int, gid: int) -> bool:
        if uid in (0, os.geteuid()) or gid == self._gid:
            return True
        return await asyncio.to_thread(_in_group, uid, self._gid)  # NSS may be slow (LDAP)


_TOO_LARGE = b"<too large>"  # sentinel (compared by identity)


class _Lines:
    """Request lines from one connection: at most MAX_REQUEST bytes each, IDLE seconds between reads.

    An over-long line is skipped up to its newline (DISCARD_LIMIT at most), so the lines after it
    are still served, one reply each; past that limit the connection is `broken`.
    """

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._buf = bytearray()
        self.broken = False

    @property
    def pending(self) -> int:
        return len(self._buf)

    async def _more(self) -> bool:
        """Reads once more; False at end of input; TimeoutError after IDLE seconds without a byte."""
        data = await asyncio.wait_for(self._reader.read(READ_SIZE), IDLE)
        self._buf += data
        return bool(data)

    async def next(self) -> bytes | None:
        """The next line without its newline, _TOO_LARGE, or None at the end."""
        scanned = 0
        while not self.broken:
            nl = self._buf.find(b"\n", scanned)
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                return _TOO_LARGE if nl > MAX_REQUEST else line
            scanned = len(self._buf)
            if scanned > MAX_REQUEST:
                await self._skip_line()
                return _TOO_LARGE
            if not await self._more():
                line = bytes(self._buf)  # end of input in mid-line: the last request
                self._buf.clear()
                return line or None
        return None

    async def _skip_line(self) -> None:
        skipped = len(self._buf)
        self._buf.clear()
        while skipped < DISCARD_LIMIT:
            if not await self._more():
                self.broken = True
                return
            nl = self._buf.find(b"\n")
            if nl >= 0:
                del self._buf[: nl + 1]
                return
            skipped += len(self._buf)
            self._buf.clear()
        self.broken = True


async def _hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """End our side, then read the client's leftovers until it closes (bounded). Closing a Unix
    socket with unread input resets it, and the client would lose the reply that says why."""
    if reader.at_eof():
        return
    writer.write_eof()
    left = DISCARD_LIMIT
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(IDLE):
            while left > 0 and (data := await reader.read(READ_SIZE)):
                left -= len(data)


def _peer(writer: asyncio.StreamWriter) -> tuple[int, int, int]:
    sock = writer.get_extra_info("socket")
    return _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))


def _in_group(uid: int, gid: int) -> bool:
    """Whether user `uid` has `gid` as primary group or is listed as a member of it."""
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    if user.pw_gid == gid:
        return True
    try:
        return user.pw_name in grp.getgrgid(gid).gr_mem
    except KeyError:
        return False


async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await asyncio.wait_for(writer.drain(), IDLE * 6)  # a client that never reads its reply is dropped


def _group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise ControlError(f"daemon.socket_group: no such group {group!r}; fix: create it or use \"root\"") from None


def _clear_stale(path: str) -> None:
    """Remove a socket file nothing answers on (a crashed daemon's); refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path}: exists and is not a socket; fix: remove it or set daemon.socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
            log.info("control_stale_socket_removed", path=path)
            return
        except OSError as e:
            raise ControlError(f"{path}: cannot check the existing socket: {e.strerror}") from None
    raise ControlError(f"{path}: another relayguard is answering there; stop it first")


async def serve(path: str, handlers: dict[str, Handler], group: str, daemon: Any) -> Server:
    """Bind the control socket at `path` (creating its directory 0755) and start answering."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o755, exist_ok=True)
        os.chmod(parent, 0o755)
    _clear_stale(path)
    server = Server(path, handlers, _group_id(group), group, daemon)
    await server.start()
    return server


# ----------------------------------------------------------------------------- client


def request(path: str, cmd: str, timeout: float = 30.0, **args: Any) -> Any:
    """Send one request and return its result; raises ControlError (NotRunning: no daemon)."""
    line = _encode({"v": VERSION, "cmd": cmd, "args": args}) + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except FileNotFoundError:
            raise NotRunning(f"relayguard is not running: no socket at {path}") from None
        except ConnectionRefusedError:
            raise NotRunning(f"relayguard is not running: nothing accepts connections on {path}") from None
        except PermissionError:
            raise ControlError(f"cannot connect to {path}: permission denied "
                               "(run as root or as a member of daemon.socket_group)") from None
        except OSError as e:
            raise ControlError(f"cannot connect to {path}: {e.strerror or e}") from None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(line)  # a refused peer may have hung up already: its reply says why
        reply = _read_reply(s, path, timeout)
    try:
        msg = msgspec.json.decode(reply)
    except msgspec.DecodeError:
        raise ControlError(f"garbled reply from {path}") from None
    if not isinstance(msg, dict) or "ok" not in msg:
        raise ControlError(f"unexpected reply from {path}")
    if not msg["ok"]:
        raise ControlError(str(msg.get("error") or "request failed"))
    return msg.get("result")


def _read_reply(s: socket.socket, path: str, timeout: float) -> bytes:
    chunks: list[bytes] = []
    while True:
        try:
            data = s.recv(1 << 20)
        except TimeoutError:
            raise ControlError(f"no reply from relayguard on {path} within {timeout:g} s") from None
        except ConnectionResetError:
            data = b""
        if not data:
            raise ControlError(f"relayguard closed the connection on {path} without a reply")
        nl = data.find(b"\n")
        if nl >= 0:
            chunks.append(data[:nl])
            return b"".join(chunks)
        chunks.append(data)
