"""Reports of run directories. This package reads the files runs write and renders them; it
imports nothing that produces results (btp, experiments, generation, training).

files.py     reading a run directory's JSON files
format.py    fmt_metric / fmt_diff: how an estimate and a paired difference read in every table
protocol.py  which evaluation protocol numbers follow, and whether they compare with published ones
plots.py     every figure: a BTP run's (plot_btp_run), ablation bars, sweep history and importance,
             before/after bars
btp_run.py   write_run_report(): report.md + plots/ of a finished BTP run (the loop calls it)
served.py    report.md lines on served generation (generation.json)
doc.py       a report as blocks, rendered to Markdown and to one self-contained HTML page
sections.py  one section builder per kind of directory (BTP, baseline, ablation, sweep, matrix)
build.py     render_report(): ``codedistill report``: detect kinds, build the document, write
             report.md + report.html
"""

from codedistill.report.btp_run import write_run_report

__all__ = ["write_run_report"]
