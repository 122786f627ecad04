"""The result channel: the records the harness writes and the pool reads.

One line per event, ``<token>\\t<kind>[\\t<field>...]``. The token (32 hex digits, random per
run) is announced by the first record, before any untrusted code runs; every later record
must carry it. Kinds: ``H`` (announcement), ``P`` (program executed: status, message),
``S`` (setup executed: status, message), ``T`` (test: index, status, message), ``R`` / ``X``
(call mode: the JSON payload / an error message), ``E`` (end: every verdict is in).
Status is ``ok`` or ``err``. Standard library only: the fork server loads this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TOKEN_HEX = 32
HELLO, PROGRAM, SETUP, TEST, RESULT, ERROR, END = "H", "P", "S", "T", "R", "X", "E"
_HELLO_TAIL = f"\t{HELLO}\n".encode()
_END_TAIL = f"\t{END}\n".encode()


@dataclass
class Parsed:
    """What the records of one run say (``tampered``: why they cannot be trusted)."""

    program: tuple[str, str] | None = None
    setup: tuple[str, str] | None = None
    tests: dict[int, tuple[str, str]] = field(default_factory=dict)
    payload: tuple[str, str] | None = None
    end: bool = False
    tampered: str = ""


def ended(buf: bytes | bytearray) -> bool:
    """The records in ``buf`` start with an announcement and end with its end record."""
    if len(buf) < 2 * (TOKEN_HEX + 3) or not buf.endswith(_END_TAIL) or buf[TOKEN_HEX : TOKEN_HEX + 3] != _HELLO_TAIL:
        return False
    last = buf.rfind(b"\n", 0, len(buf) - 1)
    return last >= TOKEN_HEX + 2 and buf[last + 1 :] == buf[:TOKEN_HEX] + _END_TAIL


def parse(text: str, n_tests: int, mode: str) -> Parsed:
    """Read the records of one run (``mode``: ``tests`` or ``call``)."""
    p = Parsed()
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        return p
    first = lines[0].split("\t")
    if len(first) != 2 or first[1] != HELLO or len(first[0]) != TOKEN_HEX:
        p.tampered = "bad announcement"
        return p
    token = first[0]
    take = _take_call if mode == "call" else _take_test_record
    for line in lines[1:]:
        parts = line.split("\t")
        if parts[0] != token or p.end:
            p.tampered = "foreign record on the result channel"
            break
        if not take(p, parts, n_tests):
            p.tampered = "malformed record"
            break
    return p


def _take_call(p: Parsed, parts: list[str], n_tests: int) -> bool:
    kind = parts[1] if len(parts) > 1 else ""
    if kind in (RESULT, ERROR) and len(parts) == 3 and p.payload is None:
        p.payload = ("ok" if kind == RESULT else "err", parts[2])
    elif kind == END and len(parts) == 2:
        p.end = True
    else:
        return False
    return True


def _take_test_record(p: Parsed, parts: list[str], n_tests: int) -> bool:
    kind = parts[1] if len(parts) > 1 else ""
    if kind == PROGRAM and len(parts) == 4 and p.program is None:
        p.program = (parts[2], parts[3])
    elif kind == SETUP and len(parts) == 4 and p.setup is None:
        p.setup = (parts[2], parts[3])
    elif (
        kind == TEST
        and len(parts) == 5
        and parts[2] == str(len(p.tests))
        and len(p.tests) < n_tests
        and p.program is not None
    ):
        p.tests[len(p.tests)] = (parts[3], parts[4])
    elif kind == END and len(parts) == 2:
        p.end = True
    else:
        return False
    return True
