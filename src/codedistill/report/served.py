"""report.md lines on served generation (generation.json: requests, tokens, cost, fallbacks)."""

from __future__ import annotations

import json
from pathlib import Path


def served_generation_lines(run_dir: Path) -> list[str]:
    """A "Served generation" section (led by two empty lines), or nothing without generation.json."""
    try:
        rec = json.loads((Path(run_dir) / "generation.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    lines = ["", "", "## Served generation", ""]
    for role, t in rec.get("totals", {}).items():
        cost = f", cost ${t['cost_usd']:.4f}" if t.get("cost_usd") is not None else ""
        ver = f", vLLM {t['vllm_version']}" if t.get("vllm_version") else ""
        lines.append(
            f"- {role} ({t.get('backend')}{ver}): {t['requests_sent']} requests sent over "
            f"{len(rec.get('starts', []))} start(s), {t['cache_hits']} answered from the cache, "
            f"{t['retries_total']} retries, {t['prompt_tokens']} prompt + {t['completion_tokens']} "
            f"completion tokens{cost}"
        )
        if t.get("served_models"):
            who = ", ".join(f"{m} ({n} samples)" for m, n in sorted(t["served_models"].items()))
            lines.append(f"  - answered by: {who}")
        if t.get("response_cache"):
            lines.append(f"  - response cache: {t['response_cache']}")
        for f in t.get("fallbacks", []):
            lines.append(f"  - fallback: {f}")
        for n in t.get("notes", []):
            lines.append(f"  - note: {n}")
    return lines
