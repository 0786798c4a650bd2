"""Loading a netplan plan into transferd: bad plans are errors naming the field (exit 2 from the
CLI, no traceback); plan link settings override the config; a raw entry is refused and counted."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration._procs import env
from transferd._classes import TrafficClass
from transferd._plan_exec import apply_links, parse_site_plan
from transferd.config import parse_config
from transferd.errors import ConfigError
from transferd.testing import bound_socket, running_daemon, write_site_configs

CONFIG = """\
site: A
listen: 127.0.0.1:7701
data_dir: ./site-a
keys_dir: ./keys
traffic: {weights: {checkpoint: 3, sync: 1}}
peers:
  B: {url: "http://127.0.0.1:7702", rate_caps: {total_mbit_s: 900, sync_mbit_s: 800}}
  C: {url: "http://127.0.0.1:7703"}
"""

PLAN: dict[str, Any] = {
    "schema_version": 1,
    "topology": "t",
    "sites": [
        {
            "site": "A",
            "sync": [
                {"path_prefix": "approved/d/", "destination": "B", "traffic_class": "sync",
                 "dataset": "d", "rule": "r"}
            ],
            "checkpoints": [
                {"workload": "w", "path_prefix": "checkpoints/w/", "targets": ["C"],
                 "every_hours": 1.0, "retain": 2}
            ],
            "links": [
                {"peer": "B", "class_weights": {"checkpoint": 1, "sync": 100},
                 "rate_caps_mbps": {"checkpoint": 50.0, "sync": 40.0}}
            ],
        },
        {
            "site": "B",
            "checkpoints": [
                {"workload": "v", "path_prefix": "checkpoints/v/", "targets": ["A"],
                 "every_hours": 2.0, "retain": 4}
            ],
        },
    ],
}


def _edited(path: list[Any], value: Any) -> dict[str, Any]:
    plan = copy.deepcopy(PLAN)
    node = plan
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return plan


def test_a_good_plan_gives_this_sites_routes_targets_and_incoming_retention() -> None:
    run = parse_site_plan(json.dumps(PLAN), parse_config(CONFIG))
    [route] = run.sync
    assert (route.prefix, route.destination, route.traffic_class) == (
        "approved/d", "B", TrafficClass.SYNC)
    assert run.checkpoint_targets("checkpoints/w/step-3", ["B"]) == ["C"]
    assert run.checkpoint_targets("checkpoints/other/step-1", ["B"]) == ["B"]  # config's
    assert run.incoming_retention == {"checkpoints/v": 4}
    assert run.refused == ()


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (_edited(["schema_version"], 2), "schema_version: 2 is not supported"),
        (_edited(["sites", 0, "sync", 0, "traffic_class"], "bulk"),
         "sites[0].sync[0].traffic_class"),
        (_edited(["sites", 0, "sync", 0, "traffic_class"], "interactive"),
         "sites[0].sync[0].traffic_class: 'interactive' is not a bulk class"),
        (_edited(["sites", 0, "sync", 0, "destination"], "Z"),
         "sites[0].sync[0].destination: 'Z' is not a peer in the site config"),
        (_edited(["sites", 0, "checkpoints", 0, "targets"], ["B", "Q"]),
         "sites[0].checkpoints[0].targets[1]: 'Q' is not a peer"),
        (_edited(["sites", 0, "sync", 0, "path_prefix"], "datasets/d/"),
         "sites[0].sync[0].path_prefix: 'datasets/d' is not under a tier folder"),
        (_edited(["sites", 0, "checkpoints", 0, "retain"], 0), "sites[0].checkpoints[0].retain"),
        (_edited(["sites", 0, "site"], "Q"), "the plan has no site 'A'"),
    ],
)
def test_a_bad_plan_is_a_config_error_naming_the_field(plan: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_site_plan(json.dumps(plan), parse_config(CONFIG), source="plan.json")
    assert message in str(err.value)
    assert str(err.value).startswith("plan.json: ")


def test_text_that_is_not_json_is_refused() -> None:
    with pytest.raises(ConfigError, match="plan is not JSON"):
        parse_site_plan("{nope", parse_config(CONFIG))


def test_plan_link_settings_override_the_config_and_keep_what_the_plan_leaves_out() -> None:
    config = parse_config(CONFIG)
    merged = apply_links(config, parse_site_plan(PLAN, config))
    b = merged.peers["B"]
    assert b.rate_caps.sync_mbit_s == 40.0  # the plan's value wins over the config's 800
    assert b.rate_caps.checkpoint_mbit_s == 50.0
    assert b.rate_caps.total_mbit_s == 900.0  # only the config sets it: kept
    assert b.weights is not None
    assert (b.weights.checkpoint, b.weights.sync) == (1.0, 100.0)
    assert merged.peers["C"] == config.peers["C"]  # no link entry in the plan


async def test_a_raw_entry_is_refused_logged_and_counted_and_never_sent(tmp_path: Path) -> None:
    sock = bound_socket()
    ports = {"A": sock.getsockname()[1], "B": 1}
    paths = write_site_configs(tmp_path, ports, watch={"poll_interval_s": 0.05})
    from transferd.config import load_config

    config = load_config(paths["A"])
    plan = _edited(["sites", 0, "sync", 0, "path_prefix"], "raw/d/")
    plan["sites"][0]["checkpoints"][0]["targets"] = ["B"]
    run = parse_site_plan(plan, config)
    assert run.sync == ()
    assert [f for f, _ in run.refused] == ["sites[0].sync[0].path_prefix"]
    (tmp_path / "site-A" / "raw" / "d").mkdir(parents=True)
    (tmp_path / "site-A" / "raw" / "d" / "x.bin").write_bytes(b"secret")
    async with running_daemon(config, sock, plan=run) as daemon:
        assert daemon.metrics.value("transferd_policy_refusals_total", side="sender") == 1.0
        assert daemon.journal.jobs() == []


def test_cli_serve_with_a_bad_plan_exits_2_naming_the_field(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(CONFIG)
    (tmp_path / "plan.json").write_text(json.dumps(_edited(["schema_version"], 7)))
    done = subprocess.run(
        [sys.executable, "-m", "transferd", "serve", "--config", str(tmp_path / "a.yaml"),
         "--plan", str(tmp_path / "plan.json")],
        env=env(), capture_output=True, timeout=60,
    )
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert "schema_version: 7 is not supported" in err
    assert "Traceback" not in err
