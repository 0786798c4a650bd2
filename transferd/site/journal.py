"""The site journal: one SQLite database (WAL) in the state dir that survives SIGKILL.

Sender side: jobs (what to replicate where, their state and counters) and the chunks each
destination has acknowledged. Receiver side: open uploads, the chunks already staged for each,
and an index of chunk hashes in committed files (the source for delta replication). Every write
is its own short transaction, so a kill at any moment loses at most the in-flight chunk.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferd.errors import StorageError

__all__ = ["ChunkLocation", "Job", "Journal", "JobState"]

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
    integrity_failures INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS acked (
    job TEXT NOT NULL, file_index INTEGER NOT NULL, offset INTEGER NOT NULL,
    PRIMARY KEY (job, file_index, offset)
);
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
"""


class JobState:
    QUEUED = "queued"
    RUNNING = "running"
    COMMITTED = "committed"
    FAILED = "failed"
    ACTIVE = (QUEUED, RUNNING)


@dataclass(frozen=True)
class Job:
    id: str
    path: str
    dest: str
    traffic_class: str
    state: str
    error: str | None
    error_kind: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    bytes_logical: int
    bytes_done: int
    bytes_on_wire: int
    chunks: int
    chunks_skipped: int
    chunks_sent: int
    retries: int
    integrity_failures: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ChunkLocation:
    path: str  # a committed file (relative to data_dir) or a staging file (absolute)
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
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot open journal {path}: {exc}", path=path) from exc
        self.path = path

    def close(self) -> None:
        self._db.close()

    def _exec(self, sql: str, args: Iterable[Any] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, tuple(args))
        except sqlite3.Error as exc:
            raise StorageError(f"journal write failed: {exc}", path=self.path) from exc

    def _many(self, sql: str, rows: Iterable[tuple[Any, ...]]) -> None:
        try:
            with self._db:
                self._db.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise StorageError(f"journal write failed: {exc}", path=self.path) from exc

    # -- sender: jobs ------------------------------------------------------------------------
    def add_job(self, job_id: str, path: str, dest: str, traffic_class: str, now: float) -> None:
        self._exec(
            "INSERT INTO jobs (id, path, dest, traffic_class, state, created_at) "
            "VALUES (?,?,?,?,?,?)",
            (job_id, path, dest, traffic_class, JobState.QUEUED, now),
        )

    def job(self, job_id: str) -> Job | None:
        row = self._exec("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(row) if row else None

    def jobs(self, *, states: Iterable[str] | None = None, limit: int = 100) -> list[Job]:
        if states is None:
            rows = self._exec("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,))
        else:
            st = list(states)
            marks = ",".join("?" * len(st))
            rows = self._exec(
                f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY created_at LIMIT ?",
                (*st, limit),
            )
        return [self._job(r) for r in rows.fetchall()]

    def _job(self, row: tuple[Any, ...]) -> Job:
        return Job(*row)

    def update_job(self, job_id: str, **fields: Any) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        self._exec(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def add_job_counters(self, job_id: str, **deltas: int) -> None:
        cols = ", ".join(f"{k} = {k} + ?" for k in deltas)
        self._exec(f"UPDATE jobs SET {cols} WHERE id = ?", (*deltas.values(), job_id))

    def record_acked(self, job_id: str, file_index: int, offsets: Iterable[int]) -> None:
        self._many(
            "INSERT OR IGNORE INTO acked (job, file_index, offset) VALUES (?,?,?)",
            ((job_id, file_index, off) for off in offsets),
        )

    def acked(self, job_id: str) -> set[tuple[int, int]]:
        rows = self._exec("SELECT file_index, offset FROM acked WHERE job = ?", (job_id,))
        return {(int(f), int(o)) for f, o in rows.fetchall()}

    def forget_acked(self, job_id: str) -> None:
        self._exec("DELETE FROM acked WHERE job = ?", (job_id,))

    def watch_seen(self, root: str, dest: str) -> bool:
        row = self._exec("SELECT 1 FROM watch_seen WHERE root = ? AND dest = ?", (root, dest))
        return row.fetchone() is not None

    def mark_watch_seen(self, root: str, dest: str, job_id: str) -> None:
        self._exec("INSERT OR IGNORE INTO watch_seen VALUES (?,?,?)", (root, dest, job_id))

    # -- receiver: uploads ------------------------------------------------------------------
    def open_upload(
        self, upload: str, source: str, root: str, intent: dict[str, Any], now: float
    ) -> bool:
        """Record a new upload; False if it was already open (a resumed sender)."""
        cur = self._exec(
            "INSERT OR IGNORE INTO uploads (id, source, root, intent, state, created_at) "
            "VALUES (?,?,?,?,'open',?)",
            (upload, source, root, json.dumps(intent, sort_keys=True), now),
        )
        return cur.rowcount == 1

    def upload(self, upload: str) -> tuple[str, str, str, dict[str, Any]] | None:
        row = self._exec(
            "SELECT source, root, state, intent FROM uploads WHERE id = ?", (upload,)
        ).fetchone()
        if row is None:
            return None
        return row[0], row[1], row[2], json.loads(row[3])

    def uploads(self, state: str) -> list[str]:
        rows = self._exec("SELECT id FROM uploads WHERE state = ?", (state,)).fetchall()
        return [r[0] for r in rows]

    def uploads_opened_before(self, before: float) -> list[str]:
        rows = self._exec(
            "SELECT id FROM uploads WHERE state = 'open' AND created_at < ?", (before,)
        ).fetchall()
        return [r[0] for r in rows]

    def finish_upload(self, upload: str, state: str, now: float) -> None:
        self._exec(
            "UPDATE uploads SET state = ?, finished_at = ? WHERE id = ?", (state, now, upload)
        )
        self._exec("DELETE FROM received WHERE upload = ?", (upload,))

    def record_received(
        self, upload: str, locations: Iterable[tuple[int, int, int]], digest: str
    ) -> None:
        self._many(
            "INSERT OR REPLACE INTO received (upload, file_index, offset, length, hash) "
            "VALUES (?,?,?,?,?)",
            ((upload, f, off, n, digest) for f, off, n in locations),
        )

    def forget_received(self, upload: str, locations: Iterable[tuple[int, int]]) -> None:
        self._many(
            "DELETE FROM received WHERE upload = ? AND file_index = ? AND offset = ?",
            ((upload, f, off) for f, off in locations),
        )

    def received(self, upload: str) -> dict[tuple[int, int], tuple[int, str]]:
        rows = self._exec(
            "SELECT file_index, offset, length, hash FROM received WHERE upload = ?", (upload,)
        ).fetchall()
        return {(int(f), int(o)): (int(n), str(h)) for f, o, n, h in rows}

    def find_chunk(self, digest: str, length: int) -> Iterator[ChunkLocation]:
        """Places this site already holds `digest`: committed files first, then open stagings."""
        for path, off in self._exec(
            "SELECT path, offset FROM chunk_index WHERE hash = ? AND length = ? LIMIT 4",
            (digest, length),
        ).fetchall():
            yield ChunkLocation(path=str(path), offset=int(off), length=length)
        for upload, f, off in self._exec(
            "SELECT r.upload, r.file_index, r.offset FROM received r JOIN uploads u "
            "ON u.id = r.upload WHERE r.hash = ? AND r.length = ? AND u.state = 'open' LIMIT 4",
            (digest, length),
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
            raise StorageError(f"journal write failed: {exc}", path=self.path) from exc

    def chunks_of(self, path: str) -> list[tuple[int, int, str]]:
        """(offset, length, hash) of a committed file's chunks, in file order."""
        rows = self._exec(
            "SELECT offset, length, hash FROM chunk_index WHERE path = ? ORDER BY offset", (path,)
        ).fetchall()
        return [(int(o), int(n), str(h)) for o, n, h in rows]

    def unindex_prefix(self, prefix: str) -> None:
        self._exec(
            "DELETE FROM chunk_index WHERE path = ? OR substr(path, 1, ?) = ?",
            (prefix, len(prefix) + 1, prefix + "/"),
        )
