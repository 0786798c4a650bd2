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
from transferd import TrafficClass
from transferd.config import parse_config
from transferd.errors import ConfigError
from transferd.plan import link_settings, parse_plan
from transferd.testing import bound_socket, running_daemon, write_site_configs

CONFIG = """\
site: A
listen: 127.0.0.1:7701
data_dir: ./site-a
keys_dir: ./keys
traffic: {weights: {checkpoint: 3, sync: 1}}
peers:
  B: {url: "http://127.0.0.1:7702", rate_caps_mbps: {total: 900, sync: 800}}
  C: {url: "http://127.0.0.1:7703"}
"""

PLAN: dict[str, Any] = {
    "schema_version": 2,
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
    run = parse_plan(json.dumps(PLAN), parse_config(CONFIG))
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
        (_edited(["schema_version"], 1), "schema_version: 1 is not supported"),
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
        (_edited(["sites", 0, "links", 0, "class_weights", "sync"], 0),
         "sites[0].links[0].class_weights.sync: must be a bulk class with a value > 0, got 0"),
        (_edited(["sites", 0, "links", 0, "rate_caps_mbps", "control"], 5.0),
         "sites[0].links[0].rate_caps_mbps.control: must be a bulk class"),
    ],
)
def test_a_bad_plan_is_a_config_error_naming_the_field(plan: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_plan(json.dumps(plan), parse_config(CONFIG), source="plan.json")
    assert message in str(err.value)
    assert str(err.value).startswith("plan.json: ")


def test_a_shard_entry_is_mirrored_like_a_sync_entry_and_refused_under_raw() -> None:
    shard = {"path_prefix": "approved/docs/shard-0001/", "destination": "C",
             "traffic_class": "sync", "index": "docs", "shard": 1, "size_gb": 5.0}
    run = parse_plan(_edited(["sites", 0, "shards"], [shard]), parse_config(CONFIG))
    assert [(r.prefix, r.destination, r.dataset, r.rule) for r in run.sync] == [
        ("approved/d", "B", "d", "r"), ("approved/docs/shard-0001", "C", "docs", "shards:docs")]
    raw = {**shard, "path_prefix": "raw/docs/shard-0001/"}
    run = parse_plan(_edited(["sites", 0, "shards"], [raw]), parse_config(CONFIG))
    assert [r.where for r in run.refused] == ["sites[0].shards[0].path_prefix"]


def test_text_that_is_not_json_is_refused() -> None:
    with pytest.raises(ConfigError, match="JSON syntax error"):
        parse_plan("{nope", parse_config(CONFIG))


def test_plan_link_settings_override_the_config_and_keep_what_the_plan_leaves_out() -> None:
    config = parse_config(CONFIG)
    plan = parse_plan(PLAN, config)
    b = link_settings(config, "B", plan)
    mbps = 1e6 / 8  # bytes per second in one Mbit/s
    assert b.class_caps_bytes_per_s == {
        TrafficClass.SYNC: 40 * mbps,  # the plan's value wins over the config's 800
        TrafficClass.CHECKPOINT: 50 * mbps,
    }
    assert b.total_cap_bytes_per_s == 900 * mbps  # only the config sets it: kept
    assert b.bulk_weights == {TrafficClass.CHECKPOINT: 1.0, TrafficClass.SYNC: 100.0}
    # No link entry in the plan: the config's (traffic.weights, no caps).
    assert link_settings(config, "C", plan) == link_settings(config, "C")
    assert link_settings(config, "C").bulk_weights == {
        TrafficClass.CHECKPOINT: 3.0, TrafficClass.SYNC: 1.0}  # fmt: skip
    assert link_settings(config, "C").class_caps_bytes_per_s == {}


async def test_a_raw_entry_is_refused_logged_and_counted_and_never_sent(tmp_path: Path) -> None:
    sock = bound_socket()
    ports = {"A": sock.getsockname()[1], "B": 1}
    paths = write_site_configs(tmp_path, ports, watch={"poll_interval_s": 0.05})
    from transferd.config import load_config

    config = load_config(paths["A"])
    plan = _edited(["sites", 0, "sync", 0, "path_prefix"], "raw/d/")
    plan["sites"][0]["checkpoints"][0]["targets"] = ["B"]
    run = parse_plan(plan, config)
    assert run.sync == ()
    assert [r.where for r in run.refused] == ["sites[0].sync[0].path_prefix"]
    (tmp_path / "site-A" / "raw" / "d").mkdir(parents=True)
    (tmp_path / "site-A" / "raw" / "d" / "x.bin").write_bytes(b"secret")
    async with running_daemon(config, sock, plan=run) as daemon:
        assert daemon.metrics.value("transferd_policy_refusals_total", side="sender") == 1.0
        assert daemon.journal.jobs() == []
        # The rest of the plan is in force: B's link runs on the plan's weights and caps.
        scheduler = daemon.traffic["B"].pump.scheduler
        assert scheduler.bulk_weights == {TrafficClass.CHECKPOINT: 1.0, TrafficClass.SYNC: 100.0}
        assert scheduler.limiter is not None
        assert scheduler.limiter.rate_bytes_per_s(TrafficClass.SYNC) == 40e6 / 8


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


def test_sync_runner_sends_a_quiet_changed_folder_once_and_again_after_it_changes(
    tmp_path: Path,
) -> None:
    """The scheduling rules, with a fake clock and a recording submit: quiet period, no re-send
    of an unchanged folder, none while a job is active, a re-send after a change, a retry of a
    failed job only after RETRY_FAILED_AFTER_S."""
    import os

    from transferd.net.runners import RETRY_FAILED_AFTER_S, SyncRunner
    from transferd.plan import SyncRoute
    from transferd.site.journal import Journal
    from transferd.site.storage import LocalStorage
    from transferd.testing import FakeClock

    folder = tmp_path / "data" / "approved" / "d"
    folder.mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"one")
    os.utime(folder / "a.bin", (1000.0, 1000.0))
    os.utime(folder, (1000.0, 1000.0))
    journal = Journal(tmp_path / "journal.sqlite")
    clock = FakeClock(start=1000.0)
    calls: list[tuple[str, list[str], TrafficClass]] = []

    def submit(path: str, dests: list[str], cls: TrafficClass | None) -> list[str]:
        assert cls is not None
        calls.append((path, dests, cls))
        job = f"job-{len(calls)}"
        journal.add_job(job, path, dests[0], cls, clock())
        return [job]

    runner = SyncRunner(
        routes=(SyncRoute("approved/d", "B", TrafficClass.SYNC, "d", "r"),),
        storage=LocalStorage(tmp_path / "data"), journal=journal, submit=submit, clock=clock,
        quiet_period_s=5.0, poll_interval_s=1.0,
    )
    try:
        def scan() -> list[str]:
            return runner.submit_due(runner.scan())

        assert scan() == []  # changed 0 s ago: not quiet yet
        clock.advance(5.0)
        assert scan() == ["job-1"]
        assert calls == [("approved/d", ["B"], TrafficClass.SYNC)]
        (folder / "b.bin").write_bytes(b"two")
        os.utime(folder / "b.bin", (1006.0, 1006.0))
        os.utime(folder, (1006.0, 1006.0))  # the folder's own mtime moved with the new file
        clock.advance(10.0)
        assert scan() == []  # job-1 still queued: wait for it
        journal.finish_job("job-1", clock())
        assert scan() == ["job-2"]  # the folder changed since job-1
        journal.finish_job("job-2", clock())
        assert scan() == []  # unchanged since job-2
        journal.finish_job("job-2", clock(), ConfigError("disk gone"))
        assert scan() == []  # failed, but the retry interval has not passed
        clock.advance(RETRY_FAILED_AFTER_S)
        assert scan() == ["job-3"]
    finally:
        journal.close()


def test_a_bad_path_in_another_sites_checkpoint_entry_names_its_field() -> None:
    """Found by the plan fuzz (tests/faults): a run another site replicates here, with a path
    outside the tier folders, raised a PolicyViolation traceback instead of a ConfigError."""
    plan = copy.deepcopy(PLAN)
    plan["sites"][1]["checkpoints"][0]["path_prefix"] = "check points/v/"
    with pytest.raises(ConfigError, match=r"sites\[1\]\.checkpoints\[0\]\.path_prefix"):
        parse_plan(json.dumps(plan), parse_config(CONFIG))
