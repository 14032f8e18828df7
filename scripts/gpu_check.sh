#!/usr/bin/env bash
# The GPU check of the lean forward (run on a machine where torch sees CUDA):
#   1. engine (lean forward, fp32 weights and KV, on cuda) vs Hugging Face greedy generate on cuda, 32 tokens, on a
#      tiny random Llama, Qwen2 and Qwen3 and on the bundled model;
#   2. one bench row: full and oracle at 4096 tokens of context, bf16 weights (the int formats are CPU kernels).
# Usage: scripts/gpu_check.sh [PYTHON]   (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
"$PY" - <<'PYEOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device")
from asyncspade.config import SparseConfig
from asyncspade.engine import Engine
from asyncspade.models import encode_prompt, load_model, tiny_model
from asyncspade.sampling import SamplingParams

def check(name, model, tok, ids):
    model = model.to("cuda")
    x = torch.tensor([ids], device="cuda")
    ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, min_new_tokens=32,
                         do_sample=False)[0, len(ids):].tolist()
    eng = Engine(model, tok, SparseConfig(), max_batch=1, max_tokens=len(ids) + 40, weights="fp32",
                 kv_dtype="fp32", device="cuda")
    seq = eng.add(ids, SamplingParams(max_tokens=32, ignore_eos=True))
    eng.run([seq])
    eng.close()
    same = sum(a == b for a, b in zip(seq.output_ids, ref))
    print(f"{name}: {eng.path_note}: {same}/32 greedy tokens equal HF generate on cuda")
    return same == 32

ok = True
for arch in ("llama", "qwen2", "qwen3"):
    model, tok = tiny_model(arch, seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15, generator=g)
    ok &= check(f"tiny {arch}", model, tok, torch.randint(100, 5000, (60,), generator=g).tolist())
model, tok = load_model(None, torch.float32)
ok &= check("bundled SmolLM2", model, tok, encode_prompt(tok, "Explain how a steam engine works.", chat=True))
sys.exit(0 if ok else 1)
PYEOF
"$PY" -m asyncspade bench --contexts 4096 --methods full,oracle --budgets 1024 --steps 16 --rounds 1 \
    --weights bf16 --kv-dtype bf16 --selector sync --device cuda 2>&1 | tail -12
