"""The index of training runs and checkpoints: one SQLite file under the
checkpoint root, so runs and checkpoints stay listable across restarts.

Checkpoint folders on disk are the truth; the index mirrors them and is
reconciled with them at start-up (a crash between a checkpoint's rename and
its index row loses nothing). Thread-safe: the worker and the event loop's
helper threads both use it. WAL with synchronous=NORMAL: a commit is not
fsynced (a power cut may lose the last few, never corrupt the file), so an
optimizer step does not wait for the disk.
"""
from __future__ import annotations

import json
import logging
import pathlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace

from gradwire_server.batch import LoraSettings

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: checkpoints.expires_time
SCHEMA = """
CREATE TABLE IF NOT EXISTS training_runs (
    run_id            TEXT PRIMARY KEY,
    base_model        TEXT NOT NULL,
    lora_rank         INTEGER NOT NULL,
    lora_config       TEXT NOT NULL,               -- JSON: rank, seed, train_attn/mlp/unembed
    user_metadata     TEXT NOT NULL DEFAULT '{}',  -- JSON object of strings
    created_time      REAL NOT NULL,               -- unix seconds
    last_request_time REAL NOT NULL,               -- unix seconds of the last optimizer step or save
    last_step         INTEGER NOT NULL DEFAULT 0,  -- optimizer steps taken
    loaded            INTEGER NOT NULL,            -- 1 while its adapter is in this server's memory
    source_checkpoint TEXT                         -- the path it was loaded from, if any
);
CREATE TABLE IF NOT EXISTS checkpoints (
    path            TEXT PRIMARY KEY,              -- gradwire://<run_id>/<kind>/<name>
    run_id          TEXT NOT NULL,
    checkpoint_type TEXT NOT NULL CHECK (checkpoint_type IN ('training', 'sampler')),
    name            TEXT NOT NULL,
    created_time    REAL NOT NULL,                 -- unix seconds
    size_bytes      INTEGER NOT NULL,
    expires_time    REAL                           -- unix seconds when its TTL runs out; NULL: never
);
CREATE INDEX IF NOT EXISTS checkpoints_of_run ON checkpoints (run_id, created_time);
"""


@dataclass
class RunRecord:
    run_id: str
    base_model: str
    lora: LoraSettings
    user_metadata: dict[str, str]
    created_time: float
    last_request_time: float
    last_step: int
    loaded: bool
    source_checkpoint: str | None


@dataclass
class CheckpointRecord:
    path: str
    run_id: str
    checkpoint_type: str  # "training" or "sampler"
    name: str
    created_time: float
    size_bytes: int
    expires_time: float | None = None
    checkpoint_id: str = field(init=False)

    def __post_init__(self) -> None:
        kind = "weights" if self.checkpoint_type == "training" else "sampler_weights"
        self.checkpoint_id = f"{kind}/{self.name}"


class RunIndex:
    def __init__(self, file: pathlib.Path):
        file.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(file, check_same_thread=False, isolation_level=None)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(checkpoints)")}
            if "expires_time" not in columns:  # an index written by schema version 1
                self._db.execute("ALTER TABLE checkpoints ADD COLUMN expires_time REAL")
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- runs -------------------------------------------------------------------------

    def add_run(self, run_id: str, base_model: str, lora: LoraSettings, user_metadata: dict[str, str],
                step: int = 0, source_checkpoint: str | None = None) -> None:
        now = time.time()
        self._insert_run(RunRecord(run_id, base_model, lora, user_metadata, created_time=now, last_request_time=now,
                                   last_step=step, loaded=True, source_checkpoint=source_checkpoint))

    def _insert_run(self, run: RunRecord) -> None:
        self._execute(
            "INSERT INTO training_runs (run_id, base_model, lora_rank, lora_config, user_metadata,"
            " created_time, last_request_time, last_step, loaded, source_checkpoint)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (run.run_id, run.base_model, run.lora.rank, json.dumps(asdict(run.lora)), json.dumps(run.user_metadata),
             run.created_time, run.last_request_time, run.last_step, int(run.loaded), run.source_checkpoint))

    def set_step(self, run_id: str, step: int) -> None:
        self._execute("UPDATE training_runs SET last_step = ?, last_request_time = ? WHERE run_id = ?",
                      (step, time.time(), run_id))

    def set_unloaded(self, run_id: str) -> None:
        self._execute("UPDATE training_runs SET loaded = 0 WHERE run_id = ?", (run_id,))

    def unload_all(self) -> None:
        """At start-up: no run of an earlier process is in memory."""
        self._execute("UPDATE training_runs SET loaded = 0")

    def get_run(self, run_id: str) -> RunRecord | None:
        rows = self._query("SELECT * FROM training_runs WHERE run_id = ?", (run_id,))
        return _run(rows[0]) if rows else None

    def list_runs(self, after: list | None = None, limit: int = -1) -> list[RunRecord]:
        """Runs, oldest first (by created_time, run_id), those after the key `after` only."""
        where, args = ("WHERE (created_time, run_id) > (?, ?)", tuple(after)) if after else ("", ())
        return [_run(row) for row in self._query(
            f"SELECT * FROM training_runs {where} ORDER BY created_time, run_id LIMIT ?", (*args, limit))]

    # ---- checkpoints ----------------------------------------------------------------------

    def add_checkpoint(self, record: CheckpointRecord) -> None:
        """Records a new checkpoint; it counts as a request of its run."""
        self._insert_checkpoint(record)
        self._execute("UPDATE training_runs SET last_request_time = ? WHERE run_id = ?",
                      (time.time(), record.run_id))

    def _insert_checkpoint(self, record: CheckpointRecord) -> None:
        self._execute(
            "INSERT OR REPLACE INTO checkpoints (path, run_id, checkpoint_type, name, created_time,"
            " size_bytes, expires_time) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (record.path, record.run_id, record.checkpoint_type, record.name, record.created_time,
             record.size_bytes, record.expires_time))

    def set_checkpoint_expiry(self, path: str, expires_time: float | None) -> None:
        self._execute("UPDATE checkpoints SET expires_time = ? WHERE path = ?", (expires_time, path))

    def get_checkpoint(self, path: str) -> CheckpointRecord | None:
        rows = self._query("SELECT * FROM checkpoints WHERE path = ?", (path,))
        return _checkpoint(rows[0]) if rows else None

    def remove_checkpoint(self, path: str) -> None:
        self._execute("DELETE FROM checkpoints WHERE path = ?", (path,))

    def list_checkpoints(self, run_id: str | None = None, after: list | None = None, limit: int = -1,
                         include_expired: bool = False) -> list[CheckpointRecord]:
        """A run's checkpoints (all when run_id is None), oldest first (by created_time,
        path), those after the key `after` only; those whose TTL ran out only with
        include_expired."""
        conditions, args = [], []
        if after:
            conditions.append("(created_time, path) > (?, ?)")
            args.extend(after)
        if run_id is not None:
            conditions.append("run_id = ?")
            args.append(run_id)
        if not include_expired:
            conditions.append("(expires_time IS NULL OR expires_time > ?)")
            args.append(time.time())
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        return [_checkpoint(row) for row in self._query(
            f"SELECT * FROM checkpoints {where} ORDER BY created_time, path LIMIT ?", (*args, limit))]

    def expired_checkpoints(self, now: float) -> list[str]:
        """Paths of the checkpoints whose TTL ran out by `now`."""
        return [row["path"] for row in self._query(
            "SELECT path FROM checkpoints WHERE expires_time IS NOT NULL AND expires_time <= ?", (now,))]

    def reconcile(self, on_disk: Iterable[tuple[CheckpointRecord, RunRecord]]) -> None:
        """Makes the checkpoint rows exactly the complete folders found on disk (each with
        what it says of its run), and adds a row for each of their runs the index lacks (an
        index lost or restored from a backup): its checkpoints are listed again."""
        found = list(on_disk)
        runs: dict[str, RunRecord] = {}
        for _, run in sorted(found, key=lambda pair: pair[1].last_request_time):  # the newest checkpoint last
            earlier = runs.get(run.run_id)
            runs[run.run_id] = run if earlier is None else replace(
                run, created_time=earlier.created_time, last_step=max(earlier.last_step, run.last_step))
        for run in runs.values():
            if self.get_run(run.run_id) is None:
                self._insert_run(run)
        records = {record.path: record for record, _ in found}
        for stale in {r.path for r in self.list_checkpoints(include_expired=True)} - records.keys():
            self.remove_checkpoint(stale)
        known = {r.path for r in self.list_checkpoints(include_expired=True)}
        for path, record in records.items():
            if path not in known:
                self._insert_checkpoint(record)

    # ---- plumbing -----------------------------------------------------------------------------

    def _execute(self, sql: str, args: tuple = ()) -> None:
        with self._lock:
            self._db.execute(sql, args)

    def _query(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            cursor = self._db.execute(sql, args)
            columns = [c[0] for c in cursor.description]
            return [dict(zip(columns, row)) for row in cursor.fetchall()]


def record_change(what: str, write: Callable[..., None], *args) -> None:
    """Runs an index write that follows a change the engine already made: a failure is
    logged, not raised, since the operation did happen (the run's weights changed)."""
    try:
        write(*args)
    except sqlite3.Error:
        log.exception("run index: cannot record %s", what)


def _run(row: dict) -> RunRecord:
    return RunRecord(run_id=row["run_id"], base_model=row["base_model"],
                     lora=LoraSettings(**json.loads(row["lora_config"])),
                     user_metadata=json.loads(row["user_metadata"]), created_time=row["created_time"],
                     last_request_time=row["last_request_time"], last_step=row["last_step"],
                     loaded=bool(row["loaded"]), source_checkpoint=row["source_checkpoint"])


def _checkpoint(row: dict) -> CheckpointRecord:
    return CheckpointRecord(path=row["path"], run_id=row["run_id"],
                            checkpoint_type=row["checkpoint_type"], name=row["name"],
                            created_time=row["created_time"], size_bytes=row["size_bytes"],
                            expires_time=row["expires_time"])
