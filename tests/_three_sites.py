"""The three-site topology (on-prem data, cloud GPUs, an edge site behind the cloud) that the
plan tests build on: the unit tests of `netplan plan` and the end-to-end run of three daemons.
Workloads come last so a test can append its own."""

import textwrap

THREE_SITES = textwrap.dedent("""\
    name: three-sites
    sites:
      - {id: onprem, kind: onprem, region: eu}
      - {id: cloud, kind: cloud, region: eu, gpus: {h100: 8}, gpu_hour_usd: {h100: 4.0}}
      - {id: edge, kind: edge, region: eu}
    links:
      - {between: [onprem, cloud], bandwidth_gbps: 10, rtt_ms: 5}
      - {between: [cloud, edge], bandwidth_gbps: 1, rtt_ms: 20}
    datasets:
      - {id: corpus-raw, site: onprem, size_gb: 900, tier: raw}
      - {id: corpus-approved, site: onprem, size_gb: 100, tier: approved}
    models:
      - {id: m, site: cloud, size_gb: 16}
    sync_rules:
      - {id: approved-out, tier: approved, to: consumers, change_fraction_per_day: 0.5}
    checkpoint_replication:
      - {workload: tune, every_hours: 1, copies_min: 2, retain: 3}
    workloads:
      - {id: tune, kind: fine_tuning, model: m, datasets: [corpus-approved], gpu: h100, gpus: 8,
         hours: 4}
""")
