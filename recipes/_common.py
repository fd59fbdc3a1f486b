"""Small helpers shared by the recipe scripts: dataclass configs on the command line, progress lines.

- ``add_config_arguments`` / ``config_from_args``: every field of a config dataclass becomes a
  ``--flag value`` option (nested dataclasses as ``--outer.inner value``); the resolved config is
  printed at start with ``print_config`` (DESIGN.md, "Conventions").
- ``Progress``: a line at a steady rate with items done / total, rate and ETA.
- ``set_cpu_threads``: one intra-op thread per core on a CPU-only machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time

import torch

# ---------------------------------------------------------------------------------------------
# configs on the command line
# ---------------------------------------------------------------------------------------------


def _flat_fields(config, prefix: str = ""):
    """(dotted name, value) of every leaf field of a (possibly nested) dataclass instance."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from _flat_fields(value, prefix + f.name + ".")
        else:
            yield prefix + f.name, value


def _is_nested_tuple(value) -> bool:
    return isinstance(value, (tuple, list)) and any(isinstance(v, (tuple, list, dict)) for v in value)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _GivenNone:
    """``--field none``: set the field to None. (argparse's own None means the option was not given.)"""

    def __repr__(self) -> str:
        return "None"


GIVEN_NONE = _GivenNone()


def _parse_scalar(text: str):
    """A value for a field whose default is None: int, float, bool, 'none' (``GIVEN_NONE``), else the string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("none", "null"):
        return GIVEN_NONE
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def _parser_for(value):
    """An argparse ``type`` that reads a string into the type of ``value`` (the field's default)."""
    if isinstance(value, bool):
        return _parse_bool
    if isinstance(value, int):
        return int
    if isinstance(value, float):
        return float
    if isinstance(value, str):
        return str
    if isinstance(value, (tuple, list)):
        element = _parser_for(value[0]) if value else _parse_scalar
        return lambda text: tuple(element(part.strip()) for part in text.split(",") if part.strip())
    return _parse_scalar


def add_config_arguments(parser: argparse.ArgumentParser, config) -> None:
    """Add one ``--name value`` option per leaf field of the dataclass instance ``config``.

    Nested dataclasses give dotted names (``--world.noise_share 0.8``); tuples are written with commas
    (``--betas 0.9,0.95``); booleans take true/false. Fields holding nested tuples (colour tables) are
    not offered. Every option defaults to ``None`` (= keep the config's value).
    """
    for name, value in _flat_fields(config):
        if _is_nested_tuple(value):
            continue
        shown = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
        parser.add_argument(f"--{name}", dest=f"cfg:{name}", type=_parser_for(value), default=None,
                            metavar=type(value).__name__.upper() if value is not None else "VALUE",
                            help=f"(default: {shown})")


def _replace_path(config, dotted: str, value):
    head, _, rest = dotted.partition(".")
    if rest:
        return dataclasses.replace(config, **{head: _replace_path(getattr(config, head), rest, value)})
    return dataclasses.replace(config, **{head: value})


def config_from_args(args: argparse.Namespace, config):
    """``config`` with every option the user gave (see ``add_config_arguments``) replaced; ``--field none``
    sets a field whose default is None back to None (a preset may have set it)."""
    for key, value in vars(args).items():
        if key.startswith("cfg:") and value is not None:
            config = _replace_path(config, key[len("cfg:"):], None if value is GIVEN_NONE else value)
    return config


def given_flags(config, names) -> list[str]:
    """The flags among ``names`` (config fields whose default is None) that the command line set, as
    "--name": for refusing real-data flags on the built-in world rather than ignoring them."""
    return [f"--{name}" for name in names if getattr(config, name) is not None]


def config_to_dict(config) -> dict:
    """A JSON-ready dict of a dataclass config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def print_config(config, title: str | None = None, file=None) -> None:
    """Print the resolved config, one ``name = value`` line per leaf field."""
    file = file or sys.stdout
    print(f"{title or type(config).__name__}:", file=file)
    for name, value in _flat_fields(config):
        print(f"  {name} = {value!r}", file=file)
    file.flush()


# ---------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Prints ``{what}: done/total  rate/s  elapsed  eta`` at most every ``every`` seconds, and at the end.

        progress = Progress("evaluate", total=400)
        for batch in batches:
            ...
            progress.update(len(batch))
    """

    def __init__(self, what: str, total: int, *, unit: str = "items", every: float = 10.0, enabled: bool = True):
        self.what, self.total, self.unit, self.every, self.enabled = what, total, unit, every, enabled
        self.done = 0
        self.started = self.last = time.time()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.time()
        if self.enabled and (now - self.last >= self.every or self.done >= self.total):
            elapsed = now - self.started
            rate = self.done / max(elapsed, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            print(f"{self.what}: {self.done}/{self.total} {self.unit}  {rate:.1f}/s  "
                  f"elapsed {format_seconds(elapsed)}  eta {format_seconds(eta)}", flush=True)
            self.last = now


# ---------------------------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------------------------


def _busy_cores_elsewhere(samples: int = 5, interval: float = 0.05) -> int:
    """How many other processes are running right now (Linux: /proc/loadavg's runnable count, minus this one;
    the median of a few readings). 0 where that is not available."""
    counts = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0
        counts.append(max(running - 1, 0))
        time.sleep(interval)
    return sorted(counts)[len(counts) // 2]


@contextlib.contextmanager
def built_on(device, dtype: torch.dtype):
    """Modules constructed inside are allocated on ``device`` in ``dtype`` from the start, so a 7B model never
    sits on the CPU, nor in float32, on its way to the GPU."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def threads_per_process() -> int:
    """The CPU cores this process may use, shared evenly among the processes torchrun started on this machine
    (``LOCAL_WORLD_SIZE``): a fixed count, so that ranks never take more threads than there are cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def set_cpu_threads(threads: int | None = None, *, verbose: bool = True) -> int:
    """Choose the number of intra-op threads on a machine without a GPU; returns it (0 on a GPU machine).

    Default: one per core this process may use, minus the cores other running processes occupy now (at
    least 1). Tiny models on a small CPU run fastest with one thread per free core; a thread that has
    to share its core with another job stalls every parallel operation of the others (OpenMP threads
    wait for each other), which on a 2-core machine shared with one busy job made each training step
    about 10 times slower with 2 threads than with 1.
    """
    if torch.cuda.is_available():
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    if threads is None:
        busy = _busy_cores_elsewhere()
        threads = max(1, cores - busy)
        if verbose and busy:
            print(f"note: {busy} other process(es) running on this {cores}-core machine: using {threads} "
                  "thread(s)", flush=True)
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()

