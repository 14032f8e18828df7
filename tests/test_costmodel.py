"""The cost model that keeps sparse decoding from being slower than dense: its decision on fixed inputs, and the
runtime applying it (rows within the threshold decode densely, and the engine counts which path ran)."""
from __future__ import annotations

import pytest
import torch

from asyncspade import costmodel
from asyncspade.config import SparseConfig
from asyncspade.costmodel import CostModel
from asyncspade.engine import Engine
from asyncspade.sampling import SamplingParams

ROW = 3 * 64 * 2                                  # SmolLM2: 3 KV heads x 64 dims x bf16
MODEL = CostModel(call_dense=10e-6, call_sparse=60e-6, byte=1 / 33e9)


def test_threshold_solves_dense_equals_sparse():
    rows = (2 * 1024 + 2048, 2 / 16)              # refine 2048 candidates + attend the budget; pages, in-line
    n = MODEL.threshold(rows, ROW, 1024)
    assert MODEL.dense(n, ROW) <= MODEL.sparse(n, rows, ROW) <= MODEL.dense(n + 1, ROW) * 1.001
    assert MODEL.dense(2 * n, ROW) > MODEL.sparse(2 * n, rows, ROW)          # beyond it sparse is cheaper
    # by hand: (50 us / (384 B / 33 GB/s) + 4096 rows) / (2 - 1/8) = (4297 + 4096) / 1.875 = 4476 tokens
    assert n == 4476


def test_scattered_rows_cost_more_and_move_the_threshold_out():
    """Rows read at random (candidate pages, selected tokens) cost more per byte than dense streaming: at 4x the
    time per byte the same rows pay only from a longer cache, and a sparse path reading half of dense's rows at
    random never pays."""
    slow = CostModel(call_dense=10e-6, call_sparse=60e-6, byte=1 / 33e9, gather=4 / 33e9)
    rows = (2 * 1024 + 2048, 2 / 16)
    n = slow.threshold(rows, ROW, 1024)
    assert slow.dense(n, ROW) <= slow.sparse(n, rows, ROW) <= slow.dense(n + 1, ROW) * 1.001
    # by hand: (50 us / (384 B / 33 GB/s) + 4 x 4096 rows) / (2 - 4/8) = (4297 + 16384) / 1.5 = 13787 tokens
    assert n == 13787 and n > MODEL.threshold(rows, ROW, 1024)
    assert slow.threshold((0, 0.5), ROW, 1024) > 10 ** 15


def test_threshold_never_below_the_budget_and_never_when_sparse_reads_more():
    assert MODEL.threshold((10, 0), ROW, 4096) == 4096         # tiny fixed cost: the budget still rules
    assert MODEL.threshold((2048, 2.0), ROW, 1024) > 10 ** 15  # reads at least every row: never pays


def test_measurement_is_plausible():
    m = costmodel.measure(3, 3, 64, torch.bfloat16)
    assert costmodel.plausible(m)


def test_runtime_decodes_densely_below_the_measured_threshold(tiny_llama, monkeypatch):
    """With min_sparse left to the cost model, caches within its threshold run dense and longer ones sparse;
    the runtime counts both."""
    model, tok = tiny_llama
    monkeypatch.delenv("ASYNCSPADE_MIN_SPARSE")
    # a machine where the sparse path's calls cost as much as reading 40 rows (tiny llama: a row is 2 KV heads x 16
    # dims x fp32 = 128 B): streaming reads 2 x 32 rows, so dense (2n rows) costs more from n = (40 + 64) / 2 = 52
    monkeypatch.setattr(costmodel, "measure", lambda *a: CostModel(0.0, 40 * 128 * 1e-12, 1e-12))
    cfg = SparseConfig(method="streaming", budget=32, sink=4, recent=8, dense_layers=1)
    eng = Engine(model, tok, cfg, max_batch=1, max_tokens=256, weights="fp32", kv_dtype="fp32")
    threshold = eng.sparse.min_sparse
    assert threshold == 32 + 20
    prompt = list(range(300, 300 + threshold - 10))
    eng.run([eng.add(prompt, SamplingParams(max_tokens=25, ignore_eos=True))])
    eng.close()
    layers = model.config.num_hidden_layers - 1
    sparse_steps = len(prompt) + 24 - threshold       # decode steps whose cache exceeded the threshold
    assert eng.rt.sparse_calls == sparse_steps * layers
    assert eng.rt.dense_calls == (24 - sparse_steps) * layers
