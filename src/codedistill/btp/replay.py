"""BTP's persistent replay buffer: every tested program, deduplicated per problem."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from codedistill.btp.p2value import DEFAULT_P2_ALPHA, p2value, program_key
from codedistill.runs import JsonlWriter, read_jsonl


@dataclass
class ReplayEntry:
    """One program for one problem, with what BTP scores it by.

    ``completion`` is the text that follows the problem's ``code_prefix`` (what the
    target learns to produce); ``program`` is the full program that was tested.
    ``p`` is the generating model's length-normalised sequence probability.
    """

    task_id: str
    completion: str
    program: str
    p: float
    pass_rate: float
    tests_passed: int
    tests_total: int
    source: str
    iteration: int
    origin: str = "beam"  # beam | sample
    key: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.key:
            self.key = program_key(self.program)

    @property
    def passed(self) -> bool:
        return self.tests_total > 0 and self.tests_passed == self.tests_total

    def value(self, alpha: float = DEFAULT_P2_ALPHA) -> float:
        return p2value(self.p, self.pass_rate, alpha)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReplayEntry:
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in d.items() if k in names})


class ReplayBuffer:
    """Append-only, deduplicated (per problem, by normalised program) replay buffer.

    With a ``path`` the buffer is persistent: it is loaded from the JSONL file on
    construction and each new entry is appended durably (flush + fsync), so re-adding the
    same entries after a crash is a no-op and the file reads back the same.
    The first occurrence of a program wins (it keeps its P, source and iteration);
    later duplicates only bump ``duplicates_seen``.
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self.entries: list[ReplayEntry] = []
        self._keys: set[tuple[str, str]] = set()
        self.duplicates_seen = 0
        self._writer: JsonlWriter | None = None
        if self.path is not None:
            for d in read_jsonl(self.path):
                e = ReplayEntry.from_dict(d)
                k = (e.task_id, e.key)
                if k not in self._keys:
                    self._keys.add(k)
                    self.entries.append(e)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def __contains__(self, item: tuple[str, str]) -> bool:
        return item in self._keys

    def add(self, entry: ReplayEntry) -> bool:
        """Add unless the problem already holds the same normalised program."""
        k = (entry.task_id, entry.key)
        if k in self._keys:
            self.duplicates_seen += 1
            return False
        self._keys.add(k)
        self.entries.append(entry)
        if self.path is not None:
            if self._writer is None:
                self._writer = JsonlWriter(self.path)
            self._writer.write(entry.to_dict())
        return True

    def extend(self, entries: Iterable[ReplayEntry]) -> int:
        return sum(self.add(e) for e in entries)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def values(self, alpha: float = DEFAULT_P2_ALPHA) -> list[float]:
        return [e.value(alpha) for e in self.entries]

    def by_task(self) -> dict[str, list[ReplayEntry]]:
        out: dict[str, list[ReplayEntry]] = {}
        for e in self.entries:
            out.setdefault(e.task_id, []).append(e)
        return out
