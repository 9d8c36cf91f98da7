"""Weight-only quantised matrices for the fused runner on CPU (`quantize: int4`).

`Int4Weight`: llama.cpp's Q4_1 layout (4-bit codes in groups of 32 input columns, a scale and an
offset per group) multiplied by torch's int4 CPU kernel; `Int8Weight`: the output layer at 8 bits
(one scale per row). Both fall back to a dense GEMM on the dequantised weight where that is faster
(many rows: a prefill, a large batch); crossovers measured in docs/serving.md.

Both compute in the runner's dtype: bf16 where the CPU has native bf16 (AMX, AVX-512 BF16), fp32
elsewhere (`dtype: auto`, plural.cpu). torch's int4 and int8 kernels take fp32 activations as well
as bf16; on an AVX2 CPU a bf16 dense fallback is emulated through fp32 conversions and was what
made an int4 prefill take 11 s there (issue 19). Scales and offsets are bf16-rounded either way, so
the quantised weight is the same on every CPU.
"""

from __future__ import annotations

import torch

from plural.errors import PluralError

QUANTIZE = ("none", "int4")


class Int4Weight:
    """A weight [out, in] as unsigned 4-bit codes in groups of `GROUP` input columns, each group
    with its own scale and offset: w = scale·q + min (q in 0..15), the affine 4-bit scheme of
    llama.cpp's Q4_1. Round-to-nearest from the float weight; a weight that came from Q4_1 (the
    bundled GGUF) has every group's min and max on its grid, so its codes are recovered exactly
    (checked on SmolLM2); only scale and offset are rounded from Q4_1's fp16 to the kernel's bf16.

    `matmul(x)` is `x @ w.T` for x [..., in] (any float dtype; computed in bf16)."""

    GROUP = 32

    def __init__(self, w: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
        out, inp = w.shape
        if inp % self.GROUP:
            raise PluralError(f"quantize int4 needs input widths divisible by {self.GROUP}; this model has a projection of width {inp}")
        g = w.detach().float().reshape(out, inp // self.GROUP, self.GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(out, inp)
        # torch's kernel dequantises (q - 8)·scale + zero: so zero = min + 8·scale. [in/G, out, 2],
        # rounded to bf16 (the kernel's format on every CPU), then held in the compute dtype.
        self.dtype = dtype
        self.scales_zeros = torch.stack([scale.T, (lo + 8 * scale).T], dim=-1).to(torch.bfloat16).to(dtype).contiguous()
        # The kernel's own blocked layout, and the same codes as plain nibble pairs [out, in/2] for
        # `dequantize` (the kernel's cost grows with the rows it multiplies: past `kernel_rows` rows,
        # a long prefill, one dense matmul on the dequantised weight is faster).
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        self.nibbles = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
        self.out, self.inp = out, inp
        self.kernel_rows = self.KERNEL_ROWS[dtype]

    # Crossovers measured on SmolLM2-135M's shapes (2 cores). bf16 (AMX): for gate|up [3072, 576] the
    # kernel takes 1.4 ms at 64 rows and 5.6 at 256 against 7.7 and 7.6 ms to dequantise and multiply
    # in bf16; at 512 rows 10.7 against 8.0. fp32 (kernels capped to AVX2): see docs/serving.md.
    KERNEL_ROWS = {torch.bfloat16: 256, torch.float32: 256}

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.inp).to(self.dtype)
        if x2.shape[0] <= self.kernel_rows:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.GROUP, self.scales_zeros)
        else:
            y = x2 @ self.dequantize().T
        return y.view(*lead, self.out).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The weight [out, in] in the compute dtype: (q − 8)·scale + zero per group, as the kernel computes it."""
        n = self.nibbles
        q = torch.stack([n & 15, n >> 4], dim=-1).view(self.out, self.inp // self.GROUP, self.GROUP)
        sz = self.scales_zeros.float()
        w = (q.float() - 8) * sz[..., 0].T[..., None] + sz[..., 1].T[..., None]
        return w.view(self.out, self.inp).to(self.dtype)


class Int8Weight:
    """A weight [out, in] as int8 with one bf16 scale per output row (symmetric), multiplied by
    torch's int8 weight-only CPU kernel. Used for the output layer under `quantize: int4`. Measured
    on SmolLM2-135M, teacher-forced over 400 tokens of README text, KL(bf16 ‖ quantised) of the
    next-token distribution: 4-bit projections with a bf16 output layer 0.0021; with an int8 one
    0.0045 (top-1 agreement 94.5%); with a 4-bit one 0.051 (83%). llama.cpp's Q4_1 files keep this
    matrix at 8 bits (Q8_0) too."""

    # torch's int8 kernel is bandwidth-bound at one row and compute-bound beyond a few: past
    # `kernel_rows` rows (a batch of streams, a prefill) the same int8 weight, dequantised once to
    # the compute dtype, is multiplied by the dense GEMM instead (crossover measured in docs/serving.md).
    KERNEL_ROWS = {torch.bfloat16: 4, torch.float32: 4}

    def __init__(self, w: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
        w = w.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
        self.q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
        self.dtype = dtype
        self.scale = scale.to(torch.bfloat16).to(dtype)
        self.out, self.inp = w.shape
        self.kernel_rows = self.KERNEL_ROWS[dtype]
        self.dense = self.dequantize()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.inp).to(self.dtype)
        if x2.shape[0] <= self.kernel_rows:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale)
        else:
            y = x2 @ self.dense.T
        return y.view(*lead, self.out).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return (self.q.float() * self.scale.float()[:, None]).to(self.dtype)


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x @ w.T for a dense weight tensor or a quantised one."""
    return w.matmul(x) if isinstance(w, (Int4Weight, Int8Weight)) else x @ w.T
