"""http_poll config: the vendor's interval limit, the combinations, located errors."""

from __future__ import annotations

import pytest

from nodes._fieldmap import profile_path
from nodes.http_poll import HttpPoll, HttpPollConfig
from runner import registry
from runner.errors import FlowInvalid
from runner.loader import load_text


def errors(text: str) -> list[str]:
    with pytest.raises(FlowInvalid) as info:
        load_text(text, "edge.yaml", env={})
    return [str(e) for e in info.value.errors]


def test_registered_as_a_source() -> None:
    assert registry.get("http_poll") is HttpPoll
    assert HttpPoll.config_model is HttpPollConfig
    assert HttpPoll.role == "source"
    assert registry.summary(HttpPoll).startswith("Polls an HTTP JSON endpoint")


def test_homewizard_interval_below_half_a_second_is_refused_at_its_line() -> None:
    text = """\
flow: edge
nodes:
  p1:
    type: http_poll
    profile: homewizard_p1
    host: 192.0.2.1
    interval_s: 0.4
"""
    assert errors(text) == [
        "edge.yaml:7:17: nodes.p1.interval_s: "
        "must be at least 0.5 for profile homewizard_p1 (the vendor's limit)"
    ]
    ok = load_text(text.replace("0.4", "0.5"), "edge.yaml", env={})
    config = ok.nodes["p1"].config
    assert isinstance(config, HttpPollConfig) and config.interval_s == 0.5


def test_generic_polling_may_be_faster_than_the_homewizard_limit() -> None:
    config = HttpPollConfig.model_validate(
        {"url": "http://127.0.0.1:9/x", "fields": {"a": "a"}, "interval_s": 0.05}
    )
    assert config.interval_s == 0.05
    with pytest.raises(ValueError, match="greater than 0"):
        HttpPollConfig.model_validate(
            {"url": "http://127.0.0.1:9/x", "fields": {"a": "a"}, "interval_s": 0}
        )


def test_a_bad_field_path_points_at_its_key() -> None:
    text = """\
flow: edge
nodes:
  api:
    type: http_poll
    url: http://127.0.0.1:9/data
    fields:
      data.power: grid_power_w
      data[x: pv_power_w
"""
    (err,) = errors(text)
    assert err.startswith("edge.yaml:8:15: nodes.api.fields.data[x: bad path")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"fields": {"a": "a"}}, "give `url` (generic) or `profile` with `host`"),
        ({"url": "http://127.0.0.1/x"}, "give `fields`"),
        ({"url": "ftp://127.0.0.1/x", "fields": {"a": "a"}}, "an http:// or https:// URL"),
        (
            {"url": "http://127.0.0.1/x", "fields": {"a": "a"}, "host": "h"},
            "host: only with a profile",
        ),
        ({"profile": "homewizard_p1"}, "profile homewizard_p1 needs `host`"),
        (
            {"profile": "homewizard_p1", "host": "h", "url": "http://h/api/v1/data"},
            "url: not with profile homewizard_p1",
        ),
        (
            {"profile": "homewizard_p1", "host": "h", "api": "v2"},
            "api v2 needs `token_file` (create it with `flowrun homewizard-pair h",
        ),
        (
            {"profile": "homewizard_p1", "host": "h", "token_file": "/t"},
            "token_file: only for api v2",
        ),
        ({"profile": "homewizard_p2", "host": "h"}, "homewizard_p1"),
        ({"url": "http://h/x", "fields": {"a": "Bad-Name"}}, "not snake_case"),
        ({"url": "http://h/x", "fields": {"a": "x", "b": "x"}}, "'x' is given twice"),
        ({"url": "http://h/x", "fields": {"a": "a"}, "timezone": "Mars/Olympus"}, "time zone"),
        (
            {
                "profile": "homewizard_p1",
                "host": "h",
                "api": "v2",
                "token_file": "/t",
                "serial": "a/b",
            },
            "pattern",
        ),
    ],
)
def test_invalid_combinations_say_what_to_do(config: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        HttpPollConfig.model_validate(config)
    assert message in str(info.value)


def test_v2_with_everything_and_the_profile_is_watched() -> None:
    config = HttpPollConfig.model_validate(
        {
            "profile": "homewizard_p1",
            "host": "192.0.2.1",
            "api": "v2",
            "token_file": "/etc/flowrun/p1.token",
            "serial": "5c2fafaabbcc",
            "fields": {"any_power_fail_count": "power_fail_count"},
        }
    )
    assert config.watched_files() == (str(profile_path("homewizard_p1")),)
    assert config.interval_s == 1.0 and config.timeout_ms == 2000
    generic = HttpPollConfig.model_validate({"url": "http://h/x", "fields": {"a": "a"}})
    assert generic.watched_files() == ()
