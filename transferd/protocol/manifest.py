"""The documents of an upload between daemons: the intent, have/want, the signed manifest, and
the receiver's answers to each.

Every body a peer sends is validated into one of these frozen models once (`wire.parse_body`).
The manifest (path, sizes, chunk list, a digest of each whole file, tier, residency, source site,
time) is signed with the source site's Ed25519 key over its canonical JSON (sorted keys, no spaces).

A file's digest is the root of a two-level blake3 Merkle tree: blake3 over the file's size and
its chunk list (offset, length, chunk blake3) - see `file_digest`. Every chunk address commits
to its bytes, so the root commits to every byte of the file as blake3(file) would, but it costs
no pass over the data beyond the chunk hashes that both sides compute anyway (a second full
blake3 pass on each side was half of transferd's CPU per byte on a loopback link).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable
from typing import Annotated, Any, Literal

import blake3
from pydantic import (
    AfterValidator,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from transferd.protocol.auth import Keys
from transferd.protocol.chunks import MAX_CHUNK_BYTES
from transferd.protocol.wire import WireModel, parse_body

__all__ = [
    "ChunkRef",
    "CommitAnswer",
    "FileEntry",
    "FileSpec",
    "HaveAnswer",
    "HaveRequest",
    "Manifest",
    "OfferAnswer",
    "OpenAnswer",
    "OpenRequest",
    "SignedManifest",
    "UploadIntent",
    "canonical_json",
    "file_digest",
]

MAX_FILES = 100_000
MAX_FILE_BYTES = 1 << 50
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_UPLOAD_ID = re.compile(r"^[A-Za-z0-9_.-]{8,128}$")

Hash = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Size = Annotated[int, Field(ge=0, le=MAX_FILE_BYTES)]
Region = Annotated[str, Field(min_length=1, max_length=64)]


def _check_root(value: str) -> str:
    if not value or len(value) > 4096:
        raise ValueError("root must be 1-4096 characters")
    return value


Root = Annotated[str, AfterValidator(_check_root)]


def _check_member(value: str) -> str:
    # Shape only; whether the path stays inside data_dir is policy, checked by the receiver
    # (PolicyViolation, 403) so that `../` is refused the same way on both sides.
    if len(value) > 4096:
        raise ValueError("member path longer than 4096 characters")
    return value


def _without_empty(body: dict[str, Any], name: str) -> dict[str, Any]:
    """`body` without the field `name` when it is false or empty: a field a peer older than
    it would refuse is sent only when it says something."""
    if not body.get(name):
        body.pop(name, None)
    return body


class FileSpec(WireModel):
    path: str  # relative to the upload root; "" when the root is a single file
    size: Size

    _path = field_validator("path")(classmethod(lambda cls, v: _check_member(v)))


class UploadIntent(WireModel):
    """Opens (or resumes) an upload: the receiver stages files of these sizes under `root`."""

    upload: Annotated[str, Field(pattern=_UPLOAD_ID.pattern)]
    source_site: str
    dest_site: str
    root: Root
    kind: Literal["file", "folder"]
    files: Annotated[list[FileSpec], Field(min_length=1, max_length=MAX_FILES)]
    # Regions the data may be held in (empty: anywhere): each relay and the destination check
    # their own region against it before they accept a byte (`protocol.routes`).
    residency: Annotated[list[Region], Field(max_length=64)] = []

    @model_validator(mode="after")
    def _shape(self) -> UploadIntent:
        if self.kind == "file" and (len(self.files) != 1 or self.files[0].path != ""):
            raise ValueError("a file upload has exactly one file with path ''")
        if self.kind == "folder":
            names = [f.path for f in self.files]
            if "" in names or len(set(names)) != len(names):
                raise ValueError("folder members must be distinct non-empty paths")
        return self


class ChunkRef(WireModel):
    file: Annotated[int, Field(ge=0, lt=MAX_FILES)]
    offset: Size
    length: Annotated[int, Field(ge=1, le=MAX_CHUNK_BYTES)]
    hash: Hash


MAX_HAVE_CHUNKS = 4096


class HaveRequest(WireModel):
    chunks: Annotated[list[ChunkRef], Field(max_length=MAX_HAVE_CHUNKS)]


class OpenRequest(UploadIntent):
    """An upload's open that also asks have/want for its first chunks (`offer`, the first
    batch hashed): the answer (`OfferAnswer`) says which of them to send, so the first chunk
    leaves one round trip after the open instead of two. A bare `UploadIntent` (no `offer`
    field) opens as before and is answered by a plain `OpenAnswer`."""

    offer: Annotated[list[ChunkRef], Field(max_length=MAX_HAVE_CHUNKS)] = []
    # The sender sends fresh files in one pass and asks which ones are (`OfferAnswer.one_pass`).
    # Sent only when true: a receiver older than the field refuses it (400, the sender opens
    # again without it, `protocol.upload.one_pass_refused`), and an older sender never sends it.
    one_pass: bool = False

    @model_serializer(mode="wrap")
    def _without_unasked(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without_empty(handler(self), "one_pass")

    @property
    def offered(self) -> bool:
        """The request carried an `offer` (even an empty one): it is answered with an
        `OfferAnswer`."""
        return "offer" in self.model_fields_set

    def intent(self) -> UploadIntent:
        """The upload's intent as the journal keeps it, without the offer."""
        return UploadIntent.model_validate(
            {name: getattr(self, name) for name in UploadIntent.model_fields}
        )

    def have(self) -> HaveRequest:
        return HaveRequest(chunks=list(self.offer))


class OpenAnswer(WireModel):
    upload: str
    committed: bool  # this upload was committed already: nothing left to send


class OfferAnswer(OpenAnswer):
    """The answer to an `OpenRequest` with an offer: `want` as in `HaveAnswer` (empty when the
    upload was committed already). `one_pass` (only when the request asked, and only when not
    empty, so an older sender never sees the field): the files the receiver has no destination
    file and nothing staged for, and wanted every offered chunk of; the sender may send their
    chunks in one pass (`protocol.channel`, a trailer carries the address)."""

    want: Annotated[list[Annotated[int, Field(ge=0, lt=MAX_HAVE_CHUNKS)]], Field(max_length=4096)]
    one_pass: Annotated[
        list[Annotated[int, Field(ge=0, lt=MAX_FILES)]], Field(max_length=MAX_FILES)
    ] = []

    @model_serializer(mode="wrap")
    def _without_unlisted(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without_empty(handler(self), "one_pass")


class HaveAnswer(WireModel):
    want: Annotated[list[Annotated[int, Field(ge=0, lt=MAX_HAVE_CHUNKS)]], Field(max_length=4096)]


MAX_COMMIT_WANT = 100_000  # chunks named per refused commit; the sender's next round gets more


class CommitAnswer(WireModel):
    """200: committed. 409: not yet; `want` names the (file, offset) of chunks to send again."""

    committed: bool
    want: Annotated[
        list[tuple[Annotated[int, Field(ge=0, lt=MAX_FILES)], Size]],
        Field(max_length=MAX_COMMIT_WANT),
    ] = []


FILE_DIGEST_DOMAIN = b"transferd file digest v1\x00"


def file_digest(size: int, chunks: Iterable[tuple[str, int, int]]) -> str:
    """The whole-file digest: blake3(domain || u64 size || (u64 offset, u64 length, 32-byte
    chunk blake3) for each chunk in file order), all integers little-endian."""
    h = blake3.blake3(FILE_DIGEST_DOMAIN + struct.pack("<Q", size))
    for digest, offset, length in chunks:
        h.update(struct.pack("<QQ", offset, length) + bytes.fromhex(digest))
    return str(h.hexdigest())


class FileEntry(WireModel):
    path: str
    size: Size
    digest: Hash  # file_digest(size, chunks): the Merkle root over the chunk addresses
    chunks: list[tuple[Hash, Size, Annotated[int, Field(ge=1, le=MAX_CHUNK_BYTES)]]]

    _path = field_validator("path")(classmethod(lambda cls, v: _check_member(v)))

    @model_validator(mode="after")
    def _tiles(self) -> FileEntry:
        position = 0
        for _, offset, length in self.chunks:
            if offset != position:
                raise ValueError(
                    f"chunks must tile the file: expected offset {position}, got {offset}"
                )
            position += length
        if position != self.size:
            raise ValueError(f"chunks cover {position} bytes, file size is {self.size}")
        if file_digest(self.size, self.chunks) != self.digest:
            raise ValueError("digest is not the root of the file's chunk list")
        return self


class Manifest(WireModel):
    version: Literal[2] = 2  # 2: file digests are chunk-list Merkle roots (1: blake3 of bytes)
    upload: Annotated[str, Field(pattern=_UPLOAD_ID.pattern)]
    source_site: str
    dest_site: str
    root: Root
    kind: Literal["file", "folder"]
    tier: str
    created_at: float
    files: Annotated[list[FileEntry], Field(min_length=1, max_length=MAX_FILES)]
    # The data's residency, signed with the rest: a relay cannot strip it on the way.
    residency: Annotated[list[Region], Field(max_length=64)] = []

    @model_validator(mode="after")
    def _tier_matches(self) -> Manifest:
        if self.root.split("/", 1)[0] != self.tier:
            raise ValueError("tier must be the root's top folder")
        return self

    def sign(self, keys: Keys) -> SignedManifest:
        body = canonical_json(self.model_dump(mode="json"))
        return SignedManifest(manifest=body.decode(), signature=keys.sign(body).hex())


class SignedManifest(WireModel):
    manifest: Annotated[str, Field(max_length=64 * 1024 * 1024)]
    signature: Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]

    def verify(self, keys: Keys) -> Manifest:
        """Parse, then check the Ed25519 signature of the claimed source site (AuthError 403)."""
        manifest = parse_body(Manifest, self.manifest.encode())
        keys.verify(manifest.source_site, self.manifest.encode(), bytes.fromhex(self.signature))
        return manifest


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
