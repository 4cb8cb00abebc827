"""`modbus_poll`: reads a Modbus TCP device by a register profile (nodes/profiles/*.yaml)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ModbusPDU

from nodes._modbus_profile import Block, Profile, decode, load_profile, plan, split
from runner import Backoff, Data, NodeContext, Source, SourceConfig, every, node, utcnow

# exception codes that say "not now" rather than "no such register": they never disable
# a block (busy, acknowledge, gateway path unavailable, gateway target did not respond)
TRANSIENT = frozenset({5, 6, 10, 11})
EXCEPTION_NAMES = {
    1: "ILLEGAL FUNCTION",
    2: "ILLEGAL ADDRESS",
    3: "ILLEGAL VALUE",
    4: "DEVICE FAILURE",
    5: "ACKNOWLEDGE",
    6: "DEVICE BUSY",
    10: "GATEWAY PATH UNAVAILABLE",
    11: "GATEWAY TARGET NO RESPONSE",
}


def quiet_pymodbus() -> None:
    """pymodbus logs every failed connect and timeout itself; the runner already logs the
    first of a streak and the recovery, so its lines would only repeat ours. A level set
    explicitly (to debug the protocol) is left alone."""
    lib = logging.getLogger("pymodbus")
    if lib.level == logging.NOTSET:
        lib.setLevel(logging.CRITICAL)


class ModbusPollConfig(SourceConfig):
    host: str = Field(min_length=1, description="Address of the device (WiNet-S, SDongle, LAN).")
    port: int = Field(default=502, ge=1, le=65535, description="Modbus TCP port.")
    unit_id: int = Field(default=1, ge=0, le=255, description="Modbus unit (slave) id.")
    profile: str = Field(
        description=(
            "Register profile: a name in nodes/profiles (sungrow_sh_rs, sungrow_sh_rt, "
            "huawei_sun2000) or a path to a .yaml file. Edits to it reload the flow."
        )
    )
    interval_s: float = Field(
        default=5.0, gt=0, allow_inf_nan=False, description="Seconds between polls."
    )
    inter_request_delay_ms: int = Field(
        default=20,
        ge=0,
        le=60_000,
        description="Pause between requests; a WiNet-S dongle needs 20 ms or more.",
    )
    timeout_ms: int = Field(
        default=3000, gt=0, le=120_000, description="Time allowed to connect and per answer."
    )
    exception_limit: int = Field(
        default=3,
        ge=1,
        le=1000,
        description=(
            "A block answering this many Modbus exceptions in a row is no longer read "
            "(bad requests crash some dongles)."
        ),
    )
    backoff_initial_s: float = Field(
        default=1.0, gt=0, allow_inf_nan=False, description="First reconnect delay."
    )
    backoff_max_s: float = Field(
        default=60.0, gt=0, allow_inf_nan=False, description="Longest reconnect delay."
    )
    # the loaded profile takes part in equality: an edited profile restarts the node
    _profile: Profile | None = PrivateAttr(default=None)
    _profile_path: Path | None = PrivateAttr(default=None)

    @field_validator("profile")
    @classmethod
    def _profile_loads(cls, value: str) -> str:
        load_profile(value)  # a ValueError, with the profile's own file:line:col
        return value

    @model_validator(mode="after")
    def _keep_profile(self) -> Self:
        self._profile_path, self._profile = load_profile(self.profile)
        return self

    @property
    def profile_model(self) -> Profile:
        assert self._profile is not None
        return self._profile

    def watched_files(self) -> tuple[str, ...]:
        return (str(self._profile_path),) if self._profile_path else ()


class DeviceError(Exception):
    """A failure of the connection (not of one block): the poll cycle ends, reconnect."""

    def __init__(self, what: str, cause: BaseException | None = None) -> None:
        super().__init__(what if cause is None else f"{what}: {cause}")
        self.what = what
        self.cause = cause


@dataclass(slots=True)
class BlockState:
    block: Block
    words: list[int] | None = None
    exceptions: int = 0  # in a row
    disabled: bool = False


def malformed(frame: bytes) -> bool | None:
    """Whether a received Modbus TCP frame is garbage; None while it is incomplete.

    Only answers to FC 03/04 (or their exceptions) are expected. pymodbus raises inside
    the transport on some malformed frames, which asyncio logs with a traceback each time.
    """
    if len(frame) < 8:
        return None
    length = int.from_bytes(frame[4:6], "big")
    if frame[2:4] != b"\0\0" or not 2 <= length <= 254:
        return True
    if len(frame) < 6 + length:
        return None
    pdu = frame[7 : 6 + length]
    if pdu[0] & 0x80:
        return len(pdu) != 2
    if pdu[0] in (3, 4):
        return pdu[1] != len(pdu) - 2 or pdu[1] % 2 == 1
    return True


@node("modbus_poll")
class ModbusPoll(Source[ModbusPollConfig]):
    """Polls a Modbus TCP device by a register profile and emits its canonical fields.

    One TCP connection, requests serialized with `inter_request_delay_ms` between them, in
    blocks of at most 100 contiguous registers that never span a register the model lacks.
    The model (`device_type_code` on Sungrow) is read once and selects the model's blocks;
    an unknown model is logged and gets the registers every model has. A block answering
    `exception_limit` Modbus exceptions in a row is disabled and logged once. Timeouts,
    refused or dropped connections and malformed answers end the cycle (nothing emitted),
    count an error and reconnect with jittered exponential backoff; the node never stops.
    "Not available" sentinels become null.
    """

    def __init__(self, config: ModbusPollConfig, ctx: NodeContext) -> None:
        super().__init__(config, ctx)
        self.profile = config.profile_model
        self.model: str | None = None
        self.model_code: int | None = None
        self.identified = False
        self.blocks: list[BlockState] = []
        self.cycles = 0
        self._client: AsyncModbusTcpClient | None = None
        # set once the current connection broke or garbled an answer (reset on connect)
        self._broken_why: str | None = None
        # the task waiting for an answer, and whether _fail cancelled it
        self._reader: asyncio.Task[Any] | None = None
        self._interrupted = False
        self._last_request = 0.0
        self._timeout_s = config.timeout_ms / 1000
        self._where = f"{config.host}:{config.port}"

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        quiet_pymodbus()
        cfg = self.config
        backoff = Backoff(cfg.backoff_initial_s, max(cfg.backoff_max_s, cfg.backoff_initial_s))
        attempt = 0
        try:
            while True:
                try:
                    await self._connect()
                    if not self.identified:
                        await self._identify()
                    async for _ in every(cfg.interval_s):
                        await self._cycle()
                        attempt = 0
                except DeviceError as exc:
                    self.ctx.error(exc.what, exc.cause)
                    self._close()
                    await asyncio.sleep(backoff.delay(attempt))
                    attempt += 1
        finally:
            self._close()

    async def stop(self) -> None:
        self._close()

    async def _cycle(self) -> None:
        ts = utcnow()
        self.cycles += 1
        succeeded = 0
        failed: list[tuple[BlockState, int]] = []
        for state in self.blocks:
            if state.disabled or (self.cycles - 1) % state.block.poll_every:
                continue  # a slow block keeps its last words between its reads
            answer = await self._read(state.block)
            if answer.isError():
                state.words = None
                failed.append((state, int(getattr(answer, "exception_code", 0))))
            else:
                state.words = list(answer.registers)
                state.exceptions = 0
                succeeded += 1
        for state, code in failed:
            name = EXCEPTION_NAMES.get(code, "unknown")
            self.ctx.error(f"{state.block.label} answered Modbus exception {code} ({name})")
            # when no block answered, the device is the problem, not the blocks
            if succeeded and code not in TRANSIENT:
                state.exceptions += 1
            if state.exceptions >= self.config.exception_limit:
                state.disabled = True
                self.ctx.log.warning(
                    "node %s: %s disabled after %d Modbus exceptions in a row (last: %d %s); "
                    "its fields stay null until the node restarts",
                    self.node_id,
                    state.block.label,
                    state.exceptions,
                    code,
                    name,
                )
        await self.emit(self.message(self._data(), ts=ts))
        if not failed:
            self.ctx.progress()

    def _data(self) -> Data:
        words: dict[str, list[int] | None] = {}
        for state in self.blocks:
            if state.words is not None:
                words.update(split(state.block, state.words))
        data: dict[str, int | float | str | None] = {}
        if self.profile.model_register is not None:
            data["inverter_model"] = self.model
        data.update(decode(self.profile, words))
        return data

    # -- the device --------------------------------------------------------------------------

    async def _identify(self) -> None:
        """Read the model code once; it selects the model's blocks."""
        p = self.profile
        if p.model_register is not None:
            reg = p.by_key(p.model_register)
            block = Block(reg.kind, reg.address, 1, reg.address - p.wire_offset, (reg,))
            answer = await self._read(block)
            if answer.isError():
                code = int(getattr(answer, "exception_code", 0))
                self.ctx.log.error(
                    "node %s: %s (%s) answered Modbus exception %d: model unknown, reading "
                    "only the registers every model of %s has",
                    self.node_id,
                    reg.key,
                    block.label,
                    code,
                    p.name,
                )
            else:
                self.model_code = int(answer.registers[0])
                self.model = p.model_name(self.model_code)
                if self.model is None:
                    self.ctx.log.error(
                        "node %s: unknown %s 0x%04X: not a model of profile %s (known: %s); "
                        "reading only the registers every model has",
                        self.node_id,
                        reg.key,
                        self.model_code,
                        p.name,
                        ", ".join(f"0x{c:04X} {m.name}" for c, m in sorted(p.models.items())),
                    )
                    self.model = f"unknown_0x{self.model_code:04X}"
                else:
                    self.ctx.log.info("node %s: %s is a %s", self.node_id, self._where, self.model)
        known = self.model if self.model_code in p.models else None
        skip = (p.model_register,) if p.model_register else ()
        self.blocks = [BlockState(b) for b in plan(p, known, skip)]
        self.identified = True

    async def _connect(self) -> None:
        self._close()
        self._broken_why = None
        client = AsyncModbusTcpClient(
            self.config.host,
            port=self.config.port,
            name=self.node_id,
            timeout=self._timeout_s,
            retries=0,  # one request per read: retrying is this node's business
            reconnect_delay=0,  # no reconnecting behind our back: we back off ourselves
            trace_packet=self._inspect,
            trace_connect=self._connection,
        )
        self._client = client
        try:
            ok = await client.connect()
        except (OSError, ModbusException) as exc:
            raise DeviceError(f"cannot connect to {self._where}", exc) from exc
        if not ok:
            raise DeviceError(f"cannot connect to {self._where} (refused or no answer)")

    def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def _inspect(self, sending: bool, frame: bytes) -> bytes:
        if sending or not malformed(frame):
            return frame
        self._fail("malformed answer")
        return b""  # keep it from pymodbus's decoder; the connection is closed next

    def _connection(self, connected: bool) -> None:
        if not connected:
            self._fail("connection closed by the device")

    def _fail(self, why: str) -> None:
        if self._broken_why is not None:
            return
        self._broken_why = why
        # pymodbus keeps waiting for an answer on a closed or garbled connection until its
        # timeout; the read waiting for it ends now instead. Cancelling the reading task
        # costs nothing per request, unlike racing each read against a "broken" event.
        reader = self._reader
        if reader is not None and not self._interrupted:
            self._interrupted = True
            reader.cancel()

    async def _read(self, block: Block) -> ModbusPDU:
        client = self._client
        if client is None or not client.connected or self._broken_why is not None:
            why = self._broken_why or "connection lost"
            raise DeviceError(f"{why} ({self._where}, before {block.label})")
        loop = asyncio.get_running_loop()
        wait = self._last_request + self.config.inter_request_delay_ms / 1000 - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        read = (
            client.read_input_registers if block.kind == "input" else client.read_holding_registers
        )
        task = asyncio.current_task()
        assert task is not None
        cancels = task.cancelling()
        self._reader, self._interrupted = task, False
        try:
            # pymodbus times the answer out itself; the margin only bounds a stuck call
            async with asyncio.timeout(self._timeout_s + 1):
                answer = await read(
                    block.wire_start, count=block.count, device_id=self.config.unit_id
                )
        except asyncio.CancelledError:
            # our own cancel (the connection broke) becomes a DeviceError; any other
            # cancellation (the node stopping) goes on
            if self._interrupted and task.uncancel() == 0:
                raise DeviceError(
                    f"{self._broken_why} ({self._where}, reading {block.label})"
                ) from None
            raise
        except TimeoutError:
            raise DeviceError(f"no answer from {self._where} to {block.label}") from None
        except ModbusException as exc:
            if "No response received" in str(exc):  # pymodbus' timeout, worded for retries
                raise DeviceError(
                    f"no answer from {self._where} to {block.label} "
                    f"within {self.config.timeout_ms} ms"
                ) from exc
            raise DeviceError(f"reading {block.label} from {self._where} failed", exc) from exc
        finally:
            self._reader = None
            self._last_request = loop.time()
        if self._interrupted:  # the answer came, but so did the break: the cancel is ours
            task.uncancel()
        if task.cancelling() > cancels:
            # pymodbus waits for the answer with asyncio.wait_for, which on Python 3.11
            # returns an answer that came with a cancellation and drops the cancellation:
            # the node is stopping, and must not poll on
            raise asyncio.CancelledError
        if self._interrupted:
            raise DeviceError(f"{self._broken_why} ({self._where}, reading {block.label})")
        if not answer.isError() and len(answer.registers) != block.count:
            raise DeviceError(
                f"malformed answer to {block.label}: {len(answer.registers)} registers"
            )
        return answer
