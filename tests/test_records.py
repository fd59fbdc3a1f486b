"""JSONL records: file:line errors, torn-line repair, sharded resume and merge without duplicates or gaps."""

import json

import pytest

from lvlm.records import ShardedWriter, merge_shards, read_data_file, read_json, read_records, write_json_atomic


def test_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2\n{"a": 3}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl:3: not valid JSON"):
        list(read_records(p, repair=False))
    q = tmp_path / "list.jsonl"
    q.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"list\.jsonl:2: expected a JSON object"):
        list(read_records(q))


def test_torn_last_line_is_dropped_and_appending_resumes(tmp_path):
    with ShardedWriter(tmp_path, "out") as w:
        for k in range(3):
            w.write({"key": k, "text": f"record {k}"})
    shard = tmp_path / "out.rank0.jsonl"
    with open(shard, "a") as f:
        f.write('{"key": 3, "te')  # killed mid-write
    with ShardedWriter(tmp_path, "out") as w:
        assert w.done == {0, 1, 2}
        for k in range(5):  # the rerun loops over everything; done keys are skipped
            w.write({"key": k, "text": f"record {k}"})
    keys = [r["key"] for _, r in read_records(shard)]
    assert keys == [0, 1, 2, 3, 4]


def test_merge_across_ranks_sorted_deduplicated_and_checked(tmp_path):
    with ShardedWriter(tmp_path, "pairs", rank=0) as w0, ShardedWriter(tmp_path, "pairs", rank=1) as w1:
        for k in range(6):
            (w0 if k % 2 == 0 else w1).write({"key": k})
    # A rerun with one rank sees both shards' keys.
    with ShardedWriter(tmp_path, "pairs", rank=0) as w:
        assert w.done == set(range(6))
    merged = merge_shards(tmp_path, "pairs", expected=range(6))
    assert [json.loads(line)["key"] for line in merged.read_text().splitlines()] == list(range(6))
    with pytest.raises(ValueError, match="1 item\\(s\\) missing"):
        merge_shards(tmp_path, "pairs", expected=range(7))


def test_json_list_files_and_atomic_json(tmp_path):
    p = write_json_atomic(tmp_path / "conv.json", [{"id": 1}, {"id": 2}])
    assert read_data_file(p) == [{"id": 1}, {"id": 2}]
    assert not list(tmp_path.glob(".*.tmp"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"id": 1}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        read_data_file(bad)


def test_read_json_names_a_missing_file_and_the_line_of_bad_json(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"a": [1, 2]}')
    assert read_json(good) == {"a": [1, 2]}
    with pytest.raises(FileNotFoundError, match=r"no annotation file at .*absent\.json"):
        read_json(tmp_path / "absent.json", "annotation file")
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "a": 1,\n  "b": \n}\n')
    with pytest.raises(ValueError, match=r"bad\.json:4: not valid JSON"):
        read_json(bad)
