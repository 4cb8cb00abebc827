"""nodes/_http.py against small real servers on 127.0.0.1: keep-alive, reconnects, body
framing and limits, timeouts, broken servers and TLS, each failure as its DeviceError."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import nodes._http as http_module
from nodes._homewizard import (
    BadPayload,
    ConnectionDropped,
    DeviceError,
    DeviceTimeout,
    DeviceUnreachable,
    HttpError,
    TlsRejected,
    cert_name,
    http_error,
    request_json,
    tls_context,
)
from nodes._http import HttpClient
from tests.net import free_port

Request = tuple[str, dict[str, str], bytes]  # request line, headers (lower-case), body


class Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.requests: list[Request] = []
        self.closed_by_client = asyncio.Event()
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # a handler that sleeps is cancelled when the test ends
        self.accepted += 1
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # by stop_handlers(); a cancelled handler task is logged as an error by 3.11
        finally:
            writer.close()

    async def read(self, reader: asyncio.StreamReader) -> Request | None:
        """The next request on the connection, or None when the client closed it."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                self.closed_by_client.set()
            return None
        line, *rest = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in rest if h)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append((line, headers, body))
        return line, headers, body

    async def stop_handlers(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks)


Handler = Callable[[Server, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serve(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    srv = Server(handler)
    server = await asyncio.start_server(srv.connected, "127.0.0.1", 0, ssl=tls)
    srv.port = server.sockets[0].getsockname()[1]
    try:
        yield srv
    finally:
        server.close()
        await srv.stop_handlers()
        await server.wait_closed()


def answer(body: bytes = b'{"ok": true}', *, status: str = "200 OK", extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def replies(raw: bytes) -> Handler:
    """A server that answers each request on a connection with `raw`."""

    async def handler(srv: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await srv.read(r) is not None:
            w.write(raw)
            await w.drain()

    return handler


def replies_once(raw: bytes) -> Handler:
    """A server that answers the first request with `raw`, then closes the connection."""

    async def handler(srv: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await srv.read(r)
        w.write(raw)
        await w.drain()

    return handler


keep_alive = replies(answer())


async def test_keep_alive_reuses_one_connection_and_sends_the_usual_headers() -> None:
    async with serve(keep_alive) as srv, HttpClient() as client:
        for _ in range(3):
            resp = await client.request("GET", srv.url + "/api/v1/data?x=1", timeout_s=2)
            assert (resp.status, json.loads(resp.body)) == (200, {"ok": True})
        assert srv.accepted == client.connections_opened == 1
    line, headers, body = srv.requests[0]
    assert line == "GET /api/v1/data?x=1 HTTP/1.1"
    assert headers["host"] == f"127.0.0.1:{srv.port}"
    assert headers["connection"] == "keep-alive"
    assert body == b""


async def test_post_with_headers_and_a_json_body() -> None:
    async with serve(keep_alive) as srv, HttpClient() as client:
        resp = await client.request(
            "POST",
            srv.url + "/api/user",
            timeout_s=2,
            headers={"X-Key": "secret", "Content-Length": "999"},  # framing stays ours
            json_body={"name": "local/flowrun"},
        )
        empty = await client.request("POST", srv.url + "/q", timeout_s=2)
    assert resp.status == empty.status == 200
    (line, headers, body), (_, empty_headers, _) = srv.requests
    assert line == "POST /api/user HTTP/1.1"
    assert headers["x-key"] == "secret"
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"name": "local/flowrun"}
    assert empty_headers["content-length"] == "0"


async def test_a_server_that_closes_after_each_answer_is_reconnected() -> None:
    async def one_each(srv: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if await srv.read(r) is not None:
            w.write(answer(extra="Connection: close\r\n"))
            await w.drain()

    async with serve(one_each) as srv, HttpClient() as client:
        for _ in range(3):
            assert (await client.request("GET", srv.url + "/", timeout_s=2)).status == 200
    assert srv.accepted == 3


async def test_a_connection_closed_while_idle_is_opened_again() -> None:
    async def once(srv: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if await srv.read(r) is not None:  # a keep-alive answer, then a quiet close
            w.write(answer())
            await w.drain()

    async with serve(once) as srv, HttpClient() as client:
        assert (await client.request("GET", srv.url + "/", timeout_s=2)).status == 200
        await asyncio.sleep(0.05)
        assert (await client.request("GET", srv.url + "/", timeout_s=2)).status == 200
    assert srv.accepted == 2


@pytest.mark.parametrize(("method", "retried"), [("GET", True), ("POST", False)])
async def test_a_kept_connection_closed_before_answering_is_retried_only_if_idempotent(
    method: str, retried: bool
) -> None:
    async def close_the_second(
        srv: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        # the race of a server's keep-alive timeout: the request is sent just as it closes
        first = srv.accepted == 1
        while await srv.read(r) is not None:
            if first and len(srv.requests) == 2:
                return
            w.write(answer())
            await w.drain()

    async with serve(close_the_second) as srv, HttpClient() as client:
        assert (await client.request(method, srv.url + "/", timeout_s=2)).status == 200
        if retried:
            assert (await client.request(method, srv.url + "/", timeout_s=2)).status == 200
            assert (srv.accepted, len(srv.requests)) == (2, 3)
        else:
            with pytest.raises(ConnectionDropped, match="closed without an answer"):
                await client.request(method, srv.url + "/", timeout_s=2)
            assert (srv.accepted, len(srv.requests)) == (1, 2)  # sent once only


async def test_a_fresh_connection_closed_before_answering_is_not_retried() -> None:
    async def hang_up(srv: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await srv.read(r)

    async with serve(hang_up) as srv, HttpClient() as client:
        with pytest.raises(ConnectionDropped, match="connection dropped"):
            await client.request("GET", srv.url + "/", timeout_s=2)
    assert srv.accepted == 1


async def test_a_chunked_body_is_joined_and_the_connection_kept() -> None:
    async def chunked(srv: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await srv.read(r) is not None:
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for part in (b'{"active', b'_power_w": ', b"-123.5}"):
                w.write(b"%x\r\n%s\r\n" % (len(part), part))
                await w.drain()
                await asyncio.sleep(0.01)
            w.write(b"0\r\n\r\n")

    async with serve(chunked) as srv, HttpClient() as client:
        for _ in range(2):
            resp = await client.request("GET", srv.url + "/", timeout_s=2)
            assert json.loads(resp.body) == {"active_power_w": -123.5}
    assert srv.accepted == 1


async def test_a_content_length_body_in_pieces() -> None:
    body = json.dumps({"values": list(range(5000))}).encode()  # several reads' worth

    async def pieces(srv: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await srv.read(r)
        w.write(answer(body)[: -len(body)])
        for i in range(0, len(body), 7000):
            w.write(body[i : i + 7000])
            await w.drain()
            await asyncio.sleep(0.005)

    async with serve(pieces) as srv, HttpClient() as client:
        resp = await client.request("GET", srv.url + "/", timeout_s=2)
    assert resp.body == body
    assert (b"content-length", str(len(body)).encode()) in resp.headers


@pytest.mark.parametrize("framing", ["content-length", "chunked", "until-close"])
async def test_a_body_over_the_limit_is_refused_and_the_next_request_starts_afresh(
    framing: str,
) -> None:
    big = b"[" + b"1," * 600 + b"1]"

    async def too_big(srv: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await srv.read(r) is not None:
            if len(srv.requests) > 1:
                w.write(answer())
            elif framing == "content-length":
                w.write(answer(big))
            elif framing == "chunked":
                w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for i in range(0, len(big), 100):
                    w.write(b"%x\r\n%s\r\n" % (len(big[i : i + 100]), big[i : i + 100]))
                w.write(b"0\r\n\r\n")
            else:
                w.write(b"HTTP/1.0 200 OK\r\n\r\n" + big)
                await w.drain()
                return
            await w.drain()

    async with serve(too_big) as srv, HttpClient(max_body=1000) as client:
        with pytest.raises(BadPayload, match="response larger than 1000 bytes"):
            await client.request("GET", srv.url + "/", timeout_s=2)
        assert (await client.request("GET", srv.url + "/", timeout_s=2)).status == 200
    assert srv.accepted == 2  # the unread rest of the big body went with its connection


async def test_a_slow_server_times_out_within_the_timeout_and_the_next_request_works() -> None:
    async def slow_first(srv: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await srv.read(r) is not None:
            if srv.accepted == 1:
                await asyncio.sleep(5)
            w.write(answer())
            await w.drain()

    async with serve(slow_first) as srv, HttpClient() as client:
        started = time.monotonic()
        with pytest.raises(DeviceTimeout, match="no answer within 200 ms"):
            await client.request("GET", srv.url + "/", timeout_s=0.2)
        assert time.monotonic() - started < 0.5
        assert (await client.request("GET", srv.url + "/", timeout_s=2)).status == 200
    assert srv.accepted == 2


async def test_the_timeout_covers_the_whole_answer_not_each_read() -> None:
    async def trickle(srv: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await srv.read(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):
            w.write(b" ")
            await w.drain()
            await asyncio.sleep(0.02)

    async with serve(trickle) as srv, HttpClient() as client:
        started = time.monotonic()
        with pytest.raises(DeviceTimeout):
            await client.request("GET", srv.url + "/", timeout_s=0.3)
        assert time.monotonic() - started < 0.6


async def test_a_refused_port_is_unreachable() -> None:
    async with HttpClient() as client:
        with pytest.raises(DeviceUnreachable, match="cannot connect: "):
            await client.request("GET", f"http://127.0.0.1:{free_port()}/", timeout_s=2)


async def test_a_connection_dropped_mid_body() -> None:
    half = replies_once(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"active_power_w": ')

    async with serve(half) as srv, HttpClient() as client:
        with pytest.raises(ConnectionDropped, match=r"connection dropped: .*received 19 bytes"):
            await client.request("GET", srv.url + "/", timeout_s=2)


@pytest.mark.parametrize(
    ("reply", "close", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.2p1\r\n\r\n", False, "not an HTTP answer: illegal status line"),
        (b"\x00\xff\xfe garbage \x80", True, "not an HTTP answer"),
        (b"HTTP/1.1 200 OK\r\nContent-", True, "connection dropped: closed after 25 bytes"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000, False, "not an HTTP answer"),
        (b"HTTP/1.1 abc OK\r\n\r\n", False, "not an HTTP answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", False, "not an HTTP answer"),
    ],
)
async def test_garbage_instead_of_http_is_a_device_error(
    reply: bytes, close: bool, message: str
) -> None:
    async def garbage(srv: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await srv.read(r)
        w.write(reply)
        await w.drain()
        if not close:
            await asyncio.sleep(5)

    async with serve(garbage) as srv, HttpClient() as client:
        with pytest.raises(DeviceError, match=message) as caught:
            await client.request("GET", srv.url + "/", timeout_s=2)
    assert not isinstance(caught.value, DeviceTimeout)


async def test_an_interim_answer_is_skipped_and_a_protocol_switch_is_an_error() -> None:
    async def interim(srv: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await srv.read(r) is not None:
            if len(srv.requests) == 1:
                w.write(b"HTTP/1.1 100 Continue\r\n\r\n" + answer())
            else:  # agreeing to the Upgrade a caller's headers asked for
                w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")
            await w.drain()

    async with serve(interim) as srv, HttpClient() as client:
        assert (await client.request("GET", srv.url + "/", timeout_s=2)).body == b'{"ok": true}'
        upgrade = {"Upgrade": "x", "Connection": "upgrade"}
        with pytest.raises(DeviceError, match="not an HTTP answer") as caught:
            await client.request("GET", srv.url + "/", timeout_s=2, headers=upgrade)
    assert not isinstance(caught.value, DeviceTimeout)  # no spinning until the timeout


async def test_close_ends_the_connection_cleanly() -> None:
    async with serve(keep_alive) as srv:
        client = HttpClient()
        await client.request("GET", srv.url + "/", timeout_s=2)
        await client.close()
        await asyncio.wait_for(srv.closed_by_client.wait(), 2)
        await client.close()  # twice is fine


async def test_request_json_maps_statuses_and_payloads() -> None:
    replies = iter(
        [
            answer(b'{"error": "user:unauthorized"}', status="401 Unauthorized"),
            answer(b"500 Internal Server Error", status="500 Internal Server Error"),
            answer(b'{"active_power_w": 12'),
            answer(b"42"),
            answer(b'[{"v": 1}]'),
        ]
    )

    async def scripted(srv: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await srv.read(r) is not None:
            w.write(next(replies))
            await w.drain()

    async with serve(scripted) as srv, HttpClient() as client:
        reply = await request_json(client, "GET", srv.url + "/api", timeout_s=2)
        err = http_error(reply)
        assert (reply.status, err.code, str(err)) == (
            401,
            "user:unauthorized",
            "HTTP 401 user:unauthorized",
        )
        reply = await request_json(client, "GET", srv.url + "/api", timeout_s=2)
        assert (reply.status, reply.body) == (500, None)
        assert isinstance(http_error(reply), HttpError)
        with pytest.raises(BadPayload, match="invalid JSON"):
            await request_json(client, "GET", srv.url + "/api", timeout_s=2)
        with pytest.raises(BadPayload, match="expected a JSON object, got int"):
            await request_json(client, "GET", srv.url + "/api", timeout_s=2)
        reply = await request_json(client, "GET", srv.url + "/api", timeout_s=2)
        assert reply.body == [{"v": 1}]
    assert srv.accepted == 1  # none of that needed a new connection


# TLS --------------------------------------------------------------------------------------

SERIAL = "3c39e7aabbcc"


def authority(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def device_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, cn: str
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Named like a P1 meter's: in the CN, no SAN (so not valid for its IP address)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
def device_tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, str, str]:
    """(server context with a device certificate named like a P1 meter's, its CA, the CA of
    another authority)."""
    ca_key, ca = authority("Test Appliance Access CA")
    _, other_ca = authority("Another CA")
    key, cert = device_cert(ca_key, ca, cert_name(SERIAL))
    d = tmp_path_factory.mktemp("tls")
    (d / "p1.pem").write_text(pem(cert))
    (d / "p1.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(d / "p1.pem", d / "p1.key")
    return server, pem(ca), pem(other_ca)


async def test_tls_checks_the_certificate_name_not_the_address(
    device_tls: tuple[ssl.SSLContext, str, str],
) -> None:
    server, ca, _ = device_tls
    named = tls_context(ca, check_name=True)
    async with serve(keep_alive, tls=server) as srv, HttpClient() as client:
        url = f"https://127.0.0.1:{srv.port}/api/measurement"
        for _ in range(2):
            resp = await client.request(
                "GET", url, timeout_s=2, ssl_ctx=named, server_hostname=cert_name(SERIAL)
            )
            assert resp.status == 200
        assert srv.accepted == 1
        with pytest.raises(TlsRejected, match="TLS certificate rejected: Hostname mismatch"):
            await client.request(
                "GET", url, timeout_s=2, ssl_ctx=named, server_hostname=cert_name("000000000000")
            )
        with pytest.raises(
            TlsRejected, match="IP address mismatch, certificate is not valid for '127"
        ):
            await client.request("GET", url, timeout_s=2, ssl_ctx=named)  # the IP: no
    assert srv.requests[0][1]["host"] == f"127.0.0.1:{srv.port}"


async def test_tls_a_connection_checked_without_the_name_is_not_reused_for_one_with_it(
    device_tls: tuple[ssl.SSLContext, str, str],
) -> None:
    server, ca, _ = device_tls
    async with serve(keep_alive, tls=server) as srv, HttpClient() as client:
        url = f"https://127.0.0.1:{srv.port}/api"
        unnamed = tls_context(ca, check_name=False)
        await client.request("GET", url, timeout_s=2, ssl_ctx=unnamed)
        named = tls_context(ca, check_name=True)
        await client.request(
            "GET", url, timeout_s=2, ssl_ctx=named, server_hostname=cert_name(SERIAL)
        )
        await client.request(
            "GET", url, timeout_s=2, ssl_ctx=named, server_hostname=cert_name(SERIAL)
        )
    assert srv.accepted == 2


async def test_tls_a_certificate_from_another_ca_is_rejected(
    device_tls: tuple[ssl.SSLContext, str, str],
) -> None:
    server, _, other_ca = device_tls
    async with serve(keep_alive, tls=server) as srv, HttpClient() as client:
        for check_name in (True, False):
            with pytest.raises(
                TlsRejected,
                match="TLS certificate rejected: unable to get local issuer certificate",
            ):
                await client.request(
                    "GET",
                    f"https://127.0.0.1:{srv.port}/api",
                    timeout_s=2,
                    ssl_ctx=tls_context(other_ca, check_name=check_name),
                    server_hostname=cert_name(SERIAL) if check_name else None,
                )
    assert srv.requests == []  # nothing (no token) was sent


async def test_a_header_that_cannot_be_sent_is_a_device_error_not_a_crash() -> None:
    async with serve(keep_alive) as srv, HttpClient() as client:
        with pytest.raises(DeviceError, match="cannot send the request"):
            await client.request("GET", srv.url + "/", timeout_s=2, headers={"X": "a\r\nB: c"})
        assert (await client.request("GET", srv.url + "/", timeout_s=2)).status == 200
    assert len(srv.requests) == 1


# framing, keep-alive and request building in detail ------------------------------------


async def test_a_body_without_length_or_chunks_runs_until_the_close() -> None:
    body = json.dumps({"values": list(range(3000))}).encode()

    async def until_close(srv: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if await srv.read(r) is not None:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n")
            for i in range(0, len(body), 5000):
                w.write(body[i : i + 5000])
                await w.drain()
                await asyncio.sleep(0.005)

    async with serve(until_close) as srv, HttpClient() as client:
        for _ in range(2):
            resp = await client.request("GET", srv.url + "/", timeout_s=2)
            assert (resp.status, resp.body) == (200, body)
    assert srv.accepted == 2


async def test_a_chunked_body_cut_short_by_the_close_is_a_dropped_connection() -> None:
    half = replies_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n[1, 2\r\n")

    async with serve(half) as srv, HttpClient() as client:
        with pytest.raises(ConnectionDropped, match="received 5 bytes of a chunked body"):
            await client.request("GET", srv.url + "/", timeout_s=2)


@pytest.mark.parametrize(
    ("status_line", "extra", "reused"),
    [
        ("HTTP/1.1 200 OK", "", True),
        ("HTTP/1.1 200 OK", "Connection: close\r\n", False),
        ("HTTP/1.0 200 OK", "", False),
        ("HTTP/1.0 200 OK", "Connection: keep-alive\r\n", True),  # llhttp: 1.0 keep-alive
    ],
)
async def test_a_connection_is_reused_only_if_the_answer_keeps_it_alive(
    status_line: str, extra: str, reused: bool
) -> None:
    # the server keeps the connection open, whatever its answer says
    stays_open = replies(answer(extra=extra).replace(b"HTTP/1.1 200 OK", status_line.encode(), 1))

    async with serve(stays_open) as srv, HttpClient() as client:
        for _ in range(2):
            assert (await client.request("GET", srv.url + "/", timeout_s=2)).body == b'{"ok": true}'
    assert srv.accepted == (1 if reused else 2)


async def test_a_request_that_asks_for_close_does_not_reuse_the_connection() -> None:
    async with serve(keep_alive) as srv, HttpClient() as client:
        for _ in range(2):
            await client.request("GET", srv.url + "/", timeout_s=2, headers={"Connection": "close"})
    assert srv.accepted == 2
    assert srv.requests[0][1]["connection"] == "close"


async def test_the_answer_to_a_head_has_no_body_and_keeps_the_connection() -> None:
    head = replies(answer(b"x" * 1234)[:-1234])  # the length a GET would get, no body

    async with serve(head) as srv, HttpClient() as client:
        for _ in range(2):
            resp = await client.request("HEAD", srv.url + "/", timeout_s=2)
            assert (resp.status, resp.body) == (200, b"")
            assert (b"content-length", b"1234") in resp.headers
    assert srv.accepted == 1


async def test_an_answer_that_no_request_asked_for_is_not_taken_for_the_next() -> None:
    async def twice(srv: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await srv.read(r) is not None:
            n = len(srv.requests)
            w.write(answer(b'{"n": %d}' % n) + (answer(b'{"stale": 1}') if n == 1 else b""))
            await w.drain()

    async with serve(twice) as srv, HttpClient() as client:
        assert (await client.request("GET", srv.url + "/", timeout_s=2)).body == b'{"n": 1}'
        assert (await client.request("GET", srv.url + "/", timeout_s=2)).body == b'{"n": 2}'
    assert srv.accepted == 2


async def test_interim_answers_in_reads_of_their_own_leave_no_trace() -> None:
    async def hints(srv: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await srv.read(r) is not None:
            for interim in (b"103 Early Hints\r\nLink: </a.css>", b"100 Continue"):
                w.write(b"HTTP/1.1 " + interim + b"\r\n\r\n")
                await w.drain()
                await asyncio.sleep(0.01)
            w.write(answer())
            await w.drain()

    async with serve(hints) as srv, HttpClient() as client:
        for _ in range(2):
            resp = await client.request("GET", srv.url + "/", timeout_s=2)
            assert (resp.status, resp.body) == (200, b'{"ok": true}')
            assert resp.headers == [
                (b"content-type", b"application/json"),
                (b"content-length", b"12"),
            ]
    assert srv.accepted == 1


async def test_answer_headers_are_lower_case_trimmed_and_without_the_trailer() -> None:
    async def trailer(srv: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await srv.read(r) is not None:
            w.write(
                b"HTTP/1.1 200 OK\r\nX-Mixed-Case:  v w \t\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\n{}\r\n0\r\nX-Trailer: t\r\n\r\n"
            )
            await w.drain()

    async with serve(trailer) as srv, HttpClient() as client:
        resp = await client.request("GET", srv.url + "/", timeout_s=2)
        assert resp.headers == [(b"x-mixed-case", b"v w"), (b"transfer-encoding", b"chunked")]
        assert resp.body == b"{}"
        assert (await client.request("GET", srv.url + "/", timeout_s=2)).body == b"{}"
    assert srv.accepted == 1


async def test_a_transfer_coding_other_than_chunked_is_refused() -> None:
    gzipped = replies_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b\x08\x00")

    async with serve(gzipped) as srv, HttpClient() as client:
        with pytest.raises(DeviceError, match="not an HTTP answer: Transfer-Encoding b'gzip'"):
            await client.request("GET", srv.url + "/", timeout_s=2)


@pytest.mark.parametrize(
    ("method", "headers"),
    [
        ("GET", {"X-Key": "secret\r\nX-Admin: 1"}),
        ("GET", {"X-Key": "secret\nX-Admin: 1"}),
        ("GET", {"X-Key": "secret\rX-Admin: 1"}),
        ("GET", {"X-Key": "secret\x00"}),
        ("GET", {"X-Key": "secret "}),  # as h11: no white space at either end
        ("GET", {"X-Key\r\nX-Admin": "1"}),
        ("GET", {"X Key": "1"}),
        ("GET", {"X-Key:": "1"}),
        ("GET", {"": "1"}),
        ("GET / HTTP/1.1\r\nX-Admin: 1\r\n\r\nGET", {}),
    ],
)
async def test_a_header_or_method_that_could_smuggle_in_another_is_refused(
    method: str, headers: dict[str, str]
) -> None:
    async with serve(keep_alive) as srv, HttpClient() as client:
        with pytest.raises(DeviceError, match=r"^cannot send the request: ") as caught:
            await client.request(method, srv.url + "/", timeout_s=2, headers=headers)
    assert "secret" not in str(caught.value)  # a header from the config may be a token
    assert srv.accepted == 0


async def test_a_repeated_request_is_built_once_and_sent_as_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw: list[bytes] = []

    async def capture(srv: Server, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                raw.append(await r.readuntil(b"\r\n\r\n"))
                w.write(answer())
                await w.drain()

    built: list[str] = []
    prepare = http_module._prepare

    def counting(
        method: str, url: str, headers: dict[str, str] | None, body: bytes | None
    ) -> http_module._Prepared:
        built.append(url)
        return prepare(method, url, headers, body)

    monkeypatch.setattr(http_module, "_prepare", counting)
    async with serve(capture) as srv, HttpClient() as client:
        for key in ("a", "a", "b", "a"):  # a new dict each time, as the P1 client sends
            headers = {"X-Key": key, "X-Empty": "", "X-Inner": "a  b\tc", "X-Utf8": "héllo"}
            await client.request("GET", srv.url + "/api?x=1", timeout_s=2, headers=headers)
        cached = {p.data for p in client._prepared.values()}
        for i in range(http_module.PREPARED_MAX + 3):
            await client.request("GET", f"{srv.url}/{i}", timeout_s=2)
        assert len(client._prepared) <= http_module.PREPARED_MAX
    assert len(built) == 2 + http_module.PREPARED_MAX + 3
    assert raw[0] == raw[1] == raw[3] != raw[2]
    assert cached == {raw[0], raw[2]}
    assert raw[0] == (
        b"GET /api?x=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: flowrun\r\n"
        b"Accept: application/json, */*\r\nConnection: keep-alive\r\nX-Key: a\r\n"
        b"X-Empty: \r\nX-Inner: a  b\tc\r\nX-Utf8: h\xc3\xa9llo\r\n\r\n" % srv.port
    )
