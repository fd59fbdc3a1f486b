"""Finished recipe runs side by side: one row per run, the baseline then each iteration.

    python recipes/compare_runs.py runs/csr-world runs/csr-lam0
    python recipes/compare_runs.py sweeps/* --metrics chair_s recall pope_f1 --markdown

Each RUN is the ``--out`` directory of ``csr.py``, ``rlaif_v.py`` or ``llava_rlhf.py`` (the ``recipes._run``
layout): ``summary.json`` holds the metrics (fractions; shown here in percent) and ``config.json`` the settings
the run used. A cell reads ``baseline -> iteration 1 / iteration 2 / ...``. The "settings" column names, for
each run, the settings in which runs of the same recipe differ (``out`` aside), so that a sweep reads as what
was changed and what it gave. A directory without a finished ``summary.json`` is an error naming it: a run
still going (or killed) has nothing to compare yet.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

METRICS = ("chair_s", "chair_i", "recall", "pope_f1", "pope_acc", "yes_ratio", "mc_acc")
DEFAULT_METRICS = ("chair_s", "recall", "pope_f1")
IGNORED_SETTINGS = ("out",)


def read_run(directory: str | Path) -> dict:
    """{"name", "recipe", "summary", "settings"} of one finished run directory; a clear error otherwise."""
    directory = Path(directory)
    summary_path = directory / "summary.json"
    if not summary_path.is_file():
        raise ValueError(f"{directory}: no summary.json (the run has not finished, or this is not a recipe's --out)")
    try:
        summary = json.loads(summary_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{summary_path}: not JSON ({error})") from None
    for key in ("recipe", "baseline", "iterations"):
        if key not in summary:
            raise ValueError(f"{summary_path}: no {key!r} (not a recipe's summary)")
    settings = {}
    config_path = directory / "config.json"
    if config_path.is_file():
        settings = json.loads(config_path.read_text()).get("config", {})
    return {"name": directory.name or str(directory), "recipe": summary["recipe"], "summary": summary,
            "settings": settings}


def differing_settings(runs: Sequence[dict]) -> list[str]:
    """The setting names whose values are not the same in every run given (a name missing from a run
    counts as a value of its own)."""
    names = sorted({name for run in runs for name in run["settings"]} - set(IGNORED_SETTINGS))
    missing = object()
    return [n for n in names if len({json.dumps(run["settings"].get(n, missing), default=str) for run in runs}) > 1]


def metric_cell(summary: dict, metric: str, digits: int = 2) -> str:
    """``baseline -> it1 / it2 / ...`` in percent; "-" where a metric was not measured."""

    def value(metrics: dict | None) -> str:
        if not metrics or metrics.get(metric) is None:
            return "-"
        return f"{100 * metrics[metric]:.{digits}f}"

    iterations = " / ".join(value(m) for m in summary["iterations"]) or "-"
    return f"{value(summary['baseline'])} -> {iterations}"


def comparison_rows(runs: Sequence[dict], metrics: Sequence[str] = DEFAULT_METRICS, digits: int = 2) -> list[list[str]]:
    """The table, header first: run, recipe, settings, one column per metric, seconds."""
    by_recipe: dict[str, list[dict]] = {}
    for run in runs:
        by_recipe.setdefault(run["recipe"], []).append(run)
    differ = {recipe: differing_settings(group) for recipe, group in by_recipe.items()}
    rows = [["run", "recipe", "settings", *metrics, "seconds"]]
    for run in runs:
        settings = ", ".join(f"{n}={json.dumps(run['settings'].get(n), default=str)}" for n in differ[run["recipe"]])
        seconds = run["summary"].get("seconds")
        rows.append([run["name"], run["recipe"], settings or "-",
                     *(metric_cell(run["summary"], m, digits) for m in metrics),
                     "-" if seconds is None else f"{seconds:.0f}"])
    return rows


def format_rows(rows: list[list[str]], *, markdown: bool = False) -> str:
    """Aligned plain text, or a Markdown table (what docs/ tables are pasted from)."""
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows[1:]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="recipe --out directories")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), choices=METRICS)
    parser.add_argument("--digits", type=int, default=2)
    parser.add_argument("--markdown", action="store_true", help="a Markdown table")
    args = parser.parse_args(argv)
    try:
        runs = [read_run(directory) for directory in args.runs]
    except ValueError as error:
        parser.error(str(error))
    table = format_rows(comparison_rows(runs, args.metrics, args.digits), markdown=args.markdown)
    print(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
