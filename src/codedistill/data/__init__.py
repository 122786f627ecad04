"""Benchmarks: HumanEval, MBPP (full / sanitized), HumanEval+ / MBPP+ (EvalPlus) and the
embedded synthetic `synth`."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import Any

from codedistill.data.problem import EVALPLUS_DATASETS, Problem
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
    elif name in EVALPLUS_DATASETS:
        from codedistill.data.evalplus import load_evalplus
        from codedistill.data.mbpp import fewshot_prefix

        problems = load_evalplus(name, data_path, visible_tests=visible_tests)
        if shots and (shots != 3 or name == "humaneval+"):
            raise DataError("MBPP+ supports 0 or 3 shots (MBPP's tasks 2, 3, 4); HumanEval+ 0.")
        if shots:
            prefix = fewshot_prefix()  # reads MBPP: once, not once per problem
            problems = [replace(p, prompt=prefix + p.prompt) for p in problems]
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


#: the few-shot prompt's examples and the MBPP split BTP trains from, by MBPP task number
TRAIN_DATASETS_OF_MBPP = ("mbpp", "mbpp-sanitized")


def heldout_problems(
    dataset: str,
    split: str = "test",
    data_path: str | Path | None = None,
    max_problems: int | None = None,
    shots: int = 0,
    seed: int = 0,
    trains_on: str | None = None,
    chosen_on: Collection[str] = (),
) -> tuple[list[Problem], list[dict[str, Any]]]:
    """The problems of an evaluation: :func:`load_problems`'s, less those it would leak,
    and what was left out (``[{"reason", "task_ids"}]``, empty when nothing was):

    * with ``shots``, the few-shot prompt's examples (MBPP tasks 2, 3, 4): the prompt
      holds their solutions (only ``prompt`` / ``all`` splits of MBPP and MBPP+ have them);
    * when the run trains on an MBPP variant (``trains_on``), the problems whose MBPP task
      number is in MBPP's train split (601-974): MBPP+ has 108 of them;
    * the problems whose MBPP task number is in an MBPP split of ``chosen_on``: the splits
      on which this run's settings were chosen (a sweep's trials are scored on MBPP's
      validation split, 511-600, where MBPP+ has 39 tasks).

    ``max_problems`` keeps the first N of what is left."""
    from codedistill.data.mbpp import MBPP_FEWSHOT_IDS, MBPP_SPLITS

    problems = load_problems(dataset, split, data_path=data_path, shots=shots, seed=seed)
    rules: list[tuple[Collection[int], str]] = []
    if shots:
        ids = ", ".join(map(str, MBPP_FEWSHOT_IDS))
        rules.append(
            (MBPP_FEWSHOT_IDS, f"the {shots}-shot prompt's examples (MBPP tasks {ids}): it holds their solutions")
        )
    if trains_on in TRAIN_DATASETS_OF_MBPP:
        train = MBPP_SPLITS["train"]
        rules.append(
            (
                train,
                f"in MBPP's train split (tasks {train.start}-{train.stop - 1}), which this run trains on ({trains_on})",
            )
        )
    for name in chosen_on:
        numbers = MBPP_SPLITS[name]
        rules.append(
            (
                numbers,
                f"in MBPP's {name} split (tasks {numbers.start}-{numbers.stop - 1}), "
                "on which this run's settings were chosen",
            )
        )
    excluded: list[dict[str, Any]] = []
    for numbers, reason in rules:
        out = [p.task_id for p in problems if p.meta.get("mbpp_id") in numbers]
        if out:
            excluded.append({"reason": reason, "task_ids": out})
            problems = [p for p in problems if p.task_id not in set(out)]
    if max_problems is not None:
        if max_problems < 1:
            raise DataError("--max-problems must be at least 1.")
        problems = problems[:max_problems]
    return problems, excluded


def stop_strings(dataset: str) -> tuple[str, ...]:
    """Where a base model's completion ends for this benchmark's prompt format."""
    if dataset.lower() in ("humaneval", "humaneval+"):
        from codedistill.data.humaneval import HUMANEVAL_STOP

        return HUMANEVAL_STOP
    from codedistill.data.mbpp import MBPP_STOP

    return MBPP_STOP


__all__ = ["EVALPLUS_DATASETS", "Problem", "heldout_problems", "load_problems", "stop_strings", "DATASETS", "SPLITS"]
