"""The shared data files (benchmarks and reasoning traces live in ``../shared/data``, next to the repository; they
are read from there, never copied or downloaded), and the one JSONL reader the commands use."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

SHARED_DATA = os.path.join("..", "shared", "data")     # relative to the repository root, where commands run


def shared(name: str) -> str:
    """Path of a shared data file, e.g. ``shared("tinyshakespeare.txt")``."""
    return os.path.join(SHARED_DATA, name)


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
