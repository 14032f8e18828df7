"""The lean forward for the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM): weights read once from the Hugging
Face model into the layout the kernels want, and one flat loop per forward.

Per layer, top to bottom (``h`` the fp32 residual stream of the N tokens, ``x`` its normalised copy in the weight
format's activation dtype):

    qkv  = x @ W_qkv                      fused q, k, v projection
    q    = rope(norm(q)); K/V -> store    bias, Qwen3's q/k norm, RoPE, K/V rows written straight into the KVStore
    a    = attention(q)                   decode: the sparse runtime (selection, flash-decoding over the store);
                                          prefill: causal SDPA over the store
    h   += a @ W_o;  x = rmsnorm(h)       the residual add fused with the next norm
    gu   = x @ W_gate_up                  fused gate/up projection
    h   += (silu(g) * u) @ W_down;  x = rmsnorm_next(h)

then the LM head on each row's last position. No HF module runs and no per-layer Python object is built. With
weights on the C kernels (int4, int8) a decode step runs each side of attention as one C call
(:class:`~asyncspade.kernels.LayerGlue`): the same steps, without a Python -> C call between each two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels, quantcache
from .arch import head_dim, layer_windows, lean_unsupported
from .config import DEFAULT_WEIGHTS
from .kvcache import Batch, KVStore
from .quant import FORMATS, GEMV_ROWS, Linear


class LayerWeights:
    def __init__(self, layer, make_linear):
        """``make_linear(name, weight, bias)`` builds (or loads from the cache) one projection."""
        attn, mlp = layer.self_attn, layer.mlp
        device = make_linear.device
        self.attn_norm = layer.input_layernorm.weight.detach().float().to(device)
        self.mlp_norm = layer.post_attention_layernorm.weight.detach().float().to(device)
        qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
        biases = [p.bias for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
        # the QKV bias is added by qkv_post (in fp32, before the q/k norm and RoPE), not by the matmul
        self.qkv_bias = torch.cat([b.detach() for b in biases]).float().to(device) if biases[0] is not None else None
        self.qkv = make_linear("qkv", qkv, None)
        self.q_rows = attn.q_proj.weight.shape[0]
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.q_norm = q_norm.weight.detach().float().to(device) if q_norm is not None else None
        self.k_norm = k_norm.weight.detach().float().to(device) if k_norm is not None else None
        self.o = make_linear("o", attn.o_proj.weight, attn.o_proj.bias)
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
        gu_bias = None
        if mlp.gate_proj.bias is not None:
            gu_bias = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]).detach()
        self.gate_up = make_linear("gate_up", gate_up, gu_bias)
        self.down = make_linear("down", mlp.down_proj.weight, mlp.down_proj.bias)
        self._q_proj: Linear | None = None

    @property
    def q_proj(self) -> Linear:
        """The query rows of the fused QKV (cross-layer forecasts), made on first use."""
        if self._q_proj is None:
            self._q_proj = self.qkv.rows(0, self.q_rows)
        return self._q_proj

    def linears(self) -> list[Linear]:
        return [self.qkv, self.o, self.gate_up, self.down]


class LeanModel:
    """The Llama-family forward over a :class:`KVStore`; built once per (model, weight format, device)."""

    def __init__(self, model, weights: str = DEFAULT_WEIGHTS, device: torch.device | str | None = None,
                 cached: dict[str, torch.Tensor] | None = None):
        """``cached``: the projections' tensors as :meth:`state` returned them for this model and format (a
        quantization cache); anything missing is converted from the model's weights."""
        why = lean_unsupported(model)
        if why is not None:
            raise ValueError(f"the lean forward cannot run this model: {why}")
        if weights not in FORMATS:
            raise ValueError(f"unknown weight format {weights!r}; choose one of: {', '.join(FORMATS)}")
        cfg = model.config
        device = torch.device(device) if device is not None else next(model.parameters()).device
        self.device, self.weights, self.config = device, weights, cfg
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim(cfg)
        self.hidden = cfg.hidden_size
        self.eps = float(cfg.rms_norm_eps)
        self.scale = model.model.layers[0].self_attn.scaling
        m = model.model
        self.converted = 0                   # projections converted here rather than read from ``cached``
        self._linears: dict[str, Linear] = {}

        def make(prefix, fmt=weights):
            def make_linear(name, weight, bias):
                key = f"{prefix}{name}"
                parts = {k.split(":", 1)[1]: v for k, v in (cached or {}).items() if k.split(":", 1)[0] == key}
                if Linear.fits(fmt, parts, bias is not None):  # else absent, or another layout's: convert again
                    lin = Linear(fmt, {k: v.to(device) for k, v in parts.items()}, *weight.shape)
                else:
                    lin = Linear.from_weight(fmt, weight, bias, device=device)
                    self.converted += 1
                self._linears[key] = lin
                return lin
            make_linear.device = device
            return make_linear
        with torch.no_grad():
            self.embed = m.embed_tokens.weight.detach().to(device)
            self.layers = [LayerWeights(layer, make(f"layers.{i}.")) for i, layer in enumerate(m.layers)]
            self.final_norm = m.norm.weight.detach().float().to(device)
            # the LM head: int8 whenever the weights are quantized, read with fp32 logits (kernels.linear_i8)
            head = make("", "fp32" if weights == "fp32" else "int8")
            self.lm_head = head("lm_head", model.lm_head.weight, getattr(model.lm_head, "bias", None))
        projections = [[lin.c_projection() for lin in lw.linears()] for lw in self.layers]
        self.glue = None         # per layer, when every projection runs on a C kernel in decode
        if all(p is not None for ps in projections for p in ps):
            self.glue = [kernels.LayerGlue(ps) for ps in projections]
        self.windows = layer_windows(cfg)
        self._rotary = m.rotary_emb
        self.cos = self.sin = torch.empty(0, self.head_dim // 2)

    # ------------------------------------------------------------------------------------------------ setup
    def rope_tables(self, positions: int) -> None:
        """cos/sin ``[positions, D/2]`` from the model's own rotary embedding (its scaling rules included)."""
        if self.cos.shape[0] >= positions:
            return
        with torch.no_grad():
            pos = torch.arange(positions, device=self.device).view(1, -1)
            cos, sin = self._rotary(torch.zeros(1, dtype=torch.float32, device=self.device), pos)
        half = self.head_dim // 2
        self.cos, self.sin = cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous()

    def state(self) -> dict[str, torch.Tensor]:
        """Every projection's tensors, ``"<name>:<part>"`` -> tensor (what the quantization cache stores)."""
        return {f"{name}:{part}": t for name, lin in self._linears.items() for part, t in lin.t.items()}

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads (every projection and the LM head; the embedding row is noise)."""
        return sum(lin.nbytes for lw in self.layers for lin in lw.linears()) + self.lm_head.nbytes

    # ------------------------------------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, batch: Batch, store: KVStore, rt) -> torch.Tensor:
        """Tokens ``ids [B, L]`` at ``batch.start[b] + [0, L)`` in slots ``[batch.lo, batch.hi)``; returns fp32
        logits of each row's last position ``[B, V]``. Decode (L == 1) attends through ``rt``; prefill (B == 1)
        attends densely and lets ``rt`` observe the final chunk's queries."""
        b, n_tok = ids.shape
        n = b * n_tok
        H, KVH, D = self.heads, self.kv_heads, self.head_dim
        dev = self.device
        self.rope_tables(store.max_tokens)
        slot = (torch.arange(batch.lo, batch.hi, device=dev)).repeat_interleave(n_tok)
        pos = (batch.start.to(dev)[:, None] + torch.arange(n_tok, device=dev)).reshape(-1)
        h = self.embed[ids.reshape(-1).to(dev)].float()                 # [N, C] fp32 residual
        act_dtype = self.layers[0].qkv.act_dtype_for(n)
        x = torch.empty(n, self.hidden, dtype=act_dtype, device=dev)
        kernels.add_rmsnorm(h, None, self.layers[0].attn_norm, self.eps, x)
        q = torch.empty(n, H, D, device=dev)
        attn = torch.empty(n, H * D, dtype=act_dtype, device=dev)
        act = torch.empty(n, self.layers[0].down.in_features, dtype=act_dtype, device=dev)
        decode = n_tok == 1
        glue = self.glue if decode and n <= GEMV_ROWS and kernels.backend(dev) == "c" else None
        if glue is not None:
            qkv_buf, scratch = glue[0].scratch(n)
        for i, lw in enumerate(self.layers):
            nxt = self.layers[i + 1].attn_norm if i + 1 < len(self.layers) else self.final_norm
            if decode:
                rt.before_layer(i, h)
            if glue is not None:         # the keys also go into their Quest pages in this call, if kept
                glue[i].pre(x, qkv_buf, lw.qkv_bias, lw.q_norm, lw.k_norm, self.eps, self.cos, self.sin, slot, pos,
                            store.k[i], store.v[i], H, KVH, q, store.pages(i, 0, store.slots), store.page_size)
                if store.track_sketch:
                    store.after_write(i, batch, pages=False)
            else:
                kernels.qkv_post(lw.qkv(x), lw.qkv_bias, lw.q_norm, lw.k_norm, self.eps, self.cos, self.sin, slot,
                                 pos, store.k[i], store.v[i], H, KVH, q)
                store.after_write(i, batch)
            if decode:
                rt.attend(i, q, attn.view(b, KVH, H // KVH, D))
            else:
                attn.copy_(self._prefill_attention(i, q, store, batch, n_tok))
                rt.observe_prefill(i, q.view(b, n_tok, H, D).transpose(1, 2))
            if glue is not None:
                glue[i].post(h, attn, x, lw.mlp_norm, nxt, self.eps, scratch)
            else:
                kernels.add_rmsnorm(h, lw.o(attn), lw.mlp_norm, self.eps, x)
                kernels.silu_mul(lw.gate_up(x), act)
                kernels.add_rmsnorm(h, lw.down(act), nxt, self.eps, x)
        return self.lm_head.logits(x.view(b, n_tok, -1)[:, -1])

    def _prefill_attention(self, layer: int, q: torch.Tensor, store: KVStore, batch: Batch, n_tok: int):
        """Causal attention of one sequence's chunk of ``n_tok`` queries at offset ``o`` over the store's first
        ``o + n_tok`` rows (a windowed layer sees only its window)."""
        assert batch.size == 1, "prefill runs one sequence at a time"
        o, s = int(batch.start[0]), int(batch.start[0]) + n_tok
        k = store.k[layer, batch.lo, :, :s].unsqueeze(0)
        v = store.v[layer, batch.lo, :, :s].unsqueeze(0)
        qq = q.view(1, n_tok, self.heads, self.head_dim).transpose(1, 2).to(k.dtype)
        window = self.windows[layer]
        mask = None
        if o > 0 or window is not None:
            i = torch.arange(o, s, device=q.device)[:, None]
            j = torch.arange(s, device=q.device)[None, :]
            mask = j <= i
            if window is not None:
                mask &= j > i - window
        out = F.scaled_dot_product_attention(qq, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                             enable_gqa=True)
        return out[0].transpose(0, 1).reshape(n_tok, -1)

    def query(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s query ``[B, H, D]`` (fp32) computed from a residual stream ``hidden [B, C]`` (fp32) that
        entered an earlier layer, at ``positions [B]``: the cross-layer forecast."""
        lw = self.layers[layer]
        b = hidden.shape[0]
        x = torch.empty(b, self.hidden, dtype=lw.q_proj.act_dtype_for(b), device=hidden.device)
        kernels.add_rmsnorm(hidden.clone(), None, lw.attn_norm, self.eps, x)
        q = torch.empty(b, self.heads, self.head_dim, device=hidden.device)
        bias = None if lw.qkv_bias is None else lw.qkv_bias[:lw.q_rows]
        kernels.qkv_post(lw.q_proj(x), bias, lw.q_norm, None, self.eps, self.cos, self.sin,
                         torch.zeros(b, dtype=torch.int64), positions, None, None, self.heads, 0, q)
        return q


def lean_model(model, weights: str = DEFAULT_WEIGHTS, device: torch.device | str | None = None) -> LeanModel:
    """The :class:`LeanModel` of ``model`` in ``weights`` format, built once and shared by every engine on it.

    For a model loaded from a checkpoint directory the converted projections are cached on disk (``quantcache``),
    so the next load reads them instead of quantizing again."""
    memo = model.__dict__.setdefault("_asyncspade_lean", {})
    device = torch.device(device) if device is not None else next(model.parameters()).device
    key = (weights, str(device))
    if key not in memo:
        path = quantcache.path_for(model, weights)
        cached = quantcache.load(path) if path is not None else None
        lean = LeanModel(model, weights, device, cached)
        if path is not None and lean.converted:
            quantcache.save(path, lean.state())
        memo[key] = lean
    return memo[key]
