"""transferd's sans-I/O core: objects and `now` in, decisions out. No sockets, no event loop, no
files: everything here is tested without either (tests/transferd/test_layers.py walks the
imports of every module and refuses asyncio, aiohttp, and transferd.site / transferd.net).

- `wire`: the HTTP API's routes, the one frozen model base, parsing bodies at the edge
- `manifest`, `local_api`, `messages`: the bodies - upload documents and the signed manifest;
  jobs, send and status; interactive messages (envelope, ack, receipt, inbox, ledger)
- `message_socket`, `message_hop`: the framed message paths (the local client's unix socket;
  the peer hop between daemons, opened by an HTTP Upgrade)
- `upload`: the upload state machines of sender and receiver (what to offer, what is missing,
  when to commit)
- `auth`: request signatures (HMAC per site pair), replay guard, who may call what
- `chunks`, `arrow_chunks`, `codec`: chunk addressing (blake3, where files are cut) and zstd framing
- `policy`: tier folders and path rules (raw data never leaves its site)
- `sched`, `ratelimit`, `streams`, `backoff`: the per-peer class scheduler, token buckets, the
  adaptive parallel-stream controller, capped exponential retry delays
"""
