"""Register profiles: the built-in tables, loading with file:line:col errors, the block planner."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodes._modbus_profile import (
    PROFILE_DIR,
    Profile,
    ProfileInvalid,
    load_profile,
    parse_profile,
    plan,
)

MINI = """\
name: mini
address_convention: one_based_doc
word_order: little
model_register: code
models:
  0x0001: {name: A}
  0x0002: {name: B}
registers:
  - {key: code, address: 100, type: U16}
  - {key: p, address: 200, type: S32, unit: W, field: p_w}
  - {key: q, address: 202, type: U16}
  - {key: only_b, address: 203, type: U16, models: [B]}
  - {key: after_gap, address: 205, type: U16}
  - {key: opt, address: 206, type: U16, optional: true}
  - {key: next, address: 207, type: U16}
  - {key: h, address: 200, kind: holding, type: U16}
  - {key: slow, address: 201, kind: holding, type: U16, poll_every: 10}
"""


def spans(blocks: list) -> list[tuple[str, int, int]]:
    return [(b.kind, b.start, b.count) for b in blocks]


def test_builtin_profiles_load_with_their_conventions() -> None:
    rs = load_profile("sungrow_sh_rs")[1]
    rt = load_profile("sungrow_sh_rt")[1]
    hw = load_profile("huawei_sun2000")[1]
    assert (rs.address_convention, rs.word_order, rs.wire_offset) == ("one_based_doc", "little", 1)
    assert (rt.address_convention, rt.word_order) == ("one_based_doc", "little")
    assert (hw.address_convention, hw.word_order, hw.wire_offset) == ("zero_based_wire", "big", 0)
    # the fields the brief asks for, from both Sungrow profiles
    wanted = {
        "pv_power_w",
        "pv_daily_kwh",
        "pv_total_kwh",
        "mppt1_voltage_v",
        "mppt1_current_a",
        "mppt2_voltage_v",
        "mppt2_current_a",
        "load_power_w",
        "grid_power_w",
        "battery_power_w",
        "battery_soc_pct",
        "battery_soh_pct",
        "battery_temp_c",
        "battery_daily_charge_kwh",
        "battery_daily_discharge_kwh",
        "inverter_ac_power_w",
        "inverter_state",
        "ems_mode",
    }
    assert wanted <= set(rs.fields())
    assert wanted <= set(rt.fields())
    assert {"power_l1_w", "power_l2_w", "power_l3_w"} <= set(rt.fields())
    assert "power_l1_w" not in rs.fields()
    assert {"pv_power_w", "grid_power_w", "battery_power_w", "battery_soc_pct"} <= set(hw.fields())


def test_sungrow_models_come_from_the_reference_table() -> None:
    rs = load_profile("sungrow_sh_rs")[1]
    rt = load_profile("sungrow_sh_rt")[1]
    assert rs.model_name(0x0D17) == "SH3.0RS"
    assert rs.model_name(0x0D0D) == "SH3.6RS"
    assert rs.model_name(0x0D1B) == "SH10RS"
    assert rt.model_name(0x0E00) == "SH5.0RT"
    assert rt.model_name(0x0E03) == "SH10RT"
    assert rs.model_name(0x0E03) is None  # an RT is not an RS


def test_sungrow_rt_blocks_by_document_number() -> None:
    # written from the reference §2.2: contiguous runs of the listed registers, wire = doc - 1
    rt = load_profile("sungrow_sh_rt")[1]
    blocks = plan(rt, "SH10RT", skip=["device_type_code"])
    assert [(b.kind, b.start, b.count, b.wire_start) for b in blocks] == [
        ("input", 5011, 4, 5010),
        ("input", 5017, 2, 5016),
        ("input", 5214, 2, 5213),
        ("input", 5601, 8, 5600),
        ("input", 5631, 1, 5630),
        ("input", 13000, 15, 12999),
        ("input", 13017, 13, 13016),
        ("input", 13031, 12, 13030),
        ("holding", 13050, 1, 13049),
    ]
    assert blocks[-1].poll_every == 12
    assert blocks[0].label == "input 5011-5014 (wire 5010-5013)"
    assert blocks[-1].label == "holding 13050 (wire 13049)"


def test_sungrow_rs_mppt4_only_on_sh8_and_sh10() -> None:
    rs = load_profile("sungrow_sh_rs")[1]
    starts = {m: [b.start for b in plan(rs, m)] for m in ("SH10RS", "SH8.0RS", "SH5.0RS", None)}
    assert 5115 in starts["SH10RS"]
    assert 5115 in starts["SH8.0RS"]
    assert 5115 not in starts["SH5.0RS"]
    assert 5115 not in starts[None]  # unknown model: what every model has
    # the RS meter is single phase: 5601-5602 only
    assert [(b.start, b.count) for b in plan(rs, "SH5.0RS") if b.start == 5601] == [(5601, 2)]


def test_huawei_addresses_are_used_as_is() -> None:
    hw = load_profile("huawei_sun2000")[1]
    blocks = plan(hw, None)
    assert all(b.kind == "holding" and b.start == b.wire_start for b in blocks)
    assert [(b.start, b.count) for b in blocks] == [
        (32064, 2),
        (32080, 2),
        (32089, 1),
        (32106, 2),
        (32114, 2),
        (37113, 2),
        (37119, 4),
        (37760, 1),
        (37765, 2),
        (37784, 4),
    ]


def test_planner_splits_at_gaps_models_kinds_optional_and_cadence() -> None:
    p = parse_profile(MINI, "mini.yaml")
    assert spans(plan(p, "A", skip=["code"])) == [
        ("input", 200, 3),  # 200-201 S32, 202; 203 is B's only: A stops at 202
        ("input", 205, 1),  # 204 is not declared: a gap
        ("input", 206, 1),  # optional: alone
        ("input", 207, 1),
        ("holding", 200, 1),
        ("holding", 201, 1),  # another cadence
    ]
    assert spans(plan(p, "B", skip=["code"]))[:2] == [("input", 200, 4), ("input", 205, 1)]
    assert plan(p, "B")[0].start == 100  # the model register is not skipped unless asked
    # wire addresses: one less than the document's
    assert [b.wire_start for b in plan(p, "A", skip=["code"])][:2] == [199, 204]


def test_planner_never_exceeds_the_block_limit() -> None:
    regs = "\n".join(f"  - {{key: r{i}, address: {1000 + i}, type: U16}}" for i in range(250))
    text = f"name: big\naddress_convention: zero_based_wire\nword_order: big\nregisters:\n{regs}\n"
    p = parse_profile(text, "big.yaml")
    assert spans(plan(p, None)) == [
        ("input", 1000, 100),
        ("input", 1100, 100),
        ("input", 1200, 50),
    ]
    small = parse_profile(text + "max_block_registers: 30\n", "big.yaml")
    sizes = [b.count for b in plan(small, None)]
    assert max(sizes) == 30 and sum(sizes) == 250
    # a 32-bit value is never cut in two at a block boundary
    regs32 = "\n".join(f"  - {{key: r{i}, address: {2 * i}, type: U32}}" for i in range(60))
    text32 = (
        f"name: b\naddress_convention: zero_based_wire\nword_order: big\nregisters:\n{regs32}\n"
    )
    assert spans(plan(parse_profile(text32, "b.yaml"), None)) == [
        ("input", 0, 100),
        ("input", 100, 20),
    ]


def errors_of(text: str) -> list[str]:
    with pytest.raises(ProfileInvalid) as info:
        parse_profile(text, "p.yaml")
    return info.value.lines


def test_errors_point_at_file_line_and_column() -> None:
    bad = MINI.replace("{key: q, address: 202, type: U16}", "{key: q, address: 202, type: U17}")
    assert errors_of(bad) == [
        "p.yaml:11:34: registers.2.type: Input should be 'U16', 'S16', 'U32', 'S32' or 'UTF8'"
    ]
    unit = MINI.replace("unit: W, field: p_w", "unit: W, field: p_kw")
    (line,) = errors_of(unit)
    assert line.startswith("p.yaml:10:5: registers.1: ")
    assert "field 'p_kw' is in W: name it *_w" in line
    extra = MINI.replace("word_order: little", "word_order: little\nwordorder: big")
    assert errors_of(extra) == ["p.yaml:4:12: wordorder: Extra inputs are not permitted"]


def test_cross_checks_are_located_too() -> None:
    unknown_model = MINI.replace("models: [B]", "models: [C]")
    assert errors_of(unknown_model) == ["p.yaml:12:53: registers.3.models.0: unknown model 'C'"]
    overlap = MINI.replace("{key: q, address: 202", "{key: q, address: 201")
    (line,) = errors_of(overlap)
    assert line == "p.yaml:11:23: registers.2.address: overlaps p at input 201"
    derived = MINI + "derived:\n  x_w:\n    prefer:\n      - {register: nope}\n"
    assert errors_of(derived) == ["p.yaml:21:20: derived.x_w.prefer.0.register: no register 'nope'"]
    twice = MINI.replace("{key: q, address: 202, type: U16}", "{key: p, address: 202, type: U16}")
    assert errors_of(twice) == ["p.yaml:11:11: registers.2.key: key 'p' is used twice"]


def test_yaml_syntax_errors_are_located() -> None:
    (line,) = errors_of("name: x\nregisters: [\n")
    assert line.startswith("p.yaml:3:1: ")


def test_unknown_profile_names_the_builtins(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"profiles: huawei_sun2000, sungrow_sh_rs, sungrow_sh_rt$"
    ):
        load_profile("sungrow_sh_xx")
    with pytest.raises(ValueError, match="a name"):
        load_profile("Bad Name")
    own = tmp_path / "mine.yaml"
    own.write_text(MINI)
    path, p = load_profile(str(own))
    assert path == own and isinstance(p, Profile) and p.name == "mini"
    assert load_profile("sungrow_sh_rs")[0] == PROFILE_DIR / "sungrow_sh_rs.yaml"


def test_an_edited_profile_is_reloaded(tmp_path: Path) -> None:
    own = tmp_path / "mine.yaml"
    own.write_text(MINI)
    first = load_profile(str(own))[1]
    own.write_text(MINI.replace("name: mini", "name: mini2") + "\n")
    second = load_profile(str(own))[1]
    assert (first.name, second.name) == ("mini", "mini2")
