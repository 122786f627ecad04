"""P2Value (possibility and pass-rate value) and program normalisation for BTP.

Chen et al. 2024, "Enhancing LLM Agents for Code Generation with Possibility and
Pass-rate Prioritized Experience Replay" (arXiv 2410.12236) score every program in the
replay buffer by

    P2Value = a * P + (1 - a) * pass_rate

with ``P`` the sequence probability the generating model gave the program and
``pass_rate`` the share of the problem's tests it passes.

Default ``a`` (:data:`DEFAULT_P2_ALPHA` = 0.2) and why
-----------------------------------------------------
``P`` here is :attr:`Candidate.seq_prob`, the *length-normalised* probability
``exp(mean token log-prob)``. For beam-search outputs it clusters high (typically
0.6-0.95: the beams are by construction the model's most likely sequences, and the
geometric mean over dozens of tokens hides the few uncertain ones), so it carries little
information about correctness; the pass rate is the signal that matters. With ``a = 0.2``
the whole possible range of ``P`` moves P2Value by at most 0.2, which is less than the
weight ``0.8 / T`` of one passed test for ``T <= 3`` tests (MBPP has 3): a program that
passes more tests always ranks above one that passes fewer, and ``P`` only orders
programs with the same pass rate (preferring what the model finds natural, which is
easier for the target to learn). Zero-pass programs keep a small positive value
(``0.2 * P``), so the ``power`` sampler can still draw them, rarely, as the paper allows.
"""

from __future__ import annotations

import ast
import hashlib
import io
import math
import tokenize

DEFAULT_P2_ALPHA = 0.2


def p2value(p: float, pass_rate: float, alpha: float = DEFAULT_P2_ALPHA) -> float:
    """``alpha * p + (1 - alpha) * pass_rate``; all three in [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"p2-alpha must lie in [0, 1], got {alpha}")
    if not (0.0 <= p <= 1.0) or math.isnan(p):
        raise ValueError(f"P must lie in [0, 1], got {p}")
    if not (0.0 <= pass_rate <= 1.0) or math.isnan(pass_rate):
        raise ValueError(f"pass_rate must lie in [0, 1], got {pass_rate}")
    return alpha * p + (1.0 - alpha) * pass_rate


def _strip_comments_lines(program: str) -> str:
    """Fallback normaliser for code that does not parse: drop comments (via tokenize
    where it can), blank lines and trailing whitespace."""
    text = program.replace("\r\n", "\n").replace("\r", "\n")
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(text).readline))
        lines = text.split("\n")
        # blank out comment tokens by position (single-line tokens)
        for tok in reversed(toks):
            if tok.type == tokenize.COMMENT:
                (r, c0), (_, c1) = tok.start, tok.end
                line = lines[r - 1]
                lines[r - 1] = line[:c0] + line[c1:]
        text = "\n".join(lines)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        text = "\n".join(ln for ln in text.split("\n") if not ln.lstrip().startswith("#"))
    out = [ln.rstrip() for ln in text.split("\n")]
    return "\n".join(ln for ln in out if ln.strip())


def normalize_program(program: str) -> str:
    """Canonical text of a program for deduplication.

    If it parses, ``ast.unparse(ast.parse(...))`` (drops comments, blank lines,
    formatting differences such as quotes, spacing and parentheses); otherwise comments,
    blank lines and trailing whitespace are stripped line by line.
    """
    text = program.replace("\r\n", "\n").replace("\r", "\n")
    try:
        return ast.unparse(ast.parse(text))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return _strip_comments_lines(text)


def program_key(program: str) -> str:
    """Short stable hash of the normalised program (the dedup key within a problem)."""
    return hashlib.sha1(normalize_program(program).encode("utf-8")).hexdigest()[:16]
