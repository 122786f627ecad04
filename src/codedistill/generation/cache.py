"""The response cache of served generation: a request is paid once per machine, not once per run.

**Where.** By default one cache for every run of a user, ``$CODEDISTILL_CACHE/responses``
(else ``~/.cache/codedistill/responses``), so a rerun into a new ``--output-dir``, ``run``,
``matrix``, ``ablate`` and sweep trials all reuse every answer already paid for. The serving
setting ``cache_path`` (``--response-cache``; YAML ``serving.cache_path``) keeps it per run
(``run``: ``responses/`` in the run directory) or names a directory;
``serving.cache: false`` turns it off. The directory used is recorded in ``generation.json``
(``response_cache``). See :func:`codedistill.generation.response_cache_dir`.

**Format: safe on a network file system.** One JSON file per answer,
``ROOT/<key[:2]>/<key>.json`` holding ``{"v", "key", "created", "request", "value"}``, published
with :func:`codedistill.runs.publish_file` (a uniquely named temporary file in the same
directory, fsync, ``os.replace``), the file-level twin of the generation cache's directory
rename (:mod:`codedistill.btp.gencache`). No locks and no shared memory (SQLite's WAL, used
before, needs both and is not safe on NFS): any number of processes on any number of hosts
read and write one directory; a reader sees no file or a whole one; two writers of one key
both hold an answer to the same request and the last one wins. A file that does not parse or
names another key (a write torn by a crash on a file system without atomic rename, a disk
error) is a miss, counted in ``corrupt``: the request is asked again and the file rewritten.
Temporary files of killed writers (``.*.tmp``) are never read.

**Key: what was asked.** SHA-256 of the canonical JSON of the model asked for and where
(``openai:<requested name>@<endpoint>``, the endpoint being ``local`` for a loopback URL, else
the API's host name; ``vllm:`` + a fingerprint of the weights, adapter and dtype for a vLLM
server codedistill starts), the endpoint kind (``completions`` / ``chat``) and the whole
request body: prompt or messages, ``n``, temperature, top_p, max tokens, the stop strings
sent, seed, log-prob settings, beam-search settings, and the index of a sample within an
``n`` split into single requests.

**Identity: who answered.** A hosted name is an alias: DeepSeek's ``deepseek-chat`` answered
as DeepSeek-V3-0324 from March 2025 and as later models since August 2025. So every cached
answer keeps the server's own ``model`` field (and ``system_fingerprint``), and answers of one
identity are never served to a run that the endpoint now answers as another:

- each (model asked for, endpoint) has a *pinned identity* in this cache,
  ``ROOT/identities/<hash>.json``: the ``model`` of the latest fresh answer;
- a cached answer is served only when its ``model`` equals the run's identity: the ``model``
  of the run's first fresh answer, or, before the run has one, the pinned identity;
- a run learns the identity before it uses any cached answer of a batch that needs the
  server: it first sends one request the cache cannot answer; if the endpoint now answers as
  another model, the pin moves (a warning says so once, naming both), and every answer of
  the old identity is a miss from then on, for this run and every later one: it is asked
  again and replaced;
- a run that the cache answers entirely sends nothing, so it cannot notice a change made
  since the last fresh answer; it reproduces the cached run. ``--response-cache run`` (or a
  new directory) asks everything again.

Where the endpoint keeps the alias as its ``model`` (DeepSeek reports ``deepseek-chat``),
the change is visible only in ``system_fingerprint``: it is recorded, not part of the
identity (it also changes with deployments of the same model). Each sample row
(``served_model``, ``system_fingerprint``) and ``generation.json`` (``served_models``) say which
model answered, and a warning is printed once per run when that differs from the registry's
expected name (``ModelSpec.served_model``; by default the name asked for).

**Old caches.** ``generation_cache.sqlite`` in a run directory (SQLite, the format before) is
read, never written: a resumed run finds its answers there under their old keys, copies each
one it uses into the new cache, and applies the same identity rule. Nothing else is
migrated (the old keys cannot be turned into new ones).
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

from codedistill.runs import publish_file

SCHEMA = 1
IDENTITIES = "identities"


def request_key(payload: dict[str, Any]) -> str:
    """Stable hash of a JSON-able request description (key order does not matter)."""
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """``get(key)`` / ``put(key, value)`` of JSON values, one file each under ``root``
    (see the module docstring); ``legacy``: an old SQLite cache read by :meth:`get_legacy`."""

    def __init__(self, root: str | os.PathLike[str], legacy: str | os.PathLike[str] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.legacy = LegacySQLiteCache(legacy) if legacy is not None and Path(legacy).is_file() else None
        self._lock = threading.Lock()
        self.corrupt = 0  # unreadable entries met (each one a miss, rewritten by the next put)

    @property
    def path(self) -> Path:
        return self.root

    def file_of(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Any | None:
        """The value stored under ``key``; None when absent or unreadable (a miss, never an error)."""
        rec = _read_json(self.file_of(key))
        if rec is None:
            return None
        if not isinstance(rec, dict) or rec.get("key") != key or "value" not in rec:
            with self._lock:
                self.corrupt += 1
            return None
        return rec["value"]

    def put(self, key: str, value: Any, request: Any = None) -> None:
        rec: dict[str, Any] = {"v": SCHEMA, "key": key, "created": time.time(), "value": value}
        if request is not None:
            rec["request"] = request
        publish_file(self.file_of(key), json.dumps(rec, ensure_ascii=False))

    def get_legacy(self, key: str) -> Any | None:
        return self.legacy.get(key) if self.legacy is not None else None

    # ---- identities (who answers a model name at an endpoint) --------------------------
    def _identity_file(self, name: str) -> Path:
        return self.root / IDENTITIES / f"{hashlib.sha256(name.encode()).hexdigest()[:24]}.json"

    def pinned(self, name: str) -> dict[str, Any] | None:
        """The pinned identity record of ``name`` (None: none yet, or unreadable)."""
        rec = _read_json(self._identity_file(name))
        return rec if isinstance(rec, dict) and rec.get("name") == name else None

    def pin(self, name: str, served_model: str | None, system_fingerprint: str | None = None) -> None:
        rec: dict[str, Any] = {"name": name, "served_model": served_model, "system_fingerprint": system_fingerprint}
        rec["time"] = time.time()
        publish_file(self._identity_file(name), json.dumps(rec, ensure_ascii=False))

    def __len__(self) -> int:
        n = 0
        for d in self.root.iterdir():
            if len(d.name) == 2 and d.is_dir():
                n += sum(1 for f in d.iterdir() if f.suffix == ".json" and not f.name.startswith("."))
        return n

    def close(self) -> None:
        if self.legacy is not None:
            self.legacy.close()


def _read_json(path: Path) -> Any | None:
    """The parsed file; None when it is missing; an object that matches nothing when it is
    torn or unreadable (the caller counts it as corrupt)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError:
        return _UNREADABLE
    try:
        return json.loads(raw)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return _UNREADABLE


_UNREADABLE: dict[str, Any] = {"unreadable": True}


class LegacySQLiteCache:
    """The SQLite cache of earlier versions (``generation_cache.sqlite``), read only."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = sqlite3.connect(str(self.path), timeout=60, check_same_thread=False)

    def get(self, key: str) -> Any | None:
        with self._lock:
            if self._db is None:
                return None
            try:
                row = self._db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
            except sqlite3.DatabaseError:  # not a cache of ours, or damaged: no answers from it
                return None
        return json.loads(row[0]) if row is not None else None

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class NullCache:
    """No caching (``serving.cache: false``)."""

    path = None
    legacy = None
    corrupt = 0

    def get(self, key: str) -> Any | None:
        return None

    def put(self, key: str, value: Any, request: Any = None) -> None:
        pass

    def get_legacy(self, key: str) -> Any | None:
        return None

    def pinned(self, name: str) -> dict[str, Any] | None:
        return None

    def pin(self, name: str, served_model: str | None, system_fingerprint: str | None = None) -> None:
        pass

    def __len__(self) -> int:
        return 0

    def close(self) -> None:
        pass
