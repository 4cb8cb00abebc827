"""mqtt_in checks a compact batch's field names once a batch and finiteness only in its
RAW columns (`_batch_data`): the same result as checking each snapshot (`_data`), the same
reason when it refuses, over random batches with bad names, NaN, inf and foreign ids."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import pytest

from nodes._codec import Snapshot, decode_compact, encode_compact
from nodes.mqtt_in import Reject, _batch_data, _data
from runner import Scalar

T0 = datetime(2026, 11, 1, tzinfo=UTC)
DEVICE = "home-01"


def _value(rng: random.Random) -> Scalar:
    return rng.choice(
        [
            rng.randint(-(10**6), 10**6),
            round(rng.uniform(-5000, 5000), rng.randint(0, 3)),
            rng.random(),
            None,
            "t1",
            True,
            math.nan,
            math.inf,
            -math.inf,
        ]
    )


def _batch(rng: random.Random) -> list[Snapshot]:
    names = [f"f{i}" for i in range(rng.randint(1, 12))]
    if rng.random() < 0.1:
        names.append("")  # refused: 1 to 128 characters
    if rng.random() < 0.1:
        names.append("x" * 129)
    if rng.random() < 0.3:
        names.append("device_id")
    numeric_id = rng.random() < 0.1
    snaps = []
    for i in range(rng.randint(1, 30)):
        data: dict[str, Scalar] = {}
        for name in names:
            if rng.random() < 0.9:
                value = _value(rng)
                # mostly well-behaved: a bad value in some batches, not in every one
                if isinstance(value, float) and not math.isfinite(value) and rng.random() < 0.9:
                    value = 1.5
                data[name] = value
        if "device_id" in data:
            # in some batches a number: a column that is not RAW-coded must be looked at too
            data["device_id"] = 7 if numeric_id else DEVICE if rng.random() < 0.95 else "home-02"
        snaps.append(Snapshot(T0 + timedelta(seconds=i), i + 1, data))
    return snaps


def _outcome(fn: object) -> object:
    try:
        return fn()  # type: ignore[operator]
    except Reject as exc:
        return ("reject", str(exc))


@pytest.mark.parametrize("seed", range(8))
def test_batch_checks_agree_with_per_snapshot_checks(seed: int) -> None:
    rng = random.Random(seed)
    refused = accepted = 0
    for _ in range(250):
        batch = decode_compact(encode_compact(DEVICE, _batch(rng)))
        fast = _outcome(lambda b=batch: _batch_data(DEVICE, b))  # type: ignore[misc]
        slow = _outcome(lambda b=batch: [_data(DEVICE, s.data) for s in b.snapshots])  # type: ignore[misc]
        assert fast == slow
        if isinstance(slow, tuple):
            refused += 1
        else:
            accepted += 1
            assert [list(d) for d in fast] == [list(d) for d in slow]  # type: ignore[union-attr]
    assert refused and accepted  # both paths exercised
