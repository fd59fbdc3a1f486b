"""What every iterative recipe does around its algorithm: the run directory, data collection split
across ranks (resumable, record by record), and the summary table.

Layout of ``--out DIR``::

    DIR/config.json                 the resolved config; a rerun with another config is refused
    DIR/baseline/metrics.json       the starting model's evaluation
    DIR/iter1/<data>.rank{r}.jsonl  what rank r collected, one line per finished item
    DIR/iter1/<data>.jsonl          the shards merged (sorted by key, no duplicates, no gaps)
    DIR/iter1/model/                the iteration's model, Hugging Face layout (+ ``complete``)
    DIR/iter1/metrics.json          (and eval_details.json: every description and answer)
    DIR/summary.json                {"recipe", "baseline", "iterations": [...], "final", "seconds",
                                     "changes": [...]}

Every file is written atomically or appended line by line (``lvlm.records``), so a killed run,
rerun with the same command, continues where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

from lvlm.records import ShardedWriter, merge_shards, read_records, write_json_atomic
from optim.distributed import barrier, get_rank, get_world_size, is_main_process

METRIC_KEYS = ("chair_s", "chair_i", "recall", "pope_acc", "pope_f1", "yes_ratio", "mc_acc")


# ---------------------------------------------------------------------------------------------
# the run directory
# ---------------------------------------------------------------------------------------------


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} there, {new!r} now"]


def open_run(out: str | Path, recipe: str, config: dict, models: dict | None = None) -> Path:
    """Create ``out`` or reopen it for a rerun. ``config`` is the JSON-ready resolved config; ``models``
    the model directories it resolved to (``{"policy": path, ...}``): on the built-in world their paths
    carry the world models' cache key, so a run begun on other world models is not resumed with these.

    A directory made by another recipe, another config or other models raises ``ValueError`` naming the
    fields that differ, before anything runs, and nothing in it is touched.
    """
    out = Path(out)
    path = out / "config.json"
    record = {"recipe": recipe, "config": config}
    if models is not None:
        record["models"] = {name: str(Path(value).resolve()) for name, value in models.items() if value is not None}
    if path.exists():
        old = json.loads(path.read_text())
        differences = _differences(old, record)
        if differences:
            raise ValueError(f"{out} holds a run with a different config ({'; '.join(differences[:6])}); "
                             "use another --out, or delete that directory to start over")
    elif is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, record)
    barrier()
    return out


def model_done(directory: Path) -> bool:
    """Whether an iteration's model directory was completely written (``mark_done`` was called)."""
    return (directory / "complete").is_file()


def mark_done(directory: Path) -> None:
    (directory / "complete").write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))


# ---------------------------------------------------------------------------------------------
# data collection, split across ranks
# ---------------------------------------------------------------------------------------------


def collect(items: Sequence, work: Callable[[list], list[dict]], directory: str | Path, name: str, *,
            batch_size: int, what: str = "collect", progress_every: float = 10.0) -> list[dict]:
    """Run ``work`` over ``items`` on every rank and return all records, in item order.

    Item i has key ``f"{i:08d}"``. Rank r takes items r, r + world, ...; skips the ones whose key any
    shard already holds (a rerun after a crash); calls ``work(batch)`` on up to ``batch_size`` items at a
    time, which returns one record per item (each record gets its ``key``); and appends each record to
    its shard as soon as it exists. Then rank 0 merges the shards into ``name.jsonl``, checking that no
    key is missing. A record with ``"skip": reason`` counts as done but carries no data.
    """
    from recipes._common import Progress

    directory = Path(directory)
    rank, world = get_rank(), get_world_size()
    keys = [f"{i:08d}" for i in range(len(items))]
    merged = directory / f"{name}.jsonl"
    if not merged.is_file():
        with ShardedWriter(directory, name, rank=rank) as writer:
            mine = [i for i in range(rank, len(items), world) if keys[i] not in writer.done]
            bar = Progress(f"{what} (rank {rank})", len(mine), every=progress_every)
            for start in range(0, len(mine), batch_size):
                batch = mine[start:start + batch_size]
                records = work([items[i] for i in batch])
                if len(records) != len(batch):
                    raise RuntimeError(f"{what}: work returned {len(records)} records for {len(batch)} items")
                for i, record in zip(batch, records):
                    writer.write({"key": keys[i], **record})
                bar.update(len(batch))
        barrier()
        if is_main_process():
            merge_shards(directory, name, expected=keys)
        barrier()
    return [record for _, record in read_records(merged, repair=False)]


# ---------------------------------------------------------------------------------------------
# the summary
# ---------------------------------------------------------------------------------------------


def changes_from_baseline(out: Path, iterations: int) -> list[dict] | None:
    """Per iteration t, ``recipes.evaluate.changes_between`` of ``out/baseline`` and ``out/iter{t}``'s
    ``eval_details.json``: descriptions and POPE answers that turned right or wrong since the starting
    model, with the sign test's p. None when a details file is missing (no evaluation set)."""
    from recipes.evaluate import changes_between

    paths = [out / "baseline" / "eval_details.json"] + [out / f"iter{t}" / "eval_details.json"
                                                         for t in range(1, iterations + 1)]
    if iterations < 1 or not all(path.is_file() for path in paths):
        return None
    before = json.loads(paths[0].read_text())
    return [changes_between(before, json.loads(path.read_text())) for path in paths[1:]]


def write_summary(out: Path, recipe: str, baseline: dict, iterations: list[dict], seconds: float) -> dict:
    """``out/summary.json`` with the shape the issue fixes, plus ``changes`` (``changes_from_baseline``;
    None without evaluation details); returns it."""
    summary = {"recipe": recipe, "baseline": baseline, "iterations": iterations,
               "final": iterations[-1] if iterations else baseline, "seconds": round(seconds, 1),
               "changes": changes_from_baseline(out, len(iterations)) if is_main_process() else None}
    if is_main_process():
        write_json_atomic(out / "summary.json", summary)
    return summary


def format_table(rows: list[tuple[str, dict]], keys: Sequence[str] = METRIC_KEYS) -> str:
    """A plain-text table: one row per (name, metrics), metrics in percent."""
    header = f"{'':<12}" + "".join(f"{k:>10}" for k in keys)
    lines = [header, "-" * len(header)]
    for name, metrics in rows:
        cells = "".join(f"{100 * metrics[k]:>10.1f}" if k in metrics else f"{'-':>10}" for k in keys)
        lines.append(f"{name:<12}{cells}")
    return "\n".join(lines)


def print_summary(summary: dict) -> None:
    if not is_main_process():
        return
    rows = [("baseline", summary["baseline"])]
    rows += [(f"iter {t}", m) for t, m in enumerate(summary["iterations"], 1)]
    print(f"\n{summary['recipe']}: metrics in % on the held-out set ({summary['seconds']:.0f} s)")
    print(format_table(rows), flush=True)
    if summary.get("changes"):
        print(format_changes(summary["changes"]), flush=True)


def format_changes(changes: list[dict]) -> str:
    """What changed since the baseline, item by item: per iteration, descriptions cleaned (no longer naming
    an absent object) against spoiled, POPE answers turned right against turned wrong, each with the
    sign test's p (``rewards.paired``; a large p: the change is within what chance gives)."""
    lines = ["changed since the baseline: descriptions cleaned / spoiled, POPE answers turned right / wrong"]
    for t, change in enumerate(changes, 1):
        d, p = change["descriptions"], change["pope"]
        lines.append(f"iter {t:<7}descriptions {d['better']} / {d['worse']} of {d['n']} (p {d['p']:.2g}), "
                     f"POPE {p['better']} / {p['worse']} of {p['n']} (p {p['p']:.2g})")
    return "\n".join(lines)
