"""The site daemon: wires config, storage, journal, keys, receiver, sender and HTTP server.

`Daemon.serve(stop)` runs until `stop` is set: it listens, resumes journaled jobs, runs watch
mode, and on stop refuses new work, lets in-flight requests finish (bounded), and leaves
unfinished jobs in the journal for the next start. Every task lives in one TaskGroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from transferd._classes import TrafficClass
from transferd.config import PeerConfig, SiteConfig
from transferd.errors import ConfigError, TransferdError
from transferd.net.buffers import BufferPool
from transferd.net.messages import HmacPeerAuth, MessageMetrics, MessageService, add_message_routes
from transferd.net.peer_client import PeerLink
from transferd.net.pump import PeerTraffic
from transferd.net.sender import Sender
from transferd.net.server import build_app
from transferd.protocol.auth import NonceGuard
from transferd.protocol.ratelimit import RateCap
from transferd.site.checkpoints import ready_steps
from transferd.site.journal import JobState, Journal
from transferd.site.keys import Keyring
from transferd.site.metrics import Metrics
from transferd.site.receiver import Receiver
from transferd.site.storage import open_storage
from transferd.site.threads import bulk_executor
from transferd.site.tls import client_ssl_context, server_ssl_context

if TYPE_CHECKING:
    from transferd.plan import SitePlanRun

__all__ = ["Daemon"]

log = logging.getLogger("transferd.daemon")
T = TypeVar("T")
SHUTDOWN_GRACE_S = 10.0



def _peer_traffic(
    peer: str, pc: PeerConfig, config: SiteConfig, metrics: Metrics
) -> PeerTraffic:
    caps = pc.rate_caps
    per_class = {
        TrafficClass.INTERACTIVE: caps.interactive_mbit_s,
        TrafficClass.CHECKPOINT: caps.checkpoint_mbit_s,
        TrafficClass.SYNC: caps.sync_mbit_s,
    }
    t = config.traffic
    return PeerTraffic.build(
        peer,
        now=time.monotonic(),  # the event loop's clock (loop.time) on the default and uvloop
        bulk_weights={
            TrafficClass.CHECKPOINT: (pc.weights or t.weights).checkpoint,
            TrafficClass.SYNC: (pc.weights or t.weights).sync,
        },
        class_caps={
            cls: RateCap.from_rate(mbit * 1e6 / 8) for cls, mbit in per_class.items() if mbit
        },
        total_cap=RateCap.from_rate(caps.total_mbit_s * 1e6 / 8) if caps.total_mbit_s else None,
        initial_streams=config.streams,
        min_streams=t.streams_min,
        max_streams=t.streams_max,
        adaptive=t.adaptive_streams,
        metrics=metrics,
    )


class Daemon:
    def __init__(
        self,
        config: SiteConfig,
        *,
        clock: Callable[[], float] = time.time,
        sock: socket.socket | None = None,
        plan: SitePlanRun | None = None,
    ) -> None:
        if plan is not None:
            from transferd.plan import apply_links

            config = apply_links(config, plan)  # the plan's link weights and caps win
        self.config = config
        self.plan = plan
        self.clock = clock
        self._sock = sock
        self.metrics = Metrics()
        # Room for every stream of two peers' bulk classes, each with one body in hand (at least
        # 16: a sender's adaptive stream count is not this config's; buffers are made on demand).
        self.receive_buffers = BufferPool(config.chunk_size, count=max(16, 2 * config.streams))
        # One worker per body the pool can hold: a chunk in hand never waits for a thread.
        self._workers = bulk_executor(max(4, 2 * config.streams), "transferd-chunk")
        self.port: int | None = None
        self._commit_locks: dict[str, asyncio.Lock] = {}
        state = config.state_path
        self.storage = open_storage(
            config.data_dir_is_local,
            config.data_path,
            config.data_dir,
            config.storage_options,
            state,
        )
        self.journal = Journal(state / "journal.sqlite")
        self.keyring = Keyring.load(config.keys_path, config.site, list(config.peers))
        self.guard = NonceGuard(config.auth_window_s, not_before=clock() - 1.0)
        self.receiver = Receiver(
            config.site,
            self.storage,
            self.journal,
            self.keyring,
            self.metrics,
            config.checkpoints.retention,
            run_retention=plan.incoming_retention if plan is not None else None,
        )
        ssl_ctx = client_ssl_context(config)
        traffic = config.traffic
        self.traffic = {
            peer: _peer_traffic(peer, pc, config, self.metrics)
            for peer, pc in config.peers.items()
        }
        max_streams = traffic.streams_max if traffic.adaptive_streams else config.streams
        self.links = {
            peer: PeerLink(
                site=config.site,
                peer=peer,
                url=pc.url,
                keyring=self.keyring,
                streams=max(config.streams, max_streams),
                clock=clock,
                ssl_context=ssl_ctx,
                shared_pool=traffic.shared_pool,
            )
            for peer, pc in config.peers.items()
        }
        self.sender = Sender(
            site=config.site,
            storage=self.storage,
            journal=self.journal,
            keyring=self.keyring,
            metrics=self.metrics,
            links=self.links,
            chunk_size=config.chunk_size,
            compression=config.compression,
            streams=config.streams,
            clock=clock,
            traffic=self.traffic,
        )
        self.auth = HmacPeerAuth(self.keyring, self.guard, list(config.peers), clock)
        self.messages = MessageService(
            config.site,
            {peer: pc.url for peer, pc in config.peers.items()},
            self.auth,
            pumps={peer: t.pump for peer, t in self.traffic.items()},
            metrics=MessageMetrics(self.metrics.registry),
            hook_command=traffic.inbox_hook,
            default_deadline_ms=traffic.message_deadline_ms,
            clock=clock,
            session_for=lambda peer, cls: self.links[peer].session(cls),
        )
        self._collect_garbage()
        self._refuse_raw_plan_entries()

    def _refuse_raw_plan_entries(self) -> None:
        """Plan entries that would move raw data are refused here, logged and counted, even
        though the planner never writes one: policy is enforced where data moves."""
        for where, reason in self.plan.refused if self.plan is not None else ():
            self.metrics.policy_refusals.labels("sender").inc()
            log.error("plan.refused", extra={"fields": {"entry": where, "error": reason}})

    def _collect_garbage(self) -> None:
        """Staging left by failed uploads, by uploads the journal never recorded, or by uploads
        whose sender has not finished them within staging_ttl_s, goes."""
        now = self.clock()
        for upload in self.journal.uploads_opened_before(now - self.config.staging_ttl_s):
            self.journal.finish_upload(upload, "failed", now)
            log.info("upload.expired", extra={"fields": {"upload": upload}})
        keep = set(self.journal.uploads("open"))
        root = self.storage.staging_root
        for entry in root.iterdir() if root.exists() else []:
            if entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)

    @contextlib.asynccontextmanager
    async def _commit_lock(self, upload: str) -> AsyncIterator[None]:
        lock = self._commit_locks.setdefault(upload, asyncio.Lock())
        async with lock:
            yield
        if not lock.locked():
            self._commit_locks.pop(upload, None)

    def commit_lock(self, upload: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self._commit_lock(upload)

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run CPU/disk work (hashing, decompression, pwrite) on the chunk worker threads.

        If the awaiting handler is cancelled, the worker still holds the request's pooled buffer:
        wait for it to finish before the cancellation proceeds (and is re-raised)."""
        future = asyncio.get_running_loop().run_in_executor(self._workers, fn, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait([future])
            raise

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls else "http"
        return f"{scheme}://{self.config.listen_host}:{self.port}"

    def status(self) -> dict[str, Any]:
        now = self.clock()
        jobs = []
        for job in self.journal.jobs(limit=50):
            entry = job.to_json()
            if job.state == JobState.RUNNING and job.started_at:
                entry["rate_Bps"] = job.bytes_done / max(1e-3, now - job.started_at)
            jobs.append(entry)
        peers = {}
        for peer, link in self.links.items():
            m = self.metrics
            peers[peer] = {
                "url": link.url,
                "bytes_sent": m.value("transferd_bytes_sent_total", peer=peer),
                "bytes_received": m.value("transferd_bytes_received_total", peer=peer),
                "chunks_sent": m.value("transferd_chunks_sent_total", peer=peer),
                "chunks_skipped": m.value("transferd_chunks_skipped_total", peer=peer),
                "retries": m.value("transferd_retries_total", peer=peer),
                "link_Bps": self.sender.compression[peer].link_Bps,
                "streams": {
                    cls.value: gate.controller.target_streams
                    for cls, gate in self.traffic[peer].gates.items()
                },
            }
        return {"site": self.config.site, "listen": self.url, "jobs": jobs, "peers": peers}

    async def serve(
        self, stop: asyncio.Event, ready: Callable[[Daemon], None] | None = None
    ) -> None:
        # The sender's chunk work (asyncio.to_thread) yields the CPU to the event loop too.
        asyncio.get_running_loop().set_default_executor(
            bulk_executor(min(32, (os.cpu_count() or 1) + 4), "transferd-bulk")
        )
        app = build_app(self)
        add_message_routes(app, self.messages, local_auth=self.auth.verify_local)
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE_S
        )
        await runner.setup()
        ssl_ctx = server_ssl_context(self.config)
        site: web.BaseSite
        if self._sock is not None:
            site = web.SockSite(runner, self._sock, ssl_context=ssl_ctx)
        else:
            site = web.TCPSite(
                runner,
                self.config.listen_host,
                self.config.listen_port,
                ssl_context=ssl_ctx,
                reuse_address=True,
            )
        try:
            try:
                await site.start()
            except OSError as exc:
                raise ConfigError(
                    f"listen: cannot bind {self.config.listen}: {exc.strerror}"
                ) from exc
            server = getattr(site, "_server", None)
            sockets = getattr(server, "sockets", None) or []
            self.port = sockets[0].getsockname()[1] if sockets else self.config.listen_port
            log.info(
                "daemon.listening", extra={"fields": {"site": self.config.site, "url": self.url}}
            )
            async with asyncio.TaskGroup() as tg:
                sender_task = tg.create_task(self.sender.run())
                watching = self.config.watch.enabled or (
                    self.plan is not None and bool(self.plan.checkpoints)
                )
                watch_task = tg.create_task(self._watch()) if watching else None
                sync_task = (
                    tg.create_task(self._sync_runner().run())
                    if self.plan is not None and self.plan.sync
                    else None
                )
                if ready is not None:
                    ready(self)
                await stop.wait()
                log.info("daemon.stopping", extra={"fields": {"site": self.config.site}})
                self.sender.stop()
                # In-flight chunk uploads get a grace period; what is left resumes from the journal.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(SHUTDOWN_GRACE_S):
                        await self.sender.drained()
                sender_task.cancel()
                for task in (watch_task, sync_task):
                    if task is not None:
                        task.cancel()
        finally:
            await runner.cleanup()
            for link in self.links.values():
                await link.close()
            self._workers.shutdown(wait=True)
            self.receiver.close()
            self.journal.close()
            log.info("daemon.stopped", extra={"fields": {"site": self.config.site}})

    def _sync_runner(self) -> Any:
        from transferd.plan import SyncRunner

        assert self.plan is not None
        w = self.config.watch
        return SyncRunner(
            routes=self.plan.sync,
            storage=self.storage,
            journal=self.journal,
            metrics=self.metrics,
            submit=self.sender.submit,
            clock=self.clock,
            quiet_period_s=w.quiet_period_s,
            poll_interval_s=w.poll_interval_s,
        )

    def _checkpoint_targets(self, step: str) -> list[str]:
        default = self.config.checkpoints.targets
        return default if self.plan is None else self.plan.checkpoint_targets(step, default)

    async def _watch(self) -> None:
        """Watch mode: replicate each complete checkpoint step to its targets (the plan's for
        the plan's runs, else the configured ones), once."""
        w = self.config.watch
        while True:
            try:
                steps = await asyncio.to_thread(
                    ready_steps, self.storage, w.marker, w.quiet_period_s, self.clock()
                )
                for step in steps:
                    dests = [
                        d
                        for d in self._checkpoint_targets(step)
                        if not self.journal.watch_seen(step, d)
                    ]
                    if dests:
                        for dest, job in zip(dests, self.sender.submit(step, dests), strict=True):
                            self.journal.mark_watch_seen(step, dest, job)
                        log.info(
                            "watch.step", extra={"fields": {"path": step, "to": ",".join(dests)}}
                        )
            except TransferdError as exc:
                log.error("watch.error", extra={"fields": {"kind": exc.kind, "error": str(exc)}})
            await asyncio.sleep(w.poll_interval_s)
