"""The receiving side of replication at one site: uploads staged by offset, verified, committed
atomically. The decisions (what is missing, which places a chunk fills, whether a manifest
describes its upload) are `protocol.upload`'s; this module does the site's I/O around them.

`open` checks policy and that the files which change could fit (a lower bound: their sizes against
the free space); a staged file is made and its space reserved when its first bytes arrive. `have`
answers which chunks must still cross the wire: a chunk that the committed file at the upload's
destination already holds at the same offset is recorded "in place" (an unchanged file is kept, or
hard-linked into a folder's new tree, at commit: re-sending it needs no space and moves no bytes);
the rest are filled from bytes this site holds elsewhere (an earlier upload, or another committed
file: delta replication) or wanted. `verify_and_write` checks a body against its signed blake3 and
its content address before writing it; a commit verifies the manifest signature (the model checks
that the chunk list tiles each file and has the signed file digest as its Merkle root), that every
chunk of every file was received with the manifest's hash, then renames into place. A chunk
verified in memory and written by this process is not hashed again; one staged before a restart
(its bytes may not have reached the disk before a crash) is read back and re-hashed at commit, and
fetched again when it does not match. State lives in the journal, so a receiver killed at any
moment answers the resumed sender's `have` with exactly what it still lacks.
"""

from __future__ import annotations

import errno
import logging
import shutil
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet

import pyarrow as pa

from transferd.errors import IntegrityError, PolicyViolation, ProtocolError, StorageError
from transferd.protocol.arrow_chunks import (
    ArrowChunkError,
    ArrowChunkMemoryError,
    open_record_batch_chunk,
    read_chunk_schema,
)
from transferd.protocol.auth import Keys
from transferd.protocol.chunks import Encoding, blake3_hex
from transferd.protocol.codec import decode_body
from transferd.protocol.manifest import HaveRequest, Manifest, SignedManifest, UploadIntent
from transferd.protocol.routes import check_residency
from transferd.protocol.upload import (
    ChunkTarget,
    HaveDecision,
    answer_have,
    check_intent,
    check_manifest,
    chunk_targets,
    destination,
    member_paths,
    missing,
)
from transferd.site.checkpoints import is_step_root, update_run
from transferd.site.journal import ChunkLocation, Journal, Upload, UploadState
from transferd.site.metrics import Metrics
from transferd.site.source import SourceFile
from transferd.site.staging import Staging
from transferd.site.storage import LocalStorage, SiteStorage

__all__ = ["Receiver"]

log = logging.getLogger("transferd.receiver")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _changed(rel: str, what: str) -> IntegrityError:
    return IntegrityError(f"{rel}: {what}: the file changed after its commit", path=rel)


def _no_memory(rel: str, span: ChunkLocation) -> StorageError:
    """No memory to read or open the chunk at `span` of the committed file `rel`."""
    return StorageError(f"reading {rel}: no memory for its {span.length}-byte chunk at offset "
                        f"{span.offset}", path=rel, errno=errno.ENOMEM)


class Receiver:
    def __init__(
        self,
        site: str,
        storage: SiteStorage,
        journal: Journal,
        keys: Keys,
        metrics: Metrics,
        retention: int,
        run_retention: Mapping[str, int] | None = None,
        region: str | None = None,
        relays: Collection[str] = (),
        accept_via: Mapping[str, Collection[str]] | None = None,
    ) -> None:
        self.site = site
        # This site's region (checked against an upload's residency), and the peers whose
        # relayed uploads it takes (another site's upload passed on: the manifest its source
        # signed still decides what is committed): any of `relays`, or with `accept_via` only
        # those it names for the upload's source.
        self.region = region
        self.relays = frozenset(relays)
        self.accept_via = (None if accept_via is None
                           else {src: frozenset(r) for src, r in accept_via.items()})
        self.storage = storage
        self.journal = journal
        self.keys = keys
        self.metrics = metrics
        self.retention = retention
        # Per-run overrides (`checkpoints/<run>` -> steps kept), e.g. from a netplan plan.
        self.run_retention = dict(run_retention or {})
        self._staging: dict[str, Staging] = {}
        # (file, offset) of chunks this process verified in memory and wrote, per upload; any
        # other staged chunk is read back and re-hashed at commit.
        self._verified: dict[str, set[tuple[int, int]]] = {}
        self._verified_lock = threading.Lock()
        # Uploads failed or given up by this process: refused even when the journal could not
        # record it (its disk full), so no late chunk makes their staging again.
        self._given_up: set[str] = set()
        # Why, when the site's storage failed it (out of space): what a later request of the
        # upload is answered, so its sender's job fails on the cause, whichever arrives first.
        self._failed_by: dict[str, StorageError] = {}
        # Per upload: its root and the bytes of each file verified by this process, so a file
        # whole and verified is handed to `storage.member_staged` at once (an object store
        # uploads it while the transfer runs).
        self._filled: dict[str, tuple[str, list[int]]] = {}
        # Per open upload: its journal row as last read on the loop, valid while the staging
        # it was read with is still the upload's (a commit, failure or reopening replaces or
        # drops it), so a chunk's checks need neither the journal nor the loop (`chunk_targets`).
        self._open_rows: dict[str, tuple[Staging, Upload]] = {}

    # -- open --------------------------------------------------------------------------------
    def open(self, intent: UploadIntent, peer: str, now: float,
             listed: dict[int, int | None] | None = None) -> bool:
        """Stage the upload (idempotent). Returns True when it was already committed.
        `listed`, when given, gets the sizes its space check found at the destinations of
        the files not staged yet (None: no file there), by file index (`fresh_files`)."""
        relayed = peer != intent.source_site
        try:
            if relayed and not self._may_relay(intent.source_site, peer):
                raise PolicyViolation(
                    f"{self.site} does not accept {intent.source_site}'s uploads through {peer}"
                    + (" (relay.accept_via)" if self.accept_via is not None else ""),
                    hop=self.site)
            check_intent(intent, peer, self.site, relayed=relayed)
            check_residency(self.site, self.region, intent.residency, "destination")
            for path in member_paths(intent):
                self.storage.check_path(path)  # e.g. a symlink leading out of data_dir
        except PolicyViolation as exc:
            self.metrics.policy_refusals.labels("receiver").inc()
            log.warning("upload.refused", extra={"fields": {
                "upload": intent.upload, "from": peer, "source": intent.source_site,
                "error": exc.message}})
            raise
        known = self.journal.upload(intent.upload)
        if known is not None:
            if known.source != intent.source_site or known.intent != intent:
                raise ProtocolError(f"upload id {intent.upload} reused for different content")
            if known.state is UploadState.COMMITTED:
                return True
        staging = self._staging_for(intent)
        try:
            self._check_space(intent, staging, listed)
            staging.create()
        except StorageError:
            # E.g. no space for the files: give back what was staged, record nothing new.
            self._staging.pop(intent.upload, None)
            staging.discard()
            raise
        again = intent.upload in self._given_up
        self._given_up.discard(intent.upload)
        self._failed_by.pop(intent.upload, None)
        if known is None:
            # Recorded under its source, whichever way it came: a sender that falls back from
            # a relay to the direct path resumes the same upload.
            self.journal.open_upload(intent, intent.source_site, now)
        elif known.state is UploadState.FAILED or again:
            # Failed here (or reclaimed for age) and opened again by its sender: start over.
            self.journal.reopen_upload(intent.upload, now)
            log.info("upload.reopened", extra={"fields": {"upload": intent.upload}})
        return False

    def _check_space(self, intent: UploadIntent, staging: Staging,
                     listed: dict[int, int | None] | None = None) -> None:
        """Refuse at once an upload whose changing files cannot fit: a lower bound, counting
        only files that are not staged yet and whose destination differs in size (a file of
        the same size may be unchanged: `have` finds out, and it then needs nothing). The
        sizes found go to `listed` (when given)."""
        todo = [i for i in range(len(intent.files)) if not staging.exists(i)]
        found = self.storage.sizes([destination(intent, i) for i in todo])
        if listed is not None:
            listed.update(zip(todo, found, strict=True))
        need = sum(
            intent.files[i].size for i, size in zip(todo, found, strict=True)
            if size != intent.files[i].size
        )
        if need == 0:
            return
        free = self.storage.free_bytes()
        if need > free:
            raise StorageError(
                "no space left on the receiver's storage: the upload needs at least "
                f"{_mib(need)} for the files that change, {_mib(free)} free",
                path=intent.root,
                errno=errno.ENOSPC,
            )

    def _staging_for(self, intent: UploadIntent) -> Staging:
        staging = self._staging.get(intent.upload)
        if staging is None:
            staging = Staging(
                dir=self.storage.staging_root / intent.upload,
                kind=intent.kind,
                members=[f.path for f in intent.files],
                sizes=[f.size for f in intent.files],
                crc32=self.storage.stage_crc32,
            )
            self._staging[intent.upload] = staging
            with self._verified_lock:
                self._filled[intent.upload] = (intent.root, [0] * len(intent.files))
        return staging

    def _from(self, known: Upload | None, peer: str) -> bool:
        """`peer` may act on the upload: its source, or a relay passing it on."""
        return known is not None and (known.source == peer
                                      or self._may_relay(known.source, peer))

    def _may_relay(self, source: str, peer: str) -> bool:
        if self.accept_via is None:
            return peer in self.relays
        return peer in self.accept_via.get(source, ())

    def _open_upload(self, upload: str, peer: str) -> Upload:
        known = self.journal.upload(upload)
        if known is None or not self._from(known, peer):
            raise ProtocolError(f"unknown upload {upload[:128]!r}")
        if upload in self._given_up:
            cause = self._failed_by.get(upload)
            if cause is not None:
                error = StorageError(f"upload {upload} failed here: {cause.message}; open "
                                     "it again to start over")
                error.fields = dict(cause.fields)  # its path and errno
                raise error
            raise ProtocolError(f"upload {upload} failed here; open it again to start over")
        if known.state is not UploadState.OPEN:
            raise ProtocolError(f"upload {upload} is already {known.state.value}")
        self._staging_for(known.intent)
        return known

    def check_open(self, upload: str, peer: str) -> None:
        """`upload` from `peer` is still open here (ProtocolError otherwise): a commit that
        waited for its last chunks checks nothing failed or aborted it meanwhile."""
        self._open_upload(upload, peer)

    def committed(self, upload: str, peer: str) -> bool:
        """`upload` from `peer` is committed here already (a commit retried after its answer
        was lost)."""
        known = self.journal.upload(upload)
        return self._from(known, peer) and known is not None and (
            known.state is UploadState.COMMITTED
        )

    # -- have / want ---------------------------------------------------------------------------
    def have(self, upload: str, peer: str, request: HaveRequest) -> HaveDecision:
        """Which offered chunks must cross the wire; copies from bytes held here are done by
        `fill_local` in a thread."""
        intent = self._open_upload(upload, peer).intent

        def held_here(digest: str, length: int) -> bool:
            return any(True for _ in self.journal.find_chunk(digest, length))

        return answer_have(
            intent,
            self.journal.received(upload),
            request,
            held_here,
            in_place=self.journal.committed_at,
        )

    def unstaged_destinations(self, upload: str, peer: str) -> dict[int, str]:
        """On the loop (the journal): the upload's files with nothing staged yet (not a
        resumed upload's), by index, with where each lands."""
        intent = self._open_upload(upload, peer).intent
        staged = {f for f, _off in self.journal.received(upload)}
        return {i: destination(intent, i) for i in range(len(intent.files)) if i not in staged}

    @staticmethod
    def fresh_files(unstaged: dict[int, str], listed: dict[int, int | None]) -> list[int]:
        """Of `unstaged_destinations`, the files with no destination file either (not an
        update of a file held here) as the open's space check listed them (`open`'s
        `listed`; no second listing): candidates to go in one pass. A file the listing did
        not cover is not one (hash-first: one pass is only ever a hint)."""
        return [i for i in unstaged if i in listed and listed[i] is None]

    def fill_local(self, upload: str, digest: str, targets: Sequence[ChunkTarget]) -> bool:
        """Copy a chunk this site already holds into the upload's staging (verifying its hash:
        a committed file may have been changed locally since it was indexed). The caller
        journals it (`record`), on the thread that owns the journal."""
        staging = self._staging[upload]
        for loc in self.journal.find_chunk(digest, targets[0].length):
            try:
                if loc.upload is not None and loc.file_index is not None:
                    other = self._staging.get(loc.upload)
                    if other is None:
                        continue
                    data = other.read(loc.file_index, loc.offset, loc.length)
                else:
                    data = self.storage.read_range(loc.path, loc.offset, loc.length)
            except (StorageError, PolicyViolation):
                continue
            if len(data) != loc.length or blake3_hex(data) != digest:
                continue
            for t in targets:
                staging.write(t.file, t.offset, data)
            self._mark_verified(upload, targets)
            return True
        return False

    # -- chunks --------------------------------------------------------------------------------
    def targets(
        self, upload: str, peer: str, raw_length: int, locations: Sequence[tuple[int, int]]
    ) -> list[ChunkTarget]:
        """On the loop (it reads the journal): where a chunk goes; remembers the upload's row
        for `chunk_targets`."""
        known = self._open_upload(upload, peer)
        for gone in [u for u, (st, _row) in self._open_rows.items()
                     if self._staging.get(u) is not st]:
            del self._open_rows[gone]
        self._open_rows[upload] = (self._staging[upload], known)
        return chunk_targets(known.intent, raw_length, locations)

    def chunk_targets(
        self, upload: str, peer: str, raw_length: int, locations: Sequence[tuple[int, int]]
    ) -> list[ChunkTarget] | None:
        """Any thread: `targets` from the upload's row remembered by an earlier chunk, while
        this process still holds it open (the same staging, not given up); None when it must
        be asked on the loop. The journal parsed the upload's intent once per chunk before
        (~0.1 ms of the loop per 8 MiB chunk on loopback, benchmarks/README.md)."""
        entry = self._open_rows.get(upload)
        if (entry is None or self._staging.get(upload) is not entry[0]
                or upload in self._given_up or not self._from(entry[1], peer)):
            return None
        return chunk_targets(entry[1].intent, raw_length, locations)

    def verify_and_write(
        self,
        upload: str,
        digest: str,
        body: bytes | memoryview,
        declared_body_blake3: str,
        encoding: Encoding,
        raw_length: int,
        targets: Sequence[ChunkTarget],
        body_hash: str | None = None,
    ) -> None:
        """Runs in a worker thread: the body must match the blake3 its authenticated header
        declares (else it was damaged in flight) and decode to bytes whose blake3 is the chunk
        address; then it is written (from the caller's aligned buffer: O_DIRECT). `body_hash`:
        the body's blake3 as the data channel took it while the bytes arrived (None: here)."""
        if body_hash is None:
            body_hash = blake3_hex(body)
        if body_hash != declared_body_blake3:
            raise IntegrityError(
                "chunk body damaged in flight (blake3 does not match its header)",
                transient=True,
            )
        raw = decode_body(body, encoding, raw_length)
        raw_hash = body_hash if encoding == "identity" else blake3_hex(raw)
        if raw_hash != digest:
            # The sender checks its source before sending again.
            raise IntegrityError(
                f"chunk bytes do not hash to their address {digest[:16]}", transient=True
            )
        staging = self._staging[upload]
        for t in targets:
            staging.write(t.file, t.offset, raw)
        self._mark_verified(upload, targets)

    def record(
        self, upload: str, targets: Sequence[ChunkTarget], digest: str, in_place: bool = False
    ) -> None:
        self.journal.record_received(upload, targets, digest, in_place)

    def record_many(self, landed: Sequence[tuple[str, Sequence[ChunkTarget], str]]) -> None:
        """On the loop: chunks staged by the workers, (upload, targets, digest) each, booked
        in one journal transaction."""
        self.journal.record_received_many(landed)

    def in_place(self, upload: str) -> set[tuple[int, int]]:
        """The upload's chunks recorded in place (read on the loop, for the commit threads)."""
        return self.journal.in_place(upload)

    def _mark_verified(self, upload: str, targets: Sequence[tuple[int, int, int]]) -> None:
        staging = self._staging.get(upload)
        whole: list[int] = []
        with self._verified_lock:
            verified = self._verified.setdefault(upload, set())
            root, filled = self._filled.get(upload, ("", []))
            for f, off, n in targets:
                if (f, off) in verified:
                    continue
                verified.add((f, off))
                if staging is not None and f < len(filled):
                    filled[f] += n
                    if filled[f] == staging.sizes[f]:
                        whole.append(f)
        if staging is not None:
            for f in whole:
                self.storage.member_staged(staging, root, f)

    # -- commit --------------------------------------------------------------------------------
    def check_manifest(self, upload: str, peer: str, signed: SignedManifest) -> Manifest:
        manifest = signed.verify(self.keys)
        known = self._open_upload(upload, peer)
        check_manifest(manifest, known.intent, known.source, self.site)
        try:
            check_residency(self.site, self.region, manifest.residency, "destination")
        except PolicyViolation:
            self.metrics.policy_refusals.labels("receiver").inc()
            raise
        return manifest

    def missing(self, upload: str, manifest: Manifest) -> list[tuple[int, int]]:
        return missing(manifest, self.journal.received(upload))

    def verify_files(
        self,
        upload: str,
        manifest: Manifest,
        in_place: AbstractSet[tuple[int, int]] = frozenset(),
    ) -> list[tuple[int, int]]:
        """Thread: re-hash the staged chunks this process did not verify itself (staged before
        a restart) and the chunks recorded in place (read from the committed destination,
        which may have changed since it was indexed); return those that no longer match
        (`forget` them: they are sent again). The chunk list's tiling and Merkle root were
        checked when the manifest was parsed."""
        staging = self._staging[upload]
        with self._verified_lock:
            verified = set(self._verified.get(upload, ()))
        bad: list[tuple[int, int]] = []
        for i, f in enumerate(manifest.files):
            kept = [(h, off, n) for h, off, n in f.chunks if (i, off) in in_place]
            dest = f"{manifest.root}/{f.path}" if f.path else manifest.root
            for digest, off, n in kept:
                if blake3_hex(self._held(dest, off, n)) != digest:
                    bad.append((i, off))
            todo = [
                (h, off, n)
                for h, off, n in f.chunks
                if (i, off) not in verified and (i, off) not in in_place
            ]
            if not todo:
                continue
            try:
                with SourceFile(str(staging.member_path(i))) as src:
                    for digest, off, n in todo:
                        with src.mapped(off, n) as view:
                            if blake3_hex(view) != digest:
                                bad.append((i, off))
            except OSError as exc:
                raise StorageError(f"reading staged file: {exc.strerror}") from exc
            self._mark_verified(upload, [(i, off, n) for _h, off, n in todo if (i, off) not in bad])
        if bad:
            with self._verified_lock:
                self._verified.get(upload, set()).difference_update(bad)
        return bad

    def _held(self, dest: str, offset: int, length: int) -> bytes:
        """Thread: the bytes a committed file holds where the index says a chunk is; none when
        it cannot be read there (removed, moved or made unreadable here since it was indexed:
        the chunk is sent again, as one changed here is, instead of failing every upload that
        offers it)."""
        try:
            return self.storage.read_range(dest, offset, length)
        except StorageError:
            return b""

    def forget(self, upload: str, chunks: Sequence[tuple[int, int]]) -> None:
        self.journal.forget_received(upload, chunks)

    def commit_files(
        self,
        upload: str,
        manifest: Manifest,
        in_place: AbstractSet[tuple[int, int]] = frozenset(),
    ) -> None:
        """Thread: put the chunks recorded in place into the staged files that need them,
        keep (a single file) or hard-link (a folder's member) every file that is unchanged,
        then fsync + rename into place."""
        staging = self._staging[upload]
        unchanged_file = False
        for i, f in enumerate(manifest.files):
            dest = f"{manifest.root}/{f.path}" if f.path else manifest.root
            kept = [(h, off, n) for h, off, n in f.chunks if (i, off) in in_place]
            whole = len(kept) == len(f.chunks) and self.storage.size(dest) == f.size
            if whole and not staging.exists(i):
                if manifest.kind == "file":
                    unchanged_file = True
                else:
                    self.storage.link_into(dest, staging.member_path(i))
                continue
            staging.reserve(i)  # also an empty file, or one whose destination is gone
            for digest, off, n in kept:
                data = self._held(dest, off, n)
                if blake3_hex(data) != digest:
                    raise IntegrityError(
                        f"{dest} changed during its commit", path=dest, transient=True
                    )
                staging.write(i, off, data)
        if not unchanged_file:
            self.storage.commit(staging, manifest.root)

    def after_commit(self, upload: str, manifest: Manifest, now: float) -> None:
        """Index the committed chunks (for delta replication) and update a checkpoint run."""
        self._staging.pop(upload).discard()
        with self._verified_lock:
            self._verified.pop(upload, None)
            self._filled.pop(upload, None)
        self.journal.finish_upload(upload, UploadState.COMMITTED, now)
        for f in manifest.files:
            path = f"{manifest.root}/{f.path}" if f.path else manifest.root
            self.journal.index_committed(path, ((h, off, n) for h, off, n in f.chunks))
        if is_step_root(manifest.root):
            run = manifest.root.rsplit("/", 1)[0]
            update_run(
                self.storage,
                run,
                self.run_retention.get(run, self.retention),
                self.journal.unindex_prefix,
            )

    def record_batches(self, rel: str) -> Iterator[pa.RecordBatch]:
        """A committed Arrow IPC file's record batches, chunk by chunk as the caller takes
        them: each chunk is one read (pread, into a buffer of its own from Arrow's memory
        pool) and its batches' buffers are views of that buffer (kept alive by the batches,
        no copy of their own), so memory is bounded by the batches the caller holds, not by
        the file. Never mapped: a file cut short by someone else under a mapping kills the
        daemon with SIGBUS, which no Python code can catch. Each chunk's blake3 is checked
        against the digest the index holds for it, so a file that no longer holds what was
        committed (cut short, grown, rewritten in place, replaced) is an IntegrityError
        naming it, raised at the first chunk that differs (batches before it were already
        yielded). The first chunk carries the schema; the last may be the footer. Raises the
        package's errors only: StorageError (a failed read, no memory for a chunk),
        IntegrityError."""
        if not isinstance(self.storage, LocalStorage):
            raise StorageError("record batches open chunk by chunk only from a local data_dir")
        spans = self.journal.chunks_of(rel)
        if not spans:
            raise StorageError(f"{rel} was not replicated to this site", path=rel)
        return self._record_batches(rel, str(self.storage.path(rel)), spans)

    def _record_batches(
        self, rel: str, path: str, spans: list[ChunkLocation]
    ) -> Iterator[pa.RecordBatch]:
        committed = spans[-1].offset + spans[-1].length
        try:
            fh = pa.OSFile(path, "r")
        except OSError as exc:
            raise StorageError(f"reading {rel}: {exc.strerror or exc}", path=rel) from exc
        with fh:
            try:
                on_disk = fh.size()
            except OSError as exc:
                raise StorageError(f"reading {rel}: {exc.strerror or exc}", path=rel) from exc
            if on_disk != committed:
                raise _changed(rel, f"{on_disk} bytes on disk where {committed} were committed")
            span = spans[0]
            try:
                schema = read_chunk_schema(self._committed_chunk(rel, fh, span, committed))
                for i, span in enumerate(spans[1:], start=1):
                    chunk = self._committed_chunk(rel, fh, span, committed)
                    try:
                        batches = open_record_batch_chunk(chunk, schema)
                    except ArrowChunkError:
                        if i == len(spans) - 1:
                            return  # the trailer: end-of-stream marker and footer
                        raise
                    del chunk  # held by the batches alone: gone with the last of them
                    yield from batches
            except ArrowChunkMemoryError as exc:
                # Decoding allocates too (IPC body decompression): the chunk matched its
                # committed digest and asked for memory the host could give, so this is
                # memory, not damage (more than the host has is an ArrowChunkError).
                raise _no_memory(rel, span) from exc
            except ArrowChunkError as exc:
                raise IntegrityError(f"{rel}: not record-batch chunks: {exc}", path=rel) from exc

    def _committed_chunk(self, rel: str, fh: pa.OSFile, span: ChunkLocation,
                         committed: int) -> pa.Buffer:
        """One chunk of a committed file, read into a buffer of its own and checked against
        the index's digest for it."""
        try:
            fh.seek(span.offset)
            buf = fh.read_buffer(span.length)  # (read_at returns bytes: a copy)
        except MemoryError as exc:  # pyarrow's ArrowMemoryError is one
            raise _no_memory(rel, span) from exc
        except OSError as exc:  # pyarrow's IO errors are
            raise StorageError(f"reading {rel}: {exc.strerror or exc}", path=rel) from exc
        if buf.size != span.length:
            held = span.offset + buf.size
            raise _changed(rel, f"{held} bytes on disk where {committed} were committed")
        if not self.journal.committed_at(rel, span.offset, span.length, blake3_hex(buf)):
            raise _changed(rel, f"the chunk at offset {span.offset} ({span.length} bytes) is "
                                "not the one committed there")
        return buf

    def fail(self, upload: str, now: float, cause: StorageError | None = None) -> None:
        """The upload failed (or was given up; `cause`: the storage error that failed it):
        its staging goes, whatever this process knows of it."""
        self._given_up.add(upload)
        if cause is not None:
            self._failed_by[upload] = cause
        with self._verified_lock:
            self._verified.pop(upload, None)
            self._filled.pop(upload, None)
        staging = self._staging.pop(upload, None)
        if staging is not None:
            self.storage.discard_staged(staging)
            staging.discard()
        elif "/" not in upload and upload not in (".", ".."):
            shutil.rmtree(self.storage.staging_root / upload, ignore_errors=True)
        self.journal.finish_upload(upload, UploadState.FAILED, now)

    def abort(self, upload: str, peer: str, now: float) -> bool:
        """`peer` gave up its open upload: True when there was one to give back."""
        known = self.journal.upload(upload)
        if known is None or not self._from(known, peer):
            return False
        if known.state is not UploadState.OPEN and upload not in self._given_up:
            return False
        self.fail(upload, now)
        return True

    def close(self) -> None:
        for staging in self._staging.values():
            staging.close()
        self._staging.clear()
