"""Line-by-line EG-CFG decoding for one agent.

At each line boundary (the completion so far ends with a token containing a newline):

1. draw ``s`` candidate continuations, each ``d`` lines deep, from the plain prompt + the
   completion so far (temperature sampling at ``t``, or beam search with ``s`` beams);
2. make each candidate program executable (:func:`~codedistill.egcfg.signal.make_executable`)
   and trace it on the visible tests in the sandbox (all candidates in parallel);
3. format the traces into the dynamic signal (token budget) and insert it into the prompt;
4. decode the next line token by token with CFG between the prompt with the signal
   (conditional) and without it (unconditional), with both KV caches (:mod:`.cfg`).

The signal is fixed within a line and refreshed at the next boundary. Token ids, not text,
carry the completion from line to line (prompt ids + generated ids), so with an empty signal
or ``gamma = 0`` the result is exactly the model's plain greedy decoding.

With ``gamma = 0`` (the signal has no effect) or no visible tests, steps 1-3 are skipped.
As upstream: steps 1-4 start once the entry point's ``def`` line is in the program
(``guide_from_def``; lines before it are plain greedy), and an agent stops early when its
executable candidates agree on ONE finished program (last line returns) at
``agreement_stop`` line boundaries in a row; that candidate then ends the completion.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from codedistill.data.problem import Problem
from codedistill.egcfg.cfg import PrefixCache, cfg_generate
from codedistill.egcfg.config import AgentSpec, EGCFGConfig
from codedistill.egcfg.executor import TraceExecutor
from codedistill.egcfg.signal import build_signal, count_tokens_fn, make_executable_ex, prompt_builder
from codedistill.generation.hf import decode_continuation, kept_token_count
from codedistill.generation.postprocess import cut_at_stop


def agreement_step(agreed: str | None, count: int, programs: Sequence[str]) -> tuple[str | None, int]:
    """Upstream's agreement counter, one line boundary at a time: the candidates agree when
    their executable programs are ONE program whose last line returns; the count grows while
    it is the same program, and starts again (at 1 for a new agreed program, else 0)."""
    uniq = list(dict.fromkeys(p.strip() for p in programs if p.strip()))
    if len(uniq) != 1:
        return None, 0
    prog = uniq[0]
    if agreed is not None and prog == agreed:
        return agreed, count + 1
    if "return" in prog.splitlines()[-1]:
        return prog, 1
    return None, 0


@dataclass
class Counters:
    forward_passes: int = 0  # model calls (a batched cond+uncond call counts once; with prefix_cache, each stream's)
    forward_rows_tokens: int = 0  # token positions those calls processed (rows x new tokens)
    generated_tokens: int = 0  # tokens decoded: candidates + guided lines
    candidate_tokens: int = 0
    line_tokens: int = 0
    sandbox_executions: int = 0  # tracer jobs + test checks
    wall_time_s: float = 0.0

    def add(self, other: Counters) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class AgentResult:
    agent: AgentSpec
    completion: str  # cut at the stop strings
    token_ids: list[int]  # all generated ids (uncut)
    num_tokens: int  # kept tokens (up to the one completing the kept text)
    plain_logprob: float  # sum of log p_plain over the kept tokens (temperature 1)
    guided_logprob: float  # same under the guided distribution that chose them
    finish_reason: str  # stop | length | cancelled
    lines: list[dict] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)
    visible: dict | None = None  # {"passed", "pass_rate"} on the visible tests
    raw_text: str = ""  # all generated ids decoded after the prompt (uncut)

    def log(self) -> dict[str, Any]:
        return {
            "agent": self.agent.name(),
            "spec": self.agent.model_dump(),
            "completion": self.completion,
            "num_tokens": self.num_tokens,
            "plain_logprob": self.plain_logprob,
            "guided_logprob": self.guided_logprob,
            "finish_reason": self.finish_reason,
            "visible": self.visible,
            "counters": self.counters.to_dict(),
            "lines": self.lines,
        }


class LineDecoder:
    def __init__(
        self,
        model,
        tokenizer,
        config: EGCFGConfig,
        executor: TraceExecutor,
        add_special_tokens: bool = True,
        log_signals: bool = True,
        to_program: Callable[[Problem, str], str] | None = None,
    ):
        self.to_program = to_program or (lambda problem, text: problem.program(text))
        self.model = model
        self.tok = tokenizer
        self.cfg = config
        self.executor = executor
        self.add_special_tokens = add_special_tokens
        self.log_signals = log_signals
        self.count_tokens = count_tokens_fn(tokenizer)
        eos = tokenizer.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos or [0])[0]

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=self.add_special_tokens))

    def decode(self, ids: Sequence[int], context: Sequence[int] = ()) -> str:
        """The text of ``ids`` after ``context`` (the tokens before them): decoded alone,
        SentencePiece ids lose the first token's leading space, i.e. indentation."""
        return decode_continuation(self.tok, ids, context)

    # ------------------------------------------------------------------ candidates + signal
    def candidates(
        self,
        ids: list[int],
        agent: AgentSpec,
        stop: Sequence[str],
        gen: torch.Generator,
        c: Counters,
        prefixes: PrefixCache | None = None,
    ) -> tuple[list[str], list[tuple[list[int], list[float]]]]:
        """``s`` continuations of ``ids``, each up to ``d`` newlines (or a stop / eos), and
        each one's kept (token ids, plain log-probs)."""
        d = agent.depth

        def deep_enough(new: list[int]) -> bool:
            t = self.decode(new, ids)
            return t.count("\n") >= d or cut_at_stop(t, stop)[1]

        mode: Literal["beam", "sample"] = "beam" if self.cfg.candidate_mode == "beam" else "sample"
        res = cfg_generate(
            self.model,
            ids,
            None,
            gamma=0.0,
            strategy=mode,
            num_sequences=agent.num_candidates,
            temperature=agent.temperature,
            top_p=self.cfg.top_p,
            max_new_tokens=self.cfg.candidate_max_tokens,
            eos_token_id=self.eos,
            stop_fn=deep_enough,
            generator=gen,
            pad_token_id=self.pad,
            prefixes=prefixes,
        )
        c.forward_passes += res.forward_passes
        c.forward_rows_tokens += res.rows_tokens
        n = sum(len(t) for t in res.tokens)
        c.generated_tokens += n
        c.candidate_tokens += n
        out = []
        kept: list[tuple[list[int], list[float]]] = []
        for toks, plps in zip(res.tokens, res.token_plain_logprobs):
            full = self.decode(toks, ids)
            t, _ = cut_at_stop(full, stop)
            lines = t.split("\n")
            text = "\n".join(lines[:d]) + ("\n" if len(lines) > d else "")
            m = kept_token_count(self.tok, toks, text, ids) if text != full else len(toks)
            out.append(text)
            kept.append((list(toks[:m]), list(plps[:m])))
        return out, kept

    def signal(
        self,
        problem: Problem,
        prefix_text: str,
        cands: list[str],
        agent: AgentSpec,
        c: Counters,
        budget: int | None = None,
    ) -> tuple[str, list[dict], list[str]]:
        """Trace the candidates on the visible tests: the signal block, a log per candidate and
        the distinct executable programs (for the agreement stop)."""
        first_new = len(self.to_program(problem, prefix_text).split("\n"))
        programs: list[str] = []
        dropped: list[str] = []
        log: list[dict] = []
        for cand in cands:
            prog, drop = make_executable_ex(self.to_program(problem, prefix_text + cand))
            entry = {"text": cand, "executable": bool(prog), "dropped": drop}
            if prog and prog not in programs:
                programs.append(prog)
                dropped.append(drop)
            entry["program_index"] = programs.index(prog) if prog in programs else None
            log.append(entry)
        tests = list(problem.visible_tests)[: self.cfg.max_traced_tests]
        paper = self.cfg.trace_template == "paper"
        jobs = [
            {
                "program": p,
                "tests": tests,
                "test_setup": problem.test_setup,
                "max_events": self.cfg.trace_max_events,
                "max_chars": self.cfg.trace_max_chars,
                "max_repr": self.cfg.trace_max_repr,
                "timeout_s": self.cfg.trace_timeout_s,
                "types": paper,
            }
            for p in programs
        ]
        before = self.executor.executions
        traces = self.executor.trace_many(jobs)
        c.sandbox_executions += self.executor.executions - before if self.cfg.agent_workers == 1 else len(jobs)
        for e in log:
            i = e.get("program_index")
            if i is not None:
                tr = traces[i]
                e["tests"] = [
                    {
                        "passed": t.get("passed"),
                        "result": t.get("result"),
                        "exception": (t.get("exception") or {}).get("type"),
                    }
                    for t in tr.get("tests", [])
                ]
                if tr.get("error"):
                    e["error"] = tr["error"]
        template, header = self.cfg.frame()
        sig = build_signal(
            [(p, t, first_new, dr) for p, t, dr in zip(programs, traces, dropped)],
            self.count_tokens,
            self.cfg.budget_for(None, 0) if budget is None else budget,
            template=template,
            header=header,
            max_tests=self.cfg.max_traced_tests,
            formatter=self.cfg.trace_template,
        )
        return sig, log, programs

    # ------------------------------------------------------------------ where guidance starts
    def guided_from_here(self, problem: Problem, prefix_text: str) -> bool:
        """Upstream starts candidates, signal and guidance at the entry point's ``def`` line
        (with ``guide_from_def``): True once the code prefix or the completion so far has it."""
        if not self.cfg.guide_from_def:
            return True
        name = re.escape(problem.entry_point) if problem.entry_point else r"\w+"
        return re.search(rf"^\s*def\s+{name}\s*\(", problem.code_prefix + prefix_text, re.M) is not None

    def context_length(self) -> int | None:
        conf = getattr(self.model, "config", None)
        for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            v = getattr(conf, k, None)
            if isinstance(v, int) and v > 0:
                return v
        return None

    def _finish_on_agreement(
        self,
        problem: Problem,
        kept_prefix: str,
        cands: list[str],
        kept: list[tuple[list[int], list[float]]],
        agreed: str | None,
    ) -> tuple[list[int], list[float]] | None:
        """(tokens, plain log-probs) of a candidate whose whole program is the agreed one."""
        for text, (toks, plps) in zip(cands, kept):
            prog, dropped = make_executable_ex(self.to_program(problem, kept_prefix + text))
            if not dropped and prog.strip() == (agreed or "").strip() and toks:
                return toks, plps
        return None

    # ------------------------------------------------------------------ one agent
    def builder(
        self, problem: Problem, prompt: str, build: Callable[[str, str], str] | None = None
    ) -> Callable[[str, str], str]:
        """``build(signal, variant) -> prompt``: the given one (chat prompts: see
        :func:`~codedistill.egcfg.signal.prompt_builder`), else base insertion into ``prompt``."""
        if build is not None:
            return build
        return prompt_builder(
            problem, "base", anchor=self.cfg.signal_anchor, variants=self.cfg.prompt_variants(), prompt=prompt
        )

    def decode_agent(
        self,
        problem: Problem,
        prompt: str,
        stop: Sequence[str],
        agent: AgentSpec,
        seed: int,
        cancel: threading.Event | None = None,
        build: Callable[[str, str], str] | None = None,
    ) -> AgentResult:
        t0 = time.time()
        c = Counters()
        gen = torch.Generator().manual_seed(int(seed) & 0x7FFFFFFFFFFF)
        build = self.builder(problem, prompt, build)
        prompt_ids = self.encode(build("", agent.prompt))
        ids: list[int] = []
        plain_lps: list[float] = []
        guided_lps: list[float] = []
        lines: list[dict] = []
        use_signal = agent.gamma != 0 and bool(problem.visible_tests)
        budget = self.cfg.budget_for(self.context_length(), len(prompt_ids))
        finish = "length"
        stop = [s for s in stop if s]
        max_stop = max((len(s) for s in stop), default=0)
        agreed, agree_n = None, 0  # the program the candidates agree on, and for how many lines in a row
        # this agent's prompt KV caches: each line's calls prefill only what the last left out
        prefixes = PrefixCache(self.model) if self.cfg.prefix_cache else None
        for line_no in range(self.cfg.max_lines):
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            prefix_text = self.decode(ids, prompt_ids)
            entry: dict[str, Any] = {"line": line_no}
            sig = ""
            if use_signal and self.guided_from_here(problem, prefix_text):
                kept_prefix = cut_at_stop(prefix_text, stop)[0]
                cands, kept = self.candidates(prompt_ids + ids, agent, stop, gen, c, prefixes)
                sig, entry["candidates"], programs = self.signal(problem, kept_prefix, cands, agent, c, budget)
                entry["signal_tokens"] = self.count_tokens(sig) if sig else 0
                if self.log_signals:
                    entry["signal"] = sig
                agreed, agree_n = agreement_step(agreed, agree_n, programs)
                entry["agreement"] = agree_n
                if self.cfg.agreement_stop and agree_n >= self.cfg.agreement_stop:
                    done = self._finish_on_agreement(problem, kept_prefix, cands, kept, agreed)
                    if done is not None:  # the agreed candidate becomes the rest of the program
                        toks, plps = done
                        ids += toks
                        plain_lps += plps
                        guided_lps += plps  # chosen by sampling the plain model, not by guidance
                        entry["text"] = self.decode(toks, prompt_ids + ids[: -len(toks)])
                        entry["tokens"] = len(toks)
                        entry["agreement_stop"] = True
                        lines.append(entry)
                        finish = "stop"
                        break
            cond_ids = None
            if sig:
                cond_ids = self.encode(build(sig, agent.prompt)) + ids
            line_budget = min(self.cfg.max_line_tokens, self.cfg.max_new_tokens - len(ids))
            tail_from = max(0, len(prefix_text) - max_stop)
            ctx_ids = prompt_ids + ids  # what this line's tokens follow

            def line_done(new: list[int]) -> bool:
                t = self.decode(new, ctx_ids)
                if "\n" in t:
                    return True
                return bool(stop) and cut_at_stop((prefix_text + t)[tail_from:], stop)[1]

            line_temp = self.cfg.line_temperature
            res = cfg_generate(
                self.model,
                prompt_ids + ids,
                cond_ids,
                gamma=agent.gamma,
                strategy="sample" if line_temp > 0 else "greedy",
                temperature=max(line_temp, 1e-6),
                top_p=self.cfg.top_p if line_temp > 0 else 1.0,
                max_new_tokens=line_budget,
                eos_token_id=self.eos,
                stop_fn=line_done,
                generator=gen,
                pad_token_id=self.pad,
                prefixes=prefixes,
            )
            new = res.tokens[0]
            c.forward_passes += res.forward_passes
            c.forward_rows_tokens += res.rows_tokens
            c.generated_tokens += len(new)
            c.line_tokens += len(new)
            ids += new
            plain_lps += res.token_plain_logprobs[0]
            guided_lps += res.token_guided_logprobs[0]
            entry["text"] = self.decode(new, ctx_ids)
            entry["tokens"] = len(new)
            lines.append(entry)
            text = self.decode(ids, prompt_ids)
            if cut_at_stop(text, stop)[1] or (new and new[-1] in self.eos):
                finish = "stop"
                break
            if len(ids) >= self.cfg.max_new_tokens:
                finish = "length"
                break
        text = self.decode(ids, prompt_ids)
        completion, _ = cut_at_stop(text, stop)
        if completion != text:
            m = kept_token_count(self.tok, ids, completion, prompt_ids)
        else:  # like HFGenerator: the eos that ended generation is not a kept token
            m = len(ids) - (1 if ids and ids[-1] in self.eos else 0)
        c.wall_time_s = time.time() - t0
        return AgentResult(
            agent=agent,
            completion=completion,
            token_ids=ids,
            num_tokens=m,
            raw_text=text,
            plain_logprob=float(sum(plain_lps[:m])),
            guided_logprob=float(sum(guided_lps[:m])),
            finish_reason=finish,
            lines=lines,
            counters=c,
        )
