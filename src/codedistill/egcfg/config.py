"""EG-CFG settings (pydantic). Defaults follow the paper's search space (Lavon et al. 2025)."""

from __future__ import annotations

import itertools
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from codedistill.egcfg.signal import DEFAULT_HEADER, DEFAULT_TEMPLATE

# The paper's second prompt ("long code"), in our words: ask for many short lines so that
# every prefix of the function runs, which gives the tracer something to show early.
LONG_CODE_INSTRUCTION = (
    "Write the function as many short, simple lines, so that every prefix of it is a valid\n"
    "Python program that can be run and traced step by step. Introduce a variable for each\n"
    "intermediate result; use explicit loops instead of comprehensions, lambdas or one-liners.\n"
    "For example, instead of\n"
    "    return [x * x for x in xs]\n"
    "write\n"
    "    squares = []\n"
    "    for x in xs:\n"
    "        square = x * x\n"
    "        squares.append(square)\n"
    "    return squares"
)

#: prompt variants of the agent grid: name -> instruction added to the task ("" = none)
DEFAULT_PROMPTS = {"default": "", "long_code": LONG_CODE_INSTRUCTION}


class AgentSpec(BaseModel):
    """One agent: candidate temperature t, depth d (lines), candidates s, guidance gamma, prompt."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float
    depth: int
    num_candidates: int
    gamma: float
    prompt: str = "default"

    def key(self, greedy_lines: bool = True) -> tuple:
        """What determines the agent's output: with gamma = 0 (and greedy lines) the signal,
        hence t, d, s and the prompt, has no effect, so those agents are one agent."""
        if self.gamma == 0 and greedy_lines:
            return (0.0, self.prompt)  # the prompt variant still changes the plain output
        return (self.temperature, self.depth, self.num_candidates, self.gamma, self.prompt)

    def name(self) -> str:
        return f"t{self.temperature}_d{self.depth}_s{self.num_candidates}_g{self.gamma}_{self.prompt}"


class EGCFGConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # --- the agents' grid (paper: t in {0.7, 0.75}, s = 3, d in {2, 3}, gamma in {0, .5, 1, 3})
    temperatures: list[float] = Field(default_factory=lambda: [0.7, 0.75])
    depths: list[int] = Field(default_factory=lambda: [2, 3])
    num_candidates: list[int] = Field(default_factory=lambda: [3])
    gammas: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0, 3.0])
    prompts: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_PROMPTS),
        description="prompt variants of the grid: name -> instruction added to the task "
        "('default' adds none; 'long_code' is the paper's second prompt)",
    )
    # Default compact: on synth test (200 problems, tiny-target, 3-agent grid) both templates gave
    # the same pass@1 (0.435, paired diff 0.000, CI [0, 0]); compact cost 92 vs 132 forward passes
    # and 4.6 vs 6.8 s per problem (README, EG-CFG section).
    trace_template: Literal["compact", "paper"] = Field(
        "compact",
        description="compact: changed variables per executed line + verdict, as comments; "
        "paper: upstream's layout (function, invocation, per-step locals with "
        "types, return value; no verdict)",
    )
    signal_header: str | None = Field(None, description="None: the template's own header")
    signal_template: str | None = Field(None, description="frame with {header} and {traces}; None: the template's own")
    max_agents: int | None = Field(None, ge=1, description="run only the first N distinct agents")
    early_stop: bool = Field(True, description="stop the problem at the first agent passing the visible tests")
    agreement_stop: int = Field(
        4,
        ge=0,
        description="stop an agent once its executable candidates "
        "agree on one finished program this many line "
        "boundaries in a row (paper: 4; 0 = off)",
    )
    guide_from_def: bool = Field(
        True, description="candidates, signal and guidance start once the entry point's def line is there (paper)"
    )
    agent_workers: int = Field(1, ge=1, description="agents decoded at once (threads)")

    # --- candidates
    candidate_mode: Literal["sample", "beam"] = "sample"
    top_p: float = Field(0.95, gt=0, le=1)
    candidate_max_tokens: int = Field(96, ge=1, description="tokens per candidate continuation")

    # --- the guided line
    line_temperature: float = Field(0.0, ge=0, description="0 = greedy guided line (paper)")
    max_lines: int = Field(40, ge=1)
    max_line_tokens: int = Field(64, ge=1)
    max_new_tokens: int = Field(384, ge=1, description="tokens of the whole completion")
    prefix_cache: bool = Field(
        True,
        description="HF decoder: prefill each call's prompts from cached prefixes (the prompt before "
        "the signal, the last line's context) instead of from scratch; cond and uncond then run "
        "unpadded, one forward pass each per step",
    )

    # --- traces and signal
    trace_budget_tokens: int | None = Field(
        None,
        ge=0,
        description="tokens of the whole signal block; None: scaled to the model's "
        "context (trace_budget_fraction of what the prompt and completion leave)",
    )
    trace_budget_fraction: float = Field(0.5, gt=0, le=1)
    trace_budget_max: int = Field(4096, ge=0, description="cap of the scaled budget")
    trace_max_events: int = Field(60, ge=0, description="recorded events per test")
    trace_max_chars: int = Field(4000, ge=0)
    trace_max_repr: int = Field(60, ge=8)
    trace_timeout_s: float = Field(1.0, gt=0, description="per test inside the tracer")
    max_traced_tests: int = Field(3, ge=1, description="visible tests run under the tracer")
    signal_anchor: str | None = "[BEGIN]"
    exec_timeout_s: float = Field(10.0, gt=0, description="per sandbox job")
    exec_workers: int = Field(2, ge=1)

    def prompt_variants(self) -> dict[str, str]:
        return dict(self.prompts)

    def frame(self) -> tuple[str, str]:
        """(signal template with {header}/{traces}, header) for the trace template."""
        from codedistill.egcfg.signal import PAPER_HEADER, PAPER_TEMPLATE

        if self.trace_template == "paper":
            tpl, hdr = PAPER_TEMPLATE, PAPER_HEADER
        else:
            tpl, hdr = DEFAULT_TEMPLATE, DEFAULT_HEADER
        return (self.signal_template or tpl, self.signal_header if self.signal_header is not None else hdr)

    def budget_for(self, context_tokens: int | None, prompt_tokens: int) -> int:
        """Tokens for the signal block: the fixed budget if set; else ``trace_budget_fraction``
        of what the model's context leaves after the prompt and the completion, capped at
        ``trace_budget_max`` (512 when the context length is unknown)."""
        if self.trace_budget_tokens is not None:
            return self.trace_budget_tokens
        if not context_tokens:
            return 512
        left = context_tokens - prompt_tokens - self.max_new_tokens
        return max(0, min(self.trace_budget_max, int(left * self.trace_budget_fraction)))

    def agents(self) -> list[AgentSpec]:
        """Distinct agents in run order: gamma first (gamma = 0, plain greedy, is the cheapest
        and runs first), then prompt, depth, temperature, s."""
        seen: set[tuple] = set()
        out: list[AgentSpec] = []
        for g, p, d, t, s in itertools.product(
            self.gammas, list(self.prompts), self.depths, self.temperatures, self.num_candidates
        ):
            a = AgentSpec(temperature=t, depth=d, num_candidates=s, gamma=g, prompt=p)
            k = a.key(greedy_lines=self.line_temperature == 0)
            if k in seen:
                continue
            seen.add(k)
            out.append(a)
        return out[: self.max_agents] if self.max_agents else out
