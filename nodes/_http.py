"""A small HTTP/1.1 client for the device pollers: asyncio streams and httptools' parser.

One `HttpClient` per poller keeps one keep-alive connection and sends its requests one at a
time. It exists because aiohttp's client costs about 10 MB of RSS on import, a fifth of
the edge process's budget, for a job that is one GET a second to one device. Transport
failures come out as the DeviceErrors of nodes/_homewizard.py, the ones the pollers count
and log.

The request is written here and kept, bytes and all, for the next identical one (a poller
sends the same GET every second); the answer is parsed by httptools, the binding of llhttp
(C, the parser of Node.js and uvicorn). h11 (pure Python) and building the request anew
were about half of a P1 poll's CPU on the 2-core x86 benchmark machine (300-700 µs a poll
once a second). Against a local server answering 1.5 kB of JSON, back to back: ~150 µs of
CPU a request for that part with h11, ~5 µs now; a whole request went from ~300-440 µs to
~140-210 µs, the rest being asyncio and the socket calls.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import ssl
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NoReturn, Self
from urllib.parse import quote, unquote, urlsplit

import httptools

from nodes._homewizard import (
    MAX_BODY,
    BadPayload,
    ConnectionDropped,
    DeviceError,
    DeviceTimeout,
    DeviceUnreachable,
    TlsRejected,
)

READ_SIZE = 1 << 16
# TLS close_notify waits for the peer; a dead device must not hold up a node's stop
CLOSE_WAIT_S = 1.0
# RFC 9112 §9.3.1: only these may be sent again when a kept-alive connection turns out to
# have been closed by the server before it answered
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# characters left as they are in a request target: those with a meaning in a URL, and `%`
# so that a URL that is already encoded is not encoded twice
TARGET_SAFE = "/%:@!$&'()*+,;=-._~?"
USER_AGENT = "flowrun"
# framing is ours to decide: a caller's value could desynchronise the connection
FRAMING = frozenset({"content-length", "transfer-encoding"})
# what h11 refused to send (h11/_abnf.py), so that a header from the config cannot smuggle
# in another header or request: a name or method is an RFC 9110 token; a value has no NUL,
# CR, LF, VT or FF, and spaces or tabs only between other characters
TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
FIELD_VALUE = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")
# llhttp sets no limit on an answer's head, h11 did (16 KiB); a device's is ~200 bytes
MAX_HEAD = 16 * 1024
# requests already written, per client: a poller sends one or two, pairing a few more
PREPARED_MAX = 32


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]  # names lower-case, values without white space around
    body: bytes


@dataclass(frozen=True, slots=True)
class _Key:
    """What a connection was opened (and, with TLS, verified) for. A request with another
    key never reuses it: a connection checked without a certificate name must not carry a
    request that demands one."""

    host: str
    port: int
    tls: ssl.SSLContext | None
    server_hostname: str | None


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A request as it goes on the wire, with where it goes."""

    host: str
    port: int
    https: bool
    data: bytes  # head and body
    keep_alive: bool  # False when the caller's headers ask for `Connection: close`


# method, URL, caller's headers, JSON body: all that a _Prepared is built from
_RequestKey = tuple[str, str, tuple[tuple[str, str], ...], bytes | None]


class _Unanswered(ConnectionDropped):
    """The connection ended before any byte of the answer: safe to retry an idempotent
    request on a fresh one if this one had been kept alive (the server may have closed it
    while idle)."""


@dataclass(slots=True, eq=False)
class _Conn:
    key: _Key
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    used: int = 0  # completed exchanges

    def abort(self) -> None:
        # after an error the stream is in an unknown state: no TLS goodbye, just go
        self.writer.transport.abort()

    def close_soon(self) -> None:
        # the loop finishes a TLS goodbye in the background: a request must not wait for it
        self.writer.close()

    async def close(self) -> None:
        self.writer.close()
        try:
            async with asyncio.timeout(CLOSE_WAIT_S):
                await self.writer.wait_closed()
        except (TimeoutError, OSError):
            self.abort()


class _Answer:
    """llhttp's callbacks for one exchange, and what they gathered. llhttp parses all that
    a read brings: interim 1xx answers before the answer (left out, as h11 did), and
    whatever follows it (noted in `extra`: the connection is then not reused)."""

    __slots__ = (
        "chunks",
        "done",
        "error",
        "extra",
        "head_done",
        "head_only",
        "headers",
        "interim",
        "keep_alive",
        "length",
        "line",
        "max_body",
        "parser",
        "size",
        "status",
        "transfer_encoding",
    )

    def __init__(self, max_body: int, *, head_only: bool) -> None:
        self.parser: httptools.HttpResponseParser | None = None
        self.max_body = max_body
        self.head_only = head_only  # the answer to a HEAD: no body, whatever it announces
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.length: bytes | None = None  # Content-Length
        self.transfer_encoding: bytes | None = None
        self.line = False  # the status line was read
        self.interim = False
        self.head_done = False  # of the answer, not of an interim one
        self.done = False
        self.keep_alive = False
        self.extra = False
        self.error: DeviceError | None = None  # raised in a callback, which llhttp wraps

    def closed(self, received: int) -> None:
        """The server closed the connection after `received` bytes of the answer."""
        if received == 0:
            raise _Unanswered("connection dropped: closed without an answer")
        if not self.head_done:
            raise ConnectionDropped(
                f"connection dropped: closed after {received} bytes of the answer's head"
            )
        if self.length is not None:
            raise ConnectionDropped(
                "connection dropped: closed before the end of the body: "
                f"received {self.size} bytes; expected {int(self.length)}"
            )
        if self.transfer_encoding is not None:
            raise ConnectionDropped(
                "connection dropped: closed before the end of the body: "
                f"received {self.size} bytes of a chunked body"
            )
        # neither length nor chunks: the body runs until the close (RFC 9112 §6.3), which
        # llhttp cannot be told (httptools has no llhttp_finish)
        self.done = True

    def on_message_begin(self) -> None:
        if self.done:
            self.extra = True

    def on_status(self, reason: bytes) -> None:
        self.line = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            return  # a chunked body's trailer (h11 left it out too) or the next answer's
        self.line = True  # also when the status line has no reason phrase
        name = name.lower()
        value = value.rstrip(b" \t")  # llhttp keeps white space at the end; h11 did not
        if name == b"content-length":
            self.length = value
        elif name == b"transfer-encoding":
            te = self.transfer_encoding
            self.transfer_encoding = value if te is None else te + b", " + value
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.done:
            return
        assert self.parser is not None
        status = self.parser.get_status_code()
        if status == 101:  # the rest is not HTTP, and not what a poller can read
            self._fail(DeviceError("not an HTTP answer: the server switched protocols"))
        if status < 100:
            self._fail(DeviceError(f"not an HTTP answer: status {status}"))
        if status < 200:
            self.interim = True  # 100 Continue, 103 Early Hints...: the answer follows
            return
        te = self.transfer_encoding
        if te is not None and te.lower() != b"chunked":
            # llhttp would pass on a body still compressed (gzip), or one that runs until
            # the close when chunked is not last: h11 refused both
            self._fail(DeviceError(f"not an HTTP answer: Transfer-Encoding {te!r}"))
        if self.length is not None and int(self.length) > self.max_body:  # llhttp: digits
            self._fail(BadPayload(f"response larger than {self.max_body} bytes"))
        self.status = status
        self.head_done = True
        if self.head_only:
            self._complete()

    def on_body(self, body: bytes) -> None:
        if self.done:  # the body a HEAD's answer announced, or the next answer's
            self.extra = True
            return
        self.size += len(body)
        if self.size > self.max_body:
            self._fail(BadPayload(f"response larger than {self.max_body} bytes"))
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self.done:
            return
        if not self.interim:
            self._complete()
            return
        self.headers = []
        self.chunks = []
        self.size = 0
        self.length = self.transfer_encoding = None
        self.line = self.interim = False

    def _complete(self) -> None:
        assert self.parser is not None
        self.done = True
        # now: llhttp forgets the answer's Connection header and framing once it is complete
        self.keep_alive = self.parser.should_keep_alive()

    def _fail(self, error: DeviceError) -> NoReturn:
        self.error = error
        raise error


class HttpClient:
    """HTTP/1.1 over one kept-alive connection, to whichever (host, port, TLS) the last
    request went to; it is opened again after the server closes it, after any error, and
    when a request goes elsewhere or with other TLS settings. Requests wait for each other.

    `close()` closes the connection; a later request would open a new one.
    """

    def __init__(self, *, max_body: int = MAX_BODY) -> None:
        self.max_body = max_body
        self.connections_opened = 0
        self._conn: _Conn | None = None
        self._lock = asyncio.Lock()
        self._default_tls: ssl.SSLContext | None = None
        self._prepared: dict[_RequestKey, _Prepared] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def request(
        self,
        method: str,
        url: str,
        *,
        timeout_s: float,
        headers: dict[str, str] | None = None,
        json_body: Any = None,
        ssl_ctx: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> Response:
        """One request, answered in full within `timeout_s` (connecting and waiting for
        an earlier request included), or DeviceTimeout. `ssl_ctx` and `server_hostname` as
        for asyncio.open_connection: the certificate is checked against `server_hostname`
        (default: the URL's host), so a device named otherwise than its address works."""
        body = None if json_body is None else json.dumps(json_body).encode()
        # by value, not identity: a caller may build its headers anew for each request
        cache_key = (method, url, tuple(headers.items()) if headers else (), body)
        prep = self._prepared.get(cache_key)
        if prep is None:
            prep = _prepare(method, url, headers, body)
            if len(self._prepared) >= PREPARED_MAX:
                self._prepared.clear()
            self._prepared[cache_key] = prep
        tls = (ssl_ctx or self._system_tls()) if prep.https else None
        key = _Key(prep.host, prep.port, tls, server_hostname if tls else None)
        try:
            async with asyncio.timeout(timeout_s), self._lock:
                return await self._send(key, method, prep)
        except TimeoutError:
            raise DeviceTimeout(f"no answer within {timeout_s * 1000:.0f} ms") from None

    async def _send(self, key: _Key, method: str, prep: _Prepared) -> Response:
        for retry in (False, True):
            conn = await self._connection(key)
            try:
                return await self._exchange(conn, method, prep)
            except _Unanswered as exc:
                self._discard(conn)
                if retry or not conn.used or method not in IDEMPOTENT:
                    raise ConnectionDropped(str(exc)) from None
            except BaseException:
                self._discard(conn)  # timeouts and cancellation too
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _system_tls(self) -> ssl.SSLContext:
        # a generic https URL is checked against the system's CAs, as a browser would
        if self._default_tls is None:
            self._default_tls = ssl.create_default_context()
        return self._default_tls

    def _discard(self, conn: _Conn) -> None:
        conn.abort()
        if self._conn is conn:
            self._conn = None

    async def _connection(self, key: _Key) -> _Conn:
        conn = self._conn
        if conn is not None:
            # at_eof: the server closed it while it was idle (the usual keep-alive timeout)
            if conn.key == key and not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn
            self._conn = None
            conn.close_soon()
        try:
            reader, writer = await asyncio.open_connection(
                key.host,
                key.port,
                ssl=key.tls,
                server_hostname=(key.server_hostname or key.host) if key.tls else None,
            )
        except ssl.SSLCertVerificationError as exc:
            reason = str(exc.verify_message or exc).rstrip(".")
            raise TlsRejected(f"TLS certificate rejected: {reason}") from None
        except ssl.SSLError as exc:
            raise TlsRejected(f"TLS handshake failed: {exc}") from None
        except OSError as exc:
            raise DeviceUnreachable(f"cannot connect: {exc.strerror or exc}") from None
        self.connections_opened += 1
        self._conn = _Conn(key, reader, writer)
        return self._conn

    async def _exchange(self, conn: _Conn, method: str, prep: _Prepared) -> Response:
        try:
            conn.writer.write(prep.data)
            await conn.writer.drain()
        except OSError as exc:
            raise _Unanswered(f"connection dropped: {exc.strerror or exc}") from None
        answer = _Answer(self.max_body, head_only=method == "HEAD")
        # a parser per exchange, not per connection: after a HEAD answer llhttp would still
        # wait for the body it announced
        parser = answer.parser = httptools.HttpResponseParser(answer)
        received = 0  # bytes of this answer so far
        try:
            while not answer.done:
                try:
                    data = await conn.reader.read(READ_SIZE)
                except ssl.SSLError as exc:
                    raise ConnectionDropped(f"connection dropped: TLS error: {exc}") from None
                except OSError as exc:
                    if received == 0:
                        raise _Unanswered(f"connection dropped: {exc.strerror or exc}") from None
                    raise ConnectionDropped(f"connection dropped: {exc.strerror or exc}") from None
                if not data:  # the server closed its side
                    answer.closed(received)
                    break
                received += len(data)
                try:
                    parser.feed_data(data)
                except httptools.HttpParserCallbackError:
                    if answer.error is None:  # pragma: no cover: a bug in a callback
                        raise
                    raise answer.error from None
                # an upgrade only after the answer: a 101 fails in on_headers_complete
                except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
                    if not answer.done:
                        where = "" if answer.line else "illegal status line: "
                        raise DeviceError(f"not an HTTP answer: {where}{exc}") from None
                    answer.extra = True  # garbage after the answer
                if not answer.head_done and received > MAX_HEAD:
                    raise DeviceError(f"not an HTTP answer: no end of the head in {received} bytes")
        finally:
            answer.parser = None  # it holds the answer's methods: no cycle left for the GC
        conn.used += 1
        if answer.extra or not answer.keep_alive or not prep.keep_alive:
            # `Connection: close`, HTTP/1.0, a body that ran until the close, or bytes after
            # the answer that no request asked for: whatever comes next is not ours
            if self._conn is conn:
                self._conn = None
            conn.close_soon()
        return Response(answer.status, answer.headers, b"".join(answer.chunks))


def _prepare(
    method: str, url: str, headers: dict[str, str] | None, body: bytes | None
) -> _Prepared:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DeviceError(f"not an http(s) URL with a host: {parts.scheme}://...")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise DeviceError("the URL's port is not a number from 0 to 65535") from None
    https = parts.scheme == "https"
    default_port = port == (443 if https else 80)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    target = quote(parts.path or "/", safe=TARGET_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=TARGET_SAFE)
    fields: dict[str, tuple[str, str]] = {}

    def put(name: str, value: str) -> None:
        fields[name.lower()] = (name, value)

    put("Host", host if default_port else f"{host}:{port}")
    put("User-Agent", USER_AGENT)
    put("Accept", "application/json, */*")
    put("Connection", "keep-alive")
    if parts.username is not None:
        # what aiohttp did with credentials in the URL: a generic URL may rely on it
        user = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        put("Authorization", "Basic " + base64.b64encode(user.encode()).decode())
    if body is not None:
        put("Content-Type", "application/json")
    else:
        body = b""
    for name, value in (headers or {}).items():
        if name.lower() not in FRAMING:
            put(name, value)
    if body or method in ("POST", "PUT", "PATCH"):  # some servers want a length, even 0
        put("Content-Length", str(len(body)))
    raw_method = method.encode()
    if not TOKEN.fullmatch(raw_method):
        raise DeviceError(f"cannot send the request: illegal method {method!r}")
    # Host comes first (RFC 9110 §7.2): put first, and a caller's Host keeps its place
    lines = [b"%s %s HTTP/1.1\r\n" % (raw_method, target.encode())]
    for name, value in fields.values():
        raw_name, raw_value = name.encode(), value.encode()
        if not TOKEN.fullmatch(raw_name):  # e.g. a newline in a header from the config
            raise DeviceError(f"cannot send the request: illegal header name {raw_name!r}")
        if not FIELD_VALUE.fullmatch(raw_value):
            # not shown: the value may be a secret from the config, and this gets logged
            raise DeviceError(f"cannot send the request: illegal value in header {name}")
        lines.append(b"%s: %s\r\n" % (raw_name, raw_value))
    lines.append(b"\r\n")
    lines.append(body)
    connection = fields["connection"][1].lower().split(",")
    keep_alive = "close" not in (token.strip(" \t") for token in connection)
    return _Prepared(parts.hostname, port, https, b"".join(lines), keep_alive)
