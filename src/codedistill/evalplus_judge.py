"""Judge programs on HumanEval+ / MBPP+ exactly as ``evalplus.evaluate`` (0.3.1) judges them.

A program passes *base* when its output on every base input equals the canonical
solution's output on that input, and *plus* when it passes base and every plus input too
(EvalPlus's ``base_status == plus_status == "pass"``). Per input, as EvalPlus's
``unsafe_execute``:

* the program is executed once (``exec`` in fresh globals without ``__name__``, so its
  ``if __name__ == "__main__"`` block does not run; ``open`` is None; stdout, stderr and
  stdin swallowed), then ``fn(*input)`` is called under a time limit of
  ``max(min_time_limit, gt_time_limit_factor * t)`` (defaults 1 s and 4), ``t`` the canonical
  solution's own time on that input measured here; each of base and plus also has EvalPlus's
  budget of ``min(60, sum of its limits) + 2`` seconds;
* outputs are compared as EvalPlus compares them: ``==``; else for float outputs (or a task
  ``atol``) ``numpy.allclose(rtol=1e-7, atol)`` after a type and length check (a float
  expected output switches ``atol`` 0 to 1e-6 for the rest of that phase, as there); the
  MBPP+ special oracles (set equality, not-None outputs, ``are_equivalent``, ``sum_div``,
  ``surface_Area``, ``digit_distance_nums``); HumanEval/32 (``find_zero``) checks
  ``|poly(xs, x)| <= atol`` and, as in evalplus 0.3.1, never counts such an input as
  passed, so no program passes HumanEval/32 there or here;
* the first failing input ends the phase (EvalPlus's fast mode); a failing base ends the run.

All of a program's inputs run in one sandboxed process (tests mode): the generated
set-up loads the inputs and expected outputs, executes the program and defines the phase
runner; test 0 runs the base inputs, test 1 the plus inputs. A watchdog thread ends the
process when an input overruns its limit, so ``Verdict.per_test`` says how far it got.

Expected outputs and reference times are computed once per machine by running the
canonical solutions in the sandbox (call mode, :func:`compute_reference`) and cached under
``$CODEDISTILL_CACHE/evalplus/<release>/`` (else ``~/.cache/codedistill/...``). Inputs
that violate the task's contract are not tests (three tasks of the releases have some:
HumanEval/32, HumanEval/116, Mbpp/267, which evalplus 0.3.1 still runs); an input on which
the canonical solution raises is dropped too, and the task is flagged
(:attr:`EvalPlusJudge.flags`). An input on which it overruns ``reference_cap_s`` is given
the longer cap :func:`long_cap` (``LONG_CAP_FACTOR`` times, at most ``LONG_CAP_MAX_S``) to
obtain its expected output: if it then finishes, the input stays a test and its reference
time is the cap itself (the limit), and the task is flagged; if not, the input is dropped
and the task is flagged.

Known differences from evalplus (timing only): reference times are measured here, not
by evalplus, so limits above the 1 s minimum differ with the machine; the program is
executed once for both phases (evalplus executes it once per phase); an object whose
``__eq__`` claims equality with anything is refused (the sandbox's guarded ``==``); a program
that alters the real ``builtins`` module fails (the sandbox's integrity check).
"""

from __future__ import annotations

import ast
import base64
import copy
import hashlib
import json
import os
import pickle
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codedistill.data.evalplus import EvalPlusTask, evalplus_task
from codedistill.data.problem import Problem
from codedistill.errors import DataError
from codedistill.execution import Job, Limits, SandboxPool, Verdict

MIN_TIME_LIMIT = 1.0  # evalplus.config.DEFAULT_MIN_TIME_LIMIT
GT_TIME_LIMIT_FACTOR = 4.0  # evalplus.config.DEFAULT_GT_TIME_LIMIT_FACTOR
PHASE_TIMEOUT_CAP = 60.0  # evalplus: EVALPLUS_TIMEOUT_PER_TASK
MEMORY_MB = 4096  # evalplus: EVALPLUS_MAX_MEMORY_BYTES
REFERENCE_CAP_S = 20.0
#: an input on which the canonical solution overruns the reference cap is given this many
#: times the cap (at most LONG_CAP_MAX_S) to finish; its reference time is then the cap
LONG_CAP_FACTOR = 10.0
LONG_CAP_MAX_S = 200.0
OUTPUT_CAP_BYTES = 4_000_000  # an expected output larger than this (pickled) is not a test
#: part of each cached reference's key: bump it when what a reference holds changes
#: (2: inputs over the reference cap kept with the cap as their time, not dropped)
REFERENCE_FORMAT = 2
#: what a sandbox pool must import before its guard for this judge: numpy cannot be
#: imported inside a sandbox (its import needs frames the audit hook refuses)
WARM_TARGETS = ("numpy", __name__)
PHASES = ("base", "plus")
TIMEOUT_EXIT = 124
_WATCHDOG_TAG = "evalplus-timeout"

# evalplus/eval/_special_oracle.py (0.3.1)
MBPP_OUTPUT_NOT_NONE_TASKS = ("check_str", "text_match_three", "text_starta_endb")
MBPP_OUTPUT_SET_EQ_TASKS = (
    "similar_elements",
    "find_char_long",
    "common_in_nested_lists",
    "extract_singly",
    "larg_nnum",
    "intersection_array",
    "find_dissimilar",
    "Diff",
)
MBPP_SPECIAL = ("are_equivalent", "sum_div", "surface_Area", "digit_distance_nums")


def oracle_of(task: EvalPlusTask) -> str:
    """How outputs of ``task`` are compared: ``eq`` or the name of EvalPlus's special oracle."""
    if task.dataset == "humaneval+":
        return "find_zero" if task.entry_point == "find_zero" else "eq"
    if task.entry_point in MBPP_SPECIAL:
        return task.entry_point
    if task.entry_point in MBPP_OUTPUT_SET_EQ_TASKS:
        return "set_eq"
    if task.entry_point in MBPP_OUTPUT_NOT_NONE_TASKS:
        return "not_none"
    return "eq"


def default_cache_dir() -> Path:
    """``$CODEDISTILL_CACHE/evalplus`` if set, else ``~/.cache/codedistill/evalplus``."""
    root = os.environ.get("CODEDISTILL_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "codedistill") / "evalplus"


# ------------------------------------------------------------- reference (in the sandbox)
def contract_program(task: EvalPlusTask) -> str:
    """The canonical program with the entry point's body replaced by the contract's
    asserts (then ``return None``): calling it checks an input's validity only."""
    tree = ast.parse(task.canonical_program)
    body = ast.parse(_dedent(task.contract)).body if task.contract.strip() else []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == task.entry_point:
            node.body = body + [ast.Return(value=ast.Constant(None))]
    return ast.unparse(ast.fix_missing_locations(tree))


def _dedent(src: str) -> str:
    return textwrap.dedent(src.strip("\n"))


def _is_floats(x: Any) -> bool:
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)) and x:
        return all(isinstance(i, float) for i in x)
    return type(x).__module__ == "numpy"


def long_cap(cap_s: float) -> float:
    """How long the canonical solution may run on an input that overran ``cap_s``:
    ``LONG_CAP_FACTOR * cap_s``, at most ``LONG_CAP_MAX_S`` (and never below the cap)."""
    return max(cap_s, min(LONG_CAP_FACTOR * cap_s, LONG_CAP_MAX_S))


def _run_phase(fn, check, inputs, skip, skip_reason, output_not_none, progress) -> None:
    for i, inp in enumerate(inputs):
        progress["at"] = (i, time.perf_counter())  # one store: the watcher reads index and start together
        if i in skip:
            progress["dropped"][i] = skip_reason
            continue
        try:
            check(*copy.deepcopy(inp))
        except BaseException:  # noqa: BLE001 - any failure of a contract assert
            progress["dropped"][i] = "violates the task's contract"
            continue
        arg = copy.deepcopy(inp)
        try:
            start = time.time()
            out = fn(*arg)
            progress["times"][i] = time.time() - start
        except BaseException as e:  # noqa: BLE001
            progress["dropped"][i] = f"the canonical solution raised {type(e).__name__}"
            continue
        progress["outputs"][i] = (out is not None) if output_not_none else out
    progress["at"] = (len(inputs), time.perf_counter())


def compute_reference(
    program: str,
    checker: str,
    entry_point: str,
    inputs_b64: str,
    skip: Mapping[str, list[int]],
    output_not_none: bool,
    cap_s: float,
) -> dict:
    """Sandbox call target: the canonical ``program``'s outputs and times on each phase's
    inputs (as ``evalplus.gen.util.trusted_exec``: a fresh ``exec`` per phase, a deep copy
    of each input, ``time.time()`` around the call), skipping the ``skip`` indices and
    dropping contract violations. An input still running after ``cap_s`` is waited for up
    to :func:`long_cap`: if it finishes, it is kept with ``cap_s`` as its time (listed in
    the phase's ``capped``); if not, the call ends and its phase and index come back as
    ``overran`` (the caller skips it and calls again)."""
    inputs = pickle.loads(base64.b85decode(inputs_b64))
    long_s = long_cap(cap_s)
    skip_reason = f"the canonical solution overran {long_s:g} s (the {cap_s:g} s reference cap, extended)"
    capped_reason = (
        f"the canonical solution overran the {cap_s:g} s reference cap and finished within {long_s:g} s; "
        f"its reference time is the cap"
    )
    result: dict[str, Any] = {}
    for phase in PHASES:
        g: dict = {}
        exec(program, g)  # noqa: S102 - the release's canonical solution
        c: dict = {}
        exec(checker, c)  # noqa: S102
        progress = {"at": (-1, time.perf_counter()), "times": {}, "outputs": {}, "dropped": {}}
        worker = threading.Thread(
            target=_run_phase,
            daemon=True,
            args=(
                g[entry_point],
                c[entry_point],
                inputs[phase],
                set(skip.get(phase, ())),
                skip_reason,
                output_not_none,
                progress,
            ),
        )
        capped: set[int] = set()
        worker.start()
        while worker.is_alive():
            at = progress["at"]
            index, start = at
            worker.join(max(0.01, start + cap_s - time.perf_counter()))
            if not worker.is_alive() or progress["at"] is not at or index < 0:
                continue
            if time.perf_counter() - start < cap_s:
                continue
            worker.join(max(0.0, start + long_s - time.perf_counter()))  # the overrun input's longer cap
            if worker.is_alive() and progress["at"] is at:
                return {"overran": [phase, index]}
            capped.add(index)
        payload = _phase_payload(progress, len(inputs[phase]))
        for i in capped:
            if i in payload["keep"]:
                payload["times"][payload["keep"].index(i)] = cap_s
        payload["capped"] = {str(i): capped_reason for i in sorted(capped) if i in payload["keep"]}
        result[phase] = payload
    return result


def _phase_payload(progress: dict, n: int) -> dict:
    keep = [i for i in range(n) if i in progress["outputs"]]
    dropped = dict(progress["dropped"])
    outputs = []
    for i in keep:
        try:
            size = len(pickle.dumps(progress["outputs"][i]))
        except Exception:  # noqa: BLE001
            dropped[i] = "the canonical output cannot be pickled"
            continue
        if size > OUTPUT_CAP_BYTES:
            dropped[i] = f"the canonical output is over {OUTPUT_CAP_BYTES // 1_000_000} MB"
        else:
            outputs.append(progress["outputs"][i])
    keep = [i for i in keep if i not in dropped]
    return {
        "keep": keep,
        "times": [progress["times"][i] for i in keep],
        "outputs": base64.b85encode(pickle.dumps(outputs)).decode(),
        "floats": any(_is_floats(o) for o in outputs),
        "dropped": {str(i): why for i, why in sorted(dropped.items())},
    }


# ------------------------------------------------------------- the reference cache (host)
@dataclass
class Reference:
    """A task's expected outputs (an opaque pickle made in the sandbox) and canonical times,
    for the inputs kept as tests (``keep``: indices into the phase's inputs); ``flags``
    say which inputs were dropped and why; ``complete`` is False when the canonical
    solution could not be run here at all (then nothing is cached)."""

    keep: dict[str, list[int]]
    times: dict[str, list[float]]
    outputs: dict[str, str]
    floats: bool
    flags: list[str] = field(default_factory=list)
    complete: bool = True


def _task_key(task: EvalPlusTask, cap_s: float) -> str:
    """What a cached reference depends on: its format, the task, and the caps (an input
    over the cap is kept with the cap as its time)."""
    blob = json.dumps(
        [
            REFERENCE_FORMAT,
            cap_s,
            long_cap(cap_s),
            task.canonical_program,
            task.contract,
            repr(task.base_input),
            repr(task.plus_input),
        ]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_file(cache_dir: Path, task: EvalPlusTask, cap_s: float = REFERENCE_CAP_S) -> Path:
    name = task.task_id.replace("/", "_")
    return cache_dir / task.release / f"{name}.{_task_key(task, cap_s)}.pkl"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _reference_job(task: EvalPlusTask, skip: dict[str, list[int]], cap_s: float) -> tuple[dict, Limits]:
    inputs = base64.b85encode(pickle.dumps({"base": list(task.base_input), "plus": list(task.plus_input)})).decode()
    args = {
        "program": task.canonical_program,
        "checker": contract_program(task),
        "entry_point": task.entry_point,
        "inputs_b64": inputs,
        "skip": skip,
        "output_not_none": oracle_of(task) == "not_none",
        "cap_s": cap_s,
    }
    limits = Limits(timeout=max(600.0, long_cap(cap_s) * 3), memory_mb=MEMORY_MB, max_payload_bytes=256_000_000)
    return args, limits


def compute_task_reference(pool: SandboxPool, task: EvalPlusTask, cap_s: float = REFERENCE_CAP_S) -> Reference:
    """Run the canonical solution of ``task`` in the sandbox until no input overruns
    :func:`long_cap` (each one that does is skipped in the next call)."""
    skip: dict[str, list[int]] = {p: [] for p in PHASES}
    while True:
        args, limits = _reference_job(task, skip, cap_s)
        v = pool.call(f"{__name__}:compute_reference", args, limits)
        if not v.passed or not isinstance(v.payload, dict):
            return _unusable(task, f"reference run failed here ({v.result})")
        if "overran" in v.payload:
            phase, index = v.payload["overran"]
            skip[phase].append(int(index))
            continue
        return _reference_from(v.payload)


def _unusable(task: EvalPlusTask, why: str) -> Reference:
    empty = base64.b85encode(pickle.dumps([])).decode()
    return Reference(
        {p: [] for p in PHASES},
        {p: [] for p in PHASES},
        {p: empty for p in PHASES},
        False,
        [f"{task.task_id}: {why}"],
        complete=False,
    )


def _reference_from(payload: dict) -> Reference:
    counts = Counter((p, why) for p in PHASES for why in payload[p]["dropped"].values())
    flags = [f"{n} {p} input(s) dropped: {why}" for (p, why), n in counts.items()]
    capped = Counter((p, why) for p in PHASES for why in payload[p]["capped"].values())
    flags += [f"{n} {p} input(s) kept: {why}" for (p, why), n in capped.items()]
    return Reference(
        {p: payload[p]["keep"] for p in PHASES},
        {p: payload[p]["times"] for p in PHASES},
        {p: payload[p]["outputs"] for p in PHASES},
        any(payload[p]["floats"] for p in PHASES),
        flags,
    )


def load_or_compute_references(
    pool: SandboxPool, tasks: Sequence[EvalPlusTask], cache_dir: Path | None = None, cap_s: float = REFERENCE_CAP_S
) -> dict[str, Reference]:
    """References of ``tasks``: read from the cache, the missing ones computed (in
    parallel on the pool) and written there atomically."""
    cache_dir = cache_dir or default_cache_dir()
    out: dict[str, Reference] = {}
    missing = []
    for task in tasks:
        path = _cache_file(cache_dir, task, cap_s)
        try:
            with open(path, "rb") as f:
                out[task.task_id] = pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
            missing.append(task)
    if missing:
        with ThreadPoolExecutor(max_workers=pool.workers) as ex:
            refs = list(ex.map(lambda t: compute_task_reference(pool, t, cap_s), missing))
        for task, ref in zip(missing, refs):
            if ref.complete:
                _write_atomic(_cache_file(cache_dir, task, cap_s), pickle.dumps(ref))
            out[task.task_id] = ref
    return out


# ------------------------------------------------------------- the harness (in the sandbox)
_HARNESS = (
    r'''
def __cd_make():
    import builtins, contextlib, io, math, os, pickle, sys, time, _thread, base64
    perf, sleep, write, _exit = time.perf_counter, time.sleep, os.write, os._exit
    data = pickle.loads(base64.b85decode(__cd_blob))
    expected = [pickle.loads(base64.b85decode(s)) for s in __cd_out]
    inputs, limits = data["inputs"], data["limits"]
    oracle, atol0, entry = data["oracle"], data["atol"], data["entry_point"]
    np = None
    if data["numpy"]:
        import numpy as np

    class WriteOnlyStringIO(io.StringIO):
        def read(self, *a, **k): raise IOError
        def readline(self, *a, **k): raise IOError
        def readlines(self, *a, **k): raise IOError
        def readable(self, *a, **k): return False

    class redirect_stdin(contextlib._RedirectStream):
        _stream = "stdin"

    @contextlib.contextmanager
    def swallow_io():
        stream = WriteOnlyStringIO()
        with contextlib.redirect_stdout(stream):
            with contextlib.redirect_stderr(stream):
                with redirect_stdin(stream):
                    yield

    clock = [None, None, ""]  # input deadline, phase deadline, what overran

    def watchdog():
        while True:
            d, p = clock[0], clock[1]
            due = min(x for x in (d, p, perf() + 0.05) if x is not None)
            now = perf()
            if now < due:
                sleep(min(due - now, 0.05))
                continue
            if (d is not None and clock[0] is d and now >= d) or \
                    (p is not None and clock[1] is p and now >= p):
                write(2, ("\n%s\t%s\n" % ("'''
    + _WATCHDOG_TAG
    + r"""", clock[2])).encode())
                _exit("""
    + str(TIMEOUT_EXIT)
    + r""")

    def is_floats(x):
        if isinstance(x, float):
            return True
        if isinstance(x, (list, tuple)) and x:
            return all(isinstance(i, float) for i in x)
        if np is not None and isinstance(x, np.ndarray):
            return x.dtype == np.float64 or x.dtype == np.float32

        return False

    def surface_area(base_edge, height):
        slant_height = math.sqrt((base_edge / 2) ** 2 + height**2)
        return round(base_edge**2 + 4 * (base_edge * slant_height) / 2)

    def digit_distance(num1, num2):
        s1, s2 = str(num1), str(num2)
        n = max(len(s1), len(s2))
        s1, s2 = s1.zfill(n), s2.zfill(n)
        return sum(abs(int(a) - int(b)) for a, b in zip(s1, s2))

    def poly(xs, x):
        return sum([coeff * math.pow(x, i) for i, coeff in enumerate(xs)])

    def run(phase):
        name = ("base", "plus")[phase]
        if phase and not state.get("base_ok"):
            raise AssertionError("plus: not run, base failed")
        if phase:
            clock[1] = perf() + data["budget"][1]
        try:
            check_phase(phase, name)
        finally:
            clock[0] = clock[1] = None
        state["base_ok"] = True

    def check_phase(phase, name):
        fn, atol, uncounted = state["fn"], atol0, False
        for i, inp in enumerate(inputs[phase]):
            clock[2] = "%s input %d (limit %.2f s)" % (name, i, limits[phase][i])
            try:
                clock[0] = perf() + limits[phase][i]
                with swallow_io():
                    out = fn(*inp)
                clock[0] = None
                exp = expected[phase][i]
                exact_match = out == exp
                if oracle == "are_equivalent":
                    exact_match = exact_match or True
                elif oracle == "sum_div":
                    exact_match = exact_match or out == 0
                elif oracle == "surface_Area":
                    exact_match = exact_match or abs(out - surface_area(*inp)) <= atol
                elif oracle == "digit_distance_nums":
                    exact_match = exact_match or out == digit_distance(*inp)
                elif oracle == "set_eq":
                    exact_match = set(out) == set(exp)
                elif oracle == "not_none":
                    if isinstance(out, bool):
                        exact_match = out == exp
                    else:
                        exact_match = exp == (out is not None)
                elif oracle == "find_zero":
                    assert abs(poly(*inp, out)) <= atol
                    uncounted = True
                    continue
                if not atol and is_floats(exp):
                    atol = 1e-6
                if not exact_match and atol:
                    assert type(out) == type(exp)
                    if isinstance(exp, (list, tuple)):
                        assert len(out) == len(exp)
                    assert np.allclose(out, exp, rtol=1e-07, atol=atol)
                else:
                    assert exact_match
            except BaseException as e:
                clock[0] = None
                why = "wrong output" if type(e) is AssertionError else "raised " + type(e).__name__
                raise AssertionError("%s input %d: %s" % (name, i, why)) from None
        if uncounted:
            raise AssertionError("%s: find_zero inputs never count as passed in evalplus 0.3.1" % name)

    state = {}
    _thread.start_new_thread(watchdog, ())
    clock[2] = "base phase (budget %.0f s)" % data["budget"][0]
    clock[1] = perf() + data["budget"][0]
    own = dict(__builtins__ if isinstance(__builtins__, dict) else vars(__builtins__))
    own["open"] = None
    g = {"__builtins__": own}
    with swallow_io():
        exec(compile(__cd_program, "<program>", "exec"), g)
        if entry not in g:
            raise NameError("the program defines no %s" % entry)
        state["fn"] = g[entry]
    return run

__cd_run = __cd_make()
del __cd_make, __cd_blob, __cd_out, __cd_program
"""
)
TESTS = ("__cd_run(0)", "__cd_run(1)")


def time_limits(
    times: Sequence[float], min_time_limit: float = MIN_TIME_LIMIT, factor: float = GT_TIME_LIMIT_FACTOR
) -> list[float]:
    """EvalPlus's per-input limits: ``max(min_time_limit, factor * canonical time)``."""
    return [max(min_time_limit, factor * t) for t in times]


def phase_budget(limits: Sequence[float]) -> float:
    """EvalPlus's wall-clock budget of one phase, ``min(60, sum(limits)) + 1``, plus the
    second its ``join`` adds."""
    return min(PHASE_TIMEOUT_CAP, sum(limits)) + 2.0


def task_setup_head(task: EvalPlusTask, ref: Reference, min_time_limit: float, factor: float) -> tuple[str, Limits]:
    """The per-task part of the harness (inputs, limits, expected outputs) and the
    sandbox limits of one run: the two phase budgets and a margin for loading."""
    phases = (list(task.base_input), list(task.plus_input))
    inputs = [[ph[i] for i in ref.keep[name]] for ph, name in zip(phases, PHASES)]
    limits = [time_limits(ref.times[p], min_time_limit, factor) for p in PHASES]
    budget = [phase_budget(lim) for lim in limits]
    blob = pickle.dumps(
        {
            "inputs": inputs,
            "limits": limits,
            "budget": budget,
            "oracle": oracle_of(task),
            "atol": task.atol,
            "entry_point": task.entry_point,
            "numpy": ref.floats or task.atol != 0,
        }
    )
    head = (
        f"__cd_blob = {base64.b85encode(blob).decode()!r}\n"
        f"__cd_out = [{ref.outputs['base']!r}, {ref.outputs['plus']!r}]\n"
    )
    return head, Limits(timeout=sum(budget) + 10.0, memory_mb=MEMORY_MB)


@dataclass(frozen=True)
class EvalPlusVerdict:
    """One program's EvalPlus verdict: ``base_passed``; ``plus_passed`` (base and plus
    inputs all pass, EvalPlus's ``base_status == plus_status == "pass"``); ``result``
    says why not (the first failing input, a timeout, or the program's own error)."""

    task_id: str
    base_passed: bool
    plus_passed: bool
    result: str
    duration_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.plus_passed

    def to_row(self) -> dict[str, Any]:
        """Result-row fields: ``passed`` (= ``plus_passed``), ``base_passed``,
        ``plus_passed``, ``result``, and the two phases as ``tests_passed`` of
        ``tests_total`` = 2 (``pass_rate`` their ratio)."""
        n = int(self.base_passed) + int(self.plus_passed)
        return {
            "passed": self.plus_passed,
            "base_passed": self.base_passed,
            "plus_passed": self.plus_passed,
            "result": self.result,
            "tests_passed": n,
            "tests_total": 2,
            "pass_rate": n / 2,
        }


def verdict_of(task_id: str, v: Verdict) -> EvalPlusVerdict:
    base = bool(v.per_test and v.per_test[0])
    plus = bool(base and len(v.per_test) > 1 and v.per_test[1])
    if plus:
        result = "passed"
    elif _WATCHDOG_TAG in v.stderr:
        what = v.stderr.rsplit(_WATCHDOG_TAG + "\t", 1)[1].split("\n", 1)[0]
        result = f"timed out: {what}"
    else:
        result = v.result.replace("failed: AssertionError: ", "failed: ")
    return EvalPlusVerdict(task_id, base, plus, result, v.duration_s)


class EvalPlusJudge:
    """Judges (task id, program) pairs of ``humaneval+`` / ``mbpp+`` problems as
    ``evalplus.evaluate`` does (see the module doc).

    ``problems``: the dataset's problems (those of :func:`codedistill.data.load_problems`);
    ``pool``: a :class:`SandboxPool` to run on, one warmed with :data:`WARM_TARGETS` (else,
    or when it is not, one of ``workers`` (default: the pool's) is opened and closed with
    the judge); references are cached under ``cache_dir``
    (default :func:`default_cache_dir`). :attr:`flags` lists, per task, the inputs dropped
    from its tests and why.
    """

    def __init__(
        self,
        problems: Sequence[Problem],
        pool: SandboxPool | None = None,
        workers: int | None = None,
        cache_dir: str | Path | None = None,
        min_time_limit: float = MIN_TIME_LIMIT,
        gt_time_limit_factor: float = GT_TIME_LIMIT_FACTOR,
        reference_cap_s: float = REFERENCE_CAP_S,
    ):
        self.tasks = {p.task_id: evalplus_task(p) for p in problems}
        self._own_pool = pool is None or not is_warm(pool)
        if self._own_pool:
            workers = workers or (pool.workers if pool is not None else None)
            self.pool = SandboxPool(workers=workers, warm_targets=list(WARM_TARGETS))
        else:
            assert pool is not None
            self.pool = pool
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.min_time_limit, self.factor = min_time_limit, gt_time_limit_factor
        self.reference_cap_s = reference_cap_s
        self.references: dict[str, Reference] = {}
        self._heads: dict[str, tuple[str, Limits]] = {}

    def __enter__(self) -> EvalPlusJudge:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._own_pool:
            self.pool.close()

    @property
    def flags(self) -> dict[str, list[str]]:
        return {t: r.flags for t, r in self.references.items() if r.flags}

    def check_task_ids(self, task_ids: Sequence[str]) -> None:
        unknown = sorted(set(task_ids) - set(self.tasks), key=str)
        if unknown:
            shown = ", ".join(map(repr, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
            hint = next(iter(self.tasks), "?")
            raise DataError(
                f"{len(unknown)} task id(s) not in this dataset: {shown} (ids look "
                f"like {hint!r}); check --dataset (humaneval+ or mbpp+) and --split."
            )

    def prepare(self, task_ids: Sequence[str]) -> None:
        """Load or compute the references of ``task_ids`` (once per machine)."""
        self.check_task_ids(task_ids)
        todo = [self.tasks[t] for t in dict.fromkeys(task_ids) if t not in self.references]
        self.references.update(load_or_compute_references(self.pool, todo, self.cache_dir, self.reference_cap_s))

    def job(self, task_id: str, program: str) -> Job:
        if task_id not in self._heads:
            self._heads[task_id] = task_setup_head(
                self.tasks[task_id], self.references[task_id], self.min_time_limit, self.factor
            )
        head, limits = self._heads[task_id]
        setup = f"{head}__cd_program = {program!r}\n{_HARNESS}"
        return Job(program="", tests=TESTS, test_setup=setup, limits=limits)

    def judge(
        self, samples: Sequence[tuple[str, str]], progress: Callable[[int], None] | None = None
    ) -> list[EvalPlusVerdict]:
        """Verdicts of (task id, whole program) pairs, in input order."""
        self.prepare([t for t, _ in samples])
        runnable = [i for i, (t, _) in enumerate(samples) if self.references[t].complete]
        verdicts = self.pool.run([self.job(*samples[i]) for i in runnable], progress=progress)
        out = [
            EvalPlusVerdict(
                t,
                False,
                False,
                f"failed: no expected outputs for this task on this machine ({'; '.join(self.references[t].flags)})",
            )
            for t, _ in samples
        ]
        for i, v in zip(runnable, verdicts):
            out[i] = verdict_of(samples[i][0], v)
        return out


def is_warm(pool: SandboxPool) -> bool:
    """Whether ``pool``'s servers import what the judge needs (:data:`WARM_TARGETS`)."""
    return all(t in pool.warm_targets for t in WARM_TARGETS)


def judge_programs(
    problems: Sequence[Problem],
    samples: Sequence[tuple[str, str]],
    workers: int | None = None,
    pool: SandboxPool | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Result rows (:meth:`EvalPlusVerdict.to_row`) of (task id, program) pairs."""
    with EvalPlusJudge(problems, pool=pool, workers=workers) as judge:
        return [v.to_row() for v in judge.judge(samples, progress=progress)]
