"""A project MQTT client that never connects: for the tests that feed its paho handlers
packets by hand."""

from __future__ import annotations

import ssl

from nodes import _mqtt


def offline_client(manual_ack: bool = False) -> _mqtt.Client:
    """Built inside a running loop (aiomqtt takes it at construction)."""
    return _mqtt.Client(
        host="127.0.0.1",
        port=1,
        tls=ssl.create_default_context(),
        client_id="t",
        keepalive_s=30,
        timeout_s=1,
        clean_start=True,
        manual_ack=manual_ack,
        max_inflight=0,
    )
