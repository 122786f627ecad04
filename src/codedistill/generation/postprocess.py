"""Pure text post-processing: stop strings and code extraction from chat answers."""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut], cut < len(text)


def extract_code(answer: str, entry_point: str | None = None) -> str:
    """The code in a chat model's answer.

    Fenced blocks first (python-tagged preferred; the one defining ``entry_point`` if
    several), then an unterminated fence, then the answer from its first ``def``/``import``
    line, then the answer as is.
    """
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(answer)]
    if blocks:
        py = [b for lang, b in blocks if lang in ("python", "py", "python3", "")] or [b for _, b in blocks]
        if entry_point:
            for b in py:
                if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", b):
                    return b.rstrip() + "\n"
        return py[0].rstrip() + "\n"
    lines = answer.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*(def |class |import |from \S+ import )", line):
            code = "\n".join(lines[i:])
            return _longest_parsing_prefix(code)
    return answer


def _longest_parsing_prefix(code: str) -> str:
    """Drop trailing prose lines until the code parses (keeps everything if nothing parses)."""
    lines = code.splitlines()
    for end in range(len(lines), 0, -1):
        chunk = "\n".join(lines[:end])
        try:
            ast.parse(chunk)
            return chunk + "\n"
        except SyntaxError:
            continue
    return code
