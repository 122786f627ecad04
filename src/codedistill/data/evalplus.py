"""HumanEval+ and MBPP+ (EvalPlus, Liu et al. 2023, Apache-2.0), shipped with the package.

The released files (``files/evalplus/``) are read exactly as ``evalplus`` 0.3.1 reads them:
HumanEval+ inputs as stored, MBPP+ inputs through the same per-task deserialisation
(``mbpp_deserialize_inputs``: JSON lists back to the tuples, sets and complex numbers the
canonical solutions take). Each :class:`Problem` keeps the original tests (HumanEval's
``check``, MBPP+'s ``assertion``) so that every other part of codedistill can use it as a
HumanEval / MBPP problem, and carries the EvalPlus task (:class:`EvalPlusTask`) in
``meta["evalplus"]``: what :mod:`codedistill.evalplus_judge` needs to judge a program.

Task ids are EvalPlus's (``HumanEval/0``, ``Mbpp/2``); MBPP+ tasks keep MBPP's numbers and
therefore MBPP's splits (few-shot 1-10, test 11-510, validation 511-600, train 601-974).
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codedistill.data.humaneval import docstring_tests
from codedistill.data.mbpp import mbpp_prompt, split_of
from codedistill.data.problem import EVALPLUS_DATASETS, Problem
from codedistill.errors import DataError

FILES_DIR = Path(__file__).resolve().parent / "files" / "evalplus"
RELEASES = {"humaneval+": "HumanEvalPlus-v0.1.10", "mbpp+": "MbppPlus-v0.2.0"}  # keys: EVALPLUS_DATASETS
REQUIRED_KEYS = (
    "task_id",
    "prompt",
    "entry_point",
    "canonical_solution",
    "base_input",
    "plus_input",
    "atol",
    "contract",
)
_MBPP_PROMPT = re.compile(r'"""\n(?P<text>.*)\n(?P<assert>assert .*)\n"""\n', re.DOTALL)

# evalplus/data/mbpp.py (0.3.1), mbpp_deserialize_inputs: which MBPP+ tasks store
# tuples, sets or complex numbers as JSON lists / strings, and how to restore them.
_TUPLE_ARGS = {
    2,
    116,
    132,
    143,
    222,
    261,
    273,
    394,
    399,
    421,
    424,
    429,
    470,
    560,
    579,
    596,
    616,
    630,
    726,
    740,
    744,
    809,
}
_TUPLE_ITEMS_OF_ARGS = {63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780}
_FIRST_ARG_TUPLE_ITEMS = {75, 413, 444, 753}
_SECOND_ARG_TUPLE = {106, 750}
_FIRST_ARG_TUPLE = {250, 405, 446, 617, 720, 763, 808}
_NESTED_TUPLES = {259, 401, 445}
_ALL_TUPLES = {580, 615, 791}


@dataclass(frozen=True)
class EvalPlusTask:
    """What EvalPlus judges a program of one task by: the inputs (deserialised as
    ``evalplus`` does), the canonical solution (a whole program), its input ``contract``
    (asserts a valid input satisfies), ``atol`` for float outputs, and for MBPP+ the
    original ``assertion``."""

    dataset: str
    task_id: str
    entry_point: str
    canonical_program: str
    contract: str
    base_input: tuple[Any, ...]
    plus_input: tuple[Any, ...]
    atol: float
    assertion: str = ""

    @property
    def release(self) -> str:
        return RELEASES[self.dataset]


def _tuples(items: list) -> list:
    return [tuple(x) for x in items]


def _all_tuples(x: Any) -> Any:
    return tuple(_all_tuples(i) for i in x) if isinstance(x, list) else x


def mbpp_deserialize_inputs(task_number: int, inputs: list) -> list:
    """MBPP+ inputs as ``evalplus.data.mbpp.mbpp_deserialize_inputs`` returns them."""
    n = task_number
    if n in _TUPLE_ARGS:
        return [_tuples(inp) for inp in inputs]
    if n in _TUPLE_ITEMS_OF_ARGS:
        return [[_tuples(arg) for arg in inp] for inp in inputs]
    if n in _FIRST_ARG_TUPLE_ITEMS:
        return [[_tuples(inp[0])] + [inp[1]] for inp in inputs]
    if n in _SECOND_ARG_TUPLE:
        return [[inp[0]] + [tuple(inp[1])] for inp in inputs]
    if n == 115:
        return [[[set(item) if isinstance(item, list) and len(item) else {} for item in inp[0]]] for inp in inputs]
    if n == 124:
        return [(float(inp[0]), complex(inp[1])) for inp in inputs]
    if n in _FIRST_ARG_TUPLE:
        return [[tuple(inp[0])] + [inp[1]] for inp in inputs]
    if n in _NESTED_TUPLES:
        return [_tuples([_tuples(arg) for arg in inp]) for inp in inputs]
    if n == 278:
        return [_tuples([[tuple(i) if isinstance(i, list) else i for i in inp[0]]]) for inp in inputs]
    if n == 307:
        return [[tuple(inp[0])] + [inp[1], inp[2]] for inp in inputs]
    if n == 722:
        return [[{k: tuple(v) for k, v in inp[0].items()}] + inp[1:] for inp in inputs]
    if n == 252:
        return [[complex(inp[0])] for inp in inputs]
    if n in _ALL_TUPLES:
        return [_all_tuples(inp) for inp in inputs]
    return inputs


def release_path(dataset: str) -> Path:
    """The shipped ``.jsonl.gz`` release of ``humaneval+`` or ``mbpp+``."""
    if dataset not in RELEASES:
        raise DataError(f"Unknown EvalPlus dataset {dataset!r}; use one of {', '.join(RELEASES)}.")
    return FILES_DIR / f"{RELEASES[dataset]}.jsonl.gz"


def read_release(dataset: str, data_path: str | Path | None = None) -> list[dict[str, Any]]:
    """The rows of a release (``data_path``: another copy, ``.jsonl`` or ``.jsonl.gz``)."""
    path = Path(data_path) if data_path else release_path(dataset)
    if not path.exists():
        raise DataError(
            f"{dataset} file not found: {path}. Reinstall codedistill or pass "
            f"--data-path to a copy of {RELEASES[dataset]}.jsonl(.gz)."
        )
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}).") from e
            missing = [k for k in REQUIRED_KEYS if k not in row]
            if missing:
                raise DataError(f"{path}:{lineno}: an EvalPlus row needs {', '.join(missing)}.")
            rows.append(row)
    return rows


def _humaneval_problem(row: dict[str, Any], visible_tests: bool = True) -> Problem:
    prompt, entry = row["prompt"], row["entry_point"]
    task = EvalPlusTask(
        "humaneval+",
        row["task_id"],
        entry,
        prompt + row["canonical_solution"],
        row["contract"],
        tuple(row["base_input"]),
        tuple(row["plus_input"]),
        float(row["atol"]),
    )
    return Problem(
        task_id=row["task_id"],
        prompt=prompt,
        entry_point=entry,
        tests=(f"check({entry})",),
        test_setup=row.get("test", ""),
        reference=task.canonical_program,
        split="test",
        dataset="humaneval+",
        code_prefix=prompt,
        description=prompt,
        visible_tests=docstring_tests(prompt, entry) if visible_tests else (),
        meta={"visible_tests_from": "docstring", "evalplus": task},
    )


def _mbpp_problem(row: dict[str, Any]) -> Problem:
    tid = row["task_id"]
    number = int(tid.split("/")[-1])
    m = _MBPP_PROMPT.fullmatch(row["prompt"])
    if m is None:
        raise DataError(f"{tid}: MBPP+ prompt is not a docstring holding the task and one assert.")
    lines = [ln for ln in row.get("assertion", "").split("\n") if ln.strip()]
    tests = tuple(ln for ln in lines if ln.startswith("assert"))
    setup = [ln for ln in lines if not ln.startswith("assert")]
    if any("math." in t for t in tests) and "import math" not in setup:
        setup.append("import math")
    task = EvalPlusTask(
        "mbpp+",
        tid,
        row["entry_point"],
        row["canonical_solution"],
        row["contract"],
        tuple(mbpp_deserialize_inputs(number, row["base_input"])),
        tuple(mbpp_deserialize_inputs(number, row["plus_input"])),
        float(row["atol"]),
        row.get("assertion", ""),
    )
    return Problem(
        task_id=tid,
        prompt=mbpp_prompt(m["text"], tests),
        entry_point=row["entry_point"],
        tests=tests,
        test_setup="\n".join(setup),
        reference=row["canonical_solution"],
        split=split_of(number),
        dataset="mbpp+",
        code_prefix="",
        description=m["text"],
        visible_tests=tests,
        meta={"mbpp_id": number, "evalplus": task},
    )


def load_evalplus(dataset: str, data_path: str | Path | None = None, visible_tests: bool = True) -> list[Problem]:
    """All problems of ``humaneval+`` (164, split ``test``) or ``mbpp+`` (378, MBPP's
    splits by task number), in release order; ``visible_tests=False``: HumanEval+'s
    without the visible tests parsed from their docstrings."""
    rows = read_release(dataset, data_path)
    if dataset == "humaneval+":
        return [_humaneval_problem(r, visible_tests) for r in rows]
    return [_mbpp_problem(r) for r in rows]


def is_evalplus(problem: Problem) -> bool:
    """A ``humaneval+`` / ``mbpp+`` problem, judged as EvalPlus judges (not by its ``tests``)."""
    return isinstance(problem.meta.get("evalplus"), EvalPlusTask)


def evalplus_task(problem: Problem) -> EvalPlusTask:
    """The EvalPlus task a ``humaneval+`` / ``mbpp+`` problem carries."""
    task = problem.meta.get("evalplus")
    if not isinstance(task, EvalPlusTask):
        raise DataError(
            f"{problem.task_id} ({problem.dataset or 'unknown dataset'}) is not an "
            "EvalPlus problem; load it with --dataset humaneval+ or mbpp+."
        )
    return task


__all__ = [
    "EVALPLUS_DATASETS",
    "RELEASES",
    "EvalPlusTask",
    "evalplus_task",
    "is_evalplus",
    "load_evalplus",
    "mbpp_deserialize_inputs",
    "read_release",
    "release_path",
]
