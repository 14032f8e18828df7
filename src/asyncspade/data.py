"""Where the shared data files are, and the one JSONL reader the commands use.

Benchmarks and evaluation sets (math problems, reasoning traces, long prose) are read from one data directory,
resolved once, whatever the working directory: ``--data-dir`` (the commands that read data take it), else
``$ASYNCSPADE_DATA``, else the repository default ``../shared/data`` next to a source checkout. Nothing is copied
or downloaded.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

DATA_ENV = "ASYNCSPADE_DATA"
# src/asyncspade/data.py -> the repository root -> its sibling shared/data
REPO_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


class DataNotFound(FileNotFoundError):
    """A shared data file is missing; the message names the three places that were considered."""


def data_dir(flag: str | os.PathLike | None = None) -> Path:
    """The data directory: ``flag`` (``--data-dir``), else ``$ASYNCSPADE_DATA``, else the repository default."""
    if flag:
        return Path(flag).expanduser()
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else REPO_DATA


def shared(name: str, flag: str | os.PathLike | None = None) -> str:
    """Path of a shared data file, e.g. ``shared("tinyshakespeare.txt")`` (it may not exist)."""
    return str(data_dir(flag) / name)


def data_file(name: str, flag: str | os.PathLike | None = None) -> Path:
    """Path of an existing shared data file; :class:`DataNotFound` naming every way to point at it otherwise."""
    path = data_dir(flag) / name
    if not path.is_file():
        source = ("--data-dir" if flag else f"${DATA_ENV}" if os.environ.get(DATA_ENV) else "the repository default")
        raise DataNotFound(f"data file {name} not found in {path.parent} (from {source}); point at the data "
                           f"directory with --data-dir DIR or the {DATA_ENV} environment variable (the repository "
                           f"default is {REPO_DATA})")
    return path


TRACES = shared("reasoning_traces.jsonl")
PROSE = shared("tinyshakespeare.txt")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` for every non-blank line; ``ValueError`` naming the file and line for a line that
    is not a JSON object."""
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {line_no} is not valid JSON: {exc}") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}: line {line_no} is not a JSON object")
            yield line_no, rec


def trace_texts(path: str | Path = TRACES) -> list[tuple[str, str]]:
    """``(prompt, output)`` of every reasoning trace in ``path``."""
    out = []
    for line_no, rec in iter_jsonl(path):
        if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("output"), str):
            raise ValueError(f"{path}: line {line_no}: expected 'prompt' and 'output' strings")
        out.append((rec["prompt"], rec["output"]))
    return out
