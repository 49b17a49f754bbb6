"""The verdict's calibration table (``gradsweep studies``, docs/studies.md): expected against given
``grad_health`` verdicts on the synthetic histories and on every study variant, every miss listed."""
from __future__ import annotations

from collections import Counter

from gradsweep.report.expectations import expected_for
from gradsweep.report.summary import group_runs
from gradsweep.train.diagnostics import diagnose
from gradsweep.train.diagnostics_cases import cases


def study_rows(name: str, runs: list) -> list[list[str]]:
    """Per variant of study ``name`` (its runs grouped by configuration): the verdicts expected,
    those given over its seeds, the misses and why they were expected."""
    rows = []
    for config in group_runs(runs):
        tags, why = expected_for(name, config.runs[0].data.params)
        given = Counter(r.data.tags.get("grad_health", "-") for r in config.runs)
        misses = 0 if tags is None else sum(c for t, c in given.items() if t not in tags)
        rows.append([f"`{name}` {config.label}", " or ".join(sorted(tags)) if tags else "(no claim)",
                     ", ".join(f"{t} {c}/{len(config.runs)}" for t, c in sorted(given.items())), str(misses), why])
    return rows


def calibration_block(study_rows: list[list[str]]) -> str:
    lines = ["Synthetic histories (`gradsweep.train.diagnostics_cases`, 10 draws of minibatch noise each):", "",
             "| case | expected | given (10 draws) | misses |", "|---|---|---|---|"]
    total_misses = 0
    for i, case in enumerate(cases()):
        given = Counter(diagnose(c.history).tag for c in (cases(seed=s)[i] for s in range(10)))
        misses = sum(n for t, n in given.items() if t != case.expected)
        total_misses += misses
        lines.append(f"| {case.name}: {case.description} | {case.expected} | "
                     f"{', '.join(f'{t} {n}/10' for t, n in sorted(given.items()))} | {misses} |")
    lines += ["", "Every study variant over its seeds:", "",
              "| variant | expected | given | misses | why |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in study_rows]
    study_misses = sum(int(r[3]) for r in study_rows)
    lines += ["", f"Misses: {total_misses} of the synthetic draws, {study_misses} of the study runs."]
    return "\n".join(lines)
