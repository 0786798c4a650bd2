"""transferd's asyncio/aiohttp adapters: the one HTTP server, the peer client and the local
(CLI) client, and the pumps and runners that feed the sans-I/O cores in `transferd.protocol`
and do their I/O through `transferd.site`.
"""
