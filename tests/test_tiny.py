"""tiny-source / tiny-target: shipped with the package and loaded through Auto* like a hub
model; build, cache, determinism; a rebuild compared with the shipped files.

Fast tests build *reduced* specs (a few steps); the pass@1 of the shipped models is a
``slow`` test.
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
    SHIPPED_DIR,
    TINY_BUILD_VERSION,
    TINY_MODELS,
    build_tiny_model,
    compare_tiny_models,
    describe_comparison,
    ensure_tiny_model,
    rebuild_and_compare,
    resolve_model_path,
    ship_tiny_model,
    shipped_tiny_model,
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


# ----------------------------------------------------------------------------- shipped models


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_shipped_model_is_the_current_spec(name: str) -> None:
    """A spec changed without re-shipping fails here: rebuild and ship with
    `codedistill make-tiny-model NAME --ship`."""
    path = SHIPPED_DIR / name
    meta = json.loads((path / "codedistill_tiny.json").read_text())
    spec = TINY_MODELS[name]
    assert meta["spec"] == spec.to_dict(), "spec changed since the shipped build: re-ship it"
    assert meta["spec_hash"] == spec_hash(spec) and meta["seed"] == 0
    assert meta["build_version"] == TINY_BUILD_VERSION
    assert shipped_tiny_model(name) == path
    size = sum(f.stat().st_size for f in path.iterdir())
    assert 1e6 < size < 10e6, size  # a few MB in git


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_shipped_model_loads_like_a_hub_model(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codedistill.models.registry import local_path, resolve_model

    monkeypatch.setenv("CODEDISTILL_CACHE", str(tmp_path / "cache"))  # nothing may be built or written
    before = {f: f.stat().st_mtime_ns for f in (SHIPPED_DIR / name).iterdir()}
    path = Path(resolve_model_path(name))
    assert path == SHIPPED_DIR / name and local_path(resolve_model(name)) == str(path)
    assert ensure_tiny_model(name) == path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    spec = TINY_MODELS[name]
    assert model.config.model_type == spec.arch and len(tok) == model.config.vocab_size
    prompt = load_synth("test", n=1)[0].prompt
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1]
    assert not (tmp_path / "cache").exists()
    assert {f: f.stat().st_mtime_ns for f in (SHIPPED_DIR / name).iterdir()} == before


def test_changed_spec_is_not_served_the_shipped_files() -> None:
    assert shipped_tiny_model(tiny_spec("tiny-source", steps=1199)) is None
    assert shipped_tiny_model("tiny-source", seed=1) is None


def test_rebuild_compares_tensor_by_tensor(built: dict[str, Path], tmp_path: Path) -> None:
    """A rebuild of the same spec here is identical; another seed or a perturbed tensor is
    reported as a difference (with its size and where), not as an error."""
    spec = _reduced("tiny-target")
    ref = built["tiny-target"]
    again, cmp = rebuild_and_compare(spec, out=tmp_path / "again", progress=False, reference=ref)
    assert again == tmp_path / "again" and cmp is not None
    assert cmp["identical"] and cmp["differing"] == 0 and cmp["max_abs_diff"] == 0.0
    assert "identical to the shipped model" in describe_comparison("tiny-target", cmp)

    _, other = rebuild_and_compare(spec, out=tmp_path / "seed1", seed=1, progress=False, reference=ref)
    assert other is not None and not other["identical"] and other["max_abs_diff"] > 0
    assert other["differing"] >= 1 and other["tokenizer_identical"]  # the tokenizer does not depend on the seed
    text = describe_comparison("tiny-target", other)
    assert "differs from the shipped model" in text and "Not an error" in text

    from safetensors.torch import load_file, save_file

    w = load_file(str(ref / "model.safetensors"))
    name = sorted(w)[0]
    w[name] = w[name] + 1e-3
    pert = tmp_path / "perturbed"
    pert.mkdir()
    for f in ref.iterdir():
        if f.name != "model.safetensors":
            (pert / f.name).write_bytes(f.read_bytes())
    save_file(w, str(pert / "model.safetensors"), metadata={"format": "pt"})
    c = compare_tiny_models(pert, ref)
    assert c["differing"] == 1 and c["worst_tensor"] == name and c["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert c["tensors"] == len(w) and c["config_identical"] and not c["identical"]


def test_ship_copies_a_build(built: dict[str, Path], tmp_path: Path) -> None:
    dest = ship_tiny_model(built["tiny-source"], tmp_path / "assets")
    assert dest == tmp_path / "assets" / "tiny-source"
    assert compare_tiny_models(dest, built["tiny-source"])["identical"]
    assert (dest / "codedistill_tiny.json").read_text() == (built["tiny-source"] / "codedistill_tiny.json").read_text()


# ----------------------------------------------------------------------------- slow: the shipped models' quality


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
    _, metrics = evaluate_generator(
        make_sampler(gen, style, sampling, gen.tokenizer), load_synth("test", n=n), style, path.name, 1, chunk_size=n
    )
    return metrics["pass@1"]["value"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-source", "tiny-target"])
def test_full_build_pass_rate(name: str) -> None:
    """The registered models (the shipped builds)."""
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
