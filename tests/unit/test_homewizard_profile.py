"""The homewizard_p1 field map: every fixture payload -> canonical values, written by hand.

Expected values come from the fixture files and reference/devices.md §1.3/§1.5/§1.9:
timestamps are Europe/Brussels local time (CET = UTC+1 in January, CEST = UTC+2 in June),
`external[]` gas and water meters win over v1's deprecated total_gas_m3, a missing key is
a null field.
"""

from __future__ import annotations

import json
from datetime import UTC
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from nodes._fieldmap import FieldMap, compile_path, load_profile, lookup
from nodes._homewizard import HOMEWIZARD_CA_PEM, P1Target, iso_local_to_utc, yymmddhhmmss_to_utc
from nodes.http_poll import HttpPollConfig, build_field_map

FIXTURES = Path(__file__).parents[1] / "fixtures" / "homewizard"
BRUSSELS = ZoneInfo("Europe/Brussels")

ALL_NULL: dict[str, Any] = dict.fromkeys(
    [
        "grid_power_w",
        "grid_import_t1_kwh",
        "grid_import_t2_kwh",
        "grid_export_t1_kwh",
        "grid_export_t2_kwh",
        "grid_avg_15m_w",
        "grid_monthly_peak_w",
        "grid_monthly_peak_ts",
        "power_l1_w",
        "power_l2_w",
        "power_l3_w",
        "voltage_l1_v",
        "voltage_l2_v",
        "voltage_l3_v",
        "current_l1_a",
        "current_l2_a",
        "current_l3_a",
        "grid_frequency_hz",
        "tariff",
        "meter_ts",
        "gas_total_m3",
        "gas_ts",
        "water_total_m3",
        "water_ts",
    ]
)

EXPECTED: dict[str, dict[str, Any]] = {
    "v1-data-3phase-gas.json": {
        **ALL_NULL,
        "grid_power_w": -543,
        "grid_import_t1_kwh": 10830.511,
        "grid_import_t2_kwh": 2948.827,
        "grid_export_t1_kwh": 0,
        "grid_export_t2_kwh": 0,
        "grid_avg_15m_w": 123.0,
        "grid_monthly_peak_w": 1111.0,  # from `montly_power_peak_w`
        "grid_monthly_peak_ts": "2023-01-01T07:00:10Z",  # 230101080010 CET
        "power_l1_w": -676,
        "power_l2_w": 133,
        "power_l3_w": 0,
        # no active_voltage_* keys in this fixture: null
        "current_l1_a": -4,
        "current_l2_a": 2,
        "current_l3_a": 0,
        "grid_frequency_hz": 50,
        "tariff": 2,
        "gas_total_m3": 111.111,  # external gas_meter, not total_gas_m3 2569.646
        "gas_ts": "2021-06-06T12:00:10Z",  # 210606140010 CEST
        "water_total_m3": 444.444,  # external water_meter (not warm_water_meter 333.333)
        "water_ts": "2021-06-06T12:00:10Z",
    },
    "v1-data-nulls.json": {
        **ALL_NULL,
        "grid_power_w": -543,
        "grid_import_t1_kwh": 10830.511,
        "grid_import_t2_kwh": 2948.827,
        "grid_export_t1_kwh": 1285.951,
        "grid_export_t2_kwh": 2876.51,
        "power_l1_w": -676,
        "power_l2_w": 133,
        "power_l3_w": 0,
        # total_gas_m3 and gas_timestamp are explicit nulls, no external[]: null
    },
    "v2-measurement-3phase-gas-water.json": {
        **ALL_NULL,
        "grid_power_w": -543,
        "grid_import_t1_kwh": 10830.511,
        "grid_import_t2_kwh": 2948.827,
        "grid_export_t1_kwh": 0,
        "grid_export_t2_kwh": 0,
        "grid_avg_15m_w": 123.0,
        "grid_monthly_peak_w": 1111.0,
        "grid_monthly_peak_ts": "2024-06-04T08:11:22Z",  # 10:11:22 CEST
        "power_l1_w": -676,
        "power_l2_w": 133,
        "power_l3_w": 0,
        "current_l1_a": -4,
        "current_l2_a": 2,
        "current_l3_a": 0,
        "tariff": 2,
        "meter_ts": "2024-06-28T12:12:34Z",  # 14:12:34 CEST
        "gas_total_m3": 2569.646,
        "gas_ts": "2024-06-28T12:00:00Z",
        "water_total_m3": 123.456,
        "water_ts": "2024-06-28T12:05:00Z",
    },
    "v2-measurement-1phase.json": {
        **ALL_NULL,
        "grid_power_w": -678,
        "grid_import_t1_kwh": 10830.511,
        "grid_import_t2_kwh": 2948.827,
        "grid_export_t1_kwh": 1285.951,
        "grid_export_t2_kwh": 2876.51,
        "power_l1_w": -676,
        "meter_ts": "2024-06-28T12:12:34Z",
    },
}


def field_map(api: str) -> FieldMap:
    extra = {"token_file": "/nonexistent"} if api == "v2" else {}
    config = HttpPollConfig.model_validate(
        {"profile": "homewizard_p1", "host": "192.0.2.1", "api": api, **extra}
    )
    return build_field_map(config)


@pytest.mark.parametrize("fixture", sorted(EXPECTED))
def test_fixture_maps_to_the_canonical_values(fixture: str) -> None:
    payload = json.loads((FIXTURES / fixture).read_text())
    bad: list[str] = []
    got = field_map(fixture[:2]).apply(payload, lambda name, *_: bad.append(name))
    assert got == EXPECTED[fixture]
    assert list(got) == list(ALL_NULL)  # the same fields in the same order for v1 and v2
    assert bad == []
    # the value types survive: integers stay integers
    assert type(got["grid_power_w"]) is int


def test_an_empty_payload_is_all_null_not_an_error() -> None:
    for api in ("v1", "v2"):
        assert field_map(api).apply({}, lambda *a: pytest.fail(f"{a}")) == ALL_NULL


def test_v1_total_gas_is_used_only_without_an_external_gas_meter() -> None:
    payload = {"total_gas_m3": 2569.646, "gas_timestamp": 231231235959}
    got = field_map("v1").apply(payload, lambda *a: None)
    assert got["gas_total_m3"] == 2569.646
    assert got["gas_ts"] == "2023-12-31T22:59:59Z"
    payload["external"] = [
        {"type": "water_meter", "timestamp": 231231120000, "value": 5.5, "unit": "m3"},
        {"type": "gas_meter", "timestamp": 231231120000, "value": 7.25, "unit": "m3"},
        {"type": "gas_meter", "timestamp": 231231120500, "value": 99.0, "unit": "m3"},
    ]
    got = field_map("v1").apply(payload, lambda *a: None)
    assert (got["gas_total_m3"], got["gas_ts"]) == (7.25, "2023-12-31T11:00:00Z")  # the first
    assert (got["water_total_m3"], got["water_ts"]) == (5.5, "2023-12-31T11:00:00Z")


def test_a_value_of_the_wrong_type_is_null_and_reported() -> None:
    bad: list[tuple[str, Any, str]] = []
    got = field_map("v2").apply(
        {
            "power_w": "lots",
            "tariff": 7,
            "timestamp": "yesterday",
            "monthly_power_peak_timestamp": 20240604,
            "energy_import_t1_kwh": True,
            "power_l1_w": 12.5,
        },
        lambda name, value, how, exc: bad.append((name, value, how)),
    )
    assert got["grid_power_w"] is None
    assert got["tariff"] is None
    assert got["meter_ts"] is None
    assert got["grid_monthly_peak_ts"] is None
    assert got["grid_import_t1_kwh"] is None
    assert got["power_l1_w"] == 12.5
    assert bad == [
        ("grid_power_w", "lots", "number"),
        ("grid_import_t1_kwh", True, "number"),
        ("grid_monthly_peak_ts", 20240604, "timestamp_iso_local"),
        ("tariff", 7, "tariff"),
        ("meter_ts", "yesterday", "timestamp_iso_local"),
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (230101080010, "2023-01-01T07:00:10Z"),  # winter: UTC+1
        (210606140010, "2021-06-06T12:00:10Z"),  # summer: UTC+2
        ("240331015959", "2024-03-31T00:59:59Z"),  # the last second before the spring change
        (240331030000, "2024-03-31T01:00:00Z"),  # the first after it
        (10101000000, "2000-12-31T23:00:00Z"),  # year 01 loses its leading zero as an int
    ],
)
def test_v1_timestamps_are_brussels_local_time(value: int | str, expected: str) -> None:
    assert yymmddhhmmss_to_utc(value, BRUSSELS) == expected


@pytest.mark.parametrize("value", [0, 231301000000, -5, 1234567890123, "abc", True, 1.5, None])
def test_v1_timestamp_garbage_is_refused(value: Any) -> None:
    with pytest.raises(ValueError):
        yymmddhhmmss_to_utc(value, BRUSSELS)


def test_v2_timestamps_are_brussels_local_time_unless_they_carry_an_offset() -> None:
    assert iso_local_to_utc("2024-06-28T14:12:34", BRUSSELS) == "2024-06-28T12:12:34Z"
    assert iso_local_to_utc("2024-01-28T14:12:34", BRUSSELS) == "2024-01-28T13:12:34Z"
    # the autumn's repeated hour is read as the first (summer) one
    assert iso_local_to_utc("2024-10-27T02:30:00", BRUSSELS) == "2024-10-27T00:30:00Z"
    assert iso_local_to_utc("2024-06-28T14:12:34+00:00", BRUSSELS) == "2024-06-28T14:12:34Z"
    with pytest.raises(ValueError):
        iso_local_to_utc(20240628, BRUSSELS)


def test_paths_keys_indexes_and_matches() -> None:
    doc = {"a": {"b": [{"c": 1}, {"c": 2, "k": "x"}]}, "n": [{"t": 3, "v": "three"}]}
    assert lookup(doc, compile_path("a.b[1].c")) == 2
    assert lookup(doc, compile_path("a.b[k=x].c")) == 2
    assert lookup(doc, compile_path("n[t=3].v")) == "three"  # numbers match their text
    assert lookup(doc, compile_path("a.b[5].c")) is None
    assert lookup(doc, compile_path("a.b.c")) is None  # a key on a list: missing, not an error
    assert lookup(doc, compile_path("a[0]")) is None  # an index on a mapping
    assert lookup([7, 8], compile_path("[1]")) == 8


@pytest.mark.parametrize("path", ["", ".a", "a..b", "a[", "a[x]", "a[=1]", "a]b", "a b"])
def test_malformed_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError):
        compile_path(path)


def test_the_profile_file_is_valid_and_both_apis_give_the_same_fields() -> None:
    profile = load_profile("homewizard_p1")
    assert profile.min_interval_s == 0.5
    assert profile.v1.path == "/api/v1/data"
    assert profile.v2.path == "/api/measurement"
    assert list(profile.v1.fields) == list(profile.v2.fields) == list(ALL_NULL)


def test_the_pinned_ca_is_the_homewizard_appliance_access_ca() -> None:
    ca = x509.load_pem_x509_certificate(HOMEWIZARD_CA_PEM.encode())
    assert ca.subject.rfc4514_string() == "CN=Appliance Access CA,O=HomeWizard,ST=ZH,C=NL"
    assert ca.issuer == ca.subject
    ca.verify_directly_issued_by(ca)  # self-signed: the signature checks out
    assert ca.not_valid_after_utc.astimezone(UTC).year == 2031
    assert (
        ca.fingerprint(hashes.SHA256()).hex()
        == "4ec277e62033fae8bc373e3f2a976676d3f665683873f1ea8e3bdf78ac680003"
    )


def test_urls_and_the_pairing_hint_for_a_real_device() -> None:
    real = P1Target("192.0.2.1", "v2", "/api/measurement", token_file="/etc/flowrun/p1.token")
    assert real.base_url() == "https://192.0.2.1"
    assert (
        real.pair_hint() == "flowrun homewizard-pair 192.0.2.1 --token-file /etc/flowrun/p1.token"
    )
    assert (
        P1Target("fe80::1", "v1", "/api/v1/data", port=8081).base_url() == "http://[fe80::1]:8081"
    )
