"""EG-CFG through a served model (vLLM, SGLang, DeepSeek's API) that returns top-k log-probs.

No logits leave the server, so each guided token costs two one-token requests
(``Generator.next_token_topk``): one on the prompt with the execution signal (conditional), one
without it (unconditional); :func:`~codedistill.egcfg.topk.topk_cfg` applies CFG over the union of
the two top-k sets (the approximation and how often it picks another token than exact CFG:
:mod:`.topk`). Everything else is EG-CFG as in :mod:`.decoder`/:mod:`.agents`: candidates are
sampled from the server (``gen.sample``, ``s`` of them, ``d`` lines deep), made executable and
traced on the visible tests in the sandbox, the signal is built with the configured trace
template and placed with ``build(signal, prompt variant)``; guidance starts at the ``def``
line; agents run in grid order and the problem stops at the first agent passing the visible
tests. Text, not token ids, carries the completion from request to request (the server
re-tokenises prompt + completion, as upstream does with its endpoint).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from codedistill.data.problem import Problem
from codedistill.egcfg.config import AgentSpec, EGCFGConfig
from codedistill.egcfg.decoder import agreement_step
from codedistill.egcfg.executor import TraceExecutor
from codedistill.egcfg.signal import build_signal, make_executable_ex
from codedistill.egcfg.topk import Missing, guided_token
from codedistill.errors import ConfigError
from codedistill.generation.base import Generator, TopKGenerator
from codedistill.generation.postprocess import cut_at_stop


class ServedEGCFG:
    """``solve(problem, build, stop, seed) -> (completion, record)`` on a served generator."""

    def __init__(
        self,
        gen: Generator,
        config: EGCFGConfig | None = None,
        pool: Any = None,
        k: int = 20,
        missing: Missing = "kth",
        to_program: Callable[[Problem, str], str] | None = None,
        count_tokens: Callable[[str], int] | None = None,
    ):
        if not isinstance(gen, TopKGenerator):
            raise ConfigError(
                f"{getattr(gen, 'name', gen)} does not return top-k log-probs (next_token_topk); "
                "EG-CFG on a served model needs an OpenAI-compatible server with logprobs"
            )
        self.gen, self.cfg, self.k, self.missing = gen, config or EGCFGConfig(), k, missing
        self.executor = TraceExecutor(pool, workers=self.cfg.exec_workers, timeout=self.cfg.exec_timeout_s)
        self.to_program = to_program or (lambda p, text: p.program(text))
        tok: Any = gen.tokenizer
        self.eos_texts = {
            t
            for t in (getattr(tok, "eos_token", None), "<|endoftext|>", "</s>", "<|EOT|>", "<｜end▁of▁sentence｜>")
            if t
        }
        self.count_tokens = count_tokens or (
            (lambda s: len(tok.encode(s, add_special_tokens=False)))
            if hasattr(tok, "encode")
            else (lambda s: len(s) // 4)
        )

    def close(self) -> None:
        self.executor.close()

    def _signal(self, problem: Problem, prefix: str, cands: list[str]) -> tuple[str, list[str]]:
        first_new = len(self.to_program(problem, prefix).split("\n"))
        programs, dropped = [], []
        for c in cands:
            prog, drop = make_executable_ex(self.to_program(problem, prefix + c))
            if prog and prog not in programs:
                programs.append(prog)
                dropped.append(drop)
        tests = list(problem.visible_tests)[: self.cfg.max_traced_tests]
        traces = self.executor.trace_many(
            [
                {
                    "program": p,
                    "tests": tests,
                    "test_setup": problem.test_setup,
                    "max_events": self.cfg.trace_max_events,
                    "max_chars": self.cfg.trace_max_chars,
                    "max_repr": self.cfg.trace_max_repr,
                    "timeout_s": self.cfg.trace_timeout_s,
                    "types": self.cfg.trace_template == "paper",
                }
                for p in programs
            ]
        )
        template, header = self.cfg.frame()
        sig = build_signal(
            [(p, t, first_new, d) for p, t, d in zip(programs, traces, dropped)],
            self.count_tokens,
            self.cfg.budget_for(None, 0),
            template=template,
            header=header,
            max_tests=self.cfg.max_traced_tests,
            formatter=self.cfg.trace_template,
        )
        return sig, programs

    def decode_agent(
        self, problem: Problem, build: Callable[[str, str], str], stop: Sequence[str], agent: AgentSpec, seed: int
    ) -> dict[str, Any]:
        import re

        t0 = time.time()
        stop = [s for s in stop if s]
        text, lines, requests, agreed, agree_n = "", [], 0, None, 0
        steps: list[dict[str, Any]] = []  # every token: what it was chosen from (for the exact-CFG check)
        guided = agent.gamma != 0 and bool(problem.visible_tests)
        name = re.escape(problem.entry_point) if problem.entry_point else r"\w+"
        finish = "length"
        for line_no in range(self.cfg.max_lines):
            sig = ""
            entry: dict[str, Any] = {"line": line_no}
            started = (
                not self.cfg.guide_from_def
                or re.search(rf"^\s*def\s+{name}\s*\(", problem.code_prefix + text, re.M) is not None
            )
            if guided and started:
                cands = [
                    c.text
                    for c in self.gen.sample(
                        [build("", agent.prompt) + text],
                        n=agent.num_candidates,
                        temperature=agent.temperature,
                        top_p=self.cfg.top_p,
                        max_new_tokens=self.cfg.candidate_max_tokens,
                        stop=stop,
                        seed=seed + line_no,
                    )[0]
                ]
                requests += 1
                cands = [
                    "\n".join(c.split("\n")[: agent.depth]) + ("\n" if c.count("\n") >= agent.depth else "")
                    for c in cands
                ]
                sig, programs = self._signal(problem, text, cands)
                agreed, agree_n = agreement_step(agreed, agree_n, programs)
                entry.update(candidates=cands, signal_tokens=self.count_tokens(sig), agreement=agree_n)
                if self.cfg.agreement_stop and agree_n >= self.cfg.agreement_stop:
                    for c in cands:
                        prog, drop = make_executable_ex(self.to_program(problem, text + c))
                        if not drop and prog.strip() == agreed:
                            text += c
                            entry.update(text=c, agreement_stop=True)
                            lines.append(entry)
                            finish = "stop"
                            break
                    if finish == "stop":
                        break
            new = ""
            for _ in range(self.cfg.max_line_tokens):
                u_prompt = build("", agent.prompt) + text
                if sig:
                    lu, lc = self.gen.next_token_topk([u_prompt, build(sig, agent.prompt) + text], self.k)
                    requests += 2
                else:
                    lu, lc = self.gen.next_token_topk([u_prompt], self.k)[0], None
                    requests += 1
                if not lu:
                    finish = "stop"
                    break
                t = guided_token(lc, lu, agent.gamma, self.missing) if lc else max(lu, key=lambda tok: lu[tok])
                if t == "" or t in self.eos_texts:  # end of sequence
                    finish = "stop"
                    break
                new += t
                text += t
                steps.append(
                    {
                        "prefix": text[: len(text) - len(t)],
                        "signal": sig,
                        "token": t,
                        "gamma": agent.gamma,
                        "variant": agent.prompt,
                    }
                )
                if "\n" in t or cut_at_stop(text, stop)[1]:
                    break
            entry["text"] = new
            lines.append(entry)
            if not new or cut_at_stop(text, stop)[1]:
                finish = "stop"
                break
        completion, _ = cut_at_stop(text, stop)
        return {
            "agent": agent.name(),
            "spec": agent.model_dump(),
            "completion": completion,
            "finish_reason": finish,
            "requests": requests,
            "lines": lines,
            "steps": steps,
            "wall_time_s": time.time() - t0,
        }

    def solve(
        self, problem: Problem, build: Callable[[str, str], str], stop: Sequence[str] = (), seed: int = 0
    ) -> tuple[str, dict[str, Any]]:
        t0, runs0 = time.time(), self.executor.executions
        agents = self.cfg.agents()
        if not problem.visible_tests and self.cfg.line_temperature == 0:
            agents = agents[:1]
        results, winner = [], None
        for i, a in enumerate(agents):
            r = self.decode_agent(problem, build, stop, a, seed + 7919 * i)
            r["visible"] = (
                self.executor.check_many(
                    [self.to_program(problem, r["completion"])], list(problem.visible_tests), problem.test_setup
                )[0]
                if problem.visible_tests
                else None
            )
            results.append(r)
            if self.cfg.early_stop and r["visible"] and r["visible"]["passed"]:
                winner = i
                break
        if winner is None:
            winner = max(range(len(results)), key=lambda j: ((results[j]["visible"] or {}).get("pass_rate", 0.0), -j))
        rec = {
            "task_id": problem.task_id,
            "winner_index": winner,
            "completion": results[winner]["completion"],
            "visible_passed": bool((results[winner]["visible"] or {}).get("passed")),
            "requests": sum(r["requests"] for r in results),
            "sandbox_executions": self.executor.executions - runs0,
            "wall_time_s": time.time() - t0,
            "agents_run": len(results),
            "agents_total": len(agents),
            "agents": results,
        }
        return results[winner]["completion"], rec


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """EG-CFG on a served model end to end, and its guided tokens against exact CFG on the same
    model's full logits (HF, in process), teacher-forced on the served text:

        python -m codedistill.egcfg.served --backend vllm --model tiny-target --max-problems 5
    """
    import argparse
    import json

    import torch

    from codedistill.data import load_problems
    from codedistill.egcfg.cfg import guided_logprobs
    from codedistill.egcfg.measure import load_model
    from codedistill.egcfg.signal import prompt_builder
    from codedistill.generation import make_generator
    from codedistill.generation.hf import decode_continuation
    from codedistill.models.registry import resolve_model
    from codedistill.prompts import PromptStyle, stops_for, to_program

    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="vllm")
    ap.add_argument("--model", default="tiny-target")
    ap.add_argument("--dataset", default="synth")
    ap.add_argument("--max-problems", type=int, default=5)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument(
        "--egcfg",
        default='{"prompts": {"default": ""}, "gammas": [1.0, 3.0], "depths": [2], '
        '"temperatures": [0.7], "max_lines": 8, "candidate_max_tokens": 48, '
        '"early_stop": false}',
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    style = PromptStyle("base")
    gen = make_generator(resolve_model(args.model), args.backend, {}, require_logprobs=True)
    model, tok = load_model(args.model)
    cfg = EGCFGConfig(**json.loads(args.egcfg))
    problems = load_problems(args.dataset, "test", max_problems=args.max_problems)
    eg = ServedEGCFG(
        gen,
        cfg,
        k=args.k,
        to_program=lambda p, x: to_program(p, style, x)[1],
        count_tokens=lambda x: len(tok.encode(x, add_special_tokens=False)),
    )
    same = total = 0
    by_gamma: dict[str, list[int]] = {}
    recs = []
    try:
        for p in problems:
            build = prompt_builder(p, style)
            completion, rec = eg.solve(p, build, list(stops_for(p, style)))
            for a in rec["agents"]:
                for st in a["steps"]:
                    if not st["signal"]:
                        continue
                    u = tok.encode(build("", st["variant"]) + st["prefix"])
                    c = tok.encode(build(st["signal"], st["variant"]) + st["prefix"])
                    with torch.no_grad():
                        lu = model(torch.tensor([u])).logits[0, -1]
                        lc = model(torch.tensor([c])).logits[0, -1]
                    exact = decode_continuation(tok, [int(guided_logprobs(lc, lu, st["gamma"])[0].argmax())], u)
                    total += 1
                    same += exact == st["token"]
                    g = by_gamma.setdefault(str(st["gamma"]), [0, 0])
                    g[0] += exact == st["token"]
                    g[1] += 1
                a.pop("steps", None)
            recs.append(
                {
                    "task_id": p.task_id,
                    "completion": completion,
                    "visible_passed": rec["visible_passed"],
                    "requests": rec["requests"],
                }
            )
            print(json.dumps(recs[-1]), flush=True)
    finally:
        eg.close()
        if hasattr(gen, "close"):
            gen.close()
    res = {
        "backend": args.backend,
        "model": args.model,
        "k": args.k,
        "problems": len(problems),
        "guided_tokens": total,
        "same_as_exact_cfg": (same / total) if total else None,
        "same_by_gamma": {g: {"tokens": n, "same": k / n} for g, (k, n) in by_gamma.items()},
        "requests": sum(r["requests"] for r in recs),
        "runs": recs,
    }
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=2))
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
