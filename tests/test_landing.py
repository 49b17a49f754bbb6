"""The MLflow UI links a sweep prints and its parent run's description, without a browser
(tests/test_browser.py opens them in one where Chromium is installed)."""
from __future__ import annotations

import json
from urllib.parse import parse_qs, unquote

from gradsweep.report.landing import NOTE_MAX, parent_note
from gradsweep.report.summary import ui_links

import pytest

pytestmark = pytest.mark.unit

IDS = [f"{i:032x}" for i in range(3)]


def query(link: str) -> dict:
    return {k: v[0] for k, v in parse_qs(link.split("?", 1)[1]).items()}


def test_every_printed_link_opens_the_model_training_view_and_states_log_scale_as_the_ui_does():
    links = ui_links("sqlite:////tmp/mlflow.db", "7", IDS)
    assert set(links) == {"runs", "comparison", "grad norm"}
    for link in links.values():
        assert link.startswith("http://127.0.0.1:5000/#/") and query(link)["workflowType"] == "machine_learning"
        assert '"' not in link  # percent-encoded: a raw quote ends a markdown link
    grad = query(links["grad norm"])
    assert json.loads(grad["runs"]) == IDS and json.loads(grad["metric"]) == "grad_norm/total"
    assert grad["y_axis_scale"] == "log" and json.loads(grad["plot_layout"])["yaxis"]["type"] == "log"
    assert json.loads(query(links["comparison"])["runs"]) == IDS


def test_parent_description_links_charts_first_and_fits_mlflows_tag_limit():
    note = parent_note("7", IDS, "abc")
    assert note.splitlines()[0].startswith("- [grad_norm/total of every run](#/metric?")  # before "Show more"
    assert "dev/acc of every run" in note and "The 3 runs compared" in note
    big = parent_note("7", [f"{i:032x}" for i in range(500)], "abc")  # too many ids for links that list them
    assert len(big) <= NOTE_MAX and "#/compare-runs" not in big
    assert "tags.`gradsweep.sweep_id` = 'abc'" in unquote(big)
