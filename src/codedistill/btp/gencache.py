"""A generation cache shared by runs: sampling and testing are done once per setting.

Ablation variants and sweep trials differ mostly in what happens *after* the expensive
part (replay, training). Each generation phase (a model's beams or samples on a list of
training problems, with their sandbox verdicts) and each evaluation of an unchanged model
(the base target, the source) is keyed by a hash of everything that determines its
output: the model (its local path, which for the tiny models includes their build hash),
the generation method and its settings, the problem ids, the seeds, chunking and the
sandbox timeout. A run with ``generation_cache`` set copies a finished entry into its own
run directory instead of generating, and publishes what it generated itself.

Entries are published atomically (written to a temporary folder, then renamed), so a run
killed while publishing leaves no half entry and parallel runs never see one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from codedistill.data.problem import Problem
from codedistill.models.registry import local_path
from codedistill.models.tiny import weights_id
from codedistill.runs import JsonlWriter, read_jsonl, write_json


def cache_key(parts: Mapping[str, Any]) -> str:
    """A stable 20-hex-digit hash of the settings (JSON with sorted keys)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def model_id(spec: Any) -> str:
    """What identifies a model's weights for the generation cache (a tiny model: its spec
    hash and the hash of its weights file, wherever it lies; shipped directories carry no hash)."""
    if getattr(spec, "tiny", False):
        return f"{spec.alias}@{weights_id(local_path(spec))}"
    return f"{spec.alias}@{local_path(spec)}"


def ids_hash(problems: Sequence[Problem]) -> str:
    """A 16-hex-digit hash of the problems' task ids, in order."""
    return hashlib.sha256("\n".join(p.task_id for p in problems).encode()).hexdigest()[:16]


class GenerationCache:
    """``root/<kind>/<key>/`` holds ``key.json`` (the settings), the files, and ``DONE``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def entry(self, kind: str, parts: Mapping[str, Any]) -> Path:
        return self.root / kind / cache_key(parts)

    def has(self, kind: str, parts: Mapping[str, Any]) -> bool:
        return (self.entry(kind, parts) / "DONE").exists()

    # ---- records (generation phases) -------------------------------------------------
    def get_rows(self, kind: str, parts: Mapping[str, Any], name: str) -> list[dict[str, Any]] | None:
        d = self.entry(kind, parts)
        if not (d / "DONE").exists():
            return None
        return read_jsonl(d / f"{name}.jsonl")

    def put_rows(self, kind: str, parts: Mapping[str, Any], tables: Mapping[str, Iterable[Mapping[str, Any]]]) -> bool:
        """Publish ``{name: rows}`` unless the entry exists; True when this call published it."""
        d = self.entry(kind, parts)
        if (d / "DONE").exists():
            return False
        tmp = d.parent / f".tmp-{d.name}-{uuid.uuid4().hex[:8]}"
        for name, rows in tables.items():
            with JsonlWriter(tmp / f"{name}.jsonl") as w:
                w.write_many(rows)
        return self._commit(tmp, d, parts)

    # ---- whole files (evaluations) ---------------------------------------------------
    def get_files(self, kind: str, parts: Mapping[str, Any], dest: Path, names: Iterable[str]) -> bool:
        """Copy the entry's files into ``dest`` (where ``dest`` does not hold them yet)."""
        d = self.entry(kind, parts)
        if not (d / "DONE").exists():
            return False
        dest.mkdir(parents=True, exist_ok=True)
        for n in names:
            if not (dest / n).exists() or (dest / n).stat().st_size == 0:
                tmp = dest / f".{n}.tmp"
                shutil.copyfile(d / n, tmp)
                os.replace(tmp, dest / n)
        return True

    def put_files(self, kind: str, parts: Mapping[str, Any], src: Path, names: Iterable[str]) -> bool:
        d = self.entry(kind, parts)
        if (d / "DONE").exists():
            return False
        tmp = d.parent / f".tmp-{d.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.copyfile(src / n, tmp / n)
        return self._commit(tmp, d, parts)

    def _commit(self, tmp: Path, d: Path, parts: Mapping[str, Any]) -> bool:
        write_json(tmp / "key.json", dict(parts))
        (tmp / "DONE").write_text("done\n")
        try:
            os.rename(tmp, d)  # atomic; fails if another run published first
            return True
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
