"""The client's PUBLISH fast path (nodes/_mqtt.py) hands on_message exactly the message
paho's own handler would, and acknowledges it the same way, for QoS 0 and 1 with any
properties section; QoS 2 and malformed packets go to paho's handler, errors included.
Messages with the same properties section share one (read-only) Properties object."""

from __future__ import annotations

import random
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from nodes import _mqtt
from tests.unit.mqttclient import offline_client


def handle(c: _mqtt.Client, handler: Any, header: int, packet: bytes) -> Any:
    """What paho's message callback gets and which PUBACKs go out, or the error raised."""
    paho: Any = c._client
    got: list[Any] = []

    def on_message(message: mqtt.MQTTMessage) -> None:
        props = message.properties
        got.append(
            (
                message._topic,
                message.mid,
                message.qos,
                message.dup,
                message.retain,
                message.payload,
                type(message.payload),
                None if props is None else (props.packetType, props.pack(), str(props)),
            )
        )

    paho._handle_on_message = on_message
    paho._send_puback = lambda mid: got.append(("puback", mid)) or mqtt.MQTT_ERR_SUCCESS
    paho._in_packet["command"] = header
    paho._in_packet["packet"] = packet
    try:
        rc = handler()
    except Exception as exc:
        return (type(exc).__name__, str(exc))
    return got, rc


def props(**values: Any) -> bytes:
    p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(p, name, value)
    return bytes(p.pack())  # type: ignore[no-untyped-call]


SECTIONS = [
    b"\x00",
    props(ContentType="application/json"),
    props(ContentType="application/vnd.flowrun.compact.v1"),
    props(UserProperty=[("a", "1"), ("b", "2")], MessageExpiryInterval=60),
    props(ResponseTopic="r/t", CorrelationData=b"\x00\x01", PayloadFormatIndicator=1),
    props(ContentType="x" * 200),  # a two-byte length
    b"\x04\x03\x00\x02ab",  # the section says 4 bytes, its content type takes 5
    b"\x03\x03\x00\x05",  # a content type running on into the payload
    b"\x02\x01",  # truncated
    b"\x01\x63",  # an unknown property id
    b"\x80\x80\x80\x80\x01",  # a varint of five bytes
    b"\xff",  # a varint that never ends
]


def packets(rnd: random.Random) -> list[tuple[int, bytes]]:
    out = []
    topics = [b"energy/home-01/realtime", b"", b"t\xff\xfe", "é/✓".encode()]
    for qos in (0, 1, 2, 3):
        for topic in topics:
            for section in SECTIONS:
                header = 0x30 | qos << 1 | rnd.choice((0, 8)) | rnd.choice((0, 1))
                payload = rnd.choice((b"", b"{}", rnd.randbytes(rnd.randint(1, 3000))))
                mid = b"\x12\x34" if qos else b""
                out.append(
                    (header, len(topic).to_bytes(2, "big") + topic + mid + section + payload)
                )
    # cut short anywhere
    whole = out[len(SECTIONS) + 1][1]
    out += [(0x32, whole[:n]) for n in range(len(whole) if len(whole) < 40 else 40)]
    out += [(0x32, b"\x00\x40abc")]  # a topic longer than the packet
    return out


@pytest.mark.parametrize("manual_ack", [True, False])
async def test_every_publish_gets_what_pahos_handler_gives(manual_ack: bool) -> None:
    c = offline_client(manual_ack)
    fast = c._client._handle_publish
    paho_own = c._paho_publish
    assert fast != paho_own  # the fast path is installed
    fast_taken = 0
    for header, packet in packets(random.Random(7)):
        want = handle(c, paho_own, header, packet)
        before = len(c._publish_props)
        got = handle(c, fast, header, packet)
        assert got == want, (hex(header), packet[:60])
        fast_taken += len(c._publish_props) > before
    assert fast_taken >= 5  # the well-formed sections were taken by the fast path


async def test_messages_with_the_same_section_share_one_properties_object() -> None:
    c = offline_client(True)
    paho: Any = c._client
    seen: list[Any] = []
    paho._handle_on_message = lambda m: seen.append(m.properties)
    section = props(ContentType="application/json")
    for i in range(3):
        paho._in_packet["command"] = 0x32
        paho._in_packet["packet"] = b"\x00\x01t" + i.to_bytes(2, "big") + section + b"{}"
        paho._handle_publish()
    assert seen[0] is seen[1] is seen[2] and seen[0].ContentType == "application/json"
