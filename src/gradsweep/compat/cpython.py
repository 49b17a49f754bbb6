"""CPython's exit path, run by hand to end a process without the interpreter's finalization.

``sys.exit`` ends with the interpreter tearing every module down one by one, which takes over a
second once torch and MLflow are loaded (every job and every test that starts one waited for it;
benchmarks/startup_speed.py prints a job's whole wall time).
``os._exit`` (public: the documented way to end a process at once) skips that, but also what the
interpreter runs first and callers rely on: threading's own at-exit hooks, then the ``atexit``
handlers. Neither has a public entry point, so :func:`exit_without_finalization` calls them itself.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from typing import NoReturn


def run_threading_exit_hooks() -> None:
    """``threading._shutdown()``: joins the non-daemon threads and runs the hooks registered with
    ``threading._register_atexit``, as the interpreter does before the ``atexit`` handlers. Loky
    (``hydra/launcher=joblib``) and ``concurrent.futures`` shut their worker processes down there;
    without it multiprocessing's exit handler joined loky's idle workers until their 300 s idle
    timeout (a joblib sweep hung 300 s). There is no public way to run these hooks."""
    threading._shutdown()  # type: ignore[attr-defined]


def run_atexit_handlers() -> None:
    """``atexit._run_exitfuncs()``: every handler registered with ``atexit.register`` (MLflow's, the
    logging module's, ours), last registered first. The public ``atexit`` API registers and
    unregisters handlers but cannot run them."""
    atexit._run_exitfuncs()


def exit_without_finalization(code: int) -> NoReturn:
    """End the process as the interpreter would, minus the module-by-module finalization: threads'
    exit hooks, exit handlers, logging flushed and closed, streams flushed, then ``os._exit``."""
    run_threading_exit_hooks()
    run_atexit_handlers()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
