"""The lean forward (lean.py) against the Hugging Face modules: tokens, logits, weight formats, the quantization
cache, sliding windows, and the fallback to the HF-module path for other architectures."""
from __future__ import annotations

import pytest
import torch

from asyncspade import kernels
from asyncspade.config import METHODS, SparseConfig
from asyncspade.engine import Engine
from asyncspade.lean import LeanModel, lean_model
from asyncspade.models import load_model, tiny_model
from asyncspade.quant import Linear
from asyncspade.sampling import SamplingParams
from conftest import EXACT, lively

NEW = 32
FAMILY = {                       # model type -> config overrides (biases, q/k norm, windows come with the type)
    "llama": {},
    "qwen2": {},                 # QKV biases
    "qwen3": {},                 # q/k RMSNorm
    "mistral": {},
}


pytestmark = pytest.mark.usefixtures("one_thread")      # tiny tensors: see conftest.one_thread


def make(arch: str, **overrides):
    model, tok = tiny_model(arch, seed=2, **overrides)
    return lively(model, seed=5), tok


def prompts(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 5000, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, ids, n=NEW):
    model.set_attn_implementation("sdpa")
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def run(model, tok, ps, cfg=None, n=NEW, **kw):
    """Greedy tokens and per-step logits of every prompt, decoded as one batch."""
    eng = Engine(model, tok, cfg or SparseConfig(), max_batch=len(ps), max_tokens=256, prefill_chunk=24, **kw)
    logits = []
    eng.logits_hook = lambda seqs, lg: logits.append(lg.clone())
    try:
        seqs = [eng.add(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p in ps]
        eng.run(seqs)
        return [s.output_ids for s in seqs], logits, eng.path
    finally:
        eng.close()
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("arch", sorted(FAMILY))
def test_fp32_lean_equals_hf_generate(arch):
    """Batch 1 and a mixed-length batch of 3 (chunked prefill with an offset) give HF's greedy tokens."""
    model, tok = make(arch, **FAMILY[arch])
    ps = prompts([50, 17, 33])
    ref = [hf_greedy(model, p) for p in ps]
    assert len({tuple(r) for r in ref}) == 3 and len(set(ref[0])) > 5      # not vacuous
    one, _, path = run(model, tok, ps[:1], **EXACT)
    assert path == "lean" and one == ref[:1]
    three, _, _ = run(model, tok, ps, **EXACT)
    assert three == ref


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_fp32_lean_logits_match_hf_modules(arch):
    """Teacher-forced: the engine's decode logits equal the HF model's own forward logits within 1e-4."""
    model, tok = make(arch)
    [p] = prompts([40])
    toks, logits, _ = run(model, tok, [p], n=12, **EXACT)
    full = torch.tensor([p + toks[0][:-1]])
    with torch.no_grad():
        ref = model(full).logits[0, len(p):].float()            # positions whose next token was decoded
    got = torch.cat(logits)                                       # decode steps: tokens 2..12
    torch.testing.assert_close(got, ref[:got.shape[0]], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["c", "torch"])
def test_kernel_backends_agree(backend):
    """The C kernels and their torch references drive the same forward to the same tokens."""
    model, tok = make("qwen3")
    ps = prompts([40, 21])
    with kernels.torch_only() if backend == "torch" else torch.no_grad():
        got, _, _ = run(model, tok, ps, **EXACT)
    assert got == [hf_greedy(model, p) for p in ps]


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
def test_layer_glue_is_the_same_forward(fmt, arch):
    """With weights on the C kernels a decode layer runs as two C calls; the same steps as the per-op path, so the
    same logits bit for bit (q/k norm and QKV biases included)."""
    model, tok = make(arch)
    ps = prompts([40, 21])
    glued, glued_logits, _ = run(model, tok, ps, weights=fmt)
    lean = lean_model(model, fmt)
    assert lean.glue is not None
    kept, lean.glue = lean.glue, None
    try:
        plain, plain_logits, _ = run(model, tok, ps, weights=fmt)
    finally:
        lean.glue = kept
    assert glued == plain
    assert all(torch.equal(a, b) for a, b in zip(glued_logits, plain_logits))


@pytest.mark.parametrize("fmt,tol", [("bf16", 0.05), ("int8", 0.1), ("int4", 0.75)])
def test_low_precision_logits_close_to_fp32(fmt, tol):
    """Same prompt, teacher-forced on the fp32 tokens: logits within ``tol`` (relative to their spread). Random
    Gaussian weights are int4's worst case (16 levels per group of 32); on real checkpoints the fidelity of each
    format is measured on reasoning traces (BENCHMARKS.md)."""
    model, tok = tiny_model("llama", seed=2)            # default-scale weights: smooth, not chaotic, logits
    [p] = prompts([40])
    toks, ref, _ = run(model, tok, [p], n=8, **EXACT)
    forced = p + toks[0][:-1]
    eng = Engine(model, tok, SparseConfig(), max_batch=1, max_tokens=256, weights=fmt, kv_dtype="bf16")
    got = []
    eng.logits_hook = lambda seqs, lg: got.append(lg.clone())
    eng.run([eng.add(forced, SamplingParams(max_tokens=1, ignore_eos=True), decode_tail=7)])
    eng.close()
    ref, got = torch.cat(ref), torch.cat(got)
    assert got.shape == ref.shape
    err = (got - ref).abs().max() / ref.std()
    assert err < tol, f"{fmt}: max error {err:.3f} of the logits' spread"


def test_int8_error_is_the_rounding_only():
    """Every int8 weight is within half a step of its value, with the scale the kernels read (stored in bf16):
    quantizing with the unrounded scale left a per-channel gain error (measured: KL vs fp32 on reasoning traces
    0.0036 with it)."""
    w = torch.randn(64, 576, generator=torch.Generator().manual_seed(3)) * torch.rand(64, 1) * 4
    lin = Linear.from_weight("int8", w)
    step = lin.t["scale"].float()[:, None]
    assert bool(((lin.t["w"].float() * step - w).abs() <= step / 2 * (1 + 1e-5)).all())
    assert int(lin.t["w"].abs().max()) <= 127


def test_int4_error_is_the_rounding_only():
    """Every int4 weight is within half a step of its value, with the scale and minimum the kernel reads (bf16)."""
    w = torch.randn(64, 576, generator=torch.Generator().manual_seed(4)) * torch.rand(64, 1) * 4
    lin = Linear.from_weight("int4", w)
    step = lin.t["sm"].float()[..., 0].repeat_interleave(32, 1)
    assert bool(((lin.dequantized() - w).abs() <= step / 2 * (1 + 1e-3)).all())


def test_int4_keeps_q4_1_weights_exactly():
    """Weights from a GGUF Q4_1 checkpoint (the bundled model) lie on a grid q * d + m with fp16 d and m per 32:
    int4 stores them exactly (a bf16 scale moved them off the grid: 3x the weight error, 2x the KL vs fp32)."""
    g = torch.Generator().manual_seed(6)
    d = (torch.rand(48, 576 // 32, 1, generator=g) * 0.01 + 1e-3).half().float()
    m = (torch.randn(48, 576 // 32, 1, generator=g) * 0.05).half().float()
    q = torch.randint(0, 16, (48, 576 // 32, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15                              # every group spans its whole grid, as Q4_1's do
    w = (q * d + m).view(48, 576)
    assert torch.equal(Linear.from_weight("int4", w).dequantized(), w)


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4"])
def test_weight_formats_represent_the_weight(fmt):
    g = torch.Generator().manual_seed(9)
    w = torch.randn(48, 64, generator=g)
    lin = Linear.from_weight(fmt, w)
    tol = {"fp32": 0, "bf16": 1e-2, "int8": 2e-2, "int4": 0.2}[fmt]
    assert (lin.dequantized() - w).abs().max() <= tol * w.abs().max()
    x = torch.randn(3, 64, generator=g)
    for dtype in {lin.act_dtype, lin.act_dtype_for(3)}:         # the many-row path and the decode kernel's
        xd = x.to(dtype)
        y, ref = lin(xd).float(), xd.float() @ lin.dequantized().t()
        # bf16 activations or outputs round by 2^-9; int4's decode kernel rounds activations to int8 per 32
        assert (y - ref).norm() / ref.norm() < 0.02
        sub = lin.rows(8, 24)
        torch.testing.assert_close(sub(xd).float(), y[:, 8:24], atol=0.05, rtol=0.02)


def test_quantized_weights_are_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCSPADE_CACHE", str(tmp_path / "cache"))
    model, tok = make("llama")
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    first, _ = load_model(str(tmp_path / "ckpt"), torch.float32)
    a = lean_model(first, "int8")
    assert a.converted == 4 * 4 + 1                               # every projection, quantized here
    assert list((tmp_path / "cache" / "lean").glob("*.safetensors"))
    second, _ = load_model(str(tmp_path / "ckpt"), torch.float32)   # a new model object: a fresh lean model
    b = lean_model(second, "int8")
    assert b is not a and b.converted == 0                         # everything read from the cache
    sa, sb = a.state(), b.state()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    [p] = prompts([30])
    assert run(first, tok, [p], weights="int8")[0] == run(second, tok, [p], weights="int8")[0]


def test_a_cache_in_another_layout_is_converted_again(tmp_path, monkeypatch):
    """A cache file whose tensors do not fit the format (written by another layout: here the LM head without its
    scale) is not trusted: those projections are converted again, and the engine runs."""
    from asyncspade import quantcache
    monkeypatch.setenv("ASYNCSPADE_CACHE", str(tmp_path / "cache"))
    model, tok = make("llama")
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    first, _ = load_model(str(tmp_path / "ckpt"), torch.float32)
    state = lean_model(first, "int8").state()
    path = quantcache.path_for(first, "int8")
    quantcache.save(path, {k: v for k, v in state.items() if k != "lm_head:scale"})
    second, _ = load_model(str(tmp_path / "ckpt"), torch.float32)
    b = lean_model(second, "int8")
    assert b.converted == 1                                        # the LM head only
    [p] = prompts([30])
    assert run(first, tok, [p], weights="int8")[0] == run(second, tok, [p], weights="int8")[0]
    # same names, another dtype (int4 scales once stored in bf16): not trusted either
    state = lean_model(first, "int4").state()
    path = quantcache.path_for(first, "int4")
    quantcache.save(path, {k: v.to(torch.bfloat16) if k.endswith(":sm") else v for k, v in state.items()})
    third, _ = load_model(str(tmp_path / "ckpt"), torch.float32)
    assert lean_model(third, "int4").converted == 4 * 4           # every int4 projection; the int8 LM head is read


@pytest.mark.parametrize("method", METHODS)
def test_sparse_equals_dense_when_budget_covers_cache_on_lean_path(method):
    model, tok = make("qwen3")
    ps = prompts([30, 70])
    cfg = SparseConfig(method=method, budget=128, sink=4, recent=8, dense_layers=1)
    toks, logits, path = run(model, tok, ps, cfg, n=20)
    ref_toks, ref_logits, _ = run(model, tok, ps, SparseConfig(), n=20)
    assert path == "lean" and toks == ref_toks
    torch.testing.assert_close(torch.cat(logits), torch.cat(ref_logits))


@pytest.mark.parametrize("arch,overrides", [
    ("mistral", {"sliding_window": 24}),                                           # every layer windowed
    ("qwen2", {"sliding_window": 24, "use_sliding_window": True, "max_window_layers": 2,
               "layer_types": ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]}),
])
def test_sliding_window_layers_attend_their_window(arch, overrides):
    model, tok = make(arch, **overrides)
    ps = prompts([60, 35])                       # longer than the window: windowed attention differs from full
    ref = [hf_greedy(model, p) for p in ps]
    got, _, path = run(model, tok, ps, **EXACT)
    assert path == "lean" and got == ref
    # sparse methods select on the global layers only; the windowed ones keep their window
    eng = Engine(model, tok, SparseConfig(method="oracle", budget=32, sink=4, recent=8, dense_layers=0),
                 max_batch=1, max_tokens=256, **EXACT)
    windows = eng.rt.windows
    assert eng.rt.sparse_layers == [i for i in range(4) if windows[i] is None]
    eng.close()


def test_other_architectures_run_on_hf_modules():
    """Phi-3 (fused qkv_proj) is outside the lean family: the engine says so and still matches HF."""
    model, tok = make("phi3", pad_token_id=None)
    ps = prompts([40, 25])
    got, _, path = run(model, tok, ps, **EXACT)
    assert path == "hf"
    assert got == [hf_greedy(model, p) for p in ps]
    eng = Engine(model, tok, max_batch=1, max_tokens=64)
    assert "Hugging Face modules" in eng.path_note and "phi3" in eng.path_note
    eng.close()


def test_lean_refuses_outside_family():
    model, _ = make("phi3", pad_token_id=None)
    with pytest.raises(ValueError, match="phi3"):
        LeanModel(model)


@pytest.mark.slow
def test_bundled_model_lean_fp32_equals_hf_generate():
    model, tok = load_model(None, torch.float32)
    from asyncspade.models import encode_prompt
    ids = encode_prompt(tok, "Explain in detail how a steam engine works, step by step.", chat=True)
    ref = hf_greedy(model, ids)
    got, _, path = run(model, tok, [ids], **EXACT)
    assert path == "lean" and got == [ref]
