"""Rendering a Problem for a model, and turning its output back into a program.

Base models complete the benchmark's own prompt (HumanEval: signature + docstring; MBPP
and synth: the original paper's description + asserts + ``[BEGIN]``) and stop at the
benchmark's stop strings. Instruct models get the task through their chat template and
answer in prose + a fenced block; the code is extracted from the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from codedistill.data import stop_strings
from codedistill.data.problem import Problem
from codedistill.generation.postprocess import cut_at_stop, extract_code


@dataclass(frozen=True)
class PromptStyle:
    """How to talk to one model: ``base`` completion or ``chat`` template."""

    style: str = "base"  # base | chat

    @classmethod
    def of(cls, spec: Any) -> PromptStyle:
        return cls(getattr(spec, "prompt_style", "base"))


def chat_instruction(problem: Problem) -> str:
    if problem.code_prefix:  # HumanEval-like: complete a given signature
        return (
            "Complete the following Python function. Return the whole function in one "
            f"```python code block.\n\n```python\n{problem.prompt.rstrip()}\n```"
        )
    tests = "\n".join(problem.visible_tests)
    return (
        f"{problem.description.strip()}\nYour code should pass these tests:\n\n{tests}\n\n"
        "Write the Python code in one ```python code block."
    )


def render_prompt(problem: Problem, style: PromptStyle, tokenizer: Any = None) -> str:
    if style.style == "base":
        return problem.prompt
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat prompts need a tokenizer with a chat template")
    messages = [{"role": "user", "content": chat_instruction(problem)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def stops_for(problem: Problem, style: PromptStyle) -> tuple[str, ...]:
    """Stop strings: the benchmark's for base prompts; none (EOS only) for chat."""
    return stop_strings(problem.dataset) if style.style == "base" else ()


def to_program(problem: Problem, style: PromptStyle, text: str) -> tuple[str, str]:
    """(completion, program) from a model's raw continuation."""
    if style.style == "base":
        completion, _ = cut_at_stop(text, stop_strings(problem.dataset))
        return completion, problem.program(completion)
    code = extract_code(text, problem.entry_point)
    if problem.code_prefix and f"def {problem.entry_point}" not in code:
        return code, problem.program(code)
    if problem.code_prefix:  # a whole function: keep the prompt's imports (typing, math, ...)
        imports = [line for line in problem.code_prefix.splitlines() if line.startswith(("import ", "from "))]
        return code, "\n".join(imports + [code]) if imports else code
    return code, code
