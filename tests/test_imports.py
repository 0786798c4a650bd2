"""Import hygiene: netplan's public names resolve lazily, and transferd starts light."""

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


def test_transferd_cli_does_not_import_the_planner_stack() -> None:
    # Every `transferd send` pays the CLI's import time; scipy and networkx cost ~0.4 s of it.
    code = (
        "import sys, transferd.cli, transferd.daemon; "
        "print(sorted(m for m in ('scipy', 'networkx', 'netplan.report') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
