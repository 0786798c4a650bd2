"""The upload state machines of both ends, without I/O: what the sender offers and sends, what
the receiver still lacks, and when a commit may happen.

Theory of operation. An upload goes open -> (have/want, chunk PUTs)* -> commit. The open may
carry the first have/want (`open_request`: one round trip for both), and the commit may be sent
before the last chunks land (`commit_path(..., wait_s)`: the receiver holds it while they keep
landing, then commits or refuses as below).
- Receiver: `check_intent` refuses an upload that is not from its claimed source, not addressed
  here, not in normal form or under `raw/`. For each offered chunk, `answer_have` says whether
  it is staged already (same length and hash at that place), already in place (the committed
  file at the upload's destination holds it at the same offset: nothing is staged for it now;
  an unchanged file is kept or linked at commit and costs no space), can be filled from bytes
  this site holds elsewhere (an earlier upload or another committed file: delta replication),
  or must cross the wire. A
  chunk PUT names its places (`chunk_targets`, checked against the intent). The commit needs a
  manifest that describes the intent (`check_manifest`) and every chunk staged with the
  manifest's hash (`missing`); otherwise the answer names the chunks to send (again).
- Sender: `upload_intent` and `upload_manifest` build the documents; `plan_offer` turns the
  receiver's answer to one batch into chunk uploads - one PUT per distinct hash, naming every
  place that holds it, and a deferral for a hash already on its way (once that lands the
  receiver copies it locally); `resend` resolves a refused commit's list into chunks.
The journal and the staged files live at the site (`site.receiver`); the network loops live in
`net.sender` and `net.server`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from netplan.plan import Tier
from transferd.errors import PolicyViolation, ProtocolError, TransferdError
from transferd.protocol.http_paths import COMMIT_ROUTE
from transferd.protocol.manifest import (
    MAX_COMMIT_WANT,
    ChunkRef,
    CommitAnswer,
    FileEntry,
    FileSpec,
    HaveAnswer,
    HaveRequest,
    Manifest,
    OpenRequest,
    UploadIntent,
    file_digest,
)
from transferd.protocol.policy import normalize_rel_path, tier_of, top_folder

__all__ = [
    "COMMIT_WAIT_MAX_S",
    "ONE_PASS_PROBE_EVERY",
    "ChunkTarget",
    "ChunkUpload",
    "HaveDecision",
    "OfferPlan",
    "Staged",
    "answer_have",
    "check_intent",
    "check_manifest",
    "chunk_targets",
    "commit_path",
    "commit_wait_s",
    "destination",
    "member_paths",
    "missing",
    "offer_batches",
    "offer_refused",
    "one_pass_files",
    "one_pass_refused",
    "open_request",
    "plan_offer",
    "refused",
    "resend",
    "upload_id",
    "upload_intent",
    "upload_manifest",
    "wanted",
]

Chunk = tuple[str, int, int]  # (blake3, offset, length) of one chunk of a file, in file order


class ChunkTarget(NamedTuple):
    """One place a chunk's bytes go in an upload: member file index, offset, length."""

    file: int
    offset: int
    length: int


class Staged(NamedTuple):
    """What the receiver staged at one (file, offset): the chunk's length and hash."""

    length: int
    hash: str


# -- receiver -------------------------------------------------------------------------------


def check_intent(intent: UploadIntent, peer: str, site: str, relayed: bool = False) -> None:
    """An upload may be staged here (PolicyViolation otherwise): from the site that signed the
    request (or, `relayed`, passed on by a relay this site accepts), addressed to this site,
    every path in normal form, nothing under raw/."""
    if intent.source_site != peer and not relayed:
        raise PolicyViolation(f"upload claims source {intent.source_site!r} but came from {peer!r}")
    if intent.dest_site != site:
        raise PolicyViolation(f"upload is addressed to {intent.dest_site!r}, this is {site!r}")
    for path in member_paths(intent):
        if normalize_rel_path(path) != path:
            raise PolicyViolation(f"path is not in normal form: {path!r}", path=path)
    if tier_of(intent.root) is Tier.RAW:
        raise PolicyViolation(
            f"raw-tier data may not arrive from another site: {intent.root!r}", path=intent.root
        )


def member_paths(intent: UploadIntent) -> list[str]:
    """The upload's root and each member path under it (relative to data_dir)."""
    return [intent.root] + [f"{intent.root}/{f.path}" for f in intent.files if f.path]


@dataclass(frozen=True)
class HaveDecision:
    want: list[int]  # indices into the request's chunks that must cross the wire
    copies: dict[str, list[ChunkTarget]]  # hash -> places to fill from bytes held here
    # hash -> places whose bytes the destination's committed file holds at the same offset
    in_place: dict[str, list[ChunkTarget]] = field(default_factory=dict)


def destination(intent: UploadIntent, file: int) -> str:
    """Where file `file` of the upload lands (relative to data_dir)."""
    member = intent.files[file].path
    return f"{intent.root}/{member}" if member else intent.root


def answer_have(
    intent: UploadIntent,
    staged: Mapping[tuple[int, int], Staged],
    request: HaveRequest,
    held_here: Callable[[str, int], bool],
    in_place: Callable[[str, int, int, str], bool] = lambda _path, _off, _n, _h: False,
) -> HaveDecision:
    """Which offered chunks are missing: staged ones are skipped, ones already at their place
    in the committed destination (`in_place(path, offset, length, hash)`) are recorded as such,
    ones whose bytes this site holds elsewhere (`held_here(hash, length)`) are copied locally,
    the rest are wanted."""
    want: list[int] = []
    copies: dict[str, list[ChunkTarget]] = {}
    kept: dict[str, list[ChunkTarget]] = {}
    for i, ref in enumerate(request.chunks):
        if ref.file >= len(intent.files) or ref.offset + ref.length > intent.files[ref.file].size:
            raise ProtocolError(
                f"chunks[{i}] lies outside file {ref.file} of upload {intent.upload}"
            )
        if staged.get((ref.file, ref.offset)) == (ref.length, ref.hash):
            continue
        target = ChunkTarget(ref.file, ref.offset, ref.length)
        if in_place(destination(intent, ref.file), ref.offset, ref.length, ref.hash):
            kept.setdefault(ref.hash, []).append(target)
        elif held_here(ref.hash, ref.length):
            copies.setdefault(ref.hash, []).append(target)
        else:
            want.append(i)
    return HaveDecision(want, copies, kept)


def wanted(decision: HaveDecision, request: HaveRequest, not_filled: Sequence[str]) -> HaveAnswer:
    """The have/want answer: the wanted chunks plus those whose local copy failed."""
    failed = set(not_filled)
    extra = [i for i, c in enumerate(request.chunks) if c.hash in failed]
    return HaveAnswer(want=sorted(set(decision.want) | set(extra)))


def chunk_targets(
    intent: UploadIntent, raw_length: int, locations: Sequence[tuple[int, int]]
) -> list[ChunkTarget]:
    """The places a chunk PUT names, each inside one of the upload's files (ProtocolError)."""
    out: list[ChunkTarget] = []
    for f, off in locations:
        if not (0 <= f < len(intent.files)) or off < 0 or off + raw_length > intent.files[f].size:
            raise ProtocolError(f"chunk location {f}:{off} lies outside the upload's files")
        out.append(ChunkTarget(f, off, raw_length))
    return out


def check_manifest(manifest: Manifest, intent: UploadIntent, peer: str, site: str) -> None:
    """The signed manifest must describe the upload it commits (ProtocolError); `peer` is the
    upload's source (the signer), whichever relay passed the manifest on."""
    if (
        manifest.upload != intent.upload
        or manifest.source_site != peer
        or manifest.dest_site != site
        or manifest.root != intent.root
        or manifest.kind != intent.kind
        or [(f.path, f.size) for f in manifest.files] != [(f.path, f.size) for f in intent.files]
        or sorted(manifest.residency) != sorted(intent.residency)
    ):
        raise ProtocolError("manifest does not describe the upload it commits")


def missing(manifest: Manifest, staged: Mapping[tuple[int, int], Staged]) -> list[tuple[int, int]]:
    """(file, offset) of every manifest chunk not staged with the manifest's length and hash."""
    return [
        (i, off)
        for i, f in enumerate(manifest.files)
        for digest, off, n in f.chunks
        if staged.get((i, off)) != (n, digest)
    ]


# How long a receiver holds a commit sent ahead of its last chunks (`?wait_ms=`), whatever the
# sender asks: well inside the sender's HTTP read timeout (120 s, `net.peer_client`).
COMMIT_WAIT_MAX_S = 60.0


def commit_wait_s(raw: str | None) -> float:
    """The commit's `?wait_ms=` (absent: 0, answered at once) in seconds, at most
    COMMIT_WAIT_MAX_S; ProtocolError naming the parameter otherwise."""
    if raw is None:
        return 0.0
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
        raise ProtocolError(f"wait_ms: {raw[:32]!r} is not a whole number of milliseconds")
    return min(int(raw) / 1e3, COMMIT_WAIT_MAX_S)


def commit_path(upload: str, wait_s: float = 0.0) -> str:
    """The commit's request path: with `?wait_ms=` when it is sent ahead of its last chunks."""
    path = COMMIT_ROUTE.format(upload=upload)
    return path + f"?wait_ms={round(wait_s * 1e3)}" if wait_s > 0 else path


def refused(want: Sequence[tuple[int, int]]) -> CommitAnswer:
    """A commit that cannot happen yet, naming the first MAX_COMMIT_WANT chunks to send (the
    sender's next commit round learns the rest)."""
    return CommitAnswer(committed=False, want=list(want[:MAX_COMMIT_WANT]))


# -- sender ---------------------------------------------------------------------------------


def upload_id(site: str, job_id: str) -> str:
    """The same for every attempt of a job, so a restarted sender resumes the same upload."""
    return f"{site}-{job_id}"


def upload_intent(
    upload: str,
    source: str,
    dest: str,
    root: str,
    kind: Literal["file", "folder"],
    members: Sequence[tuple[str, int]],
    residency: Sequence[str] = (),
) -> UploadIntent:
    return UploadIntent(
        upload=upload,
        source_site=source,
        dest_site=dest,
        root=root,
        kind=kind,
        files=[FileSpec(path=m, size=s) for m, s in members],
        residency=sorted(set(residency)),
    )


def open_request(intent: UploadIntent, offer: Sequence[ChunkRef],
                 one_pass: bool = False) -> OpenRequest:
    """The upload's open carrying have/want for its first chunks (`offer`, possibly none);
    `one_pass`: asking which files may go in one pass (`OfferAnswer.one_pass`)."""
    fields: dict[str, object] = {**intent.model_dump(), "offer": list(offer)}
    if one_pass:
        fields["one_pass"] = True
    return OpenRequest.model_validate(fields)


# How a receiver or relay older than `OpenRequest` (its open parsed as `UploadIntent`, unknown
# fields refused) answers an open that carries an offer: 400 naming the field.
_OFFER_REFUSED = "invalid UploadIntent: offer: Extra inputs are not permitted"


def offer_refused(exc: TransferdError) -> bool:
    """`exc` is an older peer's refusal of the open's `offer` (open again with the bare
    intent, and ask have/want for the offer on its own)."""
    return isinstance(exc, ProtocolError) and _OFFER_REFUSED in exc.message


# How a receiver that knows `OpenRequest` but not its `one_pass` field refuses an open asking.
_ONE_PASS_REFUSED = "invalid OpenRequest: one_pass: Extra inputs are not permitted"


def one_pass_refused(exc: TransferdError) -> bool:
    """`exc` is an older receiver's refusal of the open's `one_pass` (open again without it:
    every file goes hash-first)."""
    return isinstance(exc, ProtocolError) and _ONE_PASS_REFUSED in exc.message


# A file sent in one pass still has one chunk in this many hashed first and offered (a probe,
# 64 MiB apart at 8 MiB chunks): a probe the receiver holds (in place, or bytes it can copy)
# turns the file back to hash-first from there, so a long shared region still costs no bytes
# on the wire. Regions shorter than this between probes are sent (benchmarks/README.md, issue
# 11 round 9: the trade-off).
ONE_PASS_PROBE_EVERY = 8


def one_pass_files(
    fresh: Sequence[int], offer: Sequence[ChunkRef], want: Sequence[int]
) -> list[int]:
    """Receiver: the files that may go in one pass: `fresh` ones (no destination file, nothing
    staged) none of whose offered chunks this site holds (every one was wanted). A file
    offered nothing yet is listed on freshness alone; its sender still hashes and offers its
    first batch, and keeps it hash-first unless all of that batch is wanted."""
    wanted_idx = set(want)
    held = {ref.file for i, ref in enumerate(offer) if i not in wanted_idx}
    return [f for f in fresh if f not in held]


def upload_manifest(
    intent: UploadIntent, created_at: float, chunks: Sequence[Sequence[Chunk]]
) -> Manifest:
    """The manifest of a fully hashed upload: `chunks[i]` lists file i's chunks in order."""
    return Manifest(
        upload=intent.upload,
        source_site=intent.source_site,
        dest_site=intent.dest_site,
        root=intent.root,
        kind=intent.kind,
        tier=top_folder(intent.root),
        residency=list(intent.residency),
        created_at=created_at,
        files=[
            FileEntry(
                path=spec.path,
                size=spec.size,
                digest=file_digest(spec.size, file_chunks),
                chunks=list(file_chunks),
            )
            for spec, file_chunks in zip(intent.files, chunks, strict=True)
        ],
    )


@dataclass(frozen=True)
class ChunkUpload:
    """One chunk PUT: its hash, the offered chunk whose bytes go (index into the batch), and
    every (file, offset) in the upload that holds those bytes."""

    digest: str
    first: int
    locations: list[tuple[int, int]]


@dataclass
class OfferPlan:
    uploads: list[ChunkUpload] = field(default_factory=list)
    deferred: list[ChunkRef] = field(default_factory=list)  # offer again once their twin landed
    skipped: list[ChunkRef] = field(default_factory=list)  # the receiver has them already


def offer_batches(n: int, first: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) of each have/want batch over a file's n chunks: `first` chunks (small, so
    the first chunk leaves early), then `size` at a time; every chunk once, in order."""
    cuts = [0, *range(min(first, n), n, size), n] if n else []
    return list(zip(cuts, cuts[1:], strict=False))


def plan_offer(refs: Sequence[ChunkRef], answer: HaveAnswer, started: set[str]) -> OfferPlan:
    """What to send of an offered batch, given the receiver's answer. `started` holds the
    hashes already PUT (or being PUT) in this upload and gains the new ones."""
    if any(i >= len(refs) for i in answer.want):
        raise ProtocolError("have/want answer names a chunk that was not offered")
    want = set(answer.want)
    plan = OfferPlan(skipped=[r for i, r in enumerate(refs) if i not in want])
    by_hash: dict[str, list[int]] = {}
    for i in sorted(want):
        by_hash.setdefault(refs[i].hash, []).append(i)
    for digest, idxs in by_hash.items():
        if digest in started:
            plan.deferred += [refs[i] for i in idxs]
            continue
        started.add(digest)
        plan.uploads.append(
            ChunkUpload(digest, idxs[0], [(refs[i].file, refs[i].offset) for i in idxs])
        )
    return plan


def resend(answer: CommitAnswer, chunks: Sequence[Sequence[Chunk]]) -> list[tuple[int, Chunk]]:
    """The (file, chunk) pairs a refused commit asks for again (ProtocolError if it names a
    chunk the upload does not have, or none at all)."""
    if not answer.want:
        raise ProtocolError("the receiver refused the commit without naming missing chunks")
    by_offset: dict[int, dict[int, Chunk]] = {}
    out: list[tuple[int, Chunk]] = []
    for f, off in answer.want:
        if f < len(chunks) and f not in by_offset:
            by_offset[f] = {c[1]: c for c in chunks[f]}
        chunk = by_offset.get(f, {}).get(off)
        if chunk is None:
            raise ProtocolError(f"the receiver asked again for an unknown chunk {[f, off]!r}")
        out.append((f, chunk))
    return out
