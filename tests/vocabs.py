"""Real tokenizer vocabularies for the tests: llama.cpp's vocabulary-only GGUF files (no
weights) of DeepSeek-Coder (byte-level BPE), Llama/CodeLlama (SentencePiece, ``llama-spm``),
Qwen2 and StarCoder (byte-level BPE).

They ship in the ``llama-cpp-python==0.3.36`` source distribution on PyPI. The sdist (77 MB,
sha256-checked by pip) is downloaded once per machine, the four files are taken out of it
(each sha256-checked) into ``$CODEDISTILL_CACHE/vocabs`` (default
``~/.cache/codedistill/vocabs``; ``$CODEDISTILL_VOCAB_CACHE`` overrides the folder), and the
sdist is deleted. Nothing is compiled: pip fetches the sdist only.

    .venv/bin/python tests/vocabs.py      # fetch them now (CI does, before the tests)

A test that needs a vocabulary which cannot be fetched skips; with
``CODEDISTILL_REQUIRE_VOCABS`` set (CI) it fails instead.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from functools import cache
from pathlib import Path

import pytest

SDIST = "llama-cpp-python==0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
MEMBER_DIR = "vendor/llama.cpp/models/"
GGUF_SHA256 = {
    "deepseek-coder": "91cb1379f2e33af1c4866b194622b7a0e12e8f0c9dba7ba2f10d55978730bec1",
    "llama-spm": "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69",
    "qwen2": "44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c",
    "starcoder": "fedb892b4e1bd3c1f2fcdae356440b14fb458f4264d586e5c987ed93df4e174d",
}
FAMILIES = tuple(GGUF_SHA256)
DIR_VAR = "CODEDISTILL_VOCAB_CACHE"
REQUIRE_VAR = "CODEDISTILL_REQUIRE_VOCABS"


class VocabsUnavailable(RuntimeError):
    """The vocabularies are neither cached nor fetchable."""


def cache_dir() -> Path:
    """``$CODEDISTILL_VOCAB_CACHE``, else ``$CODEDISTILL_CACHE/vocabs``, else ``~/.cache/codedistill/vocabs``."""
    if os.environ.get(DIR_VAR):
        return Path(os.environ[DIR_VAR])
    root = os.environ.get("CODEDISTILL_CACHE") or Path.home() / ".cache" / "codedistill"
    return Path(root) / "vocabs"


def gguf_name(family: str) -> str:
    return f"ggml-vocab-{family}.gguf"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_verified(family: str) -> bool:
    path = cache_dir() / gguf_name(family)
    return path.is_file() and sha256_of(path) == GGUF_SHA256[family]


def download_sdist(dest: Path) -> Path:
    """The sdist, downloaded by pip into ``dest`` and checked against :data:`SDIST_SHA256`."""
    req = dest / "requirements.txt"
    req.write_text(f"{SDIST} --hash=sha256:{SDIST_SHA256}\n")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--no-binary",
        "llama-cpp-python",
        "--require-hashes",
        "-r",
        str(req),
        "-d",
        str(dest),
    ]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        raise VocabsUnavailable(f"downloading {SDIST} from PyPI took over {e.timeout:.0f} s") from e
    sdist = dest / SDIST_FILE
    if res.returncode != 0 or not sdist.is_file():
        raise VocabsUnavailable(f"cannot download {SDIST} from PyPI: {res.stderr.strip()[-500:]}")
    return sdist


def extract(sdist: Path, dest: Path) -> None:
    """The four GGUF files out of the sdist into ``dest``, each written only if its sha256 matches."""
    wanted = {gguf_name(f): f for f in FAMILIES}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if MEMBER_DIR in member.name and name in wanted and member.isfile():
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                got = hashlib.sha256(data).hexdigest()
                if got != GGUF_SHA256[wanted[name]]:
                    raise VocabsUnavailable(
                        f"{member.name} in {SDIST_FILE} has sha256 {got}, expected {GGUF_SHA256[wanted[name]]}"
                    )
                tmp = dest / f"{name}.tmp"
                tmp.write_bytes(data)
                tmp.replace(dest / name)


@cache
def fetch() -> dict[str, Path]:
    """``{family: GGUF path}``, downloading and unpacking once per machine (file-locked)."""
    from filelock import FileLock

    dest = cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest / ".lock")):
        if not all(is_verified(f) for f in FAMILIES):
            with tempfile.TemporaryDirectory(dir=dest) as tmp:
                extract(download_sdist(Path(tmp)), dest)
        missing = [gguf_name(f) for f in FAMILIES if not is_verified(f)]
        if missing:
            raise VocabsUnavailable(f"{SDIST_FILE} lacks {', '.join(missing)} under {MEMBER_DIR}")
    return {f: dest / gguf_name(f) for f in FAMILIES}


def gguf_file(family: str) -> Path:
    """The family's GGUF vocabulary. In a test: a skip when it cannot be fetched, or a
    failure when ``$CODEDISTILL_REQUIRE_VOCABS`` is set."""
    try:
        return fetch()[family]
    except VocabsUnavailable as e:
        if os.environ.get(REQUIRE_VAR):
            pytest.fail(
                f"{REQUIRE_VAR} is set and the real vocabularies are unavailable: {e}. Fetch them "
                f"with `.venv/bin/python tests/vocabs.py` (needs PyPI), or unset {REQUIRE_VAR} "
                "to skip these tests.",
                pytrace=False,
            )
        pytest.skip(f"real vocabularies unavailable ({e}); `.venv/bin/python tests/vocabs.py` fetches them")


def load_tokenizer(family: str):
    """The family's tokenizer, converted from GGUF once per transformers version and then
    loaded from its cached tokenizer.json; pad token = EOS where the vocabulary has none."""
    import transformers
    from filelock import FileLock
    from transformers import AutoTokenizer

    hf_dir = cache_dir() / f"hf-{transformers.__version__}" / family
    if not (hf_dir / "tokenizer.json").is_file():
        path = gguf_file(family)
        with FileLock(str(cache_dir() / ".convert.lock")):
            if not (hf_dir / "tokenizer.json").is_file():
                converted = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
                converted.save_pretrained(str(hf_dir))
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def main() -> int:
    try:
        paths = fetch()
    except VocabsUnavailable as e:
        print(f"tests/vocabs.py: {e}", file=sys.stderr)
        return 1
    for family, path in paths.items():
        print(f"{family}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
