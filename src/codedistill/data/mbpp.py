"""MBPP (Austin et al. 2021, CC BY 4.0): full (974) and sanitized (427) variants.

The official files (``mbpp.jsonl`` / ``sanitized-mbpp.json``, from google-research's
``mbpp/`` folder) ship with the package under ``data/files/mbpp`` (attribution and sha256 in
its NOTICE) and are read offline by default. Asked for explicitly, MBPP comes from a local
copy (``data_path``: a folder or one file) or from the Hugging Face hub through ``datasets``
(``source="hub"`` or ``CODEDISTILL_MBPP_SOURCE=hub``). Standard splits by task_id:
few-shot 1-10, test 11-510, validation 511-600, train 601-974.
"""

from __future__ import annotations

import ast
import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from codedistill.data.problem import Problem
from codedistill.errors import DataError
from codedistill.resources import resource_path

MBPP_SPLITS = {
    "prompt": range(1, 11),
    "test": range(11, 511),
    "validation": range(511, 601),
    "train": range(601, 975),
}
MBPP_FEWSHOT_IDS = (2, 3, 4)  # the paper's three prompt examples
MBPP_STOP = ("[DONE]", "\n[BEGIN]", "\nYou are an expert")
HUB_ID = "google-research-datasets/mbpp"
FILES = {"full": "mbpp.jsonl", "sanitized": "sanitized-mbpp.json"}
PACKAGED_DIR = "data/files/mbpp"
SOURCE_VAR = "CODEDISTILL_MBPP_SOURCE"
SOURCES = ("package", "hub")


def split_of(task_id: int) -> str:
    for name, ids in MBPP_SPLITS.items():
        if task_id in ids:
            return name
    raise DataError(f"MBPP task_id {task_id} is outside 1-974")


def mbpp_prompt(description: str, tests: Iterable[str], code: str | None = None) -> str:
    """The original paper's format: description, the asserts, then [BEGIN] (code [DONE])."""
    text = (
        f"You are an expert Python programmer, and here is your task: {description} "
        "Your code should pass these tests:\n\n" + "\n".join(t.strip() for t in tests) + "\n[BEGIN]\n"
    )
    if code is not None:
        text += code.strip() + "\n[DONE]\n"
    return text


def _parse(src: str) -> ast.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return ast.parse(src)


def entry_point_of(code: str, tests: Iterable[str]) -> str:
    """The reference's function that the tests call (first defined name that is called)."""
    called: list[str] = []
    for t in tests:
        try:
            for node in ast.walk(_parse(t)):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                    called.append(node.func.id)
        except SyntaxError:
            continue
    try:
        defined = [n.name for n in _parse(code).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    except SyntaxError:
        defined = []
    for name in called:
        if name in defined:
            return name
    return defined[-1] if defined else (called[0] if called else "")


def packaged_dir() -> Path:
    """The folder of the official MBPP files shipped with codedistill."""
    return resource_path(PACKAGED_DIR)


def chosen_source(source: str | None = None) -> str:
    """``source``, else ``$CODEDISTILL_MBPP_SOURCE``, else ``package``."""
    chosen = source or os.environ.get(SOURCE_VAR) or "package"
    if chosen not in SOURCES:
        raise DataError(
            f"Unknown MBPP source {chosen!r} (from {'source' if source else SOURCE_VAR}); use "
            f"{' or '.join(SOURCES)}, or --data-path for a local copy of the official files."
        )
    return chosen


def _read_local(path: Path, variant: str) -> list[dict[str, Any]]:
    if path.is_dir():
        path = path / FILES[variant]
    if not path.exists():
        raise DataError(
            f"MBPP file not found: {path}. Pass --data-path to a folder holding {FILES[variant]} "
            f"(the official files from google-research/mbpp), or drop --data-path to use the copy "
            "shipped with codedistill."
        )
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            rows = json.loads(text)
            if not isinstance(rows, list):
                raise ValueError("expected a JSON array of task objects")
            return rows
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}:{lineno}: malformed JSON line ({e.msg}). Re-download the official "
                        "mbpp.jsonl; each line must be one JSON object."
                    ) from e
        return rows
    except (json.JSONDecodeError, ValueError) as e:
        raise DataError(f"{path}: malformed MBPP file ({e}). Re-download the official file.") from e


def _read_hub(variant: str) -> list[dict[str, Any]]:  # pragma: no cover - needs internet
    try:
        import datasets
    except ImportError as e:
        raise DataError("Loading MBPP from the hub needs `datasets` (pip install datasets).") from e
    try:
        dd = datasets.load_dataset(HUB_ID, variant)
    except Exception as e:
        raise DataError(
            f"Could not load '{HUB_ID}' ({variant}) from the hub: {e}. Unset {SOURCE_VAR} to use "
            "the official files shipped with codedistill (offline)."
        ) from e
    rows = [dict(r) for split in dd.values() for r in split]
    return sorted(rows, key=lambda r: r["task_id"])


def _to_problem(row: dict[str, Any], variant: str, source: str) -> Problem:
    try:
        task_id = int(row["task_id"])
        description = row["text"] if "text" in row else row["prompt"]
        tests = tuple(row["test_list"])
        code = row["code"]
        if "test_setup_code" in row:
            setup = row.get("test_setup_code") or ""
        else:
            setup = "\n".join(row.get("test_imports") or [])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"{source}: MBPP row {row.get('task_id', '?')} lacks a field ({e!r}); expected "
            "task_id, text|prompt, code, test_list."
        ) from e
    name = "mbpp" if variant == "full" else "mbpp-sanitized"
    return Problem(
        task_id=f"Mbpp/{task_id}",
        prompt=mbpp_prompt(description, tests),
        entry_point=entry_point_of(code, tests),
        tests=tests,
        test_setup=setup.replace("\r\n", "\n"),
        reference=code.replace("\r\n", "\n"),
        split=split_of(task_id),
        dataset=name,
        code_prefix="",
        description=description,
        visible_tests=tests,
        meta={"challenge_tests": list(row.get("challenge_test_list") or []), "mbpp_id": task_id},
    )


def load_mbpp(variant: str = "full", data_path: str | Path | None = None, source: str | None = None) -> list[Problem]:
    """All MBPP problems of a variant, each tagged with its standard split.

    From ``data_path`` if given; else from the hub if ``source`` (or
    ``$CODEDISTILL_MBPP_SOURCE``) is ``hub``; else the files shipped with codedistill.
    """
    if variant not in FILES:
        raise DataError(f"Unknown MBPP variant {variant!r}; use one of {sorted(FILES)}.")
    if data_path is not None:
        rows, origin = _read_local(Path(data_path), variant), str(data_path)
    elif chosen_source(source) == "hub":
        rows, origin = _read_hub(variant), HUB_ID
    else:
        rows, origin = _read_local(packaged_dir(), variant), f"codedistill's {PACKAGED_DIR}"
    return [_to_problem(r, variant, origin) for r in rows]


def fewshot_prefix(problems_by_id: dict[int, Problem] | None = None, data_path=None) -> str:
    """The standard 3-shot prefix (tasks 2, 3, 4 with their reference code)."""
    if problems_by_id is None:
        problems_by_id = {p.meta["mbpp_id"]: p for p in load_mbpp("full", data_path)}
    return "".join(
        mbpp_prompt(problems_by_id[i].description, problems_by_id[i].tests, problems_by_id[i].reference)
        for i in MBPP_FEWSHOT_IDS
    )
