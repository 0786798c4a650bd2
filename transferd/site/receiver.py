"""The receiving side of replication: uploads staged by offset, verified, committed atomically.

An upload goes open -> (have/want, chunk PUTs)* -> commit. `open` checks policy and stages files
at full size; `have` answers which chunks must still cross the wire, filling the rest from bytes
this site already holds (an earlier upload, or a committed file: delta replication); `put_chunk`
verifies a body against its signed blake3 and its content address before writing it; `commit`
verifies the manifest signature, that the chunk list tiles each file and has the signed file
digest as its Merkle root, and that every chunk of every file was received with the manifest's
hash, then renames into place. A chunk verified in memory and written by this process is not
hashed again; one staged before a restart (its bytes may not have reached the disk before a
crash) is read back and re-hashed at commit, and fetched again when it does not match. State
lives in the journal, so a receiver killed at any moment answers the resumed sender's `have`
with exactly what it still lacks.
"""

from __future__ import annotations

import logging
import mmap
import threading
from collections.abc import Mapping

import blake3
import pyarrow as pa

from transferd.errors import IntegrityError, PolicyViolation, ProtocolError, StorageError
from transferd.protocol.arrow_chunks import (
    ArrowChunkError,
    open_record_batch_chunk,
    read_chunk_schema,
)
from transferd.protocol.codec import decode_body
from transferd.protocol.manifest import HaveRequest, Manifest, SignedManifest, UploadIntent
from transferd.protocol.policy import Tier, normalize_rel_path, tier_of
from transferd.site.checkpoints import is_step_root, update_run
from transferd.site.journal import Journal
from transferd.site.keys import Keyring
from transferd.site.metrics import Metrics
from transferd.site.source import SourceFile
from transferd.site.storage import FsspecStorage, LocalStorage, Staging

__all__ = ["Receiver"]

log = logging.getLogger("transferd.receiver")


class Receiver:
    def __init__(
        self,
        site: str,
        storage: LocalStorage | FsspecStorage,
        journal: Journal,
        keyring: Keyring,
        metrics: Metrics,
        retention: int,
        run_retention: Mapping[str, int] | None = None,
    ) -> None:
        self.site = site
        self.storage = storage
        self.journal = journal
        self.keyring = keyring
        self.metrics = metrics
        self.retention = retention
        # Per-run overrides (`checkpoints/<run>` -> steps kept), e.g. from a netplan plan.
        self.run_retention = dict(run_retention or {})
        self._staging: dict[str, Staging] = {}
        # (file, offset) of chunks this process verified in memory and wrote, per upload; any
        # other staged chunk is read back and re-hashed at commit.
        self._verified: dict[str, set[tuple[int, int]]] = {}
        self._verified_lock = threading.Lock()

    # -- open --------------------------------------------------------------------------------
    def check_intent(self, intent: UploadIntent, peer: str) -> None:
        if intent.source_site != peer:
            raise PolicyViolation(
                f"upload claims source {intent.source_site!r} but came from {peer!r}"
            )
        if intent.dest_site != self.site:
            raise PolicyViolation(
                f"upload is addressed to {intent.dest_site!r}, this is {self.site!r}"
            )
        try:
            paths = [intent.root] + [f"{intent.root}/{f.path}" for f in intent.files if f.path]
            for path in paths:
                if normalize_rel_path(path) != path:
                    raise PolicyViolation(f"path is not in normal form: {path!r}", path=path)
        except PolicyViolation:
            self.metrics.policy_refusals.labels("receiver").inc()
            raise
        if tier_of(intent.root) is Tier.RAW:
            self.metrics.policy_refusals.labels("receiver").inc()
            raise PolicyViolation(
                f"raw-tier data may not arrive from another site: {intent.root!r}", path=intent.root
            )
        if isinstance(self.storage, LocalStorage):
            self.storage.path(intent.root)  # refuses symlinks leading out of data_dir
            for f in intent.files:
                if f.path:
                    self.storage.path(f"{intent.root}/{f.path}")

    def open(self, intent: UploadIntent, peer: str, now: float) -> bool:
        """Stage the upload (idempotent). Returns True when it was already committed."""
        self.check_intent(intent, peer)
        known = self.journal.upload(intent.upload)
        if known is not None:
            source, root, state, stored = known
            if source != peer or stored != intent.model_dump(mode="json"):
                raise ProtocolError(f"upload id {intent.upload} reused for different content")
            if state == "committed":
                return True
            if state == "failed":
                raise StorageError(f"upload {intent.upload} failed earlier; start a new job")
        staging = self._staging_for(intent)
        try:
            staging.create()
        except StorageError:
            # E.g. no space for the files: give back what was reserved, record nothing.
            self._staging.pop(intent.upload, None)
            staging.discard()
            raise
        if known is None:
            self.journal.open_upload(
                intent.upload, peer, intent.root, intent.model_dump(mode="json"), now
            )
        return False

    def _staging_for(self, intent: UploadIntent) -> Staging:
        staging = self._staging.get(intent.upload)
        if staging is None:
            staging = Staging(
                dir=self.storage.staging_root / intent.upload,
                kind=intent.kind,
                members=[f.path for f in intent.files],
                sizes=[f.size for f in intent.files],
            )
            self._staging[intent.upload] = staging
        return staging

    def _open_upload(self, upload: str, peer: str) -> tuple[UploadIntent, Staging]:
        known = self.journal.upload(upload)
        if known is None or known[0] != peer:
            raise ProtocolError(f"unknown upload {upload[:128]!r}")
        if known[2] != "open":
            raise ProtocolError(f"upload {upload} is already {known[2]}")
        intent = UploadIntent.model_validate(known[3])
        staging = self._staging_for(intent)
        return intent, staging

    # -- have / want ---------------------------------------------------------------------------
    def have(
        self, upload: str, peer: str, request: HaveRequest
    ) -> tuple[list[int], list[tuple[str, list[tuple[int, int, int]]]]]:
        """Indices of request.chunks still wanted; the rest are staged already or copied here
        from local bytes. Returns (want, copies): copies are done by `fill_local` in a thread."""
        intent, _staging = self._open_upload(upload, peer)
        received = self.journal.received(upload)
        want: list[int] = []
        copies: dict[str, list[tuple[int, int, int]]] = {}
        for i, ref in enumerate(request.chunks):
            if (
                ref.file >= len(intent.files)
                or ref.offset + ref.length > intent.files[ref.file].size
            ):
                raise ProtocolError(f"chunks[{i}] lies outside file {ref.file} of upload {upload}")
            got = received.get((ref.file, ref.offset))
            if got == (ref.length, ref.hash):
                continue
            if any(True for _ in self.journal.find_chunk(ref.hash, ref.length)):
                copies.setdefault(ref.hash, []).append((ref.file, ref.offset, ref.length))
            else:
                want.append(i)
        return want, list(copies.items())

    def fill_local(self, upload: str, digest: str, targets: list[tuple[int, int, int]]) -> bool:
        """Copy a chunk this site already holds into the upload's staging (verifying its hash:
        a committed file may have been changed locally since it was indexed)."""
        staging = self._staging[upload]
        for loc in self.journal.find_chunk(digest, targets[0][2]):
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
            if len(data) != loc.length or blake3.blake3(data).hexdigest() != digest:
                continue
            for f, off, _n in targets:
                staging.write(f, off, data)
            self._mark_verified(upload, targets)
            return True
        return False

    # -- chunks --------------------------------------------------------------------------------
    def locations(
        self, upload: str, peer: str, digest: str, raw_length: int, where: str
    ) -> list[tuple[int, int, int]]:
        """Parse `file:offset,...` into staged locations, checked against the upload's files."""
        intent, _ = self._open_upload(upload, peer)
        out: list[tuple[int, int, int]] = []
        try:
            for item in where.split(",")[:1024]:
                f_text, _, off_text = item.partition(":")
                f, off = int(f_text), int(off_text)
                if (
                    f < 0
                    or f >= len(intent.files)
                    or off < 0
                    or off + raw_length > intent.files[f].size
                ):
                    raise ProtocolError(f"chunk location {item!r} lies outside the upload's files")
                out.append((f, off, raw_length))
        except ValueError as exc:
            raise ProtocolError(f"bad chunk locations {where[:64]!r}") from exc
        if not out:
            raise ProtocolError("a chunk needs at least one location")
        return out

    def verify_and_write(
        self,
        upload: str,
        digest: str,
        body: bytes | memoryview,
        declared_body_blake3: str,
        encoding: str,
        raw_length: int,
        locations: list[tuple[int, int, int]],
    ) -> None:
        """Runs in a worker thread: the body must match its signed blake3 (else it was damaged
        in flight) and decode to bytes whose blake3 is the chunk address; then it is written."""
        body_hash = blake3.blake3(body).hexdigest()
        if body_hash != declared_body_blake3:
            raise IntegrityError(
                "chunk body damaged in flight (blake3 does not match the signed hash)"
            )
        raw = decode_body(body, encoding, raw_length)
        raw_hash = body_hash if encoding == "identity" else blake3.blake3(raw).hexdigest()
        if raw_hash != digest:
            raise IntegrityError(f"chunk bytes do not hash to their address {digest[:16]}")
        staging = self._staging[upload]
        for f, off, _n in locations:
            staging.write(f, off, raw)
        self._mark_verified(upload, locations)

    def _mark_verified(self, upload: str, locations: list[tuple[int, int, int]]) -> None:
        with self._verified_lock:
            self._verified.setdefault(upload, set()).update((f, off) for f, off, _n in locations)

    # -- commit --------------------------------------------------------------------------------
    def check_manifest(
        self, upload: str, peer: str, signed: SignedManifest
    ) -> tuple[Manifest, UploadIntent]:
        manifest = signed.verify(self.keyring)
        intent, _ = self._open_upload(upload, peer)
        if (
            manifest.upload != upload
            or manifest.source_site != peer
            or manifest.dest_site != self.site
            or manifest.root != intent.root
            or manifest.kind != intent.kind
            or [(f.path, f.size) for f in manifest.files]
            != [(f.path, f.size) for f in intent.files]
        ):
            raise ProtocolError("manifest does not describe the upload it commits")
        return manifest, intent

    def missing(self, upload: str, manifest: Manifest) -> list[tuple[int, int]]:
        received = self.journal.received(upload)
        return [
            (i, off)
            for i, f in enumerate(manifest.files)
            for digest, off, n in f.chunks
            if received.get((i, off)) != (n, digest)
        ]

    def verify_files(self, upload: str, manifest: Manifest) -> list[tuple[int, int]]:
        """Thread: re-hash the staged chunks this process did not verify itself (staged before
        a restart) and return those that no longer match (they are fetched again). The chunk
        list's tiling and Merkle root were checked when the manifest was parsed."""
        staging = self._staging[upload]
        with self._verified_lock:
            verified = set(self._verified.get(upload, ()))
        bad: list[tuple[int, int]] = []
        for i, f in enumerate(manifest.files):
            todo = [(h, off, n) for h, off, n in f.chunks if (i, off) not in verified]
            if not todo:
                continue
            try:
                with SourceFile(str(staging.member_path(i))) as src:
                    for digest, off, n in todo:
                        with src.mapped(off, n) as view:
                            if blake3.blake3(view).hexdigest() != digest:
                                bad.append((i, off))
            except OSError as exc:
                raise StorageError(f"reading staged file: {exc.strerror}") from exc
            self._mark_verified(upload, [(i, off, n) for _h, off, n in todo])
        if bad:
            with self._verified_lock:
                self._verified.get(upload, set()).difference_update(bad)
        return bad

    def commit_files(self, upload: str, manifest: Manifest) -> None:
        """Thread: fsync + rename into place, then index the chunks and update the run."""
        self.storage.commit(self._staging[upload], manifest.root)

    def after_commit(self, upload: str, manifest: Manifest, now: float) -> None:
        self._staging.pop(upload).discard()
        with self._verified_lock:
            self._verified.pop(upload, None)
        self.journal.finish_upload(upload, "committed", now)
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

    def record_batches(self, rel: str) -> list[pa.RecordBatch]:
        """Open a committed Arrow IPC file chunk by chunk, zero-copy: the returned batches'
        buffers live in a read-only mapping of the committed file (kept alive by the batches).
        The first chunk carries the schema; the last may be the footer."""
        if not isinstance(self.storage, LocalStorage):
            raise StorageError("record batches open zero-copy only from a local data_dir")
        spans = self.journal.chunks_of(rel)
        if not spans:
            raise StorageError(f"{rel} was not replicated to this site", path=rel)
        try:
            with open(self.storage.path(rel), "rb") as fh:
                mapping = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
        except OSError as exc:
            raise StorageError(f"opening {rel}: {exc.strerror}", path=rel) from exc
        whole = memoryview(mapping)
        try:
            schema = read_chunk_schema(whole[: spans[0][1]])
            batches: list[pa.RecordBatch] = []
            for i, (off, n, _digest) in enumerate(spans[1:], start=1):
                try:
                    batches += open_record_batch_chunk(whole[off : off + n], schema)
                except ArrowChunkError:
                    if i == len(spans) - 1:
                        break  # the trailer: end-of-stream marker and footer
                    raise
        except ArrowChunkError as exc:
            raise IntegrityError(f"{rel}: not record-batch chunks: {exc}", path=rel) from exc
        return batches

    def fail(self, upload: str, now: float) -> None:
        with self._verified_lock:
            self._verified.pop(upload, None)
        staging = self._staging.pop(upload, None)
        if staging is not None:
            staging.discard()
        self.journal.finish_upload(upload, "failed", now)

    def close(self) -> None:
        for staging in self._staging.values():
            staging.close()
        self._staging.clear()
