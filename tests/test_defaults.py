"""One product, one configuration: the Python API, the CLI's generate and serve, and the drop-in decode
``method="asyncspade"`` with the same sparse settings, formats and selector placement by default."""
from __future__ import annotations

import torch

import asyncspade
from asyncspade import LLM
from asyncspade.cli.args import engine_options, sparse_from_args
from asyncspade.cli.dispatch import build_parser
from asyncspade.config import DEFAULT_KV_DTYPE, DEFAULT_WEIGHTS, SparseConfig
from asyncspade.placement import auto_selector


def cli(command: str):
    argv = [command, "--method", "asyncspade"]
    return build_parser(argv).parse_args(argv)


def test_api_cli_server_and_dropin_share_the_defaults(tiny_dir, tiny_llama):
    default = SparseConfig(method="asyncspade")
    with LLM(model=tiny_dir, method="asyncspade") as llm:
        eng = llm.engine
        api = (eng.sparse.replace(min_sparse=None), eng.lean.weights, eng.store.dtype, type(eng.rt.selector).__name__)
    for command in ("generate", "serve"):
        args = cli(command)
        assert sparse_from_args(args) == default
        assert engine_options(args) == {"weights": DEFAULT_WEIGHTS, "kv_dtype": DEFAULT_KV_DTYPE, "device": "cpu"}
        assert args.selector == "auto"
    assert api[0] == default
    assert api[1] == DEFAULT_WEIGHTS and api[2] == getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[
        DEFAULT_KV_DTYPE])
    assert api[3] == {"sync": "SyncSelector", "async": "AsyncSelector"}[auto_selector()]
    model, _ = tiny_llama
    with asyncspade.enable(model, method="asyncspade") as handle:
        assert handle.cfg == default              # the drop-in selects in-process, what auto picks on 2 cores
