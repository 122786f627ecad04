"""Benchmarks: HumanEval, MBPP (full / sanitized), HumanEval+ / MBPP+ (EvalPlus) and the
embedded synthetic `synth`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from codedistill.data.problem import Problem
from codedistill.errors import DataError

DATASETS = ("humaneval", "mbpp", "mbpp-sanitized", "humaneval+", "mbpp+", "synth")
SPLITS = ("train", "validation", "test", "prompt", "all")


def load_problems(
    dataset: str,
    split: str = "test",
    data_path: str | Path | None = None,
    max_problems: int | None = None,
    shots: int = 0,
    seed: int = 0,
    visible_tests: bool = True,
) -> list[Problem]:
    """Problems of one dataset split, in task order; ``max_problems`` keeps the first N.

    ``shots=3`` prepends MBPP's standard three worked examples (tasks 2, 3, 4) to MBPP
    prompts. HumanEval has a single split, ``test`` (all 164). ``visible_tests=False``
    leaves HumanEval's and HumanEval+'s ``visible_tests`` empty instead of parsing them out
    of every docstring (a few hundredths of a second; scoring needs none).
    """
    name = dataset.lower()
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    if name == "humaneval":
        from codedistill.data.humaneval import load_humaneval

        problems = load_humaneval(data_path, visible_tests=visible_tests)
        if split not in ("test", "all"):
            raise DataError("HumanEval has only a test split (164 problems); use --split test.")
    elif name in ("mbpp", "mbpp-sanitized"):
        from codedistill.data.mbpp import fewshot_prefix, load_mbpp

        variant = "full" if name == "mbpp" else "sanitized"
        problems = load_mbpp(variant, data_path)
        if shots:
            if shots != 3:
                raise DataError("MBPP supports 0 or 3 shots (the paper's tasks 2, 3, 4).")
            by_id = {p.meta["mbpp_id"]: p for p in (problems if variant == "full" else load_mbpp("full", data_path))}
            prefix = fewshot_prefix(by_id)
            problems = [replace(p, prompt=prefix + p.prompt) for p in problems]
        if split != "all":
            problems = [p for p in problems if p.split == split]
    elif name in ("humaneval+", "mbpp+"):
        from codedistill.data.evalplus import load_evalplus
        from codedistill.data.mbpp import fewshot_prefix

        problems = load_evalplus(name, data_path, visible_tests=visible_tests)
        if shots and (shots != 3 or name == "humaneval+"):
            raise DataError("MBPP+ supports 0 or 3 shots (MBPP's tasks 2, 3, 4); HumanEval+ 0.")
        if shots:
            problems = [replace(p, prompt=fewshot_prefix() + p.prompt) for p in problems]
        if split not in ("test", "all") and name == "humaneval+":
            raise DataError("HumanEval+ has only a test split (164 problems); use --split test.")
        if split != "all":
            problems = [p for p in problems if p.split == split]
    elif name == "synth":
        from codedistill.data.synth import load_synth

        if split == "all":
            problems = [p for s in ("train", "validation", "test") for p in load_synth(s, seed=seed)]
        elif split == "prompt":
            raise DataError("synth has train, validation and test splits.")
        else:
            problems = load_synth(split, seed=seed)
    else:
        raise DataError(f"Unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}.")
    if max_problems is not None:
        if max_problems < 1:
            raise DataError("--max-problems must be at least 1.")
        problems = problems[:max_problems]
    return problems


def stop_strings(dataset: str) -> tuple[str, ...]:
    """Where a base model's completion ends for this benchmark's prompt format."""
    if dataset.lower() in ("humaneval", "humaneval+"):
        from codedistill.data.humaneval import HUMANEVAL_STOP

        return HUMANEVAL_STOP
    from codedistill.data.mbpp import MBPP_STOP

    return MBPP_STOP


__all__ = ["Problem", "load_problems", "stop_strings", "DATASETS", "SPLITS"]
