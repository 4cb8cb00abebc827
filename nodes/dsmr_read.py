"""`dsmr_read`: DSMR P1 telegrams from a TCP bridge or a serial port, as canonical fields.

dsmr-parser's own asyncio reader (`create_tcp_dsmr_reader`) is not used: it logs bad CRCs
and parse errors itself with no hook to count them, and in 1.11.2 a non-ASCII byte inside a
telegram raises out of its `data_received`, which kills the connection with an asyncio
traceback. So this node reads the stream itself (asyncio for TCP, serialx for a serial
port, as dsmr-parser does), cuts it into telegrams and has each parsed, CRC included, by
dsmr-parser's `TelegramParser`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal, Self

import serialx
from pydantic import Field, model_validator

from nodes._dsmr import HISTORY_FIELD, Framer, Parser, Spec, to_fields
from runner import Backoff, NodeContext, Scalar, Source, SourceConfig, node

READ_BYTES = 4096


class KeepAliveExpired(TimeoutError):
    """No valid telegram within keep_alive_s: the bridge is taken for dead."""


class DsmrReadConfig(SourceConfig):
    transport: Literal["tcp", "serial"] = Field(
        default="tcp",
        description="`tcp`: a network bridge (ser2net, smartmeterBridge); `serial`: a P1 cable.",
    )
    host: str | None = Field(default=None, description="Bridge host name or address (tcp).")
    port: int | None = Field(default=None, ge=1, le=65535, description="Bridge TCP port (tcp).")
    device: str | None = Field(
        default=None,
        description="Serial device (serial), e.g. /dev/ttyUSB0 or /dev/serial/by-id/...; "
        "a serialx URL such as socket://host:port also works.",
    )
    baud_rate: int = Field(
        default=115200,
        gt=0,
        description="Serial speed (serial); DSMR 5 and Fluvius meters send 115200 8N1.",
    )
    spec: Spec = Field(
        default="belgium_fluvius",
        description="Telegram specification: `belgium_fluvius` (e-MUCS, tariff 1 = day) or "
        "`dutch_v5` (DSMR 5, tariff 1 = low/night; mapped so that t1 is still day).",
    )
    keep_alive_s: float = Field(
        default=30.0,
        gt=0,
        allow_inf_nan=False,
        description="No valid telegram for this long: the connection is closed and reopened.",
    )
    connect_timeout_s: float = Field(
        default=10.0, gt=0, allow_inf_nan=False, description="Limit for opening the connection."
    )
    retry_max_s: float = Field(
        default=30.0,
        gt=0,
        allow_inf_nan=False,
        description="Longest wait between reconnection attempts (jittered exponential backoff).",
    )
    min_interval_s: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Emit at most one telegram per this many seconds (meters send one per "
        "second); null: every telegram.",
    )
    peak_history: bool = Field(
        default=True,
        description=f"Add `{HISTORY_FIELD}`: the 13-month peak history (0-0:98.1.0) as a JSON "
        'list, newest first: {"month": "YYYY-MM", "captured": ISO, "ts": ISO or null, '
        '"w": W}. Sent in the first message and whenever it changes (monthly), null in the '
        "others: at 1.2 KB it would otherwise triple every message.",
    )

    @model_validator(mode="after")
    def _endpoint(self) -> Self:
        if self.transport == "tcp" and (self.host is None or self.port is None):
            raise ValueError("transport tcp needs host and port")
        if self.transport == "serial" and self.device is None:
            raise ValueError("transport serial needs device")
        return self


@node("dsmr_read")
class DsmrRead(Source[DsmrReadConfig]):
    """Reads DSMR P1 telegrams (Fluvius e-MUCS or Dutch DSMR 5) from a TCP bridge or serial port.

    Each telegram with a valid CRC becomes one message of canonical fields: grid power and
    per-phase power, voltage and current, the day/night import and export counters, the
    capacity-tariff values (15-minute average, monthly peak and its time, the 13-month
    history) and the gas and water readings of the M-Bus channels. A bad CRC or garbage is
    counted and skipped; a closed, failing or silent connection (no valid telegram within
    keep_alive_s) is reopened with jittered exponential backoff.
    """

    def __init__(self, config: DsmrReadConfig, ctx: NodeContext) -> None:
        super().__init__(config, ctx)
        self._parser = Parser(config.spec)
        self._backoff = Backoff(max_s=config.retry_max_s)
        self._last_emit: float | None = None
        self._last_history: Scalar = None
        self.connections = 0  # opened successfully, for tests and diagnostics
        self.telegrams = 0  # valid telegrams received
        c = config
        self._where = f"{c.host}:{c.port}" if c.transport == "tcp" else f"{c.device}"

    async def run(self) -> None:
        attempt = 0
        while True:
            before = self.telegrams
            try:
                reader, writer = await self._open()
            except (OSError, TimeoutError, serialx.SerialException) as exc:
                self.ctx.error(f"cannot connect to {self._where}", exc)
            else:
                self.connections += 1
                try:
                    await self._session(reader)
                except KeepAliveExpired as exc:
                    self.ctx.error(f"no valid telegram from {self._where}; reconnecting", exc)
                except (OSError, EOFError, serialx.SerialException) as exc:
                    self.ctx.error(f"connection to {self._where} lost", exc)
                finally:
                    await _close(writer)
            if self.telegrams > before:
                attempt = 0  # the connection worked: retry soon
            await asyncio.sleep(self._backoff.delay(attempt))
            attempt += 1

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        c = self.config
        if c.transport == "tcp":
            assert c.host is not None and c.port is not None  # the config validator
            opening = asyncio.open_connection(c.host, c.port)
        else:
            opening = serialx.open_serial_connection(c.device, baudrate=c.baud_rate)
        return await asyncio.wait_for(opening, c.connect_timeout_s)

    async def _session(self, reader: asyncio.StreamReader) -> None:
        """Reads until the connection ends (raises) or stays silent past keep_alive_s."""
        loop = asyncio.get_running_loop()
        keep_alive = self.config.keep_alive_s
        framer = Framer()
        deadline = loop.time() + keep_alive
        while True:
            try:
                # not asyncio.wait_for: on Python 3.11 it returns data that came with a
                # cancellation and drops the cancellation, and the node would not stop
                async with asyncio.timeout(deadline - loop.time()):
                    data = await reader.read(READ_BYTES)
            except TimeoutError:
                raise KeepAliveExpired(f"silent for {keep_alive:g} s") from None
            if not data:
                raise EOFError("closed by the other end")
            telegrams, junk = framer.feed(data)
            if junk:
                self.ctx.error(f"garbage from {self._where}: {junk} bytes skipped")
            for raw in telegrams:
                if await self._handle(raw, loop.time()):
                    deadline = loop.time() + keep_alive

    async def _handle(self, raw: bytes, now: float) -> bool:
        """Parse, map and emit one telegram; False when it was bad (counted)."""
        try:
            data = to_fields(self._parser.parse(raw), self.config.spec, self.config.peak_history)
        except Exception as exc:  # dsmr-parser raises several kinds on garbage: all counted
            self.ctx.error(f"bad telegram from {self._where}", exc)
            return False
        self.telegrams += 1
        self.ctx.progress()
        interval = self.config.min_interval_s
        last = self._last_emit
        if interval is not None and last is not None and now - last < interval:
            return True
        self._last_emit = now
        if self.config.peak_history:
            history = data[HISTORY_FIELD]
            if history == self._last_history:
                data[HISTORY_FIELD] = None
            else:
                self._last_history = history
        await self.emit(self.message(data))
        return True


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 1.0)
