"""Weight formats of the lean forward: one :class:`Linear` per projection, in the layout its kernel reads.

=======  =============================================  =================================================  ===========
format   stored                                         kernel                                             activations
=======  =============================================  =================================================  ===========
fp32     ``W^T [K, N]`` fp32                            ``x @ W^T``                                        fp32
bf16     ``W [N, K]`` bf16                              ``F.linear``                                       bf16
int8     ``W [N, K]`` int8 + per-output-channel scale   decode (<= 32 rows): ``kernels.linear_i8``;        fp32 / bf16
                                                        more rows: ``torch._weight_int8pack_mm``
int4     ``[N, K/2]`` uint8, two columns a byte, + an   decode (<= 32 rows): ``kernels.linear_i4``;        fp32 / bf16
         fp16 (scale, min) per 32 columns               more rows: ``F.linear`` on the dequantized bf16
=======  =============================================  =================================================  ===========

Quantization is symmetric per output channel for int8 and asymmetric per group for int4 (as Q4_1: a scale and a
minimum per 32 weights, ``w = q * scale + min``, q in [0, 15]). Scales are stored in bf16 (int8) or fp16 (int4)
and the weights are quantized with the stored (rounded) values, so the only error is the integer rounding. torch's
int kernels read bf16 activations (with fp32 ones its int8 kernel is ~8x slower) and round their output to bf16;
asyncspade's C kernels keep decode's outputs in fp32 (int8: fp32 activations; int4: activations rounded to 16 bits
per 32) at the speed of the weights' bytes. On devices other than the CPU the int formats are stored dequantized in
bf16 (their kernels are CPU ones here).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels
from .config import WEIGHT_FORMATS as FORMATS
INT4_GROUP = 32
GEMV_ROWS = 32          # int8/int4 inputs of at most this many rows (decode) take the C kernels. From 4 rows they
                        # are compute-bound and torch's kernels are faster (all projections, AMD EPYC, ours vs
                        # torch's: int8 1 row 3.9 vs 4.9 ms, 4: 6.0 vs 5.3, 8: 12.7 vs 9.4; int4 1 row 2.19 vs
                        # 2.31, 4: 4.0 vs 3.2, 8: 7.2 vs 5.8), but one kernel for every decode batch keeps a
                        # sequence's tokens independent of what it is batched with


def _bf16_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 values >= ``x`` (positive, fp32), as fp32."""
    b = x.to(torch.bfloat16)
    bits = b.view(torch.int16)
    bits += (b.float() < x).to(torch.int16)      # positive bf16: the next value up is the next bit pattern
    return b.float()


class Linear:
    """``y = x W^T (+ b)`` in one weight format. ``act_dtype`` is the dtype ``x`` must have; ``y`` has it too."""

    # each format's tensors and their dtypes (a bias is optional)
    TENSORS = {"fp32": {"w": torch.float32}, "bf16": {"w": torch.bfloat16},
               "int8": {"w": torch.int8, "scale": torch.bfloat16}, "int4": {"w4": torch.uint8, "sm": torch.float16}}

    @classmethod
    def fits(cls, fmt: str, tensors: dict[str, torch.Tensor], bias: bool) -> bool:
        """Whether ``tensors`` (e.g. read from a cache) are this format's, by name and dtype."""
        want = cls.TENSORS[fmt]
        if set(tensors) != set(want) | ({"bias"} if bias else set()):
            return False
        return all(tensors[name].dtype == dtype for name, dtype in want.items())

    def __init__(self, fmt: str, tensors: dict[str, torch.Tensor], out_features: int, in_features: int):
        self.fmt, self.t = fmt, tensors
        self.out_features, self.in_features = out_features, in_features
        self.bias = tensors.get("bias")
        self.act_dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
        self.device = next(iter(tensors.values())).device
        w = tensors.get("w")
        if fmt == "fp32":
            self._w_t = w
        elif fmt == "bf16":
            self._w = w
        elif fmt == "int8":
            self._scale32 = tensors["scale"].float()
            self._gemv = kernels.bind_linear_i8(w, self._scale32)
        elif fmt == "int4":
            self._gemv = kernels.bind_linear_i4(tensors["w4"], tensors["sm"])

    def act_dtype_for(self, rows: int) -> torch.dtype:
        """The activation dtype for an input of ``rows`` rows (int8/int4: fp32 on the C kernels' decode path)."""
        if self.fmt in ("int8", "int4") and rows <= GEMV_ROWS and self.device.type == "cpu":
            return torch.float32
        return self.act_dtype

    @classmethod
    def from_weight(cls, fmt: str, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    device: torch.device | str = "cpu") -> "Linear":
        """Quantize/convert a float ``[N, K]`` weight."""
        w = weight.detach().float()
        n, k = w.shape
        device = torch.device(device)
        if fmt in ("int8", "int4") and (device.type != "cpu" or (fmt == "int4" and k % INT4_GROUP)):
            fmt = "bf16"                         # no kernel for it there: the same weights, dequantized
        if fmt == "fp32":
            t = {"w": w.t().contiguous()}
        elif fmt == "bf16":
            t = {"w": w.to(torch.bfloat16).contiguous()}
        elif fmt == "int8":
            # the scale is stored in bf16 (torch's kernel reads it so): quantize with that rounded scale, else each
            # channel carries a gain error of up to 0.4 % (bf16's mantissa) on top of the int8 rounding. Rounded
            # up, so the largest weight still fits in 127 steps.
            scale = (w.abs().amax(1) / 127).clamp(min=1e-12)
            scale = _bf16_at_least(scale)
            q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
            t = {"w": q.contiguous(), "scale": scale.to(torch.bfloat16)}
        elif fmt == "int4":
            # scale and minimum in fp16, as GGUF's Q4_1 stores them: weights from a Q4_1 checkpoint (the bundled
            # model) come back exactly; bf16's shorter mantissa moved them off their grid (5x the KL vs fp32).
            # Of the fp16 scales around (max - min) / 15, each group keeps the one that reconstructs it best
            g = w.view(n, k // INT4_GROUP, INT4_GROUP)
            lo = g.amin(-1).to(torch.float16).float()
            mid = ((g.amax(-1) - lo) / 15).clamp(min=2 ** -24).to(torch.float16)
            scales = torch.stack([mid, torch.nextafter(mid, torch.zeros_like(mid)), torch.nextafter(mid, mid + 1)])
            scales = scales.float().clamp(min=2 ** -24)                                   # [3, N, K/32]
            qs = ((g - lo[..., None]) / scales[..., None]).round().clamp(0, 15)           # [3, N, K/32, 32]
            best = ((qs * scales[..., None] + lo[..., None]) - g).pow(2).sum(-1).argmin(0, keepdim=True)   # ties: mid
            scale = scales.gather(0, best)[0]                                             # [N, K/32]
            q = qs.gather(0, best[..., None].expand(1, *g.shape))[0].to(torch.uint8)      # [N, K/32, 32]
            w4 = q[..., :16] | (q[..., 16:] << 4)                    # byte j: column j low, column 16 + j high
            sm = torch.stack([scale, lo], -1).to(torch.float16)      # [N, K/32, 2]
            t = {"w4": w4.reshape(n, k // 2).contiguous(), "sm": sm.contiguous()}
        else:
            raise ValueError(f"unknown weight format {fmt!r}; choose one of: {', '.join(FORMATS)}")
        if bias is not None:
            t["bias"] = bias.detach().to(torch.float32 if fmt == "fp32" else torch.bfloat16)
        t = {name: v.to(device) for name, v in t.items()}
        return cls(fmt, t, n, k)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        f = self.fmt
        if f == "fp32":
            y = x @ self._w_t
        elif f == "bf16":
            y = F.linear(x, self._w)
        elif f == "int8":
            if x.dtype == torch.float32:                      # decode: the C kernel, fp32 in and out
                y = self._gemv(x)
            else:
                y = torch._weight_int8pack_mm(x, self.t["w"], self.t["scale"])
        elif x.dtype == torch.float32:                        # int4 decode: the C kernel, fp32 in and out
            y = self._gemv(x)
        else:                                                 # int4, many rows (prefill): a bf16 matmul
            y = F.linear(x, kernels.dequant_i4(self.t["w4"], self.t["sm"]))
        if self.bias is not None:
            y += self.bias
        return y

    def c_projection(self):
        """``(fmt, w, s)`` for :class:`asyncspade.kernels.LayerGlue` when this projection runs on a C kernel in
        decode (int4, int8 on the CPU, without a bias), else None."""
        if self.bias is not None or self.device.type != "cpu":
            return None
        if self.fmt == "int4":
            return 4, self.t["w4"], self.t["sm"]
        if self.fmt == "int8":
            return 8, self.t["w"], self._scale32
        return None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T`` in fp32 whatever the activations' dtype (the LM head: sampling and log-probabilities read
        every logit; int8 takes the C kernel for any number of rows)."""
        if self.fmt == "int8" and self.t["w"].device.type == "cpu":
            y = self._gemv(x)
            return y if self.bias is None else y + self.bias.float()
        return self(x.to(self.act_dtype)).float()

    def rows(self, lo: int, hi: int) -> "Linear":
        """The projection onto output features ``[lo, hi)`` (e.g. the query part of a fused QKV), sharing storage
        with it."""
        f, t = self.fmt, self.t
        if f == "fp32":
            sub = {"w": t["w"][:, lo:hi]}
        elif f == "bf16":
            sub = {"w": t["w"][lo:hi]}
        elif f == "int8":
            sub = {"w": t["w"][lo:hi], "scale": t["scale"][lo:hi]}
        else:
            sub = {"w4": t["w4"][lo:hi], "sm": t["sm"][lo:hi]}
        if self.bias is not None:
            sub["bias"] = self.bias[lo:hi]
        return Linear(f, sub, hi - lo, self.in_features)

    def dequantized(self) -> torch.Tensor:
        """The float ``[N, K]`` weight this format represents (tests, and int4 row slices)."""
        f, t = self.fmt, self.t
        if f == "fp32":
            return t["w"].t().float()
        if f == "bf16":
            return t["w"].float()
        if f == "int8":
            return t["w"].float() * t["scale"].float()[:, None]
        return kernels.reference.int4_weight(t["w4"], t["sm"])

    @property
    def nbytes(self) -> int:
        """Bytes one pass over this projection reads."""
        return sum(v.numel() * v.element_size() for v in self.t.values())
