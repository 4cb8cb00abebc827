"""The uplink's payload formats: `compact` round-trips exactly (property-style over many
random snapshots) and stays small for realistic 1 Hz snapshots; bad payloads are refused
with a reason; `json` carries seq and ts to the microsecond."""

from __future__ import annotations

import json
import math
import random
import re
import struct
import zlib
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodes._codec import (
    MAGIC,
    MAX_SCALE,
    CodecError,
    Snapshot,
    _float_of,
    decode_compact,
    encode_compact,
    encode_json,
    is_compact,
)
from nodes._household import Household, HouseholdConfig
from runner import Scalar

T0 = datetime(2026, 6, 15, 10, 30, 0, 250_000, tzinfo=UTC)


def same(a: Scalar, b: Scalar) -> bool:
    """Equal and of the same type; NaN equals NaN, -0.0 is not 0.0 (bit-exact floats)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))
    return a == b


def assert_same(got: list[Snapshot], want: list[Snapshot]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.ts == w.ts and g.ts.tzinfo is not None
        assert g.seq == w.seq and type(g.seq) is type(w.seq)
        assert list(g.data) == list(w.data) or set(g.data) == set(w.data)
        for key, value in w.data.items():
            assert same(g.data[key], value), (key, g.data[key], value)


# random snapshots ------------------------------------------------------------------------------


def random_float(rnd: random.Random) -> float:
    pick = rnd.random()
    if pick < 0.4:
        return round(rnd.uniform(-5000, 5000), rnd.randint(0, 4))
    if pick < 0.6:
        return rnd.uniform(-1e6, 1e6)
    if pick < 0.7:
        return struct.unpack("<d", rnd.getrandbits(64).to_bytes(8, "little"))[0]
    if pick < 0.8:
        return rnd.choice([0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, 1e308, 0.1, 1e-7])
    return float(rnd.randint(-(2**53), 2**53))


def random_value(rnd: random.Random, kind: str) -> Scalar:
    if rnd.random() < 0.1:
        return None
    if kind == "int":
        return rnd.choice([rnd.randint(-5000, 5000), rnd.randint(-(2**63), 2**63 - 1)])
    if kind == "float":
        return random_float(rnd)
    if kind == "str":
        return rnd.choice(["running", "standby", "", "é✓ ünïcode", "x" * rnd.randint(0, 300)])
    if kind == "bool":
        return rnd.random() < 0.5
    return random_value(rnd, rnd.choice(["int", "float", "str", "bool"]))  # a mixed column


def random_batch(rnd: random.Random) -> list[Snapshot]:
    kinds = ["int", "float", "str", "bool", "mixed"]
    fields = {f"f{i}": rnd.choice(kinds) for i in range(rnd.randint(0, 30))}
    n = rnd.randint(1, 80)
    ts = T0 + timedelta(microseconds=rnd.randint(-(10**15), 10**15))
    seq: int | None = rnd.randint(0, 2**40)
    out = []
    for _ in range(n):
        ts += timedelta(microseconds=rnd.choice([1_000_000, rnd.randint(-(10**9), 10**9)]))
        seq = None if rnd.random() < 0.05 else (seq or 0) + rnd.choice([1, 1, 1, 0, 7, -3])
        data = {}
        for name, kind in fields.items():
            if rnd.random() < 0.05:
                continue  # the key is missing from this snapshot
            data[name] = random_value(rnd, kind)
        out.append(Snapshot(ts, seq, data))
    return out


def test_compact_round_trips_exactly_over_many_random_batches() -> None:
    rnd = random.Random(20261103)
    for _ in range(400):
        batch = random_batch(rnd)
        decoded = decode_compact(encode_compact("home-01", batch))
        assert decoded.device_id == "home-01"
        assert_same(decoded.snapshots, batch)


def test_compact_round_trips_a_steady_snapshot_stream_exactly() -> None:
    snaps = realistic(300)
    decoded = decode_compact(encode_compact("home-01", snaps))
    assert_same(decoded.snapshots, snaps)
    assert decoded.snapshots == snaps


def test_compact_keeps_types_that_compare_equal() -> None:
    # 1 == 1.0 == True in Python; a round trip must not turn one into another
    snaps = [
        Snapshot(T0, 1, {"a": 1, "b": 1.0, "c": True, "d": -0.0, "e": 2**63 - 1, "f": None}),
        Snapshot(T0, 2, {"a": 1.0, "b": 1, "c": 1, "d": 0.0, "e": -(2**63), "f": "1"}),
        Snapshot(T0, None, {"a": True, "b": None, "c": False, "d": 0.1 + 0.2, "e": 0, "f": 1}),
    ]
    assert_same(decode_compact(encode_compact("d", snaps)).snapshots, snaps)


def test_an_int_beyond_64_bits_is_refused_with_a_reason() -> None:
    with pytest.raises(CodecError, match="not encodable"):
        encode_compact("d", [Snapshot(T0, 1, {"x": 2**64})])
    with pytest.raises(CodecError, match="empty"):
        encode_compact("d", [])


# realistic snapshots: the edge flow's, from the simulated household -----------------------------


def realistic(n: int, seed: int = 1) -> list[Snapshot]:
    """n snapshots at 1 Hz as the edge flow makes them (flows/demo.yaml's `metrics`): the
    P1 meter's fields every second at its resolution, the inverter's every 5 s (held in
    between by merge), the derived fields; about 48 fields, 6 of them strings."""
    house = Household(
        HouseholdConfig(
            name=f"codec-{seed}",
            speed=0,
            seed=seed,
            start=datetime(2026, 6, 15, 10, 30, tzinfo=UTC),
        )
    )
    rnd = random.Random(seed)
    inverter: dict[str, Scalar] = {}
    out = []
    ts = T0
    for i in range(n):
        s = house.advance(1)
        if i % 5 == 0:
            inverter = {
                "inverter_model": "SH10RT",
                "mppt1_voltage_v": round(s.mppt1_voltage_v, 1),
                "mppt1_current_a": round(s.mppt1_current_a, 1),
                "mppt2_voltage_v": round(s.mppt2_voltage_v, 1),
                "mppt2_current_a": round(s.mppt2_current_a, 1),
                "pv_power_w": round(s.pv_power_w),
                "inverter_state": s.running_state,
                "pv_daily_kwh": round(s.pv_daily_kwh, 1),
                "pv_total_kwh": round(s.pv_total_kwh, 1),
                "battery_voltage_v": round(s.battery_voltage_v, 1),
                "battery_soc_pct": round(s.battery_soc_pct, 1),
                "battery_soh_pct": round(s.battery_soh_pct, 1),
                "battery_temp_c": round(s.battery_temp_c, 1),
                "battery_daily_charge_kwh": round(s.battery_charge_daily_kwh, 1),
                "battery_daily_discharge_kwh": round(s.battery_discharge_daily_kwh, 1),
                "inverter_ac_power_w": round(s.inverter_ac_power_w),
                "battery_power_w": round(s.battery_power_w),
                "ems_mode": "self_consumption",
            }
        grid = round(s.grid_power_w)
        p1: dict[str, Scalar] = {
            "grid_power_w": grid,
            "grid_import_t1_kwh": round(s.import_t1_kwh, 3),
            "grid_import_t2_kwh": round(s.import_t2_kwh, 3),
            "grid_export_t1_kwh": round(s.export_t1_kwh, 3),
            "grid_export_t2_kwh": round(s.export_t2_kwh, 3),
            "grid_avg_15m_w": float(round(s.avg_15m_w)),
            "grid_monthly_peak_w": round(s.monthly_peak_w) or None,
            "grid_monthly_peak_ts": None,
            "power_l1_w": round(s.power_l1_w),
            "power_l2_w": round(s.power_l2_w),
            "power_l3_w": round(s.power_l3_w),
            "voltage_l1_v": round(s.voltage_l1_v, 1),
            "voltage_l2_v": round(s.voltage_l2_v, 1),
            "voltage_l3_v": round(s.voltage_l3_v, 1),
            "current_l1_a": round(s.current_l1_a, 2),
            "current_l2_a": round(s.current_l2_a, 2),
            "current_l3_a": round(s.current_l3_a, 2),
            "grid_frequency_hz": round(s.frequency_hz, 2),
            "tariff": s.tariff,
            "meter_ts": None,
            "gas_total_m3": round(s.gas_m3, 3),
            "gas_ts": s.gas_ts.isoformat().replace("+00:00", "Z"),
            "water_total_m3": round(s.water_m3, 3),
            "water_ts": s.water_ts.isoformat().replace("+00:00", "Z"),
        }
        inv_ac = inverter["inverter_ac_power_w"]
        pv = inverter["pv_power_w"]
        assert isinstance(inv_ac, int) and isinstance(pv, int)
        load = max(0, inv_ac + grid)
        imp, exp = max(0, grid), max(0, -grid)
        derived: dict[str, Scalar] = {
            "device_id": "home-01",
            "import_w": imp,
            "export_w": exp,
            "load_power_w": load,
            "self_consumption_w": min(max(pv - exp, 0), pv),
            "self_sufficiency_pct": round(100 * (1 - min(1, imp / load)), 1) if load else None,
        }
        # the poller's clock: a second apart, give or take a millisecond of scheduling
        ts += timedelta(microseconds=1_000_000 + rnd.randint(-1500, 1500))
        out.append(Snapshot(ts, 52_000 + i, {**inverter, **p1, **derived}))
    return out


def test_compact_costs_at_most_60_bytes_a_snapshot_at_1_hz() -> None:
    snaps = realistic(600)
    assert len(snaps[0].data) >= 45
    json_bytes = sum(len(encode_json("home-01", s)) for s in snaps) / len(snaps)
    # one batch per minute (batch_max_delay_s: 60) and per half minute
    for batch in (60, 30):
        sizes = [
            len(encode_compact("home-01", snaps[i : i + batch]))
            for i in range(0, len(snaps), batch)
        ]
        per_snapshot = sum(sizes) / len(snaps)
        assert per_snapshot <= 60, (batch, per_snapshot, json_bytes)
    assert json_bytes > 1000  # the same snapshots as JSON: ~1.2 kB each


# decoding what is not a compact batch ------------------------------------------------------------


def test_a_compact_payload_is_recognised_by_its_marker() -> None:
    payload = encode_compact("home-01", realistic(3))
    assert payload.startswith(MAGIC) and is_compact(payload)
    assert not is_compact(encode_json("home-01", realistic(1)[0]))
    assert is_compact(b"whatever", "application/vnd.flowrun.compact.v1")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{}", "no compact marker"),
        (MAGIC + b"garbage", "not a zlib stream"),
        (MAGIC + zlib.compress(b"\x92\x01\x02"), "not a batch"),
        (MAGIC + zlib.compress(b"\xc1"), "not msgpack"),
        (MAGIC + zlib.compress(bytes(100_000), 9), "inflates to more than"),
    ],
)
def test_garbage_is_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(CodecError, match=reason):
        decode_compact(payload, max_bytes=50_000)


def test_a_truncated_or_tampered_payload_is_refused() -> None:
    payload = encode_compact("home-01", realistic(30))
    with pytest.raises(CodecError):
        decode_compact(payload[:-10])
    flipped = bytearray(payload)
    flipped[len(flipped) // 2] ^= 0xFF
    with pytest.raises(CodecError):
        decode_compact(bytes(flipped))


@pytest.mark.parametrize(
    ("column", "reason"),
    [
        (["a", 0, [0, [], [1, True, 2]], []], "a: not integers"),
        (["a", 1, [1, [], [1, 2, 3.5], 1], []], "a: not integers"),
        (["a", 1, [0, [], [1, 2, 3], 13], []], "a: bad scale"),
        (["a", 0, [0, [5], [1, 2]], []], "a: bad null indices"),
        (["a", 0, [0, [], [1, 2]], []], "a: 2 values, not 3"),
        (["a", 0, [3, [], [1, 2, 3]], []], "a: bad delta order"),
        (["a", 2, ["x", 2, "y", 2], []], "a: bad runs"),
        (["a", 2, [[1], 3], []], "a: bad value"),
        (["a", 0, [0, [], [1, 2, 3]], [True]], "a: bad absent list"),
        (["a", 7, [], []], "a: unknown column kind 7"),
    ],
)
def test_a_hostile_column_is_refused_with_its_reason(column: list[object], reason: str) -> None:
    import msgpack

    batch = [1, "d", 3, [1, [], [0, 1_000_000, 0]], [0, [], [1, 2, 3]], [column]]
    with pytest.raises(CodecError, match=re.escape(f"compact: {reason}")):
        decode_compact(MAGIC + zlib.compress(msgpack.packb(batch)))


def test_a_run_length_bomb_is_refused() -> None:
    import msgpack

    n = 100_000  # x 100 columns of one run each: 10 million values from a few kB
    columns = [[f"c{i}", 2, ["x", n], []] for i in range(100)]
    batch = [1, "d", n, [1, [], [0] + [1] * (n - 1)], [0, list(range(n)), []], columns]
    payload = MAGIC + zlib.compress(msgpack.packb(batch), 9)
    with pytest.raises(CodecError, match="more than"):
        decode_compact(payload, max_bytes=64 * 2**20)


# json ----------------------------------------------------------------------------------------------


def test_json_carries_seq_and_the_time_to_the_microsecond() -> None:
    snap = Snapshot(T0, 7, {"grid_power_w": -120, "voltage_l1_v": 231.4, "state": None})
    obj: dict[str, Any] = json.loads(encode_json("home-01", snap))
    assert obj == {
        "device_id": "home-01",
        "seq": 7,
        "ts": "2026-06-15T10:30:00.250000Z",
        "data": {"grid_power_w": -120, "voltage_l1_v": 231.4, "state": None},
    }
    assert "seq" not in json.loads(encode_json("home-01", Snapshot(T0, None, {})))
    with pytest.raises(CodecError, match="JSON"):
        encode_json("home-01", Snapshot(T0, 1, {"x": math.nan}))


def reference_json(device_id: str, snap: Snapshot) -> Any:
    """What encode_json wrote with the standard library, decoded: the server's view."""
    obj: dict[str, Any] = {"device_id": device_id}
    if snap.seq is not None:
        obj["seq"] = snap.seq
    obj["ts"] = snap.ts.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    obj["data"] = dict(snap.data)
    return json.loads(json.dumps(obj, allow_nan=False))


def test_json_is_what_the_standard_library_wrote_over_many_random_snapshots() -> None:
    # orjson formats floats its own way ("1e-7", not "1e-07"): the values, types and key
    # order a receiver decodes must be the same, and non-finite floats refused as before
    rnd = random.Random(20261202)
    refused = 0
    for _ in range(300):
        for snap in random_batch(rnd)[:5]:
            if rnd.random() < 0.2:  # nulls and "null" in strings beside the floats
                snap.data["s"] = rnd.choice(["null", "nullnull", None, "é"])
            try:
                want = reference_json("home-01", snap)
            except ValueError:  # NaN or an infinity
                refused += 1
                with pytest.raises(CodecError, match="not JSON compliant"):
                    encode_json("home-01", snap)
                continue
            got = json.loads(encode_json("home-01", snap))
            assert list(got) == list(want) and list(got["data"]) == list(want["data"])
            assert got["ts"] == want["ts"] and got.get("seq") == want.get("seq")
            for key, value in want["data"].items():
                assert same(got["data"][key], value), (key, got["data"][key], value)
    assert refused > 50  # the refusals were exercised


def test_json_refuses_a_nan_hidden_among_nulls_and_in_nested_values() -> None:
    for data in (
        {"a": None, "b": "null", "c": math.inf},
        {"a": [1.0, None, -math.inf]},
        {"a": {"b": math.nan}, "c": None},
    ):
        with pytest.raises(CodecError, match="not JSON compliant"):
            encode_json("home-01", Snapshot(T0, 1, data))
    ok = Snapshot(T0, 1, {"a": None, "b": "null", "c": [None, 1.5], "d": {"e": None}})
    assert json.loads(encode_json("home-01", ok))["data"] == ok.data


def test_json_names_what_it_cannot_encode() -> None:
    with pytest.raises(CodecError, match="not encodable as JSON"):
        encode_json("home-01", Snapshot(T0, 1, {"x": 2**64}))
    with pytest.raises(CodecError, match="not encodable as JSON"):
        encode_json("home-01", Snapshot(T0, 1, {"x": object()}))
    # a naive time is taken as UTC; another zone is converted
    naive = encode_json("d", Snapshot(T0.replace(tzinfo=None), 1, {}))
    brussels = T0.astimezone(timezone(timedelta(hours=2)))
    assert (
        json.loads(naive)["ts"]
        == json.loads(encode_json("d", Snapshot(brussels, 1, {})))["ts"]
        == "2026-06-15T10:30:00.250000Z"
    )


@given(
    st.integers(min_value=-(2**80), max_value=2**80),
    st.integers(min_value=0, max_value=MAX_SCALE),
)
@settings(max_examples=2000, deadline=None)
def test_float_of_is_the_float_of_the_decimal_string(mantissa: int, scale: int) -> None:
    # the decoder divides (correctly rounded); encoders and files from before parsed the
    # decimal string: both must give the very same float, or old batches decode otherwise
    assert _float_of(mantissa, scale) == float(f"{mantissa}e-{scale}")
    assert _float_of(mantissa, scale).hex() == float(f"{mantissa}e-{scale}").hex()
