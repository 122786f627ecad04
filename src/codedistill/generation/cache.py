"""A response cache on disk for served generation: a request is sent at most once.

Keyed by a SHA-256 of the canonical JSON of everything that decides the answer: the model's
identity (served name + a fingerprint of its weights or endpoint), the endpoint kind, the
prompt or messages and every sampling parameter, including the seed and the index of the
sample within a split ``n``. A resumed or repeated run finds every answer it already got
here and sends no request for it; a run killed mid-chunk loses no finished request.

SQLite (WAL, one transaction per answer) so several threads and processes can share one
file and a ``kill -9`` never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any


def request_key(payload: dict[str, Any]) -> str:
    """Stable hash of a JSON-able request description (key order does not matter)."""
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """``get(key)`` / ``put(key, value)`` of JSON values in one SQLite file."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)"
        )
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Any | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
            return json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        blob = json.dumps(value, ensure_ascii=False)
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses (key, value, created) VALUES (?, ?, ?)", (key, blob, time.time())
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


class NullCache:
    """No caching (``cache_path=None``)."""

    hits = 0
    misses = 0
    path = None

    def get(self, key: str) -> Any | None:
        self.misses += 1
        return None

    def put(self, key: str, value: Any) -> None:
        pass

    def __len__(self) -> int:
        return 0

    def close(self) -> None:
        pass
