"""The unit of every benchmark: one programming problem with its tests."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: the datasets judged as EvalPlus judges them (:mod:`codedistill.data.evalplus`); named here, in
#: a leaf module, so that knowing them imports neither that module nor the data package
EVALPLUS_DATASETS = ("humaneval+", "mbpp+")


@dataclass(frozen=True)
class Problem:
    """One programming problem.

    ``prompt`` is the text a *base* model completes (HumanEval: signature + docstring;
    MBPP: description plus its asserts). ``code_prefix`` is the part of the prompt that
    is already code and that a completion continues (HumanEval: the whole prompt; MBPP
    and synth: empty, the completion is the whole program). ``tests`` are snippets run
    one by one after the program and ``test_setup`` (MBPP: one assert each; HumanEval: a
    single ``check(entry_point)`` call, with ``check`` defined in ``test_setup``).
    ``visible_tests`` are the tests a method may look at while generating (EG-CFG,
    MBPP's prompt asserts); ``description`` is the natural-language task alone.
    """

    task_id: str
    prompt: str
    entry_point: str
    tests: tuple[str, ...]
    test_setup: str = ""
    reference: str = ""
    split: str = "test"
    dataset: str = ""
    code_prefix: str = ""
    description: str = ""
    visible_tests: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def program(self, completion: str) -> str:
        """The full program a completion stands for (prefix + completion)."""
        return self.code_prefix + completion

    def reference_completion(self) -> str:
        """The completion that turns ``code_prefix`` into the reference solution."""
        if self.code_prefix and self.reference.startswith(self.code_prefix):
            return self.reference[len(self.code_prefix) :]
        return self.reference

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tests"] = list(self.tests)
        d["visible_tests"] = list(self.visible_tests)
        return d
