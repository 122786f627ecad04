"""The response cache on disk (generation/cache.py): where it lives, and that it holds when
several processes use it at once and one is killed with SIGKILL mid-write.

Real processes on a real directory: a writer process publishing large answers in a loop is
killed at a random moment (three times), while a second process reads every key and writes
its own answers over some of them. Afterwards every file present parses and names its key,
no reader ever met a torn file, and every put a writer reported finished is readable."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codedistill.generation import ServingConfig, legacy_response_cache, response_cache_dir
from codedistill.generation.cache import ResponseCache, request_key

REPO = Path(__file__).resolve().parents[1]
PAD = 200_000  # characters of each answer: a write takes long enough to be cut by a kill

# key(i) and a valid answer for it, shared by the test and its child processes
_HELPERS = f"""
import hashlib, json, sys, time
from codedistill.generation.cache import ResponseCache
PAD = {PAD}
def key(i):
    return hashlib.sha256(f"request {{i}}".encode()).hexdigest()
def answer(i, by):
    return {{"i": i, "by": by, "text": by[0] * PAD}}
def valid(i, v):
    return isinstance(v, dict) and v.get("i") == i and v.get("text") == v.get("by", "?")[0] * PAD
"""
WRITER = (
    _HELPERS
    + """
cache = ResponseCache(sys.argv[1])
by = sys.argv[2]
i = 0
while True:
    cache.put(key(i % 400), answer(i % 400, by))
    print(i % 400, flush=True)
    i += 1
"""
)
RACER = (
    _HELPERS
    + """
cache = ResponseCache(sys.argv[1])
end = time.time() + float(sys.argv[2])
reads = found = bad = puts = 0
while time.time() < end:
    for i in range(400):
        v = cache.get(key(i))
        reads += 1
        if v is not None:
            found += 1
            bad += not valid(i, v)
        if i % 3 == 0:
            cache.put(key(i), answer(i, "racer"))
            puts += 1
        if time.time() >= end:
            break
print(json.dumps({"reads": reads, "found": found, "bad": bad, "puts": puts, "corrupt": cache.corrupt}))
"""
)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src")}


def _helpers() -> dict:
    ns: dict = {}
    exec(_HELPERS, ns)
    return ns


def test_two_processes_one_killed_mid_write_lose_and_corrupt_nothing(tmp_path):
    root = tmp_path / "responses"
    h = _helpers()
    racer = subprocess.Popen(
        [sys.executable, "-c", RACER, str(root), "6"], stdout=subprocess.PIPE, text=True, env=_env()
    )
    finished: dict[str, list[int]] = {}
    rng = random.Random(os.getpid())
    for by in ("writer-a", "writer-b", "writer-c"):
        cmd = [sys.executable, "-c", WRITER, str(root), by]
        w = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=_env())
        done = []
        assert w.stdout is not None
        while len(done) < 20:
            line = w.stdout.readline()
            assert line, "the writer died"
            done.append(int(line))
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(w.pid, signal.SIGKILL)
        w.wait()
        done += [int(x) for x in w.stdout.read().split()]  # puts it finished before the kill
        finished[by] = done
    out, _ = racer.communicate(timeout=120)
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["bad"] == 0 and stats["corrupt"] == 0, stats  # no reader met half an answer
    assert stats["found"] > 0 and stats["puts"] > 0, stats

    cache = ResponseCache(root)
    files = [f for d in root.iterdir() if len(d.name) == 2 for f in d.iterdir()]
    entries = [f for f in files if not f.name.startswith(".")]
    leftovers = [f for f in files if f.name.startswith(".") and f.name.endswith(".tmp")]
    for f in entries:  # every file present parses and holds a whole answer to its own key
        rec = json.loads(f.read_text())
        assert f.name == rec["key"] + ".json"
        assert h["valid"](rec["value"]["i"], rec["value"]) and rec["key"] == h["key"](rec["value"]["i"])
    for by, done in finished.items():  # every put a writer finished is readable, whole
        for i in done:
            assert h["valid"](i, cache.get(h["key"](i))), (by, i)
    assert len(cache) == len(entries) >= len({i for d in finished.values() for i in d})
    assert cache.corrupt == 0
    print(f"racer {stats}; {len(entries)} entries, {len(leftovers)} temporary files of killed writers left")


@pytest.mark.parametrize(
    "content",
    [b'{"v": 1, "key": "', b"", b"\xff\xfe not json", b'{"v": 1, "key": "another", "value": {"i": 1}}', b"[1, 2]"],
    ids=["truncated", "empty", "binary", "another-key", "not-an-entry"],
)
def test_a_torn_or_foreign_entry_is_a_miss_and_is_rewritten(tmp_path, content):
    """What a killed writer leaves on a file system without atomic rename (or a disk error):
    never a crash or a wrong answer: a miss, counted, and the next put replaces it."""
    cache = ResponseCache(tmp_path)
    key = request_key({"p": "x"})
    cache.file_of(key).parent.mkdir(parents=True, exist_ok=True)
    cache.file_of(key).write_bytes(content)
    assert cache.get(key) is None and cache.corrupt == 1
    cache.put(key, {"answer": 42})
    assert cache.get(key) == {"answer": 42} and cache.corrupt == 1
    assert json.loads(cache.file_of(key).read_text())["key"] == key


def test_shared_by_default_per_run_or_a_directory(tmp_path, monkeypatch):
    """The default is one cache for every run of the user, under $CODEDISTILL_CACHE;
    `run` keeps it in the run directory; a path names the directory; an old SQLite cache
    file (the run directory's generation_cache.sqlite, or one named) is read as legacy."""
    monkeypatch.setenv("CODEDISTILL_CACHE", str(tmp_path / "cc"))
    run = tmp_path / "run"
    shared = tmp_path / "cc" / "responses"
    assert response_cache_dir(ServingConfig(), run) == shared
    assert response_cache_dir(ServingConfig(cache_path="shared"), run) == shared
    assert response_cache_dir(ServingConfig(cache_path="run"), run) == run / "responses"
    assert response_cache_dir(ServingConfig(cache_path="run"), None) == shared
    assert response_cache_dir(ServingConfig(cache_path=str(tmp_path / "mine")), run) == tmp_path / "mine"
    assert response_cache_dir(ServingConfig(cache=False), run) is None
    monkeypatch.delenv("CODEDISTILL_CACHE")
    assert response_cache_dir(ServingConfig(), run) == Path.home() / ".cache" / "codedistill" / "responses"

    assert legacy_response_cache(ServingConfig(), run) is None
    run.mkdir()
    (run / "generation_cache.sqlite").write_bytes(b"")
    assert legacy_response_cache(ServingConfig(), run) == run / "generation_cache.sqlite"
    old = tmp_path / "old.sqlite"
    old.write_bytes(b"")
    named = ServingConfig(cache_path=str(old))
    assert legacy_response_cache(named, run) == old and response_cache_dir(named, run) == tmp_path / "old.sqlite.d"
