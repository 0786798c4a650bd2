"""transferd's local, blocking I/O at one site: storage backends (`storage`, `staging`,
`source`), the SQLite journal, key material, TLS contexts, checkpoint folders, the receiving
side of uploads, metrics and log lines. Called from worker threads or briefly from the event
loop; nothing here imports asyncio or aiohttp.
"""
