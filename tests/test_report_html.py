"""`codedistill report` on real runs, opened in headless Chromium.

A small real BTP run (the embedded tiny-source -> tiny-target on synth, configs/btp_tiny.yaml
cut down) and a real step-1 baseline are rendered together; Chromium (Debian's package)
loads the page from disk, takes a screenshot and dumps the DOM it rendered. The test
checks the screenshot is a real picture (a PNG of the window size with many colours,
not a blank page) and that every number in the rendered tables equals the one in
comparison.json / metrics.json. CI (.ci/run) installs Chromium and sets
CODEDISTILL_REQUIRE_CHROMIUM=1, so there the test fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from html_tables import Tables

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def chromium():
    path = chromium_binary()
    if path is None:
        if os.environ.get("CODEDISTILL_REQUIRE_CHROMIUM"):
            pytest.fail(
                "CODEDISTILL_REQUIRE_CHROMIUM is set but no chromium binary is on PATH (apt-get install -y chromium)"
            )
        pytest.skip(
            "headless Chromium is not installed (apt-get install -y chromium); "
            "set CODEDISTILL_REQUIRE_CHROMIUM=1 to make this a failure"
        )
    return path


def parse_ci(cell: str) -> tuple[float, float, float]:
    """``0.436 [0.356, 0.522]`` -> (0.436, 0.356, 0.522)."""
    m = re.fullmatch(r"([+-]?\d+\.\d+) \[([+-]?\d+\.\d+), ([+-]?\d+\.\d+)\]", cell)
    assert m, f"not a value with a CI: {cell!r}"
    return float(m.group(1)), float(m.group(2)), float(m.group(3))


def same(metric: dict, cell: str, key: str = "value") -> None:
    v, lo, hi = parse_ci(cell)
    assert (v, lo, hi) == (round(metric[key], 3), round(metric["ci_low"], 3), round(metric["ci_high"], 3)), cell


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A real tiny BTP run and a real baseline run (minutes on CPU, once per module)."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from codedistill.baseline import run_baseline
    from codedistill.btp.config import build_config, load_config_file
    from codedistill.btp.loop import run_btp
    from codedistill.config import BaselineConfig, build

    root = tmp_path_factory.mktemp("report_runs")
    cfg = build_config(
        load_config_file(ROOT / "configs" / "btp_tiny.yaml"),
        dict(
            max_problems=24,
            eval_max_problems=12,
            eval_num_samples=2,
            epochs=1,
            replay_size=48,
            n_iterations=2,
            output_dir=str(root / "btp"),
            workers=2,
        ),
    )
    run_btp(cfg, log=lambda m: None)
    bcfg = build(
        BaselineConfig,
        dict(
            model="tiny-target",
            dataset="synth",
            split="test",
            max_problems=8,
            seed=0,
            workers=2,
            sampling=dict(num_samples=2, temperature=0.2, max_new_tokens=96),
        ),
    )
    run_baseline(bcfg, root / "baseline")
    return root / "btp", root / "baseline"


@pytest.fixture(scope="module")
def rendered(chromium, runs, tmp_path_factory):  # chromium first: skip before the runs are made
    from typer.testing import CliRunner

    from codedistill.cli import app

    btp, base = runs
    out = tmp_path_factory.mktemp("report_out")
    res = CliRunner().invoke(app, ["report", str(btp), str(base), "--out", str(out)])
    assert res.exit_code == 0, res.output
    page = out / "report.html"
    shot = out / "screenshot.png"
    prof = tmp_path_factory.mktemp("chromium_profile")
    base_cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={prof}"]
    subprocess.run(
        [*base_cmd, f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri()],
        check=True,
        capture_output=True,
        timeout=180,
    )
    dom = subprocess.run(
        [*base_cmd, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True, timeout=180
    ).stdout
    if os.environ.get("CODEDISTILL_KEEP_SCREENSHOT"):  # for a human to look at
        shutil.copy(shot, os.environ["CODEDISTILL_KEEP_SCREENSHOT"])
    return out, shot, dom


@pytest.mark.slow
def test_screenshot_is_a_real_picture(rendered):
    from PIL import Image

    _, shot, _ = rendered
    assert shot.stat().st_size > 10_000
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == (1200, 3000)
        rgb = im.convert("RGB")
        colours = rgb.getcolors(maxcolors=1_000_000)
    assert colours is not None and len(colours) > 50, "a blank or single-colour page"
    # the page is mostly white with text, tables and plots: no single colour covers all of it
    assert max(c for c, _ in colours) < 0.97 * 1200 * 3000


@pytest.mark.slow
def test_rendered_tables_equal_the_metrics_files(rendered, runs):
    _, _, dom = rendered
    btp, base = runs
    t = Tables()
    t.feed(dom)
    comp = json.loads((btp / "comparison.json").read_text())
    e = comp["datasets"]["synth"]
    rows = {r[0]: r[1:] for r in t.tables["btp-passk-synth"]}
    ks = sorted((k for k in e["target_before"] if k.startswith("pass@")), key=lambda k: int(k[5:]))
    assert ks == ["pass@1"]  # eval_num_samples 2: only pass@1
    for i, k in enumerate(ks):
        same(e["target_before"][k], rows["target before (tiny-target)"][i])
        same(e["target_per_iteration"]["target_iter1"][k], rows["target after iteration 1"][i])
        same(e["target_per_iteration"]["target_iter2"][k], rows["target after iteration 2"][i])
        same(e["source"][k], rows["source (tiny-source)"][i])
    imp_rows = {r[0]: r for r in t.tables["btp-improvement-synth"]}
    imp = e["improvement"]["pass@1"]
    r = imp_rows["pass@1"]
    assert float(r[1]) == round(imp["before"], 3) and float(r[2]) == round(imp["after"], 3)
    same(imp, r[3], key="diff")
    assert float(r[4]) == round(imp["p_value_no_improvement"], 3) and int(r[5]) == e["n_problems"] == 12
    # the iterations table against iter_K/stats.json
    for row, k in zip(t.tables["btp-iterations"], (1, 2)):
        st = json.loads((btp / f"iter_{k}" / "stats.json").read_text())
        assert row[:3] == [str(k), str(st["buffer"]["size"]), str(st["buffer"]["new_this_iteration"])]
        assert row[4] == str(st["sampling"]["draws"]) == "48"
    # the baseline's pass@k against its metrics.json
    m = json.loads((base / "metrics.json").read_text())
    (row,) = t.tables["baseline-passk"]
    assert row[0] == "pass@1" and float(row[1]) == round(m["pass@1"]["value"], 3)
    assert row[2] == f"[{m['pass@1']['ci_low']:.3f}, {m['pass@1']['ci_high']:.3f}]"
    # the cross-run table: one row per run, the same numbers
    cross = t.tables["cross-run"]
    assert [r[:3] for r in cross] == [
        ["btp", "tiny-source -> tiny-target", "synth test (12), 0-shot, T=0.2 n=2"],
        ["baseline", "tiny-target", "synth test (8), 0-shot, T=0.2 n=2"],
    ]
    same(e["target_before"]["pass@1"], cross[0][3])
    same(e["target_after"]["pass@1"], cross[0][4])
    same(imp, cross[0][5], key="diff")
    same(m["pass@1"], cross[1][4])
    assert cross[0][6] == cross[1][6] == "no"  # synth: never comparable with published numbers


@pytest.mark.slow
def test_page_is_self_contained_and_says_its_protocol(rendered):
    out, _, dom = rendered
    html = (out / "report.html").read_text()
    assert "<script" not in html and "<link" not in html
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", html)
    t = Tables()
    t.feed(dom)
    # pass@k, P2Value histogram, sampling statistics, loss curve (BTP) + the baseline's pass@k
    assert len(t.imgs) == 5 and all(s.startswith("data:image/png;base64,") for s in t.imgs)
    text = re.sub(r"<[^>]+>", " ", dom)
    assert "Protocol: synth test split, 12 problems, 0-shot, sampled, T=0.2" in text
    assert "Protocol: synth test split, 8 problems, 0-shot, sampled, T=0.2" in text
    assert "Not comparable with published numbers: synth is this project" in text
    md = (out / "report.md").read_text()
    for png in re.findall(r"\]\((plots/[^)]+\.png)\)", md):
        assert (out / png).is_file()
