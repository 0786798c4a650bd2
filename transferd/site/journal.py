"""The site journal: one SQLite database (WAL) in the state dir that survives SIGKILL.

Sender side: jobs (what to replicate where, their state and counters); a resumed job learns
what its destination still lacks from the destination's own answer to have/want, so nothing per
chunk is kept here. Receiver side: open uploads, the chunks already staged for each, and an
index of chunk hashes in committed files (the source for delta replication). Every write is a
short transaction (the chunks a receiver staged since its loop last woke are booked in one, and
answered after it), so a kill at any moment loses at most the chunks in flight. Rows come
back as typed values (`Job`, `Upload`, `Staged`, `ChunkLocation`), never as bare tuples.
"""

from __future__ import annotations

import errno
import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from netplan.plan import TrafficClass
from transferd.errors import StorageError, TransferdError
from transferd.protocol.local_api import Job, JobRoute, JobState
from transferd.protocol.manifest import UploadIntent
from transferd.protocol.upload import ChunkTarget, Staged
from transferd.protocol.wire import parse_body, to_body

__all__ = ["ChunkLocation", "JobCounters", "Journal", "RelayedUpload", "Upload", "UploadState"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    dest TEXT NOT NULL,
    traffic_class TEXT NOT NULL,
    state TEXT NOT NULL,             -- queued | running | committed | failed
    error TEXT,
    error_kind TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    bytes_logical INTEGER NOT NULL DEFAULT 0,
    bytes_done INTEGER NOT NULL DEFAULT 0,
    bytes_on_wire INTEGER NOT NULL DEFAULT 0,
    chunks INTEGER NOT NULL DEFAULT 0,
    chunks_skipped INTEGER NOT NULL DEFAULT 0,
    chunks_sent INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    integrity_failures INTEGER NOT NULL DEFAULT 0,
    note TEXT,
    next_attempt_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    deadline REAL,
    routes TEXT NOT NULL DEFAULT '[]'   -- JSON list of {via, share}: the job's paths
);
DROP TABLE IF EXISTS acked;                                   -- written, never read (removed)
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    root TEXT NOT NULL,
    intent TEXT NOT NULL,
    state TEXT NOT NULL,             -- open | committed | failed
    created_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS received (
    upload TEXT NOT NULL, file_index INTEGER NOT NULL, offset INTEGER NOT NULL,
    length INTEGER NOT NULL, hash TEXT NOT NULL,
    in_place INTEGER NOT NULL DEFAULT 0,  -- bytes are in the committed file at this place
    PRIMARY KEY (upload, file_index, offset)
);
CREATE INDEX IF NOT EXISTS received_by_hash ON received(hash);
CREATE TABLE IF NOT EXISTS chunk_index (
    hash TEXT NOT NULL, path TEXT NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL,
    PRIMARY KEY (path, offset)
);
CREATE INDEX IF NOT EXISTS chunk_index_by_hash ON chunk_index(hash);
CREATE TABLE IF NOT EXISTS watch_seen (
    root TEXT NOT NULL, dest TEXT NOT NULL, job TEXT NOT NULL, PRIMARY KEY (root, dest)
);
CREATE TABLE IF NOT EXISTS relayed (  -- uploads this site passes on (`net.relay`)
    upload TEXT PRIMARY KEY, source TEXT NOT NULL, next_hop TEXT NOT NULL, dest TEXT NOT NULL,
    via TEXT NOT NULL,               -- JSON list: the relays after the next hop
    created_at REAL NOT NULL,
    traffic_class TEXT NOT NULL DEFAULT 'sync',
    residency TEXT                   -- JSON list of regions ([]: anywhere); NULL: not recorded
);
CREATE TABLE IF NOT EXISTS auth_marks (  -- per sending site: newest timestamp accepted (+1 s)
    site TEXT PRIMARY KEY, ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS auth_future_nonces (  -- nonces of requests dated ahead of our clock
    nonce TEXT PRIMARY KEY, ts REAL NOT NULL
);
"""


_ADDED_COLUMNS = {
    "jobs": {
        "note": "TEXT",
        "next_attempt_at": "REAL",
        "attempts": "INTEGER NOT NULL DEFAULT 0",
        "deadline": "REAL",
        "routes": "TEXT NOT NULL DEFAULT '[]'",
    },
    "received": {"in_place": "INTEGER NOT NULL DEFAULT 0"},
    "relayed": {"residency": "TEXT"},
}


class UploadState(StrEnum):
    OPEN = "open"
    COMMITTED = "committed"
    FAILED = "failed"


@dataclass(frozen=True)
class Upload:
    """An upload this site receives, as its journal row."""

    source: str
    root: str
    state: UploadState
    intent: UploadIntent


@dataclass(frozen=True)
class RelayedUpload:
    """An upload this site passes on: from `source` to `next_hop`, bound for `dest` through
    the relays `via` after the next hop."""

    upload: str
    source: str
    next_hop: str
    dest: str
    via: tuple[str, ...]
    created_at: float
    traffic_class: str = "sync"  # the job's bulk class: the relay schedules its chunks in it
    # The data's residency (empty: anywhere), checked again against this site's region when
    # the row is read back; None for a row written before it was recorded.
    residency: tuple[str, ...] | None = None


@dataclass(frozen=True)
class JobCounters:
    """Increments of a job's progress counters."""

    bytes_done: int = 0
    bytes_on_wire: int = 0
    chunks_skipped: int = 0
    chunks_sent: int = 0
    retries: int = 0
    integrity_failures: int = 0


_COUNTER_NAMES = tuple(f.name for f in fields(JobCounters))
_COUNTERS = ", ".join(f"{name} = {name} + ?" for name in _COUNTER_NAMES)
_JOB_COLUMNS = ", ".join(Job.model_fields)


@dataclass(frozen=True)
class ChunkLocation:
    """Where this site holds a chunk's bytes: in a committed file (`path`, relative to
    data_dir) or in an open upload's staging (`upload`, `file_index`)."""

    path: str
    offset: int
    length: int
    upload: str | None = None
    file_index: int | None = None


class Journal:
    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._add_missing_columns()
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot open journal {path}: {exc}", path=path) from exc
        self.path = path

    def _add_missing_columns(self) -> None:
        """A journal written by an older version gains the columns added since."""
        for table, columns in _ADDED_COLUMNS.items():
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for column, decl in columns.items():
                if column not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    def close(self) -> None:
        self._db.close()

    def _exec(self, sql: str, args: Iterable[Any] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, tuple(args))
        except sqlite3.Error as exc:
            raise _journal_error(exc, self.path) from exc

    def _many(self, sql: str, rows: Iterable[tuple[Any, ...]]) -> None:
        try:
            with self._db:
                self._db.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise _journal_error(exc, self.path) from exc

    # -- sender: jobs ------------------------------------------------------------------------
    def add_job(
        self,
        job_id: str,
        path: str,
        dest: str,
        traffic_class: TrafficClass,
        now: float,
        deadline: float | None = None,
        routes: Sequence[JobRoute] = (),
    ) -> None:
        self._exec(
            "INSERT INTO jobs (id, path, dest, traffic_class, state, created_at, deadline, "
            "routes) VALUES (?,?,?,?,?,?,?,?)",
            (job_id, path, dest, traffic_class.value, JobState.QUEUED.value, now, deadline,
             json.dumps([r.model_dump(mode="json") for r in routes])),
        )

    def job(self, job_id: str) -> Job | None:
        row = self._exec(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def jobs(self, limit: int = 100) -> list[Job]:
        """The newest jobs first."""
        rows = self._exec(
            f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,)
        )
        return [_job(r) for r in rows.fetchall()]

    def active_jobs(self, limit: int = 1000) -> list[Job]:
        """Queued, running and waiting jobs, oldest first (after a restart, running ones
        resume)."""
        rows = self._exec(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state IN (?, ?, ?) "
            "ORDER BY created_at LIMIT ?",
            (JobState.QUEUED.value, JobState.RUNNING.value, JobState.WAITING.value, limit),
        )
        return [_job(r) for r in rows.fetchall()]

    def start_job(self, job_id: str, now: float) -> None:
        """Running since `now` (a resumed job keeps its first start)."""
        self._exec(
            "UPDATE jobs SET state = ?, started_at = COALESCE(started_at, ?), "
            "next_attempt_at = NULL WHERE id = ?",
            (JobState.RUNNING.value, now, job_id),
        )

    def note_job(self, job_id: str, note: str | None, next_attempt_at: float | None) -> None:
        """What a running job is retrying, and when it tries next (None: nothing to say)."""
        self._exec(
            "UPDATE jobs SET note = ?, next_attempt_at = ? WHERE id = ?",
            (note, next_attempt_at, job_id),
        )

    def wait_job(self, job_id: str, note: str, next_attempt_at: float) -> None:
        """Waiting for its peer or link until `next_attempt_at` (one more attempt)."""
        self._exec(
            "UPDATE jobs SET state = ?, note = ?, next_attempt_at = ?, attempts = attempts + 1,"
            " retries = retries + 1 WHERE id = ?",
            (JobState.WAITING.value, note, next_attempt_at, job_id),
        )

    def size_job(self, job_id: str, bytes_logical: int, chunks: int) -> None:
        self._exec(
            "UPDATE jobs SET bytes_logical = ?, chunks = ? WHERE id = ?",
            (bytes_logical, chunks, job_id),
        )

    def finish_job(
        self, job_id: str, now: float, error: TransferdError | None = None
    ) -> None:
        """Committed, or failed with `error` (its message and kind are kept)."""
        state = JobState.COMMITTED if error is None else JobState.FAILED
        self._exec(
            "UPDATE jobs SET state = ?, finished_at = ?, error = ?, error_kind = ?, "
            "note = NULL, next_attempt_at = NULL WHERE id = ?",
            (
                state.value,
                now,
                None if error is None else str(error),
                None if error is None else error.kind,
                job_id,
            ),
        )

    def add_job_counters(self, job_id: str, counters: JobCounters) -> None:
        # Per chunk, on the event loop: plain getattr (dataclasses.astuple deep-copies).
        values = tuple(getattr(counters, name) for name in _COUNTER_NAMES)
        self._exec(f"UPDATE jobs SET {_COUNTERS} WHERE id = ?", (*values, job_id))

    def watch_seen(self, root: str, dest: str) -> bool:
        row = self._exec("SELECT 1 FROM watch_seen WHERE root = ? AND dest = ?", (root, dest))
        return row.fetchone() is not None

    def mark_watch_seen(self, root: str, dest: str, job_id: str) -> None:
        self._exec("INSERT OR IGNORE INTO watch_seen VALUES (?,?,?)", (root, dest, job_id))

    # -- receiver: replay memory (protocol.auth.ReplayMemory) --------------------------------
    # Each write is durable once it returns (WAL: it survives the process being killed).
    def auth_marks(self) -> dict[str, float]:
        rows = self._exec("SELECT site, ts FROM auth_marks").fetchall()
        return {str(site): float(ts) for site, ts in rows}

    def set_auth_mark(self, site: str, ts: float) -> None:
        self._exec(
            "INSERT INTO auth_marks (site, ts) VALUES (?, ?) "
            "ON CONFLICT(site) DO UPDATE SET ts = max(ts, excluded.ts)",
            (site, ts),
        )

    def future_nonces(self, since: float) -> dict[str, float]:
        """Nonces dated at or after `since` (older ones are dropped)."""
        self._exec("DELETE FROM auth_future_nonces WHERE ts < ?", (since,))
        rows = self._exec("SELECT nonce, ts FROM auth_future_nonces").fetchall()
        return {str(n): float(ts) for n, ts in rows}

    def add_future_nonce(self, nonce: str, ts: float) -> None:
        self._exec(
            "INSERT OR IGNORE INTO auth_future_nonces (nonce, ts) VALUES (?, ?)", (nonce, ts)
        )

    # -- receiver: uploads ------------------------------------------------------------------
    def open_upload(self, intent: UploadIntent, source: str, now: float) -> bool:
        """Record a new upload; False if it was already open (a resumed sender)."""
        cur = self._exec(
            "INSERT OR IGNORE INTO uploads (id, source, root, intent, state, created_at) "
            "VALUES (?,?,?,?,?,?)",
            (intent.upload, source, intent.root, to_body(intent), UploadState.OPEN.value, now),
        )
        return cur.rowcount == 1

    # -- relay: uploads passed on ----------------------------------------------------------
    def add_relayed(self, row: RelayedUpload) -> None:
        self._exec(
            "INSERT OR REPLACE INTO relayed (upload, source, next_hop, dest, via, created_at, "
            "traffic_class, residency) VALUES (?,?,?,?,?,?,?,?)",
            (row.upload, row.source, row.next_hop, row.dest, json.dumps(list(row.via)),
             row.created_at, row.traffic_class,
             None if row.residency is None else json.dumps(list(row.residency))),
        )

    def drop_relayed(self, upload: str) -> None:
        self._exec("DELETE FROM relayed WHERE upload = ?", (upload,))

    def relayed(self, since: float) -> list[RelayedUpload]:
        """The uploads passed on here, opened at `since` or later (older ones are forgotten:
        their senders gave up on this route or finished by another)."""
        self._exec("DELETE FROM relayed WHERE created_at < ?", (since,))
        rows = self._exec(
            "SELECT upload, source, next_hop, dest, via, created_at, traffic_class, residency "
            "FROM relayed"
        ).fetchall()
        return [RelayedUpload(u, s, n, d, tuple(json.loads(v)), float(t), c,
                              None if r is None else tuple(json.loads(r)))
                for u, s, n, d, v, t, c, r in rows]

    def upload(self, upload: str) -> Upload | None:
        row = self._exec(
            "SELECT source, root, state, intent FROM uploads WHERE id = ?", (upload,)
        ).fetchone()
        if row is None:
            return None
        source, root, state, intent = row
        return Upload(str(source), str(root), UploadState(state), parse_body(UploadIntent, intent))

    def uploads(self, state: UploadState) -> list[str]:
        rows = self._exec("SELECT id FROM uploads WHERE state = ?", (state.value,)).fetchall()
        return [r[0] for r in rows]

    def upload_opened_at(self, upload: str) -> float:
        row = self._exec("SELECT created_at FROM uploads WHERE id = ?", (upload,)).fetchone()
        return float(row[0]) if row else 0.0

    def reopen_upload(self, upload: str, now: float) -> None:
        """A failed (or expired) upload opened again by its sender: it starts over."""
        self._exec(
            "UPDATE uploads SET state = ?, created_at = ?, finished_at = NULL WHERE id = ?",
            (UploadState.OPEN.value, now, upload),
        )
        self._exec("DELETE FROM received WHERE upload = ?", (upload,))

    def finish_upload(self, upload: str, state: UploadState, now: float) -> None:
        self._exec(
            "UPDATE uploads SET state = ?, finished_at = ? WHERE id = ?",
            (state.value, now, upload),
        )
        self._exec("DELETE FROM received WHERE upload = ?", (upload,))

    def record_received(
        self, upload: str, targets: Iterable[ChunkTarget], digest: str, in_place: bool = False
    ) -> None:
        """Staged at `targets`; `in_place`: not staged, the committed file at the upload's
        destination already holds these bytes there (copied or linked at commit)."""
        self._many(
            "INSERT OR REPLACE INTO received (upload, file_index, offset, length, hash, in_place)"
            " VALUES (?,?,?,?,?,?)",
            ((upload, t.file, t.offset, t.length, digest, int(in_place)) for t in targets),
        )

    def record_received_many(
        self, landed: Iterable[tuple[str, Iterable[ChunkTarget], str]]
    ) -> None:
        """Chunks staged (upload, targets, digest each), in one transaction: the receiver
        books the chunks that landed since its loop last woke together, and answers their
        receipts once this returns (a kill before then re-sends only those, still in flight
        for their sender)."""
        self._many(
            "INSERT OR REPLACE INTO received (upload, file_index, offset, length, hash, in_place)"
            " VALUES (?,?,?,?,?,0)",
            ((upload, t.file, t.offset, t.length, digest)
             for upload, targets, digest in landed for t in targets),
        )

    def in_place(self, upload: str) -> set[tuple[int, int]]:
        """(file, offset) of the upload's chunks recorded in place (see record_received)."""
        rows = self._exec(
            "SELECT file_index, offset FROM received WHERE upload = ? AND in_place = 1", (upload,)
        ).fetchall()
        return {(int(f), int(o)) for f, o in rows}

    def committed_at(self, path: str, offset: int, length: int, digest: str) -> bool:
        """The committed file `path` holds chunk `digest` at `offset` (by the index)."""
        row = self._exec(
            "SELECT 1 FROM chunk_index WHERE path = ? AND offset = ? AND length = ? AND hash = ?",
            (path, offset, length, digest),
        ).fetchone()
        return row is not None

    def forget_received(self, upload: str, locations: Iterable[tuple[int, int]]) -> None:
        self._many(
            "DELETE FROM received WHERE upload = ? AND file_index = ? AND offset = ?",
            ((upload, f, off) for f, off in locations),
        )

    def received(self, upload: str) -> dict[tuple[int, int], Staged]:
        """What is staged for `upload`, by (file, offset)."""
        rows = self._exec(
            "SELECT file_index, offset, length, hash FROM received WHERE upload = ?", (upload,)
        ).fetchall()
        return {(int(f), int(o)): Staged(int(n), str(h)) for f, o, n, h in rows}

    def find_chunk(self, digest: str, length: int) -> Iterator[ChunkLocation]:
        """Places this site already holds `digest`: committed files first, then open stagings."""
        for path, off in self._exec(
            "SELECT path, offset FROM chunk_index WHERE hash = ? AND length = ? LIMIT 4",
            (digest, length),
        ).fetchall():
            yield ChunkLocation(path=str(path), offset=int(off), length=length)
        for upload, f, off in self._exec(
            "SELECT r.upload, r.file_index, r.offset FROM received r JOIN uploads u "
            "ON u.id = r.upload WHERE r.hash = ? AND r.length = ? AND u.state = ? LIMIT 4",
            (digest, length, UploadState.OPEN.value),
        ).fetchall():
            yield ChunkLocation(
                path="", offset=int(off), length=length, upload=str(upload), file_index=int(f)
            )

    def index_committed(self, path: str, chunks: Iterable[tuple[str, int, int]]) -> None:
        try:
            with self._db:
                self._db.execute("DELETE FROM chunk_index WHERE path = ?", (path,))
                self._db.executemany(
                    "INSERT OR REPLACE INTO chunk_index (hash, path, offset, length) "
                    "VALUES (?,?,?,?)",
                    ((h, path, off, n) for h, off, n in chunks),
                )
        except sqlite3.Error as exc:
            raise _journal_error(exc, self.path) from exc

    def chunks_of(self, path: str) -> list[ChunkLocation]:
        """A committed file's chunks (from the index), in file order."""
        rows = self._exec(
            "SELECT offset, length FROM chunk_index WHERE path = ? ORDER BY offset", (path,)
        ).fetchall()
        return [ChunkLocation(path=path, offset=int(o), length=int(n)) for o, n in rows]

    def unindex_prefix(self, prefix: str) -> None:
        self._exec(
            "DELETE FROM chunk_index WHERE path = ? OR substr(path, 1, ?) = ?",
            (prefix, len(prefix) + 1, prefix + "/"),
        )


def _journal_error(exc: sqlite3.Error, path: Path) -> StorageError:
    """A failed journal statement; a full disk says so (with ENOSPC), as staging errors do."""
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return StorageError(
            "journal write failed: no space left on the storage of the state dir",
            path=path,
            errno=errno.ENOSPC,
        )
    return StorageError(f"journal write failed: {exc}", path=path)


def _job(row: tuple[Any, ...]) -> Job:
    values = dict(zip(Job.model_fields, row, strict=True))
    values["traffic_class"] = TrafficClass(values["traffic_class"])
    values["state"] = JobState(values["state"])
    values["routes"] = [JobRoute(**r) for r in json.loads(values["routes"] or "[]")]
    return Job(**values)
