"""The dynamic signal: executable candidate prefixes, their traces as prompt text.

* :func:`make_executable` turns a partial program (prefix + a d-line candidate) into the
  longest version that parses: trailing incomplete lines are dropped, and a block header
  left without a body (``def f(x):``, ``for ...:``) gets an indented ``pass``.
* :func:`format_trace` writes one candidate's trace as Python comments (base models stay in
  "code mode"): its new lines, then per test the executed lines with the variables they
  changed, the return value against the expected one, and exceptions with their line.
* :func:`build_signal` joins the candidates within a token budget (each candidate gets an
  equal share; a trace that does not fit is cut line-wise with a ``# ...`` marker).
* :func:`insert_signal` places the block in a base prompt: before the last ``anchor``
  (``[BEGIN]`` of the MBPP/synth base format) if there is one, else before the code
  prefix the prompt ends with (HumanEval), else at the end.
* :func:`chat_prompt_with_signal` places it in a chat prompt the way the paper does for
  instruct models (upstream inserts it before ``### Response:``, i.e. at the end of the
  instruction): appended to the last user message, with the chat template applied again,
  so the signal is inside the user turn and never in the model's own answer.
* :func:`prompt_builder` gives, for one problem and prompt style, ``build(signal, prompt
  variant) -> prompt text`` covering both (and the prompt variants of the agent grid, e.g.
  the paper's long-code instruction).
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Sequence
from typing import Any

from codedistill.prompts import chat_instruction

DEFAULT_HEADER = "# Execution feedback: candidate continuations were run on the tests.\n"
DEFAULT_TEMPLATE = "{header}{traces}# End of execution feedback.\n"

_BLOCK_OPENERS = (
    "def ",
    "class ",
    "if ",
    "elif ",
    "else",
    "for ",
    "while ",
    "with ",
    "try",
    "except",
    "finally",
    "async ",
)


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
        dropped = "\n".join(x for x in lines[len(chunk) :] if x.strip())
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


def format_trace(
    program: str, trace: dict, new_from_line: int = 1, max_tests: int | None = None, dropped: str = ""
) -> list[str]:
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


PAPER_HEADER = (
    "### Runtime behaviour of candidate continuations\n"
    "Each entry below runs the function with one possible continuation appended (plausible, "
    "not necessarily complete or correct) on one test input: the candidate function, the "
    "invocation, and its step-by-step execution trace (the local variables with their types "
    "before each executed line, and the values returned). Use them to write a correct "
    "solution.\n"
)
PAPER_TEMPLATE = "\n{header}{traces}"


def strip_docstrings(code: str) -> str:
    """``code`` without docstrings and comments (re-printed by ``ast``); as is if it does not parse."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return code
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = node.body
            first = body[0] if body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def _state(vals: dict[str, str], types: dict[str, str]) -> str:
    v = ", ".join(f"'{k}': {x}" for k, x in vals.items())
    t = ", ".join(f"'{k}': '{types.get(k, '?')}'" for k in vals)
    return f"{{{v}}} , {{{t}}}"


def paper_trace_steps(program: str, test: dict) -> list[str]:
    """Upstream's per-step trace layout for one test: for every step of the program's own
    frames, ``<'=' x stack depth> {locals} , {their types}`` then ``EVENT: source line``
    (CALL / LINE / RETURN / EXCEPTION), and ``Return Value: v`` after a return. The locals are
    those before the step runs. No pass/fail verdict."""
    src = program.split("\n")

    def code(line: Any) -> str:
        return src[line - 1].strip() if isinstance(line, int) and 0 < line <= len(src) else ""

    out: list[str] = []
    stack: list[tuple[str, dict[str, str], dict[str, str]]] = []  # (func, locals, types)
    for e in test.get("events", []):
        kind, func = e.get("event"), e.get("func")
        if kind == "call":
            vals, typ = dict(e.get("args", {})), dict(e.get("types", {}))
            stack.append((func, vals, typ))
            out += [f"{'=' * (len(stack) + 1)} {_state(vals, typ)}", f"CALL: {code(e.get('line'))}"]
            continue
        while len(stack) > 1 and stack[-1][0] != func:  # a frame left by an exception
            stack.pop()
        if not stack:
            stack.append((func, {}, {}))
        _, vals, typ = stack[-1]
        depth = "=" * (len(stack) + 1)
        if kind == "line":
            out += [f"{depth} {_state(vals, typ)}", f"LINE: {code(e.get('line'))}"]
            vals.update(e.get("vars", {}))
            typ.update(e.get("types", {}))
        elif kind == "return":
            out += [f"{depth} {_state(vals, typ)}", f"RETURN: {code(e.get('line'))}", f"Return Value: {e.get('value')}"]
            stack.pop()
        elif kind == "exception":
            out += [
                f"{depth} {_state(vals, typ)}",
                f"EXCEPTION: {code(e.get('line'))}",
                f"{e.get('type')}: {e.get('message')}",
            ]
    if test.get("truncated"):
        out.append("... (trace truncated)")
    exc = test.get("exception")
    if exc and not any(x.startswith("EXCEPTION:") for x in out):
        where = f" (line {exc['line']})" if exc.get("line") else ""
        out.append(f"{exc['type']}{where}: {exc['message']}")
    return out


def format_trace_paper(
    program: str, trace: dict, new_from_line: int = 1, max_tests: int | None = None, dropped: str = ""
) -> list[str]:
    """One candidate in upstream's layout: per test, ``# Function:`` (the executable candidate
    program, docstrings and comments removed), ``# Invocation:`` (the call) and ``# Execution
    Trace:`` (:func:`paper_trace_steps`). ``new_from_line`` and ``dropped`` are accepted for the
    same signature as :func:`format_trace` (the paper shows the whole function)."""
    del new_from_line, dropped
    function = strip_docstrings(program).strip("\n")
    if trace.get("error"):
        return ["# Function:", function, "", "# Execution Trace:", f"Execution stopped: {trace['error']}", ""]
    err = trace.get("compile_error")
    if err:
        return [
            "# Function:",
            function,
            "",
            "# Execution Trace:",
            f"SyntaxError (line {err.get('line')}): {err.get('message')}",
            "",
        ]
    tests = trace.get("tests", [])
    if max_tests is not None:
        tests = tests[:max_tests]
    out: list[str] = []
    for t in tests:
        call = t.get("call") or t.get("test", "").strip()
        out += ["# Function:", function, "", "# Invocation:", call, "", "# Execution Trace:"]
        out += paper_trace_steps(program, t) + [""]
    return out


FORMATTERS: dict[str, Callable[..., list[str]]] = {"compact": format_trace, "paper": format_trace_paper}


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
    formatter: Callable[..., list[str]] | str = format_trace,
) -> str:
    """The signal block for (program, trace, new_from_line[, dropped]) candidates; "" if none.
    ``formatter``: :func:`format_trace` ("compact") or :func:`format_trace_paper` ("paper")."""
    if isinstance(formatter, str):
        formatter = FORMATTERS[formatter]
    if not candidates or budget_tokens <= 0:
        return ""
    frame = template.format(header=header, traces="")
    left = budget_tokens - count_tokens(frame)
    if left <= 0:
        return ""
    share = left // len(candidates)
    parts = [
        _fit(formatter(c[0], c[1], c[2], max_tests, c[3] if len(c) > 3 else ""), share, count_tokens)
        for c in candidates
    ]
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


def chat_prompt_with_signal(
    tokenizer: Any, messages: Sequence[dict], signal: str, extra: str = "", add_generation_prompt: bool = True
) -> str:
    """``messages`` rendered with ``tokenizer``'s chat template after appending ``extra``
    (an instruction, e.g. the long-code one) and then ``signal`` to the LAST user message.

    This is where the paper puts the dynamic signal for instruct models: inside the
    instruction, before the assistant's turn begins. Without a user message there is no
    instruction to extend: a :class:`ValueError` names the fix."""
    msgs = [dict(m) for m in messages]
    users = [i for i, m in enumerate(msgs) if m.get("role") == "user"]
    if not users:
        raise ValueError(
            "chat prompts need a user message to carry the execution signal; "
            "pass messages with at least one {'role': 'user', ...} entry"
        )
    i = users[-1]
    if extra or signal:
        content = str(msgs[i].get("content", "")).rstrip("\n")
        for part in (extra, signal):
            if part:
                content += "\n\n" + part.strip("\n")
        msgs[i]["content"] = content
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)


def base_prompt_with_signal(
    prompt: str, signal: str, code_prefix: str = "", anchor: str | None = "[BEGIN]", extra: str = ""
) -> str:
    """A base prompt with ``extra`` (as ``#`` comment lines) and then ``signal`` before the answer
    marker (:func:`insert_signal`)."""
    block = ""
    if extra:
        block += "".join(f"# {line}".rstrip() + "\n" for line in extra.strip("\n").split("\n"))
    block += signal
    return insert_signal(prompt, block, code_prefix, anchor)


def prompt_builder(
    problem: Any,
    style: Any = "base",
    tokenizer: Any = None,
    anchor: str | None = "[BEGIN]",
    variants: dict[str, str] | None = None,
    prompt: str | None = None,
) -> Callable[[str, str], str]:
    """``build(signal, variant="default") -> prompt`` for one problem.

    ``style`` (a :class:`codedistill.prompts.PromptStyle` or "base"/"chat"): base prompts get
    the signal before the answer marker (``anchor``, else the code prefix); chat prompts get it
    in the user message, the template applied again. ``variants`` maps a prompt variant's name
    to the instruction it adds ("" for none). ``prompt`` overrides the base prompt text
    (default ``problem.prompt``). ``build("", "default")`` is the plain prompt, identical to
    :func:`codedistill.prompts.render_prompt`'s."""
    name = getattr(style, "style", style)
    variants = dict(variants or {})

    def extra_of(variant: str) -> str:
        if variant not in variants and variant != "default":
            raise ValueError(f"unknown prompt variant {variant!r}; known: {', '.join(['default', *variants])}")
        return variants.get(variant, "")

    if name == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat prompts need a tokenizer with a chat template")
        messages = [{"role": "user", "content": chat_instruction(problem)}]

        def build_chat(signal: str = "", variant: str = "default") -> str:
            return chat_prompt_with_signal(tokenizer, messages, signal, extra_of(variant))

        return build_chat
    base = problem.prompt if prompt is None else prompt

    def build_base(signal: str = "", variant: str = "default") -> str:
        return base_prompt_with_signal(base, signal, problem.code_prefix, anchor, extra_of(variant))

    return build_base


def count_tokens_fn(tokenizer: Any) -> Callable[[str], int]:
    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    return count
