"""What asyncspade needs to know about a Hugging Face decoder's architecture, read from its config and modules."""
from __future__ import annotations

LEAN_FAMILY = ("llama", "mistral", "qwen2", "qwen3")     # SmolLM is a llama


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_windows(config, max_tokens: int | None = None) -> list[int | None]:
    """Per layer: the sliding-window length of a windowed layer, None for a global one. Windows no shorter than
    ``max_tokens`` are global in effect (None). Mistral windows every layer; Qwen2/Qwen3 (and newer configs) say
    per layer in ``layer_types``."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types:
        out = [window if t == "sliding_attention" else None for t in types[:n]]
    else:
        out = [window] * n if getattr(config, "model_type", "") == "mistral" else [None] * n
    return [w if w and (max_tokens is None or w < max_tokens) else None for w in out]


def lean_unsupported(model) -> str | None:
    """Why the lean forward cannot run ``model`` (None when it can): it covers the Llama family."""
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    if mt not in LEAN_FAMILY:
        return f"model type {mt!r} is outside the lean forward's family ({', '.join(LEAN_FAMILY)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} (the lean forward implements silu)"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "dynamic":
        return "dynamic RoPE scaling (its frequencies depend on the sequence length)"
    if head_dim(cfg) % 2 or head_dim(cfg) > 256 or cfg.num_attention_heads // cfg.num_key_value_heads > 32:
        return "head dim > 256 or odd, or more than 32 query heads per KV head"
    return None
