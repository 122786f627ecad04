"""A worker process for tests/test_cluster_ablate.py: claims, takeovers and cache publishing
raced between real processes on one directory.

    python tests/claim_worker.py claim DIR START N LEASE     # try jobs j0..j{N-1} at time START; print those won
    python tests/claim_worker.py hold DIR JOB LEASE           # hold JOB with its heartbeat until told to stop
    python tests/claim_worker.py publish CACHE START N        # publish entries k0..k{N-1} at time START

Claims won are kept (the process lives 3 s past START, then exits without releasing them), so
a job two processes both won would show up in both lists.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def wait_until(start: float) -> None:
    while time.time() < start:
        time.sleep(0.001)


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "claim":
        from codedistill.experiments.claims import try_claim

        d, start, n, lease = Path(argv[1]), float(argv[2]), int(argv[3]), float(argv[4])
        wait_until(start)
        won, taken = [], []
        for i in range(n):
            c = try_claim(d, f"j{i}", lease)
            if c is not None:
                won.append(i)
                if c.taken_over:
                    taken.append(i)
        wait_until(start + 3)  # stay alive while the other process claims: a live owner's claims hold
        print(json.dumps({"won": won, "taken_over": taken, "pid": os.getpid()}), flush=True)
        return 0
    if mode == "hold":
        from codedistill.experiments.claims import ClaimLost, try_claim

        d, job, lease = Path(argv[1]), argv[2], float(argv[3])
        c = try_claim(d, job, lease)
        assert c is not None, "the job was not free"
        try:
            with c:
                print("holding", flush=True)
                while True:
                    time.sleep(0.05)
        except ClaimLost as e:
            print(f"lost: {e}", flush=True)
            return 3
    if mode == "publish":
        from codedistill.btp.gencache import GenerationCache

        cache, start, n = GenerationCache(argv[1]), float(argv[2]), int(argv[3])
        rows = [{"i": i, "text": "x" * 2000} for i in range(200)]
        wait_until(start)
        won = [i for i in range(n) if cache.put_rows("beams", {"k": i}, {"rows": rows, "verdicts": rows[:50]})]
        print(json.dumps({"won": won}), flush=True)
        return 0
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
