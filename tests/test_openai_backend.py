"""The OpenAI-compatible backend against a local stand-in for DeepSeek's API.

The stand-in (tests/standin_openai.py) is a real HTTP server serving tiny-source through the
HF backend under DeepSeek's model name, with DeepSeek's limits (n=1 only, no beam search,
top_logprobs <= 20) and injected faults (two 429s with Retry-After, one 500, one dropped
connection). What is checked: every sample arrives with its log-probs, the retries and the
n=1 / beam-search fallbacks are recorded, the same command into another run directory sends
zero requests (the stand-in's own counter: the response cache is shared by the user's runs),
a server that dies mid-run is resumed from disk, the model that answered is recorded and an
alias that moved to another model is not answered from the old model's cache, an old SQLite
cache is still read, and each bad input is one clear error naming the fix.

Each test has its own $CODEDISTILL_CACHE (the shared response cache lives there).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from codedistill.errors import ConfigError  # noqa: E402
from codedistill.generation.cache import ResponseCache, request_key  # noqa: E402
from codedistill.generation.openai_api import (  # noqa: E402
    OpenAIGenerator,
    OpenAISettings,
    RetryPolicy,
    ServerFeatures,
)
from standin_openai import StandIn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test talks to a real tiny model behind HTTP


@pytest.fixture(scope="module")
def standin():
    s = StandIn("tiny-source", served_name="deepseek-chat", retry_after="1").start()
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """This test's user cache (the CLI runs below inherit it): no answer from another test."""
    monkeypatch.setenv("CODEDISTILL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "responses"


def _synth_prompts(n: int, style: str, gen):
    from codedistill.data import load_problems
    from codedistill.prompts import PromptStyle, render_prompt, stops_for

    ps = load_problems("synth", "test", max_problems=n)
    st = PromptStyle(style)
    return [render_prompt(p, st, gen.tokenizer) for p in ps], stops_for(ps[0], st)


def test_deepseek_like_faults_and_n1_split_are_survived_and_recorded(standin, tmp_path):
    """n=3 asked of a server that takes n=1 only, through 2x429 (Retry-After), a 500 and a
    dropped connection: all 3x3 samples arrive, with log-probs; retries and the split are
    recorded; a second generator on the same cache sends nothing."""
    standin.faults = {standin.posts + k: f for k, f in {2: "429", 3: "429", 5: "500", 8: "drop"}.items()}
    cache = tmp_path / "responses"
    gen = OpenAIGenerator(
        "deepseek-chat",
        standin.base_url,
        OpenAISettings(
            prompt_style="chat",
            concurrency=3,
            cache_path=cache,
            require_logprobs=True,
            retry=RetryPolicy(backoff_base=0.05),
        ),
    )
    prompts, stop = _synth_prompts(3, "chat", gen)
    out = gen.sample(prompts, n=3, temperature=0.8, top_p=0.95, max_new_tokens=48, stop=stop, seed=7)
    assert [len(cs) for cs in out] == [3, 3, 3]
    for i, cs in enumerate(out):
        for c in cs:
            assert c.prompt_index == i and c.num_tokens > 0 and c.text
            assert math.isfinite(c.logprob) and c.logprob < 0 and 0 < c.seq_prob < 1
            assert c.num_tokens == len(c.meta["tokens"])
    u = gen.usage()
    assert u["retries"] == {"429": 2, "500": 1, "connection": 1}, u["retries"]
    assert any("n=1" in f for f in u["fallbacks"]), u["fallbacks"]
    assert u["requests_sent"] == 9 and u["completion_tokens"] > 0
    posts = standin.posts
    again = OpenAIGenerator("deepseek-chat", standin.base_url, OpenAISettings(prompt_style="chat", cache_path=cache))
    out2 = again.sample(prompts, n=3, temperature=0.8, top_p=0.95, max_new_tokens=48, stop=stop, seed=7)
    assert standin.posts == posts, "a repeated request reached the server"
    assert again.usage()["requests_sent"] == 0 and again.usage()["cache_hits"] == 3  # one per prompt (n=3)
    assert [[c.text for c in cs] for cs in out2] == [[c.text for c in cs] for cs in out]
    gen.close()
    again.close()


def test_no_beam_search_falls_back_to_samples_and_says_so(standin):
    gen = OpenAIGenerator("deepseek-chat", standin.base_url, OpenAISettings(server=ServerFeatures(max_n=1)))
    prompts, stop = _synth_prompts(2, "base", gen)
    out = gen.beam_search(prompts, num_beams=2, max_new_tokens=32, stop=stop)
    assert [len(cs) for cs in out] == [2, 2]
    assert all(c.meta["beam_fallback"] == "sample" and math.isfinite(c.logprob) for cs in out for c in cs)
    assert any("no beam search" in f and "2 samples" in f for f in gen.usage()["fallbacks"])
    topk = gen.next_token_topk(prompts[:1], 5)
    assert len(topk[0]) == 5 and all(v <= 0 for v in topk[0].values())
    assert sum(math.exp(v) for v in topk[0].values()) <= 1.0 + 1e-6
    gen.close()


def _baseline_cmd(url: str, out: Path, cache: str | Path | None = None, problems: int = 4, n: int = 2) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "codedistill",
        "baseline",
        "--model",
        "DeepSeek-V3-0324",
        "--dataset",
        "synth",
        "--backend",
        "openai",
        "--max-problems",
        str(problems),
        "-n",
        str(n),
        "--max-new-tokens",
        "48",
        "--base-url",
        url,
        "--output-dir",
        str(out),
        "--workers",
        "1",
        "--price-input",
        "0.27",
        "--price-output",
        "1.10",
    ]
    return cmd + (["--response-cache", str(cache)] if cache else [])


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DEEPSEEK_API_KEY"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900, **kw)


def test_the_same_served_command_into_another_output_dir_sends_no_request(standin, tmp_path, own_cache):
    """`codedistill baseline --model DeepSeek-V3-0324 --backend openai --base-url ...` on 8 synth
    problems x 3 samples (n=1 per request): samples, retries and cost land in the run; the same
    command again and the same command into another --output-dir send zero requests (counted
    by the server: the response cache is the user's, not the run's) and give the same pass@k;
    `--response-cache run` keeps a cache in the run directory, so that run pays again."""
    standin.faults = {standin.posts + 1: "429", standin.posts + 3: "500"}
    r = _run(_baseline_cmd(standin.base_url, tmp_path / "a", problems=8, n=3))
    assert r.returncode == 0, r.stderr[-3000:]
    a = tmp_path / "a"
    rows = [json.loads(line) for line in (a / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(math.isfinite(x["logprob"]) for x in rows)
    gen = json.loads((a / "generation.json").read_text())["totals"]["DeepSeek-V3-0324"]
    assert gen["requests_sent"] == 24 and gen["retries_total"] == 2 and gen["cost_usd"] > 0
    cfg = json.loads((a / "config.json").read_text())["config"]
    assert cfg["generation_backend"] == {
        "backend": "openai",
        "served_model_name": "deepseek-chat",
        "beam_search": False,
    }
    assert "Served generation" in (a / "report.md").read_text()
    est = json.loads((a / "plan.json").read_text())["estimate"]
    posts = standin.posts
    for out in (a, tmp_path / "b"):  # the same command (records), then a new run (the shared cache)
        r = _run(_baseline_cmd(standin.base_url, out, problems=8, n=3))
        assert r.returncode == 0, r.stderr[-3000:]
    assert standin.posts == posts
    b_gen = json.loads(((tmp_path / "b") / "generation.json").read_text())["totals"]["DeepSeek-V3-0324"]
    assert b_gen["requests_sent"] == 0 and b_gen["cache_hits"] == 24
    assert b_gen["response_cache"] == str(own_cache) and len(ResponseCache(own_cache)) == 24
    ma = json.loads((a / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert ma["pass@1"] == mb["pass@1"]
    # the time estimate comes from a chunk that computed: none from a run the cache answered in full
    # (a resumed gemma run once printed "about 36 s" for an hour's work)
    assert est["first_chunk_programs"] == 24 and est["seconds_per_program"] > 0
    assert json.loads((tmp_path / "b" / "plan.json").read_text())["estimate"] is None
    assert "estimate:" not in r.stdout + r.stderr
    # a cache of its own: the first 2 problems' 6 answers are asked again, and kept in the run
    r = _run(_baseline_cmd(standin.base_url, tmp_path / "c", "run", problems=2, n=3))
    assert r.returncode == 0, r.stderr[-3000:]
    assert standin.posts == posts + 6 and len(ResponseCache(tmp_path / "c" / "responses")) == 6


def test_server_dying_mid_run_is_resumed_without_repeating_requests(standin, tmp_path, own_cache):
    """The stand-in fails every request from the 5th on (a dead server): the run stops with
    an error that says how to resume; with the server back, the same command finishes and
    the server has answered each distinct request exactly once."""
    start = standin.posts
    served0 = standin.served
    standin.faults = {start + k: "500" for k in range(5, 200)}
    cmd = _baseline_cmd(standin.base_url, tmp_path / "run")
    r = _run(cmd + ["--concurrency", "1", "--max-retries", "1"])
    assert r.returncode != 0
    assert "run the same command again to resume" in r.stderr.replace("\n", " ")
    standin.faults = {}
    r = _run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    assert standin.served - served0 == len(ResponseCache(own_cache)) == 8


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]


def test_the_answering_model_is_recorded_and_a_moved_alias_is_not_answered_from_the_cache(standin, tmp_path):
    """The stand-in reports which model answered (as an API does in `model` and
    `system_fingerprint`). Each sample and generation.json record it, with one warning when it
    is not the registry's DeepSeek-V3-0324. Then the alias moves to another model (the stand-in
    reports `deepseek-v3.2`): a run that needs the server learns so from its first answer and
    asks everything again, none of it from the old model's cached programs (the server counts
    every request), with one warning naming both; after that, even the first command's exact
    rerun is answered by the new model's entries."""
    moved = "deepseek-v3.2"
    r = _run(_baseline_cmd(standin.base_url, tmp_path / "a", problems=3, n=2))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(tmp_path / "a")
    assert len(rows) == 6 and {(x["served_model"], x["system_fingerprint"]) for x in rows} == {
        ("deepseek-chat", "fp_standin_0")
    }
    warning = "answered by 'deepseek-chat', not 'deepseek-ai/DeepSeek-V3-0324' as expected"
    assert r.stderr.count(warning) == 1, r.stderr[-3000:]
    t = json.loads((tmp_path / "a" / "generation.json").read_text())["totals"]["DeepSeek-V3-0324"]
    assert t["served_models"] == {"deepseek-chat": 6} and any(warning in n for n in t["notes"])

    standin.reported_model, standin.fingerprint = moved, "fp_standin_1"
    try:
        posts = standin.posts
        r = _run(_baseline_cmd(standin.base_url, tmp_path / "b", problems=4, n=2))  # 3 of its 4 problems cached
        assert r.returncode == 0, r.stderr[-3000:]
        assert standin.posts - posts == 8, "a cached answer of the old model was used"
        rows = _rows(tmp_path / "b")
        assert {(x["served_model"], x["system_fingerprint"]) for x in rows} == {(moved, "fp_standin_1")}
        assert r.stderr.count(f"now answers as '{moved}', not 'deepseek-chat'") == 1, r.stderr[-3000:]
        assert r.stderr.count(f"answered by '{moved}', not 'deepseek-ai/DeepSeek-V3-0324'") == 1
        t = json.loads((tmp_path / "b" / "generation.json").read_text())["totals"]["DeepSeek-V3-0324"]
        assert t["served_models"] == {moved: 8} and t["requests_sent"] == 8 and t["cache_hits"] == 0
        posts = standin.posts
        r = _run(_baseline_cmd(standin.base_url, tmp_path / "c", problems=3, n=2))  # the first command again
        assert r.returncode == 0, r.stderr[-3000:]
        assert standin.posts == posts and {x["served_model"] for x in _rows(tmp_path / "c")} == {moved}
    finally:
        standin.reported_model, standin.fingerprint = standin.served_name, "fp_standin_0"


def test_an_old_sqlite_cache_in_the_run_directory_is_still_read(standin, tmp_path, own_cache):
    """A run directory from before (its answers in generation_cache.sqlite, SQLite in WAL mode,
    keyed as that version keyed them) resumes without a request, and its answers are carried
    into the shared cache."""
    import sqlite3

    r = _run(_baseline_cmd(standin.base_url, tmp_path / "a", "run", problems=3, n=2))
    assert r.returncode == 0, r.stderr[-3000:]
    old = tmp_path / "b" / "generation_cache.sqlite"
    old.parent.mkdir()
    db = sqlite3.connect(old)  # the earlier version's file: WAL, one table, its own keys
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE responses (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)")
    a = ResponseCache(tmp_path / "a" / "responses")
    for f in sorted(a.root.glob("??/*.json")):
        rec = json.loads(f.read_text())
        body = {k: v for k, v in rec["request"]["body"].items() if k != "_codedistill_sample"}
        key = request_key({"model_id": "openai:deepseek-chat", "kind": rec["request"]["kind"], "body": body})
        db.execute("INSERT INTO responses VALUES (?, ?, 0)", (key, json.dumps(rec["value"])))
    db.commit()
    db.close()
    posts = standin.posts
    r = _run(_baseline_cmd(standin.base_url, tmp_path / "b", problems=3, n=2))
    assert r.returncode == 0, r.stderr[-3000:]
    assert standin.posts == posts
    assert [x["completion"] for x in _rows(tmp_path / "b")] == [x["completion"] for x in _rows(tmp_path / "a")]
    assert len(ResponseCache(own_cache)) == 6


def test_bad_endpoints_are_clear_errors(standin, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(ConfigError, match="cannot reach .* --base-url"):
        OpenAIGenerator("deepseek-chat", dead).check()
    with pytest.raises(ConfigError, match="does not serve a model named 'gpt-x'; it serves: deepseek-chat"):
        OpenAIGenerator("gpt-x", standin.base_url).check()
    monkeypatch.delenv("DEEPSEEK_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="set the environment variable DEEPSEEK_API_KEY"):
        OpenAIGenerator("deepseek-chat", "https://api.deepseek.com", OpenAISettings(api_key_env="DEEPSEEK_API_KEY"))
    standin.api_key = "sk-test"
    try:
        monkeypatch.delenv("CD_TEST_KEY", raising=False)
        with pytest.raises(ConfigError, match="needs an API key: set the environment variable CD_TEST_KEY"):
            OpenAIGenerator("deepseek-chat", standin.base_url, OpenAISettings(api_key_env="CD_TEST_KEY")).check()
        monkeypatch.setenv("CD_TEST_KEY", "sk-test")
        OpenAIGenerator("deepseek-chat", standin.base_url, OpenAISettings(api_key_env="CD_TEST_KEY")).check()
    finally:
        standin.api_key = None


def test_a_server_without_logprobs_is_refused_for_btp_and_allowed_for_pass_at_k(standin):
    standin.logprobs = False
    try:
        btp = OpenAIGenerator("deepseek-chat", standin.base_url, OpenAISettings(require_logprobs=True))
        prompts, stop = _synth_prompts(1, "base", btp)
        with pytest.raises(ConfigError, match="returns no log-probs, and BTP needs them"):
            btp.sample(prompts, n=1, max_new_tokens=16, stop=stop, seed=1)
        plain = OpenAIGenerator("deepseek-chat", standin.base_url)
        c = plain.sample(prompts, n=1, max_new_tokens=16, stop=stop, seed=1)[0][0]
        assert c.text and math.isnan(c.logprob)
        assert any("no log-probs" in n for n in plain.usage()["notes"])
    finally:
        standin.logprobs = True


def test_load_balancing_over_replicas(standin):
    """Two --base-url replicas (here the same server twice): requests spread over both."""
    gen = OpenAIGenerator(
        "deepseek-chat",
        [standin.base_url, standin.base_url.replace("127.0.0.1", "localhost")],
        OpenAISettings(concurrency=2, server=ServerFeatures(max_n=1)),
    )
    prompts, stop = _synth_prompts(2, "base", gen)
    seen: list[str] = []
    orig = gen._replica

    from contextlib import contextmanager

    @contextmanager
    def spy():
        with orig() as rep:
            seen.append(rep.base_url)
            yield rep

    gen._replica = spy
    gen.sample(prompts, n=2, max_new_tokens=16, stop=stop, seed=3)
    assert len(seen) == 4 and len(set(seen)) == 2


def test_step2_command_with_deepseek_v3_against_the_standin(standin, tmp_path):
    """The plan's step-2 command with --source-model DeepSeek-V3-0324 (served by the stand-in)
    and --target-model tiny-target runs end to end on CPU; the beam phase's fallback to
    samples is said in config.json and report.md; the same command again sends nothing."""
    standin.faults = {standin.posts + 2: "429", standin.posts + 4: "drop"}
    out = tmp_path / "btp"
    cmd = [
        sys.executable,
        "experiments/step2_btp_finetune_experiment.py",
        "--source-model",
        "DeepSeek-V3-0324",
        "--target-model",
        "tiny-target",
        "--mode",
        "finetune",
        "--dataset",
        "synth",
        "--max-problems",
        "4",
        "--eval-max-problems",
        "4",
        "--num-beams",
        "2",
        "--n-iterations",
        "1",
        "--sampling-method",
        "power",
        "--sampling-alpha",
        "1.5",
        "--use-lora",
        "--epochs",
        "1",
        "--eval-num-samples",
        "2",
        "--max-new-tokens",
        "48",
        "--workers",
        "1",
        "--base-url",
        standin.base_url,
        "--output-dir",
        str(out),
    ]
    r = _run(cmd)
    assert r.returncode == 0, r.stderr[-4000:]
    for f in (
        "config.json",
        "comparison.json",
        "report.md",
        "replay_buffer.jsonl",
        "generation.json",
        "iter_1/adapter/adapter_config.json",
        "iter_1/stats.json",
    ):
        assert (out / f).exists(), f
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert "without beam search" in cfg["beam_search_fallback"]
    assert cfg["generation_backends"]["source"]["backend"] == "openai"
    assert "Beam search fallback" in (out / "report.md").read_text()
    gen = json.loads((out / "generation.json").read_text())["totals"]["DeepSeek-V3-0324"]
    assert gen["requests_sent"] == 4 * 2 + 4 * 2 and gen["retries_total"] == 2  # source eval + beams, n=1 each
    comp = json.loads((out / "comparison.json").read_text())
    assert comp["source_model"] == "DeepSeek-V3-0324" and "synth" in comp["datasets"]
    posts = standin.posts
    r = _run(cmd)
    assert r.returncode == 0, r.stderr[-4000:]
    assert standin.posts == posts
