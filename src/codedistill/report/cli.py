"""The ``codedistill report`` command (a thin wrapper over report.build.render_report)."""

from __future__ import annotations

from pathlib import Path

import typer

from codedistill.report.build import render_report
from codedistill.ui import console, friendly_errors


@friendly_errors
def report_command(
    run_dirs: list[Path] = typer.Argument(
        ...,
        metavar="RUN_DIR...",
        help="Run directories: BTP, baseline, ablation, sweep, matrix (or a folder holding several).",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Output folder (default: RUN_DIR/report for one run, results/report for several)."
    ),
) -> None:
    """Render report.md and one self-contained report.html (tables, embedded plots, the
    evaluation protocol and whether the numbers compare with published ones); several
    run directories also get a cross-run table."""
    paths = render_report(run_dirs, out)
    console.print(
        f"markdown: {paths['markdown']}\nhtml: {paths['html']}\nplots: {paths['plots']}/", highlight=False, markup=False
    )
