"""The links a sweep prints and the way from the UI's home page to its charts, in a real browser
(Debian's chromium driven by Playwright, no browser download), each in a fresh profile, against a
real MLflow UI. Skipped where Chromium or Playwright is absent (`apt-get install chromium`;
Playwright comes with the test extras)."""
from __future__ import annotations

import re
import shutil

import pytest
from mlflow.tracking import MlflowClient

from conftest import MlflowServer, run_train

CHROMIUM = shutil.which("chromium")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = [pytest.mark.integration, pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")]
TRACES = ".js-plotly-plot .scatterlayer .trace"


def view(page) -> str:
    """Which of MLflow 3.17's two views the page is in, read from its sidebar (the toggle itself
    has no state attribute): GenAI's lists Prompts, Model training's the Model registry."""
    nav = page.inner_text("aside")
    return "genai" if "Prompts" in nav else "model training" if "Model registry" in nav else "unknown"


def chart(page) -> dict:
    """The metric page's chart: its lines, the y axis type drawn and the "Y-axis Log Scale" switch."""
    page.wait_for_selector(TRACES, timeout=60_000)
    switch = page.locator("div.inline-control", has_text="Y-axis Log Scale").get_by_role("switch")
    return {"traces": page.eval_on_selector_all(TRACES, "els => els.length"),
            "axis": page.evaluate("() => document.querySelector('.js-plotly-plot')._fullLayout.yaxis.type"),
            "switch": switch.get_attribute("aria-checked"), "view": view(page), "text": page.inner_text("body")}


def test_printed_links_and_the_way_from_the_ui_home(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    res = run_train(["-m", "clip.max_norm=1,5", "trainer.epochs=1", "tracking.log_figures=false",
                     "tracking.log_checkpoints=false", f"tracking.uri={store}"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    links = dict(re.findall(r"^\s+(runs|comparison|grad norm):\s+(\S+)$", res.stdout, re.M))
    assert set(links) == {"runs", "comparison", "grad norm"}, res.stdout[-2000:]
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("gradsweep").experiment_id])
    (parent,) = [r.info.run_name for r in runs if "mlflow.parentRunId" not in r.data.tags]
    server = MlflowServer(tmp_path / "ui", backend=store, artifacts=str(tmp_path / "ui-artifacts"))
    (tmp_path / "ui").mkdir()
    server.start()
    seen = {}
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                for name, link in links.items():
                    page = browser.new_context().new_page()  # a fresh profile: no stored view choice
                    page.goto(link.replace("http://127.0.0.1:5000", server.uri))
                    # the runs table fills in after the page frame: wait for the sweep's own row
                    marker = {"runs": "sweep: clip.max_norm", "comparison": "Comparing 2 Runs",
                              "grad norm": "clip.max_norm=5 (grad_norm/total)"}[name]
                    page.wait_for_function(f"document.body.innerText.includes({marker!r})", timeout=90_000)
                    seen[name] = chart(page) if name == "grad norm" else {"view": view(page),
                                                                          "text": page.inner_text("body")}
                # the documented way from the bare home page: Model training, the experiment, the
                # sweep's parent run, the grad-norm link in its description (a new tab)
                context = browser.new_context()
                page = context.new_page()
                page.goto(server.uri + "/")
                clicks = []
                for role, label in (("button", "Model training"), ("link", "gradsweep"), ("link", parent)):
                    page.get_by_role(role, name=label, exact=True).first.click(timeout=60_000)
                    clicks.append(label)
                seen["parent"] = {"view": view(page)}
                with context.expect_page() as opened:
                    page.get_by_role("link", name="grad_norm/total of every run").click(timeout=60_000)
                    clicks.append("grad_norm/total of every run")
                seen["from home"] = chart(opened.value)
            finally:
                browser.close()
    finally:
        server.stop()
    assert {name: s["view"] for name, s in seen.items()} == dict.fromkeys(
        ["runs", "comparison", "grad norm", "parent", "from home"], "model training")
    assert "sweep: clip.max_norm" in seen["runs"]["text"] and "matching runs" in seen["runs"]["text"]
    assert "Comparing 2 Runs from 1 Experiment" in seen["comparison"]["text"]
    assert "clip.max_norm" in seen["comparison"]["text"]
    for name in ("grad norm", "from home"):  # one line per child over steps, on a log axis the switch shows
        got = seen[name]
        assert "clip.max_norm=1 (grad_norm/total)" in got["text"] and "Step" in got["text"]
        assert got["traces"] >= 2 and got["axis"] == "log" and got["switch"] == "true"
    assert len(clicks) == 4 and len(clicks[clicks.index("gradsweep") + 1:]) <= 3  # <= 3 clicks after the first link
