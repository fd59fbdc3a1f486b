"""Data records on disk: JSON Lines read with file:line errors, written atomically and resumably.

Long jobs (beam search over 13k prompts, sampling 10 responses for 4k instructions) write one record per
finished item and must survive being killed. The rules here:

- ``append_record`` writes one complete line and flushes it; a line is the unit of progress.
- ``read_records`` drops a torn last line (a crash mid-write) from the file itself, so an appended record
  never lands glued to half a line; any other malformed line is an error naming the file and line.
- ``ShardedWriter``: under torchrun every rank appends to its own shard ``name.rank{r}.jsonl``; a rerun
  reads the shards, skips the keys already done and continues; ``merge_shards`` concatenates the shards
  in key order into one file (written atomically) once every rank has finished.
- ``write_json_atomic`` / ``write_text_atomic``: temporary name in the same directory, then rename.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that has no newline (the trace of a crash mid-write)."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)


def read_records(path: str | Path, *, repair: bool = True) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each JSON object line of ``path`` (1-based lines, blanks skipped).

    A malformed line raises ``ValueError("file:line: ...")``. With ``repair`` a torn last line is first
    removed from the file (see module docstring).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    if repair:
        _drop_torn_tail(path)
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, found {type(record).__name__}")
            yield number, record


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """The JSON value in ``path``. A missing file raises ``FileNotFoundError("no <what> at <path>")``, one
    that is not valid JSON ``ValueError("file:line: not valid JSON (...)")``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def read_located_records(path: str | Path) -> list[tuple[str, object]]:
    """``(where, record)`` for each record (a dict) of a JSONL file (where = ``"file:line"``) or of a JSON
    file holding a list of objects (where = ``"file record i"``), so that a caller checking the records'
    fields can name the bad one. Unreadable JSON or a record that is not an object raises ``ValueError``."""
    path = Path(path)
    if path.suffix != ".json":
        return [(f"{path}:{line}", record) for line, record in read_records(path, repair=False)]
    data = read_json(path, "data file")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, found {type(data).__name__}")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise ValueError(f"{path} record {i}: expected a JSON object, found {type(record).__name__}")
    return [(f"{path} record {i}", record) for i, record in enumerate(data)]


def read_data_file(path: str | Path) -> list[dict]:
    """Records of a JSONL file, or of a JSON file holding a list of objects (LLaVA's conversation files)."""
    return [record for _, record in read_located_records(path)]


def append_record(f, record: dict) -> None:
    """Append one record as one line to the open text file ``f`` and flush it to the OS."""
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()


class ShardedWriter:
    """Per-rank, resumable JSONL output: ``DIR/NAME.rank{r}.jsonl``, records keyed by ``record[key]``.

    ``done`` is the set of keys already written by *any* rank (so a rerun with another world size
    still skips them); ``write(record)`` appends one line. Use as a context manager.
    """

    def __init__(self, directory: str | Path, name: str, *, rank: int = 0, key: str = "key"):
        self.directory, self.name, self.key = Path(directory), name, key
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"{name}.rank{rank}.jsonl"
        self.done: set = set()
        for shard in self.shards():
            for line, record in read_records(shard):
                if key not in record:
                    raise ValueError(f"{shard}:{line}: record has no {key!r} field")
                self.done.add(record[key])
        self._file = open(self.path, "a")

    def shards(self) -> list[Path]:
        return sorted(self.directory.glob(f"{self.name}.rank*.jsonl"))

    def write(self, record: dict) -> None:
        if self.key not in record:
            raise ValueError(f"record for {self.path} has no {self.key!r} field")
        if record[self.key] in self.done:
            return
        append_record(self._file, record)
        self.done.add(record[self.key])

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def merge_shards(directory: str | Path, name: str, *, key: str = "key", expected: Iterable | None = None) -> Path:
    """Merge ``NAME.rank*.jsonl`` into ``NAME.jsonl`` sorted by key, dropping duplicates; atomic.

    With ``expected`` (all keys the job should have produced), a missing key is an error naming how many
    and which: no silent gaps.
    """
    directory = Path(directory)
    records: dict = {}
    for shard in sorted(directory.glob(f"{name}.rank*.jsonl")):
        for _, record in read_records(shard):
            records.setdefault(record[key], record)
    if expected is not None:
        missing = [k for k in expected if k not in records]
        if missing:
            raise ValueError(f"{directory}/{name}: {len(missing)} item(s) missing after merge, e.g. {missing[:5]}")
    lines = "".join(json.dumps(records[k], ensure_ascii=False) + "\n" for k in sorted(records))
    return write_text_atomic(directory / f"{name}.jsonl", lines)
