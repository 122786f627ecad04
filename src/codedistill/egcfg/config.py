"""EG-CFG settings (pydantic). Defaults follow the paper's search space (Lavon et al. 2025)."""

from __future__ import annotations

import itertools
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from codedistill.egcfg.signal import DEFAULT_HEADER, DEFAULT_TEMPLATE


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
            return (0.0,)
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
        default_factory=lambda: {"default": DEFAULT_TEMPLATE},
        description="signal templates by name; each has {header} and {traces}",
    )
    signal_header: str = DEFAULT_HEADER
    max_agents: Optional[int] = Field(None, ge=1, description="run only the first N distinct agents")
    early_stop: bool = True
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

    # --- traces and signal
    trace_budget_tokens: int = Field(512, ge=0, description="tokens of the whole signal block")
    trace_max_events: int = Field(60, ge=0, description="recorded events per test")
    trace_max_chars: int = Field(4000, ge=0)
    trace_max_repr: int = Field(60, ge=8)
    trace_timeout_s: float = Field(1.0, gt=0, description="per test inside the tracer")
    max_traced_tests: int = Field(3, ge=1, description="visible tests run under the tracer")
    signal_anchor: Optional[str] = "[BEGIN]"
    exec_timeout_s: float = Field(10.0, gt=0, description="per sandbox job")
    exec_workers: int = Field(2, ge=1)

    def agents(self) -> list[AgentSpec]:
        """Distinct agents in run order: gamma first (gamma = 0, plain greedy, is the cheapest
        and runs first), then prompt, depth, temperature, s."""
        seen: set[tuple] = set()
        out: list[AgentSpec] = []
        for g, p, d, t, s in itertools.product(self.gammas, list(self.prompts), self.depths,
                                               self.temperatures, self.num_candidates):
            a = AgentSpec(temperature=t, depth=d, num_candidates=s, gamma=g, prompt=p)
            k = a.key(greedy_lines=self.line_temperature == 0)
            if k in seen:
                continue
            seen.add(k)
            out.append(a)
        return out[: self.max_agents] if self.max_agents else out
