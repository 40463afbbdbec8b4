"""Persistent answer cache: one SQLite file in WAL mode, safe for concurrent writers.

Keys hash everything that can change a backend's raw reply: backend name, model id,
decoding settings, the call kind (``complete``/``score``), the options, the question's
answer type and the exact prompt text. Values are the raw replies as JSON (text, or a
list of probabilities as Python floats, which round-trip exactly), so replaying parses
the same bytes and rebuilds bit-identical tensors.

Each write is its own transaction: an interrupted run leaves every finished answer and
no partial row; several processes may record into one file at once (SQLite's WAL
journal plus a busy timeout serialise writers).
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["AnswerCache", "CacheMiss"]


class CacheMiss(KeyError):
    """Replay mode found no recorded answer for a prompt (the run is not reproducible from this cache)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "cache miss"


class AnswerCache:
    """``get(key) -> value | None`` and ``put(key, value)`` over an SQLite file (WAL)."""

    def __init__(self, path: str | Path, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=timeout, check_same_thread=False,
                                   isolation_level=None)
        self._db.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        # Switching a new file to WAL and creating the table can fail with "database is locked"
        # without SQLite's busy handler being called when two processes open the same new file
        # at once, so the set-up is retried here until the timeout.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
                                 "meta TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL DEFAULT (julianday('now')))")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01 + 0.04 * random.random())

    def get(self, key: str) -> Any | None:
        """Recorded value of ``key`` or ``None``."""
        with self._lock:
            row = self._db.execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: Any, meta: dict[str, Any] | None = None) -> None:
        """Record ``value`` under ``key`` (first writer wins; identical keys mean identical requests)."""
        payload = json.dumps(value)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR IGNORE INTO answers (key, value, meta) VALUES (?, ?, ?)",
                                 (key, payload, json.dumps(meta or {}, default=str)))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def integrity_ok(self) -> bool:
        """SQLite's own integrity check."""
        with self._lock:
            return self._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> "AnswerCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
