"""``gradsweep gc``: where gradsweep's files are, how big, and removing what the store already holds.

Safe to remove, and all that is removed (``--yes``; without it, a dry run that lists them):

* spool folders of delivered runs whose process has ended (:func:`gradsweep.track.delivery.removable`)
  and claims of resumed runs no process holds;
* job folders (``outputs/...``, ``multirun/.../<n>``) and sweep folders (``multirun/<day>/<time>``) that
  a run of the store names as its own (tag ``gradsweep.output_dir``) where every such run is FINISHED,
  none still has a journal in the spool, no process holds the folder, and every file in it besides
  Hydra's own (``.hydra/``, logs, ``multirun.yaml``) is in the run's artifacts (same name and size);
* with ``--deleted-runs``: runs deleted in MLflow (its UI's *Delete*), by ``mlflow gc``, then the
  embedded store's file is compacted (SQLite's ``VACUUM``: deleted rows do not shrink it).

A folder no run names (a dry run with ``tracking.backend=memory``, or written before runs recorded their
folder) is kept and counted: its files may be the only copy.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gradsweep.locks import FOLDER_LOCK, Busy, hold, is_held, release
from gradsweep.names import EMBEDDED_STORE, OUTPUT_DIR_TAG
from gradsweep.track.uri import absolute_sqlite, is_local_sqlite, mask, sqlite_path

ROOTS = ("multirun", "outputs")  #: Hydra's default sweep and run folders (conf/config.yaml)
#: what Hydra and the job write for themselves in a job's folder: not artifacts of the run
HYDRA_OWN = (".hydra", ".submitit", "multirun.yaml", "optimization_results.yaml", FOLDER_LOCK)
LISTED = 20  #: folders listed by name; the rest counted


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", help=f"the tracking store (default: MLFLOW_TRACKING_URI, else {EMBEDDED_STORE})")
    p.add_argument("--spool", type=Path, help="the run spool (default: beside the embedded store, mlruns/spool)")
    p.add_argument("--folders", nargs="+", type=Path, default=[Path(r) for r in ROOTS],
                   help="where job and sweep folders are (default: multirun outputs)")
    p.add_argument("--deleted-runs", action="store_true",
                   help="also remove the data of runs deleted in MLflow (mlflow gc), then compact the embedded store")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing (the default)")
    mode.add_argument("--yes", action="store_true", help="remove it")


# ------------------------------------------------------------------------------ sizes
def size_of(path: Path) -> tuple[int, int]:
    """(bytes, files) under ``path``, a file linked twice counted once."""
    if path.is_file():
        return path.stat().st_size, 1
    seen, total = set(), 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total, len(seen)


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def here(path: Path) -> str:
    """``path`` as the user would type it from here."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------ the plan
@dataclass
class Folder:
    """A job folder (``.hydra/`` inside) or a sweep folder (``multirun.yaml``) and why it stays, if it does."""

    path: Path
    runs: list = field(default_factory=list)  #: the runs of the store that name it
    units: list["Folder"] = field(default_factory=list)  #: a sweep's job folders inside it
    keep: Optional[str] = None

    @property
    def removable(self) -> bool:
        return self.keep is None


@dataclass
class Plan:
    spool: list[Path] = field(default_factory=list)  #: delivered journal folders
    claims: list[Path] = field(default_factory=list)
    folders: list[Folder] = field(default_factory=list)  #: outermost first, each once
    deleted_runs: list = field(default_factory=list)
    spool_kept: dict[str, int] = field(default_factory=dict)  #: pending | refused -> count


def find_folders(root: Path) -> list[Folder]:
    """Job and sweep folders under ``root``, a sweep's job folders as its units."""
    found: dict[Path, Folder] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if ".hydra" in dirnames or "multirun.yaml" in filenames:
            found[Path(dirpath).resolve()] = Folder(Path(dirpath).resolve())
        dirnames[:] = sorted(d for d in dirnames if d != ".hydra")
    tops: list[Folder] = []
    for path, folder in found.items():
        outer = next((found[p] for p in path.parents if p in found), None)
        (outer.units if outer is not None else tops).append(folder)
    return tops


def own_files(folder: Folder) -> list[Path]:
    """The files of ``folder`` that are not Hydra's own, nor inside one of its units."""
    inside = {u.path for u in folder.units}
    out = []
    for dirpath, dirnames, filenames in os.walk(folder.path):
        dirnames[:] = [d for d in dirnames if d not in HYDRA_OWN and Path(dirpath, d).resolve() not in inside]
        out += [Path(dirpath, f) for f in filenames if f not in HYDRA_OWN and not f.endswith(".log")]
    return out


def artifacts(client, run_id: str, path: Optional[str] = None) -> set[tuple[str, int]]:
    """(file name, size) of every artifact of a run."""
    out = set()
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            out |= artifacts(client, run_id, info.path)
        else:
            out.add((Path(info.path).name, int(info.file_size or 0)))
    return out


def judge(folder: Folder, client, pending_runs: set[str], pending_dirs: set[str]) -> None:
    """Set ``folder.keep`` to why it stays, or leave it None (removable); its units first."""
    for unit in folder.units:
        judge(unit, client, pending_runs, pending_dirs)
    if is_held(folder.path / FOLDER_LOCK):
        folder.keep = "a running job or sweep holds it"
    elif str(folder.path) in pending_dirs or pending_runs & {r.info.run_id for r in folder.runs}:
        folder.keep = "its run is spooled, not yet delivered to the store"
    elif not folder.runs:
        folder.keep = ("no active run in the store names it (its run deleted, a memory-backend run, or older than "
                       "gradsweep gc)")
    elif unfinished := [r for r in folder.runs if r.info.status != "FINISHED"]:
        folder.keep = f"run {unfinished[0].info.run_id[:8]} is {unfinished[0].info.status}"
    elif stays := [u for u in folder.units if not u.removable]:
        folder.keep = f"its job folder {stays[0].path.name} stays ({stays[0].keep})"
    else:
        stored = set().union(*(artifacts(client, r.info.run_id) for r in folder.runs))
        missing = [f for f in own_files(folder) if (f.name, f.stat().st_size) not in stored]
        if missing:
            folder.keep = f"{missing[0].relative_to(folder.path)} is not in the store"


def outermost(folders: list[Folder]) -> list[Folder]:
    """The removable folders, a sweep folder instead of its units where it goes as a whole."""
    out = []
    for f in folders:
        out += [f] if f.removable else outermost(f.units)
    return out


def kept(folders: list[Folder]) -> list[Folder]:
    """The folders that stay for a reason of their own (not only because one of their units stays)."""
    out = []
    for f in folders:
        out += kept(f.units) + ([f] if not f.removable and not (f.keep or "").startswith("its job folder") else [])
    return out


def runs_by_folder(client) -> dict[str, list]:
    """The active runs of every experiment that name a folder (tag ``gradsweep.output_dir``)."""
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    by_dir: dict[str, list] = {}
    token = None
    while experiments:
        page = client.search_runs(experiments, f"tags.`{OUTPUT_DIR_TAG}` LIKE '%'", max_results=1000, page_token=token)
        for run in page:
            by_dir.setdefault(run.data.tags[OUTPUT_DIR_TAG], []).append(run)
        token = page.token
        if not token:
            break
    return by_dir


def spool_plan(spool: Path, plan: Plan) -> tuple[set[str], set[str]]:
    """The spool's part of the plan; returns the run ids and folders of runs still spooled."""
    from gradsweep.track.delivery import CLAIMS, pending, refused, removable
    from gradsweep.track.journal import HEADER, journal_run_ids, read_json

    plan.spool = removable(spool)
    claims = spool / CLAIMS
    for path in sorted(claims.glob("*.lock")) if claims.is_dir() else ():
        if is_held(path) is False:  # not held by a process continuing that run
            plan.claims.append(path)
    runs, dirs = set(), set()
    left = pending(spool)
    for folder in left:
        runs |= journal_run_ids(folder)
        tags = ((read_json(folder / HEADER) or {}).get("create") or {}).get("tags") or {}
        if tags.get(OUTPUT_DIR_TAG):
            dirs.add(tags[OUTPUT_DIR_TAG])
    plan.spool_kept = {"pending": len(left), "refused": len(refused(spool))}
    return runs, dirs


def make_plan(client, spool: Path, roots: list[Path], deleted: bool) -> Plan:
    plan = Plan()
    pending_runs, pending_dirs = spool_plan(spool, plan)
    by_dir = runs_by_folder(client)
    for root in roots:
        tops = find_folders(root) if root.is_dir() else []

        def attach(folders: list[Folder]) -> None:
            for f in folders:
                f.runs = by_dir.get(str(f.path), [])
                attach(f.units)
        attach(tops)
        for top in tops:
            judge(top, client, pending_runs, pending_dirs)
        plan.folders += tops
    if deleted:
        from mlflow.entities import ViewType

        ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
        plan.deleted_runs = (client.search_runs(ids, run_view_type=ViewType.DELETED_ONLY, max_results=50000)
                             if ids else [])
    return plan


def local_artifacts(run) -> Optional[Path]:
    """A run's artifact folder where it is a local one (the embedded store's)."""
    from urllib.parse import unquote, urlparse

    uri = urlparse(run.info.artifact_uri or "")
    return Path(unquote(uri.path)).parent if uri.scheme in ("", "file") and uri.path else None


# ------------------------------------------------------------------------------ removing
def remove_folder(folder: Folder) -> bool:
    """Remove a folder while holding its lock and its units' (a job starting in it meanwhile is
    refused, one still in it keeps it). False where a process holds one."""
    held = []
    try:
        for f in [folder, *folder.units]:
            held.append(hold(f.path / FOLDER_LOCK))
    except (Busy, OSError):
        for fd in held:
            release(fd)
        return False
    try:
        shutil.rmtree(folder.path, ignore_errors=True)
    finally:
        for fd in held:
            release(fd)
    return True


def prune_empty(path: Path, root: Path) -> None:
    """Remove the folders from ``path`` up to ``root`` (excluded) that are left empty (multirun/<day>)."""
    root = root.resolve()
    for parent in path.parents:
        if parent == root or root not in parent.parents:
            return
        try:
            parent.rmdir()
        except OSError:
            return


def collect_deleted_runs(uri: str) -> int:
    """``mlflow gc`` on the store (runs deleted in MLflow: their rows and artifacts), then the
    embedded store's file compacted. Its exit status."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}  # where mlflow gc finds the runs' artifacts
    code = subprocess.call([sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", uri, "--tracking-uri", uri],
                           env=env)
    if code == 0 and is_local_sqlite(uri):
        try:
            with sqlite3.connect(sqlite_path(uri), timeout=30) as db:
                db.execute("VACUUM")
        except sqlite3.Error as e:  # a writer holds it: the rows are gone, the file shrinks at the next gc
            print(f"  {sqlite_path(uri)} not compacted: {e}")
    return code


# ------------------------------------------------------------------------------ the command
def locations(uri: str, spool: Path, roots: list[Path], plan: Plan) -> list[tuple[str, Path, str]]:
    from gradsweep.track.tracker import default_artifact_location

    rows: list[tuple[str, Path, str]] = []
    if is_local_sqlite(uri):
        db = sqlite_path(uri)
        rows.append(("tracking store", db, ""))
        art = default_artifact_location(uri)
        rows.append(("artifacts", Path(art[len("file://"):]) if art else db.parent / "artifacts", ""))
        optuna = db.with_name("optuna.db")
        if optuna.exists():
            rows.append(("optuna studies", optuna, ""))
    left = plan.spool_kept
    rows.append(("run spool", spool, f"{left.get('pending', 0)} runs to deliver, {len(plan.spool)} delivered"
                                     + (f", {left['refused']} refused" if left.get("refused") else "")))
    for root in roots:
        count = sum(1 + len(f.units) for f in plan.folders if root.resolve() in f.path.parents)
        rows.append(("job folders", root, f"{count} job/sweep folders"))
    return rows


def run(args: argparse.Namespace) -> int:
    from gradsweep.track.delivery import mlflow_client
    from gradsweep.track.journal import default_spool_dir

    uri = absolute_sqlite(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or EMBEDDED_STORE)
    if is_local_sqlite(uri) and not sqlite_path(uri).is_file():
        print(f"no tracking store at {sqlite_path(uri)}: nothing of gradsweep's here (run it where you ran train.py, "
              "or give --tracking-uri)")
        return 0
    spool = args.spool or default_spool_dir(uri)
    client = mlflow_client(uri)
    plan = make_plan(client, spool, args.folders, args.deleted_runs)

    print(f"Where gradsweep's files are (tracking store {mask(uri)}):")
    for what, path, note in locations(uri, spool, args.folders, plan):
        size, files = size_of(path) if path.exists() else (0, 0)
        print(f"  {what:<15} {here(path):<28} {human(size):>9}  {files} file{'s' * (files != 1)}"
              + (f"; {note}" if note else ""))

    removals: list[tuple[str, int, Any]] = []  # (label, bytes, what)
    if plan.spool:
        removals.append((f"{len(plan.spool)} delivered spool folders in {here(spool)}",
                         sum(size_of(p)[0] for p in plan.spool), "spool"))
    if plan.claims:
        removals.append((f"{len(plan.claims)} claims of resumed runs no process holds ({here(spool / '.runs')})",
                         0, "claims"))
    for folder in outermost(plan.folders):
        runs = ", ".join(r.info.run_id[:8] for r in folder.runs[:3]) + (" ..." if len(folder.runs) > 3 else "")
        kind = "sweep" if folder.units else "job"
        removals.append((f"{here(folder.path)}  ({kind} folder; FINISHED in the store: {runs})",
                         size_of(folder.path)[0], folder))
    if plan.deleted_runs:
        removals.append((f"{len(plan.deleted_runs)} runs deleted in MLflow (mlflow gc; and their rows in the store)",
                         sum(size_of(p)[0] for p in map(local_artifacts, plan.deleted_runs) if p and p.exists()),
                         "deleted"))
    stays = kept(plan.folders)
    act = "Removing" if args.yes else "Safe to remove (everything of theirs is in the store)"
    print(f"{act}:" if removals else "Nothing to remove.")
    for label, size, _ in removals[:LISTED]:
        print(f"  {label}  {human(size)}")
    if len(removals) > LISTED:
        print(f"  ... and {len(removals) - LISTED} more")
    if stays:
        print(f"Kept: {len(stays)} folders, e.g. {here(stays[0].path)}: {stays[0].keep}")
    total = sum(size for _, size, _ in removals)
    if not args.yes:
        print(f"Dry run: {human(total)} would be freed; `gradsweep gc --yes` removes it"
              + ("" if args.deleted_runs else " (add --deleted-runs for runs deleted in MLflow)") + ".")
        return 0
    return _remove(plan, removals, uri, spool, args.folders, total)


def _remove(plan: Plan, removals: list, uri: str, spool: Path, roots: list[Path], total: int) -> int:
    from gradsweep.locks import drop_unheld
    from gradsweep.track.delivery import CLAIMS, remove_delivered

    code, freed = 0, 0
    for _, size, what in removals:
        if what == "spool":
            remove_delivered(spool)  # judged again: a journal delivered meanwhile goes too
            freed += size
        elif what == "claims":
            drop_unheld(spool / CLAIMS)
        elif what == "deleted":
            code = collect_deleted_runs(uri)
            freed += size if code == 0 else 0
        elif remove_folder(what):
            freed += size
            root = next((r for r in roots if r.resolve() in what.path.parents), None)
            if root is not None:
                prune_empty(what.path, root)
        else:
            print(f"  kept {here(what.path)}: a running process holds it")
    print(f"Freed {human(freed)}.")
    return code
