"""tiny-source / tiny-target: build, load through Auto* like a hub model, cache, determinism.

Fast tests build *reduced* specs (a few steps); the full builds and their pass@1 are
``slow`` tests (minutes on CPU; they reuse the default cache once built).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from codedistill.data.synth import load_synth  # noqa: E402
from codedistill.models import tiny  # noqa: E402
from codedistill.models.tiny import (  # noqa: E402
    TINY_MODELS,
    build_tiny_model,
    ensure_tiny_model,
    resolve_model_path,
    spec_hash,
    tiny_spec,
)


def _reduced(name: str, **kw):  # a few seconds to build
    base = dict(steps=3, n_train=64, tokenizer_problems=300, batch_size=8, warmup=1)
    if name == "tiny-source":
        base.update(hidden_size=32, num_layers=1, intermediate_size=64, num_heads=2, num_kv_heads=2)
    else:
        base.update(hidden_size=32, num_layers=1, intermediate_size=64, num_heads=2, num_kv_heads=1)
    base.update(kw)
    return tiny_spec(name, **base)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {n: build_tiny_model(_reduced(n), root / n, seed=0, progress=False) for n in TINY_MODELS}


def test_registry() -> None:
    assert set(TINY_MODELS) == {"tiny-source", "tiny-target"}
    src, tgt = TINY_MODELS["tiny-source"], TINY_MODELS["tiny-target"]
    assert src.arch != tgt.arch  # cross-family pair
    assert src.vocab_size != tgt.vocab_size
    assert spec_hash(src) != spec_hash(tgt)
    assert spec_hash(src, seed=0) != spec_hash(src, seed=1)
    assert resolve_model_path("gpt2") == "gpt2"
    with pytest.raises(ValueError):
        tiny_spec("tiny-nope")


def test_loads_with_auto_classes(built: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name, path in built.items():
        meta = json.loads((path / "codedistill_tiny.json").read_text())
        assert meta["name"] == name and meta["seed"] == 0 and meta["train"]["steps"] == 3
        assert meta["wall_seconds"] > 0 and meta["n_params"] > 0
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.model_type == TINY_MODELS[name].arch
        assert tok.eos_token and tok.pad_token and tok.bos_token
        assert tok.pad_token_id != tok.eos_token_id
        prompt = load_synth("test", n=1)[0].prompt
        enc = tok(prompt, return_tensors="pt")
        assert tok.decode(enc["input_ids"][0], skip_special_tokens=True) == prompt  # byte-level round trip
        out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out.shape[1] <= enc["input_ids"].shape[1] + 5


def test_long_prompt_does_not_crash(built: dict[str, Path]) -> None:
    """MBPP prompts with few-shot examples are far longer than synth's; RoPE up to 2048."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = built["tiny-target"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    text = "Write a function to find the shared elements from the given two lists. é ✓ \t" * 40
    enc = tok(text, return_tensors="pt")
    assert 600 < enc["input_ids"].shape[1] < 2000
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1]


def test_auto_tokenizer_encodes_like_the_trained_one(built: dict[str, Path], tmp_path: Path) -> None:
    """The build checks it; here on a known-bad family too, so the check can fail."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    text = "def f(x):\n    return [y for y in x]\n[DONE]"
    for path in built.values():
        raw = Tokenizer.from_file(str(path / "tokenizer.json"))
        assert AutoTokenizer.from_pretrained(path)(text, add_special_tokens=False)["input_ids"] == raw.encode(text).ids
    with pytest.raises(RuntimeError, match="tokenizes differently"):
        build_tiny_model(_reduced("tiny-target", arch="qwen2"), tmp_path / "q", progress=False)


def test_tokenizers_differ(built: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(built["tiny-source"])
    b = AutoTokenizer.from_pretrained(built["tiny-target"])
    assert len(a) != len(b)
    prompt = load_synth("test", n=1)[0].prompt
    assert a(prompt)["input_ids"] != b(prompt)["input_ids"]


def test_build_deterministic(built: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    again = build_tiny_model(_reduced("tiny-source"), tmp_path / "again", seed=0, progress=False)
    w1 = load_file(built["tiny-source"] / "model.safetensors")
    w2 = load_file(again / "model.safetensors")
    assert w1.keys() == w2.keys()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert (built["tiny-source"] / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()
    other = build_tiny_model(_reduced("tiny-source"), tmp_path / "other", seed=1, progress=False)
    w3 = load_file(other / "model.safetensors")
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)


def test_ensure_builds_once_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _reduced("tiny-target", steps=2)
    calls: list[Path] = []
    real = tiny.build_tiny_model

    def counting(*a, **k):
        calls.append(Path(a[1]))
        return real(*a, **k)

    monkeypatch.setattr(tiny, "build_tiny_model", counting)
    p1 = ensure_tiny_model(spec, cache_dir=tmp_path, progress=False)
    p2 = ensure_tiny_model(spec, cache_dir=tmp_path, progress=False)
    assert p1 == p2 and len(calls) == 1
    assert p1.name == f"tiny-target-{spec_hash(spec)}" and p1.parent == tmp_path
    assert calls[0] != p1  # built elsewhere, then renamed into place
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".")]  # no temp leftovers
    # default cache dir honours $CODEDISTILL_CACHE
    monkeypatch.setenv("CODEDISTILL_CACHE", str(tmp_path / "cc"))
    assert tiny.default_cache_dir() == tmp_path / "cc" / "tiny"


# ----------------------------------------------------------------------------- slow: full builds

def _greedy_pass_rate(path: Path, n: int) -> float:
    """Greedy pass@1 on the first n synth test problems, through the project's own
    generator and sandbox (the same path as `codedistill baseline`)."""
    from codedistill.baseline import evaluate_generator, make_sampler
    from codedistill.config import SamplingConfig
    from codedistill.generation.hf import HFGenerator
    from codedistill.prompts import PromptStyle

    gen = HFGenerator.from_pretrained(path, device="cpu", dtype="float32", batch_size=n)
    style = PromptStyle("base")
    sampling = SamplingConfig(num_samples=1, temperature=0.0, max_new_tokens=96)
    _, metrics = evaluate_generator(make_sampler(gen, style, sampling, gen.tokenizer),
                                    load_synth("test", n=n), style, path.name, 1, chunk_size=n)
    return metrics["pass@1"]["value"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-source", "tiny-target"])
def test_full_build_pass_rate(name: str) -> None:
    """The registered models (built into the default cache on first use)."""
    path = ensure_tiny_model(name, progress=False)
    rate = _greedy_pass_rate(path, 50)
    if name == "tiny-source":
        assert rate >= 0.7, rate  # measured 0.85 greedy on all 200
    else:
        assert 0.2 <= rate <= 0.6, rate  # measured 0.44 greedy on these 50 (0.47 on the first 100)


@pytest.mark.slow
def test_full_build_with_auto_and_no_env(tmp_path: Path) -> None:
    path = ensure_tiny_model("tiny-target", progress=False)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    code = (
        "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer;"
        "AutoTokenizer.from_pretrained(sys.argv[1]); AutoModelForCausalLM.from_pretrained(sys.argv[1]); print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert res.stdout.strip() == "ok", res.stderr[-2000:]
