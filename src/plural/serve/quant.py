"""Weight-only quantised matrices for the fused runner on CPU (`quantize: int4`).

`Int4Weight`: llama.cpp's Q4_1 layout (4-bit codes in groups of 32 input columns, a scale and an
offset per group) multiplied by torch's int4 CPU kernel; `Int8Weight`: the output layer at 8 bits
(one scale per row). Both fall back to a dense GEMM on the dequantised weight where that is faster
(many rows: a prefill, a large batch).

Kernels per CPU kind (plural.cpu; measured on SmolLM2-135M's shapes, 2 cores, docs/serving.md):
torch's int4 and int8 kernels take bf16 activations on every CPU (with fp32 ones they were 15-35x
slower with kernels capped to AVX2: a scalar path); the dense fallback runs in bf16 where the CPU
has native bf16 (AMX, AVX-512 BF16) and in fp32 elsewhere, where a bf16 GEMM is emulated (5.7x
slower than fp32 at a 640-row prefill; it was what made an int4 prefill take 11 s on a 2-core
AVX2 EPYC, issue 19). The crossovers differ with it. Scales and offsets are bf16 either way, so the
quantised weight is the same on every CPU.
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

    def __init__(self, w: torch.Tensor, dense: torch.dtype | None = None):
        out, inp = w.shape
        if inp % self.GROUP:
            raise PluralError(f"quantize int4 needs input widths divisible by {self.GROUP}; this model has a projection of width {inp}")
        g = w.detach().float().reshape(out, inp // self.GROUP, self.GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(out, inp)
        # torch's kernel dequantises (q - 8)·scale + zero: so zero = min + 8·scale. [in/G, out, 2]
        self.scales_zeros = torch.stack([scale.T, (lo + 8 * scale).T], dim=-1).to(torch.bfloat16).contiguous()
        # The kernel's own blocked layout, and the same codes as plain nibble pairs [out, in/2] for
        # `dequantize` (the kernel's cost grows with the rows it multiplies: past `kernel_rows` rows,
        # a long prefill, one dense matmul on the dequantised weight is faster).
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        # nibbles [out, in/G, 16]: a group's first 16 codes in the low nibbles, its last 16 in the
        # high ones, so unpacking writes whole runs of 16 (measured in `dequantize`).
        qg = q.view(out, inp // self.GROUP, 2, self.GROUP // 2)
        self.nibbles = (qg[:, :, 0] | (qg[:, :, 1] << 4)).to(torch.uint8).contiguous()
        self.out, self.inp = out, inp
        self.dense = dense or dense_dtype()
        self.kernel_rows = self.KERNEL_ROWS[self.dense]

    # Rows up to which the kernel beats dequantise-and-multiply, by the dense GEMM's dtype (2 cores,
    # gate|up [3072, 576]). bf16 (AMX): kernel 1.4 ms at 64 rows and 5.6 at 256 against 7.7 and 7.6;
    # at 512 rows 10.7 against 8.0. fp32 (kernels capped to AVX2): kernel 2.9 ms at 64 rows and 29 at
    # 640 against 4.7 and 14.4.
    KERNEL_ROWS = {torch.bfloat16: 256, torch.float32: 128}

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.inp)
        if x2.shape[0] <= self.kernel_rows:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.packed, self.GROUP, self.scales_zeros)
        else:
            y = x2.to(self.dense) @ self.dequantize().T
        return y.view(*lead, self.out).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The weight [out, in] in the dense dtype: (q − 8)·scale + zero per group, as the kernel computes it.

        A long prefill dequantises every projection each step. Written in place, run by run, this
        took 2.2 ms a layer against 12.5 for unpacking interleaved pairs through temporaries
        (SmolLM2's four fused projection shapes, capped to AVX2, 2 threads, medians of 9
        alternations, same values); a whole 640-token int4 prefill step stayed ~1.05 s either way,
        within this VM's noise: the GEMMs dominate it."""
        G = self.GROUP
        f32 = torch.empty(self.out, self.inp)
        # w = q·scale + (zero − 8·scale): one multiply and one add per element. Both forms are exact
        # in fp32 (bf16 scale and zero, 4-bit q), so this is the kernel's value. [out, in/G, 1] each.
        sz = self.scales_zeros.float()
        scale, offset = sz[..., 0].T[..., None], (sz[..., 1] - 8 * sz[..., 0]).T[..., None]
        lo, hi = self.nibbles & 15, self.nibbles >> 4
        halves = f32.view(self.out, self.inp // G, 2, G // 2)
        torch.mul(lo, scale, out=halves[:, :, 0])
        torch.mul(hi, scale, out=halves[:, :, 1])
        f32.view(self.out, self.inp // G, G).add_(offset)
        return f32.to(self.dense)


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
    # bf16 (AMX), [49152, 576]: kernel 2.3 ms at 1-4 rows against 3.5-4.0 dense; 8.5 ms at 16 rows
    # against 5.7. fp32 (capped to AVX2): alone, kernel 10.9 ms at 16 rows against 13.5 dense, 43.6
    # at 64 against 26.4; inside a 16-row decode step (caches shared with the rest) 15.5 against 13.0,
    # and at one row 2.8 against 4.5: the kernel up to 8 rows.
    KERNEL_ROWS = {torch.bfloat16: 4, torch.float32: 8}

    def __init__(self, w: torch.Tensor, dense: torch.dtype | None = None):
        w = w.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
        self.q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16)
        self.out, self.inp = w.shape
        self.dense = dense or dense_dtype()
        self.kernel_rows = self.KERNEL_ROWS[self.dense]
        self.dense_w = dense_weight(self.dequantize())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.inp)
        if x2.shape[0] <= self.kernel_rows:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.q, self.scale)
        else:
            y = linear(x2.to(self.dense), self.dense_w)
        return y.view(*lead, self.out).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return (self.q.float() * self.scale.float()[:, None]).to(self.dense)


class PackedWeight:
    """A dense fp32 weight [out, in] in oneDNN's blocked layout, multiplied by oneDNN's fp32 GEMM.

    The same fp32 product as `x @ w.T` (relative difference ~5e-7: another summation order), but
    at the decode step's few rows MKL's sgemm on the plain [out, in] weight is slow for wide
    outputs: with kernels capped to AVX2 (2 cores, SmolLM2-135M, benchmarks/matmul_kernels_bench.py,
    docs/benchmarks.md#matmul-kernels) the output layer [49152, 576] took 20.1 ms at 16 rows against
    10.1 prepacked, gate|up [3072, 576] 0.92 against 0.52; at 2048 rows the two are within 10%.
    Used for every dense fp32 matrix the CPU runner multiplies (`dense_weight`)."""

    def __init__(self, w: torch.Tensor):
        self.out, self.inp = w.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().float().contiguous())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.inp).contiguous(), self.packed, None, "none", [], "")
        return y.view(*lead, self.out)


def dense_weight(w: torch.Tensor):
    """`w` as the runner multiplies it: prepacked for oneDNN where it is an fp32 CPU matrix and
    torch has oneDNN (x86 builds), else the plain tensor (`x @ w.T`)."""
    if w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        return PackedWeight(w)
    return w


def dense_dtype() -> torch.dtype:
    """The dtype of dense fallbacks on this CPU: bf16 where it is native, else fp32."""
    from plural.cpu import cpu_info

    return torch.bfloat16 if cpu_info().fast_bf16 else torch.float32


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x @ w.T for a dense weight tensor or a quantised one."""
    return w.matmul(x) if isinstance(w, (Int4Weight, Int8Weight, PackedWeight)) else x @ w.T
