"""Line-by-line EG-CFG decoding on a tiny random model, with real traces from the sandbox."""

from __future__ import annotations

import json

import pytest
import torch

from codedistill.data.problem import Problem
from codedistill.egcfg._tiny import random_tiny_model
from codedistill.egcfg.agents import EGCFGSolver, append_log
from codedistill.egcfg.config import AgentSpec, EGCFGConfig
from codedistill.egcfg.signal import insert_signal

PREFIX = "def total(xs):\n"
PROBLEM = Problem(
    task_id="toy/add",
    prompt=PREFIX,
    entry_point="total",
    code_prefix=PREFIX,
    tests=("assert total([1, 2]) == 3", "assert total([2, 5]) == 7"),
    visible_tests=("assert total([1, 2]) == 3",),
)
SMALL = dict(
    max_lines=3,
    max_line_tokens=10,
    max_new_tokens=30,
    candidate_max_tokens=12,
    trace_budget_tokens=800,
    exec_workers=2,
    exec_timeout_s=5.0,
)


@pytest.fixture(scope="module")
def tiny():
    return random_tiny_model()


@pytest.fixture(scope="module")
def solver(tiny):
    model, tok = tiny
    s = EGCFGSolver(model, tok, EGCFGConfig(**SMALL))
    yield s
    s.close()


def hf_greedy(model, ids, n):
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()


def test_empty_signal_equals_plain_greedy(tiny, solver):
    model, tok = tiny
    no_tests = Problem(task_id="toy/none", prompt=PREFIX, entry_point="total", code_prefix=PREFIX, tests=())
    prompt_ids = tok.encode(PREFIX)
    for problem, gamma in ((no_tests, 1.0), (PROBLEM, 0.0)):
        agent = AgentSpec(temperature=0.7, depth=2, num_candidates=3, gamma=gamma)
        res = solver.decoder.decode_agent(problem, PREFIX, [], agent, seed=0)
        assert len(res.lines) == 3 and len(res.token_ids) >= 6
        assert all("signal" not in line for line in res.lines)
        assert res.token_ids == hf_greedy(model, prompt_ids, len(res.token_ids))
        # the reported log-prob is the plain model's
        full = torch.tensor([prompt_ids + res.token_ids])
        lp = torch.log_softmax(model(full).logits[0, len(prompt_ids) - 1 : -1].float(), -1)
        ref = lp.gather(-1, torch.tensor(res.token_ids)[:, None]).sum().item()
        assert abs(ref - res.plain_logprob) < 1e-3


def test_gamma1_lines_equal_greedy_on_conditional_prompt(tiny, solver):
    model, tok = tiny
    agent = AgentSpec(temperature=0.7, depth=2, num_candidates=3, gamma=1.0)
    res = solver.decoder.decode_agent(PROBLEM, PREFIX, [], agent, seed=0)
    prompt_ids = tok.encode(PREFIX)
    ids: list[int] = []
    signals = 0
    for line in res.lines:
        assert line["signal"], "a trace of the executable prefix is always there"
        signals += 1
        # real traces: the candidates were run on the visible test in the sandbox
        assert "# Test: assert total([1, 2]) == 3" in line["signal"]
        cond = tok.encode(insert_signal(PREFIX, line["signal"], PREFIX, None)) + ids
        n = line["tokens"]
        assert res.token_ids[len(ids) : len(ids) + n] == hf_greedy(model, cond, n)
        ids = ids + res.token_ids[len(ids) : len(ids) + n]
    assert ids == res.token_ids and signals == 3
    # and the signal did change the output relative to plain greedy
    assert res.token_ids != hf_greedy(model, prompt_ids, len(res.token_ids))


def test_solve_counts_and_log(tmp_path, tiny, solver):
    # the paper's grid: 2 prompts (default, long code); gamma = 0 agents collapse to one per prompt
    assert len(EGCFGConfig().agents()) == 2 + 3 * 2 * 2 * 2
    assert len(EGCFGConfig(prompts={"default": ""}).agents()) == 13
    model, tok = tiny
    cfg = EGCFGConfig(**{**SMALL, "max_lines": 2, "max_agents": 3})
    small = EGCFGSolver(model, tok, cfg, pool=solver.executor.pool)  # shares the sandbox pool
    cand, rec = small.solve(PROBLEM, PREFIX, [], seed=3)
    # nothing a random model writes passes: every agent ran (no early stop)
    assert rec["agents_run"] == rec["agents_total"] == 3
    assert rec["visible_passed"] is False and cand.text == rec["completion"]
    c = rec["counters"]
    per_agent = [a["counters"] for a in rec["agents"]]
    assert c["forward_passes"] == sum(a["forward_passes"] for a in per_agent) > 0
    assert c["generated_tokens"] == sum(a["generated_tokens"] for a in per_agent)
    # gamma = 0 agents (one per prompt variant): no candidates, no traces, one check; others trace each line
    assert [a["spec"]["gamma"] for a in rec["agents"]] == [0.0, 0.0, 0.5]
    assert [a["spec"]["prompt"] for a in rec["agents"]] == ["default", "long_code", "default"]
    for a in per_agent[:2]:
        assert a["candidate_tokens"] == 0 and a["sandbox_executions"] == 1
    assert per_agent[2]["sandbox_executions"] >= 2
    assert cand.num_tokens <= 30 and cand.logprob < 0 and cand.meta["egcfg"] == c
    path = tmp_path / "egcfg_log.jsonl"
    append_log(path, rec)
    append_log(path, rec)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["task_id"] == "toy/add" and rows[0]["winner"] == rec["winner"]
    assert rows[0]["agents"][2]["lines"][0]["candidates"]


def test_early_stop_when_visible_tests_pass(tiny):
    """A 'model' that already wrote the body: prompt ends inside the function, any output
    that keeps it valid passes; the first agent (plain greedy) is checked and wins."""
    model, tok = tiny
    cfg = EGCFGConfig(**{**SMALL, "max_lines": 1, "max_line_tokens": 1})
    prob = Problem(
        task_id="toy/done",
        prompt=PREFIX,
        entry_point="total",
        code_prefix=PREFIX + "    return sum(xs)\n",
        tests=PROBLEM.tests,
        visible_tests=PROBLEM.visible_tests,
    )
    with_comment = lambda p, text: p.code_prefix + "# " + text.replace("\n", " ") + "\n"  # noqa: E731
    s = EGCFGSolver(model, tok, cfg, to_program=with_comment)
    try:
        cand, rec = s.solve(prob, PREFIX, [], seed=0)
    finally:
        s.close()
    assert rec["visible_passed"] is True and rec["winner_index"] == 0 and rec["agents_run"] == 1
    assert cand.meta["visible_passed"] is True


def test_without_visible_tests_one_plain_greedy_agent_runs(tiny, solver):
    model, tok = tiny
    no_tests = Problem(task_id="toy/none", prompt=PREFIX, entry_point="total", code_prefix=PREFIX, tests=())
    cand, rec = solver.solve(no_tests, PREFIX, [], seed=0)
    assert rec["agents_run"] == rec["agents_total"] == 1
    assert rec["counters"]["candidate_tokens"] == 0 and rec["counters"]["sandbox_executions"] == 0
    assert cand.text == tok.decode(hf_greedy(model, tok.encode(PREFIX), cand.num_tokens), skip_special_tokens=True)


def test_beam_candidates_and_parallel_agents(tiny, solver):
    model, tok = tiny
    cfg = EGCFGConfig(**{**SMALL, "max_lines": 2, "max_agents": 3, "candidate_mode": "beam", "agent_workers": 2})
    par = EGCFGSolver(model, tok, cfg, pool=solver.executor.pool)
    cand, rec = par.solve(PROBLEM, PREFIX, [], seed=1)
    assert rec["agents_run"] == 3 and not rec["visible_passed"]
    for a in rec["agents"][2:]:  # agents 0-1: gamma = 0 (default, long-code prompt)
        for line in a["lines"]:
            cands = line["candidates"]
            assert len(cands) == 3  # s beams
            assert all(c["text"].count("\n") <= 2 for c in cands)  # at most d lines deep
    # beam candidates are deterministic: the same agents' first-line candidates match a sequential run
    seq = EGCFGSolver(
        model,
        tok,
        EGCFGConfig(**{**SMALL, "max_lines": 2, "max_agents": 3, "candidate_mode": "beam"}),
        pool=solver.executor.pool,
    )
    _, rec2 = seq.solve(PROBLEM, PREFIX, [], seed=1)
    assert [a["completion"] for a in rec2["agents"]] == [a["completion"] for a in rec["agents"]]


def test_empty_completion_has_no_probability_mass():
    """An empty program earned no P: seq_prob 0 (not 1), so P2Value never prefers it to a real
    program with the same pass rate, and an EG-CFG candidate with no tokens carries P = 0."""
    import math

    from codedistill.btp.p2value import p2value
    from codedistill.btp.phases.replay import sequence_p
    from codedistill.generation.base import Candidate, seq_prob

    assert seq_prob(0.0, 0) == 0.0 and seq_prob(-3.0, 0) == 0.0
    assert math.isclose(seq_prob(-2.0, 4), math.exp(-0.5))
    empty, real = Candidate(text="", num_tokens=0, logprob=0.0), Candidate(text="x", num_tokens=4, logprob=-2.0)
    assert empty.seq_prob == 0.0 and empty.to_dict()["seq_prob"] == 0.0
    p_empty, p_real = (sequence_p(c.to_dict(), "normalized") for c in (empty, real))
    assert p_empty == 0.0 and p2value(p_empty, 0.0) < p2value(p_real, 0.0)


def test_agreement_counter():
    from codedistill.egcfg.decoder import agreement_step

    done = "def f(x):\n    return x\n"
    state = (None, 0)
    seen = []
    for programs in ([done, done], [done], [done, "def f(x):\n    pass\n"], [done], [done], [done], [done]):
        state = agreement_step(*state, programs)
        seen.append(state[1])
    assert seen == [1, 2, 0, 1, 2, 3, 4]  # one distinct program, ending in a return, N times in a row
    assert agreement_step(None, 0, ["def f(x):\n    y = x\n"]) == (None, 0)  # not finished: no return
    assert agreement_step(done.strip(), 3, ["def f(x):\n    return 2\n"]) == ("def f(x):\n    return 2", 1)


@pytest.mark.slow
def test_agreement_early_stop_fires(tiny):
    """Candidates that all stand for one finished program (here: the program ignores the
    text, as a model whose continuations agree would) stop the agent after N line boundaries
    in a row; the agreed candidate ends the completion."""
    model, tok = tiny
    done = PREFIX + "    return sum(xs)\n"
    prob = Problem(
        task_id="toy/agree",
        prompt=PREFIX,
        entry_point="total",
        code_prefix=done,
        tests=PROBLEM.tests,
        visible_tests=PROBLEM.visible_tests,
    )
    agent = AgentSpec(temperature=0.7, depth=2, num_candidates=3, gamma=1.0)
    outs = {}
    for n in (4, 0):
        cfg = EGCFGConfig(**{**SMALL, "max_lines": 8, "max_new_tokens": 80, "agreement_stop": n})
        s = EGCFGSolver(model, tok, cfg, to_program=lambda p, text: p.code_prefix)
        try:
            outs[n] = s.decoder.decode_agent(prob, PREFIX, [], agent, seed=0)
        finally:
            s.close()
    res = outs[4]
    assert [line["agreement"] for line in res.lines] == [1, 2, 3, 4]
    assert res.lines[-1]["agreement_stop"] is True and res.finish_reason == "stop"
    # the agreed candidate's tokens end the completion, with their plain log-probs
    assert res.completion.endswith(res.lines[-1]["text"]) and len(res.token_ids) >= res.num_tokens > 0
    assert res.plain_logprob < 0
    off = outs[0]  # agreement_stop = 0: the agent decodes on
    assert len(off.lines) > 4 and not any(line.get("agreement_stop") for line in off.lines)


@pytest.mark.slow
def test_guidance_starts_at_the_def_line(tiny):
    """With guide_from_def, lines before the entry point's def get no candidates/signal."""
    model, tok = tiny
    prob = Problem(
        task_id="toy/nodef",
        prompt="# write total\n",
        entry_point="total",
        code_prefix="",
        tests=PROBLEM.tests,
        visible_tests=PROBLEM.visible_tests,
    )
    agent = AgentSpec(temperature=0.7, depth=2, num_candidates=2, gamma=1.0)
    s = EGCFGSolver(model, tok, EGCFGConfig(**{**SMALL, "max_lines": 2}))
    try:
        res = s.decoder.decode_agent(prob, prob.prompt, [], agent, seed=0)
        assert "def total(" not in res.completion
        assert all("candidates" not in line for line in res.lines) and res.counters.sandbox_executions == 0
        assert s.decoder.guided_from_here(prob, "import os\ndef total(xs):\n")
        assert not s.decoder.guided_from_here(prob, "def helper(x):\n")
        s.decoder.cfg.guide_from_def = False
        res2 = s.decoder.decode_agent(prob, prob.prompt, [], agent, seed=0)
        assert all("candidates" in line for line in res2.lines)
    finally:
        s.close()


@pytest.mark.slow
def test_egcfg_as_btp_sampler_returns_every_agents_program(tiny):
    """BTP's --generation egcfg: one candidate per agent that ran, with its plain log-prob as P."""
    from codedistill.btp.config import BTPConfig
    from codedistill.egcfg.runner import egcfg_agent_candidates
    from codedistill.execution import Limits, SandboxPool
    from codedistill.prompts import PromptStyle

    model, tok = tiny

    class Gen:  # what the HF generator exposes to EG-CFG
        def __init__(self):
            self.model, self.tokenizer, self.add_special_tokens = model, tok, True

    assert BTPConfig.model_fields["generation"].annotation.__args__ == ("beam", "sample", "egcfg")
    settings = {**SMALL, "max_lines": 2, "max_agents": 3}
    with SandboxPool(workers=2, limits=Limits(timeout=5.0), warm_targets=["codedistill.egcfg.tracer:trace"]) as pool:
        out = egcfg_agent_candidates(Gen(), PromptStyle("base"), [PROBLEM], [], settings, pool, seed=1)
    (cands,) = out
    assert len(cands) == 3  # a random model passes nothing: all three agents ran, each one program
    assert [c.meta["agent"] for c in cands][:2] == ["t0.7_d2_s3_g0.0_default", "t0.7_d2_s3_g0.0_long_code"]
    for c in cands:
        assert c.num_tokens > 0 and c.logprob < 0 and 0 < c.seq_prob < 1
