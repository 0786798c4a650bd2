"""Real daemons with a data_dir on S3 (moto's server on 127.0.0.1) reached through a proxy
that answers some of the store's requests with an error of its own (503 SlowDown, 403
AccessDenied), as a real store does under load or after a policy change. Whatever the call
(a watch poll's listing, a receiver's listing as an upload opens), the failure is classified
(`site.failures`): the daemon goes on serving, a 503 is tried again and commits once the store
answers, a 403 fails the job (not the daemon), and the work completes once the store heals."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import fsspec
import pytest
from aiohttp import web

from transferd.testing import MotoS3Server, bound_socket, loopback_pair, wait_for_jobs

CHUNK = 64 * 1024
_HOP = {"transfer-encoding", "connection", "content-length", "keep-alive", "host"}
_ERRORS = {403: "AccessDenied", 503: "SlowDown"}
Rule = Callable[[web.Request], int | None]


class FailingStore:
    """An HTTP proxy in front of the S3 endpoint, on its own thread and loop (the daemons'
    storage calls block their threads, some on the daemons' loop). `rule(request)` gives the
    status to refuse a request with (S3's XML error body), or None to pass it on; `refused`
    counts the refusals."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.rule: Rule = lambda _request: None
        self.refused = 0
        self._sock = bound_socket()
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        status = self.rule(request)
        if status is not None:
            self.refused += 1
            code = _ERRORS.get(status, "InternalError")
            body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                    f"<Message>refused by the test's store</Message></Error>")
            return web.Response(status=status, body=b"" if request.method == "HEAD" else
                                body.encode(), content_type="application/xml")
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with self._session.request(
            request.method, self.target + request.rel_url.raw_path_qs, headers=headers,
            data=await request.read(), allow_redirects=False,
        ) as upstream:
            body = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
            if request.method == "HEAD":
                out["Content-Length"] = upstream.headers.get("Content-Length", "0")
                return web.Response(status=upstream.status, headers=out)
            return web.Response(status=upstream.status, headers=out, body=body)

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def __enter__(self) -> FailingStore:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


async def _until(check: Callable[[], bool], timeout_s: float = 60.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if check():
                return
            await asyncio.sleep(0.05)


def _listing(recursive: bool) -> Callable[[web.Request], bool]:
    """ListObjectsV2 requests: recursive (no delimiter: `find`) or one level (`ls`)."""
    return lambda r: (r.method == "GET" and "list-type" in r.query
                      and ("delimiter" not in r.query) is recursive)


@contextmanager
def _site_on_store(
    tmp_path: Path, s3: MotoS3Server, bucket: str, site: str
) -> Iterator[tuple[FailingStore, dict[str, Any], Any, str]]:
    """`site`'s data_dir at s3://bucket/site-X through a FailingStore; the other on local disk.
    Yields the store, the config overrides, and an fsspec filesystem straight to the endpoint
    (for writing sources and reading results) with the site's root."""
    with FailingStore(s3.endpoint_url) as store:
        options = {**s3.storage_options, "endpoint_url": store.url}
        other = "B" if site == "A" else "A"
        (tmp_path / f"site-{other}").mkdir()
        overrides = {site: {"data_dir": f"s3://{bucket}/site-{site}",
                            "state_dir": str(tmp_path / f"state-{site}"),
                            "storage_options": options}}  # fmt: skip
        fs, _ = fsspec.core.url_to_fs(f"s3://{bucket}", **s3.storage_options)
        yield store, overrides, fs, f"{bucket}/site-{site}"


@pytest.mark.parametrize("status", [503, 403])
async def test_a_watch_poll_whose_listing_the_store_refuses_leaves_the_daemon_serving(
    tmp_path: Path, moto_s3: MotoS3Server, s3_bucket: str, status: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A's checkpoint watcher polls its S3 data_dir; the recursive listing behind a step's
    newest mtime (`newest_mtime`: an fsspec `find`) is refused. It used to escape the watcher
    as s3fs's own OSError and end the daemon's task group; now each poll logs the storage
    error and the next one tries again: once the store heals, the step reaches B."""
    with _site_on_store(tmp_path, moto_s3, s3_bucket, "A") as (store, overrides, fs, root):
        step = random.Random(1).randbytes(3 * CHUNK + 5)
        fs.pipe_file(f"{root}/checkpoints/r/step-1/model.bin", step)  # no marker: quiet period
        overrides["A"]["checkpoints"] = {"targets": ["B"]}
        overrides["A"]["watch"] = {"enabled": True, "poll_interval_s": 0.05,
                                   "quiet_period_s": 0.2}
        async with loopback_pair(tmp_path, chunk_size=CHUNK, **overrides) as (a, _b):
            recursive = _listing(recursive=True)
            store.rule = lambda r: status if recursive(r) else None
            with caplog.at_level(logging.ERROR, logger="transferd.plan"):
                await _until(lambda: store.refused >= 2 and any(
                    r.message == "watch.error" for r in caplog.records))
            errors = [getattr(r, "fields", {}) for r in caplog.records
                      if r.message == "watch.error"]
            assert errors
            assert errors[0]["kind"] == "storage"
            assert "checkpoints/r/step-1" in errors[0]["error"]
            assert not (tmp_path / "site-B/checkpoints/r/step-1").exists()
            store.rule = lambda _r: None  # the store heals: the watcher is still polling
            got = tmp_path / "site-B/checkpoints/r/step-1/model.bin"
            await _until(got.exists)
            assert got.read_bytes() == step


async def test_a_receivers_listing_answered_503_is_tried_again_and_commits(
    tmp_path: Path, moto_s3: MotoS3Server, s3_bucket: str
) -> None:
    """B's data_dir on S3: the listing of a folder's prefix as its upload opens (`sizes`)
    is answered 503 for a while (past botocore's own retries). The receiver's error is a
    transient StorageError of the destination's side: A's job waits and tries again, and
    commits once the store answers."""
    with _site_on_store(tmp_path, moto_s3, s3_bucket, "B") as (store, overrides, fs, root):
        src = tmp_path / "site-A/curated/ds"
        src.mkdir(parents=True)
        members = {f"part-{i}.bin": random.Random(i).randbytes(2 * CHUNK + i) for i in range(3)}
        for name, data in members.items():
            (src / name).write_bytes(data)
        failing = [True]
        recursive = _listing(recursive=True)
        store.rule = lambda r: 503 if failing[0] and recursive(r) else None
        async with loopback_pair(tmp_path, chunk_size=CHUNK, **overrides) as (a, _b):
            [job_id] = a.sender.submit("curated/ds", ["B"])
            await _until(lambda: store.refused >= 6)  # past one request's own retries
            job = a.journal.job(job_id)
            assert job is not None
            assert job.state.value != "failed", job.error
            failing[0] = False
            [job] = await wait_for_jobs(a, [job_id], timeout_s=90)
        assert job.state == "committed", job.error
        assert job.retries >= 1
        for name, data in members.items():
            assert bytes(fs.cat_file(f"{root}/curated/ds/{name}")) == data


async def test_a_receivers_listing_refused_403_fails_the_job_and_both_daemons_serve_on(
    tmp_path: Path, moto_s3: MotoS3Server, s3_bucket: str
) -> None:
    """The same listing refused (403): asking again will not change it, so the job fails at
    once, naming the refusal; B keeps serving, and once the store lets it list, the next job
    commits."""
    with _site_on_store(tmp_path, moto_s3, s3_bucket, "B") as (store, overrides, fs, root):
        src = tmp_path / "site-A/curated/ds"
        src.mkdir(parents=True)
        data = random.Random(7).randbytes(2 * CHUNK + 1)
        (src / "a.bin").write_bytes(data)
        (src / "b.bin").write_bytes(data[::-1])
        recursive = _listing(recursive=True)
        store.rule = lambda r: 403 if recursive(r) else None
        async with loopback_pair(tmp_path, chunk_size=CHUNK, **overrides) as (a, _b):
            [job] = await wait_for_jobs(a, a.sender.submit("curated/ds", ["B"]), timeout_s=60)
            assert job.state == "failed"
            assert job.error is not None
            assert "AccessDenied" in job.error
            assert job.retries == 0
            store.rule = lambda _r: None
            [job] = await wait_for_jobs(a, a.sender.submit("curated/ds", ["B"]), timeout_s=60)
            assert job.state == "committed", job.error
        assert bytes(fs.cat_file(f"{root}/curated/ds/a.bin")) == data
