"""modbus_poll: config validation, the profile as a watched file, frame checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from nodes._modbus_profile import PROFILE_DIR
from nodes.modbus_poll import ModbusPoll, ModbusPollConfig, malformed
from runner import registry
from runner.errors import FlowInvalid
from runner.loader import load_text

FLOW = """\
flow: f
nodes:
  inverter:
    type: modbus_poll
    host: 192.0.2.10
    profile: {profile}
"""

PROFILE = """\
name: mine
address_convention: zero_based_wire
word_order: big
registers:
  - {key: p, address: 10, type: S32, unit: W, field: p_w}
"""


def test_registered_with_defaults_from_the_brief() -> None:
    assert registry.get("modbus_poll") is ModbusPoll
    cfg = ModbusPollConfig.model_validate({"host": "h", "profile": "sungrow_sh_rs"})
    assert (cfg.port, cfg.unit_id, cfg.inter_request_delay_ms) == (502, 1, 20)
    assert cfg.profile_model.name == "sungrow_sh_rs"


def test_the_profile_file_is_watched() -> None:
    spec = load_text(FLOW.format(profile="sungrow_sh_rt"), "f.yaml", env={})
    cfg = spec.nodes["inverter"].config
    assert cfg.watched_files() == (str(PROFILE_DIR / "sungrow_sh_rt.yaml"),)
    assert str(PROFILE_DIR / "sungrow_sh_rt.yaml") in spec.watch_paths


def test_an_edited_profile_changes_the_config(tmp_path: Path) -> None:
    own = tmp_path / "mine.yaml"
    own.write_text(PROFILE)
    before = ModbusPollConfig.model_validate({"host": "h", "profile": str(own)})
    again = ModbusPollConfig.model_validate({"host": "h", "profile": str(own)})
    own.write_text(PROFILE.replace("address: 10", "address: 12"))
    after = ModbusPollConfig.model_validate({"host": "h", "profile": str(own)})
    assert before == again
    assert before != after  # so a reload restarts the node with the new table


def test_an_invalid_profile_is_a_flow_error_with_its_own_position(tmp_path: Path) -> None:
    own = tmp_path / "bad.yaml"
    own.write_text(PROFILE.replace("type: S32", "type: F32"))
    with pytest.raises(FlowInvalid) as info:
        load_text(FLOW.format(profile=own), "f.yaml", env={})
    (err,) = info.value.errors
    assert (err.line, err.where) == (6, "nodes.inverter.profile")
    assert f"{own}:5:33: registers.0.type: Input should be" in err.message


def test_an_unknown_profile_names_the_builtin_ones() -> None:
    with pytest.raises(FlowInvalid) as info:
        load_text(FLOW.format(profile="sungrow_sh_xx"), "f.yaml", env={})
    (err,) = info.value.errors
    assert "huawei_sun2000, sungrow_sh_rs, sungrow_sh_rt" in err.message


@pytest.mark.parametrize(
    ("config", "loc"),
    [
        ({"host": "h", "profile": "sungrow_sh_rs", "port": 0}, ("port",)),
        ({"host": "h", "profile": "sungrow_sh_rs", "interval_s": 0}, ("interval_s",)),
        ({"host": "h", "profile": "sungrow_sh_rs", "timeout_ms": 0}, ("timeout_ms",)),
        (
            {"host": "h", "profile": "sungrow_sh_rs", "inter_request_delay_ms": -1},
            ("inter_request_delay_ms",),
        ),
        ({"host": "", "profile": "sungrow_sh_rs"}, ("host",)),
        ({"host": "h", "profile": "sungrow_sh_rs", "slave": 1}, ("slave",)),
    ],
)
def test_invalid_configs(config: dict[str, object], loc: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        ModbusPollConfig.model_validate(config)
    assert [e["loc"] for e in info.value.errors()] == [loc]


def test_frame_checks() -> None:
    # MBAP: tid 1, protocol 0, length, unit 1; then the PDU
    ok = bytes.fromhex("0001 0000 0007 01 04 04 0E28 00FA".replace(" ", ""))
    assert malformed(ok) is False
    assert malformed(ok[:9]) is None  # incomplete: wait for more
    exception = bytes.fromhex("0001 0000 0003 01 84 02".replace(" ", ""))
    assert malformed(exception) is False
    wrong_count = bytes.fromhex("0001 0000 0007 01 04 07 0E28 00FA".replace(" ", ""))
    assert malformed(wrong_count) is True
    odd_count = bytes.fromhex("0001 0000 0006 01 04 03 0E28 00".replace(" ", ""))
    assert malformed(odd_count) is True
    bad_protocol = bytes.fromhex("0001 0007 0007 01 04 04 0E28 00FA".replace(" ", ""))
    assert malformed(bad_protocol) is True
    other_function = bytes.fromhex("0001 0000 0006 01 10 0000 0001".replace(" ", ""))
    assert malformed(other_function) is True
