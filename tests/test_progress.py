"""Progress on long phases: bars (counts, ETA) only on a terminal; one summary line per
phase with its wall time everywhere; the run's plan said at the start and kept in plan.json."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from codedistill.ui import RunPlan, Tracker, fmt_seconds, progress_bar, progress_tasks

CONTROL = re.compile(r"[\x1b\r\x08]")  # ANSI escapes, carriage returns, backspaces: a bar was drawn


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=100, soft_wrap=True), buf


def test_not_a_terminal_prints_only_the_summaries():
    con, buf = _console(terminal=False)
    with progress_tasks(("beam search", 6, "problems"), ("testing", 30, "programs"), con=con) as (g, t):
        for _ in range(3):
            with g.timed():
                g.advance(2)
            with t.timed():
                t.advance(10)
        t.note = "7 passed"
    out = buf.getvalue()
    assert not CONTROL.search(out), repr(out)
    lines = out.splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"beam search: 6/6 problems in \d+\.\d s", lines[0]), lines
    assert re.fullmatch(r"testing: 30/30 programs, 7 passed in \d+\.\d s", lines[1]), lines


def test_a_terminal_draws_a_bar_then_the_summary():
    con, buf = _console(terminal=True)
    tr = Tracker("eval", 4, "problems", start=1)
    with progress_tasks(tr, con=con):
        tr.advance(3)
    out = buf.getvalue()
    assert CONTROL.search(out)  # the live bar (cursor control)
    assert "eval: 4/4 problems (1 done before) in" in out


def test_empty_phase_says_nothing_and_progress_bar_still_yields_advance():
    con, buf = _console(terminal=False)
    with progress_tasks(("nothing to do", 0, "problems"), con=con):
        pass
    assert buf.getvalue() == ""
    with progress_bar("x", 2, enabled=False) as advance:
        advance(2)


def test_fmt_seconds():
    assert fmt_seconds(4.26) == "4.3 s"
    assert fmt_seconds(125) == "2 min 05 s"
    assert fmt_seconds(3 * 3600 + 120) == "3 h 02 min"


def test_run_plan_records_and_estimates(tmp_path):
    said: list[str] = []
    plan = RunPlan(
        tmp_path / "plan.json",
        [{"phase": "a", "programs": 100, "done_programs": 20}, {"phase": "b", "programs": 50}],
        log=said.append,
        note="x not included",
    )
    assert json.loads((tmp_path / "plan.json").read_text())["programs_to_generate"] == 130
    plan.chunk(10, 2.0)
    plan.chunk(10, 100.0)  # once only
    rec = json.loads((tmp_path / "plan.json").read_text())
    assert rec["estimate"]["estimated_seconds"] == pytest.approx(26.0)
    assert said == [
        "estimate: first chunk 10 programs in 2.0 s (0.20 s each) -> about 26.0 s for the 130 "
        "programs of this run (from one chunk; x not included)"
    ]


def test_run_plan_estimates_what_the_response_cache_did_not_answer(tmp_path):
    """A resumed served run: the chunks the response cache answered before the first one that
    computed are not in the estimate (they took no generation time)."""
    said: list[str] = []
    plan = RunPlan(tmp_path / "plan.json", [{"phase": "a", "programs": 1640}], log=said.append)
    plan.chunk(160, 0.5, computed=False)
    plan.chunk(160, 0.4, computed=False)
    plan.chunk(160, 0.6, computed=False)
    assert json.loads((tmp_path / "plan.json").read_text())["estimate"] is None
    plan.chunk(160, 320.0)
    est = json.loads((tmp_path / "plan.json").read_text())["estimate"]
    assert est["estimated_seconds"] == pytest.approx(2.0 * (1640 - 480))
    assert est["answered_from_cache_before"] == 480
    assert said == [
        "estimate: first chunk 160 programs in 5 min 20 s (2.00 s each) -> about 38 min 40 s for the 1160 "
        "programs of this run left (480 answered by the response cache before it) (from one chunk)"
    ]


def _run(args: list[str], tmp_path: Path, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="100")
    env.pop("FORCE_COLOR", None)
    env.pop("TTY_COMPATIBLE", None)
    return subprocess.run(
        [sys.executable, "-m", "codedistill", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=tmp_path,
    )


@pytest.mark.slow
def test_baseline_not_a_terminal_plan_summary_no_control_chars(tmp_path, random_lm):
    _, _, model = random_lm
    out = tmp_path / "run"
    r = _run(
        [
            "baseline",
            "--model",
            str(model),
            "--dataset",
            "synth",
            "--max-problems",
            "5",
            "-n",
            "2",
            "--max-new-tokens",
            "8",
            "--output-dir",
            str(out),
            "--workers",
            "2",
        ],
        tmp_path,
        300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert not CONTROL.search(r.stderr) and not CONTROL.search(r.stdout), repr(r.stderr[-2000:])
    err = r.stderr
    assert "plan: random_lm" in err and "5 problems x 2 samples = 10 programs to generate and test" in err
    assert re.search(r"estimate: first chunk 10 programs in .* -> about .* for the 10 programs", err), err
    assert re.search(
        r"random_lm\S* on synth: 5/5 problems, 10 programs generated and tested, \d+ passed in "
        r"\d+\.\d s",
        err,
    ), err
    plan = json.loads((out / "plan.json").read_text())
    assert plan["programs_to_generate"] == 10 and plan["phases"][0]["samples_per_problem"] == 2
    assert plan["estimate"]["first_chunk_programs"] == 10
    assert plan["model_check"]["source"] == "local directory"
    # a second start finds everything done: nothing generated, said so
    r2 = _run(
        [
            "baseline",
            "--model",
            str(model),
            "--dataset",
            "synth",
            "--max-problems",
            "5",
            "-n",
            "2",
            "--max-new-tokens",
            "8",
            "--output-dir",
            str(out),
            "--workers",
            "2",
        ],
        tmp_path,
        300,
    )
    assert r2.returncode == 0 and "5 problems done before" in r2.stderr and "estimate:" not in r2.stderr


@pytest.mark.slow
def test_btp_not_a_terminal_phase_summaries(tmp_path):
    """Every long BTP phase ends with its one-line summary; no bar is drawn into a pipe."""
    from codedistill.btp._testing import build_throwaway_pair

    src, tgt = build_throwaway_pair(tmp_path / "models")
    out = tmp_path / "run"
    r = _run(
        [
            "btp",
            "--source-model",
            str(src),
            "--target-model",
            str(tgt),
            "--dataset",
            "synth",
            "--max-problems",
            "4",
            "--eval-max-problems",
            "3",
            "--eval-num-samples",
            "2",
            "--num-beams",
            "3",
            "--n-iterations",
            "1",
            "--use-lora",
            "--lora-r",
            "4",
            "--max-new-tokens",
            "16",
            "--chunk-size",
            "2",
            "--workers",
            "2",
            "--output-dir",
            str(out),
        ],
        tmp_path,
        900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert not CONTROL.search(r.stderr) and not CONTROL.search(r.stdout), repr(r.stderr[-2000:])
    err = r.stderr
    assert "plan: finetune src -> tgt, 1 iteration(s) on 4 synth train problems" in err
    assert "beam phase: 3 beams per problem = 12 programs" in err
    assert "evaluations: 3 x (synth 3 problems x 2 samples = 6 programs) = 18 programs" in err
    assert "in all 30 programs to generate and test" in err
    assert "estimate: first chunk" in err
    for stage in ("target_iter0", "source", "target_iter1"):
        assert re.search(
            rf"eval {stage} on synth: 3/3 problems, 6 programs generated and tested, \d+ passed in ", err
        ), (stage, err)
    assert re.search(r"\[iter 1\] source beam search: 4/4 problems, 12 candidates in \d+\.\d s", err), err
    assert re.search(r"\[iter 1\] testing source's programs: 12/12 programs, \d+ passed in \d+\.\d s", err), err
    plan = json.loads((out / "plan.json").read_text())
    assert plan["programs_to_generate"] == 30 and plan["estimate"]["estimated_seconds"] > 0


def test_say_off_a_terminal_writes_the_plain_line_without_rich():
    code = (
        "import sys\nfrom codedistill import ui\n"
        "ui.say('results: runs/a:100:b [bold]x[/]')\n"
        "with ui.progress_bar('executing', 2) as advance:\n    advance(1)\n    advance(1)\n"
        "print(sorted(m for m in sys.modules if m == 'rich' or m.startswith('rich.')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TTY_COMPATIBLE", "FORCE_COLOR")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert lines[0] == "results: runs/a:100:b [bold]x[/]"  # no emoji for :100:, no markup
    assert re.fullmatch(r"executing: 2/2 in \d+\.\d s", lines[1]), lines
    assert p.stdout.strip() == "[]"
