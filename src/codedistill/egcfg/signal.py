"""The dynamic signal: executable candidate prefixes, their traces as prompt text.

* :func:`make_executable` turns a partial program (prefix + a d-line candidate) into the
  longest version that parses: trailing incomplete lines are dropped, and a block header
  left without a body (``def f(x):``, ``for ...:``) gets an indented ``pass``.
* :func:`format_trace` writes one candidate's trace as Python comments (base models stay in
  "code mode"): its new lines, then per test the executed lines with the variables they
  changed, the return value against the expected one, and exceptions with their line.
* :func:`build_signal` joins the candidates within a token budget (each candidate gets an
  equal share; a trace that does not fit is cut line-wise with a ``# ...`` marker).
* :func:`insert_signal` places the block in the prompt: before the last ``anchor``
  (``[BEGIN]`` of the MBPP/synth base format) if there is one, else before the code
  prefix the prompt ends with (HumanEval), else at the end.
"""

from __future__ import annotations

import ast
from typing import Any, Callable, Sequence

DEFAULT_HEADER = "# Execution feedback: candidate continuations were run on the tests.\n"
DEFAULT_TEMPLATE = "{header}{traces}# End of execution feedback.\n"

_BLOCK_OPENERS = ("def ", "class ", "if ", "elif ", "else", "for ", "while ", "with ", "try",
                  "except", "finally", "async ")


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except (SyntaxError, ValueError):
        return False


def make_executable(code: str) -> str:
    """The longest parsing prefix of ``code`` (by whole lines), with an indented ``pass``
    added when it ends in a block header without a body; "" when no line parses."""
    return make_executable_ex(code)[0]


def make_executable_ex(code: str) -> tuple[str, str]:
    """(:func:`make_executable` of ``code``, the non-blank text of the lines it dropped)."""
    lines = code.split("\n")
    for end in range(len(lines), -1, -1):
        chunk = lines[:end]
        while chunk and not chunk[-1].strip():
            chunk = chunk[:-1]
        dropped = "\n".join(x for x in lines[len(chunk):] if x.strip())
        text = "\n".join(chunk)
        if _parses(text):
            return (text + "\n" if text else ""), dropped
        if chunk:
            last = chunk[-1]
            stripped = last.strip()
            if stripped.endswith(":") or stripped.startswith(_BLOCK_OPENERS):
                indent = last[: len(last) - len(last.lstrip())]
                fixed = text + "\n" + indent + "    pass"
                if _parses(fixed):
                    return fixed + "\n", dropped
    return "", "\n".join(x for x in lines if x.strip())


def _fmt_vars(d: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def format_trace(program: str, trace: dict, new_from_line: int = 1, max_tests: int | None = None,
                 dropped: str = "") -> list[str]:
    """Comment lines describing one candidate's execution (see module doc).

    ``program`` is the executed program, ``trace`` the tracer's result, ``new_from_line``
    the first line of the candidate's own (new) code, shown as the candidate; ``dropped``
    the candidate's lines that had to be cut for the program to parse (shown as such).
    """
    src = program.split("\n")
    out = ["# Candidate:"]
    for ln in range(max(1, new_from_line), len(src) + 1):
        if src[ln - 1].strip():
            out.append(f"#   {src[ln - 1]}")
    if dropped:  # the first cut line, shortened: what the candidate was about to do
        d = dropped.split("\n")[0]
        d = d if len(d) <= 72 else d[:69] + "..."
        more = " (+ more)" if "\n" in dropped else ""
        out.append(f"#   {d}  <- not run (does not parse yet){more}")
    if trace.get("error"):  # the sandbox job itself failed (e.g. an endless loop hit its limit)
        out.append(f"#   Execution stopped: {trace['error']}")
        return out
    err = trace.get("compile_error")
    if err:
        out.append(f"#   SyntaxError at line {err.get('line')}: {err.get('message')}")
        return out
    tests = trace.get("tests", [])
    if max_tests is not None:
        tests = tests[:max_tests]
    for t in tests:
        out.append(f"# Test: {t['test'].strip()}")
        for e in t.get("events", []):
            line = e.get("line")
            code = src[line - 1].strip() if isinstance(line, int) and 0 < line <= len(src) else ""
            if e["event"] == "call":
                out.append(f"#   call {e['func']}({_fmt_vars(e.get('args', {}))})")
            elif e["event"] == "line":
                v = _fmt_vars(e.get("vars", {}))
                out.append(f"#   line {line}: {code}" + (f"  -> {v}" if v else ""))
            elif e["event"] == "return":
                out.append(f"#   {e['func']} returned {e['value']}")
            elif e["event"] == "exception":
                out.append(f"#   line {line}: {code}  !! {e['type']}: {e['message']}")
        if t.get("truncated"):
            out.append("#   ... (trace truncated)")
        exc = t.get("exception")
        if exc:
            where = f" at line {exc['line']}" if exc.get("line") else ""
            out.append(f"#   Result: {exc['type']}{where}: {exc['message']}")
        elif t.get("call") is not None:
            verdict = "passed" if t.get("passed") else "failed"
            out.append(f"#   Result: {t['call']} = {t['result']}; expected {t['expected']} ({verdict})")
        else:
            out.append(f"#   Result: {'passed' if t.get('passed') else 'failed'}")
    return out


def _fit(lines: list[str], budget: int, count: Callable[[str], int]) -> str:
    """As many leading lines as fit in ``budget`` tokens (cut marker included)."""
    text = "\n".join(lines) + "\n"
    if count(text) <= budget:
        return text
    lo, hi = 0, len(lines)
    while lo < hi:  # largest k with lines[:k] + marker within budget
        mid = (lo + hi + 1) // 2
        if count("\n".join(lines[:mid] + ["# ..."]) + "\n") <= budget:
            lo = mid
        else:
            hi = mid - 1
    return "\n".join(lines[:lo] + ["# ..."]) + "\n" if lo else ""


def build_signal(
    candidates: Sequence[tuple],
    count_tokens: Callable[[str], int],
    budget_tokens: int,
    template: str = DEFAULT_TEMPLATE,
    header: str = DEFAULT_HEADER,
    max_tests: int | None = None,
) -> str:
    """The signal block for (program, trace, new_from_line[, dropped]) candidates; "" if none."""
    if not candidates or budget_tokens <= 0:
        return ""
    frame = template.format(header=header, traces="")
    left = budget_tokens - count_tokens(frame)
    if left <= 0:
        return ""
    share = left // len(candidates)
    parts = [_fit(format_trace(c[0], c[1], c[2], max_tests, c[3] if len(c) > 3 else ""), share, count_tokens)
             for c in candidates]
    parts = [p for p in parts if p]
    if not parts:
        return ""
    return template.format(header=header, traces="".join(parts))


def insert_signal(prompt: str, signal: str, code_prefix: str = "", anchor: str | None = "[BEGIN]") -> str:
    """The conditional prompt: ``signal`` inserted before the anchor / the code prefix."""
    if not signal:
        return prompt
    if anchor:
        i = prompt.rfind(anchor)
        if i != -1:
            j = prompt.rfind("\n", 0, i) + 1  # start of the anchor's line
            return prompt[:j] + signal + prompt[j:]
    if code_prefix and prompt.endswith(code_prefix):
        i = len(prompt) - len(code_prefix)
        return prompt[:i] + signal + prompt[i:]
    return prompt + ("" if prompt.endswith("\n") or not prompt else "\n") + signal


def count_tokens_fn(tokenizer: Any) -> Callable[[str], int]:
    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))
    return count
