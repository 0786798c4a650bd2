"""Import hygiene: netplan's public names resolve lazily, and transferd starts light."""

import json
import subprocess
import sys

import pytest

import netplan


def test_every_public_netplan_name_resolves() -> None:
    for name in netplan.__all__:
        assert getattr(netplan, name) is not None, name
    assert set(netplan.__all__) == set(netplan._EXPORTS)


def test_unknown_netplan_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        netplan.no_such_name  # noqa: B018


def _imported_after(statement: str, modules: tuple[str, ...]) -> list[str]:
    code = (
        f"import json, sys; {statement}; "
        f"print(json.dumps(sorted(m for m in {modules!r} if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return list(json.loads(out.stdout))


def test_transferd_cli_starts_without_the_planner_stack_or_aiohttp() -> None:
    # Every `transferd send --wait` pays the CLI's start-up in its wall clock: scipy and
    # networkx cost ~0.4 s, aiohttp ~0.2 s; only `serve` needs aiohttp.
    heavy = ("scipy", "networkx", "netplan.report", "aiohttp")
    assert _imported_after("import transferd.cli", heavy) == []
    assert _imported_after("import transferd.daemon", heavy[:3]) == []


def test_transferd_client_commands_load_only_what_they_use() -> None:
    # Issue 11, round 4: `--help` loads no model at all, and what `send` imports builds no plan
    # model, no data-channel model and no rich (only a progress bar needs it).
    assert _imported_after("import transferd.cli", ("pydantic", "transferd.config")) == []
    send = ("import transferd.cli, transferd.config, transferd.net.local_client, "
            "transferd.protocol.local_api, transferd.site.keys, transferd.site.tls")
    heavy = ("netplan.plan", "transferd.protocol.channel", "rich", "aiohttp")
    assert _imported_after(send, heavy) == []


def test_netplan_never_imports_transferd() -> None:
    # One dependency direction: transferd reads netplan's plan contract; netplan, every module
    # of it, runs without transferd installed.
    code = (
        "import importlib, json, pkgutil, sys, netplan; "
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(netplan.__path__, "
        "'netplan.') if m.name != 'netplan.__main__']; "
        "[getattr(netplan, n) for n in netplan.__all__]; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'transferd')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_the_plan_contract_loads_without_the_planner_stack() -> None:
    heavy = ("scipy", "networkx", "numpy", "netplan.topology", "netplan.network")
    assert _imported_after("import netplan.plan", heavy) == []


def test_netplan_analyze_without_html_does_not_load_the_page_stack() -> None:
    # plotly and Jinja2 are the [html] extra: only --html loads them.
    statement = ("from click.testing import CliRunner; from netplan.cli import cli; "
                 "CliRunner().invoke(cli, ['analyze', 'topologies/onprem-data-cloud-burst-edge"
                 ".yaml', '--json'], catch_exceptions=False)")
    assert _imported_after(statement, ("plotly", "jinja2", "netplan.html")) == []
    assert _imported_after("import netplan.html", ("plotly", "jinja2")) == ["jinja2", "plotly"]


def test_the_tests_conftest_loads_the_benchmark_harness_only_for_a_netns_test() -> None:
    # Every test run imports tests/conftest.py; only the `netns` probe needs benchmarks.backends.
    assert _imported_after("import tests.conftest", ("benchmarks.backends", "benchmarks")) == []
