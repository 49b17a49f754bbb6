"""Creating a run exactly once on a store whose answers may be lost.

A create request can reach the store and its answer never come back: the connection dropped after
the server processed it, or a slow server answered after the client's timeout. Whoever tries again
would make a second run (empty, RUNNING forever, counted as a sweep child): MLflow's own HTTP layer
re-sends the POST (it lets urllib3 retry every method), and so does our next delivery pass.
MLflow 3.17 has no idempotency key for ``create_run``, so the client makes one: every run carries
a key (tag :data:`~gradsweep.names.CREATE_KEY_TAG`) from its first create request on. A retry first
looks for a run with that key; after a create, the runs holding the key are read back and one is
kept, the same one whoever looks (the smallest id); the others are closed KILLED, tagged with the
run kept and deleted. :func:`drop_duplicates` repeats the look at the run's end for a create that
the store finished only after the retry's answer (a slow server).
"""
from __future__ import annotations

import uuid
from typing import Any, Callable

from gradsweep.names import CREATE_KEY_TAG, DUPLICATE_OF_TAG

Call = Callable[..., Any]


def _direct(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def new_key() -> str:
    return uuid.uuid4().hex


def runs_with_key(client, experiment_id: str, key: str, call: Call = _direct) -> list:
    return call(client.search_runs, [experiment_id], filter_string=f"tags.`{CREATE_KEY_TAG}` = '{key}'",
                max_results=100)


def _drop(client, runs: list, keep: str, call: Call) -> None:
    for run in runs:
        if run.info.run_id != keep:
            call(client.set_tag, run.info.run_id, DUPLICATE_OF_TAG, keep)
            call(client.set_terminated, run.info.run_id, "KILLED")
            call(client.delete_run, run.info.run_id)


def create_run_once(client, experiment_id: str, key: str, *, tried: bool = False, call: Call = _direct,
                    **create: Any) -> str:
    """The id of the run with ``key`` in ``experiment_id``, created (``client.create_run(**create)``,
    the key added to its tags) unless ``tried`` (an earlier request may have made it) and one exists."""
    found = runs_with_key(client, experiment_id, key, call) if tried else []
    if not found:
        create["tags"] = {**(create.get("tags") or {}), CREATE_KEY_TAG: key}
        made = call(client.create_run, experiment_id, **create)
        found = runs_with_key(client, experiment_id, key, call) or [made]
    keep = min(run.info.run_id for run in found)
    _drop(client, found, keep, call)
    return keep


def drop_duplicates(client, run_id: str, call: Call = _direct) -> None:
    """Close and delete the runs other than ``run_id`` that hold its create key."""
    run = call(client.get_run, run_id)
    key = run.data.tags.get(CREATE_KEY_TAG)
    if key:
        _drop(client, runs_with_key(client, run.info.experiment_id, key, call), run_id, call)
