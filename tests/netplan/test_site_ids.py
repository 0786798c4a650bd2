"""One site-id rule (netplan.plan): what a topology accepts as a site id, a transferd site config
and the plan loader accept too, and what one refuses the others refuse with the same reason."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netplan import Plan, PlanError, TopologyError, parse_topology
from netplan.plan import SCHEMA_VERSION, check_site_id
from transferd.config import parse_config
from transferd.errors import ConfigError


def _topology(site: str) -> str:
    return f"name: t\nsites:\n  - {{id: {json.dumps(site)}, kind: onprem, region: eu}}\n"


def _config(site: str) -> str:
    return (f"site: {json.dumps(site)}\nlisten: 127.0.0.1:7701\ndata_dir: ./d\nkeys_dir: ./k\n"
            "peers: {}\n")


def _plan(site: str) -> str:
    return json.dumps({"schema_version": SCHEMA_VERSION, "topology": "t",
                       "sites": [{"site": site}]})


def _accepted(site: str) -> tuple[bool, bool, bool]:
    outcomes = []
    for parse, errors in ((lambda: parse_topology(_topology(site)), TopologyError),
                          (lambda: parse_config(_config(site)), ConfigError),
                          (lambda: Plan.from_json(_plan(site)), PlanError)):
        try:
            parse()
        except errors:
            outcomes.append(False)
        else:
            outcomes.append(True)
    return outcomes[0], outcomes[1], outcomes[2]


@pytest.mark.parametrize("site", ["dc-east", "aws.euc1", "A", "x" * 64, "pop_7"])
def test_good_ids_pass_everywhere(site: str) -> None:
    assert _accepted(site) == (True, True, True)


@pytest.mark.parametrize("site", ["dc:east", "dc/east", "x" * 65, "-lead", ".hidden", "a b", "",
                                  "dc\n"])  # a final newline: the pattern's `$` matched it
def test_bad_ids_are_refused_everywhere_with_the_reason(site: str) -> None:
    assert _accepted(site) == (False, False, False)
    with pytest.raises(TopologyError) as err:
        parse_topology(_topology(site))
    assert "sites[0].id: " in str(err.value)
    assert "is not a site id: 1-64 letters, digits" in str(err.value)
    with pytest.raises(ConfigError, match="is not a site id"):
        parse_config(_config(site))


@given(st.text(alphabet="ab.-_:/ Z9é", max_size=70))
def test_all_three_agree_on_any_string(site: str) -> None:
    try:
        check_site_id(site)
        expected = True
    except ValueError:
        expected = False
    assert _accepted(site) == (expected, expected, expected)
