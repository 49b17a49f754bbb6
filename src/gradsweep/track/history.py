"""A run's dense history, read back from the store: the Parquet chunks of its ``telemetry/``
artifacts (written at delivery, :mod:`gradsweep.track.steps`) as one DataFrame.

Works wherever the run's artifacts can be downloaded: the embedded store, a tracking server
(artifacts proxied to S3 or stored beside it). A run continued after a kill or an outage has
chunks from each of its journals; they are read in the order they were written, and a step that
two of them hold keeps the later value (the steps a resumed run trained again from its checkpoint).
"""
from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from gradsweep.names import EMBEDDED_STORE
from gradsweep.track.steps import TELEMETRY

if TYPE_CHECKING:
    import pandas as pd


def default_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or EMBEDDED_STORE


def read_history(client, run_id: str) -> Optional["pd.DataFrame"]:
    """Every recorded step of ``run_id`` (index ``step``, one float32 column per metric name);
    None when the run has no dense history (recorded before it existed, or no step logged)."""
    import pandas as pd
    import pyarrow.parquet as pq

    chunks = sorted(f.path for f in client.list_artifacts(run_id, TELEMETRY)
                    if not f.is_dir and f.path.endswith(".parquet"))
    if not chunks:
        return None
    with tempfile.TemporaryDirectory(prefix="gradsweep-history-") as tmp:
        local = Path(client.download_artifacts(run_id, TELEMETRY, tmp))
        frames = [pq.read_table(local / Path(c).name).to_pandas() for c in chunks]
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    frame = frame.drop(columns=["time"], errors="ignore")
    frame = frame.drop_duplicates("step", keep="last").set_index("step").sort_index()
    return frame


def history(run_id: str, tracking_uri: Optional[str] = None) -> "pd.DataFrame":
    """``gradsweep.history``: the dense history of ``run_id`` in the store at ``tracking_uri``
    (default: ``MLFLOW_TRACKING_URI``, else the embedded store ``mlruns/mlflow.db`` of the working
    directory). Raises LookupError when the run has none."""
    from gradsweep.track.delivery import mlflow_client
    from gradsweep.track.uri import absolute_sqlite

    client = mlflow_client(absolute_sqlite(tracking_uri or default_uri()))
    frame = read_history(client, run_id)
    if frame is None:
        raise LookupError(f"run {run_id} has no dense history (no {TELEMETRY}/ artifacts): it recorded no step, "
                          "or it was recorded before gradsweep kept one; its sampled metrics are in MLflow")
    return frame


class Histories:
    """``series(run_id, key) -> (steps, values)`` for the reports: from the run's dense history
    where it has the key (every step), else from MLflow's metric history (evaluations, end-of-run
    metrics, runs recorded before the dense history). The last few runs' histories are kept."""

    def __init__(self, client, keep: int = 4) -> None:
        self.client, self.keep = client, keep
        self._frames: OrderedDict[str, Optional["pd.DataFrame"]] = OrderedDict()

    def frame(self, run_id: str) -> Optional["pd.DataFrame"]:
        if run_id in self._frames:
            self._frames.move_to_end(run_id)
            return self._frames[run_id]
        try:
            frame = read_history(self.client, run_id)
        except Exception:  # an unreadable artifact store: MLflow's sampled metrics still answer
            frame = None
        self._frames[run_id] = frame
        while len(self._frames) > self.keep:
            self._frames.popitem(last=False)
        return frame

    def series(self, run_id: str, key: str) -> tuple[list[int], list[float]]:
        frame = self.frame(run_id)
        if frame is not None and key in frame.columns:
            column = frame[key].dropna()
            return column.index.tolist(), column.astype(float).tolist()
        from gradsweep.track.tracker import metric_history

        return metric_history(self.client, run_id, key)
