"""A small HTTP/1.1 client for the device pollers: asyncio streams and h11's parser.

One `HttpClient` per poller keeps one keep-alive connection and sends its requests one at a
time. It exists because aiohttp's client costs about 10 MB of RSS on import, a fifth of
the edge process's budget, for a job that is one GET a second to one device. Transport
failures come out as the DeviceErrors of nodes/_homewizard.py, the ones the pollers count
and log.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, unquote, urlsplit

import h11

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
# framing is ours (h11's) to decide: a caller's value could desynchronise the connection
FRAMING = frozenset({b"content-length", b"transfer-encoding"})


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]  # names lower-case, as h11 gives them
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


class _Unanswered(ConnectionDropped):
    """The connection ended before any byte of the answer: safe to retry an idempotent
    request on a fresh one if this one had been kept alive (the server may have closed it
    while idle)."""


@dataclass(slots=True, eq=False)
class _Conn:
    key: _Key
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    parser: h11.Connection
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
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DeviceError(f"not an http(s) URL with a host: {parts.scheme}://...")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise DeviceError("the URL's port is not a number from 0 to 65535") from None
        tls: ssl.SSLContext | None = None
        if parts.scheme == "https":
            tls = ssl_ctx or self._system_tls()
        key = _Key(parts.hostname, port, tls, server_hostname if tls else None)
        default_port = port == (443 if tls else 80)
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        target = quote(parts.path or "/", safe=TARGET_SAFE)
        if parts.query:
            target += "?" + quote(parts.query, safe=TARGET_SAFE)
        fields: dict[bytes, tuple[bytes, bytes]] = {}

        def put(name: str, value: str) -> None:
            fields[name.lower().encode()] = (name.encode(), value.encode())

        put("Host", host if default_port else f"{host}:{port}")
        put("User-Agent", USER_AGENT)
        put("Accept", "application/json, */*")
        put("Connection", "keep-alive")
        if parts.username is not None:
            # what aiohttp did with credentials in the URL: a generic URL may rely on it
            user = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            put("Authorization", "Basic " + base64.b64encode(user.encode()).decode())
        body = b""
        if json_body is not None:
            body = json.dumps(json_body).encode()
            put("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            if name.lower().encode() not in FRAMING:
                put(name, value)
        if body or method in ("POST", "PUT", "PATCH"):  # some servers want a length, even 0
            put("Content-Length", str(len(body)))
        try:
            head = h11.Request(method=method, target=target, headers=list(fields.values()))
        except h11.LocalProtocolError as exc:  # e.g. a newline in a header from the config
            raise DeviceError(f"cannot send the request: {exc}") from None
        try:
            async with asyncio.timeout(timeout_s), self._lock:
                return await self._send(key, method, head, body)
        except TimeoutError:
            raise DeviceTimeout(f"no answer within {timeout_s * 1000:.0f} ms") from None

    async def _send(self, key: _Key, method: str, head: h11.Request, body: bytes) -> Response:
        for retry in (False, True):
            conn = await self._connection(key)
            try:
                return await self._exchange(conn, head, body)
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
        self._conn = _Conn(key, reader, writer, h11.Connection(h11.CLIENT))
        return self._conn

    async def _exchange(self, conn: _Conn, head: h11.Request, body: bytes) -> Response:
        h = conn.parser
        try:
            out = h.send(head) or b""
            if body:
                out += h.send(h11.Data(data=body)) or b""
            out += h.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError as exc:
            raise DeviceError(f"cannot send the request: {exc}") from None
        try:
            conn.writer.write(out)
            await conn.writer.drain()
        except OSError as exc:
            raise _Unanswered(f"connection dropped: {exc.strerror or exc}") from None
        received = 0  # bytes of this answer so far
        status: int | None = None
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        size = 0
        eof = False
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                if eof and status is not None:
                    raise ConnectionDropped(f"connection dropped: {exc}") from None
                if eof and received == 0:
                    raise _Unanswered("connection dropped: closed without an answer") from None
                if eof:
                    raise ConnectionDropped(
                        f"connection dropped: closed after {received} bytes of the answer's head"
                    ) from None
                raise DeviceError(f"not an HTTP answer: {exc}") from None
            if event is h11.NEED_DATA:
                try:
                    data = await conn.reader.read(READ_SIZE)
                except ssl.SSLError as exc:
                    raise ConnectionDropped(f"connection dropped: TLS error: {exc}") from None
                except OSError as exc:
                    if received == 0:
                        raise _Unanswered(f"connection dropped: {exc.strerror or exc}") from None
                    raise ConnectionDropped(f"connection dropped: {exc.strerror or exc}") from None
                eof = not data
                received += len(data)
                h.receive_data(data)  # b"": the server closed its side
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, list(event.headers)
                length = next((v for k, v in headers if k == b"content-length"), None)
                if length is not None and int(length) > self.max_body:  # h11 checked digits
                    raise BadPayload(f"response larger than {self.max_body} bytes")
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.max_body:
                    raise BadPayload(f"response larger than {self.max_body} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):  # pragma: no cover: h11 raises
                raise ConnectionDropped("connection dropped before the answer ended")
            elif not isinstance(event, h11.InformationalResponse):  # 1xx: the answer follows
                # h11.PAUSED (protocol switched): next_event() would return it forever
                raise DeviceError(f"not an HTTP answer: {event!r}")
        assert status is not None  # h11 gives a Response before an EndOfMessage
        conn.used += 1
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()
        else:  # `Connection: close`, HTTP/1.0, or a body that ran until the close
            if self._conn is conn:
                self._conn = None
            conn.close_soon()
        return Response(status, headers, b"".join(chunks))
