"""The uplink client's PUBACK fast path (nodes/_mqtt.py) hands paho's on_publish exactly
what paho's own handler would, for every reason code and packet shape; what it does not
handle (properties, PUBCOMP, a reason code not valid for PUBACK, a short packet) goes to
paho's handler, errors included."""

from __future__ import annotations

from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes

from nodes import _mqtt
from tests.unit.mqttclient import offline_client

FAST: list[bool] = []  # per on_publish call: were the fast path's shared objects passed?


def handle(c: _mqtt.Client, handler: Any, cmd: str, packet: bytes) -> Any:
    """What on_publish gets (mid, reason, properties), or the error raised."""
    paho: Any = c._client
    got: list[Any] = []

    def on_publish(mid: int, rc: Any, props: Any) -> None:
        got.append((mid, rc.value, rc.getName(), rc.packetType, props.packetType, props.pack()))
        FAST.append(props is _mqtt._NO_PROPERTIES)

    paho._do_on_publish = on_publish
    paho._out_messages = {0x1234: None}  # the only message in flight
    paho._in_packet["packet"] = packet
    try:
        handler(cmd)
    except Exception as exc:
        return (type(exc).__name__, str(exc))
    return got


PROPS = b"\x0d\x1f\x00\x0agone away!"  # a Reason String property (length 13)


@pytest.mark.parametrize("cmd", ["PUBACK", "PUBCOMP"])
async def test_every_puback_shape_gets_what_pahos_handler_gives(cmd: str) -> None:
    c = offline_client()
    fast = c._client._handle_pubackcomp
    paho_own = c._paho_pubackcomp
    assert fast != paho_own  # the fast path is installed
    packets = [b"\x12\x34", b"\x12\x35", b"\x12", b""]
    packets += [b"\x12\x34" + bytes([code]) for code in range(256)]
    packets += [b"\x12\x34\x10" + PROPS, b"\x12\x34\x00\x00"]
    fast_hits = 0
    for packet in packets:
        want = handle(c, paho_own, cmd, packet)
        FAST.clear()
        assert handle(c, fast, cmd, packet) == want, packet
        fast_hits += FAST == [True]
    # the fast path took the 2-byte PUBACK and each valid reason code; paho the rest
    assert fast_hits == (1 + len(_mqtt._PUBACK_REASONS) if cmd == "PUBACK" else 0)


def test_the_shared_reason_codes_are_pubacks() -> None:
    assert {0, 16, 128, 135, 151} <= set(_mqtt._PUBACK_REASONS)
    for code, rc in _mqtt._PUBACK_REASONS.items():
        assert rc.value == code and rc.packetType == PacketTypes.PUBACK
        assert rc.is_failure == (code >= 0x80)
