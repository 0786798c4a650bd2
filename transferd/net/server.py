"""The daemon's one HTTP server (aiohttp): every route, one authentication, one error mapping.

Peer API (signed with the pair secret): uploads (open, have/want, commit, abort), where the
data channels connect (the chunks themselves travel on those, `net.channels`), and messages.
Local API (signed with the site's own secret, used by the CLI): send, jobs, status,
messages to a peer, the inbox, the link telemetry. `/metrics` is Prometheus text. Handlers are
thin: authenticate, parse the body or query into its wire model (`protocol.wire`), call one
method, answer. The one middleware turns every TransferdError into its JSON body and HTTP
status, counts authentication and integrity failures, logs the refusal, and signs the reply to
every request that authenticated (`protocol.auth.sign_reply`: status and body bound to the
request's nonce).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web
from pydantic import BaseModel

from netplan.plan import BULK_CLASSES, TrafficClass
from netplan.telemetry import TelemetryReport
from transferd.errors import (
    AuthError,
    IntegrityError,
    ProtocolError,
    TransferdError,
    TransportError,
)
from transferd.net.message_hop import HopServer
from transferd.net.messages import MessageService
from transferd.net.relay import RoutingInbound
from transferd.protocol.auth import AuthHeaders, RequestVerifier, sign_reply
from transferd.protocol.channel import DataChannelAnswer
from transferd.protocol.http_paths import MESSAGE_SOCKET_ROUTE
from transferd.protocol.local_api import (
    MAX_JOBS_PER_QUERY,
    MAX_JOBS_WAIT_MS,
    Job,
    JobsAnswer,
    MessageSocketAnswer,
    SendAnswer,
    SendRequest,
    SiteStatus,
)
from transferd.protocol.manifest import HaveRequest, OpenRequest, SignedManifest
from transferd.protocol.messages import (
    MAX_MESSAGE_BYTES,
    InboxAnswer,
    InboxQuery,
    MessageEnvelope,
    MessageQuery,
)
from transferd.protocol.upload import commit_wait_s
from transferd.protocol.wire import (
    ABORT_ROUTE,
    COMMIT_ROUTE,
    DATA_CHANNEL_ROUTE,
    HAVE_ROUTE,
    INBOX_ROUTE,
    LOCAL_JOBS_ROUTE,
    LOCAL_SEND_ROUTE,
    LOCAL_STATUS_ROUTE,
    MESSAGE_HOP_ROUTE,
    MESSAGES_ROUTE,
    PEER_MESSAGES_ROUTE,
    TELEMETRY_ROUTE,
    UPLOADS_ROUTE,
    parse_body,
    parse_query,
    to_body,
)
from transferd.site.metrics import Metrics

__all__ = ["LocalApi", "build_app"]

log = logging.getLogger("transferd.server")
# Control bodies only (manifests of large folders, have/want batches): chunks never come here.
CONTROL_BODY_LIMIT = 64 * 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_AUTH = web.RequestKey("auth", AuthHeaders)  # set once a request authenticated


class LocalApi(Protocol):
    """What the local API asks of the daemon."""

    def submit(
        self, path: str, dests: list[str], timeout_s: float | None = None,
        via: list[str] | None = None, multipath: bool = False,
    ) -> list[str]: ...
    def job(self, job_id: str) -> Job | None: ...
    async def job_ended(self, timeout_s: float) -> None: ...
    def status(self) -> SiteStatus: ...
    def telemetry(self) -> TelemetryReport: ...
    def message_socket_path(self) -> str | None: ...


def _answer(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(body=to_body(model), status=status, content_type="application/json")


def build_app(
    *,
    verifier: RequestVerifier,
    inbound: RoutingInbound,
    local: LocalApi,
    messages: MessageService,
    metrics: Metrics,
    data_port: Callable[[], int],
    hop_server: HopServer | None = None,
) -> web.Application:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await _answer_or_error(request, handler)
        auth = request.get(_AUTH)
        if isinstance(auth, AuthHeaders) and type(response) is web.Response:
            body = response.body
            if body is None or isinstance(body, bytes):
                secret = verifier.keys.secret_for(auth.site)
                response.headers.update(
                    sign_reply(secret, auth.nonce, response.status, body or b"")
                )
        return response

    async def _answer_or_error(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except TransferdError as exc:
            if isinstance(exc, AuthError):
                metrics.auth_failures.labels(exc.message.split(":")[0][:40]).inc()
            elif isinstance(exc, IntegrityError):
                source = request.headers.get("X-Transferd-Site", "?")[:64]
                metrics.integrity_failures.labels(source, "receiver").inc()
            event = "auth.refused" if isinstance(exc, AuthError) else "request.refused"
            log.warning(
                event,
                extra={
                    "fields": {"path": request.path[:200], "kind": exc.kind, "error": exc.message}
                },
            )
            return web.json_response(exc.to_json(), status=exc.http_status)

    app = web.Application(client_max_size=CONTROL_BODY_LIMIT, middlewares=[errors])

    def peer(request: web.Request) -> AuthHeaders:
        request[_AUTH] = auth = verifier.peer(request.headers, request.method, request.raw_path)
        return auth

    def own_cli(request: web.Request) -> AuthHeaders:
        request[_AUTH] = auth = verifier.local(request.headers, request.method, request.raw_path)
        return auth

    async def body_of(
        request: web.Request, auth: AuthHeaders, limit: int | None = None
    ) -> bytes:
        """The whole body, checked against its signed blake3 (IntegrityError: damaged)."""
        if limit is not None and (request.content_length or 0) > limit:
            raise ProtocolError(f"body of {request.content_length} bytes exceeds {limit}")
        body = await request.read()
        auth.check_body(body)
        return body

    # -- peer API: uploads ------------------------------------------------------------------

    async def open_upload(request: web.Request) -> web.Response:
        auth = peer(request)
        # An UploadIntent, or an OpenRequest that also offers the first chunks (have/want).
        intent = parse_body(OpenRequest, await body_of(request, auth))
        # ?via=R2,...: relays after this site (a relay passing the upload on); signed with the
        # request's path.
        via = tuple(v for v in request.query.get("via", "").split(",") if v)[:8]
        # ?class=sync: the job's traffic class, for a relay's scheduling of what it passes on.
        cls = request.query.get("class", TrafficClass.SYNC.value)
        if cls not in {c.value for c in BULK_CLASSES}:
            raise ProtocolError(f"class: {cls[:32]!r} is not a bulk traffic class")
        return _answer(await inbound.open(intent, auth.site, via, TrafficClass(cls)))

    async def have(request: web.Request) -> web.Response:
        auth = peer(request)
        query = parse_body(HaveRequest, await body_of(request, auth))
        return _answer(await inbound.have(request.match_info["upload"], auth.site, query))

    async def data_channel(request: web.Request) -> web.Response:
        peer(request)
        return _answer(DataChannelAnswer(port=data_port()))

    async def commit(request: web.Request) -> web.Response:
        auth = peer(request)
        signed = parse_body(SignedManifest, await body_of(request, auth))
        # ?wait_ms=N: sent with the last chunks still on the way; answered once they land.
        wait_s = commit_wait_s(request.query.get("wait_ms"))
        answer = await inbound.commit(request.match_info["upload"], auth.site, signed, wait_s)
        return _answer(answer, 200 if answer.committed else 409)

    async def abort(request: web.Request) -> web.Response:
        auth = peer(request)
        await body_of(request, auth, 0)
        await inbound.abort(request.match_info["upload"], auth.site)
        return web.Response(status=204)

    # -- peer API: messages -----------------------------------------------------------------

    async def receive_message(request: web.Request) -> web.Response:
        auth = peer(request)
        envelope = parse_query(MessageEnvelope, request.headers)
        body = await body_of(request, auth, MAX_MESSAGE_BYTES)
        return _answer(await messages.receive(auth.site, envelope, body))

    async def message_hop(request: web.Request) -> web.StreamResponse:
        auth = peer(request)  # the Upgrade request is signed like any other
        assert hop_server is not None  # the route exists only with one
        return await hop_server.serve(request, auth.site)

    async def warm_up(request: web.Request) -> web.Response:
        peer(request)
        return web.Response(status=204)  # a peer opening its interactive pool; says nothing

    # -- local API ----------------------------------------------------------------------------

    async def local_send(request: web.Request) -> web.Response:
        auth = own_cli(request)
        send = parse_body(SendRequest, await body_of(request, auth))
        return _answer(
            SendAnswer(jobs=local.submit(send.path, send.to, send.timeout_s, send.via,
                                         send.multipath))
        )

    async def local_jobs(request: web.Request) -> web.Response:
        own_cli(request)
        ids = [i for i in request.query.get("ids", "").split(",") if i][:MAX_JOBS_PER_QUERY]
        # wait_ms: answer once one of the jobs ends (or the time is up), not at once: `send
        # --wait` learns of a commit when it happens, with one request a second, not 20.
        try:
            wait_s = min(float(request.query.get("wait_ms", "0")), MAX_JOBS_WAIT_MS) / 1e3
        except ValueError:
            raise ProtocolError("wait_ms: not a number of milliseconds") from None
        deadline = asyncio.get_running_loop().time() + max(0.0, wait_s)
        while True:
            jobs = [job for job in map(local.job, ids) if job is not None]
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0 or not any(j.state.active for j in jobs):
                return _answer(JobsAnswer(jobs=jobs))
            await local.job_ended(left)

    async def local_status(request: web.Request) -> web.Response:
        own_cli(request)
        return _answer(local.status())

    async def local_telemetry(request: web.Request) -> web.Response:
        own_cli(request)
        return _answer(local.telemetry())

    async def message_socket(request: web.Request) -> web.Response:
        own_cli(request)
        path = local.message_socket_path()
        if path is None:
            raise TransportError("the message socket is not listening yet")
        return _answer(MessageSocketAnswer(path=path))

    async def send_message(request: web.Request) -> web.Response:
        auth = own_cli(request)
        query = parse_query(MessageQuery, request.query)
        body = await body_of(request, auth, MAX_MESSAGE_BYTES)
        receipt = await messages.send(request.match_info["peer"], body, query)
        return _answer(receipt, 200 if query.wait else 202)

    async def read_inbox(request: web.Request) -> web.Response:
        own_cli(request)
        query = parse_query(InboxQuery, request.query)
        got = await messages.inbox.get(query.wait_ms / 1000.0, query.max)
        return _answer(InboxAnswer(messages=got))

    async def prometheus(_request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    app.router.add_post(UPLOADS_ROUTE, open_upload)
    app.router.add_post(HAVE_ROUTE, have)
    app.router.add_get(DATA_CHANNEL_ROUTE, data_channel)
    app.router.add_post(COMMIT_ROUTE, commit)
    app.router.add_post(ABORT_ROUTE, abort)
    app.router.add_post(PEER_MESSAGES_ROUTE, receive_message)
    app.router.add_get(PEER_MESSAGES_ROUTE, warm_up)
    if hop_server is not None:
        app.router.add_get(MESSAGE_HOP_ROUTE, message_hop)
    app.router.add_post(LOCAL_SEND_ROUTE, local_send)
    app.router.add_get(LOCAL_JOBS_ROUTE, local_jobs)
    app.router.add_get(LOCAL_STATUS_ROUTE, local_status)
    app.router.add_get(TELEMETRY_ROUTE, local_telemetry)
    app.router.add_post(MESSAGES_ROUTE, send_message)
    app.router.add_get(INBOX_ROUTE, read_inbox)
    app.router.add_get(MESSAGE_SOCKET_ROUTE, message_socket)
    app.router.add_get("/metrics", prometheus)
    return app
