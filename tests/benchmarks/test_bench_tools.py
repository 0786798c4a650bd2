"""The transferd variants compared in the same run follow what the daemon can do, and say so
when it cannot; percentiles of message latencies."""

from __future__ import annotations

import pytest

from benchmarks.errors import ToolError
from benchmarks.message_trace import percentile
from benchmarks.tools import NOT_YET_SUPPORTED, _variant

CORE = {"traffic": False, "messages": False}
CLASSES = {"traffic": True, "messages": True}


def test_one_stream_variant_pins_streams_and_turns_adaptation_off_where_it_exists() -> None:
    assert _variant("transferd-1stream", CORE) == {"streams": 1}
    assert _variant("transferd-1stream", CLASSES) == {
        "streams": 1, "traffic": {"adaptive_streams": False}}
    assert _variant("transferd", CLASSES) == {}


def test_shared_pool_baseline_needs_traffic_classes() -> None:
    assert _variant("transferd-shared-pool", CLASSES) == {"traffic": {"shared_pool": True}}
    with pytest.raises(ToolError) as err:
        _variant("transferd-shared-pool", CORE)
    assert err.value.reason.startswith(NOT_YET_SUPPORTED)
    assert "traffic.shared_pool" in err.value.reason


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0


def test_start_count_variants_set_the_controllers_start_and_keep_it_adaptive() -> None:
    assert _variant("transferd-4streams", CLASSES) == {"streams": 4}
    assert _variant("transferd-8streams", CORE) == {"streams": 8}
    assert _variant("transferd-warm", CLASSES) == {}  # only what runs before the timed send
