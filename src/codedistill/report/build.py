"""``codedistill report RUN_DIR [RUN_DIR ...]``: one Markdown file and one self-contained
HTML page for any mix of BTP, baseline, ablation, sweep and matrix directories (and
folders that hold such runs), with a cross-run table when there are several."""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from pathlib import Path

from codedistill import __version__
from codedistill.errors import ConfigError
from codedistill.report.doc import Document, Heading, Para, Table, to_html, to_markdown
from codedistill.report.sections import SECTION_BUILDERS, Section, Summary, child_runs, detect_kind


def default_out(run_dirs: Sequence[Path]) -> Path:
    """One run: RUN_DIR/report/. Several: ./results/report/."""
    return Path(run_dirs[0]) / "report" if len(run_dirs) == 1 else Path("results") / "report"


def _names(run_dirs: Sequence[Path]) -> list[str]:
    """Short unique names: the folder name, or more of the path where names repeat."""
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [os.path.relpath(Path(d).resolve(), Path.cwd()) for d in run_dirs]


def build_document(run_dirs: Sequence[Path], plot_root: Path) -> tuple[Document, list[Summary]]:
    run_dirs = [Path(d) for d in run_dirs]
    kinds = [detect_kind(d) for d in run_dirs]
    names = _names(run_dirs)
    title = ("codedistill report: " + names[0]) if len(run_dirs) == 1 else f"codedistill report: {len(run_dirs)} runs"
    doc = Document(title)
    summaries: list[Summary] = []
    sections: list[Section] = []
    single = len(run_dirs) == 1
    for d, kind, name in zip(run_dirs, kinds, names):
        pdir = plot_root if single else plot_root / name.replace(os.sep, "_")
        if kind == "experiment":
            sec = Section()
            subs = child_runs(d)
            sec.blocks.append(Heading(f"Experiment {name}", 2))
            sec.blocks.append(Para(f"Directory: {d}; {len(subs)} run(s) inside."))
            for sub in subs:
                sname = f"{name}/{sub.relative_to(d).as_posix()}"
                s = SECTION_BUILDERS[detect_kind(sub)](
                    sub, pdir / sub.relative_to(d).as_posix().replace("/", "_"), sname, level=3
                )
                sec.blocks += s.blocks
                sec.summaries += s.summaries
        else:
            sec = SECTION_BUILDERS[kind](d, pdir, name)
        sections.append(sec)
        summaries += sec.summaries
    if len(summaries) > 1:
        doc.add(
            Heading("All runs", 2, anchor="all-runs"),
            Para(
                "pass@1 with 95% bootstrap CIs; gain = paired difference after - before over the same problems. "
                "Rows are comparable with each other only where their protocols match."
            ),
            cross_run_table(summaries),
        )
    for sec in sections:
        doc.blocks += sec.blocks
    return doc, summaries


def cross_run_table(summaries: Sequence[Summary]) -> Table:
    """One row per run and evaluation set; HumanEval+ / MBPP+ rows show base beside plus
    (the columns appear when any row has them)."""
    base = any(s.base_before or s.base_after or s.base_gain for s in summaries)
    head = ["run", "models", "protocol", "before pass@1", "after pass@1", "gain [95% CI]"]
    if base:
        head += ["base before pass@1", "base after pass@1", "base gain [95% CI]"]
    rows = []
    for s in summaries:
        row = [
            s.name if s.kind.split()[0] in s.name else f"{s.name} ({s.kind})",
            s.models,
            s.protocol,
            s.before,
            s.after,
            s.gain,
        ]
        if base:
            row += [s.base_before or "-", s.base_after or "-", s.base_gain or "-"]
        rows.append(row + [s.comparable])
    caption = "one row per run and evaluation set (protocol: dataset split (problems), shots, decoding)"
    if base:
        caption += "; HumanEval+ / MBPP+: pass@1 columns are plus (base and extra inputs), base columns the base inputs"
    return Table(head + ["published-comparable"], rows, caption=caption, name="cross-run", nowrap=(1,))


def render_report(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> dict[str, Path]:
    """Write OUT/report.md (figures in OUT/plots/) and OUT/report.html (figures embedded);
    returns {"markdown", "html", "plots"}."""
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise ConfigError("give at least one run directory")
    for d in dirs:  # every input checked before anything is written
        detect_kind(d)
    out = Path(out) if out else default_out(dirs)
    out.mkdir(parents=True, exist_ok=True)
    plots = out / "plots"
    doc, _ = build_document(dirs, plots)
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    footer = f"codedistill {__version__}, rendered {stamp} from: " + ", ".join(str(d) for d in dirs)
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(to_markdown(doc, out) + f"\n---\n{footer}\n", encoding="utf-8")
    html_path.write_text(to_html(doc, footer), encoding="utf-8")
    return {"markdown": md_path, "html": html_path, "plots": plots}
