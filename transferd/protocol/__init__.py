"""transferd's sans-I/O core: objects and `now` in, decisions out. No sockets, no event loop,
no files: everything here is tested without either (a test walks the imports of every module
and refuses asyncio and aiohttp).

- `auth`: request signatures (HMAC per site pair), replay guard, who may call what
- `chunks`, `arrow_chunks`: where files are cut and what a chunk is called (blake3)
- `codec`: zstd framing of chunk bodies and when compression pays
- `manifest`: the wire documents of an upload and the signed manifest
- `policy`: tiers and path rules (raw data never leaves its site)
- `ratelimit`, `sched`, `streams`: token buckets, the per-peer class scheduler, the adaptive
  parallel-stream controller
- `backoff`: capped exponential retry delays
"""
