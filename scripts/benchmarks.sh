#!/usr/bin/env bash
# Every measurement BENCHMARKS.md reports, in the order it reports them, on an idle machine (nothing else running:
# two cores are easily shared into meaningless timings). Results and logs go to results/ (not committed).
# Usage: scripts/benchmarks.sh [SECTION ...]   sections: peer bench batched before selectors formats selection
#                                               load demo (default all)
# The llama.cpp peer needs its scratch venv (built on first use by scripts/peer_llamacpp.py, ~7-10 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p results
want() { [ $# -eq 0 ] || [[ " ${SECTIONS} " == *" $1 "* ]]; }
SECTIONS="${*:-peer bench batched before selectors formats selection load demo}"
log() { echo "== $(date -u +%H:%M:%S) $*" >&2; }

if want peer; then
  log "llama.cpp peer"
  $PY scripts/peer_llamacpp.py --contexts 4096,32768 --json results/peer_llamacpp.json | tee results/peer_llamacpp.txt
fi
if want bench; then
  log "methods side by side (and the zero-cost bound, added by bench), batch 1, with the byte floor and llama.cpp"
  $PY -m asyncspade bench --roofline --peer results/peer_llamacpp.json --contexts 4096,32768 --batches 1 \
      --budgets 1024 --methods full,quest,oracle,lastq,asyncspade --fill 4096 --steps 16 --rounds 2 \
      --json results/bench_batch1.json --plot results/bench_batch1.png | tee results/bench_batch1.txt
fi
if want batched; then
  log "every context, batch 1/4/8"
  $PY -m asyncspade bench --roofline --contexts 4096,8192,16384,32768 --batches 1,4,8 --budgets 1024 \
      --methods full,quest,asyncspade --steps 8 --rounds 2 \
      --json results/bench_batched.json --plot results/bench_batched.png | tee results/bench_batched.txt
fi
if want before; then
  log "the engine before the lean forward (commit 8a68590, its defaults), for the before/after ratios"
  OLD=${TMPDIR:-/tmp}/asyncspade-8a68590
  [ -d "$OLD" ] || git worktree add --detach "$OLD" 8a68590 >&2
  PYTHONPATH="$OLD/src" $PY -m asyncspade bench --contexts 4096,32768 --batch 1 --budgets 1024 \
      --methods full,quest,asyncspade --steps 8 --rounds 2 --json results/bench_before_batch1.json \
      | tee results/bench_before_batch1.txt
  PYTHONPATH="$OLD/src" $PY -m asyncspade bench --contexts 4096 --batch 8 --budgets 1024 --methods full \
      --steps 8 --rounds 2 --json results/bench_before_batch8.json | tee results/bench_before_batch8.txt
fi
if want selectors; then
  log "where the selection runs: in-process, thread, worker process"
  for sel in sync thread async; do
    $PY -m asyncspade bench --contexts 8192,32768 --batches 1,4,8 --budgets 1024 --methods asyncspade \
        --selector "$sel" --steps 8 --rounds 2 --json "results/bench_selector_$sel.json" \
        | tee "results/bench_selector_$sel.txt"
  done
fi
if want formats; then
  log "weight and KV formats against fp32"
  $PY -m asyncspade eval fidelity --formats int8/bf16,int4/bf16,bf16/bf16,fp32/bf16 --limit 4 --max-tokens 3072 \
      --json results/fidelity_formats.json | tee results/fidelity_formats.txt
fi
if want formats; then
  log "speed of the weight formats (one bench per format: the format is fixed per run)"
  for w in int8 int4 bf16 fp32; do
    $PY -m asyncspade bench --weights "$w" --contexts 4096 --batches 1,8 --methods full --steps 16 --rounds 2 \
        --json "results/bench_weights_$w.json" | tee "results/bench_weights_$w.txt"
  done
fi
if want selection; then
  log "selection fidelity: the default asyncspade, the oracle, Quest and the previous default (hybrid, unrefined), half the candidates"
  $PY -m asyncspade eval fidelity --methods oracle,quest,asyncspade --budgets 128,1024 --limit 4 \
      --max-tokens 4096 --variants default,predictor=hybrid+refine=0+prefilter=none+refresh=1,superset=2+min_candidates=0 \
      --json results/fidelity_selection.json --plot results/fidelity_selection.png | tee results/fidelity_selection.txt
fi
if want load; then
  log "the server under load"
  $PY scripts/loadgen.py --methods full,asyncspade --budget 1024 --prompt-tokens 6000 --max-tokens 256 \
      --concurrency 1,4,8 --source traces --out results/loadgen.json | tee results/loadgen.txt
fi
if want demo; then
  log "make demo"
  make demo | tee results/demo.txt
fi
