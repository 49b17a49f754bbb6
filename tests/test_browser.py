"""The links a sweep prints, opened in a real browser (Debian's chromium driven by Playwright, no
browser download) in a fresh profile against a real MLflow UI. Skipped where Chromium or Playwright
is absent (`apt-get install chromium`; Playwright comes with the test extras)."""
from __future__ import annotations

import re
import shutil

import pytest

from conftest import MlflowServer, run_train

CHROMIUM = shutil.which("chromium")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")


def test_printed_links_open_the_runs_view_the_comparison_and_the_grad_norm_chart(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    res = run_train(["-m", "clip.max_norm=1,5", "trainer.epochs=1", "tracking.log_figures=false",
                     "tracking.log_checkpoints=false", f"tracking.uri={store}"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    links = dict(re.findall(r"^\s+(runs|comparison|grad norm):\s+(\S+)$", res.stdout, re.M))
    assert set(links) == {"runs", "comparison", "grad norm"}, res.stdout[-2000:]
    server = MlflowServer(tmp_path / "ui", backend=store, artifacts=str(tmp_path / "ui-artifacts"))
    (tmp_path / "ui").mkdir()
    server.start()
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                texts = {}
                for name, link in links.items():
                    page = browser.new_context().new_page()  # a fresh profile: no stored view choice
                    page.goto(link.replace("http://127.0.0.1:5000", server.uri))
                    # the runs table fills in after the page frame: wait for the sweep's own row
                    marker = {"runs": "sweep: clip.max_norm", "comparison": "Comparing 2 Runs",
                              "grad norm": "clip.max_norm=5 (grad_norm/total)"}[name]
                    page.wait_for_function(f"document.body.innerText.includes({marker!r})", timeout=90_000)
                    texts[name] = page.inner_text("body")
                    if name == "grad norm":  # a chart with one line per child, over steps
                        page.wait_for_selector(".js-plotly-plot .scatterlayer .trace", timeout=60_000)
                        texts["traces"] = page.eval_on_selector_all(".js-plotly-plot .scatterlayer .trace",
                                                                    "els => els.length")
            finally:
                browser.close()
    finally:
        server.stop()
    assert "sweep: clip.max_norm" in texts["runs"] and "matching runs" in texts["runs"]  # the runs view, not GenAI's
    assert "Comparing 2 Runs from 1 Experiment" in texts["comparison"]
    assert "clip.max_norm" in texts["comparison"]
    assert "clip.max_norm=1 (grad_norm/total)" in texts["grad norm"] and "Step" in texts["grad norm"]
    assert texts["traces"] >= 2
