"""The labeling task and everything people answered, in one SQLite file (`label.db` in the label step's run dir).

The task (prompts, their responses in the order shown, each response's sources (the policy path and step that
wrote it) and whether it ended or was cut at the sampler's length limit) is written once, whole, and never
changes. Rankings and skips are added one SQLite transaction each, in WAL mode with synchronous=FULL, so an
answer is on disk before the server acknowledges it and a killed server loses nothing it acknowledged. One
connection serves every thread, one statement group at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from rlhf_jax.errors import UserError
from rlhf_jax.runtime import fsio

SCHEMA_VERSION = 2  # 2 added responses.ended; a schema-1 task (every response taken as ended) is read as well
SCHEMAS_READ = (1, SCHEMA_VERSION)
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE prompts (id INTEGER PRIMARY KEY, text TEXT NOT NULL, held_out INTEGER NOT NULL);
CREATE TABLE responses (id INTEGER PRIMARY KEY, prompt_id INTEGER NOT NULL REFERENCES prompts(id),
                        text TEXT NOT NULL, sources TEXT NOT NULL, ended INTEGER NOT NULL DEFAULT 1);
CREATE TABLE rankings (labeler TEXT NOT NULL, prompt_id INTEGER NOT NULL REFERENCES prompts(id),
                       levels TEXT NOT NULL, ratings TEXT NOT NULL, flags TEXT NOT NULL, seconds REAL,
                       saved_at REAL NOT NULL, PRIMARY KEY (labeler, prompt_id));
CREATE TABLE skips (labeler TEXT NOT NULL, prompt_id INTEGER NOT NULL REFERENCES prompts(id),
                    skipped_at REAL NOT NULL, PRIMARY KEY (labeler, prompt_id));
CREATE INDEX rankings_by_prompt ON rankings (prompt_id);
"""


@dataclass(frozen=True)
class Response:
    id: int
    text: str
    sources: tuple[dict, ...]  # {"policy": path, "step": int | None} of every policy that wrote this text
    ended: bool = True  # False: cut at the sampler's length limit


@dataclass(frozen=True)
class Prompt:
    id: int
    text: str
    held_out: bool  # of the prompts dataset's eval split: its rankings are held out
    responses: tuple[Response, ...]  # in the order shown


@dataclass(frozen=True)
class Ranking:
    labeler: str
    prompt_id: int
    levels: tuple[tuple[int, ...], ...]  # response ids, best level first; several ids on a level are a tie
    ratings: dict[int, int]  # response id -> 1..7
    flags: dict[int, tuple[str, ...]]  # response id -> flags
    seconds: float | None  # time the labeler spent, as the page measured it


def create(path: Path, prompts: list[tuple[str, bool, list[tuple[str, list[dict], bool]]]], meta: dict) -> None:
    """Write the task whole: `prompts` as (text, held_out, [(response text, sources, ended), ...]) in the order
    they are shown, ids given in that order. Built beside `path` and renamed into place, so a crash leaves no half
    task."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # SQLite itself drops the journal of a crashed create() beside an empty file
    if not path.exists():  # but replays a deleted task's write-ahead log onto the new one: its rankings
        for leftover in (path.with_name(path.name + suffix) for suffix in ("-wal", "-shm")):
            leftover.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(SCHEMA)
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in
                                                            {**meta, "schema_version": SCHEMA_VERSION}.items()])
        response_id = 0
        for prompt_id, (text, held_out, responses) in enumerate(prompts):
            conn.execute("INSERT INTO prompts VALUES (?, ?, ?)", (prompt_id, text, int(held_out)))
            for response_text, sources, ended in responses:
                conn.execute("INSERT INTO responses VALUES (?, ?, ?, ?, ?)",
                             (response_id, prompt_id, response_text, json.dumps(sources), int(ended)))
                response_id += 1
        conn.execute("COMMIT")
    finally:
        conn.close()
    os.replace(tmp, path)
    fsio.sync_dir(path.parent)


class Store:
    """An open label.db: the task read once, and the answers read and written under one lock."""

    def __init__(self, path: Path, writable: bool = True):
        """`writable`: refuse at once, in one line, a database this process cannot write (a read-only file or
        directory, a lock another program holds), rather than every answer later."""
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no labeling task (the label stage with label.labeler=people writes it)")
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute("PRAGMA busy_timeout=10000")
            self.meta = {k: json.loads(v) for k, v in self._conn.execute("SELECT key, value FROM meta")}
            if self.meta.get("schema_version") not in SCHEMAS_READ:
                raise UserError(f"{self.path}: labeling database of schema {self.meta.get('schema_version')!r}; "
                                f"this version reads schemas {', '.join(map(str, SCHEMAS_READ))}")
            self.prompts = self._read_task()
            if writable:  # a write, rolled back: SQLite opens a file it may not write read-only and says so at a write
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.execute("UPDATE meta SET value = value WHERE key = 'schema_version'")
                finally:
                    self._conn.execute("ROLLBACK")
        except sqlite3.OperationalError as e:  # permissions, locks, I/O: the file may well be a fine task
            raise UserError(f"{self.path}: cannot {'write' if writable else 'read'} it ({e})") from None
        except sqlite3.DatabaseError as e:
            raise UserError(f"{self.path}: not a labeling database ({e})") from None

    def _read_task(self) -> dict[int, Prompt]:
        responses: dict[int, list[Response]] = {}
        ended = "ended" if self.meta["schema_version"] >= 2 else "1"
        for rid, pid, text, sources, end in self._conn.execute(
                f"SELECT id, prompt_id, text, sources, {ended} FROM responses ORDER BY id"):
            responses.setdefault(pid, []).append(Response(rid, text, tuple(json.loads(sources)), bool(end)))
        return {pid: Prompt(pid, text, bool(held_out), tuple(responses.get(pid, ())))
                for pid, text, held_out in self._conn.execute("SELECT id, text, held_out FROM prompts ORDER BY id")}

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def set_meta(self, key: str, value) -> None:
        """Record a setting of the latest serving (its target and overlap: serve's defaults)."""
        with self._lock, self._transaction():
            self._conn.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                               (key, json.dumps(value)))

    def done(self) -> int:
        """Rankings stored, by every labeler."""
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM rankings").fetchone()[0]

    def prompts_ranked(self) -> int:
        """Prompts ranked by at least one labeler."""
        with self._lock:
            return self._conn.execute("SELECT COUNT(DISTINCT prompt_id) FROM rankings").fetchone()[0]

    def answered(self, labeler: str) -> set[int]:
        """Prompts this labeler has ranked or skipped."""
        with self._lock:
            return {pid for (pid,) in self._conn.execute(
                "SELECT prompt_id FROM rankings WHERE labeler = ? UNION SELECT prompt_id FROM skips WHERE labeler = ?",
                (labeler, labeler))}

    def has_ranked(self, labeler: str, prompt_id: int) -> bool:
        with self._lock:
            return self._conn.execute("SELECT 1 FROM rankings WHERE labeler = ? AND prompt_id = ?",
                                      (labeler, prompt_id)).fetchone() is not None

    def ranked_by_others(self, labeler: str) -> set[int]:
        with self._lock:
            return {pid for (pid,) in self._conn.execute(
                "SELECT DISTINCT prompt_id FROM rankings WHERE labeler != ?", (labeler,))}

    def save_ranking(self, ranking: Ranking, now: float) -> int:
        """Store `ranking` in one transaction, replacing this labeler's earlier ranking of the prompt and a skip of
        it; returns the rankings stored after it."""
        row = (ranking.labeler, ranking.prompt_id, json.dumps([list(level) for level in ranking.levels]),
               json.dumps({str(k): v for k, v in ranking.ratings.items()}),
               json.dumps({str(k): list(v) for k, v in ranking.flags.items()}), ranking.seconds, now)
        with self._lock, self._transaction():
            self._conn.execute("DELETE FROM skips WHERE labeler = ? AND prompt_id = ?", row[:2])
            self._conn.execute("INSERT INTO rankings VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (labeler, prompt_id) "
                               "DO UPDATE SET levels = excluded.levels, ratings = excluded.ratings, "
                               "flags = excluded.flags, seconds = excluded.seconds, saved_at = excluded.saved_at",
                               row)
            return self._conn.execute("SELECT COUNT(*) FROM rankings").fetchone()[0]

    def save_skip(self, labeler: str, prompt_id: int, now: float) -> bool:
        """Store a skip; False (nothing written) when this labeler has ranked the prompt: a skip never erases a
        ranking."""
        with self._lock, self._transaction():
            if self._conn.execute("SELECT 1 FROM rankings WHERE labeler = ? AND prompt_id = ?",
                                  (labeler, prompt_id)).fetchone():
                return False
            self._conn.execute("INSERT OR IGNORE INTO skips VALUES (?, ?, ?)", (labeler, prompt_id, now))
            return True

    def rankings(self) -> list[Ranking]:
        """Every stored ranking, in the order first saved."""
        with self._lock:
            rows = self._conn.execute("SELECT labeler, prompt_id, levels, ratings, flags, seconds FROM rankings "
                                      "ORDER BY rowid").fetchall()
        return [Ranking(labeler, pid, tuple(tuple(level) for level in json.loads(levels)),
                        {int(k): v for k, v in json.loads(ratings).items()},
                        {int(k): tuple(v) for k, v in json.loads(flags).items()}, seconds)
                for labeler, pid, levels, ratings, flags, seconds in rows]

    def skips(self) -> dict[str, int]:
        """Skips per labeler."""
        with self._lock:
            return dict(self._conn.execute("SELECT labeler, COUNT(*) FROM skips GROUP BY labeler"))

    @contextlib.contextmanager
    def _transaction(self):
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK when the block or the commit fails (a full disk): nothing of a
        failed answer is written."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:  # SQLite may have rolled back a failed commit itself
                self._conn.execute("ROLLBACK")
            raise
