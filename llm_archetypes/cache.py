"""Persistent answer cache: one SQLite file in WAL mode, safe for concurrent writers.

Keys hash everything that can change a backend's raw reply: backend name, model id,
decoding settings, the call kind (``complete``/``score``), the options, the question's
answer type and the exact prompt text. Values are the raw replies as JSON (text, or a
list of probabilities as Python floats, which round-trip exactly), so replaying parses
the same bytes and rebuilds bit-identical tensors.

Each write is its own transaction: an interrupted run leaves every finished answer and
no partial row; several processes may record into one file at once (SQLite's WAL
journal plus a busy timeout serialise writers). The first writer of a key wins and
:meth:`AnswerCache.put` returns the stored value, so concurrent runs agree on it.

A row whose value is not valid JSON (a damaged file, a foreign writer) is reported with
the file and the row: ``on_corrupt="skip"`` (default) warns with :class:`CacheWarning` and
treats it as a miss (the answer is asked again and the row replaced);
``on_corrupt="raise"`` raises :class:`CacheCorrupt`.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from lpm.errors import LPMError

__all__ = ["AnswerCache", "CacheMiss", "CacheCorrupt", "CacheWarning"]


class CacheCorrupt(LPMError, ValueError):
    """A cache row cannot be read (the message names the file and the row)."""


class CacheWarning(UserWarning):
    """A damaged cache row was skipped (the message names the file and the row)."""


class CacheMiss(LPMError, KeyError):
    """Replay mode found no recorded answer for a prompt (the run is not reproducible from this cache)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "cache miss"


def _is_json(text: Any) -> bool:
    try:
        json.loads(text)
        return True
    except (json.JSONDecodeError, TypeError):
        return False


class AnswerCache:
    """``get(key) -> value | None`` and ``put(key, value)`` over an SQLite file (WAL)."""

    def __init__(self, path: str | Path, timeout: float = 60.0, on_corrupt: str = "skip") -> None:
        if on_corrupt not in ("skip", "raise"):
            raise ValueError(f"on_corrupt: expected 'skip' or 'raise', got {on_corrupt!r}")
        self.on_corrupt = on_corrupt
        self.corrupt_rows = 0
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=timeout, check_same_thread=False,
                                   isolation_level=None)
        self._db.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        if self.path.exists() and self.path.stat().st_size and self.path.read_bytes()[:16] != b"SQLite format 3\x00":
            raise CacheCorrupt(f"answer cache {self.path}: not an SQLite database; move it away or pass another "
                               f"--llm-cache")
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
        """Recorded value of ``key``, or ``None`` (also for a damaged row with ``on_corrupt="skip"``)."""
        with self._lock:
            row = self._db.execute("SELECT rowid, value FROM answers WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            return json.loads(row[1])
        except (json.JSONDecodeError, TypeError) as e:
            msg = (f"answer cache {self.path}: row {row[0]} (key {key[:12]}...) is not valid JSON ({e}); "
                   f"value starts {str(row[1])[:40]!r}")
            if self.on_corrupt == "raise":
                raise CacheCorrupt(msg) from None
            self.corrupt_rows += 1
            warnings.warn(msg + "; skipped, the answer will be asked again", CacheWarning, stacklevel=2)
            return None

    def put(self, key: str, value: Any, meta: dict[str, Any] | None = None, *, replace: bool = False) -> Any:
        """Record ``value`` under ``key`` and return the stored value.

        The first writer wins (identical keys mean identical requests): when another run
        recorded the key first, its value is returned, and the caller should use it.
        ``replace=True`` overwrites (a stored value that no longer parses).
        """
        payload = json.dumps(value)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone()
                stored = payload
                if row is None or replace or not _is_json(row[0]):
                    self._db.execute("INSERT OR REPLACE INTO answers (key, value, meta) VALUES (?, ?, ?)",
                                     (key, payload, json.dumps(meta or {}, default=str)))
                else:
                    stored = row[0]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return value if stored == payload else json.loads(stored)

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
