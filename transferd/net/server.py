"""HTTP handlers of a daemon (aiohttp): thin adapters from requests to the Receiver and Sender.

Peer API (signed with the pair secret): open an upload, have/want, PUT a chunk, commit.
Local API (signed with the site's own secret, used by the CLI): send, jobs, status.
`/metrics` is Prometheus text. Every TransferdError becomes its JSON body and HTTP status here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import blake3
from aiohttp import web

from transferd.errors import AuthError, IntegrityError, ProtocolError, TransferdError
from transferd.protocol.auth import AuthHeaders, authenticate
from transferd.protocol.manifest import (
    MAX_CHUNK_BYTES,
    HaveRequest,
    SignedManifest,
    UploadIntent,
    parse_body,
)

if TYPE_CHECKING:
    from transferd.daemon import Daemon

__all__ = ["build_app"]

log = logging.getLogger("transferd.server")
_HEX64 = frozenset("0123456789abcdef")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error_response(exc: TransferdError) -> web.Response:
    return web.json_response(exc.to_json(), status=exc.http_status)


def build_app(daemon: Daemon) -> web.Application:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except AuthError as exc:
            daemon.metrics.auth_failures.labels(exc.message.split(":")[0][:40]).inc()
            log.warning(
                "auth.refused", extra={"fields": {"path": request.path[:200], "error": exc.message}}
            )
            return _error_response(exc)
        except TransferdError as exc:
            if exc.kind == "integrity":
                daemon.metrics.integrity_failures.labels(
                    request.headers.get("X-Transferd-Site", "?")[:64], "receiver"
                ).inc()
            log.warning(
                "request.refused",
                extra={
                    "fields": {"path": request.path[:200], "kind": exc.kind, "error": exc.message}
                },
            )
            return _error_response(exc)

    app = web.Application(client_max_size=MAX_CHUNK_BYTES + 1024 * 1024, middlewares=[errors])

    def authed(request: web.Request, *, local: bool) -> AuthHeaders:
        auth = authenticate(
            request.headers,
            method=request.method,
            path_qs=request.raw_path,
            keys=daemon.keyring,
            guard=daemon.guard,
            now=daemon.clock(),
        )
        if local and auth.site != daemon.config.site:
            raise AuthError("the local API only answers this site's own CLI", status=403)
        if not local and auth.site not in daemon.config.peers:
            raise AuthError(f"site {auth.site!r} is not a peer of this site", status=403)
        return auth

    async def json_body(request: web.Request, auth: AuthHeaders) -> bytes:
        body = await request.read()
        if blake3.blake3(body).hexdigest() != auth.body_blake3:
            raise IntegrityError("request body does not match its signed blake3")
        return body

    async def open_upload(request: web.Request) -> web.Response:
        auth = authed(request, local=False)
        intent = parse_body(UploadIntent, await json_body(request, auth))
        committed = daemon.receiver.open(intent, auth.site, daemon.clock())
        return web.json_response({"upload": intent.upload, "committed": committed})

    async def have(request: web.Request) -> web.Response:
        auth = authed(request, local=False)
        upload = request.match_info["upload"]
        query = parse_body(HaveRequest, await json_body(request, auth))
        want, copies = daemon.receiver.have(upload, auth.site, query)
        for digest, targets in copies:
            filled = await asyncio.to_thread(daemon.receiver.fill_local, upload, digest, targets)
            if filled:
                daemon.journal.record_received(upload, targets, digest)
            else:
                want += [i for i, c in enumerate(query.chunks) if c.hash == digest]
        return web.json_response({"want": sorted(set(want))})

    async def put_chunk(request: web.Request) -> web.Response:
        auth = authed(request, local=False)
        upload, digest = request.match_info["upload"], request.match_info["digest"]
        if len(digest) != 64 or not set(digest) <= _HEX64:
            raise ProtocolError("chunk address must be 64 lowercase hex digits")
        try:
            raw_length = int(request.headers.get("X-Transferd-Length", ""))
        except ValueError:
            raise ProtocolError("X-Transferd-Length header missing or not an integer") from None
        if not 0 < raw_length <= MAX_CHUNK_BYTES:
            raise ProtocolError(f"chunk length {raw_length} out of range")
        encoding = request.headers.get("X-Transferd-Encoding", "identity")
        locations = daemon.receiver.locations(
            upload, auth.site, digest, raw_length, request.query.get("at", "")
        )
        async with daemon.receive_buffers.body(request, MAX_CHUNK_BYTES) as body:
            wire = len(body)
            await daemon.run_blocking(
                daemon.receiver.verify_and_write,
                upload,
                digest,
                body,
                auth.body_blake3,
                encoding,
                raw_length,
                locations,
            )
        daemon.journal.record_received(upload, locations, digest)
        daemon.metrics.bytes_received.labels(auth.site).inc(wire)
        daemon.metrics.chunks_received.labels(auth.site).inc()
        return web.Response(status=204)

    async def commit(request: web.Request) -> web.Response:
        auth = authed(request, local=False)
        upload = request.match_info["upload"]
        signed = parse_body(SignedManifest, await json_body(request, auth))
        known = daemon.journal.upload(upload)
        if known is not None and known[0] == auth.site and known[2] == "committed":
            return web.json_response({"committed": True})
        manifest, _intent = daemon.receiver.check_manifest(upload, auth.site, signed)
        async with daemon.commit_lock(upload):
            missing = daemon.receiver.missing(upload, manifest)
            if missing:
                return web.json_response({"committed": False, "want": missing}, status=409)
            bad = await asyncio.to_thread(daemon.receiver.verify_files, upload, manifest)
            if bad:
                daemon.journal.forget_received(upload, bad)
                daemon.metrics.integrity_failures.labels(auth.site, "receiver").inc(len(bad))
                log.warning(
                    "commit.refetch", extra={"fields": {"upload": upload, "chunks": len(bad)}}
                )
                return web.json_response({"committed": False, "want": bad}, status=409)
            try:
                await asyncio.to_thread(daemon.receiver.commit_files, upload, manifest)
            except TransferdError:
                daemon.receiver.fail(upload, daemon.clock())
                raise
            daemon.receiver.after_commit(upload, manifest, daemon.clock())
        log.info(
            "upload.committed",
            extra={"fields": {"upload": upload, "root": manifest.root, "from": auth.site}},
        )
        return web.json_response({"committed": True})

    async def local_send(request: web.Request) -> web.Response:
        auth = authed(request, local=True)
        body = await json_body(request, auth)
        try:
            import json

            req: Any = json.loads(body)
            path, to = req["path"], req["to"]
            if (
                not isinstance(path, str)
                or not isinstance(to, list)
                or not all(isinstance(t, str) for t in to)
            ):
                raise TypeError
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtocolError('send needs {"path": str, "to": [site, ...]}') from exc
        jobs = daemon.sender.submit(path, to)
        return web.json_response({"jobs": jobs})

    async def local_jobs(request: web.Request) -> web.Response:
        authed(request, local=True)
        ids = [i for i in request.query.get("ids", "").split(",") if i]
        jobs = [daemon.journal.job(i) for i in ids[:1000]]
        return web.json_response({"jobs": [j.to_json() for j in jobs if j is not None]})

    async def local_status(request: web.Request) -> web.Response:
        authed(request, local=True)
        return web.json_response(daemon.status())

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=daemon.metrics.render(), content_type="text/plain", charset="utf-8"
        )

    app.router.add_post("/v1/uploads", open_upload)
    app.router.add_post("/v1/uploads/{upload}/have", have)
    app.router.add_put("/v1/uploads/{upload}/chunks/{digest}", put_chunk)
    app.router.add_post("/v1/uploads/{upload}/commit", commit)
    app.router.add_post("/v1/local/send", local_send)
    app.router.add_get("/v1/local/jobs", local_jobs)
    app.router.add_get("/v1/local/status", local_status)
    app.router.add_get("/metrics", metrics)
    return app
