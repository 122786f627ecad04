"""The generator interface every backend implements (HF transformers, vLLM, OpenAI-compatible servers)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class Candidate:
    """One generated continuation of a prompt.

    ``logprob`` is the summed log-probability of the generated tokens under the model
    (temperature 1, no length penalty, no sampling warpers): ``sum_t log p(y_t | x, y_<t)``
    over the ``num_tokens`` tokens that were kept (after cutting at a stop string, the
    tokens up to and including the one that completed the kept text).
    ``seq_prob = exp(logprob / num_tokens)``, the length-normalised sequence probability in
    [0, 1] used as P in BTP's P2Value.
    """

    text: str
    num_tokens: int
    logprob: float
    prompt_index: int = 0
    raw_text: str = ""
    finish_reason: str = "stop"  # "stop" (stop string / eos) or "length"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def seq_prob(self) -> float:
        return seq_prob(self.logprob, self.num_tokens)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seq_prob"] = self.seq_prob
        return d


def served_fields(c: Candidate) -> dict[str, Any]:
    """Which model answered, for a served candidate's record (``served_model``, and
    ``system_fingerprint`` where the server gave one); nothing for an in-process model."""
    return {k: c.meta[k] for k in ("served_model", "system_fingerprint") if k in c.meta}


def seq_prob(logprob: float, num_tokens: int) -> float:
    """exp(mean token log-prob); 0.0 for an empty sequence: a program of no tokens earned no
    probability mass (with 1.0 it would outrank every real program in P2Value)."""
    if num_tokens <= 0:
        return 0.0
    return float(math.exp(logprob / num_tokens))


class Generator(Protocol):
    """What BTP, EG-CFG and the baseline need from a model backend."""

    name: str
    tokenizer: Any  # renders prompts (a chat template); None when the server renders them

    def sample(
        self,
        prompts: Sequence[str],
        n: int,
        temperature: float = 0.8,
        top_p: float = 0.95,
        max_new_tokens: int = 256,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[list[Candidate]]:
        """n candidates per prompt, in prompt order."""
        ...

    def beam_search(
        self,
        prompts: Sequence[str],
        num_beams: int,
        num_return_sequences: int | None = None,
        max_new_tokens: int = 256,
        stop: Sequence[str] = (),
        length_penalty: float = 1.0,
    ) -> list[list[Candidate]]:
        """All returned beams per prompt, best first."""
        ...


@runtime_checkable
class TopKGenerator(Generator, Protocol):
    """A served generator that returns the top-k next-token log-probs (EG-CFG through a server)."""

    def next_token_topk(self, prompts: Sequence[str], k: int) -> list[dict[str, float]]:
        """``{token text: logprob}`` of the ``k`` most likely next tokens, per prompt."""
        ...


class InProcessGenerator(Generator, Protocol):
    """A generator holding the model in this process (full logits: EG-CFG's exact CFG)."""

    model: Any
    add_special_tokens: bool
    forward_passes: int
    generated_tokens: int
