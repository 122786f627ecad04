"""Reports of result directories: ``codedistill report RUN_DIR [RUN_DIR ...]``.

protocol.py  which evaluation protocol numbers follow, and whether they compare with published ones
doc.py       a report as blocks, rendered to Markdown and to one self-contained HTML page
sections.py  one section builder per kind of directory (BTP, baseline, ablation, sweep, matrix)
plots.py     ablation bars, sweep history and importance, before/after bars (BTP figures: btp/plots.py)
build.py     render_report(): detect kinds, build the document, write report.md + report.html

Entry point: ``codedistill.report.build.render_report(run_dirs, out)``, imported only when a
report is rendered, so ``codedistill --help`` stays fast.
"""
