"""Crash-safe append-only JSONL: one record per line, flush + fsync per write.

A process killed mid-write leaves at most one partial last line; :func:`read_jsonl`
ignores it and :class:`JsonlAppender` cuts it off before appending, so a restarted run
continues from the last complete record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator


def _good_prefix_len(path: Path) -> int:
    """Bytes of ``path`` up to and including the last newline that closes valid JSON."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # 0 when no newline at all
    # the tail after the last newline is a partial record; the record before the last
    # newline could also be a torn write only if the newline was written (it was the
    # last byte written), so it is complete.
    while end > 0:
        start = data.rfind(b"\n", 0, end - 1) + 1
        line = data[start:end - 1]
        try:
            if line.strip():
                json.loads(line)
            return end
        except json.JSONDecodeError:
            end = start
    return 0


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    out: list[dict[str, Any]] = []
    with p.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # torn last line
            raw = raw.strip()
            if not raw:
                continue
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                break
    return out


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    yield from read_jsonl(path)


class JsonlAppender:
    """Append records durably to a JSONL file (repairs a torn tail on open)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            good = _good_prefix_len(self.path)
            if good != self.path.stat().st_size:
                with self.path.open("r+b") as f:
                    f.truncate(good)
        self._f = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON via a temp file + rename, so readers never see half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
