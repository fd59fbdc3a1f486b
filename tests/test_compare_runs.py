"""recipes/compare_runs.py: finished runs read back and laid side by side."""

import json

import pytest

from recipes.compare_runs import comparison_rows, differing_settings, format_rows, main, metric_cell, read_run


def _run(directory, recipe, settings, baseline, iterations, seconds=12.3):
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"recipe": recipe, "config": settings}))
    (directory / "summary.json").write_text(json.dumps({
        "recipe": recipe, "baseline": baseline, "iterations": iterations,
        "final": iterations[-1] if iterations else None, "seconds": seconds}))
    return directory


def test_a_cell_reads_baseline_then_each_iteration_in_percent():
    summary = {"baseline": {"chair_s": 0.205}, "iterations": [{"chair_s": 0.124}, {"chair_s": 0.1}, {}]}
    assert metric_cell(summary, "chair_s") == "20.50 -> 12.40 / 10.00 / -"
    assert metric_cell(summary, "chair_s", digits=1) == "20.5 -> 12.4 / 10.0 / -"
    assert metric_cell({"baseline": None, "iterations": []}, "recall") == "- -> -"


def test_only_the_settings_that_differ_within_a_recipe_are_named(tmp_path):
    a = read_run(_run(tmp_path / "a", "csr", {"out": "a", "lam": 0.9, "seed": 0, "beta": 0.25},
                      {"chair_s": 0.2, "recall": 0.74}, [{"chair_s": 0.12, "recall": 0.7}]))
    b = read_run(_run(tmp_path / "b", "csr", {"out": "b", "lam": 0.0, "seed": 0, "beta": 0.25},
                      {"chair_s": 0.2, "recall": 0.74}, [{"chair_s": 0.05, "recall": 0.33}]))
    c = read_run(_run(tmp_path / "c", "llava_rlhf", {"out": "c", "use_facts": False}, {"chair_s": 0.2}, [{"chair_s": 0.13}]))
    assert differing_settings([a, b]) == ["lam"]  # out is ignored, seed and beta are the same
    assert differing_settings([a, {**a, "settings": {**a["settings"], "extra": 1}}]) == ["extra"]
    rows = comparison_rows([a, b, c], metrics=("chair_s", "recall"))
    assert rows[0] == ["run", "recipe", "settings", "chair_s", "recall", "seconds"]
    assert rows[1] == ["a", "csr", "lam=0.9", "20.00 -> 12.00", "74.00 -> 70.00", "12"]
    assert rows[2] == ["b", "csr", "lam=0.0", "20.00 -> 5.00", "74.00 -> 33.00", "12"]
    assert rows[3] == ["c", "llava_rlhf", "-", "20.00 -> 13.00", "- -> -", "12"]  # alone in its recipe
    markdown = format_rows(rows, markdown=True).splitlines()
    assert markdown[0] == "| run | recipe | settings | chair_s | recall | seconds |"
    assert markdown[2] == "| a | csr | lam=0.9 | 20.00 -> 12.00 | 74.00 -> 70.00 | 12 |"
    text = format_rows(rows).splitlines()
    recipe_column_starts = {line.index(row[1]) for line, row in zip(text, rows)}
    assert len(recipe_column_starts) == 1  # the columns are aligned


def test_unfinished_or_foreign_directories_are_refused_by_name(tmp_path, capsys):
    (tmp_path / "killed").mkdir()
    with pytest.raises(ValueError, match="killed: no summary.json"):
        read_run(tmp_path / "killed")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken/summary.json: not JSON"):
        read_run(tmp_path / "broken")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "summary.json").write_text(json.dumps({"recipe": "x", "baseline": {}}))
    with pytest.raises(ValueError, match="no 'iterations'"):
        read_run(tmp_path / "other")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "killed")])
    assert "killed: no summary.json" in capsys.readouterr().err


def test_the_command_line_prints_the_table(tmp_path, capsys):
    run = _run(tmp_path / "run", "rlaif_v", {"out": "run", "seed": 0}, {"pope_f1": 0.9287}, [{"pope_f1": 0.9311}], seconds=202)
    table = main([str(run), "--metrics", "pope_f1", "--digits", "1"])
    assert capsys.readouterr().out.strip() == table
    assert table.splitlines()[1].split() == ["run", "rlaif_v", "-", "92.9", "->", "93.1", "202"]
