"""Link specs and scenario files: the one-line form, units, and errors that name field and line."""

from __future__ import annotations

import pytest

from benchmarks.errors import ScenarioError
from benchmarks.linkspec import LinkSpec, parse_link_spec
from benchmarks.scenario import SCENARIO_DIR, load_scenario, parse_scenario


def test_one_line_form_with_units() -> None:
    spec = parse_link_spec("rate=1gbit delay=20ms jitter=500us loss=0.5% limit=2000")
    assert spec == LinkSpec(rate_mbit=1000, delay_ms=20, jitter_ms=0.5, loss_pct=0.5,
                            queue_limit_pkts=2000)
    assert spec.rtt_ms == 40


def test_defaults_are_an_unimpaired_uncapped_link() -> None:
    spec = parse_link_spec("")
    assert spec.rate_mbit is None
    assert not spec.impaired
    assert spec.queue_limit_pkts == 1000  # netem's default limit


def test_field_names_are_accepted_in_their_own_unit() -> None:
    assert parse_link_spec("delay_ms=5 rate_mbit=50").delay_ms == 5


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("delay=-3ms", "delay"),  # not even a token: the sign is refused
        ("rate=10parsec", "unknown unit"),
        ("bandwidth=10mbit", "unknown key"),
        ("loss=150%", "loss_pct: must be <= 100"),
        ("rate=0mbit", "rate_mbit: must be > 0"),
    ],
)
def test_bad_one_line_specs_name_the_field(text: str, needle: str) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_link_spec(text)
    assert needle in str(err.value)


def test_scenario_link_error_names_the_field_and_its_line() -> None:
    text = """\
scenario: broken
sites: [A, B]
links:
  - between: [A, B]
    rate_mbit: 1000
    delay_ms: -5
work:
  - {size_mib: 16}
tools: [iperf3-1stream]
"""
    with pytest.raises(ScenarioError) as err:
        parse_scenario(text)
    assert "links[0].delay_ms: must be >= 0 (line 6)" in str(err.value)


def test_scenario_unknown_tool_is_refused() -> None:
    text = "scenario: x\nloopback: true\nsites: [A]\nwork:\n  - {size_mib: 1}\ntools: [scp]\n"
    with pytest.raises(ScenarioError) as err:
        parse_scenario(text)
    assert "unknown tool 'scp'" in str(err.value)


def test_every_shipped_scenario_loads_and_is_named_after_its_file() -> None:
    names = {p.stem for p in SCENARIO_DIR.glob("*.yaml")}
    assert {"clean-10ms", "cross-region-40ms", "lossy-0.5pct", "lossy-2pct", "edge-jitter",
            "link-flap", "interactive-during-bulk", "loopback"} <= names
    for name in names:
        scenario = load_scenario(name)
        assert scenario.scenario == name
    lossy = load_scenario("lossy-2pct")
    assert lossy.link is not None
    assert (lossy.link.rtt_ms, lossy.link.loss_pct) == (40, 2)
    assert load_scenario("loopback").link is None


def test_a_scenario_with_a_relay_site_joins_three_sites_and_runs_relay_tools() -> None:
    relay = load_scenario("relay-3site")
    assert relay.relayed
    assert (relay.source_site(), relay.relay_site(), relay.dest_site()) == ("A", "R", "B")
    assert relay.link is not None
    assert (relay.link.rate_mbit, relay.link.rtt_ms, relay.link.loss_pct) == (20, 80, 1)
    head = "scenario: x\nsites: [A, R, B]\nwork:\n  - {size_mib: 1}\n"
    links = ("links:\n  - {between: [A, B], rate_mbit: 20}\n  - {between: [A, R]}\n"
             "  - {between: [R, B]}\n")
    with pytest.raises(ScenarioError) as err:
        parse_scenario(head + links + "tools: [transferd]\n")
    assert "unknown tool 'transferd' (known with several links: transferd-direct" in str(err.value)
    with pytest.raises(ScenarioError) as err:
        parse_scenario(head + links.replace("[R, B]", "[A, R]") + "tools: [transferd-relay]\n")
    assert "each pair of sites is joined once" in str(err.value)
    two = "scenario: x\nsites: [A, B]\nwork:\n  - {size_mib: 1}\nlinks:\n  - {between: [A, B]}\n"
    with pytest.raises(ScenarioError) as err:
        parse_scenario(two + "tools: [transferd-relay]\n")
    assert "unknown tool 'transferd-relay'" in str(err.value)
