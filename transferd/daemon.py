"""The site daemon: wires config (and plan), storage, journal, keys, the upload ends, the message
service and the one HTTP server.

`Daemon.serve(stop)` runs until `stop` is set: it starts its tasks (the sender's job loop, the
message service, watch mode, a plan's sync runner) in one TaskGroup, listens, and on stop
refuses new work, lets in-flight requests finish (bounded), and leaves unfinished jobs in the
journal for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from netplan.plan import TrafficClass
from netplan.telemetry import TelemetryReport
from transferd.config import SiteConfig
from transferd.errors import ConfigError, StorageError, TransferdError
from transferd.net.bulk_priority import loop_waited_for_the_gil
from transferd.net.channels import DataListener, PeerChannels, SendfileRefusals
from transferd.net.inbound import InboundUploads
from transferd.net.loop_lag import Stall, stall_of, watch_lag
from transferd.net.message_hop import HopServer
from transferd.net.messages import MessageService, MessageSocketServer, message_socket_path
from transferd.net.peer_client import PeerLink
from transferd.net.pump import PeerTraffic
from transferd.net.relay import RelayService, RoutingInbound
from transferd.net.runners import CheckpointWatcher, SyncRunner
from transferd.net.sender import Sender
from transferd.net.server import build_app
from transferd.plan import PlanRun, link_settings
from transferd.protocol.auth import NonceGuard, RequestVerifier
from transferd.protocol.backoff import backoff_delays
from transferd.protocol.local_api import Job, JobState, JobStatus, PeerStatus, SiteStatus
from transferd.protocol.wire import PEER_MESSAGES_ROUTE
from transferd.site.buffers import AlignedBuffers
from transferd.site.journal import Journal, UploadState
from transferd.site.keys import Keyring
from transferd.site.metrics import Metrics
from transferd.site.receiver import Receiver
from transferd.site.state_lock import StateDirLock
from transferd.site.storage import open_storage
from transferd.site.telemetry import SAMPLE_S, LinkTelemetry
from transferd.site.threads import ThreadSchedstat, bulk_executor
from transferd.site.tls import client_ssl_context, server_ssl_context

__all__ = ["Daemon"]

log = logging.getLogger("transferd.daemon")
SHUTDOWN_GRACE_S = 10.0
LAG_LOG_S = 0.02  # a loop-lag probe's timer this late is logged as a stall (`net.loop_lag`)
# Chunks each data channel keeps in flight beyond the one being written: enough to cover the
# receipt's round trip (the socket buffers hold the rest of the pipe), few enough that a broken
# channel has little to send again.
CHANNEL_WINDOW = 2
# Chunk bodies a daemon holds at once while they are verified and staged (x chunk_size of
# memory): two per channel of eight channels.
RECEIVE_BUFFERS = 16
WARM_BUDGET_S = 60.0  # how long a starting daemon keeps trying to open channels to a peer
CONTROL_PROBE_S = 2.0  # a signed no-op request to each peer this often: control-plane RTT
# What a reload (SIGHUP) applies to a running daemon: each peer's rate caps and weights, the
# traffic weights, watch mode and checkpoint settings (and the whole plan). Anything else in
# the config (site, listen, storage, keys, TLS, peers' addresses...) needs a restart.
_LIVE_PEER_FIELDS = frozenset({"rate_caps_mbps", "weights"})
_LIVE_FIELDS = frozenset({"watch", "checkpoints", "residency"})


def restart_fields(old: SiteConfig, new: SiteConfig) -> list[str]:
    """The fields that differ between two configs and that only a restart can apply."""
    a, b = old.model_dump(), new.model_dump()
    changed = []
    for key in sorted(a.keys() | b.keys()):
        if a.get(key) == b.get(key) or key in _LIVE_FIELDS:
            continue
        if key == "traffic":
            if {**a[key], "weights": None} != {**b[key], "weights": None}:
                changed.append(key)
        elif key == "peers" and set(a[key]) == set(b[key]):
            changed += [f"peers.{peer}" for peer in sorted(a[key])
                        if {k: v for k, v in a[key][peer].items() if k not in _LIVE_PEER_FIELDS}
                        != {k: v for k, v in b[key][peer].items() if k not in _LIVE_PEER_FIELDS}]
        else:
            changed.append(key)
    return changed


async def stop_closing_every_connection(runner: web.AppRunner) -> None:
    """`runner.cleanup()`, its listeners first stopped from accepting and the connections
    accepted until then handed to aiohttp, so that its cleanup closes them too. Closed in the
    middle of an accept (Python 3.11: the accepted socket becomes a transport a loop iteration
    later, and that fails once its server is closed), the connection was neither served nor
    closed: the peer's request hung until its timeout, and in a daemon run in-process (the
    tests' loopback pairs) the socket leaked past the loop."""
    loop = asyncio.get_running_loop()
    for site in runner.sites:
        server = getattr(site, "_server", None)  # the site's asyncio.Server (aiohttp 3.x)
        for sock in getattr(server, "sockets", None) or ():
            loop.remove_reader(sock.fileno())
    for _ in range(3):  # an accept under way: its transport, connection_made, the handler
        await asyncio.sleep(0)
    await runner.cleanup()


def _last_activity(staged: Path, journal: Journal, upload: str) -> float:
    """When an open upload last received bytes: the newest time in its staging folder, else
    when it was opened."""
    newest = journal.upload_opened_at(upload)
    for dirpath, _dirs, files in os.walk(staged):
        for name in [*files, "."]:
            with contextlib.suppress(OSError):
                newest = max(newest, os.stat(Path(dirpath) / name).st_mtime)
    return newest


class Daemon:
    def __init__(
        self,
        config: SiteConfig,
        *,
        clock: Callable[[], float] = time.time,
        sock: socket.socket | None = None,
        plan: PlanRun | None = None,
    ) -> None:
        self.config = config
        self.plan = plan
        self.clock = clock
        self._sock = sock
        self.port: int | None = None
        self.metrics = Metrics()
        # The site's region: its config's, else the plan's (the topology's) for this site.
        self.region = config.region or (plan.region if plan is not None else None)
        # Page-aligned, made on demand, reused: bodies are received into them and written from
        # them (O_DIRECT); their number bounds the bodies in memory.
        self.receive_buffers = AlignedBuffers(config.chunk_size, RECEIVE_BUFFERS)
        state = config.state_path
        data_path = config.data_path
        if config.data_dir_is_local and data_path.exists() and not data_path.is_dir():
            # Named as such here: the lock below would fail first on <file>/.transferd.
            raise ConfigError(f"data_dir: {data_path} is a file, not a folder", field="data_dir")
        # Before anything touches the state (an object store's reclaim of interrupted commits in
        # open_storage, the journal's jobs, staging reclaimed below, the message socket): one
        # daemon per state_dir.
        self._state_lock = StateDirLock(state)
        try:
            self._set_up(config, plan, clock, state)
        except BaseException:
            # Not left to the finalizer: a refused start (a key missing, a spill_dir not
            # writable) kept by a traceback would hold the state_dir from the next daemon.
            self._state_lock.release()
            raise

    def _set_up(
        self,
        config: SiteConfig,
        plan: PlanRun | None,
        clock: Callable[[], float],
        state: Path,
    ) -> None:
        """The rest of __init__, run under the state_dir lock."""
        self.storage = open_storage(
            config.data_dir_is_local,
            config.data_path,
            config.data_dir,
            config.storage_options,
            state,
        )
        try:
            self.journal = Journal(state / "journal.sqlite")
        except StorageError as exc:
            raise ConfigError(f"state_dir: {exc.message}", field="state_dir") from exc
        self.keyring = Keyring.load(config.keys_path, config.site, list(config.peers))
        self.verifier = RequestVerifier(
            self.keyring,
            NonceGuard(config.auth_window_s, not_before=clock() - 1.0, memory=self.journal),
            config.peers,
            clock,
        )
        self.receiver = Receiver(
            config.site,
            self.storage,
            self.journal,
            self.keyring,
            self.metrics,
            config.checkpoints.retention,
            run_retention=plan.incoming_retention if plan is not None else None,
            region=self.region,
            relays=config.peers,
            accept_via=config.relay.accept_via,
        )
        # Workers verify and stage received bodies while the channel threads receive the next.
        self.inbound = InboundUploads(
            self.receiver, self.metrics, clock, workers=max(4, 2 * config.streams)
        )
        self.data_port: int | None = None
        self._peer_up = {peer: asyncio.Event() for peer in config.peers}
        traffic = config.traffic
        links = {peer: link_settings(config, peer, plan) for peer in config.peers}
        self.traffic = {
            peer: PeerTraffic.build(
                peer,
                now=time.monotonic(),  # the event loop's clock (loop.time) on asyncio and uvloop
                bulk_weights=settings.bulk_weights,
                class_caps_bytes_per_s=settings.class_caps_bytes_per_s,
                total_cap_bytes_per_s=settings.total_cap_bytes_per_s,
                initial_streams=config.streams,
                min_streams=traffic.streams_min,
                max_streams=traffic.streams_max,
                adaptive=traffic.adaptive_streams,
                metrics=self.metrics,
                per_stream=CHANNEL_WINDOW,
            )
            for peer, settings in links.items()
        }
        ssl_ctx = client_ssl_context(config)
        max_streams = traffic.streams_max if traffic.adaptive_streams else config.streams
        self.links = {
            peer: PeerLink(
                site=config.site,
                peer=peer,
                url=pc.url,
                keys=self.keyring,
                streams=max(config.streams, max_streams),
                clock=clock,
                ssl_context=ssl_ctx,
                shared_pool=traffic.shared_pool,
            )
            for peer, pc in config.peers.items()
        }
        sendfile_refusals = SendfileRefusals()
        self.channels = {
            peer: PeerChannels(
                site=config.site,
                peer=peer,
                keys=self.keyring,
                metrics=self.metrics,
                congestion_control=pc.congestion_control,
                ssl_context=ssl_ctx,
                server_hostname=self.links[peer].host,
                window=CHANNEL_WINDOW,
                sendfile_refusals=sendfile_refusals,
            )
            for peer, pc in config.peers.items()
        }
        self.sender = Sender(
            site=config.site,
            storage=self.storage,
            journal=self.journal,
            keys=self.keyring,
            metrics=self.metrics,
            links=self.links,
            chunk_size=config.chunk_size,
            compression=config.compression,
            streams=config.streams,
            clock=clock,
            traffic=self.traffic,
            channels=self.channels,
            data_addresses={peer: pc.data_host_port for peer, pc in config.peers.items()},
            residency={**(plan.residency if plan is not None else {}), **config.residency},
        )
        self.relay = RelayService(
            site=config.site,
            region=self.region,
            settings=config.relay,
            spill_dir=config.relay_spill_path,
            links=self.links,
            channels=self.channels,
            traffic=self.traffic,
            data_address=self.sender.data_address,
            metrics=self.metrics,
            journal=self.journal,
            clock=clock,
            weights=config.traffic.weights,
        )
        if config.relay.for_peers:
            try:
                self.relay.window.check_spill_dir()
            except OSError as exc:
                raise ConfigError(
                    f"relay.spill_dir: {config.relay_spill_path}: cannot write spill files "
                    f"there: {exc.strerror or exc}", field="relay.spill_dir") from exc
        self.routing = RoutingInbound(self.inbound, self.relay, config.site)
        self.listener = DataListener(
            site=config.site,
            keys=self.keyring,
            peers={peer: pc.congestion_control for peer, pc in config.peers.items()},
            sink=self.routing,
            buffers=self.receive_buffers,
            metrics=self.metrics,
            workers=self.inbound.workers,
            ssl_context=server_ssl_context(config),
            on_peer=self._peer_seen,
        )
        self.messages = MessageService(
            config.site,
            self.links,
            self.metrics,
            pumps={peer: t.pump for peer, t in self.traffic.items()},
            hook_command=traffic.inbox_hook,
            default_deadline_ms=traffic.message_deadline_ms,
            clock=clock,
        )
        self.hop_server = HopServer(config.site, self.keyring, self.messages.receive,
                                    self.metrics, on_peer=self._peer_seen)
        self.message_socket = MessageSocketServer(
            self.messages, self.keyring.secret_for(config.site), self.metrics)
        self.link_telemetry = LinkTelemetry(config.site, config.peers)
        self._tg: asyncio.TaskGroup | None = None
        self._source_tasks: list[asyncio.Task[None]] = []
        self.sample_s, self.control_probe_s = SAMPLE_S, CONTROL_PROBE_S
        self._collect_garbage()
        self._refuse_raw_plan_entries()

    def _refuse_raw_plan_entries(self) -> None:
        """Plan entries that would move raw data are refused here, logged and counted, even
        though the planner never writes one: policy is enforced where data moves."""
        for refusal in self.plan.refused if self.plan is not None else ():
            self.metrics.policy_refusals.labels("sender").inc()
            log.error(
                "plan.refused", extra={"fields": {"entry": refusal.where, "error": refusal.reason}}
            )

    def _collect_garbage(self) -> None:
        """Staging left by failed uploads, by uploads the journal never recorded, or by open
        uploads that received nothing for staging_ttl_s (by their files' times: a sender that
        vanished), goes."""
        now = self.clock()
        root = self.storage.staging_root
        for upload in self.journal.uploads(UploadState.OPEN):
            idle_s = now - _last_activity(root / upload, self.journal, upload)
            if idle_s > self.config.staging_ttl_s:
                self.receiver.fail(upload, now)
                log.info("upload.expired", extra={"fields": {"upload": upload}})
        keep = set(self.journal.uploads(UploadState.OPEN))
        for entry in root.iterdir() if root.exists() else []:
            if entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls else "http"
        return f"{scheme}://{self.config.listen_host}:{self.port}"

    # -- the local API (net.server.LocalApi) -----------------------------------------------------

    def submit(
        self,
        path: str,
        dests: list[str],
        timeout_s: float | None = None,
        via: list[str] | None = None,
        multipath: bool = False,
    ) -> list[str]:
        return self.sender.submit(
            path, dests, timeout_s=timeout_s, via=via or (), multipath=multipath
        )

    def job(self, job_id: str) -> Job | None:
        return self.journal.job(job_id)

    async def job_ended(self, timeout_s: float) -> None:
        """Until a job ends (committed, failed or interrupted) or `timeout_s` passes."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.sender.job_ended()

    def status(self) -> SiteStatus:
        now = self.clock()
        jobs = []
        for job in self.journal.jobs(limit=50):
            rate = None
            if job.state is JobState.RUNNING and job.started_at:
                rate = job.bytes_done / max(1e-3, now - job.started_at)
            jobs.append(JobStatus(**dict(job), rate_bytes_per_s=rate,
                                  route_status=self.sender.routes.status(job.id)))
        peers = {}
        for peer, link in self.links.items():
            m = self.metrics
            peers[peer] = PeerStatus(
                url=link.url,
                bytes_sent=m.value("transferd_bytes_sent_total", peer=peer),
                bytes_received=m.value("transferd_bytes_received_total", peer=peer),
                chunks_sent=m.value("transferd_chunks_sent_total", peer=peer),
                chunks_skipped=m.value("transferd_chunks_skipped_total", peer=peer),
                retries=m.value("transferd_retries_total", peer=peer),
                link_bytes_per_s=self.sender.compression[peer].link_bytes_per_s,
                streams={
                    cls: gate.controller.target_streams
                    for cls, gate in self.traffic[peer].gates.items()
                },
            )
        return SiteStatus(site=self.config.site, listen=self.url, jobs=jobs, peers=peers)

    def message_socket_path(self) -> str | None:
        path = self.message_socket.path
        return None if path is None else str(path)

    def telemetry(self) -> TelemetryReport:
        return TelemetryReport(
            site=self.config.site, at=time.time(), window_s=self.link_telemetry.window_s,
            links=[self._link_measurement(peer) for peer in self.config.peers])

    def _link_measurement(self, peer: str) -> Any:
        m = self.metrics
        failures = {
            "resent": m.value("transferd_chunks_resent_total", peer=peer),
            "integrity": m.value("transferd_integrity_failures_total", peer=peer, side="sender"),
            "retries": m.value("transferd_retries_total", peer=peer),
            "channels_refused": m.value("transferd_channels_refused_total", peer=peer),
        }
        return self.link_telemetry.measurement(peer, failures)

    # -- running -----------------------------------------------------------------------------------

    async def serve(
        self, stop: asyncio.Event, ready: Callable[[Daemon], None] | None = None
    ) -> None:
        # The sender's chunk work (asyncio.to_thread) yields the CPU to the event loop too.
        asyncio.get_running_loop().set_default_executor(
            bulk_executor(min(32, (os.cpu_count() or 1) + 4), "transferd-bulk")
        )
        try:
            app = build_app(
                verifier=self.verifier,
                inbound=self.routing,
                local=self,
                messages=self.messages,
                metrics=self.metrics,
                data_port=lambda: self.data_port or 0,
                hop_server=self.hop_server,
            )
            runner = web.AppRunner(
                app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_GRACE_S
            )
            await runner.setup()
            try:
                await self._listen(runner)
                async with asyncio.TaskGroup() as tg:
                    sender_task = tg.create_task(self.sender.run())
                    others = [tg.create_task(self.messages.run())]
                    others.append(tg.create_task(self._watch_lag()))
                    others.append(tg.create_task(self.message_socket.run()))
                    others.append(tg.create_task(self.relay.run()))
                    others += [tg.create_task(self._warm_channels(peer)) for peer in self.channels]
                    others.append(tg.create_task(self._sample_links()))
                    others += [tg.create_task(self._probe_control(peer)) for peer in self.links]
                    self._tg = tg
                    self._source_tasks = [tg.create_task(run()) for run in self._job_sources()]
                    if ready is not None:
                        ready(self)
                    await stop.wait()
                    log.info("daemon.stopping", extra={"fields": {"site": self.config.site}})
                    self.sender.stop()
                    # In-flight chunk uploads get a grace period; what is left resumes from the
                    # journal.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(SHUTDOWN_GRACE_S):
                            await self.sender.drained()
                    sender_task.cancel()
                    for task in [*others, *self._source_tasks]:
                        task.cancel()
            finally:
                self.inbound.stopping()  # commits held for their last chunks answer now (503)
                # Before the HTTP cleanup: its TaskGroup has ended.
                await self.message_socket.close()
                self.hop_server.close()  # its handlers end with their connections, not at a timeout
                await stop_closing_every_connection(runner)
                # Channel threads may wait for this loop (a chunk's booking): close them off it.
                await asyncio.to_thread(self.listener.close)
                for channels in self.channels.values():
                    await asyncio.to_thread(channels.close)
                # Sends started that nothing has booked yet (`LoopInbox.post_later`: they ride
                # with the next batch or probe tick, and neither comes now): into the journal.
                self.sender.flush_inbox()
                for link in self.links.values():
                    await link.close()
                await self.inbound.aclose()
                self.receive_buffers.close()
        finally:
            # Whatever failed above (runner.setup, a close that raised), the next daemon may
            # start on this state_dir now rather than when this object is collected.
            try:
                self.journal.close()
            finally:
                self._state_lock.release()
            log.info("daemon.stopped", extra={"fields": {"site": self.config.site}})

    def reload(self, config: SiteConfig, plan: PlanRun | None) -> list[str]:
        """Apply a re-read config and plan to the running daemon (SIGHUP) without dropping a
        transfer: each peer's weights and rate caps change from now on (chunks in flight and
        queued jobs carry on), and watch mode and the plan's sync runner start over on the new
        routes (they only submit jobs). A config that changes anything else is refused whole
        (nothing changes; the fields that need a restart are returned and logged)."""
        restart = restart_fields(self.config, config)
        if restart:
            log.error("config.reload_refused", extra={"fields": {
                "needs_restart": restart, "applied": False}})
            return restart
        now = asyncio.get_running_loop().time()
        for peer, traffic in self.traffic.items():
            settings = link_settings(config, peer, plan)
            traffic.reconfigure(now, bulk_weights=settings.bulk_weights,
                                class_caps_bytes_per_s=settings.class_caps_bytes_per_s,
                                total_cap_bytes_per_s=settings.total_cap_bytes_per_s)
        self.config, self.plan = config, plan
        self.sender.set_residency({**(plan.residency if plan is not None else {}),
                                   **config.residency})
        self.receiver.retention = config.checkpoints.retention
        self.receiver.run_retention = dict(plan.incoming_retention if plan is not None else {})
        self._refuse_raw_plan_entries()
        for task in self._source_tasks:
            task.cancel()
        if self._tg is not None:
            self._source_tasks = [self._tg.create_task(run()) for run in self._job_sources()]
        log.info("config.reloaded", extra={"fields": {
            "site": config.site, "plan": plan is not None,
            "rate_caps_mbps": {p: pc.rate_caps_mbps.model_dump(exclude_none=True)
                               for p, pc in config.peers.items()}}})
        return []

    async def _watch_lag(self) -> None:
        """The loop-lag probe (`net.loop_lag`: 10 ms ticks while work moves, slower when
        idle): each lag into `loop_lag`, stalls logged with which wait they were. Each tick
        also books the channel threads' calls left waiting (`Sender.flush_inbox`): a wake the
        loop makes anyway."""
        schedstat = ThreadSchedstat()  # opened here: the loop's own thread
        # The schedstat window a stall is split over: from the sample before it to now.
        sched0_at, sched0 = time.monotonic(), schedstat.read()

        def on_tick(lag: float | None) -> bool:
            nonlocal sched0_at, sched0
            self.sender.flush_inbox()
            held = False
            if lag is not None:
                self.metrics.loop_lag.observe(lag)
                if lag >= LAG_LOG_S:
                    now, sched1 = time.monotonic(), schedstat.read()
                    ran_s = cpu_wait_s = None
                    if sched0 is not None and sched1 is not None:
                        ran_s = (sched1[0] - sched0[0]) / 1e9
                        cpu_wait_s = (sched1[1] - sched0[1]) / 1e9
                    held = self._stalled(stall_of(lag, now - sched0_at, ran_s, cpu_wait_s))
            sched0_at, sched0 = time.monotonic(), schedstat.read()
            return held

        try:
            await watch_lag(on_tick, working=self.sender.busy)
        finally:
            schedstat.close()

    @staticmethod
    def _stalled(stall: Stall) -> bool:
        """A stall logged with which wait it was, its GIL wait charged (`adaptive`). True: the
        loop's own (the probe ticks fast for a while after it)."""
        fields: dict[str, float] = {"ms": round(stall.lag_s * 1e3, 1)}
        if stall.ran_s is not None and stall.cpu_wait_s is not None:
            # Which wait it was: the loop thread running (busy), waiting in the run queue for
            # a CPU, or neither (asleep: waiting for the GIL).
            fields["ran_ms"] = round(stall.ran_s * 1e3, 1)
            fields["cpu_wait_ms"] = round(stall.cpu_wait_s * 1e3, 1)
            fields["gil_wait_ms"] = round(stall.gil_wait_s * 1e3, 1)
        log.info("loop.stall", extra={"fields": fields})
        loop_waited_for_the_gil(stall.gil_wait_s)
        return stall.loops_own

    async def _sample_links(self) -> None:
        """Every SAMPLE_S: the data channels' tcp_info into each link's window, and the
        window's summary into the link's Prometheus series."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.sample_s)
            for peer, channels in self.channels.items():
                point = self.link_telemetry.sample(peer, loop.time(), time.time(),
                                                   channels.tcp_infos())
                site = self.config.site
                if point is not None:
                    self.metrics.link_segments.labels(site, peer).inc(point.segs_out)
                    self.metrics.link_retransmits.labels(site, peer).inc(point.retrans)
                self.metrics.export_link(self._link_measurement(peer))

    async def _probe_control(self, peer: str) -> None:
        """Time a signed no-op request to `peer` every CONTROL_PROBE_S on the control pool:
        the control plane's round trip and its jitter. The first answer of a connection is
        not counted (its time includes the TCP handshake)."""
        link, loop = self.links[peer], asyncio.get_running_loop()
        warm = False
        while True:
            await asyncio.sleep(self.control_probe_s)
            t0 = loop.time()
            try:
                async with asyncio.timeout(30):
                    await link.call(TrafficClass.CONTROL, "GET", PEER_MESSAGES_ROUTE,
                                    accept=(204,))
            except (TransferdError, TimeoutError):
                warm = False
                continue
            seconds = loop.time() - t0
            if warm:
                self.link_telemetry.control_rtt(peer, time.time(), seconds)
                self.metrics.control_rtt.labels(self.config.site, peer).observe(seconds)
            warm = True

    async def _listen(self, runner: web.AppRunner) -> None:
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
            await site.start()
        except OSError as exc:
            raise ConfigError(f"listen: cannot bind {self.config.listen}: {exc.strerror}") from exc
        self.port = runner.addresses[0][1] if runner.addresses else self.config.listen_port
        await self.message_socket.start(message_socket_path(self.config.state_path))
        host, port = self.config.data_listen_host_port
        try:
            self.data_port = self.listener.start(host, port, asyncio.get_running_loop())
        except OSError as exc:
            raise ConfigError(
                f"data_listen: cannot bind {host}:{port}: {exc.strerror}"
            ) from exc
        log.info(
            "daemon.listening",
            extra={"fields": {"site": self.config.site, "url": self.url,
                              "data_port": self.data_port,
                              "message_socket": self.message_socket_path()}},
        )

    async def _warm_channels(self, peer: str) -> None:
        """Open the data channels to `peer` at start, before a job needs them: the opening's
        round trips (TCP, the HMAC exchange, asking for the data port) then cost a job nothing.
        A peer that is not up yet is tried again (backoff up to 2 s, for WARM_BUDGET_S); a job
        opens what is missing anyway."""
        link, channels = self.links[peer], self.channels[peer]
        delays = backoff_delays(WARM_BUDGET_S, first_s=0.1)
        up = self._peer_up[peer]
        while True:
            up.clear()
            try:
                await channels.ensure(
                    self.traffic[peer].streams_wanted(), lambda: self.sender.data_address(link)
                )
                return
            except TransferdError as exc:
                self.sender.forget_data_address(peer)
                delay = next(delays, None)
                if delay is None:
                    log.info("channel.warm_gave_up", extra={"fields": {
                        "peer": peer, "error": str(exc)[:200]}})
                    return
                # The peer opening its own channels here says it is up: try again at once.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await up.wait()

    def _peer_seen(self, peer: str) -> None:
        """`peer` opened a data channel or its message hop here: it is up."""
        event = self._peer_up.get(peer)
        if event is not None:
            event.set()
        hop = self.messages.hops.get(peer)
        if hop is not None:
            hop.poke()

    def _job_sources(self) -> list[Callable[[], Coroutine[Any, Any, None]]]:
        """Watch mode (configured, or implied by a plan's checkpoint entries) and a plan's
        sync runner: each a loop that submits ordinary jobs."""
        w = self.config.watch
        sources: list[Callable[[], Coroutine[Any, Any, None]]] = []
        if w.enabled or (self.plan is not None and self.plan.checkpoints):
            default = self.config.checkpoints.targets
            plan = self.plan
            watcher = CheckpointWatcher(
                storage=self.storage,
                journal=self.journal,
                submit=self.sender.submit,
                targets=lambda step: (
                    default if plan is None else plan.checkpoint_targets(step, default)
                ),
                clock=self.clock,
                marker=w.marker,
                quiet_period_s=w.quiet_period_s,
                poll_interval_s=w.poll_interval_s,
                on_policy_refusal=self.metrics.policy_refusals.labels("sender").inc,
            )
            sources.append(watcher.run)
        if self.plan is not None and self.plan.sync:
            run = self.plan

            def submit_planned(
                path: str, dests: list[str], cls: TrafficClass | None = None
            ) -> list[str]:
                # Along the plan's routes (relays, shares) for this prefix and destination.
                return self.sender.submit(
                    path, dests, cls, routes=run.routes_for(path, dests[0]) if dests else ()
                )

            runner = SyncRunner(
                routes=self.plan.sync,
                storage=self.storage,
                journal=self.journal,
                submit=submit_planned,
                clock=self.clock,
                quiet_period_s=w.quiet_period_s,
                poll_interval_s=w.poll_interval_s,
            )
            sources.append(runner.run)
        return sources
