"""Executable prefixes, trace formatting within a token budget, prompt insertion."""

from __future__ import annotations

import ast

import pytest

from codedistill.egcfg.signal import build_signal, format_trace, insert_signal, make_executable
from codedistill.egcfg.tracer import split_assert
from vocabs import gguf_file


def test_make_executable_drops_incomplete_lines_and_fills_empty_blocks():
    assert make_executable("def f(x):\n    y = x +") == "def f(x):\n    pass\n"
    assert (
        make_executable("def f(x):\n    y = x + 1\n    if y > 2:\n")
        == "def f(x):\n    y = x + 1\n    if y > 2:\n        pass\n"
    )
    assert make_executable("def f(x):\n    return (x +\n") == "def f(x):\n    pass\n"
    assert make_executable("x = 1\ny = [1, 2,\n") == "x = 1\n"
    assert (
        make_executable("def f(xs):\n    for x in xs:\n        s = x\n    return s")
        == "def f(xs):\n    for x in xs:\n        s = x\n    return s\n"
    )
    assert make_executable("%%% garbage") == ""
    for code in ("def f(x):\n    while x:\n", "class A:\n    def m(self):\n        return [1,"):
        out = make_executable(code)
        ast.parse(out)
        assert out.startswith(code.split("\n")[0])


def test_split_assert():
    assert split_assert("assert f(1, [2]) == 3") == ("f(1, [2])", "3")
    assert split_assert("assert is_ok('a')") == ("is_ok('a')", "True")
    assert split_assert("assert math.isclose(f(1), 2.0)") == ("math.isclose(f(1), 2.0)", "True")
    assert split_assert("x = 1") == (None, None)
    assert split_assert("assert f(1) != 3") == (None, None)


TRACE = {
    "compile_error": None,
    "tests": [
        {
            "test": "assert total([1, 2]) == 4",
            "call": "total([1, 2])",
            "result": "3",
            "expected": "4",
            "passed": False,
            "exception": None,
            "truncated": True,
            "events": [
                {"event": "call", "func": "total", "line": 1, "args": {"xs": "[1, 2]"}},
                {"event": "line", "func": "total", "line": 2, "vars": {"s": "0"}},
                {"event": "line", "func": "total", "line": 3, "vars": {"x": "1"}},
                {"event": "line", "func": "total", "line": 4, "vars": {"s": "1"}},
                {"event": "return", "func": "total", "line": 5, "value": "3"},
            ],
        }
    ],
}
PROG = "def total(xs):\n    s = 0\n    for x in xs:\n        s += x\n    return s\n"


def test_format_trace():
    lines = format_trace(PROG, TRACE, new_from_line=3)
    assert lines == [
        "# Candidate:",
        "#       for x in xs:",
        "#           s += x",
        "#       return s",
        "# Test: assert total([1, 2]) == 4",
        "#   call total(xs=[1, 2])",
        "#   line 2: s = 0  -> s=0",
        "#   line 3: for x in xs:  -> x=1",
        "#   line 4: s += x  -> s=1",
        "#   total returned 3",
        "#   ... (trace truncated)",
        "#   Result: total([1, 2]) = 3; expected 4 (failed)",
    ]
    exc = {
        "compile_error": None,
        "tests": [
            {
                "test": "assert total(None) == 0",
                "call": "total(None)",
                "exception": {"type": "TypeError", "message": "'NoneType' object is not iterable", "line": 3},
                "events": [
                    {
                        "event": "exception",
                        "func": "total",
                        "line": 3,
                        "type": "TypeError",
                        "message": "'NoneType' object is not iterable",
                    }
                ],
            }
        ],
    }
    out = format_trace(PROG, exc, new_from_line=6)
    assert out[-2:] == [
        "#   line 3: for x in xs:  !! TypeError: 'NoneType' object is not iterable",
        "#   Result: TypeError at line 3: 'NoneType' object is not iterable",
    ]
    assert format_trace(PROG, {"error": "timed out"}, 1)[-1] == "#   Execution stopped: timed out"


def test_build_signal_respects_token_budget():
    count = lambda s: len(s.split())  # noqa: E731  (a whitespace "tokenizer")
    cands = [(PROG, TRACE, 3)] * 3
    full = build_signal(cands, count, 10_000)
    assert full.count("# Candidate:") == 3 and full.endswith("# End of execution feedback.\n")
    for budget in (40, 60, 90):
        sig = build_signal(cands, count, budget)
        assert count(sig) <= budget
        assert "# ..." in sig and sig.count("# Candidate:") == 3
    assert build_signal(cands, count, 5) == ""  # not even the frame fits
    assert build_signal([], count, 100) == ""


def test_insert_signal_positions():
    sig = "# feedback\n"
    mbpp = "You are an expert...\nassert f(1) == 2\n[BEGIN]\n"
    assert insert_signal(mbpp, sig) == "You are an expert...\nassert f(1) == 2\n# feedback\n[BEGIN]\n"
    he = 'def f(x):\n    """doc"""\n'
    assert insert_signal("import os\n" + he, sig, he) == "import os\n# feedback\n" + he
    assert insert_signal("plain prompt", sig, "", None) == "plain prompt\n# feedback\n"
    assert insert_signal(mbpp, "") == mbpp


def test_dropped_candidate_lines_are_shown_as_not_run():
    from codedistill.egcfg.signal import make_executable_ex

    prog, dropped = make_executable_ex("def f(s):\n    return s.upper() + '')\n")
    assert prog == "def f(s):\n    pass\n" and dropped == "    return s.upper() + '')"
    lines = format_trace(prog, {"compile_error": None, "tests": []}, new_from_line=2, dropped=dropped)
    assert lines == ["# Candidate:", "#       pass", "#       return s.upper() + '')  <- not run (does not parse yet)"]


# --- where the signal goes, on a real vocabulary and DeepSeek-Coder-Instruct's chat template ---

# The chat template published with deepseek-ai/deepseek-coder-{1.3b,6.7b,33b}-instruct
# (tokenizer_config.json "chat_template"), verbatim.
DEEPSEEK_CODER_INSTRUCT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{%- set ns = namespace(found=false) -%}{%- for message in messages -%}{%- if message['role'] == 'system' -%}"
    "{%- set ns.found = true -%}{%- endif -%}{%- endfor -%}{{bos_token}}{%- if not ns.found -%}"
    "{{'You are an AI programming assistant, utilizing the Deepseek Coder model, developed by Deepseek Company, "
    "and you only answer questions related to computer science. For politically sensitive questions, security "
    "and privacy issues, and other non-computer science questions, you will refuse to answer\\n'}}{%- endif %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{{ message['content'] }}{%- else %}"
    "{%- if message['role'] == 'user' %}{{'### Instruction:\\n' + message['content'] + '\\n'}}{%- else %}"
    "{{'### Response:\\n' + message['content'] + '\\n<|EOT|>\\n'}}{%- endif %}{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}{{'### Response:'}}{% endif %}"
)


@pytest.fixture(scope="module")
def deepseek_tok():
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    path = gguf_file("deepseek-coder")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.chat_template = DEEPSEEK_CODER_INSTRUCT_TEMPLATE
    return tok


@pytest.mark.slow
def test_chat_signal_lands_in_the_user_turn_of_deepseek_coder_instruct(deepseek_tok):
    from codedistill.data.problem import Problem
    from codedistill.egcfg.config import LONG_CODE_INSTRUCTION
    from codedistill.egcfg.signal import prompt_builder
    from codedistill.prompts import PromptStyle, render_prompt

    tok = deepseek_tok
    assert len(tok) > 32000  # the real DeepSeek-Coder vocabulary, not a stand-in
    problem = Problem(
        task_id="t/1",
        prompt="",
        entry_point="total",
        description="Sum a list.",
        tests=("assert total([1, 2]) == 3",),
        visible_tests=("assert total([1, 2]) == 3",),
    )
    style = PromptStyle("chat")
    build = prompt_builder(problem, style, tok, variants={"long_code": LONG_CODE_INSTRUCTION})
    plain = build("", "default")
    assert plain == render_prompt(problem, style, tok)  # no signal: exactly the baseline's prompt
    sig = build_signal([(PROG, TRACE, 3)], lambda s: len(tok.encode(s, add_special_tokens=False)), 400)
    cond = build(sig, "default")
    # the template's turns: system text, "### Instruction:\n<user>\n", then "### Response:" (generation prompt)
    instr, resp = cond.rfind("### Instruction:\n"), cond.rfind("### Response:")
    assert 0 < instr < cond.index(sig.strip("\n")) < resp and cond.endswith("### Response:")
    assert cond.count("### Response:") == plain.count("### Response:") == 1
    user = cond[instr + len("### Instruction:\n") : resp]
    assert user.startswith(plain[instr + len("### Instruction:\n") : plain.rfind("### Response:")].rstrip("\n"))
    assert user.rstrip("\n").endswith(sig.rstrip("\n"))
    # on the token level: both prompts open with BOS and end with the same assistant header tokens,
    # and the signal's tokens all come before that header
    p_ids, c_ids = tok.encode(plain, add_special_tokens=False), tok.encode(cond, add_special_tokens=False)
    head = tok.encode("\n### Response:", add_special_tokens=False)
    assert p_ids[0] == c_ids[0] == tok.bos_token_id
    assert p_ids[-len(head) :] == c_ids[-len(head) :] == head and len(c_ids) > len(p_ids) + 50
    assert "Execution feedback" in tok.decode(c_ids[: len(c_ids) - len(head)])
    # the long-code variant also goes into the user turn, before the signal
    lc = build(sig, "long_code")
    assert (
        lc.rfind("### Instruction:\n")
        < lc.index("many short, simple lines")
        < lc.index(sig.strip("\n"))
        < lc.rfind("### Response:")
    )
    with pytest.raises(ValueError, match="unknown prompt variant"):
        build(sig, "nope")


def test_base_prompt_builder_puts_signal_and_variant_before_the_marker():
    from codedistill.data.problem import Problem
    from codedistill.egcfg.signal import prompt_builder

    mbpp = "You are an expert...\nassert f(1) == 2\n[BEGIN]\n"
    problem = Problem(task_id="t/2", prompt=mbpp, entry_point="f", tests=())
    build = prompt_builder(problem, "base", variants={"long_code": "Write many lines.\nOne step each."})
    assert build("", "default") == mbpp
    assert build("# feedback\n", "default") == "You are an expert...\nassert f(1) == 2\n# feedback\n[BEGIN]\n"
    assert (
        build("# feedback\n", "long_code")
        == "You are an expert...\nassert f(1) == 2\n# Write many lines.\n# One step each.\n# feedback\n[BEGIN]\n"
    )


def test_paper_template_renders_an_upstream_shaped_trace_for_a_known_function():
    """Upstream's layout (eg_cfg consts + traces_dumper): per candidate and test, '# Function:',
    '# Invocation:', '# Execution Trace:' with, per step, '<= per frame> {locals} , {types}' and
    'EVENT: line', 'Return Value: v' after a return, and no pass/fail verdict. Traced for real."""
    import json
    import subprocess
    import sys

    from codedistill.egcfg.signal import PAPER_HEADER, format_trace_paper

    prog = 'def total(xs):\n    """Sum."""\n    s = 0\n    for x in xs:\n        s += x  # add\n    return s\n'
    args = {"program": prog, "tests": ["assert total([1, 2]) == 4"], "types": True}
    r = subprocess.run(
        [sys.executable, "-m", "codedistill.egcfg.tracer"],
        input=json.dumps(args),
        capture_output=True,
        text=True,
        timeout=60,
    )
    trace = json.loads(r.stdout)
    lines = format_trace_paper(prog, trace)
    assert lines == [
        "# Function:",
        "def total(xs):\n    s = 0\n    for x in xs:\n        s += x\n    return s",  # no docstring, no comment
        "",
        "# Invocation:",
        "total([1, 2])",
        "",
        "# Execution Trace:",
        "== {'xs': [1, 2]} , {'xs': 'list'}",
        "CALL: def total(xs):",
        "== {'xs': [1, 2]} , {'xs': 'list'}",
        "LINE: s = 0",
        "== {'xs': [1, 2], 's': 0} , {'xs': 'list', 's': 'int'}",
        "LINE: for x in xs:",
        "== {'xs': [1, 2], 's': 0, 'x': 1} , {'xs': 'list', 's': 'int', 'x': 'int'}",
        "LINE: s += x  # add",
        "== {'xs': [1, 2], 's': 1, 'x': 1} , {'xs': 'list', 's': 'int', 'x': 'int'}",
        "LINE: for x in xs:",
        "== {'xs': [1, 2], 's': 1, 'x': 2} , {'xs': 'list', 's': 'int', 'x': 'int'}",
        "LINE: s += x  # add",
        "== {'xs': [1, 2], 's': 3, 'x': 2} , {'xs': 'list', 's': 'int', 'x': 'int'}",
        "LINE: for x in xs:",
        "== {'xs': [1, 2], 's': 3, 'x': 2} , {'xs': 'list', 's': 'int', 'x': 'int'}",
        "RETURN: return s",
        "Return Value: 3",
        "",
    ]
    text = "\n".join(lines)
    assert "passed" not in text and "failed" not in text and "expected" not in text  # no verdict
    # the whole block: the paper template's header, one entry per candidate and test
    sig = build_signal(
        [(prog, trace, 3), (prog, trace, 3)],
        lambda s: len(s.split()),
        10_000,
        formatter="paper",
        template="\n{header}{traces}",
        header=PAPER_HEADER,
    )
    assert sig.startswith("\n" + PAPER_HEADER) and sig.count("# Invocation:\ntotal([1, 2])") == 2
    # an exception is shown where it happened, with its message
    bad = {
        "compile_error": None,
        "tests": [
            {
                "test": "assert total(None) == 0",
                "call": "total(None)",
                "events": [
                    {"event": "call", "func": "total", "line": 1, "args": {"xs": "None"}, "types": {"xs": "NoneType"}},
                    {"event": "line", "func": "total", "line": 3, "vars": {"s": "0"}, "types": {"s": "int"}},
                    {"event": "exception", "func": "total", "line": 4, "type": "TypeError", "message": "not iterable"},
                ],
                "exception": {"type": "TypeError", "message": "not iterable", "line": 4},
            }
        ],
    }
    assert format_trace_paper(prog, bad)[-4:] == [
        "== {'xs': None, 's': 0} , {'xs': 'NoneType', 's': 'int'}",
        "EXCEPTION: for x in xs:",
        "TypeError: not iterable",
        "",
    ]


def test_trace_budget_scales_with_the_context():
    from codedistill.egcfg.config import EGCFGConfig

    c = EGCFGConfig(max_new_tokens=384)
    assert c.budget_for(2048, 300) == (2048 - 300 - 384) // 2
    assert c.budget_for(16384, 300) == 4096  # capped
    assert c.budget_for(None, 300) == 512 and c.budget_for(600, 300) == 0
    assert EGCFGConfig(trace_budget_tokens=100).budget_for(16384, 300) == 100
