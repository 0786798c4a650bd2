"""transferd's asyncio/aiohttp adapters: they feed the sans-I/O cores in `transferd.protocol`
and do their I/O through `transferd.site`; every task they start belongs to a TaskGroup.

- `server`: the one HTTP server (peer API, local API, messages, metrics; one error middleware)
- `inbound`: the async side of receiving uploads (worker threads, commit locks)
- `peer_client`: the one client for peers (signed requests, a pool per traffic class, retries)
- `local_client`: the one client for a site's own daemon (the CLI, `send_message`, `read_inbox`)
  and `local_http`, its HTTP requests without asyncio (what `transferd send` imports)
- `pump`: SchedulerPump, BulkGate and PeerTraffic around the scheduler and stream controller
- `sender`: replication jobs from the journal to peers
- `messages`: the message service and inbox
- `message_hop`: the framed peer hop for interactive messages (both ends)
- `runners`: a plan's sync runner and checkpoint watch mode
- `buffers`: pooled receive buffers for chunk bodies
- `loop_lag`: the event loop's lag probe (10 ms ticks while work moves, slower when idle)
"""
