"""HF backend on the CPU: threads per generate call, the stop-string criterion built once, the
slimmed tokenizer and the lean float32 -> bfloat16 cast (same model as from_pretrained's)."""

import pytest
import torch

from codedistill.generation import hf
from codedistill.generation.hf import HFGenerator, auto_threads
from codedistill.models.loading import cast_parameters_lean, load_causal_lm, slim_tokenizer

PROMPTS = ["def add(a, b):\n", "[BEGIN]\n", "for i in range(10):\n"]


def texts(out):
    return [[c.text for c in cs] for cs in out]


def test_thread_count_keeps_the_completions_and_is_restored(random_lm):
    model, tok, _ = random_lm
    before = torch.get_num_threads()
    runs = {}
    for threads in (None, 1, "auto"):
        gen = HFGenerator(model, tok, batch_size=4, threads=threads)
        out = gen.sample(PROMPTS, n=1, temperature=0.0, max_new_tokens=12, stop=["\n\n"])
        runs[threads] = (texts(out), [c.logprob for cs in out for c in cs])
        assert torch.get_num_threads() == before
        assert gen.threads_used == ([] if threads is None else [1] if threads == 1 else gen.threads_used)
        if threads == "auto":
            assert len(gen.threads_used) == 1 and 1 <= gen.threads_used[0] <= before
    # the same completions; a thread count may change a float's last bit (here: padded rows'
    # log-probs by an ulp or so, from the 5th decode step on)
    assert runs[None][0] == runs[1][0] == runs["auto"][0]
    assert runs[None][1] == pytest.approx(runs[1][1], abs=1e-5)
    assert runs[1][1] == pytest.approx(runs["auto"][1], abs=1e-5)
    with pytest.raises(ValueError, match="threads"):
        HFGenerator(model, tok, threads=0)


def test_auto_threads_leaves_the_cores_other_tasks_use(monkeypatch):
    cores = len(__import__("os").sched_getaffinity(0))
    monkeypatch.setattr(hf, "_running_tasks", lambda: (1, 1))  # only this process runs
    assert auto_threads(limit=cores) == cores
    assert auto_threads(limit=1) == 1
    monkeypatch.setattr(hf, "_running_tasks", lambda: (1 + 10 * cores, 1))  # a busy machine
    assert auto_threads(limit=cores) == 1
    monkeypatch.setattr(hf, "_running_tasks", lambda: None)  # no /proc: the limit
    assert auto_threads(limit=3) == 3


def test_running_tasks_reads_proc(tmp_path):
    (tmp_path / "self" / "task" / "10").mkdir(parents=True)
    (tmp_path / "self" / "task" / "11").mkdir(parents=True)
    (tmp_path / "loadavg").write_text("7.10 6.20 5.00 9/321 4242\n")
    (tmp_path / "self" / "task" / "10" / "stat").write_text("10 (py thon) R 1 2 3\n")
    (tmp_path / "self" / "task" / "11" / "stat").write_text("11 (py) S 1 2 3\n")
    assert hf._running_tasks(str(tmp_path)) == (9, 1)
    assert hf._running_tasks(str(tmp_path / "missing")) is None


def test_stop_criterion_is_built_once_per_stop_list(random_lm):
    model, tok, _ = random_lm
    gen = HFGenerator(model, tok, batch_size=4)
    a = gen._stop_criteria(["\n\n", "[DONE]"])
    assert gen._stop_criteria(("\n\n", "[DONE]")) is a
    assert gen._stop_criteria(["\n"]) is not a
    assert gen._stop_criteria([]) is None


def test_slim_tokenizer_drops_only_copies_nothing_else_reads():
    class Backend:
        def __init__(self):
            self._tokenizer = object()
            self._vocab = {"a": 0}
            self._merges = [("a", "b")]

        def encode(self, s):
            return [0]

    class Saver(Backend):
        def save_vocabulary(self):
            return self._vocab

    slim = slim_tokenizer(Backend())
    assert not hasattr(slim, "_vocab") and not hasattr(slim, "_merges")
    kept = slim_tokenizer(Saver())
    assert kept._vocab == {"a": 0} and kept._merges == [("a", "b")]


@pytest.mark.parametrize("tied", [False, True])
def test_lean_bf16_cast_is_from_pretrained_in_bf16(random_lm, tmp_path, tied):
    from transformers import AutoModelForCausalLM

    _, _, path = random_lm
    if tied:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        m.config.tie_word_embeddings = True
        m.tie_weights()
        m.save_pretrained(tmp_path)
        path = tmp_path
    lean = load_causal_lm(path, "cpu", "bfloat16")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert lean.dtype == torch.bfloat16 and lean.config.dtype == torch.bfloat16
    for (n1, a), (n2, b) in zip(lean.state_dict().items(), ref.state_dict().items()):
        assert n1 == n2 and a.dtype == b.dtype and torch.equal(a, b), n1
    for (n1, a), (n2, b) in zip(lean.named_buffers(), ref.named_buffers()):
        assert n1 == n2 and a.dtype == b.dtype and torch.equal(a, b), n1
    if tied:
        assert lean.get_output_embeddings().weight is lean.get_input_embeddings().weight
    ids = torch.tensor([[1, 5, 9, 11]])
    with torch.no_grad():
        assert torch.equal(lean(ids).logits, ref(ids).logits)


def test_lean_cast_of_an_in_memory_model(random_lm):
    from transformers import AutoModelForCausalLM

    _, _, path = random_lm
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    want = {n: p.detach().to(torch.float16) for n, p in m.named_parameters()}
    cast_parameters_lean(m, torch.float16)
    assert all(torch.equal(p, want[n]) for n, p in m.named_parameters())


def test_a_cpu_vllm_server_loads_float32_when_asked_for_auto(tmp_path):
    """dtype auto means codedistill's rule (float32 on CPU), not vLLM's (which downcasts a
    float32 checkpoint to bfloat16 on CPU); an explicit dtype, or a GPU, is passed through."""
    from codedistill.generation.vllm import VLLMServer

    def dtype_flag(**kw) -> str:
        cmd = VLLMServer("model", "m", log_path=tmp_path / "log", **kw).command("python")
        return cmd[cmd.index("--dtype") + 1]

    assert dtype_flag(dtype="auto", cpu=True) == "float32"
    assert dtype_flag(dtype="auto", cpu=False) == "auto"
    assert dtype_flag(dtype="bf16", cpu=True) == "bfloat16"


def test_cpu_reserved_cores_reaches_the_vllm_server(tmp_path, monkeypatch):
    from codedistill.generation import ServingConfig
    from codedistill.generation.vllm import VLLMServer

    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    assert ServingConfig.model_validate({"cpu_reserved_cores": 0}).cpu_reserved_cores == 0
    server = VLLMServer("model", "m", cpu=True, cpu_reserved_cores=0, log_path=tmp_path / "log")
    assert server.environment()["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0" and server.info()["cpu_reserved_cores"] == 0
    default = VLLMServer("model", "m", cpu=True, log_path=tmp_path / "l")
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in default.environment()


def test_a_prompt_longer_than_the_served_context_is_refused_before_any_request(tmp_path):
    """MBPP test task 493's 3-shot prompt is 4,333 Gemma tokens: with max_model_len 2048 vLLM
    answered HTTP 400 after half an hour of the run. Now the served generator checks every
    prompt + max_new_tokens against its server's context first: one error naming the problem
    and the fix, and no server started (the real tiny-target tokenizer; nothing is served)."""
    from codedistill.errors import ConfigError
    from codedistill.generation import check_context
    from codedistill.generation.vllm import VLLMGenerator
    from codedistill.models.registry import local_path, resolve_model

    gen = VLLMGenerator(
        local_path(resolve_model("tiny-target")),
        "tiny-target",
        cache_path=str(tmp_path / "responses"),
        server_kwargs={"max_model_len": 64, "log_path": tmp_path / "log"},
    )
    short, long = "def add(a, b):\n", "def f(x):\n" + "    x = x + 1\n" * 40
    n_short = len(gen.tokenizer(short)["input_ids"])
    check_context(gen, [short], 64 - n_short)  # exactly fits
    with pytest.raises(ConfigError, match=r"Mbpp/493's prompt .* max_model_len 64: raise it to at least \d+"):
        check_context(gen, [short, long], 16, ["Mbpp/11", "Mbpp/493"])
    with pytest.raises(ConfigError, match=f"need {n_short + 65} tokens"):
        gen.sample([short], n=1, temperature=0.0, max_new_tokens=65)
    with pytest.raises(ConfigError, match="prompt 1 of 1"):
        gen.beam_search([long], 2, 2, 8)
    assert gen.server.starts == 0 and gen.server.proc is None
    unlimited = VLLMGenerator(local_path(resolve_model("tiny-target")), "t", cache_path=str(tmp_path / "r2"))
    check_context(unlimited, [long], 10_000)  # no max_model_len set: the server's own limit applies
