"""EG-CFG's public entry point: parallel agents over the hyperparameter grid, early stop.

:class:`EGCFGSolver` runs the distinct agents of :meth:`EGCFGConfig.agents` on a problem;
each agent decodes a whole program line by line (:class:`~.decoder.LineDecoder`) and the
program is checked on the visible tests (the tests the prompt shows) in the sandbox. The
problem stops as soon as one agent's program passes them all (``early_stop``); if none
does, the answer is the program with the highest visible pass rate (first agent on ties).
The final answer is judged on the full tests by the caller.

With ``agent_workers > 1`` agents run in threads and a passing agent cancels the others at
their next line boundary (the winner is then the first passing agent to finish, so the
result may depend on timing); with 1 (default) they run in grid order, deterministically.

The returned :class:`~codedistill.generation.base.Candidate`: ``text`` is the completion
(cut at the stop strings); ``logprob``/``num_tokens`` are under the PLAIN model (the prompt
without any signal, temperature 1) over the kept tokens: this is what the unconditional
stream computed anyway, so it is exact and free. The guided log-prob is in
``meta["guided_logprob"]``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from codedistill.data.problem import Problem
from codedistill.egcfg.config import EGCFGConfig
from codedistill.egcfg.decoder import AgentResult, Counters, LineDecoder
from codedistill.egcfg.executor import TraceExecutor
from codedistill.generation.base import Candidate


def _agent_seed(seed: int, index: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * index) & 0x7FFFFFFF


class EGCFGSolver:
    """``solve(problem, prompt, stop, seed) -> (Candidate, log record)``."""

    def __init__(
        self,
        model,
        tokenizer,
        config: EGCFGConfig | None = None,
        pool: Any = None,
        add_special_tokens: bool = True,
        log_signals: bool = True,
        to_program: Callable[[Problem, str], str] | None = None,
    ):
        """``to_program(problem, completion) -> program`` (default ``problem.program``; the
        baseline passes ``codedistill.prompts.to_program`` for its prompt style)."""
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EGCFGConfig()
        self.executor = TraceExecutor(pool, workers=self.config.exec_workers, timeout=self.config.exec_timeout_s)
        self.decoder = LineDecoder(
            model,
            tokenizer,
            self.config,
            self.executor,
            add_special_tokens=add_special_tokens,
            log_signals=log_signals,
            to_program=to_program,
        )
        self.to_program = self.decoder.to_program

    def close(self) -> None:
        """Stop the sandbox pool this solver started (if it started one)."""
        self.executor.close()

    def _check(self, problem: Problem, res: AgentResult) -> None:
        if not problem.visible_tests:
            res.visible = {"passed": False, "pass_rate": 0.0, "tests_total": 0}
            return
        before = self.executor.executions
        res.visible = self.executor.check_many(
            [self.to_program(problem, res.completion)], list(problem.visible_tests), problem.test_setup
        )[0]
        res.counters.sandbox_executions += self.executor.executions - before if self.config.agent_workers == 1 else 1

    def _run_agent(self, problem, prompt, stop, agent, seed, cancel, build=None) -> AgentResult:
        res = self.decoder.decode_agent(problem, prompt, stop, agent, seed, cancel, build=build)
        if res.finish_reason != "cancelled":
            t0 = time.time()
            self._check(problem, res)
            res.counters.wall_time_s += time.time() - t0
        return res

    def solve(
        self,
        problem: Problem,
        prompt: str,
        stop: Sequence[str] = (),
        seed: int = 0,
        build: Callable[[str, str], str] | None = None,
    ) -> tuple[Candidate, dict[str, Any]]:
        """``build(signal, prompt variant) -> prompt`` places the signal (chat prompts need it:
        :func:`~codedistill.egcfg.signal.prompt_builder`); default: base insertion into ``prompt``."""
        t0 = time.time()
        agents = self.config.agents()
        if not problem.visible_tests and self.config.line_temperature == 0:
            # no tests to trace: every agent is plain greedy decoding, so one is enough
            agents = agents[:1]
        results: list[AgentResult | None] = [None] * len(agents)
        cancel = threading.Event()
        winner: int | None = None
        if self.config.agent_workers == 1:
            for i, a in enumerate(agents):
                res = results[i] = self._run_agent(problem, prompt, stop, a, _agent_seed(seed, i), None, build)
                if self.config.early_stop and res.visible and res.visible["passed"]:
                    winner = i
                    break
        else:
            with ThreadPoolExecutor(self.config.agent_workers) as ex:
                futs = {
                    ex.submit(self._run_agent, problem, prompt, stop, a, _agent_seed(seed, i), cancel, build): i
                    for i, a in enumerate(agents)
                }
                pending = set(futs)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        i = futs[f]
                        res = results[i] = f.result()
                        v = res.visible
                        if winner is None and self.config.early_stop and v and v["passed"]:
                            winner = i
                            cancel.set()
                            for p in pending:
                                p.cancel()
        ran = [(i, r) for i, r in enumerate(results) if r is not None and r.finish_reason != "cancelled"]
        if winner is None:  # best visible pass rate, first agent on ties
            winner = max(ran, key=lambda ir: (ir[1].visible["pass_rate"] if ir[1].visible else 0.0, -ir[0]))[0]
        best = results[winner]
        if best is None:
            raise RuntimeError(f"EG-CFG: agent {winner} of {problem.task_id} left no result")
        total = Counters()
        for r in results:
            if r is not None:
                total.add(r.counters)
        total.wall_time_s = time.time() - t0
        cand = Candidate(
            text=best.completion,
            num_tokens=best.num_tokens,
            logprob=best.plain_logprob,
            raw_text=best.raw_text,
            finish_reason="length" if best.finish_reason == "length" else "stop",
            meta={
                "agent": best.agent.name(),
                "guided_logprob": best.guided_logprob,
                "visible_passed": bool(best.visible and best.visible["passed"]),
                "egcfg": total.to_dict(),
            },
        )
        record = {
            "task_id": problem.task_id,
            "seed": seed,
            "winner": best.agent.name(),
            "winner_index": winner,
            "visible_passed": cand.meta["visible_passed"],
            "completion": best.completion,
            "agents_run": len(ran),
            "agents_total": len(agents),
            "counters": total.to_dict(),
            "agents": [r.log() for r in results if r is not None],
        }
        return cand, record


def append_log(path: str | Path, record: dict) -> None:
    """Append one problem's record to ``egcfg_log.jsonl`` (one JSON line, flushed + fsync'd)."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
