"""What isolation the fork server could set up for its runs (its capabilities)."""

from __future__ import annotations

import os
import sys

from . import syscalls


class Isolation:
    """Sets up the server's own namespaces from the pool's init message and records what
    each run can have: ``caps`` (``mount``, ``net``, ``pid``, ``uid``), ``warnings`` about
    what was refused, the original network namespace (``orig_net``, for runs allowed the
    network) and the import paths under /tmp (``tmp_keep``, bound back into each run's /tmp).
    """

    def __init__(self, init: dict):
        self.uid: int | None = init.get("uid")  # None: keep our uid
        # Runs alternate between these uids, so that a run can start while the previous
        # one's namespace is still being torn down (see Server.reap).
        self.uids: list[int | None] = [u for u in init.get("uids") or [self.uid] if u is not None] or [None]
        self.caps = {"mount": False, "net": False, "pid": False, "uid": False}
        self.warnings: list[str] = []
        self.orig_net: int | None = None
        self.tmp_keep: list[str] = []
        root = os.geteuid() == 0
        if root and self.uid is not None:
            self.caps["uid"] = True
        elif self.uid is not None:
            self.warnings.append(
                "not root: programs run under the caller's uid "
                "(no setuid isolation, RLIMIT_NPROC counts all its processes)"
            )
        if init.get("namespaces", True):
            self._isolate_mounts(root)
            self._isolate_network()
            self._probe_pid_namespace()
        else:
            self.warnings.append("namespaces disabled by configuration")

    @property
    def run_uid(self) -> int | None:
        """The uid of a run in the fallback layout (None: keep ours)."""
        return self.uid if self.caps["uid"] else None

    @property
    def namespaced(self) -> bool:
        """Each run can have pid and mount namespaces of its own."""
        return self.caps["pid"] and self.caps["mount"]

    def _isolate_mounts(self, root: bool) -> None:
        try:
            syscalls.unshare(syscalls.CLONE_NEWNS)
            syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
            import_paths = list(sys.path) + [sys.prefix, sys.base_prefix, sys.exec_prefix]
            self.tmp_keep = syscalls.paths_under_tmp(import_paths)
            if self.uid is not None and root:
                syscalls.expose(import_paths)
            syscalls.make_root_readonly()
            self.caps["mount"] = True
        except OSError as e:
            self.warnings.append(
                f"mount namespace refused ({e}); file system writes are "
                "limited by uid permissions and the audit hook only"
            )

    def _isolate_network(self) -> None:
        try:
            self.orig_net = os.open("/proc/self/ns/net", os.O_RDONLY)
            syscalls.unshare(syscalls.CLONE_NEWNET)
            self.caps["net"] = True
        except OSError as e:
            self.warnings.append(f"network namespace refused ({e}); the network is blocked by the audit hook only")

    def _probe_pid_namespace(self) -> None:
        self.caps["pid"] = syscalls.probe_pid_namespace()
        if not self.caps["pid"]:
            self.warnings.append("pid namespace refused; process trees are killed by a child subreaper instead")

    def enter_original_network(self) -> None:
        """Back into the network namespace the server started in (a run allowed the network)."""
        if self.orig_net is not None:
            syscalls.setns(self.orig_net, syscalls.CLONE_NEWNET)
