"""Phases 3-4 of an iteration: every tested program into the replay buffer, then the
prioritized draw (P2Value over the eligible programs) and the training examples it gives."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from codedistill.btp.config import BTPConfig
from codedistill.btp.phases.generate import Tested
from codedistill.btp.plan import ResolvedInputs
from codedistill.btp.replay import ReplayBuffer, ReplayEntry
from codedistill.btp.samplers import Draw, draw
from codedistill.btp.stats import sampling_stats
from codedistill.data import stop_strings
from codedistill.data.problem import Problem
from codedistill.errors import ConfigError
from codedistill.models.loading import load_tokenizer
from codedistill.prompts import PromptStyle, render_prompt
from codedistill.runs import derive_seed
from codedistill.training.settings import TrainExample


def sequence_p(c: dict[str, Any], p_mode: str) -> float:
    """P of P2Value for one candidate: the length-normalised ``seq_prob`` (exp of the mean
    token log-probability) or, ``raw``, the paper's product of token probabilities
    ``exp(sum logprob)`` (tiny for long programs: P then hardly orders anything)."""
    if p_mode == "raw":
        lp = float(c.get("logprob", float("nan")))
        v = math.exp(lp) if math.isfinite(lp) else 0.0
    else:
        v = float(c["seq_prob"])
    return min(1.0, max(0.0, v if math.isfinite(v) else 0.0))


def add_to_buffer(
    buffer: ReplayBuffer, problems: Sequence[Problem], produced: Sequence[tuple[str, Tested]], k: int, cfg: BTPConfig
) -> int:
    """Every tested program of iteration ``k`` into the buffer, problem by problem (the
    same entries in the same order on a restart: adding is idempotent); how many were new."""
    before = len(buffer)
    for p in problems:
        for _role, tested in produced:
            for c in tested[p.task_id]:
                buffer.add(
                    ReplayEntry(
                        task_id=p.task_id,
                        completion=c["completion"],
                        program=c["program"],
                        p=sequence_p(c, cfg.p_mode),
                        pass_rate=float(c["pass_rate"]),
                        tests_passed=int(c["tests_passed"]),
                        tests_total=int(c["tests_total"]),
                        source=c["model"],
                        iteration=k,
                        origin=cfg.generation,
                    )
                )
    return len(buffer) - before


def eligible(entries: Sequence[ReplayEntry], min_pass_rate: float) -> list[ReplayEntry]:
    """Programs the draw may pick: all at 0; at any value > 0 zero-pass programs are out and
    only pass_rate >= min_pass_rate stays (1.0: only fully passing, rejection-sampling FT)."""
    if min_pass_rate <= 0:
        return list(entries)
    return [e for e in entries if e.pass_rate > 0 and e.pass_rate >= min_pass_rate - 1e-12]


@dataclass
class Replay:
    """Iteration ``k``'s prioritized draw over the eligible programs, with its statistics."""

    entries: list[ReplayEntry]  # the eligible programs, in buffer order
    drawn: Draw
    stats: dict[str, Any]

    def record(self) -> dict[str, Any]:
        """What ``iter_K/draw.json`` holds."""
        d = self.drawn
        return {
            "indices": d.indices,
            "is_weights": d.is_weights,
            "drawn": [{"task_id": self.entries[i].task_id, "key": self.entries[i].key} for i in d.indices],
        }


def prioritized_draw(all_entries: Sequence[ReplayEntry], cfg: BTPConfig, k: int) -> Replay:
    entries = eligible(all_entries, cfg.min_pass_rate)
    if not entries:
        raise ConfigError(
            f"no program in the replay buffer passes min_pass_rate={cfg.min_pass_rate:g} "
            f"({len(all_entries)} programs, none eligible); lower min_pass_rate"
        )
    values = [e.value(cfg.p2_alpha) for e in entries]
    n_draw = cfg.replay_size or len(entries)
    rng = np.random.default_rng(derive_seed(cfg.seed, "draw", k))
    is_beta = cfg.is_beta if cfg.is_weights else None
    d = draw(values, n_draw, cfg.sampling_method, cfg.sampling_alpha, rng, is_beta=is_beta)
    stats = sampling_stats(entries, d, cfg.sampling_method, cfg.sampling_alpha, is_beta, cfg.p2_alpha)
    stats.update(
        min_pass_rate=cfg.min_pass_rate,
        eligible_programs=len(entries),
        excluded_programs=len(all_entries) - len(entries),
        p_mode=cfg.p_mode,
    )
    return Replay(entries, d, stats)


def training_examples(inputs: ResolvedInputs, replay: Replay) -> list[TrainExample]:
    """The drawn programs as (prompt, completion, weight) in the target's prompt format."""
    by_id = {p.task_id: p for p in inputs.train}
    style = PromptStyle.of(inputs.target_spec)
    tok = load_tokenizer(inputs.target_path) if style.style == "chat" else None
    examples = []
    for i, w in zip(replay.drawn.indices, replay.drawn.is_weights):
        e = replay.entries[i]
        prob = by_id[e.task_id]
        examples.append(
            TrainExample(
                prompt=render_prompt(prob, style, tok),
                completion=training_completion(prob, e.completion, style),
                weight=w,
                task_id=e.task_id,
            )
        )
    return examples


def training_completion(problem: Problem, completion: str, style: PromptStyle) -> str:
    """What the target is trained to write after its prompt.

    Base prompts (MBPP/synth ``[BEGIN]`` format): the completion followed by the
    benchmark's end marker (``[DONE]``), exactly what a base model is stopped at.
    Chat prompts: the program in one fenced block (what the code extractor reads).
    """
    if style.style == "chat":
        return "```python\n" + problem.program(completion).strip() + "\n```"
    stops = stop_strings(problem.dataset or "mbpp")
    end = stops[0] if stops and stops[0].strip().startswith("[") else ""
    return completion + end
